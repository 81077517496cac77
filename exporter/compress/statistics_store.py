"""Statistics kept on disk and reused by the next export of the same model on the same calibration windows.

What is kept: the statistics the allocators read that cost minutes and weigh little. The Fisher importance of
every factorization component (`--allocation fisher`), and `--weights auto`'s priced menu: each option's bytes
and estimated loss, with the output sensitivities from which the chosen options' grids are recomputed (one
Gram pass and one GPTQ per unit instead of the whole menu's). Not kept: factorizations and grids, about the
size of the weights themselves.

Key. A file is named by a digest of its whole key and carries that key in its metadata: the store's format,
the exporter's version and the source of the modules that compute statistics (less calibration.py and tokenizer.py,
whose output is in the key itself), the model's class, config and every parameter's bytes, the calibration windows'
token ids, the seed, and the statistic with its own key (its options). A file whose recorded key is not the one
asked for, or that cannot be read, is recomputed and replaced, never used. Files are written to a temporary name
and renamed into place.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import torch

from exporter import __version__
from exporter.console import say
from exporter.settings import cache_dir

FORMAT = 1  # the files' layout; raise it when that changes
CODE = ("compress", "source")  # the packages whose code computes the statistics: their source is in the key ...
AFTER_STATISTICS = ("corrective.py", "scale_tuning.py")  # ... less the stages that run after them and feed none,
KEYED_BY_OUTPUT = ("calibration.py", "tokenizer.py")  # ... and the code whose output, the windows' ids, is keyed itself


def default_root() -> Path:
    return cache_dir() / "statistics"


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    return package_digest(Path(__file__).resolve().parents[1])


def package_digest(root: Path) -> str:
    """The digest of the CODE folders' sources under `root` (the exporter package)."""
    digest = hashlib.blake2b(digest_size=16)
    for folder in CODE:
        for path in sorted((root / folder).glob("*.py")):
            if path.name in AFTER_STATISTICS + KEYED_BY_OUTPUT:
                continue
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _add_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}\0".encode())
    digest.update(flat.view(torch.uint8).numpy())


def model_digest(model) -> str:
    """The model's class, config (without its path) and every parameter and buffer, byte for byte."""
    digest = hashlib.blake2b(digest_size=16)
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
    digest.update(f"{type(model).__qualname__}\0{json.dumps(config, sort_keys=True, default=str)}\0".encode())
    for name, tensor in sorted(model.state_dict().items()):
        _add_tensor(digest, name, tensor)
    return digest.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    digest = hashlib.blake2b(digest_size=16)
    _add_tensor(digest, "", tensor)
    return digest.hexdigest()


class StatisticsStore:
    """Named statistics ({name: tensor} plus JSON-able info) of one model on one set of calibration windows."""

    def __init__(self, root: Path, identity: dict):
        self.root = Path(root)
        self.identity = identity

    @classmethod
    def for_run(cls, root: Path, model, calibration_ids: torch.Tensor, seed: int) -> StatisticsStore:
        return cls(root, {"format": FORMAT, "exporter": __version__, "code": code_digest(),
                          "model": model_digest(model), "calibration": tensor_digest(calibration_ids), "seed": seed})

    def _key(self, statistic: str, key) -> str:
        return json.dumps({**self.identity, "statistic": statistic, "key": key}, sort_keys=True, default=str)

    def path(self, statistic: str, key) -> Path:
        name = hashlib.blake2b(self._key(statistic, key).encode(), digest_size=12).hexdigest()
        return self.root / f"{statistic.replace(' ', '-')}-{name}.safetensors"

    def load(self, statistic: str, key) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, info) stored under this key, or None: absent, unreadable or recorded under another key."""
        from safetensors import safe_open

        path = self.path(statistic, key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as stored:
                metadata = stored.metadata() or {}
                if metadata.get("key") != self._key(statistic, key):
                    say(f"{statistic}: {path} was computed for another model, calibration or exporter: recomputing")
                    return None
                tensors = {name: stored.get_tensor(name) for name in stored.keys()}
            return tensors, json.loads(metadata.get("info", "{}"))
        except Exception as exc:  # a truncated or foreign file: safetensors raises its own error types
            say(f"{statistic}: {path} cannot be read ({type(exc).__name__}): recomputing")
            return None

    def save(self, statistic: str, key, tensors: dict[str, torch.Tensor], info: dict | None = None) -> Path | None:
        """Keep the statistic for the next run (None where it could not be written: the run goes on)."""
        from safetensors.torch import save_file

        path = self.path(statistic, key)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(temporary),
                      metadata={"key": self._key(statistic, key), "info": json.dumps(info or {})})
            temporary.replace(path)
        except OSError as exc:
            say(f"{statistic}: could not keep it in {self.root} ({exc})")
            temporary.unlink(missing_ok=True)
            return None
        return path
