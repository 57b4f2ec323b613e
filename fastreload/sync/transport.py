"""Every torch.distributed call of a sync, in one place: the group, broadcasts,
agreement between ranks, and the wait for an update to start.

The backend decides where the transport's tensors live (CUDA for NCCL, the host
for gloo); nothing else in fastreload branches on it. Every wait is bounded: the
group's timeout inside an update, the caller's between updates.
"""

from __future__ import annotations

import datetime
import ipaddress
import time

import torch
import torch.distributed as dist

__all__ = ["Channel", "TransportError", "connect"]

# How long a wait for an update to start sleeps between looks at the store, at most
# (each look is one small request to the store: a few hundred a second is nothing).
_POLL_SECONDS = 0.004
# A wait told to last forever: any timeout the transport takes must be finite.
_FOREVER = datetime.timedelta(days=365 * 10)


class TransportError(Exception):
    """A collective or the store failed (a peer gone, a timeout); says what was awaited."""


def _timedelta(seconds: float | None) -> datetime.timedelta:
    return _FOREVER if seconds is None else datetime.timedelta(seconds=seconds)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _GlooGroup(dist.ProcessGroupGloo):
    """A gloo group that remembers the store it was made on and its timeout."""


def connect(host: str, port: int, *, rank: int, world_size: int, backend: str = "gloo",
            timeout: float = 60.0):
    """A process group of its own between a trainer and its workers, made on a
    TCPStore at host:port (hosted by rank 0) without init_process_group: neither
    side's default group is touched. Call the group's own methods, or hand it to
    fastreload.sync.Sender / Receiver; torch.distributed's module-level functions
    do not know it. `timeout` (seconds) bounds the rendezvous and every wait once
    an update has started. The group keeps its store as `group.fastreload_store`
    (its keys "start/N" are the sync's own), for a job's own signals."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a group of world_size {world_size}")
    delta = datetime.timedelta(seconds=timeout)
    try:
        store = dist.TCPStore(host, port, world_size, rank == 0, timeout=delta, wait_for_workers=True)
        store = dist.PrefixStore("fastreload", store)
        if backend == "gloo":
            options = dist.ProcessGroupGloo._Options()
            options._timeout = delta
            # On loopback every rank binds there; elsewhere gloo picks this host's interface.
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=host) if _is_loopback(host)
                                else dist.ProcessGroupGloo.create_default_device()]
            group = _GlooGroup(store, rank, world_size, options)
        elif backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = delta
            group = _NcclGroup(store, rank, world_size, options)
        else:
            raise ValueError(f"backend is 'gloo' (CPU tensors) or 'nccl' (CUDA tensors), got {backend!r}")
    except (RuntimeError, dist.DistError) as error:
        raise TransportError(f"could not form the group at {host}:{port} as rank {rank} of "
                             f"{world_size} within {timeout} s: {error}") from None
    group.fastreload_store = store
    group.fastreload_timeout = timeout
    return group


if hasattr(dist, "ProcessGroupNCCL"):
    class _NcclGroup(dist.ProcessGroupNCCL):
        """An NCCL group that remembers the store it was made on and its timeout."""
else:  # a torch built without NCCL
    def _NcclGroup(*_args):  # noqa: N802 - stands in for the class
        raise ValueError("backend='nccl' needs a torch built with NCCL")


class Channel:
    """One group seen from one rank: broadcasts from the source, agreement, and the
    signal that starts an update (through the group's store where connect() made it)."""

    def __init__(self, group, src: int, timeout: float | None = None) -> None:
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        if not 0 <= src < self.size:
            raise ValueError(f"src={src} is not a rank of this group of {self.size}")
        self.src = src
        self.timeout = timeout if timeout is not None else getattr(group, "fastreload_timeout", 60.0)
        self.store = getattr(group, "fastreload_store", None)
        self.device = torch.device("cuda", torch.cuda.current_device()) if group.name() == "nccl" \
            else torch.device("cpu")
        self.waited = 0.0  # seconds spent waiting on collectives, in all

    # -- collectives

    def broadcast(self, tensor: torch.Tensor, what: str, timeout: float | None = -1):
        """Starts a broadcast from the source into `tensor`; wait() on the result."""
        options = dist.BroadcastOptions()
        options.rootRank = self.src
        options.timeout = _timedelta(self.timeout if timeout == -1 else timeout)
        try:
            return _Pending(self, self.group.broadcast([tensor], options), what)
        except (RuntimeError, dist.DistError) as error:
            raise TransportError(f"{what}: {error}") from None

    def agree(self, ok: bool, what: str) -> list[int]:
        """Every rank says whether it can go on; all learn which ranks cannot."""
        flags = torch.zeros(self.size, dtype=torch.int32, device=self.device)
        flags[self.rank] = 0 if ok else 1
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.SUM
        options.timeout = _timedelta(self.timeout)
        try:
            _Pending(self, self.group.allreduce([flags], options), what).wait()
        except (RuntimeError, dist.DistError) as error:
            raise TransportError(f"{what}: {error}") from None
        return flags.nonzero().flatten().tolist()

    # -- the start of an update

    def signal_start(self, seq: int) -> None:
        if self.store is not None:
            try:
                self.store.set(f"start/{seq}", b"1")
                if seq >= 2:
                    self.store.delete_key(f"start/{seq - 2}")
            except (RuntimeError, dist.DistError) as error:
                raise TransportError(f"announcing update {seq}: {error}") from None

    def wait_start(self, seq: int, timeout: float | None) -> None:
        """Returns once the source has started update `seq`: raises TransportError when
        `timeout` (None: never) passes first, or when the store's host is gone. A group
        made elsewhere has no store: then the first broadcast of the update waits."""
        if self.store is None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.0005
        key = [f"start/{seq}"]
        while True:
            try:
                if self.store.check(key):
                    return
            except (RuntimeError, dist.DistError) as error:
                raise TransportError(f"waiting for update {seq} to start, the sender's store is gone "
                                     f"({error})") from None
            if deadline is not None and time.monotonic() >= deadline:
                raise TransportError(f"no update started within {timeout} s")
            time.sleep(pause)
            pause = min(pause * 2, _POLL_SECONDS)

    def start_timeout(self, timeout: float | None) -> float | None:
        """The timeout of an update's first broadcast: the wait for its start is
        already over where the store signalled it."""
        return self.timeout if self.store is not None else timeout


class _Pending:
    def __init__(self, channel: Channel, work, what: str) -> None:
        self.channel = channel
        self.work = work
        self.what = what

    def wait(self) -> None:
        started = time.perf_counter()
        try:
            self.work.wait()
        except (RuntimeError, dist.DistError) as error:
            raise TransportError(f"{self.what}: {error}") from None
        finally:
            self.channel.waited += time.perf_counter() - started
