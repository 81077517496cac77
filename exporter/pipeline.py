"""The export job: load -> calibrate -> factorize -> export ONNX -> check parity -> write artifact."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .artifact import check_target, staging_dir, write_manifest
from .budget import BYTES_PER_PARAM, MB, uniform_ratio_for_budget, weight_budget
from .calibration import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, calibration_ids
from .compress import (apply_ranks, count_params, decompose_model, decoder_projections, effective_ranks,
                       parameter_summary, uniform_ranks)
from .models import load_model, resolve_model
from .onnx_export import check_parity, export_onnx
from .profiles import load_profile
from .report import write_report

PARITY_PROMPT = (
    "Edge devices run small language models close to their users. To fit, a model is compressed: "
    "each projection becomes the product of two thin matrices, and the result is checked"
)
EXPORT_PRECISION = "fp32"  # weights are written in fp32 until quantized export lands


@dataclass
class ExportOptions:
    device: str
    model: str | None = None
    out: Path | None = None
    ratio: float | None = None
    method: str = "whitened"
    calib: str | None = None
    calib_field: str = "text"
    calib_samples: int = DEFAULT_NUM_SAMPLES
    calib_seq_len: int = DEFAULT_SEQ_LEN
    seed: int = 0
    force: bool = False
    parity_steps: int = 16
    parity_atol: float = 1e-2
    progress: bool = True


@dataclass
class Stopwatch:
    stages: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_out(model_name: str, device: str) -> Path:
    return Path("artifacts") / f"{model_name}-{device}"


def run_export(options: ExportOptions) -> dict:
    """Run the whole job; returns the manifest written into the artifact."""
    torch.manual_seed(options.seed)
    clock = Stopwatch()
    profile = load_profile(options.device)
    source = resolve_model(options.model)
    target = Path(options.out or default_out(source.name, profile.name))
    check_target(target, options.force)  # before minutes of work, not after

    with clock.stage("load"):
        say(f"loading {source.describe()}")
        model, tokenizer = load_model(source)
    projections = decoder_projections(model)
    total_dense = count_params(model)
    budget = weight_budget(profile, model.config, EXPORT_PRECISION)

    ratio, ratio_source = options.ratio, "--ratio"
    if ratio is None:
        ratio_source = f"{profile.name} {budget.binding} budget"
        ratio = uniform_ratio_for_budget(projections, total_dense, budget.bytes, EXPORT_PRECISION)
        if ratio == 0.0:
            say(f"the dense model ({total_dense * BYTES_PER_PARAM[EXPORT_PRECISION] / MB:.0f} MB at "
                f"{EXPORT_PRECISION}) fits {profile.name}'s budget ({budget.bytes / MB:.0f} MB of weights): "
                "exporting it dense (pass --ratio to compress anyway)")
    uniform_ranks(projections, ratio)  # validates the range before any work

    calibration = None
    if ratio > 0.0:
        ids = None
        if options.method == "whitened":
            with clock.stage("calibration"):
                ids, calibration = calibration_ids(
                    model, tokenizer, options.calib, options.calib_samples, options.calib_seq_len,
                    options.seed, options.calib_field, model_key=source.describe(), progress=options.progress)
        with clock.stage("factorize"):
            decompositions = decompose_model(model, options.method, ids, progress=options.progress)
            apply_ranks(model, decompositions, uniform_ranks(projections, ratio))
            del decompositions
    ranks = effective_ranks(model, projections)
    params = parameter_summary(projections, ranks, total_dense)
    say(f"ratio {ratio:.3f} ({ratio_source}): {params['projection_fraction_removed']:.1%} of decoder projection "
        f"parameters removed, {params['total_fraction_removed']:.1%} of all parameters "
        f"({total_dense / 1e6:.1f}M -> {params['total_params'] / 1e6:.1f}M)")

    with staging_dir(target, options.force) as staging:
        with clock.stage("export"):
            say("exporting to ONNX with KV cache")
            onnx_path = export_onnx(model, staging)
            tokenizer.save_pretrained(staging)
        with clock.stage("parity"):
            prompt = tokenizer(PARITY_PROMPT, add_special_tokens=False)["input_ids"]
            parity = check_parity(model, onnx_path, prompt, options.parity_steps, options.parity_atol)
        manifest = {
            "format_version": 1,
            "exporter_version": __version__,
            "source_model": {"name": source.name, "path": source.describe(),
                             "architecture": type(model).__name__, "model_type": model.config.model_type},
            "profile": profile.to_dict(),
            "method": {
                "factorization": f"{options.method}-svd" if options.method == "whitened" else "svd",
                "allocation": "uniform", "ratio": ratio, "ratio_source": ratio_source,
                "ratio_meaning": "fraction of each decoder projection's parameters removed",
                "calibration": calibration, "seed": options.seed,
            },
            "precision": EXPORT_PRECISION,
            "budget": budget.to_dict(),
            "parameters": params,
            "ranks": {p.name: {"rank": ranks[p.name], "out": p.out_features, "in": p.in_features}
                      for p in projections},
            "onnx": {"file": onnx_path.name, "task": "text-generation-with-past"},
            "parity": parity.to_dict(),
            "versions": _versions(),
            "timings_s": {k: round(v, 2) for k, v in clock.stages.items()},
        }
        write_report(staging / "report.md", manifest)
        write_manifest(staging, manifest)
    manifest["artifact"] = str(target)
    manifest["artifact_bytes"] = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    return manifest


def _versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    return {"exporter": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": sys.version.split()[0]}
