"""The models reload_moe.py reloads: the tensor inventory of public checkpoints.

Each preset builds a model whose state_dict has the names, counts, relative shapes
and dtypes of a Hugging Face checkpoint, from the numbers of its config.json. The
models are layouts only: no forward pass.

    qwen3-30b-a3b     Qwen/Qwen3-30B-A3B: 48 layers x 128 experts, GQA 32/4 heads with
                      q_norm and k_norm; all bf16
    deepseek-v3       deepseek-ai/DeepSeek-V3: 61 layers, the first 3 dense, then 256
                      routed experts + 1 shared expert, MLA attention, routers with an
                      fp32 e_score_correction_bias; all else bf16. The checkpoint's
                      multi-token-prediction layer (model.layers.61) is left out.
    deepseek-v3-fp8   the same with the checkpoint's own precision: every attention and
                      MLP linear weight fp8 e4m3 with an fp32 weight_scale_inv of one
                      value per 128 x 128 block, shape (ceil(out/128), ceil(in/128))
    mixtral-8x7b      mistralai/Mixtral-8x7B-v0.1: 32 layers x 8 experts (w1, w2, w3)
    nemotron-h        nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16: 52 layers in the
                      pattern of its hybrid_override_pattern, 23 Mamba2 mixers, 23 MoE
                      layers (128 relu2 experts + 1 shared expert) and 6 attention
                      layers. Approximate: the names follow transformers' NemotronH
                      modules and the numbers its config.json; the router's weight and
                      e_score_correction_bias are fp32, as those modules declare them.
                      Each Mamba2 mixer also holds conv_weights, a non-persistent buffer
                      viewing conv1d.weight, as vLLM's MambaMixer2 does.

Scaling: every size (hidden, intermediate, head_dim, lora ranks, state size, vocab)
is multiplied by the scale, at least 1; every count (layers, experts, heads, groups,
the conv kernel) stays. So a scaled model holds the same tensors, under the same
names, with about the same shares of the bytes. At scale 0 every size is 1: the
same inventory with negligible bytes, which reload_moe.py times for the per-tensor
overhead. fp8 block scales keep the real 128 x 128 blocks, so a scaled weight has
fewer of them, as a small real layer would.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_BLOCK = 128  # DeepSeek-V3's weight_block_size: one fp32 scale per 128 x 128 block


def size(value: int) -> int:
    """A dataclass field that --scale shrinks (the others are counts and stay)."""
    return field(default=value, metadata={"size": True})


# ---------------------------------------------------------------------------
# The architectures' numbers, from their config.json (scale 1).

@dataclass(frozen=True)
class Qwen3Moe:
    layers: int = 48
    experts: int = 128
    heads: int = 32
    kv_heads: int = 4
    hidden: int = size(2048)
    moe_intermediate: int = size(768)
    head_dim: int = size(128)
    vocab: int = size(151936)


@dataclass(frozen=True)
class DeepseekV3:
    layers: int = 61
    dense_layers: int = 3  # first_k_dense_replace
    experts: int = 256
    heads: int = 128
    hidden: int = size(7168)
    intermediate: int = size(18432)  # the dense layers' MLP
    moe_intermediate: int = size(2048)  # each routed expert, and the one shared expert
    q_lora_rank: int = size(1536)
    kv_lora_rank: int = size(512)
    qk_nope_head_dim: int = size(128)
    qk_rope_head_dim: int = size(64)
    v_head_dim: int = size(128)
    vocab: int = size(129280)


@dataclass(frozen=True)
class Mixtral:
    layers: int = 32
    experts: int = 8
    heads: int = 32
    kv_heads: int = 8
    hidden: int = size(4096)
    moe_intermediate: int = size(14336)  # config.json's intermediate_size: each expert's
    head_dim: int = size(128)
    vocab: int = size(32000)


@dataclass(frozen=True)
class NemotronH:
    # M: Mamba2 mixer, E: MoE, *: attention (config.json's hybrid_override_pattern).
    pattern: str = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    layers: int = 52
    experts: int = 128
    heads: int = 32
    kv_heads: int = 2
    mamba_heads: int = 64
    n_groups: int = 8
    conv_kernel: int = 4
    hidden: int = size(2688)
    moe_intermediate: int = size(1856)
    shared_intermediate: int = size(3712)  # moe_shared_expert_intermediate_size
    head_dim: int = size(128)
    mamba_head_dim: int = size(64)
    ssm_state: int = size(128)
    vocab: int = size(131072)


# ---------------------------------------------------------------------------
# Building blocks. Nothing is initialized: reload_moe fills every value, and the
# default init of tens of thousands of weights would take longer than the benchmark.

class Linear(nn.Linear):
    def reset_parameters(self) -> None:
        pass


class Fp8Linear(Linear):
    """An fp8 e4m3 weight and its fp32 block scale, as DeepSeek-V3's checkpoint stores a linear."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False, dtype=FP8)
        self.weight_scale_inv = nn.Parameter(torch.empty(
            math.ceil(out_features / FP8_BLOCK), math.ceil(in_features / FP8_BLOCK), dtype=torch.float32))


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass


class Conv1d(nn.Conv1d):
    def reset_parameters(self) -> None:
        pass


@dataclass(frozen=True)
class Dtypes:
    weights: torch.dtype  # --dtype: everything not fp8 and not declared fp32
    fp8_linears: bool = False

    def linear(self, in_features: int, out_features: int, *, quantized: bool = True) -> nn.Linear:
        # Embeddings, lm_head and routers stay unquantized in the fp8 checkpoint too.
        if self.fp8_linears and quantized:
            return Fp8Linear(in_features, out_features)
        return Linear(in_features, out_features, bias=False, dtype=self.weights)

    def norm(self, dim: int) -> nn.RMSNorm:
        return nn.RMSNorm(dim, dtype=self.weights)


class GatedMlp(nn.Module):
    def __init__(self, d: Dtypes, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = d.linear(hidden, intermediate)
        self.up_proj = d.linear(hidden, intermediate)
        self.down_proj = d.linear(intermediate, hidden)


class MixtralExpert(nn.Module):
    def __init__(self, d: Dtypes, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = d.linear(hidden, intermediate)
        self.w2 = d.linear(intermediate, hidden)
        self.w3 = d.linear(hidden, intermediate)


class Relu2Mlp(nn.Module):
    def __init__(self, d: Dtypes, hidden: int, intermediate: int):
        super().__init__()
        self.up_proj = d.linear(hidden, intermediate)
        self.down_proj = d.linear(intermediate, hidden)


class Router(nn.Module):
    """DeepSeek-V3's noaux_tc router: a weight and an fp32 bias added to the expert scores."""

    def __init__(self, hidden: int, experts: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden, dtype=dtype))
        self.register_buffer("e_score_correction_bias", torch.empty(experts, dtype=torch.float32))


class Moe(nn.Module):
    """Routed experts behind a router (`gate`), with an optional shared expert."""

    def __init__(self, gate: nn.Module, experts: list[nn.Module], shared: nn.Module | None = None):
        super().__init__()
        self.gate = gate
        self.experts = nn.ModuleList(experts)
        if shared is not None:
            self.shared_experts = shared


class Attention(nn.Module):
    """Grouped-query attention; Qwen3 adds a per-head RMSNorm of queries and keys."""

    def __init__(self, d: Dtypes, hidden: int, heads: int, kv_heads: int, head_dim: int,
                 qk_norm: bool = False):
        super().__init__()
        self.q_proj = d.linear(hidden, heads * head_dim)
        self.k_proj = d.linear(hidden, kv_heads * head_dim)
        self.v_proj = d.linear(hidden, kv_heads * head_dim)
        self.o_proj = d.linear(heads * head_dim, hidden)
        if qk_norm:
            self.q_norm = d.norm(head_dim)
            self.k_norm = d.norm(head_dim)


class MlaAttention(nn.Module):
    """DeepSeek-V3's multi-head latent attention: queries and keys/values through low-rank projections."""

    def __init__(self, d: Dtypes, a: DeepseekV3):
        super().__init__()
        qk_head_dim = a.qk_nope_head_dim + a.qk_rope_head_dim
        self.q_a_proj = d.linear(a.hidden, a.q_lora_rank)
        self.q_a_layernorm = d.norm(a.q_lora_rank)
        self.q_b_proj = d.linear(a.q_lora_rank, a.heads * qk_head_dim)
        self.kv_a_proj_with_mqa = d.linear(a.hidden, a.kv_lora_rank + a.qk_rope_head_dim)
        self.kv_a_layernorm = d.norm(a.kv_lora_rank)
        self.kv_b_proj = d.linear(a.kv_lora_rank, a.heads * (a.qk_nope_head_dim + a.v_head_dim))
        self.o_proj = d.linear(a.heads * a.v_head_dim, a.hidden)


class Mamba2Mixer(nn.Module):
    def __init__(self, d: Dtypes, a: NemotronH):
        super().__init__()
        inner = a.mamba_heads * a.mamba_head_dim
        conv_dim = inner + 2 * a.n_groups * a.ssm_state
        self.conv1d = Conv1d(conv_dim, conv_dim, a.conv_kernel, groups=conv_dim, bias=True, dtype=d.weights)
        self.in_proj = d.linear(a.hidden, inner + conv_dim + a.mamba_heads)
        self.dt_bias = nn.Parameter(torch.empty(a.mamba_heads, dtype=d.weights))
        self.A_log = nn.Parameter(torch.empty(a.mamba_heads, dtype=d.weights))
        self.norm = d.norm(inner)
        self.D = nn.Parameter(torch.empty(a.mamba_heads, dtype=d.weights))
        self.out_proj = d.linear(inner, a.hidden)
        # vLLM's MambaMixer2 keeps the conv weight as (conv_dim, kernel) for its kernels: a
        # view, outside the state_dict. A reload that wrote it as a tensor of its own would
        # overwrite conv1d.weight with stale values.
        self.register_buffer("conv_weights", self.conv1d.weight.view(conv_dim, a.conv_kernel),
                             persistent=False)


class DecoderLayer(nn.Module):
    def __init__(self, d: Dtypes, hidden: int, attention: nn.Module, mlp: nn.Module, mlp_name: str = "mlp"):
        super().__init__()
        self.self_attn = attention
        self.add_module(mlp_name, mlp)
        self.input_layernorm = d.norm(hidden)
        self.post_attention_layernorm = d.norm(hidden)


class Decoder(nn.Module):
    def __init__(self, d: Dtypes, vocab: int, hidden: int, layers: list[nn.Module]):
        super().__init__()
        self.embed_tokens = Embedding(vocab, hidden, dtype=d.weights)
        self.layers = nn.ModuleList(layers)
        self.norm = d.norm(hidden)


class CausalLM(nn.Module):
    """model.embed_tokens, model.layers.N, model.norm, lm_head: the Llama-style names."""

    def __init__(self, d: Dtypes, vocab: int, hidden: int, layers: list[nn.Module]):
        super().__init__()
        self.model = Decoder(d, vocab, hidden, layers)
        self.lm_head = d.linear(hidden, vocab, quantized=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens


class NemotronHBlock(nn.Module):
    def __init__(self, d: Dtypes, hidden: int, mixer: nn.Module):
        super().__init__()
        self.norm = d.norm(hidden)
        self.mixer = mixer


class NemotronHBackbone(nn.Module):
    def __init__(self, d: Dtypes, vocab: int, hidden: int, layers: list[nn.Module]):
        super().__init__()
        self.embeddings = Embedding(vocab, hidden, dtype=d.weights)
        self.layers = nn.ModuleList(layers)
        self.norm_f = d.norm(hidden)


class NemotronHForCausalLM(nn.Module):
    def __init__(self, d: Dtypes, vocab: int, hidden: int, layers: list[nn.Module]):
        super().__init__()
        self.backbone = NemotronHBackbone(d, vocab, hidden, layers)
        self.lm_head = d.linear(hidden, vocab, quantized=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings


# ---------------------------------------------------------------------------
# The models.

def qwen3_moe(a: Qwen3Moe, d: Dtypes) -> nn.Module:
    def layer() -> nn.Module:
        attention = Attention(d, a.hidden, a.heads, a.kv_heads, a.head_dim, qk_norm=True)
        moe = Moe(d.linear(a.hidden, a.experts, quantized=False),
                  [GatedMlp(d, a.hidden, a.moe_intermediate) for _ in range(a.experts)])
        return DecoderLayer(d, a.hidden, attention, moe)
    return CausalLM(d, a.vocab, a.hidden, [layer() for _ in range(a.layers)])


def deepseek_v3(a: DeepseekV3, d: Dtypes) -> nn.Module:
    def layer(i: int) -> nn.Module:
        if i < a.dense_layers:
            mlp = GatedMlp(d, a.hidden, a.intermediate)
        else:
            mlp = Moe(Router(a.hidden, a.experts, d.weights),
                      [GatedMlp(d, a.hidden, a.moe_intermediate) for _ in range(a.experts)],
                      shared=GatedMlp(d, a.hidden, a.moe_intermediate))
        return DecoderLayer(d, a.hidden, MlaAttention(d, a), mlp)
    return CausalLM(d, a.vocab, a.hidden, [layer(i) for i in range(a.layers)])


def mixtral(a: Mixtral, d: Dtypes) -> nn.Module:
    def layer() -> nn.Module:
        moe = Moe(d.linear(a.hidden, a.experts, quantized=False),
                  [MixtralExpert(d, a.hidden, a.moe_intermediate) for _ in range(a.experts)])
        return DecoderLayer(d, a.hidden, Attention(d, a.hidden, a.heads, a.kv_heads, a.head_dim), moe,
                            mlp_name="block_sparse_moe")
    return CausalLM(d, a.vocab, a.hidden, [layer() for _ in range(a.layers)])


def nemotron_h(a: NemotronH, d: Dtypes) -> nn.Module:
    def mixer(kind: str) -> nn.Module:
        if kind == "M":
            return Mamba2Mixer(d, a)
        if kind == "*":
            return Attention(d, a.hidden, a.heads, a.kv_heads, a.head_dim)
        return Moe(Router(a.hidden, a.experts, torch.float32),
                   [Relu2Mlp(d, a.hidden, a.moe_intermediate) for _ in range(a.experts)],
                   shared=Relu2Mlp(d, a.hidden, a.shared_intermediate))
    layers = [NemotronHBlock(d, a.hidden, mixer(kind)) for kind in a.pattern[:a.layers]]
    return NemotronHForCausalLM(d, a.vocab, a.hidden, layers)


@dataclass(frozen=True)
class Preset:
    arch: object  # the config numbers at scale 1, one of the dataclasses above
    build: Callable[[object, Dtypes], nn.Module]
    # The defaults: a run of reload_moe.py with nothing else given takes under a
    # minute on a 2-core CPU.
    scale: float
    layers: int | None = None  # None: all of them
    fp8: bool = False


PRESETS = {
    "qwen3-30b-a3b": Preset(Qwen3Moe(), qwen3_moe, scale=1 / 8),
    # 12 of 61 layers: the 3 dense ones and 9 MoE layers. All of them hold 45k tensors
    # (90k with fp8 scales), for which load_state_dict alone takes seconds a call here.
    "deepseek-v3": Preset(DeepseekV3(), deepseek_v3, scale=1 / 32, layers=12),
    "deepseek-v3-fp8": Preset(DeepseekV3(), deepseek_v3, scale=1 / 32, layers=12, fp8=True),
    "mixtral-8x7b": Preset(Mixtral(), mixtral, scale=1 / 16),
    "nemotron-h": Preset(NemotronH(), nemotron_h, scale=1 / 16),
}
DEFAULT_PRESET = "qwen3-30b-a3b"


def scaled(arch, scale: float, layers: int | None = None, **overrides: int):
    """arch with every size times scale (at least 1), at most `layers` layers, then the
    overrides (exact values, unscaled)."""
    changes = {f.name: max(1, round(getattr(arch, f.name) * scale))
               for f in dataclasses.fields(arch) if f.metadata.get("size")}
    if layers is not None:
        if not 1 <= layers <= arch.layers:
            raise ValueError(f"layers must be 1 to {arch.layers}, got {layers}")
        changes["layers"] = layers
    for name, value in overrides.items():
        if not hasattr(arch, name):
            raise ValueError(f"{type(arch).__name__} has no {name}")
        changes[name] = value
    return dataclasses.replace(arch, **changes)


def build(preset: Preset, arch, dtype: torch.dtype) -> nn.Module:
    return preset.build(arch, Dtypes(dtype, fp8_linears=preset.fp8))
