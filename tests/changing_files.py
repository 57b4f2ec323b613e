"""Reloads from files that another process (or the reload's own rename callback)
cuts short or rewrites meanwhile. Run as a child process by tests/test_file_changes.py,
so that a crash (SIGBUS) is a failed test, not a dead test run:

    python tests/changing_files.py deterministic|cut-after-faulthandler|foreign|foreign-faulthandler FOLDER
    python tests/changing_files.py races FOLDER SECONDS

prints one JSON line of what happened; exits 0 unless something other than a
ReloadError was raised or a reload gave wrong values without an error.
"""

import faulthandler
import json
import mmap
import os
import random
import subprocess
import sys
import time

import torch
from safetensors.torch import save_file
from torch import nn

import fastreload
from fastreload import ops
from fastreload.sources import SafetensorsError, open_safetensors


def model(layers=8, width=256):
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))


def values(net, seed):
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) for k, v in net.state_dict().items()}


def holds(net, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def cut_once(path, size):
    """A rename callback that cuts the file short the first time it is called: the
    file is opened and checked, then cut before the copy reads it."""
    done = []

    def rename(name):
        if not done:
            done.append(True)
            os.truncate(path, size)
        return name
    return rename


def rewrite_once(path, data):
    done = []

    def rename(name):
        if not done:
            done.append(True)
            with open(path, "r+b") as f:  # same inode, same size, new bytes
                f.write(data)
        return name
    return rename


def cut_during_copy(folder, late_faulthandler=False):
    net = model()
    path = os.path.join(folder, "model.safetensors")
    state = values(net, 1)
    save_file(state, path)
    fastreload.reload_layerwise(net, path)  # opened and cached
    size = os.path.getsize(path)
    source = open_safetensors([path])  # the one the reload reads (cached)
    if late_faulthandler:
        faulthandler.enable()  # over fastreload's SIGBUS handler: the next reload puts it back
    try:
        fastreload.reload_layerwise(net, path, rename=cut_once(path, size // 2))
    except SafetensorsError as error:
        return {"raised": type(error).__name__, "message": str(error), "file": error.file,
                "written": list(error.written_layers), "unwritten": list(error.unwritten_layers),
                "is_reload_error": isinstance(error, fastreload.ReloadError),
                "lost": source._files[0].first_lost(), "size": size}
    return {"raised": None}


def foreign_fault(folder, late_faulthandler):
    """A SIGBUS in a map that is not fastreload's still ends the process, whoever
    handles SIGBUS: fastreload only takes the faults of its own maps."""
    path = os.path.join(folder, "other.bin")
    with open(path, "wb") as f:
        f.write(b"\1" * 3 * mmap.PAGESIZE)
    net = model()
    save_file(values(net, 1), os.path.join(folder, "model.safetensors"))
    fastreload.reload_layerwise(net, os.path.join(folder, "model.safetensors"))  # the handler installed
    if late_faulthandler:
        faulthandler.enable()
    with open(path, "r+b") as f:
        mapped = mmap.mmap(f.fileno(), 0)
    os.truncate(path, mmap.PAGESIZE)
    print("about to read", flush=True)
    return {"read": mapped[2 * mmap.PAGESIZE]}  # SIGBUS


def zero_pages(folder):
    """Pages past the end of a mapped file cut short read as zeros, from any thread."""
    path = os.path.join(folder, "data.bin")
    pages = 64
    with open(path, "wb") as f:
        f.write(b"\1" * pages * mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    mapped = ops.MappedFile(fd, pages * mmap.PAGESIZE, path)
    os.close(fd)
    view = torch.frombuffer(mapped.buffer(), dtype=torch.uint8)
    before = mapped.first_lost()
    os.truncate(path, 10 * mmap.PAGESIZE + 100)
    copy = torch.empty_like(view)
    ops.batched_copy_([copy], [view])  # the fused copy's threads fault
    return {"before": before, "lost": mapped.first_lost(), "page": mmap.PAGESIZE,
            "kept": int(copy[:10 * mmap.PAGESIZE + 100].sum()), "zeros_from": int(copy.nonzero().max()) + 1}


def cut_and_reloaded_again(folder):
    """A file cut short while it was read, then restored: the next reload reads it
    afresh and gets every value right."""
    net = model()
    path = os.path.join(folder, "model.safetensors")
    state = values(net, 2)
    save_file(state, path)
    with open(path, "rb") as f:
        data = f.read()
    fastreload.reload_layerwise(net, path)
    raised = None
    try:
        fastreload.reload_layerwise(net, path, rename=cut_once(path, 100))
    except SafetensorsError as error:
        raised = str(error)
    with open(path, "wb") as f:
        f.write(data)
    fastreload.reload_layerwise(net, path)
    return {"raised": raised, "loaded": holds(net, state)}


def rewrite_during_copy(folder):
    net = model()
    path = os.path.join(folder, "model.safetensors")
    save_file(values(net, 1), path)
    other = os.path.join(folder, "other.safetensors")
    save_file(values(net, 3), other)
    with open(other, "rb") as f:
        data = f.read()
    fastreload.reload_layerwise(net, path)
    time.sleep(0.05)  # past the file system's timestamp granularity
    try:
        fastreload.reload_layerwise(net, path, rename=rewrite_once(path, data))
    except SafetensorsError as error:
        return {"raised": type(error).__name__, "message": str(error), "file": error.file,
                "written": list(error.written_layers)}
    return {"raised": None}


WRITER = """
import os, random, sys, time
path, seconds, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
with open(path, "rb") as f:
    data = f.read()
other = open(sys.argv[4], "rb").read() if len(sys.argv) > 4 else data
rng = random.Random(0)
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    if mode == "truncate":
        os.truncate(path, rng.randrange(len(data)))
        time.sleep(rng.random() * 0.002)
        with open(path, "r+b") as f:
            f.write(data)
    else:
        with open(path, "r+b") as f:
            f.write(other if rng.random() < 0.5 else data)
    time.sleep(rng.random() * 0.002)
with open(path, "wb") as f:
    f.write(data)
"""


def race(folder, seconds, mode):
    """Reloads in a loop while another process cuts the file short and restores it
    ("truncate"), or rewrites it in place with other values of the same size
    ("rewrite"). Every reload ends in success or a ReloadError. With "truncate" the
    file only ever holds its own bytes, or fewer: a reload that succeeds must have
    loaded exactly them (lost pages read as zeros must have been reported)."""
    net = model(layers=16, width=512)
    path = os.path.join(folder, "model.safetensors")
    state = values(net, 4)
    save_file(state, path)
    other_state = values(net, 5)
    other = os.path.join(folder, "other.safetensors")
    save_file(other_state, other)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, path, str(seconds), mode, other])
    outcomes = {"ok": 0, "refused": 0, "changed": 0, "cut while copying": 0, "mixed, unseen": 0}
    wrong = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            fastreload.reload_layerwise(net, path)
        except fastreload.ReloadError as error:
            outcomes["changed" if error.written_layers else "refused"] += 1
            outcomes["cut while copying"] += "cut short while it was read" in str(error)
            continue
        outcomes["ok"] += 1
        if mode == "truncate" and not holds(net, state):
            wrong += 1
        elif mode == "rewrite" and not holds(net, state) and not holds(net, other_state):
            outcomes["mixed, unseen"] += 1  # within one tick of the file system's clock
    writer.wait(timeout=30)
    return {**outcomes, "wrong": wrong, "writer": writer.returncode}


def in_subfolder(folder, name):
    os.makedirs(os.path.join(folder, name))
    return os.path.join(folder, name)


def main():
    scenario, folder = sys.argv[1], sys.argv[2]
    if scenario == "deterministic":
        result = {"cut": cut_during_copy(in_subfolder(folder, "cut")),
                  "cut-then-restored": cut_and_reloaded_again(in_subfolder(folder, "restored")),
                  "rewrite": rewrite_during_copy(in_subfolder(folder, "rewrite")),
                  "zero-pages": zero_pages(in_subfolder(folder, "zero-pages"))}
    elif scenario == "cut-after-faulthandler":
        result = cut_during_copy(folder, late_faulthandler=True)
    elif scenario.startswith("foreign"):
        result = foreign_fault(folder, late_faulthandler=scenario.endswith("faulthandler"))
    else:  # races
        seconds = float(sys.argv[3])
        result = {mode: race(in_subfolder(folder, mode), seconds, mode) for mode in ("truncate", "rewrite")}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
