"""record() and replay: checkpoint-format tensors loaded, processed and copied into
the live kernel tensors, which keep their objects, pointers and persistence."""

import random
import re

import pytest
import torch
from torch import nn

import fastreload
from fastreload import ReloadError, reload_layerwise
from fastreload.model import layout_of

from test_reload import assert_untouched, snapshot


class QLinear(nn.Linear):
    """Quantizes its weight to fp8 with per-channel scales after loading; keeps a
    non-persistent derived buffer."""

    calls = 0

    def process_weights_after_loading(self):
        type(self).calls += 1
        w = self.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-6) / 448
        self.weight = nn.Parameter((w / scale[:, None]).to(torch.float8_e4m3fn), requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.register_buffer("bias_sum", self.bias.detach().sum().reshape(1), persistent=False)


class Net(nn.Module):
    def __init__(self, layers=3):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList(QLinear(8, 8) for _ in range(layers))
        self.norm = nn.LayerNorm(8)


def process(model):
    for m in model.modules():
        if hasattr(m, "process_weights_after_loading"):
            m.process_weights_after_loading()


def checkpoint(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g).to(torch.bfloat16) for k, v in model.state_dict().items()}


def built(make, ckpt, recorded=True):
    """A model as a server builds it: recorded, loaded, processed."""
    model = make()
    if recorded:
        fastreload.record(model)
    model.load_state_dict({k: v.float() for k, v in ckpt.items()})
    process(model)
    return model


def assert_same_state(model, reference):
    state, expected = model.state_dict(), reference.state_dict()
    assert list(state) == list(expected)
    for k, v in expected.items():
        assert torch.equal(state[k].float(), v.float()), k
    for (k, b), (_, e) in zip(model.named_buffers(), reference.named_buffers()):
        assert torch.equal(b.float(), e.float()), k


def as_source(kind, ckpt, tmp_path):
    if kind == "mapping":
        return ckpt
    if kind == "stream":
        items = list(ckpt.items())
        random.Random(0).shuffle(items)
        return iter(items)
    from safetensors.torch import save_file
    path = tmp_path / "model.safetensors"
    save_file(ckpt, str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["mapping", "stream", "safetensors"])
def test_replay_matches_a_freshly_processed_model_in_place(kind, tmp_path):
    if kind == "safetensors":
        pytest.importorskip("safetensors")
    model = built(Net, checkpoint(Net()))
    keys = list(model.state_dict().keys())
    non_persistent = [set(m._non_persistent_buffers_set) for m in model.modules()]
    before = snapshot(model)
    new = checkpoint(Net(), seed=1)
    reference = built(Net, new, recorded=False)
    layout = layout_of(model)
    report = reload_layerwise(model, as_source(kind, new, tmp_path))
    assert_same_state(model, reference)
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (t, ptr, _) in before.items():
        assert after[name][0] is t and after[name][1] == ptr, name
    assert list(model.state_dict().keys()) == keys
    assert [set(m._non_persistent_buffers_set) for m in model.modules()] == non_persistent
    assert sorted(report.replayed) == ["blocks.0", "blocks.1", "blocks.2"]
    assert report.tensors == len(new)
    # The cached layout survives the temporaries (and still describes the live tensors).
    assert layout_of(model) is layout
    assert layout.targets[layout.target_index["blocks.0.weight"]].tensor is model.blocks[0].weight
    reload_layerwise(model, new)
    assert layout_of(model) is layout


def test_processing_runs_once_per_unit_and_modules_without_it_stay_direct():
    model = built(Net, checkpoint(Net()))
    QLinear.calls = 0
    report = reload_layerwise(model, checkpoint(Net(), seed=2))
    assert QLinear.calls == 3
    assert "embed" not in report.replayed and "norm" not in report.replayed
    assert report.layers == 5


@pytest.mark.parametrize("kind", ["mapping", "stream"])
def test_missing_tensor_strict_writes_nothing(kind, tmp_path):
    model = built(Net, checkpoint(Net()))
    new = checkpoint(Net(), seed=1)
    del new["blocks.1.bias"]
    before = snapshot(model)
    QLinear.calls = 0
    with pytest.raises(ReloadError) as error:
        reload_layerwise(model, as_source(kind, new, tmp_path))
    assert "blocks.1.bias" in error.value.missing
    assert QLinear.calls == 0 or kind == "stream"  # a stream writes complete layers as they come
    if kind == "mapping":
        assert_untouched(model, before)
    else:
        assert "blocks.1" in error.value.unwritten_layers
        assert torch.equal(model.blocks[1].weight, before["blocks.1.weight"][2])


@pytest.mark.parametrize("kind", ["mapping", "stream"])
def test_missing_tensor_not_strict_keeps_the_unit_and_reports_it(kind, tmp_path):
    model = built(Net, checkpoint(Net()))
    new = checkpoint(Net(), seed=1)
    del new["blocks.1.bias"]
    before = snapshot(model)
    report = reload_layerwise(model, as_source(kind, new, tmp_path), strict=False)
    assert report.skipped["missing"] == ("blocks.1.bias",)
    assert "blocks.1" not in report.replayed
    for name in ("blocks.1.weight", "blocks.1.weight_scale", "blocks.1.bias", "blocks.1.bias_sum"):
        assert torch.equal(model.get_submodule("blocks.1").get_parameter(name.split(".")[-1])
                           if "sum" not in name else model.blocks[1].bias_sum, before[name][2]), name
    reference = built(Net, {**new, "blocks.1.bias": torch.zeros(8)}, recorded=False)
    assert torch.equal(model.blocks[0].weight.float(), reference.blocks[0].weight.float())


def test_a_name_sent_twice_is_an_error():
    model = built(Net, checkpoint(Net()))
    items = list(checkpoint(Net(), seed=1).items())
    items.insert(1, items[-3])  # blocks.2.bias... again, before its layer completes
    with pytest.raises(ReloadError, match="twice") as error:
        reload_layerwise(model, iter(items))
    assert error.value.duplicates == (items[1][0],)


class Scaled(nn.Module):
    """A layer with an alias buffer of its own weight and a derived kernel buffer."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 1, 3))
        self.register_buffer("weight_2d", self.weight.view(4, 3), persistent=False)

    def process_weights_after_loading(self):
        with torch.no_grad():
            self.weight.mul_(2)
        self.register_buffer("total", self.weight.detach().sum().reshape(1), persistent=True)


class AliasOnly(nn.Module):
    """A processed parent whose only own tensor views its child's weight (MambaMixer2)."""

    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(6, 6, kernel_size=4, groups=6)
        self.register_buffer("conv_weights", self.conv1d.weight.view(6, 4), persistent=False)

    def process_weights_after_loading(self):
        raise AssertionError("nothing of its own to process")


class WithAliases(nn.Module):
    def __init__(self):
        super().__init__()
        self.scaled = Scaled()
        self.mixer = AliasOnly()


def test_alias_buffers_are_never_recorded_nor_copied():
    model = WithAliases()
    recording = fastreload.record(model)
    names = {n for g in recording.groups for e in g.entries for n in e.names}
    assert names == {"scaled.weight"}
    model.scaled.process_weights_after_loading()
    alias, conv = model.scaled.weight_2d, model.mixer.conv_weights
    source = {"scaled.weight": torch.ones(4, 1, 3), "mixer.conv1d.weight": torch.full((6, 1, 4), 3.0),
              "mixer.conv1d.bias": torch.zeros(6)}
    report = reload_layerwise(model, source)
    assert report.replayed == ("scaled",)
    assert torch.equal(model.scaled.weight, torch.full((4, 1, 3), 2.0))
    assert model.scaled.weight_2d is alias and torch.equal(alias, torch.full((4, 3), 2.0))
    assert torch.equal(model.scaled.total, torch.tensor([24.0]))
    assert model.mixer.conv_weights is conv and torch.equal(conv, torch.full((6, 4), 3.0))
    assert list(model.state_dict()) == ["scaled.weight", "scaled.total", "mixer.conv1d.weight",
                                        "mixer.conv1d.bias"]


class Head(nn.Module):
    calls = 0

    def __init__(self, embed, replace):
        super().__init__()
        self.weight = embed.weight
        self.replace = replace

    def process_weights_after_loading(self):
        type(self).calls += 1
        if self.replace:  # a new kernel tensor: the tie is broken in the live model
            self.weight = nn.Parameter(self.weight.detach() * 10, requires_grad=False)
        self.register_buffer("row_norm", self.weight.detach().norm(dim=1), persistent=False)


class Tied(nn.Module):
    def __init__(self, replace=False):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = Head(self.embed, replace)


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("names", [("embed.weight",), ("head.weight",), ("embed.weight", "head.weight")])
def test_tied_parameters_are_loaded_and_processed_once(replace, names):
    model = Tied(replace)
    fastreload.record(model)
    model.head.process_weights_after_loading()
    value = torch.randn(10, 4)
    Head.calls = 0
    before = snapshot(model)
    report = reload_layerwise(model, {n: value.clone() for n in names})
    assert Head.calls == 1
    assert report.replayed == ("head",)
    assert torch.equal(model.embed.weight, value)
    assert torch.equal(model.head.weight, value * 10 if replace else value)
    assert (model.head.weight is model.embed.weight) != replace
    assert torch.allclose(model.head.row_norm, model.head.weight.norm(dim=1))
    for name, (t, ptr, _) in before.items():
        assert snapshot(model)[name][0] is t and t.untyped_storage().data_ptr() == ptr


def test_tied_names_with_different_values_are_refused():
    model = Tied()
    fastreload.record(model)
    with pytest.raises(ReloadError) as error:
        reload_layerwise(model, {"embed.weight": torch.ones(10, 4), "head.weight": torch.zeros(10, 4)})
    assert error.value.conflicts == ("head.weight",)


class Faulty(nn.Linear):
    mode = None  # the fault of every instance, unless the instance has its own

    def process_weights_after_loading(self):
        mode = self.__dict__.get("fault", Faulty.mode)
        if mode == "shape":
            self.weight = nn.Parameter(self.weight.detach().t().contiguous()[:3])
        elif mode == "dtype":
            self.weight = nn.Parameter(self.weight.detach().half())
        elif mode == "drop":
            del self.bias
        elif mode == "raise":
            with torch.no_grad():
                self.weight.zero_()
            raise ValueError("bad weights")
        elif mode == "first":
            self.register_buffer("extra", torch.zeros(2))


class FaultyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Faulty(4, 4)
        self.b = Faulty(4, 4)


@pytest.mark.parametrize("mode, match", [
    ("shape", r"'b.weight'.*shape \(3, 4\).*\(4, 4\)"),
    ("dtype", r"'b.weight'.*torch.float16.*torch.float32"),
    ("drop", r"'b.bias'.*did not produce"),
    ("raise", r"'b'.*ValueError"),
])
def test_bad_processing_is_an_error_naming_the_tensor_and_writes_nothing_of_the_unit(mode, match):
    model = FaultyNet()
    fastreload.record(model)
    source = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    reload_layerwise(model, source)
    keys = list(model.state_dict())
    before = snapshot(model)
    model.b.fault = mode
    with pytest.raises(ReloadError, match=match) as error:
        reload_layerwise(model, {k: v + 1 for k, v in source.items()}, batch_bytes=1)
    # a was written whole (its own batch), b not at all, and both still hold their objects.
    assert error.value.written_layers == ("a",) and "b" in error.value.unwritten_layers
    after = snapshot(model)
    assert torch.equal(model.a.weight, source["a.weight"] + 1)
    for name in ("b.weight", "b.bias"):
        assert after[name][0] is before[name][0] and torch.equal(after[name][2], before[name][2])
    assert list(model.state_dict()) == keys
    assert model.b.weight.requires_grad and "extra" not in dict(model.b.named_buffers())


def test_a_kernel_tensor_unknown_to_the_recording_must_be_produced():
    model = FaultyNet()
    fastreload.record(model)
    Faulty.mode = "first"
    process(model)
    Faulty.mode = None
    with pytest.raises(ReloadError, match=r"'a.extra'.*did not produce"):
        reload_layerwise(model, {k: torch.randn(v.shape) for k, v in model.state_dict().items()
                                 if "extra" not in k})


class Lazy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lazy = nn.LazyLinear(3)
        self.q = QLinear(4, 4)


def test_lazy_parameters_do_not_break_recording():
    model = Lazy()
    recording = fastreload.record(model)
    assert [m.prefix for g in recording.groups for m in g.modules] == ["q"]
    process(model)
    source = {"q.weight": torch.randn(4, 4), "q.bias": torch.randn(4)}
    report = reload_layerwise(model, source)
    assert report.replayed == ("q",)
    assert set(report.skipped["uninitialized"]) == {"lazy.weight", "lazy.bias"}


def test_process_given_as_a_mapping_or_a_callable():
    def double(module):
        with torch.no_grad():
            module.weight.mul_(2)

    for process_arg in ({"b": double}, lambda name, m: double if name == "b" else None):
        model = nn.Sequential()
        model.add_module("a", nn.Linear(2, 2))
        model.add_module("b", nn.Linear(2, 2))
        fastreload.record(model, process=process_arg)
        source = {k: torch.ones(v.shape) for k, v in model.state_dict().items()}
        report = reload_layerwise(model, source)
        assert report.replayed == ("b",)
        assert torch.equal(model.b.weight, torch.full((2, 2), 2.0))
        assert torch.equal(model.a.weight, torch.ones(2, 2))
    with pytest.raises(AttributeError):
        fastreload.record(model, process={"nope": double})


def test_source_shape_is_checked_against_the_recorded_format_before_writing():
    model = built(Net, checkpoint(Net()))
    new = checkpoint(Net(), seed=1)
    new["blocks.2.weight"] = torch.ones(8, 9)
    before = snapshot(model)
    with pytest.raises(ReloadError, match=r"blocks.2.weight.*\(8, 8\).*\(8, 9\)"):
        reload_layerwise(model, new)
    assert_untouched(model, before)


def test_kernel_names_in_the_source_are_unexpected():
    model = built(Net, checkpoint(Net()))
    new = checkpoint(Net(), seed=1)
    with pytest.raises(ReloadError) as error:
        reload_layerwise(model, {**new, "blocks.0.weight_scale": torch.ones(8)})
    assert error.value.unexpected == ("blocks.0.weight_scale",)


def shard_loader(rank, count):
    def load(param, tensor):
        param.data.copy_(tensor.chunk(count, dim=0)[rank])
    return load


@pytest.mark.parametrize("recorded", [True, False])
def test_weight_loader_is_honoured_and_reported(recorded):
    model = nn.Module()
    model.proj = nn.Linear(4, 2)
    model.proj.weight.weight_loader = shard_loader(1, 2)  # rank 1 of 2 along dim 0
    model.other = nn.Linear(2, 2)
    if recorded:
        fastreload.record(model)
    full = torch.randn(4, 4)
    source = {"proj.weight": full, "proj.bias": torch.ones(2),
              "other.weight": torch.ones(2, 2), "other.bias": torch.zeros(2)}
    pointer = model.proj.weight.data_ptr()
    report = reload_layerwise(model, source)
    assert torch.equal(model.proj.weight, full[2:])
    assert model.proj.weight.data_ptr() == pointer
    assert report.custom_loaded == ("proj.weight",)
    assert torch.equal(model.other.weight, torch.ones(2, 2))


def test_a_recorded_model_is_freed_when_dropped():
    import gc
    import weakref

    model = built(Net, checkpoint(Net()))
    reload_layerwise(model, checkpoint(Net(), seed=1))
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


class LoaderParameter(nn.Parameter):
    """An engine's parameter class, carrying a loader-side attribute."""


class Seen(nn.Module):
    """Records what its processing is given: the checkpoint-format tensors."""

    def __init__(self):
        super().__init__()
        self.weight = LoaderParameter(torch.zeros(4, 4), requires_grad=False)
        self.weight.output_dim = 0
        self.seen = []

    def process_weights_after_loading(self):
        self.seen.append(self.weight)
        self.weight = nn.Parameter(self.weight.detach() * 2, requires_grad=False)


@pytest.mark.parametrize("kind", ["mapping", "stream"])
def test_processing_gets_fresh_tensors_of_the_recorded_class_and_attributes(kind, tmp_path):
    model = Seen()
    fastreload.record(model)
    model.process_weights_after_loading()
    for value in (1.0, 2.0):
        reload_layerwise(model, as_source(kind, {"weight": torch.full((4, 4), value)}, tmp_path))
        given = model.seen[-1]
        assert type(given) is LoaderParameter and given.output_dim == 0 and not given.requires_grad
        assert torch.equal(given, torch.full((4, 4), value)) and given.is_contiguous()
        assert torch.equal(model.weight, torch.full((4, 4), 2 * value))
    first, second = model.seen[1:]
    assert first is not second and first.data_ptr() != model.weight.data_ptr()
    first.extra = True  # what processing does to one reload's tensors stays there
    reload_layerwise(model, {"weight": torch.ones(4, 4)})
    assert not hasattr(model.seen[-1], "extra")


@pytest.mark.parametrize("kind", ["mapping", "stream"])
def test_a_source_dtype_the_copy_cannot_convert_is_refused_before_writing(kind, tmp_path):
    model = built(Net, checkpoint(Net()))
    new = checkpoint(Net(), seed=1)
    new["blocks.1.weight"] = new["blocks.1.weight"].to(torch.float8_e4m3fnuz)  # floating, not convertible
    before = snapshot(model)
    with pytest.raises(ReloadError, match=r"blocks.1.weight.*cannot convert.*float8_e4m3fnuz") as error:
        reload_layerwise(model, as_source(kind, new, tmp_path))
    assert list(error.value.mismatched) == ["blocks.1.weight"]
    if kind == "mapping":
        assert_untouched(model, before)


# Per batch of units, one copy into the temporaries and one of the results; then
# the direct layers (embed, norm): one batch, or one each at a 1-byte budget.
@pytest.mark.parametrize("batch_bytes, calls", [(None, 2 + 1), (1, 3 * 2 + 2)])
def test_units_are_replayed_in_batches_of_the_budget(batch_bytes, calls):
    model = built(Net, checkpoint(Net()))
    new = checkpoint(Net(), seed=1)
    report = reload_layerwise(model, new, batch_bytes=batch_bytes)
    assert report.batched_copy_calls == calls
    assert_same_state(model, built(Net, new, recorded=False))


class WithState(nn.Module):
    """Processing that leaves plain attributes: a Python number, a tensor that is not
    registered (kernels may hold its address), and a view of its weight."""

    bad = None  # what the next processing does wrong

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 4), requires_grad=False)

    def process_weights_after_loading(self):
        self.max_abs = float(self.weight.abs().max())
        if "lut" in self.__dict__:
            self.lut.copy_(self.weight.sum(dim=0))  # in place, as a kernel's workspace
        else:
            self.lut = self.weight.sum(dim=0)
        self.weight_t = self.weight.t()  # a view: the live one views the live weight
        if self.bad == "new tensor":
            self.extra = torch.ones(2)
        elif self.bad == "list":
            self.parts = [self.weight[:2], self.weight[2:]]
        elif self.bad == "shape":
            self.lut = torch.zeros(5)
        elif self.bad == "not a tensor":
            self.lut = 3


def with_state(bad=None):
    model = nn.Module()
    model.a = WithState()
    model.b = WithState()
    fastreload.record(model)
    model.load_state_dict({"a.weight": torch.ones(4, 4), "b.weight": torch.ones(4, 4)})
    for m in (model.a, model.b):
        m.process_weights_after_loading()
    model.a.bad = bad
    return model


@pytest.mark.parametrize("kind", ["mapping", "stream"])
def test_plain_attributes_left_by_processing_reach_the_live_module(kind, tmp_path):
    model = with_state()
    lut, weight_t, pointer = model.a.lut, model.a.weight_t, model.a.lut.data_ptr()
    new = {"a.weight": torch.arange(16.0).view(4, 4), "b.weight": torch.full((4, 4), -2.0)}
    reload_layerwise(model, as_source(kind, new, tmp_path))
    assert model.a.max_abs == 15.0 and model.b.max_abs == 2.0
    assert model.a.lut is lut and model.a.lut.data_ptr() == pointer
    assert torch.equal(lut, new["a.weight"].sum(dim=0))
    assert model.a.weight_t is weight_t and torch.equal(weight_t, new["a.weight"].t())
    assert torch.equal(model.b.lut, torch.full((4,), -8.0))


@pytest.mark.parametrize("bad, name, match", [
    ("new tensor", "a.extra", "plain attribute to a tensor"),
    ("list", "a.parts", "list holding tensors"),
    ("shape", "a.lut", r"shape \(5,\)"),
    ("not a tensor", "a.lut", "replaced a tensor attribute with a int"),
])
def test_plain_attributes_that_cannot_be_written_in_place_are_refused(bad, name, match):
    model = with_state(bad)
    before = {m: (model.get_submodule(m).lut.clone(), model.get_submodule(m).max_abs) for m in ("a", "b")}
    with pytest.raises(ReloadError, match=re.escape(name) + ".*" + match) as error:
        reload_layerwise(model, {"a.weight": torch.full((4, 4), 7.0), "b.weight": torch.full((4, 4), 7.0)},
                         batch_bytes=2**20)  # both units in one batch: neither is written
    assert list(error.value.processed) == [name]
    for m, (lut, max_abs) in before.items():
        module = model.get_submodule(m)
        assert torch.equal(module.lut, lut) and module.max_abs == max_abs
        assert torch.equal(module.weight, torch.ones(4, 4))


def test_a_registration_in_another_thread_during_a_replay_is_seen():
    import threading

    from fastreload.model import registrations_unseen

    model = built(Net, checkpoint(Net()))
    layout = layout_of(model)
    with registrations_unseen():  # what a replay holds while it installs temporaries
        worker = threading.Thread(target=model.norm.register_buffer, args=("extra", torch.zeros(1)))
        worker.start()
        worker.join()
    assert layout_of(model) is not layout  # the other thread's registration counts


def test_an_unknown_name_in_place_of_a_direct_one_is_caught_with_the_replay():
    model = built(Net, checkpoint(Net()))
    new = checkpoint(Net(), seed=1)
    new["norm.bais"] = new.pop("norm.bias")  # as many names as expected, one of them wrong
    before = snapshot(model)
    with pytest.raises(ReloadError) as error:
        reload_layerwise(model, new)
    assert error.value.missing == ("norm.bias",) and error.value.unexpected == ("norm.bais",)
    assert_untouched(model, before)
