"""scripts/gpu-check where there is no GPU: it says so and stops, and its dry run lists
steps whose commands the benchmarks accept."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "scripts" / "gpu-check"

sys.path.insert(0, str(ROOT / "benchmarks"))

import batched_copy  # noqa: E402
import reload_moe  # noqa: E402


def gpu_check(*args: str, path_first: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if path_first is not None:
        env["PATH"] = f"{path_first}{os.pathsep}{env['PATH']}"
    return subprocess.run([sys.executable, str(GPU_CHECK), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_without_a_gpu_it_says_so_and_builds_nothing(tmp_path):
    # A driver that finds no device, as nvidia-smi reports it on a machine without one.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    smi.chmod(0o755)
    out = tmp_path / "out"
    done = gpu_check(str(out), path_first=bin_dir)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no GPU found" in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["error"] == "no GPU" and summary["steps"] == []


def test_dry_run_lists_every_step_with_commands_the_benchmarks_accept(tmp_path):
    out = tmp_path / "out"
    done = gpu_check("--dry-run", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert {"build", "test_cuda", "test_ops_cuda", "batched_copy", "batched_copy_pageable",
            "reload_moe"} <= steps.keys()
    assert all(s["status"] == "not run (dry run)" for s in summary["steps"])
    assert summary["failed"] == []
    assert summary["deadline_s"] <= 8 * 60
    assert sum(s["limit_s"] for n, s in steps.items() if n != "environment") <= 8 * 60
    parsers = {"benchmarks/batched_copy.py": batched_copy.parse_args,
               "benchmarks/reload_moe.py": reload_moe.parse_args}
    for name in ("batched_copy", "batched_copy_pageable", "reload_moe"):
        script, *args = steps[name]["command"][1:]
        assert args[args.index("--device") + 1] == "cuda", name
        # Parsed as on a CPU (the parsers refuse a device torch cannot reach): every
        # option and value is one the benchmark knows.
        cfg = parsers[script](["cpu" if arg == "cuda" else arg for arg in args])[0]
        assert cfg.repeats == 5, name
    command = steps["test_ops_cuda"]["command"]
    assert "tests/test_ops.py" in command and command[command.index("-k") + 1] == "cuda"


@pytest.mark.parametrize("args", [[], ["--bogus", "x"]])
def test_it_needs_an_outdir(args):
    done = gpu_check(*args)
    assert done.returncode == 2 and "usage" in done.stderr
