"""Quality measures: perplexity on non-overlapping windows of a text file."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import CalibrationError


def text_windows(tokenizer, path: str | Path, window: int = 512, max_windows: int = 64) -> torch.Tensor:
    """The first `max_windows` non-overlapping windows of the tokenized file, [n, window]."""
    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    count = min(max_windows, ids.numel() // window)
    if count < 1:
        raise CalibrationError(f"{path} is too short for one {window}-token window ({ids.numel()} tokens)")
    return ids[: count * window].view(count, window)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """exp(mean next-token NLL) over all windows, each scored independently."""
    from tqdm.auto import tqdm

    total_nll, total_tokens = 0.0, 0
    for begin in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = windows[begin : begin + batch_size]
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def ort_perplexity(decoder, windows, progress: bool = True) -> float:
    """Perplexity of an ONNX decoder (an exporter.runtime.OrtDecoder): one prefill per window.

    Lets artifacts that exist only as ONNX (quantized graphs, other exporters' outputs) be scored
    on exactly the windows the PyTorch models are scored on.
    """
    import numpy as np
    from tqdm.auto import tqdm

    total_nll, total_tokens = 0.0, 0
    for window in tqdm(np.asarray(windows), desc="perplexity (onnxruntime)", unit="window", disable=not progress):
        logits, _ = decoder.step(window[None, :-1], decoder.empty_cache(1))
        logits = logits[0].astype(np.float64)
        peak = logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
        total_nll += float((log_norm - logits[np.arange(len(window) - 1), window[1:]]).sum())
        total_tokens += len(window) - 1
    return math.exp(total_nll / total_tokens)
