"""Whitened correction of the quantization error (LQER/QERA) against plain GPTQ grids, one run.

    python benchmarks/error_correction.py [--rows b64,b64+16,b64+32,b32,b32+16] [--windows 64]

One prepared model and calibration (exporter.pipeline.prepare: WikiText-2 valid, 32 x 512); per row a copy
whose decoder projections go on GPTQ grids of the row's block size (int4, symmetric) with a whitened
correction of the row's rank per input group (exporter.compress.error_correction: R in the group's fused
first stage, L at int8), lm_head at int4 RTN as every export; written by the export's writer, scored through
ONNX Runtime on the same WikiText-2 test windows, decode timed in a fresh process per graph, paired per round
against the first row. Writes results/error-correction-*.json/.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_io import publish_results  # noqa: E402
from run import onnx_mb, probe  # noqa: E402

from exporter.compress.error_correction import quantize_with_correction  # noqa: E402
from exporter.compress.grid import QuantFormat  # noqa: E402
from exporter.compress.quantize import quantize_model  # noqa: E402
from exporter.graph.writer import write_decoder  # noqa: E402
from exporter.pipeline import ExportOptions, prepare  # noqa: E402
from exporter.runtime.evaluate import ort_perplexity, text_windows  # noqa: E402
from exporter.runtime.generation import OrtDecoder  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
UP = QuantFormat(8, 16, True)  # L: K is the rank (16 or 32), int8 in blocks of 16


def parse_row(text: str) -> tuple[int, int, str]:
    """'b64' -> (block 64, rank 0, ''); 'b64+16' -> (64, 16, ''): LQER; 'b64+16f': output channels weighted by
    their Fisher; 'b64+16calr': the same branch then trained by CALR (block-wise least squares on the functional
    residual against the dense model, end-to-end KL), with the base on its grid, then put back on grids."""
    match = re.fullmatch(r"b(\d+)(?:\+(\d+)(f|calr)?)?", text)
    if not match:
        raise SystemExit(f"bad row {text!r}: expected bBLOCK, bBLOCK+RANK, bBLOCK+RANKf or bBLOCK+RANKcalr")
    return int(match[1]), int(match[2] or 0), match[3] or ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="b64,b64+16,b64+32,b32,b32+16")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--fisher-samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--keep", type=Path)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]

    base = ExportOptions(device="host", calib=str(DATA / "wikitext-2" / "valid.txt"), calib_samples=args.calib_samples,
                         calib_seq_len=512, fisher_samples=args.fisher_samples, seed=0, weights="int4",
                         progress=False)
    prepared = prepare(base)
    model, tokenizer = prepared.model, prepared.tokenizer
    ids, _ = prepared.calibration()
    windows = text_windows(tokenizer, DATA / "wikitext-2" / "test.txt", 512, args.windows)
    prompt = windows[-1, : args.prompt_tokens].tolist()
    work = args.keep or Path(tempfile.mkdtemp(prefix="exporter-lqer-"))
    rows, graphs = [], []
    for name in names:
        block, rank, variant = parse_row(name)
        fmt = QuantFormat(4, block, True)
        start = time.perf_counter()
        candidate = copy.deepcopy(model)
        report = quantize_with_correction(candidate, ids, lambda _n: fmt, lambda _n: rank, UP,
                                          fisher_samples=args.fisher_samples, progress=False,
                                          fisher_channels=variant == "f")
        if variant == "calr":
            train_calr(candidate, model, ids, fmt, args.fisher_samples)
        quantize_model(candidate, lambda _n: fmt, progress=False)  # lm_head (RTN) and anything left float
        folder = work / name
        path = write_decoder(candidate, folder, weights="int4", block_size=block, accuracy_level=4)
        build_s = time.perf_counter() - start
        ppl = ort_perplexity(OrtDecoder(path, threads=args.threads), windows, progress=False)
        ratios = [r["error_after"] / r["error_before"] for r in report.values()]
        rows.append({"row": name, "block": block, "rank": rank,
                     "weight_mb": round(onnx_mb(folder), 2), "perplexity": round(ppl, 3), "build_s": round(build_s, 1),
                     "output_error_kept": round(statistics.mean(ratios), 4) if ratios else None})
        graphs.append(path)
        print(json.dumps(rows[-1]), file=sys.stderr)
        del candidate

    speeds = {i: [] for i in range(len(rows))}
    for r in range(args.timing_rounds):
        print(f"timing round {r + 1}/{args.timing_rounds}", file=sys.stderr)
        for i, path in enumerate(graphs):
            speeds[i].append(probe(path, prompt, args.new_tokens, args.threads))
    for i, row in enumerate(rows):
        row["decode_tok_s"] = round(statistics.median(f["decode_tok_s"] for f in speeds[i]), 2)
        row["decode_vs_first"] = round(statistics.median(
            a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(speeds[i], speeds[0])), 3)
    header = (f"SmolLM2-135M-Instruct, WikiText-2 test, {windows.shape[0]} windows of 512 tokens, ONNX Runtime CPU, "
              f"{args.threads} threads; int4 GPTQ grids (symmetric) + whitened error correction of rank k per input "
              f"group (R at the group's grid, L int8 b16); decode: median of {args.timing_rounds} rounds, paired "
              f"against `{rows[0]['row']}`")
    lines = [header, "", "| row | block | k | weight MB | perplexity | output error kept | decode tok/s | vs first |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['row']} | {row['block']} | {row['rank']} | {row['weight_mb']} | "
                     f"{row['perplexity']} | {row['output_error_kept'] or '-'} | {row['decode_tok_s']} | "
                     f"{row['decode_vs_first']} |")
    publish_results("error-correction", {"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}},
                    "\n".join(lines))
    return 0


def train_calr(candidate, teacher, ids, fmt: QuantFormat, fisher_samples: int) -> None:
    """CALR's training of every branch (exporter.compress.corrective, defaults) against the dense `teacher`,
    the grids' bases frozen; then the branches back on grids (R at `fmt`, L at CORRECTION_FORMAT, GPTQ)."""
    from exporter.compress.corrective import train_correctives
    from exporter.compress.error_correction import CORRECTION_FORMAT
    from exporter.compress.lowrank import CorrectedLinear
    from exporter.compress.quantize import GRID_ATTRIBUTE
    from exporter.settings import CorrectiveOptions

    branches = [m for m in candidate.modules() if isinstance(m, CorrectedLinear)]
    train_correctives(candidate, teacher, ids, CorrectiveOptions(rank=branches[0].corrective_rank), progress=False)
    for m in branches:
        for linear in (m.corrective_down, m.corrective_up):
            if hasattr(linear, GRID_ATTRIBUTE):
                delattr(linear, GRID_ATTRIBUTE)
    quantize_model(candidate, lambda n: CORRECTION_FORMAT if n.endswith("corrective_up") else fmt, ids,
                   fisher_samples=fisher_samples, progress=False)


if __name__ == "__main__":
    raise SystemExit(main())
