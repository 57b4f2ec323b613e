"""A worker's side of a sync: receives every update into its live model."""

from __future__ import annotations

import time

import torch
from torch import nn

from fastreload import ops
from fastreload.errors import ReloadError
from fastreload.model import layout_of
from fastreload.reload import DEFAULT_BATCH_BYTES, DEFAULT_REPLAY_BATCH_BYTES
from fastreload.replay import Replay
from fastreload.report import ReloadReport
from fastreload.sync.manifest import Manifest
from fastreload.sync.protocol import BUCKET_HEADER_BYTES as HEAD
from fastreload.sync.protocol import Header, read_bucket_header
from fastreload.sync.schedule import Schedule, make_schedule
from fastreload.sync.transport import Channel, TransportError

__all__ = ["Receiver"]


class Receiver:
    """Receives the updates a fastreload.sync.Sender sends on the group into a live
    model, in place, with reload_layerwise's semantics (rename, strict, aliases,
    tied names, regions and shards, units replayed for record()):

        receiver = fastreload.sync.Receiver(model, group, src=0)
        report = receiver.receive()   # one whole update; report.version

    The version is committed (receiver.version) only once every rank has written
    the whole update."""

    def __init__(self, model: nn.Module, group, src: int = 0, rename=None, strict: bool = True, *,
                 batch_bytes: int | None = None, progress: bool = False) -> None:
        self.model = model
        self.channel = Channel(group, src=src)
        if self.channel.rank == src:
            raise ValueError(f"this process is rank {src} of the group, the sender's; a Receiver runs on "
                             "the other ranks")
        if batch_bytes is not None and batch_bytes <= 0:
            raise ValueError(f"batch_bytes must be positive, got {batch_bytes}")
        self.rename = rename
        self.strict = strict
        self.batch_bytes = batch_bytes
        self.progress = progress
        self.version: int | None = None
        self._seq = 0
        self._manifest: tuple[bytes, Manifest] | None = None
        self._schedule: Schedule | None = None

    @property
    def held_bytes(self) -> int:
        """Bytes kept between updates: the two bucket buffers, and staging for tensors
        larger than a bucket whose destination is not one contiguous run of bytes."""
        schedule = self._schedule
        return 0 if schedule is None else sum(b.numel() for b in schedule.buffers) + schedule.staging_bytes

    def receive(self, timeout: float | None = None) -> ReloadReport:
        """Waits up to `timeout` seconds (None: as long as it takes) for the next
        update to start, then receives and writes it whole, each wait after that
        bounded by the group's timeout. Raises ReloadError when this or any other rank
        refuses or fails it (naming the rank, the version and the layers written)."""
        self._seq += 1
        seq = self._seq
        channel = self.channel
        try:
            channel.wait_start(seq, timeout)
            started = time.perf_counter()  # what counts is the update, not the wait for it to start
            header_tensor = Header.empty(channel.device)
            channel.broadcast(header_tensor, "waiting for the update's header", channel.start_timeout(timeout)).wait()
            waited = channel.waited
        except TransportError as error:
            raise ReloadError(reason=f"no update arrived: {error}", rank=channel.rank) from None
        try:
            header = Header.read(header_tensor, seq)
        except ReloadError as error:
            # Out of step, or not our sender: nothing on this group can be trusted now.
            raise ReloadError(reason=error.reason, rank=channel.rank) from None
        version = header.version
        written: set[int] = set()  # layers written whole so far
        session = None
        unreadable = None
        try:
            wire = header_tensor.numel() * header_tensor.element_size()
            if header.manifest_bytes:
                data = torch.empty(header.manifest_bytes, dtype=torch.uint8, device=channel.device)
                channel.broadcast(data, f"receiving the manifest of update {version}").wait()
                wire += header.manifest_bytes
                self._manifest = None
                try:
                    manifest = Manifest.decode(data.cpu().numpy().tobytes())
                    if manifest.digest() != header.digest:
                        raise ReloadError(reason="the manifest arrived damaged (its digest differs from the header's)")
                    self._manifest = (header.digest, manifest)
                except ReloadError as error:
                    unreadable = error  # refused below, in the agreement: no rank is left waiting
            problem, schedule = self._prepare(header) if unreadable is None else (unreadable, None)
            refused = channel.agree(problem is None, f"agreeing on the manifest of update {version}")
            if problem is not None:
                raise ReloadError(**_fields(problem), rank=channel.rank, version=version) from None
            if refused:
                raise ReloadError(reason=(
                    f"receivers on ranks {refused} refused the manifest (their errors say why); no rank "
                    "wrote anything"), rank=refused[0], version=version)
            session = self._session(schedule)
            failure, stopped, calls = self._write(schedule, header, written, session)
            wire += header.wire_bytes + header.buckets * HEAD
            failed = channel.agree(failure is None and stopped is None, f"committing update {version}")
        except TransportError as error:
            raise self._failed(reason=f"the transport failed: {error}", version=version,
                               written=written, session=session) from None
        if failure is not None:
            raise self._failed(error=failure, version=version, written=written, session=session)
        if stopped is not None:
            raise self._failed(reason=f"the sender stopped the update: {stopped}", version=version,
                               written=written, session=session, rank=channel.src)
        if failed:
            raise self._failed(reason=(
                f"rank {failed[0]} failed to write the update (its error says why); the version is "
                "committed on no rank"), version=version, written=written, session=session, rank=failed[0])
        self.version = version
        return self._report(schedule, session, calls, version, wire, channel.waited - waited,
                            time.perf_counter() - started)

    # -- the manifest

    def _prepare(self, header: Header) -> tuple[ReloadError | None, Schedule | None]:
        """The schedule of this update's manifest, checked against the model, or what
        is wrong with it."""
        if self._manifest is None or self._manifest[0] != header.digest:
            return ReloadError(reason="the sender reused a manifest this receiver does not hold: reconnect"), None
        digest, manifest = self._manifest
        schedule = self._schedule
        if (schedule is not None and schedule.digest == digest
                and layout_of(self.model) is schedule.checked.layout):
            return None, schedule
        self._schedule = None
        try:
            with torch.inference_mode():
                schedule = make_schedule(
                    self.model, manifest, digest, self.channel.device, strict=self.strict, rename=self.rename,
                    batch_bytes=self.batch_bytes or DEFAULT_BATCH_BYTES,
                    replay_batch_bytes=self.batch_bytes or DEFAULT_REPLAY_BATCH_BYTES)
        except ReloadError as error:
            return error, None
        except Exception as error:  # noqa: BLE001 - refused in the agreement, not left to hang the others
            return ReloadError(reason=f"checking the manifest failed: {type(error).__name__}: {error}"), None
        self._schedule = schedule
        return None, schedule

    # -- the buckets

    def _session(self, schedule: Schedule) -> Replay | None:
        """A fresh replay of the recorded units, for a model prepared with record()."""
        checked = schedule.checked.session
        if checked is None:
            return None
        return Replay(checked.plan, self.model, batch_bytes=checked.batch_bytes, on_written=None,
                      fail=lambda **problems: ReloadError(**problems))

    def _write(self, schedule: Schedule, header: Header, written: set[int], session: Replay | None):
        """Receives every bucket (the next one arriving while this one is written) and
        writes it, adding the layers written whole to `written`. Returns (this rank's
        failure, the sender's reason for stopping, fused copies)."""
        buffers, buckets = schedule.buffers, schedule.buckets
        failure: ReloadError | None = None
        calls = 0
        channel, version = self.channel, header.version
        pending = [None, None]
        bar = _progress(self.progress, header.wire_bytes)
        manifest = schedule.manifest

        def receive(b: int):
            return channel.broadcast(buffers[b % 2][:HEAD + manifest.bucket_size(b)],
                                     f"receiving bucket {b} of update {version}")

        try:
            if buckets:
                pending[0] = receive(0)
            for b, work in enumerate(buckets):
                if b + 1 < len(buckets):
                    pending[(b + 1) % 2] = receive(b + 1)
                pending[b % 2].wait()
                pending[b % 2] = None
                stopped = read_bucket_header(buffers[b % 2], header.seq, b)
                if stopped is not None:
                    if pending[(b + 1) % 2] is not None:  # the sender says stop there too
                        pending[(b + 1) % 2].wait()
                    return failure, stopped, calls
                if failure is None:
                    try:
                        calls += self._write_bucket(work, session)
                        written.update(work.units_done)
                    except ReloadError as error:
                        failure = error  # the rest is still received, to stay in step
                    except Exception as error:  # noqa: BLE001 - the same: reported at the commit
                        failure = ReloadError(reason=f"writing bucket {b} failed: {type(error).__name__}: {error}")
                if bar is not None:
                    bar.update(manifest.bucket_size(b))
            if failure is None and session is not None:
                try:
                    with torch.inference_mode():
                        session.flush()
                except ReloadError as error:
                    failure = error
                except Exception as error:  # noqa: BLE001 - reported at the commit
                    failure = ReloadError(reason=f"replaying the processed layers failed: {type(error).__name__}: "
                                                 f"{error}")
            return failure, None, calls
        finally:
            if bar is not None:
                bar.close()

    @staticmethod
    def _write_bucket(work, session: Replay | None) -> int:
        calls = 0
        with torch.inference_mode():
            if work.copy is not None:
                problems = work.copy(work.sources)
                if problems is not None:
                    raise ReloadError(reason="the model's tensors changed during the update (a bucket's "
                                             "copy was refused)")
                calls += 1
            if work.after_dsts:
                ops.batched_copy_(work.after_dsts, work.after_srcs)
                calls += 1
            if work.replayed and session is not None:
                for what, tensor, in_buffer in work.replayed:
                    tensor = tensor.clone() if in_buffer else tensor  # held until its unit is complete
                    if isinstance(what, tuple):
                        name, target = what
                        session.take_region(name, target, tensor, flush=False)
                    else:
                        session.take(what, tensor, flush=False)
                session.flush()
        return calls

    # -- what it says

    def _failed(self, *, version, written, session, error: ReloadError | None = None, reason: str = "",
                rank: int | None = None) -> ReloadError:
        schedule = self._schedule
        replay_written, replay_unwritten = session.layers() if session is not None else ([], [])
        if schedule is not None:
            done, not_done = schedule.layers(written, replay_written, replay_unwritten)
        else:
            done, not_done = [], []
        fields = _fields(error) if error is not None else {"reason": reason}
        return ReloadError(**fields, rank=self.channel.rank if rank is None else rank, version=version,
                           written_layers=done, unwritten_layers=not_done)

    def _report(self, schedule: Schedule, session: Replay | None, calls: int, version: int, wire: int,
                waited: float, seconds: float) -> ReloadReport:
        checked = schedule.checked
        work = checked.work
        tensors, nbytes, layers, regions = work.tensors, work.bytes, work.layers, work.regions
        replayed: tuple[str, ...] = ()
        custom_loaded: tuple[str, ...] = ()
        if session is not None:
            tensors += session.tensors
            nbytes += session.bytes
            layers += len(session.written)
            regions += session.regions
            calls += session.calls
            replayed, custom_loaded = session.replayed, tuple(session.custom_loaded)
        skipped = dict(checked.layout.skipped)
        if work.missing:
            skipped["missing"] = work.missing
        if work.unexpected:
            skipped["unexpected"] = work.unexpected
        return ReloadReport(
            layers=layers, tensors=tensors, bytes=nbytes, batched_copy_calls=calls, seconds=seconds,
            skipped=skipped, source="sync", bytes_read=schedule.manifest.wire_bytes, renamed=checked.renamed,
            replayed=replayed, custom_loaded=custom_loaded, regions=regions, version=version, wire_bytes=wire,
            transport_seconds=waited)


_FIELDS = ("missing", "unexpected", "mismatched", "uninitialized", "conflicts", "overlapping", "duplicates",
           "processed", "regions", "reason", "file")


def _fields(error: ReloadError) -> dict:
    return {k: getattr(error, k) for k in _FIELDS}


def _progress(wanted: bool, total: int):
    if not wanted:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError("progress=True shows a tqdm progress bar: pip install tqdm") from None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="fastreload sync")


