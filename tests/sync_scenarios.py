"""What each rank of a sync test runs, in its own process, and the harness that
runs them: real processes, one group of their own over gloo on 127.0.0.1.

A scenario is a function (rank, world, port, **options) -> a picklable summary;
a ReloadError it lets out comes back as a summary too (with the model checked
unchanged where the scenario says so), any other exception as a failure.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import time
import traceback

import torch
from torch import nn

import fastreload
from fastreload import ReloadError, Target
from fastreload.sync import Receiver, Sender, connect

# -- models


class Expert(nn.Module):
    def __init__(self, hidden, inner):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)


class Block(nn.Module):
    def __init__(self, hidden, experts, inner):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden // 2)
        self.v_proj = nn.Linear(hidden, hidden // 2)
        self.o_proj = nn.Linear(hidden, hidden)
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, inner) for _ in range(experts))


class Moe(nn.Module):
    """MoE-shaped: many small expert tensors, attention, norms, tied embeddings."""

    def __init__(self, layers=3, hidden=16, experts=8, inner=8, vocab=32, tie=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, experts, inner) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block.o_proj(block.q_proj(block.norm(x))) + sum(
                e.down_proj(torch.relu(e.gate_proj(x)) * e.up_proj(x)) for e in block.experts)
        return self.head(x)


class Mixer(nn.Module):
    """MambaMixer2's pattern: a non-persistent buffer that views its child's weight."""

    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(8, 8, 4, groups=8)
        self.register_buffer("conv_weights", self.conv1d.weight.view(8, 4), persistent=False)
        self.A_log = nn.Parameter(torch.zeros(8))


class Hybrid(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = Moe(layers=2)
        self.mixer = Mixer()


class Big(nn.Module):
    """Tensors larger than a small bucket, and hundreds of tiny ones."""

    def __init__(self):
        super().__init__()
        self.big = nn.Parameter(torch.zeros(300, 70))  # 84,000 bytes
        self.wide = nn.Parameter(torch.zeros(7, 5000))
        self.tiny = nn.ParameterList(nn.Parameter(torch.zeros(3)) for _ in range(300))
        self.register_buffer("steps", torch.zeros(2, dtype=torch.int64))


class QLinear(nn.Linear):
    """Quantizes its weight per channel after loading (what record() replays)."""

    def process_weights_after_loading(self):
        w = self.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-6)
        self.weight = nn.Parameter((w / scale[:, None]).to(torch.bfloat16), requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)


class Processed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList(QLinear(8, 8) for _ in range(3))


class BigFloatSteps(Big):
    """Big with a float buffer where the trainer's is int64: no conversion between them."""

    def __init__(self):
        super().__init__()
        self.steps = torch.zeros(2)


MODELS = {"moe": Moe, "hybrid": Hybrid, "big": Big, "processed": Processed,
          "moe_deeper": lambda: Moe(layers=4), "moe_shallow": lambda: Moe(layers=2),
          "moe_wider": lambda: Moe(hidden=24), "big_float_steps": BigFloatSteps}


def process(model):
    for m in model.modules():
        if hasattr(m, "process_weights_after_loading"):
            m.process_weights_after_loading()


def new_model(kind, dtype=None):
    torch.manual_seed(12345)  # every receiver starts from the same (other) values
    model = MODELS[kind]()
    if kind == "processed":
        fastreload.record(model)
        process(model)
    if dtype is not None:
        model.to(dtype)
    return model


def state(kind, version, dtype=torch.float32):
    """The sender's weights of a version: deterministic, so receivers can check them."""
    g = torch.Generator().manual_seed(1000 + version)
    model = MODELS[kind]()
    out = {}
    seen = {}
    for name, value in model.state_dict().items():
        key = (value.data_ptr(), tuple(value.shape))
        if key not in seen:
            if value.is_floating_point():
                seen[key] = torch.randn(value.shape, generator=g).to(dtype)
            else:
                seen[key] = torch.randint(0, 100, value.shape, generator=g)
        out[name] = seen[key]
    return out


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def identity(model):
    """Every parameter's and buffer's object and address."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {k: (id(v), v.data_ptr()) for k, v in tensors}


def expected_state(kind, version, model, wire_dtype=None):
    """What the model must hold after receiving `version`."""
    sent = state(kind, version)
    if kind == "processed":
        reference = MODELS[kind]()
        reference.load_state_dict({k: (v.to(wire_dtype) if wire_dtype else v).float() for k, v in sent.items()})
        process(reference)
        return reference.state_dict()
    live = model.state_dict()
    return {k: (v.to(wire_dtype) if wire_dtype and v.is_floating_point() else v).to(live[k].dtype)
            for k, v in sent.items()}


# -- the ranks


def _group(rank, world, port, timeout):
    return connect("127.0.0.1", port, rank=rank, world_size=world, timeout=timeout)


def in_one_world(rank, world, port, *, role, **options):
    """A scenario on a group of a torchrun-like world (init_process_group, then
    new_group), instead of connect()'s group of its own."""
    import datetime

    import torch.distributed as dist
    global _group
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    made = _group
    _group = lambda *_args: dist.new_group(list(range(world)))  # noqa: E731
    try:
        return role(rank, world, port, **options)
    finally:
        _group = made
        dist.destroy_process_group()


def send(rank, world, port, *, kind="moe", versions=(1,), bucket_bytes=4096, wire_dtype=None, order="model",
         manifest=False, timeout=30.0, weights_of=None, die_at=None, lie_in=()):
    """Sends each version; with lie_in, those versions' iterables contradict their
    manifest partway (the error is recorded and the next version sent)."""
    group = _group(rank, world, port, timeout)
    sender = Sender(group, bucket_bytes=bucket_bytes, wire_dtype=wire_dtype)
    reports = []
    for version in versions:
        weights = state(kind, version) if weights_of is None else WEIGHTS[weights_of](version)
        items = list(weights.items())
        if order == "reverse":
            items.reverse()
        if manifest or die_at is not None:
            described = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in items}
            if version in lie_in:
                at = len(items) - 2
                items[at] = (items[at][0], items[at][1][:1])
            stream = _dying(items, die_at) if die_at is not None else iter(items)
            try:
                report = sender.send(stream, version=version, manifest=described)
            except ReloadError as error:
                if version not in lie_in:
                    raise
                reports.append({"version": version, "error": str(error)})
                continue
        else:
            report = sender.send(dict(items) if order != "stream" else iter(items), version=version)
        reports.append({"version": report.version, "bytes": report.bytes, "buckets": report.buckets,
                        "manifest_sent": report.manifest_sent})
    return reports


def _dying(items, at):
    for i, item in enumerate(items):
        if i == at:
            time.sleep(0.5)  # the buckets packed so far leave
            os._exit(3)
        yield item


def receive(rank, world, port, *, kind="moe", versions=(1,), wire_dtype=None, rename=None, strict=True,
            dtype=None, timeout=30.0, wait=-1, die_in_bucket=None, check=True, go_on=False, sent_kind=None):
    """Receives each version and checks the model; a ReloadError ends it with a
    summary (or, with go_on, is recorded and the next version received). timeout:
    the group's; wait: for each update to start (by default the same); sent_kind: the
    sender's model, when it is not this one (its tensors are checked)."""
    group = _group(rank, world, port, timeout)
    model = new_model(kind, dtype)
    before, ids = snapshot(model), identity(model)
    if die_in_bucket is not None:
        _die_in_bucket(die_in_bucket)
    receiver = Receiver(model, group, src=0, rename=RENAMES[rename](rank, world) if rename else None,
                        strict=strict)
    done, refused = [], []
    for version in versions:
        try:
            report = receiver.receive(timeout=timeout if wait == -1 else wait)
        except ReloadError as error:
            summary = {"error": str(error), "rank": error.rank, "version": error.version,
                       "written": list(error.written_layers), "unchanged": same(snapshot(model), before),
                       "committed": receiver.version, "done": done}
            if not go_on:
                return summary
            refused.append(summary)
            continue
        assert receiver.version == version == report.version
        assert identity(model) == ids, "a tensor object or pointer changed"
        if check:
            expected = (SHARDED[rename](version, rank, world) if rename in SHARDED
                        else expected_state(sent_kind or kind, version, model, wire_dtype))
            live = model.state_dict()
            wrong = [k for k in expected if not torch.equal(live[k], expected[k])]
            assert not wrong, f"version {version}: wrong values in {wrong[:5]}"
        done.append({"version": report.version, "tensors": report.tensors, "bytes": report.bytes,
                     "calls": report.batched_copy_calls, "skipped": {k: len(v) for k, v in report.skipped.items()},
                     "replayed": len(report.replayed), "wire_bytes": report.wire_bytes})
    if kind == "hybrid":
        mixer = model.mixer
        assert torch.equal(mixer.conv_weights, mixer.conv1d.weight.view(8, 4))
        assert mixer.conv_weights.data_ptr() == mixer.conv1d.weight.data_ptr()
    return {"done": done, "refused": refused}


def _die_in_bucket(index):
    from fastreload.sync import receiver as module
    original = module.Receiver._write_bucket
    count = [0]

    def write_then_die(work, session):
        if count[0] == index:
            os._exit(4)
        count[0] += 1
        return original(work, session)

    module.Receiver._write_bucket = staticmethod(write_then_die)


# -- renames and the weights they go with


def _fused_weights(version):
    """A trainer whose attention holds q, k, v apart, for receivers with a fused qkv."""
    g = torch.Generator().manual_seed(2000 + version)
    return {"attn.q.weight": torch.randn(8, 6, generator=g), "attn.k.weight": torch.randn(4, 6, generator=g),
            "attn.v.weight": torch.randn(4, 6, generator=g), "out.weight": torch.randn(6, 6, generator=g),
            # larger than a bucket: rows cut at the buckets' edges, columns gathered first
            "rows.weight": torch.randn(64, 600, generator=g), "cols.weight": torch.randn(64, 600, generator=g)}


def _tp_rename(rank, world):
    """Receiver ranks 1..world-1 each take their shard of the rows."""
    index, count = rank - 1, world - 1
    offsets = {"attn.q.weight": 0, "attn.k.weight": 8 // count, "attn.v.weight": 12 // count}

    def rename(name):
        if name in offsets:
            return Target("qkv.weight", dim=0, start=offsets[name], shard=(index, count))
        if name == "rows.weight":
            return Target(name, shard=(index, count))
        return Target(name.replace("out.", "o."), shard=(index, count), shard_dim=1)
    return rename


def _tp_expected(version, rank, world):
    index, count = rank - 1, world - 1
    w = _fused_weights(version)
    shard = [t.chunk(count, dim=0)[index] for t in (w["attn.q.weight"], w["attn.k.weight"], w["attn.v.weight"])]
    return {"qkv.weight": torch.cat(shard), "o.weight": w["out.weight"].chunk(count, dim=1)[index],
            "rows.weight": w["rows.weight"].chunk(count, dim=0)[index],
            "cols.weight": w["cols.weight"].chunk(count, dim=1)[index]}


class Sharded(nn.Module):
    """One tensor-parallel rank of 2: a fused qkv of its rows, o of its columns."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(6, 8, bias=False)
        self.o = nn.Linear(3, 6, bias=False)
        self.rows = nn.Linear(600, 32, bias=False)
        self.cols = nn.Linear(300, 64, bias=False)


MODELS["sharded"] = Sharded
WEIGHTS = {"fused": _fused_weights}
RENAMES = {"tp": _tp_rename}
SHARDED = {"tp": _tp_expected}


# -- the harness


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tasks, results, index):
    """A pool worker: says it is ready, then runs scenarios until told to stop (None)."""
    results.put((None, index, "ready"))
    while True:
        task = tasks.get()
        if task is None:
            return
        ticket, fn, rank, world, port, options = task
        try:
            result = ("ok", fn(rank, world, port, **options))
        except BaseException:  # noqa: BLE001 - everything goes back to the test
            result = ("raised", traceback.format_exc())
        results.put((ticket, rank, result))


class Pool:
    """Worker processes kept between scenarios (each pays for importing torch once);
    one that died or hung is replaced by a fresh one."""

    def __init__(self, size: int) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self.results = self.ctx.Queue()
        self.workers: list = [None] * size
        self.tickets = 0
        for i in range(size):
            self._start(i)
        self._ready(range(size))

    def _start(self, i: int) -> None:
        tasks = self.ctx.Queue()
        proc = self.ctx.Process(target=_serve, args=(tasks, self.results, i), daemon=True)
        proc.start()
        self.workers[i] = (proc, tasks)

    def _ready(self, indices, timeout: float = 120.0) -> None:
        """Waits until the workers started have imported everything: a scenario's
        ranks must meet within its group's timeout."""
        waiting = set(indices)
        deadline = time.monotonic() + timeout
        while waiting:
            ticket, index, what = self.results.get(timeout=max(deadline - time.monotonic(), 0.01))
            if ticket is None and what == "ready":
                waiting.discard(index)

    def _replace(self, i: int) -> None:
        proc, _ = self.workers[i]
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)
        self._start(i)

    def run(self, ranks: list, timeout: float = 60.0) -> list:
        """ranks: (function, options) per rank, rank 0 first, each run by its own
        worker on a new group. Returns each rank's ("ok", summary), ("raised",
        traceback) or ("died", exit code); fails after `timeout` seconds."""
        assert len(ranks) <= len(self.workers)
        self.tickets += 1
        ticket, port, world = self.tickets, free_port(), len(ranks)
        for r, (fn, options) in enumerate(ranks):
            self.workers[r][1].put((ticket, fn, r, world, port, options))
        out: dict[int, tuple] = {}
        dead_since: dict[int, float] = {}  # a result may still be on its way from a process that exited
        deadline = time.monotonic() + timeout
        try:
            while len(out) < world:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"ranks {sorted(set(range(world)) - set(out))} still running after "
                                         f"{timeout} s: {out}")
                try:
                    got, rank, result = self.results.get(timeout=min(left, 0.2))
                    if got == ticket:
                        out[rank] = result
                except queue.Empty:
                    now = time.monotonic()
                    for r in range(world):
                        proc = self.workers[r][0]
                        if r not in out and proc.exitcode is not None:
                            if now - dead_since.setdefault(r, now) > 1.0:
                                out[r] = ("died", proc.exitcode)
        finally:
            replaced = [r for r in range(world) if r not in out or out[r][0] == "died"]
            for r in replaced:
                self._replace(r)
            self._ready(replaced)
        return [out[r] for r in range(world)]

    def close(self) -> None:
        for proc, tasks in self.workers:
            if proc.is_alive():
                tasks.put(None)
        for proc, _ in self.workers:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()


def ok(results: list) -> list:
    """The summaries, failing on any rank that raised or died."""
    bad = {r: res for r, res in enumerate(results) if res[0] != "ok"}
    assert not bad, "\n".join(f"rank {r}: {res[0]}\n{res[1]}" for r, res in bad.items())
    return [res[1] for res in results]


# -- transformers models from Hub-format weights


def _tiny_qwen3_moe(seed):
    import transformers
    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0,
                                         num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


def send_hub(rank, world, port, *, folder, versions=(1,), timeout=30.0):
    """Sends what save_pretrained writes (one tensor per expert), as a trainer would
    from a Hub checkpoint."""
    from safetensors.torch import load_file
    group = _group(rank, world, port, timeout)
    sender = Sender(group, bucket_bytes=8192)
    for version in versions:
        path = os.path.join(folder, f"v{version}")
        _tiny_qwen3_moe(seed=version).save_pretrained(path)
        weights = {}
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):
                weights.update(load_file(os.path.join(path, name)))
        sender.send(weights, version=version)
    return {}


def receive_hub(rank, world, port, *, folder, versions=(1,), timeout=30.0):
    """A live transformers model (stacked experts) takes Hub-format updates, detected
    without being told; each checked against from_pretrained of the same files."""
    group = _group(rank, world, port, timeout)
    model = _tiny_qwen3_moe(seed=100 + rank)
    ids = identity(model)
    receiver = Receiver(model, group, src=0)
    renamed = []
    for version in versions:
        report = receiver.receive(timeout=timeout)
        renamed.append(report.renamed)
        expected = type(model).from_pretrained(os.path.join(folder, f"v{version}")).state_dict()
        assert identity(model) == ids
        assert same(model.state_dict(), expected), f"version {version} differs from from_pretrained"
    return {"renamed": renamed}
