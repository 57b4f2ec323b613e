"""Reload fresh weights into a synthetic MoE decoder: fastreload against the usual ways.

    python benchmarks/reload_moe.py                      # the default config (`make bench`)
    python benchmarks/reload_moe.py --source-dtype fp32  # include a dtype conversion
    python benchmarks/reload_moe.py --json results.json

Every method writes the same source into the same live model, interleaved round-robin
in one process after a warm-up; the table reports medians. The limit row is one
contiguous copy of the same number of elements: what the memory system allows.
The source is also written as safetensors shards to a temporary directory, read by
fastreload and by safetensors' load_file + load_state_dict, and sent to fastreload as
a shuffled stream of (name, tensor) pairs. After the rounds, one more call of each
method runs with resident memory sampled every millisecond: its peak growth is the
"peak extra MiB" column.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
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

from common import DTYPES as ALL_DTYPES
from common import SourceFollowsDestination, fill_distinct, machine_info, machine_line, run_interleaved, timer

# --dtype and --source-dtype keep offering only the dtypes this model was built and
# checked with; fp64 and fp8 in the shared table are for batched_copy.
DTYPES = {name: ALL_DTYPES[name] for name in ("bf16", "fp16", "fp32")}
BASELINE = "load_state_dict"
LIMIT = "limit"
FIRST = "fastreload (first)"
SAFETENSORS = "fastreload (safetensors)"
STREAM = "fastreload (stream)"
LOAD_FILE = "load_file + load_state_dict"
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class Config(SourceFollowsDestination):
    layers: int = 64
    experts: int = 128
    hidden: int = 128
    moe_intermediate: int = 96
    vocab: int = 32000
    dtype: str = "bf16"
    source_dtype: str | None = None  # None: the model's dtype
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


# ---------------------------------------------------------------------------
# The model: parameter names and shapes of a real MoE decoder, no forward pass.

class Linear(nn.Linear):
    """nn.Linear without its initialization: _fill writes every value, and kaiming
    init of 25k weights would take longer than the benchmark."""

    def reset_parameters(self) -> None:
        pass


def _linear(cfg: Config, in_features: int, out_features: int) -> nn.Linear:
    return Linear(in_features, out_features, bias=False, dtype=cfg.model_dtype)


class Expert(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = _linear(cfg, cfg.hidden, cfg.moe_intermediate)
        self.up_proj = _linear(cfg, cfg.hidden, cfg.moe_intermediate)
        self.down_proj = _linear(cfg, cfg.moe_intermediate, cfg.hidden)


class SparseMoe(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate = _linear(cfg, cfg.hidden, cfg.experts)  # the router
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(cfg.experts))


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        # Grouped-query attention: 4 query heads share each key/value head.
        kv = max(cfg.hidden // 4, 1)
        self.q_proj = _linear(cfg, cfg.hidden, cfg.hidden)
        self.k_proj = _linear(cfg, cfg.hidden, kv)
        self.v_proj = _linear(cfg, cfg.hidden, kv)
        self.o_proj = _linear(cfg, cfg.hidden, cfg.hidden)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = SparseMoe(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden, dtype=cfg.model_dtype)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden, dtype=cfg.model_dtype)


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden, dtype=cfg.model_dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.hidden, dtype=cfg.model_dtype)


class MoeForCausalLM(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.model = Decoder(cfg)
        self.lm_head = _linear(cfg, cfg.hidden, cfg.vocab)


def _fill(tensors: list[torch.Tensor], seed: int) -> None:
    # The per-seed shift makes the model (seed 1) and its source (seed 2) differ in
    # window offsets as well as values, so a copy from the wrong side shows too.
    fill_distinct(tensors, seed, spread=1 << 20, seed_stride=104729)


def build_model(cfg: Config) -> nn.Module:
    with torch.device(cfg.device):
        model = MoeForCausalLM(cfg)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _fill(list(model.parameters()), seed=1)
    return model


def make_source(model: nn.Module, cfg: Config) -> dict[str, torch.Tensor]:
    """Fresh values keyed like model.state_dict(); tied names share one tensor, as
    in a checkpoint of the model."""
    by_storage: dict[int, torch.Tensor] = {}
    source = {}
    for name, t in model.state_dict(keep_vars=True).items():
        ptr = t.data_ptr()
        if ptr not in by_storage:
            by_storage[ptr] = torch.empty(t.shape, dtype=cfg.src_dtype, device=cfg.src_device)
        source[name] = by_storage[ptr]
    _fill(list(by_storage.values()), seed=2)
    return source


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


# ---------------------------------------------------------------------------
# The methods: each a callable that writes the whole source into the model once.

Targets = list[tuple[str, torch.Tensor, torch.Tensor]]


def unique_targets(model: nn.Module, source: dict[str, torch.Tensor]) -> Targets:
    """(name, model tensor, source tensor) once per model tensor (tied names once)."""
    return [(name, p, source[name]) for name, p in model.named_parameters()]


def _layer_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:3]) if name.startswith("model.layers.") else "rest"


def make_methods(model: nn.Module, source: dict[str, torch.Tensor], cfg: Config,
                 folder: str | None = None, shard_files: list[str] | None = None,
                 ) -> dict[str, Callable[[], object]]:
    # Pairs and lists are prepared here, outside the timing: the loops below are the
    # cheapest Python a caller could write, not a straw man.
    targets = unique_targets(model, source)
    pairs = [(p, s) for _, p, s in targets]
    layers: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for name, p, s in targets:
        dsts, srcs = layers.setdefault(_layer_of(name), ([], []))
        dsts.append(p)
        srcs.append(s)
    elements = sum(p.numel() for p, _ in pairs)
    flat_dst = torch.empty(elements, dtype=cfg.model_dtype, device=cfg.device)
    flat_src = torch.empty(elements, dtype=cfg.src_dtype, device=cfg.src_device)
    flat_dst.fill_(0.5)
    flat_src.fill_(0.25)  # first-touch the pages outside the timing
    # The stream sends the source's pairs in one fixed shuffled order, prepared here.
    # fastreload's layer is a module owning tensors directly; here each owns one, so
    # every pair completes its layer on arrival and the stream holds up to a batch.
    shuffled_items = list(source.items())
    random.Random(0).shuffle(shuffled_items)

    def copy_loop():
        with torch.no_grad():
            for p, s in pairs:
                p.copy_(s)

    def foreach_copy():
        with torch.no_grad():
            for dsts, srcs in layers.values():
                torch._foreach_copy_(dsts, srcs)

    def load_file_then_load_state_dict():
        # What users do today: every shard loaded, merged, then load_state_dict. (With
        # safetensors 0.8 load_file's tensors are private memory maps of the file, paged
        # in as load_state_dict reads them, not copies made up front.)
        merged = {}
        for file in shard_files:
            merged.update(load_file(file))
        return model.load_state_dict(merged)

    methods: dict[str, Callable[[], object]] = {
        "fastreload": lambda: fastreload.reload_layerwise(model, source, batch_bytes=cfg.batch_bytes),
    }
    if folder is not None:
        methods[SAFETENSORS] = lambda: fastreload.reload_layerwise(model, folder, batch_bytes=cfg.batch_bytes)
    methods[STREAM] = lambda: fastreload.reload_layerwise(model, iter(shuffled_items),
                                                          batch_bytes=cfg.stream_batch_bytes)
    methods[BASELINE] = lambda: model.load_state_dict(source)
    if folder is not None:
        methods[LOAD_FILE] = load_file_then_load_state_dict
    methods.update({
        "copy_ loop": copy_loop,
        "foreach_copy_": foreach_copy,
        LIMIT: lambda: flat_dst.copy_(flat_src),
    })
    return methods


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
            if isinstance(returned, torch.Tensor):
                returned = None  # the limit's destination: nothing to keep
            peaks[name] = (peak, returned)
    finally:
        sys.setswitchinterval(interval)
    return peaks


def largest_layer_bytes(model: nn.Module, cfg: Config) -> int:
    """Source bytes of the largest module's own parameters and persistent buffers:
    what fastreload calls a layer, the unit a stream holds until it completes."""
    itemsize = torch.empty(0, dtype=cfg.src_dtype).element_size()
    largest = 0
    seen: set[int] = set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False)]
        own += [b for n, b in module.named_buffers(recurse=False)
                if n not in module._non_persistent_buffers_set]
        size = 0
        for t in own:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                size += t.numel() * itemsize
        largest = max(largest, size)
    return largest


# ---------------------------------------------------------------------------
# Correctness: the numbers mean nothing if the copies are wrong.

def verify(model: nn.Module, source: dict[str, torch.Tensor], pointers: dict[str, int], cfg: Config,
           reload: Callable[[], fastreload.ReloadReport] | None = None, what: str = "fastreload",
           ) -> fastreload.ReloadReport:
    """A last fastreload reload into a model first filled with NaN must leave every
    tensor equal to its source (converted) and at its original address. reload is
    that reload (default: from the source mapping); the files and the stream hold the
    same values, so they are checked against the same source."""
    if reload is None:
        def reload():
            return fastreload.reload_layerwise(model, source, batch_bytes=cfg.batch_bytes)
    targets = unique_targets(model, source)
    with torch.no_grad():
        for _, p, _ in targets:
            p.fill_(float("nan"))
    report = reload()
    problems = []
    names = dict(model.named_parameters(remove_duplicate=False))
    if names.keys() != pointers.keys():
        problems.append(f"parameter names changed: {sorted(names.keys() ^ pointers.keys())[:5]}")
    problems += [f"{n}: data pointer moved" for n, p in names.items()
                 if n in pointers and p.data_ptr() != pointers[n]]
    problems += [f"{n}: values differ from the source" for n, p, s in targets
                 if not torch.equal(p, s.to(device=p.device, dtype=p.dtype))]
    expected_bytes = sum(p.numel() * p.element_size() for _, p, _ in targets)
    if (report.tensors, report.bytes) != (len(targets), expected_bytes):
        problems.append(f"report says {report.tensors} tensors, {report.bytes} bytes; "
                        f"expected {len(targets)}, {expected_bytes}")
    if problems:
        shown = "\n  ".join(problems[:20])
        raise SystemExit(f"CORRECTNESS FAILURE ({what}, {len(problems)} problems):\n  {shown}")
    return report


# ---------------------------------------------------------------------------
# Reporting.

def summarize(samples: dict[str, list[float]], tensors: int, nbytes: int,
              peaks: dict[str, tuple[PeakRss, object]] | None = None) -> dict[str, dict[str, object]]:
    peaks = peaks or {}
    medians = {n: statistics.median(s) for n, s in samples.items()}
    results = {}
    for name, times in samples.items():
        seconds = medians[name]
        results[name] = {
            "tensors": 1 if name == LIMIT else tensors,
            "bytes": nbytes,
            "samples_s": times,
            "median_s": seconds,
            "gbps": nbytes / seconds / 1e9,
            "pct_of_limit": 100 * medians[LIMIT] / seconds,
            "speedup_vs_load_state_dict": medians[BASELINE] / seconds,
            "overhead_per_tensor_us": (seconds - medians[LIMIT]) / tensors * 1e6,
            # Resident memory growth during one more call (None: not measured).
            "peak_extra_mib": peaks[name][0].extra_rss / 2**20 if name in peaks else None,
            "peak_extra_anon_mib": peaks[name][0].extra_anon / 2**20 if name in peaks else None,
        }
    return results


def print_table(results: dict[str, dict[str, object]]) -> None:
    header = ("method", "tensors", "MiB", "ms (median)", "GB/s", "% of limit", f"x {BASELINE}",
              "peak extra MiB")
    rows = [(name, f"{r['tensors']:,}", f"{r['bytes'] / 2**20:.1f}", f"{r['median_s'] * 1e3:.1f}",
             f"{r['gbps']:.2f}", f"{r['pct_of_limit']:.1f}", f"{r['speedup_vs_load_state_dict']:.2f}",
             "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}")
            for name, r in results.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def parse_args(argv: list[str] | None = None) -> tuple[Config, str | None]:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--experts", type=int, default=d.experts)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--moe-intermediate", type=int, default=d.moe_intermediate)
    p.add_argument("--vocab", type=int, default=d.vocab)
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="the model's dtype")
    p.add_argument("--source-dtype", choices=DTYPES, default=None, help="default: the model's dtype")
    p.add_argument("--tie-embeddings", action="store_true", help="lm_head.weight is embed_tokens.weight")
    p.add_argument("--device", default=d.device, help="where the model lives")
    p.add_argument("--source-device", default=None, help="where the source lives; default: --device")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed rounds")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed rounds first")
    p.add_argument("--batch-bytes", type=int, default=d.batch_bytes, help="fastreload's fused batch budget")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's")
    p.add_argument("--shards", type=int, default=d.shards, help="safetensors files the source is written to")
    p.add_argument("--stream-batch-bytes", type=int, default=d.stream_batch_bytes,
                   help="fastreload's fused batch budget for the stream")
    p.add_argument("--json", metavar="PATH", help="also write every sample and the config here")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.warmup < 0:
        p.error("--repeats must be at least 1 and --warmup at least 0")
    if a.shards < 1:
        p.error("--shards must be at least 1")
    cfg = Config(layers=a.layers, experts=a.experts, hidden=a.hidden, moe_intermediate=a.moe_intermediate,
                 vocab=a.vocab, dtype=a.dtype, source_dtype=a.source_dtype, tie_embeddings=a.tie_embeddings,
                 device=a.device, source_device=a.source_device, repeats=a.repeats, warmup=a.warmup,
                 batch_bytes=a.batch_bytes, threads=a.threads, shards=a.shards,
                 stream_batch_bytes=a.stream_batch_bytes)
    return cfg, a.json


def main(argv: list[str] | None = None) -> None:
    cfg, json_path = parse_args(argv)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    # The shards live in a temporary directory, removed at the end however the run ends.
    with tempfile.TemporaryDirectory(prefix="reload_moe-") as folder:
        run(cfg, json_path, folder)


def run(cfg: Config, json_path: str | None, folder: str) -> None:
    started = time.perf_counter()
    model = build_model(cfg)
    source = make_source(model, cfg)
    pointers = {n: p.data_ptr() for n, p in model.named_parameters(remove_duplicate=False)}
    targets = unique_targets(model, source)
    tensors = len(targets)
    nbytes = sum(p.numel() * p.element_size() for _, p, _ in targets)
    built_s = time.perf_counter() - started
    # The model's 100k+ Python objects live as long as the process, as in a server;
    # frozen, they are not rescanned by every garbage collection during the timing.
    gc.freeze()

    machine = machine_info(cfg)
    print(f"reload_moe: {cfg.layers} layers x {cfg.experts} experts, hidden {cfg.hidden}, "
          f"moe_intermediate {cfg.moe_intermediate}, vocab {cfg.vocab}"
          f"{', tied embeddings' if cfg.tie_embeddings else ''}; "
          f"model {cfg.dtype} on {cfg.device} <- source {cfg.source_dtype or cfg.dtype} on {cfg.src_device}; "
          f"{tensors:,} tensors, {nbytes / 2**20:.1f} MiB")
    print(f"{machine_line(machine, repeats=cfg.repeats, warmup=cfg.warmup)}; built in {built_s:.1f} s")

    shard_files: list[str] | None = None
    if save_file is not None:
        written = time.perf_counter()
        shard_files = write_shards(source, folder, cfg.shards)
        file_bytes = sum(os.path.getsize(f) for f in shard_files)
        print(f"wrote the source as {len(shard_files)} safetensors shards + {INDEX_NAME} "
              f"({file_bytes / 2**20:.1f} MiB) in {time.perf_counter() - written:.1f} s")
    else:
        print(f"safetensors is not installed: the {SAFETENSORS} and {LOAD_FILE} rows are skipped")
    files_folder = folder if shard_files is not None else None

    # Host time after a synchronize, not CUDA events: GPU results stay comparable with earlier runs.
    time_call = timer(cfg, cuda_events=False)
    # The first call on a model walks its layout and makes the copy plan; later calls reuse both.
    gc.collect()
    first_s = time_call(lambda: fastreload.reload_layerwise(model, source, batch_bytes=cfg.batch_bytes))
    methods = make_methods(model, source, cfg, files_folder, shard_files)
    read = rss_reader()
    # File-backed resident memory before any file is read, to tell the shards' mapped
    # pages apart later.
    shared_before_files = read()[1] if read is not None else 0
    samples, _ = run_interleaved(methods, time_call, warmup=cfg.warmup, repeats=cfg.repeats)
    samples = {FIRST: [first_s], **samples}

    # Outside the timing: one more call of each method with resident memory sampled.
    peaks = measure_peaks(methods, read) if read is not None else {}

    verify(model, source, pointers, cfg)
    checked = ["the mapping"]
    if files_folder is not None:
        verify(model, source, pointers, cfg, what=SAFETENSORS,
               reload=lambda: fastreload.reload_layerwise(model, files_folder, batch_bytes=cfg.batch_bytes))
        checked.append("the safetensors shards")
    shuffled = list(source.items())
    random.Random(0).shuffle(shuffled)
    verify(model, source, pointers, cfg, what=STREAM,
           reload=lambda: fastreload.reload_layerwise(model, iter(shuffled),
                                                      batch_bytes=cfg.stream_batch_bytes))
    checked.append("the shuffled stream")
    last = fastreload.reload_layerwise(model, source, batch_bytes=cfg.batch_bytes)

    results = summarize(samples, tensors, nbytes, peaks)
    print()
    print_table(results)
    print()
    fr = results["fastreload"]
    print(f"fastreload overhead per tensor: {fr['overhead_per_tensor_us']:.2f} us "
          f"((fastreload - limit) / {tensors:,} tensors); "
          f"batched_copy_ calls per reload: {last.batched_copy_calls}; "
          f"load_state_dict {results[BASELINE]['overhead_per_tensor_us']:.2f} us, "
          f"copy_ loop {results['copy_ loop']['overhead_per_tensor_us']:.2f} us")

    largest = largest_layer_bytes(model, cfg)
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
        sources["safetensors"] = {"shards": len(shard_files), "bytes_read": report.bytes_read,
                                  "batched_copy_calls": report.batched_copy_calls,
                                  "file_backed_resident_kept_bytes": kept}
        print(f"{SAFETENSORS}: {len(shard_files)} shards, report.bytes_read "
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
    if SAFETENSORS in results:
        st = results[SAFETENSORS]
        budget = cfg.batch_bytes + largest
        pct_ok = st["pct_of_limit"] >= 80
        line = (f"issue-4 target ({SAFETENSORS}): {st['pct_of_limit']:.1f}% of limit "
                f"(target >= 80%: {'met' if pct_ok else 'NOT met'})")
        if st["peak_extra_mib"] is not None:
            mem_ok = st["peak_extra_mib"] * 2**20 <= budget
            line += (f"; peak extra {st['peak_extra_mib']:.1f} MiB (target <= batch_bytes "
                     f"{cfg.batch_bytes / 2**20:.0f} MiB + largest layer {largest / 2**20:.1f} MiB: "
                     f"{'met' if mem_ok else 'NOT met'})")
            if LOAD_FILE in results:
                line += f"; {LOAD_FILE} {results[LOAD_FILE]['peak_extra_mib']:.1f} MiB"
        print(line)
    print(f"verified: every tensor equals the source and kept its data pointer "
          f"(reloaded from {', '.join(checked)})")
    print(f"total {time.perf_counter() - started:.1f} s")

    if json_path:
        with open(json_path, "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "machine": machine, "tensors": tensors,
                       "bytes": nbytes, "fused_copies_per_reload": last.batched_copy_calls,
                       "limit": "one contiguous copy of the same elements, source dtype to model dtype",
                       "peak_extra": "resident memory growth (VmRSS; anon: less file-backed and shared "
                                     "pages) during one more call after the timed rounds, sampled every 1 ms",
                       "sources": sources, "results": results}, f, indent=2)
        print(f"wrote {json_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
