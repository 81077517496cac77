"""`exporter export --device a,b`: one artifact per profile from one load and one statistics pass, each the
artifact a single-profile export writes. Tiny Llama, profiles with fixed hardware (no host measurement)."""

from __future__ import annotations

import json

import pytest

from exporter.cli import main

DEVICES = ("raspberry-pi-5", "snapdragon-8-gen3")


def _args(llama_dir, calib_file, out, device, *extra):
    return ["export", "--device", device, "--model", str(llama_dir), "--ratio", "0.3", "--weights", "int4",
            "--calib", str(calib_file), "--calib-samples", "4", "--calib-seq-len", "32",
            "--out", str(out), "--no-progress", *extra]


def test_one_statistics_pass_for_every_profile(tmp_path, capsys, monkeypatch, llama_dir, calib_file):
    import exporter.pipeline

    calls = {"decompose": 0, "fisher": 0}
    decompose, fisher = exporter.pipeline.decompose_model, exporter.pipeline.component_fisher

    def counted(name, function):
        def call(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(exporter.pipeline, "decompose_model", counted("decompose", decompose))
    monkeypatch.setattr(exporter.pipeline, "component_fisher", counted("fisher", fisher))
    assert main(_args(llama_dir, calib_file, tmp_path / "both", ",".join(DEVICES))) == 0
    assert calls == {"decompose": 1, "fisher": 1}
    out = capsys.readouterr().out
    assert "2 artifacts from one statistics pass:" in out
    manifests = [json.loads((tmp_path / "both" / name / "manifest.json").read_text()) for name in DEVICES]
    assert [m["profile"]["name"] for m in manifests] == list(DEVICES)
    assert not any("scale_tuning" in m["method"] for m in manifests)  # no tuning by default with int4
    # the statistics' time is the first artifact's; the second pays only its own compression and writing
    assert "factorize" in manifests[0]["timings_s"] and "factorize" not in manifests[1]["timings_s"]

    # the second artifact is the one a single-profile export writes, byte for byte
    assert main(_args(llama_dir, calib_file, tmp_path / "alone", DEVICES[1])) == 0
    shared, alone = tmp_path / "both" / DEVICES[1], tmp_path / "alone"
    assert (shared / "model.onnx.data").read_bytes() == (alone / "model.onnx.data").read_bytes()
    assert json.loads((alone / "manifest.json").read_text())["ranks"] == manifests[1]["ranks"]


def test_bad_lists_fail_before_any_work(tmp_path, capsys, llama_dir, calib_file):
    for device, message in ((f"{DEVICES[0]},{DEVICES[0]}", "a profile named twice"),
                            (f"{DEVICES[0]},", "an empty profile name"),
                            (f"{DEVICES[0]},no-such-board", "no-such-board")):
        assert main(_args(llama_dir, calib_file, tmp_path / "x", device)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    (tmp_path / "x" / DEVICES[1]).mkdir(parents=True)  # one target exists: refused before loading the model
    assert main(_args(llama_dir, calib_file, tmp_path / "x", ",".join(DEVICES))) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "loading" not in err
    assert not (tmp_path / "x" / DEVICES[0]).exists()


@pytest.mark.parametrize("device", DEVICES)
def test_profiles_exist(device):
    from exporter.device.profiles import load_profile

    assert not load_profile(device).measured  # these tests must not pay the host measurement


def test_branches_trained_once_for_profiles_with_the_same_ranks(tmp_path, monkeypatch, llama_dir, calib_file):
    """Float-trained corrective branches depend on the ranks only: an int8 and an fp16 profile at the same
    --ratio train once; each artifact equals its single-profile export."""
    import exporter.pipeline

    calls = []
    train = exporter.pipeline.train_correctives
    monkeypatch.setattr(exporter.pipeline, "train_correctives", lambda *a, **k: calls.append(1) or train(*a, **k))
    args = ["--device", "snapdragon-8-gen3,jetson-orin", "--model", str(llama_dir), "--ratio", "0.3", "--calib",
            str(calib_file), "--calib-samples", "8", "--calib-seq-len", "32", "--no-progress"]
    assert main(["export", *args, "--out", str(tmp_path / "both")]) == 0
    assert len(calls) == 1
    manifests = [json.loads((tmp_path / "both" / name / "manifest.json").read_text())
                 for name in ("snapdragon-8-gen3", "jetson-orin-nano-8gb")]
    assert [m["precision"] for m in manifests] == ["int8", "fp16"]
    assert manifests[0]["method"]["correctives"] == manifests[1]["method"]["correctives"]
    args[1] = "jetson-orin"
    assert main(["export", *args, "--out", str(tmp_path / "alone")]) == 0
    assert (tmp_path / "alone" / "model.onnx.data").read_bytes() == \
        (tmp_path / "both" / "jetson-orin-nano-8gb" / "model.onnx.data").read_bytes()
