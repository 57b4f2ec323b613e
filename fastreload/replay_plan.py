"""The replay plan: a model's recording matched to its live tensors, cached with the
layout, so that a reload takes a source's checkpoint tensors and makes the
temporaries of a replay in a few calls rather than a few per tensor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from fastreload import ops
from fastreload.errors import ReloadError
from fastreload.model import Layout, Unit, is_uninitialized
from fastreload.plan import Fetcher
from fastreload.recording import Group, Recording, loaders_recording, recording_of

__all__ = ["ReplayPlan", "replay_plan"]


@dataclass(frozen=True)
class ReplayPlan:
    """A recording matched to the live model (cached with its layout): the live
    kernel tensors of each group, the layout left for the direct path, the names,
    and what a reload needs to take a mapping's checkpoint tensors and make the
    temporaries in a few calls rather than a few per tensor."""

    recording: Recording
    direct: Layout  # the layout without the tensors of replayed modules
    index: dict[str, tuple[int, int]]  # checkpoint name -> (group, entry)
    ignored: frozenset[str]
    # Per group: (module index in the group, key, live kernel tensor), each tensor once.
    kernels: tuple[tuple[tuple[int, str, torch.Tensor], ...], ...]
    alias_keys: tuple[tuple[frozenset[str], ...], ...]  # per group, per module: its alias buffers
    group_bytes: tuple[int, ...]  # checkpoint plus kernel bytes, what a group holds while replayed
    # Every entry of every group in order, group g's from starts[g] to starts[g + 1].
    starts: tuple[int, ...]
    gather: Callable  # source -> the tensors under every entry's leading name, in order
    tied: tuple[tuple[str, int], ...]  # second names of tied entries, with the entry's position
    tensors: ops.CheckpointTensors
    # Per group: (begin, end, device, bytes) of each run of entries on one device.
    runs: tuple[tuple[tuple[int, int, torch.device, int], ...], ...]
    attrs: tuple[tuple[tuple[int, dict], ...], ...]  # per group: (entry, attributes) where any
    loaded: tuple[tuple[int, ...], ...]  # per group: its entries with a weight_loader
    live_storages: frozenset[int]  # storages of the model's tensors, to tell aliases held as attributes

    @property
    def groups(self) -> tuple[Group, ...]:
        return self.recording.groups


def replay_plan(model: nn.Module, layout: Layout) -> ReplayPlan | None:
    """The model's replay plan, or None when nothing is replayed (record() was not
    called and no parameter has a weight_loader): the direct path alone."""
    recording = recording_of(model)
    cached = layout.plans.get("replay")
    if cached is not None and cached[0] is recording:
        return cached[1]
    if recording is None:
        # Not recorded: the modules whose parameters have a weight_loader, as they are.
        recording = loaders_recording(model) if _has_loaders(layout) else None
    plan = None if recording is None or not recording.groups else _make(model, layout, recording)
    layout.plans["replay"] = (recording_of(model), plan)
    return plan


def _has_loaders(layout: Layout) -> bool:
    return any("weight_loader" in t.tensor.__dict__ for t in layout.targets)


def _make(model: nn.Module, layout: Layout, recording: Recording) -> ReplayPlan:
    aliases = set(layout.skipped["alias"])
    prefixes = {m.prefix for g in recording.groups for m in g.modules}
    kernels, alias_keys, group_bytes = [], [], []
    for group in recording.groups:
        seen_ids: set[int] = set()
        seen_targets: set[int] = set()
        found, group_aliases = [], []
        for m, rec in enumerate(group.modules):
            try:
                module = model.get_submodule(rec.prefix)
            except AttributeError:
                raise ReloadError(held_over=(
                    f"module {rec.prefix!r} was recorded by fastreload.record() and is gone: "
                    "record the model again")) from None
            base = rec.prefix + "." if rec.prefix else ""
            group_aliases.append(frozenset(k for k in module._buffers if base + k in aliases))
            tensors = [(k, t) for k, t in module._parameters.items() if t is not None]
            tensors += [(k, t) for k, t in module._buffers.items()
                        if t is not None and base + k not in aliases]
            for key, t in tensors:
                target = layout.target_index.get(base + key)
                if is_uninitialized(t) or id(t) in seen_ids or target in seen_targets:
                    continue
                seen_ids.add(id(t))
                if target is not None:
                    seen_targets.add(target)
                found.append((m, key, t))
        kernels.append(tuple(found))
        alias_keys.append(tuple(group_aliases))
        group_bytes.append(sum(e.nbytes for e in group.entries)
                           + sum(t.numel() * t.element_size() for _, _, t in found))
    index = {n: (g, e) for g, group in enumerate(recording.groups)
             for e, entry in enumerate(group.entries) for n in entry.names}
    entries = [entry for group in recording.groups for entry in group.entries]
    starts = [0]
    for group in recording.groups:
        starts.append(starts[-1] + len(group.entries))
    leading = [entry.name for entry in entries]
    tensors = ops.CheckpointTensors(entries)
    live = [t for found in kernels for _, _, t in found] + [t.tensor for t in layout.targets]
    runs, attrs, loaded = [], [], []
    for g, group in enumerate(recording.groups):
        found, begin = [], starts[g]
        for i in range(starts[g] + 1, starts[g + 1] + 1):
            if i == starts[g + 1] or entries[i].device != entries[begin].device:
                found.append((begin, i, entries[begin].device, tensors.nbytes(begin, i)))
                begin = i
        runs.append(tuple(found))
        attrs.append(tuple((e, entry.attrs) for e, entry in enumerate(group.entries) if entry.attrs))
        loaded.append(tuple(e for e, entry in enumerate(group.entries) if entry.loader is not None))
    return ReplayPlan(recording, _without(layout, prefixes), index, recording.ignored,
                      tuple(kernels), tuple(alias_keys), tuple(group_bytes), tuple(starts),
                      Fetcher(tuple(leading)), tuple((n, i) for i, entry in enumerate(entries) for n in entry.names[1:]),
                      tensors, tuple(runs), tuple(attrs), tuple(loaded),
                      frozenset(ops.storage_ptrs(live).tolist()) - {0})


def _without(layout: Layout, prefixes: set[str]) -> Layout:
    """The layout less every target some name of which a replayed module owns."""
    targets, units = [], []
    for unit in layout.units:
        start = len(targets)
        targets += [t for t in layout.targets[unit.start:unit.stop]
                    if not any(n.rpartition(".")[0] in prefixes for n in t.names)]
        if len(targets) > start:
            units.append(Unit(unit.prefix, start, len(targets)))
    return replace(layout, targets=tuple(targets), units=tuple(units),
                   target_index={n: i for i, t in enumerate(targets) for n in t.names}, plans={})
