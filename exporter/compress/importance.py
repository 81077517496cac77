"""Fisher importance of every singular component of every projection (FLRC).

Each factorized projection y = U (g * (V x)) gets a gate g (all ones). The empirical Fisher
F_k = sum over calibration sequences of (dL/dg_k)^2 prices component k: by a second-order Taylor
expansion with the Fisher as the Hessian, dropping it (g_k: 1 -> 0) raises the LM loss by about
F_k / 2. One backward pass per sequence prices all components of all projections at once, which
is what makes FLRC's search cheap compared with truncating projections one at a time.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from torch import nn

from exporter.compress import compute, distributed
from exporter.compress.factorize import install_unit
from exporter.compress.layerwise import backward_layerwise
from exporter.compress.lowrank import Decomposition
from exporter.source.model import decoder_layers, layers_prefix


def _by_layer(model, names) -> dict[int, list[str]]:
    """{decoder layer index: the qualified names under it}; names outside the layers left out."""
    prefix = layers_prefix(model) + "."
    found: dict[int, list[str]] = {}
    for name in names:
        if name.startswith(prefix):
            found.setdefault(int(name[len(prefix):].split(".")[0]), []).append(name)
    return found


def component_fisher(model, decompositions: dict[str, Decomposition], input_ids: torch.Tensor,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """{unit name: F_k for each component k, in the decomposition's order} (float64). Computed on the compute
    device one layer at a time (exporter.compress.layerwise): each layer is copied with its units at full rank,
    gated, for its backward."""
    from tqdm.auto import tqdm

    device = compute.current()
    prefix = layers_prefix(model)
    units = _by_layer(model, decompositions)
    gates: dict[str, nn.Parameter] = {}
    fisher: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(decoder_layers(model)), desc="Fisher importance", unit="layer", disable=not progress)

    @contextmanager
    def gated(index, layer):
        own = f"{prefix}.{index}."
        factored = copy.deepcopy(layer)
        gates.clear()
        for name in units.get(index, []):
            decomposition = decompositions[name]
            modules = install_unit(factored, name[len(own):], decomposition.linear(decomposition.max_rank))
            # A joint unit's projections share its components: one gate scales component k in all of them.
            gate = gates[name] = nn.Parameter(torch.ones(modules[0].rank, device=device))
            fisher.setdefault(name, torch.zeros(gate.numel(), dtype=torch.float64, device=device))
            for module in modules:
                module.up.register_forward_pre_hook(lambda _m, args, g=gate: (args[0] * g,))
        for parameter in factored.parameters():
            parameter.requires_grad_(False)
        with compute.onloaded(factored, device):
            yield factored
        bar.update()

    def square(_index, _sequence):
        for name, gate in gates.items():
            fisher[name] += gate.grad.double() ** 2
            gate.grad = None

    backward_layerwise(model, distributed.shard(input_ids), gated, square)
    bar.close()
    distributed.sum_over_ranks([fisher[name] for name in decompositions])  # one order on every rank
    return {name: fisher[name].cpu() for name in decompositions}


# --------------------------------------------------------------------------- output sensitivity

EMBEDDING = "<embedding>"  # output_sensitivity's key for the input embedding's output


@dataclass
class Sensitivity:
    """How much a linear's output matters to the loss, from the empirical Fisher of dL/dy (the embedding's: the
    Fisher of next tokens drawn from the model, output_sensitivity), factored into
    `channels` (a_i: the mean over sequences of sum_t T (dL/dy_ti)^2) and `positions` (the same energy per
    position over the channels, mean 1). On SmolLM2-135M a v_proj's first position weighs 270-500 times the
    mean: every later token attends to it, so its value and key errors reach every output.

    The embedding's also keeps, per vocabulary token, the energy of dL/dy at the positions that read it
    (`token_energy`, summed over its channels) and how many positions did (`token_count`): `token_sensitivity`."""

    channels: torch.Tensor
    positions: torch.Tensor
    token_energy: torch.Tensor | None = None
    token_count: torch.Tensor | None = None


SENSITIVITY_FIELDS = tuple(f.name for f in fields(Sensitivity))  # what the statistics store keeps of each


def output_sensitivity(model, input_ids: torch.Tensor, names: list[str], progress: bool = True
                       ) -> dict[str, Sensitivity]:
    """{linear name: Sensitivity} for the named linears (qualified names), and under EMBEDDING for the input
    embedding's output (a tied lm_head's rows are also the embedding's; from next tokens drawn from the model).
    Two backward passes per sequence, on the compute device one layer at a time (exporter.compress.layerwise)."""
    from tqdm.auto import tqdm

    device = compute.current()
    modules = dict(model.named_modules())
    embedding = model.get_input_embeddings()
    length = input_ids.shape[1]
    channels = {n: torch.zeros(modules[n].out_features, dtype=torch.float64, device=device) for n in names}
    channels[EMBEDDING] = torch.zeros(embedding.embedding_dim, dtype=torch.float64, device=device)
    positions = {n: torch.zeros(length, dtype=torch.float64, device=device) for n in channels}
    token_energy = torch.zeros(embedding.num_embeddings, dtype=torch.float64, device=device)
    token_count = torch.zeros(embedding.num_embeddings, dtype=torch.float64, device=device)

    def accumulator(name):
        def accumulate(g):  # returns None: the gradient flows on unchanged
            energy = g.detach().double() ** 2
            channels[name].add_(energy.sum(dim=tuple(range(g.dim() - 1))) * g.shape[-2])
            positions[name].add_(energy.sum(dim=-1).reshape(-1, g.shape[-2]).sum(dim=0))
        return accumulate

    def hook(name):
        def forward(_module, _args, output):  # only the passes with autograd on: the layers' and the head's
            if output.requires_grad:
                output.register_hook(accumulator(name))
        return forward

    bar = tqdm(total=2 * len(decoder_layers(model)), desc="output sensitivity", unit="layer", disable=not progress)

    @contextmanager
    def onloaded(_index, layer):
        with compute.onloaded(layer, device):
            yield layer
        bar.update()

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        backward_layerwise(model, distributed.shard(input_ids), onloaded)
    finally:
        for handle in handles:
            handle.remove()
    # The embedding's from a second pass on next tokens drawn from the model: the empirical Fisher (the text's own
    # next tokens) put its term of lm_head's price at 1.9-3.3x the KL it causes on SmolLM2, the drawn one at
    # 1.1-1.8x (benchmarks/embedding_price_probe.py); the projections' and the head's stay empirical (within 11%).
    shard = distributed.shard(input_ids)
    try:
        for ids, grad in zip(shard, backward_layerwise(model, shard, onloaded, drawn=True)):
            accumulator(EMBEDDING)(grad)
            ids = ids.reshape(-1).to(device)
            token_energy.index_add_(0, ids, (grad.detach().double() ** 2).sum(dim=-1).reshape(-1))
            token_count.index_add_(0, ids, torch.ones(ids.shape, dtype=torch.float64, device=device))
    finally:
        bar.close()
    distributed.sum_over_ranks([*channels.values(), *positions.values(), token_energy, token_count])
    count = len(input_ids)
    found = {n: Sensitivity((channels[n] / count).cpu(), (positions[n] / positions[n].mean().clamp_min(1e-30)).cpu())
             for n in channels}
    found[EMBEDDING].token_energy, found[EMBEDDING].token_count = token_energy.cpu(), token_count.cpu()
    return found


# Pseudo-counts that pull a token's own energy ratio toward its frequency bin's (`token_sensitivity`): a token seen
# once in the Fisher pass is one draw of a noisy gradient.
TOKEN_PSEUDO_COUNTS = 4.0
TOKEN_BINS = 4  # frequency bins: quantiles of the share over the tokens the Fisher pass saw


def token_sensitivity(sensitivity: Sensitivity, share: torch.Tensor) -> torch.Tensor:
    """Each vocabulary token's embedding-gradient energy per occurrence over the mean of all occurrences: the
    weight of its row in a tied embedding's estimate (whose one diagonal Fisher is that mean). On SmolLM2-135M the
    rarest quarter of tokens runs 2.4x the mean and the most frequent 0.7x, so 2-bit rows of rare tokens cost
    about twice what the mean prices (benchmarks/RESULTS.md, "lm_head's rows split"). Tokens are binned by `share`
    (each one's expected share of the text); a token the Fisher pass saw takes its own ratio shrunk toward its
    bin's by TOKEN_PSEUDO_COUNTS, one it never saw its bin's. Ones where no per-token energy was kept."""
    energy, count = sensitivity.token_energy, sensitivity.token_count
    if energy is None or count is None or float(count.sum()) == 0.0:
        return torch.ones(share.shape, dtype=torch.float64)
    energy, count, share = energy.double(), count.double(), share.double()
    mean = (energy.sum() / count.sum()).clamp_min(1e-300)
    seen = count > 0
    edges = torch.quantile(share[seen], torch.linspace(0, 1, TOKEN_BINS + 1, dtype=torch.float64)[1:-1])
    which = torch.bucketize(share, edges)
    prior = torch.ones_like(share)
    for b in range(TOKEN_BINS):
        members = seen & (which == b)
        if members.any():
            prior[which == b] = energy[members].sum() / count[members].sum() / mean
    # a token's own ratio (energy / count / mean) counted `count` times, its bin's TOKEN_PSEUDO_COUNTS times
    return (energy / mean + prior * TOKEN_PSEUDO_COUNTS) / (count + TOKEN_PSEUDO_COUNTS)


def position_weights(sensitivity: dict[str, Sensitivity]) -> dict[str, torch.Tensor]:
    """{linear: weight per position} for iter_layer_grams (float32; the embedding's entry left out)."""
    return {n: s.positions.float() for n, s in sensitivity.items() if n != EMBEDDING}
