"""Files cut short or rewritten in place before or while a reload reads them: a
ReloadError naming the file, never a crash. The scenarios run in child processes
(tests/changing_files.py), so that a SIGBUS fails the test instead of ending the run."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fastreload
from fastreload.sources import SafetensorsError

SCRIPT = os.path.join(os.path.dirname(__file__), "changing_files.py")


def run_child(*args, timeout=60):
    done = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    if done.returncode < 0:
        pytest.fail(f"the child was killed by {signal.Signals(-done.returncode).name}:\n{done.stderr[-3000:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def deterministic(tmp_path_factory):
    """The scenarios that cannot race, run in one child (each child imports torch)."""
    return run_child("deterministic", tmp_path_factory.mktemp("changing"))


def test_pages_lost_from_a_mapped_file_read_as_zeros(deterministic):
    result = deterministic["zero-pages"]
    page = result["page"]
    assert result["before"] == -1
    assert result["lost"] == 11 * page  # the first page past the one holding the new end
    assert result["kept"] == 10 * page + 100  # the bytes still in the file, all ones, were read
    assert result["zeros_from"] == 10 * page + 100


@pytest.mark.parametrize("scenario", ["cut", "cut-after-faulthandler"])
def test_a_file_cut_short_during_the_copy_is_an_error_naming_it_and_the_layers(tmp_path, deterministic, scenario):
    result = deterministic["cut"] if scenario == "cut" else run_child(scenario, tmp_path)
    assert 0 < result["lost"] < result["size"]  # the copy faulted past the new end, and went on
    assert result["raised"] == "SafetensorsError" and result["is_reload_error"]
    assert result["file"].endswith("model.safetensors")
    assert result["message"].startswith("reload stopped after writing 8 layers")
    assert "cut short while it was read" in result["message"] and "read as zeros" in result["message"]
    assert result["written"] == [str(i) for i in range(8)] and result["unwritten"] == []


@pytest.mark.parametrize("scenario", ["foreign", "foreign-faulthandler"])
def test_a_fault_outside_fastreloads_maps_still_ends_the_process(tmp_path, scenario):
    done = subprocess.run([sys.executable, SCRIPT, scenario, str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert "about to read" in done.stdout
    assert done.returncode == -signal.SIGBUS, (done.returncode, done.stderr[-2000:])
    if scenario.endswith("faulthandler"):
        assert "Bus error" in done.stderr  # the handler before fastreload's got it


def test_a_file_cut_short_then_restored_is_read_afresh(deterministic):
    result = deterministic["cut-then-restored"]
    assert "cut short while it was read" in result["raised"]
    assert result["loaded"]


def test_a_file_rewritten_in_place_during_the_copy_is_an_error(deterministic):
    result = deterministic["rewrite"]
    assert result["raised"] == "SafetensorsError"
    assert result["file"].endswith("model.safetensors")
    assert "rewritten in place while it was read" in result["message"]
    assert "change time changed" in result["message"] and result["written"]


@pytest.fixture(scope="module")
def races(tmp_path_factory):
    return run_child("races", tmp_path_factory.mktemp("races"), 1.5)


@pytest.mark.parametrize("mode", ["truncate", "rewrite"])
def test_reloads_racing_a_writer_never_crash(races, mode):
    # Another process cuts the file short and restores it, or rewrites it with other
    # values, every millisecond or so, for 1.5 s of reloads.
    result = races[mode]
    assert result["writer"] == 0
    assert result["wrong"] == 0  # no success ever loaded zeros in place of lost pages
    assert result["ok"] + result["refused"] + result["changed"] > 20
    assert result["refused"] + result["changed"] > 0


def small_model():
    return nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))


def fresh(net, seed):
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) for k, v in net.state_dict().items()}


def test_a_cached_file_cut_short_between_reloads_is_refused_before_writing(tmp_path):
    net = small_model()
    path = tmp_path / "model.safetensors"
    save_file(fresh(net, 0), path)
    fastreload.reload_layerwise(net, path)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    os.truncate(path, os.path.getsize(path) - 4)
    with pytest.raises(SafetensorsError, match="reload refused, nothing was written") as caught:
        fastreload.reload_layerwise(net, path)
    assert caught.value.file == str(path)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_a_file_rewritten_in_place_with_size_and_mtime_kept_is_read_again(tmp_path):
    # As cp -p or rsync --inplace -t leave it: same inode, same size, same mtime; only
    # the change time (which no user can set) tells.
    net = small_model()
    path = tmp_path / "model.safetensors"
    first, second = fresh(net, 1), fresh(net, 2)
    save_file(first, path)
    fastreload.reload_layerwise(net, path)
    stat = os.stat(path)
    other = tmp_path / "other.safetensors"
    save_file(second, other)
    assert os.path.getsize(other) == stat.st_size
    with open(path, "r+b") as f:
        f.write(other.read_bytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    fastreload.reload_layerwise(net, path)
    assert all(torch.equal(v, second[k]) for k, v in net.state_dict().items())


def test_a_file_replaced_by_rename_is_no_error(tmp_path):
    # The way to change a checkpoint under a reader: a new file renamed over the old.
    net = small_model()
    path = tmp_path / "model.safetensors"
    for seed in range(3):
        state = fresh(net, seed)
        save_file(state, tmp_path / "new.safetensors")
        os.replace(tmp_path / "new.safetensors", path)
        fastreload.reload_layerwise(net, path)
        assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
