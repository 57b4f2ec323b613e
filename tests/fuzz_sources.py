"""Property-based damage to safetensors files and indexes: every case ends in a
ReloadError with the model unchanged, or in a reload that agrees with the reference
reader (safetensors.torch) on the same bytes; never another exception, a hang or a
crash. Run as a child process by tests/test_fuzz.py:

    python tests/fuzz_sources.py EXAMPLES

prints one JSON line of counts per property; exits non-zero with hypothesis's
falsifying example on the first failure.
"""

import json
import os
import shutil
import struct
import sys
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as reference_load
from safetensors.torch import save
from torch import nn

import fastreload

EXAMPLES = int(sys.argv[1]) if len(sys.argv) > 1 else 100
FOLDER = tempfile.mkdtemp(prefix="fastreload-fuzz-")
OUTCOMES: dict[str, dict[str, int]] = {}


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)                                            # a.weight (2, 3), a.bias (2,)
        self.b = nn.Linear(4, 4, bias=False, dtype=torch.bfloat16)
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
        self.register_buffer("mask", torch.zeros(5, dtype=torch.bool))


MODEL = Model()
STATE = {"a.weight": torch.randn(2, 3), "a.bias": torch.randn(2),
         "b.weight": torch.randn(4, 4).bfloat16(), "steps": torch.arange(3), "mask": torch.rand(5) > 0.5}
GOOD = save(STATE)
(HEADER_LENGTH,) = struct.unpack("<Q", GOOD[:8])
HEADER = json.loads(GOOD[8:8 + HEADER_LENGTH])
DATA = GOOD[8 + HEADER_LENGTH:]
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


def snapshot():
    return {k: v.clone() for k, v in MODEL.state_dict().items()}


def reload_checked(source, file_bytes: bytes | None, property_name: str) -> None:
    """Reloads MODEL from source: a ReloadError leaves it as it was; a success must
    hold what the reference reader reads from file_bytes (when there is one file)."""
    counts = OUTCOMES.setdefault(property_name, {"refused": 0, "loaded": 0})
    with torch.no_grad():
        for v in MODEL.state_dict().values():
            v.zero_()
    before = snapshot()
    try:
        fastreload.reload_layerwise(MODEL, source)
    except fastreload.ReloadError as error:
        message = str(error)
        assert message.startswith("reload refused, nothing was written:"), message
        after = snapshot()
        assert all(torch.equal(after[k], before[k]) for k in before), f"changed by a refused reload: {message}"
        counts["refused"] += 1
        return
    counts["loaded"] += 1
    assert file_bytes is not None, "an index this damaged was accepted"
    expected = reference_load(file_bytes)  # raises if the reference refuses what fastreload took
    for k, v in MODEL.state_dict().items():
        assert torch.equal(v, expected[k].to(v.dtype)), k


def write(name: str, content: bytes) -> str:
    path = os.path.join(FOLDER, name)
    with open(path, "wb") as f:
        f.write(content)
    return path


def framed(header_bytes: bytes, data: bytes = DATA) -> bytes:
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


# Regions of the file: the length field, the header, the data.
@given(st.integers(0, len(GOOD) - 1))
@SETTINGS
def truncated(length):
    reload_checked(write("model.safetensors", GOOD[:length]), GOOD[:length], "truncated")


@given(st.lists(st.tuples(st.integers(0, 8 + HEADER_LENGTH - 1), st.integers(1, 255)), min_size=1, max_size=4))
@SETTINGS
def flipped_header_bytes(flips):
    data = bytearray(GOOD)
    for at, mask in flips:
        data[at] ^= mask
    reload_checked(write("model.safetensors", bytes(data)), bytes(data), "flipped header bytes")


JSON_LEAVES = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
ANY_JSON = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
COUNTS = st.integers(-2**64, 2**64) | st.sampled_from([0, 1, 2, 3, 4, 8, 16, 2**31, 2**63, -1])
FIELD_VALUES = {
    "data_offsets": st.lists(COUNTS, max_size=3) | ANY_JSON,
    "shape": st.lists(COUNTS, max_size=4) | st.lists(st.integers(0, 2**62), min_size=6, max_size=6) | ANY_JSON,
    "dtype": st.sampled_from(["F32", "BF16", "I64", "BOOL", "F128", "f32", "", "U4", "F8_E8M0"]) | ANY_JSON,
}


@given(st.sampled_from(sorted(k for k in HEADER if k != "__metadata__")),
       st.sampled_from(sorted(FIELD_VALUES)), st.data())
@SETTINGS
def lying_header_fields(name, field, data):
    header = json.loads(json.dumps(HEADER))
    header[name][field] = data.draw(FIELD_VALUES[field])
    content = framed(json.dumps(header).encode())
    reload_checked(write("model.safetensors", content), content, "lying header fields")


@given(ANY_JSON | st.binary(max_size=64) | st.integers(1, 20_000).map(lambda n: "[" * n + "]" * n))
@SETTINGS
def unreadable_headers(header):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode() \
        if not isinstance(header, str) else header.encode()
    content = framed(raw)
    reload_checked(write("model.safetensors", content), content, "unreadable headers")


@given(st.integers(0, 2**64 - 1))
@SETTINGS
def header_lengths(length):
    content = struct.pack("<Q", length) + GOOD[8:]
    reload_checked(write("model.safetensors", content), content, "header lengths")


FILE_NAMES = st.sampled_from(["model.safetensors", "../model.safetensors", "/tmp/model.safetensors",
                              os.path.join(FOLDER, "model.safetensors"), "./model.safetensors",
                              "sub/../model.safetensors", "sub/../../model.safetensors", "", ".", "..",
                              "sub", "missing.safetensors", "model.safetensors\x00"]) | st.text(max_size=12)
WEIGHT_MAPS = st.dictionaries(st.sampled_from(sorted(STATE)) | st.text(max_size=6), FILE_NAMES | ANY_JSON,
                              max_size=6)


@given(st.one_of(
    WEIGHT_MAPS.map(lambda m: json.dumps({"metadata": {}, "weight_map": m}).encode()),
    ANY_JSON.map(lambda j: json.dumps({"weight_map": j}).encode()),
    ANY_JSON.map(lambda j: json.dumps(j).encode()),
    st.binary(max_size=64),
    st.integers(1, 20_000).map(lambda n: ('{"weight_map":' * n).encode()),
    st.sampled_from([b'{"weight_map": {"a.weight": "\xff.safetensors"}}', b"\xef\xbb\xbf{}"]),
))
@SETTINGS
def damaged_indexes(content):
    os.makedirs(os.path.join(FOLDER, "sub"), exist_ok=True)
    write("model.safetensors", GOOD)
    write("model.safetensors.index.json", content)
    try:  # an index whose every entry names the one good file inside the folder is good
        names = set(json.loads(content.decode("utf-8"))["weight_map"].values())
        good = names and all(isinstance(n, str) and "\0" not in n and os.path.normpath(n) == "model.safetensors"
                             for n in names)
    except Exception:
        good = False
    single = GOOD if good else None
    reload_checked(FOLDER, single, "damaged indexes")


def main():
    try:
        for prop in (truncated, flipped_header_bytes, lying_header_fields, unreadable_headers, header_lengths,
                     damaged_indexes):
            prop()
    finally:
        shutil.rmtree(FOLDER, ignore_errors=True)
    print(json.dumps(OUTCOMES))


if __name__ == "__main__":
    main()
