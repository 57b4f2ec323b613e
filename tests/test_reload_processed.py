"""The processed-reload benchmark runs, checks itself and writes its JSON (tiny config)."""

import json
import runpy
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_reload_processed_benchmark_runs_and_verifies(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports `common` from its directory
    namespace = runpy.run_path(str(BENCHMARKS / "reload_processed.py"))
    out = tmp_path / "out.json"
    returned = namespace["main"](["--layers", "2", "--experts", "4", "--repeats", "1", "--warmup", "0",
                                  "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["verified"] is True and returned["verified"] is True
    assert set(data["results"]) == {"fastreload (first)", "fastreload", "reference (per-tensor)", "limit"}
    for row in data["results"].values():
        assert row["median_s"] > 0 and row["gbps"] > 0
    assert data["processed_units"] == 2
    printed = capsys.readouterr().out
    assert "replay target: >= 2x faster than the per-tensor reference:" in printed
    assert "peak extra <= batch_bytes + largest unit:" in printed


def test_reload_moe_runs_the_processed_variant(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    namespace = runpy.run_path(str(BENCHMARKS / "reload_moe.py"))
    out = tmp_path / "out.json"
    namespace["main"](["--processed", "--layers", "2", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["verified"] is True and data["processed_units"] == 2
