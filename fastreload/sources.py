"""Where new weights come from, turned into a Mapping[str, Tensor] the plan reads:
a mapping as it is; safetensors files, shard directories and indexes as one
SafetensorsSource (safetensors_files.py), kept while the files stay unchanged; any
other iterable as a stream.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import torch

from fastreload import ops
from fastreload.safetensors_files import SafetensorsError, SafetensorsSource, open_regular, reason_of, stamp

__all__ = ["SafetensorsError", "SafetensorsSource", "open_source"]

INDEX_NAME = "model.safetensors.index.json"
# An index larger than this is not an index.
MAX_INDEX_BYTES = 100_000_000


def _files_of(path: str) -> list[str]:
    if os.path.isdir(path):
        index = os.path.join(path, INDEX_NAME)
        if os.path.exists(index):
            return _files_of_index(index)
        try:
            names = os.listdir(path)
        except OSError as error:
            raise SafetensorsError(f"{path}: cannot be listed ({reason_of(error)})", file=path) from None
        files = sorted(os.path.join(path, f) for f in names if f.endswith(".safetensors"))
        if not files:
            raise SafetensorsError(f"{path}: no .safetensors files and no {INDEX_NAME}", file=path)
        return files
    if path.endswith(".json"):
        return _files_of_index(path)
    if not os.path.exists(path):
        raise SafetensorsError(f"{path}: no such file", file=path)
    return [path]


def _inside(name: str) -> bool:
    """Whether an index's file name stays inside the index's directory."""
    if not name or "\0" in name or os.path.isabs(name):
        return False
    normal = os.path.normpath(name)
    return normal != os.curdir and normal != os.pardir and not normal.startswith(os.pardir + os.sep)


def _files_of_index(index: str) -> list[str]:
    fd = open_regular(index)
    try:
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
    except OSError as error:
        raise SafetensorsError(f"{index}: cannot be read ({reason_of(error)})", file=index) from None
    if len(raw) > MAX_INDEX_BYTES:
        raise SafetensorsError(f"{index}: over {MAX_INDEX_BYTES} bytes, not a safetensors index", file=index)
    try:
        content = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise SafetensorsError(f"{index}: not a safetensors index: not UTF-8 JSON ({error})", file=index) from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise SafetensorsError(
            f"{index}: not a safetensors index: needs a \"weight_map\" object of tensor name -> file name",
            file=index)
    names = sorted(set(weight_map.values()))
    outside = [f for f in names if not _inside(f)]
    if outside:
        raise SafetensorsError(
            f"{index}: names files outside its directory, which a checkpoint may not read: "
            f"{', '.join(repr(f) for f in outside[:8])}", file=index)
    folder = os.path.dirname(index)
    files = [os.path.join(folder, f) for f in names]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise SafetensorsError(f"{index}: names shards that do not exist: {missing}", file=index)
    return files


# Files opened lately, with what identified them then (device, inode, size,
# modification and change times): a reload from the same unchanged files reuses
# their parsed headers and views; a file rewritten or replaced is opened afresh, and
# files found cut short are never read again through the same maps.
_OPENED: OrderedDict[tuple[str, ...], SafetensorsSource] = OrderedDict()
_OPENED_KEPT = 4


def open_safetensors(paths: Sequence[str]) -> SafetensorsSource:
    ops.guard_mapped_files()  # another SIGBUS handler may have been put over it since
    key = tuple(os.path.abspath(p) for p in paths)
    cached = _OPENED.get(key)
    if cached is not None:
        try:
            current = tuple(stamp(p) for p in key)
        except (OSError, ValueError):
            current = None
        if current == cached.stamps and cached.intact():
            _OPENED.move_to_end(key)
            return cached
    source = SafetensorsSource(list(key))
    _OPENED[key] = source
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
        seen = stamp(index) + stamp(path)
    except (OSError, ValueError):  # no index, no such path, a name with a NUL
        return _files_of(path)
    cached = _LISTED.get(path)
    if cached is None or cached[0] != seen:
        cached = _LISTED[path] = (seen, _files_of(path))
    return cached[1]


def open_source(source) -> tuple[str, Mapping[str, torch.Tensor] | Iterable]:
    """(kind, source): a mapping stays as it is ("mapping"); a path (str or
    os.PathLike) to a .safetensors file, a directory of shards (with or without
    model.safetensors.index.json) or an index file, or a list of such paths, opens as
    one SafetensorsSource ("safetensors"); any other iterable is a stream of
    (name, tensor) pairs, read once ("stream").

    A path that cannot be read as safetensors raises SafetensorsError (a
    ReloadError); a source of no kind above is a programming error: TypeError."""
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
