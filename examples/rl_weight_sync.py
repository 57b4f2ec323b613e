"""An RL-style loop: a trainer process trains a small causal LM and, between steps,
pushes its weights into two inference processes with fastreload.sync.

    python examples/rl_weight_sync.py

The three processes form one group of their own (fastreload.sync.connect, gloo on
127.0.0.1; in a real job the trainer's and the workers' own torch.distributed
worlds stay untouched). The workers build the model once, prepare their inference
state (here: the logits of a fixed prompt, kept on the same tensors), then receive
each update in place. After every sync each worker compares its logits with the
trainer's, which the trainer publishes on the group's store: they must be equal.
"""

from __future__ import annotations

import multiprocessing
import socket
import sys
import traceback

import torch
from torch import nn

import fastreload

STEPS = 4
WORKERS = 2
PROMPT = torch.arange(12).reshape(2, 6)


class TinyLM(nn.Module):
    """Embedding, two pre-norm blocks (attention and MLP), tied output head."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


def trainer(port: int) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    group = fastreload.sync.connect("127.0.0.1", port, rank=0, world_size=1 + WORKERS, timeout=60)
    sender = fastreload.sync.Sender(group, bucket_bytes=64 * 1024)
    data = torch.randint(0, 64, (8, 7), generator=torch.Generator().manual_seed(1))
    for step in range(1, STEPS + 1):
        logits = model(data[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            expected = model.eval()(PROMPT)
            model.train()
        group.fastreload_store.set(f"example/logits/{step}", expected.numpy().tobytes())
        report = sender.send(model.state_dict(), version=step)
        print(f"trainer: step {step}, loss {loss.item():.3f}; {report}", flush=True)
    # rank 0 hosts the group's store: it stays until every worker has read the last logits.
    group.fastreload_store.wait([f"example/checked/{rank}" for rank in range(1, 1 + WORKERS)])


def worker(rank: int, port: int) -> None:
    torch.manual_seed(100 + rank)  # other weights than the trainer's, until the first sync
    model = TinyLM().eval()
    group = fastreload.sync.connect("127.0.0.1", port, rank=rank, world_size=1 + WORKERS, timeout=60)
    receiver = fastreload.sync.Receiver(model, group, src=0)
    pointers = [p.data_ptr() for p in model.parameters()]
    for step in range(1, STEPS + 1):
        report = receiver.receive(timeout=60)
        with torch.no_grad():
            logits = model(PROMPT)
        sent = group.fastreload_store.get(f"example/logits/{step}")
        expected = torch.frombuffer(bytearray(sent), dtype=torch.float32).view(logits.shape)
        assert receiver.version == step and report.version == step
        assert [p.data_ptr() for p in model.parameters()] == pointers, "weights moved"
        assert torch.equal(logits, expected), f"worker {rank}: logits differ from the trainer's at step {step}"
        print(f"worker {rank}: version {receiver.version}, logits equal the trainer's; {report}", flush=True)
    group.fastreload_store.set(f"example/checked/{rank}", b"1")


def _run(target, args, results) -> None:
    try:
        target(*args)
        results.put((args[0] if target is worker else 0, None))
    except BaseException:  # noqa: BLE001 - reported by main
        results.put((args[0] if target is worker else 0, traceback.format_exc()))


def main() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_run, args=(trainer, (port,), results))]
    procs += [ctx.Process(target=_run, args=(worker, (rank, port), results)) for rank in range(1, 1 + WORKERS)]
    for p in procs:
        p.start()
    failures = []
    for _ in procs:
        rank, error = results.get(timeout=300)
        if error is not None:
            failures.append(f"rank {rank}:\n{error}")
    for p in procs:
        p.join(timeout=30)
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    print(f"every worker's logits equalled the trainer's after each of the {STEPS} syncs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
