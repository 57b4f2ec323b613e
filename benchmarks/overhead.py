"""What a repeated reload costs per tensor when there is nothing to copy, and where it
goes: the tool for working on the overhead column of reload_moe.py.

    python benchmarks/overhead.py                        # qwen3-30b-a3b's 18,867 tensors, every size 1
    python benchmarks/overhead.py --preset deepseek-v3-fp8 --rounds 100

The model is a preset at scale 0 (every size 1: the same names, tensors and modules).
Each round times, in µs per tensor:

  warm         reload_layerwise(model, source) right after another one;
  elsewhere    the same after building other modules and registering buffers on
               them (another model, adapters, a trainer): equal to warm, since
               only a change to the model itself makes its layout again;
  cold         the same after a load_state_dict and a copy_ loop over the model,
               which push its tensors' metadata out of the caches, as the other
               methods of reload_moe.py do between its samples;
  cold fetch   after the same, the plan's lookup of every source tensor by name;
  cold bound   after the same, the plan's bound copy of a tuple fetched beforehand;
  cold new     the same as cold, from a new dict of new tensors each round (a trainer
               sending fresh buffers every step): nothing about the source is known.

Medians over the rounds. Compare builds by running this in alternating processes:
a 2-core VM varies by 20% from one process to the next.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from torch import nn

import fastreload
import presets
import reload_moe
from fastreload.model import layout_of
from fastreload.plan import plan_for


def measure(preset: str, layers: int | None, rounds: int) -> dict[str, float]:
    cfg = reload_moe.Config(preset=preset, layers=layers)
    model = reload_moe.build_model(cfg, presets.scaled(cfg.arch(), 0))
    source = reload_moe.make_source(model, cfg)
    pairs = [(t, source[k]) for k, t in model.state_dict().items() if k in source]
    gc.freeze()  # the model lives as long as the process, as in a server
    for _ in range(3):
        fastreload.reload_layerwise(model, source)
    plan = plan_for(layout_of(model), fastreload.DEFAULT_BATCH_BYTES)

    def evict() -> None:
        with torch.no_grad():
            model.load_state_dict(source, strict=False)
            for dst, src in pairs:
                dst.copy_(src)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    elsewhere = nn.Module()  # a module of another model, changed between reloads

    def build_elsewhere() -> None:
        other = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        other.register_buffer("scale", torch.ones(4))
        elsewhere.register_buffer("step", torch.zeros(1))
        elsewhere.adapter = other

    samples: dict[str, list[float]] = {"warm": [], "elsewhere": [], "cold": [], "cold fetch": [],
                                       "cold bound": [], "cold new": []}
    for _ in range(rounds):
        new = {name: tensor.clone() for name, tensor in source.items()}
        evict()
        samples["cold new"].append(timed(lambda: fastreload.reload_layerwise(model, new)))
        del new
        evict()
        samples["cold"].append(timed(lambda: fastreload.reload_layerwise(model, source)))
        samples["warm"].append(timed(lambda: fastreload.reload_layerwise(model, source)))
        build_elsewhere()
        samples["elsewhere"].append(timed(lambda: fastreload.reload_layerwise(model, source)))
        evict()
        samples["cold fetch"].append(timed(lambda: plan.fetch_leading(source)))
        fetched = plan.fetch_leading(source)
        evict()
        samples["cold bound"].append(timed(lambda: plan.bound(fetched, None)))
    gc.unfreeze()
    return {name: statistics.median(s) / len(plan.leading) * 1e6 for name, s in samples.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=reload_moe.PRESETS, default=reload_moe.DEFAULT_PRESET)
    p.add_argument("--layers", type=int, default=None, help="the first N layers; default: the preset's")
    p.add_argument("--rounds", type=int, default=40)
    a = p.parse_args(argv)
    result = measure(a.preset, a.layers, a.rounds)
    print(f"{a.preset} at scale 0, µs per tensor (median of {a.rounds}): "
          + ", ".join(f"{name} {value:.3f}" for name, value in result.items()))
    return result


if __name__ == "__main__":
    main()
