"""The cached layout of a model: kept while only other modules change, made again when
the model itself does."""

import threading

import pytest
import torch
from torch import nn

from fastreload import reload_layerwise
from fastreload.model import layout_of
from test_reload import Decoder, LazyBesideAlias, Mixer, assert_state_equals, fresh_values


def reloaded(model: nn.Module) -> dict[str, torch.Tensor]:
    source = fresh_values(model)
    reload_layerwise(model, source)
    assert_state_equals(model, source)
    return source


def test_building_and_changing_other_modules_keeps_the_layout():
    model = Decoder(layers=2)
    source = reloaded(model)
    layout = layout_of(model)

    other = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))  # another model built meanwhile
    other.register_buffer("extra", torch.zeros(1))
    other[0].weight = nn.Parameter(torch.zeros(4, 4))
    other.adapter = nn.Linear(4, 2)
    neighbour = Decoder(layers=1)  # and one with a layout of its own
    reloaded(neighbour)
    neighbour.layers[0].register_buffer("extra", torch.zeros(1))
    neighbour_layout = layout_of(neighbour)
    assert "layers.0.extra" in neighbour_layout.target_index

    reload_layerwise(model, source)
    assert layout_of(model) is layout
    assert layout_of(neighbour) is neighbour_layout


def test_registrations_in_the_model_make_the_layout_again():
    model = Decoder(layers=2)
    reloaded(model)

    layout = layout_of(model)
    model.layers[1].mlp.register_buffer("scale", torch.ones(4))  # a new buffer deep inside
    source = reloaded(model)
    assert layout_of(model) is not layout
    assert "layers.1.mlp.scale" in layout_of(model).target_index

    layout = layout_of(model)
    replaced = model.layers[0].mlp.up
    model.layers[0].mlp.up = nn.Linear(8, 16, bias=False)  # a replaced submodule
    source = reloaded(model)
    assert layout_of(model) is not layout
    assert "layers.0.mlp.up.bias" not in layout_of(model).target_index

    layout = layout_of(model)
    replaced.register_buffer("gone", torch.zeros(1))  # no longer part of the model
    reload_layerwise(model, source)
    assert layout_of(model) is layout

    model.extra = nn.Linear(2, 2)  # added after the layout was made
    reloaded(model)
    layout = layout_of(model)
    model.extra.register_buffer("scale", torch.ones(2))  # and then changed itself
    reloaded(model)
    assert layout_of(model) is not layout


def test_a_module_shared_by_two_models_changes_both():
    shared = nn.Linear(3, 3)
    first, second, third = nn.Module(), nn.Module(), nn.Module()
    first.shared, first.own = shared, nn.Linear(3, 1)
    second.inner = nn.Module()
    second.inner.shared = shared
    third.own = nn.Linear(3, 1)
    layouts = []
    for model in (first, second, third):
        reloaded(model)
        layouts.append(layout_of(model))
    shared.register_buffer("scale", torch.ones(3))
    for model in (first, second, third):
        reloaded(model)
    assert "shared.scale" in layout_of(first).target_index
    assert "inner.shared.scale" in layout_of(second).target_index
    assert layout_of(first) is not layouts[0]
    assert layout_of(second) is not layouts[1]
    assert layout_of(third) is layouts[2]


def test_storage_changes_and_materialization_make_the_layout_again():
    model = Decoder(layers=1)
    model.head.weight = nn.Parameter(model.embed.weight.data)  # tied by memory, not by object
    reloaded(model)
    layout = layout_of(model)
    assert layout.skipped["tied"] == ("head.weight",)
    model.head.weight.data = torch.zeros(10, 8)  # its own storage now: no registration
    source = reloaded(model)
    assert layout_of(model) is not layout
    assert torch.equal(model.head.weight, source["head.weight"])
    assert layout_of(model).skipped["tied"] == ()

    model = LazyBesideAlias()
    source = {f"mixer.{k}": v for k, v in fresh_values(Mixer()).items()}
    reload_layerwise(model, source)
    layout = layout_of(model)
    model.lazy(torch.ones(2, 5))  # materializes in place
    source["lazy.weight"], source["lazy.bias"] = torch.ones(3, 5), torch.ones(3)
    reload_layerwise(model, source)
    assert layout_of(model) is not layout
    assert torch.equal(model.lazy.weight, torch.ones(3, 5))


@pytest.mark.parametrize("inside", [True, False])
def test_a_registration_in_another_thread_counts_only_inside_the_model(inside):
    model = Decoder(layers=1)
    reloaded(model)
    layout = layout_of(model)
    module = model.layers[0].mlp.down if inside else nn.Linear(2, 2)
    worker = threading.Thread(target=module.register_buffer, args=("extra", torch.zeros(1)))
    worker.start()
    worker.join()
    assert (layout_of(model) is layout) is not inside


def test_models_sharing_modules_made_in_two_threads_both_see_a_change():
    for _ in range(20):
        shared = nn.ModuleList(nn.Linear(2, 2) for _ in range(200))
        models = [nn.Module(), nn.Module()]
        for model in models:
            model.shared = shared
        layouts = [None, None]

        def make(i):
            layouts[i] = layout_of(models[i])

        workers = [threading.Thread(target=make, args=(i,)) for i in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        shared[123].register_buffer("scale", torch.ones(2))
        assert all(layout_of(m) is not layout for m, layout in zip(models, layouts))
