"""Benchmark: quality, compression time, ONNX Runtime decode speed and size, all in one run.

    python benchmarks/run.py [--model M] [--windows 64] [--rows dense,whitened-20,...]

Every row is built from the same loaded model, calibration data and evaluation windows, so the
ratios between rows are meaningful even on a noisy machine. Prints a Markdown table and writes
the figures as JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.calibration import calibration_ids  # noqa: E402
from exporter.compress import (apply_ranks, count_params, decompose_model, decoder_projections,  # noqa: E402
                               effective_ranks, parameter_summary, uniform_ranks)
from exporter.allocate import allocate  # noqa: E402
from exporter.evaluate import perplexity, text_windows  # noqa: E402
from exporter.importance import component_fisher  # noqa: E402
from exporter.models import load_model, resolve_model  # noqa: E402
from exporter.onnx_export import export_onnx  # noqa: E402
from exporter.runtime import OrtDecoder  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


@dataclass
class Row:
    name: str
    method: str  # dense | svd | whitened
    allocation: str  # - | uniform | fisher
    ratio: float
    projection_removed: float = 0.0
    params: int = 0
    perplexity: float = float("nan")
    compress_s: float = 0.0
    search_s: float = float("nan")  # fisher rows: importance + allocation
    decode_tok_s: float = float("nan")
    prefill_ms: float = float("nan")
    artifact_mb: float = float("nan")


ROWS = {
    "dense": ("dense", "-", 0.0),
    "svd-20": ("svd", "uniform", 0.2),
    "svd-40": ("svd", "uniform", 0.4),
    "whitened-20": ("whitened", "uniform", 0.2),
    "whitened-40": ("whitened", "uniform", 0.4),
    "flrc-20": ("whitened", "fisher", 0.2),
    "flrc-40": ("whitened", "fisher", 0.4),
}


def decode_speed(onnx_path: Path, prompt: list[int], new_tokens: int, threads: int, repeats: int = 3):
    """Median decode tokens/s and median prefill ms (greedy, KV cache, `threads` intra-op threads)."""
    decoder = OrtDecoder(onnx_path, threads=threads)
    decoder.greedy(prompt[:16], 4)  # warm-up: first runs allocate and pick kernels
    steps, prefills = [], []
    for _ in range(repeats):
        _, _, timing = decoder.greedy(prompt, new_tokens)
        steps.extend(timing.step_s)
        prefills.append(timing.prefill_s)
    return 1.0 / float(np.median(steps)), 1000.0 * float(np.median(prefills))


SWEEP_KEEP = 0.6  # the sweep truncates each projection to 60% of its parameters


@torch.no_grad()
def sensitivity_sweep(model, decompositions, projections, samples: torch.Tensor) -> dict:
    """The search FLRC replaces: truncate one projection at a time, measure calibration loss."""
    from tqdm.auto import tqdm

    from exporter.compress import replace_module

    start = time.perf_counter()
    losses = {}
    for p in tqdm(projections, desc="sensitivity sweep", unit="proj"):
        original = model.get_submodule(p.name)
        rank = max(1, int(SWEEP_KEEP * p.params / (p.out_features + p.in_features)))
        replace_module(model, p.name, decompositions[p.name].linear(rank))
        losses[p.name] = sum(model(s[None], labels=s[None], use_cache=False).loss.item() for s in samples) / len(samples)
        replace_module(model, p.name, original)
    return {"seconds": time.perf_counter() - start, "projections": len(projections), "losses": losses}


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local model dir or .gguf (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    parser.add_argument("--windows", type=int, default=64, help="WikiText-2 test windows of 512 tokens")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--fisher-samples", type=int, default=8, help="calibration sequences for Fisher")
    parser.add_argument("--rank-multiple", type=int, default=16, help="rank granularity of fisher rows")
    parser.add_argument("--sweep-projections", type=int, default=42,
                        help="projections the sensitivity sweep times (0: skip; the full sweep's time is this "
                             "sample's mean per projection x the projection count, each costing the same forwards)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")

    torch.manual_seed(0)
    model, tokenizer = load_model(resolve_model(args.model))
    projections = decoder_projections(model)
    total = count_params(model)
    windows = text_windows(tokenizer, DATA / "wikitext-2" / "test.txt", 512, args.windows)
    prompt = windows[-1, : args.prompt_tokens].tolist()
    calib, _ = calibration_ids(model, tokenizer, str(DATA / "wikitext-2" / "valid.txt"),
                               args.calib_samples, args.calib_seq_len, seed=0)

    decompositions, decompose_s = {}, {}
    fisher, fisher_s = None, 0.0
    rows = []
    for name in names:
        method, allocation, ratio = ROWS[name]
        row = Row(name, method, allocation, ratio)
        candidate = model
        if method != "dense":
            if method not in decompositions:  # one decomposition serves every ratio and allocation
                start = time.perf_counter()
                decompositions[method] = decompose_model(model, method, calib if method == "whitened" else None,
                                                         full_rank=method == "whitened")
                decompose_s[method] = time.perf_counter() - start
            start = time.perf_counter()
            if allocation == "fisher":
                if fisher is None:
                    fisher = component_fisher(model, decompositions[method], calib[: args.fisher_samples])
                    fisher_s = time.perf_counter() - start
                budget = round((1.0 - ratio) * sum(p.params for p in projections))
                result = allocate(projections, fisher, budget, multiple=args.rank_multiple)
                ranks, row.search_s = result.ranks, fisher_s + result.seconds
            else:
                ranks = uniform_ranks(projections, ratio)
            candidate = copy.deepcopy(model)
            apply_ranks(candidate, decompositions[method], ranks)
            row.compress_s = decompose_s[method] + time.perf_counter() - start
        summary = parameter_summary(projections, effective_ranks(candidate, projections), total)
        row.projection_removed, row.params = summary["projection_fraction_removed"], summary["total_params"]
        print(f"[{name}] perplexity on {windows.shape[0]} windows", file=sys.stderr)
        row.perplexity = perplexity(candidate, windows)
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = export_onnx(candidate, Path(tmp))
            row.artifact_mb = dir_mb(Path(tmp))
            row.decode_tok_s, row.prefill_ms = decode_speed(onnx_path, prompt, args.new_tokens, args.threads)
        rows.append(row)
        print(f"[{name}] {asdict(row)}", file=sys.stderr)
        if candidate is not model:
            del candidate

    sweep = None
    if fisher is not None and args.sweep_projections > 0:
        # An even spread over layers and projection kinds.
        step = max(1, len(projections) // args.sweep_projections)
        sample = projections[::step][: args.sweep_projections]
        sweep = sensitivity_sweep(model, decompositions["whitened"], sample, calib[: args.fisher_samples])
        sweep["projections_total"] = len(projections)
        sweep["seconds_full"] = sweep["seconds"] / len(sample) * len(projections)
        sweep["flrc_search_s"] = fisher_s
        sweep["speedup"] = sweep["seconds_full"] / fisher_s

    table = format_table(rows, windows.shape[0], args)
    if sweep:
        table += (f"\n\nRank search: FLRC (Fisher importance of every component + allocation) "
                  f"{sweep['flrc_search_s']:.1f} s vs a one-level sensitivity sweep (truncate one projection at a "
                  f"time to {1 - SWEEP_KEEP:.0%} removed, calibration loss on {args.fisher_samples} x "
                  f"{args.calib_seq_len} tokens): {sweep['seconds']:.1f} s measured on {sweep['projections']} "
                  f"projections, {sweep['seconds_full']:.0f} s for all {sweep['projections_total']}: "
                  f"{sweep['speedup']:.1f}x faster. The sweep prices one level; FLRC prices every component.")
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"bench-{stamp}.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "rows": [asdict(r) for r in rows], "sweep": sweep,
         "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}, indent=2))
    return 0


def format_table(rows: list[Row], n_windows: int, args) -> str:
    lines = [
        f"| row | method | allocation | projection params removed | params | WikiText-2 ppl ({n_windows}x512) "
        f"| compression s | rank search s | decode tok/s ({args.threads} thr) | prefill ms ({args.prompt_tokens} tok) "
        "| artifact MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.method} | {r.allocation} | {r.projection_removed:.1%} | {r.params / 1e6:.1f}M "
            f"| {r.perplexity:.2f} | {r.compress_s:.1f} | {'-' if r.search_s != r.search_s else f'{r.search_s:.1f}'} "
            f"| {r.decode_tok_s:.1f} | {r.prefill_ms:.0f} | {r.artifact_mb:.0f} |"
        )
    lines.append("")
    lines.append("compression s: decomposition of every projection (shared by all rows of a method; whitened "
                 "includes calibration statistics and keeps every component) plus this row's rank choice. "
                 "rank search s: Fisher importance (computed once, shared by the fisher rows) + allocation.")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
