"""A receiver's static schedule: for one manifest and one model, which bytes of
which bucket go where, decided once and reused by every update with that manifest.

The manifest is checked against the model exactly as a mapping would be, with
placeholder tensors: views of an address range as long as the wire, reserved and
never touched (no memory behind it), laid out as the wire is. Every pair the
checks accept (a model tensor or region, and a placeholder or its shard) is then
moved onto the buckets by address: a source view inside one bucket becomes the
same view of that bucket's buffer; a contiguous one running over several buckets
is cut at their edges; any other one is gathered in a staging tensor first.
"""

from __future__ import annotations

import bisect
import mmap
from dataclasses import dataclass, field

import torch
from torch import nn

from fastreload import ops
from fastreload.reload import Checked, check_mapping
from fastreload.sync.manifest import Manifest
from fastreload.sync.protocol import BUCKET_HEADER_BYTES as HEAD

__all__ = ["BucketWork", "Schedule", "make_schedule"]


@dataclass
class BucketWork:
    """What arrives with one bucket."""

    dsts: list[torch.Tensor] = field(default_factory=list)  # model tensors, regions, staging pieces
    srcs: list[torch.Tensor] = field(default_factory=list)  # views of the bucket's buffer
    # From staging tensors completed by this bucket, copied after the pairs above.
    after_dsts: list[torch.Tensor] = field(default_factory=list)
    after_srcs: list[torch.Tensor] = field(default_factory=list)
    # Checkpoint tensors of replayed units complete with this bucket: (model name or
    # (source name, Target), a view of the buffer or a staging tensor, in the buffer).
    replayed: list[tuple[object, torch.Tensor, bool]] = field(default_factory=list)
    units_done: list[int] = field(default_factory=list)  # layers complete once it is written
    copy: ops.BoundCopy | None = None
    sources: tuple = ()

    def bind(self) -> None:
        if self.dsts:
            self.copy = ops.BoundCopy(self.dsts, [len(self.dsts)])
            self.sources = tuple(self.srcs)


@dataclass
class Schedule:
    manifest: Manifest
    digest: bytes
    checked: Checked
    buffers: list[torch.Tensor]  # two, a bucket header and bucket_bytes each
    buckets: list[BucketWork]
    unit_names: list[str]
    touched_units: set[int]
    staging_bytes: int

    @property
    def tensors(self) -> int:
        return self.checked.work.tensors

    def layers(self, written_units: set[int], replay_written: list[str], replay_unwritten: list[str]
               ) -> tuple[list[str], list[str]]:
        names = self.unit_names
        written = [names[u] for u in sorted(written_units)]
        unwritten = [n for u, n in enumerate(names) if u not in written_units]
        return replay_written + written, replay_unwritten + unwritten


def _placeholders(manifest: Manifest) -> tuple[dict[str, torch.Tensor], torch.Tensor, mmap.mmap]:
    """Every entry as a view of a reserved, untouched range laid out as the wire."""
    reserved = mmap.mmap(-1, max(manifest.wire_bytes, 1),
                         flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
    base = torch.frombuffer(reserved, dtype=torch.uint8)
    views: dict[str, torch.Tensor] = {}
    for e in manifest.entries:
        if e.same_as is not None:
            views[e.name] = views[e.same_as]  # the same object: tied names agree
        else:
            views[e.name] = base[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape)
    return views, base, reserved


def _extent(v: torch.Tensor, base: int) -> tuple[int, int]:
    start = v.data_ptr() - base
    if v.numel() == 0:
        return start, start
    last = sum((s - 1) * st for s, st in zip(v.shape, v.stride()))
    return start, start + (last + 1) * v.element_size()


class _Builder:
    def __init__(self, manifest: Manifest, base: torch.Tensor, device: torch.device, pin: bool) -> None:
        self.manifest = manifest
        self.B = manifest.bucket_bytes
        self.base = base.data_ptr()
        size = min(self.B, -(-manifest.wire_bytes // 64) * 64)  # a model smaller than a bucket needs no more
        self.buffers = [torch.empty(HEAD + size, dtype=torch.uint8, device=device, pin_memory=pin)
                        for _ in range(min(manifest.buckets, 2))]
        self.buckets = [BucketWork() for _ in range(manifest.buckets)]
        self.typed: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self.staged: dict[int, torch.Tensor] = {}  # wire offset of an entry -> its staging bytes
        self.staging_bytes = 0
        starts = sorted({e.offset for e in manifest.entries if e.same_as is None and e.nbytes})
        self.starts = starts
        self.sizes = {e.offset: e.nbytes for e in manifest.entries if e.same_as is None and e.nbytes}

    def _typed(self, k: int, dtype: torch.dtype) -> torch.Tensor:
        view = self.typed.get((k, dtype))
        if view is None:
            view = self.typed[k, dtype] = self.buffers[k][HEAD:].view(dtype)
        return view

    def _entry_of(self, start: int) -> tuple[int, int]:
        """(offset, nbytes) of the manifest entry holding the wire byte `start`."""
        i = bisect.bisect_right(self.starts, start) - 1
        offset = self.starts[i]
        return offset, self.sizes[offset]

    def _staging(self, offset: int, nbytes: int) -> torch.Tensor:
        """The bytes of the entry at `offset`, gathered piece by piece as its buckets come."""
        staged = self.staged.get(offset)
        if staged is None:
            staged = self.staged[offset] = torch.empty(nbytes, dtype=torch.uint8, device=self.buffers[0].device)
            self.staging_bytes += nbytes
            B = self.B
            for b in range(offset // B, (offset + nbytes - 1) // B + 1):
                a, z = max(offset, b * B), min(offset + nbytes, (b + 1) * B)
                self.buckets[b].dsts.append(staged[a - offset:z - offset])
                self.buckets[b].srcs.append(self.buffers[b % 2][HEAD + a - b * B:HEAD + z - b * B])
        return staged

    def source(self, v: torch.Tensor) -> tuple[int, torch.Tensor, bool] | None:
        """(last bucket, the real source, whether it is a view of that bucket) of a
        placeholder view lying in one bucket or gathered in staging; None for a
        view that runs over several buckets and can be cut (see pairs())."""
        start, end = _extent(v, self.base)
        B = self.B
        es = v.element_size()
        if end == start:
            return 0, torch.empty(v.shape, dtype=v.dtype, device=self.buffers[0].device), False
        first, last = start // B, (end - 1) // B
        if first == last:
            typed = self._typed(first % 2, v.dtype)  # as_strided counts from its storage's start
            real = typed.as_strided(v.shape, v.stride(), typed.storage_offset() + (start - first * B) // es)
            return first, real, True
        offset, nbytes = self._entry_of(start)
        staged = self._staging(offset, nbytes).view(v.dtype)
        real = staged.as_strided(v.shape, v.stride(), (start - offset) // es)
        return (offset + nbytes - 1) // B, real, False

    def pair(self, dst: torch.Tensor, v: torch.Tensor) -> list[int]:
        """Schedules dst <- placeholder view v; returns the buckets it touches."""
        start, end = _extent(v, self.base)
        B = self.B
        first, last = (start // B, (end - 1) // B) if end > start else (0, 0)
        if first != last and v.is_contiguous() and dst.is_contiguous():
            es, flat = v.element_size(), dst.view(-1)
            for b in range(first, last + 1):
                a, z = max(start, b * B), min(end, (b + 1) * B)
                self.buckets[b].dsts.append(flat[(a - start) // es:(z - start) // es])
                self.buckets[b].srcs.append(self._typed(b % 2, v.dtype)[(a - b * B) // es:(z - b * B) // es])
            return list(range(first, last + 1))
        bucket, real, in_buffer = self.source(v)
        if not real.numel():
            return []
        work = self.buckets[bucket]
        if in_buffer:
            work.dsts.append(dst)
            work.srcs.append(real)
        else:
            work.after_dsts.append(dst)
            work.after_srcs.append(real)
        return [bucket]


def make_schedule(model: nn.Module, manifest: Manifest, digest: bytes, device: torch.device, *,
                  strict: bool, rename, batch_bytes: int, replay_batch_bytes: int) -> Schedule:
    """Checks the manifest against the model as reload_layerwise checks a mapping
    (raising ReloadError, nothing written) and schedules every accepted pair."""
    views, base, reserved = _placeholders(manifest)
    checked = check_mapping(model, views, strict=strict, rename=rename, batch_bytes=batch_bytes,
                            replay_batch_bytes=replay_batch_bytes)
    work = checked.work
    pin = (device.type == "cpu" and torch.cuda.is_available()
           and any(t.tensor.is_cuda for t in checked.layout.targets))
    builder = _Builder(manifest, base, device, pin)

    # The layer of each pair, by the address of its destination.
    targets = checked.plan.layout.targets
    spans = sorted((t.tensor.data_ptr(), i) for i, t in enumerate(targets) if t.tensor.numel())
    addresses = [a for a, _ in spans]
    unit_of = checked.plan.unit_of
    touched: dict[int, int] = {}  # layer -> the last bucket it waits for
    for dst, src in zip(work.dsts, work.srcs):
        buckets = builder.pair(dst, src)
        if dst.numel() and buckets:
            i = bisect.bisect_right(addresses, dst.data_ptr()) - 1
            unit = unit_of[spans[max(i, 0)][1]]
            touched[unit] = max(touched.get(unit, 0), max(buckets))
    for unit, last in touched.items():
        builder.buckets[last].units_done.append(unit)

    session = checked.session
    if session is not None:
        source = checked.source
        index = session.plan.index
        for name in source:
            if name in index:
                last, real, in_buffer = _whole(builder, source[name])
                builder.buckets[last].replayed.append((name, real, in_buffer))
        for target, name in getattr(source, "regions", ()):
            if target.name in index:
                last, real, in_buffer = _whole(builder, source.original(name))
                builder.buckets[last].replayed.append(((name, target), real, in_buffer))
    for bucket in builder.buckets:
        bucket.bind()
    # The placeholders still held (by the checks' results) keep the reserved range
    # mapped: address space only, never memory.
    del reserved
    names = [u.prefix or "<root>" for u in checked.plan.layout.units]
    return Schedule(manifest, digest, checked, builder.buffers, builder.buckets, names, set(touched),
                    builder.staging_bytes)


def _whole(builder: _Builder, v: torch.Tensor) -> tuple[int, torch.Tensor, bool]:
    """A replayed unit's checkpoint tensor whole: in one bucket, or gathered."""
    start, end = _extent(v, builder.base)
    B = builder.B
    if end > start and start // B != (end - 1) // B:
        offset, nbytes = builder._entry_of(start)
        staged = builder._staging(offset, nbytes).view(v.dtype)
        return (offset + nbytes - 1) // B, staged.as_strided(v.shape, v.stride(), (start - offset) // v.element_size()), False
    return builder.source(v)

