"""lm_head's price in `--weights auto` against the KL its grid alone causes, format by format.

    python benchmarks/head_price_probe.py [--windows 8]

SmolLM2-135M-Instruct (exporter.compress.format_allocation's statistics). For each menu option of the unit that
holds lm_head: the second-order estimate of lm_head's own loss increase against the measured mean KL(dense ||
lm_head on that grid) of the next-token distributions over the first calibration windows' tokens, every other
weight dense; and the estimate of the tied embedding's term (`format_allocation.embedding_loss`) against the KL of
the model whose input embedding alone gathers from that grid (lm_head dense). The whole model's ratio is about 0.8.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.compress.corrective import dense_teacher, kl_divergence  # noqa: E402
from exporter.compress.format_allocation import (  # noqa: E402
    MENU,
    embedding_loss,
    estimated_loss,
    format_units,
    option_grids,
)
from exporter.compress.importance import EMBEDDING  # noqa: E402
from exporter.compress.layerwise import head_inputs  # noqa: E402
from exporter.compress.quantize import module_name  # noqa: E402
from exporter.pipeline import ExportOptions, prepare  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8, help="calibration windows whose tokens measure the KL")
    args = parser.parse_args(argv)
    options = ExportOptions(device="host", calib=str(DATA / "valid.txt"), calib_samples=32, calib_seq_len=512, seed=0,
                            calib_chat=0.5, progress=False)
    prepared = prepare(options)
    model, ids = prepared.model, prepared.calibration()[0]
    head = model.get_output_embeddings()
    head_name = module_name(model, head)
    units = prepared.format_prices(format_units(model), options.fisher_samples, (), MENU)
    unit = next(u for u in units if head_name in u.members)
    statistics = prepared.pricing_statistics(options.fisher_samples)
    hidden = []
    head_inputs(model, ids[: args.windows], 4, lambda x: hidden.append(x.reshape(-1, head.in_features).float()))
    hidden = torch.cat(hidden)
    dense = head.weight.detach().float()

    def mean_kl(weight: torch.Tensor) -> float:
        total = 0.0
        with torch.no_grad():
            for chunk in hidden.split(512):
                p = torch.log_softmax(chunk @ dense.T, dim=-1)
                q = torch.log_softmax(chunk @ weight.T, dim=-1)
                total += float((p.exp() * (p - q)).sum())
        return total / hidden.shape[0]

    print(f"{hidden.shape[0]} tokens; lm_head unit {unit.name}: {len(unit.options)} options", flush=True)
    teacher = dense_teacher(model)
    embedded = copy.deepcopy(model)  # the input embedding on the grid, lm_head dense: the tied embedding's term
    embedded.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    embedded.lm_head.weight.data = dense.clone()
    embedding_module = embedded.get_input_embeddings()
    print("| option | MB | estimated (head) | measured KL (head) | ratio | estimated (embedding) | measured KL "
          "(embedding) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for option, (fmt, method) in enumerate(zip(unit.options, unit.methods)):
        grids = option_grids(statistics, unit, option)
        grid = grids[head_name]
        estimated = estimated_loss(head.weight, grid, statistics.grams[head_name], statistics.fisher[head_name],
                                   statistics.tokens)
        embedding = embedding_loss(head.weight, grid, statistics.embedding_row_weights, statistics.fisher[EMBEDDING])
        quantized = torch.from_numpy(grid.dequantize()).float()
        measured = mean_kl(quantized)
        embedding_module.weight.data = quantized
        with torch.no_grad():
            gathered = float(kl_divergence(embedded, teacher, ids[: args.windows]))
        print(f"| {fmt.name} {method} | {unit.bytes[option] / 1e6:.2f} | {estimated:.5f} | {measured:.5f} | "
              f"{estimated / measured:.2f} | {embedding:.5f} | {gathered:.5f} | {embedding / gathered:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
