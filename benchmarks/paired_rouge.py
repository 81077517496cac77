"""Summaries of two artifacts compared article by article: the ratio of their mean ROUGE with a paired bootstrap
interval (100 CNN/DailyMail articles spread a mean by several hundredths; the same articles drawn for both).

    exporter evaluate DENSE --task summarization --data ARTICLES --limit 100 --threads 2 --json > dense.json
    exporter evaluate ART --task summarization --data ARTICLES --limit 100 --threads 2 --json > art.json
    python benchmarks/paired_rouge.py dense.json art.json [more.json ...] [--metric rougeL] [--target 0.85]

Prints a Markdown table: each artifact's mean, its ratio to the reference's, the 95% interval of that ratio and,
with --target, the share of bootstrap draws at or above it. Runs over consecutive slices of the articles (say the
first 100, then the next 300 from another file) join with commas, `dense-a.json,dense-b.json`, the same slices for
every artifact: the articles of all of them, in that order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.errors import ExporterError  # noqa: E402
from exporter.runtime.evaluate import bootstrap_ratio  # noqa: E402

METRICS = ("rouge1", "rouge2", "rougeL")


def read(path: Path) -> dict:
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExporterError(f"{path}: {exc}") from None
    if not isinstance(result, dict) or result.get("task") != "summarization" or "per_example" not in result:
        raise ExporterError(f"{path}: not the JSON of `exporter evaluate --task summarization --json` "
                            "with per-example scores")
    return result


def read_runs(argument: str) -> dict:
    """One artifact's summaries from a run's JSON, or from runs over consecutive slices joined with commas:
    {"artifact", "slices": [(examples, mean prompt tokens) per run], "per_example", and each metric's mean}."""
    runs = [read(Path(path)) for path in argument.split(",")]
    artifacts = sorted({run["artifact"] for run in runs})
    if len(artifacts) > 1:
        raise ExporterError(f"{argument}: runs of different artifacts ({', '.join(artifacts)})")
    joined = {"artifact": artifacts[0], "slices": [(run["examples"], run["mean_prompt_tokens"]) for run in runs],
              "per_example": {metric: [score for run in runs for score in run["per_example"][metric]]
                              for metric in METRICS}}
    for metric, scores in joined["per_example"].items():
        joined[metric] = sum(scores) / len(scores)
    return joined


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", help="the reference's JSON (the dense artifact's; runs joined with commas)")
    parser.add_argument("others", nargs="+", help="the compared artifacts' JSON")
    parser.add_argument("--metric", choices=METRICS, default="rougeL")
    parser.add_argument("--target", type=float, help="a ratio to count the draws at or above")
    parser.add_argument("--draws", type=int, default=10000)
    args = parser.parse_args(argv)
    try:
        reference = read_runs(args.reference)
        rows = []
        for path in args.others:
            other = read_runs(path)
            if other["slices"] != reference["slices"]:
                raise ExporterError(f"{path}: other articles than {args.reference} (examples and mean prompt tokens "
                                    f"per run: {other['slices']} against {reference['slices']})")
            found = bootstrap_ratio(reference["per_example"][args.metric], other["per_example"][args.metric],
                                 args.draws, target=args.target)
            rows.append((other["artifact"], other[args.metric], found))
    except ExporterError as exc:
        print(f"paired_rouge: {exc}", file=sys.stderr)
        return 2
    target = f" | draws >= {args.target}" if args.target is not None else ""
    print(f"| artifact | {args.metric} | / reference ({reference[args.metric]:.4f}) | 95% interval{target} |")
    print("|---|---|---|---|" + ("---|" if target else ""))
    for name, mean, found in rows:
        share = f" | {found['at_least_target']:.1%}" if target else ""
        print(f"| {name} | {mean:.4f} | {found['ratio']:.3f} | {found['low']:.3f}-{found['high']:.3f}{share} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
