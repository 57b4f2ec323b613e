"""Source names that are not the model's: rename=, and common wrappers recognised."""

import logging

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fastreload import ReloadError, reload_layerwise


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)


class Wrapped(nn.Module):
    """Names like a Hugging Face model: everything under `model.` but the head."""

    def __init__(self):
        super().__init__()
        self.model = Inner()


def values(model):
    return {k: torch.randn(v.shape) for k, v in model.state_dict().items()}


def assert_loaded(model, state, prefix_map=lambda n: n):
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[prefix_map(k)]), k


@pytest.mark.parametrize("wrap, expected", [
    (lambda n: "module." + n, "stripped wrapper prefixes"),
    (lambda n: "_orig_mod." + n, "stripped wrapper prefixes"),
    (lambda n: "module._orig_mod." + n, "stripped wrapper prefixes"),
    (lambda n: n.removeprefix("model."), "added 'model.'"),
    (lambda n: "model." + n, "stripped 'model.'"),
])
@pytest.mark.parametrize("kind", ["mapping", "stream", "file"])
def test_common_wrappers_need_no_glue(tmp_path, wrap, expected, kind):
    model = Wrapped()
    state = values(model)
    wrapped = {wrap(k): v for k, v in state.items()}
    source = {"mapping": lambda: wrapped, "stream": lambda: iter(wrapped.items()),
              "file": lambda: (save_file(wrapped, tmp_path / "w.safetensors"),
                               tmp_path / "w.safetensors")[1]}[kind]()
    report = reload_layerwise(model, source)
    assert_loaded(model, state)
    assert report.renamed.startswith(expected)


@pytest.mark.parametrize("rename", [{"ckpt.": "model."}, lambda n: n.replace("ckpt.", "model.")])
def test_explicit_rename(rename):
    model = Wrapped()
    state = values(model)
    source = {k.replace("model.", "ckpt."): v for k, v in state.items()}
    report = reload_layerwise(model, source, rename=rename)
    assert_loaded(model, state)
    assert report.renamed == "rename"
    report = reload_layerwise(model, iter(source.items()), rename=rename)
    assert_loaded(model, state)


def test_prefix_rename_uses_the_longest_match_and_can_add_a_prefix():
    model = Wrapped()
    state = values(model)
    source = {k.removeprefix("model."): v for k, v in state.items()}
    source["x.a.weight"] = source.pop("a.weight")
    reload_layerwise(model, source, rename={"": "model.", "x.": "model."})
    assert_loaded(model, state)


def test_unexplained_names_are_still_refused():
    model = Wrapped()
    source = {"module." + k: v for k, v in values(model).items()}
    source["module.other.weight"] = torch.ones(1)  # no wrapper explains this one
    with pytest.raises(ReloadError, match="not in the model"):
        reload_layerwise(model, source)


def test_rename_that_merges_names_is_refused():
    model = Wrapped()
    state = values(model)
    with pytest.raises(ReloadError, match="nothing was written:\n  rename maps several source names to one: .*both become"):
        reload_layerwise(model, state, rename=lambda n: "model.a.weight")
    with pytest.raises(TypeError, match="prefix replacements"):
        reload_layerwise(model, state, rename=["model."])


def test_progress_bar_and_log_line(capsys, caplog):
    model = Wrapped()
    state = values(model)
    with caplog.at_level(logging.INFO, logger="fastreload"):
        reload_layerwise(model, state, progress=True)
        reload_layerwise(model, iter(state.items()), progress=True, batch_bytes=1)
    assert sum("reloaded 4 tensors" in r.message for r in caplog.records) == 2
    err = capsys.readouterr().err
    assert "fastreload" in err and "100%" in err


def test_names_that_are_no_strings_are_unexpected():
    model = Wrapped()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ReloadError, match="not in the model: 1, 2"):
        reload_layerwise(model, {1: torch.ones(1), 2: torch.ones(1)})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
