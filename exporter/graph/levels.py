"""Progressive low-rank decoding: which rank levels an export writes (`--levels`) and the generation steps at
which each level starts, derived from what each level costs in quality on held-out calibration text.

Measurement (`token_nll`, `nll_increase`): the PyTorch model sliced to a level's ranks
(`graph.writer.sliced_copy`) scores held-out calibration windows; a level's cost is its mean next-token NLL
increase over the full level, in nats per token (also per position bucket of the windows, for reading).

Rule (`derive_schedule`): prefill and the first P generated tokens run at full rank (FLRC: the start of an
answer sets its course); after that, level j starts at the first step s from which running it to the end
of a horizon of H generated tokens adds at most `tolerance` nats of expected NLL in total:
s_j = max(P, ceil(H - tolerance / dNLL_j)) (P where dNLL_j <= 0). Levels that would start at or after H are
left out, and so is a level whose start is not earlier than a smaller level's (the smaller one costs no
more from that step on). A costlier level starts later, a larger tolerance starts every level earlier, and
the schedule depends only on the stored measurements.

Why P = H/4 = 32 (`FULL_RANK_TOKENS`): the mean NLL increase does not say where in an answer the loss
hurts, and the beginning matters most. Measured (benchmarks/progressive.py, SmolLM2-135M, FLRC 20% + CALR,
100 CNN/DailyMail articles, dNLL r85 0.0595, r70 0.172 nats/token): with P = 1 the rule gave
r100:0,r85:1,r70:82, ROUGE-L 0.0749 against 0.0857 at static full rank; r100:0,r85:32,r70:64 kept 0.0872
at a lower average cost. With P = 32 the rule gives r100:0,r85:32,r70:82 on the same measurements.

This module imports neither torch nor the graph writer at load time: the CLI parses `--levels` with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from exporter.errors import ExporterError

DEFAULT_LEVELS = (1.0, 0.85, 0.7)
HORIZON_TOKENS = 128  # the answer length a schedule is planned for (`exporter generate`'s default)
TOLERANCE_NATS = 8.0  # expected NLL a level may add over the rest of the horizon
FULL_RANK_TOKENS = HORIZON_TOKENS // 4  # generated tokens that always run at full rank (see the module doc)
POSITION_BUCKETS = 4
RULE = ("level j starts at s_j = max(full_rank_tokens, ceil(horizon - tolerance / nll_increase_j)); levels "
        "starting at or after the horizon, or not before a smaller level, are left out")


def level_name(fraction: float) -> str:
    """The one naming rule of rank levels: r100, r85, ... (file names, manifest, schedules)."""
    return f"r{round(100 * fraction)}"


def check_levels(fractions: Sequence[float], what: str = "--levels") -> tuple[float, ...]:
    """The fractions, if they start at 1.0 and strictly decrease within (0, 1] with distinct names; `what`
    names them in the error."""
    fractions = tuple(float(f) for f in fractions)
    if not fractions or fractions[0] != 1.0:
        raise ExporterError(f"{what} must start at 1.0 (the full rank), got {','.join(map(str, fractions))}")
    for before, after in zip(fractions, fractions[1:]):
        if not 0.0 < after < before:
            raise ExporterError(f"{what} must strictly decrease within (0, 1], got {after} after {before}")
    names = [level_name(f) for f in fractions]
    if len(set(names)) != len(names):
        raise ExporterError(f"{what} must be at least 0.01 apart (level names {', '.join(names)})")
    return fractions


def parse_levels(text: str) -> tuple[float, ...]:
    """`1.0,0.85,0.7` -> (1.0, 0.85, 0.7), checked."""
    try:
        fractions = [float(part) for part in text.split(",")]
    except ValueError:
        raise ExporterError(f"--levels expects comma-separated fractions such as 1.0,0.85,0.7, got {text!r}") from None
    return check_levels(fractions)


# --------------------------------------------------------------------------- measurement


def token_nll(model, windows):
    """Next-token NLL of every predicted position, [windows, seq_len - 1] (float64); one window at a time
    (a 512-token window's logits over a 49k vocabulary are 100 MB)."""
    import torch

    rows = []
    with torch.no_grad():
        for window in windows:
            logits = model(window[None], use_cache=False).logits[0, :-1].float()
            rows.append(torch.nn.functional.cross_entropy(logits, window[1:], reduction="none").double())
    return torch.stack(rows)


def nll_increase(base, level, buckets: int = POSITION_BUCKETS) -> dict:
    """A level's NLL increase over the full level (both from `token_nll`): mean, and mean per equal bucket
    of positions (`[start, end)` are the predicted tokens' positions in the window). Rounded to 1e-6, so the
    schedule derived from it does not hinge on summation order."""
    diff = (level - base).mean(dim=0)  # per position
    edges = [round(k * len(diff) / buckets) for k in range(buckets + 1)]
    buckets = [{"positions": [a + 1, b + 1], "nll_increase": round(float(diff[a:b].mean()), 6)}
               for a, b in zip(edges, edges[1:]) if b > a]
    return {"nll_increase": round(float(diff.mean()), 6), "nll_increase_by_position": buckets}


# --------------------------------------------------------------------------- rule


def level_start(increase: float, horizon: int = HORIZON_TOKENS, tolerance: float = TOLERANCE_NATS,
                full_rank_tokens: int = FULL_RANK_TOKENS) -> int:
    """The first step from which the level's expected added NLL up to the horizon is within tolerance,
    not before `full_rank_tokens` (at least 1: the prefill's token is always at full rank)."""
    first = max(1, full_rank_tokens)
    if increase <= 0:
        return first
    return max(first, math.ceil(round(horizon - tolerance / increase, 9)))


def derive_schedule(names: Sequence[str], increases: Sequence[float], horizon: int = HORIZON_TOKENS,
                    tolerance: float = TOLERANCE_NATS, full_rank_tokens: int = FULL_RANK_TOKENS
                    ) -> list[tuple[str, int]]:
    """The schedule of the levels `names` (full level first) from their NLL increases (see the module doc)."""
    if horizon < 1 or tolerance < 0 or full_rank_tokens < 0:
        raise ExporterError(f"schedule rule needs horizon >= 1, tolerance >= 0 and full_rank_tokens >= 0, got "
                            f"{horizon}, {tolerance}, {full_rank_tokens}")
    kept: list[tuple[str, int]] = []
    for name, increase in reversed(list(zip(names[1:], increases[1:]))):  # smallest level first
        start = level_start(increase, horizon, tolerance, full_rank_tokens)
        if start < horizon and all(start < later for _, later in kept):
            kept.append((name, start))
    return [(names[0], 0), *reversed(kept)]


def mean_over_tokens(schedule: Sequence[tuple[str, int]], values: dict[str, float], tokens: int) -> float:
    """Mean of `values[level]` over generated tokens 0..tokens-1 under `schedule` (e.g. active parameters)."""
    starts = [start for _, start in schedule] + [tokens]
    total = sum(values[level] * max(0, min(end, tokens) - min(start, tokens))
                for (level, start), end in zip(schedule, starts[1:]))
    return total / tokens
