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

__all__ = ["DEFAULT_BATCH_BYTES", "reload_layerwise"]

logger = logging.getLogger("fastreload")

# Bytes written by one fused copy at most (a larger layer is copied on its own).
# One batch is checked by batched_copy_ itself as it copies; several need one
# check of every pair first, so that no batch is written before a refused one.
DEFAULT_BATCH_BYTES = 2**30


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
    batch_bytes: int = DEFAULT_BATCH_BYTES,
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
    state_dict = open_source(state_dict)
    # Inference mode admits in-place writes into inference tensors as well as normal
    # ones, and keeps autograd out of every op call over the model's tensors.
    with torch.inference_mode():
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
    )
    logger.debug("%s", report)
    return report
