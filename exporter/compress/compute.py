"""Where the torch stages compute (`--compute auto|cpu|cuda[:N]`), and how weights get there.

The model's weights stay in host memory. Passes over the decoder (the calibration Grams, the Fisher
importance and output sensitivities, GPTQ) move one decoder layer at a time to the compute device with
the calibration activations (sequential onloading, as llm-compressor's sequential pipeline does), plus
what lies outside the layers (embedding, final norm, head, rotary tables), so the device holds about one
layer, the head and one pass's activations. Training stages (corrective branches, scale tuning) hold the
model whole on the device for their duration: they update every layer at each step.

The device is a context (`using`), as torch's own default device is, so the passes deep in the call tree
read it without every caller passing it on: the pipeline sets it once per export.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from exporter.compress.distributed import local_cuda_index
from exporter.errors import ExporterError

CHOICES = "auto, cpu, cuda or cuda:N"

_current: ContextVar[torch.device] = ContextVar("compute_device", default=torch.device("cpu"))


def resolve(text: str) -> torch.device:
    """The device `--compute` names; a one-line error where it does not exist on this machine."""
    text = (text or "auto").strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index = text.partition(":")[2]
        if index and not index.isdigit():
            raise ExporterError(f"--compute {text}: expected {CHOICES}")
        if not torch.cuda.is_available():
            raise ExporterError(f"--compute {text}: this machine has no CUDA device (torch {torch.__version__}); "
                                "use --compute cpu (or auto)")
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise ExporterError(f"--compute {text}: this machine has {count} CUDA device(s), cuda:0 to "
                                f"cuda:{count - 1}")
        local = local_cuda_index()  # torchrun: each process its own GPU
        return torch.device("cuda", int(index) if index else local if local is not None
                            else torch.cuda.current_device())
    raise ExporterError(f"--compute {text}: expected {CHOICES}")


def describe(device: torch.device) -> str:
    """`cpu`, `cuda:0 (NVIDIA H200)`: what the manifest records."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def current() -> torch.device:
    return _current.get()


@contextmanager
def using(device: torch.device | str) -> Iterator[torch.device]:
    """Run the torch stages inside on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        # Statistics keep fp32 (and fp64) precision: no TF32 in matrix products.
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
    token = _current.set(device)
    try:
        yield device
    finally:
        _current.reset(token)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = previous


def training_precision(device: torch.device) -> torch.dtype | None:
    """The dtype the KL training steps' student computes in, None for float32: bfloat16 on a CPU that multiplies
    it natively (AVX512-BF16 or AMX; scale tuning's steps 1.6x faster on SmolLM2 at the same held-out KL,
    benchmarks/RESULTS.md, "Scale tuning in bfloat16"). Measurements (held-out KL, Grams, prices) stay float32,
    and so do the steps on CUDA (not measured there)."""
    if device.type != "cpu":
        return None
    native = [getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported")]
    return torch.bfloat16 if any(native) else None


def _tensors(module: torch.nn.Module, skip: str | None = None) -> list[torch.Tensor]:
    """The module's parameters and buffers (each once), those under the qualified prefix `skip` left out."""
    found = {}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if skip is None or not (name == skip or name.startswith(skip + ".")):
            found.setdefault(id(tensor), tensor)
    return list(found.values())


@contextmanager
def onloaded(module: torch.nn.Module, device: torch.device | None = None, skip: str | None = None,
             write_back: bool = False) -> Iterator[torch.nn.Module]:
    """`module`'s tensors (those under `skip` left out) on `device` for the block; at its end the host
    tensors are put back as they were (`write_back`: with the values the block left, for training).
    Tied tensors move once and stay tied. A no-op where they already are on `device`."""
    device = torch.device(device or current())
    moved = [(t, t.data) for t in _tensors(module, skip) if t.device != device]
    for tensor, host in moved:
        tensor.data = host.to(device, non_blocking=True)
    try:
        yield module
    finally:
        for tensor, host in moved:
            if write_back:
                host.copy_(tensor.data)
            tensor.data = host
            if tensor.grad is not None:  # a device gradient on a host tensor breaks the next backward
                tensor.grad = None


def outside_layers(model, device: torch.device | None = None):
    """The model's tensors outside its decoder layers (embedding, final norm, head, rotary tables) on `device`."""
    from exporter.source.model import layers_prefix

    return onloaded(model, device, skip=layers_prefix(model))

