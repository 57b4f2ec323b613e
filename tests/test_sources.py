"""Reloads from safetensors on disk: files, shards, indexes, and every way a file can lie."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file, save_model
from torch import nn

from fastreload import ReloadError, reload_layerwise
from fastreload.sources import SafetensorsError, SafetensorsSource


class Net(nn.Module):
    def __init__(self, dtype=torch.bfloat16, tie=False):
        super().__init__()
        self.embed = nn.Embedding(16, 8, dtype=dtype)
        self.blocks = nn.ModuleList(nn.Linear(8, 8, dtype=dtype) for _ in range(4))
        self.head = nn.Linear(8, 16, bias=False, dtype=dtype)
        self.register_buffer("scale", torch.ones(3, dtype=dtype))
        if tie:
            self.head.weight = self.embed.weight


def checkpoint(model: nn.Module, dtype=None) -> dict[str, torch.Tensor]:
    return {k: (torch.randn(v.shape) * 2).to(dtype or v.dtype) for k, v in model.state_dict().items()}


def snapshot(model):
    return {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    for k, v in model.state_dict().items():
        assert v.data_ptr() == before[k][0] and torch.equal(v, before[k][1]), k


def assert_loaded(model, source):
    for k, v in model.state_dict().items():
        assert torch.equal(v, source[k].to(v.dtype)), k


def write_shards(folder, state, shards=2, index=True):
    names = list(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in part}, os.path.join(folder, filename))
        weight_map.update({n: filename for n in part})
    if index:
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_single_file_round_trip_with_conversion(tmp_path, file_dtype):
    model = Net()
    state = checkpoint(model, file_dtype)
    save_file(state, tmp_path / "model.safetensors")
    before = snapshot(model)
    report = reload_layerwise(model, tmp_path / "model.safetensors")
    assert_loaded(model, state)
    assert all(v.data_ptr() == before[k][0] for k, v in model.state_dict().items())
    assert report.tensors == len(state)


@pytest.mark.parametrize("index", [True, False])
def test_sharded_directory(tmp_path, index):
    model = Net()
    state = checkpoint(model)
    write_shards(tmp_path, state, shards=3, index=index)
    reload_layerwise(model, str(tmp_path))
    assert_loaded(model, state)


def test_index_file_and_list_of_paths(tmp_path):
    model = Net()
    state = checkpoint(model)
    write_shards(tmp_path, state, shards=2)
    reload_layerwise(model, tmp_path / "model.safetensors.index.json")
    assert_loaded(model, state)
    state = checkpoint(model)
    write_shards(tmp_path, state, shards=2)
    reload_layerwise(model, sorted(str(p) for p in tmp_path.glob("*.safetensors")))
    assert_loaded(model, state)


def test_tied_weights_deduplicated_by_the_writer(tmp_path):
    writer = Net(tie=True)
    for p in writer.parameters():
        nn.init.normal_(p)
    save_model(writer, str(tmp_path / "model.safetensors"))  # keeps one of the tied names
    stored = SafetensorsSource([str(tmp_path / "model.safetensors")])
    assert len({"embed.weight", "head.weight"} & set(stored)) == 1
    model = Net(tie=True)
    report = reload_layerwise(model, tmp_path / "model.safetensors")
    assert torch.equal(model.embed.weight, writer.embed.weight)
    assert model.head.weight is model.embed.weight
    assert report.skipped["tied"] == ("head.weight",)


def test_tensors_at_unaligned_offsets(tmp_path):
    # A hand-written file whose float32 data starts at an odd byte offset, after a byte.
    values = torch.arange(24, dtype=torch.float32).reshape(3, 8)
    header = {"flag": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "w": {"dtype": "F32", "shape": [3, 8], "data_offsets": [1, 97]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\7" + values.numpy().tobytes())
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(3, 8, dtype=torch.bfloat16))
    model.register_buffer("flag", torch.zeros(1, dtype=torch.uint8))
    reload_layerwise(model, path)
    assert torch.equal(model.w, values.bfloat16()) and int(model.flag) == 7


def test_data_the_tensors_do_not_fill_refused(tmp_path):
    """A header length that stops short of the header's padding parses as the same
    header, with every tensor then 5 bytes off: the bytes between the header and the
    first tensor, or after the last, belong to none, and the file is refused."""
    save_file({"w": torch.randn(3, 8)}, tmp_path / "m.safetensors")
    data = bytearray((tmp_path / "m.safetensors").read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    raw = bytes(data[8:8 + length]).rstrip(b" ")
    short = struct.pack("<Q", len(raw)) + raw + b" " * (length - len(raw)) + bytes(data[8 + length:])
    gap = short[:8] + raw + bytes(data[8 + length:]) + b"\0"
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(3, 8))
    for content in ([short] if len(raw) < length else []) + [gap]:
        (tmp_path / "m.safetensors").write_bytes(content)
        with pytest.raises(SafetensorsError, match="do not fill"):
            reload_layerwise(model, tmp_path / "m.safetensors")
        assert not model.w.any()


def test_views_read_the_mapped_file_without_copying(tmp_path):
    state = {"w": torch.randn(64, 64)}
    save_file(state, tmp_path / "m.safetensors")
    source = SafetensorsSource([str(tmp_path / "m.safetensors")])
    a, b = source["w"], source["w"]
    assert a.data_ptr() == b.data_ptr()  # both views of the same mapped bytes
    assert torch.equal(a, state["w"])


def corrupt(path, how):
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    if how == "truncated":
        return bytes(data[:-10])
    if how == "not json":
        data[8:12] = b"@@@@"
        return bytes(data)
    if how == "header too long":
        return struct.pack("<Q", len(data)) + bytes(data[8:])
    name = next(k for k in header if k != "__metadata__")
    if how == "offsets past the end":
        header[name]["data_offsets"][1] += 4096
    elif how == "offsets too short for the shape":
        header[name]["shape"][0] += 1
    elif how == "overlapping tensors":
        other = [k for k in header if k not in ("__metadata__", name)][0]
        header[other]["data_offsets"] = list(header[name]["data_offsets"])
        header[other]["shape"], header[other]["dtype"] = header[name]["shape"], header[name]["dtype"]
    elif how == "unknown dtype":
        header[name]["dtype"] = "F128"
    raw = json.dumps(header).encode().ljust(length)
    return struct.pack("<Q", len(raw)) + raw + bytes(data[8 + length:])


@pytest.mark.parametrize("how", ["truncated", "not json", "header too long", "offsets past the end",
                                 "offsets too short for the shape", "overlapping tensors",
                                 "unknown dtype"])
def test_bad_files_are_refused_and_change_nothing(tmp_path, how):
    model = Net()
    path = tmp_path / "model.safetensors"
    save_file(checkpoint(model), path)
    path.write_bytes(corrupt(path, how))
    before = snapshot(model)
    with pytest.raises(SafetensorsError, match="model.safetensors"):
        reload_layerwise(model, path)
    assert_untouched(model, before)


def test_wrong_shape_or_dtype_in_a_file_changes_nothing(tmp_path):
    model = Net()
    state = checkpoint(model)
    state["blocks.3.weight"] = torch.randn(8, 9).bfloat16()
    write_shards(tmp_path, state, shards=2)
    before = snapshot(model)
    with pytest.raises(ReloadError, match=r"blocks.3.weight.*\(8, 8\).*\(8, 9\)"):
        reload_layerwise(model, tmp_path)
    assert_untouched(model, before)
    state["blocks.3.weight"] = torch.ones(8, 8, dtype=torch.int32)
    write_shards(tmp_path, state, shards=2)
    with pytest.raises(ReloadError, match="int32"):
        reload_layerwise(model, tmp_path)
    assert_untouched(model, before)


def test_index_naming_a_missing_shard(tmp_path):
    model = Net()
    write_shards(tmp_path, checkpoint(model), shards=2)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    before = snapshot(model)
    with pytest.raises(SafetensorsError, match="model-00002-of-00002"):
        reload_layerwise(model, tmp_path)
    assert_untouched(model, before)


def test_a_name_in_two_shards_is_refused(tmp_path):
    model = Net()
    state = checkpoint(model)
    save_file(state, tmp_path / "a.safetensors")
    save_file({"scale": state["scale"]}, tmp_path / "b.safetensors")
    with pytest.raises(SafetensorsError, match="'scale' is in both"):
        reload_layerwise(model, tmp_path)


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(SafetensorsError, match="nope.safetensors"):
        reload_layerwise(Net(), tmp_path / "nope.safetensors")
    with pytest.raises(SafetensorsError, match="no .safetensors files"):
        reload_layerwise(Net(), tmp_path)


def test_rewritten_files_are_read_afresh(tmp_path):
    model = Net()
    path = tmp_path / "model.safetensors"
    for step in range(3):
        state = checkpoint(model)
        save_file(state, path)  # a new checkpoint at the same path every step
        reload_layerwise(model, path)
        assert_loaded(model, state)


def test_every_bad_source_is_a_reload_error_saying_nothing_was_written(tmp_path):
    model = Net()
    path = tmp_path / "model.safetensors"
    save_file(checkpoint(model), path)
    path.write_bytes(corrupt(path, "truncated"))
    with pytest.raises(ReloadError) as caught:
        reload_layerwise(model, path)
    assert isinstance(caught.value, SafetensorsError) and isinstance(caught.value, ValueError)
    assert str(caught.value).startswith("reload refused, nothing was written:\n  ")
    assert caught.value.file == str(path) and not caught.value.written_layers


def header_file(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize("header, why", [
    (b"[" * 100_000 + b"]" * 100_000, "not JSON"),                      # nested past the recursion limit
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}\xff', "not JSON"),
    (b'{"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}', "unknown dtype"),
    (b'{"w": {"dtype": "F32", "shape": [true, 2], "data_offsets": [0, 8]}}', "malformed shape"),
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}', "malformed shape"),
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}}', "malformed shape"),
    (b'{"w": {"dtype": "F32", "shape": [1000000000000, 1000000000000], "data_offsets": [0, 8]}}',
     "larger than any tensor"),
    (b'{"w": {"dtype": "F32", "shape": [1000000000000], "data_offsets": [0, 8]}}', "do not hold"),
    (b'{"w": {"dtype": "F32", "shape": [0, 4611686018427387904, 4], "data_offsets": [0, 0]}}',
     "larger than any tensor"),
    (b'{"w": [1, 2]}', "needs dtype, shape and data_offsets"),
    (b'"just a string"', "not a JSON object"),
])
def test_lying_headers_are_refused_by_name(tmp_path, header, why):
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(2))
    path = tmp_path / "bad.safetensors"
    header_file(path, header, b"\0" * 8)
    with pytest.raises(SafetensorsError, match=why) as caught:
        reload_layerwise(model, path)
    assert caught.value.file == str(path)
    assert torch.equal(model.w, torch.zeros(2))


def write_index(folder, content: bytes):
    (folder / "model.safetensors.index.json").write_bytes(content)


@pytest.mark.parametrize("content, why", [
    (b'{"weight_map": {"w": "sub"}}', "not a regular file"),             # names a directory
    (b'{"weight_map": {"w": "a.safetensors"}}\xff\xfe', "not UTF-8 JSON"),
    ('{"weight_map": {"w": "\u00e9.safetensors"}}'.encode("latin-1"), "not UTF-8 JSON"),
    (b'{"weight_map": ["a.safetensors"]}', "weight_map"),
    (b'{"weight_map": {"w": 3}}', "weight_map"),
    (b'["weight_map"]', "weight_map"),
    (b"{" * 100_000, "not UTF-8 JSON"),
    (b'{"weight_map": {"w": "../elsewhere/a.safetensors"}}', "outside its directory"),
    (b'{"weight_map": {"w": "/etc/a.safetensors"}}', "outside its directory"),
    (b'{"weight_map": {"w": "sub/../../a.safetensors"}}', "outside its directory"),
    (b'{"weight_map": {"w": ""}}', "outside its directory"),
    (b'{"weight_map": {"w": "a\\u0000.safetensors"}}', "outside its directory"),
])
def test_bad_indexes_are_refused_by_name(tmp_path, content, why):
    model = Net()
    state = checkpoint(model)
    save_file(state, tmp_path / "a.safetensors")
    (tmp_path / "sub").mkdir()
    (tmp_path.parent / "elsewhere").mkdir(exist_ok=True)
    save_file(state, tmp_path.parent / "elsewhere" / "a.safetensors")
    write_index(tmp_path, content)
    before = snapshot(model)
    with pytest.raises(SafetensorsError, match=why) as caught:
        reload_layerwise(model, tmp_path)
    named = "sub" if why == "not a regular file" else "model.safetensors.index.json"
    assert caught.value.file == str(tmp_path / named)
    assert_untouched(model, before)


def test_shards_in_subfolders_of_the_checkpoint_are_read(tmp_path):
    model = Net()
    state = checkpoint(model)
    (tmp_path / "shards").mkdir()
    save_file(state, tmp_path / "shards" / "a.safetensors")
    write_index(tmp_path, json.dumps({"weight_map": {k: "shards/./a.safetensors" for k in state}}).encode())
    reload_layerwise(model, tmp_path)
    assert_loaded(model, state)


def test_paths_that_are_no_files_are_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "pipe.safetensors")  # opening it for reading must not wait for a writer
    with pytest.raises(SafetensorsError, match="not a regular file"):
        reload_layerwise(Net(), tmp_path / "pipe.safetensors")
    os.mkfifo(tmp_path / "pipe.json")
    with pytest.raises(SafetensorsError, match="not a regular file"):
        reload_layerwise(Net(), tmp_path / "pipe.json")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(SafetensorsError, match="no .safetensors files"):
        reload_layerwise(Net(), tmp_path / "dir.safetensors")
    with pytest.raises(SafetensorsError, match="no such file"):
        reload_layerwise(Net(), str(tmp_path / "nul\0.safetensors"))
    (tmp_path / "locked.safetensors").write_bytes(b"\0" * 16)
    os.chmod(tmp_path / "locked.safetensors", 0)
    if os.geteuid() != 0:  # root reads it anyway
        with pytest.raises(SafetensorsError, match="cannot be opened"):
            reload_layerwise(Net(), tmp_path / "locked.safetensors")
