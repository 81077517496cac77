"""manifest.json through exporter.artifact.manifest: the typed Manifest gives back exactly the JSON the exporter
writes (key order, keys written only sometimes, a newer writer's keys), a missing key is one line naming it, and
the file table lists every other file. A real export's manifest is read back byte for byte in test_report.py
(and with --ort and int4 in test_packaging.py)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from exporter.artifact.manifest import (
    MANIFEST,
    Level,
    Manifest,
    Method,
    OnnxGraph,
    OrtFormat,
    Parameters,
    RankEntry,
    ScheduleEntry,
    SourceModel,
    read_manifest,
    write_manifest,
)
from exporter.errors import ExporterError

Q_PROJ = "model.layers.0.self_attn.q_proj"


def int4_manifest() -> dict:
    """What run_export writes for an int4 export with rank levels and --ort, before the file table."""
    parity = {"prompt_tokens": 34, "decode_steps": 16, "max_abs_logit_diff": 0.004, "greedy_agreement": 1.0,
              "atol": 0.01, "min_agreement": 0.9, "passed": True}
    return {
        "format_version": 1,
        "exporter_version": "0.1.0",
        "source_model": {"name": "tiny", "path": "/models/tiny", "architecture": "LlamaForCausalLM",
                         "model_type": "llama"},
        "profile": {"name": "host", "description": "this machine", "aliases": [], "measured": True,
                    "hardware": {"memory_bandwidth_gbs": 20.0, "compute_tflops": {"fp32": 0.5}},
                    "runtime": {"execution_providers": ["CPUExecutionProvider"], "weight_precision": "int4"},
                    "budget": {"model_ram_mb": 300.0, "decode_ms_per_token": 50.0, "prefill_ms": 1000.0,
                               "prefill_prompt_tokens": 256, "max_context": 512},
                    "path": "device_profiles/host.toml"},
        "method": {"factorization": "whitened-svd", "allocation": "fisher", "budget_source": "--ratio 0.3",
                   "projection_params_target": 70000, "rank_multiple": 32,
                   "allocation_details": {"projection_params": 69888, "budget_params": 70000,
                                          "predicted_loss_increase": 0.012, "seconds": 0.02, "factorized": 9},
                   "allocation_curve": {"rank_multiple": 32, "seconds": 0.1, "points": [
                       {"target_fraction_removed": 0.0, "fraction_removed": 0.0, "projection_params": 100000,
                        "predicted_loss_increase": 0.0}]},
                   "calibration": "calib.txt (4 x 32 tokens, seed 0)", "seed": 0,
                   "correctives": {"rank": 8, "epochs": 2, "lr": 0.001, "kl_steps": 10, "kl_lr": 0.001,
                                   "tune_factors": False, "form": "folded", "quantization_aware": True}},
        "precision": "int4",
        "budget": {"ram_bytes": 1.5e8, "latency_bytes": 9.0e7, "prefill_bytes": 2.0e8, "precision": "int4",
                   "kv_cache_bytes": 1.0e6, "bytes": 9.0e7, "binding": "decode latency"},
        "parameters": {"total_params_dense": 150000, "total_params": 120000, "projection_params_dense": 100000,
                       "projection_params": 70000, "projection_fraction_removed": 0.3, "total_fraction_removed": 0.2},
        "ranks": {Q_PROJ: {"rank": 32, "corrective_rank": 8, "out": 64, "in": 64},
                  "model.layers.0.self_attn.k_proj": {"rank": None, "corrective_rank": 0, "out": 32, "in": 64}},
        "onnx": {"file": "model.onnx", "task": "text-generation-with-past", "graph": "fused", "weights": "int4",
                 "activations": "fp32", "block_size": 32, "accuracy_level": 4},
        "levels": [{"name": "r100", "fraction": 1.0, "file": "model.onnx", "rank_multiple": 32,
                    "active_factor_params": 60000, "weight_bytes": 500000, "parity": parity, "nll_increase": 0.0,
                    "nll_increase_by_position": [{"positions": [1, 16], "nll_increase": 0.0}]},
                   {"name": "r85", "fraction": 0.85, "file": "model.r85.onnx", "rank_multiple": 32,
                    "active_factor_params": 51000, "weight_bytes": 450000, "parity": parity, "nll_increase": 0.02,
                    "nll_increase_by_position": [{"positions": [1, 16], "nll_increase": 0.02}]}],
        "schedule": [{"level": "r100", "start": 0}, {"level": "r85", "start": 32}],
        "schedule_derivation": {"source": "calibration", "rule": "...", "horizon_tokens": 256, "tolerance_nats": 1.0,
                                "full_rank_tokens": 32, "calibration": "the last 2 windows", "base_nll": 2.5,
                                "position_buckets": 4, "derived": "r100:0,r85:32"},
        "ort_format": {"file": "model.ort", "source": "model.onnx", "bytes": 600000,
                       "converter": "onnxruntime.tools.convert_onnx_models_to_ort", "onnxruntime": "1.22.0",
                       "optimization": {"style": "Fixed", "level": "all"},
                       "check": {"max_abs_logit_diff": 0.0, "greedy_agreement": 1.0, "atol": 1e-4, "passed": True},
                       "required_operators": "model.required_operators.config", "operators": ["ai.onnx;14;Add"],
                       "not_converted": {"files": ["model.r85.onnx"], "why": "external-data offsets"}},
        "parity": {**parity, "quantized": {**parity, "max_abs_logit_diff": 3.2, "atol": float("inf")}},
        "tokenizer_check": {"texts": 12, "readers": ["tokenizers"], "agreement": 1.0},
        "versions": {"exporter": "0.1.0", "torch": "2.5", "onnx": "1.17", "python": "3.11"},
        "timings_s": {"load": 0.5, "export": 2.1, "parity": 0.4},
    }


def fp32_manifest() -> dict:
    """An fp32 export of one level without --ort: no ort_format, no int4 keys, a bare level entry."""
    manifest = int4_manifest()
    del manifest["ort_format"], manifest["onnx"]["block_size"], manifest["onnx"]["accuracy_level"]
    manifest["onnx"]["weights"] = manifest["precision"] = "fp32"
    manifest["levels"] = [{"name": "r100", "fraction": 1.0, "file": "model.onnx"}]
    manifest["schedule"] = [{"level": "r100", "start": 0}]
    manifest["schedule_derivation"] = {"source": "single level"}
    return manifest


def as_json(data: dict) -> str:
    return json.dumps(data, indent=2)


@pytest.mark.parametrize("make", [int4_manifest, fp32_manifest])
def test_a_written_manifest_reads_back_key_for_key(make):
    data = make()
    manifest = Manifest.from_dict(data)
    assert as_json(manifest.to_dict()) == as_json(data)  # same keys, values and order
    assert not manifest.extra and manifest.levels[0].extra.keys() <= {"nll_increase_by_position"}
    assert manifest.ranks[Q_PROJ].in_features == 64 and manifest.ranks["model.layers.0.self_attn.k_proj"].rank is None
    assert manifest.schedule[-1].start == (32 if make is int4_manifest else 0)


def test_the_typed_fields_say_what_was_written():
    int4, fp32 = Manifest.from_dict(int4_manifest()), Manifest.from_dict(fp32_manifest())
    assert (int4.onnx.block_size, int4.onnx.accuracy_level) == (32, 4)
    assert (fp32.onnx.block_size, fp32.onnx.accuracy_level, fp32.ort_format) == (None, None, None)
    assert int4.ort_format.check["passed"] and int4.ort_format.extra["not_converted"]["files"] == ["model.r85.onnx"]
    assert [level.nll_increase for level in int4.levels] == [0.0, 0.02] and fp32.levels[0].nll_increase is None
    assert int4.method.allocation_details["factorized"] == 9 and int4.parameters.total_params == 120000
    assert int4.files is None  # write_manifest adds the file table


def test_built_as_run_export_builds_it_the_json_is_the_same():
    """The dataclasses declare their fields in the order the exporter writes them."""
    data = int4_manifest()
    m, onnx = data["method"], data["onnx"]
    built = Manifest(
        format_version=1, exporter_version=data["exporter_version"], source_model=SourceModel(**data["source_model"]),
        profile=data["profile"],
        method=Method(factorization=m["factorization"], allocation=m["allocation"], budget_source=m["budget_source"],
                      projection_params_target=m["projection_params_target"], rank_multiple=m["rank_multiple"],
                      allocation_details=m["allocation_details"], allocation_curve=m["allocation_curve"],
                      calibration=m["calibration"], seed=m["seed"], correctives=m["correctives"]),
        precision=data["precision"], budget=data["budget"], parameters=Parameters.from_dict(data["parameters"]),
        ranks={name: RankEntry(rank=e["rank"], corrective_rank=e["corrective_rank"], out_features=e["out"],
                               in_features=e["in"]) for name, e in data["ranks"].items()},
        onnx=OnnxGraph(file=onnx["file"], task=onnx["task"], graph=onnx["graph"], weights=onnx["weights"],
                       activations=onnx["activations"], block_size=onnx["block_size"],
                       accuracy_level=onnx["accuracy_level"]),
        levels=[Level.from_dict(entry) for entry in data["levels"]],
        schedule=[ScheduleEntry(level=e["level"], start=e["start"]) for e in data["schedule"]],
        schedule_derivation=data["schedule_derivation"], ort_format=OrtFormat.from_dict(data["ort_format"]),
        parity=data["parity"], tokenizer_check=data["tokenizer_check"], versions=data["versions"],
        timings_s=data["timings_s"])
    assert as_json(built.to_dict()) == as_json(data)
    fp32 = OnnxGraph(file="model.onnx", task="text-generation-with-past", graph="fused", weights="fp32",
                     activations="fp32", block_size=None, accuracy_level=None)
    assert list(fp32.to_dict()) == ["file", "task", "graph", "weights", "activations"]


def test_a_newer_writers_keys_are_kept_where_they_were():
    data = int4_manifest()
    data = {**{k: v for k, v in data.items() if k != "timings_s"}, "energy": {"joules": 1.5},
            "timings_s": data["timings_s"]}  # a new top-level key before the last one
    data["onnx"] = {"graph_optimization": "all", **data["onnx"]}
    data["ranks"][Q_PROJ]["bits"] = 4
    data["levels"][1]["latency_ms"] = 3.2
    data["ort_format"] = None  # present, null: kept as written
    manifest = Manifest.from_dict(data)
    assert manifest.extra == {"energy": {"joules": 1.5}} and manifest.onnx.extra == {"graph_optimization": "all"}
    assert manifest.ranks[Q_PROJ].extra == {"bits": 4} and manifest.ort_format is None
    assert as_json(manifest.to_dict()) == as_json(data)


@pytest.mark.parametrize("path, expected", [
    (("method", "seed"), "manifest: missing key 'method.seed'"),
    (("parity",), "manifest: missing key 'parity'"),
    (("ranks", Q_PROJ, "in"), f"manifest: missing key \"ranks['{Q_PROJ}'].in\""),
    (("levels", 1, "file"), "manifest: missing key 'levels[1].file'"),
    (("ort_format", "check"), "manifest: missing key 'ort_format.check'"),
])
def test_a_missing_key_is_one_line_naming_it(path, expected):
    data = int4_manifest()
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    with pytest.raises(ExporterError) as caught:
        Manifest.from_dict(data)
    assert str(caught.value) == expected


def test_a_part_of_the_wrong_kind_is_one_line():
    data = int4_manifest()
    data["onnx"] = "model.onnx"
    with pytest.raises(ExporterError, match=r"^manifest: 'onnx' is not a JSON object$"):
        Manifest.from_dict(data)
    data = int4_manifest()
    data["levels"] = {"r100": data["levels"][0]}
    with pytest.raises(ExporterError, match=r"^manifest: 'levels' is not a JSON list$"):
        Manifest.from_dict(data)


def test_written_with_the_file_table_and_read_back(tmp_path):
    (tmp_path / "model.onnx").write_bytes(os.urandom(3000))
    (tmp_path / "tokenizer.json").write_text('{"a": 1}')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "extra.bin").write_bytes(b"")
    data = int4_manifest()
    write_manifest(tmp_path, Manifest.from_dict(data))
    text = (tmp_path / MANIFEST).read_text()
    files = json.loads(text)["files"]
    assert text == json.dumps({**data, "files": files}, indent=2) + "\n"  # the files last, as ever
    assert sorted(files) == ["model.onnx", "sub/extra.bin", "tokenizer.json"]
    for name, entry in files.items():
        data_bytes = (tmp_path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data_bytes).hexdigest(), "bytes": len(data_bytes)}
    manifest = read_manifest(tmp_path)
    assert manifest.files["model.onnx"].bytes == 3000
    assert as_json(manifest.to_dict()) + "\n" == text
    write_manifest(tmp_path, manifest)  # a read manifest's table is replaced, in place
    assert (tmp_path / MANIFEST).read_text() == text


def test_read_manifest_errors(tmp_path):
    with pytest.raises(ExporterError, match="not an artifact"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{broken")
    with pytest.raises(ExporterError, match="not valid JSON"):
        read_manifest(tmp_path)
    data = int4_manifest()
    del data["onnx"]["file"]
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ExporterError) as caught:
        read_manifest(tmp_path)
    assert str(caught.value) == f"{tmp_path / MANIFEST}: missing key 'onnx.file'"
