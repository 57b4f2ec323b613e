"""fastreload.index_trace: the pieces a traced computation reports are where its
elements really come from, checked against the same computation run on tensors
whose every element holds its own position; what only moves elements in ways it
does not follow, or changes values, is Untraceable."""

import math
import random

import pytest
import torch

from fastreload.index_trace import Untraceable, trace


def positions(shapes):
    """Inputs whose elements hold their position among all inputs' elements."""
    out, at = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(torch.arange(at, at + n, dtype=torch.int64).view(shape))
        at += n
    return out


def assert_pieces_are_where_elements_come_from(compute, shapes):
    traced = trace(compute, [(s, torch.float32) for s in shapes])
    inputs = positions(shapes)
    real = compute(inputs)
    assert set(traced) == set(real)
    for name, tensor in real.items():
        shape, pieces = traced[name]
        assert shape == tuple(tensor.shape)
        filled = torch.full(shape, -1, dtype=torch.int64)
        for p in pieces:
            box = tuple(slice(lo, hi) for lo, hi in zip(p.lo, p.hi))
            assert bool((filled[box] == -1).all()), "pieces overlap"
            filled[box] = inputs[p.member].reshape(-1).as_strided(p.extent, p.strides, p.offset)
        assert torch.equal(filled, tensor), name


def test_experts_stacked_and_gate_up_concatenated():
    def merge(inputs):  # what MergeModulelist then Concatenate do with 3 experts
        gate, up = torch.stack(inputs[:3]), torch.stack(inputs[3:])
        return {"gate_up": torch.cat([gate, up], dim=1).contiguous()}

    assert_pieces_are_where_elements_come_from(merge, [(4, 5)] * 6)


def test_chunks_splits_transposes_and_selects():
    def ops(inputs):
        fused, other = inputs
        k, v = torch.chunk(fused, 2, dim=0)
        a, b = torch.split(other, [1, 2], dim=-1)
        return {"k": k.contiguous(), "v_t": v.t().contiguous(), "a": a.squeeze(-1), "b": b.transpose(0, 1),
                "row": other[2], "narrow": other[1:3, 1:], "permuted": torch.stack([k, v], -1).permute(2, 0, 1),
                "unsqueezed": other.unsqueeze(1).view(4, 1, 3).clone()}

    assert_pieces_are_where_elements_come_from(ops, [(6, 5), (4, 3)])


def test_random_compositions():
    """Chains of the followed ops, drawn at random, on inputs of random shapes."""
    rng = random.Random(0)
    for _ in range(60):
        shapes = [tuple(rng.randint(1, 4) for _ in range(rng.randint(1, 3)))] * rng.randint(1, 3)
        steps = [(rng.choice(["stack", "cat", "transpose", "narrow", "split", "unsqueeze", "select"]), rng.random())
                 for _ in range(5)]

        def compute(inputs, steps=steps):
            t = inputs[0]
            for step, u in steps:
                if step == "stack":
                    t = torch.stack([t] + [i.reshape(t.shape) for i in inputs[1:] if i.shape == t.shape], 0)
                elif step == "cat":
                    t = torch.cat([t, t.clone()], int(u * t.dim()))
                elif step == "transpose" and t.dim() > 1:
                    t = t.transpose(0, t.dim() - 1)
                elif step == "narrow" and t.shape[-1] > 1:
                    t = t[..., 1:]
                elif step == "split" and t.shape[0] > 1:
                    t = torch.split(t, 1, dim=0)[int(u * t.shape[0])]
                elif step == "unsqueeze":
                    t = t.unsqueeze(int(u * (t.dim() + 1)))
                elif step == "select" and t.dim() > 1:
                    t = t.select(0, int(u * t.shape[0]))
            return {"out": t.contiguous()}

        try:
            assert_pieces_are_where_elements_come_from(compute, shapes)
        except Untraceable:
            raise AssertionError(f"{steps} on {shapes} should be followed") from None


@pytest.mark.parametrize("compute, why", [
    (lambda x: {"out": x[0] * 2}, "mul"),
    (lambda x: {"out": x[0].to(torch.float16)}, "conversion"),
    (lambda x: {"out": x[0].reshape(-1)}, "view from"),
    (lambda x: {"out": x[0][::2]}, "step 2"),
    (lambda x: {"out": torch.cat([x[0], torch.zeros(2, 3, device=x[0].device)])}, "another source"),
    (lambda x: {"out": torch.zeros(2, 3)}, "not made of"),
])
def test_what_is_not_followed_is_untraceable(compute, why):
    with pytest.raises(Untraceable, match=why):
        trace(compute, [((4, 3), torch.float32)])
