"""Artifacts for the ONNX Runtime an app bundles (`--onnxruntime-version`, a profile's runtime.onnxruntime_version):
the writer's lower-opset forms compute what the newest graph computes, the manifest records the oldest release,
what a release cannot run is refused in one line, and an artifact written for 1.20 passes the on-device suite
under onnxruntime 1.20 itself (installed from the package index into the test's own directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporter.cli import main
from exporter.errors import ExporterError, ProfileError
from exporter.graph.onnxruntime_releases import check_release, oldest_release, parse_release

OLD_RELEASE = "1.20.1"  # the wheel the end-to-end test installs; 1.18 needs numpy < 2 beside it
REPO = Path(__file__).resolve().parents[1]


def test_release_names():
    assert parse_release("1.20") == (1, 20) and parse_release("1.22.1") == (1, 22) and parse_release("v1.23") == (1, 23)
    assert parse_release(None) is None
    with pytest.raises(ExporterError, match="oldest supported release is 1.18"):
        parse_release("1.17")
    with pytest.raises(ExporterError, match="expected MAJOR.MINOR"):
        parse_release("latest")


def test_profile_names_its_release(tmp_path):
    from exporter.device.profiles import load_profile

    text = (REPO / "device_profiles" / "raspberry-pi-5.toml").read_text()
    assert "onnxruntime_version" not in text
    good = tmp_path / "pinned.toml"
    good.write_text(text.replace('name = "raspberry-pi-5"', 'name = "pinned"').replace(
        "[runtime]\n", '[runtime]\nonnxruntime_version = "1.20"\n'))
    profile = load_profile(str(good))
    assert profile.runtime.onnxruntime_version == "1.20"
    assert profile.to_dict()["runtime"]["onnxruntime_version"] == "1.20"
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace('"1.20"', '"1.9"'))
    with pytest.raises(ProfileError, match="runtime.onnxruntime_version"):
        load_profile(str(bad))


def _logits(path: Path, dtype) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.array([[5, 17, 33, 2, 9, 40, 11]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros([1, i.shape[1], 0, i.shape[3]], dtype)
    return session.run(["logits"], feeds)[0].astype(np.float32)


def _ops(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


@pytest.mark.parametrize("family,weights,activations", [("llama", "int4", None), ("qwen3", "fp16", None),
                                                        ("qwen3", "int4", "fp16"), ("llama", "fp32", None)])
def test_older_forms_compute_the_same(tmp_path, tiny_models, family, weights, activations):
    """RMSNorm composed of opset-21 operators, and the tied embedding gathered from lm_head's 4-bit blocks with
    standard operators: the same logits as RMSNormalization and GatherBlockQuantized (fp32: bit for bit; the
    tied 4-bit gather dequantizes exactly as MatMulNBits does)."""
    import onnx

    from exporter.graph.writer import write_decoder

    model = tiny_models.load(family)
    if weights == "int4":  # tie lm_head to the embedding, so the int4 graph gathers from lm_head's blocks
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
    newest = write_decoder(model, tmp_path / "newest", weights=weights, activations=activations)
    older = write_decoder(model, tmp_path / "older", weights=weights, activations=activations, onnxruntime=(1, 18))
    proto = onnx.load(str(older), load_external_data=False)
    assert proto.opset_import[0].version == 21 and proto.ir_version == 10 and oldest_release(proto) == "1.18"
    assert oldest_release(onnx.load(str(newest), load_external_data=False)) == "1.23"
    assert "RMSNormalization" in _ops(newest) and not {"RMSNormalization", "GatherBlockQuantized"} & _ops(older)
    if weights == "int4":
        assert "GatherBlockQuantized" in _ops(newest) and "BitShift" in _ops(older)
    dtype = np.float16 if "fp16" in (weights, activations) else np.float32
    a, b = _logits(newest, dtype), _logits(older, dtype)
    tolerance = 0 if dtype == np.float32 else 4e-3 * np.abs(a).max()  # fp16: the composed norm rounds in fp32
    assert np.abs(a - b).max() <= tolerance


def test_what_a_release_cannot_run_is_named():
    from onnx import helper

    def proto(bits: int, opset: int = 21):
        node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", bits=bits,
                                block_size=32, K=64, N=64)
        graph = helper.make_graph([node], "g", [], [])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        return model

    assert oldest_release(proto(4)) == "1.18" and oldest_release(proto(8)) == "1.22"
    gathered = proto(4)
    gathered.graph.node.append(helper.make_node("GatherBlockQuantized", ["d", "i", "s"], ["e"], domain="com.microsoft",
                                                bits=2, block_size=32, gather_axis=0, quantize_axis=1))
    assert oldest_release(gathered) == "1.27"
    windowed = proto(4)
    windowed.graph.node.append(helper.make_node("GroupQueryAttention", ["q"], ["a"], domain="com.microsoft",
                                                num_heads=4, kv_num_heads=2, local_window_size=8))
    assert oldest_release(windowed) == "1.24"
    with pytest.raises(ExporterError, match=r"a sliding-window GroupQueryAttention needs 1\.24"):
        check_release(windowed, (1, 23))
    next(a for a in windowed.graph.node[-1].attribute if a.name == "local_window_size").i = -1  # no window

    assert oldest_release(windowed) == "1.18"
    assert oldest_release(proto(4, opset=22)) == "1.21"
    check_release(proto(8), (1, 22))
    with pytest.raises(ExporterError, match=r"ONNX Runtime 1\.20: 8-bit MatMulNBits needs 1\.22 \(target ONNX Runtime 1\.22 or later\)"):
        check_release(proto(8), (1, 20))


def test_auto_menu_keeps_to_what_the_release_runs():
    from exporter.compress.format_allocation import MENU
    from exporter.pipeline import ExportOptions, runtime_menu

    assert runtime_menu(ExportOptions(device="host")) == MENU
    assert runtime_menu(ExportOptions(device="host", onnxruntime_version="1.22")) == MENU
    older = runtime_menu(ExportOptions(device="host", onnxruntime_version="1.20"))
    assert older and {f.bits for f in older} == {4} and {f.bits for f in MENU} == {4, 8}


def _export(model_dir, calib_file, out, *extra):
    return main(["export", "--device", "raspberry-pi-5", "--model", str(model_dir), "--ratio", "0.2",
                 "--calib", str(calib_file), "--calib-samples", "4", "--calib-seq-len", "32", "--no-correctives",
                 "--out", str(out), "--no-progress", *extra])


def test_bad_targets_fail_in_one_line(tmp_path, capsys, llama_dir, calib_file):
    for extra, message in ((["--onnxruntime-version", "1.17"], "oldest supported release is 1.18"),
                           (["--onnxruntime-version", "one"], "expected MAJOR.MINOR"),
                           (["--weights", "int4", "--error-correction", "16", "--onnxruntime-version", "1.20"],
                            "--error-correction stores its factors as 8-bit MatMulNBits"),
                           (["--weights", "int8", "--onnxruntime-version", "1.21"],
                            "which ONNX Runtime 1.21 does not run (it needs 1.22)"),
                           (["--ort", "--weights", "int4", "--onnxruntime-version", "1.20"],
                            "convert model.onnx with ONNX Runtime 1.20")):
        assert _export(llama_dir, calib_file, tmp_path / "x", *extra) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("exporter:")]
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def old_onnxruntime(tmp_path_factory) -> Path:
    """onnxruntime OLD_RELEASE installed (no dependencies: numpy comes from this environment) into a directory
    of its own, put first on PYTHONPATH by the test."""
    target = tmp_path_factory.mktemp("onnxruntime-old")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                           "--target", str(target), f"onnxruntime=={OLD_RELEASE}"], capture_output=True, text=True)
    if done.returncode != 0:  # an offline machine: say so, with pip's own words
        pytest.skip(f"cannot install onnxruntime {OLD_RELEASE}: {done.stderr.strip().splitlines()[-1:]}")
    return target


def test_artifact_for_an_older_release_runs_on_it(tmp_path, capsys, tiny_models, calib_file, old_onnxruntime):
    """A tied int4 artifact written for 1.20 (auto formats: int4 only there, and the tied embedding gathered
    with standard operators) passes the on-device suite run with onnxruntime 1.20; the newest form of the same
    artifact is refused by that suite's release check."""
    model = tiny_models.load("llama")
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    source = tmp_path / "tied"
    model.save_pretrained(source)
    tiny_models.tokenizer.save_pretrained(source)
    older, newest = tmp_path / "older", tmp_path / "newest"
    assert _export(source, calib_file, older, "--weights", "int4", "--onnxruntime-version", "1.20") == 0
    assert _export(source, calib_file, newest, "--weights", "int4") == 0
    capsys.readouterr()
    onnx_entry = json.loads((older / "manifest.json").read_text())["onnx"]
    assert (onnx_entry["target_onnxruntime"], onnx_entry["oldest_onnxruntime"], onnx_entry["opset"]) == ("1.20", "1.18", 21)
    assert json.loads((newest / "manifest.json").read_text())["onnx"]["oldest_onnxruntime"] == "1.23"

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(old_onnxruntime), os.environ.get("PYTHONPATH", "")])}

    def suite(artifact: Path) -> subprocess.CompletedProcess:
        # -k: the tokenizer readers (onnxruntime-genai bundles its own runtime) are not what this checks
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not tokenizer",
                               str(REPO / "runtime_tests"), "--artifact", str(artifact)],
                              env=env, cwd=tmp_path, capture_output=True, text=True)

    version = subprocess.run([sys.executable, "-c", "import onnxruntime; print(onnxruntime.__version__)"], env=env,
                             capture_output=True, text=True).stdout.strip()
    assert version == OLD_RELEASE
    passed = suite(older)
    assert passed.returncode == 0, passed.stdout[-3000:]
    assert "golden" in passed.stdout or "passed" in passed.stdout
    refused = suite(newest)
    assert refused.returncode != 0 and "older than 1.23" in refused.stdout, refused.stdout[-3000:]
