"""The errors a reload raises. A mapping or files are checked whole before the first
byte is written; a stream is checked layer by layer, and its errors name the layers
already written and those not. Every refusal of a reload is a ReloadError (or a
subclass of it, such as fastreload.sources.SafetensorsError), so that
``except fastreload.ReloadError`` keeps a server alive through any bad source."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["ReloadError"]

# Longest list of names spelled out in a message; the attributes keep them all.
_SHOWN = 20


def _names(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


class ReloadError(RuntimeError):
    """A reload refused (nothing of the model written), or stopped after writing some
    layers; ``str(error)`` starts by saying which.

    Attributes hold every problem found, by kind, keyed by state_dict name:
    missing, unexpected, mismatched (name -> "expected ... got ..."), uninitialized
    (source tensors aimed at parameters that cannot be loaded in place), conflicts
    (tied names with different values), overlapping (model tensors that share
    bytes without being the same tensor), duplicates (names a stream sent twice) and
    processed (kernel tensors of a replayed unit, by name -> what its processing did
    wrong: failed, left one unproduced, produced another shape or dtype) and regions
    (fused and sharded targets, by destination or "destination <- source" name ->
    why: out of bounds, another shape than the source, overlapping, not covering
    the destination, a shard count that does not divide the size).
    reason holds a problem none of those kinds describes (a source that is not
    what it should be: a file cut short, a stream item that is no tensor), and file
    the path of the file it concerns, if any (None otherwise).
    For a stream, a sync, and files that changed while they were read,
    written_layers and unwritten_layers say where it stopped; they are empty when
    nothing was written. ``str(error)`` starts by saying whether anything was. In a
    sync, rank is the rank that refused or failed (where known) and version the
    update's (both None otherwise).

    The constructor takes keywords only, so that kinds can be added.
    """

    def __init__(
        self,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Mapping[str, str] | None = None,
        uninitialized: Iterable[str] = (),
        conflicts: Iterable[str] = (),
        overlapping: Iterable[str] = (),
        duplicates: Iterable[str] = (),
        processed: Mapping[str, str] | None = None,
        regions: Mapping[str, str] | None = None,
        held_over: str = "",
        reason: str = "",
        file: str | None = None,
        written_layers: Iterable[str] = (),
        unwritten_layers: Iterable[str] = (),
        rank: int | None = None,
        version: int | None = None,
    ) -> None:
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self.mismatched = dict(mismatched or {})
        self.uninitialized = tuple(uninitialized)
        self.conflicts = tuple(conflicts)
        self.overlapping = tuple(overlapping)
        self.duplicates = tuple(duplicates)
        self.processed = dict(processed or {})
        self.regions = dict(regions or {})
        self.reason = reason
        self.file = file
        self.written_layers = tuple(written_layers)
        self.unwritten_layers = tuple(unwritten_layers)
        self.rank = rank
        self.version = version
        lines = []
        if self.missing:
            lines.append(f"missing from the source: {_names(self.missing)}")
        if self.unexpected:
            lines.append(f"not in the model: {_names(self.unexpected)}")
        for name, why in list(self.mismatched.items())[:_SHOWN]:
            lines.append(f"{name!r}: {why}")
        if len(self.mismatched) > _SHOWN:
            lines.append(f"... and {len(self.mismatched) - _SHOWN} more mismatched tensors")
        if self.uninitialized:
            lines.append(
                "aimed at uninitialized (lazy or meta) model tensors, which cannot be loaded "
                f"in place: {_names(self.uninitialized)}")
        if self.conflicts:
            lines.append(f"tied names given different values: {_names(self.conflicts)}")
        if self.overlapping:
            lines.append(
                "model tensors share bytes without being the same tensor, so no write order is "
                f"right: {_names(self.overlapping)}")
        if self.duplicates:
            lines.append(f"arrived twice in one reload: {_names(self.duplicates)}")
        for name, why in list(self.processed.items())[:_SHOWN]:
            lines.append(f"{name!r}: after processing: {why}")
        for name, why in list(self.regions.items())[:_SHOWN]:
            lines.append(f"{name!r}: {why}")
        if held_over:
            lines.append(held_over)
        if reason:
            lines.append(reason)
        what = "reload" if version is None else f"update {version}"
        if rank is not None:
            what += f" on rank {rank}"
        if self.written_layers:
            lines.append(f"layers already written: {_names(self.written_layers)}")
            lines.append(f"layers not written: {_names(self.unwritten_layers)}")
            headline = f"{what} stopped after writing {len(self.written_layers)} layers"
        else:
            headline = f"{what} refused, nothing was written"
        super().__init__(headline + ":\n  " + "\n  ".join(lines))
