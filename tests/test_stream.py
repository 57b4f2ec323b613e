"""Reloads from a stream of (name, tensor) pairs: any order, bounded memory, errors
that say where the stream stopped."""

import gc
import random
import weakref

import pytest
import torch
from torch import nn

from fastreload import ReloadError, reload_layerwise


class Net(nn.Module):
    def __init__(self, layers=6, tie=False):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(layers))
        self.head = nn.Linear(8, 16, bias=False)
        if tie:
            self.head.weight = self.embed.weight


def checkpoint(model):
    values, seen = {}, {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape)
        values[k] = seen.setdefault(key, torch.randn(v.shape))
    return values


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def layer_of(name):
    return name.rsplit(".", 1)[0]


def layer_bytes(state):
    sizes = {}
    for k, v in state.items():
        sizes[layer_of(k)] = sizes.get(layer_of(k), 0) + v.numel() * v.element_size()
    return sizes


@pytest.mark.parametrize("order", ["model", "reverse", "random"])
def test_any_order_reloads_everything_in_place(order):
    model = Net()
    state = checkpoint(model)
    items = list(state.items())
    if order == "reverse":
        items.reverse()
    elif order == "random":
        random.Random(0).shuffle(items)
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    report = reload_layerwise(model, iter(items))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]) and v.data_ptr() == pointers[k], k
    assert report.source == "stream" and report.tensors == len(state)
    assert report.bytes_read == sum(v.numel() * v.element_size() for v in state.values())


@pytest.mark.parametrize("order", ["model", "reverse"])
def test_memory_held_stays_within_the_budget_plus_the_largest_layer(order):
    model = Net(layers=12)
    state = checkpoint(model)
    items = list(state.items())[::-1 if order == "reverse" else 1]
    budget = 1000
    report = reload_layerwise(model, items, batch_bytes=budget)
    assert report.batched_copy_calls >= 4  # 4480 bytes in batches of about 1000
    assert 0 < report.peak_held_bytes <= budget + max(layer_bytes(state).values())


def test_written_layers_release_their_incoming_tensors():
    model = Net(layers=8)
    state = checkpoint(model)
    alive = []

    def stream():
        for name, value in state.items():
            gc.collect()
            # Only the layer being assembled may still hold incoming tensors.
            assert sum(r() is not None for r in alive) <= 2, name
            tensor = value.clone()
            alive.append(weakref.ref(tensor))
            yield name, tensor
            del tensor

    reload_layerwise(model, stream(), batch_bytes=1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_duplicate_name_is_an_error_naming_written_layers():
    model = Net()
    items = list(checkpoint(model).items())
    items.insert(4, items[0])  # embed.weight again, after a layer was written
    with pytest.raises(ReloadError, match="arrived twice") as error:
        reload_layerwise(model, items, batch_bytes=1)
    assert error.value.duplicates == ("embed.weight",)
    assert "embed" in error.value.written_layers
    assert "head" in error.value.unwritten_layers


def test_a_bad_layer_stops_the_stream_and_stays_untouched():
    model = Net()
    state = checkpoint(model)
    state["blocks.3.weight"] = torch.randn(8, 9)
    before = snapshot(model)
    with pytest.raises(ReloadError, match=r"blocks.3.weight.*\(8, 8\).*\(8, 9\)") as error:
        reload_layerwise(model, state.items(), batch_bytes=1)
    assert error.value.written_layers == ("embed", "blocks.0", "blocks.1", "blocks.2")
    assert "blocks.3" in error.value.unwritten_layers
    assert "stopped after writing 4 layers" in str(error.value)
    after = model.state_dict()
    for k in ("blocks.3.weight", "blocks.3.bias", "blocks.4.weight", "head.weight"):
        assert torch.equal(after[k], before[k]), k
    assert torch.equal(after["blocks.2.weight"], state["blocks.2.weight"])


def test_generator_failing_midway():
    model = Net()
    state = checkpoint(model)

    def stream():
        for i, item in enumerate(state.items()):
            if i == 7:
                raise OSError("connection to the trainer lost")
            yield item

    with pytest.raises(ReloadError, match="connection to the trainer lost") as error:
        reload_layerwise(model, stream(), batch_bytes=1)
    assert isinstance(error.value.__cause__, OSError)
    assert error.value.written_layers and "head" in error.value.unwritten_layers


def test_missing_names_strict_and_not():
    model = Net()
    state = checkpoint(model)
    del state["blocks.5.bias"]
    before = snapshot(model)
    with pytest.raises(ReloadError, match="blocks.5.bias") as error:
        reload_layerwise(model, state.items())
    assert error.value.missing == ("blocks.5.bias",)
    # With the default budget everything complete was still waiting: nothing written.
    assert error.value.written_layers == ()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    report = reload_layerwise(model, state.items(), strict=False)
    assert report.skipped["missing"] == ("blocks.5.bias",)
    assert torch.equal(model.blocks[5].weight, state["blocks.5.weight"])
    assert torch.equal(model.blocks[5].bias, before["blocks.5.bias"])


def test_unexpected_names_strict_and_not():
    model = Net()
    items = list(checkpoint(model).items()) + [("extra.weight", torch.ones(2))]
    with pytest.raises(ReloadError, match="extra.weight"):
        reload_layerwise(model, items)
    report = reload_layerwise(model, items, strict=False)
    assert report.skipped["unexpected"] == ("extra.weight",)


def test_cap_on_held_memory():
    model = Net(layers=8)
    items = list(checkpoint(model).items())
    weights = [i for i in items if i[0].endswith("weight")]
    biases = [i for i in items if not i[0].endswith("weight")]
    # Every weight first: no layer completes until the biases come, so all are held.
    with pytest.raises(ReloadError, match="max_held_bytes=2000"):
        reload_layerwise(model, weights + biases, max_held_bytes=2000)
    reload_layerwise(model, items, batch_bytes=1, max_held_bytes=2000)


def test_tied_names_in_a_stream():
    model = Net(tie=True)
    state = checkpoint(model)
    assert state["head.weight"] is state["embed.weight"]
    report = reload_layerwise(model, list(state.items()), batch_bytes=1)
    assert torch.equal(model.head.weight, state["embed.weight"])
    assert report.tensors == len(state) - 1
    state["head.weight"] = state["embed.weight"] + 1  # arrives after embed was written
    with pytest.raises(ReloadError, match="tied names given different values: 'head.weight'"):
        reload_layerwise(model, list(state.items()), batch_bytes=1)


def test_items_must_be_name_tensor_pairs():
    model = Net()
    with pytest.raises(ReloadError, match="nothing was written:\n  a stream yields \\(name, tensor\\) pairs, got Tensor"):
        reload_layerwise(model, [torch.ones(3)])
    with pytest.raises(ReloadError, match="'embed.weight': the stream gave a list, not a tensor"):
        reload_layerwise(model, [("embed.weight", [1.0])])
    with pytest.raises(ReloadError, match="a stream's names are strings, got int 3"):
        reload_layerwise(model, [(3, torch.ones(3))])
    with pytest.raises(ReloadError, match="a stream's names are strings, got list"):
        reload_layerwise(model, [(["embed.weight"], torch.ones(3))])
    first = ("embed.weight", model.embed.weight.detach().clone())
    for name in (3, ["blocks.0.weight"], None):  # after a first name, on the common path
        with pytest.raises(ReloadError, match="a stream's names are strings"):
            reload_layerwise(model, [first, (name, torch.ones(3))])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc")
def test_resident_memory_of_a_large_stream_stays_bounded():
    # 48 layers of 4 MiB made on the fly (192 MiB in all), a 16 MiB budget: resident
    # memory may grow by the budget plus a layer or two, never by the stream's size.
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Linear(1024, 1024, bias=False) for _ in range(48))
    names = [f"layers.{i}.weight" for i in range(48)]
    gc.collect()
    baseline = _rss_bytes()
    peak = 0

    def stream():
        nonlocal peak
        for name in names:
            peak = max(peak, _rss_bytes() - baseline)
            yield name, torch.full((1024, 1024), 1.0)

    report = reload_layerwise(model, stream(), batch_bytes=16 * 2**20)
    peak = max(peak, _rss_bytes() - baseline)
    assert report.peak_held_bytes <= 16 * 2**20 + 4 * 2**20
    assert peak < 48 * 2**20, f"resident memory grew by {peak / 2**20:.0f} MiB"
    assert all(torch.equal(l.weight, torch.ones(1024, 1024)) for l in model.layers)
