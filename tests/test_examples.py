"""The examples run and check themselves."""

import runpy
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_fp8_replay_example_matches_a_freshly_processed_model():
    namespace = runpy.run_path(str(EXAMPLES / "fp8_replay.py"))
    assert namespace["main"]() == 0


def test_rl_weight_sync_example_workers_match_the_trainer_after_every_sync():
    # Its processes are spawned: it runs as a script, as a user runs it.
    done = subprocess.run([sys.executable, str(EXAMPLES / "rl_weight_sync.py")], capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "logits equalled the trainer's after each of the 4 syncs" in done.stdout
