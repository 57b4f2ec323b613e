"""The trainer's side of a sync: one rank of the group sends every update."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from fastreload.errors import ReloadError
from fastreload.sync.manifest import Manifest, describe
from fastreload.sync.protocol import BUCKET_HEADER_BYTES as HEAD
from fastreload.sync.packing import MappingPacking, StreamPacker
from fastreload.sync.protocol import STOPPED, Header, write_bucket_header
from fastreload.sync.transport import Channel, TransportError

__all__ = ["SendReport", "Sender"]

DEFAULT_BUCKET_BYTES = 256 * 2**20


@dataclass(frozen=True)
class SendReport:
    """What one send() did: the version, the bytes of weights sent (as they
    travelled, wire_bytes counting header, manifest and bucket headers too), the
    seconds in all, those spent waiting on the transport and those spent packing
    buckets, and whether the manifest travelled (False: the receivers reused the
    previous one)."""

    version: int
    bytes: int
    seconds: float
    wire_bytes: int
    buckets: int
    transport_seconds: float
    manifest_sent: bool
    pack_seconds: float = 0.0

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        return (f"sent version {self.version}: {self.bytes / 2**20:.1f} MiB in {self.buckets} buckets in "
                f"{self.seconds * 1e3:.1f} ms ({self.gbps:.2f} GB/s, {self.transport_seconds * 1e3:.1f} ms "
                f"waiting on the transport)")


class Sender:
    """Sends weights to every Receiver of a group, from this rank:

        sender = fastreload.sync.Sender(group, bucket_bytes=256 * 2**20)
        sender.send(model.state_dict(), version=7)

    bucket_bytes is the size of each of the two buffers an update is packed into
    (rounded up to 64 bytes); the receivers learn it from the manifest. With
    wire_dtype, floating tensors are converted as they are packed and travel in it."""

    def __init__(self, group, bucket_bytes: int = DEFAULT_BUCKET_BYTES, wire_dtype: torch.dtype | None = None) -> None:
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        if wire_dtype is not None and not wire_dtype.is_floating_point:
            raise ValueError(f"wire_dtype converts floating tensors: give a floating dtype, not {wire_dtype}")
        self.channel = Channel(group, src=group.rank())
        self.bucket_bytes = -(-bucket_bytes // 64) * 64
        self.wire_dtype = wire_dtype
        self._seq = 0
        self._sent: bytes | None = None  # digest of the manifest the receivers hold
        self._buffers: list[torch.Tensor] = []
        self._packing: MappingPacking | None = None
        self._packed = 0.0  # seconds packing buckets in the last send

    @property
    def held_bytes(self) -> int:
        """Bytes of the two bucket buffers kept between updates."""
        return sum(b.numel() for b in self._buffers if b is not None)

    def send(self, weights: Mapping[str, torch.Tensor] | Iterable, version: int,
             manifest: Mapping | None = None) -> SendReport:
        """Sends one update and returns once every receiver has written and committed
        it; raises ReloadError (on every rank) when any rank refuses or fails.

        weights: a Mapping[str, Tensor], or any iterable of (name, tensor), read once.
        Without manifest, an iterable that is not a mapping is read whole first.
        With manifest (name -> anything with .shape and .dtype, in the order the
        iterable yields), it is read in order and each tensor released once packed."""
        with torch.no_grad():
            return self._send(weights, int(version), manifest)

    def _send(self, weights, version: int, manifest) -> SendReport:
        started = time.perf_counter()
        if manifest is not None:
            layout = Manifest.plan(describe(manifest, self.wire_dtype), self.bucket_bytes)
            packer, encoded, digest = StreamPacker(layout, _pairs(weights), self.wire_dtype), None, None
        else:
            if not isinstance(weights, Mapping):
                weights = _read_whole(weights)
            packer = self._packing_for(weights)
            layout, encoded, digest = packer.layout, packer.encoded, packer.digest
        self._seq += 1
        seq = self._seq
        channel = self.channel
        waited = channel.waited
        try:
            if encoded is None:
                encoded, digest = layout.encode(), layout.digest()
            send_manifest = digest != self._sent
            header = Header(seq, version, digest, len(encoded) if send_manifest else 0,
                            layout.bucket_bytes, layout.buckets, layout.wire_bytes)
            channel.signal_start(seq)
            channel.broadcast(header.tensor(channel.device), f"sending the header of update {version}").wait()
            if send_manifest:
                data = torch.frombuffer(bytearray(encoded), dtype=torch.uint8).to(channel.device)
                channel.broadcast(data, f"sending the manifest of update {version}").wait()
                self._sent = digest
            refused = channel.agree(True, f"agreeing on the manifest of update {version}")
            if refused:
                raise ReloadError(reason=(
                    f"receivers on ranks {refused} refused the manifest (their errors say why); no rank "
                    "wrote anything"), rank=refused[0], version=version)
            stopped = self._send_buckets(layout, packer, seq, version)
            failed = channel.agree(stopped is None, f"committing update {version}")
        except TransportError as error:
            raise ReloadError(reason=f"the transport failed: {error}", version=version) from None
        if stopped is not None:
            raise ReloadError(reason=f"this sender stopped the update: {stopped}", rank=channel.rank,
                              version=version)
        if failed:
            raise ReloadError(reason=(
                f"receivers on ranks {failed} failed to write the update (their errors say which "
                "layers they wrote); the version is committed on no rank"), rank=failed[0], version=version)
        sent = layout.payload_bytes
        wire = layout.wire_bytes + layout.buckets * HEAD + (len(encoded) if send_manifest else 0)
        return SendReport(version, sent, time.perf_counter() - started, wire, layout.buckets,
                          channel.waited - waited, send_manifest, self._packed)

    # -- buckets

    def _buffer(self, k: int, nbytes: int | None = None) -> torch.Tensor:
        """Bucket buffer k, of at least nbytes of weights (a model smaller than a bucket
        needs no more). A larger one replaces it, and the packing bound to it."""
        while len(self._buffers) <= k:
            self._buffers.append(None)
        buffer = self._buffers[k]
        if buffer is None or (nbytes is not None and buffer.numel() < HEAD + nbytes):
            self._buffers[k] = None  # freed before its successor is allocated
            self._packing = None
            buffer = self._buffers[k] = torch.empty(HEAD + (nbytes or self.bucket_bytes), dtype=torch.uint8,
                                                     device=self.channel.device)
        return buffer

    def _packing_for(self, weights: Mapping) -> MappingPacking:
        """The packing of the last mapping sent when this one has the same names,
        shapes, dtypes and ties (a trainer's state_dict, step after step); else a new one."""
        packing = self._packing
        if packing is not None and packing.take(weights):
            return packing
        self._packing = None
        layout = Manifest.plan(describe(weights, self.wire_dtype), self.bucket_bytes)
        packing = MappingPacking(layout, [self._buffer(k, _buffer_size(layout)) for k in range(min(layout.buckets, 2))])
        if not packing.take(weights):
            raise ReloadError(reason="the weights changed while they were being described")
        self._packing = packing
        return packing

    def _send_buckets(self, layout: Manifest, packer, seq: int, version) -> str | None:
        """Packs and broadcasts every bucket, packing one while the previous travels.
        Returns None, or why this sender stopped the update (the bucket that says so is
        sent, and the receivers stop there too)."""
        pending: list = [None, None]
        self._packed = 0.0
        if layout.buckets == 0:
            try:
                packer.finish()
            except ReloadError as error:
                return str(error)
        try:
            for b in range(layout.buckets):
                buffer = self._free(layout, b, pending)
                try:
                    t = time.perf_counter()
                    packer.pack(b, buffer)
                    self._packed += time.perf_counter() - t
                    if b == layout.buckets - 1:
                        packer.finish()
                    write_bucket_header(buffer, seq, b)
                except Exception as error:  # noqa: BLE001 - every rank must hear why the update stops
                    reason = str(error) if isinstance(error, ReloadError) else f"{type(error).__name__}: {error}"
                    # The receivers may already wait for the next bucket too: both say stop.
                    for stop in range(b, min(b + 2, layout.buckets)):
                        buffer = self._free(layout, stop, pending)
                        write_bucket_header(buffer, seq, stop, STOPPED, reason)
                        pending[stop % 2] = self._broadcast(layout, stop, buffer, version)
                    return reason
                pending[b % 2] = self._broadcast(layout, b, buffer, version)
            return None
        finally:
            for p in pending:
                if p is not None:
                    p.wait()

    def _free(self, layout: Manifest, b: int, pending: list) -> torch.Tensor:
        """The buffer of bucket b, once what it held before has gone."""
        if pending[b % 2] is not None:
            pending[b % 2].wait()
            pending[b % 2] = None
        return self._buffer(b % 2, _buffer_size(layout))

    def _broadcast(self, layout: Manifest, b: int, buffer: torch.Tensor, version):
        return self.channel.broadcast(buffer[:HEAD + layout.bucket_size(b)], f"sending bucket {b} of update {version}")


def _buffer_size(layout: Manifest) -> int:
    """Bytes of weights a bucket buffer holds: a bucket, or less for a smaller model."""
    return min(layout.bucket_bytes, -(-layout.wire_bytes // 64) * 64)


def _pairs(weights) -> Iterator:
    return iter(weights.items()) if isinstance(weights, Mapping) else iter(weights)


def _read_whole(weights: Iterable) -> dict:
    held = {}
    for item in weights:
        try:
            name, tensor = item
        except (TypeError, ValueError):
            raise ReloadError(reason=f"weights must be (name, tensor) pairs, got a {type(item).__name__}") from None
        if name in held:
            raise ReloadError(duplicates=[name])
        if not isinstance(tensor, torch.Tensor):
            raise ReloadError(reason=f"{name!r}: expected a tensor, got {type(tensor).__name__}")
        held[name] = tensor
    return held
