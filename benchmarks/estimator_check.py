"""`--weights auto`'s loss estimate against measured loss: does it rank options as perplexity does?

    python benchmarks/estimator_check.py [--budget-mb 86.5] [--singles 24] [--configurations 78,82,...]
        [--random 4] [--windows 16] [--seed 0]

SmolLM2-135M-Instruct, calibrated as the CLI's `export --weights auto --calib wikitext-2/valid.txt` is (32 x 512
tokens, half of them chat turns, 8 Fisher sequences), its priced menu read from the statistics store where an
export or `allocate` kept it (else priced here and kept). Two samples, each scored against the dense model on
the first WikiText-2 test windows in PyTorch (which holds exactly what the graph packs):

- singles: one unit at one menu option, every other weight dense: the unit's estimated loss increase against
  the measured increase of the mean next-token NLL (seeded units and options);
- configurations: every unit at the knapsack's choice for each budget, plus seeded random choices: the summed
  estimate against the measured increase.

Prints Spearman's rank correlation of each sample (the target: >= 0.8) and the measured / estimated ratio.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.compress.allocate import multiple_choice_knapsack  # noqa: E402
from exporter.compress.format_allocation import (  # noqa: E402
    apply_choices,
    fixed_bytes,
    format_units,
    option_grids,
)
from exporter.device.cost_model import MB  # noqa: E402
from exporter.graph.writer import constant_bytes  # noqa: E402
from exporter.pipeline import FORMAT_BYTES_STEP, ExportOptions, prepare, runtime_menu  # noqa: E402
from exporter.runtime.evaluate import perplexity, text_windows  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def spearman(x, y) -> float:
    def ranks(values):
        values = np.asarray(values, dtype=float)
        order = values.argsort()
        r = np.empty(len(values))
        r[order] = np.arange(len(values))
        for value in np.unique(values):  # ties share their mean rank
            r[values == value] = r[values == value].mean()
        return r
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--singles", type=int, default=24)
    parser.add_argument("--configurations", default="78,82,86.5,93.5,100,105.5,120")
    parser.add_argument("--random", type=int, default=4)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    options = ExportOptions(device="host", calib=str(DATA / "valid.txt"), calib_chat=0.5, weights="int4",
                            auto_formats=True, progress=False)
    prepared = prepare(options)
    dense = prepared.model
    groups, menu = format_units(dense), runtime_menu(prepared.options)
    units = prepared.format_prices(groups, options.fisher_samples, (), menu)
    statistics = prepared.pricing_statistics(options.fisher_samples)
    windows = text_windows(prepared.tokenizer, DATA / "test.txt", 512, args.windows)
    base = math.log(perplexity(dense, windows, progress=False))
    print(f"dense: perplexity {math.exp(base):.3f} on {args.windows} windows; {len(units)} units", flush=True)
    grids: dict[tuple[int, int], dict] = {}

    def measured(choices: dict[int, int]) -> float:
        """NLL increase with unit i at option choices[i], every other weight dense."""
        model = copy.deepcopy(dense)
        chosen = []
        for index, option in choices.items():
            unit = copy.copy(units[index])
            unit.grids = list(unit.grids)
            if unit.grids[option] is None:
                unit.grids[option] = grids.setdefault((index, option), option_grids(statistics, unit, option))
            unit.choice = option
            chosen.append(unit)
        apply_choices(model, chosen)
        return math.log(perplexity(model, windows, progress=False)) - base

    rng = random.Random(args.seed)
    singles = []
    for index in rng.sample(range(len(units)), min(args.singles, len(units))):
        option = rng.randrange(len(units[index].options))
        estimate, delta = units[index].loss[option], measured({index: option})
        singles.append((estimate, delta))
        print(f"single {units[index].name} {units[index].options[option].name}: estimated {estimate:.2e}, "
              f"measured {delta:.2e}", flush=True)

    fixed = fixed_bytes(dense, options.block_size) + constant_bytes(dense, prepared.options.activations,
                                                                  prepared.profile.budget.max_context)
    configurations = []
    plans = [(f"knapsack {mb} MB", multiple_choice_knapsack([u.bytes for u in units], [u.loss for u in units],
                                                            int(float(mb) * MB) - fixed,
                                                            granularity=FORMAT_BYTES_STEP))
             for mb in args.configurations.split(",")]
    plans += [(f"random {k}", [rng.randrange(len(u.options)) for u in units]) for k in range(args.random)]
    for label, choice in plans:
        estimate = sum(u.loss[c] for u, c in zip(units, choice))
        size = (fixed + sum(u.bytes[c] for u, c in zip(units, choice))) / MB
        delta = measured(dict(enumerate(choice)))
        configurations.append((estimate, delta))
        print(f"{label}: {size:.1f} MB, estimated {estimate:.4f}, measured {delta:.4f} "
              f"(perplexity {math.exp(base + delta):.3f})", flush=True)

    for name, sample in (("singles", singles), ("configurations", configurations)):
        if not sample:  # --singles 0 or --random 0 with no budgets
            continue
        estimate, delta = zip(*sample)
        ratio = np.median(np.asarray(delta) / np.maximum(np.asarray(estimate), 1e-30))
        print(f"{name}: Spearman {spearman(estimate, delta):.3f} over {len(sample)}; "
              f"median measured / estimated {ratio:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
