"""reload_layerwise: the stages wired together, the batches copied, the report."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from fastreload import ops
from fastreload.errors import ReloadError
from fastreload.model import Layout, forget, layout_of
from fastreload.hf import HubRename, detected_rename
from fastreload.names import Renamed, detect_wrappers, renamer
from fastreload.plan import (Plan, StaleLayout, Work, assemble_regions, check_pairs, plan_for, raise_not_tensors,
                             resolve, resolve_exactly)
from fastreload.regions import Target
from fastreload.renamed_plan import cached_work, remember
from fastreload.replay import Replay
from fastreload.replay_plan import ReplayPlan, replay_plan
from fastreload.report import ReloadReport
from fastreload.sources import open_source
from fastreload.stream import consume

__all__ = ["DEFAULT_BATCH_BYTES", "DEFAULT_REPLAY_BATCH_BYTES", "DEFAULT_STREAM_BATCH_BYTES", "reload_layerwise"]

logger = logging.getLogger("fastreload")

# Bytes written by one fused copy at most (a larger layer is copied on its own).
# One batch is checked by batched_copy_ itself as it copies; several need one
# check of every pair first, so that no batch is written before a refused one.
DEFAULT_BATCH_BYTES = 2**30
# A stream holds completed layers until they fill a batch: a smaller budget there.
DEFAULT_STREAM_BATCH_BYTES = 256 * 2**20
# Replayed units (record()) are processed a few at a time: a unit's checkpoint-format
# temporaries are written, read by its processing and its results copied out while
# they are still in cache; a larger unit goes alone. Checkpoint plus kernel bytes.
DEFAULT_REPLAY_BATCH_BYTES = 16 * 2**20


def _copy(model, layout: Layout, source, strict, batch_bytes, replay_batch_bytes,
          on_written, files=None) -> tuple[Layout, Work, Replay | None]:
    replay = replay_plan(model, layout)
    if replay is None:
        plan = plan_for(layout, batch_bytes)
        work = cached_work(plan, source, batch_bytes, on_written, files)
        if work is not None:
            return layout, work, None
        plan, work = _check_direct(layout, source, strict, batch_bytes)
        _write(plan, work, on_written)
        if isinstance(source, Renamed) and isinstance(source.rename, HubRename):
            remember(plan, source, work, batch_bytes)
        return layout, work, None
    plan, work, session = _check_replayed(model, replay, source, strict, batch_bytes, replay_batch_bytes,
                                          on_written)
    session.flush()
    _write(plan, work, on_written)
    return layout, work, session


def _check_direct(layout: Layout, source, strict, batch_bytes) -> tuple[Plan, Work]:
    plan = plan_for(layout, batch_bytes)
    return plan, resolve(plan, source, strict=strict, regions=_regions(plan.layout, source))


@dataclass(frozen=True)
class Checked:
    """A mapping source checked against a model, nothing written: the pairs to copy
    directly (work, in plan) and, for a model prepared with record(), the session that
    takes the replayed units' checkpoint tensors."""

    layout: Layout
    plan: Plan
    work: Work
    session: Replay | None
    source: Mapping[str, torch.Tensor]  # under the model's names (a Renamed, or the source)
    renamed: str | None


def check_mapping(model: nn.Module, source: Mapping[str, torch.Tensor], *, strict: bool, rename,
                  batch_bytes: int, replay_batch_bytes: int, on_written=None) -> Checked:
    """Everything reload_layerwise checks of a mapping before its first write (names,
    shapes, dtypes, regions, tied names, replayed units), and every pair's copy;
    raises ReloadError. For callers that write the pairs themselves (a sync)."""
    for attempt in range(2):
        layout = layout_of(model)
        named, renamed = _named(source, renamer(rename), model, layout)
        replay = replay_plan(model, layout)
        try:
            if replay is None:
                plan, work = _check_direct(layout, named, strict, batch_bytes)
                session = None
            else:
                plan, work, session = _check_replayed(model, replay, named, strict, batch_bytes,
                                                      replay_batch_bytes, on_written)
            if work.dsts:
                check_pairs(work)
            return Checked(layout, plan, work, session, named, renamed)
        except StaleLayout:
            if attempt:
                raise
            forget(model)
    raise AssertionError("unreachable")


def _regions(layout: Layout, source):
    """The region targets a rename gave, checked against the layout; None if none."""
    regions = getattr(source, "regions", None)
    if not regions:
        return None
    return assemble_regions(layout, regions, source.original, getattr(source.rename, "sources_of", None))


def _check_replayed(model, replay: ReplayPlan, source, strict, batch_bytes, replay_batch_bytes, on_written):
    """(plan, work, session) of recorded modules replayed, the others copied directly:
    every name, shape and dtype of both checked, nothing written. The replayed units
    are to be written first (flush(), whose processing may still refuse one), then
    the direct batches."""
    plan = plan_for(replay.direct, batch_bytes)
    direct_units = [u.prefix or "<root>" for u in replay.direct.units]

    def fail(**problems) -> ReloadError:
        written, unwritten = session.layers()
        return ReloadError(**problems, written_layers=written, unwritten_layers=unwritten + direct_units)

    session = Replay(replay, model, batch_bytes=replay_batch_bytes, on_written=on_written, fail=fail)
    index, ignored = replay.index, replay.ignored
    regions = getattr(source, "regions", None) or []
    found = session.check_mapping(source, [(t, n) for t, n in regions if t.name in index])
    if strict:
        found["regions"].update(session.uncovered())
    else:
        found["missing"] = []
    regions = [(t, n) for t, n in regions if t.name not in index]
    regions = assemble_regions(plan.layout, regions, source.original,
                               getattr(source.rename, "sources_of", None)) if regions else None
    work = None
    if session.names_taken is not None and regions is None:
        work = resolve_exactly(plan, source, session.names_taken + sum(n in source for n in ignored))
    try:
        if work is None:
            direct = {k: v for k, v in source.items() if k not in index and k not in ignored}
            work = resolve(plan, direct, strict=strict, regions=regions)
        if work.dsts:
            check_pairs(work)  # the replayed units are written first: nothing after them may fail
    except ReloadError as error:
        raise ReloadError(
            missing=list(error.missing) + found["missing"], unexpected=error.unexpected,
            mismatched={**error.mismatched, **found["mismatched"]}, uninitialized=error.uninitialized,
            conflicts=list(error.conflicts) + found["conflicts"], overlapping=error.overlapping,
            duplicates=list(error.duplicates) + found["duplicates"], regions={**error.regions, **found["regions"]}
        ) from None
    if any(found.values()):
        raise ReloadError(**found)
    return plan, work, session


def _write(plan, work: Work, on_written) -> None:
    if work.batches is None:
        # Every target: the bound copy checks every pair, then writes batch by batch.
        try:
            problems = plan.bound(work.srcs, on_written)
        except TypeError:
            not_tensors = {n: v for n, v in zip(work.names, work.srcs) if not isinstance(v, torch.Tensor)}
            if not_tensors:
                raise_not_tensors(not_tensors)
            raise
        if problems is not None:
            check_pairs(work, problems)
        return
    if len(work.batches) > 1:
        check_pairs(work)  # a refusal in a later batch must not follow written ones
    try:
        for dsts, srcs in work.batches:
            ops.batched_copy_(dsts, srcs)
            if on_written is not None:
                on_written(sum(d.numel() * d.element_size() for d in dsts))
    except RuntimeError:
        if len(work.batches) == 1:
            check_pairs(work)  # batched_copy_ refused the batch whole: name the pairs
        raise


def _layers_of(work: Work, session: Replay | None) -> tuple[list[str], list[str]]:
    """The layers a finished copy wrote, and those it left out (strict=False)."""
    layout = work.plan.layout
    missing = set(work.missing)
    written, unwritten = [], []
    for unit in layout.units:
        names = (t.name for t in layout.targets[unit.start:unit.stop])
        (written if any(n not in missing for n in names) else unwritten).append(unit.prefix or "<root>")
    if session is not None:
        replayed, not_replayed = session.layers()
        written, unwritten = replayed + written, not_replayed + unwritten
    return written, unwritten


def _known_to(layout: Layout, replay: ReplayPlan | None = None):
    if replay is not None:
        direct = _known_to(replay.direct)
        return lambda name: name in replay.index or name in replay.ignored or direct(name)
    return lambda name: (name in layout.target_index or name in layout.ignored
                         or name in layout.uninitialized)


def _named(source, rename, model, layout: Layout):
    """The source under the model's names: renamed as asked, or, when some of its
    names are unknown to the model, under the common wrapper that explains them all."""
    if rename is not None:
        return Renamed(source, rename), "rename"
    replay = replay_plan(model, layout)
    known = _known_to(layout, replay)
    if replay is not None:
        leading = next(iter(replay.index), None)
    else:
        leading = layout.targets[0].name if layout.targets else None
    hub = detected_rename(model)
    if hub is not None and hub.describes(source):
        logger.info("fastreload: source in the %s", hub.description)
        return Renamed(source, hub), hub.description
    if leading is None or leading in source or all(map(known, source)):
        return source, None
    found = detect_wrappers(source, known)
    if found is None:
        return source, None
    logger.info("fastreload: source names %s to match the model", found[0])
    return Renamed(source, found[1]), found[0]


def reload_layerwise(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | str | os.PathLike | Sequence[str | os.PathLike] | Iterable,
    *,
    strict: bool = True,
    batch_bytes: int | None = None,
    max_held_bytes: int | None = None,
    rename: Callable[[str], str | Target | tuple[Target, ...]] | Mapping[str, str | Target | tuple[Target, ...]]
    | None = None,
    progress: bool = False,
) -> ReloadReport:
    """Writes new weights into the model's existing tensors, in place.

    The source (``state_dict``) is one of:
    - a mapping keyed like ``model.state_dict()``;
    - safetensors on disk: a file, a directory of shards (with or without its
      index), an index file, or a list of paths; read through memory maps, every
      header checked before anything is written;
    - any other iterable of ``(name, tensor)`` pairs: a stream, read once in any
      order; each layer is written as soon as all its tensors have arrived.

    Every parameter and persistent buffer receives the source's values, converted to
    its dtype; every tensor keeps its object, storage and data pointer, so captured
    CUDA graphs and kernels holding raw pointers stay valid. Layers are copied in
    fused batches of up to ``batch_bytes`` (1 GiB, or 256 MiB for streams; units
    replayed for record() go in batches of 16 MiB of checkpoint plus kernel bytes,
    a larger unit alone).

    ``rename`` maps source names to model names: a callable, or a dict of prefix
    replacements (``{"module.": ""}``, ``{"": "model."}``). Without it, names wrapped
    by ``module.`` or ``_orig_mod.``, or missing or carrying an extra ``model.``, are
    recognised and mapped. A rename may also return (or the dict map a full source
    name to) a ``fastreload.Target``, or a tuple of them: the source tensor, or its
    tensor-parallel shard, goes into a region of a model tensor (fused projections,
    one expert of stacked experts, a transposed layout); a destination is written
    once its regions cover it exactly. A transformers model also takes, without a
    rename, a source in the checkpoint (Hub) format its conversion mapping describes
    (what ``save_pretrained`` writes: one tensor per expert), written as regions
    (``fastreload.hf``; ``report.renamed`` says so). ``max_held_bytes`` caps what a
    stream may hold for layers not yet written. ``progress=True`` shows a progress
    bar over bytes (tqdm).

    Left alone, and reported: buffers that view a parameter's storage (written
    through the parameter), second names of tied tensors (written once),
    uninitialized (lazy or meta) tensors, non-persistent buffers.

    Raises ReloadError for missing or unexpected names (unless ``strict=False``,
    which reports them instead), shape mismatches, dtypes that do not convert, tied
    names with different values and source tensors aimed at uninitialized
    parameters: for a mapping or files before anything is written, for a stream
    naming the layers already written and those not. Every refusal of the source
    is a ReloadError: values that are no tensors, a rename mapping two names to
    one, files that cannot be read as safetensors (``SafetensorsError``, a
    subclass) and files cut short or rewritten in place while they were read
    (after the copy: the error names the file and the layers written).

    Programming errors in the arguments themselves, not in what the source holds,
    raise ValueError or TypeError: a ``batch_bytes`` that is not positive, a
    ``rename`` that is neither a callable nor a dict, a ``state_dict`` of no kind
    above. Exceptions raised by the caller's own code (a ``rename`` callable)
    propagate as they are.
    """
    started = time.perf_counter()
    kind, source = open_source(state_dict)
    rename = renamer(rename)
    if batch_bytes is not None and batch_bytes <= 0:
        raise ValueError(f"batch_bytes must be positive, got {batch_bytes}")
    replay_batch_bytes = batch_bytes or DEFAULT_REPLAY_BATCH_BYTES
    if batch_bytes is None:
        batch_bytes = DEFAULT_STREAM_BATCH_BYTES if kind == "stream" else DEFAULT_BATCH_BYTES
    bar = _progress_bar() if progress else None
    on_written = bar.update if bar is not None else None
    try:
        # Inference mode admits in-place writes into inference tensors as well as
        # normal ones, and keeps autograd out of every op call over the model's tensors.
        with torch.inference_mode():
            if kind == "stream":
                layout = layout_of(model)
                replay = replay_plan(model, layout)
                plan = plan_for(layout if replay is None else replay.direct, batch_bytes)
                if bar is not None:
                    bar.total = plan.total_bytes
                done = consume(plan, source, strict=strict, batch_bytes=batch_bytes,
                               max_held_bytes=max_held_bytes, rename=rename,
                               detect=_known_to(layout, replay), on_written=on_written,
                               replay=replay, model=model, replay_batch_bytes=replay_batch_bytes,
                               hub=detected_rename(model))
                calls, bytes_read, peak, renamed = (done.batched_copy_calls, done.bytes_read,
                                                    done.peak_held_bytes, done.renamed)
                replayed, custom_loaded = done.replayed, done.custom_loaded
            else:
                files = source if kind == "safetensors" else None
                if files is not None:
                    source = files.views()
                layout = layout_of(model)
                source, renamed = _named(source, rename, model, layout)
                if bar is not None:
                    bar.total = plan_for(layout, batch_bytes).total_bytes
                try:
                    try:
                        layout, done, session = _copy(model, layout, source, strict, batch_bytes,
                                                      replay_batch_bytes, on_written, files)
                    except StaleLayout:
                        forget(model)
                        layout, done, session = _copy(model, layout_of(model), source, strict, batch_bytes,
                                                      replay_batch_bytes, on_written, files)
                except ReloadError as error:
                    if files is not None:  # a file cut short may be why: say so first
                        files.check_unchanged(lambda: (error.written_layers, error.unwritten_layers))
                    raise
                if files is not None:
                    files.check_unchanged(lambda: _layers_of(done, session))
                calls, peak = done.copies, 0
                replayed = custom_loaded = ()
                if session is not None:
                    done = replace(done, tensors=done.tensors + session.tensors,
                                   bytes=done.bytes + session.bytes, regions=done.regions + session.regions,
                                   layers=done.layers + len(session.written),
                                   missing=tuple(session.missing()) + done.missing)
                    calls += session.calls
                    replayed, custom_loaded = session.replayed, tuple(session.custom_loaded)
                # A mapping's tensors are the caller's, already in memory: not counted.
                bytes_read = files.nbytes if files is not None else None
    finally:
        if bar is not None:
            bar.close()
    skipped = dict(layout.skipped)
    if done.missing:
        skipped["missing"] = done.missing
    if done.unexpected:
        skipped["unexpected"] = done.unexpected
    report = ReloadReport(
        layers=done.layers, tensors=done.tensors, bytes=done.bytes, batched_copy_calls=calls,
        seconds=time.perf_counter() - started, skipped=skipped, source=kind,
        bytes_read=bytes_read, peak_held_bytes=peak, renamed=renamed,
        replayed=replayed, custom_loaded=custom_loaded, regions=done.regions)
    logger.info("%s", report)
    return report


def _progress_bar():
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError("progress=True shows a tqdm progress bar: pip install tqdm") from None
    return tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="fastreload")
