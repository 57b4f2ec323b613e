"""Checkpoints in the format transformers saves and the Hub holds, into transformers
models that hold another layout (stacked experts, fused projections).

transformers describes every such difference in its conversion mapping
(``transformers.conversion_mapping``): renamings, and converters whose operations
stack, concatenate, split, chunk, transpose or permute checkpoint tensors. Here they
become Targets, without re-implementing any operation: the model's checkpoint names
and shapes come from transformers' own reverse conversion (what ``save_pretrained``
writes), run on meta tensors; then transformers' loading conversion runs once on
integer probe tensors of those shapes, each element holding its own position,
and each model tensor tells which checkpoint element landed where. What lands as a
view (an index, a narrow, a view, a permutation) becomes a Target, checked element
by element against the probe; an operation whose result is not such a view (a
dequantization, any arithmetic) is refused, naming it.

    rename = fastreload.hf.hub_rename(model)   # or let reload_layerwise detect it
    fastreload.reload_layerwise(model, "checkpoint/")

transformers is an optional dependency (``pip install fastreload[transformers]``):
it is imported only here, and only for a transformers model.
"""

from __future__ import annotations

import itertools
import math
import sys
import weakref
from collections.abc import Callable
from copy import deepcopy
from dataclasses import replace

import torch
from torch import nn

from fastreload.errors import ReloadError
from fastreload.regions import RegionProblem, Target, region_views

__all__ = ["HubRename", "hub_rename", "is_transformers_model"]

# Probes are made one group (a converter's tensors of one layer) at a time, and only
# once per group shape, as int32 positions: a group must have fewer elements than
# int32 counts. Qwen3-30B-A3B's experts of one layer are 4e8 elements (a probe, its
# conversion and their inverse: about 5 GiB at the first reload); larger groups
# (DeepSeek-V3's 256 experts at full size, 7.5e9) are refused, naming the group.
_PROBE_ELEMENTS_MAX = 2**31 - 1


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
            found, names, _ = probed = _probe(loading, model, model_type, converter, first, members, shapes, meta)
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


def _run(loading, model, converter, first: str, members, make) -> dict[str, torch.Tensor]:
    converter = deepcopy(converter)
    for pattern, name in members:
        converter.add_tensor(first, name, pattern, make(name))
    with torch.no_grad():
        out = converter.convert(first, model=model, config=model.config)
    return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}


def _operations(converter) -> str:
    return ", ".join(type(op).__name__ for op in getattr(converter, "operations", ())) or "renaming"


def _probe(loading, model, model_type: str, converter, first: str, members, shapes, meta) -> tuple:
    """(for each member, its [(position of its model tensor among the outputs, its
    Target)], the outputs' names, their shapes), from one run of the conversion on
    probe tensors."""
    sizes = [math.prod(shapes[n][0]) for _, n in members]
    total = sum(sizes)

    def refuse(why: str) -> ReloadError:
        return ReloadError(regions={first: (
            f"the {model_type} checkpoint conversion ({_operations(converter)}) of "
            f"{members[0][1]!r} and {len(members) - 1} more {why}; load it with from_pretrained, "
            "or give a rename")})

    if total > _PROBE_ELEMENTS_MAX:
        raise refuse(f"has {total} elements, too many to derive its regions from")
    offsets = dict(zip((n for _, n in members), itertools.accumulate([0] + sizes)))
    probes = {n: torch.arange(offsets[n], offsets[n] + math.prod(shapes[n][0]), dtype=torch.int32)
              .view(shapes[n][0]) for _, n in members}
    try:
        outputs = _run(loading, model, converter, first, members, probes.__getitem__)
    except Exception as error:  # an operation that cannot run on integers: not a view
        raise refuse(f"cannot be run on position probes ({type(error).__name__}: {error})") from None
    names = list(outputs)
    for name in names:
        if name not in meta or tuple(outputs[name].shape) != tuple(meta[name].shape):
            raise refuse(f"gives {name!r} of shape {tuple(outputs[name].shape)}, which the model does not hold")
    result, covered = [], {name: 0 for name in names}  # per member: [(output position, Target)]
    # Each output inverted: where each probe value landed in it (-1: not there).
    ordered = {name: _inverse(outputs[name], total) for name in names}
    if any(where is None for where in ordered.values()):
        raise refuse("does not give each model element one checkpoint element (values changed)")
    for pattern, source in members:
        found = []
        for position, name in enumerate(names):
            target = _target(name, outputs[name], ordered[name], probes[source], offsets[source])
            if target is not None:
                found.append((position, target))
                covered[name] += covered_by(target, outputs[name], probes[source])
        if not found or sum(covered_by(t, outputs[names[p]], probes[source]) for p, t in found) \
                != probes[source].numel():
            raise refuse(f"does not write {source!r} as views of model tensors (values changed, "
                         "or not a strided view)")
        result.append(found)
    for name in names:
        if covered[name] != outputs[name].numel():
            raise refuse(f"fills {covered[name]} of the {outputs[name].numel()} elements of {name!r} "
                         "from the checkpoint's tensors (the others are computed)")
    return result, names, [tuple(outputs[n].shape) for n in names]


def _unravel(flat: torch.Tensor, shape) -> torch.Tensor:
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat = flat // size
    return torch.stack(coords[::-1], 1) if coords else flat.new_zeros(flat.shape[0], 0)


def _coordinates(flat: torch.Tensor, shape) -> list[torch.Tensor]:
    """The index along each dimension of shape of each flat position."""
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat = flat // size
    return coords[::-1]


def covered_by(target: Target, out: torch.Tensor, probe: torch.Tensor) -> int:
    return region_views(target, out, probe)[1].numel()


def _inverse(out: torch.Tensor, total: int) -> torch.Tensor | None:
    """where[v]: the flat position in out of probe value v, -1 where v is not in out;
    None if out holds a value twice or one that is no probe position."""
    flat = out.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= total):
        return None
    where = torch.full((total,), -1, dtype=torch.int32)
    where[flat] = torch.arange(flat.numel(), dtype=torch.int32)
    return where if int((where >= 0).sum()) == flat.numel() else None


def _target(name: str, out: torch.Tensor, where: torch.Tensor, probe: torch.Tensor, offset: int) -> Target | None:
    """The Target that writes the probe's elements where the conversion put them in
    out, if they landed as a view of out (checked element by element); else None.
    where: _inverse(out)."""
    n = probe.numel()
    positions = where[offset:offset + n]
    present = positions >= 0
    if not bool(present.any()):
        return None
    values = torch.arange(n, dtype=torch.int32)
    if not bool(present.all()):
        values, positions = values[present], positions[present]
    shape = tuple(probe.shape)
    low = _unravel(values[:1], shape)[0] if shape else values[:1]
    high = _unravel(values[-1:], shape)[0] if shape else values[-1:]
    extent = [int(h - lo) + 1 for lo, h in zip(low.tolist(), high.tolist())]
    if math.prod(extent) != values.numel():
        return None
    partial = [d for d, size in enumerate(shape) if extent[d] != size]
    if len(partial) > 1:
        return None
    source = {} if not partial else {"source_slice": (int(low[partial[0]]), extent[partial[0]]),
                                     "shard_dim": partial[0]}
    dshape = tuple(out.shape)
    coords = _coordinates(positions, dshape)
    dlow, dhigh = [int(c.min()) for c in coords], [int(c.max()) for c in coords]
    dextent = [h - lo + 1 for lo, h in zip(dlow, dhigh)]
    leading = next((d for d, e in enumerate(dextent) if e != 1), len(dshape))
    for k in range(leading, -1, -1):
        rest = [d for d in range(k, len(dshape)) if dextent[d] != dshape[d]]
        if len(rest) > 1:
            continue
        region = {} if not rest else {"dim": rest[0] - k, "start": dlow[rest[0]], "length": dextent[rest[0]]}
        base = Target(name, index=tuple(dlow[:k]), **region, **source)
        candidates = [base if p is None else replace(base, permute=p) for p in _orders(len(dshape) - k)]
        interleaved = _interleaved(base, coords, dlow, dextent, k, len(values))
        if interleaved is not None:
            candidates.append(interleaved)
        for target in candidates:
            try:
                dv, sv, _, _ = region_views(target, out, probe)
            except RegionProblem:
                continue
            if torch.equal(dv, sv):
                return target
    return None


def _interleaved(base: Target, coords, dlow, dextent, k: int, count: int) -> Target | None:
    """A region whose elements lie in another order than the source's (interleaved
    rows, heads permuted for RoPE): the region seen as finer dimensions, permuted.
    The finer dimensions are read off the region-local positions of the source's
    elements, innermost first; None where they are no reshape of the region."""
    local = torch.zeros(count, dtype=torch.int64)
    size = 1
    for d in range(len(coords) - 1, k - 1, -1):
        local += (coords[d] - dlow[d]) * size
        size *= dextent[d]
    sizes, strides, block = [], [], 1
    while block < count:
        firsts = local.view(count // block, block)[:, 0]
        stride = int(firsts[1] - firsts[0])
        steps = (firsts[1:] - firsts[:-1]) != stride
        run = int(steps.nonzero()[0]) + 1 if bool(steps.any()) else firsts.numel()
        n = next(n for n in range(run, 0, -1) if (count // block) % n == 0)
        if n == 1 or stride <= 0:
            return None
        sizes.insert(0, n)
        strides.insert(0, stride)
        block *= n
    order = sorted(range(len(sizes)), key=lambda j: strides[j])
    expected = 1
    for j in order:
        if strides[j] != expected:
            return None
        expected *= sizes[j]
    view = tuple(sizes[j] for j in reversed(order))  # the region, outermost first
    permute = tuple(len(sizes) - 1 - order.index(j) for j in range(len(sizes)))
    return replace(base, view=view, permute=permute)


def _orders(dims: int):
    yield None
    if dims <= 4:  # transposed layouts; more dimensions are not seen in conversions
        yield from (p for p in itertools.permutations(range(dims)) if list(p) != list(range(dims)))


def detected_rename(model: nn.Module) -> Callable[[str], str | Target] | None:
    """The HubRename of a transformers model whose format differs from its checkpoints', or None."""
    if not is_transformers_model(model):
        return None
    rename = _cached(model)
    return rename if rename.converts else None
