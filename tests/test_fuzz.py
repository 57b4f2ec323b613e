"""Random damage to safetensors files and indexes (tests/fuzz_sources.py, hypothesis),
run in a child process: a crash or a hang there fails this test."""

import json
import os
import signal
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "fuzz_sources.py")


def test_damaged_files_and_indexes_end_in_a_reload_error_and_an_unchanged_model():
    try:
        done = subprocess.run([sys.executable, SCRIPT, "100"], capture_output=True, text=True, timeout=240,
                              env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"the fuzzing hung:\n{(expired.stderr or b'')[-3000:]}")
    if done.returncode < 0:
        pytest.fail(f"the fuzzing crashed with {signal.Signals(-done.returncode).name}:\n{done.stderr[-5000:]}")
    assert done.returncode == 0, done.stderr[-5000:]
    outcomes = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(outcomes) == 6
    # Each property mostly refuses: damage that still leaves a valid file is rare.
    for name, counts in outcomes.items():
        assert counts["refused"] > 0, name
