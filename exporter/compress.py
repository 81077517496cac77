"""Factorize a model's decoder projections and swap in the low-rank layers.

Data flow: decompose every projection once (full useful rank, components sorted by importance),
then choose ranks (uniform here; the allocator chooses per projection), then apply them. The
decompositions are reusable for any rank choice, which keeps rank search and benchmarks cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import BudgetError
from .lowrank import CorrectedLinear, Decomposition, LowRankLinear, break_even_rank, decompose
from .models import layers_prefix
from .stats import iter_layer_grams

METHODS = ("whitened", "svd")


@dataclass(frozen=True)
class Projection:
    name: str
    out_features: int
    in_features: int

    @property
    def kind(self) -> str:  # q_proj, gate_proj, ... : the same name across layers
        return self.name.rsplit(".", 1)[-1]

    @property
    def params(self) -> int:
        return self.out_features * self.in_features

    def factor_params(self, rank: int | None, corrective_rank: int = 0) -> int:
        """Parameters at `rank` (None: dense), plus a corrective branch of `corrective_rank`."""
        if rank is None:
            return self.params
        return (rank + corrective_rank) * (self.out_features + self.in_features)


def decoder_projections(model) -> list[Projection]:
    """Every nn.Linear inside the decoder layers (q, k, v, o, gate, up, down for Llama-likes)."""
    prefix = layers_prefix(model) + "."
    return [Projection(name, module.out_features, module.in_features)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith(prefix)]


def decompose_model(model, method: str, input_ids: torch.Tensor | None = None, batch_size: int = 4,
                    progress: bool = True, full_rank: bool = False) -> dict[str, Decomposition]:
    """Decompose every decoder projection up to its break-even rank (larger ranks never pay).

    `full_rank` keeps every component: importance scoring needs the factorized model to be exact.
    """
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    modules = dict(model.named_modules())
    result: dict[str, Decomposition] = {}

    def add(name: str, gram):
        linear = modules[name]
        cap = None if full_rank else break_even_rank(linear.out_features, linear.in_features)
        result[name] = decompose(linear.weight, gram, max_rank=cap, bias=linear.bias)

    if method == "svd":
        for p in tqdm(decoder_projections(model), desc="factorizing", unit="proj", disable=not progress):
            add(p.name, None)
        return result
    if input_ids is None:
        raise ValueError("whitened SVD needs calibration input ids")
    for _index, _layer, grams in iter_layer_grams(model, input_ids, batch_size, progress):
        for name, gram in grams.items():
            add(name, gram)
    return result


def uniform_ranks(projections: list[Projection], ratio: float) -> dict[str, int | None]:
    """The same fraction `ratio` of parameters removed from every projection (SVD-LLM's ratio)."""
    if not 0.0 <= ratio < 1.0:
        raise BudgetError(f"--ratio must be in [0, 1), got {ratio}")
    ranks = {}
    for p in projections:
        rank = int((1.0 - ratio) * p.params / (p.out_features + p.in_features))
        ranks[p.name] = None if ratio == 0.0 else max(1, rank)
    return ranks


def replace_module(model, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def apply_ranks(model, decompositions: dict[str, Decomposition], ranks: dict[str, int | None]) -> None:
    """Replace each projection with its rank-r factors; None, or no saving, keeps it dense."""
    for name, rank in ranks.items():
        if rank is None:
            continue
        decomposition = decompositions[name]
        out_features, in_features = decomposition.up.shape[0], decomposition.down.shape[1]
        if rank > min(decomposition.max_rank, break_even_rank(out_features, in_features)):
            continue  # at or above break-even the dense matrix is smaller: keep it
        dtype = model.get_submodule(name).weight.dtype
        replace_module(model, name, decomposition.linear(rank).to(dtype))


def effective_ranks(model, projections: list[Projection]) -> dict[str, int | None]:
    """The rank each projection has in `model` now (None where it is dense)."""
    modules = dict(model.named_modules())
    return {p.name: modules[p.name].rank if isinstance(modules[p.name], (LowRankLinear, CorrectedLinear))
            else None for p in projections}


def corrective_ranks(model, projections: list[Projection]) -> dict[str, int]:
    """The corrective branch rank of each projection in `model` (0 where it has none)."""
    modules = dict(model.named_modules())
    return {p.name: modules[p.name].corrective_rank if isinstance(modules[p.name], CorrectedLinear) else 0
            for p in projections}


def parameter_summary(projections: list[Projection], ranks: dict[str, int | None], total_dense: int,
                      correctives: dict[str, int] | None = None) -> dict:
    """Parameter counts and the fractions removed, of projections and of the whole model."""
    correctives = correctives or {}
    dense = sum(p.params for p in projections)
    kept = sum(p.factor_params(ranks.get(p.name), correctives.get(p.name, 0)) for p in projections)
    removed = dense - kept
    return {
        "total_params_dense": total_dense,
        "total_params": total_dense - removed,
        "projection_params_dense": dense,
        "projection_params": kept,
        "projection_fraction_removed": removed / dense if dense else 0.0,
        "total_fraction_removed": removed / total_dense if total_dense else 0.0,
    }


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once
