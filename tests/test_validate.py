"""`exporter validate` on a tiny exported artifact: the figures, the budget verdict (exit 4), the
cost-model prediction for other devices, and one-line errors for bad input."""

import json
import math
import shutil
from pathlib import Path

import pytest

from exporter.cli import main
from exporter.validate import EXIT_BUDGET_FAILED

REPO = Path(__file__).resolve().parents[1]
PERFORMANCE = {"ttft_ms", "prefill_ms", "decode_ms_p50", "decode_ms_p95", "peak_rss_mb", "artifact_mb", "prompt_tokens"}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, llama_dir, calib_file):
    out = tmp_path_factory.mktemp("validate") / "tiny"
    assert main(["export", "--model", str(llama_dir), "--calib", str(calib_file), "--calib-samples", "4",
                 "--calib-seq-len", "32", "--ratio", "0.3", "--device", "host", "--out", str(out), "--no-progress"]) == 0
    return out


def validate(capsys, *args):
    code = main(["validate", *map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def strict_profile(tmp_path, decode_ms: str) -> Path:
    text = (REPO / "device_profiles" / "host.toml").read_text().replace("decode_ms_per_token = 50.0",
                                                                          f"decode_ms_per_token = {decode_ms}")
    path = tmp_path / "strict.toml"
    path.write_text(text.replace('name = "host"', 'name = "strict"'))
    return path


def test_json_has_every_figure_and_passes_host_budgets(artifact, calib_file, capsys):
    code, out, err = validate(capsys, artifact, "--text", calib_file, "--windows", "2", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["mode"] == "measured" and result["device"] == "host" and result["passed"] is True
    perf = result["performance"]
    assert PERFORMANCE <= set(perf) and perf["imports_torch"] is False  # RSS of an onnxruntime-only process
    assert 0 < perf["decode_ms_p50"] <= perf["decode_ms_p95"] and perf["new_tokens"] >= 64
    assert 10 < perf["peak_rss_mb"] < 1000 and perf["prompt_tokens"] == 128
    assert math.isclose(perf["artifact_mb"], sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file()) / 1e6)
    cost = result["cost_model"]
    assert cost["ratio"] == pytest.approx(cost["predicted_decode_ms"] / cost["measured_decode_ms_p50"])
    accuracy = result["accuracy"]
    assert 1.0 < accuracy["perplexity"] < 384 and "2 x 256 tokens" in accuracy["perplexity_text"]
    reference = accuracy["reference"]
    assert 0.5 <= reference["greedy_agreement"] <= 1.0 and reference["prompts"] == 3  # 30% removed, trained model
    assert [c["figure"] for c in result["budgets"]] == ["peak RSS", "decode p95", "prefill (128 tokens)"]
    assert all(c["passed"] and c["source"] == "measured" for c in result["budgets"])


def test_budget_below_the_measured_figure_exits_4(artifact, tmp_path, capsys):
    code, out, _ = validate(capsys, artifact, "--device", strict_profile(tmp_path, "0.0001"))
    assert code == EXIT_BUDGET_FAILED
    assert "decode p95" in out and "FAIL" in out and "budgets: 2 passed, 1 failed (decode p95)" in out
    assert "vs PyTorch reference  greedy agreement" in out


def test_other_devices_are_predicted_with_the_cost_model(artifact, tmp_path, capsys):
    copy = Path(shutil.copytree(artifact, tmp_path / "copy"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source_model"]["path"] = str(tmp_path / "gone")  # the manifest is not in its own file table
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, out, _ = validate(capsys, copy, "--device", "raspberry-pi-5", "--json")
    result = json.loads(out)
    assert code == 0 and result["mode"] == "predicted" and result["cost_model"] is None
    assert all(c["source"] == "predicted" for c in result["budgets"])
    assert "not loadable" in result["accuracy"]["reference"]["skipped"]
    # decode: (stored weights - the untied embedding, read one row per token + fp32 KV cache at the
    # prompt of 256 tokens) / (17 GB/s x 0.7); tiny Llama: hidden 64, 2 layers x 2 KV heads x 16 dims.
    config = json.loads((copy / "config.json").read_text())
    weights = (copy / "model.onnx").stat().st_size + (copy / "model.onnx.data").stat().st_size
    read = weights - config["vocab_size"] * 64 * 4 + 2 * 2 * 2 * 16 * 256 * 4
    assert result["performance"]["decode_ms_p95"] == pytest.approx(read / (17.0e9 * 0.7) * 1e3)
    code, out, _ = validate(capsys, copy, "--device", "raspberry-pi-5")
    assert "latency and memory PREDICTED by the cost model" in out


def test_tampered_artifact_is_rejected_naming_the_file(artifact, tmp_path, capsys):
    copy = Path(shutil.copytree(artifact, tmp_path / "copy"))
    weights = copy / "model.onnx.data"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(data)
    before = sorted(p.name for p in copy.iterdir())
    code, out, err = validate(capsys, copy)
    assert code == 2 and out == ""
    assert err.strip() == f"exporter: error: {copy}: model.onnx.data does not match the manifest (size or sha256 differs)"
    assert sorted(p.name for p in copy.iterdir()) == before


@pytest.mark.parametrize("case", ["not-an-artifact", "short-text", "too-few-windows", "missing-text", "unknown-device"])
def test_bad_input_is_one_line(artifact, calib_file, tmp_path, capsys, case):
    short = tmp_path / "short.txt"
    short.write_text("Too short for any window.")
    args, expected = {
        "not-an-artifact": ([tmp_path], "is not an artifact (no manifest.json)"),
        "short-text": ([artifact, "--text", short], "too short for one 256-token window"),
        "too-few-windows": ([artifact, "--text", calib_file, "--windows", "100"], "--windows asks for 100"),
        "missing-text": ([artifact, "--text", tmp_path / "nope.txt"], "text file not found"),
        "unknown-device": ([artifact, "--device", "toaster"], "unknown device 'toaster'"),
    }[case]
    code, out, err = validate(capsys, *args)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and expected in err, err
