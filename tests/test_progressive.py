"""Progressive low-rank decoding end to end on the tiny Llama: `exporter export` writes rank levels that share
one data file, with per-level parity and a schedule derived from calibration measurements; `exporter generate`
switches levels as a PyTorch reference with the same schedule does; the schedule rule is deterministic and
monotone; bad --levels / --schedule are one-line errors."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch

from exporter.cli import main
from exporter.errors import ExporterError
from exporter.graph.levels import derive_schedule, level_start, mean_over_tokens, nll_increase, token_nll
from exporter.graph.writer import level_ranks, sliced_copy
from exporter.runtime.generation import Runtime, level_at, parse_schedule

RATIO, SAMPLES, SEQ_LEN = 0.3, 8, 32
PROMPT = "The engineer explains the last question with great care. Then a small robot"
SWITCHING = "r100:0,r85:3,r70:6"
STEPS = 10


def export_args(model_dir, calib, out, *extra):
    return ["export", "--model", str(model_dir), "--calib", str(calib), "--calib-samples", str(SAMPLES),
            "--calib-seq-len", str(SEQ_LEN), "--ratio", str(RATIO), "--device", "host", "--no-progress",
            "--out", str(out), *extra]


def run_cli(args) -> tuple[int, str, str]:
    """main(args) with stdout and stderr captured (for module-scoped fixtures, where capsys is not available)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    capture = pytest.MonkeyPatch()
    capture.setattr(sys, "stdout", stdout)
    capture.setattr(sys, "stderr", stderr)
    try:
        code = main(args)
    finally:
        capture.undo()
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def progressive(tmp_path_factory, llama_dir, calib_file):
    """(artifact dir, stdout): the tiny Llama exported with the default levels and CALR correctives (kept whole
    in every level)."""
    out = tmp_path_factory.mktemp("progressive") / "art"
    code, stdout, stderr = run_cli(export_args(llama_dir, calib_file, out, "--correctives"))
    assert code == 0, stderr
    return out, stdout


@pytest.fixture(scope="module")
def plan(llama_dir, calib_file):
    """The same compression in PyTorch (the export is deterministic for a seed): (plan, options)."""
    from exporter.pipeline import ExportOptions, Stopwatch, plan_compression
    from exporter.settings import CorrectiveOptions

    options = ExportOptions(device="host", model=str(llama_dir), ratio=RATIO, calib=str(calib_file),
                            calib_samples=SAMPLES, calib_seq_len=SEQ_LEN, correctives=CorrectiveOptions(),
                            progress=False)
    return plan_compression(options, Stopwatch()), options


def manifest_of(out):
    return json.loads((out / "manifest.json").read_text())


def test_export_writes_levels_sharing_one_data_file(progressive):
    import onnx

    out, stdout = progressive
    manifest = manifest_of(out)
    assert [(e["name"], e["fraction"], e["file"]) for e in manifest["levels"]] == [
        ("r100", 1.0, "model.onnx"), ("r85", 0.85, "model.r85.onnx"), ("r70", 0.7, "model.r70.onnx")]
    assert sorted(p.name for p in out.glob("model*")) == ["model.onnx", "model.onnx.data", "model.r70.onnx",
                                                         "model.r85.onnx"]
    for entry in manifest["levels"]:  # every level reads the one data file
        graph = onnx.load(str(out / entry["file"]), load_external_data=False).graph
        locations = {d.value for t in graph.initializer for d in t.external_data if d.key == "location"}
        assert locations == {"model.onnx.data"}, entry["name"]
        assert entry["parity"]["passed"] and entry["parity"]["max_abs_logit_diff"] <= 1e-2
    assert manifest["levels"][0]["parity"] == manifest["parity"]  # level 0 is the export's parity check
    params = [e["active_factor_params"] for e in manifest["levels"]]
    assert params[0] > params[1] > params[2]
    assert manifest["levels"][0]["nll_increase"] == 0.0
    assert all(len(e["nll_increase_by_position"]) == 4 for e in manifest["levels"])
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "model.onnx"
    assert set(manifest["files"]) >= {"model.r85.onnx", "model.r70.onnx", "model.onnx.data"}
    assert "levels:     r100, r85, r70; schedule r100:0" in stdout


def test_schedule_is_derived_from_the_recorded_measurements(progressive):
    manifest = manifest_of(progressive[0])
    derivation, levels = manifest["schedule_derivation"], manifest["levels"]
    assert derivation["source"] == "calibration" and "last 2 windows" in derivation["calibration"]
    expected = derive_schedule([e["name"] for e in levels], [e["nll_increase"] for e in levels],
                               derivation["horizon_tokens"], derivation["tolerance_nats"],
                               derivation["full_rank_tokens"])
    assert [(e["level"], e["start"]) for e in manifest["schedule"]] == expected
    assert Runtime(progressive[0]).schedule == expected


def test_measurements_are_deterministic(progressive, plan):
    from exporter.pipeline import _held_out_windows

    plan, options = plan
    manifest = manifest_of(progressive[0])
    assert {name: r["rank"] for name, r in manifest["ranks"].items()} == plan.ranks
    assert any(r["corrective_rank"] for r in manifest["ranks"].values())
    windows, _ = _held_out_windows(plan, options)
    base = token_nll(plan.model, windows)
    assert torch.equal(base, token_nll(plan.model, windows))
    for entry, ranks in zip(manifest["levels"][1:], level_ranks(plan.model, (0.85, 0.7))):
        measured = nll_increase(base, token_nll(sliced_copy(plan.model, ranks), windows))
        assert measured["nll_increase"] == pytest.approx(entry["nll_increase"], abs=2e-6), entry["name"]
        assert measured["nll_increase"] > 0  # the tiny model does lose something at a lower rank


def test_generate_switches_levels_like_pytorch(progressive, plan, capsys):
    out, _ = progressive
    model = plan[0].model
    runtime = Runtime(out, threads=1)
    schedule = runtime.parse_schedule(SWITCHING)
    references = {name: sliced_copy(model, ranks) for name, ranks in
                  zip(runtime.level_names, level_ranks(model, [lv.fraction for lv in runtime.levels]))}
    ids = runtime.prompt_ids(PROMPT, chat=False)
    # PyTorch: each token from the model sliced to its scheduled level, one KV cache throughout.
    expected, logits, cache, feed = [], [], None, torch.tensor([ids])
    with torch.no_grad():
        for t in range(STEPS):
            result = references[level_at(schedule, t)](feed, past_key_values=cache, use_cache=True)
            cache, row = result.past_key_values, result.logits[0, -1].numpy()
            logits.append(row)
            expected.append(int(np.argmax(row)))
            if expected[-1] in runtime.stop_ids:
                break
            feed = torch.tensor([[expected[-1]]])
    assert len(expected) > 6  # every level produced tokens

    steps = list(runtime.generate(ids, STEPS, schedule))
    assert [s.token for s in steps] == expected
    assert [s.level for s in steps] == [level_at(schedule, t) for t in range(len(steps))]
    switched = np.stack([s.logits for s in steps])
    assert np.abs(switched - np.stack(logits)).max() < 1e-3
    assert {key for key in runtime._decoders} == {("r100", True), ("r85", True), ("r70", True)}  # one weight copy
    static = np.stack([s.logits for s in runtime.generate(ids, len(expected), parse_schedule("static", ["r100"]),
                                                          forced_tokens=expected)])
    assert np.abs(static[:3] - switched[:3]).max() < 1e-4 and np.abs(static[3:] - switched[3:]).max() > 1e-2
    single = Runtime(out, threads=1)  # one level alone keeps a plain (prepacked) session
    list(single.generate(ids, 3, single.parse_schedule("static")))
    assert set(single._decoders) == {("r100", False)}

    code = main(["generate", str(out), "--prompt", PROMPT, "--no-chat-template", "--max-new-tokens", str(STEPS),
                 "--schedule", SWITCHING, "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == runtime.decode_text(expected) + "\n"
    assert "tokens per level: r100 3, r85 3, r70" in captured.err


def test_level_start_rule():
    names = ["r100", "r85", "r70"]
    assert derive_schedule(names, [0.0, 0.1, 0.2], horizon=128, tolerance=8.0) == [("r100", 0), ("r85", 48),
                                                                                   ("r70", 88)]
    assert derive_schedule(names, [0.0, 0.3, 0.2], 128, 8.0) == [("r100", 0), ("r70", 88)]  # r85 costs more
    assert derive_schedule(names, [0.0, 1.0, 2.0], 128, 0.5) == [("r100", 0)]  # no level fits the horizon
    # cheap levels wait for the full-rank tokens; without them they start at the first generated token
    assert derive_schedule(names, [0.0, -0.01, 0.0], 128, 8.0) == [("r100", 0), ("r70", 32)]
    assert derive_schedule(names, [0.0, -0.01, 0.0], 128, 8.0, full_rank_tokens=0) == [("r100", 0), ("r70", 1)]
    assert level_start(0.0) == 32 and level_start(0.0, full_rank_tokens=0) == 1
    assert level_start(100.0, 128, 8.0) == 128
    # the SmolLM2-135M measurements (FLRC 20% + CALR) the full-rank prefix was chosen on (schedule.py's doc)
    assert derive_schedule(names, [0.0, 0.05945, 0.17223], full_rank_tokens=1) == [("r100", 0), ("r85", 1),
                                                                                   ("r70", 82)]
    assert derive_schedule(names, [0.0, 0.05945, 0.17223]) == [("r100", 0), ("r85", 32), ("r70", 82)]
    with pytest.raises(ExporterError, match="full_rank_tokens"):
        derive_schedule(names, [0.0, 0.1, 0.2], full_rank_tokens=-1)


def test_level_start_is_monotone():
    increases = [0.0, 0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 3.0]
    for tolerance in (0.5, 2.0, 8.0, 32.0):
        starts = [level_start(d, 128, tolerance) for d in increases]
        assert starts == sorted(starts)  # a costlier level starts later
        looser = [level_start(d, 128, 2 * tolerance) for d in increases]
        assert all(a <= b for a, b in zip(looser, starts))  # a looser tolerance starts it earlier
    grid = [(a, b) for a in increases for b in increases]
    for a, b in grid:  # whatever the measurements, a valid schedule of known levels, full rank first
        schedule = derive_schedule(["r100", "r85", "r70"], [0.0, a, b])
        assert parse_schedule(",".join(f"{n}:{s}" for n, s in schedule), ["r100", "r85", "r70"]) == schedule


def test_mean_over_tokens():
    params = {"r100": 100.0, "r85": 85.0, "r70": 70.0}
    schedule = [("r100", 0), ("r85", 2), ("r70", 6)]
    assert mean_over_tokens(schedule, params, 10) == pytest.approx((2 * 100 + 4 * 85 + 4 * 70) / 10)
    assert mean_over_tokens(schedule, params, 4) == pytest.approx((2 * 100 + 2 * 85) / 4)


def test_one_level_export(tmp_path, llama_dir, calib_file):
    code, stdout, _ = run_cli(export_args(llama_dir, calib_file, tmp_path / "one", "--levels", "1.0"))
    assert code == 0
    manifest = manifest_of(tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "one").glob("model*")) == ["model.onnx", "model.onnx.data"]
    assert manifest["levels"] == [{"name": "r100", "fraction": 1.0, "file": "model.onnx"}]
    assert manifest["schedule"] == [{"level": "r100", "start": 0}] and "schedule r100:0" in stdout


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_grid_levels_with_a_given_schedule(tmp_path, llama_dir, calib_file, weights):
    import onnx

    out = tmp_path / weights
    code, _, stderr = run_cli(export_args(llama_dir, calib_file, out, "--weights", weights, "--levels", "1.0,0.5",
                                          "--schedule", "r100:0,r50:2"))
    assert code == 0, stderr
    manifest = manifest_of(out)
    assert manifest["schedule"] == [{"level": "r100", "start": 0}, {"level": "r50", "start": 2}]
    assert manifest["schedule_derivation"]["source"] == "--schedule r100:0,r50:2"
    assert "derived" in manifest["schedule_derivation"]  # the measurements are recorded all the same
    assert sorted(p.name for p in out.glob("*.data")) == ["model.onnx.data"]
    for entry in manifest["levels"]:
        assert entry["rank_multiple"] == 32 and entry["parity"]["passed"]
        nodes = onnx.load(str(out / entry["file"]), load_external_data=False).graph.node
        bits = {onnx.helper.get_attribute_value(a) for n in nodes if n.op_type == "MatMulNBits"
                for a in n.attribute if a.name == "bits"}
        assert bits == {int(weights[3:])} and "MatMul" not in {n.op_type for n in nodes}
    steps = list(Runtime(out, threads=1).generate([5, 17, 42, 9], 4, stop=False))
    assert [s.level for s in steps] == ["r100", "r100", "r50", "r50"]


@pytest.mark.parametrize("extra, fragment", [
    (["--levels", "0.85,0.7"], "--levels must start at 1.0"),
    (["--levels", "1.0,0.7,0.85"], "--levels must strictly decrease within (0, 1], got 0.85 after 0.7"),
    (["--levels", "1.0,0"], "--levels must strictly decrease within (0, 1], got 0.0 after 1.0"),
    (["--levels", "1.0,abc"], "--levels expects comma-separated fractions"),
    (["--levels", "1.0,0.851,0.849"], "--levels must be at least 0.01 apart"),
    (["--schedule", "r50"], "unknown level 'r50'; known levels: r100, r85, r70"),
    (["--schedule", "r100:0,r85:8,r70:8"], "starts must strictly increase, got r70:8 after r85:8"),
    (["--schedule", "r85:2"], "the first entry must start at 0"),
    (["--levels", "1.0", "--schedule", "r85"], "unknown level 'r85'; known levels: r100"),
    (["--weights", "int8", "--asymmetric", "--levels", "1.0,0.5"], "--levels: asymmetric int8 graphs have no rank"),
    (["--graph", "optimum", "--levels", "1.0,0.5"], "--levels: the optimum graph has no rank levels"),
])
def test_bad_levels_and_schedules_are_one_line_errors(tmp_path, capsys, llama_dir, calib_file, extra, fragment):
    code = main(export_args(llama_dir, calib_file, tmp_path / "x", *extra))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("exporter: error: ") and fragment in err, err
    assert list(tmp_path.iterdir()) == []
