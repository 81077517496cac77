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
    assert main(_args(llama_dir, calib_file, tmp_path / "both", ",".join(DEVICES), "--own-branches")) == 0
    assert calls == {"decompose": 1, "fisher": 1}
    out = capsys.readouterr().out
    assert "2 artifacts from one statistics pass:" in out
    manifests = [json.loads((tmp_path / "both" / name / "manifest.json").read_text()) for name in DEVICES]
    assert [m["profile"]["name"] for m in manifests] == list(DEVICES)
    assert not any("scale_tuning" in m["method"] for m in manifests)  # no tuning by default with int4
    # the statistics' time is the first artifact's; the second pays only its own compression and writing
    assert "factorize" in manifests[0]["timings_s"] and "factorize" not in manifests[1]["timings_s"]

    # with --own-branches, the second artifact is the one a single-profile export writes, byte for byte
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


@pytest.mark.parametrize("weights, work", [
    ("fp16", ["train_correctives"]),
    ("int8", ["quantize_grids", "train_correctives", "quantize_grids"]),  # the primary path's grids, then the rest
])
def test_a_later_profile_with_the_same_compression_takes_its_weights(tmp_path, monkeypatch, llama_dir, calib_file,
                                                                    weights, work):
    """Two profiles with the same rank multiple at the same --ratio: the branches are trained (and, int8, the
    grids fitted) for the first alone, as the second would compute the same; each artifact equals its
    single-profile export."""
    import exporter.pipeline

    calls = []
    for name in ("train_correctives", "quantize_grids"):
        original = getattr(exporter.pipeline, name)
        monkeypatch.setattr(exporter.pipeline, name,
                            lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    args = ["--device", "iphone-15-pro,jetson-orin", "--weights", weights, "--model", str(llama_dir), "--ratio", "0.3",
            "--calib", str(calib_file), "--calib-samples", "8", "--calib-seq-len", "32", "--no-progress"]
    assert main(["export", *args, "--out", str(tmp_path / "both")]) == 0
    assert calls == work
    manifests = [json.loads((tmp_path / "both" / name / "manifest.json").read_text())
                 for name in ("iphone-15-pro", "jetson-orin-nano-8gb")]
    assert manifests[0]["ranks"] == manifests[1]["ranks"]
    assert [m["precision"] for m in manifests] == [weights, weights]
    assert manifests[0]["method"]["correctives"] == manifests[1]["method"]["correctives"]
    args[1] = "jetson-orin"
    assert main(["export", *args, "--out", str(tmp_path / "alone")]) == 0
    assert (tmp_path / "alone" / "model.onnx.data").read_bytes() == \
        (tmp_path / "both" / "jetson-orin-nano-8gb" / "model.onnx.data").read_bytes()


def test_a_later_profile_at_other_ranks_starts_from_the_previous_branches(tmp_path, monkeypatch, llama_dir,
                                                                          calib_file):
    """The Pi rounds ranks to multiples of 8, the Snapdragon to 16: other ranks, so the second profile's branches
    start from the first's and train only --warm-kl-steps KL steps, without the block-wise stage."""
    import exporter.compress.corrective as corrective

    blockwise, loaded = [], []
    train, load = corrective.train_blockwise, corrective.load_branches
    monkeypatch.setattr(corrective, "train_blockwise", lambda *a, **k: blockwise.append(1) or train(*a, **k))
    monkeypatch.setattr(corrective, "load_branches", lambda model, weights: loaded.append(load(model, weights))
                        or loaded[-1])
    assert main(_args(llama_dir, calib_file, tmp_path / "both", ",".join(DEVICES), "--warm-kl-steps", "3")) == 0
    manifests = [json.loads((tmp_path / "both" / name / "manifest.json").read_text()) for name in DEVICES]
    assert manifests[0]["ranks"] != manifests[1]["ranks"]
    first, second = (m["method"]["correctives"] for m in manifests)
    assert "warm_start" not in first and first["kl_steps"] == 40
    assert second["kl_steps"] == 3 and second["block_error_before"] == []
    assert blockwise == [1] and len(loaded) == 1
    assert (second["warm_start"]["branches"], second["warm_start"]["of"]) == loaded[0]
    assert 2 * loaded[0][0] >= loaded[0][1] > 0
    # the KL steps ran, and were kept only where they lowered the held-out KL
    assert second["kl_before"] is not None
    undone = second["warm_start"]["steps_undone"]
    assert second["kl_after"] == second["kl_before"] if undone else second["kl_after"] < second["kl_before"]


def test_warm_branches_without_kl_steps_are_kept_as_they_start(tmp_path, monkeypatch, llama_dir, calib_file):
    """The default (--warm-kl-steps 0): no training step at all for the later profile; the held-out KL recorded."""
    import exporter.compress.corrective as corrective

    steps = []
    end_to_end = corrective.train_end_to_end
    monkeypatch.setattr(corrective, "train_end_to_end", lambda *a, **k: steps.append(a[3].kl_steps) or end_to_end(*a, **k))
    assert main(_args(llama_dir, calib_file, tmp_path / "both", ",".join(DEVICES))) == 0
    second = json.loads((tmp_path / "both" / DEVICES[1] / "manifest.json").read_text())["method"]["correctives"]
    assert steps == [40] and second["kl_steps"] == 0 and second["warm_start"]["steps_undone"] is False
    assert second["kl_before"] == second["kl_after"] > 0


def test_load_branches_starts_each_branch_from_the_previous_map_at_its_rank():
    import torch

    from exporter.compress.corrective import branch_weights, load_branches
    from exporter.compress.lowrank import CorrectedLinear, LowRankLinear

    def model(*shapes):
        torch.manual_seed(0)
        return torch.nn.Sequential(*(CorrectedLinear(LowRankLinear(i, o, 6), rank) for i, o, rank in shapes))

    def branch_map(module):
        return module.corrective_up.weight.double() @ module.corrective_down.weight.double()

    source = model((12, 8, 4), (12, 8, 4), (12, 8, 4), (12, 8, 4))
    with torch.no_grad():
        for module in source:
            module.corrective_up.weight.normal_()
    target = model((12, 8, 4), (12, 8, 2), (12, 8, 6), (10, 8, 4))
    start = [module.corrective_down.weight.clone() for module in target]
    assert load_branches(target, branch_weights(source)) == (3, 4)
    assert torch.equal(target[0].corrective_up.weight, source[0].corrective_up.weight)  # same rank: as it was
    # a smaller rank: the previous map's best approximation at that rank
    u, sigma, vh = torch.linalg.svd(branch_map(source[1]))
    assert torch.allclose(branch_map(target[1]), (u[:, :2] * sigma[:2]) @ vh[:2], atol=1e-5)
    # a larger rank: the whole previous map, the extra directions at their start and adding nothing yet
    assert torch.allclose(branch_map(target[2]), branch_map(source[2]), atol=1e-5)
    assert torch.equal(target[2].corrective_down.weight[4:], start[2][4:]) and not target[2].corrective_up.weight[:, 4:].any()
    assert torch.equal(target[3].corrective_down.weight, start[3])  # other widths: untouched


def test_auto_profiles_after_stored_prices_share_one_gram_pass(tmp_path, monkeypatch, llama_dir, calib_file):
    """`--weights auto` on two profiles whose prices the statistics store holds: the Grams the chosen grids need
    are computed once for both, the grids of an option chosen before are taken, the same choices' tuned scales
    are taken (tuning runs once), and the second artifact is the one its single-profile export writes."""
    import exporter.pipeline
    from exporter.compress import format_allocation

    def args(out, device):
        return ["export", "--device", device, "--model", str(llama_dir), "--weights", "auto", "--budget-mb", "1",
                "--calib", str(calib_file), "--calib-samples", "4", "--calib-seq-len", "32", "--tune-scales", "2",
                "--out", str(out), "--no-progress"]

    assert main(args(tmp_path / "alone", DEVICES[1])) == 0  # prices the menu into the store
    passes, gptq_calls = [], []
    statistics, grids = format_allocation.pricing_statistics, format_allocation.option_grids
    monkeypatch.setattr(format_allocation, "pricing_statistics",
                        lambda *a, **k: passes.append(1) or statistics(*a, **k))
    monkeypatch.setattr(format_allocation, "option_grids", lambda *a, **k: gptq_calls.append(1) or grids(*a, **k))
    tunings, tune = [], exporter.pipeline.tune_grid_scales
    monkeypatch.setattr(exporter.pipeline, "tune_grid_scales", lambda *a, **k: tunings.append(1) or tune(*a, **k))
    assert main(args(tmp_path / "both", ",".join(DEVICES))) == 0
    assert len(passes) == 1  # the first profile's Gram pass, kept for the second
    assert len(tunings) == 1  # the same choices: the second takes the first's tuned scales
    manifests = [json.loads((tmp_path / "both" / d / "manifest.json").read_text()) for d in DEVICES]
    assert manifests[0]["method"]["scale_tuning"] == manifests[1]["method"]["scale_tuning"]
    units = json.loads((tmp_path / "alone" / "manifest.json").read_text())["method"]["formats"]["units"]
    assert len(gptq_calls) == len(units)  # the same budget, the same choices: the second computes none
    shared, alone = tmp_path / "both" / DEVICES[1], tmp_path / "alone"
    assert (shared / "model.onnx.data").read_bytes() == (alone / "model.onnx.data").read_bytes()
