"""Where new weights come from, turned into a Mapping[str, Tensor] the plan reads.

safetensors files are read through memory maps: every header is parsed and checked
when the source is opened (before anything is written), and each tensor is a
zero-copy view of the mapped bytes, so the fused copy reads the file's pages
straight into the model's storage.

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
import struct
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["SafetensorsError", "SafetensorsSource", "open_source"]

INDEX_NAME = "model.safetensors.index.json"

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}

# A header larger than this is not a header (the reference reader's own limit).
MAX_HEADER_BYTES = 100_000_000


class SafetensorsError(ValueError):
    """A safetensors file, directory or index that cannot be read as one; names the file."""


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
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # A private mapping: writable as far as torch.frombuffer is concerned, never
            # written, and so never copied.
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        self.size = size

    def header(self) -> tuple[dict, int]:
        if self.size < 8:
            raise SafetensorsError(f"{self.path}: {self.size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", self.map[:8])
        if length > MAX_HEADER_BYTES or 8 + length > self.size:
            raise SafetensorsError(
                f"{self.path}: header length {length} does not fit the file's {self.size} bytes")
        try:
            header = json.loads(bytes(self.map[8:8 + length]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SafetensorsError(f"{self.path}: header is not JSON ({error})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is not a JSON object")
        return header, 8 + length


def _entries_of(file: _MappedFile, index: int) -> dict[str, _Entry]:
    header, data_start = file.header()
    data_size = file.size - data_start
    entries: dict[str, _Entry] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{file.path}: tensor {name!r}"
        if not isinstance(info, dict) or {"dtype", "shape", "data_offsets"} - info.keys():
            raise SafetensorsError(f"{where}: entry needs dtype, shape and data_offsets")
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise SafetensorsError(f"{where}: unknown dtype {info['dtype']!r}")
        shape, offsets = info["shape"], info["data_offsets"]
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise SafetensorsError(f"{where}: malformed shape {shape!r} or data_offsets {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise SafetensorsError(
                f"{where}: data_offsets [{begin}, {end}] do not hold {nbytes} bytes of "
                f"{info['dtype']}{shape} inside the {data_size}-byte data buffer")
        spans.append((begin, end, name))
        entries[name] = _Entry(index, dtype, tuple(shape), data_start + begin, data_start + end)
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise SafetensorsError(f"{file.path}: tensors {first!r} and {second!r} overlap")
    return entries


class SafetensorsSource(Mapping[str, torch.Tensor]):
    """safetensors files as one mapping of name to tensor, read through memory maps.

    Opening parses and checks every header (dtypes, shapes, offsets inside the file,
    no overlaps, no name in two files); a bad file raises SafetensorsError naming it.
    Each item is a zero-copy view of the mapped file."""

    def __init__(self, paths: Sequence[str]) -> None:
        if not paths:
            raise SafetensorsError("no safetensors files given")
        self.paths = [os.fspath(p) for p in paths]
        self._files = [_MappedFile(p) for p in self.paths]
        self._entries: dict[str, _Entry] = {}
        self._views: dict[str, torch.Tensor] = {}
        for index, file in enumerate(self._files):
            for name, entry in _entries_of(file, index).items():
                if name in self._entries:
                    raise SafetensorsError(
                        f"tensor {name!r} is in both {self.paths[self._entries[name].file]} "
                        f"and {file.path}")
                self._entries[name] = entry

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
        return torch.frombuffer(self._files[entry.file].map, dtype=entry.dtype, count=numel,
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


def _files_of(path: str) -> list[str]:
    if os.path.isdir(path):
        index = os.path.join(path, INDEX_NAME)
        if os.path.exists(index):
            return _files_of_index(index)
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise SafetensorsError(f"{path}: no .safetensors files and no {INDEX_NAME}")
        return files
    if path.endswith(".json"):
        return _files_of_index(path)
    if not os.path.exists(path):
        raise SafetensorsError(f"{path}: no such file")
    return [path]


def _files_of_index(index: str) -> list[str]:
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise SafetensorsError(f"{index}: not a safetensors index ({error})") from None
    folder = os.path.dirname(index)
    files = [os.path.join(folder, f) for f in sorted(set(weight_map.values()))]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise SafetensorsError(f"{index}: names shards that do not exist: {missing}")
    return files


# Files opened lately, with what identified them then (inode, modification time,
# size): a reload from the same unchanged files reuses their parsed headers and
# views; a file rewritten or replaced is opened afresh.
_OPENED: OrderedDict[tuple[str, ...], tuple[tuple, SafetensorsSource]] = OrderedDict()
_OPENED_KEPT = 4


def _stamp(path: str) -> tuple:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def open_safetensors(paths: Sequence[str]) -> SafetensorsSource:
    key = tuple(os.path.abspath(p) for p in paths)
    stamp = tuple(_stamp(p) for p in key)
    cached = _OPENED.get(key)
    if cached is not None and cached[0] == stamp:
        _OPENED.move_to_end(key)
        return cached[1]
    source = SafetensorsSource(list(key))
    _OPENED[key] = (stamp, source)
    while len(_OPENED) > _OPENED_KEPT:
        _OPENED.popitem(last=False)
    return source


# What a path names (a file, the shards of a directory, an index's shards), by the
# path and what identified it then: a repeated reload skips reading the index.
_LISTED: dict[str, tuple[tuple, list[str]]] = {}


def _listed_files(path: str) -> list[str]:
    path = os.path.abspath(path)
    index = os.path.join(path, INDEX_NAME) if os.path.isdir(path) else path
    try:
        stamp = _stamp(index) + _stamp(path)
    except OSError:
        return _files_of(path)
    cached = _LISTED.get(path)
    if cached is None or cached[0] != stamp:
        cached = _LISTED[path] = (stamp, _files_of(path))
    return cached[1]


def open_source(source) -> tuple[str, Mapping[str, torch.Tensor] | Iterable]:
    """(kind, source): a mapping stays as it is ("mapping"); a path (str or
    os.PathLike) to a .safetensors file, a directory of shards (with or without
    model.safetensors.index.json) or an index file, or a list of such paths, opens as
    one SafetensorsSource ("safetensors"); any other iterable is a stream of
    (name, tensor) pairs, read once ("stream")."""
    if isinstance(source, Mapping):
        return "mapping", source
    if isinstance(source, (str, os.PathLike)):
        return "safetensors", open_safetensors(_listed_files(os.fspath(source)))
    if isinstance(source, (list, tuple)) and source and all(
            isinstance(p, (str, os.PathLike)) for p in source):
        return "safetensors", open_safetensors(
            [f for p in source for f in _listed_files(os.fspath(p))])
    if isinstance(source, Iterable) and not isinstance(source, (bytes, bytearray)):
        return "stream", source
    raise TypeError("reload_layerwise reads a Mapping[str, Tensor], an iterable of (name, tensor) "
                    f"pairs, a safetensors path or a list of them; got {type(source).__name__}")
