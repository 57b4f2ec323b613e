"""Replay of post-load processing: linear layers that quantize their weights to fp8
with per-channel scales after loading, reloaded in place from a bf16 checkpoint.

    python examples/fp8_replay.py

Builds a model, records its checkpoint format with fastreload.record(), loads and
processes it as a server would, then reloads a new bf16 checkpoint with
reload_layerwise: every processed layer is rebuilt in checkpoint format, loaded,
quantized again and copied into the same fp8 tensors. The outputs are compared with
a model freshly built and processed from that checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

import fastreload

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


class Fp8Linear(nn.Linear):
    """Checkpoint format: a bf16 weight [out, in] and bias. Kernel format: an fp8
    weight, an fp32 per-output-channel scale (a new parameter) and the bias."""

    def process_weights_after_loading(self) -> None:
        w = self.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
        self.weight = nn.Parameter((w / scale[:, None]).to(FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() * self.weight_scale[:, None]
        return nn.functional.linear(x.float(), w, self.bias.float())


class Model(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, dim, dtype=torch.bfloat16)
        self.layers = nn.ModuleList(Fp8Linear(dim, dim, dtype=torch.bfloat16) for _ in range(layers))
        self.head = nn.Linear(dim, 100, dtype=torch.bfloat16)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).float()
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x.to(torch.bfloat16)).float()


def checkpoint(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * 0.1).to(torch.bfloat16)
            for k, v in Model().state_dict().items()}


def load_and_process(model: Model, state: dict[str, torch.Tensor]) -> Model:
    model.load_state_dict(state)
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.process_weights_after_loading()
    return model


def main() -> float:
    served = Model()
    fastreload.record(served)  # before processing: the checkpoint format
    load_and_process(served, checkpoint(0))
    pointers = {k: v.data_ptr() for k, v in served.state_dict().items()}

    new = checkpoint(1)
    report = fastreload.reload_layerwise(served, new)
    print(report)
    print("replayed:", ", ".join(report.replayed))

    fresh = load_and_process(Model(), new)
    for name, value in fresh.state_dict().items():
        live = served.state_dict()[name]
        assert live.dtype == value.dtype, name
        assert live.data_ptr() == pointers[name], f"{name} moved"
        assert torch.equal(live.float(), value.float()), name
    tokens = torch.randint(0, 100, (8, 16))
    with torch.no_grad():
        diff = (served(tokens) - fresh(tokens)).abs().max().item()
    assert diff == 0, diff
    print(f"outputs equal a freshly built and processed model (max abs diff {diff}); "
          f"{served.layers[0].weight.dtype} weights, same pointers")
    return diff


if __name__ == "__main__":
    main()
