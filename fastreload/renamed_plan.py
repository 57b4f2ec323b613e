"""The cached plan of a repeated reload from a renamed source (a checkpoint format):
every (model view, source name) pair decided once, so that a source holding
exactly those names again is read by one Fetcher call and written by one bound
copy, without calling the rename on any name or making any view.

A plan is made after a reload that wrote every target from a source under a rename
object the caller keeps (the checkpoint-format rename of a transformers model), and
is kept with the layout's copy plans. It is used while the source holds exactly its
names and the model tensors its views were made of still hold their storage.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from fastreload import ops
from fastreload.errors import ReloadError
from fastreload.plan import Fetcher, Plan, Work, pair_problems
from fastreload.regions import RegionProblem, Target, region_views

__all__ = ["RenamedPlan", "cached_work", "remember"]


@dataclass(frozen=True)
class RenamedPlan:
    plan: Plan
    rename: object  # the rename it was made under (compared by identity, kept alive here)
    names: tuple[str, ...]  # the source name of each pair
    fetch: Fetcher
    labels: tuple[str, ...]
    dsts: tuple[torch.Tensor, ...]
    # Pairs whose source is a view of the source tensor (a shard, another shape):
    # (pair position, Target, its destination region), remade at each reload.
    adapted: tuple[tuple[int, Target, torch.Tensor], ...]
    bound: ops.BoundCopy  # of the views, frozen: `bases` watches what they view
    bases: ops.StorageWatch  # the model tensors the views view
    regions: int
    # The safetensors files read last, the tensors fetched from them and, once they
    # were read again, those frozen: the same (cached) files object holds the same
    # views for as long as its files are unchanged, so reading them again needs no
    # lookup per name, and the copy checks their storages instead of every view.
    last_read: list = field(default_factory=lambda: [None, None, None], compare=False, repr=False)

    def current(self) -> bool:
        return self.bases.unchanged()

    def fetched(self, raw, files) -> tuple[tuple, ops.FrozenTensors | None]:
        """The source tensors of every pair, from the source mapping raw (the views of
        `files`, when it is a SafetensorsSource), and the same frozen when these files
        were read before; raises KeyError for a missing name."""
        read, srcs, frozen = self.last_read
        if files is not None and read is not None and read() is files and raw is files.views():
            if frozen is None:
                try:
                    frozen = ops.FrozenTensors(srcs)
                except (TypeError, ValueError):  # a value that is not a strided tensor: passed as it is
                    frozen = False
                self.last_read[2] = frozen
            return srcs, frozen or None
        srcs = self.fetch(raw)
        if files is not None and raw is files.views():
            self.last_read[:] = [weakref.ref(files), srcs, None]
        return srcs, None


def _key(batch_bytes: int):
    return ("renamed", batch_bytes)


def remember(plan: Plan, source, work: Work, batch_bytes: int) -> None:
    """Keeps the pairs of a reload that wrote every target from a Renamed source
    (`work` from resolve) as the plan of the next reloads under the same rename."""
    layout = plan.layout
    if work.missing or work.unexpected or not hasattr(source, "rename"):
        return
    # per model tensor: [(its view, source name, label, Target to adapt by or None, model tensor, source tensor)]
    per_target: dict[int, list[tuple]] = {}
    for new, name in source.originals():
        index = layout.target_index.get(new)
        if index is None:
            continue  # an ignored name
        if index in per_target:
            return  # tied names both given: each reload compares them
        per_target[index] = [(plan.dsts[index], name, new, None, None, source.original(name))]
    for target, name in source.regions:
        index = layout.target_index.get(target.name)
        if index is None:
            continue
        tensor = source.original(name)
        dv, sv, _, label = region_views(target, plan.dsts[index], tensor)
        adapt = None if sv is tensor else target
        per_target.setdefault(index, []).append((dv, name, label, adapt, plan.dsts[index], tensor))
    if len(per_target) != len(plan.dsts):
        return
    names, labels, dsts, adapted, stops = [], [], [], [], []
    for start, stop in plan.batches:
        pairs = [pair for index in range(start, stop) for pair in per_target[index]]
        # A checkpoint holds its tensors in name order (experts 0, 1, 10, 100, ...): a
        # batch copied in the order of its sources' addresses reads each file forward
        # (and the fused copy joins the pairs that continue one another on both sides).
        pairs.sort(key=lambda pair: _address(pair[5]))
        for dv, name, label, adapt, base, _ in pairs:
            if adapt is not None:
                adapted.append((len(dsts), adapt, base))
            names.append(name)
            labels.append(label)
            dsts.append(dv)
        stops.append(len(dsts))
    layout.plans[_key(batch_bytes)] = RenamedPlan(
        plan, source.rename, tuple(names), Fetcher(tuple(names)), tuple(labels), tuple(dsts),
        tuple(adapted), ops.BoundCopy(dsts, stops or [0], frozen=True), ops.StorageWatch(plan.dsts), work.regions)


def _address(value) -> int:
    return value.data_ptr() if isinstance(value, torch.Tensor) and value.device.type == "cpu" else 0


def cached_work(plan: Plan, source, batch_bytes: int, on_written, files=None) -> Work | None:
    """Writes a source holding exactly the names of the cached plan of its rename,
    and returns what was written; None (nothing written) where no such plan applies.
    files: the SafetensorsSource whose views the source is, if it is."""
    rename = getattr(source, "rename", None)
    cached = plan.layout.plans.get(_key(batch_bytes))
    if cached is None or cached.rename is not rename or cached.plan is not plan:
        return None
    raw = source.source
    if len(raw) != len(cached.names) or not cached.current():
        return None
    try:
        srcs, frozen = cached.fetched(raw, files)
    except KeyError:
        return None
    if cached.adapted:
        srcs, frozen = list(srcs), None
        for position, target, base in cached.adapted:
            if not isinstance(srcs[position], torch.Tensor):
                return None
            try:
                srcs[position] = region_views(target, base, srcs[position])[1]
            except RegionProblem:
                return None  # the slow path names it
    try:
        problems = cached.bound(srcs if frozen is None else frozen, on_written)
    except TypeError:  # a value that is no tensor (checked before any write): the slow path names it
        return None
    if problems is not None:
        raise ReloadError(mismatched=pair_problems(list(cached.dsts), list(srcs), cached.labels, problems))
    return Work(plan, cached.dsts, srcs, cached.labels, None, len(plan.dsts), plan.total_bytes,
                len(plan.layout.units), regions=cached.regions)
