"""Per-projection ranks under a global parameter budget, from component importance (FLRC).

Each projection can sit at rank r_min, r_min + g, ..., up to its largest rank below break-even
(g: the hardware's rank multiple), or stay dense. Keeping its first r components keeps importance
I(r) = sum of their Fisher scores and costs r * (in + out) parameters. We take the upper concave
hull of each projection's (cost, importance) points, cut it into segments, and buy segments across
all projections in order of importance per parameter until the budget is spent. On the hull the
per-projection gains are decreasing, so this greedy is the optimal fractional solution and, for
budgets much larger than one segment, within one segment of the optimum; larger budgets buy a
superset of segments, so ranks grow monotonically with the budget. A segment that does not fit whole
(one can be long: a projection whose importance is spread thin jumps from a low rank to dense) is
bought in part, at the best state under it that the rest of the budget affords, before any cheaper
segment gets that budget.

Node price (`node_params`): a factorized projection also adds a second-stage MatMul to the decode
graph, and a small MatMul costs far more than its bytes (a cold weight stream starting, a thread-pool
join). Given the parameters that stream in that time, the allocator charges each factorized state the
importance those parameters hold at the margin (the price per parameter of the last segment bought),
so it keeps a projection dense where factorizing it saves too little to pay for its node. The margin
depends on the charge, so the two are settled by a few fixed-point rounds. The parameter budget is
unchanged: the same parameters are removed, by fewer, deeper factorizations.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from exporter.compress.factorize import Projection
from exporter.errors import BudgetError


@dataclass
class Allocation:
    ranks: dict[str, int | None]  # None: kept dense
    projection_params: int
    budget_params: int
    predicted_loss_increase: float  # sum over dropped components of F_k / 2
    seconds: float
    marginal: float = 0.0  # importance per parameter of the first segment that did not fit
    node_params: float = 0.0  # the node price in parameters (0: not latency-aware)
    node_penalty: float = 0.0  # the importance charged per factorized projection for it

    def to_dict(self) -> dict:
        return {"projection_params": self.projection_params, "budget_params": self.budget_params,
                "predicted_loss_increase": self.predicted_loss_increase, "seconds": self.seconds,
                "factorized": sum(r is not None for r in self.ranks.values()),
                "node_params": self.node_params, "node_penalty": self.node_penalty}


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


NODE_PRICE_ROUNDS = 6  # fixed-point rounds of the node price (it settles in 2-4 on SmolLM2)


def allocate(projections: list[Projection], scores: dict[str, torch.Tensor], budget_params: int,
             multiple: int = 16, min_rank: int | None = None, node_params: float = 0.0) -> Allocation:
    """Ranks whose factor parameters sum to at most `budget_params`, maximizing kept importance, less
    the node price of each factorized projection when `node_params` > 0 (see the module's docstring)."""
    start = time.perf_counter()
    min_rank = min_rank or multiple
    per_projection = {p.name: _states(p, scores[p.name], multiple, min_rank) for p in projections}
    floor = sum(s[0][1] for s in per_projection.values())
    if budget_params < floor:
        raise BudgetError(
            f"budget infeasible: the projections need at least {floor:,} parameters (rank {min_rank} "
            f"everywhere), the budget allows {budget_params:,}"
        )
    dense = sum(p.params for p in projections)
    chosen, marginal = _buy(per_projection, budget_params - floor, 0.0)
    penalty = 0.0
    for _ in range(NODE_PRICE_ROUNDS if node_params > 0 else 0):
        settled = penalty
        penalty = marginal * node_params
        chosen, marginal = _buy(per_projection, budget_params - floor, penalty)
        if abs(penalty - settled) <= 0.01 * penalty:
            break
    ranks, used, lost = {}, 0, 0.0
    for name, states in per_projection.items():
        rank, cost, kept = states[chosen[name]]
        ranks[name] = rank
        used += cost
        lost += states[-1][2] - kept
    ranks = {p.name: ranks[p.name] for p in projections}  # model order
    return Allocation(ranks, used, min(budget_params, dense), lost / 2.0, time.perf_counter() - start,
                      marginal, node_params, penalty)


def _buy(per_projection: dict, remaining: int, penalty: float) -> tuple[dict, float]:
    """Greedy purchase of hull segments with `remaining` parameters over the floor, every factorized
    state's importance lowered by `penalty`: (chosen state index per projection, the importance per
    parameter of the first segment that did not fit, 0 if all did)."""
    priced = {name: [(rank, cost, kept - (penalty if rank is not None else 0.0)) for rank, cost, kept in states]
              for name, states in per_projection.items()}
    segments = []  # (gain per parameter, name, order, end state index, cost)
    for name, states in priced.items():
        hull = _hull(states)
        for order, (i, j) in enumerate(zip(hull, hull[1:])):
            cost, gain = states[j][1] - states[i][1], states[j][2] - states[i][2]
            segments.append((gain / cost, name, order, j, cost))
    segments.sort(key=lambda s: (-s[0], s[1], s[2]))
    chosen = {name: 0 for name in priced}
    next_order = {name: 0 for name in priced}
    marginal = 0.0
    for ratio, name, order, end, cost in segments:
        if order != next_order[name]:
            continue  # an earlier segment of this projection did not fit
        if cost <= remaining:
            chosen[name], remaining = end, remaining - cost
            next_order[name] += 1
            continue
        next_order[name] = -1
        marginal = marginal or ratio
        # The segment does not fit whole: buy the best of the states under it (below the hull, so less
        # efficient than the segment, but better than leaving the budget to worse segments) that fits.
        states, start = priced[name], chosen[name]
        affordable = [i for i in range(start + 1, end) if states[i][1] - states[start][1] <= remaining]
        best = max(affordable, key=lambda i: states[i][2], default=start)
        if states[best][2] > states[start][2]:
            remaining -= states[best][1] - states[start][1]
            chosen[name] = best
    return chosen, marginal


# The budgets of the report's quality-vs-compression curve: fractions of the projection parameters removed
CURVE_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def allocation_curve(projections, importance: dict, multiple: int,
                     fractions: tuple[float, ...] = CURVE_FRACTIONS, node_params: float = 0.0) -> dict:
    """The Fisher allocator's predicted loss increase at a handful of budgets (with the export's node
    price, where latency-aware), for the report's quality-vs-compression plot: {points:
    [{target_fraction_removed, fraction_removed, projection_params, predicted_loss_increase}],
    rank_multiple, seconds}. Budgets the allocator cannot meet are left out.
    The allocator is fast (hundredths of a second per budget on SmolLM2-135M), so this costs little."""
    start = time.perf_counter()
    dense = sum(p.params for p in projections)
    points = []
    for fraction in fractions:
        try:
            allocation = allocate(projections, importance, round((1.0 - fraction) * dense), multiple=multiple,
                                  node_params=node_params)
        except BudgetError:
            continue  # below the smallest the projections can be made
        points.append({"target_fraction_removed": fraction,
                       "fraction_removed": 1.0 - allocation.projection_params / dense,
                       "projection_params": allocation.projection_params,
                       "predicted_loss_increase": allocation.predicted_loss_increase})
    return {"points": points, "rank_multiple": multiple, "seconds": time.perf_counter() - start}


def multiple_choice_knapsack(costs: list[list[int]], losses: list[list[float]], budget: int,
                             granularity: int = 1) -> list[int] | None:
    """One option per group minimizing the summed loss with summed cost <= `budget`; None where no choice fits.

    Dynamic programming over the budget in steps of `granularity` (costs are rounded up to whole steps, so
    the choice always fits; with granularity 1 it is exact): O(groups x options x budget / granularity).
    """
    import numpy as np

    budget = min(budget, sum(max(group) for group in costs))  # beyond it every choice fits: no more cells needed
    cells = budget // granularity
    if cells < 0:
        return None
    steps = [[-(-c // granularity) for c in group] for group in costs]
    best = np.zeros(cells + 1)  # best[b]: least loss of the groups so far within b steps
    picks = []
    for group_steps, group_losses in zip(steps, losses):
        new = np.full(cells + 1, np.inf)
        pick = np.full(cells + 1, -1, dtype=np.int16)
        for option, (step, loss) in enumerate(zip(group_steps, group_losses)):
            if step > cells:
                continue
            candidate = np.full(cells + 1, np.inf)
            candidate[step:] = best[: cells + 1 - step] + loss
            better = candidate < new
            new[better], pick[better] = candidate[better], option
        best = new
        picks.append(pick)
    if not np.isfinite(best[cells]):
        return None
    choice, remaining = [], cells
    for group_steps, pick in zip(reversed(steps), reversed(picks)):
        option = int(pick[remaining])
        choice.append(option)
        remaining -= group_steps[option]
    return choice[::-1]


def time_limited_knapsack(costs: list[list[int]], losses: list[list[float]], times: list[list[float]], budget: int,
                          time_limit: float, granularity: int = 1, iterations: int = 40
                          ) -> tuple[list[int] | None, float]:
    """multiple_choice_knapsack with a second limit, summed `times` <= `time_limit`, by its Lagrangian: the knapsack
    over loss + multiplier x time, the multiplier the smallest that keeps the limit (doubled from 1e-4, then
    bisected). Returns (choice, multiplier): 0.0 where the least-loss choice keeps the limit already, math.inf where
    no multiplier does (the choice is then the byte budget's fastest); (None, 0.0) where no choice fits the bytes.
    Not exact (a choice between two multipliers' may lose less; fill_slack then spends what the limits leave), but
    every choice it returns keeps both limits."""
    def solve(multiplier: float):
        weighted = [[loss + multiplier * t for loss, t in zip(ls, ts)] for ls, ts in zip(losses, times)]
        choice = multiple_choice_knapsack(costs, weighted, budget, granularity)
        return choice, sum(ts[k] for ts, k in zip(times, choice)) if choice is not None else math.inf

    choice, spent = solve(0.0)
    if choice is None or spent <= time_limit:
        return choice, 0.0
    low, high = 0.0, 1e-4
    while True:
        found, spent = solve(high)
        if spent <= time_limit:
            break
        low, high = high, high * 2
        if high > 1e12:  # the fastest choice by time, the least loss among equally fast ones
            fastest = multiple_choice_knapsack(costs, [[t + 1e-9 * loss for loss, t in zip(ls, ts)]
                                                       for ls, ts in zip(losses, times)], budget, granularity)
            return fastest, math.inf
    for _ in range(iterations):  # bisect (geometrically, once above 0) towards the smallest multiplier that keeps it
        middle = (low + high) / 2 if low == 0.0 else math.sqrt(low * high)
        candidate, spent = solve(middle)
        if spent <= time_limit:
            found, high = candidate, middle
        else:
            low = middle
        if high - low <= 1e-3 * high:
            break
    return fill_slack(found, costs, losses, times, budget, time_limit), high


def fill_slack(choice: list[int], costs: list[list[int]], losses: list[list[float]], times: list[list[float]],
               budget: int, time_limit: float) -> list[int]:
    """`choice` improved one option at a time, the largest loss decrease that keeps both limits first, until none
    does. The Lagrangian's choice can leave much of the time unspent where one option is large (SmolLM2's lm_head
    split: 0.14 ms of a 3.9 ms limit): at the multiplier that drops it, its time goes unused."""
    choice = list(choice)
    spent_bytes = sum(c[k] for c, k in zip(costs, choice))
    spent_time = sum(t[k] for t, k in zip(times, choice))
    while True:
        best, gain = None, 0.0
        for i, k in enumerate(choice):
            for option, loss in enumerate(losses[i]):
                if (losses[i][k] - loss > gain and spent_bytes + costs[i][option] - costs[i][k] <= budget
                        and spent_time + times[i][option] - times[i][k] <= time_limit):
                    best, gain = (i, option), losses[i][k] - loss
        if best is None:
            return choice
        i, option = best
        spent_bytes += costs[i][option] - costs[i][choice[i]]
        spent_time += times[i][option] - times[i][choice[i]]
        choice[i] = option
