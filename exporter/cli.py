"""Command line: `exporter export`, `exporter allocate`, `exporter profiles [show NAME]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .calibration import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN
from .errors import ExporterError


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (fraction of projection parameters removed), got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exporter", description=__doc__)
    parser.add_argument("--version", action="version", version=f"exporter {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="compress a model for a device and export it to ONNX")
    _compression_options(export)
    export.add_argument("--out", type=Path, help="artifact directory (default: artifacts/MODEL-DEVICE)")
    export.add_argument("--force", action="store_true", help="replace an existing artifact directory")
    export.add_argument("--graph", choices=["auto", "fused", "optimum"], default="auto",
                        help="fused ONNX Runtime decoder (exporter's writer; default where supported) or "
                        "optimum-onnx's export")
    export.add_argument("--block-size", type=_positive_int, default=32, help="int4 block size (default: 32)")

    allocate = commands.add_parser("allocate", help="print the per-projection ranks for a device, without exporting")
    _compression_options(allocate)
    allocate.add_argument("--json", action="store_true", help="print the allocation as JSON")

    profiles = commands.add_parser("profiles", help="list device profiles, or `profiles show NAME`")
    profiles.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    profiles.add_argument("name", nargs="?", help="profile name or path (with `show`)")
    return parser


def _compression_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--device", required=True, help="profile name (see `exporter profiles`) or path to a .toml")
    command.add_argument("--model", help="local Hugging Face model directory or .gguf file "
                         "(default: the embedded SmolLM2-135M-Instruct)")
    size = command.add_mutually_exclusive_group()
    size.add_argument("--ratio", type=_ratio, help="fraction of the decoder projection parameters to remove "
                      "(default: what the device budget requires)")
    size.add_argument("--budget-mb", type=_positive_float, help="weight budget in MB, instead of the device's")
    command.add_argument("--allocation", choices=["fisher", "uniform"], default="fisher",
                         help="per-projection ranks from Fisher importance (FLRC, default) or one uniform ratio")
    command.add_argument("--method", choices=["whitened", "svd"], default="whitened",
                         help="whitened SVD (SVD-LLM, default) or plain SVD")
    command.add_argument("--calib", help="calibration text: .txt, or .jsonl with --calib-field "
                         "(default: text sampled from the model itself)")
    command.add_argument("--calib-field", default="text", help="jsonl field holding the text (default: text)")
    command.add_argument("--calib-samples", type=_positive_int, default=DEFAULT_NUM_SAMPLES,
                         help=f"calibration sequences (default: {DEFAULT_NUM_SAMPLES})")
    command.add_argument("--calib-seq-len", type=_positive_int, default=DEFAULT_SEQ_LEN,
                         help=f"tokens per calibration sequence (default: {DEFAULT_SEQ_LEN})")
    command.add_argument("--fisher-samples", type=_positive_int, default=8,
                         help="calibration sequences used for Fisher importance (default: 8)")
    command.add_argument("--weights", choices=["fp32", "int8", "int4"], default="fp32",
                         help="weight precision of the ONNX graph; the budget counts bytes at it (default: fp32)")
    command.add_argument("--seed", type=int, default=0, help="seed for sampling and calibration windows (default: 0)")
    command.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _options(args):
    from .pipeline import ExportOptions

    return ExportOptions(
        device=args.device, model=args.model, out=getattr(args, "out", None), ratio=args.ratio,
        budget_mb=args.budget_mb, allocation=args.allocation, method=args.method, calib=args.calib,
        calib_field=args.calib_field, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
        fisher_samples=args.fisher_samples, seed=args.seed, force=getattr(args, "force", False),
        weights=args.weights, graph=getattr(args, "graph", "auto"), block_size=getattr(args, "block_size", 32),
        progress=not args.no_progress,
    )


def _allocate(args) -> int:
    import json

    from .pipeline import Stopwatch, plan_compression

    clock = Stopwatch()
    plan = plan_compression(_options(args), clock)
    params = plan.parameters
    rows = []
    for p in plan.projections:
        rank = plan.ranks[p.name]
        scores = plan.importance.get(p.name) if plan.importance else None
        kept = None
        if scores is not None:
            kept = 1.0 if rank is None else float(scores[:rank].sum() / scores.sum().clamp_min(1e-30))
        rows.append({"name": p.name, "out": p.out_features, "in": p.in_features, "rank": rank,
                     "params_kept": p.factor_params(rank) / p.params, "importance_kept": kept})
    if args.json:
        print(json.dumps({"parameters": params, "budget_source": plan.budget_source,
                          "device_budget": plan.budget.to_dict(),
                          "allocation": plan.allocation.to_dict() if plan.allocation else None,
                          "projections": rows, "timings_s": clock.stages}, indent=2))
        return 0
    print(f"{'projection':40} {'shape':>11} {'rank':>6} {'params kept':>12} {'importance kept':>16}")
    for r in rows:
        imp = "-" if r["importance_kept"] is None else f"{r['importance_kept']:.2%}"
        rank = "dense" if r["rank"] is None else r["rank"]
        print(f"{r['name']:40} {r['out']:>5}x{r['in']:<5} {rank:>6} {r['params_kept']:>12.1%} {imp:>16}")
    print(f"\n{params['projection_fraction_removed']:.1%} of decoder projection parameters removed "
          f"({plan.budget_source}), {params['total_fraction_removed']:.1%} of all "
          f"({plan.total_dense / 1e6:.1f}M -> {params['total_params'] / 1e6:.1f}M)")
    limits = ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in plan.budget.limits.items())
    print(f"{plan.profile.name} allows weights of: {limits} ({plan.budget.precision}); "
          f"the {plan.budget.binding} budget binds")
    if plan.allocation:
        print(f"allocation search: {plan.allocation.seconds:.2f} s; importance: {clock.stages.get('importance', 0):.1f} s; "
              f"predicted loss increase {plan.allocation.predicted_loss_increase:.4f} nats/token")
    return 0


def _export(args) -> int:
    from .pipeline import run_export

    manifest = run_export(_options(args))
    print(format_summary(manifest))
    return 0


def format_summary(manifest: dict) -> str:
    p, par = manifest["parameters"], manifest["parity"]
    times = ", ".join(f"{k} {v:.1f}s" for k, v in manifest["timings_s"].items())
    return "\n".join([
        f"artifact:   {manifest['artifact']} ({manifest['artifact_bytes'] / 1e6:.1f} MB on disk)",
        f"device:     {manifest['profile']['name']} (weights {manifest['precision']}, "
        f"{manifest['onnx']['graph']} graph)",
        f"parameters: {p['total_params_dense'] / 1e6:.1f}M -> {p['total_params'] / 1e6:.1f}M "
        f"({p['projection_fraction_removed']:.1%} of decoder projections, {p['total_fraction_removed']:.1%} of all)",
        f"parity:     max |logit diff| {par['max_abs_logit_diff']:.2e}, greedy agreement "
        f"{par['greedy_agreement']:.0%} over {par['decode_steps']} steps: {'passed' if par['passed'] else 'FAILED'}"
        + (f"; {manifest['precision']}: greedy agreement {par['quantized']['greedy_agreement']:.0%}"
           if "quantized" in par else ""),
        f"time:       {times}",
    ])


def _profiles(args) -> int:
    from .profiles import format_profile, format_profile_table, list_profiles, load_profile

    if args.action == "show":
        if not args.name:
            raise ExporterError("usage: exporter profiles show NAME")
        print(format_profile(load_profile(args.name)))
    else:
        print(format_profile_table(list_profiles()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        _quiet_libraries()
    try:
        return {"export": _export, "allocate": _allocate, "profiles": _profiles}[args.command](args)
    except ExporterError as exc:
        if args.debug:
            raise
        print(f"exporter: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("exporter: interrupted; nothing was written", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
