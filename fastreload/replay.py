"""The replay of post-load processing, unit by unit (what record() noted:
fastreload/recording.py; matched to the live model: fastreload/replay_plan.py).

Inference models keep their weights the way their kernels want them (transposed,
quantized with scales, with derived buffers), made from checkpoint-format tensors by
a per-module ``process_weights_after_loading()``. record() notes, on the freshly
built model, each processed module's checkpoint-format tensors; a reload then
replays, unit by unit: fresh checkpoint-format tensors are installed on the module
(same names, classes, attributes and persistence), the source is loaded into them
with the fused copy, the processing runs, its results are checked against the live
kernel tensors and copied into them with the fused copy, and the live objects are put
back. The live model is written only by that last copy, so a unit is updated whole
or not at all.

A replayed unit (a Group) is one or more modules: a processed module, or one whose
parameters carry a ``weight_loader``, together with every module that holds one of
its checkpoint tensors (tied weights), so that a tied tensor is loaded and processed
once and every owner sees the result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import torch
from torch import nn

from fastreload import ops
from fastreload.errors import ReloadError
from fastreload.model import is_uninitialized, registrations_unseen
from fastreload.plan import raise_not_tensors, same_values
from fastreload.recording import Entry, RecordedModule, Recording, record, recording_of
from fastreload.regions import Pieces, RegionProblem, Target, dest_view, region_views
from fastreload.replay_plan import ReplayPlan, replay_plan

# Recording, ReplayPlan and the rest are importable from here as before.
__all__ = ["Recording", "Replay", "ReplayPlan", "record", "recording_of", "replay_plan"]


_ABSENT = object()
# The module's own registries, put back as they were by _Saved.restore().
_MODULE_STATE = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.device.type != "meta" else 0


def _holds_tensors(value, depth: int = 0) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if depth > 4:
        return False
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, (list, tuple, set, frozenset)):
        return False
    return any(_holds_tensors(v, depth + 1) for v in value)


class _Saved:
    """A module's own state, to be put back exactly: its attributes, the parameter,
    buffer and submodule dicts (same objects, same contents) and persistence.
    Tensors held as plain attributes are replaced by copies while the module is
    replayed, so that processing never writes the live ones."""

    def __init__(self, module: nn.Module, prefix: str, live_storages: frozenset[int]) -> None:
        self.module = module
        self.prefix = prefix
        self.attrs = dict(module.__dict__)
        self.params = dict(module._parameters)
        self.buffers = dict(module._buffers)
        self.modules = dict(module._modules)
        self.non_persistent = set(module._non_persistent_buffers_set)
        # Views of the model's tensors (aliases) are left alone: written through them.
        self.clones = {k: v.clone() for k, v in self.attrs.items()
                       if isinstance(v, torch.Tensor) and _storage(v) not in live_storages}
        module.__dict__.update(self.clones)

    def changes(self) -> tuple[list, dict, dict]:
        """What processing left in the module's plain attributes (not its parameters,
        buffers or submodules), to carry into the live module: tensors to copy in
        place as (live, new), values to set, problems by name."""
        copies, values, problems = [], {}, {}
        for key, new in self.module.__dict__.items():
            old = self.attrs.get(key, _ABSENT)
            if key in _MODULE_STATE or (new is old and key not in self.clones):
                continue
            if isinstance(old, torch.Tensor) and key not in self.clones:
                continue  # an alias of a model tensor: that tensor is written
            name = f"{self.prefix}.{key}" if self.prefix else key
            if isinstance(old, torch.Tensor):
                # Pointed at like a kernel tensor, perhaps: written in place, never replaced.
                why = _check_result(new, old) if isinstance(new, torch.Tensor) else (
                    f"processing replaced a tensor attribute with a {type(new).__name__}")
                if why is not None:
                    problems[name] = why
                else:
                    copies.append((old, new))
            elif isinstance(new, torch.Tensor) or _holds_tensors(new):
                what = "a tensor" if isinstance(new, torch.Tensor) else f"a {type(new).__name__} holding tensors"
                problems[name] = (f"processing set a plain attribute to {what}, which the live module has no "
                                  "tensor to receive in place: register such tensors as parameters or buffers")
            else:
                values[key] = new
        return copies, values, problems

    def restore(self) -> None:
        m = self.module
        m.__dict__.clear()
        m.__dict__.update(self.attrs)
        for live, saved in ((m._parameters, self.params), (m._buffers, self.buffers),
                            (m._modules, self.modules)):
            live.clear()
            live.update(saved)
        m._non_persistent_buffers_set.clear()
        m._non_persistent_buffers_set.update(self.non_persistent)


def _install(module: nn.Module, rec: RecordedModule, temps: list[torch.Tensor],
             alias_keys: frozenset[str], live_storages: frozenset[int]) -> _Saved:
    """Puts the checkpoint-format temporaries in place of the module's tensors (dict
    writes: no registration hook fires, and everything is put back by restore())."""
    saved = _Saved(module, rec.prefix, live_storages)
    params = {key: temps[e] for key, e in rec.params}
    buffers, non_persistent = {}, set()
    for key, e in rec.buffers:
        if e is not None:
            buffers[key] = temps[e]
            continue
        live = saved.buffers.get(key)
        if live is not None and not is_uninitialized(live):
            buffers[key] = live.clone()  # runtime state the processing may read; the live one stays untouched
            non_persistent.add(key)
    for key in alias_keys:  # views of parameters: left as they are, never copied
        buffers.setdefault(key, saved.buffers[key])
        if key in saved.non_persistent:
            non_persistent.add(key)
    for key, p in saved.params.items():
        if p is not None and is_uninitialized(p):
            params.setdefault(key, p)
    module._parameters.clear()
    module._parameters.update(params)
    module._buffers.clear()
    module._buffers.update(buffers)
    module._non_persistent_buffers_set.clear()
    module._non_persistent_buffers_set.update(non_persistent)
    return saved


def _check_result(new, live: torch.Tensor) -> str | None:
    if new is None:
        return "processing did not produce it (the live model holds it)"
    if not isinstance(new, torch.Tensor):
        return f"processing left a {type(new).__name__}, not a tensor"
    if new.shape != live.shape:
        return f"processing produced shape {tuple(new.shape)}, the live tensor has {tuple(live.shape)}"
    if new.dtype != live.dtype:
        return f"processing produced {new.dtype}, the live tensor is {live.dtype}"
    if new.device != live.device:
        return f"processing produced it on {new.device}, the live tensor is on {live.device}"
    return None


def _source_problem(entry: Entry, tensor: torch.Tensor) -> str | None:
    if entry.loader is not None:
        return None  # its weight_loader decides what it takes (a shard of it, say)
    if tuple(tensor.shape) != entry.shape:
        return (f"shape mismatch: the checkpoint format recorded is {entry.shape}, "
                f"the source {tuple(tensor.shape)}")
    if not ops.converts(tensor.dtype, entry.dtype):
        return (f"dtype mismatch: cannot convert the source's {tensor.dtype} into the "
                f"recorded {entry.dtype}")
    if tensor.device != entry.device and tensor.device.type != "cpu":
        return f"device mismatch: the source on {tensor.device} cannot be copied to {entry.device}"
    return None


class Replay:
    """One reload's replay: takes the source's checkpoint tensors by name, tracks
    each group's completion by name, and replays complete groups in batches of about
    batch_bytes (checkpoint plus kernel bytes). fail(**problems) makes the error
    (the caller adds where the reload stopped)."""

    def __init__(self, plan: ReplayPlan, model: nn.Module, *, batch_bytes: int, on_written,
                 fail: Callable[..., ReloadError]) -> None:
        self.plan = plan
        self.model = model
        self.batch_bytes = batch_bytes
        self.on_written = on_written
        self.fail = fail
        groups = plan.groups
        # Per group, the source of each entry: a tensor, or the Pieces of its regions
        # (None: not arrived); None before any.
        self.values: list[list[torch.Tensor | None] | None] = [None] * len(groups)
        self.remaining = [len(g.entries) for g in groups]
        self.ready: list[int] = []
        self.ready_bytes = 0
        self.written: list[int] = []
        self.held_bytes = 0  # of taken tensors not yet replayed, as a stream's max_held_bytes counts
        self.held = [0] * len(groups)  # the same, per group
        self.tensors = self.bytes = self.calls = self.regions = 0
        self.custom_loaded: list[str] = []
        # The temporaries' memory, per device, reused batch after batch and freed with
        # the session: one allocation per reload, not one per batch.
        self.buffers: dict[torch.device, torch.Tensor] = {}
        self.pieces: dict[tuple[int, int], Pieces] = {}  # (group, entry) -> regions so far, until complete
        self.regioned: set[int] = set()  # groups with an entry given in regions
        self.names_taken: int | None = None  # by check_mapping's common case: how many source names

    # -- names

    def take(self, name: str, tensor: torch.Tensor, *, flush: bool = True) -> None:
        """A checkpoint tensor arrived (name in plan.index; a repeated name is the
        caller's to refuse). Raises fail(...) for a tensor that does not fit."""
        g, e = self.plan.index[name]
        entry = self.plan.groups[g].entries[e]
        values = self.values[g]
        if values is None:
            values = self.values[g] = [None] * len(self.plan.groups[g].entries)
        first = values[e]
        if isinstance(first, Pieces) or (g, e) in self.pieces:
            raise self.fail(regions={entry.name: "given both whole and in regions"})
        if first is not None:  # a tied second name: it must say what the first one said
            if not same_values(first, tensor):
                raise self.fail(conflicts=[name])
            return
        problem = _source_problem(entry, tensor)
        if problem is not None:
            raise self.fail(mismatched={name: problem})
        values[e] = tensor
        self._arrived(g, tensor.numel() * tensor.element_size(), flush)

    def _arrived(self, g: int, nbytes: int, flush: bool) -> None:
        self.held[g] += nbytes
        self.held_bytes += nbytes
        self.remaining[g] -= 1
        if self.remaining[g] == 0:
            self.ready.append(g)
            self.ready_bytes += self.plan.group_bytes[g]
            if flush and self.ready_bytes >= self.batch_bytes:
                self.flush()

    def take_region(self, source_name: str, target: Target, tensor: torch.Tensor, *, flush: bool = True) -> None:
        """A source tensor (or its shard) for a region of a checkpoint tensor
        (target.name in plan.index): the entry arrives when its regions cover it
        exactly. Raises fail(...) for a region that does not fit."""
        g, e = self.plan.index[target.name]
        entry = self.plan.groups[g].entries[e]
        if entry.loader is not None:
            raise self.fail(regions={f"{target.name} <- {source_name}": (
                "a region of a tensor loaded by its weight_loader: give the whole tensor")})
        values = self.values[g]
        if values is None:
            values = self.values[g] = [None] * len(self.plan.groups[g].entries)
        complete = values[e]
        if complete is not None and not isinstance(complete, Pieces):
            raise self.fail(regions={entry.name: "given both whole and in regions"})
        pieces = complete or self.pieces.get((g, e))
        if pieces is None:
            pieces = self.pieces[(g, e)] = Pieces(entry.name, 0)
        shape = torch.empty(entry.shape, dtype=entry.dtype, device="meta")  # the temporary, to come
        try:
            dv, sv, covered, label = region_views(target, shape, tensor)
            problem = _source_problem(replace(entry, shape=tuple(sv.shape)), sv)
            if problem is not None:
                raise RegionProblem(problem)
            pieces.add(dv, sv, covered, label, tensor, shape, target)
        except RegionProblem as problem:
            raise self.fail(regions={f"{target.name} <- {source_name}": str(problem)}) from None
        except KeyError as repeated:
            raise self.fail(duplicates=[repeated.args[0]]) from None
        if pieces.complete:  # (a complete one refused the region above)
            del self.pieces[g, e]
            values[e] = pieces
            self.regioned.add(g)
            self._arrived(g, pieces.held_bytes, flush)

    def check_mapping(self, source: Mapping[str, torch.Tensor], regions=()) -> dict:
        """Takes every checkpoint name of a mapping, and the (Target, source name)
        regions aimed at checkpoint tensors, writing nothing; returns the problems
        found, by ReloadError field (missing: leading names never given)."""
        if not regions and self._take_all(source):
            return {"missing": [], "mismatched": {}, "conflicts": [], "regions": {}, "duplicates": []}
        found_regions, duplicates = {}, []
        for target, name in regions:
            tensor = source.original(name)
            if not isinstance(tensor, torch.Tensor):
                raise_not_tensors({name: tensor})
            try:
                self.take_region(name, target, tensor, flush=False)
            except ReloadError as error:
                found_regions.update(error.regions)
                found_regions.update(error.mismatched)
                duplicates += error.duplicates
        mismatched, conflicts = {}, []
        for name in self.plan.index:
            tensor = source.get(name)
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise_not_tensors({name: tensor})
            try:
                self.take(name, tensor, flush=False)
            except ReloadError as error:
                mismatched.update(error.mismatched)
                conflicts += error.conflicts
                found_regions.update(error.regions)
        return {"missing": self.missing(), "mismatched": mismatched, "conflicts": conflicts,
                "regions": found_regions, "duplicates": duplicates}

    def _take_all(self, source: Mapping[str, torch.Tensor]) -> bool:
        """The common case in a few calls: every leading name there and fitting, tied
        second names absent or agreeing. False, having taken nothing, otherwise."""
        plan = self.plan
        try:
            found = plan.gather(source)
        except KeyError:
            return False
        if not plan.tensors.fits(found):
            return False
        seconds = 0
        for name, i in plan.tied:
            second = source.get(name)
            if second is not None and not (isinstance(second, torch.Tensor) and same_values(found[i], second)):
                return False
            seconds += second is not None
        starts = plan.starts
        self.values = [list(found[starts[g]:starts[g + 1]]) for g in range(len(plan.groups))]
        self.remaining = [0] * len(plan.groups)
        self.ready = list(range(len(plan.groups)))
        self.ready_bytes = sum(plan.group_bytes)
        self.names_taken = len(found) + seconds
        return True

    def missing(self) -> list[str]:
        return [entry.name for g, group in enumerate(self.plan.groups) if self.remaining[g]
                for e, entry in enumerate(group.entries) if self.values[g] is None or self.values[g][e] is None]

    def uncovered(self) -> dict[str, str]:
        """Checkpoint tensors given in regions that do not cover them (yet)."""
        return {pieces.name: pieces.uncovered() for pieces in self.pieces.values()}

    def layers(self) -> tuple[list[str], list[str]]:
        """(written, not written) group names."""
        done = set(self.written)
        names = [g.name for g in self.plan.groups]
        return [names[g] for g in self.written], [n for g, n in enumerate(names) if g not in done]

    # -- writing

    def flush(self) -> None:
        """Replays every complete group not yet written, in batches of about batch_bytes."""
        batch, held = [], 0
        for g in self.ready:
            if batch and held + self.plan.group_bytes[g] > self.batch_bytes:
                self._replay(batch)
                batch, held = [], 0
            batch.append(g)
            held += self.plan.group_bytes[g]
        if batch:
            self._replay(batch)
        self.ready, self.ready_bytes = [], 0

    def _temporaries(self, gs: list[int]) -> dict[int, list[torch.Tensor]]:
        """Fresh checkpoint-format tensors for the groups: views of one allocation
        per device, as their recorded classes, with their recorded attributes."""
        plan = self.plan
        need: dict[torch.device, int] = {}
        for g in gs:
            for _, _, device, nbytes in plan.runs[g]:
                need[device] = need.get(device, 0) + nbytes
        buffers = self.buffers
        for device, nbytes in need.items():
            if device not in buffers or buffers[device].numel() < nbytes:
                buffers.pop(device, None)  # freed before its successor is allocated
                buffers[device] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        used = dict.fromkeys(need, 0)
        temps = {}
        for g in gs:
            made: list[torch.Tensor] = []
            for begin, end, device, nbytes in plan.runs[g]:
                made += plan.tensors.make(buffers[device], used[device], begin, end)
                used[device] += nbytes
            for e, attrs in plan.attrs[g]:
                made[e].__dict__.update(attrs)
            temps[g] = made
        return temps

    def _replay(self, gs: list[int]) -> None:
        plan, groups = self.plan, self.plan.groups
        temps = self._temporaries(gs)
        modules = {g: [self.model.get_submodule(m.prefix) for m in groups[g].modules] for g in gs}
        dsts, srcs, loaded, regions = [], [], [], 0
        for g in gs:
            values = self.values[g]
            if not plan.loaded[g] and g not in self.regioned:
                dsts += temps[g]
                srcs += values
                continue
            for e, value in enumerate(values):
                if e in plan.loaded[g]:
                    loaded.append((g, e))
                elif isinstance(value, Pieces):
                    temp = temps[g][e]
                    for span, target, source in zip(value.spans, value.targets, value.srcs):
                        dsts.append(dest_view(target, temp, span[:4]))
                        srcs.append(source)
                    regions += len(value.spans)
                else:
                    dsts.append(temps[g][e])
                    srcs.append(value)
        live, results, problems = [], [], {}
        attributes: list[tuple[nn.Module, dict]] = []  # plain values processing set, per module
        saved: list[_Saved] = []
        try:
            with registrations_unseen():
                for g in gs:
                    for m, rec in enumerate(groups[g].modules):
                        saved.append(_install(modules[g][m], rec, temps[g], plan.alias_keys[g][m],
                                              plan.live_storages))
                ops.batched_copy_(dsts, srcs)  # into the temporaries: the live model untouched
                for g, e in loaded:
                    entry = groups[g].entries[e]
                    entry.loader(temps[g][e], self.values[g][e])
                    self.custom_loaded.append(entry.name)
                for g in gs:
                    for m, rec in enumerate(groups[g].modules):
                        if rec.process is not None:
                            try:
                                rec.process(modules[g][m])
                            except Exception as error:
                                problems[rec.prefix or "<root>"] = f"processing raised {error!r}"
                    for m, key, kernel in plan.kernels[g]:
                        module = modules[g][m]
                        new = module._parameters.get(key, module._buffers.get(key))
                        prefix = groups[g].modules[m].prefix
                        why = _check_result(new, kernel)
                        if why is not None:
                            problems[f"{prefix}.{key}" if prefix else key] = why
                        elif new is not kernel:
                            live.append(kernel)
                            results.append(new)
            for s in saved:
                copies, values, refused = s.changes()
                problems.update(refused)
                live += [old for old, _ in copies]
                results += [new for _, new in copies]
                if values:
                    attributes.append((s.module, values))
        finally:
            for s in saved:
                s.restore()
        if problems:
            raise self.fail(processed=problems)
        try:
            ops.batched_copy_(live, results)
        except RuntimeError as error:
            raise self.fail(processed={groups[g].name: f"its results could not be copied: {error}"
                                       for g in gs}) from None
        for module, values in attributes:
            module.__dict__.update(values)
        self.regions += regions
        self.calls += 1 + bool(dsts)
        self.tensors += sum(len(groups[g].entries) for g in gs)
        written = sum(t.numel() * t.element_size() for t in live)
        self.bytes += written
        for g in gs:
            self.held_bytes -= self.held[g]
            self.held[g] = 0
            self.values[g] = None
        self.written += gs
        if self.on_written is not None:
            self.on_written(written)

    @property
    def replayed(self) -> tuple[str, ...]:
        return tuple(m.prefix for g in self.written for m in self.plan.groups[g].modules
                     if m.process is not None)
