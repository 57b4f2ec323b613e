"""From a source's names to validated (destination, source) pairs, in batches.

A Plan is made once per model layout and byte budget and reused by every reload:
it knows the leading name of every target, the batches (whole layers, up to the
budget) and which extra names a source may carry. Resolving a source against it
validates every name, shape and dtype before anything is written.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from fastreload import ops
from fastreload.errors import ReloadError
from fastreload.model import Layout
from fastreload.regions import Pieces, RegionProblem, region_views

__all__ = ["Fetcher", "Plan", "Regions", "StaleLayout", "Work", "assemble_regions", "check_pairs", "expand", "plan_for",
           "raise_not_tensors", "resolve"]


def _getter(names: tuple[str, ...]):
    # itemgetter of one name returns the item itself, of several a tuple: keep it a tuple.
    if len(names) == 1:
        return lambda m: (m[names[0]],)
    return operator.itemgetter(*names) if names else (lambda m: ())


class Fetcher:
    """source -> the tuple of its values under `names`, in one C-level call.

    A dict read a second time gets a reader by position (ops.ValuesInOrder): any
    dict whose keys come in that same order, the same dict again or a new one built
    from the same names (as a server reloading from one mapping, or a trainer
    sending a new dict every step, gives), is then read by one walk over its
    entries, without a lookup per name. Other sources are read by name. Every
    source gets the right values; only the speed differs."""

    remembered = 4  # readers kept, the most recently used ones (and as many dict ids)

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self._by_name = _getter(names)
        self._readers: tuple[ops.ValuesInOrder, ...] = ()  # the most recently used first
        # ids of the last dicts read by name (not the dicts: they are not kept).
        self._read_by_name: dict[int, None] = {}

    def __call__(self, source: Mapping[str, torch.Tensor]) -> tuple:
        if type(source) is not dict:
            return self._by_name(source)
        readers = self._readers
        for read in readers:
            values = read(source)
            if values is not None:
                if read is not readers[0]:
                    self._keep(read, readers)
                return values
        seen = self._read_by_name
        if id(source) not in seen:
            excess = len(seen) + 1 - self.remembered
            if excess > 0:
                for oldest in list(seen)[:excess]:  # a copy: another thread may change seen meanwhile
                    seen.pop(oldest, None)
            seen[id(source)] = None
            return self._by_name(source)
        seen.pop(id(source), None)
        position = {k: i for i, k in enumerate(source)}
        try:
            read = ops.ValuesInOrder(tuple(source), [position[n] for n in self.names])
        except KeyError:  # not every name: read by name, which raises or is caught
            return self._by_name(source)
        self._keep(read, readers)
        return read(source)

    def _keep(self, read, readers) -> None:
        # A new tuple, assigned whole: a thread iterating the old one is not disturbed.
        self._readers = (read, *(r for r in readers if r is not read))[:self.remembered]


@dataclass(frozen=True)
class Plan:
    layout: Layout
    # Target index ranges [start, stop), each a run of whole layers of at most
    # batch_bytes (a larger layer is a batch of its own).
    batches: tuple[tuple[int, int], ...]
    sizes: tuple[int, ...]  # bytes of each target
    total_bytes: int
    leading: tuple[str, ...]
    leading_set: frozenset[str]
    fetch_leading: Fetcher
    dsts: tuple[torch.Tensor, ...]
    unit_of: tuple[int, ...]  # the layer (index into layout.units) of each target
    # batched_copy_ bound to dsts in these batches: what a reload of every target runs.
    bound: ops.BoundCopy


@dataclass(frozen=True)
class Work:
    """The pairs of one reload, names checked, and what was left out of them."""

    plan: Plan
    dsts: list[torch.Tensor] | tuple[torch.Tensor, ...]
    srcs: list[torch.Tensor] | tuple[torch.Tensor, ...]
    names: list[str] | tuple[str, ...]  # leading name of each pair
    # Pairs to copy batch by batch; None: every target, copied by plan.bound.
    batches: tuple[tuple[list[torch.Tensor], list[torch.Tensor]], ...] | None
    tensors: int
    bytes: int
    layers: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    regions: int = 0  # region writes (fused and sharded targets) among the pairs

    @property
    def copies(self) -> int:
        """batched_copy_ calls (or batches of the bound copy) this work takes."""
        return len(self.plan.batches) if self.batches is None else len(self.batches)


def plan_for(layout: Layout, batch_bytes: int) -> Plan:
    if batch_bytes <= 0:
        raise ValueError(f"batch_bytes must be positive, got {batch_bytes}")
    plan = layout.plans.get(batch_bytes)
    if plan is None:
        plan = _make_plan(layout, batch_bytes)
        layout.plans[batch_bytes] = plan
    return plan


def _make_plan(layout: Layout, batch_bytes: int) -> Plan:
    sizes = [t.tensor.numel() * t.tensor.element_size() for t in layout.targets]
    batches = []
    start = held = 0
    for unit in layout.units:
        unit_bytes = sum(sizes[unit.start:unit.stop])
        if held and held + unit_bytes > batch_bytes:
            batches.append((start, unit.start))
            start, held = unit.start, 0
        held += unit_bytes
    if start < len(layout.targets):
        batches.append((start, len(layout.targets)))
    leading = tuple(t.name for t in layout.targets)
    fetch = Fetcher(leading)
    unit_of = tuple(u for u, unit in enumerate(layout.units) for _ in range(unit.start, unit.stop))
    dsts = tuple(t.tensor for t in layout.targets)
    bound = ops.BoundCopy(dsts, [stop for _, stop in batches] or [0])
    return Plan(layout, tuple(batches), tuple(sizes), sum(sizes), leading, frozenset(leading),
                fetch, dsts, unit_of, bound)


@dataclass
class Regions:
    """Region targets of one reload, matched to the layout: the regions of each
    destination (target index) and what was wrong with the others."""

    pieces: dict[int, Pieces]
    problems: dict[str, str]  # destination (or source) name -> why its regions are refused
    duplicates: list[str]
    unexpected: list[str]
    uninitialized: list[str]
    # The source names a destination's regions come from, when the rename knows them:
    # an uncovered destination names those not given.
    sources_of: Callable[[str], list[str]] | None = None
    given: frozenset[str] = frozenset()

    def uncovered(self, pieces: Pieces) -> str:
        return pieces.uncovered() + not_given(self.sources_of, pieces.name, self.given)


def not_given(sources_of, name: str, given) -> str:
    """'; not given: ...' naming the source names of destination `name` missing."""
    if sources_of is None:
        return ""
    missing = [s for s in sources_of(name) if s not in given]
    if not missing:
        return ""
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    return f"; not given: {', '.join(missing[:10])}{more}"


def assemble_regions(layout: Layout, regions, get, sources_of=None) -> Regions:
    """regions: (Target, source name) pairs; get(source name) -> the tensor. Checks
    every region (bounds, shapes, overlaps) and groups them by destination.
    sources_of(destination name): the source names it expects, if known."""
    found = Regions({}, {}, [], [], [], sources_of, frozenset(n for _, n in regions))
    for target, name in regions:
        tensor = get(name)
        if not isinstance(tensor, torch.Tensor):
            raise_not_tensors({name: tensor})
        index = layout.target_index.get(target.name)
        if index is None:
            if target.name in layout.uninitialized:
                found.uninitialized.append(target.name)
            elif target.name not in layout.ignored:
                found.unexpected.append(target.name)
            continue
        dst = layout.targets[index].tensor
        pieces = found.pieces.get(index)
        if pieces is None:
            pieces = found.pieces[index] = Pieces(layout.targets[index].name, 0)
        try:
            dv, sv, covered, label = region_views(target, dst, tensor)
            pieces.add(dv, sv, covered, label, tensor, dst, target)
        except RegionProblem as problem:
            found.problems[f"{target.name} <- {name}"] = str(problem)
        except KeyError as repeated:
            found.duplicates.append(repeated.args[0])
    return found


def _every_target(plan: Plan, fetched: tuple) -> Work:
    # The common case, a source holding exactly the leading names (that the values
    # are tensors, the bound copy checks as it reads them).
    return Work(plan, plan.dsts, fetched, plan.leading, None, len(fetched), plan.total_bytes,
                len(plan.layout.units))


def resolve_exactly(plan: Plan, source: Mapping[str, torch.Tensor], others: int) -> Work | None:
    """The common case in one lookup: the source holds every leading name and
    `others` names more, known to be taken elsewhere (by a replay). None otherwise:
    then resolve() the source without those others."""
    if len(source) != len(plan.leading) + others:
        return None
    try:
        return _every_target(plan, plan.fetch_leading(source) if plan.leading else ())
    except KeyError:
        return None


def resolve(plan: Plan, source: Mapping[str, torch.Tensor], *, strict: bool,
            regions: Regions | None = None) -> Work:
    """Pairs every target with its source tensor and checks the names: raises
    ReloadError for missing (when strict), unexpected (when strict), uninitialized
    or conflicting tied names, listing with them every pair problem. Pair problems
    alone are found by check_pairs, or by batched_copy_ itself. Writes nothing.
    regions: the destinations written in regions (a destination whose regions do not
    cover it is missing; with strict, an error saying which rows)."""
    layout = plan.layout
    try:
        fetched = plan.fetch_leading(source) if plan.leading else ()
    except KeyError:
        fetched = None
    if fetched is not None and len(source) == len(plan.leading) and regions is None:
        return _every_target(plan, fetched)

    values: list[torch.Tensor | None]
    values = list(fetched) if fetched is not None else [source.get(n) for n in plan.leading]
    missing: list[str] = []
    unexpected: list[str] = []
    uninitialized: list[str] = []
    conflicts: list[str] = []
    not_tensors: dict[str, object] = {}
    for name in source.keys() - plan.leading_set:
        index = layout.target_index.get(name)
        if index is not None:  # a tied second name
            value = source[name]
            if not isinstance(value, torch.Tensor):
                not_tensors[name] = value
            elif values[index] is None:
                values[index] = value
            elif not same_values(values[index], value):
                conflicts.append(name)
        elif name in layout.uninitialized:
            uninitialized.append(name)
        elif name not in layout.ignored:
            unexpected.append(name)
    region_problems: dict[str, str] = {}
    duplicates: list[str] = []
    if regions is not None:
        region_problems.update(regions.problems)
        duplicates += regions.duplicates
        unexpected += regions.unexpected
        uninitialized += regions.uninitialized
        for index, pieces in regions.pieces.items():
            if values[index] is not None:
                region_problems[pieces.name] = "given both whole and in regions"
            elif pieces.complete:
                values[index] = pieces
            elif strict:
                region_problems[pieces.name] = regions.uncovered(pieces)
    missing = [plan.leading[i] for i, v in enumerate(values) if v is None]
    not_tensors.update((plan.leading[i], v) for i, v in enumerate(values)
                       if v is not None and not isinstance(v, (torch.Tensor, Pieces)))
    if not_tensors:
        raise_not_tensors(not_tensors)

    present = range(len(values)) if not missing else [i for i, v in enumerate(values) if v is not None]
    if regions is None:
        dsts = [plan.dsts[i] for i in present] if missing else list(plan.dsts)
        srcs = [values[i] for i in present] if missing else values
        names = [plan.leading[i] for i in present] if missing else plan.leading
    else:
        dsts, srcs, names = expand(plan, values, present)

    if (uninitialized or conflicts or region_problems or duplicates
            or (strict and (missing or unexpected))):
        raise ReloadError(
            missing=missing if strict else (),
            unexpected=unexpected if strict else (),
            mismatched=pair_problems(dsts, srcs, names),
            uninitialized=uninitialized, conflicts=conflicts, regions=region_problems,
            duplicates=duplicates)

    if not missing and regions is None:
        return Work(plan, dsts, srcs, names, None, len(srcs), plan.total_bytes,
                    len(layout.units), (), tuple(unexpected))
    batches, layers = _batches_of_present(plan, values)
    nbytes = sum(plan.sizes[i] for i in present)
    written_regions = sum(len(v.dsts) for v in values if isinstance(v, Pieces))
    return Work(plan, dsts, srcs, names, batches, len(present), nbytes, layers,
                tuple(missing), tuple(unexpected), written_regions)


def expand(plan: Plan, values, indices, names: bool = True) -> tuple[list, list, list]:
    """(dsts, srcs, names) of the targets at indices, a region target as its regions
    (values: the source value of each target, by index); names empty unless asked."""
    dsts, srcs, labels = [], [], []
    for i in indices:
        value = values[i]
        if isinstance(value, Pieces):
            dsts += value.dsts
            srcs += value.srcs
            if names:
                labels += [span[-1] for span in value.spans]
        else:
            dsts.append(plan.dsts[i])
            srcs.append(value)
            if names:
                labels.append(plan.leading[i])
    return dsts, srcs, labels


def raise_not_tensors(values: Mapping[str, object]) -> None:
    """values: source name -> the value that is no tensor. Raised before anything is written."""
    raise ReloadError(mismatched={name: f"the source value is a {type(value).__name__}, not a tensor"
                                  for name, value in values.items()})


class StaleLayout(Exception):
    """Two targets of the layout share bytes now: the model's storage changed since
    the layout was made (``p.data = q.data``); make it again."""


def check_pairs(work: Work, problems: torch.Tensor | None = None) -> None:
    """Raises ReloadError naming every pair batched_copy_ would refuse (shape,
    dtype, device, shared memory), or StaleLayout; writes nothing. problems: the
    PairProblem codes, when a copy has already found them."""
    mismatched = pair_problems(work.dsts, work.srcs, work.names, problems)
    if mismatched:
        raise ReloadError(mismatched=mismatched)


def pair_problems(dsts, srcs, names, problems: torch.Tensor | None = None) -> dict[str, str]:
    if problems is None:
        problems = ops.batched_copy_check(dsts, srcs)
    if not problems.any():
        return {}
    if (problems == ops.PairProblem.DESTINATION_OVERLAP).any():
        raise StaleLayout()
    return {names[i]: _explain(problems[i].item(), dsts[i], srcs[i])
            for i in problems.nonzero().flatten().tolist()}


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and torch.equal(a, b.to(a.device, a.dtype)))


def _explain(problem: int, dst: torch.Tensor, src: torch.Tensor) -> str:
    if problem == ops.PairProblem.SHAPE:
        return f"shape mismatch: the model has {tuple(dst.shape)}, the source {tuple(src.shape)}"
    if problem == ops.PairProblem.DTYPE:
        return (f"dtype mismatch: cannot convert the source's {src.dtype} into the model's "
                f"{dst.dtype} (floating types convert into each other; others must match)")
    if problem == ops.PairProblem.DEVICE:
        return f"device mismatch: the source on {src.device} cannot be copied to {dst.device}"
    return "the source tensor shares memory with another tensor of the model"


def _batches_of_present(plan: Plan, values: list) -> tuple[tuple, int]:
    batches = []
    layers = 0
    for a, b in plan.batches:
        dsts, srcs, _ = expand(plan, values, [i for i in range(a, b) if values[i] is not None])
        if dsts:
            batches.append((dsts, srcs))
    for unit in plan.layout.units:
        layers += any(values[i] is not None for i in range(unit.start, unit.stop))
    return tuple(batches), layers
