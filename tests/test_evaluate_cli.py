"""`exporter generate` and `exporter evaluate` on a tiny Llama artifact, and their one-line errors."""

from __future__ import annotations

import io
import json
import math
import sys

import numpy as np
import pytest

from exporter.cli import main
from exporter.errors import ExporterError
from exporter.runtime.evaluate import bootstrap_ratio, ort_perplexity, text_windows
from exporter.runtime.generation import OrtDecoder, Runtime

CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, llama_dir, calib_file):
    """The tiny Llama exported by the CLI, with a chat template added to its tokenizer config."""
    out = tmp_path_factory.mktemp("evaluate") / "art"
    args = ["export", "--model", str(llama_dir), "--calib", str(calib_file), "--calib-samples", "4",
            "--calib-seq-len", "32", "--ratio", "0.3", "--out", str(out), "--device", "host", "--no-progress",
            "--levels", "1.0"]  # one level: these tests are about the loop (tests/test_progressive.py: levels)
    capture = pytest.MonkeyPatch()  # capsys is function-scoped
    capture.setattr(sys, "stdout", io.StringIO())
    capture.setattr(sys, "stderr", io.StringIO())
    try:
        assert main(args) == 0
    finally:
        capture.undo()
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def articles(tmp_path_factory, calib_text):
    """Three articles made of the calibration text; the last one is long (it must be cut)."""
    lines = calib_text.splitlines()
    path = tmp_path_factory.mktemp("data") / "news.jsonl"
    records = [{"article": " ".join(lines[:4]), "highlights": lines[0]},
               {"article": " ".join(lines[4:9]), "highlights": lines[5], "id": "x"},
               {"article": " ".join(lines[9:]), "highlights": lines[9]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    return path


def one_line_error(capsys, code, *fragments):
    assert code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exporter: error:"), captured.err
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_generate_streams_the_greedy_text(artifact, capsys):
    code = main(["generate", str(artifact), "--prompt", "What does the engineer read?", "--max-new-tokens", "20",
                 "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    runtime = Runtime(artifact, threads=1)
    ids = runtime.prompt_ids("What does the engineer read?")
    assert ids[-2:] == runtime.encode("|>\n")[-2:]  # the chat template's assistant turn ends the prompt
    tokens, _, _ = OrtDecoder(artifact / "model.onnx", threads=1).greedy(ids, 20, stop_ids=runtime.stop_ids)
    assert captured.out == runtime.decode_text(tokens) + "\n" and captured.out.strip()
    summary = captured.err.strip().splitlines()
    assert len(summary) == 1 and f"{len(tokens)} tokens" in summary[0] and "tokens/s" in summary[0]
    assert "r100" in summary[0]


def test_generate_sampling_and_raw_prompt(artifact, capsys):
    args = ["generate", str(artifact), "--prompt", "The engineer", "--max-new-tokens", "16", "--no-chat-template",
            "--temperature", "1.5", "--schedule", "static"]
    outputs = []
    for seed in ("3", "3", "4"):
        assert main(args + ["--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


def test_evaluate_summarization_json(artifact, articles, capsys):
    code = main(["evaluate", str(artifact), "--task", "summarization", "--data", str(articles), "--limit", "5",
                 "--max-new-tokens", "24", "--max-prompt-tokens", "100", "--json", "--no-progress", "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["task"] == "summarization" and result["examples"] == 3 and result["schedule"] == "r100:0"
    assert 0.0 <= result["rougeL"] <= 1.0 and 0.0 <= result["rouge2"] <= result["rouge1"] <= 1.0
    assert 1 <= result["mean_generated_tokens"] <= 24
    assert result["mean_prompt_tokens"] <= 100 and result["truncated_articles"] >= 1
    assert result["decode_tokens_per_s"] > 0 and set(result["level_decode_tokens_per_s"]) <= {"r100"}
    assert "has 3 examples; evaluating 3 (--limit 5)" in captured.err
    per_example = result["per_example"]
    assert all(len(per_example[key]) == 3 for key in ("rouge1", "rouge2", "rougeL", "generated_tokens"))
    assert sum(per_example["rougeL"]) / 3 == pytest.approx(result["rougeL"], abs=1e-6)
    assert sum(per_example["generated_tokens"]) / 3 == pytest.approx(result["mean_generated_tokens"])


def test_bootstrap_ratio_interval():
    rng = np.random.default_rng(1)
    reference = rng.uniform(0.05, 0.4, 100)
    same = bootstrap_ratio(reference, reference)
    assert same["ratio"] == same["low"] == same["high"] == pytest.approx(1.0)
    half = bootstrap_ratio(reference, reference * 0.5)  # a constant factor: every draw gives it
    assert half["low"] == pytest.approx(0.5) and half["high"] == pytest.approx(0.5)
    other = np.clip(reference * 0.8 + rng.normal(0, 0.02, 100), 0, 1)
    paired = bootstrap_ratio(reference, other, target=0.85)
    assert paired["low"] < paired["ratio"] < paired["high"] and 0.0 <= paired["at_least_target"] < 0.5
    unpaired = bootstrap_ratio(reference, rng.permutation(other))  # the same scores, the pairs broken
    assert unpaired["ratio"] == pytest.approx(paired["ratio"])
    assert unpaired["high"] - unpaired["low"] > 2 * (paired["high"] - paired["low"])
    with pytest.raises(ExporterError, match="same examples"):
        bootstrap_ratio(reference, reference[:50])


def _summaries(path, artifact: str, scores, prompt_tokens: float):
    scores = [float(s) for s in scores]
    per_example = {metric: scores for metric in ("rouge1", "rouge2", "rougeL")}
    path.write_text(json.dumps({"task": "summarization", "artifact": artifact, "examples": len(scores),
                                "mean_prompt_tokens": prompt_tokens, "per_example": per_example,
                                **{metric: sum(scores) / len(scores) for metric in per_example}}))
    return str(path)


def test_paired_rouge_joins_runs_over_consecutive_slices(tmp_path):
    """benchmarks/paired_rouge.py: runs over slices joined with commas are scored as one run over all the articles;
    a join that does not slice the articles as the reference's does is a one-line error."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "paired_rouge.py"
    rng = np.random.default_rng(2)
    dense, art = rng.uniform(0.1, 0.3, 7), rng.uniform(0.05, 0.3, 7)
    d1, d2 = _summaries(tmp_path / "d1.json", "dense", dense[:3], 600.0), _summaries(tmp_path / "d2.json", "dense",
                                                                                       dense[3:], 650.0)
    a1, a2 = _summaries(tmp_path / "a1.json", "art", art[:3], 600.0), _summaries(tmp_path / "a2.json", "art",
                                                                                   art[3:], 650.0)

    def run(*args):
        return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)

    joined = run(f"{d1},{d2}", f"{a1},{a2}")
    assert joined.returncode == 0, joined.stderr
    row = joined.stdout.strip().splitlines()[-1].split(" | ")
    assert float(row[1]) == pytest.approx(art.mean(), abs=1e-4)
    assert float(row[2]) == pytest.approx(art.sum() / dense.sum(), abs=1e-3)
    for bad, message in (((f"{d1},{d2}", a1), "other articles"), ((f"{d1},{a2}", a1), "different artifacts")):
        failed = run(*bad)
        assert failed.returncode == 2 and message in failed.stderr and len(failed.stderr.strip().splitlines()) == 1


def test_evaluate_summarization_readable(artifact, articles, capsys):
    code = main(["evaluate", str(artifact), "--task", "summarization", "--data", str(articles), "--limit", "1",
                 "--max-new-tokens", "8", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "1 examples" in captured.out and "ROUGE-L F1:" in captured.out and "tokens/s" in captured.out
    assert captured.err == ""


def test_evaluate_perplexity(artifact, calib_file, tokenizer, capsys):
    code = main(["evaluate", str(artifact), "--task", "perplexity", "--data", str(calib_file), "--window", "32",
                 "--limit", "6", "--json", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["task"] == "perplexity" and result["examples"] == 6 and result["window"] == 32
    # The same windows through the transformers tokenizer give the same figure.
    windows = text_windows(tokenizer, calib_file, 32, 6)
    expected = ort_perplexity(OrtDecoder(artifact / "model.onnx"), windows, progress=False)
    assert math.isclose(result["perplexity"], expected, rel_tol=1e-6)
    assert 1.0 < result["perplexity"] < len(tokenizer) / 4  # a trained model beats uniform by far


def test_evaluate_perplexity_limit_beyond_the_file(artifact, calib_file, capsys):
    code = main(["evaluate", str(artifact), "--task", "perplexity", "--data", str(calib_file), "--window", "128",
                 "--limit", "1000", "--json", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    count = json.loads(captured.out)["examples"]
    assert 1 < count < 1000 and f"has {count} windows of 128 tokens; evaluating {count}" in captured.err


def test_bad_inputs_are_one_line_errors(artifact, articles, calib_file, tmp_path, capsys):
    summarize = ["--task", "summarization", "--data", str(articles), "--no-progress"]
    one_line_error(capsys, main(["generate", str(tmp_path / "absent"), "--prompt", "hi"]), "artifact not found")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, main(["evaluate", str(tmp_path / "empty"), *summarize]), "is not an artifact")
    one_line_error(capsys, main(["evaluate", str(artifact), "--task", "summarization",
                                 "--data", str(tmp_path / "absent.jsonl")]), "data file not found")
    one_line_error(capsys, main(["evaluate", str(artifact), "--task", "perplexity",
                                 "--data", str(tmp_path / "absent.txt")]), "data file not found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"article": "a", "highlights": "b"}) + "\n" + json.dumps({"article": "a"}) + "\n")
    one_line_error(capsys, main(["evaluate", str(artifact), "--task", "summarization", "--data", str(bad)]),
                   f"{bad}:2: no string field 'highlights'")
    bad.write_text("{not json\n")
    one_line_error(capsys, main(["evaluate", str(artifact), "--task", "summarization", "--data", str(bad)]),
                   f"{bad}:1: not valid JSON")
    one_line_error(capsys, main(["evaluate", str(artifact), *summarize, "--max-prompt-tokens", "10"]),
                   "takes 73 tokens without the article; the prompt budget is 10")
    one_line_error(capsys, main(["generate", str(artifact), "--prompt", "hi", "--schedule", "r85"]),
                   "unknown level 'r85'; known levels: r100")
    one_line_error(capsys, main(["evaluate", str(artifact), *summarize, "--schedule", "r100:2"]),
                   "the first entry must start at 0")
    one_line_error(capsys, main(["evaluate", str(artifact), "--task", "perplexity", "--data", str(calib_file),
                                 "--schedule", "r100:0,r100:4"]), "perplexity scores one level")
    short = tmp_path / "short.txt"
    short.write_text("The engineer reads a long letter.\n")
    one_line_error(capsys, main(["evaluate", str(artifact), "--task", "perplexity", "--data", str(short),
                                 "--window", "200"]), "too short for one 200-token window")
    one_line_error(capsys, main(["evaluate", str(artifact), "--task", "perplexity", "--data", str(calib_file),
                                 "--window", "4096"]), "exceeds the context of 256 tokens")
    no_template = tmp_path / "no-template"
    no_template.mkdir()
    for path in artifact.iterdir():
        (no_template / path.name).symlink_to(path)
    (no_template / "tokenizer_config.json").unlink()
    one_line_error(capsys, main(["generate", str(no_template), "--prompt", "hi"]),
                   "has no chat template; pass --no-chat-template")


def test_race_interval_brackets_the_median_of_paired_ratios():
    """benchmarks/race.py's bootstrap interval of the median per-round ratio: a point where every round agrees, and
    an interval around the median that narrows as rounds agree more; seeded, so it repeats."""
    import importlib.util
    from pathlib import Path

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    try:
        spec = importlib.util.spec_from_file_location("race", benchmarks / "race.py")
        race = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(race)
    finally:
        sys.path.remove(str(benchmarks))
    assert race.median_interval([1.02] * 15) == (pytest.approx(1.02), pytest.approx(1.02))
    rng = np.random.default_rng(1)
    wide, narrow = 1 + rng.normal(0, 0.08, 15), 1 + rng.normal(0, 0.01, 15)
    low, high = race.median_interval(list(wide))
    assert low <= float(np.median(wide)) <= high and race.median_interval(list(wide)) == (low, high)
    assert (lambda b: b[1] - b[0])(race.median_interval(list(narrow))) < high - low
