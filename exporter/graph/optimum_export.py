"""ONNX export with KV cache (optimum-onnx) and parity of ONNX Runtime against PyTorch."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from exporter.errors import ModelError, ParityError
from exporter.runtime.generation import OrtDecoder
from exporter.settings import PARITY_ATOL

TASK = "text-generation-with-past"
log = logging.getLogger(__name__)


def export_onnx(model, out_dir: Path, opset: int | None = None) -> Path:
    """Write `model.onnx` (+ external data above 2 GB) into out_dir and check it with onnx.checker."""
    import onnx
    from optimum.exporters.onnx import onnx_export_from_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about data-dependent branches are expected
        try:
            onnx_export_from_model(model, str(out_dir), task=TASK, opset=opset, do_validation=False)
        except Exception as exc:  # optimum's own errors (unknown model type, unsupported task) are untyped
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"neither the fused graph writer nor optimum-onnx can export {type(model).__name__} "
                             f"(model_type {getattr(model.config, 'model_type', '?')!r}); optimum-onnx says: {first}") from exc
    path = out_dir / "model.onnx"
    onnx.checker.check_model(str(path))  # a path (not a proto) also works above 2 GB
    return path


@dataclass
class ParityReport:
    prompt_tokens: int
    decode_steps: int
    max_abs_logit_diff: float
    greedy_agreement: float  # fraction of steps where ONNX Runtime's argmax equals PyTorch's
    atol: float
    min_agreement: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def torch_greedy(model, prompt_ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and per-step logits of the PyTorch model, with its own KV cache."""
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    logits, past = [out.logits[0, -1].float().numpy()], out.past_key_values
    tokens = []
    for i in range(steps):
        token = int(np.argmax(logits[-1]))
        tokens.append(token)
        if i == steps - 1:
            break
        out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        logits.append(out.logits[0, -1].float().numpy())
        past = out.past_key_values
    return tokens, np.stack(logits)


def check_parity(model, onnx_path: Path, prompt_ids: list[int], steps: int = 16, atol: float = PARITY_ATOL,
                 min_agreement: float = 0.9, raise_on_fail: bool = True) -> ParityReport:
    """Prefill + `steps` decode steps in both runtimes on the same tokens (PyTorch's greedy ones)."""
    ref_tokens, ref_logits = torch_greedy(model, prompt_ids, steps)
    decoder = OrtDecoder(onnx_path, threads=os.cpu_count())
    _, ort_logits, _ = decoder.greedy(prompt_ids, steps, forced_tokens=ref_tokens)
    diff = float(np.abs(ort_logits - ref_logits).max())
    agreement = float(np.mean(np.argmax(ort_logits, axis=-1) == np.asarray(ref_tokens)))
    report = ParityReport(len(prompt_ids), steps, diff, agreement, atol, min_agreement,
                          diff <= atol and agreement >= min_agreement)
    if raise_on_fail and not report.passed:
        raise ParityError(
            f"ONNX Runtime parity failed: max |logit diff| {diff:.3g} (tolerance {atol}), "
            f"greedy agreement {agreement:.0%} (need {min_agreement:.0%})"
        )
    return report
