"""What an update sends, agreed before any byte of weights moves: every tensor's
name, dtype and shape as it travels, and where it lies on the wire.

The wire is one run of bytes cut into buckets of ``bucket_bytes``. Each tensor
starts on a 64-byte boundary; one that does not fit in what is left of a bucket
starts the next one, and one larger than a bucket runs on through as many as it
needs. Names whose tensors are the same memory (tied weights) share one slot, so
their bytes travel once. Every receiver rebuilds the same geometry from the
manifest alone: nothing has to be configured twice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from fastreload.errors import ReloadError

__all__ = ["ALIGNMENT", "Entry", "Manifest"]

# Every tensor's first byte on the wire, and every bucket size, is a multiple of
# this: any dtype's view of a bucket is aligned, and so are vectorized copies.
ALIGNMENT = 64

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.uint16, torch.uint32, torch.uint64, torch.complex64, torch.complex128)}


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype  # as it travels (the sender's wire_dtype for floating tensors)
    shape: tuple[int, ...]
    offset: int  # of its first byte on the wire
    # Another entry's name when this one travels in its slot (tied names); else None.
    same_as: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


_ITEMSIZE = {d: torch.empty((), dtype=d).element_size() for d in _DTYPES.values()}


def _itemsize(dtype: torch.dtype) -> int:
    return _ITEMSIZE[dtype]


def wire_dtype_of(dtype: torch.dtype, wire_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor of this dtype travels in."""
    return wire_dtype if wire_dtype is not None and dtype.is_floating_point else dtype


@dataclass(frozen=True)
class Manifest:
    entries: tuple[Entry, ...]
    bucket_bytes: int
    wire_bytes: int  # up to the end of the last tensor

    @functools.cached_property
    def payload_bytes(self) -> int:
        """Bytes of the weights themselves (tied names once)."""
        return sum(e.nbytes for e in self.entries if e.same_as is None)

    @property
    def buckets(self) -> int:
        return -(-self.wire_bytes // self.bucket_bytes)

    def bucket_size(self, b: int) -> int:
        """Bytes that travel in bucket b (the last one is cut at the last tensor)."""
        return min(self.bucket_bytes, self.wire_bytes - b * self.bucket_bytes)

    @classmethod
    def plan(cls, described: Iterable[tuple[str, torch.dtype, tuple[int, ...], object]],
             bucket_bytes: int) -> Manifest:
        """Lays out (name, wire dtype, shape, memory key) in this order; names with the
        same memory key (not None) share the first one's slot."""
        entries: list[Entry] = []
        slots: dict[object, str] = {}
        at = 0
        for name, dtype, shape, key in described:
            first = slots.get(key) if key is not None else None
            if first is not None:
                entries.append(Entry(name, dtype, shape, entries[_find(entries, first)].offset, first))
                continue
            nbytes = math.prod(shape) * _itemsize(dtype)
            at = _align(at)
            room = bucket_bytes - at % bucket_bytes
            if nbytes > room and at % bucket_bytes:
                at += room  # whole in the next bucket, or starting it if larger than one
            entries.append(Entry(name, dtype, tuple(shape), at))
            if key is not None:
                slots[key] = name
            at += nbytes
        return cls(tuple(entries), bucket_bytes, at)

    # -- the bytes that travel

    def encode(self) -> bytes:
        return json.dumps({
            "bucket_bytes": self.bucket_bytes, "wire_bytes": self.wire_bytes,
            "entries": [[e.name, str(e.dtype).removeprefix("torch."), list(e.shape), e.offset, e.same_as]
                        for e in self.entries],
        }, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        try:
            raw = json.loads(data.decode())
            entries = tuple(Entry(name, _DTYPES[dtype], tuple(shape), offset, same_as)
                            for name, dtype, shape, offset, same_as in raw["entries"])
            return cls(entries, int(raw["bucket_bytes"]), int(raw["wire_bytes"]))
        except (ValueError, KeyError, TypeError) as error:
            raise ReloadError(reason=f"the sender's manifest could not be read ({error!r})") from None

    def digest(self) -> bytes:
        return hashlib.blake2b(self.encode(), digest_size=16).digest()


def _find(entries: list[Entry], name: str) -> int:
    for i in range(len(entries) - 1, -1, -1):
        if entries[i].name == name:
            return i
    raise KeyError(name)


def describe(weights: Mapping, wire_dtype: torch.dtype | None) -> list[tuple[str, torch.dtype, tuple, object]]:
    """(name, wire dtype, shape, memory key) of a mapping of name to anything with
    .shape and .dtype (tensors, meta tensors, DTensors: their full shape); the key
    ties names that are the same bytes seen the same way."""
    described = []
    for name, value in weights.items():
        if not isinstance(name, str):
            raise ReloadError(reason=f"weight names must be strings, got {name!r}")
        try:
            shape, dtype = tuple(int(d) for d in value.shape), value.dtype
        except (AttributeError, TypeError):
            raise ReloadError(reason=f"{name!r}: a manifest value needs .shape and .dtype, "
                                     f"got {type(value).__name__}") from None
        if not isinstance(dtype, torch.dtype) or dtype not in _DTYPES.values():
            raise ReloadError(reason=f"{name!r}: dtype {dtype} cannot travel")
        described.append((name, wire_dtype_of(dtype, wire_dtype), shape, memory_key(value)))
    return described


def memory_key(value) -> object:
    if type(value) is not torch.Tensor and not isinstance(value, torch.nn.Parameter):
        return None  # DTensors and other subclasses: their local bytes say nothing
    if value.is_meta or value.numel() == 0:
        return None
    return (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
            value.stride(), value.dtype, value.device)
