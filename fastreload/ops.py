"""Typed wrappers over torch.ops.fastreload, with the fake kernels that let the
ops trace under FakeTensor / torch.compile. Semantics live elsewhere."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

try:
    from fastreload import _C  # loading it registers the ops
except ImportError as error:
    raise ImportError(
        f"fastreload's operator library could not be loaded ({error}). Build it against the torch "
        f"in use ({torch.__version__}): `pip install --no-build-isolation .` in the source tree, "
        "or `make install`. An undefined symbol means it was built against another torch.") from error

__all__ = [
    "BoundCopy", "CheckpointTensors", "FrozenTensors", "MappedFile", "PairProblem", "ReplayableCopy", "StorageWatch",
    "ValuesInOrder",
    "batched_copy_", "batched_copy_check", "batched_copy_table",
    "batched_copy_with_table_", "converts", "guard_mapped_files", "storage_alias_mask", "storage_ptrs",
]


class PairProblem(enum.IntEnum):
    """Why batched_copy_ refuses a pair: the codes of batched_copy_check (csrc/copy_pairs.h)."""

    NONE = 0
    SHAPE = 1
    DTYPE = 2
    DEVICE = 3
    DESTINATION_OVERLAP = 4
    SOURCE_OVERLAP = 5


# The floating dtypes batched_copy_ converts between (copy_pairs.h, convertible).
_CONVERTIBLE = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16,
                          torch.float8_e4m3fn, torch.float8_e5m2})


def converts(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether batched_copy_ copies a src tensor of this dtype into a dst of that one."""
    return src == dst or (src in _CONVERTIBLE and dst in _CONVERTIBLE)


def storage_ptrs(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[N] int64 storage base address of each tensor; 0 where it has no bytes (meta, empty)."""
    return torch.ops.fastreload.storage_ptrs.default(list(tensors))


def storage_alias_mask(tensors: Sequence[torch.Tensor], against: Sequence[torch.Tensor]) -> torch.Tensor:
    """[N] bool: whether each tensor's storage is also the storage of any tensor in `against`."""
    return torch.ops.fastreload.storage_alias_mask.default(list(tensors), list(against))


def batched_copy_check(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> torch.Tensor:
    """[N] int8 PairProblem per pair: what batched_copy_ would refuse, without copying."""
    return torch.ops.fastreload.batched_copy_check.default(list(dst), list(src))


def batched_copy_(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """dst[i].copy_(src[i]) for every pair in one fused pass, converting between floating
    dtypes. Every pair is checked before the first byte is written."""
    torch.ops.fastreload.batched_copy_.default(list(dst), list(src))


def batched_copy_table(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(host table, device table): batched_copy_'s descriptors for exactly these CUDA
    pairs, built and uploaded once. Sources must be on the device or in pinned host memory."""
    host, device = torch.ops.fastreload.batched_copy_table.default(list(dst), list(src))
    return host, device


def batched_copy_with_table_(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor],
                             host_table: torch.Tensor, device_table: torch.Tensor) -> None:
    """batched_copy_ launched from a table of batched_copy_table: no allocation, upload or
    synchronization, so it can be captured in a CUDA graph. The pairs are checked as
    always, and must be the ones the table was built for."""
    torch.ops.fastreload.batched_copy_with_table_.default(list(dst), list(src), host_table, device_table)


class BoundCopy:
    """batched_copy_ into a fixed list of destinations, for copying into the same
    tensors again and again:

        copy = BoundCopy(model_tensors, batch_stops=[len(model_tensors)])
        problems = copy(new_values)  # None, or PairProblem codes with nothing written

    The destinations are read and checked once (then again only when one of them
    changed: another address, dtype, shape or strides), and each call reads the
    sources straight from the tuple, skipping the per-tensor cost of passing lists
    through torch.ops. The checks are batched_copy_'s, and the copy its backend's.
    Every pair is checked before the first batch is written; on_batch(bytes) is
    called after each batch.

    frozen=True is for destinations the caller watches itself before every call (a
    StorageWatch of them, or of the tensors they are views of): they are held as
    FrozenTensors, and each call checks their storages instead of every one. The
    sources may be FrozenTensors too: given the same object again, only their
    storages are checked."""

    def __init__(self, dst: Sequence[torch.Tensor], batch_stops: Sequence[int], *, frozen: bool = False) -> None:
        self._bound = _C.BoundCopy(list(dst), list(batch_stops), frozen)

    def __call__(self, src: Sequence[torch.Tensor] | FrozenTensors, on_batch=None) -> torch.Tensor | None:
        return self._bound.copy(src._frozen if isinstance(src, FrozenTensors) else src, on_batch)

    def __len__(self) -> int:
        return len(self._bound)


class FrozenTensors:
    """Tensors as they are now, for a BoundCopy to read again and again: held as
    aliases of their own (same storage, offset, shape, strides and dtype) that no one
    else holds, so that nothing done to the tensors given (set_, resize_, ...) changes
    what is read, and checking them is checking that each storage still has its
    address and size (csrc/python/frozen_tensors.h):

        frozen = FrozenTensors(views_of_a_mapped_file)
        copy(frozen)  # the first call checks every pair; the next ones, the storages
        frozen.unchanged()  # False once a storage was freed or resized"""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self._frozen = _C.FrozenTensors(list(tensors))

    def unchanged(self) -> bool:
        return self._frozen.unchanged()

    def __len__(self) -> int:
        return len(self._frozen)


class StorageWatch:
    """Whether tensors are still what they were when it was made: the same storage,
    seen at the same offset, shape, strides and dtype (csrc/python/storage_watch.cpp),
    asked without passing them through torch.ops:

        watch = StorageWatch(model_tensors)
        watch.unchanged()  # False once one was given other storage or seen otherwise (p.data = ...)"""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self._watch = _C.StorageWatch(list(tensors))

    def unchanged(self) -> bool:
        return self._watch.unchanged()

    def __len__(self) -> int:
        return len(self._watch)


class ValuesInOrder:
    """A dict's values read by position while it keeps the same key objects in the
    same order (csrc/python/values_in_order.cpp):

        read = ValuesInOrder(tuple(source), positions)  # positions: indexes into its keys
        read(source)  # tuple of the values at those positions, or None: read it by name

    One walk over the dict's entries, comparing key pointers, instead of one lookup
    (a string's hash, an index slot, an entry) per name."""

    def __init__(self, keys: tuple, positions: Sequence[int]) -> None:
        self._values = _C.ValuesInOrder(keys, list(positions))

    def __call__(self, source: Mapping) -> tuple | None:
        return self._values.read(source)


class MappedFile:
    """The first `size` bytes of an open file, mapped private, readable as a buffer
    (torch.frombuffer) for as long as a view of it lives (csrc/python/mapped_file.cpp).

    A read past the end of the file after another process cut it short does not
    raise SIGBUS: those pages read as zeros, and first_lost() says from which file
    offset (-1 while none was lost). guard_mapped_files() puts that protection back
    in place should another handler of SIGBUS have replaced it."""

    def __init__(self, fd: int, size: int, path: str) -> None:
        self._map = _C.MappedFile(fd, size, path)

    def buffer(self):
        return self._map

    def first_lost(self) -> int:
        return self._map.first_lost()

    def __len__(self) -> int:
        return len(self._map)


def guard_mapped_files() -> None:
    _C.guard_mapped_files()


class CheckpointTensors:
    """Fresh tensors of fixed shapes, dtypes, devices and classes, made many at a
    time, and sources checked against them in one pass (what a replay rebuilds on
    every reload, csrc/python/checkpoint_tensors.cpp):

        tensors = CheckpointTensors(entries)  # anything with shape, dtype, device, cls, ...
        tensors.fits(sources)                 # every source copies into its entry
        buffer = torch.empty(tensors.nbytes(0, n), dtype=torch.uint8)
        made = tensors.make(buffer, 0, 0, n)  # views of buffer, uninitialized

    Each entry has .shape, .dtype, .device, .cls (a torch.Tensor subclass),
    .requires_grad and .loader (not None: any source fits it)."""

    def __init__(self, entries: Sequence) -> None:
        self._tensors = _C.CheckpointTensors(
            [list(e.shape) for e in entries], [e.dtype for e in entries], [e.device for e in entries],
            [e.cls for e in entries], [e.requires_grad for e in entries], [e.loader is None for e in entries])

    def nbytes(self, begin: int, end: int) -> int:
        """Bytes of a buffer for entries [begin, end), each on a 64-byte boundary."""
        return self._tensors.nbytes(begin, end)

    def fits(self, sources: tuple, begin: int = 0) -> bool:
        """Whether every sources[k] is a tensor that batched_copy_ copies into entry
        begin + k (same shape, a dtype that converts, on its device or the host)."""
        return self._tensors.fits(sources, begin)

    def make(self, buffer: torch.Tensor, offset: int, begin: int, end: int) -> list[torch.Tensor]:
        """Entries [begin, end) as contiguous views of a 1-D uint8 buffer from byte
        offset on (a multiple of 64), of their recorded classes and requires_grad."""
        return self._tensors.make(buffer, offset, begin, end)

    def __len__(self) -> int:
        return len(self._tensors)


class ReplayableCopy:
    """A batched copy between fixed CUDA tensors that can be captured in a CUDA graph:

        copy = ReplayableCopy(model_tensors, staging_tensors)
        copy()                       # a plain call works too
        with torch.cuda.graph(g):
            copy()                   # captured; g.replay() copies the current values

    Keep the object (and so its device table) alive as long as a graph that captured it.
    """

    def __init__(self, dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
        self.dst = list(dst)
        self.src = list(src)
        self.host_table, self.device_table = batched_copy_table(self.dst, self.src)

    def __call__(self) -> None:
        batched_copy_with_table_(self.dst, self.src, self.host_table, self.device_table)


# The fake kernels below also serve the Meta dispatch key, which a real call reaches
# when its lists mix meta tensors with real ones: such a call is sent on to the
# real kernel (where meta tensors have no bytes, and copying from or into one is
# refused) rather than answered with an uninitialized tensor.
_REAL_KERNEL = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def _is_real_call(*lists) -> bool:
    return not any(is_fake(t) for tensors in lists for t in tensors)


def _has_real_tensors(*lists) -> bool:
    """A real call with tensors in it. An empty call is answered here: the real
    kernels write their result through its data pointer, which a fake mode (the one
    calling) must not be asked for."""
    return any(len(tensors) for tensors in lists) and _is_real_call(*lists)


@torch.library.register_fake("fastreload::storage_ptrs")
def _(tensors):
    if _has_real_tensors(tensors):
        return torch.ops.fastreload.storage_ptrs.default.redispatch(_REAL_KERNEL, tensors)
    return torch.empty(len(tensors), dtype=torch.int64, device="cpu")


@torch.library.register_fake("fastreload::storage_alias_mask")
def _(tensors, against):
    if _has_real_tensors(tensors, against):
        return torch.ops.fastreload.storage_alias_mask.default.redispatch(_REAL_KERNEL, tensors, against)
    return torch.empty(len(tensors), dtype=torch.bool, device="cpu")


@torch.library.register_fake("fastreload::batched_copy_check")
def _(dst, src):
    if _has_real_tensors(dst, src):
        return torch.ops.fastreload.batched_copy_check.default.redispatch(_REAL_KERNEL, dst, src)
    torch._check(len(dst) == len(src), lambda: f"got {len(dst)} destinations but {len(src)} sources")
    return torch.empty(len(dst), dtype=torch.int8, device="cpu")


@torch.library.register_fake("fastreload::batched_copy_")
def _(dst, src):
    if _is_real_call(dst, src):
        return torch.ops.fastreload.batched_copy_.default.redispatch(_REAL_KERNEL, dst, src)
    torch._check(len(dst) == len(src), lambda: f"got {len(dst)} destinations but {len(src)} sources")
    for i, (d, s) in enumerate(zip(dst, src)):
        torch._check(d.shape == s.shape, lambda: f"pair {i}: shapes {tuple(d.shape)} vs {tuple(s.shape)}")


@torch.library.register_fake("fastreload::batched_copy_table")
def _(dst, src):
    if _is_real_call(dst, src):
        if not dst and not src:  # the empty batch's empty tables
            return torch.ops.fastreload.batched_copy_table.default.redispatch(_REAL_KERNEL, dst, src)
        raise RuntimeError("batched_copy_table: meta tensors have no bytes to copy")
    torch._check(len(dst) == len(src), lambda: f"got {len(dst)} destinations but {len(src)} sources")
    size = torch.library.get_ctx().new_dynamic_size()
    return [torch.empty(size, dtype=torch.uint8, device="cpu"),
            torch.empty(size, dtype=torch.uint8, device=dst[0].device)]


@torch.library.register_fake("fastreload::batched_copy_with_table_")
def _(dst, src, host_table, device_table):
    if _is_real_call(dst, src, (host_table, device_table)):
        if not dst and not src:
            return torch.ops.fastreload.batched_copy_with_table_.default.redispatch(
                _REAL_KERNEL, dst, src, host_table, device_table)
        raise RuntimeError("batched_copy_with_table_: meta tensors have no bytes to copy")
    torch._check(len(dst) == len(src), lambda: f"got {len(dst)} destinations but {len(src)} sources")
