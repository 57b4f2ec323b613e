"""benchmarks/reload_moe.py still runs, for every preset, and checks what it times.

Tiny scales and depths, one round: a smoke test of the script and of its correctness
check (verify() exits with CORRECTNESS FAILURE on a wrong copy), not a measurement.
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import reload_moe  # noqa: E402
from presets import PRESETS  # noqa: E402

QUICK = ["--scale", "1/256", "--repeats", "1", "--warmup", "0", "--shards", "2"]
# Deep enough to reach every kind of layer: DeepSeek-V3's first MoE layer is its 4th,
# Nemotron-H's first attention layer its 6th.
LAYERS = {"deepseek-v3": 4, "deepseek-v3-fp8": 4, "nemotron-h": 6}


def expected_rows() -> set[str]:
    rows = {reload_moe.FIRST, reload_moe.MAPPING, reload_moe.STREAM, reload_moe.BASELINE,
            reload_moe.COPY_LOOP, reload_moe.FOREACH, reload_moe.LIMIT}
    if reload_moe.save_file is not None:
        rows |= {reload_moe.SAFETENSORS, reload_moe.LOAD_FILE}
    return rows


def run(tmp_path, preset: str, *extra: str) -> dict:
    out = tmp_path / f"{preset}.json"
    reload_moe.main(["--preset", preset, "--layers", str(LAYERS.get(preset, 2)), *QUICK,
                     "--json", str(out), *extra])
    return json.loads(out.read_text())


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_and_verifies(tmp_path, preset):
    record = run(tmp_path, preset)
    assert record["preset"] == preset
    assert set(record["results"]) == expected_rows()
    for name, row in record["results"].items():
        assert row["median_s"] > 0, name
        assert row["overhead_us_per_tensor"] is not None, name
    assert record["overhead_model"]["tensors"] == record["tensors"]
    assert "the shuffled stream" in record["verified"]
    assert {"cpu", "threads", "torch"} <= record["machine"].keys()
    assert record["targets"]["repeated"].keys() == {"pct_of_limit", "speedup_vs_load_state_dict",
                                                  "overhead_us_per_tensor"}


def test_nemotron_h_checks_its_alias_buffers(tmp_path):
    record = run(tmp_path, "nemotron-h")
    mamba_layers = PRESETS["nemotron-h"].arch.pattern[:LAYERS["nemotron-h"]].count("M")
    assert record["alias_buffers"] == mamba_layers > 0


def test_fp8_preset_converts_from_another_source_dtype(tmp_path):
    # fp32 sources into fp8 weights and bf16 tensors; the fp32 block scales stay fp32.
    record = run(tmp_path, "deepseek-v3-fp8", "--source-dtype", "fp32")
    assert record["config"]["source_dtype"] == "fp32"
    assert record["results"][reload_moe.LIMIT]["tensors"] == 3  # fp32 -> fp8, fp32 -> bf16, fp32 -> fp32


def test_tied_embeddings(tmp_path):
    record = run(tmp_path, "qwen3-30b-a3b", "--tie-embeddings")
    assert record["config"]["tie_embeddings"]


def test_plot_writes_a_png_of_a_depth_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    png, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    reload_moe.main(["--preset", "mixtral-8x7b", "--layers", "8", *QUICK,
                     "--plot", str(png), "--json", str(out)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = json.loads(out.read_text())["sweep"]
    assert [p["layers"] for p in sweep] == [1, 2, 4, 8]
    assert all(expected_rows() <= p["results"].keys() for p in sweep)


def test_scale_and_layers_are_checked():
    with pytest.raises(SystemExit):
        reload_moe.parse_args(["--preset", "mixtral-8x7b", "--layers", "33"])
    with pytest.raises(SystemExit):
        reload_moe.parse_args(["--scale", "0"])
    cfg, _, _ = reload_moe.parse_args(["--scale", "1/8", "--hidden", "64"])
    assert cfg.arch().hidden == 64 and cfg.arch().moe_intermediate == 96


def test_verify_catches_a_wrong_value_and_a_detached_alias(tmp_path):
    cfg = reload_moe.Config(preset="nemotron-h", scale=1 / 256, layers=2)
    bench = reload_moe.prepare(cfg, cfg.arch(), str(tmp_path))
    reload_moe.verify(bench, cfg)

    name, tensor, _ = bench.targets[-1]

    def reload_then_spoil():
        report = reload_moe.fastreload.reload_layerwise(bench.model, bench.source)
        tensor.data.view(-1)[0] = 1234
        return report
    with pytest.raises(SystemExit, match=f"{name}: values differ"):
        reload_moe.verify(bench, cfg, reload=reload_then_spoil)

    mixer = bench.model.backbone.layers[0].mixer
    mixer.conv_weights = mixer.conv_weights.clone()  # a copy of its own, as a buggy reload leaves it
    with pytest.raises(SystemExit, match="conv_weights: no longer a view"):
        reload_moe.verify(bench, cfg)


def test_overhead_tool_runs():
    import overhead

    result = overhead.main(["--layers", "2", "--rounds", "2"])
    assert set(result) == {"warm", "elsewhere", "cold", "cold fetch", "cold bound", "cold new"}
    assert all(value > 0 for value in result.values())


def test_transformers_row_runs_and_verifies(tmp_path):
    """reload_moe.py --transformers: a real Qwen3MoeForCausalLM reloaded from
    Hub-format shards, checked against from_pretrained (a smoke test, not a measurement)."""
    pytest.importorskip("transformers")
    out = tmp_path / "hf.json"
    reload_moe.main(["--transformers", "--scale", "0.0078125", "--layers", "2", "--repeats", "1",
                     "--warmup", "0", "--pairs", "2", "--json", str(out)])
    record = json.loads(out.read_text())
    assert record["regions"] == 2 * 128 * 3
    assert set(record["medians"]) == {"fastreload (Hub-format shards)", "fastreload (own-format shards)",
                                      "from_pretrained (Hub-format shards)", "fastreload (Hub-format stream)",
                                      "fastreload (own-format stream)"}
    assert [len(s) for s in record["paired_samples"].values()] == [2, 2]
