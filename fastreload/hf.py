"""Checkpoints in the format transformers saves and the Hub holds, into transformers
models that hold another layout (stacked experts, fused projections).

transformers describes every such difference in its conversion mapping
(``transformers.conversion_mapping``): renamings, and converters whose operations
stack, concatenate, split, chunk, transpose or permute checkpoint tensors. Here they
become Targets, without re-implementing any operation: the model's checkpoint names
and shapes come from transformers' own reverse conversion (what ``save_pretrained``
writes), run on meta tensors; then transformers' loading conversion runs once per
group shape (a converter's tensors of one layer), traced on meta tensors or run on
integer probes (fastreload/converted_regions.py), and each model tensor tells which
checkpoint element landed where. What lands as a view (an index, a narrow, a view,
a permutation) becomes a Target, checked element by element; an operation whose
result is not such a view (a dequantization, any arithmetic) is refused, naming it.

    rename = fastreload.hf.hub_rename(model)   # or let reload_layerwise detect it
    fastreload.reload_layerwise(model, "checkpoint/")

transformers is an optional dependency (``pip install fastreload[transformers]``):
it is imported only here, and only for a transformers model.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from fastreload.converted_regions import group_regions
from fastreload.errors import ReloadError
from fastreload.regions import Target

__all__ = ["HubRename", "hub_rename", "is_transformers_model"]

def is_transformers_model(model: nn.Module) -> bool:
    """Whether model is a transformers PreTrainedModel (without importing transformers)."""
    module = sys.modules.get("transformers")
    pretrained = getattr(module, "PreTrainedModel", None) if module is not None else None
    return pretrained is not None and isinstance(model, pretrained)


class HubRename:
    """The rename from a model's checkpoint (Hub) format to the model: every
    checkpoint name the model's conversion mapping knows, to its model name (a str)
    or its region of a model tensor (a Target). Other names are left as they are.

    The checkpoint's names are known at once; the targets are derived on first use
    (that is when a conversion that is not a view is refused)."""

    # Its answer for a name never changes: a stream may keep the regions it found.
    answers_fixed = True

    def __init__(self, model: nn.Module, model_type: str, names: dict[str, tuple]) -> None:
        self.model_type = model_type
        self.names = names  # checkpoint name -> (shape, dtype)
        self.description = f"transformers checkpoint format ({model_type})"
        own = model.state_dict().keys()
        converted = [n for n in names if n not in own]
        # The first and last checkpoint names the model's own format does not have: a
        # source holding one is in the checkpoint format.
        self.samples = (converted[0], converted[-1]) if converted else ()
        self._model = weakref.ref(model)
        self._targets: dict[str, str | Target] | None = None
        self._sources: dict[str, list[str]] | None = None

    @property
    def targets(self) -> dict[str, str | Target | tuple[Target, ...]]:
        if self._targets is None:
            model = self._model()
            if model is None:
                raise ReferenceError("the model of this rename no longer exists")
            self._targets = _derive(model, self.model_type, self.names)
        return self._targets

    def __call__(self, name: str) -> str | Target | tuple[Target, ...]:
        return self.targets.get(name, name)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    @property
    def converts(self) -> bool:
        """Whether the checkpoint format differs from the model's at all."""
        return bool(self.samples)

    def describes(self, source) -> bool:
        """Whether a source (its names) looks like this checkpoint format."""
        return any(s in source for s in self.samples)

    def sources_of(self, name: str) -> list[str]:
        """The checkpoint names that write the model tensor `name`."""
        if self._sources is None:
            sources: dict[str, list[str]] = {}
            for source, target in self.targets.items():
                for t in target if isinstance(target, tuple) else (target,):
                    sources.setdefault(t if isinstance(t, str) else t.name, []).append(source)
            self._sources = sources
        return self._sources.get(name, [])

    def __repr__(self) -> str:
        return f"HubRename({self.model_type!r}: {len(self.names)} checkpoint names)"


def hub_rename(model: nn.Module) -> HubRename:
    """The rename from the checkpoint format of a transformers model (what
    ``save_pretrained`` writes by default, and the Hub holds) to the model's own
    tensors, derived from transformers' conversion mapping; made once per model
    layout. Raises ReloadError for a conversion that is not a view of the
    checkpoint's tensors (naming the operation and the model type), ImportError
    without transformers, TypeError for another model."""
    _transformers()
    if not is_transformers_model(model):
        raise TypeError(f"hub_rename takes a transformers PreTrainedModel, got {type(model).__name__}")
    rename = _cached(model)
    rename.targets  # derived now: a conversion that is not a view is refused here
    return rename


def _cached(model: nn.Module) -> HubRename:
    """The model's HubRename, its targets not derived yet (kept with the layout)."""
    from fastreload.model import layout_of

    plans = layout_of(model).plans
    found = plans.get("hub_rename")
    if found is None:
        found = plans["hub_rename"] = HubRename(model, _model_type(model), _checkpoint_names(model))
    return found


def _transformers():
    try:
        from transformers import core_model_loading
    except ImportError:
        raise ImportError("checkpoints in the transformers (Hub) format need transformers: "
                          "pip install fastreload[transformers]") from None
    return core_model_loading


def _model_type(model) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def _meta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in model.state_dict().items()}


def _checkpoint_names(model: nn.Module) -> dict[str, tuple]:
    """The names, shapes and dtypes save_pretrained would write: transformers'
    reverse conversion, run on meta tensors."""
    loading = _transformers()
    try:
        with torch.no_grad():
            checkpoint = loading.revert_weight_conversion(model, _meta_state(model))
    except Exception as error:
        raise ReloadError(regions={_model_type(model): (
            f"transformers cannot say the checkpoint format of this {_model_type(model)} model "
            f"({type(error).__name__}: {error}); give a rename")}) from None
    return {name: (tuple(t.shape), t.dtype) for name, t in checkpoint.items()}


def _derive(model: nn.Module, model_type: str, shapes: dict[str, tuple]) -> dict[str, str | Target]:
    loading = _transformers()
    from transformers.conversion_mapping import get_model_conversion_mapping

    meta = _meta_state(model)

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, loading.WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, loading.WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}

    targets: dict[str, str | Target] = {}
    groups: dict[str, tuple] = {}  # first model name -> (converter, [(pattern, checkpoint name)])
    for name in sorted(shapes, key=loading.dot_natural_key):
        renamed, pattern = loading.rename_source_key(name, renamings, converters, model.base_model_prefix, meta)
        if renamed not in meta and name in meta:
            renamed, pattern = loading.rename_source_key(name, [], [], model.base_model_prefix, meta)
        if renamed not in meta:
            continue  # a checkpoint name transformers would not load either
        if pattern is None:
            targets[name] = renamed
            continue
        converter, members = groups.setdefault(renamed, (by_pattern[pattern], []))
        members.append((pattern, name))

    # Groups of one shape (a converter's tensors of each layer) move their elements
    # alike: one is probed, the others take its targets under their own names.
    templates: dict[tuple, tuple] = {}
    for first, (converter, members) in groups.items():
        signature = (tuple(converter.source_patterns), tuple(converter.target_patterns),
                     tuple((p, shapes[n][0]) for p, n in members))
        template = templates.get(signature)
        names = None if template is None else _outputs_of(template, first, meta)
        if names is None:
            found, names, _ = probed = group_regions(loading, model, model_type, converter, first, members,
                                                     shapes, meta)
            templates.setdefault(signature, (first, *probed))
        else:
            found = template[1]
        for (pattern, source), placed in zip(members, found):
            placed = tuple(replace(target, name=names[position]) for position, target in placed)
            targets[source] = placed[0] if len(placed) == 1 else placed
    return targets


def _outputs_of(template, first: str, meta) -> list[str] | None:
    """The model tensors a group of the template's shape writes: the template's, under
    this group's prefix (``model.layers.7.`` for ``model.layers.0.``); None unless the
    model holds each of them in the template's shape."""
    template_first, _, names, shapes = template
    common = 0
    while (common < min(len(first), len(template_first))
           and first[len(first) - 1 - common] == template_first[len(template_first) - 1 - common]):
        common += 1
    old, new = template_first[:len(template_first) - common], first[:len(first) - common]
    if not all(n.startswith(old) for n in names):
        return None
    renamed = [new + n[len(old):] for n in names]
    if any(n not in meta or tuple(meta[n].shape) != shape for n, shape in zip(renamed, shapes)):
        return None
    return renamed


def detected_rename(model: nn.Module) -> Callable[[str], str | Target] | None:
    """The HubRename of a transformers model whose format differs from its checkpoints', or None."""
    if not is_transformers_model(model):
        return None
    rename = _cached(model)
    return rename if rename.converts else None
