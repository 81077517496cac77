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
from .allocate import Allocation, allocate
from .budget import BYTES_PER_PARAM, MB, projection_budget, weight_budget
from .calibration import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, calibration_ids
from .compress import (apply_ranks, count_params, decompose_model, decoder_projections, effective_ranks,
                       parameter_summary, uniform_ranks)
from .errors import ExporterError
from .importance import component_fisher
from .models import load_model, resolve_model
from .genai_config import write_genai_config
from .graph_writer import unsupported_reason, write_decoder
from .onnx_export import check_parity, export_onnx
from .profiles import load_profile
from .report import write_report

PARITY_PROMPT = (
    "Edge devices run small language models close to their users. To fit, a model is compressed: "
    "each projection becomes the product of two thin matrices, and the result is checked"
)
ALLOCATIONS = ("fisher", "uniform")
GRAPHS = ("auto", "fused", "optimum")
WEIGHTS = ("fp32", "int8", "int4")
# A quantized graph is checked twice: its fp32 twin must match PyTorch tightly (the graph is right),
# and the quantized graph's greedy agreement is recorded; this loose floor only catches a broken one.
QUANTIZED_MIN_AGREEMENT = 0.25


@dataclass
class ExportOptions:
    device: str
    model: str | None = None
    out: Path | None = None
    ratio: float | None = None
    budget_mb: float | None = None
    allocation: str = "fisher"  # fisher (FLRC) | uniform
    method: str = "whitened"
    calib: str | None = None
    calib_field: str = "text"
    calib_samples: int = DEFAULT_NUM_SAMPLES
    calib_seq_len: int = DEFAULT_SEQ_LEN
    fisher_samples: int = 8
    seed: int = 0
    force: bool = False
    graph: str = "auto"  # fused (exporter.graph_writer) where supported, else optimum
    weights: str = "fp32"
    block_size: int = 32
    accuracy_level: int = 4  # int4: int8 activations in MatMulNBits, as the genai builder does on CPU
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


@dataclass
class Plan:
    """A loaded model compressed as the options and the device budget ask, ready to export."""

    model: object
    tokenizer: object
    source: object
    profile: object
    projections: list
    total_dense: int
    budget: object  # WeightBudget from the profile
    budget_source: str
    target_params: int | None  # projection parameters allowed; None: dense
    ranks: dict
    calibration: str | None = None
    allocation: Allocation | None = None
    importance: dict | None = None  # projection -> Fisher score of each component

    @property
    def parameters(self) -> dict:
        return parameter_summary(self.projections, self.ranks, self.total_dense)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_out(model_name: str, device: str) -> Path:
    return Path("artifacts") / f"{model_name}-{device}"


def plan_compression(options: ExportOptions, clock: Stopwatch, target: Path | None = None,
                     profile=None, source=None) -> Plan:
    """Load the model, turn the budget into projection parameters, and factorize to fit it."""
    torch.manual_seed(options.seed)
    if options.allocation not in ALLOCATIONS:
        raise ExporterError(f"unknown allocation {options.allocation!r}; expected one of {', '.join(ALLOCATIONS)}")
    profile = profile or load_profile(options.device)
    source = source or resolve_model(options.model)
    if target is not None:
        check_target(target, options.force)  # before minutes of work, not after
    with clock.stage("load"):
        say(f"loading {source.describe()}")
        model, tokenizer = load_model(source)
    projections = decoder_projections(model)
    total_dense = count_params(model)
    dense_projection = sum(p.params for p in projections)
    if options.weights not in WEIGHTS:
        raise ExporterError(f"unknown --weights {options.weights!r}; expected one of {', '.join(WEIGHTS)}")
    budget = weight_budget(profile, model.config, options.weights)
    multiple = profile.runtime.rank_multiple if options.allocation == "fisher" else 1

    if options.ratio is not None:
        uniform_ranks(projections, options.ratio)  # validates the range
        budget_source = "--ratio"
        target_params = None if options.ratio == 0 else round((1.0 - options.ratio) * dense_projection)
    else:
        budget_bytes = budget.bytes if options.budget_mb is None else options.budget_mb * MB
        budget_source = ("--budget-mb" if options.budget_mb is not None
                         else f"{profile.name} {budget.binding} budget")
        target_params = projection_budget(projections, total_dense, budget_bytes, options.weights, multiple)
        if target_params is None:
            say(f"the dense model ({total_dense * BYTES_PER_PARAM[options.weights] / MB:.0f} MB at "
                f"{options.weights}) fits {budget_source} ({budget_bytes / MB:.0f} MB of weights): "
                "exporting it dense (pass --ratio to compress anyway)")
    plan = Plan(model, tokenizer, source, profile, projections, total_dense, budget, budget_source,
                target_params, {p.name: None for p in projections})
    if target_params is None:
        return plan

    ids = None
    if options.method == "whitened" or options.allocation == "fisher":
        with clock.stage("calibration"):
            ids, plan.calibration = calibration_ids(
                model, tokenizer, options.calib, options.calib_samples, options.calib_seq_len,
                options.seed, options.calib_field, model_key=source.describe(), progress=options.progress)
    with clock.stage("factorize"):
        decompositions = decompose_model(model, options.method, ids, progress=options.progress,
                                         full_rank=options.allocation == "fisher")
    if options.allocation == "fisher":
        with clock.stage("importance"):
            plan.importance = component_fisher(model, decompositions, ids[: options.fisher_samples],
                                               progress=options.progress)
        with clock.stage("allocate"):
            plan.allocation = allocate(projections, plan.importance, target_params, multiple=multiple)
        ranks = plan.allocation.ranks
    else:
        ranks = uniform_ranks(projections, 1.0 - target_params / dense_projection)
    apply_ranks(model, decompositions, ranks)
    plan.ranks = effective_ranks(model, projections)
    return plan


def run_export(options: ExportOptions) -> dict:
    """Run the whole job; returns the manifest written into the artifact."""
    clock = Stopwatch()
    profile, source = load_profile(options.device), resolve_model(options.model)
    target = Path(options.out or default_out(source.name, profile.name))
    plan = plan_compression(options, clock, target, profile, source)
    model, tokenizer, profile, params = plan.model, plan.tokenizer, plan.profile, plan.parameters
    say(f"{params['projection_fraction_removed']:.1%} of decoder projection parameters removed "
        f"({plan.budget_source}), {params['total_fraction_removed']:.1%} of all parameters "
        f"({plan.total_dense / 1e6:.1f}M -> {params['total_params'] / 1e6:.1f}M)")

    graph = choose_graph(model, options)
    with staging_dir(target, options.force) as staging:
        prompt = tokenizer(PARITY_PROMPT, add_special_tokens=False)["input_ids"]
        with clock.stage("export"):
            say(f"writing the ONNX decoder with KV cache ({graph} graph, fp32)")
            onnx_path = export_onnx(model, staging) if graph == "optimum" else write_decoder(model, staging)
            tokenizer.save_pretrained(staging)
            if graph == "fused":  # the builder's I/O contract: onnxruntime-genai can load it
                write_genai_config(staging, model.config, tokenizer, onnx_path.name, profile.budget.max_context)
        with clock.stage("parity"):
            parity = check_parity(model, onnx_path, prompt, options.parity_steps, options.parity_atol).to_dict()
        if options.weights != "fp32":
            with clock.stage("quantize"):
                say(f"quantizing weights to {options.weights}")
                write_decoder(model, staging, weights=options.weights, block_size=options.block_size,
                              accuracy_level=options.accuracy_level if options.weights == "int4" else None)
            with clock.stage("parity"):
                parity["quantized"] = check_parity(model, onnx_path, prompt, options.parity_steps,
                                                   atol=float("inf"), min_agreement=QUANTIZED_MIN_AGREEMENT).to_dict()
        compressed = plan.target_params is not None
        manifest = {
            "format_version": 1,
            "exporter_version": __version__,
            "source_model": {"name": plan.source.name, "path": plan.source.describe(),
                             "architecture": type(model).__name__, "model_type": model.config.model_type},
            "profile": profile.to_dict(),
            "method": {
                "factorization": (f"{options.method}-svd" if options.method == "whitened" else "svd")
                if compressed else "none",
                "allocation": options.allocation if compressed else "none",
                "budget_source": plan.budget_source,
                "projection_params_target": plan.target_params,
                "rank_multiple": profile.runtime.rank_multiple if options.allocation == "fisher" else 1,
                "allocation_details": plan.allocation.to_dict() if plan.allocation else None,
                "calibration": plan.calibration, "seed": options.seed,
            },
            "precision": options.weights,
            "budget": plan.budget.to_dict(),
            "parameters": params,
            "ranks": {p.name: {"rank": plan.ranks[p.name], "out": p.out_features, "in": p.in_features}
                      for p in plan.projections},
            "onnx": {"file": onnx_path.name, "task": "text-generation-with-past", "graph": graph,
                     "weights": options.weights,
                     **({"block_size": options.block_size, "accuracy_level": options.accuracy_level}
                        if options.weights == "int4" else {})},
            "parity": parity,
            "versions": _versions(),
            "timings_s": {k: round(v, 2) for k, v in clock.stages.items()},
        }
        write_report(staging, manifest)
        write_manifest(staging, manifest)
    manifest["artifact"] = str(target)
    manifest["artifact_bytes"] = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    return manifest


def choose_graph(model, options: ExportOptions) -> str:
    """The fused writer where it supports the model (say so when falling back), else optimum."""
    if options.graph not in GRAPHS:
        raise ExporterError(f"unknown --graph {options.graph!r}; expected one of {', '.join(GRAPHS)}")
    if options.graph == "optimum":
        if options.weights != "fp32":
            raise ExporterError(f"--weights {options.weights} needs the fused graph (--graph fused)")
        return "optimum"
    reason = unsupported_reason(model)
    if reason is None:
        return "fused"
    if options.graph == "fused" or options.weights != "fp32":
        raise ExporterError(f"the fused graph writer cannot write this model: {reason}")
    say(f"the fused graph writer cannot write this model ({reason}): using the optimum-onnx export")
    return "optimum"


def _versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    return {"exporter": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": sys.version.split()[0]}
