"""exporter.cli end to end on a tiny Llama directory, and its one-line errors."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.cli import main
from exporter.compress.lowrank import break_even_rank

REPO = Path(__file__).resolve().parents[1]
MANIFEST_KEYS = {"source_model", "profile", "method", "ranks", "parameters", "files", "versions", "parity"}


def export_args(model, calib, out, *extra):
    return ["export", "--model", str(model), "--calib", str(calib), "--calib-samples", "4",
            "--calib-seq-len", "32", "--ratio", "0.3", "--out", str(out), "--device", "host", "--no-progress", *extra]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, llama_dir, calib_file):
    """One export of the tiny Llama: (parent dir, artifact dir, exit code, stdout, stderr)."""
    parent = tmp_path_factory.mktemp("cli-out")
    out = parent / "x"
    capture = pytest.MonkeyPatch()  # capsys is function-scoped: capture by hand
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    capture.setattr(sys, "stdout", stdout)
    capture.setattr(sys, "stderr", stderr)
    try:
        code = main(export_args(llama_dir, calib_file, out))
    finally:
        capture.undo()
    return parent, out, code, stdout.getvalue(), stderr.getvalue()


def test_export_succeeds_and_writes_the_artifact(artifact):
    parent, out, code, stdout, stderr = artifact
    assert code == 0, stderr
    assert sorted(p.name for p in parent.iterdir()) == ["x"]  # no temp dirs left beside it
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "manifest.json", "report.md", "config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= names
    assert not any(n.startswith(".") for n in names)
    assert f"artifact:   {out}" in stdout and "passed" in stdout
    assert "Traceback" not in stderr


def test_manifest_contents(artifact, llama_dir):
    _parent, out, _code, _stdout, _stderr = artifact
    manifest = json.loads((out / "manifest.json").read_text())
    assert MANIFEST_KEYS <= set(manifest)
    assert manifest["source_model"]["path"] == str(llama_dir.resolve())
    assert manifest["source_model"]["model_type"] == "llama"
    assert manifest["source_model"]["architecture"] == "LlamaForCausalLM"
    assert manifest["profile"]["name"] == "host" and manifest["profile"]["measured"] is True
    method = manifest["method"]
    assert method["factorization"] == "whitened-svd" and "4 x 32 tokens" in method["calibration"]
    ranks = manifest["ranks"]
    assert len(ranks) == 2 * 7
    assert ranks["model.layers.0.self_attn.q_proj"]["out"] == 64 and ranks["model.layers.0.mlp.down_proj"]["in"] == 128
    for name, r in ranks.items():  # whatever the allocation: below break-even, or dense
        assert r["rank"] is None or 1 <= r["rank"] <= break_even_rank(r["out"], r["in"]), name
    params = manifest["parameters"]
    assert 0.3 - 1e-6 <= params["projection_fraction_removed"] < 0.45  # at least what --ratio asks
    assert params["total_params"] < params["total_params_dense"]
    kept = sum(r["out"] * r["in"] if r["rank"] is None else (r["rank"] + r["corrective_rank"]) * (r["out"] + r["in"])
               for r in ranks.values())
    assert all(r["corrective_rank"] > 0 for r in ranks.values() if r["rank"] is not None)  # CALR is on by default
    assert manifest["method"]["correctives"]["kl_steps"] > 0
    assert params["projection_params"] == kept
    parity = manifest["parity"]
    assert parity["passed"] is True and parity["max_abs_logit_diff"] <= parity["atol"]
    assert {"torch", "transformers", "onnx", "onnxruntime", "python", "exporter"} <= set(manifest["versions"])
    files = manifest["files"]
    assert "manifest.json" not in files and {"model.onnx", "report.md", "tokenizer.json"} <= set(files)
    assert set(files) == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    for name, entry in files.items():
        data = (out / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)


def test_report_and_tokenizer(artifact):
    _parent, out, _code, _stdout, _stderr = artifact
    report = (out / "report.md").read_text()
    assert report.startswith("# ") and "for host" in report and "passed" in report
    assert "| layer |" in report and "q_proj" in report
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.decode(tokenizer("a small robot")["input_ids"], skip_special_tokens=True) == "a small robot"


def test_existing_output_without_force_is_an_error(artifact, llama_dir, calib_file, capsys):
    parent, out, _code, _stdout, _stderr = artifact
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code = main(export_args(llama_dir, calib_file, out))
    assert code != 0
    assert_one_line_error(capsys, "already exists")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert sorted(p.name for p in parent.iterdir()) == ["x"]


def test_force_replaces_with_plain_svd(tmp_path, llama_dir, calib_file, capsys):
    out = tmp_path / "x"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    code = main(["export", "--model", str(llama_dir), "--ratio", "0.5", "--method", "svd", "--allocation", "uniform",
                 "--no-correctives", "--out", str(out), "--device", "host", "--no-progress", "--force"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"] and not (out / "stale.txt").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"]["factorization"] == "svd" and manifest["method"]["calibration"] is None
    assert manifest["method"]["allocation"] == "uniform"
    for r in manifest["ranks"].values():  # the same half of every projection's parameters
        assert r["rank"] == int(0.5 * r["out"] * r["in"] / (r["out"] + r["in"])) and r["corrective_rank"] == 0
    assert manifest["method"]["correctives"] is None
    assert manifest["parity"]["passed"] is True


def test_dense_model_that_fits_the_budget_is_exported_dense(tmp_path, qwen3_dir, capsys):
    out = tmp_path / "x"
    code = main(["export", "--model", str(qwen3_dir), "--out", str(out), "--device", "jetson-orin", "--no-progress"])
    captured = capsys.readouterr()
    err = captured.err
    assert code == 0, err
    assert "exporting it dense" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["profile"]["name"] == "jetson-orin-nano-8gb"
    assert all(r["rank"] is None for r in manifest["ranks"].values())
    assert manifest["parameters"]["total_params"] == manifest["parameters"]["total_params_dense"]
    assert manifest["parity"]["passed"] is True
    # No --weights: the profile's weight_precision (fp16 on the Jetsons), with fp16 activations.
    assert manifest["precision"] == manifest["profile"]["runtime"]["weight_precision"] == "fp16"
    assert manifest["onnx"]["activations"] == "fp16"
    assert "weights fp16, activations fp16" in captured.out


@pytest.mark.parametrize("device, activations", [("jetson-orin", "fp16"), ("host", "fp32")])
def test_int4_activations_follow_the_profile_provider(tmp_path, llama_dir, device, activations):
    """int4 on a CUDA-first profile is the CUDA int4 graph (fp16 activations: attention stays on the GPU);
    elsewhere fp32 activations, the CPU's MatMulNBits path."""
    import onnx

    out = tmp_path / device
    assert main(["export", "--model", str(llama_dir), "--out", str(out), "--device", device, "--ratio", "0",
                 "--weights", "int4", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int4" and manifest["onnx"]["activations"] == activations
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    kv = next(i for i in graph.input if i.name == "past_key_values.0.key").type.tensor_type.elem_type
    assert kv == (onnx.TensorProto.FLOAT16 if activations == "fp16" else onnx.TensorProto.FLOAT)


# ---------------------------------------------------------------------------------------------
# Errors: exit non-zero, one line on stderr, no traceback, nothing written


def assert_one_line_error(capsys, *fragments) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("exporter: error:")]
    assert len(errors) == 1, err
    assert err.rstrip("\n").splitlines()[-1] == errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def workdir(tmp_path):
    """A directory whose listing must not change when an export fails (inputs are made before)."""
    return tmp_path


def run_failing(workdir, capsys, args, *fragments) -> str:
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    code = main(args)
    assert code != 0
    message = assert_one_line_error(capsys, *fragments)
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before
    return message


def test_activations_the_weights_are_not_written_with(workdir, capsys, llama_dir, calib_file):
    run_failing(workdir, capsys, export_args(llama_dir, calib_file, workdir / "x")
                + ["--weights", "int8", "--activations", "fp16"],
                "--activations: int8 weights are written with fp32 activations, not fp16")


def test_unknown_device_lists_valid_names(workdir, capsys, llama_dir, calib_file):
    message = run_failing(workdir, capsys, export_args(llama_dir, calib_file, workdir / "x")[:-3]
                          + ["--device", "jetson-thor", "--no-progress"], "unknown device 'jetson-thor'")
    for name in ("jetson-orin", "jetson-orin-nano-8gb", "raspberry-pi-5", "host"):
        assert name in message


def test_malformed_device_toml(workdir, capsys, llama_dir, calib_file):
    bad = workdir / "board.toml"
    bad.write_text('name = "board"\nmeasured = = false\n')
    run_failing(workdir, capsys, export_args(llama_dir, calib_file, workdir / "x") + ["--device", str(bad)],
                str(bad), "invalid TOML")


def test_missing_model_path(workdir, capsys, calib_file):
    run_failing(workdir, capsys, export_args(workdir / "absent", calib_file, workdir / "x"), "model not found")


def test_uncached_hub_id_offline_is_one_line(workdir, capsys, calib_file, monkeypatch):
    """No network in tests: huggingface_hub's answer for an id neither cached nor reachable, mocked."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*_args, **_kwargs):
        raise LocalEntryNotFoundError("outgoing traffic has been disabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    run_failing(workdir, capsys, export_args("HuggingFaceTB/SmolLM2-135M", calib_file, workdir / "x"),
                "not in the Hugging Face cache", "hf download HuggingFaceTB/SmolLM2-135M")


def test_model_file_that_is_not_gguf(workdir, capsys, calib_file):
    weights = workdir / "model.safetensors"
    weights.write_bytes(b"\0" * 64)
    run_failing(workdir, capsys, export_args(weights, calib_file, workdir / "x"), "unsupported model file")


def test_model_gguf_that_is_not_gguf(workdir, capsys, calib_file):
    fake = workdir / "model.gguf"
    fake.write_text("not a gguf file")
    run_failing(workdir, capsys, export_args(fake, calib_file, workdir / "x"), "cannot load model")


def test_model_dir_without_config(workdir, capsys, calib_file):
    (workdir / "model").mkdir()
    (workdir / "model" / "tokenizer.json").write_text("{}")
    run_failing(workdir, capsys, export_args(workdir / "model", calib_file, workdir / "x"), "no config.json")


def test_model_dir_with_broken_config(workdir, capsys, calib_file):
    (workdir / "model").mkdir()
    (workdir / "model" / "config.json").write_text("{broken")
    (workdir / "model" / "tokenizer.json").write_text("{}")
    run_failing(workdir, capsys, export_args(workdir / "model", calib_file, workdir / "x"), "cannot load model")


def test_model_dir_without_tokenizer(workdir, capsys, calib_file, llama_dir):
    import shutil

    model = workdir / "model"
    model.mkdir()
    for f in llama_dir.iterdir():
        if f.is_file() and not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, model / f.name)
    run_failing(workdir, capsys, export_args(model, calib_file, workdir / "x"), "has no tokenizer")


@pytest.mark.parametrize("content", ["", "  \n\n \t\n"], ids=["empty", "blank"])
def test_empty_calibration_file(workdir, capsys, llama_dir, content):
    calib = workdir / "calib.txt"
    calib.write_text(content)
    run_failing(workdir, capsys, export_args(llama_dir, calib, workdir / "x"), "calibration file is empty")


def test_missing_calibration_file(workdir, capsys, llama_dir):
    run_failing(workdir, capsys, export_args(llama_dir, workdir / "absent.txt", workdir / "x"),
                "calibration file not found")


def test_calibration_file_too_short(workdir, capsys, llama_dir):
    calib = workdir / "calib.txt"
    calib.write_text("A small robot reads.")
    run_failing(workdir, capsys, export_args(llama_dir, calib, workdir / "x"), "too short", "--calib-seq-len=32")


def test_jsonl_without_the_field(workdir, capsys, llama_dir, calib_text):
    calib = workdir / "calib.jsonl"
    calib.write_text("".join(json.dumps({"content": line}) + "\n" for line in calib_text.splitlines()))
    run_failing(workdir, capsys, export_args(llama_dir, calib, workdir / "x"),
                f"{calib}:1: no field 'text'", "fields: content", "--calib-field")


def test_jsonl_with_a_bad_line(workdir, capsys, llama_dir):
    calib = workdir / "calib.jsonl"
    calib.write_text('{"text": "fine"}\n\n{"text": broken}\n')
    run_failing(workdir, capsys, export_args(llama_dir, calib, workdir / "x"), f"{calib}:3: not valid JSON")


def test_jsonl_with_another_field_works(tmp_path, capsys, llama_dir, calib_text):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"content": line}) + "\n" for line in calib_text.splitlines()))
    code = main(export_args(llama_dir, calib, tmp_path / "x", "--calib-field", "content"))
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "x" / "manifest.json").read_text())["parity"]["passed"] is True


@pytest.mark.parametrize("ratio", ["1.0", "1.5", "-0.1", "lots"])
def test_ratio_out_of_range_is_a_usage_error(workdir, capsys, llama_dir, calib_file, ratio):
    args = export_args(llama_dir, calib_file, workdir / "x")
    args[args.index("--ratio") + 1] = ratio
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--ratio" in err and "Traceback" not in err
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("option", ["--calib-samples", "--calib-seq-len"])
def test_non_positive_calibration_sizes_are_usage_errors(workdir, capsys, llama_dir, calib_file, option):
    args = export_args(llama_dir, calib_file, workdir / "x")
    args[args.index(option) + 1] = "0"
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and option in capsys.readouterr().err


def test_output_under_a_regular_file(workdir, capsys, llama_dir, calib_file):
    blocker = workdir / "a-file"
    blocker.write_text("not a directory")
    run_failing(workdir, capsys, export_args(llama_dir, calib_file, blocker / "x"), "is not a directory")
    assert blocker.read_text() == "not a directory"


def test_output_that_is_a_file_even_with_force(workdir, capsys, llama_dir, calib_file):
    target = workdir / "x"
    target.write_text("keep me")
    run_failing(workdir, capsys, export_args(llama_dir, calib_file, target, "--force"), "not a directory")
    assert target.read_text() == "keep me"


def test_parity_failure_leaves_nothing(tmp_path, capsys, llama_dir, calib_file):
    from exporter.errors import ParityError
    from exporter.pipeline import ExportOptions, run_export

    options = ExportOptions(device="host", model=str(llama_dir), out=tmp_path / "x", ratio=0.3,
                            calib=str(calib_file), calib_samples=4, calib_seq_len=32, parity_steps=4,
                            parity_atol=-1.0, progress=False)  # no difference passes a negative tolerance
    with pytest.raises(ParityError, match="parity failed") as e:
        run_export(options)
    assert e.value.exit_code == 3
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_export_leaves_nothing(tmp_path, capsys, monkeypatch, llama_dir, calib_file):
    import exporter.pipeline

    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter.pipeline, "check_parity", interrupt)  # after model.onnx is written
    code = main(export_args(llama_dir, calib_file, tmp_path / "x"))
    assert code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.rstrip().splitlines()[-1] == "exporter: interrupted; nothing was written"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Other commands


def test_profiles_list(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].split()[0] == "device"
    for name in ("jetson-orin-nano-8gb", "raspberry-pi-5", "iphone-15-pro", "host"):
        assert any(line.startswith(name) for line in lines[1:])
    assert main(["profiles", "list"]) == 0 and capsys.readouterr().out == out


def test_profiles_show_alias(capsys):
    assert main(["profiles", "show", "jetson-orin"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("jetson-orin-nano-8gb") and "jetson-orin" in out.splitlines()[0]
    for field in ("memory bandwidth", "GB/s", "source:", "execution providers", "max context"):
        assert field in out


def test_profiles_show_errors(capsys):
    assert main(["profiles", "show"]) != 0
    assert_one_line_error(capsys, "usage")
    assert main(["profiles", "show", "jetson-thor"]) != 0
    assert_one_line_error(capsys, "unknown device")


def test_python_m_exporter_help():
    result = subprocess.run([sys.executable, "-m", "exporter", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: exporter") and "export" in result.stdout and "profiles" in result.stdout
    result = subprocess.run([sys.executable, "-m", "exporter", "export", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--calib-seq-len" in result.stdout and "--device" in result.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    from exporter import __version__

    assert capsys.readouterr().out.strip() == f"exporter {__version__}"


def test_allocate_prints_ranks_without_exporting(workdir, capsys, llama_dir, calib_file):
    import json

    args = ["allocate", "--model", str(llama_dir), "--calib", str(calib_file), "--calib-samples", "4",
            "--calib-seq-len", "32", "--fisher-samples", "2", "--ratio", "0.4", "--device", "host",
            "--no-progress", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["projections"]) == 14  # 2 layers x 7 projections
    assert out["parameters"]["projection_fraction_removed"] >= 0.4 - 0.005
    assert out["allocation"]["projection_params"] <= out["allocation"]["budget_params"]
    assert set(out["device_budget"]) >= {"ram_bytes", "latency_bytes", "prefill_bytes", "binding"}
    assert not any(workdir.iterdir())  # nothing written
    assert main(args[:-1]) == 0  # the table form
    table = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in table and "the " in table and "budget binds" in table


def test_dense_model_that_fits_is_exported_dense(tmp_path, capsys, llama_dir, calib_file):
    import json

    out = tmp_path / "dense"
    args = ["export", "--model", str(llama_dir), "--calib", str(calib_file), "--device", "host",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "exporting it dense" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(entry["rank"] is None for entry in manifest["ranks"].values())
    assert manifest["parameters"]["projection_fraction_removed"] == 0.0


def test_budget_mb_too_small_names_the_smallest_feasible(tmp_path, capsys, llama_dir, calib_file):
    args = ["export", "--model", str(llama_dir), "--calib", str(calib_file), "--device", "host",
            "--out", str(tmp_path / "x"), "--budget-mb", "0.01", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "budget infeasible" in err and "smallest this model can be made" in err
    assert not (tmp_path / "x").exists()


def test_int4_export_uses_matmulnbits_and_records_both_parities(tmp_path, llama_dir, calib_file):
    pytest.importorskip("onnx_ir", reason="ONNX Runtime's int4 quantizer needs onnx-ir")
    import json

    import onnx

    out = tmp_path / "int4"
    assert main(export_args(llama_dir, calib_file, out, "--weights", "int4")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int4" and manifest["onnx"]["graph"] == "fused"
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_logit_diff"] < 1e-3  # fp32 twin
    assert manifest["parity"]["quantized"]["greedy_agreement"] >= 0.25
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "GroupQueryAttention" in ops


def test_latency_aware_export_prices_nodes_and_fragile_int4_levels_are_left_out(tmp_path, capsys, monkeypatch,
                                                                                 llama_dir, calib_file):
    """--latency-aware: the allocation records its node price and factorizes no more projections than
    without it, for the same parameters. A quantized level below the agreement floor is left out of the
    artifact with a message (its file too), not the export failed: its fp32 slicing is what parity proves."""
    pytest.importorskip("onnx_ir", reason="ONNX Runtime's int4 quantizer needs onnx-ir")
    import json

    import exporter.pipeline as pipeline
    from exporter.device.cost_model import node_price
    from exporter.device.profiles import load_profile

    def details(out, *extra):
        assert main(export_args(llama_dir, calib_file, out, "--weights", "int4", *extra)) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        return manifest, manifest["method"]["allocation_details"]

    _, plain = details(tmp_path / "plain", "--levels", "1.0")
    monkeypatch.setattr(pipeline, "QUANTIZED_MIN_AGREEMENT", 1.01)  # levels below full rank now fall short
    monkeypatch.setattr(pipeline, "check_parity", _passing_full_level(pipeline.check_parity))
    manifest, priced = details(tmp_path / "priced", "--latency-aware", "--levels", "1.0,0.5")
    assert plain["node_params"] == 0 and priced["node_params"] > 0
    assert priced["factorized"] < plain["factorized"], (priced, plain)
    assert abs(priced["projection_params"] - plain["projection_params"]) <= 0.02 * plain["budget_params"]
    assert [level["name"] for level in manifest["levels"]] == ["r100"]
    assert not (tmp_path / "priced" / "model.r50.onnx").exists()
    _, fixed = details(tmp_path / "fixed", "--latency-aware", "1000", "--levels", "1.0")  # a price in us
    assert fixed["node_params"] == pytest.approx(node_price(load_profile("host"), "int4", 1000.0))
    assert fixed["node_params"] > priced["node_params"] and fixed["factorized"] <= priced["factorized"]
    captured = capsys.readouterr()
    assert "level r50 left out" in captured.out + captured.err


def _passing_full_level(check_parity):
    """check_parity, with the full level's quantized check held to the usual floor (only the rank levels
    see the raised one)."""
    def check(model, path, *args, **kwargs):
        if path.name == "model.onnx" and kwargs.get("min_agreement", 0) > 1:
            kwargs["min_agreement"] = 0.25
        return check_parity(model, path, *args, **kwargs)
    return check


def test_fp16_export_writes_a_half_precision_graph_with_levels(tmp_path, llama_dir, calib_file):
    import json

    import onnx

    out = tmp_path / "fp16"
    assert main(export_args(llama_dir, calib_file, out, "--weights", "fp16", "--levels", "1.0,0.5")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and len(manifest["levels"]) == 2
    assert manifest["parity"]["quantized"]["passed"]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    past = next(i for i in graph.input if i.name == "past_key_values.0.key")
    assert past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_optimum_graph_on_request_and_int4_needs_the_fused_graph(tmp_path, capsys, llama_dir, calib_file):
    import json

    out = tmp_path / "opt"
    assert main(export_args(llama_dir, calib_file, out, "--graph", "optimum")) == 0
    assert json.loads((out / "manifest.json").read_text())["onnx"]["graph"] == "optimum"
    assert main(export_args(llama_dir, calib_file, tmp_path / "bad", "--graph", "optimum", "--weights", "int4")) == 2
    assert "needs the fused graph" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_budget_in_mb_buys_more_rank_at_int4_than_at_fp32(capsys, llama_dir, calib_file):
    import json

    def removed(weights):
        args = ["allocate", "--model", str(llama_dir), "--calib", str(calib_file), "--calib-samples", "4",
                "--calib-seq-len", "32", "--fisher-samples", "2", "--device", "host", "--no-progress", "--json",
                "--allocation", "uniform", "--weights", weights, "--budget-mb", "0.3"]
        assert main(args) == 0
        return json.loads(capsys.readouterr().out)["parameters"]["projection_fraction_removed"]

    at_int4, at_fp32 = removed("int4"), removed("fp32")
    assert at_fp32 > 0.0 and at_int4 < at_fp32


def test_correctives_count_in_the_budget(tmp_path, llama_dir, calib_file):
    import json

    out = tmp_path / "calr"
    assert main(export_args(llama_dir, calib_file, out, "--corrective-rank", "2")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    ranks, params = manifest["ranks"], manifest["parameters"]
    assert {r["corrective_rank"] for r in ranks.values() if r["rank"] is not None} == {2}
    kept = sum(r["out"] * r["in"] if r["rank"] is None else (r["rank"] + r["corrective_rank"]) * (r["out"] + r["in"])
               for r in ranks.values())
    assert params["projection_params"] == kept and params["projection_fraction_removed"] >= 0.3 - 1e-6
    correctives = manifest["method"]["correctives"]
    assert correctives["rank"] == 2 and len(correctives["block_error_before"]) == 2
    assert manifest["parity"]["passed"]  # the folded branches are in the graph: it still matches PyTorch


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_joint_factorization_exports_two_matmuls_per_group(tmp_path, tiny_models, calib_file, family):
    """--joint: q/k/v and gate/up are factorized as units (one rank, one shared down factor each), with
    CALR branches and rank levels; the int4 graph takes packed q/k/v from one second-stage MatMulNBits
    (no Split: GroupQueryAttention splits them) and still matches PyTorch through its fp32 twin."""
    pytest.importorskip("onnx_ir", reason="ONNX Runtime's int4 quantizer needs onnx-ir")
    import json
    from collections import Counter

    import onnx

    out = tmp_path / "joint"
    assert main(export_args(tiny_models.dir(family), calib_file, out, "--joint", "--weights", "int4",
                            "--corrective-rank", "2", "--levels", "1.0,0.5")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    kinds = {name.rsplit(".", 1)[-1] for name in manifest["ranks"]}
    assert kinds == {"q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj"}
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_logit_diff"] < 1e-3
    params = manifest["parameters"]
    assert params["projection_fraction_removed"] >= 0.3 - 1e-6
    for level in manifest["levels"]:
        graph = onnx.load(str(out / level["file"]), load_external_data=False).graph
        producers = {o: n for n in graph.node for o in n.output}
        for attention in (n for n in graph.node if n.op_type == "GroupQueryAttention"):
            qkv = producers[attention.input[0]]
            factorized = manifest["ranks"][next(n for n in manifest["ranks"] if "q_proj+" in n)]["rank"] is not None
            if family == "llama" and factorized:  # qwen2's biases are added after a Split
                assert attention.input[1] == attention.input[2] == ""
                assert qkv.op_type == "MatMulNBits" and producers[qkv.input[0]].op_type == "MatMulNBits"
        # Two MatMulNBits per factorized unit (V, then the stacked U), one per dense one, plus lm_head.
        expected = sum(1 if r["rank"] is None else 2 for r in manifest["ranks"].values()) + 1
        assert Counter(n.op_type for n in graph.node)["MatMulNBits"] == expected


def test_keep_freed_memory_and_its_opt_out(monkeypatch):
    import ctypes

    from exporter import cli

    calls = []

    class FakeLibc:
        def __init__(self, _name):
            self.mallopt = FakeMallopt()

    class FakeMallopt:
        def __call__(self, option, value):
            calls.append((option, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", FakeLibc)
    monkeypatch.delenv("EXPORTER_KEEP_FREED_MEMORY", raising=False)
    cli._keep_freed_memory()
    assert calls == [(-4, 0), (-1, 2**31 - 1)]  # M_MMAP_MAX, M_TRIM_THRESHOLD
    calls.clear()
    monkeypatch.setenv("EXPORTER_KEEP_FREED_MEMORY", "0")
    cli._keep_freed_memory()
    assert calls == []
