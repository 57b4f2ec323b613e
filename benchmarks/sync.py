"""Weight sync from a trainer process into live inference models, by fastreload.sync
and the usual ways, on one machine.

    python benchmarks/sync.py                                 # qwen3-30b-a3b at 1/16, 2 receivers, gloo
    python benchmarks/sync.py --scale 0.125 --receivers 3 --bucket-mib 64
    python benchmarks/sync.py --device cuda --backend nccl    # on a GPU machine
    python benchmarks/sync.py --json results.json

1 sender and --receivers receivers, each a process of its own, form one group
(fastreload.sync.connect on 127.0.0.1). Every receiver holds the preset's model
(presets.py); the sender holds the fresh weights, keyed like its state_dict. Each
round runs every method once, interleaved, all ranks starting together after a
barrier; a method's time is from that barrier to the one after every rank is done.

    fastreload sync        Sender.send / Receiver.receive (manifest agreed once,
                           then buckets packed by one fused copy and written by one)
    per-tensor broadcast   one broadcast per tensor into a fresh tensor, then a
                           copy_ into the model's tensor (OpenRLHF style)
    packed buckets         torch.cat of each bucket's bytes, one broadcast per bucket,
                           unpacked into views and copied with one copy_ per tensor
                           (vLLM's packed NCCL engine); same bucket size as fastreload
    limit                  one broadcast of one contiguous buffer of the same bytes,
                           received into a buffer allocated once: what the
                           transport allows, with nothing packed or unpacked

After the rounds, one more call of each method runs with resident memory sampled
every millisecond on every rank: the peak growth on the sender and the largest on
a receiver are the "extra MiB" columns. The receivers' models are checked against
the sender's weights after the last fastreload sync.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from fastreload.sync import Receiver, Sender, connect

import presets
from common import machine_info, machine_line, print_columns
from presets import PRESETS
from reload_moe import PeakRss, _release_free_memory, rss_reader

SYNC = "fastreload sync"
PER_TENSOR = "per-tensor broadcast + copy_"
PACKED = "packed buckets (torch.cat) + copy_"
LIMIT = "limit"
METHODS = (SYNC, PER_TENSOR, PACKED, LIMIT)


@dataclass(frozen=True)
class Config:
    preset: str = "qwen3-30b-a3b"
    scale: float = 1 / 16
    layers: int | None = None
    receivers: int = 2
    bucket_mib: int = 32
    dtype: str = "bf16"
    device: str = "cpu"
    backend: str = "gloo"
    repeats: int = 3
    warmup: int = 1
    timeout: float = 300.0

    @property
    def on_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]


def _model(cfg: Config):
    preset = PRESETS[cfg.preset]
    arch = presets.scaled(preset.arch, cfg.scale, cfg.layers if cfg.layers is not None else preset.layers)
    with torch.device(cfg.device):
        return presets.build(preset, arch, cfg.torch_dtype)


def _weights(model, seed: int) -> dict[str, torch.Tensor]:
    """Fresh values keyed like the model's state_dict, tied names sharing one tensor."""
    g = torch.Generator().manual_seed(seed)
    out, by_tensor = {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in by_tensor:
            by_tensor[id(t)] = torch.randn(t.shape, generator=g).to(t.dtype).to(t.device)
        out[name] = by_tensor[id(t)]
    return out


class _Group:
    """The benchmark's collectives besides the methods themselves: barriers."""

    def __init__(self, group, device):
        self.group = group
        self.device = device

    def barrier(self) -> None:
        flag = torch.zeros(1, device=self.device)
        self.group.allreduce([flag]).wait()

    def broadcast(self, tensor: torch.Tensor) -> None:
        options = torch.distributed.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([tensor], options).wait()


def _methods(cfg: Config, rank: int, group, model, weights):
    """name -> a call doing this rank's part of one sync."""
    bucket_bytes = cfg.bucket_mib * 2**20
    net = _Group(group, torch.device(cfg.device))
    sender = Sender(group, bucket_bytes=bucket_bytes) if rank == 0 else None
    receiver = Receiver(model, group, src=0) if rank != 0 else None
    # The unique tensors, in state_dict order (tied names once), on both sides.
    names, seen = [], set()
    source = weights if rank == 0 else model.state_dict(keep_vars=True)
    for name, t in source.items():
        if id(t) not in seen:
            seen.add(id(t))
            names.append(name)
    live = model.state_dict(keep_vars=True) if model is not None else None
    total = sum(source[n].numel() * source[n].element_size() for n in names)
    limit_buffer = torch.empty(total, dtype=torch.uint8, device=cfg.device)
    version = [0]

    phases = []  # per fastreload sync: where this rank's time went

    def sync():
        version[0] += 1
        if rank == 0:
            r = sender.send(weights, version=version[0])
            phases.append({"seconds": r.seconds, "transport": r.transport_seconds, "pack": r.pack_seconds})
        else:
            r = receiver.receive(timeout=cfg.timeout)
            phases.append({"seconds": r.seconds, "transport": r.transport_seconds})

    def per_tensor():
        with torch.no_grad():
            for n in names:
                if rank == 0:
                    net.broadcast(weights[n])
                else:
                    t = torch.empty_like(live[n])
                    net.broadcast(t)
                    live[n].copy_(t)

    # vLLM's packed path: buckets of whole tensors up to bucket_bytes, torch.cat'd as bytes.
    buckets, current, held = [], [], 0
    for n in names:
        nbytes = source[n].numel() * source[n].element_size()
        if current and held + nbytes > bucket_bytes:
            buckets.append(current)
            current, held = [], 0
        current.append(n)
        held += nbytes
    if current:
        buckets.append(current)

    def packed():
        with torch.no_grad():
            for bucket in buckets:
                if rank == 0:
                    net.broadcast(torch.cat([weights[n].contiguous().view(-1).view(torch.uint8) for n in bucket]))
                else:
                    sizes = [live[n].numel() * live[n].element_size() for n in bucket]
                    flat = torch.empty(sum(sizes), dtype=torch.uint8, device=cfg.device)
                    net.broadcast(flat)
                    at = 0
                    for n, size in zip(bucket, sizes):
                        live[n].copy_(flat[at:at + size].view(live[n].dtype).view(live[n].shape))
                        at += size

    def limit():
        net.broadcast(limit_buffer)

    return {SYNC: sync, PER_TENSOR: per_tensor, PACKED: packed, LIMIT: limit}, net, total, sender or receiver, phases


def _rank(cfg: Config, rank: int, port: int, results) -> None:
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (cfg.receivers + 1)) if cfg.device == "cpu"
                              else torch.get_num_threads())
        if cfg.device == "cuda":
            torch.cuda.set_device(0)
        model = _model(cfg) if rank != 0 else None
        weights = _weights(_model(cfg), seed=7) if rank == 0 else None
        group = connect("127.0.0.1", port, rank=rank, world_size=cfg.receivers + 1, backend=cfg.backend,
                        timeout=cfg.timeout)
        methods, net, total, side, phases = _methods(cfg, rank, group, model, weights)
        samples = {name: [] for name in methods}
        names = list(methods)
        timed_phases = []
        for round_ in range(cfg.warmup + cfg.repeats):
            for k in range(len(names)):
                name = names[(round_ + k) % len(names)]
                net.barrier()
                start = time.perf_counter()
                methods[name]()
                if cfg.device == "cuda":
                    torch.cuda.synchronize()
                net.barrier()
                if round_ >= cfg.warmup:
                    samples[name].append(time.perf_counter() - start)
                    if name == SYNC:
                        timed_phases.append(phases[-1])
        read = rss_reader()
        peaks = {}
        for name in names:
            _release_free_memory()
            net.barrier()
            with PeakRss(read) as peak:
                methods[name]()
            net.barrier()
            peaks[name] = peak.extra_anon
        # A last fastreload sync, whose result every receiver checks.
        methods[SYNC]()
        wrong = []
        if rank != 0:
            expected = _weights(_model(cfg), seed=7)
            live = model.state_dict()
            wrong = [n for n, t in expected.items() if not torch.equal(live[n], t)]
        held = side.held_bytes  # the buffers the sender or receiver keeps between updates
        results.put((rank, {"samples": samples, "peaks": peaks, "total": total, "wrong": wrong, "held": held,
                            "phases": {k: statistics.median(p[k] for p in timed_phases) for k in timed_phases[0]},
                            "tensors": len(model.state_dict()) if model is not None else len(weights)}))
    except BaseException:  # noqa: BLE001 - reported by the parent
        results.put((rank, {"error": traceback.format_exc()}))


def run(cfg: Config) -> dict:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(cfg, r, port, results)) for r in range(cfg.receivers + 1)]
    for p in procs:
        p.start()
    out = {}
    deadline = time.monotonic() + cfg.timeout * 4
    while len(out) < len(procs):
        try:
            rank, result = results.get(timeout=max(1.0, deadline - time.monotonic()))
        except Exception:
            break
        out[rank] = result
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    failed = {r: v["error"] for r, v in out.items() if "error" in v}
    if failed or len(out) < len(procs):
        raise SystemExit("sync benchmark failed:\n" + "\n".join(f"rank {r}:\n{e}" for r, e in failed.items())
                         + ("" if len(out) == len(procs) else f"\nranks that never answered: "
                            f"{sorted(set(range(len(procs))) - set(out))}"))
    return out


def summarize(cfg: Config, out: dict) -> dict:
    sender = out[0]
    total = sender["total"]
    # A method's time is the slowest rank's median (they start and end at barriers).
    medians = {name: max(statistics.median(out[r]["samples"][name]) for r in out) for name in METHODS}
    limit = medians[LIMIT]
    rows = {}
    for name in METHODS:
        seconds = medians[name]
        rows[name] = {
            "ms": seconds * 1e3, "gbps": total / seconds / 1e9, "of_limit": limit / seconds,
            "sender_extra_mib": sender["peaks"][name] / 2**20,
            "receiver_extra_mib": max(out[r]["peaks"][name] for r in out if r != 0) / 2**20,
        }
    wrong = {r: v["wrong"] for r, v in out.items() if v["wrong"]}
    held = {"sender_mib": sender["held"] / 2**20,
            "receiver_mib": max(out[r]["held"] for r in out if r != 0) / 2**20}
    # Where fastreload's time went, per side (medians): waiting on the transport, packing
    # (sender), and the rest: writing buckets into the model (receiver), checks, Python.
    phases = {"sender": out[0]["phases"],
              "receiver": max((out[r]["phases"] for r in out if r != 0), key=lambda p: p["seconds"])}
    return {"rows": rows, "bytes": total, "tensors": out[1]["tensors"], "wrong": wrong, "held": held,
            "phases": phases}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Config):
        kind = type(f.default) if f.default is not None else int
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    started = time.perf_counter()
    out = run(cfg)
    result = summarize(cfg, out)
    machine = machine_info(cfg)  # type: ignore[arg-type]
    print(f"sync: {cfg.preset} at scale {cfg.scale:g}, {result['tensors']} tensors, "
          f"{result['bytes'] / 2**20:.1f} MiB {cfg.dtype}; 1 sender, {cfg.receivers} receivers over "
          f"{cfg.backend} on 127.0.0.1; buckets of {cfg.bucket_mib} MiB")
    print(machine_line(machine, repeats=cfg.repeats, warmup=cfg.warmup))
    rows = []
    for name, row in result["rows"].items():
        rows.append((name, f"{row['ms']:.1f}", f"{row['gbps']:.2f}", f"{row['of_limit'] * 100:.1f}%",
                     f"{row['sender_extra_mib']:.1f}", f"{row['receiver_extra_mib']:.1f}"))
    print_columns(("method", "ms", "GB/s", "of limit", "sender extra MiB", "receiver extra MiB"), rows)
    ours = result["rows"][SYNC]
    print(f"fastreload sync: {ours['of_limit'] * 100:.1f}% of the limit, "
          f"{result['rows'][PER_TENSOR]['ms'] / ours['ms']:.1f}x the per-tensor broadcast, "
          f"{result['rows'][PACKED]['ms'] / ours['ms']:.2f}x the packed buckets; extra memory "
          f"{ours['sender_extra_mib']:.0f} MiB on the sender, {ours['receiver_extra_mib']:.0f} MiB on a "
          f"receiver during an update, beside the buffers it keeps between updates: "
          f"{result['held']['sender_mib']:.0f} MiB and {result['held']['receiver_mib']:.0f} MiB "
          f"(two buckets: {2 * cfg.bucket_mib} MiB)")
    sender_p, receiver_p = result["phases"]["sender"], result["phases"]["receiver"]
    print(f"where fastreload's time went (ms, medians): sender {sender_p['seconds'] * 1e3:.1f} = transport "
          f"{sender_p['transport'] * 1e3:.1f} + packing {sender_p['pack'] * 1e3:.1f} + other "
          f"{(sender_p['seconds'] - sender_p['transport'] - sender_p['pack']) * 1e3:.1f}; slowest receiver "
          f"{receiver_p['seconds'] * 1e3:.1f} = transport {receiver_p['transport'] * 1e3:.1f} + writing and other "
          f"{(receiver_p['seconds'] - receiver_p['transport']) * 1e3:.1f}; limit {result['rows'][LIMIT]['ms']:.1f}")
    if result["wrong"]:
        raise SystemExit(f"receivers hold wrong values after the sync: {result['wrong']}")
    print(f"checked: every receiver holds the sender's weights ({time.perf_counter() - started:.0f} s in all)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "machine": machine,
                       "date": datetime.date.today().isoformat(), **result}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
