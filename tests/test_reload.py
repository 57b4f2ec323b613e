"""reload_layerwise as users call it: what is written, what is left alone, what is refused."""

import pytest
import torch
from torch import nn

import fastreload
from fastreload import ReloadError, reload_layerwise


def fresh_values(model: nn.Module, dtype=None) -> dict[str, torch.Tensor]:
    """A source keyed like model.state_dict() with values the model does not hold
    (tied names get one value, as a checkpoint of the model would hold)."""
    values, by_memory = {}, {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape)
        if key not in by_memory:
            by_memory[key] = ((torch.randn(v.shape) * 3 + 1).to(dtype or v.dtype)
                              if v.is_floating_point() else v + 1)
        values[k] = by_memory[key]
    return values


def snapshot(model: nn.Module):
    """Every tensor of the model: (object, storage pointer, value copy), by name."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return {k: (t, t.untyped_storage().data_ptr(), t.detach().clone())
            for k, t in named.items() if not isinstance(t, nn.parameter.UninitializedTensorMixin)}


def assert_untouched(model: nn.Module, before) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (t, ptr, value) in before.items():
        assert after[name][0] is t, name
        assert after[name][1] == ptr, name
        assert torch.equal(after[name][2], value), f"{name} changed"


def assert_same_objects_and_pointers(model: nn.Module, before) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (t, ptr, _) in before.items():
        assert after[name][0] is t and after[name][1] == ptr, name


def assert_state_equals(model: nn.Module, source: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    for name, value in source.items():
        torch.testing.assert_close(state[name], value.to(state[name].dtype), rtol=0, atol=0, msg=name)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 4)
        self.norm = nn.LayerNorm(4)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = MLP()
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("cache", torch.zeros(3), persistent=False)


class Decoder(nn.Module):
    def __init__(self, layers=3, tie=False):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList(Block() for _ in range(layers))
        self.head = nn.Linear(8, 10, bias=False)
        if tie:
            self.head.weight = self.embed.weight


class OwnAlias(nn.Module):
    """A layer whose non-persistent buffer views its own parameter."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 1, 3))
        self.register_buffer("weight_2d", self.weight.view(4, 3), persistent=False)


class Mixer(nn.Module):
    """MambaMixer2's pattern: the parent's non-persistent buffer views its child's weight."""

    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(6, 6, kernel_size=4, groups=6)
        self.in_proj = nn.Linear(6, 12)
        self.register_buffer("conv_weights", self.conv1d.weight.view(6, 4), persistent=False)


class SiblingAlias(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Module()
        self.b.register_buffer("a_weight_t", self.a.weight.t(), persistent=False)


@pytest.mark.parametrize("make", [MLP, Decoder, Mixer, OwnAlias, SiblingAlias, lambda: Decoder(tie=True)])
def test_round_trip_keeps_objects_pointers_and_persistence(make):
    model = make()
    keys_before = list(model.state_dict().keys())
    before = snapshot(model)
    source = fresh_values(model)
    report = reload_layerwise(model, source)
    assert_state_equals(model, source)
    assert_same_objects_and_pointers(model, before)
    assert list(model.state_dict().keys()) == keys_before
    assert report.tensors + len(report.skipped["tied"]) == len(source)


def test_nested_modules_report_layers_and_bytes():
    model = Decoder(layers=3)
    report = reload_layerwise(model, fresh_values(model))
    # embed, 3 x (block with its buffer, up, down, norm), head
    assert report.layers == 1 + 3 * 4 + 1
    assert report.tensors == len(model.state_dict())
    assert report.bytes == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert report.batched_copy_calls == 1
    assert report.seconds > 0
    assert "reloaded" in str(report)


def test_non_persistent_buffers_are_left_alone():
    model = Decoder(layers=2)
    model.layers[0].cache.fill_(7)
    report = reload_layerwise(model, fresh_values(model))
    assert torch.equal(model.layers[0].cache, torch.full((3,), 7.0))
    assert set(report.skipped["non_persistent"]) == {"layers.0.cache", "layers.1.cache"}
    assert "layers.0.cache" not in model.state_dict()


def test_source_naming_a_non_persistent_buffer_is_unexpected():
    model = Decoder(layers=1)
    before = snapshot(model)
    with pytest.raises(ReloadError, match="layers.0.cache") as error:
        reload_layerwise(model, {**fresh_values(model), "layers.0.cache": torch.ones(3)})
    assert error.value.unexpected == ("layers.0.cache",)
    assert_untouched(model, before)


@pytest.mark.parametrize("make, alias, param", [
    (OwnAlias, "weight_2d", "weight"),
    (Mixer, "conv_weights", "conv1d.weight"),
    (SiblingAlias, "b.a_weight_t", "a.weight"),
])
def test_alias_buffer_views_the_fresh_parameter(make, alias, param):
    model = make()
    source = fresh_values(model)
    report = reload_layerwise(model, source)
    buffer = model.get_buffer(alias)
    parameter = model.get_parameter(param)
    # The prior-art bug: the alias, copied back as its own tensor, overwrote the parameter.
    assert torch.equal(parameter, source[param])
    assert torch.equal(buffer, parameter.view(buffer.shape) if alias != "b.a_weight_t" else parameter.t())
    assert buffer.untyped_storage().data_ptr() == parameter.untyped_storage().data_ptr()
    assert report.skipped["alias"] == (alias,)
    assert alias not in report.skipped["non_persistent"]


def test_persistent_alias_buffer_is_accepted_and_not_written():
    model = OwnAlias()
    model._non_persistent_buffers_set.discard("weight_2d")
    source = fresh_values(model)
    assert "weight_2d" in source
    source["weight_2d"] = torch.zeros(4, 3)  # whatever it says, the parameter decides
    reload_layerwise(model, source)
    assert torch.equal(model.weight, source["weight"])
    assert torch.equal(model.weight_2d, source["weight"].view(4, 3))
    del source["weight_2d"]
    reload_layerwise(model, source)  # and it is not required


class LazyBesideAlias(nn.Module):
    def __init__(self):
        super().__init__()
        self.lazy = nn.LazyLinear(3)
        self.mixer = Mixer()


def test_lazy_parameters_are_not_expected():
    model = LazyBesideAlias()
    source = {k: v for k, v in fresh_values(Mixer()).items()}
    source = {f"mixer.{k}": v for k, v in source.items()}
    report = reload_layerwise(model, source)
    assert set(report.skipped["uninitialized"]) == {"lazy.weight", "lazy.bias"}
    assert report.skipped["alias"] == ("mixer.conv_weights",)
    assert torch.equal(model.mixer.conv1d.weight, source["mixer.conv1d.weight"])


def test_source_aimed_at_lazy_parameter_is_refused():
    model = LazyBesideAlias()
    source = {f"mixer.{k}": v for k, v in fresh_values(Mixer()).items()}
    source["lazy.weight"] = torch.ones(3, 5)
    before = snapshot(model)
    with pytest.raises(ReloadError, match="lazy.weight") as error:
        reload_layerwise(model, source)
    assert error.value.uninitialized == ("lazy.weight",)
    assert_untouched(model, before)


def test_meta_parameters_are_uninitialized_too():
    model = nn.Module()
    model.real = nn.Linear(2, 2)
    model.ghost = nn.Linear(2, 2, device="meta")
    source = {f"real.{k}": v for k, v in fresh_values(model.real).items()}
    report = reload_layerwise(model, source)
    assert set(report.skipped["uninitialized"]) == {"ghost.weight", "ghost.bias"}
    with pytest.raises(ReloadError, match="ghost.bias"):
        reload_layerwise(model, {**source, "ghost.bias": torch.ones(2)})


@pytest.mark.parametrize("names", [("embed.weight",), ("head.weight",), ("embed.weight", "head.weight")])
def test_tied_weights_written_once_from_any_name(names):
    model = Decoder(layers=1, tie=True)
    source = fresh_values(model)
    value = source["embed.weight"]
    for name in ("embed.weight", "head.weight"):
        source.pop(name)
    for name in names:
        source[name] = value.clone()
    report = reload_layerwise(model, source)
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, value)
    assert report.skipped["tied"] == ("head.weight",)


def test_tied_names_with_different_values_are_refused():
    model = Decoder(layers=1, tie=True)
    source = fresh_values(model)
    source["head.weight"] = source["embed.weight"] + 1
    before = snapshot(model)
    with pytest.raises(ReloadError, match="head.weight") as error:
        reload_layerwise(model, source)
    assert error.value.conflicts == ("head.weight",)
    assert_untouched(model, before)


def test_parameters_sharing_memory_through_separate_objects_are_tied():
    model = nn.Module()
    model.a = nn.Linear(3, 3, bias=False)
    model.b = nn.Linear(3, 3, bias=False)
    model.b.weight = nn.Parameter(model.a.weight.data)  # another Parameter, same bytes
    source = fresh_values(model)
    source["b.weight"] = source["a.weight"]
    report = reload_layerwise(model, source)
    assert report.tensors == 1 and report.skipped["tied"] == ("b.weight",)
    assert torch.equal(model.b.weight, source["a.weight"])


def test_overlapping_distinct_parameters_are_refused():
    model = nn.Module()
    flat = torch.zeros(10)
    model.register_parameter("a", nn.Parameter(flat[:6]))
    model.register_parameter("b", nn.Parameter(flat[4:]))
    with pytest.raises(ReloadError, match="share bytes"):
        reload_layerwise(model, {"a": torch.ones(6), "b": torch.ones(6)})
    assert torch.equal(flat, torch.zeros(10))


def test_views_of_one_flat_buffer_reload_independently():
    model = nn.Module()
    flat = torch.zeros(10)
    model.register_parameter("a", nn.Parameter(flat[:4]))
    model.register_parameter("b", nn.Parameter(flat[4:].view(2, 3)))
    reload_layerwise(model, {"a": torch.ones(4), "b": torch.full((2, 3), 2.0)})
    assert flat.tolist() == [1.0] * 4 + [2.0] * 6


@pytest.mark.parametrize("model_dtype, source_dtype", [
    (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
    (torch.float32, torch.float16), (torch.float8_e4m3fn, torch.bfloat16),
])
def test_dtype_conversion(model_dtype, source_dtype):
    model = MLP().to(model_dtype)
    source = fresh_values(model, source_dtype)
    before = snapshot(model)
    reload_layerwise(model, source)
    for name, value in source.items():
        expected = torch.empty_like(model.state_dict()[name]).copy_(value)
        assert torch.equal(model.state_dict()[name].float(), expected.float()), name
    assert_same_objects_and_pointers(model, before)


def test_strict_reload_refuses_missing_and_unexpected_names():
    model = Decoder(layers=2)
    source = fresh_values(model)
    del source["layers.1.mlp.up.bias"]
    source["layers.9.mlp.up.bias"] = torch.ones(16)
    before = snapshot(model)
    with pytest.raises(ReloadError) as error:
        reload_layerwise(model, source)
    assert error.value.missing == ("layers.1.mlp.up.bias",)
    assert error.value.unexpected == ("layers.9.mlp.up.bias",)
    assert "layers.1.mlp.up.bias" in str(error.value) and "layers.9.mlp.up.bias" in str(error.value)
    assert_untouched(model, before)


def test_non_strict_reload_reports_missing_and_unexpected():
    model = Decoder(layers=2)
    source = fresh_values(model)
    del source["layers.1.mlp.up.bias"]
    source["extra"] = torch.ones(1)
    old_bias = model.layers[1].mlp.up.bias.detach().clone()
    report = reload_layerwise(model, source, strict=False)
    assert report.skipped["missing"] == ("layers.1.mlp.up.bias",)
    assert report.skipped["unexpected"] == ("extra",)
    assert torch.equal(model.layers[1].mlp.up.bias, old_bias)
    assert torch.equal(model.layers[1].mlp.up.weight, source["layers.1.mlp.up.weight"])
    assert report.tensors == len(model.state_dict()) - 1


@pytest.mark.parametrize("strict", [True, False])
def test_shape_mismatch_is_refused_even_when_not_strict(strict):
    model = Decoder(layers=2)
    source = fresh_values(model)
    source["layers.1.mlp.down.weight"] = torch.ones(4, 17)
    before = snapshot(model)
    with pytest.raises(ReloadError, match=r"layers.1.mlp.down.weight.*\(4, 16\).*\(4, 17\)") as error:
        reload_layerwise(model, source, strict=strict)
    assert list(error.value.mismatched) == ["layers.1.mlp.down.weight"]
    assert_untouched(model, before)


def test_non_convertible_dtype_is_refused():
    model = Decoder(layers=1)
    source = fresh_values(model)
    source["layers.0.scale"] = torch.ones(4, dtype=torch.int32)
    before = snapshot(model)
    with pytest.raises(ReloadError, match=r"layers.0.scale.*torch.int32.*torch.float32"):
        reload_layerwise(model, source)
    assert_untouched(model, before)


def test_error_in_a_late_batch_writes_no_batch():
    model = Decoder(layers=6)
    source = fresh_values(model)
    source["head.weight"] = torch.ones(3, 3)  # the very last layer
    before = snapshot(model)
    with pytest.raises(ReloadError, match="head.weight"):
        reload_layerwise(model, source, batch_bytes=256)
    assert_untouched(model, before)


def test_batches_follow_the_byte_budget_and_keep_layers_whole():
    model = Decoder(layers=4)
    source = fresh_values(model)
    whole = reload_layerwise(model, source)
    split = reload_layerwise(model, source, batch_bytes=1024)
    assert whole.batched_copy_calls == 1
    assert split.batched_copy_calls > 4
    assert_state_equals(model, source)
    with pytest.raises(ValueError, match="batch_bytes"):
        reload_layerwise(model, source, batch_bytes=0)


def test_source_must_be_a_mapping_a_stream_or_files():
    with pytest.raises(TypeError, match="Mapping"):
        reload_layerwise(MLP(), 42)


def test_reload_from_the_models_own_state_dict_is_a_no_op():
    model = Decoder(layers=1, tie=True)
    before = snapshot(model)
    reload_layerwise(model, model.state_dict())
    assert_untouched(model, before)


def test_source_viewing_another_model_tensor_is_refused():
    model = MLP()
    source = fresh_values(model)
    source["up.bias"] = model.up.weight.detach()[0].repeat(2)[:16]  # a copy: fine
    reload_layerwise(model, source)
    source["down.bias"] = model.up.weight.detach().view(-1)[:4]  # a view: read while written
    before = snapshot(model)
    with pytest.raises(ReloadError, match="down.bias.*shares memory"):
        reload_layerwise(model, source)
    assert_untouched(model, before)


def test_parameters_requiring_grad_and_inference_tensors_reload():
    model = MLP()
    source = fresh_values(model)
    reload_layerwise(model, source)
    assert all(p.requires_grad and p.is_leaf for p in model.parameters())
    with torch.inference_mode():
        frozen = MLP()
    reload_layerwise(frozen, source)
    assert_state_equals(frozen, source)


def test_layout_follows_model_changes():
    model = Decoder(layers=1)
    reload_layerwise(model, fresh_values(model))
    model.layers[0].mlp.up = nn.Linear(8, 16, bias=False)  # registration seen by the hooks
    source = fresh_values(model)
    reload_layerwise(model, source)
    assert torch.equal(model.layers[0].mlp.up.weight, source["layers.0.mlp.up.weight"])

    shared = nn.Module()
    shared.a = nn.Linear(3, 3, bias=False)
    shared.b = nn.Linear(3, 3, bias=False)
    shared.b.weight = nn.Parameter(shared.a.weight.data)  # tied by memory, not by object
    reload_layerwise(shared, fresh_values(shared))
    shared.b.weight.data = torch.zeros(3, 3)  # a storage swap, no registration: unties them
    source = {"a.weight": torch.ones(3, 3), "b.weight": torch.full((3, 3), 5.0)}
    reload_layerwise(shared, source)
    assert torch.equal(shared.a.weight, source["a.weight"])
    assert torch.equal(shared.b.weight, source["b.weight"])


def test_materialized_lazy_parameters_are_reloaded():
    model = LazyBesideAlias()
    source = {f"mixer.{k}": v for k, v in fresh_values(Mixer()).items()}
    reload_layerwise(model, source)
    model.lazy(torch.ones(2, 5))  # materializes in place: no registration hook fires
    source["lazy.weight"], source["lazy.bias"] = torch.ones(3, 5), torch.ones(3)
    reload_layerwise(model, source)
    assert torch.equal(model.lazy.weight, torch.ones(3, 5))


def test_forget_drops_the_cached_layout():
    model = MLP()
    reload_layerwise(model, fresh_values(model))
    del model.norm.bias  # bypasses the registration hooks
    model.norm.register_parameter("bias", None)
    fastreload.forget(model)
    source = fresh_values(model)
    assert "norm.bias" not in source
    reload_layerwise(model, source)


def test_logger_reports_each_reload(caplog):
    model = MLP()
    with caplog.at_level("DEBUG", logger="fastreload"):
        reload_layerwise(model, fresh_values(model))
    assert any("reloaded" in r.message for r in caplog.records)


def test_storage_shared_after_the_layout_was_made_is_seen():
    model = nn.Module()
    model.a = nn.Linear(3, 3, bias=False)
    model.b = nn.Linear(3, 3, bias=False)
    reload_layerwise(model, fresh_values(model))
    model.b.weight.data = model.a.weight.data  # tied now, without any registration
    source = {"a.weight": torch.ones(3, 3), "b.weight": torch.ones(3, 3)}
    report = reload_layerwise(model, source)
    assert report.skipped["tied"] == ("b.weight",)
    source["b.weight"] = torch.zeros(3, 3)
    before = snapshot(model)
    with pytest.raises(ReloadError, match="b.weight"):
        reload_layerwise(model, source)
    assert_untouched(model, before)


def test_source_values_must_be_tensors():
    model = Decoder(layers=1, tie=True)
    source = fresh_values(model)
    source["head.weight"] = [[0.0] * 8] * 10
    before = snapshot(model)
    with pytest.raises(ReloadError, match=r"nothing was written:\n  'head.weight': the source value is a list, not a tensor"):
        reload_layerwise(model, source)
    source["head.weight"] = source["embed.weight"]
    source["layers.0.scale"] = None
    with pytest.raises(ReloadError, match="layers.0.scale"):  # None: missing
        reload_layerwise(model, source)
    assert_untouched(model, before)


def test_one_mapping_reloaded_again_and_again_is_read_afresh_each_time():
    # From its second read on, a mapping is read by position while its keys stay
    # the same objects in the same order: what it holds at each reload must still
    # be what is written, whatever changed in it.
    model = Decoder()
    source = {k: torch.full_like(v, 1.0) for k, v in model.state_dict().items()}
    other = {k: torch.full_like(v, -1.0) for k, v in model.state_dict().items()}
    name = next(iter(source))
    for value in (2.0, 3.0, 4.0):
        for k in source:
            source[k] = torch.full_like(source[k], value)  # new tensors under the same keys
        reload_layerwise(model, source)
        assert all(torch.equal(v, torch.full_like(v, value)) for v in model.state_dict().values())
        reload_layerwise(model, other)  # two mappings in turn
        assert all(torch.equal(v, torch.full_like(v, -1.0)) for v in model.state_dict().values())
    source[name] = source.pop(name)  # the same key object, now last
    source[name] = torch.full_like(source[name], 6.0)
    reload_layerwise(model, source)
    assert torch.equal(model.state_dict()[name], torch.full_like(source[name], 6.0))
    source[("" + name + ".")[:-1]] = source.pop(name)  # an equal key, another string object
    source[name] = torch.full_like(source[name], 5.0)
    reload_layerwise(model, source)
    assert torch.equal(model.state_dict()[name], torch.full_like(source[name], 5.0))
    before = snapshot(model)
    del source[name]
    with pytest.raises(ReloadError) as error:
        reload_layerwise(model, source)
    assert error.value.missing == (name,)
    assert_untouched(model, before)


def test_reloads_of_one_model_from_several_threads_are_each_whole():
    import threading

    model = Decoder(layers=8)
    sources = [{k: torch.full_like(v, float(n)) for k, v in model.state_dict().items()} for n in range(4)]
    errors = []

    def reload_many(source):
        try:
            for _ in range(25):
                reload_layerwise(model, source)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=reload_many, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    values = {v.flatten()[0].item() for v in model.state_dict().values()}
    assert len(values) == 1, f"the model mixes several reloads: {values}"
    (value,) = values
    assert all(torch.equal(v, torch.full_like(v, value)) for v in model.state_dict().values())
