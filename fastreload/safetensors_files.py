"""safetensors files read through memory maps, as one Mapping[str, Tensor] of
zero-copy views: every header is read (with pread, not through the map) and checked
when the files are opened, before anything is written, and the fused copy reads the
files' pages straight into the model's storage.

A file another process changes meanwhile cannot crash the reload: the maps are
ops.MappedFile, whose pages past the end of a file cut short read as zeros instead
of raising SIGBUS. After the copy, every file is checked (changes()): cut short,
or rewritten in place (same inode, another size, modification or change time), the
reload raises SafetensorsError naming it and the layers written. A file replaced by
a rename meanwhile is no problem: the map holds the old one, read whole.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian
header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]},
"__metadata__": {...}}, then the data buffer the offsets point into.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import os
import stat
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from fastreload import ops
from fastreload.errors import ReloadError

__all__ = ["DTYPES", "SafetensorsError", "SafetensorsSource", "open_regular", "stamp"]

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_ITEM_SIZES = {name: torch.empty(0, dtype=dtype).element_size() for name, dtype in DTYPES.items()}

# A header larger than this is not a header (the reference reader's own limit).
MAX_HEADER_BYTES = 100_000_000


class SafetensorsError(ReloadError, ValueError):
    """A safetensors file, directory or index that cannot be read as one, or a file
    that changed while it was read: a ReloadError naming the file (``error.file``).
    Raised before anything is written, unless ``error.written_layers`` says what was.
    (Also a ValueError, as it was before it joined the ReloadError family.)"""

    def __init__(self, reason: str, *, file: str | None = None, **problems) -> None:
        super().__init__(reason=reason, file=file, **problems)


def stamp_of(st: os.stat_result) -> tuple:
    # The change time too: a file rewritten in place with its size and modification
    # time kept (cp -p, rsync --inplace -t) has a new one, which no user can set.
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def stamp(path: str) -> tuple:
    return stamp_of(os.stat(path))


def open_regular(path: str) -> int:
    """A read-only descriptor of the regular file at path; SafetensorsError otherwise.
    Non-blocking: opening a FIFO must not wait for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as error:
        raise SafetensorsError(f"{path}: cannot be opened ({reason_of(error)})", file=path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SafetensorsError(f"{path}: not a regular file", file=path)
    return fd


def reason_of(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error)


@dataclass(frozen=True)
class _Entry:
    file: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # offset in the file
    end: int


class _MappedFile:
    def __init__(self, path: str) -> None:
        self.path = path
        fd = open_regular(path)
        try:
            st = os.fstat(fd)
            self.stamp = stamp_of(st)
            self.size = st.st_size
            self.header, self.data_start = self._read_header(fd)
            try:
                self.map = ops.MappedFile(fd, self.size, path)
            except RuntimeError as error:  # no address space, too many maps
                raise SafetensorsError(str(error).splitlines()[0], file=path) from None
        finally:
            os.close(fd)

    def _read(self, fd: int, length: int, offset: int) -> bytes:
        try:
            data = os.pread(fd, length, offset)
        except OSError as error:
            raise SafetensorsError(f"{self.path}: cannot be read ({reason_of(error)})", file=self.path) from None
        if len(data) != length:
            raise SafetensorsError(f"{self.path}: cut short while its header was read", file=self.path)
        return data

    def _read_header(self, fd: int) -> tuple[dict, int]:
        if self.size < 8:
            raise SafetensorsError(f"{self.path}: {self.size} bytes, too short for a safetensors header",
                                   file=self.path)
        (length,) = struct.unpack("<Q", self._read(fd, 8, 0))
        if length > MAX_HEADER_BYTES or 8 + length > self.size:
            raise SafetensorsError(
                f"{self.path}: header length {length} does not fit the file's {self.size} bytes", file=self.path)
        try:
            header = json.loads(self._read(fd, length, 8).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise SafetensorsError(f"{self.path}: header is not JSON ({error})", file=self.path) from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is not a JSON object", file=self.path)
        return header, 8 + length

    def first_lost(self) -> int:
        return self.map.first_lost()


def _is_count(value) -> bool:
    return type(value) is int and value >= 0  # bool is an int, but no count


def _entries_of(file: _MappedFile, index: int) -> dict[str, _Entry]:
    header, data_start = file.header, file.data_start
    data_size = file.size - data_start
    entries: dict[str, _Entry] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{file.path}: tensor {name!r}"
        if not isinstance(info, dict) or {"dtype", "shape", "data_offsets"} - info.keys():
            raise SafetensorsError(f"{where}: entry needs dtype, shape and data_offsets", file=file.path)
        dtype_name = info["dtype"]
        dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise SafetensorsError(f"{where}: unknown dtype {dtype_name!r:.80}", file=file.path)
        shape, offsets = info["shape"], info["data_offsets"]
        if (not isinstance(shape, list) or not all(map(_is_count, shape))
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets))):
            raise SafetensorsError(f"{where}: malformed shape {shape!r:.80} or data_offsets {offsets!r:.80}",
                                   file=file.path)
        if math.prod(d or 1 for d in shape) >= 2**63:
            raise SafetensorsError(f"{where}: shape {shape!r:.80} is larger than any tensor can be", file=file.path)
        begin, end = offsets
        nbytes = math.prod(shape) * _ITEM_SIZES[dtype_name]
        if not begin <= end <= data_size or end - begin != nbytes:
            raise SafetensorsError(
                f"{where}: data_offsets [{begin}, {end}] do not hold {nbytes} bytes of "
                f"{dtype_name}{shape} inside the {data_size}-byte data buffer", file=file.path)
        spans.append((begin, end, name))
        entries[name] = _Entry(index, dtype, tuple(shape), data_start + begin, data_start + end)
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise SafetensorsError(f"{file.path}: tensors {first!r} and {second!r} overlap", file=file.path)
    # As the format (and its reference reader) has it, the tensors fill the data
    # buffer, back to back: a gap means offsets or the header length are wrong, and
    # every tensor would be read from the wrong bytes.
    covered = 0
    for begin, end, _ in spans:
        if begin != covered:
            break
        covered = end
    if covered != data_size:
        raise SafetensorsError(f"{file.path}: the tensors do not fill the {data_size}-byte data buffer "
                               f"(bytes from {covered} belong to none): its header length or data "
                               "offsets are wrong", file=file.path)
    return entries


class SafetensorsSource(Mapping[str, torch.Tensor]):
    """safetensors files as one mapping of name to tensor, read through memory maps.

    Opening parses and checks every header (dtypes, shapes, offsets inside the file,
    no overlaps, no name in two files); a bad file raises SafetensorsError naming it.
    Each item is a zero-copy view of the mapped file; should the file be cut short
    meanwhile, the lost pages read as zeros (see check_unchanged)."""

    def __init__(self, paths: Sequence[str]) -> None:
        if not paths:
            raise SafetensorsError("no safetensors files given")
        self.paths = [os.fspath(p) for p in paths]
        self._files = [_MappedFile(p) for p in self.paths]
        self._entries: dict[str, _Entry] = {}
        self._views: dict[str, torch.Tensor] = {}
        for index, file in enumerate(self._files):
            entries = _entries_of(file, index)
            file.header = None  # parsed: not kept with the cached source
            for name, entry in entries.items():
                if name in self._entries:
                    raise SafetensorsError(
                        f"tensor {name!r} is in both {self.paths[self._entries[name].file]} "
                        f"and {file.path}", file=file.path)
                self._entries[name] = entry

    @property
    def stamps(self) -> tuple:
        """What identified each file when it was opened (device, inode, size,
        modification and change times)."""
        return tuple(f.stamp for f in self._files)

    def intact(self) -> bool:
        """No file was found cut short while its pages were read."""
        return all(f.first_lost() < 0 for f in self._files)

    def changes(self) -> dict[str, str]:
        """The files that changed since they were opened, by path -> what happened
        and which tensors it concerns. A file cut short had the pages past its new
        end read as zeros; a file rewritten in place (same inode, another size,
        modification or change time) may have been read half old, half new. A path
        that names another file now (replaced by a rename, or removed) is no change:
        the map holds the old file, read whole."""
        found = {}
        for index, file in enumerate(self._files):
            try:
                now = stamp(file.path)
            except (OSError, ValueError):
                now = None
            same_file = now is not None and now[:2] == file.stamp[:2]
            lost = file.first_lost()
            if lost >= 0:
                # Bytes past the new end in the page that holds it read as zeros
                # without a fault: the zeros may start up to a page before.
                lost = max(lost - mmap.PAGESIZE, 0)
            if same_file and now[2] < file.size:
                lost = now[2] if lost < 0 else min(lost, now[2])
            if lost >= 0:
                hit = [n for n, e in self._entries.items() if e.file == index and e.end > lost]
                found[file.path] = (f"cut short while it was read: its bytes from offset {lost} on may have "
                                    f"been read as zeros, into {_listed(hit)}")
            elif same_file and now != file.stamp:
                hit = [n for n, e in self._entries.items() if e.file == index]
                found[file.path] = (f"rewritten in place while it was read ({_what_changed(file.stamp, now)}): "
                                    f"{_listed(hit)} may hold old and new bytes mixed")
        return found

    def check_unchanged(self, layers: Callable[[], tuple[list[str], list[str]]]) -> None:
        """Raises SafetensorsError if a file changed while it was read (changes());
        layers() gives the layers written and not, for the error."""
        changes = self.changes()
        if not changes:
            return
        written, unwritten = layers()
        path = next(iter(changes))
        raise SafetensorsError(
            "\n  ".join(f"{p}: {why}" for p, why in changes.items())
            + "\n  write a new file and rename it over the old one (os.replace) to change a checkpoint "
              "while it may be read; reload again from a complete file",
            file=path, written_layers=written, unwritten_layers=unwritten)

    def __getitem__(self, name: str) -> torch.Tensor:
        # A view costs microseconds to make and nothing to keep: made once, then reused
        # by every reload that opens these same files.
        view = self._views.get(name)
        if view is None:
            view = self._views[name] = self._view(self._entries[name])
        return view

    def _view(self, entry: _Entry) -> torch.Tensor:
        if entry.end == entry.begin:
            return torch.empty(entry.shape, dtype=entry.dtype)
        # frombuffer takes any byte offset, so tensors need no alignment in the file.
        numel = math.prod(entry.shape)
        return torch.frombuffer(self._files[entry.file].map.buffer(), dtype=entry.dtype, count=numel,
                                offset=entry.begin).view(entry.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @functools.cached_property
    def nbytes(self) -> int:
        """Bytes of all the tensors the files hold."""
        return sum(e.end - e.begin for e in self._entries.values())

    def views(self) -> dict[str, torch.Tensor]:
        """Every tensor as a view, in a plain dict (which reloads read at C speed)."""
        if len(self._views) != len(self._entries):
            for name in self._entries:
                self[name]
        return self._views


def _listed(names: list[str]) -> str:
    if not names:
        return "no tensor"
    shown = ", ".join(repr(n) for n in names[:8])
    return (f"{len(names)} tensors: " if len(names) > 1 else "tensor ") + shown + (", ..." if len(names) > 8 else "")


def _what_changed(before: tuple, now: tuple) -> str:
    labels = ("device", "inode", "size", "modification time", "change time")
    return ", ".join(f"{label} changed" for label, a, b in zip(labels, before, now) if a != b)
