"""reload_layerwise: the stages wired together, the batches copied, the report."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from fastreload import ops
from fastreload.model import Layout, forget, layout_of
from fastreload.names import Renamed, detect_wrappers, renamer
from fastreload.plan import StaleLayout, Work, check_pairs, plan_for, raise_not_tensors, resolve
from fastreload.report import ReloadReport
from fastreload.sources import open_source
from fastreload.stream import consume

__all__ = ["DEFAULT_BATCH_BYTES", "DEFAULT_STREAM_BATCH_BYTES", "reload_layerwise"]

logger = logging.getLogger("fastreload")

# Bytes written by one fused copy at most (a larger layer is copied on its own).
# One batch is checked by batched_copy_ itself as it copies; several need one
# check of every pair first, so that no batch is written before a refused one.
DEFAULT_BATCH_BYTES = 2**30
# A stream holds completed layers until they fill a batch: a smaller budget there.
DEFAULT_STREAM_BATCH_BYTES = 256 * 2**20


def _copy(model, source, strict, batch_bytes, on_written) -> tuple[Layout, Work]:
    layout = layout_of(model)
    plan = plan_for(layout, batch_bytes)
    work = resolve(plan, source, strict=strict)
    if work.batches is None:
        # Every target: the bound copy checks every pair, then writes batch by batch.
        try:
            problems = plan.bound(work.srcs, on_written)
        except TypeError:
            not_tensors = [n for n, v in zip(work.names, work.srcs) if not isinstance(v, torch.Tensor)]
            if not_tensors:
                raise_not_tensors(not_tensors)
            raise
        if problems is not None:
            check_pairs(work, problems)
        return layout, work
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
    return layout, work


def _known_to(layout: Layout):
    return lambda name: (name in layout.target_index or name in layout.ignored
                         or name in layout.uninitialized)


def _named(source, rename, layout: Layout):
    """The source under the model's names: renamed as asked, or, when some of its
    names are unknown to the model, under the common wrapper that explains them all."""
    if rename is not None:
        return Renamed(source, rename), "rename"
    known = _known_to(layout)
    leading = layout.targets[0].name if layout.targets else None
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
    rename: Callable[[str], str] | Mapping[str, str] | None = None,
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
    fused batches of up to ``batch_bytes`` (1 GiB, or 256 MiB for streams).

    ``rename`` maps source names to model names: a callable, or a dict of prefix
    replacements (``{"module.": ""}``, ``{"": "model."}``). Without it, names wrapped
    by ``module.`` or ``_orig_mod.``, or missing or carrying an extra ``model.``, are
    recognised and mapped. ``max_held_bytes`` caps what a stream may hold for layers
    not yet written. ``progress=True`` shows a progress bar over bytes (tqdm).

    Left alone, and reported: buffers that view a parameter's storage (written
    through the parameter), second names of tied tensors (written once),
    uninitialized (lazy or meta) tensors, non-persistent buffers.

    Raises ReloadError for missing or unexpected names (unless ``strict=False``,
    which reports them instead), shape mismatches, dtypes that do not convert, tied
    names with different values and source tensors aimed at uninitialized
    parameters: for a mapping or files before anything is written, for a stream
    naming the layers already written and those not.
    """
    started = time.perf_counter()
    kind, source = open_source(state_dict)
    rename = renamer(rename)
    if batch_bytes is None:
        batch_bytes = DEFAULT_STREAM_BATCH_BYTES if kind == "stream" else DEFAULT_BATCH_BYTES
    if batch_bytes <= 0:
        raise ValueError(f"batch_bytes must be positive, got {batch_bytes}")
    bar = _progress_bar() if progress else None
    on_written = bar.update if bar is not None else None
    try:
        # Inference mode admits in-place writes into inference tensors as well as
        # normal ones, and keeps autograd out of every op call over the model's tensors.
        with torch.inference_mode():
            if kind == "stream":
                layout = layout_of(model)
                plan = plan_for(layout, batch_bytes)
                if bar is not None:
                    bar.total = plan.total_bytes
                done = consume(plan, source, strict=strict, batch_bytes=batch_bytes,
                               max_held_bytes=max_held_bytes, rename=rename,
                               detect=_known_to(layout), on_written=on_written)
                calls, bytes_read, peak, renamed = (done.batched_copy_calls, done.bytes_read,
                                                    done.peak_held_bytes, done.renamed)
            else:
                files = source if kind == "safetensors" else None
                if files is not None:
                    source = files.views()
                source, renamed = _named(source, rename, layout_of(model))
                if bar is not None:
                    bar.total = plan_for(layout_of(model), batch_bytes).total_bytes
                try:
                    layout, done = _copy(model, source, strict, batch_bytes, on_written)
                except StaleLayout:
                    forget(model)
                    layout, done = _copy(model, source, strict, batch_bytes, on_written)
                calls, peak = done.copies, 0
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
        bytes_read=bytes_read, peak_held_bytes=peak, renamed=renamed)
    logger.info("%s", report)
    return report


def _progress_bar():
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError("progress=True shows a tqdm progress bar: pip install tqdm") from None
    return tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="fastreload")
