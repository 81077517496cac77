"""report.md: what a person reads first in an artifact."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .budget import MB



def _by_layer(ranks: dict) -> tuple[dict[str, dict[str, dict]], list[str]]:
    """{layer: {projection kind: rank entry}} and the kinds in model order."""
    rows: dict[str, dict[str, dict]] = defaultdict(dict)
    kinds: list[str] = []
    for name, entry in ranks.items():
        head, kind = name.rsplit(".", 1)
        layer = next((p for p in reversed(head.split(".")) if p.isdigit()), head)
        if kind not in kinds:
            kinds.append(kind)
        rows[layer][kind] = entry
    return rows, kinds


def _rank_table(ranks: dict) -> list[str]:
    """One row per layer, one column per projection kind: rank, or 'dense'."""
    entries, kinds = _by_layer(ranks)
    rows = {layer: {k: "dense" if e["rank"] is None else str(e["rank"]) for k, e in cells.items()}
            for layer, cells in entries.items()}
    lines = ["| layer | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for layer, cells in rows.items():
        lines.append(f"| {layer} | " + " | ".join(cells.get(k, "") for k in kinds) + " |")
    return lines


def plot_ranks(path: Path, ranks: dict, title: str) -> None:
    """Heatmap: layers across, projection kinds down; colour = fraction of parameters kept."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    entries, kinds = _by_layer(ranks)
    layers = list(entries)
    kept = np.full((len(kinds), len(layers)), np.nan)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.38 * len(layers) + 2), 0.5 * len(kinds) + 1.6))
    for j, layer in enumerate(layers):
        for i, kind in enumerate(kinds):
            e = entries[layer].get(kind)
            if e is None:
                continue
            rank = e["rank"]
            kept[i, j] = 1.0 if rank is None else rank * (e["out"] + e["in"]) / (e["out"] * e["in"])
            ax.text(j, i, "D" if rank is None else str(rank), ha="center", va="center", fontsize=6)
    image = ax.imshow(kept, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(layers)), layers, fontsize=7)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="parameters kept (D: dense)", fraction=0.03, pad=0.01)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_report(directory: Path, manifest: dict) -> None:
    """report.md plus ranks.png in the artifact directory."""
    directory = Path(directory)
    m, p, par, b = manifest["method"], manifest["parameters"], manifest["parity"], manifest["budget"]
    profile = manifest["profile"]
    lines = [
        f"# {manifest['source_model']['name']} for {profile['name']}",
        "",
        f"Exported by exporter {manifest['exporter_version']}: factorization {m['factorization']}, "
        f"allocation {m['allocation']}, budget from {m['budget_source']}.",
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
        f"Weights may take {b['ram_bytes'] / MB:.0f} MB under the RAM budget, {b['latency_bytes'] / MB:.0f} MB "
        f"under the decode latency budget and {b['prefill_bytes'] / MB:.0f} MB under the prefill budget "
        f"(KV cache at max context: {b['kv_cache_bytes'] / MB:.0f} MB); the {b['binding']} budget binds.",
        "",
        "## ONNX Runtime parity (CPU provider)",
        "",
        f"Prefill of {par['prompt_tokens']} tokens, then {par['decode_steps']} decode steps on PyTorch's greedy tokens: "
        f"max |logit difference| {par['max_abs_logit_diff']:.2e} (tolerance {par['atol']}), greedy agreement "
        f"{par['greedy_agreement']:.0%} — **{'passed' if par['passed'] else 'FAILED'}**.",
        "",
        *_allocation_lines(m),
        "## Ranks per layer",
        "",
        "![ranks per layer and projection](ranks.png)",
        "",
        *_rank_table(manifest["ranks"]),
        "",
        "## Time per stage (s)",
        "",
        ", ".join(f"{k} {v}" for k, v in manifest["timings_s"].items()),
        "",
    ]
    (directory / "report.md").write_text("\n".join(lines))
    plot_ranks(directory / "ranks.png", manifest["ranks"],
               f"{manifest['source_model']['name']} for {profile['name']}: rank per layer and projection")


def _allocation_lines(method: dict) -> list[str]:
    details = method.get("allocation_details")
    if not details:
        return []
    return [
        "## Allocation",
        "",
        f"Fisher-guided (FLRC): ranks in multiples of {method['rank_multiple']} chosen to keep the most "
        f"importance within {details['budget_params']:,} projection parameters; used "
        f"{details['projection_params']:,}. Predicted loss increase (half the Fisher mass of the dropped "
        f"components): {details['predicted_loss_increase']:.4f} nats/token. Search time "
        f"{details['seconds']:.2f} s.",
        "",
    ]
