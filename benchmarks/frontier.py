"""The size-quality frontier: `--weights auto` at several byte budgets against fixed int4 settings, one run.

    python benchmarks/frontier.py [--budgets 52,65,78,86.5,93.5,105.5] [--latency-aware 86.5,93.5] [--windows 64]
                                  [--builder-python .venv-builder/bin/python]

One loaded model, one calibration, one pricing of every MatMulNBits' menu (exporter.pipeline.prepare), then
per row a copy compressed by the export's own step (exporter.pipeline.compress: the knapsack's choice under
the row's budget, with the CLI's defaults: chat-format calibration, scale tuning) and written as the export writes it
(exporter.graph.writer.write_decoder), so that an auto row is what `exporter export --weights auto --budget-mb B
--calib valid.txt` writes. Fixed rows: ours
at int4 block 32 with RTN (ONNX Runtime's own rule: the builder's default grid) and with GPTQ, and the
onnxruntime-genai builder's int4 at block 32/64/128 where --builder-python is given; with --ort-quantizers,
ONNX Runtime's own MatMulNBitsQuantizer (k_quant, HQQ) on our dense graph (`write_with_onnxruntime_quantizer`).
Every row: weight MB on
disk, perplexity through ONNX Runtime on the same WikiText-2 windows, decode tok/s and peak RSS measured in a
fresh process (paired per round against the first fixed row), and decode again with every graph loaded in this
process (benchmarks/race.py's `step_timer`; steadier on 2 cores, the two differ by up to 0.1 on this machine).
Writes results/frontier-*.json/.md and a plot.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from race import step_timer  # noqa: E402
from results_io import publish_results  # noqa: E402
from run import build_with_builder, onnx_mb, paired_ratio, probe  # noqa: E402

from exporter.errors import BudgetError  # noqa: E402
from exporter.graph.writer import write_decoder  # noqa: E402
from exporter.pipeline import ExportOptions, compress, prepare  # noqa: E402
from exporter.runtime.evaluate import ort_perplexity, text_windows  # noqa: E402
from exporter.runtime.generation import OrtDecoder  # noqa: E402
from exporter.settings import CALIB_CHAT, TUNE_SCALES_STEPS  # noqa: E402
from exporter.source.model import hf_directory  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="52,65,78,86.5,93.5,105.5", help="weight MB budgets of the auto rows")
    parser.add_argument("--latency-aware", default="", metavar="BUDGETS",
                        help="also auto rows at these budgets with the CLI's --latency-aware (the host's node price)")
    parser.add_argument("--windows", type=int, default=64, help="WikiText-2 test windows of 512 tokens")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--fisher-samples", type=int, default=8)
    parser.add_argument("--calib-chat", type=float, default=CALIB_CHAT,
                        help=f"share of calibration windows that are chat turns (the CLI's --calib-chat, default {CALIB_CHAT}"
                        "; 0: the frontier rows stored before 2026-12-05)")
    parser.add_argument("--tune-scales", type=int, default=TUNE_SCALES_STEPS, metavar="STEPS",
                        help=f"scale tuning steps of the auto rows (the CLI's default with --weights auto, "
                        f"{TUNE_SCALES_STEPS}; 0: off, as the frontier rows stored before 2026-12-05)")
    parser.add_argument("--builder-python", help="python of an environment with onnxruntime-genai (make builder-env)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-rounds", type=int, default=11)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--keep", type=Path, help="keep every row's graph under KEEP/ROW")
    parser.add_argument("--error-correction", type=int, default=0, metavar="RANK",
                        help="also auto rows whose menu offers a whitened error correction of RANK (LQER)")
    parser.add_argument("--ort-quantizers", default="",
                        help="ONNX Runtime's own quantizer rows on our dense graph, e.g. k_quant-b32,hqq-b32,hqq-b64")
    parser.add_argument("--references", default="fp32,fp16",
                        help="dense reference rows: our graph with float weights (fp32, fp16; '' for none)")
    parser.add_argument("--fixed", action=argparse.BooleanOptionalAction, default=True,
                        help="the fixed int4 b32 rows (RTN, GPTQ)")
    args = parser.parse_args(argv)

    base = ExportOptions(device="host", calib=str(DATA / "wikitext-2" / "valid.txt"), calib_samples=args.calib_samples,
                         calib_seq_len=512, calib_chat=args.calib_chat, fisher_samples=args.fisher_samples, seed=0,
                         weights="int4", block_size=32, accuracy_level=4, progress=False)
    prepared = prepare(base)
    source, model, tokenizer = prepared.source, prepared.model, prepared.tokenizer
    windows = text_windows(tokenizer, DATA / "wikitext-2" / "test.txt", 512, args.windows)
    prompt = windows[-1, : args.prompt_tokens].tolist()
    work = args.keep or Path(tempfile.mkdtemp(prefix="exporter-frontier-"))
    context = prepared.profile.budget.max_context  # rotary tables as the export writes them (the budget counts them)
    rows, graphs = [], []

    def add(name: str, folder: Path, onnx_path: Path, seconds: float, extra: dict | None = None) -> None:
        print(f"[{name}] perplexity on {windows.shape[0]} windows", file=sys.stderr)
        ppl = ort_perplexity(OrtDecoder(onnx_path, threads=args.threads), windows, progress=False)
        rows.append({"row": name, "weight_mb": round(onnx_mb(folder), 2), "perplexity": round(ppl, 3),
                     "build_s": round(seconds, 1), **(extra or {})})
        graphs.append(onnx_path)
        print(json.dumps(rows[-1]), file=sys.stderr)

    if args.builder_python:
        settings = [(f"builder int4 b{block}", {"block_size": str(block)}) for block in (32, 64, 128)]
        settings += [(f"builder int4 {algo}", {"algo_config": algo}) for algo in ("k_quant", "k_quant_mixed")]
        for name, extra in settings:
            folder = work / name.replace(" ", "-")
            start = time.perf_counter()
            path = build_with_builder(args.builder_python, hf_directory(source), folder, "int4", extra)
            add(name, folder, path, time.perf_counter() - start)
    for setting in filter(None, args.ort_quantizers.split(",")):
        algo, block = setting.rsplit("-b", 1)
        folder = work / f"ort-{setting}"
        start = time.perf_counter()
        path = write_with_onnxruntime_quantizer(model, folder, algo, int(block), context)
        add(f"onnxruntime quantizer {algo} b{block}", folder, path, time.perf_counter() - start)
    for weights in filter(None, args.references.split(",")):
        start = time.perf_counter()
        folder = work / f"ours-{weights}"
        path = write_decoder(model, folder, weights=weights, max_context=context)
        add(f"ours {weights} (dense)", folder, path, time.perf_counter() - start)
    for quantizer in ("rtn", "gptq") if args.fixed else ():
        start = time.perf_counter()
        candidate = compress(prepared, replace(base, ratio=0.0, quantizer=quantizer), model=copy.deepcopy(model)).model
        folder = work / f"ours-int4-b32-{quantizer}"
        path = write_decoder(candidate, folder, weights="int4", block_size=32, accuracy_level=4, max_context=context)
        add(f"ours int4 b32 {quantizer}", folder, path, time.perf_counter() - start)
        del candidate

    budgets = [float(b) for b in args.budgets.split(",")]
    latency_aware = [float(b) for b in filter(None, args.latency_aware.split(","))]
    for budget, rank, aware in [(b, 0, False) for b in budgets] + [(b, 0, True) for b in latency_aware] \
            + [(b, args.error_correction, False) for b in budgets if args.error_correction]:
        label = f"ours auto {budget:g} MB" + (f" +lqer{rank}" if rank else "") + (" latency-aware" if aware else "")
        start = time.perf_counter()
        try:
            plan = compress(prepared, replace(base, auto_formats=True, budget_mb=budget, error_correction=rank,
                                              tune_scales=args.tune_scales, latency_aware=aware),
                            model=copy.deepcopy(model))
        except BudgetError as exc:
            print(f"[{label}] infeasible: {exc}", file=sys.stderr)
            continue
        candidate, units = plan.model, plan.formats
        folder = work / (f"ours-auto-{budget:g}" + (f"-lqer{rank}" if rank else "") + ("-la" if aware else ""))
        path = write_decoder(candidate, folder, weights="int4", block_size=32, accuracy_level=4, max_context=context)
        counts: dict[str, int] = {}
        for unit in units:
            key = unit.format_name(unit.choice) + ("" if unit.methods[unit.choice] == "gptq" else " rtn") \
                + (f"+lqer{unit.correction(unit.choice)}" if unit.correction(unit.choice) else "") \
                + (" low-rank" if unit.rank(unit.choice) else "")
            counts[key] = counts.get(key, 0) + 1
        # build_s: this row's compression and writing, with any pricing of the menu it was the first to need
        add(label, folder, path, time.perf_counter() - start,
            {"budget_mb": budget, "formats": counts,
             "predicted_loss_increase": round(sum(u.loss[u.choice] for u in units), 5)})
        del candidate

    # decode: every graph in each round, in a fresh process, ratios paired per round against the first row
    speeds = {i: [] for i in range(len(rows))}
    for r in range(args.timing_rounds):
        print(f"timing round {r + 1}/{args.timing_rounds}", file=sys.stderr)
        for i, path in enumerate(graphs):
            figures = probe(path, prompt, args.new_tokens, args.threads)
            speeds[i].append(figures)
    for i, row in enumerate(rows):
        tps = [f["decode_tok_s"] for f in speeds[i]]
        row["decode_tok_s"] = round(statistics.median(tps), 2)
        row["decode_vs_first"] = round(statistics.median(
            [a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(speeds[i], speeds[0])]), 3)
        row["peak_rss_mb"] = round(statistics.median(f["peak_rss_mb"] for f in speeds[i]), 1)
    # decode again in one process: every graph loaded once, rounds interleaved, ratios paired per round
    timers = [step_timer(path.parent, args.threads) for path in graphs]
    steady = [[timer(prompt, args.new_tokens) for timer in timers] for _ in range(args.timing_rounds)]
    del timers
    for i, row in enumerate(rows):
        row["decode_vs_first_in_process"] = round(paired_ratio([r[i] for r in steady], [r[0] for r in steady]), 3)
    header = (f"SmolLM2-135M-Instruct, WikiText-2 test, {windows.shape[0]} windows of 512 tokens, ONNX Runtime CPU, "
              f"{args.threads} threads; decode: median of {args.timing_rounds} rounds, ratio paired per round "
              f"against `{rows[0]['row']}`, in fresh processes and in this one")
    lines = [header, "", "| row | weight MB | perplexity | decode tok/s | vs first | vs first, one process "
             "| peak RSS MB | formats |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        formats = ", ".join(f"{v} {k}" for k, v in row.get("formats", {}).items()) or "-"
        lines.append(f"| {row['row']} | {row['weight_mb']} | {row['perplexity']} | {row['decode_tok_s']} | "
                     f"{row['decode_vs_first']} | {row['decode_vs_first_in_process']} | {row['peak_rss_mb']} | "
                     f"{formats} |")
    table = "\n".join(lines)
    publish_results("frontier", {"rows": rows, "args": {k: str(v) for k, v in vars(args).items()},
                                 "pricing_s": [round(v, 1) for k, v in prepared.seconds.items()
                                               if k[0] == "price formats"]}, table)
    plot(rows, ROOT / "benchmarks" / "results" / "frontier.png")
    return 0


def write_with_onnxruntime_quantizer(model, folder: Path, algo: str, block_size: int, context: int) -> Path:
    """Our dense fused graph with every projection quantized by ONNX Runtime's MatMulNBitsQuantizer (`algo`:
    k_quant or hqq, 4 bits, `block_size`), as a user of ONNX Runtime's tools would; lm_head by our int4
    round-to-nearest at the same block (symmetric: the builder's default grid) and the tied embedding gathered
    from its blocks, as every int4 row here stores them, so that the rows differ in the projections' algorithm."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as ort_quantizer

    from exporter.compress.grid import QuantFormat
    from exporter.graph.matmul_nbits import quantize_matmuls
    from exporter.graph.writer import _save, _save_configs, _share_tied_embedding, build_decoder

    configs = {"k_quant": lambda: ort_quantizer.KQuantWeightOnlyQuantConfig(),
               "hqq": lambda: ort_quantizer.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)}
    if (folder / "model.onnx").is_file():
        return folder / "model.onnx"
    folder.mkdir(parents=True, exist_ok=True)
    proto = build_decoder(model, share_tied=False, max_context=context)
    head = [n.name for n in proto.graph.node if n.name.startswith("/lm_head/") and n.op_type == "MatMul"]
    with _quiet_logging():
        quantizer = ort_quantizer.MatMulNBitsQuantizer(proto, bits=4, block_size=block_size, is_symmetric=False,
                                                       accuracy_level=4, nodes_to_exclude=head,
                                                       algo_config=configs[algo]())
        quantizer.process()
    proto = quantizer.model.model
    quantize_matmuls(proto, QuantFormat(4, block_size, True), None, accuracy_level=4)  # lm_head
    _share_tied_embedding(proto)
    path = folder / "model.onnx"
    _save(proto, path)
    onnx.checker.check_model(str(path))
    _save_configs(model, folder)
    return path


@contextlib.contextmanager
def _quiet_logging():
    """ONNX Runtime's quantizer logs every tensor (INFO on its own logger, warnings on the root one)."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(figsize=(7, 4.5))
    kinds = (("builder", "s", lambda r: r.startswith("builder")),
             ("ONNX Runtime quantizer", "^", lambda r: r.startswith("onnxruntime quantizer")),
             ("ours int4", "o", lambda r: r.startswith("ours int4")),
             ("ours auto", "*", lambda r: r.startswith("ours auto") and "+lqer" not in r),
             ("ours auto + LQER", "P", lambda r: r.startswith("ours auto") and "+lqer" in r))
    for kind, marker, belongs in kinds:
        chosen = [r for r in rows if belongs(r["row"])]
        if chosen:
            axes.plot([r["weight_mb"] for r in chosen], [r["perplexity"] for r in chosen], marker, label=kind,
                      markersize=9)
    dense = [r for r in rows if r["row"].endswith("(dense)")]  # hundreds of MB: a line, not a point
    if dense:
        axes.axhline(dense[0]["perplexity"], linestyle=":", color="gray")
        axes.annotate("dense: " + ", ".join(f"{r['row'].split()[1]} {r['weight_mb']:.0f} MB {r['perplexity']:.2f}"
                                            for r in dense),
                      (0.01, dense[0]["perplexity"]), xycoords=("axes fraction", "data"), fontsize=7, color="gray",
                      va="bottom")
    values = [r["perplexity"] for r in rows]
    if values and max(values) > 3 * min(values):  # a broken low-budget point would flatten the rest
        axes.set_yscale("log")
    axes.set_xlabel("weight MB on disk")
    axes.set_ylabel("WikiText-2 perplexity (ONNX Runtime)")
    axes.set_title("SmolLM2-135M-Instruct: size vs quality")
    axes.grid(alpha=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    raise SystemExit(main())
