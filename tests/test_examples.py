"""The examples run and check themselves."""

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_fp8_replay_example_matches_a_freshly_processed_model():
    namespace = runpy.run_path(str(EXAMPLES / "fp8_replay.py"))
    assert namespace["main"]() == 0
