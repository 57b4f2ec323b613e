"""What a model holds, decided once per model from one walk of its module tree
and the C++ storage-pointer sets: which tensors a reload writes (targets), which
it leaves alone and why, and how targets group into layers.

The walk follows the rules of nn.Module.state_dict(): a module's parameters, then
its persistent buffers, then its children, each under "prefix.name"; a module or
tensor reachable under several names appears under each of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parameter import UninitializedTensorMixin

from fastreload import ops
from fastreload.errors import ReloadError

__all__ = ["Layout", "Target", "Unit", "forget", "layout_of"]


@dataclass(frozen=True)
class Target:
    """One region of model memory a reload writes: a parameter or persistent buffer,
    under every state_dict name that holds it (tied names), the first one leading."""

    names: tuple[str, ...]
    tensor: torch.Tensor

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass(frozen=True)
class Unit:
    """A layer: a module that directly owns targets; targets[start:stop] are its own."""

    prefix: str
    start: int
    stop: int


@dataclass(frozen=True)
class Layout:
    targets: tuple[Target, ...]
    units: tuple[Unit, ...]
    # Every state_dict name a source may use for a target -> its index in targets.
    target_index: dict[str, int]
    # Names with a reason to be left alone: alias, tied, uninitialized, non_persistent.
    skipped: dict[str, tuple[str, ...]]
    # state_dict names a source may hold and that are never written (persistent alias buffers).
    ignored: frozenset[str]
    # state_dict names of tensors that cannot be loaded in place (lazy, meta).
    uninitialized: frozenset[str]
    # The tensors whose storage the decisions above rest on (those sharing a storage
    # with another tensor: tied names, aliases and what they view) and their storage
    # pointers then; and the uninitialized tensors, which materialize in place. A
    # tensor that comes to share storage later makes two targets overlap, which
    # batched_copy_ refuses: reload_layerwise then rebuilds the layout.
    watched: tuple[torch.Tensor, ...]
    watched_ptrs: torch.Tensor
    watch: ops.StorageWatch = field(compare=False, repr=False)
    lazy: tuple[torch.Tensor, ...]
    # Raised by a registration on any module of the model since its walk began.
    changes: Changes
    # Copy plans made for this layout, by batch byte budget (see plan.py).
    plans: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def target_tensors(self) -> list[torch.Tensor]:
        return [t.tensor for t in self.targets]

    def is_current(self) -> bool:
        """Whether the model still holds what this layout was made from."""
        return (not self.changes.seen
                and all(is_uninitialized(t) for t in self.lazy)
                and self.watch.unchanged())


def is_uninitialized(t: torch.Tensor) -> bool:
    return isinstance(t, UninitializedTensorMixin) or t.is_meta


def walk(module: nn.Module, prefix: str = ""):
    yield prefix, module
    for name, child in module._modules.items():
        if child is not None:
            yield from walk(child, f"{prefix}{name}.")


class Changes:
    """The flag of one layout: raised when a module of its model registers a parameter,
    buffer or submodule. Each module of the model knows the flags of the layouts made
    from it (see watch()), so a registration elsewhere in the process raises nothing."""

    __slots__ = ("seen", "__weakref__")

    def __init__(self) -> None:
        self.seen = False


class _Watchers:
    """The flags of the layouts a module belongs to, held weakly: a layout that is
    replaced or dropped takes its flag away with it."""

    __slots__ = ("module", "flags")

    def __init__(self, module: nn.Module) -> None:
        self.module = weakref.ref(module, lambda _, key=id(module): _unwatch(key))
        # Replaced whole, never changed in place: the hook reads it without the lock.
        self.flags: tuple[weakref.ref[Changes], ...] = ()


# id(module) -> its watchers: keyed by id, because a module class may define __eq__
# or __hash__, and a registration hook must never raise into unrelated code.
_watchers: dict[int, _Watchers] = {}
_watchers_lock = threading.Lock()  # two threads may walk models sharing a module


def _unwatch(key: int) -> None:
    entry = _watchers.get(key)
    if entry is not None and entry.module() is None:
        _watchers.pop(key, None)


def watch(module: nn.Module, flag: weakref.ref[Changes]) -> None:
    """Makes registrations on `module` raise the flag. Done for each module before its
    tensors are read, so a registration racing the walk is seen once the walk has
    reached its module."""
    with _watchers_lock:
        entry = _watchers.get(id(module))
        if entry is None or entry.module() is not module:
            entry = _watchers[id(module)] = _Watchers(module)
        if flag not in entry.flags:  # a module reachable under several names
            entry.flags = tuple(f for f in entry.flags if f() is not None) + (flag,)


@dataclass
class _Entry:
    name: str
    unit: str
    tensor: torch.Tensor
    is_param: bool
    persistent: bool


def _entries(model: nn.Module, flag: weakref.ref[Changes] | None = None) -> list[_Entry]:
    entries = []
    for prefix, module in walk(model):
        if flag is not None:
            watch(module, flag)
        unit = prefix[:-1]
        for key, p in module._parameters.items():
            if p is not None:
                entries.append(_Entry(prefix + key, unit, p, True, True))
        for key, b in module._buffers.items():
            if b is not None:
                persistent = key not in module._non_persistent_buffers_set
                entries.append(_Entry(prefix + key, unit, b, False, persistent))
    return entries


def same_memory_key(t: torch.Tensor, ptr: int):
    """Tensors with equal keys are the same bytes seen the same way: tied."""
    if ptr == 0:
        return ("no-bytes", id(t))
    return (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)


def split_entries(model: nn.Module, flag: weakref.ref[Changes] | None = None
                  ) -> tuple[list[_Entry], list[_Entry], list[_Entry]]:
    """(uninitialized, live, aliases): the model's tensors in state_dict order, those
    that cannot be loaded in place, the others, and the buffers among the others
    that share storage with any parameter. With a flag, every module walked raises
    it when it registers anything from then on."""
    entries = _entries(model, flag)
    uninitialized = [e for e in entries if is_uninitialized(e.tensor)]
    live = [e for e in entries if not is_uninitialized(e.tensor)]
    params = [e.tensor for e in live if e.is_param]
    buffers = [e for e in live if not e.is_param]
    is_alias = ops.storage_alias_mask([b.tensor for b in buffers], params).tolist()
    return uninitialized, live, [b for b, alias in zip(buffers, is_alias) if alias]


def build_layout(model: nn.Module) -> Layout:
    _install_hooks()
    changes = Changes()
    uninitialized, live, aliases = split_entries(model, weakref.ref(changes))
    alias_names = {b.name for b in aliases}

    written = [e for e in live
               if e.persistent and e.name not in alias_names]
    ptrs = ops.storage_ptrs([e.tensor for e in written]).tolist()
    groups: dict[object, list[_Entry]] = {}
    for e, ptr in zip(written, ptrs):
        groups.setdefault(same_memory_key(e.tensor, ptr), []).append(e)

    targets: list[Target] = []
    owners: list[str] = []
    for group in groups.values():  # dicts keep first-seen order: state_dict order
        targets.append(Target(tuple(e.name for e in group), group[0].tensor))
        owners.append(group[0].unit)

    tensors = [t.tensor for t in targets]
    problems = ops.batched_copy_check(tensors, tensors).tolist()
    overlapping = [t.name for t, p in zip(targets, problems) if p != ops.PairProblem.NONE]
    if overlapping:
        raise ReloadError(overlapping=overlapping)

    # state_dict order puts each module's own tensors together, except for tied
    # names first seen in an earlier module: a stable sort by first appearance of
    # the owning unit makes every unit one contiguous range.
    unit_order = {u: i for i, u in enumerate(dict.fromkeys(owners))}
    order = sorted(range(len(targets)), key=lambda i: unit_order[owners[i]])
    targets = [targets[i] for i in order]
    owners = [owners[i] for i in order]
    units = []
    start = 0
    for unit, members in itertools.groupby(owners):
        stop = start + len(list(members))
        units.append(Unit(unit, start, stop))
        start = stop

    skipped = {
        "alias": tuple(b.name for b in aliases),
        "tied": tuple(n for t in targets for n in t.names[1:]),
        "uninitialized": tuple(e.name for e in uninitialized),
        "non_persistent": tuple(e.name for e in live
                                if not e.persistent and e.name not in alias_names),
    }
    live_ptrs = ops.storage_ptrs([e.tensor for e in live]).tolist()
    sharing = Counter(p for p in live_ptrs if p != 0)
    watched = tuple(e.tensor for e, p in zip(live, live_ptrs) if sharing[p] > 1)
    return Layout(
        targets=tuple(targets),
        units=tuple(units),
        target_index={n: i for i, t in enumerate(targets) for n in t.names},
        skipped=skipped,
        ignored=frozenset(b.name for b in aliases if b.persistent),
        uninitialized=frozenset(e.name for e in uninitialized if e.persistent),
        watched=watched,
        watched_ptrs=ops.storage_ptrs(watched),
        watch=ops.StorageWatch(watched),
        lazy=tuple(e.tensor for e in uninitialized),
        changes=changes,
    )


_paused = threading.local()  # .depth: registrations_unseen() blocks entered by this thread
_hooks_installed = False
_layouts: weakref.WeakKeyDictionary[nn.Module, Layout] = weakref.WeakKeyDictionary()


def _registered(module: nn.Module, *_args) -> None:
    """Every registration of a parameter, buffer or submodule anywhere comes here: it
    raises the flags of the layouts whose model holds `module`, and costs one dict
    lookup for any other module."""
    entry = _watchers.get(id(module))
    if entry is None or entry.module() is not module or getattr(_paused, "depth", 0):
        return
    for ref in entry.flags:
        flag = ref()
        if flag is not None:
            flag.seen = True


@contextlib.contextmanager
def registrations_unseen():
    """Registrations inside are not taken for model changes: for code that puts back
    exactly the objects it found (a replayed unit's temporaries), so that the cached
    layout stays valid. Only this thread's registrations are paused: another
    thread's, meanwhile, still count."""
    _paused.depth = getattr(_paused, "depth", 0) + 1
    try:
        yield
    finally:
        _paused.depth -= 1


def _install_hooks() -> None:
    global _hooks_installed
    if not _hooks_installed:
        nn.modules.module.register_module_parameter_registration_hook(_registered)
        nn.modules.module.register_module_buffer_registration_hook(_registered)
        nn.modules.module.register_module_module_registration_hook(_registered)
        _hooks_installed = True


def layout_of(model: nn.Module) -> Layout:
    """The model's layout, rebuilt when it no longer matches the model: a module of
    the model registered a parameter, buffer or submodule (registrations on other
    modules do not count), a lazy tensor materialized, or the storage of a tensor
    that shares it changed (``p.data = ...``). Edits that bypass nn.Module (writing
    ``module._parameters`` directly, ``del module.weight``) are not seen: call
    forget(model) after them."""
    layout = _layouts.get(model)
    if layout is None or not layout.is_current():
        old, layout = layout, build_layout(model)
        if old is not None and _same_layout(old, layout):
            # Something else was registered (another model built): this one is as it
            # was, and keeps its copy plans (its replay plan is made again, from the
            # recordings as they are now).
            layout = dataclasses.replace(layout, plans={k: v for k, v in old.plans.items() if k != "replay"})
        _layouts[model] = layout
    return layout


def _same_layout(a: Layout, b: Layout) -> bool:
    """Whether two layouts say the same of the same tensors."""
    return (len(a.targets) == len(b.targets)
            and all(x.names == y.names and x.tensor is y.tensor for x, y in zip(a.targets, b.targets))
            and a.units == b.units and a.target_index == b.target_index and a.skipped == b.skipped
            and a.ignored == b.ignored and a.uninitialized == b.uninitialized
            and len(a.watched) == len(b.watched) and all(x is y for x, y in zip(a.watched, b.watched))
            and torch.equal(a.watched_ptrs, b.watched_ptrs)
            and len(a.lazy) == len(b.lazy) and all(x is y for x, y in zip(a.lazy, b.lazy)))


def forget(model: nn.Module) -> None:
    """Drops the cached layout (and plans) of a model; the next reload rebuilds them."""
    _layouts.pop(model, None)
