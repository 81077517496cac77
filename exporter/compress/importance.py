"""Fisher importance of every singular component of every projection (FLRC).

Each factorized projection y = U (g * (V x)) gets a gate g (all ones). The empirical Fisher
F_k = sum over calibration sequences of (dL/dg_k)^2 prices component k: by a second-order Taylor
expansion with the Fisher as the Hessian, dropping it (g_k: 1 -> 0) raises the LM loss by about
F_k / 2. One backward pass per sequence prices all components of all projections at once, which
is what makes FLRC's search cheap compared with truncating projections one at a time.
"""

from __future__ import annotations

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
