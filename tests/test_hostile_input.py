"""Hostile and careless input to `diffmem filter` and `filter-many` (issue 15): nothing the user did not name as
output is written, every bad file gets one line naming it and exit 1, nothing hangs, a batch never dies of one file.

The CLI cases run `python -m diffmem` in a subprocess with a timeout, so a hang fails the test instead of hanging the
suite, and so stderr is exactly what a user would see.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import builders_base as bb
import builders_lora as bl
from diffmem.batch import filter_many, filter_one
from diffmem.cli import main
from diffmem.errors import BadWeightsError, DiffmemError, FileFormatError
from diffmem.filters import BAFConfig
from diffmem.formats import safetensors_io
from diffmem.formats.lora import read_lora
from diffmem.formats.safetensors_io import load_file, read_header
from diffmem.pipeline import filter_file

LOOKUPS = bb.lora_lookups("sd1", "kohya")


def run_cli(*args: str | Path, timeout: float = 120) -> tuple[int, str]:
    """Exit code and stderr of ``python -m diffmem ARGS``; fails (instead of hanging) past ``timeout`` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "diffmem", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    return done.returncode, done.stderr


def one_line_error(stderr: str) -> str:
    """The single error line of a refused command (no traceback, nothing else)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("diffmem: error: "), stderr
    return lines[0]


@pytest.fixture
def pair(tmp_path):
    """A tiny SD1 single-file base and a kohya LoRA for it."""
    base = bb.build_tiny_base(tmp_path, "sd1", "single_file")
    lora = tmp_path / "lora.safetensors"
    bl.write_kohya_lora(lora, LOOKUPS, rank=4)
    return base, lora


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


def refused(tmp_path, lora, base, error=DiffmemError, match=None) -> str:
    out = tmp_path / "refused-out.safetensors"
    with pytest.raises(error, match=match) as info:
        filter_file(lora, base, out, cache_dir=tmp_path / "cache")
    assert not out.exists()
    assert not leftovers(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    return message


def rewrite(path: Path, edit) -> None:
    """Apply ``edit(header_dict)`` to a safetensors file's JSON header, keeping its tensor bytes."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    path.write_bytes(safetensors_io.encode_header(header) + data[8 + length :])


# ------------------------------------------------------------------------------------------ data loss and damage


def test_output_on_the_base_is_refused_and_the_base_is_untouched(tmp_path, pair):
    base, lora = pair
    before = base.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(base)
    hard = tmp_path / "hard.safetensors"
    os.link(base, hard)
    for output in (base, link, hard):
        code, stderr = run_cli("filter", lora, "--base", base, "-o", output, "--no-cache", "--quiet", "--force")
        assert code == 1
        assert "refusing to overwrite the base checkpoint" in one_line_error(stderr)
    assert base.read_bytes() == before


def test_output_inside_a_diffusers_folder_base_is_refused(tmp_path):
    base = bb.build_tiny_base(tmp_path, "sd1", "diffusers_folder")
    lora = tmp_path / "lora.safetensors"
    bl.write_kohya_lora(lora, LOOKUPS, rank=4)
    unet = next(base.glob("unet/*.safetensors"))
    before = unet.read_bytes()
    with pytest.raises(DiffmemError, match="base"):
        filter_file(lora, base, unet, cache_dir=tmp_path / "cache")
    with pytest.raises(DiffmemError, match="base"):
        filter_file(lora, base, base / "unet" / "new.safetensors", cache_dir=tmp_path / "cache")
    assert unet.read_bytes() == before
    assert not (base / "unet" / "new.safetensors").exists()


def test_output_that_is_a_device_or_fifo_is_refused(tmp_path, pair):
    base, lora = pair
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    for output in (Path("/dev/null"), fifo):
        with pytest.raises(DiffmemError, match="not a regular file"):
            filter_file(lora, base, output, cache_dir=tmp_path / "cache")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_same_names_in_different_folders_get_mirrored_outputs(tmp_path, pair):
    base, _ = pair
    for folder, seed in (("a", 1), ("b", 2)):
        bl.write_kohya_lora(tmp_path / folder / "x.safetensors", LOOKUPS, rank=4, seed=seed)
    sources = [tmp_path / "a" / "x.safetensors", tmp_path / "b" / "x.safetensors"]
    out = tmp_path / "out"
    rows = filter_many(sources, base, out, BAFConfig(), workers=1, cache_dir=tmp_path / "cache", progress=False)
    assert [row.status for row in rows] == ["filtered", "filtered"]
    outputs = {Path(row.output) for row in rows}
    assert outputs == {out / "a" / "x.filtered.safetensors", out / "b" / "x.filtered.safetensors"}
    for source, row in zip(sources, rows):
        written = read_lora(row.output).metadata["diffmem.source_sha256"]
        assert written == safetensors_io.sha256_file(source)
    again = filter_many(sources, base, out, BAFConfig(), workers=1, cache_dir=tmp_path / "cache", progress=False)
    assert [row.status for row in again] == ["skipped", "skipped"]  # no ping-pong between the two


def test_files_diffmem_wrote_and_the_out_folder_are_not_filtered_again(tmp_path, pair):
    base, _ = pair
    folder = tmp_path / "loras"
    bl.write_kohya_lora(folder / "x.safetensors", LOOKUPS, rank=4)
    out = folder / "filtered"
    settings = {"workers": 1, "cache_dir": tmp_path / "cache", "progress": False}
    filter_many([folder], base, out, BAFConfig(), **settings)
    # An output copied back among the uploads is recognised by its provenance metadata and skipped.
    (folder / "x.filtered.safetensors").write_bytes((out / "x.filtered.safetensors").read_bytes())
    rows = filter_many([folder, out], base, out, BAFConfig(), **settings)  # --out also named as an input
    by_input = {Path(row.input).name: row for row in rows}
    assert set(by_input) == {"x.safetensors", "x.filtered.safetensors"}  # nothing read from the --out folder
    assert by_input["x.safetensors"].status == "skipped"
    assert by_input["x.filtered.safetensors"].status == "skipped"
    assert "written by diffmem" in by_input["x.filtered.safetensors"].reason
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["x.filtered.safetensors"]
    with pytest.raises(DiffmemError, match="is the --out folder"):
        filter_many([out], base, out, BAFConfig(), **settings)


def test_stale_temp_files_of_a_killed_write_are_swept(tmp_path, pair):
    base, lora = pair
    out = tmp_path / "out.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.safetensors.{dead_pid}.abc123.tmp"
    stale.write_bytes(b"half a file")
    legacy = tmp_path / ".out.safetensors.k2j3h4.tmp"  # the name earlier versions used, old enough to be stale
    legacy.write_bytes(b"half a file")
    old = time.time() - 2 * 3600
    os.utime(legacy, (old, old))
    live = tmp_path / f".out.safetensors.{os.getpid()}.zzz.tmp"  # a write in progress (this process): kept
    live.write_bytes(b"in progress")
    filter_file(lora, base, out, cache_dir=tmp_path / "cache")
    assert out.exists()
    assert not stale.exists() and not legacy.exists()
    assert live.exists()


WORKER_HOOK = """
import os, sys, time
from pathlib import Path

import diffmem.batch

def filter_one(source, base, output, config, options):
    (Path(os.environ["PIDS"]) / str(os.getpid())).write_text("")
    time.sleep(600)

if __name__ == "__main__":
    diffmem.batch.filter_one = filter_one
    from diffmem.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in "ZX"


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``, from /proc."""
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat_file.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_killed_batch_parent_takes_its_workers_with_it(tmp_path, pair):
    base, _ = pair
    folder = tmp_path / "loras"
    for seed in range(2):
        bl.write_kohya_lora(folder / f"l{seed}.safetensors", LOOKUPS, rank=4, seed=seed)
    pids = tmp_path / "pids"
    pids.mkdir()
    (tmp_path / "hook.py").write_text(textwrap.dedent(WORKER_HOOK))
    env = {**os.environ, "PIDS": str(pids), "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
           "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, str(tmp_path / "hook.py"), "filter-many", str(folder), "--base",
                               str(base), "--out", str(tmp_path / "out"), "--workers", "2", "--no-cache", "--json"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(list(pids.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.2)
        workers = [int(p.name) for p in pids.iterdir()]
        assert len(workers) == 2
        workers += children(parent.pid)  # the workers again, and multiprocessing's resource tracker
        assert len(set(workers)) >= 3
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 30
        while any(map(process_alive, workers)) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(map(process_alive, workers))
    finally:
        parent.kill()
        for pid in [int(p.name) for p in pids.iterdir()]:
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------- one clear line instead of a traceback


def test_rank_zero_is_refused(tmp_path, pair):
    base, lora = pair
    tensors, metadata = load_file(lora)
    name = next(iter(LOOKUPS))
    out_features, in_features = LOOKUPS[name][:2]
    tensors[f"{name}.lora_up.weight"] = torch.zeros(out_features, 0)
    tensors[f"{name}.lora_down.weight"] = torch.zeros(0, in_features)
    bl.save(tensors, lora, metadata)
    assert "rank 0" in refused(tmp_path, lora, base, FileFormatError)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint16, torch.bool, torch.int64])
def test_integer_and_bool_factors_are_refused(tmp_path, pair, dtype):
    base, lora = pair
    tensors, metadata = load_file(lora)
    key = next(k for k in tensors if k.endswith("lora_down.weight"))
    tensors[key] = torch.ones_like(tensors[key]).to(dtype)
    bl.save(tensors, lora, metadata)
    assert "floating point" in refused(tmp_path, lora, base, FileFormatError)


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}, 5, None])
def test_dtype_that_is_not_a_name_is_refused(tmp_path, pair, dtype):
    base, lora = pair
    rewrite(lora, lambda header: next(v for k, v in header.items() if k != "__metadata__").update(dtype=dtype))
    assert "dtype" in refused(tmp_path, lora, base, FileFormatError)


@pytest.mark.parametrize("dim", [True, 2**64, 2**63, -1, 1.5])
def test_shape_with_bools_or_huge_dims_is_refused(tmp_path, pair, dim):
    base, lora = pair

    def edit(header):
        entry = next(v for k, v in header.items() if k != "__metadata__")
        entry["shape"] = [dim, 0]
        entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][0]]

    rewrite(lora, edit)
    assert "shape" in refused(tmp_path, lora, base, FileFormatError)


def test_symlink_loop_is_one_line(tmp_path, pair):
    base, lora = pair
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(tmp_path / "loop2.safetensors")
    (tmp_path / "loop2.safetensors").symlink_to(loop)
    assert "symbolic links" in refused(tmp_path, loop, base)
    code, stderr = run_cli("filter", lora, "--base", loop, "-o", tmp_path / "o.safetensors", "--no-cache")
    assert code == 1
    assert "loop.safetensors" in one_line_error(stderr)


def test_unreadable_file_is_one_line(tmp_path, pair, monkeypatch):
    base, lora = pair
    if os.geteuid() == 0:  # root reads a mode-000 file, so make its open fail as it would for anyone else
        real_open = os.open

        def no_permission(path, flags, *args, **kwargs):
            if Path(path) == lora:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", no_permission)
    else:
        lora.chmod(0)
    assert "permission denied" in refused(tmp_path, lora, base).lower()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the output's temporary file through /proc")
def test_full_disk_keeps_the_old_output_and_says_so_in_one_line(tmp_path, pair, monkeypatch, capsys):
    base, lora = pair
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the previous output")

    real_fsync = os.fsync

    def full(fd):
        if ".out.safetensors." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    assert main(["filter", str(lora), "--base", str(base), "-o", str(out), "--no-cache", "--quiet", "--force",
                 "--cache-dir", str(tmp_path / "cache")]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "No space left on device" in line and "out.safetensors" in line
    assert out.read_bytes() == b"the previous output"
    assert not leftovers(tmp_path)


def test_unexpected_errors_are_one_line_too(tmp_path, pair, monkeypatch, capsys):
    base, lora = pair

    def broken(*args, **kwargs):
        raise RuntimeError("something diffmem did not foresee")

    monkeypatch.setattr("diffmem.pipeline.filter_lora", broken)
    monkeypatch.delenv("DIFFMEM_TRACEBACK", raising=False)
    assert main(["filter", str(lora), "--base", str(base), "-o", str(tmp_path / "o.safetensors")]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "RuntimeError" in line and "did not foresee" in line


# ------------------------------------------------------------------------------------------------------------ hangs


@pytest.mark.parametrize("role", ["lora", "base"])
def test_fifo_input_is_refused_without_hanging(tmp_path, pair, role):
    base, lora = pair
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    lora, base = (fifo, base) if role == "lora" else (lora, fifo)
    code, stderr = run_cli("filter", lora, "--base", base, "-o", tmp_path / "o.safetensors", "--no-cache",
                           timeout=60)
    assert code == 1
    line = one_line_error(stderr)
    assert "pipe.safetensors" in line and "not a regular file" in line


def test_fifo_in_a_batch_folder_is_a_failed_row(tmp_path, pair):
    base, _ = pair
    folder = tmp_path / "loras"
    bl.write_kohya_lora(folder / "good.safetensors", LOOKUPS, rank=4)
    os.mkfifo(folder / "pipe.safetensors")
    code, _ = run_cli("filter-many", folder, "--base", base, "--out", tmp_path / "out", "--workers", "1",
                      "--no-cache", timeout=120)
    assert code == 1
    rows = {Path(r["input"]).name: r for r in json.loads((tmp_path / "out" / "summary.json").read_text())["files"]}
    assert rows["good.safetensors"]["status"] == "filtered"
    assert rows["pipe.safetensors"]["status"] == "failed"
    assert "not a regular file" in rows["pipe.safetensors"]["error"]


# ------------------------------------------------------------------------------------------------------------ batch


def test_a_batch_never_dies_of_one_file(tmp_path, pair):
    base, _ = pair
    folder = tmp_path / "loras"
    bl.write_kohya_lora(folder / "good.safetensors", LOOKUPS, rank=4)
    tensors, metadata = load_file(folder / "good.safetensors")
    rank0 = dict(tensors)
    name = next(iter(LOOKUPS))
    rank0[f"{name}.lora_up.weight"] = torch.zeros(LOOKUPS[name][0], 0)
    rank0[f"{name}.lora_down.weight"] = torch.zeros(0, LOOKUPS[name][1])
    bl.save(rank0, folder / "rank0.safetensors", metadata)
    ints = {k: v.to(torch.int32) if k.endswith(".weight") else v for k, v in tensors.items()}
    bl.save(ints, folder / "int32.safetensors", metadata)
    huge = {k: torch.tensor(1e300, dtype=torch.float64) if k.endswith("alpha") else v for k, v in tensors.items()}
    bl.save(huge, folder / "alpha1e300.safetensors", metadata)
    code, stderr = run_cli("filter-many", folder, "--base", base, "--out", tmp_path / "out", "--workers", "2",
                           "--no-cache")
    assert code == 1, stderr
    assert "Traceback" not in stderr
    rows = {Path(r["input"]).name: r for r in json.loads((tmp_path / "out" / "summary.json").read_text())["files"]}
    assert rows["good.safetensors"]["status"] == "filtered"
    for bad in ("rank0", "int32", "alpha1e300"):
        assert rows[f"{bad}.safetensors"]["status"] == "failed", rows[f"{bad}.safetensors"]
        assert not (tmp_path / "out" / f"{bad}.filtered.safetensors").exists()


def test_any_exception_of_one_file_becomes_a_failed_row(tmp_path, pair, monkeypatch):
    base, lora = pair

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("diffmem.batch.filter_file", disk_full)
    row = filter_one(lora, base, tmp_path / "o.safetensors", BAFConfig(), {})
    assert row.status == "failed"
    assert "No space left on device" in row.error


CRASH_HOOK = """
import os, sys
import diffmem.batch

real = diffmem.batch.filter_one

def filter_one(source, base, output, config, options):
    if "crash" in str(source):
        os._exit(3)  # a worker killed by a native crash (a segfault in a library, the OOM killer)
    return real(source, base, output, config, options)

if __name__ == "__main__":
    diffmem.batch.filter_one = filter_one
    from diffmem.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def test_a_worker_that_dies_fails_only_its_own_file(tmp_path, pair):
    base, _ = pair
    folder = tmp_path / "loras"
    for name in ("a", "crash", "z"):
        bl.write_kohya_lora(folder / f"{name}.safetensors", LOOKUPS, rank=4)
    (tmp_path / "hook.py").write_text(textwrap.dedent(CRASH_HOOK))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(tmp_path / "hook.py"), "filter-many", str(folder), "--base",
                           str(base), "--out", str(tmp_path / "out"), "--workers", "2", "--no-cache"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    rows = {Path(r["input"]).name: r for r in json.loads((tmp_path / "out" / "summary.json").read_text())["files"]}
    assert rows["a.safetensors"]["status"] == "filtered"
    assert rows["z.safetensors"]["status"] == "filtered"
    assert rows["crash.safetensors"]["status"] == "failed"
    assert "worker process died" in rows["crash.safetensors"]["error"]


# ------------------------------------------------------------------------------ at least as strict as safetensors


def test_overlapping_offsets_are_refused(tmp_path, pair):
    base, lora = pair

    def edit(header):
        entries = [v for k, v in sorted(header.items()) if k != "__metadata__"]
        entries[1]["data_offsets"] = list(entries[0]["data_offsets"])
        entries[1]["shape"], entries[1]["dtype"] = entries[0]["shape"], entries[0]["dtype"]

    rewrite(lora, edit)
    assert "overlap" in refused(tmp_path, lora, base, FileFormatError)


def test_bytes_outside_every_tensor_are_refused(tmp_path, pair):
    base, lora = pair
    lora.write_bytes(lora.read_bytes() + b"\0" * 16)
    assert "not covered" in refused(tmp_path, lora, base, FileFormatError)


def test_header_over_the_librarys_limit_is_refused(tmp_path):
    path = tmp_path / "big.safetensors"
    text = b"{}" + b" " * (100_000_008 - 2)
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(FileFormatError, match="100000000"):
        read_header(path)
    ok = tmp_path / "ok.safetensors"
    text = b"{}" + b" " * (99_999_992 - 2)
    ok.write_bytes(struct.pack("<Q", len(text)) + text)
    assert read_header(ok) == ({}, {})


@pytest.mark.parametrize("metadata", [[], None, False, 0, "x"])
def test_metadata_that_is_not_an_object_is_refused(tmp_path, pair, metadata):
    base, lora = pair
    rewrite(lora, lambda header: header.update(__metadata__=metadata))
    assert "metadata" in refused(tmp_path, lora, base, FileFormatError)


def test_huge_alpha_never_writes_inf(tmp_path, pair):
    base, lora = pair
    tensors, metadata = load_file(lora)
    tensors = {k: torch.tensor(1e300, dtype=torch.float64) if k.endswith("alpha") else v for k, v in tensors.items()}
    bl.save(tensors, lora, metadata)
    assert "finite" in refused(tmp_path, lora, base, BadWeightsError)


def test_bad_input_page_example_prints_what_it_says(tmp_path, monkeypatch, capsys):
    import re

    page = (Path(__file__).resolve().parent.parent / "docs" / "bad-input.md").read_text()
    block = re.findall(r"```python\n(.*?)```", page, flags=re.S)[0]
    printed = re.search(r"prints\n\n```\n(.*?)\n```", page, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/bad-input.md", "exec"), {})
    assert capsys.readouterr().out.strip() == printed
    assert not (tmp_path / "out.safetensors").exists()
