"""Benchmark: quality, compression time, ONNX Runtime decode speed, memory and size, in one run.

    python benchmarks/run.py [--model M] [--windows 64] [--rows dense,whitened-20,...]
                             [--builder-python .venv-builder/bin/python]

Every row is built from the same loaded model, calibration data and evaluation windows, so the
ratios between rows are meaningful even on a noisy machine. Prints a Markdown table and writes
the figures as JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.compress.corrective import CorrectiveOptions  # noqa: E402
from exporter.compress.factorize import (  # noqa: E402
    corrective_ranks,
    count_params,
    decoder_projections,
    effective_ranks,
    parameter_summary,
)
from exporter.device.profiles import load_profile  # noqa: E402
from exporter.graph.optimum_export import export_onnx  # noqa: E402
from exporter.pipeline import ExportOptions, compress, prepare  # noqa: E402
from exporter.runtime.evaluate import evaluate_summarization, ort_perplexity, perplexity, read_articles, text_windows  # noqa: E402
from exporter.runtime.generation import OrtDecoder, Runtime  # noqa: E402
from exporter.source.model import hf_directory  # noqa: E402

try:
    from exporter.graph.writer import write_decoder
except ImportError:  # the fused writer is optional for the foundation rows
    write_decoder = None

DATA = ROOT.parent / "shared" / "data"


@dataclass
class Row:
    name: str
    method: str  # dense | svd | whitened
    allocation: str  # - | uniform | fisher
    ratio: float
    graph: str = "optimum"  # optimum | writer (ours, fused) | builder (onnxruntime-genai)
    weights: str = "fp32"
    projection_removed: float = 0.0
    params: int = 0
    perplexity: float = float("nan")
    perplexity_runtime: str = "torch"  # torch (same weights as the graph, parity-checked) | onnxruntime
    compress_s: float = 0.0
    search_s: float = float("nan")  # fisher rows: importance + allocation
    decode_tok_s: float = float("nan")
    decode_rounds: list = field(default_factory=list)  # decode tok/s of each timing round (paired ratios)
    prefill_ms: float = float("nan")
    peak_rss_mb: float = float("nan")
    artifact_mb: float = float("nan")  # ONNX graph + weights on disk
    calr: str = "-"  # - | fp32 (correctives trained against the fp32 primary path) | int4 (against int4)
    joint: bool = False  # q/k/v and gate/up factorized jointly (one unit each: exporter.compress.factorize)
    latency_aware: bool = False  # each factorization's graph node priced in the allocation (--latency-aware)
    node_params: float = 0.0  # that price, in weights at the row's precision
    factorized: int = 0  # projections (or joint units) factorized
    train_s: float = float("nan")  # corrective training
    rouge_l: float = float("nan")  # CNN/DailyMail ROUGE-L F1 through ONNX Runtime (--rouge-rows)


def spec(method, allocation, ratio, graph="optimum", weights="fp32", calr="-", joint=False, latency_aware=False):
    return {"method": method, "allocation": allocation, "ratio": ratio, "graph": graph, "weights": weights,
            "calr": calr, "joint": joint, "latency_aware": latency_aware}


ROWS = {
    # the foundation's table (optimum export, fp32)
    "dense": spec("dense", "-", 0.0),
    "svd-20": spec("svd", "uniform", 0.2),
    "svd-40": spec("svd", "uniform", 0.4),
    "whitened-20": spec("whitened", "uniform", 0.2),
    "whitened-40": spec("whitened", "uniform", 0.4),
    "flrc-20": spec("whitened", "fisher", 0.2),
    "flrc-40": spec("whitened", "fisher", 0.4),
    # what users compare with, and our fused graph
    "builder-fp32": spec("dense", "-", 0.0, "builder", "fp32"),
    "builder-int4": spec("dense", "-", 0.0, "builder", "int4"),
    "writer-dense": spec("dense", "-", 0.0, "writer", "fp32"),
    "writer-whitened-20": spec("whitened", "uniform", 0.2, "writer", "fp32"),  # CALR's ROUGE-L baseline
    "writer-flrc-20": spec("whitened", "fisher", 0.2, "writer", "fp32"),
    "writer-flrc-40": spec("whitened", "fisher", 0.4, "writer", "fp32"),
    "writer-dense-int4": spec("dense", "-", 0.0, "writer", "int4"),
    "writer-flrc-20-int4": spec("whitened", "fisher", 0.2, "writer", "int4"),
    "writer-flrc-40-int4": spec("whitened", "fisher", 0.4, "writer", "int4"),
    "writer-flrc-55-int4": spec("whitened", "fisher", 0.55, "writer", "int4"),
    "writer-flrc-70-int4": spec("whitened", "fisher", 0.7, "writer", "int4"),
    # int8 (8-bit MatMulNBits since 2026-12-05; Run 6 measured quantize_dynamic: per-tensor activations)
    "writer-dense-int8": spec("dense", "-", 0.0, "writer", "int8"),
    "writer-flrc-20-int8": spec("whitened", "fisher", 0.2, "writer", "int8"),
    "writer-flrc-40-int8": spec("whitened", "fisher", 0.4, "writer", "int8"),
    # CALR: corrective branches at the same total parameters (primary ranks shrink to pay for them)
    "calr-20": spec("whitened", "uniform", 0.2, calr="fp32"),
    "calr-40": spec("whitened", "uniform", 0.4, calr="fp32"),
    "flrc-calr-20": spec("whitened", "fisher", 0.2, calr="fp32"),
    "flrc-calr-40": spec("whitened", "fisher", 0.4, calr="fp32"),
    "writer-flrc-calr-20": spec("whitened", "fisher", 0.2, "writer", "fp32", calr="fp32"),
    "writer-flrc-calr-20-int4": spec("whitened", "fisher", 0.2, "writer", "int4", calr="int4"),
    "writer-flrc-calr-20-int4-fp32trained": spec("whitened", "fisher", 0.2, "writer", "int4", calr="fp32"),
    "writer-flrc-calr-40-int4": spec("whitened", "fisher", 0.4, "writer", "int4", calr="int4"),
    # joint factorization of q/k/v and of gate/up (one rank and one down factor per group: fewer nodes)
    "writer-joint-20-int4": spec("whitened", "fisher", 0.2, "writer", "int4", joint=True),
    "writer-joint-40-int4": spec("whitened", "fisher", 0.4, "writer", "int4", joint=True),
    "writer-joint-calr-20-int4": spec("whitened", "fisher", 0.2, "writer", "int4", calr="int4", joint=True),
    # latency-aware allocation: the node each factorization adds is priced (host's measured cost model)
    "writer-flrc-40-lat-int4": spec("whitened", "fisher", 0.4, "writer", "int4", latency_aware=True),
    "writer-joint-40-lat-int4": spec("whitened", "fisher", 0.4, "writer", "int4", joint=True, latency_aware=True),
    "writer-flrc-calr-20-lat-int4": spec("whitened", "fisher", 0.2, "writer", "int4", calr="int4",
                                         latency_aware=True),
}
CALR_ROWS = ["whitened-20", "whitened-40", "flrc-20", "flrc-40", "calr-20", "calr-40", "flrc-calr-20", "flrc-calr-40"]
FOUNDATION_ROWS = ["dense", "svd-20", "svd-40", "whitened-20", "whitened-40", "flrc-20", "flrc-40"]


def probe(onnx_path: Path, prompt: list[int], new_tokens: int, threads: int) -> dict:
    """Decode tok/s, prefill ms and peak RSS of one graph, measured in a fresh process."""
    command = [sys.executable, str(ROOT / "benchmarks" / "decode_probe.py"), str(onnx_path),
               "--prompt-ids", ",".join(map(str, prompt)), "--new-tokens", str(new_tokens), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_with_builder(builder_python: str, model_dir: Path, out: Path, precision: str,
                       extra_options: dict[str, str] | None = None) -> Path:
    """The onnxruntime-genai model builder, run from its own environment (it needs a newer transformers);
    `extra_options` are its --extra_options (int4_block_size, int4_algo_config, ...)."""
    if not (out / "model.onnx").is_file():
        command = [builder_python, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out),
                   "-p", precision, "-e", "cpu", "-c", str(out.parent / "builder-cache")]
        if extra_options:
            command += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out / "model.onnx"


def onnx_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx")) / 1e6


SWEEP_KEEP = 0.6  # the sweep truncates each projection to 60% of its parameters


@torch.no_grad()
def sensitivity_sweep(model, decompositions, projections, samples: torch.Tensor) -> dict:
    """The search FLRC replaces: truncate one projection at a time, measure calibration loss."""
    from tqdm.auto import tqdm

    from exporter.compress.factorize import replace_module

    start = time.perf_counter()
    losses = {}
    for p in tqdm(projections, desc="sensitivity sweep", unit="proj"):
        original = model.get_submodule(p.name)
        rank = max(1, int(SWEEP_KEEP * p.params / (p.out_features + p.in_features)))
        replace_module(model, p.name, decompositions[p.name].linear(rank))
        losses[p.name] = sum(model(s[None], labels=s[None], use_cache=False).loss.item() for s in samples) / len(samples)
        replace_module(model, p.name, original)
    return {"seconds": time.perf_counter() - start, "projections": len(projections), "losses": losses}


def row_options(base: ExportOptions, row: Row, weights: str, args) -> ExportOptions:
    """The export options that compress as `row` asks (a dense row: ratio 0; int4 rows get their grids)."""
    correctives = None if row.calr == "-" else CorrectiveOptions(
        rank=args.corrective_rank, epochs=args.corrective_epochs, kl_steps=args.kl_steps)
    dense = row.method == "dense"
    return replace(base, ratio=0.0 if dense else row.ratio, method="svd" if dense else row.method,
                   allocation="uniform" if dense else row.allocation, weights=weights, joint=row.joint,
                   latency_aware=row.latency_aware, correctives=correctives,
                   quantization_aware=row.calr == "int4")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local model dir or .gguf (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}; "
                        "'foundation' for the first seven")
    parser.add_argument("--builder-python", help="python of an environment with onnxruntime-genai (make builder-env); "
                        "builder rows are skipped without it")
    parser.add_argument("--block-size", type=int, default=32, help="int4 block size")
    parser.add_argument("--quantizer", choices=["rtn", "gptq"], default="rtn",
                        help="int4 grids (rtn: the stored rows' setting; gptq: the export's default)")
    parser.add_argument("--accuracy-level", type=int, default=4,
                        help="int4 MatMulNBits accuracy_level (4: int8 activations, the builder's CPU default)")
    parser.add_argument("--windows", type=int, default=64, help="WikiText-2 test windows of 512 tokens")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--fisher-samples", type=int, default=8, help="calibration sequences for Fisher")
    parser.add_argument("--rank-multiple", type=int, default=16, help="rank granularity of fisher rows")
    parser.add_argument("--factor-node-us", type=float, help="latency-aware rows: the factor node's cost in us "
                        "(default: measured on this machine, which varies a little between runs)")
    parser.add_argument("--sweep-projections", type=int, default=42,
                        help="projections the sensitivity sweep times (0: skip; the full sweep's time is this "
                             "sample's mean per projection x the projection count, each costing the same forwards)")
    parser.add_argument("--corrective-rank", type=int, default=CorrectiveOptions.rank)
    parser.add_argument("--corrective-epochs", type=int, default=CorrectiveOptions.epochs)
    parser.add_argument("--kl-steps", type=int, default=CorrectiveOptions.kl_steps)
    parser.add_argument("--rouge-rows", default="", help="rows also scored on CNN/DailyMail summarization (ROUGE-L)")
    parser.add_argument("--rouge-examples", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--timing-rounds", type=int, default=3,
                        help="decode/prefill/RSS probes per graph, interleaved across graphs (median)")
    parser.add_argument("--keep", type=Path, help="keep each row's graph in KEEP/ROW (default: deleted after the row)")
    args = parser.parse_args(argv)
    groups = {"foundation": FOUNDATION_ROWS, "calr": CALR_ROWS}  # whole-name aliases only
    requested = [n.strip() for n in args.rows.split(",") if n.strip()]
    names = list(dict.fromkeys(row for n in requested for row in groups.get(n, [n])))
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")

    # Every row compresses a copy of one prepared model with the export's own steps (exporter.pipeline.compress);
    # the statistics (calibration windows, factorizations, Fisher importance) are computed once and shared.
    host = load_profile("host")
    host = replace(host, runtime=replace(host.runtime, rank_multiple=args.rank_multiple))
    base = ExportOptions(device="host", model=args.model, calib=str(DATA / "wikitext-2" / "valid.txt"),
                         calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                         fisher_samples=args.fisher_samples, seed=0, weights="fp32", block_size=args.block_size,
                         accuracy_level=args.accuracy_level, quantizer=args.quantizer,
                         factor_node_us=args.factor_node_us, progress=False)
    prepared = prepare(base, profile=host)
    source, model, tokenizer = prepared.source, prepared.model, prepared.tokenizer
    total = count_params(model)
    windows = text_windows(tokenizer, DATA / "wikitext-2" / "test.txt", 512, args.windows)
    prompt = windows[-1, : args.prompt_tokens].tolist()
    calib, _ = prepared.calibration()
    work = Path(tempfile.mkdtemp(prefix="exporter-bench-"))
    rouge_rows = {n.strip() for n in args.rouge_rows.split(",") if n.strip()}
    articles = read_articles(DATA / "cnn_dailymail" / "validation.jsonl", args.rouge_examples) if rouge_rows else []

    # row key -> (model, compress_s, search_s, torch ppl, train_s, node_params)
    candidates: dict[tuple, tuple] = {}
    rows, graphs = [], []
    for name in names:
        s_ = ROWS[name]
        row = Row(name, s_["method"], s_["allocation"], s_["ratio"], s_["graph"], s_["weights"], calr=s_["calr"],
                  joint=s_["joint"], latency_aware=s_["latency_aware"])
        projections = decoder_projections(model, row.joint)
        if row.graph == "builder" and not args.builder_python:
            print(f"[{name}] skipped: pass --builder-python (make builder-env)", file=sys.stderr)
            continue
        if row.graph == "writer" and write_decoder is None:
            print(f"[{name}] skipped: exporter.graph.writer is not available", file=sys.stderr)
            continue
        weights = row.weights if row.graph == "writer" else "fp32"  # optimum and builder rows: fp32 in PyTorch
        key = (row.method, row.allocation, row.ratio, row.calr, row.joint, row.latency_aware, weights)
        if key not in candidates:
            if row.method == "dense" and weights != "int4":
                candidates[key] = (model, 0.0, float("nan"), None, float("nan"), 0.0)
            else:
                options = row_options(base, row, weights, args)
                before = dict(prepared.clock.stages)
                plan = compress(prepared, options, model=copy.deepcopy(model))
                spent = {k: v - before.get(k, 0.0) for k, v in prepared.clock.stages.items()}
                fisher = options.allocation == "fisher" and row.method != "dense"
                # compression s: the factorization (computed once per method, charged to every row of it),
                # Fisher importance (likewise) and this row's allocation; rank search s: importance + allocation
                shared = prepared.seconds.get(("factorize", (options.method, options.joint, fisher)), 0.0)
                importance = prepared.seconds.get(("importance", (options.method, options.joint,
                                                                  options.fisher_samples)), 0.0) if fisher else 0.0
                allocate_s = spent.get("allocate", 0.0)
                candidates[key] = (plan.model, shared + importance + allocate_s,
                                   importance + allocate_s if fisher else float("nan"), None,
                                   spent["correctives"] if "correctives" in spent else float("nan"),
                                   plan.allocation.node_params if plan.allocation else 0.0)
        candidate, row.compress_s, row.search_s, torch_ppl, row.train_s, row.node_params = candidates[key]
        summary = parameter_summary(projections, effective_ranks(candidate, projections), total,
                                    corrective_ranks(candidate, projections))
        row.projection_removed, row.params = summary["projection_fraction_removed"], summary["total_params"]
        row.factorized = sum(r is not None for r in effective_ranks(candidate, projections).values())

        folder = work / name
        folder.mkdir()
        if row.graph == "optimum":
            onnx_path = export_onnx(candidate, folder)
        elif row.graph == "writer":
            onnx_path = write_decoder(candidate, folder, weights=row.weights, block_size=args.block_size,
                                      accuracy_level=args.accuracy_level if row.weights == "int4" else None)
        else:
            onnx_path = build_with_builder(args.builder_python, hf_directory(source), folder, row.weights)
        row.artifact_mb = onnx_mb(folder)
        if row.graph == "optimum" or (row.graph == "writer" and row.weights == "fp32" and torch_ppl is not None):
            if torch_ppl is None:
                print(f"[{name}] perplexity on {windows.shape[0]} windows", file=sys.stderr)
                torch_ppl = perplexity(candidate, windows)
                candidates[key] = (candidate, row.compress_s, row.search_s, torch_ppl, row.train_s, row.node_params)
            row.perplexity = torch_ppl
        else:  # quantized or foreign graphs: score the ONNX model itself
            print(f"[{name}] perplexity (onnxruntime) on {windows.shape[0]} windows", file=sys.stderr)
            row.perplexity = ort_perplexity(OrtDecoder(onnx_path, threads=args.threads), windows)
            row.perplexity_runtime = "onnxruntime"
        if name in rouge_rows:
            if row.graph == "optimum":
                raise SystemExit(f"--rouge-rows: {name} is an optimum row; score a writer row instead")
            tokenizer.save_pretrained(folder)
            print(f"[{name}] ROUGE-L on {len(articles)} CNN/DailyMail articles", file=sys.stderr)
            runtime = Runtime(folder, threads=args.threads)
            result = evaluate_summarization(runtime, articles, runtime.parse_schedule(None))
            row.rouge_l = result["rougeL"]
        rows.append(row)
        graphs.append(onnx_path)
        print(f"[{name}] {asdict(row)}", file=sys.stderr)

    # Speed and memory last, every graph in turn each round: drift in the machine's speed during the
    # (long) run then touches every row alike, and the same-run ratios stay meaningful.
    samples = {row.name: [] for row in rows}
    for round_ in range(args.timing_rounds):
        print(f"timing round {round_ + 1}/{args.timing_rounds}", file=sys.stderr)
        for row, onnx_path in zip(rows, graphs):
            samples[row.name].append(probe(onnx_path, prompt, args.new_tokens, args.threads))
    for row in rows:
        for name in ("decode_tok_s", "prefill_ms", "peak_rss_mb"):
            setattr(row, name, float(statistics.median(m[name] for m in samples[row.name])))
        row.decode_rounds = [m["decode_tok_s"] for m in samples[row.name]]
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        for row in rows:
            shutil.rmtree(args.keep / row.name, ignore_errors=True)
            shutil.move(work / row.name, args.keep / row.name)

    sweep = None
    flrc = ("importance", ("whitened", False, args.fisher_samples))
    if flrc in prepared.seconds and args.sweep_projections > 0:  # per-projection FLRC against the sweep it replaces
        projections = decoder_projections(model)
        # An even spread over layers and projection kinds.
        step = max(1, len(projections) // args.sweep_projections)
        sample = projections[::step][: args.sweep_projections]
        sweep = sensitivity_sweep(model, prepared.decompositions("whitened", False, True), sample, calib[: args.fisher_samples])
        sweep["projections_total"] = len(projections)
        sweep["seconds_full"] = sweep["seconds"] / len(sample) * len(projections)
        sweep["flrc_search_s"] = prepared.seconds[flrc]
        sweep["speedup"] = sweep["seconds_full"] / prepared.seconds[flrc]

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
    (args.out / f"bench-{stamp}.md").write_text(table + "\n")
    if len(rows) > 1:
        plot_frontier([r for r in rows if r.perplexity < 1e4], args.out / f"frontier-{stamp}.png")
    shutil.rmtree(work, ignore_errors=True)
    (args.out / f"bench-{stamp}.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "rows": [asdict(r) for r in rows], "sweep": sweep,
         "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}, indent=2))
    return 0


def format_table(rows: list[Row], n_windows: int, args) -> str:
    lines = [
        f"| row | graph | weights | method | allocation | projection params removed | params "
        f"| WikiText-2 ppl ({n_windows}x512) | compression s | rank search s | decode tok/s ({args.threads} thr) "
        f"| prefill ms ({args.prompt_tokens} tok) | peak RSS MB | ONNX MB | CALR trained on | train s | ROUGE-L "
        f"| factorized |",
        "|---" * 18 + "|",
    ]
    for r in rows:
        search = "-" if r.search_s != r.search_s else f"{r.search_s:.1f}"
        ppl = f"{r.perplexity:.2f}" + ("" if r.perplexity_runtime == "torch" else " (ort)")
        lines.append(
            f"| {r.name} | {r.graph} | {r.weights} | {r.method} | {r.allocation} | {r.projection_removed:.1%} "
            f"| {r.params / 1e6:.1f}M | {ppl} | {r.compress_s:.1f} | {search} | {r.decode_tok_s:.1f} "
            f"| {r.prefill_ms:.0f} | {r.peak_rss_mb:.0f} | {r.artifact_mb:.1f} | {r.calr} "
            f"| {'-' if r.train_s != r.train_s else f'{r.train_s:.0f}'} "
            f"| {'-' if r.rouge_l != r.rouge_l else f'{r.rouge_l:.4f}'} "
            f"| {r.factorized}{f' (node priced {r.node_params:,.0f})' if r.latency_aware else ''} |"
        )
    lines += [
        "",
        "compression s: decomposition of every projection (shared by all rows of a method; whitened includes "
        "calibration statistics and keeps every component) plus this row's rank choice. rank search s: Fisher "
        "importance (computed once, shared by the fisher rows) + allocation. Perplexity: PyTorch on the same "
        "weights for fp32 optimum rows (parity-checked export); '(ort)': the ONNX graph itself in ONNX Runtime. "
        "Decode, prefill and peak RSS: a fresh process per graph (benchmarks/decode_probe.py), medians of "
        f"{args.timing_rounds} rounds that visit every graph in turn after all rows are built; decode ratios "
        "below are medians of the per-round ratios.",
    ]
    comparisons = compare(rows)
    if comparisons:
        lines += ["", *comparisons]
    return "\n".join(lines)


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over timing rounds of a's speed / b's in the same round. Rounds visit every graph in turn
    within a minute or so, so the machine's drift between rounds (+-10-30% on these shared 2-core
    machines) cancels in each round's ratio, not in a ratio of medians taken over different moments."""
    return float(statistics.median(x / y for x, y in zip(a, b)))


FIELD_LABELS = {"perplexity": "perplexity", "decode_tok_s": "decode tok/s", "artifact_mb": "ONNX MB", "rouge_l": "ROUGE-L"}


def compare(rows: list[Row]) -> list[str]:
    """Same-run ratios the project's targets are stated in (decode speed: `paired_ratio`)."""
    by = {r.name: r for r in rows}
    out = []

    def ratio(a, b, field):
        if a not in by or b not in by:
            return None
        if field == "decode_tok_s" and by[a].decode_rounds and len(by[a].decode_rounds) == len(by[b].decode_rounds):
            return paired_ratio(by[a].decode_rounds, by[b].decode_rounds)
        return getattr(by[a], field) / getattr(by[b], field)

    checks = [  # (row, baseline row, field, target; label where it says more than the names)
        ("flrc-20", "whitened-20", "perplexity", "<= 0.75"),
        ("flrc-40", "whitened-40", "perplexity", "<= 0.70"),
        ("writer-dense", "builder-fp32", "decode_tok_s", ">= 1.0"),
        ("writer-dense", "dense", "decode_tok_s", ">= 1.3", "writer-dense / dense (optimum) decode tok/s"),
        ("writer-flrc-20-int4", "builder-int4", "artifact_mb", "<= 0.85"),
        ("writer-flrc-20-int4", "builder-int4", "decode_tok_s", ">= 1.0"),
        ("writer-flrc-20-int4", "builder-int4", "perplexity", "<= 1.3"),
        ("writer-flrc-40-int4", "builder-int4", "decode_tok_s", ">= 1.15"),
        ("writer-joint-20-int4", "builder-int4", "artifact_mb", "<= 0.85"),
        ("writer-joint-20-int4", "builder-int4", "decode_tok_s", ">= 1.0"),
        ("writer-joint-20-int4", "builder-int4", "perplexity", "<= 1.3"),
        ("writer-joint-calr-20-int4", "builder-int4", "artifact_mb", "<= 0.85"),
        ("writer-joint-calr-20-int4", "builder-int4", "decode_tok_s", ">= 1.0"),
        ("writer-joint-calr-20-int4", "builder-int4", "perplexity", "<= 1.3"),
        ("writer-joint-40-int4", "builder-int4", "decode_tok_s", ">= 1.15"),
        ("writer-joint-40-int4", "writer-flrc-40-int4", "perplexity", None),
        ("writer-flrc-40-lat-int4", "builder-int4", "decode_tok_s", ">= 1.15"),
        ("writer-flrc-40-lat-int4", "writer-flrc-40-int4", "perplexity", None),
        ("writer-joint-40-lat-int4", "builder-int4", "decode_tok_s", ">= 1.15"),
        ("writer-joint-40-lat-int4", "writer-flrc-40-int4", "perplexity", None),
        ("writer-flrc-calr-20-lat-int4", "builder-int4", "decode_tok_s", ">= 1.0"),
        ("writer-flrc-calr-20-lat-int4", "builder-int4", "perplexity", "<= 1.3"),
        ("flrc-calr-20", "dense", "perplexity", "<= 1.4"),
        ("flrc-calr-40", "dense", "perplexity", "<= 2.5"),
        ("calr-20", "whitened-20", "perplexity", "<= 0.85", "calr-20 / whitened-20 perplexity (same params)"),
        ("calr-40", "whitened-40", "perplexity", "<= 0.85", "calr-40 / whitened-40 perplexity (same params)"),
        # CALR's gain under Fisher ranks: reported, no target (the is against whitened SVD, above)
        ("flrc-calr-20", "flrc-20", "perplexity", None, "flrc-calr-20 / flrc-20 perplexity (same params)"),
        ("flrc-calr-40", "flrc-40", "perplexity", None, "flrc-calr-40 / flrc-40 perplexity (same params)"),
        ("writer-flrc-calr-20", "writer-whitened-20", "rouge_l", None),
        ("writer-flrc-calr-20-int4", "writer-flrc-calr-20-int4-fp32trained", "perplexity", "< 1"),
        ("writer-flrc-calr-20-int4", "builder-int4", "perplexity", "<= 1.3"),
        ("writer-flrc-calr-20-int4", "builder-int4", "artifact_mb", "<= 0.85"),
        ("writer-flrc-calr-20-int4", "builder-int4", "decode_tok_s", ">= 1.0"),
    ]
    for a, b, field, target, *label in checks:
        value = ratio(a, b, field)
        if value is not None:
            label = label[0] if label else f"{a} / {b} {FIELD_LABELS[field]}"
            out.append(f"- {label}: {value:.2f}" + (f" (target {target})" if target else ""))
    return out


def plot_frontier(rows: list[Row], path: Path) -> None:
    """Perplexity vs ONNX size: our points and the builder's, one marker per graph and precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(f"{r.graph} {r.weights}", []).append(r)
    for label, members in sorted(groups.items()):
        members.sort(key=lambda r: r.artifact_mb)
        ax.plot([r.artifact_mb for r in members], [r.perplexity for r in members], "o-" if len(members) > 1 else "s",
                label=label)
        for r in members:
            ax.annotate(r.name, (r.artifact_mb, r.perplexity), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("ONNX weights on disk (MB)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title("Quality vs size, one benchmark run")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
