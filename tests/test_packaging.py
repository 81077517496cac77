"""`exporter export --ort`: model.ort (ONNX Runtime's own ORT-format converter) in the artifact, listed in the
manifest with its sha256, loading in an InferenceSession and giving the .onnx's logits; its failures."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime.tools.convert_onnx_models_to_ort",
                    reason="this onnxruntime has no ORT-format converter (onnxruntime.tools)")

from exporter.cli import main  # noqa: E402
from exporter.errors import ExporterError  # noqa: E402
from exporter.graph import ort_format as packaging  # noqa: E402
from exporter.graph.ort_format import compare_logits, convert_to_ort  # noqa: E402
from exporter.runtime.generation import OrtDecoder  # noqa: E402

PROMPT = "The engineer explains the last question with great care. Then a small robot"


def export(out, model, calib, *extra) -> int:
    return main(["export", "--model", str(model), "--calib", str(calib), "--calib-samples", "4", "--calib-seq-len",
                 "32", "--out", str(out), "--device", "host", "--no-progress", "--ort", *extra])


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, llama_dir, calib_file):
    """fp32, 30% removed, with the default rank levels (only the full level is converted)."""
    out = tmp_path_factory.mktemp("ort") / "fp32"
    assert export(out, llama_dir, calib_file, "--ratio", "0.3") == 0
    return out


@pytest.fixture(scope="module")
def int4(tmp_path_factory, qwen3_dir, calib_file):
    """int4 (MatMulNBits) of the tiny Qwen3 (per-head q/k norms), dense: the contrib ops the converter must keep."""
    out = tmp_path_factory.mktemp("ort") / "int4"
    assert export(out, qwen3_dir, calib_file, "--ratio", "0", "--weights", "int4") == 0
    return out


def prompt_ids(tokenizer) -> list[int]:
    return tokenizer(PROMPT, add_special_tokens=False)["input_ids"]


def logits_of(path, ids, steps: int = 3):
    """Prefill and `steps` greedy steps through the KV cache: every logit row, concatenated."""
    decoder = OrtDecoder(path, threads=1)
    cache, feed, rows = decoder.empty_cache(1), np.array([ids], dtype=np.int64), []
    for _ in range(steps + 1):
        logits, cache = decoder.step(feed, cache)
        rows.append(logits[0])
        feed = np.array([[int(np.argmax(logits[0, -1]))]], dtype=np.int64)
    return np.concatenate(rows)


@pytest.mark.parametrize("which", ["fp32", "int4"])
def test_model_ort_is_listed_in_the_manifest(request, which):
    out = request.getfixturevalue(which)
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["ort_format"]
    assert entry["file"] == "model.ort" and entry["source"] == "model.onnx"
    for name in ("model.ort", "model.required_operators.config", "model.onnx"):
        data = (out / name).read_bytes()
        assert manifest["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert entry["bytes"] == (out / "model.ort").stat().st_size
    assert (out / "model.ort").read_bytes()[4:8] == b"ORTM"  # the ORT format's flatbuffer identifier
    assert entry["check"]["passed"] and entry["check"]["max_abs_logit_diff"] <= entry["check"]["atol"]
    assert not any(p.name.startswith(".ort-") for p in out.iterdir())  # the converter's temp dir is gone
    config = (out / "model.required_operators.config").read_text()
    assert "/tmp" not in config and ".ort-" not in config
    assert "ort format" in manifest["timings_s"]
    from exporter.artifact.manifest import read_manifest
    from exporter.validate import verify_files

    typed = read_manifest(out)
    verify_files(out, typed)
    # the typed manifest writes back what was read: ort_format, and int4's block_size and accuracy_level
    assert json.dumps(typed.to_dict(), indent=2) + "\n" == (out / "manifest.json").read_text()
    assert typed.ort_format.file == "model.ort" and (typed.onnx.block_size is None) == (which == "fp32")


def test_fp32_logits_equal_the_onnx_ones(fp32, tokenizer):
    ids = prompt_ids(tokenizer)
    reference, converted = logits_of(fp32 / "model.onnx", ids), logits_of(fp32 / "model.ort", ids)
    assert reference.shape == converted.shape and reference.shape[0] == len(ids) + 3
    np.testing.assert_allclose(converted, reference, atol=1e-5, rtol=0)
    manifest = json.loads((fp32 / "manifest.json").read_text())
    assert manifest["ort_format"]["not_converted"]["files"] == ["model.r85.onnx", "model.r70.onnx"]
    assert any("GroupQueryAttention" in line for line in manifest["ort_format"]["operators"])


def test_int4_keeps_matmulnbits_and_equal_logits(int4, tokenizer):
    ids = prompt_ids(tokenizer)
    np.testing.assert_allclose(logits_of(int4 / "model.ort", ids), logits_of(int4 / "model.onnx", ids), atol=1e-5,
                               rtol=0)
    operators = json.loads((int4 / "manifest.json").read_text())["ort_format"]["operators"]
    contrib = next(line for line in operators if line.startswith("com.microsoft;"))
    assert "MatMulNBits" in contrib and "GroupQueryAttention" in contrib and "SkipSimplifiedLayerNormalization" in contrib
    assert "not_converted" not in json.loads((int4 / "manifest.json").read_text())["ort_format"]


def test_report_mentions_the_ort_file(fp32):
    page = (fp32 / "report.html").read_text()
    assert "model.ort" in page and "ORT format" in page


def test_check_fails_on_a_different_graph(fp32, tokenizer):
    """The logit comparison can fail: the r70 level is a different model than the full one."""
    check = compare_logits(fp32 / "model.onnx", fp32 / "model.r70.onnx", prompt_ids(tokenizer))
    assert not check["passed"] and check["max_abs_logit_diff"] > check["atol"]


def test_too_large_for_the_ort_format_is_refused_with_the_figures(fp32, tmp_path, monkeypatch):
    monkeypatch.setattr(packaging, "ORT_FORMAT_LIMIT_BYTES", 100_000)
    monkeypatch.setattr(packaging, "ORT_FORMAT_MARGIN_BYTES", 0)
    work = tmp_path / "work"
    work.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(fp32 / name, work / name)
    with pytest.raises(ExporterError, match=r"GiB.*one flatbuffer.*2 GiB.*--weights int4"):
        convert_to_ort(work / "model.onnx", work)
    assert sorted(p.name for p in work.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_conversion_failure_is_one_error_and_leaves_no_artifact(tmp_path, llama_dir, calib_file, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : simulated")

    monkeypatch.setattr(packaging, "converter", lambda: (broken, type("S", (), {"Fixed": 0})))
    out = tmp_path / "art"
    code = export(out, llama_dir, calib_file, "--ratio", "0", "--levels", "1.0")
    assert code == 2 and not out.exists() and list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert "could not convert model.onnx to the ORT format" in err and "simulated" in err and "Traceback" not in err


def test_logit_mismatch_fails_the_export_with_exit_3(tmp_path, llama_dir, calib_file, capsys, monkeypatch):
    real = packaging.compare_logits

    def off_by_one(onnx_path, ort_path, prompt_ids, steps=packaging.ORT_CHECK_STEPS):
        check = real(onnx_path, onnx_path.parent / "model.onnx", prompt_ids, steps)
        return {**check, "max_abs_logit_diff": 1.0, "passed": False}

    monkeypatch.setattr(packaging, "compare_logits", off_by_one)
    out = tmp_path / "art"
    assert export(out, llama_dir, calib_file, "--ratio", "0", "--levels", "1.0") == 3
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "model.ort and model.onnx disagree" in capsys.readouterr().err


def test_without_ort_no_ort_file(tmp_path, llama_dir, calib_file):
    out = tmp_path / "plain"
    args = ["export", "--model", str(llama_dir), "--calib", str(calib_file), "--calib-samples", "4",
            "--calib-seq-len", "32", "--out", str(out), "--device", "host", "--no-progress", "--ratio", "0",
            "--levels", "1.0"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert "ort_format" not in manifest and not (out / "model.ort").exists()


def test_onnxruntime_genai_loads_model_ort(fp32):
    """onnxruntime-genai reads model.ort when its config names it (an overlay: genai_config.json stays as written,
    so the manifest's checksums hold), and generates what it generates from model.onnx."""
    og = pytest.importorskip("onnxruntime_genai")

    def tokens(overlay: bool) -> list[int]:
        config = og.Config(str(fp32))
        if overlay:
            config.overlay(json.dumps({"model": {"decoder": {"filename": "model.ort"}}}))
        model = og.Model(config)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=24, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens([5, 6, 7, 8, 9, 10])
        while not generator.is_done():
            generator.generate_next_token()
        return [int(t) for t in generator.get_sequence(0)]

    from_onnx = tokens(False)
    assert len(from_onnx) == 24 and tokens(True) == from_onnx
