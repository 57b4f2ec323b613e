"""From a source's names to validated (destination, source) pairs, in batches.

A Plan is made once per model layout and byte budget and reused by every reload:
it knows the leading name of every target, the batches (whole layers, up to the
budget) and which extra names a source may carry. Resolving a source against it
validates every name, shape and dtype before anything is written.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fastreload import ops
from fastreload.errors import ReloadError
from fastreload.model import Layout

__all__ = ["Plan", "StaleLayout", "Work", "check_pairs", "plan_for", "resolve"]


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
    fetch_leading: operator.itemgetter
    dsts: tuple[torch.Tensor, ...]
    unit_of: tuple[int, ...]  # the layer (index into layout.units) of each target


@dataclass(frozen=True)
class Work:
    """The pairs of one reload, names checked, and what was left out of them."""

    plan: Plan
    dsts: list[torch.Tensor]
    srcs: list[torch.Tensor]
    names: list[str] | tuple[str, ...]  # leading name of each pair
    batches: tuple[tuple[list[torch.Tensor], list[torch.Tensor]], ...]
    tensors: int
    bytes: int
    layers: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()


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
    # itemgetter of one name returns the item itself, of several a tuple: keep it a tuple.
    fetch = operator.itemgetter(*leading) if len(leading) != 1 else (lambda m: (m[leading[0]],))
    unit_of = tuple(u for u, unit in enumerate(layout.units) for _ in range(unit.start, unit.stop))
    return Plan(layout, tuple(batches), tuple(sizes), sum(sizes), leading, frozenset(leading),
                fetch, tuple(t.tensor for t in layout.targets), unit_of)


def resolve(plan: Plan, source: Mapping[str, torch.Tensor], *, strict: bool) -> Work:
    """Pairs every target with its source tensor and checks the names: raises
    ReloadError for missing (when strict), unexpected (when strict), uninitialized
    or conflicting tied names, listing with them every pair problem. Pair problems
    alone are found by check_pairs, or by batched_copy_ itself. Writes nothing."""
    layout = plan.layout
    values: list[torch.Tensor | None]
    try:
        values = list(plan.fetch_leading(source)) if plan.leading else []
    except KeyError:
        values = [source.get(n) for n in plan.leading]

    missing: list[str] = []
    unexpected: list[str] = []
    uninitialized: list[str] = []
    conflicts: list[str] = []
    not_tensors: list[str] = []
    # The common case, a source holding exactly the leading names, skips this scan.
    kinds = set(map(type, values))
    if len(source) != len(plan.leading) or not all(issubclass(k, torch.Tensor) for k in kinds):
        for name in source.keys() - plan.leading_set:
            index = layout.target_index.get(name)
            if index is not None:  # a tied second name
                value = source[name]
                if not isinstance(value, torch.Tensor):
                    not_tensors.append(name)
                elif values[index] is None:
                    values[index] = value
                elif not same_values(values[index], value):
                    conflicts.append(name)
            elif name in layout.uninitialized:
                uninitialized.append(name)
            elif name not in layout.ignored:
                unexpected.append(name)
        missing = [plan.leading[i] for i, v in enumerate(values) if v is None]
        not_tensors += [plan.leading[i] for i, v in enumerate(values)
                        if v is not None and not isinstance(v, torch.Tensor)]
        if not_tensors:
            raise TypeError(f"source values must be tensors; not so for {not_tensors[:20]}")

    present = range(len(values)) if not missing else [i for i, v in enumerate(values) if v is not None]
    dsts = [plan.dsts[i] for i in present] if missing else list(plan.dsts)
    srcs = [values[i] for i in present] if missing else values
    names = [plan.leading[i] for i in present] if missing else plan.leading

    if uninitialized or conflicts or (strict and (missing or unexpected)):
        raise ReloadError(
            missing=missing if strict else (),
            unexpected=unexpected if strict else (),
            mismatched=pair_problems(dsts, srcs, names),
            uninitialized=uninitialized, conflicts=conflicts)

    if not missing:
        batches = tuple((list(plan.dsts[a:b]), srcs[a:b]) for a, b in plan.batches)
        return Work(plan, dsts, srcs, names, batches, len(srcs), plan.total_bytes,
                    len(layout.units), (), tuple(unexpected))
    batches, layers = _batches_of_present(plan, values)
    nbytes = sum(plan.sizes[i] for i in present)
    return Work(plan, dsts, srcs, names, batches, len(present), nbytes, layers,
                tuple(missing), tuple(unexpected))


class StaleLayout(Exception):
    """Two targets of the layout share bytes now: the model's storage changed since
    the layout was made (``p.data = q.data``); make it again."""


def check_pairs(work: Work) -> None:
    """Raises ReloadError naming every pair batched_copy_ would refuse (shape,
    dtype, device, shared memory), or StaleLayout; writes nothing."""
    mismatched = pair_problems(work.dsts, work.srcs, work.names)
    if mismatched:
        raise ReloadError(mismatched=mismatched)


def pair_problems(dsts: list[torch.Tensor], srcs: list[torch.Tensor], names) -> dict[str, str]:
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
        pairs = [(plan.dsts[i], values[i]) for i in range(a, b) if values[i] is not None]
        if pairs:
            batches.append(([d for d, _ in pairs], [s for _, s in pairs]))
    for unit in plan.layout.units:
        layers += any(values[i] is not None for i in range(unit.start, unit.stop))
    return tuple(batches), layers
