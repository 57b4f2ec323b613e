"""Reload fresh weights into models laid out like public MoE checkpoints, by fastreload and the usual ways.

    python benchmarks/reload_moe.py                          # qwen3-30b-a3b, the default (`make bench`)
    python benchmarks/reload_moe.py --preset deepseek-v3-fp8 # any preset of presets.py
    python benchmarks/reload_moe.py --source-dtype fp32      # include a dtype conversion
    python benchmarks/reload_moe.py --preset deepseek-v3 --scale 1 --layers 61 --device cuda  # real sizes
    python benchmarks/reload_moe.py --json results.json --plot results.png
    python benchmarks/reload_moe.py --processed              # post-load processing replayed (reload_processed.py)
    python benchmarks/reload_moe.py --transformers           # a transformers model from Hub-format shards (reload_hf.py)

The presets (presets.py) have the tensor names, counts, relative shapes and dtypes of
Qwen3-30B-A3B, DeepSeek-V3 (bf16 and fp8), Mixtral-8x7B and Nemotron-3-Nano (a
Mamba2 / attention / MoE hybrid). --scale shrinks every size and keeps every count;
--layers limits the depth. Each preset's defaults run in under a minute on a 2-core CPU.

Every method writes the same source into the same live model, interleaved round-robin
in one process after a warm-up; the table reports medians. The limit row is one
contiguous copy of the same elements (one per source/model dtype pair), by the
faster of torch's copy_ and fastreload's fused copy: what the memory system allows. The source is also written as safetensors shards to a
temporary directory, read by fastreload and by safetensors' load_file +
load_state_dict, and sent to fastreload as a shuffled stream of (name, tensor)
pairs. After the rounds, one more call of each method runs with resident memory
sampled every millisecond: its peak growth is the "peak extra MiB" column.

The "overhead µs/tensor" column is each method's median time on a second model of the
same preset with every size 1 (scale 0: the same names, tensors, modules and alias
buffers, a few bytes each), timed the same way, divided by the tensor count: what a
method costs per tensor when there is nothing to copy.

--plot PATH sweeps the depth: the preset at 1/8, 1/4 and 1/2 of its layers, each
timed like the full model (same rounds, no memory sampling, no overhead model) and
checked, then the full model's results; it draws GB/s against the tensor count (log
scale) for every method, the limit dashed, to PATH as a PNG. On the default preset
it made the run about 60% longer.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import fastreload
from fastreload.reload import DEFAULT_STREAM_BATCH_BYTES  # not re-exported by the package

try:
    from safetensors.torch import load_file, save_file
except ImportError:  # the file rows are skipped
    load_file = save_file = None

import presets
from common import DTYPES as ALL_DTYPES
from common import (SourceFollowsDestination, fill_distinct, machine_info, machine_line, print_columns,
                    run_interleaved, timer)
from presets import DEFAULT_PRESET, PRESETS

# --dtype and --source-dtype offer the dtypes the presets were built and checked with;
# fp8 weights come with the deepseek-v3-fp8 preset, not with --dtype.
DTYPES = {name: ALL_DTYPES[name] for name in ("bf16", "fp16", "fp32")}
BASELINE = "load_state_dict"
LIMIT = "limit"
MAPPING = "fastreload"
FIRST = "fastreload (first)"
SAFETENSORS = "fastreload (safetensors)"
STREAM = "fastreload (stream)"
LOAD_FILE = "load_file + load_state_dict"
COPY_LOOP = "copy_ loop"
FOREACH = "foreach_copy_"
INDEX_NAME = "model.safetensors.index.json"
SWEEP_DIVISORS = (8, 4, 2)  # --plot: the preset at 1/8, 1/4 and 1/2 of its depth, then all of it
OVERRIDES = ("experts", "hidden", "moe_intermediate", "vocab")


@dataclass(frozen=True)
class Config(SourceFollowsDestination):
    preset: str = DEFAULT_PRESET
    scale: float | None = None  # None: the preset's default
    layers: int | None = None  # None: the preset's default
    # Exact values replacing the preset's (after scaling); None: the preset's.
    experts: int | None = None
    hidden: int | None = None
    moe_intermediate: int | None = None
    vocab: int | None = None
    dtype: str = "bf16"
    source_dtype: str | None = None  # None: each tensor's own dtype
    tie_embeddings: bool = False
    device: str = "cpu"
    source_device: str | None = None  # None: the model's device
    repeats: int = 7
    warmup: int = 2
    batch_bytes: int = fastreload.DEFAULT_BATCH_BYTES
    threads: int | None = None  # None: torch's default
    shards: int = 4  # safetensors files the source is written to
    stream_batch_bytes: int = DEFAULT_STREAM_BATCH_BYTES

    @property
    def model_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def effective_scale(self) -> float:
        return PRESETS[self.preset].scale if self.scale is None else self.scale

    def arch(self):
        """The preset's numbers at this config's scale, depth and overrides."""
        preset = PRESETS[self.preset]
        overrides = {name: getattr(self, name) for name in OVERRIDES if getattr(self, name) is not None}
        layers = preset.layers if self.layers is None else self.layers
        return presets.scaled(preset.arch, self.effective_scale, layers, **overrides)

    def source_dtype_of(self, t: torch.Tensor) -> torch.dtype:
        # --source-dtype is the weights' (fp8 ones included): the fp32 side tensors
        # (block scales, router biases) come as fp32, as a trainer would send them.
        if self.source_dtype is not None and t.dtype in (self.model_dtype, presets.FP8):
            return DTYPES[self.source_dtype]
        return t.dtype


# ---------------------------------------------------------------------------
# A model, its source and the ways of reloading it.

Targets = list[tuple[str, torch.Tensor, torch.Tensor]]


def _fill(tensors: list[torch.Tensor], seed: int) -> None:
    # The per-seed shift makes the model (seed 1) and its source (seed 2) differ in
    # window offsets as well as values, so a copy from the wrong side shows too.
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        fill_distinct(group, seed, spread=1 << 20, seed_stride=104729)


def build_model(cfg: Config, arch) -> nn.Module:
    with torch.device(cfg.device):
        model = presets.build(PRESETS[cfg.preset], arch, cfg.model_dtype)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.get_input_embeddings().weight
    _fill([t for _, t, _ in unique_targets(model)], seed=1)
    return model


def unique_targets(model: nn.Module, source: dict[str, torch.Tensor] | None = None) -> Targets:
    """(name, model tensor, source tensor or None) once per parameter or persistent
    buffer (tied names once, under the first)."""
    seen: set[int] = set()
    targets = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            targets.append((name, t, None if source is None else source[name]))
    return targets


def make_source(model: nn.Module, cfg: Config) -> dict[str, torch.Tensor]:
    """Fresh values keyed like model.state_dict(); tied names share one tensor, as
    in a checkpoint of the model."""
    by_tensor: dict[int, torch.Tensor] = {}
    source = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in by_tensor:
            by_tensor[id(t)] = torch.empty(t.shape, dtype=cfg.source_dtype_of(t), device=cfg.src_device)
        source[name] = by_tensor[id(t)]
    _fill(list(by_tensor.values()), seed=2)
    return source


def alias_buffers(model: nn.Module) -> dict[str, str]:
    """Non-persistent buffers viewing a parameter's storage, as vLLM's
    MambaMixer2.conv_weights views conv1d.weight: buffer name -> parameter name."""
    by_storage = {p.untyped_storage().data_ptr(): name for name, p in model.named_parameters()}
    aliases = {}
    for prefix, module in model.named_modules():
        for name, b in module.named_buffers(prefix=prefix, recurse=False):
            if name.rpartition(".")[2] in module._non_persistent_buffers_set:
                viewed = by_storage.get(b.untyped_storage().data_ptr())
                if viewed is not None:
                    aliases[name] = viewed
    return aliases


def write_shards(source: dict[str, torch.Tensor], folder: str, shards: int) -> list[str]:
    """The source as safetensors shards in folder, split in state_dict order into about
    equal byte counts and indexed by model.safetensors.index.json, as save_pretrained
    lays them out. A tied second name is saved as a copy of its own (save_file refuses
    shared storage), so every reader sees every name, with equal values."""
    sizes = [t.numel() * t.element_size() for t in source.values()]
    total = sum(sizes)
    parts: list[list[str]] = [[] for _ in range(shards)]
    offset = 0
    for name, size in zip(source, sizes):
        # By the middle of each tensor: a tensor larger than a shard cannot split one.
        parts[min(shards - 1, (offset + size // 2) * shards // max(total, 1))].append(name)
        offset += size
    parts = [names for names in parts if names]
    files = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    seen: set[int] = set()
    for file, names in zip(files, parts):
        tensors = {}
        for name in names:
            t = source[name]
            tensors[name] = t.detach().cpu().clone() if t.data_ptr() in seen else t.detach().cpu()
            seen.add(t.data_ptr())
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total},
             "weight_map": {name: file for file, names in zip(files, parts) for name in names}}
    with open(os.path.join(folder, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=2)
    return [os.path.join(folder, file) for file in files]


@dataclass
class Bench:
    """A live model and its source: in memory, as safetensors shards (folder is None
    without safetensors) and as the pairs of a shuffled stream."""

    model: nn.Module
    source: dict[str, torch.Tensor]
    targets: Targets
    pointers: dict[str, int]  # state_dict name -> data pointer, to check nothing moved
    aliases: dict[str, str]
    folder: str | None
    shard_files: list[str] | None
    shuffled: list[tuple[str, torch.Tensor]]

    @property
    def tensors(self) -> int:
        return len(self.targets)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t, _ in self.targets)

    @property
    def dtype_pairs(self) -> int:
        """How many (source, model) dtype pairs: the limit's contiguous copies."""
        return len({(s.dtype, t.dtype) for _, t, s in self.targets})


def prepare(cfg: Config, arch, folder: str) -> Bench:
    model = build_model(cfg, arch)
    source = make_source(model, cfg)
    shard_files = None
    if save_file is not None:
        os.makedirs(folder, exist_ok=True)
        shard_files = write_shards(source, folder, cfg.shards)
    # The stream sends the source's pairs in one fixed shuffled order, prepared here.
    shuffled = list(source.items())
    random.Random(0).shuffle(shuffled)
    return Bench(model=model, source=source, targets=unique_targets(model, source),
                 pointers={n: t.data_ptr() for n, t in model.state_dict(keep_vars=True).items()},
                 aliases=alias_buffers(model), folder=folder if shard_files else None,
                 shard_files=shard_files, shuffled=shuffled)


def _layer_of(name: str) -> str:
    """`model.layers.N` (or `backbone.layers.N`) for a decoder layer's tensors, else "rest"."""
    match = re.match(r"(.*?\blayers\.\d+)\.", name)
    return match.group(1) if match else "rest"


def make_methods(bench: Bench, cfg: Config) -> dict[str, Callable[[], object]]:
    # Pairs and lists are prepared here, outside the timing: the loops below are the
    # cheapest Python a caller could write, not a straw man.
    model, source = bench.model, bench.source
    pairs = [(t, s) for _, t, s in bench.targets]
    layers: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for name, t, s in bench.targets:
        dsts, srcs = layers.setdefault(_layer_of(name), ([], []))
        dsts.append(t)
        srcs.append(s)
    # The limit: one contiguous copy of as many elements per (source, model) dtype pair.
    elements = Counter()
    for t, s in pairs:
        elements[s.dtype, t.dtype] += t.numel()
    flat = []
    for (src_dtype, dst_dtype), count in elements.items():
        flat_dst = torch.empty(count, dtype=dst_dtype, device=cfg.device)
        flat_src = torch.empty(count, dtype=src_dtype, device=cfg.src_device)
        flat_dst.fill_(0.5)
        flat_src.fill_(0.25)  # first-touch the pages outside the timing
        flat.append((flat_dst, flat_src))

    def copy_loop():
        with torch.no_grad():
            for t, s in pairs:
                t.copy_(s)

    def foreach_copy():
        with torch.no_grad():
            for dsts, srcs in layers.values():
                torch._foreach_copy_(dsts, srcs)

    def load_file_then_load_state_dict():
        # What users do today: every shard loaded, merged, then load_state_dict. (With
        # safetensors 0.8 load_file's tensors are private memory maps of the file, paged
        # in as load_state_dict reads them, not copies made up front.)
        merged = {}
        for file in bench.shard_files:
            merged.update(load_file(file))
        return model.load_state_dict(merged)

    def torch_copy():
        for flat_dst, flat_src in flat:
            flat_dst.copy_(flat_src)

    flat_dsts, flat_srcs = [d for d, _ in flat], [s for _, s in flat]

    def fused_copy():
        fastreload.ops.batched_copy_(flat_dsts, flat_srcs)

    # The limit is what the memory system allows: the faster of torch's copy_ and
    # fastreload's own copy of the same contiguous bytes, best of three calls each
    # (on the CPU the fused pass, with its streaming stores, is the faster one).
    candidates = {"torch copy_": torch_copy}
    if all(d.device == s.device for d, s in flat):
        candidates["fastreload's fused copy"] = fused_copy
    time_call = timer(cfg, cuda_events=False)
    how = min(candidates, key=lambda name: min(time_call(candidates[name]) for _ in range(3)))

    def limit():
        candidates[how]()
    limit.how = how

    methods: dict[str, Callable[[], object]] = {
        MAPPING: lambda: fastreload.reload_layerwise(model, source, batch_bytes=cfg.batch_bytes),
    }
    if bench.folder is not None:
        methods[SAFETENSORS] = lambda: fastreload.reload_layerwise(model, bench.folder,
                                                                   batch_bytes=cfg.batch_bytes)
    methods[STREAM] = lambda: fastreload.reload_layerwise(model, iter(bench.shuffled),
                                                          batch_bytes=cfg.stream_batch_bytes)
    methods[BASELINE] = lambda: model.load_state_dict(source)
    if bench.folder is not None:
        methods[LOAD_FILE] = load_file_then_load_state_dict
    methods.update({COPY_LOOP: copy_loop, FOREACH: foreach_copy, LIMIT: limit})
    return methods


def time_first(bench: Bench, cfg: Config, time_call) -> float:
    """The first reload of a model: it walks the layout and makes the copy plan, which
    later calls reuse. Must run before anything else reloads the model."""
    gc.collect()
    return time_call(lambda: fastreload.reload_layerwise(bench.model, bench.source,
                                                         batch_bytes=cfg.batch_bytes))


# ---------------------------------------------------------------------------
# Memory: how far resident memory rises above where it stood while one call runs.

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_reader() -> Callable[[], tuple[int, int]] | None:
    """A function returning (resident bytes, of which file-backed or shared) for this
    process: /proc/self/statm (VmRSS and RssFile + RssShmem, as /proc/self/status
    names them), else psutil, else None."""
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:
        fd = None
    if fd is not None:
        def read() -> tuple[int, int]:
            fields = os.pread(fd, 256, 0).split()
            return int(fields[1]) * _PAGE, int(fields[2]) * _PAGE
        return read
    try:
        import psutil
    except ImportError:
        return None
    process = psutil.Process()

    def read_psutil() -> tuple[int, int]:
        info = process.memory_info()
        return info.rss, getattr(info, "shared", 0)
    return read_psutil


class PeakRss:
    """Peak growth of resident memory over the with-block, sampled from a background
    thread every interval_s: rss (all resident pages, VmRSS) and anon (resident less
    file-backed and shared pages: memory allocated, not a file's pages mapped).
    A peak between two samples is missed; resetting the kernel's high-water mark
    (VmHWM) instead would also reset what getrusage and /usr/bin/time report as the
    process's peak, so it is left alone."""

    def __init__(self, read: Callable[[], tuple[int, int]], interval_s: float = 0.001):
        self.read = read
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        rss, shared = self.read()
        self.before_rss, self.before_shared = rss, shared
        self.peak_rss, self.peak_anon = rss, rss - shared
        self.samples = 0
        self._thread.start()
        return self

    def _sample(self) -> None:
        rss, shared = self.read()
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_anon = max(self.peak_anon, rss - shared)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def extra_rss(self) -> int:
        return self.peak_rss - self.before_rss

    @property
    def extra_anon(self) -> int:
        return self.peak_anon - (self.before_rss - self.before_shared)


def _release_free_memory() -> None:
    """Collects garbage and hands the allocator's free pages back to the system
    (glibc's malloc_trim), so memory freed by an earlier call is not counted as
    resident before the next one and does not hide its growth."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_peaks(methods: dict[str, Callable[[], object]], read) -> dict[str, tuple[PeakRss, object]]:
    """One more call of each method, alone, with resident memory sampled: name ->
    (the sampler, what the call returned)."""
    peaks = {}
    # A thread waiting for the GIL gets it after the switch interval (5 ms by default):
    # shortened here, outside the timing, so pure-Python stretches are sampled too.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        for name, method in methods.items():
            _release_free_memory()
            with PeakRss(read) as peak:
                returned = method()
            peaks[name] = (peak, returned)
    finally:
        sys.setswitchinterval(interval)
    return peaks


def largest_layer_bytes(bench: Bench) -> int:
    """Source bytes of the largest module's own parameters and persistent buffers:
    what fastreload calls a layer, the unit a stream holds until it completes."""
    sizes: Counter[str] = Counter()
    for name, _, s in bench.targets:
        sizes[name.rpartition(".")[0]] += s.numel() * s.element_size()
    return max(sizes.values())


# ---------------------------------------------------------------------------
# Correctness: the numbers mean nothing if the copies are wrong.

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Compared as integers: bit for bit, and torch.equal need not support fp8.
    return t.view(_INT_OF_SIZE[t.element_size()])


def verify(bench: Bench, cfg: Config, reload: Callable[[], fastreload.ReloadReport] | None = None,
           what: str = MAPPING) -> fastreload.ReloadReport:
    """A last fastreload reload into a model first filled with NaN must leave every
    tensor equal to its source (converted, bit for bit) and at its original address,
    and every alias buffer still a view of its parameter, out of the state_dict, with
    the new values. reload is that reload (default: from the source mapping); the
    files and the stream hold the same values, so they are checked against the same
    source."""
    model, source = bench.model, bench.source
    if reload is None:
        def reload():
            return fastreload.reload_layerwise(model, source, batch_bytes=cfg.batch_bytes)
    with torch.no_grad():
        for _, t, _ in bench.targets:
            t.fill_(float("nan"))
    report = reload()
    problems = []
    now = model.state_dict(keep_vars=True)
    if now.keys() != bench.pointers.keys():
        problems.append(f"state_dict names changed: {sorted(now.keys() ^ bench.pointers.keys())[:5]}")
    problems += [f"{n}: data pointer moved" for n, t in now.items()
                 if n in bench.pointers and t.data_ptr() != bench.pointers[n]]
    problems += [f"{n}: values differ from the source" for n, t, s in bench.targets
                 if not torch.equal(_bits(t), _bits(s.to(device=t.device, dtype=t.dtype)))]
    for buffer_name, param_name in bench.aliases.items():
        buffer, param = model.get_buffer(buffer_name), model.get_parameter(param_name)
        new = source[param_name].to(device=param.device, dtype=param.dtype)
        if buffer_name in now:
            problems.append(f"{buffer_name}: a non-persistent buffer, but in the state_dict")
        if buffer.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
            problems.append(f"{buffer_name}: no longer a view of {param_name}")
        elif not torch.equal(_bits(buffer), _bits(new.reshape(buffer.shape))):
            problems.append(f"{buffer_name}: differs from the new {param_name}")
    if (report.tensors, report.bytes) != (bench.tensors, bench.nbytes):
        problems.append(f"report says {report.tensors} tensors, {report.bytes} bytes; "
                        f"expected {bench.tensors}, {bench.nbytes}")
    if problems:
        shown = "\n  ".join(problems[:20])
        raise SystemExit(f"CORRECTNESS FAILURE ({what}, {len(problems)} problems):\n  {shown}")
    return report


def verify_all(bench: Bench, cfg: Config) -> list[str]:
    """verify() after a reload from each source; what was checked."""
    verify(bench, cfg)
    checked = ["the mapping"]
    if bench.folder is not None:
        verify(bench, cfg, what=SAFETENSORS,
               reload=lambda: fastreload.reload_layerwise(bench.model, bench.folder,
                                                          batch_bytes=cfg.batch_bytes))
        checked.append("the safetensors shards")
    verify(bench, cfg, what=STREAM,
           reload=lambda: fastreload.reload_layerwise(bench.model, iter(bench.shuffled),
                                                      batch_bytes=cfg.stream_batch_bytes))
    checked.append("the shuffled stream")
    return checked


# ---------------------------------------------------------------------------
# Reporting.

def summarize(samples: dict[str, list[float]], bench: Bench,
              peaks: dict[str, tuple[PeakRss, object]] | None = None,
              overhead: dict[str, list[float]] | None = None) -> dict[str, dict[str, object]]:
    """Per method: the medians and what follows from them. overhead holds the same
    methods' samples on the model with every size 1."""
    peaks, overhead = peaks or {}, overhead or {}
    medians = {n: statistics.median(s) for n, s in samples.items()}
    tensors = bench.tensors
    results = {}
    for name, times in samples.items():
        seconds = medians[name]
        results[name] = {
            "tensors": bench.dtype_pairs if name == LIMIT else tensors,
            "bytes": bench.nbytes,
            "samples_s": times,
            "median_s": seconds,
            "gbps": bench.nbytes / seconds / 1e9,
            "pct_of_limit": 100 * medians[LIMIT] / seconds,
            "speedup_vs_load_state_dict": medians[BASELINE] / seconds,
            # Time per tensor with (nearly) no bytes to copy (None: not measured).
            "overhead_us_per_tensor": (statistics.median(overhead[name]) / tensors * 1e6
                                       if name in overhead else None),
            "overhead_samples_s": overhead.get(name),
            # What the row takes beyond the limit, per tensor, at full size.
            "excess_over_limit_us_per_tensor": (seconds - medians[LIMIT]) / tensors * 1e6,
            # Resident memory growth during one more call (None: not measured).
            "peak_extra_mib": peaks[name][0].extra_rss / 2**20 if name in peaks else None,
            "peak_extra_anon_mib": peaks[name][0].extra_anon / 2**20 if name in peaks else None,
        }
    return results


def print_table(results: dict[str, dict[str, object]]) -> None:
    header = ("method", "tensors", "MiB", "ms (median)", "GB/s", "% of limit", f"x {BASELINE}",
              "peak extra MiB", "overhead µs/tensor")
    rows = [(name, f"{r['tensors']:,}", f"{r['bytes'] / 2**20:.1f}", f"{r['median_s'] * 1e3:.1f}",
             f"{r['gbps']:.2f}", f"{r['pct_of_limit']:.1f}", f"{r['speedup_vs_load_state_dict']:.2f}",
             "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}",
             "-" if r["overhead_us_per_tensor"] is None else f"{r['overhead_us_per_tensor']:.3f}")
            for name, r in results.items()]
    print_columns(header, rows)


def describe(arch) -> str:
    """The numbers of an architecture, as `name value` pairs (layers apart)."""
    return ", ".join(f"{f.name} {getattr(arch, f.name)}" for f in dataclasses.fields(arch)
                     if f.name not in ("layers", "pattern"))


def dtypes_of(tensors: list[torch.Tensor]) -> str:
    counts = Counter(str(t.dtype).removeprefix("torch.") for t in tensors)
    if len(counts) == 1:
        return next(iter(counts))
    return " + ".join(f"{n:,} {dtype}" for dtype, n in counts.most_common())


def scale_text(scale: float) -> str:
    return f"1/{round(1 / scale)}" if scale < 1 and abs(1 / scale - round(1 / scale)) < 1e-9 else f"{scale:g}"


def parse_scale(text: str) -> float:
    """0.125 or 1/8."""
    numerator, _, denominator = text.partition("/")
    value = float(numerator) / float(denominator or 1)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the scale must be positive, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> tuple[Config, str | None, str | None]:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default=d.preset, help=f"default {d.preset}")
    p.add_argument("--scale", type=parse_scale, default=None,
                   help="multiplies every size, keeps every count (e.g. 1/8 or 0.125; 1: the real sizes); "
                        "default: the preset's")
    p.add_argument("--layers", type=int, default=None, help="the first N layers; default: the preset's")
    for name in OVERRIDES:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help="replaces the preset's (scaled) value exactly")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype,
                   help="the model's dtype (fp8 and fp32 tensors keep theirs)")
    p.add_argument("--source-dtype", choices=DTYPES, default=None,
                   help="the source's dtype for the model's --dtype and fp8 tensors; default: theirs")
    p.add_argument("--tie-embeddings", action="store_true", help="lm_head.weight is the input embedding")
    p.add_argument("--device", default=d.device, help="where the model lives")
    p.add_argument("--source-device", default=None, help="where the source lives; default: --device")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed rounds")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed rounds first")
    p.add_argument("--batch-bytes", type=int, default=d.batch_bytes, help="fastreload's fused batch budget")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's")
    p.add_argument("--shards", type=int, default=d.shards, help="safetensors files the source is written to")
    p.add_argument("--stream-batch-bytes", type=int, default=d.stream_batch_bytes,
                   help="fastreload's fused batch budget for the stream")
    p.add_argument("--json", metavar="PATH", help="also write every sample, the config and the machine here")
    p.add_argument("--plot", metavar="PATH", help="also sweep the depth and draw GB/s against tensors (PNG)")
    p.add_argument("--processed", action="store_true",
                   help="the processed variant instead: expert weights fused after loading and "
                        "replayed through fastreload.record(), against a per-tensor replay; runs "
                        "reload_processed.py with --layers, --repeats, --warmup, --batch-bytes and --json")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.warmup < 0:
        p.error("--repeats must be at least 1 and --warmup at least 0")
    if a.shards < 1:
        p.error("--shards must be at least 1")
    cfg = Config(preset=a.preset, scale=a.scale, layers=a.layers,
                 **{name: getattr(a, name) for name in OVERRIDES},
                 dtype=a.dtype, source_dtype=a.source_dtype, tie_embeddings=a.tie_embeddings,
                 device=a.device, source_device=a.source_device, repeats=a.repeats, warmup=a.warmup,
                 batch_bytes=a.batch_bytes, threads=a.threads, shards=a.shards,
                 stream_batch_bytes=a.stream_batch_bytes)
    try:
        cfg.arch()
    except ValueError as e:
        p.error(str(e))
    return cfg, a.json, a.plot


# The processed variant: Qwen3-30B-A3B's MoE with each layer's experts fused
# after loading, replayed through fastreload.record(); reload_processed.py runs it.
PROCESSED_OPTIONS = ("--layers", "--repeats", "--warmup", "--batch-bytes", "--json")


def run_processed(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="reload_moe.py --processed",
                                description="the processed variant: benchmarks/reload_processed.py on the "
                                            "qwen3-30b-a3b layout; these options are passed on")
    p.add_argument("--processed", action="store_true")
    p.add_argument("--preset", choices=["qwen3-30b-a3b"], default="qwen3-30b-a3b")
    for option in PROCESSED_OPTIONS:
        p.add_argument(option)
    a = vars(p.parse_args(argv))
    import reload_processed
    reload_processed.main([arg for option in PROCESSED_OPTIONS
                           if a[option[2:].replace("-", "_")] is not None
                           for arg in (option, a[option[2:].replace("-", "_")])])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--processed" in argv:
        run_processed(argv)
        return
    if "--transformers" in argv:
        import reload_hf
        reload_hf.main(argv)
        return
    cfg, json_path, plot_path = parse_args(argv)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    # The shards live in a temporary directory, removed at the end however the run ends.
    with tempfile.TemporaryDirectory(prefix="reload_moe-") as folder:
        run(cfg, json_path, plot_path, folder)


def run(cfg: Config, json_path: str | None, plot_path: str | None, folder: str) -> None:
    started = time.perf_counter()
    arch = cfg.arch()
    bench = prepare(cfg, arch, os.path.join(folder, "model"))
    # The overhead model: the same inventory with every size 1.
    tiny = prepare(cfg, presets.scaled(arch, 0), os.path.join(folder, "tiny"))
    built_s = time.perf_counter() - started
    # The models' 100k+ Python objects live as long as the process, as in a server;
    # frozen, they are not rescanned by every garbage collection during the timing.
    gc.freeze()

    machine = machine_info(cfg)
    tensors, nbytes = bench.tensors, bench.nbytes
    print(f"reload_moe: {cfg.preset} at scale {scale_text(cfg.effective_scale)}, {arch.layers} layers "
          f"({describe(arch)}){', tied embeddings' if cfg.tie_embeddings else ''}")
    print(f"model {dtypes_of([t for _, t, _ in bench.targets])} on {cfg.device} <- "
          f"source {dtypes_of([s for _, _, s in bench.targets])} on {cfg.src_device}; "
          f"{tensors:,} tensors, {nbytes / 2**20:.1f} MiB"
          f"{f'; {len(bench.aliases)} alias buffers' if bench.aliases else ''}")
    print(f"{machine_line(machine, repeats=cfg.repeats, warmup=cfg.warmup)}; "
          f"built and written in {built_s:.1f} s")
    if bench.folder is not None:
        file_bytes = sum(os.path.getsize(f) for f in bench.shard_files)
        print(f"the source as {len(bench.shard_files)} safetensors shards + {INDEX_NAME} "
              f"({file_bytes / 2**20:.1f} MiB) in a temporary directory")
    else:
        print(f"safetensors is not installed: the {SAFETENSORS} and {LOAD_FILE} rows are skipped")
    print(f"overhead model: the same {tiny.tensors:,} tensors with every size 1 ({tiny.nbytes:,} bytes)")

    # Host time after a synchronize, not CUDA events: GPU results stay comparable with earlier runs.
    time_call = timer(cfg, cuda_events=False)
    first_s = time_first(bench, cfg, time_call)
    tiny_first_s = time_first(tiny, cfg, time_call)
    methods = make_methods(bench, cfg)
    print(f"limit: one contiguous copy of the same bytes per dtype pair, by {methods[LIMIT].how} "
          "(the faster of torch's copy_ and fastreload's fused copy here)")
    read = rss_reader()
    # File-backed resident memory before any file is read, to tell the shards' mapped
    # pages apart later.
    shared_before_files = read()[1] if read is not None else 0
    samples, _ = run_interleaved(methods, time_call, warmup=cfg.warmup, repeats=cfg.repeats)
    samples = {FIRST: [first_s], **samples}

    # Outside the timing: one more call of each method with resident memory sampled.
    peaks = measure_peaks(methods, read) if read is not None else {}

    tiny_samples, _ = run_interleaved(make_methods(tiny, cfg), time_call, warmup=cfg.warmup,
                                      repeats=cfg.repeats)
    tiny_samples = {FIRST: [tiny_first_s], **tiny_samples}
    gc.unfreeze()

    checked = verify_all(bench, cfg)
    verify_all(tiny, cfg)
    last = fastreload.reload_layerwise(bench.model, bench.source, batch_bytes=cfg.batch_bytes)

    results = summarize(samples, bench, peaks, tiny_samples)
    print()
    print_table(results)
    print()
    fr = results[MAPPING]
    print(f"overhead µs/tensor: each method's median on the overhead model / {tensors:,} tensors; "
          f"at full size, (row - limit) / tensors: "
          f"{MAPPING} {fr['excess_over_limit_us_per_tensor']:.2f} µs, "
          f"{BASELINE} {results[BASELINE]['excess_over_limit_us_per_tensor']:.2f} µs, "
          f"{COPY_LOOP} {results[COPY_LOOP]['excess_over_limit_us_per_tensor']:.2f} µs; "
          f"batched_copy_ calls per reload: {last.batched_copy_calls}")

    largest = largest_layer_bytes(bench)
    sources: dict[str, object] = {"largest_layer_bytes": largest}
    if peaks:
        print("peak extra MiB: resident memory (VmRSS) growth during one more call after the rounds, "
              "sampled every 1 ms; of it, allocated (anonymous, not a file's pages) MiB: "
              + ", ".join(f"{n} {p.extra_anon / 2**20:.1f}" for n, (p, _) in peaks.items()))
    else:
        print("peak extra MiB: not measured (no /proc/self/statm and no psutil)")
    if SAFETENSORS in peaks:
        peak, report = peaks[SAFETENSORS]
        kept = peak.before_shared - shared_before_files
        sources["safetensors"] = {"shards": len(bench.shard_files), "bytes_read": report.bytes_read,
                                  "batched_copy_calls": report.batched_copy_calls,
                                  "file_backed_resident_kept_bytes": kept}
        print(f"{SAFETENSORS}: {len(bench.shard_files)} shards, report.bytes_read "
              f"{report.bytes_read / 2**20:.1f} MiB, {report.batched_copy_calls} fused copies; "
              f"before the call, file-backed resident memory already stood {kept / 2**20:.1f} MiB "
              f"above where it was before the first file reload (fastreload keeps the shards "
              f"mapped between reloads: page cache, not a copy)")
    if STREAM in peaks:
        report = peaks[STREAM][1]
        sources["stream"] = {"peak_held_bytes": report.peak_held_bytes, "bytes_read": report.bytes_read,
                             "batched_copy_calls": report.batched_copy_calls,
                             "batch_bytes": cfg.stream_batch_bytes}
        print(f"{STREAM}: report.peak_held_bytes {report.peak_held_bytes / 2**20:.1f} MiB "
              f"(batch_bytes {cfg.stream_batch_bytes / 2**20:.0f} MiB), "
              f"{report.batched_copy_calls} fused copies")

    targets = {}
    if SAFETENSORS in results:
        st = results[SAFETENSORS]
        budget = cfg.batch_bytes + largest
        targets["files"] = {"pct_of_limit": st["pct_of_limit"] >= 80}
        line = (f"reload from files target ({SAFETENSORS}): {st['pct_of_limit']:.1f}% of limit "
                f"(target >= 80%: {_met(st['pct_of_limit'] >= 80)})")
        if st["peak_extra_mib"] is not None:
            mem_ok = st["peak_extra_mib"] * 2**20 <= budget
            targets["files"]["peak_extra"] = mem_ok
            line += (f"; peak extra {st['peak_extra_mib']:.1f} MiB (target <= batch_bytes "
                     f"{cfg.batch_bytes / 2**20:.0f} MiB + largest layer {largest / 2**20:.1f} MiB: "
                     f"{_met(mem_ok)})")
            if LOAD_FILE in results:
                line += f"; {LOAD_FILE} {results[LOAD_FILE]['peak_extra_mib']:.1f} MiB"
        print(line)
    targets["repeated"] = {"pct_of_limit": fr["pct_of_limit"] >= 90,
                           "speedup_vs_load_state_dict": fr["speedup_vs_load_state_dict"] >= 4,
                           "overhead_us_per_tensor": fr["overhead_us_per_tensor"] < 0.3}
    print(f"repeated reload targets ({MAPPING}, from a mapping): "
          f"{fr['pct_of_limit']:.1f}% of limit (>= 90%: {_met(targets['repeated']['pct_of_limit'])}); "
          f"{fr['speedup_vs_load_state_dict']:.2f}x {BASELINE} "
          f"(>= 4x: {_met(targets['repeated']['speedup_vs_load_state_dict'])}); "
          f"overhead {fr['overhead_us_per_tensor']:.3f} µs/tensor "
          f"(< 0.3: {_met(targets['repeated']['overhead_us_per_tensor'])})")
    aliases = f"; {len(bench.aliases)} alias buffers still view their parameters" if bench.aliases else ""
    print(f"verified: every tensor equals the source bit for bit and kept its data pointer{aliases} "
          f"(reloaded from {', '.join(checked)}; the overhead model too)")

    record = {"preset": cfg.preset, "scale": cfg.effective_scale, "arch": dataclasses.asdict(arch),
              "config": dataclasses.asdict(cfg), "machine": machine, "tensors": tensors, "bytes": nbytes,
              "alias_buffers": len(bench.aliases), "fused_copies_per_reload": last.batched_copy_calls,
              "overhead_model": {"tensors": tiny.tensors, "bytes": tiny.nbytes},
              "limit": "one contiguous copy of the same elements per (source, model) dtype pair, "
                       f"by {methods[LIMIT].how}, the faster here",
              "peak_extra": "resident memory growth (VmRSS; anon: less file-backed and shared "
                            "pages) during one more call after the timed rounds, sampled every 1 ms",
              "overhead": "median seconds on the overhead model (every size 1) / tensors",
              "verified": checked, "sources": sources, "targets": targets, "results": results}
    del bench, tiny, methods, peaks  # the sweep's models take their place
    if plot_path:
        points = sweep(cfg, arch, folder, time_call)
        points.append({"layers": arch.layers, "tensors": tensors, "bytes": nbytes, "results": results})
        record["sweep"] = points
    if json_path:
        with open(json_path, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {json_path}")
    if plot_path:
        plot(record["sweep"], plot_path, f"{cfg.preset} at scale {scale_text(cfg.effective_scale)}, "
                                         f"{machine['cpu']}, {cfg.device}")
        print(f"wrote {plot_path}")
    print(f"total {time.perf_counter() - started:.1f} s")


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


# ---------------------------------------------------------------------------
# --plot: GB/s against the tensor count, from the same preset at several depths.

def sweep(cfg: Config, arch, folder: str, time_call) -> list[dict[str, object]]:
    """The preset at 1/8, 1/4 and 1/2 of its depth (distinct depths below the full one),
    each timed like the full model and checked; no memory sampling, no overhead model."""
    depths = sorted({max(1, arch.layers // d) for d in SWEEP_DIVISORS} - {arch.layers})
    points = []
    for depth in depths:
        point_folder = os.path.join(folder, f"sweep-{depth}")
        bench = prepare(cfg, dataclasses.replace(arch, layers=depth), point_folder)
        gc.freeze()
        first_s = time_first(bench, cfg, time_call)
        samples, _ = run_interleaved(make_methods(bench, cfg), time_call, warmup=cfg.warmup,
                                     repeats=cfg.repeats)
        verify(bench, cfg)
        points.append({"layers": depth, "tensors": bench.tensors, "bytes": bench.nbytes,
                       "results": summarize({FIRST: [first_s], **samples}, bench)})
        print(f"sweep: {depth} layers, {bench.tensors:,} tensors, {bench.nbytes / 2**20:.1f} MiB: "
              + ", ".join(f"{n} {r['gbps']:.2f}" for n, r in points[-1]["results"].items()) + " GB/s")
        gc.unfreeze()
        del bench
        shutil.rmtree(point_folder, ignore_errors=True)
    return points


def plot(points: list[dict[str, object]], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    x = [p["tensors"] for p in points]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for name in points[-1]["results"]:
        if name != LIMIT:
            ax.plot(x, [p["results"][name]["gbps"] if name in p["results"] else float("nan") for p in points],
                    marker="o", label=name)
    ax.plot(x, [p["results"][LIMIT]["gbps"] for p in points], "k--", linewidth=2,
            label="limit (one contiguous copy of the same bytes)")
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{p['tensors']:,}\n{p['layers']} layers" for p in points])
    ax.minorticks_off()
    ax.set_xlabel("tensors reloaded (the preset at 1/8, 1/4, 1/2 and all of its layers)")
    ax.set_ylabel("GB/s written into the model (median)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
