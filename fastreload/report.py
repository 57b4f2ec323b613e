"""What a reload did."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ReloadReport"]


@dataclass(frozen=True)
class ReloadReport:
    """Counts of one reload_layerwise call.

    skipped maps a reason to the state_dict (or buffer) names left alone for it:
    "alias" (buffers viewing a parameter's storage: written through the parameter),
    "tied" (second names of one storage: written once, under the first),
    "uninitialized" (lazy or meta tensors: nothing to write into),
    "non_persistent" (buffers outside the state_dict: runtime state),
    "missing" and "unexpected" (with strict=False: names absent from the source,
    or the source's names the model does not have).
    """

    layers: int
    tensors: int
    bytes: int
    batched_copy_calls: int
    seconds: float
    skipped: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # "mapping", "safetensors", "stream" or "sync"; bytes read: of the tensors in the files,
    # or of the tensors a stream sent (None for a mapping, already in memory); for a
    # stream, the most bytes of incoming tensors held at once for layers not yet written.
    source: str = "mapping"
    bytes_read: int | None = None
    peak_held_bytes: int = 0
    # How source names were mapped to the model's: "rename" (given), a detected
    # common wrapper ("stripped wrapper prefixes (module., _orig_mod.)", ...), a
    # transformers model's checkpoint format ("transformers checkpoint format
    # (qwen3_moe)") or None.
    renamed: str | None = None
    # Modules replayed through their post-load processing (see fastreload.record), and
    # the checkpoint names loaded by a parameter's own weight_loader (the slow path).
    replayed: tuple[str, ...] = ()
    custom_loaded: tuple[str, ...] = ()
    # Region writes of fused and sharded targets (see fastreload.Target), among tensors'
    # destinations: a destination written in three regions counts one tensor, three regions.
    regions: int = 0
    # A sync (fastreload.sync.Receiver): the update's version (None outside a sync),
    # the bytes that travelled (buckets, header and manifest) and the seconds spent
    # waiting on the transport once the update had started.
    version: int | None = None
    wire_bytes: int = 0
    transport_seconds: float = 0.0

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        skipped = ", ".join(f"{len(v)} {k}" for k, v in self.skipped.items() if v) or "none"
        what = "reloaded" if self.version is None else f"received version {self.version}:"
        return (f"{what} {self.tensors} tensors in {self.layers} layers, "
                f"{self.bytes / 2**20:.1f} MiB in {self.seconds * 1e3:.1f} ms "
                f"({self.gbps:.2f} GB/s, {self.batched_copy_calls} fused copies); skipped: {skipped}")
