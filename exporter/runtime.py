"""A KV-cache decoder loop over ONNX Runtime that needs only onnxruntime and numpy.

Works with any decoder exported with optimum's names: `input_ids`, `attention_mask`,
optional `position_ids`, `past_key_values.N.key/value` -> `logits`, `present.N.key/value`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")


@dataclass
class KVCache:
    """Present tensors of the last step, keyed by the next step's past input names."""

    tensors: dict[str, np.ndarray]
    length: int = 0


@dataclass
class DecodeTiming:
    prefill_s: float = 0.0
    step_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / float(np.median(self.step_s)) if self.step_s else 0.0


class OrtDecoder:
    def __init__(self, model_path, threads: int | None = None, providers=None, session_options=None):
        import onnxruntime as ort

        options = session_options or ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.model_path = str(model_path)
        self.session = ort.InferenceSession(str(model_path), options, providers=providers or ["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = sorted((n for n in self.inputs if _PAST.fullmatch(n)),
                                 key=lambda n: (int(_PAST.fullmatch(n)[1]), n))

    def empty_cache(self, batch: int) -> KVCache:
        tensors = {}
        for name in self.past_names:
            meta = self.inputs[name]
            _, heads, _, head_dim = meta.shape
            if not isinstance(heads, int) or not isinstance(head_dim, int):
                heads, head_dim = self._kv_dims()
            tensors[name] = np.zeros((batch, heads, 0, head_dim), dtype=_ORT_TO_NUMPY[meta.type])
        return KVCache(tensors, 0)

    def _kv_dims(self) -> tuple[int, int]:
        """KV heads and head size when the graph leaves them symbolic (the genai builder does)."""
        import json
        from pathlib import Path

        folder = Path(self.model_path).parent
        genai = folder / "genai_config.json"
        if genai.is_file():
            decoder = json.loads(genai.read_text())["model"]["decoder"]
            return decoder["num_key_value_heads"], decoder["head_size"]
        config = json.loads((folder / "config.json").read_text())
        heads = config.get("num_key_value_heads") or config["num_attention_heads"]
        return heads, config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]

    def step(self, input_ids: np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Run new tokens [batch, n] after the cached ones; returns logits [batch, n, vocab]."""
        batch, n = input_ids.shape
        total = cache.length + n
        feed = {"input_ids": input_ids.astype(np.int64)}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((batch, total), dtype=np.int64)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.broadcast_to(np.arange(cache.length, total, dtype=np.int64), (batch, n)).copy()
        feed.update(cache.tensors)
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        present = {name: outputs[name.replace("past_key_values", "present")] for name in self.past_names}
        return outputs["logits"], KVCache(present, total)

    def greedy(self, prompt_ids, max_new_tokens: int, forced_tokens=None, stop_ids=()):
        """Greedy decoding; `forced_tokens` feeds given tokens instead (teacher forcing for parity).

        Returns (generated token ids, logits of every step [steps, vocab], timing).
        """
        timing = DecodeTiming()
        cache = self.empty_cache(1)
        start = time.perf_counter()
        logits, cache = self.step(np.asarray(prompt_ids, dtype=np.int64)[None, :], cache)
        timing.prefill_s = time.perf_counter() - start
        step_logits = [logits[0, -1]]
        tokens = []
        for i in range(max_new_tokens):
            token = int(np.argmax(step_logits[-1])) if forced_tokens is None else int(forced_tokens[i])
            tokens.append(token)
            if token in stop_ids or i == max_new_tokens - 1:
                break
            start = time.perf_counter()
            logits, cache = self.step(np.array([[token]], dtype=np.int64), cache)
            timing.step_s.append(time.perf_counter() - start)
            step_logits.append(logits[0, -1])
        return tokens, np.stack(step_logits), timing
