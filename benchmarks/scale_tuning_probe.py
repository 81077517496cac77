"""Scale tuning (exporter.compress.scale_tuning) at one int4 format or an auto budget: perplexity before and after.

    python benchmarks/scale_tuning_probe.py [--format int4-b32 | --budget-mb 86.5] [--calib-chat 0.5]
        [--runs 20:1e-3:2,...] [--windows 16]

SmolLM2-135M-Instruct, every grid linear (decoder projections and lm_head) on one format by GPTQ (lm_head by
round to nearest, as `--weights int4` does) or on the formats `--weights auto` chooses at `--budget-mb`, then each
run (STEPS:LR:BATCH) tunes a copy's scales against the dense model on the calibration windows (32 x 512 tokens of
WikiText-2 valid, the --calib-chat share of them chat turns); perplexity in PyTorch (it holds exactly what the
graph packs) on the first WikiText-2 test windows.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.compress.corrective import dense_teacher  # noqa: E402
from exporter.compress.grid import QuantFormat  # noqa: E402
from exporter.compress.quantize import quantize_model  # noqa: E402
from exporter.compress.scale_tuning import tune_scales  # noqa: E402
from exporter.pipeline import ExportOptions, compress, prepare  # noqa: E402
from exporter.runtime.evaluate import perplexity, text_windows  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="int4-b32")
    parser.add_argument("--calib-chat", type=float, default=0.5)
    parser.add_argument("--budget-mb", type=float,
                        help="the formats `--weights auto` chooses at this budget instead of --format")
    parser.add_argument("--runs", default="20:1e-3:2", help="STEPS:LR:BATCH,...")
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args(argv)
    fmt = QuantFormat.parse(args.format)
    options = ExportOptions(device="host", calib=str(DATA / "valid.txt"), calib_samples=32, calib_seq_len=512, seed=0,
                            calib_chat=args.calib_chat, progress=False)
    prepared = prepare(options)
    model, ids = prepared.model, prepared.calibration()[0]
    windows = text_windows(prepared.tokenizer, DATA / "test.txt", 512, args.windows)
    print(f"dense: {perplexity(model, windows, progress=False):.3f}", flush=True)
    teacher = dense_teacher(model)
    if args.budget_mb:
        label = f"auto {args.budget_mb:g} MB"
        compress(prepared, replace(options, weights="int4", auto_formats=True, budget_mb=args.budget_mb))
    else:
        label = fmt.name
        quantize_model(model, lambda _name: fmt, ids, progress=False)
    print(f"{label} GPTQ: {perplexity(model, windows, progress=False):.3f}", flush=True)
    for run in args.runs.split(","):
        steps, lr, batch = run.split(":")
        tuned = copy.deepcopy(model)
        report = tune_scales(tuned, teacher, ids, int(steps), lr=float(lr), batch_size=int(batch), progress=False)
        print(f"{label} GPTQ + {steps} steps at {lr}, batch {batch}: "
              f"{perplexity(tuned, windows, progress=False):.3f} {report.to_dict()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
