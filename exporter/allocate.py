"""Per-projection ranks under a global parameter budget, from component importance (FLRC).

Each projection can sit at rank r_min, r_min + g, ..., up to its largest rank below break-even
(g: the hardware's rank multiple), or stay dense. Keeping its first r components keeps importance
I(r) = sum of their Fisher scores and costs r * (in + out) parameters. We take the upper concave
hull of each projection's (cost, importance) points, cut it into segments, and buy segments across
all projections in order of importance per parameter until the budget is spent. On the hull the
per-projection gains are decreasing, so this greedy is the optimal fractional solution and, for
budgets much larger than one segment, within one segment of the optimum; larger budgets buy a
superset of segments, so ranks grow monotonically with the budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .compress import Projection
from .errors import BudgetError


@dataclass
class Allocation:
    ranks: dict[str, int | None]  # None: kept dense
    projection_params: int
    budget_params: int
    predicted_loss_increase: float  # sum over dropped components of F_k / 2
    seconds: float

    def to_dict(self) -> dict:
        return {"projection_params": self.projection_params, "budget_params": self.budget_params,
                "predicted_loss_increase": self.predicted_loss_increase, "seconds": self.seconds}


def _states(p: Projection, scores: torch.Tensor, multiple: int, min_rank: int):
    """[(rank or None, cost, kept importance)] in increasing cost; None means dense."""
    total = float(scores.sum())
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), scores.double().cumsum(0)])
    largest = min(p.out_features, p.in_features)
    top = (p.params - 1) // (p.out_features + p.in_features) // multiple * multiple  # below break-even
    states = []
    for rank in range(min_rank, top + 1, multiple):
        kept = float(cumulative[min(rank, scores.numel())]) if rank < largest else total
        states.append((rank, p.factor_params(rank), kept))
    states.append((None, p.params, total))
    return states


def _hull(states):
    """Indices of the upper concave hull of (cost, kept) points, starting at the first state."""
    hull = [0]
    for i in range(1, len(states)):
        while len(hull) >= 2:
            a, b = states[hull[-2]], states[hull[-1]]
            c = states[i]
            # b lies on or below the chord a -> c: drop it.
            if (b[2] - a[2]) * (c[1] - a[1]) <= (c[2] - a[2]) * (b[1] - a[1]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(projections: list[Projection], scores: dict[str, torch.Tensor], budget_params: int,
             multiple: int = 16, min_rank: int | None = None) -> Allocation:
    """Ranks whose factor parameters sum to at most `budget_params`, maximizing kept importance."""
    start = time.perf_counter()
    min_rank = min_rank or multiple
    per_projection = {p.name: _states(p, scores[p.name], multiple, min_rank) for p in projections}
    floor = sum(s[0][1] for s in per_projection.values())
    dense = sum(p.params for p in projections)
    if budget_params < floor:
        raise BudgetError(
            f"budget infeasible: the projections need at least {floor:,} parameters (rank {min_rank} "
            f"everywhere), the budget allows {budget_params:,}"
        )
    segments = []  # (gain per parameter, name, order, end state index, cost, gain)
    for name, states in per_projection.items():
        hull = _hull(states)
        for order, (i, j) in enumerate(zip(hull, hull[1:])):
            cost, gain = states[j][1] - states[i][1], states[j][2] - states[i][2]
            segments.append((gain / cost, name, order, j, cost, gain))
    segments.sort(key=lambda s: (-s[0], s[1], s[2]))
    chosen = {name: 0 for name in per_projection}
    remaining = budget_params - floor
    next_order = {name: 0 for name in per_projection}
    for _ratio, name, order, end, cost, _gain in segments:
        if order != next_order[name]:
            continue  # an earlier segment of this projection did not fit
        if cost <= remaining:
            chosen[name], remaining = end, remaining - cost
            next_order[name] += 1
        else:
            next_order[name] = -1
    ranks, used, lost = {}, 0, 0.0
    for name, states in per_projection.items():
        rank, cost, kept = states[chosen[name]]
        ranks[name] = rank
        used += cost
        lost += states[-1][2] - kept
    ranks = {p.name: ranks[p.name] for p in projections}  # model order
    return Allocation(ranks, used, min(budget_params, dense), lost / 2.0, time.perf_counter() - start)
