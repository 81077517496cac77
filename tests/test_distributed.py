"""Data-parallel statistics over torch.distributed: two gloo processes started by torchrun, as users start them,
against one process. CPU only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from exporter.compress.factorize import decompose_model
from exporter.compress.grams import iter_layer_grams
from exporter.compress.importance import EMBEDDING, component_fisher, output_sensitivity

SEQ_LEN = 32


def torchrun(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 ARGS`, with the session's EXPORTER_CACHE (its host measurements)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "EXPORTER_COLLECTIVE_TIMEOUT": "60", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(29500 + os.getpid() % 1000), *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


STATISTICS = """
import sys, torch
from transformers import AutoModelForCausalLM
from torch import nn
from exporter.compress import distributed
from exporter.compress.factorize import decompose_model
from exporter.compress.grams import iter_layer_grams
from exporter.compress.importance import EMBEDDING, component_fisher, output_sensitivity

model_dir, ids_path, out = sys.argv[1:4]
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
ids = torch.load(ids_path)
distributed.start(torch.device("cpu"))
assert distributed.world_size() == 2
grams = {n: g for _, _, layer in iter_layer_grams(model, ids, progress=False) for n, g in layer.items()}
import exporter.compress.factorize as factorize
calls, decompose = [], factorize.decompose
factorize.decompose = lambda *args, **kwargs: calls.append(1) or decompose(*args, **kwargs)
decompositions = decompose_model(model, "whitened", ids, progress=False, full_rank=True)
factorize.decompose = decompose
counts = [None, None]
torch.distributed.all_gather_object(counts, len(calls))  # each rank factorized its share
fisher = component_fisher(model, decompositions, ids[:4], progress=False)
names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
found = output_sensitivity(model, ids[:4], names, progress=False)
sensitivity = {n: s.channels for n, s in found.items()}
tokens = [found[EMBEDDING].token_energy, found[EMBEDDING].token_count]
if distributed.rank() == 0:
    torch.save({"grams": grams, "fisher": fisher, "sensitivity": sensitivity, "counts": counts,
                "units": list(decompositions), "tokens": tokens}, out)
distributed.stop()
"""


def test_two_processes_compute_the_statistics_of_one(llama_dir, tiny_models, calib_ids, tmp_path):
    ids = calib_ids[:6, :SEQ_LEN]
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "dp_statistics.py"  # not statistics.py: the script's folder leads sys.path
    script.write_text(textwrap.dedent(STATISTICS))
    run = torchrun([str(script), str(llama_dir), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")])
    assert run.returncode == 0, run.stderr[-3000:]
    two = torch.load(tmp_path / "out.pt")
    model = tiny_models.load("llama")
    grams = {n: g for _, _, layer in iter_layer_grams(model, ids, progress=False) for n, g in layer.items()}
    decompositions = decompose_model(model, "whitened", ids, progress=False, full_rank=True)
    fisher = component_fisher(model, decompositions, ids[:4], progress=False)
    names = list(two["sensitivity"])[:-1]  # the embedding's entry last
    sensitivity = output_sensitivity(model, ids[:4], names, progress=False)
    assert set(two["grams"]) == set(grams)
    assert two["units"] == list(decompositions)  # every unit, in one process's order
    assert sum(two["counts"]) == len(decompositions) and min(two["counts"]) > 0  # each SVD once, on one rank
    for name, gram in grams.items():  # float32 products per batch, and other batches: float tolerance
        torch.testing.assert_close(two["grams"][name], gram, rtol=1e-4, atol=1e-6 * float(gram.abs().max()))
    for name, scores in fisher.items():
        # from factorizations of those Grams: the same to their tolerance
        torch.testing.assert_close(two["fisher"][name], scores, rtol=1e-3, atol=1e-6 * float(scores.max()))
    for name, s in sensitivity.items():
        torch.testing.assert_close(two["sensitivity"][name], s.channels, rtol=1e-4,
                                   atol=1e-6 * float(s.channels.max()))
    energy, count = two["tokens"]  # each token's embedding-gradient energy, summed over both processes' sequences
    assert torch.equal(count, sensitivity[EMBEDDING].token_count) and float(count.sum()) == ids[:4].numel()
    torch.testing.assert_close(energy, sensitivity[EMBEDDING].token_energy, rtol=1e-4,
                               atol=1e-6 * float(energy.max()))


TRAINING = """
import sys, torch
from transformers import AutoModelForCausalLM
from exporter.compress import corrective, distributed
from exporter.compress.corrective import attach_correctives, dense_teacher, train_end_to_end
from exporter.compress.factorize import apply_ranks, decoder_projections, decompose_model, uniform_ranks
from exporter.compress.grid import QuantFormat
from exporter.compress.quantize import grid_linears, grid_of, quantize_model
from exporter.compress.scale_tuning import tune_scales
from exporter.settings import CorrectiveOptions

model_dir, ids_path, out = sys.argv[1:4]
torch.set_num_threads(1)
distributed.start(torch.device("cpu"))
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
ids = torch.load(ids_path)
teacher = dense_teacher(model)
decompositions = decompose_model(model, "whitened", ids, progress=False)
apply_ranks(model, decompositions, uniform_ranks(decoder_projections(model), 0.3))
attach_correctives(model, decompositions, 4)
shares, kl = [], corrective.kl_divergence
def recording(student, teacher, batch):
    if student.training:
        shares.append(batch.shape[0])
    return kl(student, teacher, batch)
corrective.kl_divergence = recording
train_end_to_end(model, teacher, ids, CorrectiveOptions(kl_steps=6, kl_batch_size=2, holdout=2), progress=False)
branches = {n: p.detach().clone() for n, p in model.named_parameters() if "corrective" in n}
quantize_model(model, lambda name: QuantFormat(4, 16, False), None, method="rtn", head_method="rtn", progress=False)
tune_scales(model, teacher, ids, 4, batch_size=2, holdout=2, progress=False)
scales = {n: torch.from_numpy(grid_of(m).scales) for n, m in grid_linears(model).items()}
if distributed.rank() == 0:
    torch.save({"branches": branches, "scales": scales, "shares": shares}, out)
distributed.stop()
"""


def test_two_processes_train_as_one_under_distributed_data_parallel(llama_dir, calib_ids, tmp_path):
    """The end-to-end KL steps (corrective branches, then scale tuning) under DistributedDataParallel: each rank
    trains on its half of every batch, and the trained weights are those of one process on the whole batches."""
    ids = calib_ids[:8, :SEQ_LEN]
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "dp_training.py"
    script.write_text(textwrap.dedent(TRAINING))
    run = torchrun([str(script), str(llama_dir), str(tmp_path / "ids.pt"), str(tmp_path / "two.pt")])
    assert run.returncode == 0, run.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt")
    assert two["shares"] == [1] * 6  # one sequence of each batch of 2 per rank: the gradients were averaged
    run = subprocess.run([sys.executable, str(script), str(llama_dir), str(tmp_path / "ids.pt"), str(tmp_path / "one.pt")],
                         env={**os.environ, "OMP_NUM_THREADS": "1",
                              "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    one = torch.load(tmp_path / "one.pt")
    assert one["shares"] == [2] * 6
    assert set(two["branches"]) == set(one["branches"]) and two["branches"]
    for name, weight in one["branches"].items():
        assert not torch.equal(weight, torch.zeros_like(weight)) or "up" not in name
        # all-reduced gradients sum in another order: entries near zero move by ~1e-7 (seen in CI: 7.2e-8, one of
        # 512); ranks stepping on their own halves without the all-reduce would part by far more
        torch.testing.assert_close(two["branches"][name], weight, rtol=1e-3, atol=1e-4 * float(weight.abs().max()))
    for name, scales in one["scales"].items():
        torch.testing.assert_close(two["scales"][name], scales, rtol=1e-3, atol=1e-7)


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_torchrun_export_writes_the_artifact_of_one_process(llama_dir, calib_file, tmp_path):
    from exporter import cli

    args = ["export", "--device", "raspberry-pi-5", "--model", str(llama_dir), "--calib", str(calib_file), "--ratio", "0.3",
            "--weights", "int4", "--no-correctives", "--calib-samples", "8", "--calib-seq-len", "64",
            "--fisher-samples", "4", "--compute", "cpu", "--no-progress", "--force"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main([*args, "--out", str(one)]) == 0
    run = torchrun(["-m", "exporter", *args, "--out", str(two), "--fresh-statistics"])  # computed here, not read
    assert run.returncode == 0, run.stderr[-3000:]
    assert "summary" not in run.stdout or run.stdout.count(str(two)) >= 1  # rank 0 alone reports
    first, second = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert second["method"]["world_size"] == 2 and "rank r reads windows r, r+N" in second["method"]["sharding"]
    assert "world_size" not in first["method"]
    assert second["ranks"] == first["ranks"]  # the same allocation
    a, b = _initializers(one / first["onnx"]["file"]), _initializers(two / second["onnx"]["file"])
    assert set(a) == set(b)
    # Grams summed in another order can move a value across a rounding boundary of GPTQ, which carries the change
    # along its row (a code, or a later block's scale): a few entries of the grids differ, nothing else
    for name in a:
        same = a[name] == b[name] if a[name].dtype == np.uint8 else np.isclose(b[name], a[name], rtol=1e-4, atol=1e-6)
        grid = name.endswith(("_Q4", "_Q8", "_scales", "_zero_points")) or a[name].dtype == np.uint8
        assert same.mean() > (0.97 if grid else 1.0 - 1e-9), name


def test_torchrun_auto_export_chooses_as_one_process(llama_dir, calib_file, tmp_path, capsys):
    """`--weights auto` over two processes: each prices half the units, the prices are exchanged, both choose the
    formats one process chooses; scale tuning runs under DistributedDataParallel; the weights are one process's."""
    from exporter import cli

    args = ["export", "--device", "raspberry-pi-5", "--model", str(llama_dir), "--calib", str(calib_file), "--weights", "auto",
            "--calib-samples", "8", "--calib-seq-len", "64", "--fisher-samples", "4", "--compute", "cpu",
            "--no-progress"]
    assert cli.main(["allocate", *args[1:], "--budget-mb", "1000", "--json"]) == 0
    args += ["--tune-scales", "4"]
    formats = json.loads(capsys.readouterr().out)["formats"]
    budget = f"{(formats['smallest_bytes'] + formats['chosen_bytes']) / 2 / 1e6:.4f}"  # the knapsack has to mix
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main([*args, "--budget-mb", budget, "--out", str(one), "--force"]) == 0
    run = torchrun(["-m", "exporter", *args, "--budget-mb", budget, "--out", str(two), "--force", "--fresh-statistics"])
    assert run.returncode == 0, run.stderr[-3000:]
    first, second = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert second["method"]["world_size"] == 2
    chosen = [(u["unit"], u["format"]) for u in first["method"]["formats"]["units"]]
    assert len({f for _, f in chosen}) > 1
    assert [(u["unit"], u["format"]) for u in second["method"]["formats"]["units"]] == chosen
    for a, b in zip(first["method"]["formats"]["units"], second["method"]["formats"]["units"]):
        assert b["predicted_loss_increase"] == pytest.approx(a["predicted_loss_increase"], rel=1e-3, abs=1e-9)
    a, b = _initializers(one / first["onnx"]["file"]), _initializers(two / second["onnx"]["file"])
    assert set(a) == set(b)
    for name in a:  # as above: a few grid entries may cross a rounding boundary, tuned scales to float tolerance
        same = a[name] == b[name] if a[name].dtype == np.uint8 else np.isclose(b[name], a[name], rtol=1e-3, atol=1e-6)
        assert same.mean() > 0.97, name


FAILING_RANK = """
import os, sys
import exporter.pipeline as pipeline
from exporter import cli
from exporter.errors import ModelError

if os.environ["RANK"] == "1":  # rank 1 fails after the group is formed; rank 0 waits in a collective
    def missing(*_args, **_kwargs):
        raise ModelError("no model here (rank 1)")
    pipeline.resolve_model = missing
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_failing_rank_ends_the_job_with_one_line_errors(llama_dir, calib_file, tmp_path):
    script = tmp_path / "dp_failing.py"
    script.write_text(textwrap.dedent(FAILING_RANK))
    start = time.monotonic()
    run = torchrun([str(script), "export", "--device", "raspberry-pi-5", "--model", str(llama_dir), "--calib", str(calib_file),
                    "--ratio", "0.3", "--no-correctives", "--calib-samples", "4", "--calib-seq-len", "32",
                    "--compute", "cpu", "--no-progress", "--out", str(tmp_path / "out")], timeout=200)
    assert run.returncode != 0
    assert time.monotonic() - start < 150  # no hang: the peer's exit fails the collective (timeout 60 s at worst)
    errors = [line for line in run.stderr.splitlines() if line.startswith("exporter: error:")]
    assert any("no model here (rank 1)" in line for line in errors), run.stderr[-3000:]
    # rank 0, waiting in a collective, ends with its own line: torchrun stopped it, or the collective failed
    assert any("rank 0 of 2" in line for line in errors), run.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_a_stop_that_arrives_inside_a_wrapping_import_is_still_one_line(monkeypatch, capsys):
    """torchrun's SIGTERM can arrive while rank 0 still imports transformers, whose lazy import re-raises it as a
    ModuleNotFoundError (seen in CI): the rank still ends with its one line, not a traceback."""
    from exporter import cli
    from exporter.compress import distributed

    def interrupted_import(_args):
        try:
            raise distributed.Stopped("rank 0 of 2: stopped by torchrun because another process failed")
        except distributed.Stopped as exc:
            raise ModuleNotFoundError("Could not import module 'AutoModelForCausalLM'") from exc

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "stop_on_sigterm", lambda: None)
    monkeypatch.setattr(cli, "_profiles", interrupted_import)
    assert cli.main(["profiles"]) == 1
    assert capsys.readouterr().err.strip() == "exporter: error: rank 0 of 2: stopped by torchrun because another " \
        "process failed"
    def missing_module(_args):
        raise ModuleNotFoundError("numpy")

    monkeypatch.setattr(cli, "_profiles", missing_module)
    with pytest.raises(ModuleNotFoundError):  # a real missing module keeps its traceback
        cli.main(["profiles"])


@pytest.mark.parametrize("count", [1])
def test_fewer_windows_than_processes_is_a_one_line_error(count, monkeypatch):
    from exporter.compress import distributed
    from exporter.errors import ExporterError

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ExporterError, match="1 calibration sequences for 2 processes"):
        distributed.shard(torch.zeros(count, 4, dtype=torch.long))
