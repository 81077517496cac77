"""A whitened low-rank correction of lm_head's quantization error, at equal bytes: is it worth building?

    python benchmarks/head_correction_probe.py [--budget-mb 86.5] [--ranks 16,32,64] [--windows 16]

SmolLM2-135M-Instruct on the formats `--weights auto` chooses (GPTQ, the stored prices), then lm_head's error
E = W - Q corrected by L R, the whitened SVD of E under lm_head's input Gram (LQER, as
exporter.compress.error_correction does for the projections), R on int4-b32-asym and L on int8-b16 (the branch's
bytes); the tied embedding keeps gathering Q. Each rank's row is compared with the knapsack given those bytes
instead (no correction, `--budget-mb` plus the branch's MB). Perplexity in PyTorch on the first WikiText-2 test
windows.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.compress.error_correction import CORRECTION_FORMAT, group_correction, whitened_error  # noqa: E402
from exporter.compress.grid import QuantFormat  # noqa: E402
from exporter.compress.quantize import grid_of, head_gram  # noqa: E402
from exporter.pipeline import ExportOptions, compress, prepare  # noqa: E402
from exporter.runtime.evaluate import perplexity, text_windows  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
DOWN_FORMAT = QuantFormat.parse("int4-b32-asym")
MB = 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-mb", type=float, default=86.5)
    parser.add_argument("--ranks", default="16,32,64")
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args(argv)
    options = ExportOptions(device="host", calib=str(DATA / "valid.txt"), calib_samples=32, calib_seq_len=512, seed=0,
                            calib_chat=0.5, progress=False)
    prepared = prepare(options)
    dense, ids = prepared.model, prepared.calibration()[0]
    windows = text_windows(prepared.tokenizer, DATA / "test.txt", 512, args.windows)
    print(f"dense: {perplexity(dense, windows, progress=False):.3f}", flush=True)
    dense_head = dense.get_output_embeddings().weight.detach().clone()
    shape = tuple(dense_head.shape)

    def quantized(budget: float):
        model = copy.deepcopy(dense)
        compress(prepared, replace(options, weights="int4", auto_formats=True, budget_mb=budget), model=model)
        head = model.get_output_embeddings()
        return model, grid_of(head).fmt.name

    for rank in [0] + [int(r) for r in args.ranks.split(",")]:
        extra = 0.0 if rank == 0 else (DOWN_FORMAT.matrix_bytes(rank, shape[1])
                                       + CORRECTION_FORMAT.matrix_bytes(shape[0], rank)) / MB
        base, head_format = quantized(args.budget_mb)
        if rank == 0:
            print(f"knapsack {args.budget_mb:g} MB (lm_head {head_format}): "
                  f"{perplexity(base, windows, progress=False):.3f}", flush=True)
            continue
        head = base.get_output_embeddings()
        q = head.weight.detach().clone()
        gram = head_gram(base, ids)
        down, ups = group_correction({"head": (dense_head - q).float()}, {"head": gram}, rank, DOWN_FORMAT)
        corrected = q + torch.from_numpy(ups["head"].dequantize()) @ torch.from_numpy(down.dequantize())
        before, after = (whitened_error(dense_head, w, gram) for w in (q, corrected))
        head.weight = nn.Parameter(corrected, requires_grad=False)  # untied: the embedding keeps gathering Q
        ppl = perplexity(base, windows, progress=False)
        del base
        larger, larger_format = quantized(args.budget_mb + extra)
        print(f"knapsack {args.budget_mb:g} MB + lm_head correction rank {rank} ({extra:.2f} MB, whitened error "
              f"kept {after / before:.3f}): {ppl:.3f}; knapsack {args.budget_mb + extra:.2f} MB instead "
              f"(lm_head {larger_format}): {perplexity(larger, windows, progress=False):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
