"""report.md: what a person reads first in an artifact."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

MB = 1_000_000


def _rank_table(ranks: dict) -> list[str]:
    """One row per layer, one column per projection kind: rank, or 'dense'."""
    rows: dict[str, dict[str, str]] = defaultdict(dict)
    kinds: list[str] = []
    for name, entry in ranks.items():
        head, kind = name.rsplit(".", 1)
        parts = head.split(".")
        layer = next((p for p in reversed(parts) if p.isdigit()), head)
        if kind not in kinds:
            kinds.append(kind)
        rows[layer][kind] = "dense" if entry["rank"] is None else str(entry["rank"])
    lines = ["| layer | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for layer, cells in rows.items():
        lines.append(f"| {layer} | " + " | ".join(cells.get(k, "") for k in kinds) + " |")
    return lines


def write_report(path: Path, manifest: dict) -> None:
    m, p, par, b = manifest["method"], manifest["parameters"], manifest["parity"], manifest["budget"]
    profile = manifest["profile"]
    lines = [
        f"# {manifest['source_model']['name']} for {profile['name']}",
        "",
        f"Exported by exporter {manifest['exporter_version']}: {m['factorization']} with {m['allocation']} "
        f"ranks, ratio {m['ratio']:.3f} ({m['ratio_source']}; {m['ratio_meaning']}).",
        f"Calibration: {m['calibration'] or 'none needed'}. Weights: {manifest['precision']}.",
        "",
        "## Parameters",
        "",
        "| | dense | exported | removed |",
        "|---|---|---|---|",
        f"| decoder projections | {p['projection_params_dense']:,} | {p['projection_params']:,} | "
        f"{p['projection_fraction_removed']:.1%} |",
        f"| whole model | {p['total_params_dense']:,} | {p['total_params']:,} | {p['total_fraction_removed']:.1%} |",
        "",
        "## Device budget",
        "",
        f"{profile['description']}: model RAM budget {profile['budget']['model_ram_mb']:.0f} MB, decode "
        f"{profile['budget']['decode_ms_per_token']} ms/token, max context {profile['budget']['max_context']}.",
        f"Weights may take {b['ram_bytes'] / MB:.0f} MB under the RAM budget and {b['latency_bytes'] / MB:.0f} MB "
        f"under the latency budget (KV cache at max context: {b['kv_cache_bytes'] / MB:.0f} MB); the "
        f"{b['binding']} budget binds.",
        "",
        "## ONNX Runtime parity (CPU provider)",
        "",
        f"Prefill of {par['prompt_tokens']} tokens, then {par['decode_steps']} decode steps on PyTorch's greedy tokens: "
        f"max |logit difference| {par['max_abs_logit_diff']:.2e} (tolerance {par['atol']}), greedy agreement "
        f"{par['greedy_agreement']:.0%} — **{'passed' if par['passed'] else 'FAILED'}**.",
        "",
        "## Ranks per layer",
        "",
        *_rank_table(manifest["ranks"]),
        "",
        "## Time per stage (s)",
        "",
        ", ".join(f"{k} {v}" for k, v in manifest["timings_s"].items()),
        "",
    ]
    Path(path).write_text("\n".join(lines))
