"""A reload from a stream of (name, tensor) pairs, in any order, read once.

A layer is complete when every tensor it expects has arrived (tracked by name; a
destination written in regions, when its regions cover it);
completed layers are coalesced into fused copies of up to batch_bytes, each
checked whole by batched_copy_ before it writes anything. Only incoming tensors of layers not yet written are
held, and their bytes are counted against an optional cap. An error names the
layers already written and those not.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from fastreload import ops
from fastreload.errors import ReloadError
from fastreload.names import detect_wrappers
from fastreload.plan import Plan, StaleLayout, expand, not_given, pair_problems, same_values
from fastreload.regions import Pieces, RegionProblem, Target, region_views
from fastreload.replay import Replay
from fastreload.replay_plan import ReplayPlan

__all__ = ["StreamResult", "consume"]


@dataclass(frozen=True)
class StreamResult:
    tensors: int
    bytes: int
    layers: int
    batched_copy_calls: int
    bytes_read: int
    peak_held_bytes: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    renamed: str | None
    replayed: tuple[str, ...] = ()
    custom_loaded: tuple[str, ...] = ()
    regions: int = 0


@dataclass
class _Regions:
    """What earlier streams found about a plan's regions, kept with it while the
    model tensors they view are unchanged, so that a repeated stream in a
    checkpoint format makes no view and checks no overlap per region:

    - views: the destination view of each region, by (target index, Target, source
      shape);
    - known: under `rename` (one whose answers never change), each source name whose
      regions a stream found to tile their destination exactly, to the region it
      writes (see _Consumer.take_known)."""

    plan: Plan
    watch: ops.StorageWatch
    views: dict = field(default_factory=dict)
    rename: object = None
    known: dict = field(default_factory=dict)
    copies: dict = field(default_factory=dict)  # see bound_copy: key -> (destinations, copy or None)

    def bound_copy(self, dsts: list[torch.Tensor]) -> ops.BoundCopy | None:
        """A copy bound to these destinations (model tensors, and views kept here)
        for a batch of exactly these seen before, or None the first time: a stream
        sent in the same order each time (a trainer's) has the same batches, and from
        the second one on each is checked as a repeated reload is, its destinations
        read once. Not made the first time: a copy kept from then on would sit among
        the stream's tensors in the heap and keep it from shrinking."""
        key = tuple(map(id, dsts))  # unique while an entry holds the objects
        kept = self.copies.pop(key, None)
        if kept is None or kept[1] is None:
            kept = (tuple(dsts), None if kept is None else ops.BoundCopy(dsts, [len(dsts)]))
            if len(self.copies) >= self._KEPT_COPIES:
                del self.copies[next(iter(self.copies))]  # the least recently used
        self.copies[key] = kept
        return kept[1]

    _KEPT_COPIES = 16  # a few orders of a few batches each


def _kept_regions(plan: Plan) -> _Regions:
    key = "stream regions"  # one plan's: a layout streamed with another batch size starts again
    kept = plan.layout.plans.get(key)
    if kept is None or kept.plan is not plan or not kept.watch.unchanged():
        kept = plan.layout.plans[key] = _Regions(plan, ops.StorageWatch(plan.dsts))
    return kept


class _Consumer:
    def __init__(self, plan: Plan, strict: bool, batch_bytes: int, max_held_bytes: int | None,
                 rename, detect, on_written, replay: ReplayPlan | None = None, model=None,
                 replay_batch_bytes: int | None = None, hub=None):
        self.plan = plan
        self.rename = rename
        self.renamed = "rename" if rename is not None else None
        self.detect = detect  # names the model knows, to recognise wrapped names; or None
        self.on_written = on_written
        self.layout = plan.layout
        self.strict = strict
        self.batch_bytes = batch_bytes
        self.max_held_bytes = max_held_bytes
        self.remaining = [u.stop - u.start for u in self.layout.units]
        self.unit_bytes = [0] * len(self.layout.units)  # incoming bytes of each layer
        self.pending: dict[int, torch.Tensor] = {}  # target -> source, until written
        self.written_targets: set[int] = set()
        self.seen: set[str] = set()
        self.held_bytes = 0  # sources of layers not complete, or complete but not written
        self.peak_held_bytes = 0
        self.ready: list[int] = []  # complete layers waiting for the next fused copy
        self.ready_bytes = 0
        self.written_units: list[int] = []
        self.tensors = self.bytes = self.calls = self.bytes_read = self.regions = 0
        self.pieces: dict[int, Pieces] = {}  # regions of destinations received so far
        self.pieces_pending = 0  # complete Pieces among the pending values
        self.unexpected: list[str] = []
        self.hub = hub  # the model's checkpoint-format rename (hf.HubRename), to detect; or None
        self.region_sources: set[str] = set()  # source names given for regions
        self.kept = _kept_regions(plan)
        self.region_views = self.kept.views
        self.checked: set[int] = set()  # destinations with regions taken with their checks (not known before)
        # Recorded modules: their checkpoint names go to the replay, which writes them.
        self.replay = None if replay is None else Replay(
            replay, model, batch_bytes=replay_batch_bytes or batch_bytes, on_written=on_written, fail=self.fail)

    def release(self, error: BaseException) -> None:
        """Lets go of every tensor the stream gave, after a failure: a caller may keep
        the error (and with it this object, through the traceback) for long, and the
        tensors of layers not written may be most of a model."""
        self.pending.clear()
        self.pieces.clear()
        self.ready = []
        if self.replay is not None:
            self.replay.values = [None] * len(self.replay.values)
            self.replay.pieces.clear()
            self.replay.buffers.clear()
        _clear_frames(error)

    def fail(self, **problems) -> ReloadError:
        written = set(self.written_units)
        names = [u.prefix or "<root>" for u in self.layout.units]
        written_layers = [names[u] for u in self.written_units]
        unwritten_layers = [n for u, n in enumerate(names) if u not in written]
        if self.replay is not None:
            replayed, not_replayed = self.replay.layers()
            written_layers, unwritten_layers = replayed + written_layers, not_replayed + unwritten_layers
        return ReloadError(**problems, written_layers=written_layers, unwritten_layers=unwritten_layers)

    def not_a_tensor(self, name: str, value) -> ReloadError:
        return self.fail(mismatched={name: f"the stream gave a {type(value).__name__}, not a tensor"})

    def hold(self, nbytes: int) -> None:
        self.bytes_read += nbytes
        held = self.held_bytes + (self.replay.held_bytes if self.replay is not None else 0)
        if held <= self.peak_held_bytes:
            return  # no more than held before, which was within the cap
        self.peak_held_bytes = held
        if self.max_held_bytes is not None and held > self.max_held_bytes:
            raise self.fail(held_over=(
                f"holding {held} bytes of tensors for layers not yet written, over "
                f"max_held_bytes={self.max_held_bytes}: the stream sends layers' tensors too far "
                "apart for this cap"))

    def take(self, name: str, tensor: torch.Tensor) -> None:
        if not isinstance(name, str):
            raise self.fail(reason=f"a stream's names are strings, got {_shown(name)} with {_shown(tensor)}")
        if (self.rename is None and self.hub is not None and name in self.hub
                and (self.detect is None or not self.detect(name))):
            self.use_hub()
        if self.rename is not None:
            source_name, name = name, self.rename(name)
            if isinstance(name, tuple):  # one source into several regions (a fused tensor split)
                for n, target in enumerate(name):
                    self.take_region(source_name, target, tensor, read=n == 0)
                return
            if isinstance(name, Target):
                if not name.is_plain:
                    return self.take_region(source_name, name, tensor, single=True)
                name = name.name
        elif self.detect is not None and not self.seen and not self.detect(name):
            # The first name is unknown: a common wrapper may explain it (and the rest).
            found = detect_wrappers([name], self.detect)
            if found is not None:
                self.renamed, self.rename = found
                name = self.rename(name)
        if name in self.seen:
            raise self.fail(duplicates=[name])
        self.seen.add(name)
        if not isinstance(tensor, torch.Tensor):
            raise self.not_a_tensor(name, tensor)
        replay = self.replay
        if replay is not None and name in replay.plan.index:
            replay.take(name, tensor, flush=False)
            self.hold(tensor.nbytes)
            if replay.ready_bytes >= replay.batch_bytes:
                replay.flush()
            return
        index = self.layout.target_index.get(name)
        if index is None:
            self.unknown(name)
            return
        nbytes = tensor.nbytes
        pending = self.pending
        if index not in pending and index not in self.written_targets and index not in self.pieces:
            # The common case, kept to a few dict operations: a target's first tensor.
            pending[index] = tensor
            self.held_bytes += nbytes
            self.bytes_read += nbytes
            if self.held_bytes > self.peak_held_bytes or self.replay is not None:
                self.hold(0)  # a new peak: checked against the cap
            self.arrived(index, nbytes)
            return
        if index in self.pieces:
            raise self.fail(regions={name: "given both whole and in regions"})
        # Pending or written already: a tied second name, which must say what the first one said.
        first = self.pending.get(index)
        dst = self.plan.dsts[index]
        same = (same_values(first, tensor) if first is not None else
                dst.shape == tensor.shape and torch.equal(dst, tensor.to(dst.device, dst.dtype)))
        if not same:
            raise self.fail(conflicts=[name])
        self.bytes_read += nbytes

    def take_all(self, iterator) -> None:
        """Every pair of the stream. A target's first tensor, the common case, is
        taken here as take() would, inline: a stream of a large MoE is tens of
        thousands of pairs, and each function call costs as much as the rest of it."""
        take, pending, seen, written = self.take, self.pending, self.seen, self.written_targets
        target_index, unit_of = self.layout.target_index, self.plan.unit_of
        remaining, unit_bytes, completed = self.remaining, self.unit_bytes, self.completed
        tensor_type, cap, take_known = torch.Tensor, self.max_held_bytes, self.take_known
        known = self.known_names()
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except Exception as error:
                raise self.fail(held_over=f"the stream failed: {error!r}") from error
            try:
                name, tensor = item
            except (TypeError, ValueError):
                raise self.fail(reason=f"a stream yields (name, tensor) pairs, got {_shown(item)}") from None
            if known is not None:
                try:
                    slot = known.get(name)
                except TypeError:  # an unhashable name: take() refuses it
                    slot = None
                if slot is not None and take_known(name, tensor, slot):
                    continue
            try:
                index = target_index.get(name) if self.rename is None and self.replay is None and seen else None
            except TypeError:  # an unhashable name: take() refuses it
                index = None
            if index is None or index in pending or index in written or name in seen or self.pieces \
                    or not isinstance(tensor, tensor_type):
                take(name, tensor)  # a rename, a replay, the first name, a region, a tied name, a refusal
                known = self.known_names()  # the first name may have told the rename
                continue
            seen.add(name)
            pending[index] = tensor
            nbytes = tensor.nbytes
            self.held_bytes = held = self.held_bytes + nbytes
            self.bytes_read += nbytes
            if held > self.peak_held_bytes:
                if cap is None:
                    self.peak_held_bytes = held
                else:
                    self.hold(0)  # a new peak: checked against the cap
            unit = unit_of[index]
            unit_bytes[unit] += nbytes
            remaining[unit] -= 1
            if not remaining[unit]:
                completed(unit)

    def use_hub(self) -> None:
        """The stream is in the model's checkpoint format: its names from here on are
        renamed by it (those seen before are names both formats share)."""
        hub = self.hub
        if all(not isinstance(t := hub(n), Target) and t == n for n in self.seen):
            self.rename, self.renamed = hub, hub.description

    def unknown(self, name: str) -> None:
        """A name that is no target: ignored (an alias), or refused, or reported."""
        replay = self.replay
        if name in self.layout.ignored or (replay is not None and name in replay.plan.ignored):
            return
        if name in self.layout.uninitialized:
            raise self.fail(uninitialized=[name])
        if self.strict:
            raise self.fail(unexpected=[name])
        self.unexpected.append(name)

    def take_region(self, source_name: str, target: Target, tensor: torch.Tensor, read: bool = True,
                    single: bool = False) -> None:
        """A source tensor for a region of a destination; the destination arrives
        when its regions cover it. read: the tensor's bytes count as read (once per
        source tensor; they are held once per region). single: its only region (its
        name may then be known to the next streams)."""
        if not isinstance(tensor, torch.Tensor):
            raise self.not_a_tensor(source_name, tensor)
        name = target.name
        self.region_sources.add(source_name)
        replay = self.replay
        if replay is not None and name in replay.plan.index:
            replay.take_region(source_name, target, tensor, flush=False)
            self.hold(tensor.nbytes if read else 0)
            if replay.ready_bytes >= replay.batch_bytes:
                replay.flush()
            return
        index = self.layout.target_index.get(name)
        if index is None:
            self.unknown(name)
            return
        whole = self.pending.get(index)
        if index in self.written_targets or (whole is not None and not isinstance(whole, Pieces)):
            raise self.fail(regions={name: "given both whole and in regions"})
        pieces = self.pieces.get(index)
        if pieces is None:
            pieces = self.pieces[index] = Pieces(self.layout.targets[index].name, 0)
        try:
            key = (index, target, tensor.shape)
            seen = self.region_views.get(key)
            if seen is not None:
                (dv, covered, label), sv = seen, tensor
            else:
                dv, sv, covered, label = region_views(target, self.plan.dsts[index], tensor)
                if sv is tensor:  # the source whole, as it came: the same view serves the next one
                    self.region_views[key] = dv, covered, label
            pieces.add(dv, sv, covered, label, tensor, self.plan.dsts[index], target,
                       source_name if single and sv is tensor else None)
            self.checked.add(index)
        except RegionProblem as problem:
            raise self.fail(regions={f"{name} <- {source_name}": str(problem)}) from None
        except KeyError as repeated:
            raise self.fail(duplicates=[repeated.args[0]]) from None
        nbytes = tensor.nbytes
        self.held_bytes += nbytes
        self.hold(nbytes if read else 0)
        if pieces.complete:
            self.pending[index] = pieces
            self.pieces_pending += 1
            self.arrived(index, pieces.held_bytes)

    def known_names(self) -> dict | None:
        """The source names earlier streams under this stream's rename found regions
        for (take_known), or None."""
        kept = self.kept
        if self.rename is None or self.rename is not kept.rename or self.replay is not None:
            return None
        return kept.known

    def take_known(self, source_name: str, tensor, slot: tuple) -> bool:
        """take_region for a source name an earlier stream wrote the same region from,
        as part of a tiling of its destination checked then: the regions of distinct
        names of it cover the destination exactly, so none is checked against the
        others. False (nothing taken) for anything else take_region would decide:
        a name given twice, another shape, a destination given whole or done."""
        index, dv, covered, label, source_shape, elements, size, shape, target = slot
        if (source_name in self.region_sources or not isinstance(tensor, torch.Tensor)
                or tensor.shape != source_shape or index in self.pending or index in self.written_targets):
            return False
        pieces = self.pieces.get(index)
        if pieces is None:
            pieces = self.pieces[index] = Pieces(self.layout.targets[index].name, 0)
        nbytes = tensor.nbytes
        pieces.add_known(dv, tensor, covered, label, nbytes, elements, size, shape, target, source_name)
        self.region_sources.add(source_name)
        self.held_bytes = held = self.held_bytes + nbytes
        if held > self.peak_held_bytes or self.max_held_bytes is not None:
            self.hold(nbytes)
        else:
            self.bytes_read += nbytes
        if pieces.covered == size:
            self.pending[index] = pieces
            self.pieces_pending += 1
            self.arrived(index, pieces.held_bytes)
        return True

    def keep_known(self) -> None:
        """After a stream written whole: the names whose regions tiled their
        destination, for the next streams under the same rename."""
        rename, kept = self.rename, self.kept
        if not self.checked or not getattr(rename, "answers_fixed", False):
            return
        if kept.rename is not rename:
            kept.rename, kept.known = rename, {}
        known = kept.known
        for index in self.checked:
            pieces = self.pieces[index]
            if index not in self.written_targets or None in pieces.sources:
                continue
            for k, source in enumerate(pieces.sources):
                dv, span = pieces.dsts[k], pieces.spans[k]
                known[source] = (index, dv, span[:4], span[4], pieces.srcs[k].shape, dv.numel(),
                                 pieces.size, pieces.shape, pieces.targets[k])

    def arrived(self, index: int, nbytes: int) -> None:
        unit = self.plan.unit_of[index]
        self.unit_bytes[unit] += nbytes
        self.remaining[unit] -= 1
        if self.remaining[unit] == 0:
            self.completed(unit)

    def completed(self, unit: int) -> None:
        self.ready.append(unit)
        self.ready_bytes += self.unit_bytes[unit]
        if self.ready_bytes >= self.batch_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.ready:
            return
        units = self.layout.units
        if len(self.ready) == len(units):
            indices = range(len(self.plan.leading))  # every layer at once: in the plan's order
        else:
            indices = [i for unit in self.ready for i in range(units[unit].start, units[unit].stop)]
        self.write(indices, sum(self.unit_bytes[u] for u in self.ready))
        self.written_units += self.ready
        self.ready, self.ready_bytes = [], 0

    def write(self, indices, held: int | None = None) -> None:
        """One fused copy; batched_copy_ checks every pair first and refuses the batch
        whole, so the layers of a refused batch stay unwritten. held: the bytes of
        the sources, when the caller knows them."""
        pending, plan = self.pending, self.plan
        regions = 0
        if len(indices) == len(plan.leading) and not self.pieces_pending:
            # Every target, none in regions: the plan's bound copy, as for a mapping.
            srcs = tuple(map(pending.__getitem__, indices))
            dsts, names = plan.dsts, plan.leading
            problems = plan.bound(srcs, None)
            if problems is not None:
                self._refuse(list(dsts), list(srcs), names, problems)
                raise AssertionError("the bound copy refused a batch with no pair to name")
        else:
            dsts, srcs, _ = expand(plan, pending, indices, names=False)
            if self.pieces_pending:
                regions = sum(len(pending[i].dsts) for i in indices if isinstance(pending[i], Pieces))
            bound = self.kept.bound_copy(dsts)
            if bound is None:
                try:
                    ops.batched_copy_(dsts, srcs)
                except RuntimeError:
                    self._refuse(dsts, srcs, expand(plan, pending, indices)[2])
                    raise
            else:
                problems = bound(tuple(srcs), None)
                if problems is not None:
                    self._refuse(dsts, srcs, expand(plan, pending, indices)[2], problems)
                    raise AssertionError("the bound copy refused a batch with no pair to name")
        if held is None:
            held = sum(pending[i].held_bytes if isinstance(pending[i], Pieces) else pending[i].nbytes
                       for i in indices)
        if len(indices) == len(pending) and not self.pieces_pending:
            pending.clear()  # every pending target written (a whole stream in one batch)
        else:
            for i in indices:
                if isinstance(pending.pop(i), Pieces):
                    self.pieces_pending -= 1
        self.calls += 1
        self.tensors += len(indices)
        written = plan.total_bytes if len(indices) == len(plan.sizes) else sum(map(plan.sizes.__getitem__, indices))
        self.bytes += written
        self.held_bytes -= held
        self.regions += regions
        self.written_targets.update(indices)
        if self.on_written is not None:
            self.on_written(written)

    def _refuse(self, dsts, srcs, names, problems=None) -> None:
        """Raises the error naming the refused pairs of a batch that was not written."""
        try:
            found = pair_problems(dsts, srcs, names, problems)
        except StaleLayout:
            found = {name: "shares memory with another model tensor" for name in names}
        if found:
            raise self.fail(mismatched=found) from None

    def finish(self) -> StreamResult:
        incomplete = [u for u, left in enumerate(self.remaining) if left > 0]
        missing = [self.plan.leading[i] for u in incomplete
                   for i in range(self.layout.units[u].start, self.layout.units[u].stop)
                   if i not in self.pending]
        replay = self.replay
        if replay is not None:
            missing = replay.missing() + missing
        if missing and self.strict:
            sources_of = getattr(self.rename, "sources_of", None)
            uncovered = {p.name: p.uncovered() + not_given(sources_of, p.name, self.region_sources)
                         for i, p in self.pieces.items() if i not in self.pending}
            if replay is not None:
                uncovered.update(replay.uncovered())
            raise self.fail(missing=missing, regions=uncovered)  # before the last batch: it stays unwritten
        if replay is not None:
            replay.flush()  # complete units; with strict=False, incomplete ones keep their weights
        self.flush()
        partial = sorted(self.pending)  # strict=False: what did arrive of incomplete layers
        if partial:
            self.write(partial)
            self.written_units += incomplete
        layers = len(set(self.written_units))
        if not missing:
            self.keep_known()
        if replay is None:
            return StreamResult(self.tensors, self.bytes, layers, self.calls, self.bytes_read,
                                self.peak_held_bytes, tuple(missing), tuple(self.unexpected),
                                self.renamed, regions=self.regions)
        return StreamResult(self.tensors + replay.tensors, self.bytes + replay.bytes,
                            layers + len(replay.written), self.calls + replay.calls, self.bytes_read,
                            self.peak_held_bytes, tuple(missing), tuple(self.unexpected),
                            self.renamed, replay.replayed, tuple(replay.custom_loaded),
                            self.regions + replay.regions)


def _shown(value) -> str:
    """A stream's item in an error: its type and the start of its repr (which may be
    long, or fail)."""
    try:
        text = repr(value)
    except Exception:
        text = "?"
    return f"{type(value).__name__} {text:.80}"


def consume(plan: Plan, pairs: Iterable, *, strict: bool, batch_bytes: int,
            max_held_bytes: int | None, rename=None, detect=None, on_written=None,
            replay: ReplayPlan | None = None, model=None, replay_batch_bytes: int | None = None,
            hub=None) -> StreamResult:
    """Reads the stream and writes its layers; `rename` maps names, or `detect` (the
    names the model knows) lets a common wrapper be recognised from the first name.
    Replayed units go in batches of replay_batch_bytes (default: batch_bytes). hub: the
    model's checkpoint-format rename, used from the first name only it explains."""
    consumer = _Consumer(plan, strict, batch_bytes, max_held_bytes, rename, detect, on_written,
                         replay, model, replay_batch_bytes, hub if rename is None else None)
    try:
        consumer.take_all(iter(pairs))
        return consumer.finish()
    except BaseException as error:
        consumer.release(error)
        raise


def _clear_frames(error: BaseException) -> None:
    """The locals of the finished frames of an error's traceback, and of its cause's
    (the stream's own error, which a failed stream is raised from)."""
    traceback.clear_frames(error.__traceback__)
    if error.__cause__ is not None:
        traceback.clear_frames(error.__cause__.__traceback__)
