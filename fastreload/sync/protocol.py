"""The small fixed messages of an update, the same on both sides.

An update is: a header (version, the manifest's digest, whether the manifest
follows), the manifest when it changed, an agreement, the buckets (each with a
header of its own saying which bucket it is and whether the sender is still going), and a
last agreement that commits the version on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastreload.errors import ReloadError

__all__ = ["BUCKET_HEADER_BYTES", "Header", "read_bucket_header", "write_bucket_header"]

MAGIC = 0x66726C64_73796E63  # "frldsync"
PROTOCOL = 1
_HEADER_WORDS = 12
# Every bucket starts with this many bytes: [magic, update, bucket, status, message
# length] as int64, then the sender's message when it stops an update. The
# weights follow, on a 64-byte boundary.
BUCKET_HEADER_BYTES = 1024
_WORDS = 5
_MESSAGE_BYTES = BUCKET_HEADER_BYTES - 8 * _WORDS

GOING, STOPPED = 0, 1


@dataclass(frozen=True)
class Header:
    seq: int  # the update's number in this group, from 1
    version: int
    digest: bytes  # of the manifest, 16 bytes
    manifest_bytes: int  # > 0: the manifest follows, of this many bytes
    bucket_bytes: int
    buckets: int
    wire_bytes: int

    def tensor(self, device) -> torch.Tensor:
        d0 = int.from_bytes(self.digest[:8], "little", signed=True)
        d1 = int.from_bytes(self.digest[8:], "little", signed=True)
        words = [MAGIC, PROTOCOL, self.seq, self.version, d0, d1, self.manifest_bytes,
                 self.bucket_bytes, self.buckets, self.wire_bytes, 0, 0]
        return torch.tensor(words, dtype=torch.int64, device=device)

    @staticmethod
    def empty(device) -> torch.Tensor:
        return torch.zeros(_HEADER_WORDS, dtype=torch.int64, device=device)

    @classmethod
    def read(cls, tensor: torch.Tensor, seq: int) -> Header:
        words = tensor.cpu().tolist()
        if words[0] != MAGIC or words[1] != PROTOCOL:
            raise ReloadError(reason=(
                "the sender does not speak this fastreload's sync protocol (another version of "
                "fastreload, or not a fastreload sender on this group)"))
        if words[2] != seq:
            raise ReloadError(reason=f"the sender started update number {words[2]}, this receiver "
                                     f"expected number {seq}: the two sides are out of step (reconnect)")
        digest = (words[4].to_bytes(8, "little", signed=True) + words[5].to_bytes(8, "little", signed=True))
        return cls(words[2], words[3], digest, words[6], words[7], words[8], words[9])


def write_bucket_header(bucket: torch.Tensor, seq: int, index: int, status: int = GOING, message: str = "") -> None:
    """Fills the first BUCKET_HEADER_BYTES of a bucket buffer (uint8)."""
    text = message.encode()[:_MESSAGE_BYTES]
    words = torch.tensor([MAGIC, seq, index, status, len(text)], dtype=torch.int64)
    head = torch.zeros(BUCKET_HEADER_BYTES, dtype=torch.uint8)
    head[:8 * _WORDS] = words.view(torch.uint8)
    if text:
        head[8 * _WORDS:8 * _WORDS + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    bucket[:BUCKET_HEADER_BYTES].copy_(head)


def read_bucket_header(bucket: torch.Tensor, seq: int, index: int) -> str | None:
    """None while the sender goes on; its message when it stopped the update here.
    Raises ReloadError for a bucket that is not the one expected."""
    head = bucket[:BUCKET_HEADER_BYTES].cpu()
    words = head[:8 * _WORDS].view(torch.int64).tolist()
    if words[0] != MAGIC or words[1] != seq or words[2] != index:
        raise ReloadError(reason=f"bucket {index} of update number {seq} arrived as something else "
                                 f"(update {words[1]}, bucket {words[2]}): the two sides are out of step")
    if words[3] == GOING:
        return None
    return bytes(head[8 * _WORDS:8 * _WORDS + words[4]].tolist()).decode(errors="replace")
