"""What reload_moe.py and batched_copy.py share: dtype names, the source-follows-
destination config properties, the clock, the interleaved rounds, the machine
description and the test-data fill.

The scripts run as `python benchmarks/X.py`, so this directory is on sys.path and
they import it as plain `common`.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import time
from collections.abc import Callable

import torch

import fastreload

Method = Callable[[], object]
TimeCall = Callable[..., float]  # (method, calls=1) -> seconds per call

DTYPES = {
    "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64,
    "fp8": torch.float8_e4m3fn, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
}


class SourceFollowsDestination:
    """For a frozen config dataclass with `dtype`, `source_dtype`, `device` and
    `source_device` fields. A plain class, not a dataclass, so it adds no fields and
    the configs' JSON keeps exactly their own."""

    dtype: str
    source_dtype: str | None
    device: str
    source_device: str | None

    @property
    def src_dtype(self) -> torch.dtype:
        return DTYPES[self.source_dtype or self.dtype]

    @property
    def src_device(self) -> str:
        return self.source_device or self.device

    @property
    def on_cuda(self) -> bool:
        # Either end on a GPU means copies are queued there and the clock must wait for them.
        return "cuda" in (torch.device(self.device).type, torch.device(self.src_device).type)


def timer(cfg: SourceFollowsDestination, *, cuda_events: bool = True) -> TimeCall:
    """Seconds one call takes, averaged over `calls` back-to-back calls; work queued on
    a GPU counts. On the CPU it is time.perf_counter. On a GPU the device is synchronized
    first, then the time is read from CUDA events around the calls, or, with
    cuda_events=False, from perf_counter after a second synchronize (host time, as
    reload_moe has always measured, so its results stay comparable)."""
    if cfg.on_cuda and cuda_events:
        def time_call(fn: Method, calls: int = 1) -> float:
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
    elif cfg.on_cuda:
        def time_call(fn: Method, calls: int = 1) -> float:
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            return (time.perf_counter() - start) / calls
    else:
        def time_call(fn: Method, calls: int = 1) -> float:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            return (time.perf_counter() - start) / calls
    return time_call


def run_interleaved(methods: dict[str, Method], time_call: TimeCall, *, warmup: int, repeats: int,
                    min_sample_ms: float | None = None) -> tuple[dict[str, list[float]], dict[str, int]]:
    """(samples, calls per sample) for every method. Every method runs once per round,
    so drift (clock, heat, neighbours) hits all alike; the starting method rotates so
    none always follows the same one. With min_sample_ms, a method whose call takes
    less is called several times per sample (fixed after the warm-up), so tiny copies
    are not timer noise; without it every sample is one call."""
    names = list(methods)
    samples: dict[str, list[float]] = {n: [] for n in names}
    calls = dict.fromkeys(names, 1)
    last: dict[str, float] = {}
    for round_ in range(warmup + repeats):
        if round_ == warmup and min_sample_ms is not None:
            for n in names:
                once = last[n] if n in last else time_call(methods[n], 1)
                calls[n] = max(1, min(1000, math.ceil(min_sample_ms / 1e3 / max(once, 1e-9))))
        for k in range(len(names)):
            name = names[(round_ + k) % len(names)]
            gc.collect()  # the previous method's garbage is not collected inside this sample
            seconds = time_call(methods[name], calls[name])
            last[name] = seconds
            if round_ >= warmup:
                samples[name].append(seconds)
    return samples, calls


def machine_info(cfg: SourceFollowsDestination) -> dict[str, object]:
    cpu = platform.processor() or "unknown"  # often empty on Linux, hence /proc/cpuinfo
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "fastreload": fastreload.__version__,
            "python": platform.python_version()}
    if cfg.on_cuda:
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_line(machine: dict[str, object], *, repeats: int, warmup: int) -> str:
    """The second line of both reports, up to where they differ."""
    return (f"machine: {machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}, "
            f"{machine['threads']} threads{', ' + machine['gpu'] if 'gpu' in machine else ''}; "
            f"median of {repeats} interleaved rounds after {warmup} warm-up")


def print_columns(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A table a person can read: the first column left-aligned, the others right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def fill_distinct(tensors: list[torch.Tensor], seed: int, *, spread: int, seed_stride: int = 0,
                  specials: bool = False) -> None:
    """Gives every tensor its own pseudo-random values, cheaply: a window of one random
    pool at an offset that differs per tensor (and, with seed_stride, per seed), so a
    swapped, shifted or skipped copy shows in the final check. All the tensors must
    share one dtype and device. With specials, the pool holds a sprinkling of NaN,
    infinities and negative zero, so the conversions' special cases are exercised and
    checked too."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(max(t.numel() for t in tensors) + spread, generator=g)
    if specials:
        for k, value in enumerate((float("nan"), float("inf"), float("-inf"), -0.0)):
            pool[k * 257::1031] = value
    pool = pool.to(device=tensors[0].device, dtype=tensors[0].dtype)
    with torch.no_grad():
        for i, t in enumerate(tensors):
            offset = (i * 7919 + seed * seed_stride) % spread
            t.copy_(pool[offset:offset + t.numel()].view(t.shape))
