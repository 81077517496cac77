"""genai_config.json: lets onnxruntime-genai (its Python, C#, Java/Kotlin and Swift/Objective-C APIs)
load a fused-graph artifact with `og.Model(artifact_dir)`.

The fused graph has the builder's I/O names, so the config only describes the model and how to
search. Its GroupQueryAttention can append to a past buffer bound as its own present, so
`past_present_share_buffer` is true, as in the builder's config: onnxruntime-genai allocates the cache once
at `context_length` positions instead of copying a longer one every step (SmolLM2-135M FLRC 40% int4,
2 threads, 128-token prompt: 5.17 -> 4.23 ms per step, the same tokens).

The same config describes fp32 and fp16 graphs (`--weights fp16`): onnxruntime-genai takes the KV cache
and logits types from the graph's inputs and outputs (tested with onnxruntime-genai 0.18 on the CPU
provider, where an fp16 graph generates the exporter runtime's tokens). `provider_options` stays empty
(the CPU provider) for fp16 graphs too: a "cuda" entry makes og.Model fail to load wherever the CUDA
build of onnxruntime-genai is missing, so CUDA is chosen at load time (`config.append_provider("cuda")`,
docs/deploying.md, "Jetson").
"""

from __future__ import annotations

import json
from pathlib import Path

from exporter.architectures import ARCHITECTURES
from exporter.source.tokenizer import stop_token_ids


def genai_config(model, tokenizer, filename: str = "model.onnx", context_length: int | None = None) -> dict:
    """The config for `model`'s fused graph; its special ids are the tokenizer's (the artifact's tokenizer.json
    is what onnxruntime-genai encodes with), and eos_token_id lists every id that ends a turn."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    eos = stop_token_ids(tokenizer, model)
    context = context_length or int(getattr(config, "max_position_embeddings", 2048))
    pad = next((i for i in (tokenizer.pad_token_id, config.pad_token_id) if i is not None), eos[0] if eos else 0)
    bos = next((i for i in (tokenizer.bos_token_id, config.bos_token_id) if i is not None), pad)
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            },
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": pad,
            "type": ARCHITECTURES[config.model_type].genai_type if config.model_type in ARCHITECTURES
            else config.model_type,
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 50, "top_p": 1.0,
        },
    }


def write_genai_config(out_dir: Path, model, tokenizer, filename: str = "model.onnx",
                       context_length: int | None = None) -> Path:
    path = Path(out_dir) / "genai_config.json"
    path.write_text(json.dumps(genai_config(model, tokenizer, filename, context_length), indent=4) + "\n")
    return path
