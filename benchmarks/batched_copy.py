"""Time fastreload.ops.batched_copy_ over a sweep of tensor counts and sizes, against one
contiguous copy of the same bytes, torch._foreach_copy_ and a per-tensor copy_ loop.

    python benchmarks/batched_copy.py                          # the default sweep on CPU
    python benchmarks/batched_copy.py --source-dtype fp32      # with fp32 -> bf16 conversion
    python benchmarks/batched_copy.py --counts 20000 --sizes 48K --json out.json
    python benchmarks/batched_copy.py --device cuda            # on the GPU
    python benchmarks/batched_copy.py --device cuda --source-device cpu --pin   # host to device

Every (count, size) point allocates `count` destinations and `count` sources of `size`
bytes each (the destination's bytes), each tensor its own allocation, as a model's
parameters are. The methods run interleaved round-robin after a warm-up; the table
reports medians. Points whose bytes exceed --max-total-bytes are skipped, except the
reference point 20,000 x 48 KiB, which is always kept when the sweep names it.
A point holds its pairs plus the limit's copy of them: 2 x (destination + source
bytes), 4 GiB at the 1 GiB default cap with bf16 sources.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fastreload import ops

from common import (DTYPES, SourceFollowsDestination, fill_distinct, machine_info, machine_line,
                    run_interleaved, timer)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BATCHED = "batched_copy_"
LIMIT = "limit"
FOREACH = "foreach_copy_"
LOOP = "copy_ loop"
METHODS = (BATCHED, FOREACH, LOOP, LIMIT)  # the row order of every point
REFERENCE = (20_000, 48 * KiB)  # about the shape of a large MoE checkpoint: many small experts
LOOP_MAX_COUNT = 20_000  # the copy_ loop is skipped above this many tensors unless --all
UNITS = {"": 1, "b": 1, "k": KiB, "kb": KiB, "kib": KiB, "m": MiB, "mb": MiB, "mib": MiB,
         "g": GiB, "gb": GiB, "gib": GiB}


@dataclass(frozen=True)
class Config(SourceFollowsDestination):
    counts: tuple[int, ...] = (1, 10, 100, 1_000, 20_000, 100_000)
    sizes: tuple[int, ...] = (256, 4 * KiB, 48 * KiB, 1 * MiB, 64 * MiB)  # bytes per destination
    dtype: str = "bf16"
    source_dtype: str | None = None  # None: the destination's dtype
    device: str = "cpu"
    source_device: str | None = None  # None: --device
    pin: bool = False  # pin host sources (needs CUDA)
    max_total_bytes: int | None = None  # None: 1 GiB on CPU, 4 GiB on a GPU
    all_loop: bool = False  # also run the copy_ loop above LOOP_MAX_COUNT tensors
    repeats: int = 7
    warmup: int = 2
    min_sample_ms: float = 2.0  # calls faster than this are repeated inside one sample
    threads: int | None = None  # None: torch's default

    @property
    def dst_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def host_to_device(self) -> bool:
        return torch.device(self.device).type == "cuda" and torch.device(self.src_device).type == "cpu"

    @property
    def cap(self) -> int:
        if self.max_total_bytes is not None:
            return self.max_total_bytes
        return 4 * GiB if torch.device(self.device).type == "cuda" else 1 * GiB


@dataclass(frozen=True)
class Point:
    count: int
    size: int  # bytes of each destination

    def total_bytes(self) -> int:
        return self.count * self.size


def sweep(cfg: Config) -> tuple[list[Point], list[Point]]:
    """(points to run, points skipped for exceeding the cap), in sweep order."""
    run, skipped = [], []
    for count, size in itertools.product(cfg.counts, cfg.sizes):
        point = Point(count, size)
        keep = point.total_bytes() <= cfg.cap or (count, size) == REFERENCE
        (run if keep else skipped).append(point)
    return run, skipped


# ---------------------------------------------------------------------------
# The tensors: one allocation each, like a model's parameters.

def _fill(tensors: list[torch.Tensor], seed: int) -> None:
    # NaN, infinities and negative zero in the sources, so the conversions' special
    # cases are exercised and checked too.
    fill_distinct(tensors, seed, spread=1 << 16, specials=True)


def make_pairs(point: Point, cfg: Config) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    numel = point.size // cfg.dst_dtype.itemsize
    dsts = [torch.empty(numel, dtype=cfg.dst_dtype, device=cfg.device) for _ in range(point.count)]
    srcs = [torch.empty(numel, dtype=cfg.src_dtype, device=cfg.src_device, pin_memory=cfg.pin)
            for _ in range(point.count)]
    for d in dsts:
        d.fill_(0.5)  # first-touch the pages outside the timing
    _fill(srcs, seed=point.count * 31 + point.size)
    return dsts, srcs


def make_methods(dsts: list[torch.Tensor], srcs: list[torch.Tensor], point: Point,
                 cfg: Config) -> dict[str, Callable[[], object]]:
    """Each a callable that writes every source into its destination once. The lists
    and pairs are made here, outside the timing."""
    elements = point.count * dsts[0].numel()
    flat_dst = torch.empty(elements, dtype=cfg.dst_dtype, device=cfg.device)
    flat_src = torch.empty(elements, dtype=cfg.src_dtype, device=cfg.src_device, pin_memory=cfg.pin)
    flat_dst.fill_(0.5)
    flat_src.fill_(0.25)
    pairs = list(zip(dsts, srcs))

    def copy_loop():
        for d, s in pairs:
            d.copy_(s)

    methods = {
        BATCHED: lambda: ops.batched_copy_(dsts, srcs),
        FOREACH: lambda: torch._foreach_copy_(dsts, srcs),
        LOOP: copy_loop,
        LIMIT: lambda: flat_dst.copy_(flat_src),
    }
    if point.count > LOOP_MAX_COUNT and not cfg.all_loop:
        del methods[LOOP]
    return methods


# ---------------------------------------------------------------------------
# Correctness: the numbers mean nothing if the copies are wrong.

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def verify(dsts: list[torch.Tensor], srcs: list[torch.Tensor], point: Point) -> None:
    """After one batched_copy_ into destinations first filled with NaN, every destination
    must equal torch.empty_like(dst).copy_(src) bit for bit; where dtypes differ, NaN
    payloads may differ, but NaN positions and all other bits may not."""
    for d in dsts:
        d.fill_(float("nan"))
    ops.batched_copy_(dsts, srcs)
    bits = _BITS[dsts[0].element_size()]
    converting = dsts[0].dtype != srcs[0].dtype
    problems = []
    for i, (d, s) in enumerate(zip(dsts, srcs)):
        ref = torch.empty_like(d).copy_(s)
        wrong = d.view(bits) != ref.view(bits)
        if converting:
            wrong &= ~(torch.isnan(d.float()) & torch.isnan(ref.float()))  # NaN payloads may differ
        if not wrong.any():
            continue
        differ = wrong.nonzero().flatten()
        problems.append(f"tensor {i}: {differ.numel()} of {d.numel()} elements differ, first at {differ[0].item()}")
        if len(problems) >= 20:
            break
    if problems:
        shown = "\n  ".join(problems)
        raise SystemExit(f"CORRECTNESS FAILURE at {point.count:,} x {fmt_size(point.size)}:\n  {shown}")


# ---------------------------------------------------------------------------
# Reporting.

def fmt_size(nbytes: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms >= 1 else f"{ms:.4f}"


def summarize(samples: dict[str, list[float]], calls: dict[str, int], point: Point,
              src_bytes: int) -> dict[str, dict[str, object]]:
    medians = {n: statistics.median(s) for n, s in samples.items()}
    nbytes = point.total_bytes()
    results = {}
    for name in METHODS:
        if name not in samples:
            continue
        seconds = medians[name]
        results[name] = {
            "samples_s": samples[name],
            "calls_per_sample": calls[name],
            "median_s": seconds,
            "gbps": nbytes / seconds / 1e9,
            "source_gbps": src_bytes / seconds / 1e9,
            "pct_of_limit": 100 * medians[LIMIT] / seconds,
            "speedup_vs_copy_loop": medians[LOOP] / seconds if LOOP in medians else None,
        }
    return results


HEADER = ("count", "size", "total MiB", "method", "ms (median)", "GB/s", "% of limit", "x copy_ loop")
WIDTHS = (7, 6, 9, 13, 11, 6, 10, 12)


def table_line(row: Sequence[str]) -> str:
    return "  ".join(c.ljust(w) if i == 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, WIDTHS)))


def print_header() -> None:
    print(table_line(HEADER))
    print("  ".join("-" * w for w in WIDTHS))


def print_point(point: Point, results: dict[str, dict[str, object]]) -> None:
    for name, r in results.items():
        speedup = r["speedup_vs_copy_loop"]
        print(table_line((f"{point.count:,}", fmt_size(point.size), f"{point.total_bytes() / MiB:,.1f}", name,
                          fmt_ms(r["median_s"]), f"{r['gbps']:.2f}", f"{r['pct_of_limit']:.1f}",
                          "-" if speedup is None else f"{speedup:.2f}")), flush=True)


# ---------------------------------------------------------------------------
# The command line.

def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 256, 4K, 48K, 1M, 64M, 1G)")
    return int(m.group(1)) * UNITS[m.group(2).lower()]


def parse_list(parse: Callable[[str], int]) -> Callable[[str], tuple[int, ...]]:
    def parse_all(text: str) -> tuple[int, ...]:
        values = tuple(parse(part) for part in text.split(",") if part.strip())
        if not values or any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"need a comma list of positive values, got {text!r}")
        return values
    return parse_all


def parse_count(text: str) -> int:
    try:
        return int(text.strip().replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}") from None


def parse_args(argv: list[str] | None = None) -> tuple[Config, str | None]:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=parse_list(parse_count), default=d.counts,
                   help="comma list of tensor counts (default %(default)s)")
    p.add_argument("--sizes", type=parse_list(parse_bytes), default=d.sizes,
                   help="comma list of bytes per destination tensor: 256, 4K, 48K, 1M, 64M (binary units)")
    p.add_argument("--max-total-bytes", type=parse_bytes, default=None,
                   help="skip points writing more bytes than this (default 1G on CPU, 4G on a GPU); "
                        "20000 x 48K is always kept")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="the destinations' dtype")
    p.add_argument("--source-dtype", choices=DTYPES, default=None, help="default: --dtype")
    p.add_argument("--device", default=d.device, help="where the destinations live: cpu or cuda[:N]")
    p.add_argument("--source-device", default=None, help="where the sources live; default: --device")
    p.add_argument("--pin", action="store_true", help="pin host sources (with a CUDA --device)")
    p.add_argument("--all", dest="all_loop", action="store_true",
                   help=f"also run the copy_ loop above {LOOP_MAX_COUNT:,} tensors")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed rounds")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed rounds first")
    p.add_argument("--min-sample-ms", type=float, default=d.min_sample_ms,
                   help="faster calls are repeated within a sample up to this long (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's")
    p.add_argument("--json", metavar="PATH", help="also write every sample, the config and the machine here")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.warmup < 0:
        p.error("--repeats must be at least 1 and --warmup at least 0")
    cfg = Config(counts=a.counts, sizes=a.sizes, dtype=a.dtype, source_dtype=a.source_dtype, device=a.device,
                 source_device=a.source_device, pin=a.pin, max_total_bytes=a.max_total_bytes,
                 all_loop=a.all_loop, repeats=a.repeats, warmup=a.warmup, min_sample_ms=a.min_sample_ms,
                 threads=a.threads)
    if any(size % cfg.dst_dtype.itemsize for size in cfg.sizes):
        p.error(f"every size must be a whole number of {cfg.dtype} elements, got {cfg.sizes}")
    if cfg.on_cuda and not torch.cuda.is_available():
        p.error("a CUDA device was asked for, but torch.cuda.is_available() is false")
    if cfg.pin and not (torch.device(cfg.src_device).type == "cpu" and torch.cuda.is_available()):
        p.error("--pin pins host sources: it needs --source-device cpu and CUDA")
    return cfg, a.json


def main(argv: list[str] | None = None) -> None:
    cfg, json_path = parse_args(argv)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if torch.device(cfg.device).type == "cuda" and torch.device(cfg.device).index is not None:
        torch.cuda.set_device(torch.device(cfg.device))  # the CUDA events time this device's stream
    started = time.perf_counter()
    points, skipped = sweep(cfg)
    machine = machine_info(cfg)
    time_call = timer(cfg)

    print(f"batched_copy: destinations {cfg.dtype} on {cfg.device} <- sources "
          f"{cfg.source_dtype or cfg.dtype} on {cfg.src_device}{' (pinned)' if cfg.pin else ''}; "
          f"{len(points)} points, cap {fmt_size(cfg.cap)} written per point")
    print(f"{machine_line(machine, repeats=cfg.repeats, warmup=cfg.warmup)}; "
          f"{'CUDA events' if cfg.on_cuda else 'perf_counter'}")
    if skipped:
        print(f"skipped, over the cap: {', '.join(f'{p.count:,} x {fmt_size(p.size)}' for p in skipped)}")
    if not cfg.all_loop and any(p.count > LOOP_MAX_COUNT for p in points):
        print(f"copy_ loop not run above {LOOP_MAX_COUNT:,} tensors (--all runs it)")
    print()
    print_header()

    measured = []
    for point in points:
        dsts, srcs = make_pairs(point, cfg)
        src_bytes = point.count * srcs[0].numel() * srcs[0].element_size()
        methods = make_methods(dsts, srcs, point, cfg)
        gc.freeze()  # the point's tensors are not rescanned by every collection during the timing
        samples, calls = run_interleaved(methods, time_call, warmup=cfg.warmup, repeats=cfg.repeats,
                                         min_sample_ms=cfg.min_sample_ms)
        gc.unfreeze()
        verify(dsts, srcs, point)
        results = summarize(samples, calls, point, src_bytes)
        print_point(point, results)
        measured.append({"count": point.count, "size": point.size, "bytes": point.total_bytes(),
                         "source_bytes": src_bytes, "results": results})
        del dsts, srcs, methods
        gc.collect()

    print()
    ref = next((m for m in measured if (m["count"], m["size"]) == REFERENCE), None)
    if ref is not None:
        b = ref["results"][BATCHED]
        loop = b["speedup_vs_copy_loop"]
        print(f"{REFERENCE[0]:,} x {fmt_size(REFERENCE[1])}: {BATCHED} {b['gbps']:.2f} GB/s, "
              f"{b['pct_of_limit']:.1f}% of limit, "
              f"{'-' if loop is None else f'{loop:.2f}'}x over copy_ loop")
    if cfg.host_to_device and measured:
        best = max(measured, key=lambda m: m["results"][BATCHED]["source_gbps"])
        at_ref = f"{ref['results'][BATCHED]['source_gbps']:.2f} GB/s at the reference point; " if ref else ""
        print(f"host-to-device ({'pinned' if cfg.pin else 'pageable'} sources, source bytes / {BATCHED} time): "
              f"{at_ref}best {best['results'][BATCHED]['source_gbps']:.2f} GB/s at "
              f"{best['count']:,} x {fmt_size(best['size'])}")
    print("verified: after one batched_copy_ per point, every destination equals "
          "empty_like(dst).copy_(src) bit for bit (NaN positions where converting)")
    print(f"total {time.perf_counter() - started:.1f} s")

    if json_path:
        with open(json_path, "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "cap_bytes": cfg.cap, "machine": machine,
                       "limit": "one contiguous copy of the same elements, source dtype to destination dtype",
                       "skipped": [dataclasses.asdict(p) for p in skipped], "points": measured}, f, indent=2)
        print(f"wrote {json_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
