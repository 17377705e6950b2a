"""Property-based fuzzing of `diffmem filter` with hypothesis (issue 15).

A small kohya LoRA is mutated three ways: typed header fields (a tensor's dtype, shape or offsets, or the metadata,
replaced by any JSON value), raw bytes anywhere in the file (overwritten, truncated, appended) and tensor bytes (so
NaN, Inf and huge values reach the maths). Whatever the mutation, `diffmem filter` must exit 0 with a finite output,
or exit 1 with exactly one line naming the problem; never a traceback, a hang or a leftover file.

`make test` runs a bounded number of cases (DIFFMEM_FUZZ_EXAMPLES, default 60); `make fuzz` runs 2,000 and writes the
outcome counts to docs/fuzz.json (DIFFMEM_FUZZ_REPORT), which docs/bad-input.md quotes. The draws are derandomized,
so both runs are the same cases every time and the committed counts can be re-derived.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import re
import signal
import struct
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import builders_base as bb
import builders_lora as bl
from diffmem.cli import main
from diffmem.formats.safetensors_io import encode_header, load_file, serialize

EXAMPLES = int(os.environ.get("DIFFMEM_FUZZ_EXAMPLES", "60"))
REPORT = os.environ.get("DIFFMEM_FUZZ_REPORT")
HANG_SECONDS = 60  # one example of a tiny LoRA takes well under a second; far past that is a hang
OUTCOMES: collections.Counter = collections.Counter()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD1 base, a kohya LoRA for it (its bytes and parsed header), and a warm anchor cache."""
    root = tmp_path_factory.mktemp("fuzz")
    base = bb.build_tiny_base(root, "sd1", "single_file")
    lora = root / "lora.safetensors"
    lookups = dict(list(bb.lora_lookups("sd1", "kohya").items())[:3])  # three modules: fast, still every role
    bl.write_kohya_lora(lora, lookups, rank=4)
    # The safetensors library writes header keys in hash-map order, so the same tensors can land at other offsets in
    # another process; diffmem's serialize sorts them, so every run mutates the same bytes and the counts re-derive.
    lora.write_bytes(serialize(*load_file(lora)))
    data = lora.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    cache = root / "cache"
    assert main(["filter", str(lora), "--base", str(base), "-o", str(root / "warm.safetensors"), "--quiet",
                 "--cache-dir", str(cache)]) == 0
    yield {"root": root, "base": base, "data": data, "header": header, "header_len": length, "cache": cache}
    if REPORT:
        by_mutation: dict = collections.defaultdict(collections.Counter)
        errors: collections.Counter = collections.Counter()
        for (label, outcome, message), count in OUTCOMES.items():
            by_mutation[label][outcome] += count
            if message:
                errors[message] += count
        Path(REPORT).write_text(json.dumps({
            "command": "make fuzz", "examples": sum(OUTCOMES.values()),
            "by_mutation": {label: dict(sorted(c.items())) for label, c in sorted(by_mutation.items())},
            "errors": dict(errors.most_common()),
        }, indent=2, ensure_ascii=False) + "\n")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
FIELDS = st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "entry", "drop"])


@st.composite
def header_mutation(draw, world_header: dict) -> tuple[str, dict]:
    """A header with one typed field replaced by any JSON value (or an entry dropped or replaced whole)."""
    header = json.loads(json.dumps(world_header))
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    field = draw(FIELDS)
    if field == "__metadata__":
        header["__metadata__"] = draw(JSON)
    elif field == "entry":
        header[name] = draw(JSON)
    elif field == "drop":
        del header[name]
    else:
        header[name][field] = draw(JSON | st.lists(st.integers(min_value=-2, max_value=2**65), max_size=3))
    return f"header.{field}", header


def mutate(data: bytes, header_len: int, draw, kind: str, world_header: dict) -> tuple[str, bytes]:
    """The mutated file bytes and a label of the mutation."""
    if kind == "header":
        label, header = draw(header_mutation(world_header))
        return label, encode_header(header) + data[8 + header_len :]
    if kind == "raw":
        action = draw(st.sampled_from(["overwrite", "truncate", "append"]))
        if action == "truncate":
            return "raw.truncate", data[: draw(st.integers(0, len(data) - 1))]
        if action == "append":
            return "raw.append", data + draw(st.binary(min_size=1, max_size=64))
        at = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=16))
        return "raw.overwrite", data[:at] + patch + data[at + len(patch) :]
    start = 8 + header_len
    at = draw(st.integers(start, len(data) - 1))
    # Float32 patterns that matter most: NaN, +-Inf, huge, denormal, plus random bytes.
    special = st.sampled_from([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff", b"\xff\xff\x7f\x7f",
                               b"\x01\x00\x00\x00"])
    patch = draw(special | st.binary(min_size=1, max_size=32))
    return "tensor_bytes", data[:at] + patch[: len(data) - at] + data[at + len(patch) :]


class Hang(Exception):
    pass


def on_alarm(signum, frame):
    raise Hang(f"an example ran past {HANG_SECONDS} s")


def message_class(line: str) -> str:
    """The error line without its path and the values it quotes, for the outcome counts: names become …, numbers N,
    and the line ends at the first JSON value it quotes ("tensor … has unknown dtype")."""
    text = line.removeprefix("diffmem: error: ")
    text = re.sub(r"^\S+\.safetensors: ", "", text)
    text = re.sub(r"'[^']*'", "…", text)
    text = re.sub(r"-?\d[\d.e+-]*", "N", text)
    text = re.split(r"[\[\]{}\"(]|\b(?:None|True|False)\b", text)[0]
    return text.rstrip(" :,") or "(starts with a value)"


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow], derandomize=True)
@given(data=st.data(), kind=st.sampled_from(["header", "raw", "tensor_bytes"]))
def test_filter_survives_any_mutation(world, data, kind):
    label, mutated = mutate(world["data"], world["header_len"], data.draw, kind, world["header"])
    folder = world["root"] / uuid.uuid4().hex
    folder.mkdir()
    lora, out = folder / "lora.safetensors", folder / "out.safetensors"
    lora.write_bytes(mutated)
    stdout, stderr = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(HANG_SECONDS)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["filter", str(lora), "--base", str(world["base"]), "-o", str(out), "--quiet",
                         "--cache-dir", str(world["cache"])])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
    leftovers = [p.name for p in folder.iterdir() if p.name not in ("lora.safetensors", "out.safetensors")]
    assert not leftovers, leftovers
    assert code in (0, 1), (label, code, stderr.getvalue())
    if code == 0:
        tensors, _ = load_file(out)  # refuses NaN or Inf
        assert all(bool(torch.isfinite(t.float()).all()) for t in tensors.values() if t.is_floating_point())
        OUTCOMES[(label, "exit 0, finite output", "")] += 1
    else:
        assert len(lines) == 1 and lines[0].startswith("diffmem: error: "), (label, stderr.getvalue())
        assert "unexpected" not in lines[0], (label, lines[0])  # a failure no check named is a bug to fix
        assert not out.exists()
        OUTCOMES[(label, "exit 1, one-line error", message_class(lines[0]))] += 1
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


def fuzz_table(report: dict) -> str:
    """The markdown table docs/bad-input.md shows, from a `make fuzz` report."""
    rows = ["| mutation | cases | exit 0, finite output | exit 1, one-line error |", "| --- | ---: | ---: | ---: |"]
    totals = [0, 0]
    for label, outcomes in report["by_mutation"].items():
        ok, refused = outcomes.get("exit 0, finite output", 0), outcomes.get("exit 1, one-line error", 0)
        totals = [totals[0] + ok, totals[1] + refused]
        rows.append(f"| {label} | {ok + refused} | {ok} | {refused} |")
    rows.append(f"| **all** | **{sum(totals)}** | **{totals[0]}** | **{totals[1]}** |")
    return "\n".join(rows)


def test_docs_quote_the_committed_fuzz_counts():
    docs = Path(__file__).resolve().parent.parent / "docs"
    report = json.loads((docs / "fuzz.json").read_text())
    page = (docs / "bad-input.md").read_text()
    table = re.search(r"<!-- fuzz-table: generated from docs/fuzz.json -->\n(.*?)\n<!-- /fuzz-table -->", page, re.S)
    assert table is not None and table.group(1) == fuzz_table(report)
    assert report["examples"] >= 2000
