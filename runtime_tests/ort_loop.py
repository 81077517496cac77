"""A KV-cache decode loop over ONNX Runtime that needs only onnxruntime and numpy, and a probe that
times it in a fresh process (so its peak RSS is the model's, not pytest's):

    python ort_loop.py ARTIFACT/model.onnx --providers CPUExecutionProvider --prompt-tokens 128 --new-tokens 64

prints one JSON object: load, time to first token, prefill and per-step decode times, peak RSS.
Inputs `input_ids`, `attention_mask`, optional `position_ids`, `past_key_values.N.key/value`;
outputs `logits`, `present.N.key/value` (the exporter's and optimum's names).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def with_options(providers, provider_options: dict | None = None) -> list:
    """ONNX Runtime's providers argument: each name, as (name, options) where the profile gives options."""
    provider_options = provider_options or {}
    return [(name, dict(provider_options[name])) if provider_options.get(name) else name for name in providers]


class Decoder:
    def __init__(self, model_path, providers=("CPUExecutionProvider",), threads: int | None = None,
                 provider_options: dict | None = None):
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.path = Path(model_path)
        self.session = ort.InferenceSession(str(model_path), options,
                                            providers=with_options(providers, provider_options))
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past = [n for n in self.inputs if PAST.fullmatch(n)]
        # On CUDA an fp16 KV cache stays in GPU memory between steps (I/O binding), as an app should keep
        # it; an fp32 one is read by attention on the CPU provider (CUDA's is fp16-only), so it stays here.
        fp16_cache = any(self.inputs[n].type == "tensor(float16)" for n in self.past)
        self.kv_device = "cuda" if fp16_cache and self.session.get_providers()[0] == "CUDAExecutionProvider" else None
        # GroupQueryAttention graphs (the exporter's, the onnxruntime-genai builder's) append to a past buffer
        # bound as their own present: one buffer per layer, no copy of the whole cache every step.
        self.shared = self.session.get_modelmeta().custom_metadata_map.get("past_present_share_buffer") == "1"
        self._binding, self._bound, self._capacity = None, None, 0
        config_file = self.path.parent / "config.json"
        self.config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        # the longest sequence the graph serves: its rotary tables end there (the exporter records it; other
        # graphs: the model's max_position_embeddings)
        limit = self.session.get_modelmeta().custom_metadata_map.get("max_context")
        limit = limit or self.config.get("max_position_embeddings")
        self.max_context = int(limit) if limit else None

    def empty_cache(self) -> dict:
        cache = {}
        for name in self.past:
            _, heads, _, head_dim = self.inputs[name].shape
            if not isinstance(heads, int) or not isinstance(head_dim, int):  # symbolic: read config.json
                c = self.config
                heads = c.get("num_key_value_heads") or c["num_attention_heads"]
                head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
            cache[name] = np.zeros((1, heads, 0, head_dim), DTYPES[self.inputs[name].type])
        return cache

    def step(self, ids, cache: dict, past_len: int):
        """Logits [n, vocab] of n new tokens after `past_len` cached ones, and the new cache (with a shared
        buffer: the same buffers, written in place, so a cache is stepped from once)."""
        ids = np.asarray(ids, dtype=np.int64)[None, :]
        total = past_len + ids.shape[1]
        feed = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((1, total), np.int64)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(past_len, total, dtype=np.int64)[None, :]
        if self.shared:
            cache = self.buffers(cache, past_len, total)
            if self._bound is not cache:  # new buffers: bind them once, not every step (logits first)
                self._binding = self.session.io_binding()
                self._binding.bind_output("logits", "cpu")
                for name in self.past:
                    self._binding.bind_ortvalue_input(name, cache[name])
                    self._binding.bind_ortvalue_output(name.replace("past_key_values", "present"), cache[name])
                self._bound, self._capacity = cache, min(v.shape()[2] for v in cache.values())
            for name, value in feed.items():
                self._binding.bind_cpu_input(name, np.ascontiguousarray(value))
            self._binding.bind_output("logits", "cpu")
            self.session.run_with_iobinding(self._binding)
            return self._binding.get_outputs()[0].numpy()[0], cache
        if self.kv_device is None:
            out = dict(zip(self.outputs, self.session.run(self.outputs, {**feed, **cache})))
            logits = out["logits"]
        else:
            binding = self.session.io_binding()
            for name, value in {**feed, **cache}.items():
                if isinstance(value, np.ndarray):
                    binding.bind_cpu_input(name, np.ascontiguousarray(value))
                else:
                    binding.bind_ortvalue_input(name, value)
            for name in self.outputs:
                binding.bind_output(name, "cpu" if name == "logits" else self.kv_device)
            self.session.run_with_iobinding(binding)
            out = dict(zip(self.outputs, binding.get_outputs()))
            logits = out["logits"].numpy()
        return logits[0], {n: out[n.replace("past_key_values", "present")] for n in self.past}

    def buffers(self, cache: dict, past_len: int, needed: int) -> dict:
        """`cache` as shared buffers holding at least `needed` positions (doubling from 256 when outgrown)."""
        if cache is self._bound and needed <= self._capacity:  # the buffers of the last step: no scan per step
            return cache
        capacity = min((v.shape()[2] if isinstance(v, ort.OrtValue) else v.shape[2]) for v in cache.values())
        if all(isinstance(v, ort.OrtValue) for v in cache.values()) and needed <= capacity:
            return cache
        capacity = max(capacity, 256)
        while capacity < needed:
            capacity *= 2
        grown = {}
        for name, value in cache.items():
            host = value.numpy() if isinstance(value, ort.OrtValue) else value
            buffer = np.zeros((*host.shape[:2], capacity, host.shape[3]), host.dtype)
            buffer[:, :, :past_len] = host[:, :, :past_len]
            grown[name] = ort.OrtValue.ortvalue_from_numpy(buffer, self.kv_device or "cpu", 0)
        return grown

    def replay(self, prompt, tokens) -> np.ndarray:
        """Teacher forcing: logits [len(tokens), vocab], row i predicting tokens[i]."""
        logits, cache = self.step(prompt, self.empty_cache(), 0)
        rows, length = [logits[-1]], len(prompt)
        for token in tokens[:-1]:
            logits, cache = self.step([token], cache, length)
            rows.append(logits[-1])
            length += 1
        return np.stack(rows).astype(np.float32)

    def vocab_size(self) -> int:
        size = self.session.get_outputs()[self.outputs.index("logits")].shape[-1]
        return size if isinstance(size, int) else int(self.config["vocab_size"])


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM) in MB (10^6 bytes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    import resource  # no /proc (macOS): ru_maxrss is in bytes there, KiB on Linux

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def probe(model_path, providers, prompt_tokens: int, new_tokens: int, threads=None, seed: int = 0,
          provider_options: dict | None = None) -> dict:
    start = time.perf_counter()
    decoder = Decoder(model_path, providers, threads, provider_options)
    load_s = time.perf_counter() - start
    limit = decoder.max_context
    if limit and prompt_tokens + new_tokens > limit:  # rotary tables end there
        prompt_tokens = limit - new_tokens
    prompt = np.random.default_rng(seed).integers(0, decoder.vocab_size(), prompt_tokens)

    def prefill():
        start = time.perf_counter()
        logits, cache = decoder.step(prompt, decoder.empty_cache(), 0)
        token = int(np.argmax(logits[-1]))
        return (time.perf_counter() - start) * 1e3, token, cache

    ttft_ms, _, _ = prefill()  # cold: the first request after loading
    runs = [prefill() for _ in range(3)]
    _, token, cache = runs[-1]
    step_ms, length = [], prompt_tokens
    for _ in range(new_tokens):
        start = time.perf_counter()
        logits, cache = decoder.step([token], cache, length)
        token = int(np.argmax(logits[-1]))
        step_ms.append((time.perf_counter() - start) * 1e3)
        length += 1
    return {
        "providers": decoder.session.get_providers(),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "load_s": load_s,
        "ttft_ms": ttft_ms,
        "prefill_ms": float(np.median([r[0] for r in runs])),
        "decode_ms": step_ms,
        "decode_ms_p50": float(np.percentile(step_ms, 50)),
        "decode_ms_p95": float(np.percentile(step_ms, 95)),
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--providers", default="CPUExecutionProvider", help="comma-separated, in order")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, help="intra-op threads (default: ONNX Runtime's)")
    parser.add_argument("--provider-options", type=json.loads, default={},
                        help='JSON: {"PROVIDER": {"option": "value"}} (a device profile\'s runtime.provider_options)')
    args = parser.parse_args()
    print(json.dumps(probe(args.model, args.providers.split(","), args.prompt_tokens, args.new_tokens, args.threads,
                           provider_options=args.provider_options)))


if __name__ == "__main__":
    main()
