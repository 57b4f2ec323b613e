"""How a sender fills its buckets: from a mapping through a packing kept between
updates (a bound fused copy per bucket), or from an iterable read once, in the
manifest's order, each tensor released once packed."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import SimpleNamespace

import torch

from fastreload import ops
from fastreload.errors import ReloadError
from fastreload.plan import Fetcher
from fastreload.sync.manifest import Entry, Manifest, memory_key, wire_dtype_of
from fastreload.sync.protocol import BUCKET_HEADER_BYTES as HEAD

__all__ = ["MappingPacking", "StreamPacker"]


class StreamPacker:
    """Fills each bucket from the weights, read in the manifest's order."""

    def __init__(self, layout: Manifest, items: Iterator, wire_dtype) -> None:
        self.layout = layout
        self.items = items
        self.wire_dtype = wire_dtype
        self.next = 0  # the next entry to read
        self.open: tuple[Entry, torch.Tensor] | None = None  # a tensor running into later buckets

    def _read(self, entry: Entry) -> torch.Tensor:
        try:
            item = next(self.items)
        except StopIteration:
            raise ReloadError(missing=[entry.name]) from None
        except Exception as error:  # the trainer's iterable failed: every rank must hear of it
            raise ReloadError(reason=f"the weights' iterable raised {type(error).__name__}: {error}") from None
        try:
            name, tensor = item
        except (TypeError, ValueError):
            raise ReloadError(reason=f"weights must be (name, tensor) pairs, got a {type(item).__name__}") from None
        if name != entry.name:
            raise ReloadError(reason=f"the weights yielded {name!r} where the manifest has {entry.name!r} next")
        if not isinstance(tensor, torch.Tensor):
            raise ReloadError(reason=f"{name!r}: expected a tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != entry.shape or wire_dtype_of(tensor.dtype, self.wire_dtype) != entry.dtype:
            raise ReloadError(mismatched={name: (
                f"the manifest says {entry.dtype} {list(entry.shape)} on the wire, the tensor is "
                f"{tensor.dtype} {list(tensor.shape)}")})
        return tensor

    def pack(self, b: int, buffer: torch.Tensor) -> None:
        layout = self.layout
        lo, hi = b * layout.bucket_bytes, b * layout.bucket_bytes + layout.bucket_size(b)
        dsts, srcs = [], []
        if self.open is not None:
            entry, flat = self.open
            self._piece(entry, flat, lo, hi, buffer, dsts, srcs)
            if entry.offset + entry.nbytes <= hi:
                self.open = None
        entries = layout.entries
        while self.next < len(entries) and entries[self.next].offset < hi:
            entry = entries[self.next]
            self.next += 1
            tensor = self._read(entry)
            if entry.same_as is not None:
                continue  # its bytes travel in the slot of the name it is tied to
            if entry.offset + entry.nbytes <= hi:
                at = entry.offset - lo
                dsts.append(buffer[HEAD + at:HEAD + at + entry.nbytes].view(entry.dtype).view(entry.shape))
                srcs.append(tensor)
            else:
                flat = tensor.reshape(-1)
                self.open = (entry, flat)
                self._piece(entry, flat, lo, hi, buffer, dsts, srcs)
        _copy(dsts, srcs)

    def finish(self) -> None:
        """Reads what is left (empty tensors after the last byte, tied names) and
        checks that the weights end with the manifest."""
        for entry in self.layout.entries[self.next:]:
            self._read(entry)
        self.next = len(self.layout.entries)
        try:
            extra = next(self.items)
        except StopIteration:
            return
        except Exception as error:
            raise ReloadError(reason=f"the weights' iterable raised {type(error).__name__}: {error}") from None
        name = extra[0] if isinstance(extra, tuple) and extra else extra
        raise ReloadError(unexpected=[name], reason="the weights go on past the manifest's last tensor")

    @staticmethod
    def _piece(entry: Entry, flat: torch.Tensor, lo: int, hi: int, buffer, dsts, srcs) -> None:
        size = torch.empty((), dtype=entry.dtype).element_size()
        a, z = max(entry.offset, lo), min(entry.offset + entry.nbytes, hi)
        dsts.append(buffer[HEAD + a - lo:HEAD + z - lo].view(entry.dtype))
        srcs.append(flat[(a - entry.offset) // size:(z - entry.offset) // size])


class MappingPacking:
    """How a mapping is packed, bucket by bucket, into the sender's two buffers: a
    bound fused copy per bucket, its sources taken from the mapping in one call
    (the first and last may be pieces of tensors running over several buckets)."""

    def __init__(self, layout: Manifest, buffers: list[torch.Tensor]) -> None:
        self.layout = layout
        self.encoded, self.digest = layout.encode(), layout.digest()
        order = [e for e in layout.entries if e.same_as is None]
        self.names = tuple(e.name for e in order)
        self.fetch = Fetcher(self.names)
        self.tied = [(e.name, e.same_as) for e in layout.entries if e.same_as is not None]
        self.shapes = [torch.Size(e.shape) for e in order]
        self.dtypes: list[torch.dtype] | None = None  # the sources', from the first mapping
        self.expected: ops.CheckpointTensors | None = None  # their shapes and devices, checked in C++
        B = layout.bucket_bytes
        # Per bucket: (piece running in, whole entries [a, z), piece running on); a
        # piece is (entry index, first element, end element) of a tensor larger
        # than what is left of the bucket.
        self.recipes, self.dsts, self.copies = [], [], []
        i, n = 0, len(order)
        for b in range(layout.buckets):
            lo, hi = b * B, b * B + layout.bucket_size(b)
            buffer, dsts = buffers[b % 2], []
            while i < n and order[i].offset + order[i].nbytes <= lo:
                i += 1  # written in earlier buckets (or empty)
            head = tail = None
            if i < n and order[i].offset < lo:
                head = self._piece(order, i, lo, hi, buffer, dsts)
                if order[i].offset + order[i].nbytes <= hi:
                    i += 1
            a = i
            if head is None or head[0] != i:  # the piece running in ended here
                while i < n and order[i].offset < hi and order[i].offset + order[i].nbytes <= hi:
                    e = order[i]
                    at = HEAD + e.offset - lo
                    dsts.append(buffer[at:at + e.nbytes].view(e.dtype).view(e.shape))
                    i += 1
                if i < n and order[i].offset < hi:
                    tail = self._piece(order, i, lo, hi, buffer, dsts)
            self.recipes.append((head, a, i, tail))
            self.dsts.append(dsts)
            self.copies.append(ops.BoundCopy(dsts, [len(dsts)]) if dsts else None)
        self.values: tuple = ()
        self._flat: dict[int, torch.Tensor] = {}

    @staticmethod
    def _piece(order, i: int, lo: int, hi: int, buffer: torch.Tensor, dsts: list) -> tuple[int, int, int]:
        e = order[i]
        size = torch.empty((), dtype=e.dtype).element_size()
        a, z = max(e.offset, lo), min(e.offset + e.nbytes, hi)
        dsts.append(buffer[HEAD + a - lo:HEAD + z - lo].view(e.dtype))
        return i, (a - e.offset) // size, (z - e.offset) // size

    def take(self, weights: Mapping) -> bool:
        """Takes this update's tensors when the mapping matches the packing."""
        if len(weights) != len(self.names) + len(self.tied):
            return False
        try:
            values = self.fetch(weights)
            dtypes = [t.dtype for t in values]
            if self.expected is None:
                if [t.shape for t in values] != self.shapes:
                    return False
            elif not self.expected.fits(values):  # shapes and devices in one pass
                return False
            for second, first in self.tied:
                if memory_key(weights[second]) != memory_key(weights[first]) or memory_key(weights[first]) is None:
                    return False
        except (KeyError, AttributeError, TypeError):
            return False
        if self.dtypes is None:
            self.dtypes = dtypes
            self.expected = ops.CheckpointTensors([
                SimpleNamespace(shape=tuple(t.shape), dtype=t.dtype, device=t.device, cls=torch.Tensor,
                                requires_grad=False, loader=None) for t in values])
        elif dtypes != self.dtypes:
            return False
        self.values, self._flat = values, {}
        return True

    def _flat_of(self, i: int) -> torch.Tensor:
        flat = self._flat.get(i)
        if flat is None:
            flat = self._flat[i] = self.values[i].reshape(-1)
        return flat

    def pack(self, b: int, buffer: torch.Tensor) -> None:
        head, a, z, tail = self.recipes[b]
        srcs = self.values[a:z]
        if head is not None:
            srcs = (self._flat_of(head[0])[head[1]:head[2]], *srcs)
        if tail is not None:
            srcs = (*srcs, self._flat_of(tail[0])[tail[1]:tail[2]])
        copy = self.copies[b]
        if copy is not None and copy(srcs) is not None:
            _copy(self.dsts[b], list(srcs))  # what the fused copy refused: a device tensor into the host

    def finish(self) -> None:
        self.values, self._flat = (), {}


def _copy(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """The bucket's pairs in one fused copy; a device tensor into a host bucket (which
    batched_copy_ does not take) by Tensor.copy_."""
    device = dsts[0].device if dsts else None
    fused = [i for i, s in enumerate(srcs) if s.device == device or s.is_cpu]
    if len(fused) == len(srcs):
        ops.batched_copy_(dsts, srcs)
        return
    ops.batched_copy_([dsts[i] for i in fused], [srcs[i] for i in fused])
    for i in set(range(len(srcs))) - set(fused):
        dsts[i].copy_(srcs[i])
