"""reload_layerwise: the stages wired together, the batches copied, the report."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fastreload import ops
from fastreload.model import Layout, forget, layout_of
from fastreload.plan import StaleLayout, Work, check_pairs, plan_for, resolve
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


def _copy(model, state_dict, strict, batch_bytes) -> tuple[Layout, Work]:
    layout = layout_of(model)
    work = resolve(plan_for(layout, batch_bytes), state_dict, strict=strict)
    if len(work.batches) > 1:
        check_pairs(work)  # a refusal in a later batch must not follow written ones
    try:
        for dsts, srcs in work.batches:
            ops.batched_copy_(dsts, srcs)
    except RuntimeError:
        if len(work.batches) == 1:
            check_pairs(work)  # batched_copy_ refused the batch whole: name the pairs
        raise
    return layout, work


def reload_layerwise(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | str | os.PathLike | Sequence[str | os.PathLike],
    *,
    strict: bool = True,
    batch_bytes: int | None = None,
    max_held_bytes: int | None = None,
) -> ReloadReport:
    """Writes new weights into the model's existing tensors, in place.

    ``state_dict`` is a mapping keyed like ``model.state_dict()``, or safetensors on
    disk: a file, a directory of shards (with or without its index), an index file,
    or a list of paths; files are read through memory maps and every header is
    checked before anything is written. Every parameter and persistent buffer named
    in the source receives the source's values, converted to its dtype;
    every tensor keeps its object, storage and data pointer, so captured CUDA
    graphs and kernels holding raw pointers stay valid. Layers are copied in fused
    batches of up to ``batch_bytes``.

    Left alone, and reported: buffers that view a parameter's storage (written
    through the parameter), second names of tied tensors (written once),
    uninitialized (lazy or meta) tensors, non-persistent buffers.

    Raises ReloadError, before writing anything, for missing or unexpected names
    (unless ``strict=False``, which reports them instead), shape mismatches, dtypes
    that do not convert, tied names with different values and source tensors aimed
    at uninitialized parameters.
    """
    started = time.perf_counter()
    kind, source = open_source(state_dict)
    if kind == "stream":
        return _reload_stream(model, source, strict,
                              DEFAULT_STREAM_BATCH_BYTES if batch_bytes is None else batch_bytes,
                              max_held_bytes, started)
    state_dict = source
    # Inference mode admits in-place writes into inference tensors as well as normal
    # ones, and keeps autograd out of every op call over the model's tensors.
    with torch.inference_mode():
        batch_bytes = DEFAULT_BATCH_BYTES if batch_bytes is None else batch_bytes
        try:
            layout, work = _copy(model, state_dict, strict, batch_bytes)
        except StaleLayout:
            forget(model)
            layout, work = _copy(model, state_dict, strict, batch_bytes)
    skipped = dict(layout.skipped)
    if work.missing:
        skipped["missing"] = work.missing
    if work.unexpected:
        skipped["unexpected"] = work.unexpected
    report = ReloadReport(
        layers=work.layers,
        tensors=work.tensors,
        bytes=work.bytes,
        batched_copy_calls=len(work.batches),
        seconds=time.perf_counter() - started,
        skipped=skipped,
        source=kind,
        # A mapping's tensors are the caller's, already in memory: not counted.
        bytes_read=None if kind == "mapping" else sum(t.numel() * t.element_size() for t in work.srcs),
    )
    logger.debug("%s", report)
    return report


def _reload_stream(model, pairs, strict, batch_bytes, max_held_bytes, started) -> ReloadReport:
    if batch_bytes <= 0:
        raise ValueError(f"batch_bytes must be positive, got {batch_bytes}")
    with torch.inference_mode():
        layout = layout_of(model)
        result = consume(plan_for(layout, batch_bytes), pairs, strict=strict,
                         batch_bytes=batch_bytes, max_held_bytes=max_held_bytes)
    skipped = dict(layout.skipped)
    if result.missing:
        skipped["missing"] = result.missing
    if result.unexpected:
        skipped["unexpected"] = result.unexpected
    report = ReloadReport(
        layers=result.layers, tensors=result.tensors, bytes=result.bytes,
        batched_copy_calls=result.batched_copy_calls, seconds=time.perf_counter() - started,
        skipped=skipped, source="stream", bytes_read=result.bytes_read,
        peak_held_bytes=result.peak_held_bytes)
    logger.debug("%s", report)
    return report
