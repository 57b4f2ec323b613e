"""The regions of one converter group (a converter's checkpoint tensors of one
layer: 128 experts' gate, up and down projections): for each checkpoint tensor,
the Targets of the model tensors it lands in, exactly as transformers'
conversion puts it there.

Two ways, the same answer:
- traced: the conversion runs on meta tensors and the trace follows every
  element (fastreload/index_trace.py). No memory, any size; a conversion made of
  stacks, concatenations, splits, chunks and transposes (the experts of every MoE).
- probed: the conversion runs on integer tensors, each element holding its own
  position, and each output says which element landed where. It follows any
  index-moving operation (RoPE permutations, interleaving), at the cost of a
  group's size in memory, and only below 2**31 elements.

Both check each Target element by element (the trace on the strides of the
views, the probe on their values) and refuse what is not a view, naming the
operation and the model type.
"""

from __future__ import annotations

import itertools
import math
from copy import deepcopy
from dataclasses import replace

import torch

from fastreload.errors import ReloadError
from fastreload.index_trace import Piece, Untraceable, contiguous_strides, trace
from fastreload.regions import RegionProblem, Target, region_views

__all__ = ["group_regions"]

# Probes are int32 positions: a probed group has fewer elements than int32 counts
# (and costs about 12 bytes per element while probed). Conversions of larger groups
# (DeepSeek-V3's 256 experts of a layer, 1.1e10) are traced.
_PROBE_ELEMENTS_MAX = 2**31 - 1



def _run(loading, model, converter, first: str, members, make) -> dict[str, torch.Tensor]:
    converter = deepcopy(converter)
    for pattern, name in members:
        converter.add_tensor(first, name, pattern, make(name))
    with torch.no_grad():
        out = converter.convert(first, model=model, config=model.config)
    return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}


def _operations(converter) -> str:
    return ", ".join(type(op).__name__ for op in getattr(converter, "operations", ())) or "renaming"


def group_regions(loading, model, model_type: str, converter, first: str, members, shapes, meta,
                  *, traced: bool = True) -> tuple:
    """(for each member, its [(position of its model tensor among the outputs, its
    Target)], the outputs' names, their shapes) of one converter group: members are
    its (source pattern, checkpoint name)s, first the model name it is known by,
    shapes the checkpoint's (shape, dtype) by name, meta the model's tensors on the
    meta device. Traced, else (or with traced=False) probed; raises ReloadError."""
    sizes = [math.prod(shapes[n][0]) for _, n in members]
    total = sum(sizes)

    def refuse(why: str) -> ReloadError:
        return ReloadError(regions={first: (
            f"the {model_type} checkpoint conversion ({_operations(converter)}) of "
            f"{members[0][1]!r} and {len(members) - 1} more {why}; load it with from_pretrained, "
            "or give a rename")})

    untraced = "was not traced"
    if traced:
        try:
            return _traced(loading, model, converter, first, members, shapes, meta)
        except Untraceable as why:
            untraced = f"cannot be traced ({why})"
    if total > _PROBE_ELEMENTS_MAX:
        raise refuse(f"{untraced} and has {total} elements, too many to probe")
    return _probe(loading, model, converter, first, members, shapes, meta, sizes, refuse)


def _traced(loading, model, converter, first: str, members, shapes, meta) -> tuple:
    names_in = [n for _, n in members]
    position = {n: i for i, n in enumerate(names_in)}

    def compute(inputs):
        return _run(loading, model, converter, first, members, lambda n: inputs[position[n]])

    outputs = trace(compute, [shapes[n] for n in names_in])
    names = list(outputs)
    for name in names:
        if name not in meta or outputs[name][0] != tuple(meta[name].shape):
            raise Untraceable(f"it gives {name!r} of shape {outputs[name][0]}, which the model does not hold")
    result, covered = [], {name: 0 for name in names}
    for member, source in enumerate(names_in):
        shape, found, placed = tuple(shapes[source][0]), [], 0
        for at, name in enumerate(names):
            pieces = [p for p in outputs[name][1] if p.member == member]
            if not pieces:
                continue
            if len(pieces) > 1:
                raise Untraceable(f"{source!r} lands in {name!r} in {len(pieces)} pieces")
            target = _piece_target(name, outputs[name][0], pieces[0], shape)
            if target is None:
                raise Untraceable(f"{source!r} lands in {name!r} as no region a Target describes")
            found.append((at, target))
            placed += pieces[0].numel
            covered[name] += pieces[0].numel
        if not found or placed != math.prod(shape):
            raise Untraceable(f"{placed} of the {math.prod(shape)} elements of {source!r} land in the model")
        result.append(found)
    for name in names:
        if covered[name] != math.prod(outputs[name][0]):
            raise Untraceable(f"{covered[name]} of the elements of {name!r} come from the checkpoint")
    return result, names, [outputs[n][0] for n in names]


def _unravel_int(flat: int, shape) -> list[int]:
    coords = []
    for size in reversed(shape):
        coords.insert(0, flat % size if size else 0)
        flat = flat // size if size else 0
    return coords


def _piece_target(name: str, dshape: tuple, piece: Piece, shape: tuple) -> Target | None:
    """The Target that writes the member (of this shape) where the piece says, found
    the way _target finds it from a probe (the same candidates in the same order),
    and checked on the strides of its views; None if no candidate is that piece."""
    dlow, dextent = list(piece.lo), list(piece.extent)
    mstrides = contiguous_strides(shape)
    start, extent, used = _unravel_int(piece.offset, shape), [1] * len(shape), set()
    for d, e in enumerate(dextent):
        if e == 1:
            continue
        j = next((j for j in range(len(shape)) if j not in used and shape[j] > 1
                  and mstrides[j] == piece.strides[d]), None)
        if j is None:
            return None
        used.add(j)
        extent[j] = e
    if any(s + e > size for s, e, size in zip(start, extent, shape)):
        return None
    partial = [j for j, size in enumerate(shape) if extent[j] != size]
    if len(partial) > 1 or any(start[j] for j in range(len(shape)) if j not in partial):
        return None
    source = {} if not partial else {"source_slice": (start[partial[0]], extent[partial[0]]),
                                     "shard_dim": partial[0]}
    out = torch.empty(dshape, device="meta")
    member = torch.empty(shape, device="meta")
    for k, base in _region_bases(name, dshape, dlow, dextent, source):
        for p in _orders(len(dshape) - k):
            target = base if p is None else replace(base, permute=p)
            if _lands_as(target, out, member, piece):
                return target
    return None


def _region_bases(name: str, dshape: tuple, dlow: list[int], dextent: list[int], source: dict):
    """(k, Target) for each way to see the box [dlow, dlow + dextent) of a model
    tensor of shape dshape as a region: its first k indices fixed, then at most one
    partial dimension; the most indices fixed first."""
    leading = next((d for d, e in enumerate(dextent) if e != 1), len(dshape))
    for k in range(leading, -1, -1):
        rest = [d for d in range(k, len(dshape)) if dextent[d] != dshape[d]]
        if len(rest) > 1:
            continue
        region = {} if not rest else {"dim": rest[0] - k, "start": dlow[rest[0]], "length": dextent[rest[0]]}
        yield k, Target(name, index=tuple(dlow[:k]), **region, **source)


def _lands_as(target: Target, out: torch.Tensor, member: torch.Tensor, piece: Piece) -> bool:
    """Whether the target's views (of meta tensors) write exactly the piece: every
    element of the destination view inside the piece's box, and the source element
    there the one the piece names. Both views are strided, so comparing their first
    element and one step along each dimension compares them all."""
    try:
        dv, sv, _, _ = region_views(target, out, member)
    except RegionProblem:
        return False
    if dv.numel() != piece.numel:
        return False
    dshape, ostrides = tuple(out.shape), contiguous_strides(tuple(out.shape))
    first = _unravel_int(dv.storage_offset(), dshape)
    last = list(first)
    for r in range(dv.dim()):
        if dv.shape[r] == 1:
            continue
        d = next((d for d in range(len(dshape)) if dshape[d] > 1 and ostrides[d] == dv.stride(r)), None)
        if d is None or sv.stride(r) != piece.strides[d]:
            return False
        last[d] += dv.shape[r] - 1
    if any(f < lo or z >= hi for f, z, lo, hi in zip(first, last, piece.lo, piece.hi)):
        return False
    return sv.storage_offset() == piece.offset + sum((f - lo) * s for f, lo, s in zip(first, piece.lo, piece.strides))


def _probe(loading, model, converter, first: str, members, shapes, meta, sizes, refuse) -> tuple:
    """group_regions from one run of the conversion on probe tensors."""
    total = sum(sizes)
    offsets = dict(zip((n for _, n in members), itertools.accumulate([0] + sizes)))
    probes = {n: torch.arange(offsets[n], offsets[n] + math.prod(shapes[n][0]), dtype=torch.int32)
              .view(shapes[n][0]) for _, n in members}
    try:
        outputs = _run(loading, model, converter, first, members, probes.__getitem__)
    except Exception as error:  # an operation that cannot run on integers: not a view
        raise refuse(f"cannot be run on position probes ({type(error).__name__}: {error})") from None
    names = list(outputs)
    for name in names:
        if name not in meta or tuple(outputs[name].shape) != tuple(meta[name].shape):
            raise refuse(f"gives {name!r} of shape {tuple(outputs[name].shape)}, which the model does not hold")
    result, covered = [], {name: 0 for name in names}  # per member: [(output position, Target)]
    # Each output inverted: where each probe value landed in it (-1: not there).
    ordered = {name: _inverse(outputs[name], total) for name in names}
    if any(where is None for where in ordered.values()):
        raise refuse("does not give each model element one checkpoint element (values changed)")
    for pattern, source in members:
        found = []
        for position, name in enumerate(names):
            target = _target(name, outputs[name], ordered[name], probes[source], offsets[source])
            if target is not None:
                found.append((position, target))
                covered[name] += covered_by(target, outputs[name], probes[source])
        if not found or sum(covered_by(t, outputs[names[p]], probes[source]) for p, t in found) \
                != probes[source].numel():
            raise refuse(f"does not write {source!r} as views of model tensors (values changed, "
                         "or not a strided view)")
        result.append(found)
    for name in names:
        if covered[name] != outputs[name].numel():
            raise refuse(f"fills {covered[name]} of the {outputs[name].numel()} elements of {name!r} "
                         "from the checkpoint's tensors (the others are computed)")
    return result, names, [tuple(outputs[n].shape) for n in names]


def _unravel(flat: torch.Tensor, shape) -> torch.Tensor:
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat = flat // size
    return torch.stack(coords[::-1], 1) if coords else flat.new_zeros(flat.shape[0], 0)


def _coordinates(flat: torch.Tensor, shape) -> list[torch.Tensor]:
    """The index along each dimension of shape of each flat position."""
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat = flat // size
    return coords[::-1]


def covered_by(target: Target, out: torch.Tensor, probe: torch.Tensor) -> int:
    return region_views(target, out, probe)[1].numel()


def _inverse(out: torch.Tensor, total: int) -> torch.Tensor | None:
    """where[v]: the flat position in out of probe value v, -1 where v is not in out;
    None if out holds a value twice or one that is no probe position."""
    flat = out.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= total):
        return None
    where = torch.full((total,), -1, dtype=torch.int32)
    where[flat] = torch.arange(flat.numel(), dtype=torch.int32)
    return where if int((where >= 0).sum()) == flat.numel() else None


def _target(name: str, out: torch.Tensor, where: torch.Tensor, probe: torch.Tensor, offset: int) -> Target | None:
    """The Target that writes the probe's elements where the conversion put them in
    out, if they landed as a view of out (checked element by element); else None.
    where: _inverse(out)."""
    n = probe.numel()
    positions = where[offset:offset + n]
    present = positions >= 0
    if not bool(present.any()):
        return None
    values = torch.arange(n, dtype=torch.int32)
    if not bool(present.all()):
        values, positions = values[present], positions[present]
    shape = tuple(probe.shape)
    low = _unravel(values[:1], shape)[0] if shape else values[:1]
    high = _unravel(values[-1:], shape)[0] if shape else values[-1:]
    extent = [int(h - lo) + 1 for lo, h in zip(low.tolist(), high.tolist())]
    if math.prod(extent) != values.numel():
        return None
    partial = [d for d, size in enumerate(shape) if extent[d] != size]
    if len(partial) > 1:
        return None
    source = {} if not partial else {"source_slice": (int(low[partial[0]]), extent[partial[0]]),
                                     "shard_dim": partial[0]}
    dshape = tuple(out.shape)
    coords = _coordinates(positions, dshape)
    dlow, dhigh = [int(c.min()) for c in coords], [int(c.max()) for c in coords]
    dextent = [h - lo + 1 for lo, h in zip(dlow, dhigh)]
    for k, base in _region_bases(name, dshape, dlow, dextent, source):
        candidates = [base if p is None else replace(base, permute=p) for p in _orders(len(dshape) - k)]
        interleaved = _interleaved(base, coords, dlow, dextent, k, len(values))
        if interleaved is not None:
            candidates.append(interleaved)
        for target in candidates:
            try:
                dv, sv, _, _ = region_views(target, out, probe)
            except RegionProblem:
                continue
            if torch.equal(dv, sv):
                return target
    return None


def _interleaved(base: Target, coords, dlow, dextent, k: int, count: int) -> Target | None:
    """A region whose elements lie in another order than the source's (interleaved
    rows, heads permuted for RoPE): the region seen as finer dimensions, permuted.
    The finer dimensions are read off the region-local positions of the source's
    elements, innermost first; None where they are no reshape of the region."""
    local = torch.zeros(count, dtype=torch.int64)
    size = 1
    for d in range(len(coords) - 1, k - 1, -1):
        local += (coords[d] - dlow[d]) * size
        size *= dextent[d]
    sizes, strides, block = [], [], 1
    while block < count:
        firsts = local.view(count // block, block)[:, 0]
        stride = int(firsts[1] - firsts[0])
        steps = (firsts[1:] - firsts[:-1]) != stride
        run = int(steps.nonzero()[0]) + 1 if bool(steps.any()) else firsts.numel()
        n = next(n for n in range(run, 0, -1) if (count // block) % n == 0)
        if n == 1 or stride <= 0:
            return None
        sizes.insert(0, n)
        strides.insert(0, stride)
        block *= n
    order = sorted(range(len(sizes)), key=lambda j: strides[j])
    expected = 1
    for j in order:
        if strides[j] != expected:
            return None
        expected *= sizes[j]
    view = tuple(sizes[j] for j in reversed(order))  # the region, outermost first
    permute = tuple(len(sizes) - 1 - order.index(j) for j in range(len(sizes)))
    return replace(base, view=view, permute=permute)


def _orders(dims: int):
    yield None
    if dims <= 4:  # transposed layouts; more dimensions are not seen in conversions
        yield from (p for p in itertools.permutations(range(dims)) if list(p) != list(range(dims)))


