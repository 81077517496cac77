"""The tied embedding's term of `--weights auto`'s lm_head price: which Fisher makes it the KL it estimates.

    python benchmarks/embedding_price_probe.py [--windows 4]

SmolLM2-135M-Instruct. For lm_head grids of the menu, the KL(dense || the model whose input embedding alone gathers
from the grid) over the first calibration windows, against three second-order estimates of it on those same
windows' tokens: the priced one (`format_allocation.embedding_loss`: a per-channel Fisher from the Fisher sequences
times each token's position-weighted share of the calibration), the same with the per-channel Fisher and the shares
of the measured windows alone, and per token: 1/2 sum_p sum_i g_pi^2 e_(x_p)i^2 / N, g the gradient at the
embedding's output at position p of the next-token NLL of the true tokens (empirical Fisher) or of tokens drawn from
the model (the Fisher whose quadratic form the KL is, to second order).
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
from exporter.compress.format_allocation import _error, _grids, embedding_loss, pricing_statistics  # noqa: E402
from exporter.compress.grid import QuantFormat  # noqa: E402
from exporter.compress.importance import EMBEDDING  # noqa: E402
from exporter.pipeline import ExportOptions, prepare  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
OPTIONS = ("int4-b32-asym gptq", "int4-b32-asym rtn", "int4-b64 gptq", "int4-b64-asym gptq", "int4-b128-asym gptq",
           "int4-b16-asym gptq", "int8-b32 gptq")


def token_fishers(model, ids: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(empirical, sampled) per-token Fisher of the embedding's output, vocabulary x width, summed over `ids`."""
    embedding = model.get_input_embeddings()
    shape = (embedding.num_embeddings, embedding.embedding_dim)
    empirical, sampled = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    for row in ids:
        x = embedding(row[None]).detach().requires_grad_(True)
        logp = torch.log_softmax(model(inputs_embeds=x, use_cache=False).logits.float()[0, :-1], dim=-1)
        drawn = torch.multinomial(logp.detach().exp(), 1, generator=generator)[:, 0]
        for labels, fisher, keep in ((row[1:], empirical, True), (drawn, sampled, False)):
            nll = -logp.gather(-1, labels[:, None]).sum()
            (grad,) = torch.autograd.grad(nll, x, retain_graph=keep)
            fisher.index_add_(0, row, grad[0].double() ** 2)
    return empirical, sampled


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=4, help="calibration windows whose tokens measure the KL")
    args = parser.parse_args(argv)
    options = ExportOptions(device="host", calib=str(DATA / "valid.txt"), calib_samples=32, calib_seq_len=512, seed=0,
                            calib_chat=0.5, progress=False)
    prepared = prepare(options)
    model, ids = prepared.model, prepared.calibration()[0]
    measured_ids = ids[: args.windows]
    statistics = pricing_statistics(model, ids, ids[: options.fisher_samples], progress=False)
    head, name = statistics.linears[statistics.head_name], statistics.head_name
    # the priced form on the measured windows alone: their per-channel Fisher and their tokens' shares
    local = pricing_statistics(model, measured_ids, measured_ids, progress=False)
    for p in model.parameters():
        p.requires_grad_(False)
    empirical, sampled = token_fishers(model, measured_ids)
    tokens = measured_ids.numel()
    teacher = dense_teacher(model)
    embedded = copy.deepcopy(model)  # the input embedding on the grid, lm_head dense
    embedded.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    embedded.lm_head.weight.data = head.weight.detach().float().clone()
    gather = embedded.get_input_embeddings()
    print(f"{tokens} tokens in {args.windows} windows, {int((empirical.sum(1) > 0).sum())} distinct")
    print("| option | measured KL | priced | ratio | priced, measured windows | ratio | per token, empirical "
          "Fisher | ratio | per token, sampled Fisher | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for option in OPTIONS:
        fmt_name, method = option.split()
        grid = _grids(statistics, [name], QuantFormat.parse(fmt_name), method)[name]
        gather.weight.data = torch.from_numpy(grid.dequantize()).float()
        with torch.no_grad():
            measured = float(kl_divergence(embedded, teacher, measured_ids))
        squared = _error(head.weight, grid) ** 2
        priced = embedding_loss(head.weight, grid, statistics.embedding_row_weights, statistics.fisher[EMBEDDING])
        windowed = embedding_loss(head.weight, grid, local.embedding_row_weights, local.fisher[EMBEDDING])
        per_token = [0.5 * float((fisher * squared).sum()) / tokens for fisher in (empirical, sampled)]
        cells = [f"{value:.5f} | {value / measured:.2f}" for value in (priced, windowed, *per_token)]
        print(f"| {option} | {measured:.5f} | {' | '.join(cells)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
