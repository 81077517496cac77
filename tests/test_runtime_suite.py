"""runtime_tests/ (the on-device suite) run in a subprocess against a tiny exported artifact: it
passes on the fresh artifact, and fails where it must: a flipped weight byte or a missing file
(naming it), drifted golden outputs, a latency budget below the measured latency."""

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from exporter.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, llama_dir, calib_file):
    """The tiny Llama, int4 (MatMulNBits, accuracy_level 4), exported for host; dense, since what is
    checked here is the graph on a device, not the compression."""
    out = tmp_path_factory.mktemp("runtime-suite") / "tiny-int4"
    code = main(["export", "--model", str(llama_dir), "--calib", str(calib_file), "--calib-samples", "4",
                 "--calib-seq-len", "32", "--ratio", "0", "--weights", "int4", "--device", "host",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def run_suite(tmp_path, *args):
    """(exit code, output, {test name: passed|failed|skipped}) of `pytest runtime_tests ARGS`."""
    junit = tmp_path / f"junit-{len(list(tmp_path.glob('junit-*')))}.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "runtime_tests", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={junit}", *map(str, args)], cwd=REPO, capture_output=True, text=True)
    outcomes = {}
    if junit.is_file():
        for case in ET.parse(junit).iter("testcase"):
            kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
            outcomes[case.get("name")] = "passed" if not kinds else "skipped" if "skipped" in kinds else "failed"
    return done.returncode, done.stdout + done.stderr, outcomes


def copy_of(artifact, tmp_path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "copy"))


def test_golden_file_is_in_the_manifest(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    golden = json.loads((artifact / "golden.json").read_text())
    assert "golden.json" in manifest["files"]
    assert golden["weights"] == "int4" and golden["accuracy_level"] == 4
    assert len(golden["cases"]) == 3 and golden["tolerance"]["max_abs_logit_diff"] > 0
    for case in golden["cases"]:
        assert len(case["tokens"]) == len(case["top_ids"]) == len(case["top_logits"]) == golden["new_tokens"]
        assert [ids[0] for ids in case["top_ids"]] == case["tokens"]  # greedy: the top-1 is the token taken


def test_suite_passes_on_the_fresh_artifact(artifact, tmp_path):
    code, output, outcomes = run_suite(tmp_path, "--artifact", artifact)
    assert code == 0, output
    expected = {"test_every_file_matches_the_manifest", "test_manifest_lists_the_model_and_its_golden_outputs",
                "test_onnxruntime_is_recent_enough",
                "test_model_runs_with_provider[CPUExecutionProvider]", "test_decode_latency_p95",
                "test_prefill_latency", "test_peak_rss"} | {f"test_golden_case_reproduced[case{i}]" for i in range(3)} \
        | {f"test_tokenizer_matches_golden_ids[{r}]" for r in ("onnxruntime-genai", "tokenizers")}
    names = {re.sub(r"\[(case\d)-\d+tok\]", r"[\1]", name) for name in outcomes}  # ids carry prompt lengths
    assert names == expected and set(outcomes.values()) == {"passed"}, outcomes
    assert "decode p50" in output and "peak RSS" in output  # the measured figures are printed
    assert "the artifact needs 1.23 or later" in output  # the newest form: RMSNormalization, opset 23


def test_tampered_artifact_fails_naming_the_files(artifact, tmp_path):
    copy = copy_of(artifact, tmp_path)
    weights = copy / "model.onnx.data"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(data)
    (copy / "tokenizer.json").unlink()
    golden = json.loads((copy / "golden.json").read_text())
    golden["cases"][0]["top_logits"][3][0] += 10.0  # a drifted output (also breaks golden.json's checksum)
    (copy / "golden.json").write_text(json.dumps(golden))

    code, output, outcomes = run_suite(tmp_path, "--artifact", copy, "-k", "integrity or golden")
    assert code == 1
    assert outcomes["test_every_file_matches_the_manifest"] == "failed"
    assert "model.onnx.data: sha256 differs" in output and "tokenizer.json: missing" in output
    assert "golden.json: " in output
    golden_outcomes = {name: result for name, result in outcomes.items() if "golden_case" in name}
    assert sorted(golden_outcomes.values()) == ["failed", "passed", "passed"], golden_outcomes
    assert "golden case 0: top-1 agreement" in output


def test_changed_merge_in_tokenizer_json_fails_the_tokenizer_check(artifact, tmp_path):
    """A device whose tokenizer.json lost one merge (a corrupted copy, an old file) encodes the golden texts
    differently: both readers fail, naming a text."""
    copy = copy_of(artifact, tmp_path)
    from tokenizers import Tokenizer

    golden = json.loads((copy / "golden.json").read_text())
    spec = json.loads((copy / "tokenizer.json").read_text(encoding="utf-8"))
    merges = spec["model"]["merges"]
    for index in range(len(merges)):  # the first merge whose loss changes the ids of a golden text
        trial = json.loads(json.dumps(spec))
        trial["model"]["merges"][index] = merges[-1]  # one merge changed (to a duplicate of the last)
        changed = Tokenizer.from_str(json.dumps(trial))
        if any(changed.encode(c["text"]).ids != c["ids"] for c in golden["tokenizer"]):
            break
    (copy / "tokenizer.json").write_text(json.dumps(trial), encoding="utf-8")

    code, output, outcomes = run_suite(tmp_path, "--artifact", copy, "-k", "tokenizer")
    assert code == 1
    assert outcomes == {"test_tokenizer_matches_golden_ids[onnxruntime-genai]": "failed",
                        "test_tokenizer_matches_golden_ids[tokenizers]": "failed"}, outcomes
    assert "encodes" in output and "differently from the export" in output


def test_golden_tolerance_admits_fp32_compute_of_int4(artifact, tmp_path):
    """A device without the int8-activation kernel computes MatMulNBits in fp32 (accuracy_level 0):
    its outputs differ from the recorded ones, within the int4 tolerance."""
    import onnx

    copy = copy_of(artifact, tmp_path)
    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    for node in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
        next(a for a in node.attribute if a.name == "accuracy_level").i = 0
    onnx.save(model, str(copy / "model.onnx"))
    code, output, outcomes = run_suite(tmp_path, "--artifact", copy, "-k", "golden_case")
    assert code == 0 and len(outcomes) == 3, output
    errors = [float(e) for e in re.findall(r"max \|logit error\| ([0-9.e-]+)", output)]
    if max(errors) == 0:
        pytest.skip("this CPU computes accuracy_level 4 in fp32 too: nothing differs")
    assert len(errors) == 3 and max(errors) <= 3.0


def test_latency_budget_below_the_measured_one_fails(artifact, tmp_path):
    profile = (REPO / "device_profiles" / "host.toml").read_text().replace(
        "decode_ms_per_token = 50.0", "decode_ms_per_token = 0.0001")
    assert "0.0001" in profile
    (tmp_path / "strict.toml").write_text(profile.replace('name = "host"', 'name = "strict"'))
    code, output, outcomes = run_suite(tmp_path, "--artifact", artifact, "--device", tmp_path / "strict.toml",
                                       "-k", "budgets")
    assert code == 1
    assert outcomes == {"test_decode_latency_p95": "failed", "test_prefill_latency": "passed",
                        "test_peak_rss": "passed"}
    assert "exceeds the budget 0.0001 ms/token" in output and "profile strict" in output


def test_without_an_artifact_the_suite_skips(tmp_path):
    code, output, outcomes = run_suite(tmp_path, "-rs")
    assert code == 0 and outcomes and set(outcomes.values()) == {"skipped"}
    assert "no artifact given: run `pytest runtime_tests --artifact DIR" in output


def test_not_an_artifact_is_a_usage_error(tmp_path):
    code, output, _ = run_suite(tmp_path, "--artifact", tmp_path)
    assert code == 4 and "not an artifact directory (no manifest.json)" in output


def test_profile_provider_options_reach_the_session(monkeypatch):
    """A profile's runtime.provider_options (the Jetson profiles' CUDA attention choice) are what
    ort_loop hands ONNX Runtime, for its providers only; CI has no CUDA, so the session is captured."""
    sys.path.insert(0, str(REPO / "runtime_tests"))
    try:
        import ort_loop
    finally:
        sys.path.pop(0)
    seen = {}

    class Captured(Exception):
        pass

    def session(path, options, providers):
        seen["providers"] = providers
        raise Captured

    monkeypatch.setattr(ort_loop.ort, "InferenceSession", session)
    with pytest.raises(Captured):
        ort_loop.Decoder("model.onnx", ["CUDAExecutionProvider", "CPUExecutionProvider"],
                         provider_options={"CUDAExecutionProvider": {"sdpa_kernel": "3"}, "QNNExecutionProvider": {}})
    assert seen["providers"] == [("CUDAExecutionProvider", {"sdpa_kernel": "3"}), "CPUExecutionProvider"]


def test_ort_loop_keeps_the_cache_in_session_memory_on_cuda(artifact):
    """ort_loop's I/O-binding path (taken on CUDA; exercised here with the CPU allocator) replays the same
    logits as the plain path."""
    sys.path.insert(0, str(REPO / "runtime_tests"))
    try:
        import ort_loop
    finally:
        sys.path.pop(0)
    plain = ort_loop.Decoder(artifact / "model.onnx")
    bound = ort_loop.Decoder(artifact / "model.onnx")
    assert plain.kv_device is None
    bound.kv_device = "cpu"
    prompt, tokens = [5, 9, 13, 2, 7], [3, 8, 1, 4, 6, 2]
    assert np.abs(bound.replay(prompt, tokens) - plain.replay(prompt, tokens)).max() <= 1e-6
