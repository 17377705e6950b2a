"""Speed and memory of `diffmem filter` on real-size LoRAs, against the dense approach (kohya resize_lora-style).

    python benchmarks/filter_speed.py --family sd15 --ranks 4 32 128          # minutes, ~2 GB of disk
    python benchmarks/filter_speed.py --family sdxl --ranks 32 --conv          # SDXL: ~5 GB of disk, longer
    python benchmarks/filter_speed.py --render results.jsonl                   # regenerate docs/performance.md

Each measurement runs in a fresh subprocess so its peak resident memory (VmHWM) is its own:
- cold: filter with an empty anchor cache (anchors computed, then cached);
- warm: the same filter again (anchors read from the cache), then the write of its output, timed apart;
- io: the I/O a warm filter cannot avoid: a read of every tensor of the LoRA and of exactly the cached anchor
  tensors the warm filter reads (`anchor_reads`; one positioned read of each tensor's bytes, `read_exact`) and a
  `safetensors` save of an output of the filtered LoRA's size (the warm filter keeps the rank, so the LoRA's own
  tensors); `warm_over_io` is the warm filter with its write over this;
- dense: for every module form dW = s * up @ down and take its full SVD, as kohya's resize_lora.py does (no anchors:
  the dense approach cannot even score channels against the base; this is the cost of its decomposition alone).
Fixtures (random values, real key names and shapes) are built once into --cache (default benchmarks/.cache).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from real_shapes import FAMILIES, model_shapes, trained_modules, write_base  # noqa: E402

FLUX_KOHYA = re.compile(
    r"lora_unet_(double_blocks_\d+_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2)|single_blocks_\d+_linear[12])$"
)
SGM = re.compile(r"lora_unet_(input_blocks|middle_block|output_blocks)_")


def kohya_modules(family: str, base_folder: Path, conv: bool) -> dict[str, tuple[int, ...]]:
    """kohya module names a trainer would write for this family, with the weight shapes they update."""
    from diffmem.formats.base import open_base

    base = open_base(base_folder)
    if family == "flux":
        return {name: target.shape for name, target in base.targets.items() if FLUX_KOHYA.match(name)}
    wanted = {f"unet.{module}" for module in trained_modules(model_shapes(family), conv)}
    chosen = {}
    for name, target in base.targets.items():
        if not name.startswith("lora_unet_") or target.module not in wanted:
            continue
        sgm_style = bool(SGM.match(name))
        if sgm_style == (family == "sdxl"):  # SDXL kohya files use SGM names, SD1/SD2 files diffusers names
            chosen[name] = target.shape
    return chosen


def write_lora_fixture(path: Path, modules: dict[str, tuple[int, ...]], rank: int, seed: int = 0) -> Path:
    """A kohya LoRA with random fp16 factors of the given rank for every module, alpha = rank / 2 (kept if already
    written: the same arguments always give the same file)."""
    from diffmem.formats.lora import lora_from_factors, write_lora

    if path.exists():
        return path

    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, shape in sorted(modules.items()):
        fan_in = int(torch.tensor(shape[1:]).prod())
        down_shape = (rank, *shape[1:]) if len(shape) == 4 else (rank, shape[1])
        up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
        factors[name] = ((torch.randn(up_shape, generator=generator) * 1e-2).half(),
                         (torch.randn(down_shape, generator=generator) / fan_in**0.5).half())
    lora = lora_from_factors(factors, "kohya", alpha=rank / 2, metadata={"ss_network_module": "networks.lora"})
    return write_lora(lora, path)


def anchor_reads(lora: Path, base: Path, cache: Path, config=None) -> list[tuple[Path, str]]:
    """(shard, tensor name) of every cached anchor tensor a warm `filter_lora(lora, base, config, cache_dir=cache)`
    reads, in the filter's module order: one entry per module, the parts `AnchorStore.get` reads for the config's
    side, from the shard of its anchor rule. Raises KeyError when an anchor is not cached (the cache is not warm)."""
    from diffmem.anchors import AnchorStore, target_id
    from diffmem.filters import BAFConfig
    from diffmem.formats.base import open_base, resolve_targets
    from diffmem.formats.lora import read_lora

    config = config or BAFConfig()
    lora_file, base_file = read_lora(lora), open_base(base)
    lookups = {name: (module.lookup, tuple(module.weight_shape)) for name, module in lora_file.modules.items()}
    targets = resolve_targets(lookups, base_file, lora_file.path, metadata=lora_file.metadata)
    store = AnchorStore(base_file, cache_dir=cache)
    index = store.index(store.rule_name(config.energy, config.anchor_rank))
    reads = []
    for name in lora_file.modules:
        key = target_id(targets[name])
        reads.extend((index[key].path, f"{key}.{part}") for part in AnchorStore.SIDE_PARTS[config.side])
    return reads


#: safetensors dtype names -> torch dtypes, for `read_exact`.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_exact(path: Path, names: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors ``names`` (default all) of a safetensors file and its metadata, each tensor's bytes read by
    positioned reads (`os.preadv`) straight into a tensor of its dtype: the cheapest real read of exactly those
    bytes (no conversion, no check). `safetensors.torch.load_file` is no floor: its default backend maps the file
    and reads nothing until a tensor is used (913 MB of SDXL anchors "loaded" in 0.02 s), and its ``pread``
    backend read those 913 MB in 0.9 s of CPU in a fresh process where this took 0.5 to 0.7 s."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        metadata = header.pop("__metadata__", None) or {}
        tensors = {}
        for name in names if names is not None else header:
            entry = header[name]
            first, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
            buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            done = 0
            while done < end - first:  # one read unless the kernel returns fewer bytes (over 2 GiB)
                count = os.preadv(handle.fileno(), [buffer[done:]], 8 + size + first + done)
                if count <= 0:
                    raise OSError(f"{path}: {name} ends past the end of the file")
                done += count
            tensors[name] = tensor
    return tensors, metadata


def plain_io(lora: Path, reads: list[tuple[Path, str]], output: Path) -> dict[str, int]:
    """Read every tensor of ``lora`` and the tensors ``reads`` names (`read_exact`, each shard opened once), then
    save the LoRA's tensors and metadata to ``output`` with `safetensors.torch.save_file`: the bytes read and
    written."""
    from safetensors.torch import save_file

    tensors, metadata = read_exact(lora)
    read = sum(t.numel() * t.element_size() for t in tensors.values())
    for shard, names in shard_names(reads).items():
        read += sum(t.numel() * t.element_size() for t in read_exact(shard, names)[0].values())
    save_file(tensors, output, metadata)
    return {"read_bytes": read, "written_bytes": output.stat().st_size}


def shard_names(reads: list[tuple[Path, str]]) -> dict[Path, list[str]]:
    """``reads`` grouped by shard, in their order."""
    by_shard: dict[Path, list[str]] = {}
    for shard, name in reads:
        by_shard.setdefault(shard, []).append(name)
    return by_shard


def peak_mb() -> float:
    """This process's peak resident memory in MB: VmHWM on Linux, whose count starts afresh at exec; ru_maxrss
    there carries the parent's resident size at the fork over to the child, so it reads at least that."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def same_output_size(plain: int, filtered: int) -> bool:
    """Whether the plain save wrote an output the size of the filtered LoRA's: the same tensors, so the sizes differ
    by the header only (diffmem's provenance keys, a few KB per hundred modules), within 1% or 64 KiB."""
    return abs(plain - filtered) <= max(0.01 * filtered, 2**16)


def measure(argv: list[str]) -> dict:
    """Run one measurement in a fresh interpreter; return its JSON result with its peak RSS."""
    result = subprocess.run([sys.executable, __file__, "--_child", *argv], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def child(kind: str, lora: Path, base: Path, cache: Path, threads: int, device: str) -> None:
    # The profile runs on one thread: cProfile sees only the thread it runs on, not the filter's worker threads.
    torch.set_num_threads(1 if kind == "profile" else threads)
    if kind == "profile":
        import cProfile
        import io
        import pstats

        from diffmem.pipeline import filter_lora

        profiler = cProfile.Profile()
        profiler.enable()
        filter_lora(lora, base, cache_dir=cache, device=device)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
        print(json.dumps({"kind": kind, "profile": text.getvalue()}))
        return
    from diffmem.anchors import AnchorStore, build_anchors
    from diffmem.filters import BAFConfig
    from diffmem.formats.lora import read_lora, write_lora
    from diffmem.pipeline import filter_lora, provenance

    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # the CUDA context starts once per process, not once per filter
    extra = {}
    if kind == "io":
        reads = anchor_reads(lora, base, cache)  # before the clock: which tensors, not reading them
        output = cache / "io-output.safetensors"
        import safetensors.torch  # noqa: F401  (imported before the clock, like diffmem for the others)
    before = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = before.ru_utime + before.ru_stime  # excludes interpreter start-up and the imports above
    started = time.perf_counter()
    if kind == "anchors":
        build = build_anchors(base, only=str(lora), cache_dir=cache, device=device)  # lora = the module prefix
        assert build.loaded == 0, "the whole-model anchor build found a warm cache"
    elif kind == "dense":
        for module in read_lora(lora).modules.values():
            up, down = (factor.to(device) for factor in module.factors())
            torch.linalg.svd(module.scale * up @ down, full_matrices=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    elif kind == "io":
        extra = plain_io(lora, reads, output)
        extra["anchor_entries"] = len(reads) // len(AnchorStore.SIDE_PARTS[BAFConfig().side])
        output.unlink()
    else:
        result = filter_lora(lora, base, cache_dir=cache, device=device)
        assert result.report.anchors_computed == 0 or kind == "cold", "warm run recomputed anchors"
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # CPU time counts only this process's own work, so on a machine shared with other jobs it is the figure that
    # stays comparable (with one thread it approximates the wall time the same run takes on an idle machine).
    cpu_seconds = usage.ru_utime + usage.ru_stime - cpu_before
    peak = peak_mb()
    if kind == "warm":
        # The write `diffmem filter` does after the filter, as `filter_file` does it, timed apart so that the warm
        # time and peak stay comparable with rows measured without it.
        output = cache / "warm-output.safetensors"
        write_started = time.perf_counter()
        write_lora(result.lora, output, provenance=provenance(result.report, lora), protect=(lora, base))
        after = resource.getrusage(resource.RUSAGE_SELF)
        extra = {"write_seconds": time.perf_counter() - write_started,
                 "write_cpu_seconds": after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime,
                 "written_bytes": output.stat().st_size, "anchors_cached": result.report.anchors_cached}
        output.unlink()
    print(json.dumps({"kind": kind, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mb": peak, **extra}))


def machine_name(device: str) -> str:
    """The hardware a row was measured on: the GPU's name for a CUDA device, else the CPU count."""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}, {os.cpu_count()} CPUs"
    return f"{os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["sd15", "sdxl", "flux"], default="sd15")
    parser.add_argument("--ranks", type=int, nargs="+", default=[32])
    parser.add_argument("--conv", action="store_true", help="also train-shaped conv LoRA modules")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where decompositions run, e.g. cuda (filter --device)")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--warm-only", action="store_true",
                        help="measure only the warm filter, against the anchor cache an earlier run of this family left")
    parser.add_argument("--whole-anchors", action="store_true",
                        help="also time `diffmem anchors` for every weight of the UNet/transformer, empty cache")
    parser.add_argument("--whole-anchors-only", action="store_true",
                        help="time only `diffmem anchors` for the whole UNet/transformer (no filter runs)")
    parser.add_argument("--json", type=Path, help="append results as JSON lines to this file")
    parser.add_argument("--profile", action="store_true", help="also print where a warm filter spends its time")
    parser.add_argument("--render", type=Path, help="write docs/performance.md from a JSON-lines results file")
    parser.add_argument("--note", help="a note stored with the results (e.g. other load on the machine)")
    parser.add_argument("--repeat", type=int, default=1, help="warm runs to take the median of (default 1)")
    parser.add_argument("--exclusive", action="store_true",
                        help="nothing else ran on the machine: its targets are checked on wall time, not CPU time")
    parser.add_argument("--_child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        kind, lora, base, cache, threads, device = args._child
        child(kind, Path(lora), Path(base), Path(cache), int(threads), device)
        return
    if args.render:
        render(args.render, HERE.parent / "docs" / "performance.md")
        return

    started = time.perf_counter()
    base = write_base(args.family, args.cache / f"{args.family}-base")
    print(f"base ready ({time.perf_counter() - started:.0f} s): {base}", file=sys.stderr)
    modules = kohya_modules(args.family, base, args.conv)
    for rank in args.ranks:
        lora = write_lora_fixture(args.cache / f"{args.family}-r{rank}{'-conv' if args.conv else ''}.safetensors",
                                  modules, rank)
        anchors = args.cache / f"anchors-{args.family}"
        if not (args.warm_only or args.whole_anchors_only):  # the warm runs read this cache
            for stale in anchors.glob("anchors/*"):
                stale.unlink()
        row = {"family": args.family, "rank": rank, "conv": args.conv, "modules": len(modules), "threads": args.threads,
               "device": args.device, "machine": machine_name(args.device), "exclusive": args.exclusive, "note": args.note or ""}
        kinds = ("warm", "io") if args.warm_only else ("cold", "warm", "io") + (() if args.skip_dense else ("dense",))
        kinds = () if args.whole_anchors_only else kinds
        for kind in kinds:
            runs = [measure([kind, str(lora), str(base), str(anchors), str(args.threads), args.device])
                    for _ in range(args.repeat if kind == "warm" else 1)]
            result = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]  # the median run
            row[f"{kind}_s"], row[f"{kind}_peak_mb"] = round(result["seconds"], 3), round(result["peak_mb"])
            row[f"{kind}_cpu_s"] = round(result["cpu_seconds"], 3)
            if len(runs) > 1:
                row[f"{kind}_runs_s"] = [round(r["seconds"], 3) for r in runs]
            if kind == "warm":
                row["warm_write_s"], row["warm_write_cpu_s"] = (round(result["write_seconds"], 3),
                                                                round(result["write_cpu_seconds"], 3))
                warm_result = result
            if kind == "io":
                row["io_read_mb"] = round(result["read_bytes"] / 2**20, 1)
                row["io_written_mb"] = round(result["written_bytes"] / 2**20, 1)
                # The same anchors: one cache entry per module the warm filter read from the cache.
                assert result["anchor_entries"] == warm_result["anchors_cached"], (result, warm_result)
                assert same_output_size(result["written_bytes"], warm_result["written_bytes"]), (result, warm_result)
            print(f"{args.family} r{rank}: {kind} {result['seconds']:.2f} s ({result['cpu_seconds']:.2f} s CPU), "
                  f"peak {result['peak_mb']:.0f} MB" + (f"; runs {row[f'{kind}_runs_s']}" if len(runs) > 1 else ""),
                  file=sys.stderr)
        if "io_s" in row:  # the warm filter with its write, over the I/O it cannot avoid
            row["warm_over_io"] = round((row["warm_s"] + row["warm_write_s"]) / row["io_s"], 2)
            row["warm_over_io_cpu"] = round((row["warm_cpu_s"] + row["warm_write_cpu_s"]) / row["io_cpu_s"], 2)
        if "dense_s" in row:
            row["dense_over_warm"] = round(row["dense_s"] / row["warm_s"], 1)
            row["dense_over_warm_cpu"] = round(row["dense_cpu_s"] / row["warm_cpu_s"], 1)
        if (args.whole_anchors or args.whole_anchors_only) and not args.warm_only:
            whole = args.cache / f"anchors-{args.family}-whole"
            shutil.rmtree(whole, ignore_errors=True)
            result = measure(["anchors", FAMILIES[args.family][0], str(base), str(whole), str(args.threads), args.device])
            row["whole_anchors_s"], row["whole_anchors_peak_mb"] = round(result["seconds"], 3), round(result["peak_mb"])
            row["whole_anchors_cpu_s"] = round(result["cpu_seconds"], 3)
            print(f"{args.family}: whole-model anchors {result['seconds']:.2f} s", file=sys.stderr)
        if args.profile:
            row["profile"] = measure(["profile", str(lora), str(base), str(anchors), str(args.threads), args.device])["profile"]
        print(json.dumps(row))
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(json.dumps(row) + "\n")


#: Targets for an SDXL rank-32 LoRA on the 2-core reference machine: (issue, what, row field, limit, sense), from
#: issue 6 and issue 19 ("Anchors at the speed limit"). Times are compared as wall seconds for rows measured with
#: nothing else running (--exclusive), else as CPU seconds: on a shared machine wall time measures the other jobs.
TARGETS = (
    (6, "warm filter", "warm_cpu_s", 2.0, "at most {limit:g} s"),
    (6, "dense SVD / warm filter", "dense_over_warm_cpu", 20.0, "at least {limit:g}x"),
    (6, "peak memory, warm filter", "warm_peak_mb", 2048, "under {limit:g} MB"),
    (6, "peak memory, cold filter", "cold_peak_mb", 2048, "under {limit:g} MB"),
    (6, "anchors for the whole UNet", "whole_anchors_cpu_s", 600.0, "at most {limit:g} s"),
    (19, "anchors for the whole UNet (issue 19)", "whole_anchors_cpu_s", 120.0, "at most {limit:g} s"),
    (19, "warm filter / unavoidable I/O", "warm_over_io_cpu", 1.5, "at most {limit:g}x"),
)


def target_value(row: dict, field: str) -> float | None:
    """``field`` of a row, read as wall time (the ``_cpu`` dropped) where the row ran alone on the machine or has
    no CPU time."""
    wall = field.replace("_cpu", "")
    if row.get("exclusive") or field not in row:
        return row.get(wall)
    return row[field]


def target_lines(rows: list[dict]) -> list[str]:
    """One table row per target, the best of the SDXL rank-32 CPU measurements, with the measurement it comes from
    (its number in the table of all measurements), or a line saying there are none."""
    sdxl = [(number, r) for number, r in enumerate(rows, 1)
            if r["family"] == "sdxl" and r["rank"] == 32 and r.get("device", "cpu") == "cpu"]
    if not sdxl:
        return ["No SDXL rank-32 row has been measured yet (`--family sdxl --ranks 32 --whole-anchors`)."]
    lines = ["| issue | target | required | measured | met | measurement |", "| --- | --- | --- | --- | --- | --- |"]
    for issue, what, field, limit, sense in TARGETS:
        values = [(value, number) for number, r in sdxl if (value := target_value(r, field)) is not None]
        if not values:
            lines.append(f"| {issue} | {what} | {sense.format(limit=limit)} | not measured | - | - |")
            continue
        at_least = sense.startswith("at least")
        best, number = max(values) if at_least else min(values)
        met = best >= limit if at_least else best <= limit
        lines.append(f"| {issue} | {what} | {sense.format(limit=limit)} | {best:.4g} | {'yes' if met else 'no'} "
                     f"| #{number} |")
    return lines


def gpu_paragraph(rows: list[dict]) -> str:
    """What the CUDA rows show, each against the best CPU row of the same model and rank."""
    lines = []
    for number, r in ((n, r) for n, r in enumerate(rows, 1) if r.get("device", "cpu").startswith("cuda")):
        cpu = [c for c in rows if c["family"] == r["family"] and c["rank"] == r["rank"] and c.get("device") == "cpu"]
        parts = []
        for kind, label in (("whole_anchors", "whole-model anchors"), ("cold", "cold filter"), ("warm", "warm filter"),
                            ("dense", "dense SVD")):
            if f"{kind}_s" not in r:
                continue
            best = min((c[f"{kind}_s"] for c in cpu if f"{kind}_s" in c), default=None)
            versus = f" (CPU: {best:.1f} s)" if best is not None else ""
            parts.append(f"{label} {r[f'{kind}_s']:.1f} s{versus}")
        lines.append(f"- #{number}, {r['family']} rank {r['rank']} on {r.get('machine', r['device'])}: "
                     + ", ".join(parts) + ".")
    if not lines:
        return "## On a GPU\n\nNo GPU run yet (`--device cuda`)."
    return ("## On a GPU\n\n`--device cuda` moves the decompositions (anchors, channels) to the GPU; reading, "
            "scoring and rebuilding stay on the CPU. Wall times (the GPU machine's other figures are in the table):\n\n"
            + "\n".join(lines) + "\n\nThe GPU pays off where the work is large decompositions: computing anchors "
            "(cold filters and whole-model builds), 10 to 20 times faster than this 2-core CPU. A warm "
            "filter is many small per-module operations, which a GPU barely speeds up: the first H200 rows, "
            "measured before the batching and threading above, were slower than the CPU is now, and the later ones "
            "match it. `torch.linalg.svd` on CUDA is slow for these shapes, so the dense baseline gains little "
            "there. Flux was measured on the GPU machine only: its random base alone is 24 GB, and computing its "
            "anchors on this 2-core CPU would take an estimated 35 minutes or more.")


def render(results: Path, page: Path) -> None:
    """docs/performance.md from the JSON lines this script appended with --json."""
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    def timed(r: dict, kind: str) -> str:
        if f"{kind}_s" not in r:
            return "-"
        cpu = r.get(f"{kind}_cpu_s")
        return f"{r[f'{kind}_s']:.2f}" + (f" ({cpu:.2f})" if cpu is not None else "")

    def where(r: dict) -> str:
        return r.get("device", "cpu") + (f" ({r['machine']})" if r.get("machine") else "")

    header = ("| # | model | rank | conv | modules | device | threads | cold filter | warm filter | warm write "
              "| unavoidable I/O | warm / I/O | dense SVD | dense / warm | whole-model anchors "
              "| peak MB (cold / warm / dense) |")
    table = [header, "|" + " --- |" * 16]
    for number, r in enumerate(rows, 1):
        ratio = r.get("dense_over_warm", "-")
        if "dense_over_warm_cpu" in r:
            ratio = f"{ratio} ({r['dense_over_warm_cpu']})"
        io_ratio = f"{r['warm_over_io']} ({r['warm_over_io_cpu']})" if "warm_over_io" in r else "-"
        table.append(f"| {number} | {r['family']}{' (exclusive)' if r.get('exclusive') else ''} | {r['rank']} | {'yes' if r['conv'] else 'no'} | {r['modules']} "
                     f"| {where(r)} | {r['threads']} | {timed(r, 'cold')} | {timed(r, 'warm')} "
                     f"| {timed(r, 'warm_write')} | {timed(r, 'io')} | {io_ratio} "
                     f"| {timed(r, 'dense')} | {ratio} | {timed(r, 'whole_anchors')} "
                     f"| {r.get('cold_peak_mb', '-')} / {r.get('warm_peak_mb', '-')} / {r.get('dense_peak_mb', '-')} |")
    profiles = [f"### {r['family']} rank {r['rank']}, warm\n\n```\n{r['profile'].strip()}\n```\n"
                for r in rows if r.get("profile")]
    notes = [f"#{number}: {r['note']}" for number, r in enumerate(rows, 1) if r.get("note")]
    measured = {r["family"] for r in rows}
    missing = [f for f in FAMILIES if f not in measured]
    devices = sorted({r.get("device", "cpu") for r in rows})
    coverage = (f"Measured: {', '.join(sorted(measured))} on {', '.join(devices)}. "
                + (f"Not measured: {', '.join(missing)}. " if missing else "")
                + ("No GPU run yet (`--device cuda`)." if devices == ["cpu"] else ""))
    text = PAGE.format(gpu=gpu_paragraph(rows), table="\n".join(table), profiles="\n".join(profiles) or "(run with --profile)",
                       notes="\n".join(f"- {n}" for n in notes) or "- none", results=results.name,
                       targets="\n".join(target_lines(rows)), coverage=coverage)
    page.write_text(text)


PAGE = """# Performance of `diffmem filter`

Generated by `python benchmarks/filter_speed.py --render {results}` from the JSON lines that
`python benchmarks/filter_speed.py --family F --ranks R ... --json {results}` wrote (see the script's
docstring). Bases and LoRAs have the exact key names and shapes of the released models, random values.

- **cold**: `filter_lora` with an empty anchor cache (anchors of the LoRA's modules computed, then cached);
- **warm**: the same filter again, anchors read from the cache (`filter_lora`, without writing its output);
- **warm write**: the write of the warm filter's output as `diffmem filter` does it (`write_lora` with the
  provenance keys), timed after the warm filter in the same process;
- **unavoidable I/O**: what no filter can skip, in a fresh process after the warm run: a read of every tensor of
  the LoRA and of exactly the cached anchor tensors the warm filter reads (each module's right basis, float16 at
  the anchor rank, and its spectrum), one positioned read of each tensor's bytes, and a `safetensors` save of an
  output of the filtered LoRA's size (the filter keeps the rank, so the LoRA's own tensors). Not
  `safetensors.torch.load_file`: its default backend maps a file and reads nothing until a tensor is used (the
  dropped io of #22 measured that), and its `pread` backend is slower than these reads. **warm / I/O** is (warm +
  warm write) over it, issue 19's ratio, with the CPU seconds' ratio in brackets. Both read files that the runs
  before left in the page cache;
- **dense**: forming every `dW = s * up @ down` and taking its full SVD, as kohya's `resize_lora.py` does; it
  decomposes the update only, without scoring against the base;
- **whole-model anchors**: `diffmem anchors BASE --only unet` (or `transformer`) into an empty cache: every weight
  a LoRA could target, what a platform builds once per base;
- times are wall-clock seconds, with the measuring process's CPU seconds in brackets where recorded. A row marked
  **exclusive** ran with nothing else on the machine (another engineer's job paused for the run), and its targets
  are checked on wall time; on a machine shared with other jobs the CPU time is the comparable figure (with one
  thread it approximates the wall time on an idle machine), and the targets are checked on it; a warm time with
  several runs (`--repeat`) is their median;
- **peak MB**: the measuring process's peak resident memory: `VmHWM` from #23 on; before, `ru_maxrss`, which
  Linux carries over from the parent across fork and exec, so those peaks read at least the benchmark parent's
  resident size at the time (1180 MB in #22, where warm and whole-model anchors both read exactly that). Rows
  measured before the move to positioned reads (from 2ce493b on, tensors are read with `preadv` instead of a
  memory map) count the pages of the memory-mapped base and anchor cache that the process touched; later rows
  count only what the process holds.

{coverage}

## Targets (SDXL rank 32, this 2-core machine)

The issue column says where each target comes from: issue 6 (the first speed targets) or issue 19 ("Anchors at the
speed limit"). The whole-UNet anchors appear twice: issue 6 asked for at most 600 s, issue 19 for at most 120 s.

{targets}

### Issue 19: what stands between the measurements and its targets

**Warm filter / unavoidable I/O** (#23: 3.50 s filter + 2.36 s write over 0.57 s of I/O, CPU seconds, 10.3x). The
I/O is 1097 MB read (913 MB of it the anchors' right bases) and 184 MB written. A profile of the same warm filter
on one thread (3.45 s under cProfile) puts 0.22 s in reading (`preadv`) and the rest in computing: the alignment
products `V0_k^T v_i` with the float16-to-float32 conversion of the bases (about 1 s), the batched channel
decompositions (0.83 s), finite checks of the channels (0.33 s), rebuilding the factors (0.28 s) and per-module
Python. The write (3.3 s under the profiler) serializes the tensors twice (1.6 s in `serialize`, each call a
`safetensors.torch.save` to bytes and a copy to re-sort the header): once in `addnet_hashes` for kohya's
`sshs_model_hash`, whose data bytes are the file's own, and which also copies the whole file (`BytesIO.getbuffer`,
0.17 s) to hash 64 KiB of it; then it writes (0.7 s), fsyncs (0.1 s) and hashes the source file for the
provenance (0.2 s). A plain `safetensors` save of the same tensors is part of the 0.57 s. 1.5x would leave about
0.3 s for all the compute.

Since d41907c `write_lora` serializes the tensors once (kohya's hashes and the file share the data bytes, and the
legacy hash's 64 KiB window is cut without copying the file): #24 measures the write at 0.94 CPU s (2.36 s in #23)
and the ratio at 6.7x (warm filter 4.2 CPU s, median of 3; I/O 0.77 CPU s). #26, on both cores with nothing else
running, after the channels' finite check became one `aminmax` pass per tensor: warm 2.57 s + write 1.42 s over
0.68 s of I/O, 5.9x.

**Why 1.5x is out of reach for this computation on this CPU.** The scores need the products `V0_k^T v_i` of every
module's cached right basis with its channels: 2 x in x k x r multiply-adds summed over the modules, 31 GFLOP for
this LoRA (479 million anchor values times 2 x 32). One core does float32 products of these shapes at about 60
GFLOP/s (0.32 ms for one 1280 x 233 basis against 32 channels, measured), so the products alone take 0.6 CPU s
(`right_alignment` in the profile below: 0.6-0.7 s), as much as all of the unavoidable I/O. A warm filter has to
read what the I/O row reads and then do those products: even with everything else free (the channel
decompositions, selection, rebuilding the factors, kohya's hashes and the provenance of the write), on both cores
it would take 0.68 + 0.6 / 2 = 0.98 s, 1.45x, and on one core 1.9x. Half-precision products are no way out on this
CPU (float16 12 times slower than float32, bfloat16 4 times: no native kernels); the bases are already stored in
float16 at exactly the rank the energy rule keeps, and a smaller rank would be another score. The remaining gap, 5.9x against that
floor of about 1.5x, is the channel decompositions (0.8 CPU s), rebuilding (0.45 s), the write (1.4 s) and
per-module Python.

**Whole-UNet anchors: met** (#25: 110.7 s on the 2 cores with nothing else running, 210 CPU s; #28, after the
shard changes below: 111.4 s, peak 857 MB; #22, before: 478 CPU s on one thread, 500 s wall). Three changes, all
in `principal_subspace` and `build_anchors`:

- the Gram matrix is decomposed in float32, and only as far as the anchors need (`diffmem.lapack`): LAPACK
  reduces it to a tridiagonal matrix (`ssytrd`), computes every eigenvalue of that (`ssterf`), the energy rule picks
  k from them, and only the k leading eigenvectors are computed (`sstemr`) and transformed back (`sormtr`). On a 1280
  x 1280 Gram matrix, one thread: 0.19 s at k = 233 against 0.55 s for torch's float64 `eigh` of every pair (and
  0.29 s for its float32 one). The Gram matrix itself is BLAS `ssyrk` (its upper triangle: half the products). Scores
  stay within tests/test_spectral.py's tolerance (1e-3 of the chance level; measured at most 1.2e-4, most of it the
  float16 storage). The randomized SVD that a fixed small k used to take is gone: its subspace was off by up to 0.3
  on a flat spectrum, and the leading pairs are now exact and no slower;
- both cores work, each on its own weight (`diffmem.threads.one_thread_each`), largest weights first. scipy's own
  Python wrappers hold the GIL while LAPACK runs, so the routines are called through ctypes from scipy's tables of
  C function pointers, which releases it; BLAS is held to one thread per worker (threadpoolctl), and a shard is
  written outside the store's lock, so the other worker goes on meanwhile. A build on two threads caches the same
  bytes as one on one thread (tested);
- the other side's vectors (`M^T u_i / sigma_i`) are numpy products: OpenBLAS is a third faster than torch's MKL
  on this AMD EPYC for these shapes.

A cold filter, which computes the anchors of the LoRA's own 760 modules, gains the same way (#27: 109 s on both
cores, against 248 s in #18). Two weights in flight instead of one raise its peak memory: a shard of new anchors is
written once it holds 64 MB (128 MB before), and one thread writes at a time, so the cold peak stays at 1928 MB,
under issue 6's 2048 MB (with 128 MB shards written side by side it reached 2131 MB).

By shape class on one thread (the 742 largest weights; `principal_subspace` each): 381 weights of 1280 x 1280 take
89 s (0.23 s each), 60 feed-forward 10240 x 1280 take 61 s (1.0 s each: Gram 0.26 s, eigenpairs 0.28 s, the other
side 0.17 s), 120 cross-attention 1280 x 2048 take 38 s. scipy and threadpoolctl join the core install for this.

**Stored anchors** are already no larger than the energy rule needs: each base weight's bases at exactly its anchor
rank, in float16 (scores within 1.2e-4 of a full float64 SVD's, in units of the chance level:
tests/test_spectral.py states the tolerance, 1e-3), with the spectrum in float32 (3 MB for the whole UNet). Half of
the whole-UNet cache (961 of 1890 MB) is the left bases, which the default right-side score never reads (a warm
filter reads only the right ones); they serve `--side left` and `both`.

What the warm filter does, and what made it fast. A warm filter reads the LoRA, decomposes every module's update
into channels, reads each module's cached right anchors (several times the LoRA's size for SDXL: the dominant cost,
with the alignment products that use them), scores and selects the channels, and rebuilds the factors. Since the
previous measurements:

- factored modules of one shape are decomposed in one batched call (one call per factor shape instead of one per
  module), with the two passes over each tall factor in float32 and the r x r work in float64, the Gram matrix
  scaled to a unit diagonal so columns of very different norms lose no accuracy (tested against a float64 SVD);
- tensors are read with one positioned read of exactly their bytes instead of through a memory map, so pages
  leave the process with the tensor; the finite check is one pass (minimum and maximum for float16 and
  bfloat16);
- cached anchors are not checked element by element: the scores computed from them are, and a non-finite score
  drops the shard and recomputes its anchors (tested with a poisoned shard);
- modules are decomposed, scored and rebuilt side by side on torch's threads, one torch thread each, because each
  module's work is too small for torch's own threads to pay off (same output as one thread, tested);
- factors are rebuilt directly in the file's dtype, and the report rounds with one list conversion per module.

The profile below shows what is left: the alignment products, reading and converting the anchors, and the
batched decompositions. The bases here have random weights; `python benchmarks/anchor_rank_share.py` shows that
the energy-0.5 anchor rank of a random matrix (0.18 of its dimension) is close to that of the embedded world's
trained base (median 0.20), so the anchor sizes are not an artefact of the random values.

{gpu}

## All measurements

{table}

Notes on these runs:
{notes}

## Where the time goes

{profiles}
"""


if __name__ == "__main__":
    main()
