"""Fused and sharded targets: a source tensor written into a region of a model
tensor (fused projections), or a region of a source tensor (its tensor-parallel
shard) written into a model tensor.

The ``rename`` of a reload names them: it returns a Target instead of a str. Every
region is a ``narrow`` view, on both sides, and the views are copied by
``batched_copy_`` with the other pairs of their batch. A destination written in
regions is complete when its regions cover it exactly, without overlap; until then
it is not written at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Pieces", "Target", "region_views"]


@dataclass(frozen=True)
class Target:
    """Where a source tensor goes, when not simply to the model tensor of a name.

    Destination side: the model tensor ``name`` (a state_dict name), whole, or its
    region ``narrow(dim, start, length)``; ``start`` defaults to 0 and ``length``
    to the (sharded) source's size along ``dim``.

    Source side: the whole source tensor, or its part ``index`` of ``count`` equal
    parts along ``shard_dim`` (``shard=(index, count)``; ``count`` must divide that
    size), or the explicit slice ``source_slice=(start, length)`` along ``shard_dim``.
    """

    name: str
    dim: int = 0
    start: int | None = None
    length: int | None = None
    shard: tuple[int, int] | None = None
    shard_dim: int = 0
    source_slice: tuple[int, int] | None = None

    @property
    def is_plain(self) -> bool:
        """The whole source into the whole destination: just a name."""
        return (self.start is None and self.length is None and self.shard is None
                and self.source_slice is None)


class RegionProblem(ValueError):
    """A region that cannot be written; the message says why."""


def _source_view(target: Target, src: torch.Tensor) -> tuple[torch.Tensor, str]:
    if target.shard is not None and target.source_slice is not None:
        raise RegionProblem("give shard=(index, count) or source_slice=(start, length), not both")
    if target.shard is None and target.source_slice is None:
        return src, ""
    dim = target.shard_dim
    if not -src.dim() <= dim < max(src.dim(), 1) or src.dim() == 0:
        raise RegionProblem(f"shard_dim={dim} is not a dimension of the source, shape {tuple(src.shape)}")
    size = src.shape[dim]
    if target.shard is not None:
        index, count = target.shard
        if count <= 0 or not 0 <= index < count:
            raise RegionProblem(f"shard={target.shard}: the index must be in [0, count)")
        if size % count:
            raise RegionProblem(f"shard count {count} does not divide the source's size {size} "
                                f"along dim {dim} (shape {tuple(src.shape)})")
        part = size // count
        start, length = index * part, part
        what = f"shard {index}/{count}"
    else:
        start, length = target.source_slice
        if start < 0 or length < 0 or start + length > size:
            raise RegionProblem(f"source_slice={target.source_slice} is outside the source's "
                                f"size {size} along dim {dim}")
        what = f"slice [{start}:{start + length}]"
    return src.narrow(dim, start, length), f" ({what} of dim {dim} of the source)"


def region_views(target: Target, dst: torch.Tensor, src: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int], str]:
    """(destination view, source view, (dim, start, stop) covered, label); raises
    RegionProblem for a region out of bounds or of another shape than its source."""
    sv, src_what = _source_view(target, src)
    if target.start is None and target.length is None:
        dv, covered = dst, (0, 0, dst.shape[0] if dst.dim() else 1)
        label = f"{target.name}{src_what}"
    else:
        dim = target.dim
        if dst.dim() == 0 or not -dst.dim() <= dim < dst.dim():
            raise RegionProblem(f"dim={dim} is not a dimension of {target.name!r}, "
                                f"shape {tuple(dst.shape)}")
        dim %= dst.dim()
        start = target.start or 0
        if target.length is not None:
            length = target.length
        elif sv.dim() == dst.dim():
            length = sv.shape[dim]
        else:
            raise RegionProblem(f"the source has {sv.dim()} dimensions, {target.name!r} "
                                f"{dst.dim()}: give length=")
        size = dst.shape[dim]
        if start < 0 or length < 0 or start + length > size:
            raise RegionProblem(f"region [{start}:{start + length}] along dim {dim} is outside "
                                f"{target.name!r}, of size {size} there (shape {tuple(dst.shape)})")
        dv, covered = dst.narrow(dim, start, length), (dim, start, start + length)
        label = f"{target.name}[{start}:{start + length}] (dim {dim}){src_what}"
    if dv.shape != sv.shape:
        raise RegionProblem(f"{label}: the region has shape {tuple(dv.shape)}, the source "
                            f"{tuple(sv.shape)}")
    return dv, sv, covered, label


@dataclass
class Pieces:
    """The regions of one destination received so far: complete when they cover it
    exactly. add() refuses an overlap, a second dimension, a repeated region."""

    name: str
    size: int  # along the regions' dimension (dim 0 until the first region says)
    dsts: list[torch.Tensor] = field(default_factory=list)
    srcs: list[torch.Tensor] = field(default_factory=list)
    spans: list[tuple[int, int, int, str]] = field(default_factory=list)  # dim, start, stop, label
    held_bytes: int = 0  # of the source tensors the views keep alive

    def add(self, dv, sv, covered, label, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Raises RegionProblem, or KeyError(label) for a region given twice."""
        dim, start, stop = covered
        for d, a, b, other in self.spans:
            if d != dim:
                raise RegionProblem(f"regions along different dimensions: {other} and {label}")
            if (a, b) == (start, stop):
                raise KeyError(label)
            if a < stop and start < b:
                raise RegionProblem(f"regions overlap: {other} and {label}")
        self.size = dst.shape[dim] if dst.dim() else 1
        self.spans.append((dim, start, stop, label))
        self.dsts.append(dv)
        self.srcs.append(sv)
        self.held_bytes += src.numel() * src.element_size()

    @property
    def complete(self) -> bool:
        return sum(b - a for _, a, b, _ in self.spans) == self.size

    def uncovered(self) -> str:
        dim = self.spans[0][0] if self.spans else 0
        gaps, at = [], 0
        for _, a, b, _ in sorted(self.spans, key=lambda s: s[1]):
            if a > at:
                gaps.append(f"[{at}:{a}]")
            at = max(at, b)
        if at < self.size:
            gaps.append(f"[{at}:{self.size}]")
        return f"regions leave uncovered rows {', '.join(gaps)} along dim {dim}"
