"""plan.Fetcher: how a reload takes a source's tensors (the rest of plan.py is
exercised through reload_layerwise in test_reload.py)."""

from collections import OrderedDict

import pytest
import torch

from fastreload.plan import Fetcher

NAMES = tuple(f"layers.{i}.weight" for i in range(12))


def values(fill: float) -> dict[str, torch.Tensor]:
    return {n: torch.full((1,), fill + i) for i, n in enumerate(NAMES)}


def test_a_dict_read_again_between_others_is_read_by_position_from_then_on():
    # What the overhead of a repeated reload rests on: a server alternating between
    # a few sources keeps a reader for them.
    fetch = Fetcher(NAMES)
    a, b, c = values(0.0), values(100.0), values(200.0)
    b = {("" + n + ".")[:-1]: v for n, v in b.items()}  # new strings, the same names
    for source in (a, b, c, a):
        assert fetch(source) == tuple(source[n] for n in NAMES)
    assert len(fetch._readers) == 1, "the second read of a did not make a reader"
    for source in (b, c, a):  # any dict with these names in this order
        assert fetch(source) == tuple(source[n] for n in NAMES)
    assert len(fetch._readers) == 1


def test_every_source_gets_its_own_values_whatever_the_readers_know():
    fetch = Fetcher(NAMES)
    a = values(0.0)
    fetch(a), fetch(a)
    reordered = dict(reversed(list(values(50.0).items())))
    extra = {**values(60.0), "lm_head.weight": torch.zeros(1)}
    ordered = OrderedDict(values(70.0))
    for source in (reordered, extra, ordered, a, reordered):
        assert fetch(source) == tuple(source[n] for n in NAMES)
    missing = values(80.0)
    del missing[NAMES[3]]
    for _ in range(3):
        with pytest.raises(KeyError):
            fetch(missing)
