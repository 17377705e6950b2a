"""Opening input files safely: only regular files and folders, and every OS error as one line naming the file.

A platform runs diffmem on uploads it did not write. `open()` on a FIFO blocks until a writer appears, so a named
pipe given as a LoRA would hang a batch forever; a symlink loop or an unreadable file would end in a traceback.
Every input path goes through `check_input` (is it a regular file or a folder?) and every file is opened with
`open_regular`, which cannot block (O_NONBLOCK) and checks the type of what it actually opened, so a file swapped
for a FIFO between the check and the open is refused too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from diffmem.errors import DiffmemError, FileFormatError

# What `stat` says a path is, in words, for the kinds of file diffmem refuses.
SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
# Flags that keep an open from blocking (FIFOs) and from leaking into child processes; absent on Windows.
OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def special_kind(mode: int) -> str | None:
    """The kind of a special file ("a FIFO (named pipe)", ...), or None for a regular file or a folder."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((words for test, words in SPECIAL_KINDS if test(mode)), "a special file")


def check_input(path: str | Path) -> os.stat_result:
    """The stat of ``path`` (links followed), or one clear error: missing, unreadable, a link loop, not a regular
    file or folder."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise DiffmemError("no such file or folder", path) from None
    except OSError as exc:  # ELOOP (a symlink loop), EACCES (a folder on the way we may not enter), ENAMETOOLONG
        raise DiffmemError(f"cannot be read: {exc.strerror}", path) from None
    kind = special_kind(info.st_mode)
    if kind is not None:
        raise FileFormatError(f"is {kind}, not a regular file or a folder; refusing to read it", path)
    return info


def open_regular(path: str | Path, buffering: int = -1) -> BinaryIO:
    """``path`` opened for binary reading, never blocking; refused unless it is a regular file."""
    path = Path(path)
    try:
        fd = os.open(path, OPEN_FLAGS)
    except FileNotFoundError:
        raise DiffmemError("no such file", path) from None
    except OSError as exc:
        raise DiffmemError(f"cannot be read: {exc.strerror}", path) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a folder" if stat.S_ISDIR(mode) else special_kind(mode)
        raise FileFormatError(f"is {what}, not a regular file", path)
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)  # O_NONBLOCK was only for the open; regular-file reads ignore it anyway
    return os.fdopen(fd, "rb", buffering=buffering)


def read_text(path: str | Path) -> str:
    """The text of a small file (a JSON config), read through `open_regular`; bad UTF-8 is a FileFormatError."""
    with open_regular(path) as handle:
        data = handle.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"is not UTF-8 text ({exc.reason} at byte {exc.start})", path) from None
