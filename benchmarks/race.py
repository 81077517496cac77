"""Re-time kept graphs against a baseline: decode speed in fresh processes, rounds interleaved, ratios paired.

    python benchmarks/race.py BASELINE_DIR OTHER_DIR ... --rounds 15 --threads 2

Each round runs benchmarks/decode_probe.py (as benchmarks/run.py does) on every graph in turn; each
graph's speed is divided by the baseline's of the same round (benchmarks/run.py's `paired_ratio`), so
drift of the shared machine between rounds cancels. Prints each graph's median tokens/s and the median, its
bootstrap 95% interval (rounds drawn with replacement), range and share of rounds at or above --target of its
per-round ratio; --json writes the rounds.
Graph directories are those `benchmarks/run.py --keep DIR` leaves (DIR/ROW/model.onnx), or artifacts.
--in-process loads every graph once in this process and times each round's greedy steps there (decode time: the
N steps after the prompt, from the loop's own step timings): steadier on this project's 2-core machines than fresh processes
(2026-12-07: 0.77-1.24 per round against 0.68-1.42), at the cost of one process's allocator and caches shared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import paired_ratio, probe  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graphs", nargs="+", type=Path, help="graph directories; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--target", type=float, action="append", default=[],
                        help="report the share of rounds whose ratio reaches this (repeatable)")
    parser.add_argument("--json", type=Path, help="write every round's figures here")
    parser.add_argument("--in-process", action="store_true", help="time every graph in this process (see above)")
    args = parser.parse_args(argv)
    prompt = list(range(1000, 1000 + args.prompt_tokens))  # ids only set the cost, not the text
    rounds = {g.name: [] for g in args.graphs}
    if args.in_process:
        timers = {graph: step_timer(graph, args.threads) for graph in args.graphs}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        for graph in args.graphs:
            if args.in_process:
                rounds[graph.name].append(timers[graph](prompt, args.new_tokens))
            else:
                rounds[graph.name].append(probe(graph / "model.onnx", prompt, args.new_tokens,
                                                args.threads)["decode_tok_s"])
    baseline = rounds[args.graphs[0].name]
    for name, speeds in rounds.items():
        ratios = [x / y for x, y in zip(speeds, baseline)]
        shares = "".join(f", {sum(q >= t for q in ratios)}/{len(ratios)} rounds >= {t}" for t in args.target)
        low, high = median_interval(ratios)
        print(f"{name:28s} {statistics.median(speeds):6.1f} tok/s  ratio {paired_ratio(speeds, baseline):.3f} "
              f"(95% interval {low:.3f}-{high:.3f}; rounds {min(ratios):.2f}-{max(ratios):.2f}{shares})")
    if args.json:
        record = {"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds}
        args.json.write_text(json.dumps(record, indent=1))
    return 0


def median_interval(ratios: list[float], draws: int = 10000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """A bootstrap interval of the median per-round ratio: the rounds drawn with replacement `draws` times (a target
    such as >= 1.0x is met where the interval is above it, missed where below, and on the line where it straddles)."""
    import numpy as np

    values = np.asarray(ratios, np.float64)
    picks = np.random.default_rng(seed).integers(0, len(values), (draws, len(values)))
    tail = (1 - level) / 2
    low, high = np.quantile(np.median(values[picks], axis=1), [tail, 1 - tail])
    return float(low), float(high)


def step_timer(graph: Path, threads: int):
    """decode_tok_s(prompt, new_tokens) of a graph loaded once: new_tokens greedy steps after the prompt, from
    the token loop's own timing of each step (the prefill is not counted)."""
    from exporter.runtime.generation import OrtDecoder

    decoder = OrtDecoder(graph / "model.onnx", threads=threads)
    decoder.greedy(list(range(1000, 1008)), 4)  # sessions' first runs allocate

    def decode_tok_s(prompt: list[int], new_tokens: int) -> float:
        _, _, timing = decoder.greedy(prompt, new_tokens + 1)
        return new_tokens / sum(timing.step_s)

    return decode_tok_s


if __name__ == "__main__":
    raise SystemExit(main())
