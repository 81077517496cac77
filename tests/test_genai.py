"""onnxruntime-genai loads a fused-graph artifact and generates what the exporter's runtime generates."""

from __future__ import annotations

import pytest
from conftest import genai_greedy

from exporter.cli import main
from exporter.graph.genai_config import write_genai_config
from exporter.graph.writer import write_decoder
from exporter.runtime.generation import OrtDecoder


def test_onnxruntime_genai_generates_like_the_exporter_runtime(tmp_path, llama_dir, calib_file):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    out = tmp_path / "art"
    args = ["export", "--model", str(llama_dir), "--calib", str(calib_file), "--calib-samples", "4",
            "--calib-seq-len", "32", "--ratio", "0.3", "--out", str(out), "--device", "host", "--no-progress"]
    assert main(args) == 0
    assert (out / "genai_config.json").is_file()

    prompt = [5, 17, 42, 9, 33, 60, 12, 7]
    steps = 8
    expected, _, _ = OrtDecoder(out / "model.onnx", threads=1).greedy(prompt, steps)

    generated = genai_greedy(og, out, prompt, steps)
    assert len(generated) >= 1 and generated == expected[: len(generated)]


def test_onnxruntime_genai_runs_the_fp16_graph(tmp_path, tiny_models, tokenizer):
    """The same genai_config.json describes an fp16 graph: onnxruntime-genai takes the fp16 KV cache and
    logits types from the graph (here on the CPU provider)."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    model = tiny_models.load("qwen3")
    path = write_decoder(model, tmp_path, weights="fp16")
    tokenizer.save_pretrained(tmp_path)
    write_genai_config(tmp_path, model, tokenizer, path.name)
    prompt = [5, 17, 42, 9, 33, 60, 12, 7]
    steps = 8
    expected, _, _ = OrtDecoder(path, threads=1).greedy(prompt, steps)
    generated = genai_greedy(og, tmp_path, prompt, steps)
    assert len(generated) >= 1 and generated == expected[: len(generated)]


def test_onnxruntime_genai_runs_gemma3(tmp_path, tiny_models, tokenizer):
    """Gemma 3's fused graph (gemma3_text in genai_config.json): onnxruntime-genai generates the exporter
    runtime's tokens, past the sliding window of its local layers."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    model = tiny_models.load("gemma3_text")
    path = write_decoder(model, tmp_path)
    tokenizer.save_pretrained(tmp_path)
    write_genai_config(tmp_path, model, tokenizer, path.name)
    prompt = [5, 17, 42, 9, 33, 60, 12, 7, 21, 30]
    steps = 8
    assert len(prompt) + steps > model.config.sliding_window
    expected, _, _ = OrtDecoder(path, threads=1).greedy(prompt, steps)
    generated = genai_greedy(og, tmp_path, prompt, steps)
    assert len(generated) >= 1 and generated == expected[: len(generated)]
