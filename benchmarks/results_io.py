"""Where the benchmark scripts keep their figures: benchmarks/results/NAME-YYYYmmdd-HHMMSS.{json,md}."""

from __future__ import annotations

import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def publish_results(name: str, result: dict, summary: str | None = None) -> None:
    """Print the Markdown `summary`, where given, and write it with `result` as JSON under one timestamp,
    so that the pair is found together."""
    if summary is not None:
        print(summary)  # first: a failed write after a long run still leaves the figures on stdout
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if summary is not None:
        (RESULTS / f"{name}-{stamp}.md").write_text(summary + "\n")
    (RESULTS / f"{name}-{stamp}.json").write_text(json.dumps(result, indent=1) + "\n")
