"""Command line: `exporter export`, `exporter profiles [show NAME]`."""

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
    export.add_argument("--device", required=True, help="profile name (see `exporter profiles`) or path to a .toml")
    export.add_argument("--model", help="local Hugging Face model directory or .gguf file "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    export.add_argument("--out", type=Path, help="artifact directory (default: artifacts/MODEL-DEVICE)")
    export.add_argument("--ratio", type=_ratio, help="fraction of every decoder projection's parameters to "
                        "remove (default: what the device budget requires)")
    export.add_argument("--method", choices=["whitened", "svd"], default="whitened",
                        help="whitened SVD (SVD-LLM, default) or plain SVD")
    export.add_argument("--calib", help="calibration text: .txt, or .jsonl with --calib-field "
                        "(default: text sampled from the model itself)")
    export.add_argument("--calib-field", default="text", help="jsonl field holding the text (default: text)")
    export.add_argument("--calib-samples", type=_positive_int, default=DEFAULT_NUM_SAMPLES,
                        help=f"calibration sequences (default: {DEFAULT_NUM_SAMPLES})")
    export.add_argument("--calib-seq-len", type=_positive_int, default=DEFAULT_SEQ_LEN,
                        help=f"tokens per calibration sequence (default: {DEFAULT_SEQ_LEN})")
    export.add_argument("--seed", type=int, default=0, help="seed for sampling and calibration windows (default: 0)")
    export.add_argument("--force", action="store_true", help="replace an existing artifact directory")
    export.add_argument("--no-progress", action="store_true", help="hide progress bars")

    profiles = commands.add_parser("profiles", help="list device profiles, or `profiles show NAME`")
    profiles.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    profiles.add_argument("name", nargs="?", help="profile name or path (with `show`)")
    return parser


def _export(args) -> int:
    from .pipeline import ExportOptions, run_export

    manifest = run_export(ExportOptions(
        device=args.device, model=args.model, out=args.out, ratio=args.ratio, method=args.method,
        calib=args.calib, calib_field=args.calib_field, calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len, seed=args.seed, force=args.force, progress=not args.no_progress,
    ))
    print(format_summary(manifest))
    return 0


def format_summary(manifest: dict) -> str:
    p, par = manifest["parameters"], manifest["parity"]
    times = ", ".join(f"{k} {v:.1f}s" for k, v in manifest["timings_s"].items())
    return "\n".join([
        f"artifact:   {manifest['artifact']} ({manifest['artifact_bytes'] / 1e6:.1f} MB on disk)",
        f"device:     {manifest['profile']['name']} (weights {manifest['precision']})",
        f"parameters: {p['total_params_dense'] / 1e6:.1f}M -> {p['total_params'] / 1e6:.1f}M "
        f"({p['projection_fraction_removed']:.1%} of decoder projections, {p['total_fraction_removed']:.1%} of all)",
        f"parity:     max |logit diff| {par['max_abs_logit_diff']:.2e}, greedy agreement "
        f"{par['greedy_agreement']:.0%} over {par['decode_steps']} steps: {'passed' if par['passed'] else 'FAILED'}",
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
        return {"export": _export, "profiles": _profiles}[args.command](args)
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
