"""CALR at equal parameters, quickly: FLRC ranks with and without corrective branches on SmolLM2.

    python benchmarks/calr_probe.py --ratio 0.4 --corrective-rank 0     # FLRC alone
    python benchmarks/calr_probe.py --ratio 0.4 --corrective-rank 16    # FLRC + CALR, same parameters

Calibration (WikiText-2 valid, 32 x 512), decompositions and Fisher importance are computed once and
cached in --cache, so each variant costs only its branch fitting and the perplexity windows. For the
full table with ONNX export and speed, use `benchmarks/run.py --rows calr`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.compress.corrective import (  # noqa: E402
    CorrectiveOptions,
    CorrectiveReport,
    attach_correctives,
    dense_teacher,
    train_blockwise,
    train_end_to_end,
)
from exporter.compress.factorize import (  # noqa: E402
    apply_ranks,
    corrective_ranks,
    count_params,
    decoder_projections,
    decompose_model,
    effective_ranks,
    parameter_summary,
)
from exporter.compress.importance import component_fisher  # noqa: E402
from exporter.pipeline import choose_ranks  # noqa: E402
from exporter.runtime.evaluate import perplexity, text_windows  # noqa: E402
from exporter.source.calibration import calibration_ids  # noqa: E402
from exporter.source.model import load_model, resolve_model  # noqa: E402

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
    parser.add_argument("--cache", type=Path, default=Path("/tmp/exporter-calr-probe.pt"))
    parser.add_argument("--allocation", choices=["fisher", "uniform"], default="fisher")
    parser.add_argument("--skip-blockwise", action="store_true", help="end-to-end KL only")
    parser.add_argument("--blockwise-cache", type=Path, default=None,
                        help="reuse (or save) the model state after the block-wise stage, to compare KL settings")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(resolve_model(None))
    if args.cache.is_file():
        prep = torch.load(args.cache, weights_only=False)
    else:
        ids, _ = calibration_ids(model, tokenizer, str(DATA / "wikitext-2" / "valid.txt"), 32, 512, seed=0)
        decompositions = decompose_model(model, "whitened", ids, full_rank=True)
        prep = {"ids": ids, "dec": decompositions, "imp": component_fisher(model, decompositions, ids[:8])}
        torch.save(prep, args.cache)
    projections = decoder_projections(model)
    budget = round((1 - args.ratio) * sum(p.params for p in projections))
    options = None if args.corrective_rank == 0 else CorrectiveOptions(
        rank=args.corrective_rank, epochs=args.epochs, kl_steps=args.kl_steps, kl_lr=args.kl_lr,
        tune_factors=args.tune_factors, factor_lr_scale=args.factor_lr_scale)
    # The export's choice (no fallback multiple: a --rank-multiple that does not fit is an error here).
    ranks, branches, _, _ = choose_ranks(projections, args.allocation, prep["imp"], budget, options,
                                         args.rank_multiple)
    total = count_params(model)
    teacher = dense_teacher(model) if options else None
    apply_ranks(model, prep["dec"], ranks)
    seconds = 0.0
    if options:
        applied = effective_ranks(model, projections)
        attach_correctives(model, prep["dec"], {n: r for n, r in branches.items() if applied[n] is not None})
        start = time.perf_counter()
        if args.skip_blockwise:
            report = CorrectiveReport()
        elif args.blockwise_cache and args.blockwise_cache.is_file():
            model.load_state_dict(torch.load(args.blockwise_cache))
            report = CorrectiveReport()
        else:
            report = train_blockwise(model, teacher, prep["ids"], options)
            if args.blockwise_cache:
                torch.save(model.state_dict(), args.blockwise_cache)
        report = train_end_to_end(model, teacher, prep["ids"], options, report=report)
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
