"""Fused, stacked and sharded targets: a source tensor written into a region of a
model tensor (a fused projection, one expert of stacked experts, a transposed
layout), or a region of a source tensor (its tensor-parallel shard) written into a
model tensor.

The ``rename`` of a reload names them: it returns a Target instead of a str. Every
region is a view, on both sides (index, narrow, view, permute), and the views are
copied by ``batched_copy_`` with the other pairs of their batch (a strided view
takes its strided path). A destination written in regions is complete when its
regions cover it exactly, without overlap; until then it is not written at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["Pieces", "Target", "dest_view", "region_views"]


@dataclass(frozen=True)
class Target:
    """Where a source tensor goes, when not simply to the model tensor of a name.

    Destination side, applied in this order to the model tensor ``name`` (a
    state_dict name):
    - ``index``: leading indices selected (``index=(7,)`` is ``tensor[7]``, expert 7
      of stacked experts);
    - ``narrow(dim, start, length)`` of that, when ``start`` or ``length`` is given;
      ``start`` defaults to 0 and ``length`` to the (sharded) source's size along
      ``dim``;
    - ``view``: that region seen in another shape (it must be a view);
    - ``permute``: its dimensions reordered (a transposed layout).

    Source side: the whole source tensor, or its part ``index`` of ``count`` equal
    parts along ``shard_dim`` (``shard=(index, count)``; ``count`` must divide that
    size), or the explicit slice ``source_slice=(start, length)`` along ``shard_dim``.
    With ``view`` given, the source is then seen in the destination region's final
    shape (same element count); otherwise the shapes must be equal.
    """

    name: str
    dim: int = 0
    start: int | None = None
    length: int | None = None
    shard: tuple[int, int] | None = None
    shard_dim: int = 0
    source_slice: tuple[int, int] | None = None
    index: tuple[int, ...] = ()
    view: tuple[int, ...] | None = None
    permute: tuple[int, ...] | None = None

    @property
    def is_plain(self) -> bool:
        """The whole source into the whole destination: just a name."""
        return (self.start is None and self.length is None and self.shard is None
                and self.source_slice is None and not self.index and self.view is None
                and self.permute is None)


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


def _indexed(target: Target, dst: torch.Tensor) -> torch.Tensor:
    index = target.index
    if len(index) > dst.dim():
        raise RegionProblem(f"index={index} has more entries than {target.name!r} has dimensions "
                            f"(shape {tuple(dst.shape)})")
    for d, i in enumerate(index):
        if not 0 <= i < dst.shape[d]:
            raise RegionProblem(f"index={index}: {i} is outside dim {d} of {target.name!r}, "
                                f"of size {dst.shape[d]} there (shape {tuple(dst.shape)})")
    return dst[index] if index else dst


def _reshaped(target: Target, dv: torch.Tensor) -> torch.Tensor:
    if target.view is not None:
        try:
            dv = dv.view(target.view)
        except RuntimeError:
            raise RegionProblem(f"view={target.view}: the region of {target.name!r}, shape "
                                f"{tuple(dv.shape)}, cannot be seen in that shape") from None
    if target.permute is not None:
        if sorted(target.permute) != list(range(dv.dim())):
            raise RegionProblem(f"permute={target.permute} is not an order of the region's "
                                f"{dv.dim()} dimensions")
        dv = dv.permute(target.permute)
    return dv


def _at(target: Target) -> str:
    return "".join(f"[{i}]" for i in target.index)


def _shaped(target: Target) -> str:
    parts = ""
    if target.view is not None:
        parts += f" viewed {tuple(target.view)}"
    if target.permute is not None:
        parts += f" permuted {tuple(target.permute)}"
    return parts


def region_views(target: Target, dst: torch.Tensor, src: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple, str]:
    """(destination view, source view, region covered, label); raises RegionProblem
    for a region out of bounds or of another shape than its source. The region
    covered is (index, dim, start, stop): rows [start, stop) along dim of the
    destination's part at index."""
    sv, src_what = _source_view(target, src)
    base = _indexed(target, dst)
    if target.start is None and target.length is None:
        dv, covered = base, (target.index, 0, 0, base.shape[0] if base.dim() else 1)
        label = f"{target.name}{_at(target)}{_shaped(target)}{src_what}"
    else:
        dim = target.dim
        if base.dim() == 0 or not -base.dim() <= dim < base.dim():
            raise RegionProblem(f"dim={dim} is not a dimension of {target.name!r}{_at(target)}, "
                                f"shape {tuple(base.shape)}")
        dim %= base.dim()
        start = target.start or 0
        if target.length is not None:
            length = target.length
        elif sv.dim() == base.dim() and target.view is None and target.permute is None:
            length = sv.shape[dim]
        else:
            raise RegionProblem(f"the source has {sv.dim()} dimensions, {target.name!r} "
                                f"{base.dim()}: give length=")
        size = base.shape[dim]
        if start < 0 or length < 0 or start + length > size:
            raise RegionProblem(f"region [{start}:{start + length}] along dim {dim} is outside "
                                f"{target.name!r}{_at(target)}, of size "
                                f"{size} there (shape {tuple(base.shape)})")
        dv, covered = base.narrow(dim, start, length), (target.index, dim, start, start + length)
        label = (f"{target.name}{_at(target)}[{start}:{start + length}] (dim {dim}){_shaped(target)}"
                 f"{src_what}")
    dv = _reshaped(target, dv)
    if target.view is not None and sv.shape != dv.shape:
        if sv.numel() != dv.numel():
            raise RegionProblem(f"{label}: the region has {dv.numel()} elements, the source "
                                f"{sv.numel()} (shape {tuple(sv.shape)})")
        sv = sv.reshape(dv.shape)
    if dv.shape != sv.shape:
        raise RegionProblem(f"{label}: the region has shape {tuple(dv.shape)}, the source "
                            f"{tuple(sv.shape)}")
    return dv, sv, covered, label


def dest_view(target: Target, dst: torch.Tensor, covered: tuple) -> torch.Tensor:
    """The destination view of a region already checked by region_views (the same
    region of another tensor of that shape: a replay's temporary)."""
    index, dim, start, stop = covered
    base = dst[index] if index else dst
    if target.start is not None or target.length is not None:
        base = base.narrow(dim, start, stop - start)
    return _reshaped(target, base)


@dataclass
class Pieces:
    """The regions of one destination received so far: complete when they cover it
    exactly. add() refuses an overlap, a second dimension at one index, a repeated
    region; add_known() takes a region of a tiling an earlier stream checked, and
    leaves the checks for when another region comes (or an error needs them)."""

    name: str
    size: int  # elements of the destination (0 until the first region says)
    dsts: list[torch.Tensor] = field(default_factory=list)
    srcs: list[torch.Tensor] = field(default_factory=list)
    spans: list[tuple[tuple[int, ...], int, int, int, str]] = field(default_factory=list)  # index, dim, start, stop, label
    targets: list[Target] = field(default_factory=list)
    # The source name of each region, where the caller gave it (a stream, to keep
    # the regions of names it may see again); else None.
    sources: list[str | None] = field(default_factory=list)
    held_bytes: int = 0  # of the source tensors the views keep alive
    covered: int = 0  # elements
    shape: tuple[int, ...] = ()
    # Spans by index; the proper prefixes of every index given (a region at a prefix
    # would contain one given deeper).
    _at: dict = field(default_factory=dict, repr=False)
    _prefixes: set = field(default_factory=set, repr=False)
    _checked: int = field(default=0, repr=False)  # spans[:_checked] are in _at

    def add(self, dv, sv, covered, label, src: torch.Tensor, dst: torch.Tensor,
            target: Target | None = None, source: str | None = None) -> None:
        """Raises RegionProblem, or KeyError(label) for a region given twice."""
        self._catch_up()
        self._claim(covered, label)
        if not self.size:
            self.size = dst.numel() if dst.dim() else 1
            self.shape = tuple(dst.shape)
        self._checked += 1
        self.spans.append((*covered, label))
        self.dsts.append(dv)
        self.srcs.append(sv)
        self.targets.append(target)
        self.sources.append(source)
        self.covered += dv.numel()
        self.held_bytes += src.nbytes

    def add_known(self, dv, sv, covered, label, nbytes: int, elements: int, size: int,
                  shape: tuple[int, ...], target: Target, source: str) -> None:
        """A region of a tiling of this destination that an earlier stream checked
        region by region: distinct regions of it cover the destination exactly, so
        only their count is kept (the caller never gives one twice)."""
        self.size, self.shape = size, shape
        self.spans.append((*covered, label))
        self.dsts.append(dv)
        self.srcs.append(sv)
        self.targets.append(target)
        self.sources.append(source)
        self.covered += elements
        self.held_bytes += nbytes

    def _catch_up(self) -> None:
        """The checks of the regions add_known took, before anything relies on them."""
        for index, dim, start, stop, label in self.spans[self._checked:]:
            self._claim((index, dim, start, stop), label)
            self._checked += 1

    def _claim(self, covered, label) -> None:
        index, dim, start, stop = covered
        at = self._at.get(index)
        if at is None:
            if index in self._prefixes or any(index[:n] in self._at for n in range(len(index))):
                other = next(s[4] for s in self.spans
                             if s[0][:len(index)] == index or index[:len(s[0])] == s[0])
                raise RegionProblem(f"regions overlap: {other} and {label}")
            at = self._at[index] = []
            self._prefixes.update(index[:n] for n in range(len(index)))
        for d, a, b, other in at:
            if d != dim:
                raise RegionProblem(f"regions along different dimensions: {other} and {label}")
            if (a, b) == (start, stop):
                raise KeyError(label)
            if a < stop and start < b:
                raise RegionProblem(f"regions overlap: {other} and {label}")
        at.append((dim, start, stop, label))

    @property
    def complete(self) -> bool:
        return self.covered == self.size

    def uncovered(self) -> str:
        self._catch_up()
        if not any(index for index, *_ in self.spans):
            return _gaps_along(self.spans, self.shape[0] if self.shape else 1, "rows")
        depth = max(len(index) for index, *_ in self.spans)
        parts, shown = [], 0
        leading = self.shape[:depth]
        for flat in range(math.prod(leading)):
            index = tuple(_unravel(flat, leading))
            spans = self._at.get(index)
            if spans is None:
                if any(index[:n] in self._at for n in range(depth)):
                    continue  # inside a region given at a shallower index
                parts.append("".join(f"[{i}]" for i in index))
            else:
                rows = self.shape[depth + spans[0][0]] if len(self.shape) > depth else 1
                if sum(b - a for _, a, b, _ in spans) == rows:
                    continue
                parts.append("".join(f"[{i}]" for i in index) + " "
                             + _gaps_along([(index, *s) for s in spans], rows, "rows"))
            shown += 1
            if shown == 10:
                parts.append("...")
                break
        return f"regions leave uncovered {', '.join(parts)} (indices along the leading dimensions)"


def _unravel(flat: int, shape) -> list[int]:
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat //= size
    return out[::-1]


def _gaps_along(spans, size: int, what: str) -> str:
    dim = spans[0][1] if spans else 0
    gaps, at = [], 0
    for _, _, a, b, _ in sorted(spans, key=lambda s: s[2]):
        if a > at:
            gaps.append(f"[{at}:{a}]")
        at = max(at, b)
    if at < size:
        gaps.append(f"[{at}:{size}]")
    return f"regions leave uncovered {what} {', '.join(gaps)} along dim {dim}"
