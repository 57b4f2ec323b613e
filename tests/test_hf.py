"""transformers models reloaded from checkpoints in the format save_pretrained writes
(the Hub's: one tensor per expert and projection), through their conversion mapping,
in place; compared with transformers' own from_pretrained of the same directory."""

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

import fastreload  # noqa: E402
from fastreload import ReloadError, Target, reload_layerwise  # noqa: E402
from fastreload.hf import hub_rename  # noqa: E402

from test_reload import assert_same_objects_and_pointers, assert_untouched, snapshot  # noqa: E402

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0)
EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)

# model type -> (config class, model class, config arguments)
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(EXPERTS, shared_expert_intermediate_size=8)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", EXPERTS),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, n_shared_experts=1,
        first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=8, q_lora_rank=8,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=4)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, n_shared_experts=1,
        first_k_dense_replace=1, n_group=1, topk_group=1)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", dict(
        moe_num_experts=4, moe_k=2, moe_intermediate_size=8, moe_num_shared_experts=1, moe_layer_start_index=1)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM", dict(
        num_local_experts=4, num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"],
        block_size=4)),
    "jamba": ("JambaConfig", "JambaForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=2, attn_layer_offset=0, mamba_d_state=4, mamba_d_conv=2, mamba_expand=2,
        mamba_dt_rank=4, use_mamba_kernels=False)),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", dict(
        layers_block_type=["mamba", "moe", "attention"], num_hidden_layers=3, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=8, moe_shared_expert_intermediate_size=8,
        n_groups=1, n_group=1, topk_group=1, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=4,
        mamba_d_conv=2, expand=2, chunk_size=4, use_mamba_kernels=False)),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        EXPERTS, shared_expert_intermediate_size=8, layer_types=["linear_attention", "full_attention"],
        linear_num_value_heads=2, linear_num_key_heads=1, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_conv_kernel_dim=2)),
}


def build(model_type: str, seed: int):
    config_name, model_name, extra = MODELS[model_type]
    config = getattr(transformers, config_name)(**{**SMALL, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # every tensor distinct and nonzero, unlike some initialisations
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, tmp_path_factory):
    """A model type, a directory save_pretrained wrote in the default (Hub) format, and
    from_pretrained's model of that directory."""
    model_type = request.param
    directory = tmp_path_factory.mktemp(model_type)
    build(model_type, seed=1).save_pretrained(directory)
    expected = type(build(model_type, seed=2)).from_pretrained(directory).eval()
    return model_type, directory, expected


def stream(directory, seed=0):
    pairs = list(load_file(directory / "model.safetensors").items())
    random.Random(seed).shuffle(pairs)
    return iter(pairs)


def assert_matches(model, expected) -> None:
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    tokens = torch.arange(1, 9).reshape(1, 8)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, expected(tokens).logits)


@pytest.mark.parametrize("kind", ["directory", "mapping", "stream"])
def test_checkpoint_format_reloaded_in_place_as_from_pretrained_loads_it(saved, kind):
    model_type, directory, expected = saved
    model = build(model_type, seed=3)
    before = snapshot(model)
    source = {"directory": lambda: directory,
              "mapping": lambda: load_file(directory / "model.safetensors"),
              "stream": lambda: stream(directory)}[kind]()
    report = reload_layerwise(model, source)
    assert_matches(model, expected)
    assert_same_objects_and_pointers(model, before)
    if model_type == "llama":
        assert report.renamed is None and report.regions == 0
    else:
        assert report.renamed == f"transformers checkpoint format ({model_type})"
        assert report.regions > 0
    again = reload_layerwise(model, source if kind != "stream" else stream(directory, seed=1))
    assert again.renamed == report.renamed and again.regions == report.regions
    assert_matches(model, expected)


def test_checkpoint_missing_one_expert_refused_naming_it_nothing_written(saved):
    model_type, directory, _ = saved
    if model_type == "llama":
        pytest.skip("no experts")
    state = load_file(directory / "model.safetensors")
    gone = sorted(n for n, t in hub_rename(build(model_type, seed=3)).targets.items()
                  if isinstance(t, Target))[5]
    del state[gone]
    model = build(model_type, seed=3)
    before = snapshot(model)
    with pytest.raises(ReloadError) as info:
        reload_layerwise(model, state)
    assert gone in str(info.value)
    assert_untouched(model, before)
    with pytest.raises(ReloadError) as info:  # a stream names it too
        reload_layerwise(model, iter(state.items()))
    assert gone in str(info.value)


def test_own_format_still_reloads(saved):
    model_type, _, expected = saved
    model = build(model_type, seed=3)
    before = snapshot(model)
    report = reload_layerwise(model, {k: v.clone() for k, v in expected.state_dict().items()})
    assert report.renamed is None and report.regions == 0
    assert_matches(model, expected)
    assert_same_objects_and_pointers(model, before)


def test_explicit_rename_shows_the_targets_and_reloads_as_detected(tmp_path):
    model = build("qwen3_moe", seed=1)
    model.save_pretrained(tmp_path)
    rename = hub_rename(model)
    assert rename("model.layers.1.mlp.experts.3.up_proj.weight") == Target(
        "model.layers.1.mlp.experts.gate_up_proj", index=(3,), start=8, length=8)
    assert rename("model.layers.1.mlp.experts.2.down_proj.weight") == Target(
        "model.layers.1.mlp.experts.down_proj", index=(2,))
    assert rename("model.norm.weight") == "model.norm.weight"
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hub_rename(torch.nn.Linear(2, 2))
    other = build("qwen3_moe", seed=2)
    report = reload_layerwise(other, tmp_path, rename=hub_rename(other))
    assert report.renamed == "rename"
    assert_matches(other, model)


def test_tensor_parallel_shards_of_fused_experts_compose():
    """Two ranks each hold half of every expert's gate and up rows: the Hub's
    per-expert tensors go through Target(shard=...) into each rank's stacked experts."""
    full = build("qwen3_moe", seed=1)
    checkpoint = {}
    for name, target in hub_rename(full).targets.items():
        if isinstance(target, Target) and "gate_up" in target.name:
            rows = slice(target.start, target.start + target.length)
            checkpoint[name] = full.state_dict()[target.name][target.index][rows].clone()
    experts, inter = 4, 8
    for rank in range(2):
        layer = full.model.layers[0].mlp.experts
        local = torch.zeros(experts, inter, layer.gate_up_proj.shape[-1])  # this rank's [E, 2I/2, H]
        holder = torch.nn.Module()
        holder.register_parameter("gate_up_proj", torch.nn.Parameter(local))
        ptr = local.data_ptr()
        prefix = "model.layers.0.mlp.experts."
        rename = {}
        for name in checkpoint:
            if name.startswith(prefix):
                target = hub_rename(full).targets[name]
                half = 0 if target.start == 0 else inter // 2
                rename[name] = Target("gate_up_proj", index=target.index, start=half, shard=(rank, 2))
        mine = {n: checkpoint[n] for n in rename}
        reload_layerwise(holder, mine, rename=rename)
        want = full.state_dict()[prefix + "gate_up_proj"]
        gate, up = want[:, :inter], want[:, inter:]
        half = slice(rank * inter // 2, (rank + 1) * inter // 2)
        assert torch.equal(holder.gate_up_proj, torch.cat([gate[:, half], up[:, half]], 1))
        assert holder.gate_up_proj.data_ptr() == ptr


def test_conversion_that_changes_values_refused_naming_the_operation(tmp_path):
    from transformers.core_model_loading import ConversionOps, WeightConverter
    from transformers import conversion_mapping

    class Doubled(ConversionOps):
        def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
            tensor = next(iter(input_dict.values()))
            return {target_patterns[0]: (tensor[0] if isinstance(tensor, list) else tensor) * 2}

        @property
        def reverse_op(self):
            return Doubled()  # the way back does not matter: saving is not tested here

    model = build("llama", seed=1)
    conversion_mapping.register_checkpoint_conversion_mapping(
        "llama", [WeightConverter("mlp.down_proj.weight", "mlp.down_proj.weight", [Doubled()])], overwrite=True)
    try:
        fastreload.forget(model)
        with pytest.raises(ReloadError) as info:
            hub_rename(model).targets
    finally:
        conversion_mapping._checkpoint_conversion_mapping_cache = None
    assert "Doubled" in str(info.value) and "llama" in str(info.value)


def test_split_transpose_interleave_and_rope_permutation_become_regions(tmp_path):
    """Conversions other than stacking, registered for llama: the checkpoint's fused
    k/v split into the model's k_proj and v_proj, a transposed down_proj, interleaved
    gate rows and q_proj's heads permuted for RoPE, each written as a view."""
    from transformers import conversion_mapping
    from transformers.core_model_loading import Interleave, PermuteForRope, Split, Transpose, WeightConverter

    conversions = [
        WeightConverter("self_attn.kv.weight", ["self_attn.k_proj.weight", "self_attn.v_proj.weight"], [Split(0)]),
        WeightConverter("mlp.down_t.weight", "mlp.down_proj.weight", [Transpose(0, 1)]),
        WeightConverter("mlp.gate_i.weight", "mlp.gate_proj.weight", [Interleave(0)]),
        WeightConverter("self_attn.q_rope.weight", "self_attn.q_proj.weight", [PermuteForRope()]),
    ]
    conversion_mapping.register_checkpoint_conversion_mapping("llama", conversions, overwrite=True)
    try:
        build("llama", seed=1).save_pretrained(tmp_path)
        expected = type(build("llama", seed=2)).from_pretrained(tmp_path).eval()
        state = load_file(tmp_path / "model.safetensors")
        assert "model.layers.0.mlp.down_t.weight" in state and "model.layers.0.self_attn.kv.weight" in state
        model = build("llama", seed=3)
        before = snapshot(model)
        rename = hub_rename(model)
        assert rename("model.layers.0.mlp.down_t.weight").permute == (1, 0)
        assert rename("model.layers.0.mlp.gate_i.weight").view is not None
        for source in (tmp_path, stream(tmp_path)):
            report = reload_layerwise(model, source)
            assert report.renamed == "transformers checkpoint format (llama)"
            assert_matches(model, expected)
        assert_same_objects_and_pointers(model, before)
    finally:
        conversion_mapping._checkpoint_conversion_mapping_cache = None


@pytest.mark.parametrize("kind", ["directory", "stream"])
def test_repeated_reloads_use_the_cached_regions_and_follow_the_model(tmp_path, kind):
    """The regions of a repeated reload are kept: the model edited in place between
    reloads, another model built meanwhile, or a tensor given new storage
    (p.data = ...), every reload still writes what from_pretrained loads."""
    model = build("qwen3_moe", seed=1)
    model.save_pretrained(tmp_path)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    other = build("qwen3_moe", seed=2)
    experts = other.model.layers[1].mlp.experts
    for round_ in range(4):
        report = reload_layerwise(other, tmp_path if kind == "directory" else stream(tmp_path, seed=round_))
        assert report.regions == 24 and report.tensors == len(other.state_dict())
        plans = fastreload.model.layout_of(other).plans
        if kind == "directory":  # kept for the next one
            assert any(isinstance(k, tuple) and k[0] == "renamed" for k in plans)
        else:  # the views, and the names whose regions tile their destination
            kept = plans["stream regions"]
            assert len(kept.views) == 24 and len(kept.known) == 24
        got = other.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items())
        with torch.no_grad():
            for p in other.parameters():
                p.add_(1)
        if round_ == 1:
            build("llama", seed=0)  # registrations elsewhere: this model's plans stay
        if round_ == 2:
            experts.gate_up_proj.data = torch.zeros_like(experts.gate_up_proj)
    assert experts.gate_up_proj.data_ptr() == other.state_dict()["model.layers.1.mlp.experts.gate_up_proj"].data_ptr()


def _expert_names(model) -> list[str]:
    return sorted(n for n, t in hub_rename(model).targets.items() if isinstance(t, Target))


@pytest.mark.parametrize("fault", ["missing", "twice", "other shape", "also whole", "not a tensor"])
def test_a_repeated_stream_is_checked_as_the_first_one(tmp_path, fault):
    """A stream in the checkpoint format seen before writes its regions without
    checking each against the others (their tiling was checked then): whatever
    differs in a later stream is still refused, naming it, with nothing written."""
    model = build("qwen3_moe", seed=1)
    model.save_pretrained(tmp_path)
    other = build("qwen3_moe", seed=2)
    for seed in range(2):  # the second stream runs on the names the first one kept
        reload_layerwise(other, stream(tmp_path, seed=seed))
    assert len(fastreload.model.layout_of(other).plans["stream regions"].known) == 24
    pairs = list(stream(tmp_path, seed=5))
    gone = _expert_names(other)[7]
    at = next(i for i, (n, _) in enumerate(pairs) if n == gone)
    if fault == "missing":
        del pairs[at]
    elif fault == "twice":
        pairs.insert(len(pairs) - 1, pairs[at])
    elif fault == "other shape":
        pairs[at] = (gone, pairs[at][1][:-1])
    elif fault == "also whole":
        whole = hub_rename(other)(gone).name
        pairs.insert(0, (whole, other.state_dict()[whole].clone()))
    else:
        pairs[at] = (gone, pairs[at][1].tolist())
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1)
    before = snapshot(other)
    with pytest.raises(ReloadError) as info:
        reload_layerwise(other, iter(pairs), batch_bytes=1 << 40)  # one batch: nothing written on refusal
    shown = str(info.value)
    said = {"missing": f"not given: {gone}", "twice": "arrived twice", "other shape": "the region has shape",
            "also whole": "given both whole and in regions", "not a tensor": f"'{gone}': the stream gave a list"}
    assert said[fault] in shown, shown
    assert_untouched(other, before)
    reload_layerwise(other, stream(tmp_path, seed=6))  # and the next good stream writes it all
    assert_matches(other, model)


def test_tied_embeddings(tmp_path):
    """lm_head tied to the input embedding: save_pretrained writes it once; the reload
    writes the shared tensor once and both names see it."""
    config_name, model_name, extra = MODELS["qwen3_moe"]
    config = getattr(transformers, config_name)(**{**SMALL, **extra, "tie_word_embeddings": True})
    torch.manual_seed(1)
    source = getattr(transformers, model_name)(config).eval()
    source.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    expected = type(source).from_pretrained(tmp_path).eval()
    torch.manual_seed(2)
    model = getattr(transformers, model_name)(config).eval()
    before = snapshot(model)
    for _ in range(2):
        report = reload_layerwise(model, tmp_path)
        assert report.renamed == "transformers checkpoint format (qwen3_moe)"
        assert_matches(model, expected)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same_objects_and_pointers(model, before)


@pytest.mark.parametrize("model_type", [t for t in MODELS if t != "llama"])
def test_traced_regions_are_the_probed_regions(model_type, monkeypatch):
    """The experts' conversions are traced on meta tensors (no memory, any size), and
    give exactly the Targets that probing with real tensors gives."""
    from fastreload import converted_regions

    model = build(model_type, seed=0)
    traced_groups = []
    traced = converted_regions._traced

    def counting(*args):
        result = traced(*args)
        traced_groups.append(args[3])
        return result

    monkeypatch.setattr(converted_regions, "_traced", counting)
    targets = dict(hub_rename(model).targets)
    assert any("experts" in first for first in traced_groups)

    def untraceable(*args):
        raise converted_regions.Untraceable("probing asked for")

    monkeypatch.setattr(converted_regions, "_traced", untraceable)
    fastreload.forget(model)
    assert dict(hub_rename(model).targets) == targets


def test_full_size_deepseek_v3_experts_become_regions_without_memory():
    """DeepSeek-V3 at its real size (256 experts of 7168 x 2048 per projection: 1.1e10
    checkpoint elements per layer, far beyond any probe), built on the meta device:
    every expert tensor has its region, derived without allocating it."""
    import resource

    config = transformers.DeepseekV3Config(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, n_group=8, topk_group=4, num_attention_heads=128, num_key_value_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)
    with torch.device("meta"):
        model = transformers.DeepseekV3ForCausalLM(config)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rename = hub_rename(model)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    experts = "model.layers.2.mlp.experts"
    assert rename(f"{experts}.255.up_proj.weight") == Target(
        f"{experts}.gate_up_proj", index=(255,), dim=0, start=2048, length=2048)
    assert rename(f"{experts}.7.gate_proj.weight") == Target(
        f"{experts}.gate_up_proj", index=(7,), dim=0, start=0, length=2048)
    assert rename(f"{experts}.0.down_proj.weight") == Target(f"{experts}.down_proj", index=(0,))
    assert sum(1 for name in rename.names if ".experts." in name) == 2 * 256 * 3
    assert grown_mib < 1024, f"deriving the regions grew the process by {grown_mib:.0f} MiB"
