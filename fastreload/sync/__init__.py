"""Weight sync between processes: a trainer pushes weights into live models over
torch.distributed (gloo for CPU tensors, NCCL for CUDA tensors).

    # every process: a group of its own, rank 0 hosting the rendezvous
    group = fastreload.sync.connect("10.0.0.1", 29600, rank=r, world_size=1 + n_workers)

    # the trainer (rank 0)
    sender = fastreload.sync.Sender(group, bucket_bytes=256 * 2**20)
    sender.send(model.state_dict(), version=step)

    # each worker
    receiver = fastreload.sync.Receiver(model, group, src=0)
    report = receiver.receive()          # report.version == step

An update is a manifest (names, dtypes, shapes, where each tensor lies in the
buckets), checked by every receiver against its model before any byte of weights
moves and agreed by all ranks; then the buckets, each written into the live
tensors by one fused copy as the next one arrives; then a commit of the version
on every rank. An update with the manifest of the previous one sends only the
buckets. Any refusal or failure is a ReloadError on every rank, within the
group's timeout.
"""

from fastreload.sync.manifest import Manifest
from fastreload.sync.receiver import Receiver
from fastreload.sync.sender import DEFAULT_BUCKET_BYTES, SendReport, Sender
from fastreload.sync.transport import connect

__all__ = ["DEFAULT_BUCKET_BYTES", "Manifest", "Receiver", "SendReport", "Sender", "connect"]
