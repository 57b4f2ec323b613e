"""Reload fresh weights into a synthetic MoE decoder: fastreload against the usual ways.

    python benchmarks/reload_moe.py                      # the default config (`make bench`)
    python benchmarks/reload_moe.py --source-dtype fp32  # include a dtype conversion
    python benchmarks/reload_moe.py --json results.json

Every method writes the same source into the same live model, interleaved round-robin
in one process after a warm-up; the table reports medians. The limit row is one
contiguous copy of the same number of elements: what the memory system allows.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import fastreload

from common import DTYPES as ALL_DTYPES
from common import SourceFollowsDestination, fill_distinct, machine_info, machine_line, run_interleaved, timer

# --dtype and --source-dtype keep offering only the dtypes this model was built and
# checked with; fp64 and fp8 in the shared table are for batched_copy.
DTYPES = {name: ALL_DTYPES[name] for name in ("bf16", "fp16", "fp32")}
BASELINE = "load_state_dict"
LIMIT = "limit"
FIRST = "fastreload (first)"


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


# ---------------------------------------------------------------------------
# The methods: each a callable that writes the whole source into the model once.

Targets = list[tuple[str, torch.Tensor, torch.Tensor]]


def unique_targets(model: nn.Module, source: dict[str, torch.Tensor]) -> Targets:
    """(name, model tensor, source tensor) once per model tensor (tied names once)."""
    return [(name, p, source[name]) for name, p in model.named_parameters()]


def _layer_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:3]) if name.startswith("model.layers.") else "rest"


def make_methods(model: nn.Module, source: dict[str, torch.Tensor],
                 cfg: Config) -> dict[str, Callable[[], object]]:
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

    def copy_loop():
        with torch.no_grad():
            for p, s in pairs:
                p.copy_(s)

    def foreach_copy():
        with torch.no_grad():
            for dsts, srcs in layers.values():
                torch._foreach_copy_(dsts, srcs)

    return {
        "fastreload": lambda: fastreload.reload_layerwise(model, source, batch_bytes=cfg.batch_bytes),
        BASELINE: lambda: model.load_state_dict(source),
        "copy_ loop": copy_loop,
        "foreach_copy_": foreach_copy,
        LIMIT: lambda: flat_dst.copy_(flat_src),
    }


# ---------------------------------------------------------------------------
# Correctness: the numbers mean nothing if the copies are wrong.

def verify(model: nn.Module, source: dict[str, torch.Tensor], pointers: dict[str, int], cfg: Config) -> None:
    """A last fastreload reload into a model first filled with NaN must leave every
    tensor equal to its source (converted) and at its original address."""
    targets = unique_targets(model, source)
    with torch.no_grad():
        for _, p, _ in targets:
            p.fill_(float("nan"))
    report = fastreload.reload_layerwise(model, source, batch_bytes=cfg.batch_bytes)
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
        raise SystemExit(f"CORRECTNESS FAILURE ({len(problems)} problems):\n  {shown}")


# ---------------------------------------------------------------------------
# Reporting.

def summarize(samples: dict[str, list[float]], tensors: int, nbytes: int) -> dict[str, dict[str, object]]:
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
        }
    return results


def print_table(results: dict[str, dict[str, object]]) -> None:
    header = ("method", "tensors", "MiB", "ms (median)", "GB/s", "% of limit", f"x {BASELINE}")
    rows = [(name, f"{r['tensors']:,}", f"{r['bytes'] / 2**20:.1f}", f"{r['median_s'] * 1e3:.1f}",
             f"{r['gbps']:.2f}", f"{r['pct_of_limit']:.1f}", f"{r['speedup_vs_load_state_dict']:.2f}")
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
    p.add_argument("--json", metavar="PATH", help="also write every sample and the config here")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.warmup < 0:
        p.error("--repeats must be at least 1 and --warmup at least 0")
    cfg = Config(layers=a.layers, experts=a.experts, hidden=a.hidden, moe_intermediate=a.moe_intermediate,
                 vocab=a.vocab, dtype=a.dtype, source_dtype=a.source_dtype, tie_embeddings=a.tie_embeddings,
                 device=a.device, source_device=a.source_device, repeats=a.repeats, warmup=a.warmup,
                 batch_bytes=a.batch_bytes, threads=a.threads)
    return cfg, a.json


def main(argv: list[str] | None = None) -> None:
    cfg, json_path = parse_args(argv)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)

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

    # Host time after a synchronize, not CUDA events: GPU results stay comparable with earlier runs.
    time_call = timer(cfg, cuda_events=False)
    # The first call on a model walks its layout and makes the copy plan; later calls reuse both.
    gc.collect()
    first_s = time_call(lambda: fastreload.reload_layerwise(model, source, batch_bytes=cfg.batch_bytes))
    samples, _ = run_interleaved(make_methods(model, source, cfg), time_call,
                                 warmup=cfg.warmup, repeats=cfg.repeats)
    samples = {FIRST: [first_s], **samples}

    verify(model, source, pointers, cfg)
    last = fastreload.reload_layerwise(model, source, batch_bytes=cfg.batch_bytes)

    results = summarize(samples, tensors, nbytes)
    print()
    print_table(results)
    print()
    fr = results["fastreload"]
    print(f"fastreload overhead per tensor: {fr['overhead_per_tensor_us']:.2f} us "
          f"((fastreload - limit) / {tensors:,} tensors); "
          f"batched_copy_ calls per reload: {last.batched_copy_calls}; "
          f"load_state_dict {results[BASELINE]['overhead_per_tensor_us']:.2f} us, "
          f"copy_ loop {results['copy_ loop']['overhead_per_tensor_us']:.2f} us")
    print("verified: every tensor equals the source and kept its data pointer")
    print(f"total {time.perf_counter() - started:.1f} s")

    if json_path:
        with open(json_path, "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "machine": machine, "tensors": tensors,
                       "bytes": nbytes, "fused_copies_per_reload": last.batched_copy_calls,
                       "limit": "one contiguous copy of the same elements, source dtype to model dtype",
                       "results": results}, f, indent=2)
        print(f"wrote {json_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
