"""One spelling of JSON output for every command: `--json` prints the command's result as JSON on stdout (and
nothing else goes there), `--json-out PATH` also writes it to a file.

`--json PATH`, the old spelling of `--json-out` in some commands, is still accepted for one release, with a note on
stderr. Every JSON result carries `diffmem_version` and `schema_version` (the version of its layout, as
`filter-many`'s summary), so a platform that stores results can tell which release wrote them.

Imports nothing heavy, so a command's `--help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from diffmem import __version__

#: Version of the layout of diffmem's JSON results; raised when a key changes meaning or goes away.
JSON_SCHEMA = 1
#: The value `--json` takes when given without a path: print on stdout.
STDOUT = "-"


def add_json_options(parser: argparse.ArgumentParser, what: str = "the result", stdout: bool = True) -> None:
    """Add `--json` (print `what` as JSON on stdout) and `--json-out PATH` (also write it to PATH). Without
    `stdout` (a command whose result is a page, not a record), `--json` is only the old spelling of `--json-out`."""
    parser.add_argument("--json", nargs=None if not stdout else "?", const=STDOUT if stdout else None, default=None,
                        metavar="PATH",
                        help=(f"print {what} as JSON on stdout, and nothing else there (--json PATH: " if stdout
                              else "(") + "the old spelling of --json-out, accepted for one release)")
    parser.add_argument("--json-out", type=Path, default=None, metavar="PATH", help=f"also write {what} as JSON to PATH")


def add_json_out_option(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    """`--json-out PATH` alone, for the commands whose `--json` is a plain flag (`filter`, `inspect`,
    `filter-many`, `anchors`: a LoRA path may follow it on the command line, so it cannot take a value)."""
    parser.add_argument("--json-out", type=Path, default=None, metavar="PATH", help=f"also write {what} as JSON to PATH")


def write_json_out(args: argparse.Namespace, result: dict, protect: Sequence[str | Path] = ()) -> None:
    """Write `result` (stamped) to `--json-out` when given (atomically, never over `protect`)."""
    from diffmem.formats.safetensors_io import write_atomic

    if getattr(args, "json_out", None) is not None:
        write_atomic((json.dumps(stamped(result), indent=2) + "\n").encode(), args.json_out, protect=tuple(protect))


def json_stdout(args: argparse.Namespace) -> bool:
    """True when `--json` asks for JSON on stdout."""
    return getattr(args, "json", None) == STDOUT


def json_file(args: argparse.Namespace) -> Path | None:
    """The file `--json-out` (or the old `--json PATH`) names, None when neither does."""
    legacy = getattr(args, "json", None)
    if legacy not in (None, STDOUT):
        print(f"diffmem: note: --json {legacy} is the old spelling of --json-out {legacy}; it will go in the next "
              "release", file=sys.stderr)
        if args.json_out is None:
            return Path(legacy)
    return args.json_out


def stamped(result: dict) -> dict:
    """`result` with `diffmem_version` and `schema_version` first."""
    return {"diffmem_version": __version__, "schema_version": JSON_SCHEMA, **result}


@contextlib.contextmanager
def json_mode(args: argparse.Namespace) -> Iterator[None]:
    """With `--json` on stdout, what the command prints for people goes to stderr instead, so stdout holds the JSON
    alone (`emit_json` writes it to the real stdout)."""
    if not json_stdout(args):
        yield
        return
    args.json_stream = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        yield


def emit_json(args: argparse.Namespace, result: dict, protect: Sequence[str | Path] = ()) -> dict:
    """Print `result` (stamped) on stdout for `--json`, write it for `--json-out` (atomically, never over
    `protect`); returns the stamped result."""
    from diffmem.formats.safetensors_io import write_atomic

    result = stamped(result)
    text = json.dumps(result, indent=2) + "\n"
    path = json_file(args)
    if path is not None:
        write_atomic(text.encode(), path, protect=tuple(protect))
    if json_stdout(args):
        stream = getattr(args, "json_stream", sys.stdout)
        stream.write(text)
        stream.flush()
    return result
