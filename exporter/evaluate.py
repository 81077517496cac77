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
