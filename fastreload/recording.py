"""record(): what a reload must rebuild to replay each module's post-load processing.

Inference models keep their weights the way their kernels want them (transposed,
quantized with scales, with derived buffers), made from checkpoint-format tensors by
a per-module ``process_weights_after_loading()``. record() notes, on the freshly
built model, each processed module's checkpoint-format tensors (names, shapes,
dtypes, devices, classes, attributes, persistence); fastreload/replay.py replays
them at each reload.

A replayed unit (a Group) is one or more modules: a processed module, or one whose
parameters carry a ``weight_loader``, together with every module that holds one of
its checkpoint tensors (tied weights), so that a tied tensor is loaded and processed
once and every owner sees the result.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fastreload import ops
from fastreload.model import same_memory_key, split_entries, walk

__all__ = ["Entry", "Group", "RecordedModule", "Recording", "forget_recording", "loaders_recording", "record",
           "recording_of"]

Process = Callable[[nn.Module], object]
METHOD = "process_weights_after_loading"


@dataclass(frozen=True)
class Entry:
    """A checkpoint-format tensor as record() saw it, under every state_dict name
    that held it (tied names), the first leading."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    cls: type
    attrs: dict
    requires_grad: bool

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def loader(self):
        return self.attrs.get("weight_loader")


@dataclass(frozen=True)
class RecordedModule:
    """A processed module's own tensors, in registration order: each parameter and
    persistent buffer by its checkpoint entry (an index into the group's entries);
    a non-persistent buffer with entry None, installed as a copy of the live one."""

    prefix: str
    params: tuple[tuple[str, int], ...]
    buffers: tuple[tuple[str, int | None], ...]
    process: Process | None


@dataclass(frozen=True)
class Group:
    modules: tuple[RecordedModule, ...]
    entries: tuple[Entry, ...]

    @property
    def name(self) -> str:
        return self.modules[0].prefix or "<root>"


@dataclass(frozen=True)
class Recording:
    groups: tuple[Group, ...]
    # Persistent alias buffers of recorded modules: a source may hold them; never loaded.
    ignored: frozenset[str]


_recordings: weakref.WeakKeyDictionary[nn.Module, Recording] = weakref.WeakKeyDictionary()


def _call_method(module: nn.Module) -> None:
    getattr(module, METHOD)()


def _processors(model: nn.Module, process) -> dict[str, Process]:
    found: dict[str, Process] = {}
    for prefix, module in walk(model):
        if callable(getattr(module, METHOD, None)):
            found[prefix[:-1]] = _call_method
    if process is None:
        return found
    if isinstance(process, Mapping):
        for name, fn in process.items():
            model.get_submodule(name)  # an unknown name is an AttributeError now, not a surprise later
            if not callable(fn):
                raise TypeError(f"process[{name!r}] is not callable")
            found[name] = fn
    elif callable(process):
        for prefix, module in walk(model):
            fn = process(prefix[:-1], module)
            if fn is not None:
                found[prefix[:-1]] = fn
    else:
        raise TypeError("process is a mapping of module name -> fn(module), or a callable "
                        f"(name, module) -> fn(module) or None; got {type(process).__name__}")
    return found


def record(model: nn.Module, process=None) -> Recording:
    """Records, on a freshly built model whose weights are not processed yet, what a
    reload must rebuild to replay each module's post-load processing.

    Processed modules are those with a ``process_weights_after_loading()`` method,
    and those ``process`` names: a mapping of module name -> ``fn(module)``, or a
    callable ``(name, module) -> fn(module) or None`` asked once per module.
    Modules whose parameters carry a ``weight_loader(param, tensor)`` attribute are
    recorded too (loaded through it, without processing).

    For each, its own parameters and persistent buffers as they are now (names,
    shapes, dtypes, devices, classes, attributes, persistence) are its checkpoint
    format: what a later reload_layerwise(model, source) expects in the source for
    this module. Buffers viewing a parameter's storage (aliases) and uninitialized
    (lazy, meta) tensors are not recorded; a module with nothing else is not replayed.
    """
    recording = _record(model, _processors(model, process))
    _recordings[model] = recording
    return recording


def _record(model: nn.Module, processors: dict[str, Process]) -> Recording:
    _, live, aliases = split_entries(model)
    alias_names = {b.name for b in aliases}
    kept = [e for e in live if e.name not in alias_names]
    persistent = [e for e in kept if e.persistent]
    ptrs = ops.storage_ptrs([e.tensor for e in persistent]).tolist()
    keys = [same_memory_key(e.tensor, p) for e, p in zip(persistent, ptrs)]
    owned = {e.unit for e in persistent}
    chosen = {u for u in processors if u in owned}
    chosen |= {e.unit for e in persistent if e.is_param and "weight_loader" in e.tensor.__dict__}

    # Modules holding one tensor (tied) are replayed together: union-find over keys.
    parent: dict[str, str] = {}

    def find(u: str) -> str:
        while parent.setdefault(u, u) != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    first_holder: dict[object, str] = {}
    for e, key in zip(persistent, keys):
        other = first_holder.setdefault(key, e.unit)
        parent[find(e.unit)] = find(other)
    roots = {find(u) for u in chosen}
    order = list(dict.fromkeys(e.unit for e in kept))  # walk order
    members: dict[str, list[str]] = {}
    for unit in order:
        if unit in parent and find(unit) in roots:
            members.setdefault(find(unit), []).append(unit)

    key_of = {e.name: k for e, k in zip(persistent, keys)}
    groups = []
    for units in members.values():
        entries: dict[object, list] = {}  # key -> [names, tensor]
        position: dict[object, int] = {}
        modules = []
        for unit in units:
            params, buffers = [], []
            for e in kept:
                if e.unit != unit:
                    continue
                key = e.name.rpartition(".")[2]
                if not e.persistent:
                    buffers.append((key, None))
                    continue
                memory = key_of[e.name]
                position.setdefault(memory, len(position))
                entries.setdefault(memory, [[], e.tensor])[0].append(e.name)
                (params if e.is_param else buffers).append((key, position[memory]))
            modules.append(RecordedModule(unit, tuple(params), tuple(buffers), processors.get(unit)))
        groups.append(Group(tuple(modules), tuple(_entry(names, t) for names, t in entries.values())))
    recorded = {m.prefix for g in groups for m in g.modules}
    return Recording(tuple(groups), frozenset(b.name for b in aliases if b.persistent and b.unit in recorded))


def _entry(names: list[str], t: torch.Tensor) -> Entry:
    cls = type(t)
    return Entry(tuple(names), tuple(t.shape), t.dtype, t.device, cls,
                 dict(t.__dict__), t.requires_grad if isinstance(t, nn.Parameter) else False)


def recording_of(model: nn.Module) -> Recording | None:
    return _recordings.get(model)


def loaders_recording(model: nn.Module) -> Recording:
    """What a model that record() never saw replays: the modules whose parameters
    carry a weight_loader, as they are now."""
    return _record(model, {})


def forget_recording(model: nn.Module) -> None:
    _recordings.pop(model, None)
