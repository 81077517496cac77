"""CALR at equal parameters, quickly: FLRC ranks with and without corrective branches on SmolLM2.

    python benchmarks/calr_probe.py --ratio 0.4 --corrective-rank 0     # FLRC alone
    python benchmarks/calr_probe.py --ratio 0.4 --corrective-rank 16    # FLRC + CALR, same parameters

The export's own steps (exporter.pipeline.prepare and compress without training: calibration on WikiText-2
valid, 32 x 512, whitened decompositions, Fisher importance, ranks and branches at equal parameters), then
the corrective training stages this probe varies. For the full table with ONNX export and speed, use
`benchmarks/run.py --rows calr`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.compress.corrective import (  # noqa: E402
    CorrectiveOptions,
    CorrectiveReport,
    train_blockwise,
    train_end_to_end,
)
from exporter.compress.factorize import corrective_ranks, count_params, effective_ranks, parameter_summary  # noqa: E402
from exporter.device.profiles import load_profile  # noqa: E402
from exporter.pipeline import ExportOptions, compress, prepare  # noqa: E402
from exporter.runtime.evaluate import perplexity, text_windows  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--corrective-rank", type=int, default=16, help="0: no branches (FLRC alone)")
    parser.add_argument("--epochs", type=int, default=0, help="block-wise gradient epochs after the fit")
    parser.add_argument("--kl-steps", type=int, default=0)
    parser.add_argument("--kl-lr", type=float, default=CorrectiveOptions.kl_lr)
    parser.add_argument("--tune-factors", action="store_true", help="also train the SVD factors in the KL stage")
    parser.add_argument("--factor-lr-scale", type=float, default=CorrectiveOptions.factor_lr_scale)
    parser.add_argument("--windows", type=int, default=16, help="WikiText-2 test windows of 512 tokens")
    parser.add_argument("--rank-multiple", type=int, default=16)
    parser.add_argument("--allocation", choices=["fisher", "uniform"], default="fisher")
    parser.add_argument("--skip-blockwise", action="store_true", help="end-to-end KL only")
    parser.add_argument("--blockwise-cache", type=Path, default=None,
                        help="reuse (or save) the model state after the block-wise stage, to compare KL settings")
    args = parser.parse_args()
    options = None if args.corrective_rank == 0 else CorrectiveOptions(
        rank=args.corrective_rank, epochs=args.epochs, kl_steps=args.kl_steps, kl_lr=args.kl_lr,
        tune_factors=args.tune_factors, factor_lr_scale=args.factor_lr_scale)
    host = load_profile("host")
    host = replace(host, runtime=replace(host.runtime, rank_multiple=args.rank_multiple))
    export = ExportOptions(device="host", calib=str(DATA / "wikitext-2" / "valid.txt"), calib_samples=32,
                           calib_seq_len=512, seed=0, weights="fp32", ratio=args.ratio, allocation=args.allocation,
                           correctives=options)
    prepared = prepare(export, profile=host)
    teacher, tokenizer = prepared.model, prepared.tokenizer
    total = count_params(teacher)
    plan = compress(prepared, model=copy.deepcopy(teacher), train=False)  # ranks and untrained branches
    model, projections, ids = plan.model, plan.projections, prepared.calibration()[0]
    seconds = 0.0
    if options:
        start = time.perf_counter()
        if args.skip_blockwise:
            report = CorrectiveReport()
        elif args.blockwise_cache and args.blockwise_cache.is_file():
            model.load_state_dict(torch.load(args.blockwise_cache))
            report = CorrectiveReport()
        else:
            report = train_blockwise(model, teacher, ids, options)
            if args.blockwise_cache:
                torch.save(model.state_dict(), args.blockwise_cache)
        report = train_end_to_end(model, teacher, ids, options, report=report)
        seconds = time.perf_counter() - start
    summary = parameter_summary(projections, effective_ranks(model, projections), total,
                                corrective_ranks(model, projections))
    windows = text_windows(tokenizer, DATA / "wikitext-2" / "test.txt", 512, args.windows)
    result = {"ratio": args.ratio, "allocation": args.allocation, "corrective_rank": args.corrective_rank, "epochs": args.epochs,
              "kl_steps": args.kl_steps, "skip_blockwise": args.skip_blockwise, "kl_lr": args.kl_lr, "tune_factors": args.tune_factors,
              "factor_lr_scale": args.factor_lr_scale, "windows": int(windows.shape[0]),
              "projection_fraction_removed": summary["projection_fraction_removed"],
              "fit_s": round(seconds, 1), "perplexity": perplexity(model, torch.as_tensor(windows))}
    if options:
        result.update(blocks_reset=report.blocks_reset, kl_before=report.kl_before, kl_after=report.kl_after)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
