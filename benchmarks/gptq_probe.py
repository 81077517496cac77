"""Why GPTQ's Grams weight positions: RTN vs GPTQ on plain Grams vs GPTQ on position-weighted Grams.

    python benchmarks/gptq_probe.py [--windows 16] [--calib-samples 32]

SmolLM2-135M-Instruct, every decoder projection at int4 block 32 (symmetric, no clipping), lm_head kept
fp32 so that only the projections differ; perplexity in PyTorch (it holds exactly the weights the graph
packs) on the first WikiText-2 test windows. Also prints the output-gradient energy per position of a few
projections (exporter.compress.importance.output_sensitivity), the figures behind docs/quantization.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_io import publish_results  # noqa: E402

from exporter.compress.gptq import gptq  # noqa: E402
from exporter.compress.grams import iter_layer_grams  # noqa: E402
from exporter.compress.grid import QuantFormat, round_to_nearest  # noqa: E402
from exporter.compress.importance import output_sensitivity, position_weights  # noqa: E402
from exporter.compress.quantize import grid_linears, set_grid  # noqa: E402
from exporter.pipeline import ExportOptions, prepare  # noqa: E402
from exporter.runtime.evaluate import perplexity, text_windows  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SHOWN = ("model.layers.3.self_attn.k_proj", "model.layers.3.self_attn.v_proj", "model.layers.3.mlp.down_proj",
         "model.layers.20.self_attn.v_proj")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--fisher-samples", type=int, default=8)
    args = parser.parse_args(argv)
    prepared = prepare(ExportOptions(device="host", calib=str(DATA / "wikitext-2" / "valid.txt"),
                                     calib_samples=args.calib_samples, calib_seq_len=512, seed=0))
    model, tokenizer = prepared.model, prepared.tokenizer
    windows = text_windows(tokenizer, DATA / "wikitext-2" / "test.txt", 512, args.windows)
    ids, _ = prepared.calibration()
    names = [n for n in grid_linears(model) if n != "lm_head"]
    sensitivity = output_sensitivity(model, ids[: args.fisher_samples], names)
    profile = {n: {"position 0": round(float(sensitivity[n].positions[0]), 1),
                   "positions 1-9": round(float(sensitivity[n].positions[1:10].mean()), 2),
                   "median": round(float(sensitivity[n].positions.median()), 3)} for n in SHOWN}
    grams = {"plain": {}, "position-weighted": {}}
    for kind, weights in (("plain", None), ("position-weighted", position_weights(sensitivity))):
        for _i, _layer, layer_grams in iter_layer_grams(model, ids, position_weights=weights):
            grams[kind].update(layer_grams)
    fmt = QuantFormat(4, 32, True)
    rows = [{"row": "dense", "perplexity": round(perplexity(model, windows), 3)}]
    for label, method, kind in (("RTN", "rtn", None), ("GPTQ, plain Grams", "gptq", "plain"),
                                ("GPTQ, position-weighted Grams", "gptq", "position-weighted")):
        candidate = copy.deepcopy(model)
        linears = grid_linears(candidate)
        for name in names:
            weight = linears[name].weight
            grid = (gptq(weight, grams[kind][name], fmt) if method == "gptq"
                    else round_to_nearest(weight.detach().numpy(), fmt))
            set_grid(linears[name], grid)
        rows.append({"row": label, "perplexity": round(perplexity(candidate, windows), 3)})
        print(rows[-1], file=sys.stderr)
        del candidate
    lines = [f"SmolLM2-135M-Instruct, projections int4 block 32 symmetric, lm_head fp32, {args.windows} WikiText-2 "
             f"test windows (PyTorch)", "", "| row | perplexity |", "|---|---|"]
    lines += [f"| {r['row']} | {r['perplexity']} |" for r in rows]
    lines += ["", "output-gradient energy per position (mean 1):", ""]
    lines += [f"- {n}: {p}" for n, p in profile.items()]
    publish_results("gptq-probe", {"rows": rows, "positions": profile, "args": vars(args)}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
