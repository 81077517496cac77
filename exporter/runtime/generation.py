"""Generation over ONNX Runtime; needs only numpy and onnxruntime (plus `tokenizers` and `jinja2` for text).

* `OrtDecoder`: one decoder graph with optimum's / the builder's names: `input_ids`, `attention_mask`,
  optional `position_ids`, `past_key_values.N.key/value` -> `logits`, `present.N.key/value`.
* `decode`: the one token loop (greedy, sampling, teacher forcing), switching rank levels at scheduled
  steps with the KV cache carried across (every level has the same cache shapes).
* `Runtime`: an artifact directory: its levels and schedule (manifest.json), one `OrtDecoder` per level
  (created on first use; a schedule of several levels loads them over one shared copy of the weights,
  `exporter.runtime.shared_weights`, a single level gets a plain, faster session), tokenizer, chat template and
  stop tokens.
"""

from __future__ import annotations

import bisect
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from exporter.artifact.manifest import MANIFEST
from exporter.errors import ExporterError

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
SCHEDULE_SYNTAX = "static, a level name, or LEVEL:START,LEVEL:START,... (e.g. r100:0,r85:32)"


@dataclass
class KVCache:
    """The KV cache after `length` tokens, keyed by the next step's past input names: numpy arrays, or
    ONNX Runtime OrtValues (OrtDecoder's kv_device, kv_buffer).

    A shared buffer (`capacity` set) holds [batch, heads, capacity, head] per name, valid up to `length`;
    each step writes its new keys and values into it in place, so a cache can be stepped from only once:
    `cursor` (one list, shared by every KVCache over the same buffer) holds the length last written."""

    tensors: dict[str, object]
    length: int = 0
    capacity: int | None = None
    cursor: list[int] | None = None

    def check_fresh(self) -> None:
        """ValueError if a later step already wrote into this cache's shared buffer."""
        if self.capacity is not None and self.cursor[0] != self.length:
            raise ValueError(f"this KV cache ({self.length} tokens) was already stepped from, to {self.cursor[0]} "
                             "tokens: a shared buffer is written in place and cannot branch")

    def arrays(self) -> dict[str, np.ndarray]:
        """The cache as host arrays [batch, heads, length, head] (copies where it is held elsewhere)."""
        self.check_fresh()
        arrays = {name: value if isinstance(value, np.ndarray) else value.numpy()
                  for name, value in self.tensors.items()}
        if self.capacity is None:
            return arrays
        return {name: np.ascontiguousarray(array[:, :, :self.length]) for name, array in arrays.items()}


@dataclass
class DecodeTiming:
    prefill_s: float = 0.0
    step_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / float(np.median(self.step_s)) if self.step_s else 0.0


class OrtDecoder:
    """One decoder session. `kv_device`: where step() leaves the KV cache between steps ("cuda": in GPU
    memory through ONNX Runtime's I/O binding, not copied to the host and back every step: 21-47% of a
    CUDA decode step, docs/deploying.md, "Jetson"; None: host memory). Default: "cuda" when CUDA is the session's first
    provider and the cache is fp16: CUDA runs GroupQueryAttention in fp16 only, so an fp32 cache is read by
    attention on the CPU provider, and binding it to the GPU made such a graph slower (10.1 vs 7.0 ms per
    step, int4 with fp32 activations on an H200).

    `kv_buffer`: "shared" binds each past input and its present output to one preallocated buffer, which
    GroupQueryAttention appends to in place (onnxruntime-genai's past_present_share_buffer); "growing"
    feeds the last step's presents back, a new, longer copy of the whole cache every step (the only way
    for graphs that concatenate the cache themselves, as optimum's do). Default ("auto"): shared when the
    graph declares it (metadata `past_present_share_buffer`, written by exporter.graph.writer, or the
    folder's genai_config.json, as the onnxruntime-genai builder writes it). SmolLM2-135M int4 on 2
    threads, 128-token prompt, 64 steps: 5.77 -> 4.67 ms per step (FLRC 40%), 6.56 -> 5.27 (the
    builder's graph), the same logits to the bit."""

    def __init__(self, model_path, threads: int | None = None, providers=None, session_options=None,
                 kv_device: str | None = "auto", kv_buffer: str = "auto"):
        import onnxruntime as ort

        options = session_options or ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.model_path = str(model_path)
        genai = Path(self.model_path).parent / "genai_config.json"  # beside a builder's graph (and ours)
        self._genai = json.loads(genai.read_text()) if genai.is_file() else None
        self.session = ort.InferenceSession(str(model_path), options, providers=providers or ["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = sorted((n for n in self.inputs if _PAST.fullmatch(n)),
                                 key=lambda n: (int(_PAST.fullmatch(n)[1]), n))
        if kv_device == "auto":
            fp16_cache = any(self.inputs[n].type == "tensor(float16)" for n in self.past_names)
            kv_device = "cuda" if fp16_cache and self.session.get_providers()[0] == "CUDAExecutionProvider" else None
        self.kv_device = kv_device
        if kv_buffer == "auto":
            kv_buffer = "shared" if self._declares_shared_buffer() else "growing"
        if kv_buffer not in ("shared", "growing"):
            raise ValueError(f"kv_buffer must be 'shared', 'growing' or 'auto', not {kv_buffer!r}")
        self.kv_buffer = kv_buffer
        self._binding, self._bound = None, None  # the shared path's I/O binding and the buffers it holds
        # the longest sequence the graph serves (its rotary tables end there); graphs that do not say: the
        # model's max_position_embeddings, or None
        limit = self.session.get_modelmeta().custom_metadata_map.get("max_context")
        if not limit and (config := Path(self.model_path).parent / "config.json").is_file():
            limit = json.loads(config.read_text()).get("max_position_embeddings")
        self.max_context = int(limit) if limit else None
        self.min_capacity = self._sliding_window()

    def _sliding_window(self) -> int:
        """The sliding window a shared KV buffer must at least hold: GroupQueryAttention with a local window refuses
        a smaller one (the onnxruntime-genai builder's Gemma 3 graphs, genai_config `sliding_window.window_size`)."""
        if self._genai is None:
            return 0
        decoder = self._genai.get("model", {}).get("decoder", {})
        return int((decoder.get("sliding_window") or {}).get("window_size") or 0)

    def _declares_shared_buffer(self) -> bool:
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("past_present_share_buffer") == "1":
            return True
        if self._genai is not None:
            config = self._genai
            return (config.get("search", {}).get("past_present_share_buffer") is True
                    and config.get("model", {}).get("decoder", {}).get("filename") == Path(self.model_path).name)
        return False

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
        if self._genai is not None:
            decoder = self._genai["model"]["decoder"]
            return decoder["num_key_value_heads"], decoder["head_size"]
        config = json.loads((Path(self.model_path).parent / "config.json").read_text())
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
        if self.kv_buffer == "shared":
            return self._step_shared(feed, cache, total)
        cache = _growing(cache)
        if self.kv_device is None:
            feed.update(cache.tensors)
            outputs = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
            logits = outputs["logits"]
        else:  # the cache stays where the session's outputs were bound; only the logits come to the host
            binding = self.session.io_binding()
            for name, value in {**feed, **cache.tensors}.items():
                if isinstance(value, np.ndarray):
                    binding.bind_cpu_input(name, np.ascontiguousarray(value))
                else:
                    binding.bind_ortvalue_input(name, value)
            for name in self.output_names:
                binding.bind_output(name, "cpu" if name == "logits" else self.kv_device)
            self.session.run_with_iobinding(binding)
            outputs = dict(zip(self.output_names, binding.get_outputs()))
            logits = outputs["logits"].numpy()
        present = {name: outputs[name.replace("past_key_values", "present")] for name in self.past_names}
        return logits, KVCache(present, total)

    def _step_shared(self, feed: dict, cache: KVCache, total: int) -> tuple[np.ndarray, KVCache]:
        cache = self._buffer(cache, total)
        if self._bound is not cache.tensors:  # first step, a grown buffer, or another decoder's cache
            # One binding kept across steps: re-binding 2 x layers buffers every step cost about 0.4 ms
            # of a 6.5 ms step (SmolLM2-135M int4, 2 threads). Logits first: get_outputs() keeps that order.
            self._binding = self.session.io_binding()
            self._binding.bind_output("logits", "cpu")
            for name in self.past_names:
                self._binding.bind_ortvalue_input(name, cache.tensors[name])
                self._binding.bind_ortvalue_output(name.replace("past_key_values", "present"), cache.tensors[name])
            self._bound = cache.tensors
        for name, value in feed.items():
            self._binding.bind_cpu_input(name, np.ascontiguousarray(value))
        self._binding.bind_output("logits", "cpu")
        self.session.run_with_iobinding(self._binding)
        logits = self._binding.get_outputs()[0].numpy()
        cache.cursor[0] = total
        return logits, KVCache(cache.tensors, total, cache.capacity, cache.cursor)

    def _buffer(self, cache: KVCache, needed: int) -> KVCache:
        """`cache` as shared buffers of at least `needed` positions: in place when it is one and fits,
        else copied into new ones (capacity doubling from SHARED_CAPACITY, so growth is rare)."""
        cache.check_fresh()
        if cache.capacity is not None and needed <= cache.capacity:
            return cache
        capacity = max(SHARED_CAPACITY, self.min_capacity, cache.capacity or 0)
        while capacity < needed:
            capacity *= 2
        device = self.kv_device or "cpu"
        tensors = {}
        for name, host in cache.arrays().items():
            batch, heads, length, head_dim = host.shape
            buffer = np.zeros((batch, heads, capacity, head_dim), host.dtype)
            buffer[:, :, :length] = host
            tensors[name] = ort_value(buffer, device)
        return KVCache(tensors, cache.length, capacity, [cache.length])

    def greedy(self, prompt_ids, max_new_tokens: int, forced_tokens=None, stop_ids=()):
        """Greedy decoding; `forced_tokens` feeds given tokens instead (teacher forcing for parity).

        Returns (generated token ids, logits of every step [steps, vocab], timing).
        """
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        steps = list(decode(lambda t: ("", self), prompt_ids, max_new_tokens, greedy_token, stop_ids, forced_tokens))
        timing = DecodeTiming(steps[0].seconds, [s.seconds for s in steps[1:]])
        return [s.token for s in steps], np.stack([s.logits for s in steps]), timing


SHARED_CAPACITY = 256  # positions of a new shared KV buffer; doubled whenever a step needs more


def ort_value(array: np.ndarray, device: str = "cpu"):
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)


def _growing(cache: KVCache) -> KVCache:
    """A shared-buffer cache as the valid prefix of each tensor (for graphs fed growing caches)."""
    return cache if cache.capacity is None else KVCache(cache.arrays(), cache.length)


# --------------------------------------------------------------------------- the token loop


@dataclass
class Step:
    """One generated token: the level and the seconds of the forward pass that produced it
    (the prefill for token 0), and the logits it was chosen from."""

    token: int
    level: str
    seconds: float
    logits: np.ndarray  # [vocab], float32 whatever the graph's logits type


def greedy_token(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Softmax(logits / temperature) restricted to the smallest most-probable set of mass >= top_p
    (nucleus sampling); temperature 0 is greedy."""
    if temperature <= 0:
        return greedy_token(logits)
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable") if top_p < 1 else np.arange(len(probs))
    cumulative = np.cumsum(probs[order])
    keep = len(order) if top_p >= 1 else min(int(np.searchsorted(cumulative, top_p)) + 1, len(order))
    cumulative = cumulative[:keep] / cumulative[keep - 1]
    return int(order[min(int(np.searchsorted(cumulative, rng.random(), side="right")), keep - 1)])


def decode(decoder_at: Callable[[int], tuple[str, OrtDecoder]], prompt_ids, max_new_tokens: int,
           choose: Callable[[np.ndarray], int] = greedy_token, stop_ids: Iterable[int] = (),
           forced_tokens=None) -> Iterator[Step]:
    """Prefill, then one pass per token. `decoder_at(t)` gives the (level, decoder) of the pass that
    produces generated token t; the KV cache of earlier passes is fed to it whatever its level.
    Stops after a stop token or `max_new_tokens` tokens (no pass is run for a token never used)."""
    stop_ids = set(stop_ids)
    feed = np.asarray(prompt_ids, dtype=np.int64)[None, :]
    cache = None
    for t in range(max_new_tokens):
        level, decoder = decoder_at(t)  # outside the timed region: a level's session loads on first use
        if cache is None:
            cache = decoder.empty_cache(1)
        start = time.perf_counter()
        logits, cache = decoder.step(feed, cache)
        seconds = time.perf_counter() - start
        # A copy (a view would keep the whole prefill logits alive), in float32: fp16 graphs return fp16
        # logits, and the samplers, parity checks and golden records then all compute on one type.
        row = logits[0, -1].astype(np.float32)
        token = choose(row) if forced_tokens is None else int(forced_tokens[t])
        yield Step(token, level, seconds, row)
        if token in stop_ids:
            return
        feed = np.array([[token]], dtype=np.int64)


# --------------------------------------------------------------------------- levels and schedules


@dataclass(frozen=True)
class Level:
    name: str
    fraction: float  # of each factorized projection's rank kept
    file: str


Schedule = list[tuple[str, int]]  # (level name, first generated token it produces), starts increasing


def validate_schedule(entries: Schedule, level_names: Iterable[str], source: str = "schedule") -> Schedule:
    names = list(level_names)
    if not entries:
        raise ExporterError(f"{source}: empty schedule; expected {SCHEDULE_SYNTAX}")
    for level, start in entries:
        if level not in names:
            raise ExporterError(f"{source}: unknown level {level!r}; known levels: {', '.join(names)}")
        if start < 0:
            raise ExporterError(f"{source}: negative start {level}:{start}")
    if entries[0][1] != 0:
        raise ExporterError(f"{source}: the first entry must start at 0, got {entries[0][0]}:{entries[0][1]}")
    for (before, a), (after, b) in zip(entries, entries[1:]):
        if b <= a:
            raise ExporterError(f"{source}: starts must strictly increase, got {after}:{b} after {before}:{a}")
    return list(entries)


def parse_schedule(text: str, level_names: Iterable[str]) -> Schedule:
    """`static` (the first level), a level name (that level throughout), or LEVEL:START,..."""
    names, text = list(level_names), text.strip()
    source = f"--schedule {text!r}"
    if text == "static":
        return [(names[0], 0)]
    if ":" not in text and "," not in text:
        return validate_schedule([(text, 0)], names, source)
    entries = []
    for part in text.split(","):
        level, _, start = (s.strip() for s in part.partition(":"))
        if not level or not re.fullmatch(r"[+-]?\d+", start):
            raise ExporterError(f"cannot parse {source} at {part.strip()!r}: expected {SCHEDULE_SYNTAX}")
        entries.append((level, int(start)))
    return validate_schedule(entries, names, source)


def schedule_text(schedule: Schedule) -> str:
    return ",".join(f"{level}:{start}" for level, start in schedule)


def level_at(schedule: Schedule, t: int) -> str:
    """The level of the pass that produces generated token t: the last entry with start <= t."""
    return schedule[bisect.bisect_right([start for _, start in schedule], t) - 1][0]


def read_levels(directory: Path, manifest: dict) -> tuple[list[Level], Schedule]:
    """The artifact's levels and default schedule; one full-rank level where the manifest has none.

    Reads the manifest's JSON, not exporter.artifact.manifest.Manifest: a runtime also runs hand-written
    manifests that hold only `levels` and `schedule`, and directories with a model.onnx and no manifest."""
    if "levels" not in manifest:
        file = manifest.get("onnx", {}).get("file", "model.onnx")
        return [Level("r100", 1.0, file)], [("r100", 0)]
    try:
        levels = [Level(str(e["name"]), float(e["fraction"]), str(e["file"])) for e in manifest["levels"]]
        entries = manifest.get("schedule", [{"level": levels[0].name, "start": 0}])
        schedule = [(str(e["level"]), int(e["start"])) for e in entries]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ExporterError(f"{directory}/{MANIFEST}: malformed levels or schedule ({exc!r})") from None
    return levels, validate_schedule(schedule, [lv.name for lv in levels], f"{directory}/{MANIFEST} schedule")


# --------------------------------------------------------------------------- text


class TextStream:
    """Incremental detokenization: `add(token)` returns the new text, holding back bytes of an
    unfinished multi-byte character. Decodes a short window of tokens, not the whole output
    (the window keeps the previous piece, so tokenizers that drop a leading space still space words)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def finish(self) -> str:
        """Whatever is held back (an incomplete character at the end decodes as U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise ExporterError(f"{path} is not valid JSON: {exc.msg}") from None


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def compile_chat_template(template: str):
    """The template compiled as transformers compiles it (sandboxed jinja2, trim/lstrip blocks)."""
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


# --------------------------------------------------------------------------- artifacts


@dataclass
class GenerationStats:
    """Tokens and time of one or more generations. Decode passes are those after the prefill."""

    generations: int = 0
    tokens: int = 0
    prefill_s: float = 0.0
    level_tokens: dict[str, int] = field(default_factory=dict)  # tokens produced at each level
    level_decode: dict[str, list] = field(default_factory=dict)  # level -> [decode passes, seconds]

    def add(self, steps: list[Step]) -> GenerationStats:
        self.generations += 1
        self.tokens += len(steps)
        for t, step in enumerate(steps):
            self.level_tokens[step.level] = self.level_tokens.get(step.level, 0) + 1
            if t == 0:
                self.prefill_s += step.seconds
            else:
                passes = self.level_decode.setdefault(step.level, [0, 0.0])
                passes[0] += 1
                passes[1] += step.seconds
        return self

    @property
    def decode_tokens_per_s(self) -> float:
        passes = sum(n for n, _ in self.level_decode.values())
        seconds = sum(s for _, s in self.level_decode.values())
        return passes / seconds if seconds else 0.0

    @property
    def level_tokens_per_s(self) -> dict[str, float]:
        return {level: n / s for level, (n, s) in self.level_decode.items() if s}


class Runtime:
    """An artifact directory ready to generate (see the module docstring)."""

    def __init__(self, directory, threads: int | None = None, providers=None):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ExporterError(f"artifact not found: {directory}")
        self.manifest = _read_json(self.directory / MANIFEST)  # as JSON: see read_levels
        if not self.manifest and not (self.directory / "model.onnx").is_file():
            raise ExporterError(f"{directory} is not an artifact (no {MANIFEST} or model.onnx)")
        self.levels, self.schedule = read_levels(self.directory, self.manifest)
        for level in self.levels:
            if not (self.directory / level.file).is_file():
                raise ExporterError(f"{directory} is not a complete artifact: "
                                    f"level {level.name}'s {level.file} is missing")
        # Providers named without options take the artifact's device profile's (runtime.provider_options,
        # e.g. the Jetson profiles' CUDA attention backend); (name, options) pairs are used as given.
        recorded = ((self.manifest.get("profile") or {}).get("runtime") or {}).get("provider_options") or {}
        self.threads = threads
        self.providers = providers and [(p, dict(recorded[p])) if isinstance(p, str) and recorded.get(p) else p
                                        for p in providers]
        self._decoders: dict[tuple[str, bool], OrtDecoder] = {}  # (level, shared weights) -> decoder
        self._shared = None  # SharedWeights of the shared sessions: it must outlive them

        self.config = _read_json(self.directory / "config.json")
        tokenizer_config = {**_read_json(self.directory / "special_tokens_map.json"),
                            **_read_json(self.directory / "tokenizer_config.json")}
        self.tokenizer = None
        if (self.directory / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(self.directory / "tokenizer.json"))
        self.special_tokens = {key: _token_text(tokenizer_config[key])
                               for key in ("bos_token", "eos_token", "unk_token", "pad_token")
                               if _token_text(tokenizer_config.get(key)) is not None}
        self.chat_template = self._chat_template(tokenizer_config)
        self.stop_ids = self._stop_ids()
        limits = [self.manifest.get("profile", {}).get("budget", {}).get("max_context"),
                  self.config.get("max_position_embeddings")]
        self.max_context = min((int(v) for v in limits if v), default=None)

    def _chat_template(self, tokenizer_config: dict) -> str | None:
        template = tokenizer_config.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        jinja_file = self.directory / "chat_template.jinja"  # where transformers >= 4.43 may save it
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        return template

    def _stop_ids(self) -> set[int]:
        ids = set(_ids(_read_json(self.directory / "generation_config.json").get("eos_token_id")))
        ids |= set(_ids(self.config.get("eos_token_id")))
        eos = self.special_tokens.get("eos_token")
        if eos is not None and self.tokenizer is not None and self.tokenizer.token_to_id(eos) is not None:
            ids.add(self.tokenizer.token_to_id(eos))
        return ids

    @property
    def level_names(self) -> list[str]:
        return [level.name for level in self.levels]

    def parse_schedule(self, text: str | None) -> Schedule:
        return self.schedule if text is None else parse_schedule(text, self.level_names)

    def decoder(self, level: str, shared: bool = False) -> OrtDecoder:
        """The level's decoder, created on first use. `shared`: its session reads the weights from one memory
        map that every shared session uses (exporter.runtime.shared_weights: fp32 weights once in memory with all
        levels loaded, at about 0.8x the decode speed of plain, prepacked sessions). Creating a shared
        session drops the plain ones, which would hold their own copies."""
        key = (level, shared)
        if key not in self._decoders:
            path = self.directory / next(lv.file for lv in self.levels if lv.name == level)
            options = None
            if shared:
                from exporter.runtime.shared_weights import SharedWeights

                self._shared = self._shared or SharedWeights()
                options = self._shared.session_options(path)
                self._decoders = {k: d for k, d in self._decoders.items() if k[1]}
            self._decoders[key] = OrtDecoder(path, threads=self.threads, providers=self.providers,
                                             session_options=options)
        return self._decoders[key]

    # text

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise ExporterError(f"{self.directory} has no tokenizer.json")
        return self.tokenizer

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.require_tokenizer().encode(text, add_special_tokens=add_special_tokens).ids

    def decode_text(self, ids) -> str:
        return self.require_tokenizer().decode([int(i) for i in ids if int(i) not in self.stop_ids],
                                             skip_special_tokens=True)

    def render_chat(self, messages: list[dict]) -> str:
        """The conversation as the model's chat template writes it, ending with the assistant's turn."""
        import jinja2

        if self.chat_template is None:
            raise ExporterError(f"{self.directory} has no chat template; pass --no-chat-template to use the raw prompt")
        try:
            return compile_chat_template(self.chat_template).render(
                messages=messages, add_generation_prompt=True, tools=None, documents=None, **self.special_tokens)
        except jinja2.TemplateError as exc:
            raise ExporterError(f"{self.directory}: chat template failed: {exc}") from None

    def prompt_ids(self, prompt: str, chat: bool = True) -> list[int]:
        """A user message through the chat template (special tokens come from the template, as in
        transformers' apply_chat_template), or the raw text with the tokenizer's own special tokens."""
        if chat:
            return self.encode(self.render_chat([{"role": "user", "content": prompt}]))
        return self.encode(prompt, add_special_tokens=True)

    # generation

    def room(self, prompt_tokens: int) -> int | None:
        """New tokens that fit after a prompt (None: no known context limit)."""
        return None if self.max_context is None else self.max_context - prompt_tokens

    def generate(self, prompt_ids, max_new_tokens: int = 128, schedule: Schedule | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop: bool = True,
                 forced_tokens=None) -> Iterator[Step]:
        """Tokens as they are produced (greedy at temperature 0, else seeded nucleus sampling), each
        pass at the level its schedule gives; at most what fits in the context."""
        schedule = validate_schedule(schedule or self.schedule, self.level_names)
        room = self.room(len(prompt_ids))
        if room is not None and room < 1:
            raise ExporterError(f"the prompt ({len(prompt_ids)} tokens) does not fit the context ({self.max_context})")
        rng = np.random.default_rng(seed)

        def choose(logits):
            return sample_token(logits, temperature, top_p, rng)

        # Several levels share one copy of the weights; one level alone keeps a plain session (prepacked: faster).
        shared = len({level for level, _ in schedule}) > 1

        def decoder_at(t):
            level = level_at(schedule, t)
            return level, self.decoder(level, shared)

        limit = max_new_tokens if room is None else min(max_new_tokens, room)
        return decode(decoder_at, prompt_ids, limit, choose, self.stop_ids if stop else (), forced_tokens)
