"""`exporter validate` on a tiny exported artifact: the figures, the budget verdict (exit 4), the
cost model (its terms, and its prediction for other devices), ROUGE through ONNX Runtime, the
--report directory, and one-line errors for bad input."""

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from exporter.artifact.manifest import read_manifest
from exporter.cli import main
from exporter.device.cost_model import (
    BYTES_PER_PARAM,
    DECODE_COST_KEYS,
    FACTOR_NODE_US_ESTIMATE,
    NODE_US_ESTIMATE,
    decode_costs,
    decode_terms,
    graph_stats,
    int4_stream_gbs,
    node_params,
    predict,
)
from exporter.device.host_probes import solve_decode_costs
from exporter.device.profiles import load_profile
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
    steps = perf["decode_ms_steps"]  # every step, for plots against the budget
    assert len(steps) == perf["new_tokens"] and all(t > 0 for t in steps)
    assert perf["decode_ms_p50"] == pytest.approx(float(np.percentile(steps, 50)))
    assert perf["decode_ms_p95"] == pytest.approx(float(np.percentile(steps, 95)))
    assert 10 < perf["peak_rss_mb"] < 1000 and perf["prompt_tokens"] == 128
    assert math.isclose(perf["artifact_mb"], sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file()) / 1e6)
    cost, predicted = result["cost_model"], result["predicted"]
    terms = cost["decode_terms"]
    assert cost["predicted_decode_ms"] == pytest.approx(sum(terms.values())) == predicted["decode_ms"]
    assert terms["bandwidth_ms"] > 0 and terms["overhead_ms"] >= 0 and terms["dequant_ms"] == 0  # fp32 weights
    assert predicted["decode_costs_source"].startswith("measured on this machine")
    assert cost["load_factor"] >= 1.0 and cost["predicted_decode_ms_under_load"] == pytest.approx(
        cost["predicted_decode_ms"] * cost["load_factor"])
    assert cost["ratio"] == pytest.approx(cost["predicted_decode_ms_under_load"] / cost["measured_decode_ms_p50"])
    assert cost["ratio_idle_model"] == pytest.approx(cost["predicted_decode_ms"] / cost["measured_decode_ms_p50"])
    assert cost["within_target"] == (abs(cost["ratio"] - 1) <= 0.2)
    accuracy = result["accuracy"]
    assert 1.0 < accuracy["perplexity"] < 384 and "2 x 256 tokens" in accuracy["perplexity_text"]
    reference = accuracy["reference"]
    assert 0.5 <= reference["greedy_agreement"] <= 1.0 and reference["prompts"] == 3  # 30% removed, trained model
    assert [c["figure"] for c in result["budgets"]] == ["peak RSS", "decode p95", "prefill (128 tokens)"]
    assert all(c["passed"] and c["source"] == "measured" for c in result["budgets"])


def test_budget_below_the_measured_figure_exits_4_and_the_report_says_so(artifact, tmp_path, capsys):
    files_before = {p.name: p.stat().st_mtime_ns for p in artifact.iterdir()}
    report = tmp_path / "reports" / "strict"  # created, parents too
    code, out, _ = validate(capsys, artifact, "--device", strict_profile(tmp_path, "0.0001"), "--report", report)
    assert code == EXIT_BUDGET_FAILED
    assert "decode p95" in out and "FAIL" in out and "budgets: 2 passed, 1 failed (decode p95)" in out
    assert "vs PyTorch reference  greedy agreement" in out
    assert "= bandwidth " in out and " + overhead " in out and " + dequant " in out  # the cost model's terms
    markdown = (report / "validation.md").read_text()
    assert "**FAIL**: 2 of 3 budgets pass" in markdown and "![decode latency per step](latency.png)" in markdown
    assert "| decode p95 |" in markdown and "| 0.0001 | ms/token | measured | **FAIL** |" in markdown
    assert "| peak RSS |" in markdown and "| 2048 | MB | measured | pass |" in markdown
    assert (report / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in report.iterdir()) == ["latency.png", "validation.md"]
    assert {p.name: p.stat().st_mtime_ns for p in artifact.iterdir()} == files_before  # the artifact untouched


def test_predicted_report_plots_the_prediction(artifact, tmp_path, capsys):
    code, out, _ = validate(capsys, artifact, "--device", "raspberry-pi-5", "--report", tmp_path / "pi", "--json")
    result = json.loads(out)
    assert code == 0 and result["report"]["plot"] == str(tmp_path / "pi" / "latency.png")
    markdown = (tmp_path / "pi" / "validation.md").read_text()
    assert "**predicted** by the cost model" in markdown and "ESTIMATES" in markdown
    assert "| decode |" in markdown and "| predicted | pass |" in markdown
    assert (tmp_path / "pi" / "latency.png").stat().st_size > 1000


def test_rouge_through_onnx_runtime(artifact, tmp_path, capsys):
    data = tmp_path / "articles.jsonl"
    records = [{"id": str(i), "article": f"The engineer measures the edge device. Then the model exports a report {i}.",
                "highlights": "The engineer measures the device."} for i in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, out, err = validate(capsys, artifact, "--device", "raspberry-pi-5", "--summaries", data,
                              "--summary-examples", "2", "--json")
    assert code == 0, err
    summary = json.loads(out)["accuracy"]["summarization"]
    assert summary["examples"] == 2 and summary["data"] == str(data)  # --summary-examples of the 3
    assert all(isinstance(summary[k], float) and 0.0 <= summary[k] <= 1.0 for k in ("rougeL", "rouge1", "rouge2"))
    assert 0 < summary["mean_generated_tokens"] <= summary["max_new_tokens"] == 96
    assert "reported only" in summary["budget"]
    code, out, _ = validate(capsys, artifact, "--device", "raspberry-pi-5")
    assert "summarization         skipped (no --summaries)" in out


def test_cost_model_terms_grow_with_bytes_nodes_and_quantized_weights():
    costs = {"gemv_bandwidth_gbs": 20.0, "node_us": 1.5, "int4_ns_per_param": 0.01, "int8_ns_per_param": 0.02}
    base = decode_terms(80e6, 400, {"int4": 100_000_000, "int8": 0}, costs)
    assert all(base[k] > 0 for k in ("bandwidth_ms", "overhead_ms", "dequant_ms"))
    assert base["bandwidth_ms"] == pytest.approx(80e6 / 20e9 * 1e3) and base["overhead_ms"] == pytest.approx(0.6)
    assert base["dequant_ms"] == pytest.approx(1.0)
    assert base["decode_ms"] == pytest.approx(base["bandwidth_ms"] + base["overhead_ms"] + base["dequant_ms"])
    more_nodes = decode_terms(80e6, 800, {"int4": 100_000_000, "int8": 0}, costs)
    assert more_nodes["overhead_ms"] == pytest.approx(2 * base["overhead_ms"])
    assert more_nodes["bandwidth_ms"] == base["bandwidth_ms"] and more_nodes["decode_ms"] > base["decode_ms"]
    more_bytes = decode_terms(160e6, 400, {"int4": 100_000_000, "int8": 0}, costs)
    assert more_bytes["bandwidth_ms"] == pytest.approx(2 * base["bandwidth_ms"])
    assert more_bytes["overhead_ms"] == base["overhead_ms"] and more_bytes["decode_ms"] > base["decode_ms"]
    int8 = decode_terms(80e6, 400, {"int4": 0, "int8": 100_000_000}, costs)
    assert int8["dequant_ms"] == pytest.approx(2 * base["dequant_ms"])
    assert decode_terms(80e6, 400, {"int4": 0, "int8": 0}, costs)["dequant_ms"] == 0


def test_bandwidth_figures_give_back_the_chains_they_are_solved_from():
    # Synthetic decode-shaped nodes: 2 us each, fp32 weights read at 15 GB/s, int4 weights read at that
    # rate plus 0.03 ns each of dequantisation the reads do not hide.
    node_s, params = 2e-6, 576 * 1536
    fp32_bytes, int4_bytes = params * 4, int(params * BYTES_PER_PARAM["int4"])
    fp32_s, int4_s = node_s + fp32_bytes / 15e9, node_s + int4_bytes / 15e9 + params * 0.03e-9
    costs = solve_decode_costs(fp32_s, fp32_bytes, int4_s, int4_bytes, params, node_s)
    assert costs == pytest.approx({"gemv_bandwidth_gbs": 15.0, "int4_ns_per_param": 0.03}, rel=1e-3)
    costs.update(node_us=node_s * 1e6, int8_ns_per_param=0.0)
    # the cost model predicts a chain of 100 such int4 nodes as the measured time, term by term
    terms = decode_terms(100 * int4_bytes, 100, {"int4": 100 * params, "int8": 0}, costs)
    assert terms["decode_ms"] == pytest.approx(100 * int4_s * 1e3, rel=1e-3)
    assert terms["overhead_ms"] == pytest.approx(0.2) and terms["dequant_ms"] == pytest.approx(100 * params * 0.03e-6)
    int4_gbs = int4_stream_gbs(costs)  # int4's own effective rate, dequantisation included: below fp32's
    assert int4_gbs == pytest.approx(int4_bytes / (int4_s - node_s) / 1e9, rel=1e-3) and int4_gbs < 15.0
    # int4 streaming faster per byte than fp32 is counted at the fp32 rate: no negative dequantisation
    faster = solve_decode_costs(fp32_s, fp32_bytes, node_s + int4_bytes / 30e9, int4_bytes, params, node_s)
    assert faster["int4_ns_per_param"] == 0 and faster["gemv_bandwidth_gbs"] == pytest.approx(15.0)


def test_decode_budget_is_the_cost_model_solved_for_weight_bytes():
    from exporter.device.cost_model import (
        KV_PASSES,
        PLANNING_NODES_FIXED,
        PLANNING_NODES_PER_LAYER,
        kv_cache_bytes,
        weight_budget,
    )

    config = SimpleNamespace(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    costs = {"gemv_bandwidth_gbs": 10.0, "node_us": 2.0, "int4_ns_per_param": 0.05, "int8_ns_per_param": 0.02,
             "factor_node_us": 4.0}
    profile = SimpleNamespace(
        hardware=SimpleNamespace(memory_bandwidth_gbs=20.0, compute_tflops={"fp32": 1.0}, decode_costs=costs),
        budget=SimpleNamespace(model_ram_mb=4096, decode_ms_per_token=5.0, prefill_ms=1e4, prefill_prompt_tokens=64,
                               max_context=256))
    nodes = PLANNING_NODES_PER_LAYER * 4 + PLANNING_NODES_FIXED
    for precision, activations, kv_elem in (("fp32", None, 4), ("fp16", None, 2), ("int8", None, 4),
                                            ("int4", None, 4), ("int4", "fp16", 2)):
        budget = weight_budget(profile, config, precision, activations)
        assert budget.kv_cache_bytes == kv_cache_bytes(config, 256, kv_elem)
        assert budget.binding == "decode latency"
        weights = budget.latency_bytes
        params = weights / BYTES_PER_PARAM[precision]
        quantized = {"int4": params if precision == "int4" else 0, "int8": params if precision == "int8" else 0}
        kv = KV_PASSES * kv_cache_bytes(config, 64, kv_elem)
        # a model of exactly that many weight bytes is predicted to decode in the budget
        assert decode_terms(weights + kv, nodes, quantized, costs)["decode_ms"] == pytest.approx(5.0)
    # int4 weights stream slower per byte (dequantisation) but hold 7x the parameters per byte
    fp32, int4 = weight_budget(profile, config, "fp32"), weight_budget(profile, config, "int4")
    assert int4.latency_bytes < fp32.latency_bytes
    assert int4.latency_bytes / BYTES_PER_PARAM["int4"] > fp32.latency_bytes / BYTES_PER_PARAM["fp32"]
    # a budget the graph's nodes alone exceed allows no weights
    profile.budget.decode_ms_per_token = nodes * 2.0 / 1e3 * 0.9
    assert weight_budget(profile, config, "fp32").latency_bytes == 0


def test_host_decode_costs_are_measured_and_other_devices_estimated():
    costs, source = decode_costs(load_profile("host"))
    assert set(costs) == set(DECODE_COST_KEYS) and source.startswith("measured on this machine")
    assert costs["gemv_bandwidth_gbs"] > 0 and costs["node_us"] >= 0
    assert costs["int4_ns_per_param"] >= 0 and costs["int8_ns_per_param"] >= 0
    assert costs["factor_node_us"] >= costs["node_us"]  # a cold factor node costs at least a warm one
    jetson = load_profile("jetson-orin-nano-8gb")
    costs, source = decode_costs(jetson)
    assert source.startswith("ESTIMATES") and costs["node_us"] == NODE_US_ESTIMATE["CUDAExecutionProvider"]
    assert costs["gemv_bandwidth_gbs"] == pytest.approx(jetson.hardware.memory_bandwidth_gbs * 0.7)
    assert costs["factor_node_us"] == FACTOR_NODE_US_ESTIMATE["CUDAExecutionProvider"]


def test_node_price_is_the_weights_that_stream_in_a_factor_nodes_time():
    """node_params: factor_node_us at the precision's stream rate, in weights; int4 weights are smaller,
    so one node is worth more of them than of fp32 ones."""
    costs = {"gemv_bandwidth_gbs": 20.0, "node_us": 1.0, "int4_ns_per_param": 0.0, "int8_ns_per_param": 0.0,
             "factor_node_us": 4.0}
    assert node_params(costs, "fp32") == pytest.approx(4e-6 * 20e9 / 4.0)  # 20,000 fp32 weights
    assert node_params(costs, "int4") == pytest.approx(4e-6 * 20e9 / BYTES_PER_PARAM["int4"])
    slower = {**costs, "int4_ns_per_param": 0.05}  # dequantisation slows int4's stream: fewer per node
    assert node_params(slower, "int4") < node_params(costs, "int4")


def test_graph_stats_count_nodes_and_int4_weights(llama_dir, calib_file, tmp_path):
    import onnx

    out = tmp_path / "int4"
    assert main(["export", "--model", str(llama_dir), "--calib", str(calib_file), "--calib-samples", "4",
                 "--calib-seq-len", "32", "--ratio", "0.3", "--device", "host", "--weights", "int4", "--levels", "1.0",
                 "--no-correctives", "--out", str(out), "--no-progress"]) == 0
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    stats = graph_stats(out / "model.onnx")
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert stats["nodes"] == len(graph.node) and nbits
    expected = sum({a.name: a.i for a in n.attribute}["K"] * {a.name: a.i for a in n.attribute}["N"] for n in nbits)
    assert stats["quantized_params"] == {"int4": expected, "int8": 0}
    manifest = read_manifest(out)
    profile = SimpleNamespace(hardware=SimpleNamespace(
        memory_bandwidth_gbs=10.0, compute_tflops={"fp32": 0.1},
        decode_costs={"gemv_bandwidth_gbs": 10.0, "node_us": 2.0, "int4_ns_per_param": 0.05, "int8_ns_per_param": 0.0,
                      "factor_node_us": 4.0}),
        budget=SimpleNamespace(max_context=256))
    predicted = predict(out, manifest, profile, 16)
    terms = predicted["decode_terms"]
    assert terms["overhead_ms"] == pytest.approx(len(graph.node) * 2.0 / 1e3)
    assert terms["dequant_ms"] == pytest.approx(expected * 0.05 / 1e6) and terms["dequant_ms"] > 0
    assert predicted["decode_ms"] == pytest.approx(sum(terms.values()))


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
    # prompt of 256 tokens, moved 5 times) / (17 GB/s x 0.7) + every graph node x the CPU provider's
    # estimated cost;
    # tiny Llama: hidden 64, 2 layers x 2 KV heads x 16 dims; fp32, so nothing to dequantize.
    import onnx

    config = json.loads((copy / "config.json").read_text())
    weights = (copy / "model.onnx").stat().st_size + (copy / "model.onnx.data").stat().st_size
    read = weights - config["vocab_size"] * 64 * 4 + 5 * 2 * 2 * 2 * 16 * 256 * 4
    nodes = len(onnx.load(str(copy / "model.onnx"), load_external_data=False).graph.node)
    expected = read / (17.0e9 * 0.7) * 1e3 + nodes * NODE_US_ESTIMATE["CPUExecutionProvider"] / 1e3
    assert result["performance"]["decode_ms_p95"] == pytest.approx(expected)
    assert result["predicted"]["graph_nodes"] == nodes > 10
    assert result["predicted"]["decode_costs_source"].startswith("ESTIMATES")
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


def test_a_manifest_missing_a_key_is_one_line_naming_it(artifact, tmp_path, capsys):
    copy = Path(shutil.copytree(artifact, tmp_path / "copy"))
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["onnx"]["file"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = validate(capsys, copy)
    assert code == 2 and out == ""
    assert err.strip() == f"exporter: error: {copy / 'manifest.json'}: missing key 'onnx.file'"


@pytest.mark.parametrize("case", ["not-an-artifact", "short-text", "too-few-windows", "missing-text", "unknown-device",
                                  "missing-summaries", "bad-summaries", "report-in-artifact", "report-is-a-file"])
def test_bad_input_is_one_line(artifact, calib_file, tmp_path, capsys, case):
    short = tmp_path / "short.txt"
    short.write_text("Too short for any window.")
    args, expected = {
        "not-an-artifact": ([tmp_path], "is not an artifact (no manifest.json)"),
        "short-text": ([artifact, "--text", short], "too short for one 256-token window"),
        "too-few-windows": ([artifact, "--text", calib_file, "--windows", "100"], "--windows asks for 100"),
        "missing-text": ([artifact, "--text", tmp_path / "nope.txt"], "text file not found"),
        "unknown-device": ([artifact, "--device", "toaster"], "unknown device 'toaster'"),
        "missing-summaries": ([artifact, "--summaries", tmp_path / "nope.jsonl"], "data file not found"),
        "bad-summaries": ([artifact, "--summaries", short], "not valid JSON"),
        "report-in-artifact": ([artifact, "--report", artifact / "validation"], "is inside the artifact"),
        "report-is-a-file": ([artifact, "--report", short], "exists and is not a directory"),
    }[case]
    code, out, err = validate(capsys, *args)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and expected in err, err
    assert not (artifact / "validation").exists()


def test_graph_stats_read_the_kv_cache_type_and_untied_embedding(tmp_path, tiny_models):
    from exporter.graph.writer import write_decoder

    llama_model = tiny_models.load("llama")  # untied embedding
    fp32 = graph_stats(write_decoder(llama_model, tmp_path / "fp32"))
    fp16 = graph_stats(write_decoder(llama_model, tmp_path / "fp16", weights="fp16"))
    assert fp32["kv_bytes_per_elem"] == 4.0 and fp16["kv_bytes_per_elem"] == 2.0
    config = llama_model.config
    assert fp32["embedding_bytes"] == config.vocab_size * config.hidden_size * 4
    assert fp16["embedding_bytes"] == fp32["embedding_bytes"] / 2
