"""Where each element of a computation's outputs comes from, found without
computing it: the computation runs on meta tensors (no memory) under a dispatch
mode that follows every index-moving op (stack, cat, split, chunk, slice, select,
transpose, permute, unsqueeze, squeeze, clone) and keeps, for each output, the
boxes it is made of, each the strided image of a box of one input.

This is how the checkpoint conversions of a model of any size become regions
(fastreload/hf.py): DeepSeek-V3's experts of one layer are 1.1e10 elements, far
too many to probe with real tensors. An op it does not follow (a reshape across
dimensions, arithmetic, a dtype change) raises Untraceable; the caller then
probes with real tensors where that is affordable.

    pieces = trace(lambda inputs: convert(inputs), [meta_a, meta_b])
    pieces["out"]  # [Piece(...)]: out[lo:hi] comes from input `member`
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Piece", "Untraceable", "contiguous_strides", "trace"]

aten = torch.ops.aten


class Untraceable(Exception):
    """The computation does something other than move elements, or moves them in a
    way the trace does not follow; the message says what."""


@dataclass(frozen=True)
class Piece:
    """Elements [lo, hi) (a box, per dimension) of a traced tensor: element i of the
    box is input ``member``'s element at flat position
    ``offset + sum((i[d] - lo[d]) * strides[d])``."""

    lo: tuple[int, ...]
    hi: tuple[int, ...]
    member: int
    offset: int
    strides: tuple[int, ...]

    @property
    def extent(self) -> tuple[int, ...]:
        return tuple(h - lo for lo, h in zip(self.lo, self.hi))

    @property
    def numel(self) -> int:
        return math.prod(self.extent)


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.insert(0, step)
        step *= size
    return tuple(strides)


def _whole(member: int, shape: Sequence[int]) -> list[Piece]:
    if math.prod(shape) == 0:
        return []
    return [Piece((0,) * len(shape), tuple(shape), member, 0, contiguous_strides(shape))]


def _sliced(pieces: list[Piece], dim: int, start: int, stop: int) -> list[Piece]:
    """The pieces of t.narrow(dim, start, stop - start), in its coordinates."""
    out = []
    for p in pieces:
        lo, hi = max(p.lo[dim], start), min(p.hi[dim], stop)
        if lo >= hi:
            continue
        offset = p.offset + (lo - p.lo[dim]) * p.strides[dim]
        out.append(Piece(p.lo[:dim] + (lo - start,) + p.lo[dim + 1:], p.hi[:dim] + (hi - start,) + p.hi[dim + 1:],
                         p.member, offset, p.strides))
    return out


def _inserted(pieces: list[Piece], dim: int, at: int = 0) -> list[Piece]:
    """The pieces with a dimension of size 1 inserted at dim, their box at `at` along it."""
    return [Piece(p.lo[:dim] + (at,) + p.lo[dim:], p.hi[:dim] + (at + 1,) + p.hi[dim:], p.member, p.offset,
                  p.strides[:dim] + (0,) + p.strides[dim:]) for p in pieces]


def _dropped(pieces: list[Piece], dim: int) -> list[Piece]:
    """The pieces without dimension dim, of size 1."""
    return [Piece(p.lo[:dim] + p.lo[dim + 1:], p.hi[:dim] + p.hi[dim + 1:], p.member,
                  p.offset + (0 - p.lo[dim]) * p.strides[dim], p.strides[:dim] + p.strides[dim + 1:])
            for p in pieces]


def _permuted(pieces: list[Piece], order: Sequence[int]) -> list[Piece]:
    return [Piece(tuple(p.lo[d] for d in order), tuple(p.hi[d] for d in order), p.member, p.offset,
                  tuple(p.strides[d] for d in order)) for p in pieces]


def _shifted(pieces: list[Piece], dim: int, by: int) -> list[Piece]:
    return [Piece(p.lo[:dim] + (p.lo[dim] + by,) + p.lo[dim + 1:], p.hi[:dim] + (p.hi[dim] + by,) + p.hi[dim + 1:],
                  p.member, p.offset, p.strides) for p in pieces]


def _dim(dim: int, rank: int) -> int:
    return dim % rank if rank else 0


class _Trace(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.pieces: dict[int, list[Piece]] = {}
        self.alive: list[torch.Tensor] = []  # what the ids name, kept so that no id is reused

    def track(self, tensor: torch.Tensor, pieces: list[Piece]) -> None:
        self.alive.append(tensor)
        self.pieces[id(tensor)] = pieces

    def of(self, tensor) -> list[Piece] | None:
        return self.pieces.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [a for a in _flat(args, kwargs) if isinstance(a, torch.Tensor)]
        traced = [t for t in tensors if self.of(t) is not None]
        if not traced:
            return out  # nothing of the inputs in it (a new tensor made on the side)
        packet = func.overloadpacket
        rule = _RULES.get(packet)
        if rule is None:
            raise Untraceable(f"{packet.__name__} does not only move elements")
        results = rule(self, out, *args, **kwargs)
        outs = out if isinstance(out, (list, tuple)) else [out]
        for tensor, pieces in zip(outs, results):
            self.track(tensor, pieces)
        return out


def _flat(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


def _stack(trace, out, tensors, dim=0):
    dim = _dim(dim, out.dim())
    pieces = []
    for k, t in enumerate(tensors):
        pieces += _inserted(_require(trace, t), dim, k)
    return [pieces]


def _cat(trace, out, tensors, dim=0):
    dim = _dim(dim, out.dim())
    pieces, at = [], 0
    for t in tensors:
        if t.dim() == 1 and t.numel() == 0 and out.dim() != 1:
            continue  # the legacy empty tensor cat skips
        pieces += _shifted(_require(trace, t), dim, at)
        at += t.shape[dim]
    return [pieces]


def _split(trace, out, t, split_size, dim=0):
    dim = _dim(dim, t.dim())
    sizes = ([split_size] * (t.shape[dim] // split_size) + ([t.shape[dim] % split_size] if t.shape[dim] % split_size else [])
             if isinstance(split_size, int) else list(split_size))
    return _parts(trace, t, sizes, dim)


def _split_with_sizes(trace, out, t, split_sizes, dim=0):
    return _parts(trace, t, list(split_sizes), _dim(dim, t.dim()))


def _parts(trace, t, sizes, dim):
    pieces, start, results = _require(trace, t), 0, []
    for size in sizes:
        results.append(_sliced(pieces, dim, start, start + size))
        start += size
    return results


def _slice(trace, out, t, dim=0, start=None, end=None, step=1):
    if step != 1:
        raise Untraceable(f"a slice with step {step}")
    dim = _dim(dim, t.dim())
    size = t.shape[dim]
    start = 0 if start is None else (start + size if start < 0 else start)
    end = size if end is None else (end + size if end < 0 else end)
    start, end = min(max(start, 0), size), min(max(end, start), size)
    return [_sliced(_require(trace, t), dim, start, end)]


def _select(trace, out, t, dim, index):
    dim = _dim(dim, t.dim())
    index = index + t.shape[dim] if index < 0 else index
    return [_dropped(_sliced(_require(trace, t), dim, index, index + 1), dim)]


def _transpose(trace, out, t, dim0, dim1):
    order = list(range(t.dim()))
    a, b = _dim(dim0, t.dim()), _dim(dim1, t.dim())
    order[a], order[b] = order[b], order[a]
    return [_permuted(_require(trace, t), order)]


def _permute(trace, out, t, dims):
    return [_permuted(_require(trace, t), [_dim(d, t.dim()) for d in dims])]


def _t(trace, out, t):
    return [_permuted(_require(trace, t), list(range(t.dim()))[::-1])]


def _unsqueeze(trace, out, t, dim):
    return [_inserted(_require(trace, t), _dim(dim, out.dim()))]


def _squeeze(trace, out, t, dim=None):
    dims = (range(t.dim()) if dim is None else [dim] if isinstance(dim, int) else dim)
    pieces = _require(trace, t)
    for d in sorted({_dim(d, t.dim()) for d in dims if t.shape[_dim(d, t.dim())] == 1}, reverse=True):
        pieces = _dropped(pieces, d)
    return [pieces]


def _view(trace, out, t, size):
    """A view that keeps the shape, or only adds or drops dimensions of size 1."""
    old, new = list(t.shape), list(out.shape)
    if [s for s in old if s != 1] != [s for s in new if s != 1]:
        raise Untraceable(f"a view from {tuple(old)} to {tuple(new)}")
    pieces = _require(trace, t)
    for d in reversed(range(len(old))):
        if old[d] == 1:
            pieces = _dropped(pieces, d)
    for d in range(len(new)):
        if new[d] == 1:
            pieces = _inserted(pieces, d)
    return [pieces]


def _same(trace, out, t, *args, **kwargs):
    if isinstance(out, torch.Tensor) and (out.dtype != t.dtype or out.shape != t.shape):
        raise Untraceable(f"a copy into {out.dtype} {tuple(out.shape)}")
    return [_require(trace, t)]


def _to_copy(trace, out, t, *args, **kwargs):
    if out.dtype != t.dtype:
        raise Untraceable(f"a conversion from {t.dtype} to {out.dtype}")
    return [_require(trace, t)]


def _require(trace: _Trace, t) -> list[Piece]:
    pieces = trace.of(t)
    if pieces is None:
        raise Untraceable("an input made of elements of another source")
    return pieces


_RULES: dict[object, Callable] = {
    aten.stack: _stack, aten.cat: _cat, aten.split: _split, aten.split_with_sizes: _split_with_sizes,
    aten.slice: _slice, aten.select: _select, aten.transpose: _transpose, aten.permute: _permute,
    aten.t: _t, aten.unsqueeze: _unsqueeze, aten.squeeze: _squeeze, aten.view: _view,
    aten._unsafe_view: _view, aten.reshape: _view, aten.clone: _same, aten.alias: _same,
    aten.detach: _same, aten.contiguous: _same, aten._to_copy: _to_copy,
}


def trace(compute: Callable[[list[torch.Tensor]], dict[str, torch.Tensor]],
          shapes: Sequence[tuple[Sequence[int], torch.dtype]]) -> dict[str, tuple[tuple[int, ...], list[Piece]]]:
    """compute(inputs) run on meta tensors of these shapes and dtypes: the shape and
    pieces of each output it returns. Raises Untraceable."""
    mode = _Trace()
    inputs = []
    for member, (shape, dtype) in enumerate(shapes):
        t = torch.empty(tuple(shape), dtype=dtype, device="meta")
        mode.track(t, _whole(member, shape))
        inputs.append(t)
    try:
        with mode, torch.no_grad():
            outputs = compute(inputs)
    except Untraceable:
        raise
    except Exception as error:  # an operation that meta tensors cannot run
        raise Untraceable(f"{type(error).__name__}: {error}") from None
    result = {}
    for name, tensor in outputs.items():
        pieces = mode.of(tensor)
        if pieces is None:
            raise Untraceable(f"{name!r} is not made of the inputs' elements")
        result[name] = (tuple(tensor.shape), pieces)
    return result
