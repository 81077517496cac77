"""Fisher importance of every singular component of every projection (FLRC).

Each factorized projection y = U (g * (V x)) gets a gate g (all ones). The empirical Fisher
F_k = sum over calibration sequences of (dL/dg_k)^2 prices component k: by a second-order Taylor
expansion with the Fisher as the Hessian, dropping it (g_k: 1 -> 0) raises the LM loss by about
F_k / 2. One backward pass per sequence prices all components of all projections at once, which
is what makes FLRC's search cheap compared with truncating projections one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from exporter.compress.factorize import install_unit
from exporter.compress.lowrank import Decomposition


def component_fisher(model, decompositions: dict[str, Decomposition], input_ids: torch.Tensor,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """{unit name: F_k for each component k, in the decomposition's order} (float64)."""
    import copy

    from tqdm.auto import tqdm

    factored = copy.deepcopy(model)
    installed = {name: install_unit(factored, name, decomposition.linear(decomposition.max_rank))
                 for name, decomposition in decompositions.items()}
    for parameter in factored.parameters():
        parameter.requires_grad_(False)
    gates: dict[str, nn.Parameter] = {}
    handles = []
    for name, modules in installed.items():
        # A joint unit's projections share its components: one gate scales component k in all of them.
        gate = gates[name] = nn.Parameter(torch.ones(modules[0].rank))
        for module in modules:
            handles.append(module.up.register_forward_pre_hook(lambda _m, args, g=gate: (args[0] * g,)))
    fisher = {name: torch.zeros(g.numel(), dtype=torch.float64) for name, g in gates.items()}
    try:
        for sequence in tqdm(input_ids, desc="Fisher importance", unit="seq", disable=not progress):
            batch = sequence.unsqueeze(0)
            loss = factored(batch, labels=batch, use_cache=False).loss
            grads = torch.autograd.grad(loss, list(gates.values()))
            for name, grad in zip(gates, grads):
                fisher[name] += grad.double() ** 2
    finally:
        for handle in handles:
            handle.remove()
    return fisher


# --------------------------------------------------------------------------- output sensitivity

EMBEDDING = "<embedding>"  # output_sensitivity's key for the input embedding's output


@dataclass
class Sensitivity:
    """How much a linear's output matters to the loss, from the empirical Fisher of dL/dy, factored into
    `channels` (a_i: the mean over sequences of sum_t T (dL/dy_ti)^2) and `positions` (the same energy per
    position over the channels, mean 1). On SmolLM2-135M a v_proj's first position weighs 270-500 times the
    mean: every later token attends to it, so its value and key errors reach every output."""

    channels: torch.Tensor
    positions: torch.Tensor


def output_sensitivity(model, input_ids: torch.Tensor, names: list[str], progress: bool = True
                       ) -> dict[str, Sensitivity]:
    """{linear name: Sensitivity} for the named linears (qualified names), and under EMBEDDING for the input
    embedding's output (a tied lm_head's rows are also the embedding's). One backward pass per sequence."""
    from tqdm.auto import tqdm

    modules = dict(model.named_modules())
    embedding = model.get_input_embeddings()
    length = input_ids.shape[1]
    channels = {n: torch.zeros(modules[n].out_features, dtype=torch.float64) for n in names}
    channels[EMBEDDING] = torch.zeros(embedding.embedding_dim, dtype=torch.float64)
    positions = {n: torch.zeros(length, dtype=torch.float64) for n in channels}

    def accumulator(name):
        def accumulate(g):  # returns None: the gradient flows on unchanged
            energy = g.detach().double() ** 2
            channels[name].add_(energy.sum(dim=tuple(range(g.dim() - 1))) * g.shape[-2])
            positions[name].add_(energy.sum(dim=-1).reshape(-1, g.shape[-2]).sum(dim=0))
        return accumulate

    def hook(name):
        def forward(_module, _args, output):
            if output.requires_grad:
                output.register_hook(accumulator(name))
        return forward

    def leaf(_module, _args, output):  # a leaf that needs grad: every later output then carries one
        output = output.detach().requires_grad_(True)
        output.register_hook(accumulator(EMBEDDING))
        return output

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    handles.append(embedding.register_forward_hook(leaf))
    weights = list(model.parameters())
    flags = [p.requires_grad for p in weights]
    for p in weights:
        p.requires_grad_(False)
    try:
        for sequence in tqdm(input_ids, desc="output sensitivity", unit="seq", disable=not progress):
            batch = sequence.unsqueeze(0)
            model(batch, labels=batch, use_cache=False).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(weights, flags):
            p.requires_grad_(flag)
    count = len(input_ids)
    return {n: Sensitivity(channels[n] / count, positions[n] / positions[n].mean().clamp_min(1e-30))
            for n in channels}


def position_weights(sensitivity: dict[str, Sensitivity]) -> dict[str, torch.Tensor]:
    """{linear: weight per position} for iter_layer_grams (float32; the embedding's entry left out)."""
    return {n: s.positions.float() for n, s in sensitivity.items() if n != EMBEDDING}
