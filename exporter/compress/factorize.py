"""Factorize a model's decoder projections and swap in the low-rank layers.

Data flow: decompose every projection once (full useful rank, components sorted by importance),
then choose ranks (uniform here; the allocator chooses per projection), then apply them. The
decompositions are reusable for any rank choice, which keeps rank search and benchmarks cheap.

Joint factorization (`joint=True`): the projections that read one input (q/k/v; gate/up) are one
unit, named `parent.q_proj+k_proj+v_proj`: their stacked weight [W_q; W_k; W_v] is factorized as one
(whitened by the input they share), so they share one down factor V (rank x in) and split the up
factor's rows. The allocator then chooses one rank per unit. It costs r (in + sum of outs) instead of
sum r_i (in + out_i), and the graph writes each unit as two MatMuls and no Split (GroupQueryAttention
takes q/k/v packed) instead of one fused first stage, a Split and one MatMul per projection: on a
2-core CPU a decode step's time goes largely to per-node costs, so fewer nodes decode faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from exporter.architectures import JOINT_GROUPS
from exporter.compress import distributed
from exporter.compress.grams import iter_layer_grams
from exporter.compress.lowrank import (
    CorrectedLinear,
    Decomposition,
    LowRankLinear,
    break_even_rank,
    decompose,
    split_rows,
)
from exporter.errors import BudgetError
from exporter.source.model import layers_prefix

METHODS = ("whitened", "svd")
JOINT_SEPARATOR = "+"


def unit_name(members: list[str]) -> str:
    """A unit's name from its module names: one projection's own, or `parent.q_proj+k_proj+v_proj`."""
    if len(members) == 1:
        return members[0]
    parent = members[0].rpartition(".")[0]
    return f"{parent}.{JOINT_SEPARATOR.join(m.rpartition('.')[2] for m in members)}"


def unit_members(name: str) -> list[str]:
    """The module names of a unit: itself, or a joint unit's projections (`a.q_proj+k_proj` -> a.q_proj, a.k_proj)."""
    parent, _, last = name.rpartition(".")
    return [f"{parent}.{member}" for member in last.split(JOINT_SEPARATOR)] if JOINT_SEPARATOR in last else [name]


@dataclass(frozen=True)
class Projection:
    """A unit of factorization: one projection, or a joint unit (`unit_members`) whose out_features
    is the sum of its projections'."""

    name: str
    out_features: int
    in_features: int

    @property
    def kind(self) -> str:  # q_proj, gate_proj, q_proj+k_proj+v_proj ... : the same name across layers
        return self.name.rsplit(".", 1)[-1]

    @property
    def members(self) -> list[str]:
        return unit_members(self.name)

    @property
    def params(self) -> int:
        return self.out_features * self.in_features

    def factor_params(self, rank: int | None, corrective_rank: int = 0) -> int:
        """Parameters at `rank` (None: dense), plus a corrective branch of `corrective_rank`."""
        if rank is None:
            return self.params
        return (rank + corrective_rank) * (self.out_features + self.in_features)


def decoder_projections(model, joint: bool = False) -> list[Projection]:
    """Every nn.Linear inside the decoder layers (q, k, v, o, gate, up, down for Llama-likes); with
    `joint`, the JOINT_GROUPS of one parent as one unit each (where the parent has all of a group)."""
    prefix = layers_prefix(model) + "."
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.startswith(prefix)}
    units, done = [], set()
    for name, module in linears.items():
        if name in done:
            continue
        parent, _, short = name.rpartition(".")
        group = next((g for g in JOINT_GROUPS if short in g), None) if joint else None
        members = [f"{parent}.{m}" for m in group] if group else []
        if group and all(m in linears for m in members):
            done.update(members)
            units.append(Projection(unit_name(members), sum(linears[m].out_features for m in members),
                                    module.in_features))
        else:
            units.append(Projection(name, module.out_features, module.in_features))
    return units


def unit_weight(model, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A unit's (weight out x in, bias or None): a joint unit's stacked along out (absent biases as zeros)."""
    linears = [model.get_submodule(m) for m in unit_members(name)]
    weight = torch.cat([linear.weight for linear in linears]) if len(linears) > 1 else linears[0].weight
    if all(linear.bias is None for linear in linears):
        return weight, None
    bias = torch.cat([linear.bias if linear.bias is not None else torch.zeros(linear.out_features,
                                                                              dtype=weight.dtype)
                      for linear in linears])
    return weight, bias


def decompose_model(model, method: str, input_ids: torch.Tensor | None = None, batch_size: int = 4,
                    progress: bool = True, full_rank: bool = False, joint: bool = False) -> dict[str, Decomposition]:
    """Decompose every decoder unit (`decoder_projections(model, joint)`) up to its break-even rank
    (larger ranks never pay). `full_rank` keeps every component: importance scoring needs the factorized
    model to be exact.
    """
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    units = {p.members[0]: p for p in decoder_projections(model, joint)}
    result: dict[str, Decomposition] = {}

    def add(unit: Projection, gram, into: dict | None = None):
        cap = None if full_rank else break_even_rank(unit.out_features, unit.in_features)
        weight, bias = unit_weight(model, unit.name)
        (result if into is None else into)[unit.name] = decompose(weight, gram, max_rank=cap, bias=bias)

    if method == "svd":
        for unit in tqdm(list(units.values()), desc="factorizing", unit="proj", disable=not progress):
            add(unit, None)
        return result
    if input_ids is None:
        raise ValueError("whitened SVD needs calibration input ids")
    for _index, _layer, grams in iter_layer_grams(model, input_ids, batch_size, progress):
        # a joint unit's projections read one input: its first one's Gram serves
        here = [name for name in grams if name in units]
        mine, merge = distributed.split_work([units[name].name for name in here])  # data-parallel: one rank each
        computed: dict[str, Decomposition] = {}
        for name in here:
            if units[name].name in mine:
                add(units[name], grams[name], computed)
        result.update(merge(computed))  # every rank's dict in the same order
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


def install_unit(model, name: str, module: nn.Module) -> list[nn.Module]:
    """Put a unit's factorized module in the model: a joint unit's is split into one module per
    projection, sharing the down factor (`split_rows`). Returns the modules installed."""
    members = unit_members(name)
    if len(members) == 1:
        replace_module(model, name, module)
        return [module]
    parts = split_rows(module, [model.get_submodule(m).out_features for m in members])
    for member, part in zip(members, parts):
        replace_module(model, member, part)
    return parts


def apply_ranks(model, decompositions: dict[str, Decomposition], ranks: dict[str, int | None]) -> None:
    """Replace each unit with its rank-r factors; None, or no saving, keeps it dense."""
    for name, rank in ranks.items():
        if rank is None:
            continue
        decomposition = decompositions[name]
        out_features, in_features = decomposition.up.shape[0], decomposition.down.shape[1]
        if rank > min(decomposition.max_rank, break_even_rank(out_features, in_features)):
            continue  # at or above break-even the dense matrix is smaller: keep it
        dtype = model.get_submodule(unit_members(name)[0]).weight.dtype
        install_unit(model, name, decomposition.linear(rank).to(dtype))


def effective_ranks(model, projections: list[Projection]) -> dict[str, int | None]:
    """The rank each unit has in `model` now (None where it is dense)."""
    modules = dict(model.named_modules())
    return {p.name: modules[p.members[0]].rank if isinstance(modules[p.members[0]], (LowRankLinear, CorrectedLinear))
            else None for p in projections}


def corrective_ranks(model, projections: list[Projection]) -> dict[str, int]:
    """The corrective branch rank of each unit in `model` (0 where it has none)."""
    modules = dict(model.named_modules())
    return {p.name: modules[p.members[0]].corrective_rank if isinstance(modules[p.members[0]], CorrectedLinear)
            else 0 for p in projections}


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
