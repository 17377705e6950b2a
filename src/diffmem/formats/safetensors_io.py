"""Validated reading and atomic, deterministic writing of safetensors files.

Every file diffmem opens goes through here, so every bad file gets the same clear error: what the file
is, and what is wrong with it. The header is checked against the file's size before any tensor is
touched, so a truncated download or a header that lies about offsets never reaches the maths.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import math
import os
import shutil
import stat
import struct
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import safetensors.torch
import torch

from diffmem.errors import BadWeightsError, DiffmemError, FileFormatError
from diffmem.formats.files import check_input, open_regular, special_kind

# Bytes per element of each safetensors dtype name.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_DIM = 2**63 - 1  # a dimension torch can hold (int64)


def sniff_pickle(path: Path, head: bytes) -> str | None:
    """Say what kind of pickle container `head` starts, or None when it is not one."""
    if head[:2] == b"PK":
        return "a zip archive (a PyTorch .pt/.ckpt pickle)"
    # A safetensors header length of 640, 896, ... bytes also starts 80 02..05; its JSON header then opens at byte 8.
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6) and head[8:9] != b"{":
        return "a Python pickle"
    return None


def read_header(path: str | Path) -> tuple[dict, dict[str, str]]:
    """Return (tensor entries, metadata) of a safetensors file after checking the header against the file.

    As strict as the safetensors library: a header of at most 100,000,000 bytes, `__metadata__` (when present) an
    object of strings, and tensors that tile the data exactly, without overlaps, gaps or trailing bytes.
    """
    path = Path(path)
    if stat.S_ISDIR(check_input(path).st_mode):
        raise FileFormatError("is a folder, not a .safetensors file", path)
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(9)
        kind = sniff_pickle(path, head)
        head = head[:8]
        handle.seek(len(head))
        if kind is not None:
            raise FileFormatError(
                f"is {kind}, not safetensors; pickles can run code when loaded, so diffmem reads them only "
                "through torch.load(weights_only=True) for .ckpt/.pt/.pth bases, and never for LoRAs",
                path,
            )
        if len(head) < 8:
            raise FileFormatError(f"is {size} bytes long: too short to be a safetensors file (truncated?)", path)
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES:
            raise FileFormatError(
                f"not a safetensors file: the header claims {header_len} bytes, over the format's limit of "
                f"{MAX_HEADER_BYTES}",
                path,
            )
        if 8 + header_len > size:
            raise FileFormatError(
                f"not a safetensors file, or truncated: the header claims {header_len} bytes but the file has {size}",
                path,
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FileFormatError(f"not a safetensors file: its header is not JSON ({type(exc).__name__})", path) from None
    if not isinstance(header, dict):
        raise FileFormatError("not a safetensors file: its header is not a JSON object", path)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FileFormatError("safetensors metadata must be a JSON object mapping strings to strings", path)
    data_len = size - 8 - header_len
    for name, entry in header.items():
        check_entry(path, name, entry, data_len)
    check_tiling(path, header, data_len)
    return header, metadata


def check_entry(path: Path, name: str, entry: object, data_len: int) -> None:
    """Raise when one header entry's dtype, shape and offsets do not describe bytes inside the file."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise FileFormatError(f"header entry {name!r} is malformed", path)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise FileFormatError(f"tensor {name!r} has unknown dtype {dtype!r}", path)
    # type() is int, not isinstance(): JSON `true` is a Python bool, which is an int.
    if not (isinstance(shape, list) and all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)):
        raise FileFormatError(f"tensor {name!r} has an invalid shape {shape!r}", path)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise FileFormatError(f"tensor {name!r} has invalid data offsets {offsets!r}", path)
    begin, end = offsets
    expected = DTYPE_SIZES[dtype] * math.prod(shape)
    if not 0 <= begin <= end or end - begin != expected:
        raise FileFormatError(
            f"header lies about tensor {name!r}: shape {shape} of {dtype} needs {expected} bytes, "
            f"offsets {offsets} give {end - begin}",
            path,
        )
    if end > data_len:
        raise FileFormatError(
            f"truncated: tensor {name!r} ends at byte {end} of the data but the file holds only {data_len}", path
        )


def check_tiling(path: Path, header: Mapping[str, dict], data_len: int) -> None:
    """Raise unless the tensors' byte ranges tile the data exactly: two tensors sharing bytes would let a write to
    one change the other, and bytes no tensor owns are hidden content (both are refused by safetensors too)."""
    covered, previous = 0, None
    for name, entry in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, end = entry["data_offsets"]
        if begin < covered:
            raise FileFormatError(f"tensors {previous!r} and {name!r} overlap in the data (from byte {begin})", path)
        if begin > covered:
            raise FileFormatError(f"bytes {covered}..{begin} of the data are not covered by any tensor", path)
        covered, previous = end, name
    if covered != data_len:
        raise FileFormatError(f"bytes {covered}..{data_len} of the data are not covered by any tensor", path)


def extremes_finite(tensor: torch.Tensor) -> bool:
    """Whether a non-empty float tensor holds no NaN or Inf, in one pass without a boolean copy: its minimum and
    maximum are finite only if every value is (both propagate a NaN, and an Inf is one of them)."""
    return all(math.isfinite(float(bound)) for bound in torch.aminmax(tensor))


def check_finite(tensor: torch.Tensor, name: str, path: str | Path | None) -> torch.Tensor:
    """Return `tensor`, or raise when it holds NaN or Inf (a broken training run or a corrupted file).

    One pass finds any NaN or Inf: for float16 and bfloat16 the minimum and maximum (both propagate a NaN, and an
    Inf is one of them; 3 to 5 times faster than summing them), for other floats a float32 (float64) sum (a NaN or
    Inf term makes it non-finite; torch has no minimum and maximum of float8). Only a non-finite result, which a
    huge but finite sum could also give, pays for the exact element-wise count.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return tensor
    if tensor.dtype in (torch.float16, torch.bfloat16):
        suspicious = not extremes_finite(tensor)
    else:
        total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
        suspicious = not math.isfinite(float(total))
    if not suspicious:
        return tensor
    exact = tensor.float() if tensor.element_size() == 1 else tensor  # torch's isfinite has no float8 kernel
    bad = int((~torch.isfinite(exact)).sum())
    if bad:
        raise BadWeightsError(f"tensor {name!r} holds {bad} NaN or Inf values", path)
    return tensor


#: torch dtype of each safetensors dtype name.
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def read_at(file: BinaryIO, into: memoryview, offset: int) -> int:
    """Read into ``into`` from byte ``offset`` of ``file``; the bytes read (positioned, where the OS has preadv)."""
    if hasattr(os, "preadv"):
        return os.preadv(file.fileno(), [into], offset)
    file.seek(offset)
    return file.readinto(into) or 0


class SafetensorsFile(Mapping[str, torch.Tensor]):
    """A validated safetensors file whose tensors are read on access, one at a time, each with one positioned read
    of exactly its bytes.

    Reads go through the file descriptor rather than a memory map, so a tensor's pages are the process's own only
    while the tensor lives: filtering against a 5 GB base leaves no gigabytes of mapped pages in its resident set.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.header, self.metadata = read_header(self.path)
        self._file = open_regular(self.path, buffering=0)  # held for the object's lifetime
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        self._data_start = 8 + header_len

    def __del__(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of `key` from the header, without reading the tensor."""
        return tuple(self.header[key]["shape"])

    def _read(self, key: str, start_row: int | None = None, end_row: int | None = None) -> torch.Tensor:
        """Rows ``start_row:end_row`` (all rows by default) of ``key`` as a tensor of the file's dtype."""
        if key not in self.header:
            raise KeyError(key)
        entry = self.header[key]
        shape = list(entry["shape"])
        begin, end = entry["data_offsets"]
        if start_row is not None:
            rows = shape[0] if shape else 1
            start_row, end_row, _ = slice(start_row, end_row).indices(rows)
            end_row = max(start_row, end_row)
            row_bytes = (end - begin) // rows if rows else 0
            begin, end = begin + start_row * row_bytes, begin + end_row * row_bytes
            shape[0] = end_row - start_row
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        done = 0
        while done < len(view):
            got = read_at(self._file, view[done:], self._data_start + begin + done)
            if got <= 0:
                raise FileFormatError(f"truncated while reading tensor {key!r} (the file changed on disk?)", self.path)
            done += got
        return buffer.view(TORCH_DTYPES[entry["dtype"]]).reshape(shape)

    def get(self, key: str, dtype: torch.dtype | None = None, check: bool = True) -> torch.Tensor:
        """The tensor ``key``, converted to ``dtype`` if given, checked to be finite (after the conversion, where
        the check is cheaper for float32). ``check=False`` is for callers that verify what they compute from it
        instead (the anchor cache: a NaN or Inf in an anchor makes the module's scores non-finite)."""
        tensor = self._read(key)
        if dtype is not None:
            tensor = tensor.to(dtype)
        return check_finite(tensor, key, self.path) if check else tensor

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.get(key)

    def rows(self, key: str, start: int, end: int) -> torch.Tensor:
        """Rows ``start:end`` of ``key``, reading only those bytes (a slice of a fused qkv weight, say)."""
        return check_finite(self._read(key, start, end), key, self.path)

    def __iter__(self) -> Iterator[str]:
        return iter(self.header)

    def __len__(self) -> int:
        return len(self.header)


def load_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a (small) safetensors file, checking each tensor is finite."""
    handle = SafetensorsFile(path)
    return {key: handle[key] for key in handle}, dict(handle.metadata)


@dataclass(frozen=True)
class TensorBytes:
    """The tensor part of a safetensors file, apart from its metadata: the header entries (dtype, shape, offsets)
    and the data bytes they point into. One serialization serves any number of metadata headers (`with_metadata`),
    as `write_lora` needs for kohya's hashes and the file itself."""

    entries: dict
    data: memoryview

    @staticmethod
    def of(tensors: Mapping[str, torch.Tensor]) -> TensorBytes:
        """The tensors laid out as the safetensors library lays them out (deterministic), keys sorted."""
        contiguous = {key: tensors[key].detach().contiguous() for key in sorted(tensors)}
        raw = safetensors.torch.save(contiguous)
        (header_len,) = struct.unpack("<Q", raw[:8])
        entries = json.loads(raw[8 : 8 + header_len])
        entries.pop("__metadata__", None)
        return TensorBytes(dict(sorted(entries.items())), memoryview(raw)[8 + header_len :])

    def header(self, metadata: Mapping[str, str] | None = None) -> bytes:
        """The length prefix and header of the file with `metadata` (sorted keys)."""
        header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
        header.update(self.entries)
        return encode_header(header)

    def with_metadata(self, metadata: Mapping[str, str] | None = None) -> bytes:
        """The whole file's bytes with `metadata`."""
        return self.header(metadata) + self.data


def serialize(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Bytes of a safetensors file; the same tensors and metadata always give the same bytes.

    The safetensors library lays out the data deterministically but writes header keys in hash-map order, so the
    header is rewritten here with sorted keys (same offsets, so the data bytes and kohya's data hash are unchanged).
    """
    return TensorBytes.of(tensors).with_metadata(metadata)


def encode_header(header: Mapping) -> bytes:
    """The length prefix and JSON header of a safetensors file, padded to an 8-byte boundary as the format wants."""
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def refuse_overwriting(path: str | Path, protect: tuple[str | Path, ...], what: str = "the input file") -> None:
    """Raise when ``path`` is one of the files in ``protect`` (the same path, or the same file by a link) or lies
    inside one of them that is a folder (a diffusers base, a PEFT adapter); ``what`` names them in the message."""
    path = Path(path)
    real = Path(os.path.realpath(path))  # realpath, not resolve(): it does not raise on a symlink loop
    for other in map(Path, protect):
        other_real = Path(os.path.realpath(other))
        if other_real == real or (other.exists() and path.exists() and os.path.samefile(other, path)):
            raise DiffmemError(f"refusing to overwrite {what} {other}; choose another output path", path)
        if other.is_dir() and real.is_relative_to(other_real):
            raise DiffmemError(f"refusing to write inside {what} {other}; choose another output path", path)


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


#: How old a temporary file of unknown owner must be before a later write may delete it.
STALE_TEMP_SECONDS = 3600


def temp_owner_alive(pid: int) -> bool:
    """Whether process ``pid`` (the writer recorded in a temporary file's name) is still running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's process, or a platform without signal 0: assume it is alive
    return True


def temp_prefix(path: Path) -> str:
    """The name start of a temporary file or folder for writing ``path``: ``.<name>.<pid>.`` (`sweep_stale_temps`
    reads the pid back to tell a killed write from one in progress)."""
    return f".{path.name}.{os.getpid()}."


def sweep_stale_temps(path: Path) -> list[Path]:
    """Delete the temporary files (and staging folders) that killed writes of ``path`` left beside it; return them.

    A temporary is named ``.<name>.<pid>.<random>.tmp`` (``.old`` for a PEFT folder being replaced): it is stale
    when that process is gone (a write killed with SIGKILL, a power cut) or the name is over a day old, and, for a
    name without a pid (earlier versions), when it is over an hour old. Writes in progress, of this process or any
    other live one, are left alone.
    """
    swept = []
    now = time.time()
    for temp in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if temp.suffix not in (".tmp", ".old"):
            continue
        middle = temp.name[len(path.name) + 2 : -len(temp.suffix)].split(".")
        age = now - temp.lstat().st_mtime
        if len(middle) == 2 and middle[0].isdigit():
            stale = not temp_owner_alive(int(middle[0])) or age > 24 * 3600
        else:
            stale = age > STALE_TEMP_SECONDS
        if not stale or temp.is_symlink():
            continue
        with contextlib.suppress(OSError):
            if temp.is_dir():
                shutil.rmtree(temp)
            else:
                temp.unlink()
            swept.append(temp)
    return swept


# OS errors of a write that say the disk or file system refused it, not that diffmem has a bug.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}


def check_output_path(path: Path) -> None:
    """Raise unless ``path`` is free or an existing regular file: a folder or a device is never replaced."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DiffmemError(f"cannot be used as the output: {exc.strerror}", path) from None
    if stat.S_ISDIR(info.st_mode):
        raise DiffmemError("output path is a folder; give a file name", path)
    kind = special_kind(info.st_mode)
    if kind is not None:
        raise DiffmemError(f"output path is {kind}, not a regular file; refusing to replace it", path)


@contextlib.contextmanager
def atomic_writer(path: str | Path, protect: tuple[str | Path, ...] = ()) -> Iterator[BinaryIO]:
    """A binary handle to a temporary file beside `path` that becomes `path` (fsynced, renamed) when the block ends
    without error, and is removed otherwise, so no partial output is ever left behind.

    `protect` lists input files: writing over one of them is refused, so a typo never destroys a user's LoRA. A full
    disk or a read-only folder is one `DiffmemError` naming the output; what was at `path` before is unchanged.
    """
    path = Path(path)
    refuse_overwriting(path, protect)
    check_output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(path)
        fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise DiffmemError(f"cannot create the output: {exc.strerror}", path) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, default_file_mode())  # mkstemp makes 0600; outputs should be as readable as any file
        os.replace(tmp_name, path)
    except BaseException as exc:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise DiffmemError(f"could not write the output ({exc.strerror}); any earlier file there is unchanged",
                               path) from None
        raise


def write_atomic(data: bytes, path: str | Path, protect: tuple[str | Path, ...] = ()) -> Path:
    """Write `data` to `path` atomically (see `atomic_writer`)."""
    with atomic_writer(path, protect) as handle:
        handle.write(data)
    return Path(path)


def save_file(
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
    protect: tuple[str | Path, ...] = (),
) -> Path:
    """Atomically write tensors and metadata as safetensors (see `write_atomic`)."""
    return write_atomic(serialize(tensors, metadata), path, protect=protect)


def save_file_streaming(
    shapes: Mapping[str, tuple[int, ...]],
    make_tensor,
    path: str | Path,
    dtype: torch.dtype = torch.float16,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a large safetensors file one tensor at a time: ``make_tensor(name)`` is called for each name in sorted
    order, so peak memory is one tensor, not the whole checkpoint. Atomic like `save_file`."""
    path = Path(path)
    names = sorted(shapes)
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    element = torch.empty((), dtype=dtype).element_size()
    for name in names:
        size = element * math.prod(shapes[name])
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    with atomic_writer(path) as handle:
        handle.write(encode_header(header))
        for name in names:
            tensor = make_tensor(name).to(dtype).contiguous()
            if tuple(tensor.shape) != tuple(shapes[name]):
                raise ValueError(f"{name}: made shape {tuple(tensor.shape)}, declared {shapes[name]}")
            handle.write(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return path


def addnet_hashes(tensors: Mapping[str, torch.Tensor] | TensorBytes, metadata: Mapping[str, str]) -> tuple[str, str]:
    """kohya's `sshs_model_hash` and `sshs_legacy_hash`: sha256 of the tensor bytes of the file written with
    only the `ss_*` metadata, and the first 8 hex digits of sha256 over bytes 1 MiB..1 MiB+64 KiB of it. Given
    `TensorBytes`, nothing is serialized again (the window is cut from the header and the data as they lie)."""
    laid_out = tensors if isinstance(tensors, TensorBytes) else TensorBytes.of(tensors)
    head = laid_out.header({k: v for k, v in metadata.items() if k.startswith("ss_")})
    model_hash = hashlib.sha256(laid_out.data).hexdigest()
    start, stop = 0x100000, 0x110000
    window = head[start:stop] + laid_out.data[max(0, start - len(head)) : max(0, stop - len(head))]
    return model_hash, hashlib.sha256(window).hexdigest()[:8]


def sha256_file(path: str | Path, block: int = 1 << 24) -> str:
    """sha256 of a whole file, read in blocks so a multi-GB checkpoint is never held in memory."""
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()
