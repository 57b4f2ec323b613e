"""Fused and sharded targets: a source tensor into a region of a model tensor (fused
QKV), a region of a source tensor (its tensor-parallel shard) into a model tensor."""

import random

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fastreload
from fastreload import ReloadError, Target, reload_layerwise

from test_reload import assert_same_objects_and_pointers, assert_untouched, snapshot

Q, K, V = 8, 4, 4  # rows of each projection (grouped-query attention: smaller k, v)
HIDDEN = 6


class Attention(nn.Module):
    def __init__(self, rows=Q + K + V, hidden=HIDDEN):
        super().__init__()
        self.qkv_proj = nn.Linear(hidden, rows, bias=False)
        self.o_proj = nn.Linear(hidden, hidden)


OFFSETS = {"q_proj": (0, Q), "k_proj": (Q, K), "v_proj": (Q + K, V)}


def fused_rename(name: str):
    module, _, leaf = name.partition(".")
    if module in OFFSETS:
        return Target("qkv_proj." + leaf, start=OFFSETS[module][0])
    return name


def checkpoint(hidden=HIDDEN):
    return {"q_proj.weight": torch.randn(Q, hidden), "k_proj.weight": torch.randn(K, hidden),
            "v_proj.weight": torch.randn(V, hidden), "o_proj.weight": torch.randn(HIDDEN, HIDDEN),
            "o_proj.bias": torch.randn(HIDDEN)}


def fused(state):
    return torch.cat([state["q_proj.weight"], state["k_proj.weight"], state["v_proj.weight"]])


def test_fused_qkv_written_in_place_in_one_fused_copy():
    model, state = Attention(), checkpoint()
    before = snapshot(model)
    report = reload_layerwise(model, state, rename=fused_rename)
    assert torch.equal(model.qkv_proj.weight, fused(state))
    assert torch.equal(model.o_proj.weight, state["o_proj.weight"])
    assert (report.tensors, report.regions, report.batched_copy_calls) == (3, 3, 1)
    after = snapshot(model)
    for name, (obj, ptr, _) in before.items():
        assert after[name][0] is obj and after[name][1] == ptr, name


def test_dict_rename_maps_full_names_to_targets():
    model, state = Attention(), checkpoint()
    rename = {f"{m}.weight": Target("qkv_proj.weight", start=start) for m, (start, _) in OFFSETS.items()}
    reload_layerwise(model, state, rename=rename)
    assert torch.equal(model.qkv_proj.weight, fused(state))


@pytest.fixture
def copies(monkeypatch) -> list[int]:
    """The number of pairs of each fused copy (a batched_copy_ or BoundCopy call); a
    Python copy_ fails the test."""
    calls = []
    real, bound = fastreload.ops.batched_copy_, fastreload.ops.BoundCopy.__call__

    def spy(dsts, srcs):
        calls.append(len(dsts))
        return real(dsts, srcs)

    def bound_spy(self, srcs, on_batch=None):
        calls.append(len(self))
        return bound(self, srcs, on_batch)

    monkeypatch.setattr(fastreload.ops, "batched_copy_", spy)
    monkeypatch.setattr(fastreload.ops.BoundCopy, "__call__", bound_spy)
    monkeypatch.setattr(torch.Tensor, "copy_", lambda *a, **k: pytest.fail("a Python copy_"))
    return calls


def test_copies_go_through_batched_copy(copies):
    reload_layerwise(Attention(), checkpoint(), rename=fused_rename)
    assert copies == [5]  # three regions and the two tensors of o_proj


def test_two_rank_tensor_parallel_shards():
    """Each rank takes its half of the full checkpoint: rows for a column-parallel
    layer, columns for a row-parallel one."""
    full = {"qkv_proj.weight": torch.randn(2 * (Q + K + V), HIDDEN),
            "o_proj.weight": torch.randn(HIDDEN, 2 * HIDDEN), "o_proj.bias": torch.randn(HIDDEN)}
    for rank in range(2):
        model = Attention()
        model.o_proj = nn.Linear(2 * HIDDEN // 2, HIDDEN)

        def shard(name, rank=rank):
            if name == "qkv_proj.weight":
                return Target(name, shard=(rank, 2), shard_dim=0)
            if name == "o_proj.weight":
                return Target(name, shard=(rank, 2), shard_dim=1)
            return name

        report = reload_layerwise(model, full, rename=shard)
        assert torch.equal(model.qkv_proj.weight, full["qkv_proj.weight"].chunk(2, 0)[rank])
        assert torch.equal(model.o_proj.weight, full["o_proj.weight"].chunk(2, 1)[rank])
        assert report.regions == 2


def test_sharded_source_into_a_region_and_an_explicit_source_slice():
    model = Attention(rows=Q + K)
    q_full, k = torch.randn(2 * Q, HIDDEN), torch.randn(3 * K, HIDDEN)
    rename = {"q": Target("qkv_proj.weight", start=0, shard=(1, 2)),
              "k": Target("qkv_proj.weight", start=Q, source_slice=(K, K))}
    reload_layerwise(model, {"q": q_full, "k": k, "o_proj.weight": torch.ones(HIDDEN, HIDDEN),
                             "o_proj.bias": torch.ones(HIDDEN)}, rename=rename)
    assert torch.equal(model.qkv_proj.weight, torch.cat([q_full[Q:], k[K:2 * K]]))


def test_regions_along_columns_use_the_strided_fallback():
    model = nn.Linear(2 * HIDDEN, 4, bias=False)
    a, b = torch.randn(4, HIDDEN), torch.randn(4, HIDDEN)
    reload_layerwise(model, {"a": a, "b": b}, rename={"a": Target("weight", dim=1, start=0),
                                                      "b": Target("weight", dim=1, start=HIDDEN)})
    assert torch.equal(model.weight, torch.cat([a, b], 1))


def test_safetensors_files(tmp_path):
    state = checkpoint()
    save_file(state, tmp_path / "model.safetensors")
    model = Attention()
    report = reload_layerwise(model, tmp_path / "model.safetensors", rename=fused_rename)
    assert torch.equal(model.qkv_proj.weight, fused(state))
    assert report.regions == 3 and report.source == "safetensors"


def refused(model, state, rename, **kwargs) -> ReloadError:
    before = snapshot(model)
    with pytest.raises(ReloadError) as info:
        reload_layerwise(model, state, rename=rename, **kwargs)
    assert_untouched(model, before)
    return info.value


def test_uncovered_rows_named_when_strict():
    state = checkpoint()
    del state["v_proj.weight"]
    error = refused(Attention(), state, fused_rename)
    assert "[12:16]" in error.regions["qkv_proj.weight"]
    assert "qkv_proj.weight" in error.missing


def test_uncovered_destination_left_whole_and_reported_missing_when_not_strict():
    model, state = Attention(), checkpoint()
    del state["k_proj.weight"]
    old = model.qkv_proj.weight.clone()
    report = reload_layerwise(model, state, rename=fused_rename, strict=False)
    assert torch.equal(model.qkv_proj.weight, old)  # never half-written
    assert torch.equal(model.o_proj.weight, state["o_proj.weight"])
    assert report.skipped["missing"] == ("qkv_proj.weight",)
    assert report.regions == 0


def test_overlapping_regions_refused_by_name():
    rename = {"q_proj.weight": Target("qkv_proj.weight", start=0),
              "k_proj.weight": Target("qkv_proj.weight", start=Q - 1),
              "v_proj.weight": Target("qkv_proj.weight", start=Q + K)}
    error = refused(Attention(), checkpoint(), rename)
    why = error.regions["qkv_proj.weight <- k_proj.weight"]
    assert "overlap" in why and "qkv_proj.weight[0:8]" in why and "qkv_proj.weight[7:11]" in why


def test_same_region_twice_is_a_duplicate():
    state = checkpoint()
    state["k_again"] = state["k_proj.weight"]
    rename = {**{f"{m}.weight": Target("qkv_proj.weight", start=s) for m, (s, _) in OFFSETS.items()},
              "k_again": Target("qkv_proj.weight", start=Q)}
    error = refused(Attention(), state, rename)
    assert error.duplicates == ("qkv_proj.weight[8:12] (dim 0)",)


@pytest.mark.parametrize("target, expected", [
    (Target("qkv_proj.weight", start=Q + K + 1), "outside"),
    (Target("qkv_proj.weight", start=Q + K, length=V - 1), "shape"),
    (Target("qkv_proj.weight", start=Q + K, shard=(0, 3)), "does not divide"),
    (Target("qkv_proj.weight", start=Q + K, shard=(2, 2)), "index"),
    (Target("qkv_proj.weight", dim=2, start=Q + K), "not a dimension"),
    (Target("qkv_proj.weight", start=Q + K, source_slice=(2, V)), "outside"),
])
def test_bad_region_refused_before_any_write(target, expected):
    rename = {"q_proj.weight": Target("qkv_proj.weight", start=0),
              "k_proj.weight": Target("qkv_proj.weight", start=Q), "v_proj.weight": target}
    error = refused(Attention(), checkpoint(), rename)
    assert expected in error.regions["qkv_proj.weight <- v_proj.weight"]


def test_whole_and_regions_for_one_destination_refused():
    state = checkpoint()
    state["qkv_proj.weight"] = fused(state)
    error = refused(Attention(), state, fused_rename)
    assert "both whole and in regions" in error.regions["qkv_proj.weight"]


def test_region_of_an_unknown_tensor_is_unexpected():
    state = checkpoint()
    state["extra"] = torch.ones(2)
    rename = lambda n: Target("nope.weight", start=0) if n == "extra" else fused_rename(n)  # noqa: E731
    assert refused(Attention(), state, rename).unexpected == ("nope.weight",)
    report = reload_layerwise(Attention(), state, rename=rename, strict=False)
    assert report.skipped["unexpected"] == ("nope.weight",)


def test_regions_of_a_tied_destination_write_it_once():
    model = Attention(rows=HIDDEN)
    model.o_proj.weight = model.qkv_proj.weight  # tied: qkv_proj.weight leads
    a, b = torch.randn(2, HIDDEN), torch.randn(HIDDEN - 2, HIDDEN)
    rename = {"a": Target("o_proj.weight", start=0), "b": Target("qkv_proj.weight", start=2)}
    reload_layerwise(model, {"a": a, "b": b, "o_proj.bias": torch.ones(HIDDEN)}, rename=rename)
    assert torch.equal(model.qkv_proj.weight, torch.cat([a, b]))


class Processed(nn.Linear):
    def process_weights_after_loading(self):
        self.weight = nn.Parameter(self.weight.detach().t().contiguous(), requires_grad=False)


class QuantizedQKV(nn.Module):
    """A tensor-parallel rank's fused QKV projection, quantized after loading: its
    checkpoint format is the fused, sharded bf16 weight; its kernel format an fp8
    weight with per-row scales."""

    def __init__(self, rows=Q + K + V, hidden=HIDDEN):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, hidden, dtype=torch.bfloat16), requires_grad=False)

    def process_weights_after_loading(self):
        w = self.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-6) / 448
        self.weight = nn.Parameter((w / scale[:, None]).to(torch.float8_e4m3fn), requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)


def quantized_qkv_model(rank=None):
    """Rank `rank` of 2 (columns of the hidden dim split), or the whole model."""
    model = nn.Module()
    model.qkv_proj = QuantizedQKV(hidden=HIDDEN if rank is None else HIDDEN // 2)
    fastreload.record(model)
    model.qkv_proj.process_weights_after_loading()
    return model


def rank_rename(rank):
    def rename(name):
        target = fused_rename(name)
        return Target(target.name, start=target.start, shard=(rank, 2), shard_dim=1)
    return rename


def expected_qkv(weight):
    reference = QuantizedQKV(*weight.shape)
    reference.weight.data.copy_(weight)
    reference.process_weights_after_loading()
    return reference


@pytest.mark.parametrize("kind", ["mapping", "stream", "safetensors"])
@pytest.mark.parametrize("rank", [None, 0, 1])
def test_regions_of_a_replayed_units_checkpoint_tensor(kind, rank, tmp_path):
    model = quantized_qkv_model(rank)
    state = {k: v for k, v in checkpoint().items() if not k.startswith("o_proj")}
    before = snapshot(model)
    source = state
    if kind == "stream":
        source = stream(state, ["v_proj.weight", "q_proj.weight", "k_proj.weight"])
    elif kind == "safetensors":
        save_file(state, str(tmp_path / "model.safetensors"))
        source = str(tmp_path / "model.safetensors")
    report = reload_layerwise(model, source, rename=fused_rename if rank is None else rank_rename(rank))
    weight = fused(state)
    if rank is not None:
        weight = weight.chunk(2, dim=1)[rank]
    reference = expected_qkv(weight.bfloat16())
    assert torch.equal(model.qkv_proj.weight.float(), reference.weight.float())
    assert torch.equal(model.qkv_proj.weight_scale, reference.weight_scale)
    assert report.replayed == ("qkv_proj",) and report.regions == 3 and report.tensors == 1
    after = snapshot(model)
    for name, (obj, ptr, _) in before.items():
        assert after[name][0] is obj and after[name][1] == ptr, name


@pytest.mark.parametrize("case, field", [
    ("uncovered", "regions"), ("overlap", "regions"), ("whole too", "regions"), ("twice", "duplicates"),
    ("shape", "regions"), ("dtype", "regions"),
])
@pytest.mark.parametrize("kind", ["mapping", "stream"])
def test_regions_of_a_replayed_unit_that_do_not_fit_are_refused(case, field, kind):
    model = quantized_qkv_model()
    state = {k: v for k, v in checkpoint().items() if not k.startswith("o_proj")}
    rename = fused_rename
    items = list(state.items())
    if case == "uncovered":
        items = items[:2]
    elif case == "overlap":
        rename = lambda n: Target("qkv_proj.weight", start=1) if n == "k_proj.weight" else fused_rename(n)  # noqa: E731
    elif case == "whole too":
        items.append(("qkv_proj.weight", fused(state)))
    elif case == "twice":
        items.append(("again", state["k_proj.weight"]))
        rename = lambda n: fused_rename("k_proj.weight" if n == "again" else n)  # noqa: E731
    elif case == "shape":
        items[1] = ("k_proj.weight", torch.randn(K, HIDDEN + 1))
    elif case == "dtype":
        items[1] = ("k_proj.weight", torch.ones(K, HIDDEN, dtype=torch.int32))
    before = snapshot(model)
    source = dict(items) if kind == "mapping" else iter(items)
    with pytest.raises(ReloadError) as error:
        reload_layerwise(model, source, rename=rename)
    assert getattr(error.value, field), error.value
    assert_untouched(model, before)


def test_regions_that_leave_a_replayed_tensor_uncovered_keep_its_unit_when_not_strict():
    model = quantized_qkv_model()
    state = {k: v for k, v in checkpoint().items() if k.startswith(("q_proj", "k_proj"))}
    before = snapshot(model)
    report = reload_layerwise(model, state, rename=fused_rename, strict=False)
    assert report.skipped["missing"] == ("qkv_proj.weight",) and report.replayed == ()
    assert_untouched(model, before)


def test_regions_beside_a_replayed_unit():
    model = Attention()
    model.p = Processed(2, 2, bias=False)
    fastreload.record(model)
    model.p.process_weights_after_loading()
    state = {**checkpoint(), "p.weight": torch.randn(2, 2)}
    report = reload_layerwise(model, state, rename=fused_rename)
    assert torch.equal(model.qkv_proj.weight, fused(state))
    assert torch.equal(model.p.weight, state["p.weight"].t())
    assert report.replayed == ("p",) and report.regions == 3


def stream(state, order=None):
    return iter([(name, state[name]) for name in (order or state)])


@pytest.mark.parametrize("sharded", [False, True])
def test_repeated_streams_of_regions_write_each_its_own_values(sharded):
    # Streams repeated with new values, regions whose views are kept (whole sources)
    # and regions whose views are made anew each time (shards of the sources).
    model = Attention()

    def rename(name):
        target = fused_rename(name)
        if sharded and isinstance(target, Target):
            return Target(target.name, start=target.start, shard=(1, 2), shard_dim=1)
        return target

    for round_ in range(12):
        state = checkpoint(hidden=HIDDEN * 2 if sharded else HIDDEN)
        state["o_proj.weight"], state["o_proj.bias"] = torch.randn(HIDDEN, HIDDEN), torch.randn(HIDDEN)
        order = list(state)
        random.Random(round_ % 3).shuffle(order)
        reload_layerwise(model, stream(state, order), rename=rename, batch_bytes=1)
        want = fused(state)[:, HIDDEN:] if sharded else fused(state)
        assert torch.equal(model.qkv_proj.weight, want), round_
        assert torch.equal(model.o_proj.weight, state["o_proj.weight"])


def test_stream_completes_a_layer_when_its_regions_arrived(copies):
    model, state = Attention(), checkpoint()
    order = ["q_proj.weight", "o_proj.weight", "v_proj.weight", "o_proj.bias", "k_proj.weight"]
    report = reload_layerwise(model, stream(state, order), rename=fused_rename, batch_bytes=1)
    assert torch.equal(model.qkv_proj.weight, fused(state))
    assert torch.equal(model.o_proj.bias, state["o_proj.bias"])
    assert copies == [2, 3]  # o_proj complete first, then the three regions of qkv_proj
    assert (report.regions, report.source, report.peak_held_bytes > 0) == (3, "stream", True)


def test_stream_two_rank_shard():
    full = torch.randn(2 * (Q + K + V), HIDDEN)
    model = Attention()
    rename = lambda n: Target(n, shard=(1, 2)) if n == "qkv_proj.weight" else n  # noqa: E731
    items = [("qkv_proj.weight", full), ("o_proj.weight", torch.ones(HIDDEN, HIDDEN)),
             ("o_proj.bias", torch.ones(HIDDEN))]
    reload_layerwise(model, iter(items), rename=rename)
    assert torch.equal(model.qkv_proj.weight, full[Q + K + V:])


def test_stream_uncovered_destination():
    state = checkpoint()
    del state["k_proj.weight"]
    error = refused(Attention(), stream(state), fused_rename)
    assert "[8:12]" in error.regions["qkv_proj.weight"] and "qkv_proj.weight" in error.missing
    model = Attention()
    old = model.qkv_proj.weight.clone()
    report = reload_layerwise(model, stream(state), rename=fused_rename, strict=False)
    assert torch.equal(model.qkv_proj.weight, old)
    assert report.skipped["missing"] == ("qkv_proj.weight",)
    assert torch.equal(model.o_proj.weight, state["o_proj.weight"])


def test_stream_overlap_duplicate_and_whole_refused():
    state = checkpoint()
    rename = {"q_proj.weight": Target("qkv_proj.weight", start=0),
              "k_proj.weight": Target("qkv_proj.weight", start=Q - 1)}
    error = refused(Attention(), stream(state), rename)
    assert "overlap" in error.regions["qkv_proj.weight <- k_proj.weight"]

    items = [("k_proj.weight", state["k_proj.weight"])] * 2
    error = refused(Attention(), iter(items), fused_rename)
    assert error.duplicates == ("qkv_proj.weight[8:12] (dim 0)",)

    items = [("q_proj.weight", state["q_proj.weight"]), ("qkv_proj.weight", fused(state))]
    error = refused(Attention(), iter(items), fused_rename)
    assert "both whole and in regions" in error.regions["qkv_proj.weight"]


def test_region_aimed_at_an_alias_buffer_is_ignored():
    model = Attention()
    model.qkv_proj.register_buffer("view", model.qkv_proj.weight.data[:2])  # an alias
    state = checkpoint()
    state["x"] = torch.randn(2, HIDDEN)
    rename = lambda n: Target("qkv_proj.view", start=0) if n == "x" else fused_rename(n)  # noqa: E731
    reload_layerwise(model, state, rename=rename)
    assert torch.equal(model.qkv_proj.weight, fused(state))


def stacked(experts=3, inter=4, hidden=HIDDEN):
    """Stacked experts as transformers 5 holds them: gate and up rows of each expert
    in one [E, 2I, H] parameter."""
    module = nn.Module()
    module.gate_up_proj = nn.Parameter(torch.zeros(experts, 2 * inter, hidden))
    module.down_proj = nn.Parameter(torch.zeros(experts, hidden, inter))
    return module


def test_index_selects_an_expert_and_narrow_its_rows():
    module = stacked()
    before = snapshot(module)
    state, rename = {}, {}
    for e in range(3):
        for k, leaf in enumerate(("gate", "up")):
            state[f"{e}.{leaf}"] = torch.randn(4, HIDDEN)
            rename[f"{e}.{leaf}"] = Target("gate_up_proj", index=(e,), start=4 * k)
        state[f"{e}.down"] = torch.randn(HIDDEN, 4)
        rename[f"{e}.down"] = Target("down_proj", index=(e,))
    report = reload_layerwise(module, state, rename=rename)
    for e in range(3):
        assert torch.equal(module.gate_up_proj[e], torch.cat([state[f"{e}.gate"], state[f"{e}.up"]]))
        assert torch.equal(module.down_proj[e], state[f"{e}.down"])
    assert report.regions == 9 and report.batched_copy_calls == 1
    assert_same_objects_and_pointers(module, before)


def test_permuted_and_viewed_regions():
    """A transposed checkpoint layout (permute), and rows interleaved in pairs (view,
    then permute): each written through its strided view."""
    module = stacked(experts=2)
    down = [torch.randn(4, HIDDEN) for _ in range(2)]  # stored [I, H], held [H, I]
    gate_up = [torch.randn(8, HIDDEN) for _ in range(2)]  # gate, up rows alternating in the model
    state = {**{f"down{e}": down[e] for e in range(2)}, **{f"gu{e}": gate_up[e] for e in range(2)}}
    rename = {**{f"down{e}": Target("down_proj", index=(e,), permute=(1, 0)) for e in range(2)},
              **{f"gu{e}": Target("gate_up_proj", index=(e,), view=(4, 2, HIDDEN), permute=(1, 0, 2))
                 for e in range(2)}}
    reload_layerwise(module, state, rename=rename)
    for e in range(2):
        assert torch.equal(module.down_proj[e], down[e].T)
        assert torch.equal(module.gate_up_proj[e][0::2], gate_up[e][:4])
        assert torch.equal(module.gate_up_proj[e][1::2], gate_up[e][4:])


def test_uncovered_experts_named_by_index():
    module = stacked()
    state = {f"{e}": torch.randn(HIDDEN, 4) for e in (0, 2)}
    rename = {f"{e}": Target("down_proj", index=(e,)) for e in (0, 2)}
    error = refused(module, state, rename, strict=True)
    assert "[1]" in error.regions["down_proj"] and "[0]" not in error.regions["down_proj"]


@pytest.mark.parametrize("second, shape, expected", [
    (Target("down_proj", index=(0,)), (HIDDEN, 4), "twice"),
    (Target("down_proj", index=(0,), start=1, length=2), (2, 4), "overlap"),
    (Target("down_proj", start=0, length=1), (1, HIDDEN, 4), "overlap"),
    (Target("down_proj", index=(5,)), (HIDDEN, 4), "outside"),
    (Target("down_proj", index=(0, 0, 0, 0)), (), "more entries"),
    (Target("down_proj", index=(1,), permute=(0, 0)), (4, HIDDEN), "not an order"),
    (Target("down_proj", index=(1,), view=(5, 5)), (5, 5), "cannot be seen"),
    (Target("down_proj", index=(1,), view=(2, 12)), (5, 5), "elements"),
])
def test_bad_multi_dimensional_regions_refused(second, shape, expected):
    module = stacked()
    rename = {"a": Target("down_proj", index=(0,)), "b": second}
    state = {"a": torch.randn(HIDDEN, 4), "b": torch.randn(shape)}
    before = snapshot(module)
    with pytest.raises(ReloadError) as info:
        reload_layerwise(module, state, rename=rename)
    assert_untouched(module, before)
    assert expected in str(info.value).lower()
