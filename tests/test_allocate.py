"""FLRC allocation: budgets met, monotone in the budget, sensitivity respected, clear failures."""

from __future__ import annotations

import pytest
import torch

from exporter.compress.allocate import allocate
from exporter.compress.factorize import Projection, decoder_projections, decompose_model
from exporter.compress.importance import component_fisher
from exporter.device.cost_model import MB, projection_budget
from exporter.errors import BudgetError


def synthetic(n_layers: int = 6, seed: int = 0):
    """Llama-like projection shapes with decaying random component importances."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (256, 256), "k_proj": (64, 256), "v_proj": (64, 256), "o_proj": (256, 256),
              "gate_proj": (512, 256), "up_proj": (512, 256), "down_proj": (256, 512)}
    projections, scores = [], {}
    for layer in range(n_layers):
        for kind, (out, inp) in shapes.items():
            p = Projection(f"model.layers.{layer}.{kind}", out, inp)
            projections.append(p)
            k = min(out, inp)
            decay = torch.rand(1, generator=generator).item() * 0.05 + 0.005
            scores[p.name] = torch.exp(-decay * torch.arange(k, dtype=torch.float64)) * (
                1 + torch.rand(k, generator=generator, dtype=torch.float64))
    return projections, scores


def cost(projections, ranks) -> int:
    return sum(p.factor_params(ranks[p.name]) for p in projections)


@pytest.mark.parametrize("fraction", [0.3, 0.45, 0.6, 0.75, 0.9])
def test_budget_is_met_within_half_a_percent(fraction):
    projections, scores = synthetic()
    budget = int(fraction * sum(p.params for p in projections))
    result = allocate(projections, scores, budget, multiple=8)
    used = cost(projections, result.ranks)
    assert used == result.projection_params
    assert used <= budget
    assert used >= 0.995 * budget


def test_ranks_respect_multiple_min_and_break_even():
    projections, scores = synthetic()
    result = allocate(projections, scores, int(0.5 * sum(p.params for p in projections)), multiple=16)
    for p in projections:
        rank = result.ranks[p.name]
        if rank is not None:
            assert rank % 16 == 0 and rank >= 16
            assert p.factor_params(rank) < p.params  # factorized only where it saves parameters


def test_allocation_is_monotone_in_the_budget():
    projections, scores = synthetic()
    dense = sum(p.params for p in projections)
    previous = None
    for fraction in [0.25, 0.35, 0.5, 0.65, 0.8, 0.95]:
        result = allocate(projections, scores, int(fraction * dense), multiple=8)
        if previous is not None:
            assert result.predicted_loss_increase <= previous.predicted_loss_increase
            for p in projections:
                old, new = previous.ranks[p.name], result.ranks[p.name]
                assert new is None or (old is not None and new >= old), p.name
        previous = result


def test_more_sensitive_projection_gets_more_rank():
    projections, scores = synthetic(seed=3)
    target = "model.layers.2.o_proj"
    twin = "model.layers.3.o_proj"
    scores[twin] = scores[target].clone()
    scores[target] = scores[target] * 20.0  # same spectrum shape, 20x the loss sensitivity
    result = allocate(projections, scores, int(0.4 * sum(p.params for p in projections)), multiple=8)
    rank = lambda name: 10**9 if result.ranks[name] is None else result.ranks[name]  # noqa: E731
    assert rank(target) > rank(twin)


def test_deterministic():
    projections, scores = synthetic()
    budget = int(0.5 * sum(p.params for p in projections))
    assert allocate(projections, scores, budget).ranks == allocate(projections, scores, budget).ranks


def test_budget_above_dense_keeps_everything_dense():
    projections, scores = synthetic()
    result = allocate(projections, scores, sum(p.params for p in projections), multiple=8)
    assert all(rank is None for rank in result.ranks.values())
    assert result.predicted_loss_increase == 0.0


def test_infeasible_budget_names_the_smallest_feasible():
    projections, scores = synthetic()
    with pytest.raises(BudgetError, match="at least [0-9,]+ parameters"):
        allocate(projections, scores, 1000, multiple=16)


def test_projection_budget_messages():
    projections, _ = synthetic()
    dense = sum(p.params for p in projections)
    total = dense + 100_000  # embeddings etc.
    assert projection_budget(projections, total, total * 4.0, "fp32") is None  # already fits: dense
    allowed = projection_budget(projections, total, 0.5 * total * 4.0, "fp32")
    assert allowed == int(0.5 * total) - 100_000
    with pytest.raises(BudgetError, match=r"smallest this model can be made .* is [0-9.]+ MB"):
        projection_budget(projections, total, 0.01 * MB, "fp32", min_rank=16)


def test_fisher_prices_every_component_of_a_real_model(tiny_models, calib_ids):
    model = tiny_models.load("llama")
    decompositions = decompose_model(model, "whitened", calib_ids[:4], progress=False, full_rank=True)
    fisher = component_fisher(model, decompositions, calib_ids[:4], progress=False)
    projections = decoder_projections(model)
    assert set(fisher) == {p.name for p in projections}
    for p in projections:
        scores = fisher[p.name]
        assert scores.numel() == min(p.out_features, p.in_features)
        assert torch.isfinite(scores).all() and (scores >= 0).all() and scores.sum() > 0
    # The model itself is untouched (importance works on a copy).
    assert not any(type(m).__name__ == "LowRankLinear" for m in model.modules())


def test_fisher_allocation_beats_uniform_on_calibration_loss(tiny_models, calib_ids):
    """The point of FLRC: at the same parameter count, Fisher ranks lose less than uniform ranks."""
    import copy

    from exporter.compress.factorize import apply_ranks, effective_ranks, uniform_ranks

    model = tiny_models.load("llama")
    decompositions = decompose_model(model, "whitened", calib_ids, progress=False, full_rank=True)
    fisher = component_fisher(model, decompositions, calib_ids[:6], progress=False)
    projections = decoder_projections(model)

    def loss(ranks):
        candidate = copy.deepcopy(model)
        apply_ranks(candidate, decompositions, ranks)
        with torch.no_grad():
            return candidate(calib_ids, labels=calib_ids).loss.item(), effective_ranks(candidate, projections)

    uniform_loss, uniform = loss(uniform_ranks(projections, 0.5))
    budget = cost(projections, uniform)
    fisher_loss, chosen = loss(allocate(projections, fisher, budget, multiple=1).ranks)
    assert cost(projections, chosen) <= budget
    assert fisher_loss < uniform_loss


@pytest.mark.parametrize("fraction", [0.5, 0.7])
def test_node_price_factorizes_fewer_projections_within_the_same_budget(fraction):
    """A priced node keeps more projections dense (the ones whose factorization saves least), spends the
    same budget, and gives up some importance for it; a larger price goes further."""
    projections, scores = synthetic()
    budget = int(fraction * sum(p.params for p in projections))
    free = allocate(projections, scores, budget, multiple=8)
    counts = [sum(r is not None for r in free.ranks.values())]
    for price in (2_000.0, 20_000.0):
        priced = allocate(projections, scores, budget, multiple=8, node_params=price)
        used = cost(projections, priced.ranks)
        assert used <= budget and used >= 0.98 * budget
        assert priced.predicted_loss_increase >= free.predicted_loss_increase
        assert priced.node_params == price and priced.node_penalty > 0
        counts.append(sum(r is not None for r in priced.ranks.values()))
    assert counts[0] >= counts[1] >= counts[2] and counts[0] > counts[2], counts
    assert free.node_penalty == 0 and free.to_dict()["factorized"] == counts[0]


def test_node_price_prefers_dense_where_factorizing_saves_least():
    """A big projection whose importance is spread over many components and a small one whose first
    few hold nearly all of it: unpriced, the small one sits at its lowest rank; priced, it stays dense
    and the big one gives up the rank that pays for it."""
    big, small = Projection("big", 512, 512), Projection("small", 64, 512)
    scores = {"big": torch.exp(-0.002 * torch.arange(512, dtype=torch.float64)),
              "small": torch.exp(-0.5 * torch.arange(64, dtype=torch.float64))}
    budget = int(0.5 * (big.params + small.params))
    free = allocate([big, small], scores, budget, multiple=8)
    assert free.ranks["small"] == 8
    priced = allocate([big, small], scores, budget, multiple=8, node_params=100_000.0)
    assert priced.ranks["small"] is None and priced.ranks["big"] < free.ranks["big"]


def _plans(costs, losses, times):
    """Every choice of one option per group, with its summed cost, loss and time (brute force)."""
    import itertools

    for choice in itertools.product(*(range(len(group)) for group in costs)):
        yield (list(choice), sum(c[k] for c, k in zip(costs, choice)), sum(v[k] for v, k in zip(losses, choice)),
               sum(t[k] for t, k in zip(times, choice)))


@pytest.mark.parametrize("seed", range(6))
def test_time_limited_knapsack_keeps_both_limits_and_is_optimal_at_its_multiplier(seed):
    """Every choice keeps the bytes and the time limit; at its multiplier it is the least loss + multiplier x time of
    all choices within the bytes (brute force); where the least-loss choice is fast enough it is that one."""
    import math
    import random

    from exporter.compress.allocate import multiple_choice_knapsack, time_limited_knapsack

    rng = random.Random(seed)
    groups = 5
    costs = [[rng.randint(1, 9) for _ in range(3)] for _ in range(groups)]
    losses = [[rng.random() for _ in range(3)] for _ in range(groups)]
    times = [[rng.uniform(0.5, 2.0) for _ in range(3)] for _ in range(groups)]
    budget = sum(max(c) for c in costs) * 2 // 3
    within = [p for p in _plans(costs, losses, times) if p[1] <= budget]
    free = multiple_choice_knapsack(costs, losses, budget)
    free_time = sum(t[k] for t, k in zip(times, free))
    fastest = min(p[3] for p in within)
    for limit in (free_time + 1.0, (free_time + fastest) / 2, fastest, fastest - 0.1):
        choice, multiplier = time_limited_knapsack(costs, losses, times, budget, limit)
        plan = next(p for p in within if p[0] == choice)
        assert plan[1] <= budget
        if limit >= free_time:
            assert (choice, multiplier) == (free, 0.0)
        elif limit < fastest:
            assert multiplier == math.inf and plan[3] == pytest.approx(fastest)  # the fastest, said so
        else:
            assert plan[3] <= limit + 1e-9 and 0.0 < multiplier < math.inf
            weighted = [[loss + multiplier * t for loss, t in zip(ls, ts)] for ls, ts in zip(losses, times)]
            lagrangian = next(p for p in within if p[0] == multiple_choice_knapsack(costs, weighted, budget))
            best = min(p[2] + multiplier * p[3] for p in within)
            assert lagrangian[2] + multiplier * lagrangian[3] == pytest.approx(best, abs=1e-9)
            assert plan[2] <= lagrangian[2] + 1e-12  # the slack filled: never more loss than at its multiplier
            feasible = min(p[2] for p in within if p[3] <= limit)
            assert plan[2] >= feasible - 1e-12  # no better than the exact optimum under both limits


def test_time_limited_knapsack_spends_the_time_one_large_option_leaves():
    """One large option (lm_head's split) and one small: at every multiplier either both are taken (over the limit)
    or neither; the slack they leave is spent on the large one, the exact optimum (brute force)."""
    from exporter.compress.allocate import time_limited_knapsack

    costs, losses, times = [[1, 1], [1, 1]], [[10.0, 0.0], [1.0, 0.0]], [[0.0, 10.0], [0.0, 1.0]]
    choice, multiplier = time_limited_knapsack(costs, losses, times, 2, 10.5)
    assert choice == [1, 0] and multiplier > 0
    assert min((p for p in _plans(costs, losses, times) if p[3] <= 10.5), key=lambda p: p[2])[0] == choice


def test_time_limited_knapsack_with_no_choice_in_the_bytes():
    from exporter.compress.allocate import time_limited_knapsack

    assert time_limited_knapsack([[5, 6]], [[0.1, 0.2]], [[1.0, 0.5]], 4, 0.1) == (None, 0.0)
