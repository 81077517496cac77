"""report.html: self-contained (images embedded as PNG data URIs, nothing fetched), with the rank heatmap, the
quality-vs-compression plot, the device budget table with pass/fail, and sizes on disk; written before the
manifest's file table so its checksum is listed."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re

import pytest
from test_allocate import synthetic  # Llama-like projections with decaying random importances

from exporter.artifact.manifest import MANIFEST, Manifest, read_manifest
from exporter.artifact.report import HTML, budget_rows, write_report
from exporter.cli import main
from exporter.compress.allocate import allocate, allocation_curve

PNG = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in DATA_URI.findall(page)]


def outside_images(page: str) -> str:
    return DATA_URI.sub("<img>", page)


def test_allocation_curve_is_the_allocator_at_each_budget():
    projections, scores = synthetic(n_layers=3)
    dense = sum(p.params for p in projections)
    curve = allocation_curve(projections, scores, 16, fractions=(0.0, 0.2, 0.4, 0.6, 0.7, 0.9))
    points = curve["points"]
    assert [p["target_fraction_removed"] for p in points] == [0.0, 0.2, 0.4, 0.6, 0.7]  # 0.9: infeasible (rank 16 everywhere keeps 25%)
    assert points[0]["predicted_loss_increase"] == 0.0 and points[0]["fraction_removed"] == 0.0
    for point in points[1:]:
        expected = allocate(projections, scores, round((1 - point["target_fraction_removed"]) * dense), multiple=16)
        assert point["projection_params"] == expected.projection_params
        assert point["predicted_loss_increase"] == pytest.approx(expected.predicted_loss_increase)
        assert point["fraction_removed"] == pytest.approx(1 - expected.projection_params / dense)
    losses = [p["predicted_loss_increase"] for p in points]
    removed = [p["fraction_removed"] for p in points]
    assert losses == sorted(losses) and removed == sorted(removed) and losses[-1] > losses[1] > 0
    assert curve["rank_multiple"] == 16 and curve["seconds"] < 5


# --------------------------------------------------------------------------- write_report on a hand-made manifest


def fake_manifest(ranks: dict, weights_bytes: int) -> dict:
    mb = 1_000_000
    return {
        "format_version": 1, "exporter_version": "0.test",
        "source_model": {"name": "tiny <model>", "path": "/nowhere", "architecture": "LlamaForCausalLM",
                         "model_type": "llama"},
        "profile": {"name": "board", "description": "a test board", "aliases": [], "measured": False,
                    "hardware": {"memory_gb": 8.0, "memory_bandwidth_gbs": 10.0, "compute_tflops": {"fp32": 1.0},
                                 "sources": {}},
                    "runtime": {"execution_providers": ["CPUExecutionProvider"], "weight_precision": "fp32",
                                "rank_multiple": 16},
                    "budget": {"model_ram_mb": 300.0, "decode_ms_per_token": 5.0, "prefill_ms": 1000.0,
                               "prefill_prompt_tokens": 128, "max_context": 256},
                    "path": "board.toml"},
        "method": {"factorization": "whitened-svd", "allocation": "fisher", "budget_source": "--ratio",
                   "projection_params_target": 1000, "rank_multiple": 16,
                   "allocation_details": {"projection_params": 800, "budget_params": 1000,
                                          "predicted_loss_increase": 0.05, "seconds": 0.01},
                   "allocation_curve": {"rank_multiple": 16, "seconds": 0.01, "points": [
                       {"target_fraction_removed": f, "fraction_removed": f, "projection_params": round((1 - f) * 1000),
                        "predicted_loss_increase": 0.4 * f * f} for f in (0.0, 0.1, 0.2, 0.4)]},
                   "calibration": "calib.txt (4 x 32 tokens, seed 0)", "seed": 0, "correctives": None},
        "precision": "fp32",
        # the RAM budget allows 200 MB of weights, decode 30 MB (binds), prefill 100 MB
        "budget": {"ram_bytes": 200 * mb, "latency_bytes": 30 * mb, "prefill_bytes": 100 * mb, "precision": "fp32",
                   "kv_cache_bytes": 1 * mb, "bytes": 30 * mb, "binding": "decode latency"},
        "parameters": {"total_params_dense": 2000, "total_params": 1800, "projection_params_dense": 1000,
                       "projection_params": 800, "projection_fraction_removed": 0.2, "total_fraction_removed": 0.1},
        "ranks": ranks,
        "onnx": {"file": "model.onnx", "task": "text-generation-with-past", "graph": "fused", "weights": "fp32"},
        "levels": [{"name": "r100", "fraction": 1.0, "file": "model.onnx", "active_factor_params": 600,
                    "weight_bytes": weights_bytes, "nll_increase": 0.0},
                   {"name": "r70", "fraction": 0.7, "file": "model.r70.onnx", "active_factor_params": 420,
                    "weight_bytes": weights_bytes - 1000, "nll_increase": 0.3}],
        "schedule": [{"level": "r100", "start": 0}, {"level": "r70", "start": 90}],
        "schedule_derivation": {"source": "calibration", "base_nll": 2.0, "calibration": "the last 2 windows"},
        "parity": {"prompt_tokens": 34, "decode_steps": 16, "max_abs_logit_diff": 1e-5, "greedy_agreement": 1.0,
                   "atol": 0.01, "passed": True},
        "versions": {}, "timings_s": {"load": 1.0, "export": 2.0},
    }


def tiny_onnx() -> bytes:
    """A valid one-node ONNX graph (the cost model reads the graph's nodes)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph).SerializeToString()


WEIGHTS = 80_000_000  # over the 30 MB decode allowance, under the RAM (200 MB) and prefill (100 MB) ones


@pytest.fixture()
def fake_artifact(tmp_path):
    """A directory whose 'model' takes 80 MB: model.onnx and a sparse model.onnx.data."""
    graph = tiny_onnx()
    (tmp_path / "model.onnx").write_bytes(graph)
    with open(tmp_path / "model.onnx.data", "wb") as handle:
        handle.truncate(WEIGHTS - len(graph))  # sparse: nothing written
    (tmp_path / "config.json").write_text(json.dumps({
        "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "tie_word_embeddings": True}))
    ranks = {f"model.layers.{i}.self_attn.{k}": {"rank": None if k == "k_proj" else 16, "corrective_rank": 0,
                                                 "out": 64, "in": 64}
             for i in range(2) for k in ("q_proj", "k_proj", "v_proj", "o_proj")}
    return tmp_path, Manifest.from_dict(fake_manifest(ranks, WEIGHTS))


def test_html_is_self_contained_with_both_plots(fake_artifact):
    directory, manifest = fake_artifact
    write_report(directory, manifest)
    page = (directory / HTML).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    pngs = images(page)
    assert len(pngs) == 2 and all(p.startswith(PNG) and len(p) > 5000 for p in pngs)
    assert pngs[0] == (directory / "ranks.png").read_bytes()  # the heatmap, embedded
    text = outside_images(page)
    assert page.count("<img") == 2 and "src=" not in text  # every image is a data URI
    for external in ("http://", "https://", "<script", "<link", "url(", "@import", "href="):
        assert external not in text, external
    assert "tiny &lt;model&gt; for board" in text  # escaped
    assert "Quality vs compression" in text and "20.0%" in text and "r70" in text
    assert (directory / "report.md").is_file() and HTML in (directory / "report.md").read_text()


def test_budget_table_marks_the_failing_and_the_binding_budget(fake_artifact):
    directory, manifest = fake_artifact
    sizes = {"model.onnx": 1000, "model.onnx.data": WEIGHTS - 1000, "tokenizer.json": 5}
    rows, note = budget_rows(directory, manifest, sizes)
    assert note is None or "unavailable" not in note
    by_name = {r["budget"].split(" ")[0]: r for r in rows}
    assert set(by_name) == {"RAM", "decode", "prefill"}
    assert all(r["weights_bytes"] == WEIGHTS for r in rows)  # the graph and its data, not the tokenizer
    assert by_name["RAM"]["weights_fit"] and by_name["prefill"]["weights_fit"]
    assert not by_name["decode"]["weights_fit"] and by_name["decode"]["binds"]
    # the cost model reads 80 MB per token: at the profile's full 10 GB/s that alone is 8 ms > 5 ms
    assert by_name["decode"]["predicted"] > 8.0 and by_name["decode"]["predicted_passed"] is False
    assert 80 < by_name["RAM"]["predicted"] < 300 and by_name["RAM"]["predicted_passed"] is True
    for r in rows:
        assert r["predicted_passed"] == (r["predicted"] <= r["limit"])
    write_report(directory, manifest)
    page = outside_images((directory / HTML).read_text())
    table = page[page.index("<h2>Device budget</h2>"):page.index("<h2>Sizes on disk</h2>")]
    decode_row = next(row for row in table.split("<tr>") if row.startswith("<td class=\"binds\">decode"))
    assert decode_row.count('class="fail">FAIL') == 2
    ram_row = next(row for row in table.split("<tr>") if row.startswith("<td>RAM"))
    assert ram_row.count('class="pass">pass') == 2
    assert "model.onnx.data" in page[page.index("<h2>Sizes on disk</h2>"):]


def test_all_budgets_pass_for_a_small_model(fake_artifact):
    directory, manifest = fake_artifact
    (directory / "model.onnx.data").unlink()
    write_report(directory, manifest)
    page = outside_images((directory / HTML).read_text())
    assert "FAIL" not in page and page.count('class="pass">pass') == 6


def test_uniform_allocation_says_why_there_is_no_curve(fake_artifact):
    directory, manifest = fake_artifact
    manifest = copy.deepcopy(manifest)
    manifest.method.allocation, manifest.method.allocation_details, manifest.method.allocation_curve = "uniform", None, None
    manifest.levels = manifest.levels[:1]
    write_report(directory, manifest)
    page = (directory / HTML).read_text()
    assert len(images(page)) == 1 and "No curve" in page


# --------------------------------------------------------------------------- a real export


@pytest.fixture(scope="module")
def exported(tmp_path_factory, llama_dir, calib_file):
    out = tmp_path_factory.mktemp("report") / "art"
    code = main(["export", "--model", str(llama_dir), "--calib", str(calib_file), "--calib-samples", "4",
                 "--calib-seq-len", "32", "--ratio", "0.3", "--out", str(out), "--device", "jetson-orin",
                 "--no-progress"])
    assert code == 0
    return out


def test_export_writes_report_html_listed_in_the_manifest(exported):
    from exporter.validate import verify_files

    manifest = read_manifest(exported)
    entry = manifest.files[HTML]
    data = (exported / HTML).read_bytes()
    assert (entry.sha256, entry.bytes) == (hashlib.sha256(data).hexdigest(), len(data))
    verify_files(exported, manifest)  # the integrity check of validate / runtime_tests passes
    page = data.decode("utf-8")
    assert len(images(page)) == 2 and all(p.startswith(PNG) for p in images(page))
    text = outside_images(page)
    assert "src=" not in text and "http" not in text
    for section in ("Ranks per layer", "Quality vs compression", "Device budget", "Sizes on disk"):
        assert f"<h2>{section}</h2>" in text
    for budget in ("<td>RAM", "decode", "prefill (512 tokens)"):
        assert budget in text
    assert "(binds)" in text and 'class="pass">pass' in text
    assert "unavailable" not in text and "ms/token</td>" in text  # the cost model ran
    assert "model.onnx.data" in text and "tokenizer.json" in text
    assert "fp16 weights, fp16 activations, fused graph" in text  # the Jetson profile's precision
    assert "Weights: fp16, activations fp16." in (exported / "report.md").read_text()


def test_the_manifest_reads_back_as_written(exported):
    """Manifest.from_dict / to_dict give back the exporter's manifest.json byte for byte."""
    text = (exported / MANIFEST).read_text()
    manifest = read_manifest(exported)
    assert json.dumps(manifest.to_dict(), indent=2) + "\n" == text
    assert not manifest.extra and len(manifest.levels) > 1 and manifest.ort_format is None
    assert manifest.onnx.graph == "fused" and manifest.onnx.block_size is None  # fp16: no int4 keys
    assert "block_size" not in json.loads(text)["onnx"]


def test_export_records_the_curve_through_the_chosen_allocation(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    method = manifest["method"]
    points = method["allocation_curve"]["points"]
    assert len(points) >= 3 and points[0]["predicted_loss_increase"] == 0.0
    chosen = method["allocation_details"]
    if method["correctives"] is None:
        # the curve's 30% point is the allocation that was exported (same allocator, importances and budget)
        at_target = next(p for p in points if p["target_fraction_removed"] == 0.3)
        assert at_target["projection_params"] == chosen["projection_params"]
        assert at_target["predicted_loss_increase"] == pytest.approx(chosen["predicted_loss_increase"])
    # whatever paid for the branches, the exported allocation lies on the curve: between its neighbours
    dense = manifest["parameters"]["projection_params_dense"]
    x = 1 - chosen["projection_params"] / dense
    below = max((p for p in points if p["fraction_removed"] <= x + 1e-12), key=lambda p: p["fraction_removed"])
    above = min((p for p in points if p["fraction_removed"] >= x - 1e-12), key=lambda p: p["fraction_removed"])
    assert below["predicted_loss_increase"] - 1e-12 <= chosen["predicted_loss_increase"]
    assert chosen["predicted_loss_increase"] <= above["predicted_loss_increase"] + 1e-12
    assert "Predicted loss increase of the same allocator" in (exported / "report.md").read_text()


def test_a_failing_cost_model_is_reported_not_fatal(fake_artifact):
    directory, manifest = fake_artifact
    (directory / "config.json").unlink()  # the cost model needs it
    write_report(directory, manifest)
    page = outside_images((directory / HTML).read_text())
    assert "Prediction unavailable: FileNotFoundError" in page and "config.json" in page
    table = page[page.index("<h2>Device budget</h2>"):page.index("<h2>Sizes on disk</h2>")]
    assert table.count('class="fail">FAIL') == 1  # the weights still fail the decode allowance


def test_report_shows_where_the_weight_bytes_are(exported):
    """Every initializer byte of model.onnx (its data file and the inline constants) lands in one part."""
    from exporter.artifact.report import PARTS, bytes_by_part

    parts = bytes_by_part(exported / "model.onnx")
    assert set(parts) <= {name for name, _ in PARTS} | {"other"}
    data, graph = (exported / "model.onnx.data").stat().st_size, (exported / "model.onnx").stat().st_size
    assert data <= sum(parts.values()) <= data + graph
    assert min(parts["embedding and lm_head"], parts["attention"], parts["MLP"], parts["rotary tables"]) > 0
    assert parts.get("other", 0) < 0.01 * sum(parts.values())  # the names say where nearly everything goes
    report = (exported / "report.md").read_text()
    assert "## Where the weight bytes are" in report and "| embedding and lm_head |" in report
    assert "<h2>Where the weight bytes are (model.onnx)</h2>" in (exported / HTML).read_text()
