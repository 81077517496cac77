"""Command line: `exporter export`, `exporter allocate`, `exporter profiles [show NAME]`,
`exporter generate ARTIFACT`, `exporter evaluate ARTIFACT`, `exporter validate ARTIFACT`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from exporter import __version__
from exporter.artifact.manifest import Manifest
from exporter.console import tell
from exporter.device.cost_model import DECODE_CEILING
from exporter.errors import ExporterError
from exporter.settings import (CALIB_CHAT, DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, TUNE_SCALES_STEPS, TUNE_WINDOWS,
                               CorrectiveOptions)


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (fraction of projection parameters removed), got {value}")
    return value


def _ceiling(text: str) -> float | None:
    """--decode-ceiling: a positive multiple, or off (None)."""
    return None if text == "off" else _positive_float(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _int_at_least(minimum: int, expected: str):
    """An argparse type: an integer >= `minimum`, else a one-line error saying `expected`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value
    return parse


def _share(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value}")
    return value


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


def _corrective_ranks(text: str) -> tuple[int, dict[str, int]]:
    """`16` or `16,k_proj=8,v_proj=8` or `q_proj=8,...` (unnamed types keep the default)."""
    default, by_kind = CorrectiveOptions.rank, {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, value = part.rpartition("=")
        try:
            rank = _positive_int(value)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected N or TYPE=N (e.g. 16,k_proj=8), got {part!r}") from None
        if kind:
            by_kind[kind] = rank
        else:
            default = rank
    return default, by_kind


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exporter", description=__doc__)
    parser.add_argument("--version", action="version", version=f"exporter {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="compress a model for a device and export it to ONNX")
    _compression_options(export)
    export.add_argument("--out", type=Path, help="artifact directory (default: artifacts/MODEL-DEVICE); with several "
                        "--device profiles, the directory of one artifact per profile, OUT/PROFILE")
    export.add_argument("--force", action="store_true", help="replace an existing artifact directory")
    export.add_argument("--graph", choices=["auto", "fused", "optimum"], default="auto",
                        help="fused ONNX Runtime decoder (exporter's writer; default where supported) or "
                        "optimum-onnx's export")
    export.add_argument("--block-size", type=_positive_int, default=32, help="int4/int8 block size (default: 32)")
    export.add_argument("--quantizer", choices=["gptq", "rtn"], default="gptq",
                        help="int4/int8 grids: GPTQ on each projection's calibration Gram (default) or "
                        "round-to-nearest (data-free)")
    export.add_argument("--asymmetric", action="store_true",
                        help="int4/int8 grids with a zero point per block (uint8; default: symmetric)")
    export.add_argument("--error-correction", type=int, default=0, metavar="RANK",
                        help="int4 dense weights: add a whitened low-rank correction of each projection group's "
                        "quantization error (LQER; RANK a multiple of 16; default: 0, none)")
    export.add_argument("--tune-scales", type=_nonnegative_int, metavar="STEPS",
                        help="int4 and auto weights: train every block's scale end to end against the dense model "
                        "(KL on the calibration windows; codes fixed, no bytes added) for STEPS steps "
                        f"(default: {TUNE_SCALES_STEPS} with --weights auto, else 0; 0: off)")
    export.add_argument("--tune-windows", type=_nonnegative_int, default=TUNE_WINDOWS, metavar="N",
                        help="with --tune-scales and --calib: train on N more windows of the calibration file, apart "
                        f"from the calibration's (default: {TUNE_WINDOWS}; fewer where the file is short)")
    export.add_argument("--levels",
                        help="progressive decoding: fractions of every factorized rank to write as levels, from 1.0 "
                        "down (default: 1.0,0.85,0.7; 1.0: one level; fp32, fp16 and int4 only)")
    export.add_argument("--schedule", help="the level each generated token uses: static, a level name, or "
                        "LEVEL:START,... (e.g. r100:0,r85:32); default: derived from calibration measurements")
    export.add_argument("--ort", action="store_true",
                        help="also write model.ort, the ORT format of ONNX Runtime Mobile (full level only; checked "
                        "against model.onnx; at most 2 GB of weights)")

    allocate = commands.add_parser("allocate", help="print the per-projection ranks for a device, without exporting")
    _compression_options(allocate)
    allocate.add_argument("--json", action="store_true", help="print the allocation as JSON")

    profiles = commands.add_parser("profiles", help="list device profiles, or `profiles show NAME`")
    profiles.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    profiles.add_argument("name", nargs="?", help="profile name or path (with `show`)")
    _generation_commands(commands)
    _validate_command(commands)
    return parser


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _generation_commands(commands) -> None:
    schedule_help = ("rank levels by step: static (full rank), a level name, or LEVEL:START,... "
                     "(e.g. r100:0,r85:32); default: the artifact's schedule")
    generate = commands.add_parser("generate", help="generate text with an artifact (ONNX Runtime), streaming it")
    generate.add_argument("artifact", type=Path, help="artifact directory")
    generate.add_argument("--prompt", required=True, help="the user message")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=128, help="(default: 128)")
    generate.add_argument("--temperature", type=_nonnegative_float, default=0.0, help="0: greedy (default)")
    generate.add_argument("--top-p", type=_positive_float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    generate.add_argument("--schedule", help=schedule_help)
    generate.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    generate.add_argument("--threads", type=_positive_int, help="ONNX Runtime intra-op threads (default: all cores)")

    evaluate = commands.add_parser("evaluate", help="score an artifact: summarization ROUGE or perplexity")
    evaluate.add_argument("artifact", type=Path, help="artifact directory")
    evaluate.add_argument("--task", choices=["summarization", "perplexity"], required=True)
    evaluate.add_argument("--data", type=Path, required=True,
                          help="summarization: .jsonl with article and highlights; perplexity: a text file")
    evaluate.add_argument("--limit", type=_positive_int,
                          help="articles (default: 20) or windows (default: 64) to score")
    evaluate.add_argument("--schedule", help=schedule_help + "; perplexity takes one level")
    evaluate.add_argument("--max-new-tokens", type=_positive_int, default=96, help="summary length cap (default: 96)")
    evaluate.add_argument("--max-prompt-tokens", type=_positive_int, default=1024,
                          help="articles are cut to fit this many prompt tokens (default: 1024)")
    evaluate.add_argument("--window", type=_positive_int, default=512,
                          help="perplexity window in tokens (default: 512)")
    evaluate.add_argument("--no-chat-template", action="store_true", help="summarization: raw prompt, no chat template")
    evaluate.add_argument("--threads", type=_positive_int, help="ONNX Runtime intra-op threads (default: all cores)")
    evaluate.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    evaluate.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _validate_command(commands) -> None:
    validate = commands.add_parser("validate", help="check an artifact's speed, memory and accuracy against "
                                   "its device budgets (exit 4 when one fails)")
    validate.add_argument("artifact", type=Path, help="artifact directory")
    validate.add_argument("--device", help="profile name or .toml (default: the artifact's profile); "
                          "`host` measures, other devices are predicted with the cost model")
    validate.add_argument("--text", type=Path, help="text file for perplexity through ONNX Runtime (default: skipped)")
    validate.add_argument("--windows", type=_positive_int, default=8,
                          help="perplexity windows of 512 tokens to score (default: 8)")
    validate.add_argument("--summaries", type=Path,
                          help=".jsonl with article and highlights: ROUGE-L F1 of greedy summaries through ONNX "
                          "Runtime (default: skipped)")
    validate.add_argument("--summary-examples", type=_positive_int, default=20,
                          help="articles of --summaries to summarize (default: 20)")
    validate.add_argument("--report", type=Path, metavar="DIR",
                          help="also write DIR/validation.md and DIR/latency.png (outside the artifact)")
    validate.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    validate.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _compression_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--device", required=True, help="profile name (see `exporter profiles`) or path to a .toml; "
                         "`export` takes several, comma-separated (a,b,c): one artifact each, from one statistics pass")
    command.add_argument("--model", help="local Hugging Face model directory, .gguf file, or Hub id org/name[@revision] "
                         "(downloaded to the Hugging Face cache; offline: read from it) (default: the embedded "
                         "SmolLM2-135M-Instruct)")
    command.add_argument("--trust-remote-code", action="store_true",
                         help="let transformers run the model repository's own Python code (default: off)")
    size = command.add_mutually_exclusive_group()
    size.add_argument("--ratio", type=_ratio, help="fraction of the decoder projection parameters to remove "
                      "(default: what the device budget requires)")
    size.add_argument("--budget-mb", type=_positive_float, help="weight budget in MB, instead of the device's")
    command.add_argument("--allocation", choices=["fisher", "uniform"], default="fisher",
                         help="per-projection ranks from Fisher importance (FLRC, default) or one uniform ratio")
    command.add_argument("--method", choices=["whitened", "svd"], default="whitened",
                         help="whitened SVD (SVD-LLM, default) or plain SVD")
    command.add_argument("--joint", action=argparse.BooleanOptionalAction, default=False,
                         help="factorize the projections that read one input (q/k/v, gate/up) jointly: one shared "
                         "down factor and one rank per group; fewer graph nodes, so faster decoding (default: off)")
    command.add_argument("--latency-aware", nargs="?", type=_positive_float, const=0.0, metavar="US",
                         help="price the graph node each factorization adds when allocating ranks: the same "
                         "parameters removed by fewer, deeper factorizations; faster decoding, some quality (with "
                         "--weights auto: the nodes an offset grid's block sums and a low-rank unit add). The "
                         "price is the node's cost in the device's decode cost model (on host: measured once on this "
                         "machine, kept in EXPORTER_CACHE/host), or US microseconds where given (default: off)")
    command.add_argument("--decode-ceiling", type=_ceiling, default=DECODE_CEILING, metavar="X|off",
                         help="with --weights auto: the formats' decode time at most X times that of the same "
                         "weights on int4-b32 (the onnxruntime-genai builder's default), each format's time measured "
                         "on this machine once (kept in EXPORTER_CACHE/host); devices where nothing is measured get "
                         f"no ceiling; off: none (default: {DECODE_CEILING:g})")
    command.add_argument("--calib", help="calibration text: .txt, or .jsonl with --calib-field "
                         "(default: text sampled from the model itself)")
    command.add_argument("--calib-field", default="text", help="jsonl field holding the text (default: text)")
    command.add_argument("--calib-samples", type=_positive_int, default=DEFAULT_NUM_SAMPLES,
                         help=f"calibration sequences (default: {DEFAULT_NUM_SAMPLES})")
    command.add_argument("--calib-seq-len", type=_positive_int, default=DEFAULT_SEQ_LEN,
                         help=f"tokens per calibration sequence (default: {DEFAULT_SEQ_LEN})")
    command.add_argument("--calib-chat", type=_share, default=CALIB_CHAT, metavar="SHARE",
                         help="with --calib: this share of the calibration sequences are conversations in the "
                         "model's chat template, the file's paragraphs as user turns and the model's own "
                         f"answers, so the compressed model keeps answering like itself (default: {CALIB_CHAT})")
    command.add_argument("--fisher-samples", type=_positive_int, default=8,
                         help="calibration sequences used for Fisher importance (default: 8)")
    command.add_argument("--weights", choices=["fp32", "fp16", "int8", "int4", "auto"],
                         help="weight precision of the ONNX graph; the budget counts bytes at it (default: the "
                         "device profile's weight_precision: fp32 on host, fp16 on the Jetsons). fp16 also keeps "
                         "activations, KV cache and logits in fp16, for the CUDA provider. int4/int8: MatMulNBits "
                         "weights (4/8-bit blocks of --block-size; int8 needs ONNX Runtime 1.22). auto: each at the "
                         "format (int4/int8, block size) a knapsack over GPTQ's estimated loss chooses to fit "
                         "--budget-mb (or the profile's budget)")
    command.add_argument("--onnxruntime-version", metavar="X.Y",
                         help="the ONNX Runtime release the app bundles (1.18 or later): only operators, opsets and "
                         "weight formats it runs are written (default: the profile's runtime.onnxruntime_version, "
                         "else the newest)")
    command.add_argument("--activations", choices=["fp32", "fp16"],
                         help="activations, KV cache and logits (default: fp16 for fp16 weights, and for int4 "
                         "weights when the profile's first provider is CUDA, which runs attention in fp16 only; "
                         "else fp32). int4 takes either; fp32, fp16 and int8 weights only their default")
    command.add_argument("--correctives", action=argparse.BooleanOptionalAction, default=True,
                         help="a CALR corrective branch beside every factorized projection, trained to recover the "
                         "model's function; they count in the budget (default: on; --no-correctives: plain SVD path)")
    command.add_argument("--corrective-rank", type=_corrective_ranks, default=(CorrectiveOptions.rank, {}),
                         help=f"rank r_c of the corrective branches: one number, or per projection type "
                         f"(16,k_proj=8,v_proj=8); the branches take at most a tenth of the budget "
                         f"(default: {CorrectiveOptions.rank})")
    command.add_argument("--corrective-epochs", type=_nonnegative_int, default=CorrectiveOptions.epochs,
                         help=f"block-wise training passes (default: {CorrectiveOptions.epochs})")
    command.add_argument("--kl-steps", type=_nonnegative_int, default=CorrectiveOptions.kl_steps,
                         help=f"end-to-end KL distillation steps after the block-wise stage "
                         f"(default: {CorrectiveOptions.kl_steps})")
    command.add_argument("--warm-kl-steps", type=_nonnegative_int, default=CorrectiveOptions.warm_kl_steps,
                         help="--device a,b: a later profile whose ranks differ starts its branches from the "
                         "previous profile's, without the block-wise stage, and trains this many KL steps, kept "
                         f"where they lower the held-out KL (default: {CorrectiveOptions.warm_kl_steps})")
    command.add_argument("--own-branches", action="store_true",
                         help="--device a,b: every profile trains its branches from the start, so each artifact "
                         "is the one its single-profile export writes (slower)")
    command.add_argument("--tune-factors", action="store_true",
                         help="also train the SVD factors (default: frozen; only the branches train)")
    command.add_argument("--seed", type=int, default=0, help="seed for sampling and calibration windows (default: 0)")
    command.add_argument("--fresh-statistics", action="store_true",
                         help="compute the Fisher importance and --weights auto's prices again instead of reading "
                         "what an earlier run of the same model, calibration and exporter kept (EXPORTER_CACHE/"
                         "statistics), and keep the new ones")
    command.add_argument("--compute", default="auto", metavar="auto|cpu|cuda[:N]",
                         help="where the torch stages run (statistics, Fisher importance, GPTQ, corrective training, "
                         "scale tuning); the weights stay in host memory and passes over the decoder move one layer "
                         "at a time to the device (default: auto, CUDA where present)")
    command.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _options(args):
    from exporter.pipeline import ExportOptions

    return ExportOptions(
        device=args.device, model=args.model, out=getattr(args, "out", None), ratio=args.ratio,
        budget_mb=args.budget_mb, allocation=args.allocation, method=args.method, joint=args.joint,
        latency_aware=args.latency_aware is not None, factor_node_us=args.latency_aware or None,
        decode_ceiling=args.decode_ceiling, calib=args.calib,
        calib_field=args.calib_field, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
        calib_chat=args.calib_chat, fisher_samples=args.fisher_samples, seed=args.seed, force=getattr(args, "force", False),
        weights="int4" if args.weights == "auto" else args.weights, auto_formats=args.weights == "auto",
        activations=args.activations, onnxruntime_version=args.onnxruntime_version,
        graph=getattr(args, "graph", "auto"),
        block_size=getattr(args, "block_size", 32), quantizer=getattr(args, "quantizer", "gptq"),
        trust_remote_code=args.trust_remote_code,
        asymmetric=getattr(args, "asymmetric", False), error_correction=getattr(args, "error_correction", 0),
        tune_scales=_tune_scales(args), tune_windows=getattr(args, "tune_windows", TUNE_WINDOWS),
        reuse_statistics=not args.fresh_statistics,
        compute=args.compute,
        progress=not args.no_progress, ort_format=getattr(args, "ort", False),
        correctives=None if not args.correctives else CorrectiveOptions(
            rank=args.corrective_rank[0], rank_by_kind=args.corrective_rank[1], epochs=args.corrective_epochs,
            kl_steps=args.kl_steps, warm_kl_steps=args.warm_kl_steps, tune_factors=args.tune_factors),
        warm_branches=not args.own_branches,
    )


def _tune_scales(args) -> int:
    steps = getattr(args, "tune_scales", None)
    return steps if steps is not None else TUNE_SCALES_STEPS if args.weights == "auto" else 0


def _allocate(args) -> int:
    import json

    from exporter.pipeline import Stopwatch, plan_compression

    clock = Stopwatch()
    plan = plan_compression(_options(args), clock, train=False)
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
    formats = {**plan.formats_budget, "units": [u.to_dict() for u in plan.formats]} if plan.formats else None
    if args.json:
        print(json.dumps({"parameters": params, "budget_source": plan.budget_source,
                          "device_budget": plan.budget.to_dict(),
                          "allocation": plan.allocation.to_dict() if plan.allocation else None,
                          "projections": rows, **({"formats": formats} if formats else {}),
                          "timings_s": clock.stages}, indent=2))
        return 0
    if formats:
        print(f"{'MatMulNBits unit':60} {'format':>15} {'MB':>7} {'predicted dL':>13}")
        for u in formats["units"]:
            print(f"{u['unit']:60} {u['format']:>15} {u['bytes'] / 1e6:>7.2f} {u['predicted_loss_increase']:>13.2e}")
        print(f"\n{formats['chosen_bytes'] / 1e6:.1f} MB of weights for a budget of {formats['budget_bytes'] / 1e6:.1f} MB "
              f"({plan.budget_source}); predicted loss increase {formats['predicted_loss_increase']:.4f} nats/token")
        if "decode_ceiling" in formats:
            ceiling = formats["decode_ceiling"]
            print(f"decode: {ceiling['chosen_ms']:.2f} ms per token in MatMulNBits, within {ceiling['limit_ms']:.2f} ms "
                  f"({ceiling['ceiling']:g} x the same weights on {ceiling['reference_format']}, measured here)")
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
        if plan.allocation.node_params:
            factorized = sum(rank is not None for rank in plan.ranks.values())
            print(f"latency-aware: each factorization's graph node priced as {plan.allocation.node_params:,.0f} "
                  f"parameters; {factorized} of {len(plan.ranks)} projections factorized")
    return 0


def _export(args) -> int:
    from exporter.graph.levels import parse_levels
    from exporter.pipeline import run_exports

    levels = None if args.levels is None else parse_levels(args.levels)
    results = run_exports(_options(args), levels=levels, schedule=args.schedule)
    if any(result.get("rank") for result in results):  # a data-parallel rank after the first: rank 0 reports
        return 0
    for result in results:
        print(format_summary(Manifest.from_dict(result), result["artifact"], result["artifact_bytes"]))
    if len(results) > 1:
        print(f"{len(results)} artifacts from one statistics pass:")
        for result in results:
            manifest = Manifest.from_dict(result)
            print(f"  {manifest.profile['name']:<24} {manifest.precision:<5} {result['artifact_bytes'] / 1e6:8.1f} MB  "
                  f"{sum(manifest.timings_s.values()):7.1f} s  {result['artifact']}")
    return 0


def _factorized_text(manifest: Manifest) -> str:
    """'; N of M projections factorized' (and the node price where latency-aware), or '' when dense."""
    details = manifest.method.allocation_details or {}
    if "factorized" not in details:
        return ""
    text = f"; {details['factorized']} of {len(manifest.ranks)} factorized"
    return text + (f" (latency-aware: a node priced as {details['node_params']:,.0f} parameters)"
                   if details.get("node_params") else "")


def format_summary(manifest: Manifest, artifact: str, artifact_bytes: int) -> str:
    """What `exporter export` prints: where the artifact is, and the manifest's headline figures."""
    p, par, ort = manifest.parameters, manifest.parity, manifest.ort_format
    times = ", ".join(f"{k} {v:.1f}s" for k, v in manifest.timings_s.items())
    return "\n".join([
        f"artifact:   {artifact} ({artifact_bytes / 1e6:.1f} MB on disk)",
        f"device:     {manifest.profile['name']} (weights {manifest.precision}, activations "
        f"{manifest.onnx.activations or 'fp32'}, {manifest.onnx.graph} graph)",
        f"parameters: {p.total_params_dense / 1e6:.1f}M -> {p.total_params / 1e6:.1f}M "
        f"({p.projection_fraction_removed:.1%} of decoder projections, {p.total_fraction_removed:.1%} of all)"
        + _factorized_text(manifest),
        f"parity:     max |logit diff| {par['max_abs_logit_diff']:.2e}, greedy agreement "
        f"{par['greedy_agreement']:.0%} over {par['decode_steps']} steps: {'passed' if par['passed'] else 'FAILED'}"
        + (f"; {manifest.precision}: greedy agreement {par['quantized']['greedy_agreement']:.0%}"
           if "quantized" in par else ""),
        f"levels:     {', '.join(level.name for level in manifest.levels)}; schedule "
        + ",".join(f"{e.level}:{e.start}" for e in manifest.schedule),
        *([f"ort format: {ort.file} ({ort.bytes / 1e6:.1f} MB), max |logit diff| vs {ort.source} "
           f"{ort.check['max_abs_logit_diff']:.2e}"] if ort else []),
        f"time:       {times}",
    ])


def _generate(args) -> int:
    import time

    from exporter.runtime.generation import GenerationStats, Runtime, TextStream

    runtime = Runtime(args.artifact, threads=args.threads)
    schedule = runtime.parse_schedule(args.schedule)
    ids = runtime.prompt_ids(args.prompt, chat=not args.no_chat_template)
    room = runtime.room(len(ids))
    if room is not None and 0 < room < args.max_new_tokens:
        print(f"exporter: only {room} new tokens fit the context of {runtime.max_context}", file=sys.stderr)
    stream, steps = TextStream(runtime.tokenizer), []
    start = time.perf_counter()
    for step in runtime.generate(ids, args.max_new_tokens, schedule, args.temperature, args.top_p, args.seed):
        steps.append(step)
        if step.token not in runtime.stop_ids:
            sys.stdout.write(stream.add(step.token))
            sys.stdout.flush()
    print(stream.finish())
    stats = GenerationStats().add(steps)
    levels = ", ".join(f"{level} {n}" for level, n in stats.level_tokens.items())
    print(f"{stats.tokens} tokens in {time.perf_counter() - start:.2f} s: prompt {len(ids)} tokens, "
          f"prefill {stats.prefill_s * 1000:.0f} ms, decode {stats.decode_tokens_per_s:.1f} tokens/s; "
          f"tokens per level: {levels}", file=sys.stderr)
    return 0


def _evaluate(args) -> int:
    import json

    from exporter.runtime.evaluate import evaluate_perplexity, evaluate_summarization, read_articles, text_windows
    from exporter.runtime.generation import Runtime

    runtime = Runtime(args.artifact, threads=args.threads)
    schedule = runtime.parse_schedule(args.schedule)
    if not args.data.is_file():
        raise ExporterError(f"data file not found: {args.data}")
    progress = not args.no_progress
    if args.task == "summarization":
        limit = args.limit or 20
        examples = read_articles(args.data, limit)
        if args.limit and len(examples) < limit:
            print(f"exporter: {args.data} has {len(examples)} examples; evaluating {len(examples)} (--limit {limit})",
                  file=sys.stderr)
        result = evaluate_summarization(runtime, examples, schedule, args.max_new_tokens, args.max_prompt_tokens,
                                        chat=not args.no_chat_template, progress=progress)
    else:
        if len(schedule) > 1:
            raise ExporterError("perplexity scores one level: pass --schedule LEVEL "
                                f"(levels: {', '.join(runtime.level_names)})")
        if runtime.max_context is not None and args.window > runtime.max_context:
            raise ExporterError(f"--window {args.window} exceeds the context of {runtime.max_context} tokens")
        limit = args.limit or 64
        windows = text_windows(runtime.require_tokenizer(), args.data, args.window, limit)
        if args.limit and windows.shape[0] < limit:
            print(f"exporter: {args.data} has {windows.shape[0]} windows of {args.window} tokens; "
                  f"evaluating {windows.shape[0]} (--limit {limit})", file=sys.stderr)
        result = evaluate_perplexity(runtime, windows, schedule[0][0], progress)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_evaluation(result))
    return 0


def format_evaluation(result: dict) -> str:
    head = f"{result['task']} of {result['artifact']} (schedule {result['schedule']}, {result['examples']} examples)"
    if result["task"] == "perplexity":
        return f"{head}\nperplexity: {result['perplexity']:.2f} ({result['window']}-token windows)"
    levels = ", ".join(f"{level} {rate:.1f}" for level, rate in result["level_decode_tokens_per_s"].items())
    return "\n".join([
        head,
        f"ROUGE-L F1: {result['rougeL']:.4f} (ROUGE-1 {result['rouge1']:.4f}, ROUGE-2 {result['rouge2']:.4f})",
        f"generated:  {result['mean_generated_tokens']:.1f} tokens on average; "
        f"prompt {result['mean_prompt_tokens']:.0f} tokens on average, {result['truncated_articles']} articles cut to fit",
        f"speed:      decode {result['decode_tokens_per_s']:.1f} tokens/s (per level: {levels}), "
        f"prefill {result['prefill_s_mean'] * 1000:.0f} ms on average",
    ])


def _validate(args) -> int:
    import json

    from exporter.validate import EXIT_BUDGET_FAILED, format_result, validate

    result = validate(args.artifact, args.device, args.text, args.windows, progress=not args.no_progress,
                      summaries=args.summaries, summary_examples=args.summary_examples, report=args.report)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0 if result["passed"] else EXIT_BUDGET_FAILED


def _profiles(args) -> int:
    from exporter.device.profiles import format_profile, format_profile_table, list_profiles, load_profile

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
    _keep_freed_memory()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        _quiet_libraries()
    from exporter.compress.distributed import stop_on_sigterm

    stop_on_sigterm()
    try:
        return {"export": _export, "allocate": _allocate, "profiles": _profiles,
                "generate": _generate, "evaluate": _evaluate, "validate": _validate}[args.command](args)
    except ExporterError as exc:
        if args.debug:
            raise
        tell(f"exporter: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        tell("exporter: interrupted; nothing was written")
        return 130
    except Exception as exc:
        from exporter.compress import distributed

        if args.debug or not distributed.launched():
            raise
        stopped = distributed.stopped_in(exc)  # torchrun's SIGTERM, wrapped by what it interrupted (a lazy import)
        if stopped is not None:
            tell(f"exporter: error: {stopped}")
            return stopped.exit_code
        if not isinstance(exc, RuntimeError):
            raise
        # a collective of a data-parallel run that failed: a peer stopped, or timed out
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        tell(f"exporter: error: rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}: a "
             f"collective failed (another process stopped or timed out; its own error says why): {first}")
        return 1


def _keep_freed_memory() -> None:
    """glibc hands every allocation above 32 MB (a head's logits, a weight's copy) back to the system when freed,
    and the next one faults its pages in afresh: 62M page faults and 180 s of system time in one export. Freed
    memory is kept for reuse instead (scale tuning 1.3x faster; peak RSS 1-2.6 GB higher on SmolLM2;
    benchmarks/RESULTS.md, "Scale tuning in bfloat16"). No-op where the C library is not glibc, or with
    EXPORTER_KEEP_FREED_MEMORY=0 (a machine short of memory)."""
    import ctypes

    if os.environ.get("EXPORTER_KEEP_FREED_MEMORY", "1").strip() == "0":
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(-4, 0)  # M_MMAP_MAX: no allocation mmapped on its own
    mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: the heap's free top kept up to 2 GB


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
