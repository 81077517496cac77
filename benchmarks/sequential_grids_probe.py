"""The `--weights auto` grids priced on the dense model's Grams against the same choices refitted in sequence on
the quantized model's own inputs (exporter.compress.sequential_grids): hidden-state error and perplexity.

    python benchmarks/sequential_grids_probe.py --budget-mb 86.5 --runs weighted:0.01,plain:0.01,gram-only:0.01

Each run MODE:DAMPING refits a dense copy: `weighted`, the asymmetric target with each linear's position weights;
`plain`, without them; `gram-only`, GPTQ on the quantized model's own (weighted) Grams against W itself (the
symmetric target). DAMPING: the ridge, a fraction of the Gram's mean diagonal. SmolLM2-135M-Instruct, the CLI's
calibration (32 x 512 tokens of WikiText-2 valid, half chat turns); perplexity in PyTorch on the first WikiText-2
test windows; hidden-state error (relative, every third layer and the last) on the first 8 calibration windows.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.compress import sequential_grids  # noqa: E402
from exporter.compress.corrective import dense_teacher  # noqa: E402
from exporter.compress.format_allocation import apply_choices, option_grids  # noqa: E402
from exporter.compress.importance import position_weights  # noqa: E402
from exporter.pipeline import ExportOptions, compress, prepare  # noqa: E402
from exporter.runtime.evaluate import perplexity, text_windows  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-mb", type=float, default=86.5)
    parser.add_argument("--runs", default="weighted:0.01")
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args(argv)
    options = ExportOptions(device="host", calib=str(DATA / "valid.txt"), calib_samples=32, calib_seq_len=512, seed=0,
                            calib_chat=0.5, progress=False)
    prepared = prepare(options)
    model, ids = prepared.model, prepared.calibration()[0]
    windows = text_windows(prepared.tokenizer, DATA / "test.txt", 512, args.windows)
    print(f"dense: {perplexity(model, windows, progress=False):.3f}", flush=True)
    teacher = dense_teacher(model)

    def hidden_error(m) -> list[float]:
        with torch.no_grad():
            want = teacher(ids[:8], output_hidden_states=True).hidden_states[1:]
            got = m(ids[:8], output_hidden_states=True).hidden_states[1:]
        errors = [round(float((g - w).norm() / w.norm()), 4) for g, w in zip(got, want)]
        return errors[::3] + errors[-1:]

    priced = copy.deepcopy(teacher)
    plan = compress(prepared, replace(options, weights="int4", auto_formats=True, budget_mb=args.budget_mb),
                    model=priced)
    print(f"auto {args.budget_mb:g} MB, priced grids: {perplexity(priced, windows, progress=False):.3f}, hidden error "
          f"{hidden_error(priced)}", flush=True)
    sensitivity = prepared._sensitivities[options.fisher_samples]
    refit = sequential_grids.refit_weights
    for run in args.runs.split(","):
        mode, damping = run.split(":")
        sequential_grids.DAMPING = float(damping)
        sequential_grids.refit_weights = (lambda names, xs, _xt, weights, pw: refit(names, xs, xs, weights, pw)) \
            if mode == "gram-only" else refit
        student = copy.deepcopy(teacher)
        units = [replace(u, grids=list(u.grids)) for u in plan.formats]
        sequential_grids.refit_sequentially(student, teacher, units, ids,
                                            {} if mode == "plain" else position_weights(sensitivity),
                                            {n: s.channels for n, s in sensitivity.items()}, ids.numel(),
                                            option_grids, apply_choices, progress=False)
        print(f"{mode} {damping}: {perplexity(student, windows, progress=False):.3f}, hidden error "
              f"{hidden_error(student)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
