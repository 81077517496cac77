"""Run the onnxruntime-genai 0.18 builder on a Gemma 3 checkpoint saved by transformers 5, from `.venv-builder`:

    .venv-builder/bin/python benchmarks/builder_shim.py -i HF_DIR -o OUT -p int4 -e cpu -c CACHE

The builder reads one flat `rope_parameters` dict and `rope_local_base_freq`; transformers 5 keeps one rope dict per
layer type. Flattened here (the global layers' dict; the sliding layers' theta as rope_local_base_freq) as the builder
loads the config; nothing else changes, and any other model passes through untouched."""
import runpy
import sys

import transformers

original = transformers.AutoConfig.from_pretrained.__func__


def from_pretrained(cls, *args, **kwargs):
    config = original(cls, *args, **kwargs)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope and "sliding_attention" in rope:
        config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        config.rope_parameters = dict(rope["full_attention"])
        config.rope_theta = config.rope_parameters["rope_theta"]
    return config


transformers.AutoConfig.from_pretrained = classmethod(from_pretrained)
sys.argv = ["builder", *sys.argv[1:]]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
