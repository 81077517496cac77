"""report.md and report.html: what a person reads first in an artifact.

report.html is self-contained (images as base64 data URIs, inline CSS, no scripts, nothing fetched):
the rank-per-layer heatmap, a quality-vs-compression plot, the device budget table with pass/fail,
and the sizes on disk. matplotlib (Agg backend) is imported only when a plot is drawn.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import defaultdict
from pathlib import Path

from exporter.artifact.manifest import MANIFEST, Manifest, Method, RankEntry
from exporter.device.cost_model import MB, model_bytes

HTML = "report.html"


def _by_layer(ranks: dict[str, RankEntry]) -> tuple[dict[str, dict[str, RankEntry]], list[str]]:
    """{layer: {projection kind: rank entry}} and the kinds in model order."""
    rows: dict[str, dict[str, RankEntry]] = defaultdict(dict)
    kinds: list[str] = []
    for name, entry in ranks.items():
        head, kind = name.rsplit(".", 1)
        layer = next((p for p in reversed(head.split(".")) if p.isdigit()), head)
        if kind not in kinds:
            kinds.append(kind)
        rows[layer][kind] = entry
    return rows, kinds


def _rank_table(ranks: dict[str, RankEntry]) -> list[str]:
    """One row per layer, one column per projection kind: rank, or 'dense'."""
    entries, kinds = _by_layer(ranks)
    rows = {layer: {k: "dense" if e.rank is None else str(e.rank) for k, e in cells.items()}
            for layer, cells in entries.items()}
    lines = ["| layer | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for layer, cells in rows.items():
        lines.append(f"| {layer} | " + " | ".join(cells.get(k, "") for k in kinds) + " |")
    return lines


def plot_ranks(path: Path, ranks: dict[str, RankEntry], title: str) -> None:
    """Heatmap: layers across, projection kinds down; colour = fraction of parameters kept."""
    import numpy as np

    plt = _pyplot()

    entries, kinds = _by_layer(ranks)
    layers = list(entries)
    kept = np.full((len(kinds), len(layers)), np.nan)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.38 * len(layers) + 2), 0.5 * len(kinds) + 1.6))
    for j, layer in enumerate(layers):
        for i, kind in enumerate(kinds):
            e = entries[layer].get(kind)
            if e is None:
                continue
            rank, out, in_ = e.rank, e.out_features, e.in_features
            kept[i, j] = 1.0 if rank is None else rank * (out + in_) / (out * in_)
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


def write_report(directory: Path, manifest: Manifest) -> None:
    """report.md, ranks.png and report.html in the artifact directory (call it before the manifest's file
    table is computed, so they are listed with their checksums)."""
    directory = Path(directory)
    m, p, par, b = manifest.method, manifest.parameters, manifest.parity, manifest.budget
    profile = manifest.profile
    lines = [
        f"# {manifest.source_model.name} for {profile['name']}",
        "",
        f"Exported by exporter {manifest.exporter_version}: factorization {m.factorization}, "
        f"allocation {m.allocation}, budget from {m.budget_source}.",
        f"Calibration: {m.calibration or 'none needed'}. Weights: {manifest.precision}, activations "
        f"{manifest.onnx.activations or 'fp32'}.",
        f"[{HTML}]({HTML}) shows the same with plots: ranks, quality vs compression, the device budgets.",
        "",
        "## Parameters",
        "",
        "| | dense | exported | removed |",
        "|---|---|---|---|",
        f"| decoder projections | {p.projection_params_dense:,} | {p.projection_params:,} | "
        f"{p.projection_fraction_removed:.1%} |",
        f"| whole model | {p.total_params_dense:,} | {p.total_params:,} | {p.total_fraction_removed:.1%} |",
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
        *_bytes_lines(directory, manifest),
        *_allocation_lines(m),
        *_format_lines(m),
        "## Ranks per layer",
        "",
        "![ranks per layer and projection](ranks.png)",
        "",
        *_rank_table(manifest.ranks),
        "",
        "## Time per stage (s)",
        "",
        ", ".join(f"{k} {v}" for k, v in manifest.timings_s.items()),
        "",
    ]
    (directory / "report.md").write_text("\n".join(lines))
    plot_ranks(directory / "ranks.png", manifest.ranks,
               f"{manifest.source_model.name} for {profile['name']}: rank per layer and projection")
    if m.formats:
        plot_formats(directory / "formats.png", m.formats["units"],
                     f"{manifest.source_model.name} for {profile['name']}: weight bits per layer (--weights auto)")
    page = html_report(directory, manifest, (directory / "ranks.png").read_bytes(), plot_quality(manifest))
    (directory / HTML).write_text(page, encoding="utf-8")


def _layer_of(unit: str) -> str:
    parts = unit.split(".")
    return next((part for part in parts if part.isdigit()), "head")


def _kind_of(unit: str) -> str:
    name = unit.rsplit(".", 1)[-1]
    return name.split("+")[0] if "+" in name else name


def _format_lines(method: Method) -> list[str]:
    """--weights auto: each MatMulNBits' format, and the budget it fits."""
    if not method.formats:
        return []
    f = method.formats
    counts: dict[str, int] = {}
    for unit in f["units"]:
        name = unit["format"] + (" low-rank" if unit.get("rank") else "")
        counts[name] = counts.get(name, 0) + 1
    lines = ["## Weight formats (--weights auto)", "",
             f"{f['chosen_bytes'] / MB:.1f} MB of weights for a budget of {f['budget_bytes'] / MB:.1f} MB (the menu "
             f"spans {f['smallest_bytes'] / MB:.1f} to {f['largest_bytes'] / MB:.1f} MB); predicted loss increase "
             f"{f['predicted_loss_increase']:.4f} nats/token. "
             + ", ".join(f"{n} x {name}" for name, n in sorted(counts.items())) + "."
             + (f" Decode: {c['chosen_ms']:.2f} ms per token in MatMulNBits, within {c['limit_ms']:.2f} ms "
                f"({c['ceiling']:g} x the same weights on {c['reference_format']}, each format's time measured on the "
                "exporting machine)." if (c := f.get("decode_ceiling")) else ""), "",
             "![weight bits per layer](formats.png)", "", "| unit | format | MB | predicted dL |", "|---|---|---|---|"]
    lines += [f"| {u['unit']} | {u['format']} ({u['method']}){f', rank {r}' if (r := u.get('rank')) else ''}"
              f"{f', {h} rows on the first' if (h := u.get('high_rows')) else ''} | "
              f"{u['bytes'] / MB:.2f} | {u['predicted_loss_increase']:.2e} |" for u in f["units"]]
    return lines + [""]


def plot_formats(path: Path, units: list[dict], title: str) -> None:
    """Bits per weight (codes, scales and zero points) of each unit, by layer."""
    plt = _pyplot()
    layers = sorted({_layer_of(u["unit"]) for u in units}, key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else 0))
    kinds = sorted({_kind_of(u["unit"]) for u in units})
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(layers) + 2), 3.6))
    width = 0.8 / max(1, len(kinds))
    for k, kind in enumerate(kinds):
        xs, ys = [], []
        for u in units:
            if _kind_of(u["unit"]) == kind:
                xs.append(layers.index(_layer_of(u["unit"])) + k * width)
                ys.append(8 * u["bytes"] / u["weights"])
        ax.bar(xs, ys, width=width, label=kind)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(layers))], layers, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("bits per weight")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=4)
    path.write_bytes(_png(fig))


def _allocation_lines(method: Method) -> list[str]:
    details = method.allocation_details
    if not details:
        return []
    return [
        "## Allocation",
        "",
        f"Fisher-guided (FLRC): ranks in multiples of {method.rank_multiple} chosen to keep the most "
        f"importance within {details['budget_params']:,} projection parameters; used "
        f"{details['projection_params']:,}. Predicted loss increase (half the Fisher mass of the dropped "
        f"components): {details['predicted_loss_increase']:.4f} nats/token. Search time "
        f"{details['seconds']:.2f} s.",
        "",
        *_curve_lines(method),
    ]


def _curve_lines(method: Method) -> list[str]:
    points = (method.allocation_curve or {}).get("points") or []
    if not points:
        return []
    return [
        "Predicted loss increase of the same allocator at other budgets (plotted in report.html):",
        "",
        "| projection parameters removed | " + " | ".join(f"{c['fraction_removed']:.1%}" for c in points) + " |",
        "|---" * (len(points) + 1) + "|",
        "| nats/token | " + " | ".join(f"{c['predicted_loss_increase']:.4g}" for c in points) + " |",
        "",
    ]


# --------------------------------------------------------------------------- quality vs compression


def _chosen_point(manifest: Manifest) -> tuple[float, float] | None:
    """(fraction of projection parameters removed, predicted loss increase) of the exported allocation."""
    details = manifest.method.allocation_details
    if not details:
        return None
    dense = manifest.parameters.projection_params_dense
    return 1.0 - details["projection_params"] / dense, details["predicted_loss_increase"]


def _level_points(manifest: Manifest) -> list[tuple[str, float, float]]:
    """(level, fraction of projection parameters removed, measured held-out NLL increase over the full level)."""
    levels = [e for e in manifest.levels or [] if e.nll_increase is not None]
    if len(levels) < 2 or levels[0].active_factor_params is None:
        return []
    p = manifest.parameters
    full = levels[0].active_factor_params
    return [(e.name, 1.0 - (p.projection_params - (full - e.active_factor_params)) / p.projection_params_dense,
             e.nll_increase) for e in levels]


def plot_quality(manifest: Manifest) -> bytes | None:
    """PNG: predicted loss increase vs fraction of projection parameters removed (the allocator's curve,
    the export marked), and beside it the rank levels' measured NLL increase; None without a curve."""
    curve = (manifest.method.allocation_curve or {}).get("points") or []
    levels = _level_points(manifest)
    if not curve and not levels:
        return None
    plt = _pyplot()
    panels = 1 + bool(curve and levels)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    if curve:
        xs = [100 * c["fraction_removed"] for c in curve]
        ax.plot(xs, [c["predicted_loss_increase"] for c in curve], "o-", color="tab:blue", ms=4,
                label="Fisher allocation at other budgets (predicted)")
        chosen = _chosen_point(manifest)
        if chosen is not None:
            ax.plot([100 * chosen[0]], [chosen[1]], "*", color="tab:red", ms=14, label="this export")
            ax.annotate(f"{chosen[0]:.1%}, {chosen[1]:.3g} nats", (100 * chosen[0], chosen[1]),
                        textcoords="offset points", xytext=(8, -12), fontsize=8, color="tab:red")
        ax.set_xlabel("projection parameters removed (%)")
        ax.set_ylabel("predicted loss increase (nats/token)")
        ax.set_title("quality vs compression: sum of F_k / 2 over dropped components", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        ax = axes[0][-1]
    if levels:
        xs = [100 * x for _, x, _ in levels]
        ax.plot(xs, [y for _, _, y in levels], "s-", color="tab:green", ms=5)
        for name, x, y in levels:
            ax.annotate(name, (100 * x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("projection parameters removed at the level (%)")
        ax.set_ylabel("measured NLL increase over r100 (nats/token)")
        ax.set_title("rank levels: held-out calibration windows (measured)", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------- report.html


# Where a graph's initializer bytes go, by name (the fused writer's and the quantizers' names; optimum's
# `onnx::MatMul_123` land in "other")
PARTS = (("embedding and lm_head", ("embed_tokens", "lm_head")), ("attention", (".attn.", ".self_attn.", "/attn/")),
         ("MLP", (".mlp.", "/mlp/")), ("rotary tables", ("cos_cache", "sin_cache")),
         ("norms", ("norm",)))


def bytes_by_part(onnx_path: Path) -> dict[str, int]:
    """Initializer bytes of one graph (inline or external) per part of the model: PARTS, then "other"."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    totals = {name: 0 for name, _ in PARTS} | {"other": 0}
    for tensor in onnx.load(str(onnx_path), load_external_data=False).graph.initializer:
        size = ExternalDataInfo(tensor).length if tensor.data_location == onnx.TensorProto.EXTERNAL \
            else len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
        part = next((name for name, keys in PARTS if any(k in tensor.name for k in keys)), "other")
        totals[part] += size or 0
    return {name: size for name, size in totals.items() if size}


def _bytes_lines(directory: Path, manifest: Manifest) -> list[str]:
    parts = bytes_by_part(directory / manifest.onnx.file)
    total = sum(parts.values())
    return ["## Where the weight bytes are", "",
            f"{manifest.onnx.file} and its data, {total / MB:.1f} MB ({manifest.precision} weights):", "",
            "| part | MB | share |", "|---|---|---|",
            *(f"| {name} | {size / MB:.2f} | {size / total:.1%} |" for name, size in parts.items()), ""]


def _file_sizes(directory: Path) -> dict[str, int]:
    return {p.relative_to(directory).as_posix(): p.stat().st_size
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in (MANIFEST, HTML)}


def _predicted(directory: Path, manifest: Manifest, sizes: dict[str, int]) -> dict | str:
    """exporter validate's cost model on the recorded profile, or why it cannot run (the report says so
    rather than failing the export)."""
    try:
        from exporter.device.cost_model import predict
        from exporter.device.profiles import DeviceProfile

        profile = DeviceProfile.from_dict(manifest.profile)
        return predict(directory, manifest, profile, profile.budget.prefill_prompt_tokens, sizes=sizes)
    except Exception as exc:  # noqa: BLE001 - any failure of the estimate is reported in the page
        return f"{type(exc).__name__}: {exc}"


def budget_rows(directory: Path, manifest: Manifest, sizes: dict[str, int]) -> tuple[list[dict], str | None]:
    """One row per device budget (RAM, decode, prefill): the budget, the weights it allows, this export's
    weights against it, and the cost model's prediction against it; plus why a prediction is missing, or
    where the cost model's decode figures come from."""
    b, budget = manifest.budget, manifest.profile["budget"]
    weights = model_bytes(sizes, manifest.onnx.file)
    predicted = _predicted(directory, manifest, sizes)
    missing = predicted if isinstance(predicted, str) else None
    predicted = {} if missing else predicted
    source = predicted.get("decode_costs_source")
    specs = [
        ("ram", "RAM", budget["model_ram_mb"], "MB", b["ram_bytes"], predicted.get("ram_mb")),
        ("decode latency", "decode", budget["decode_ms_per_token"], "ms/token", b["latency_bytes"],
         predicted.get("decode_ms")),
        ("prefill latency", f"prefill ({budget['prefill_prompt_tokens']} tokens)", budget["prefill_ms"], "ms",
         b["prefill_bytes"], predicted.get("prefill_ms")),
    ]
    rows = []
    for key, label, limit, unit, allowed, value in specs:
        rows.append({"budget": label, "limit": limit, "unit": unit, "weights_allowed_bytes": allowed,
                     "binds": b["binding"] == key, "weights_bytes": weights, "weights_fit": weights <= allowed,
                     "predicted": value, "predicted_passed": None if value is None else value <= limit})
    return rows, (f"prediction unavailable: {missing}" if missing else
                  f"decode costs: {source}" if source else None)


def _esc(value) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: list[list], classes: list[list[str]] | None = None) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cells = []
        for j, cell in enumerate(row):
            cls = classes[i][j] if classes else ""
            cells.append(f'<td class="{cls}">{cell}</td>' if cls else f"<td>{cell}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _verdict(passed: bool | None) -> tuple[str, str]:
    if passed is None:
        return "-", ""
    return ("pass", "pass") if passed else ("FAIL", "fail")


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
td.pass { background: #e3f4e3; color: #185c18; font-weight: 600; }
td.fail { background: #fbe0e0; color: #8a1010; font-weight: 600; }
td.binds { font-weight: 600; }
img { max-width: 100%; } .note { color: #555; font-size: 0.88em; }
.summary td { text-align: left; }
"""


def html_report(directory: Path, manifest: Manifest, ranks_png: bytes, quality_png: bytes | None) -> str:
    """report.html's text: self-contained (images as data URIs, inline CSS, no scripts, no links out)."""
    directory = Path(directory)
    m, p, par, profile = manifest.method, manifest.parameters, manifest.parity, manifest.profile
    title = f"{manifest.source_model.name} for {profile['name']}"
    sizes = _file_sizes(directory)
    parity = (f"max |logit difference| {par['max_abs_logit_diff']:.2e} (tolerance {par['atol']}), greedy agreement "
              f"{par['greedy_agreement']:.0%} over {par['decode_steps']} steps: "
              f"<b>{'passed' if par['passed'] else 'FAILED'}</b>")
    if "quantized" in par:
        parity += f"; {manifest.precision} graph: greedy agreement {par['quantized']['greedy_agreement']:.0%}"
    summary = [
        ["exported", f"{_esc(manifest.precision)} weights, {_esc(manifest.onnx.activations or 'fp32')} "
                     f"activations, {_esc(manifest.onnx.graph or '')} graph, "
                     f"exporter {_esc(manifest.exporter_version)}"],
        ["method", f"factorization {_esc(m.factorization)}, allocation {_esc(m.allocation)}, "
                   f"budget from {_esc(m.budget_source)}"],
        ["calibration", _esc(m.calibration or "none needed")],
        ["parameters", f"{p.total_params_dense:,} &rarr; {p.total_params:,} "
                       f"({p.projection_fraction_removed:.1%} of the decoder projections, "
                       f"{p.total_fraction_removed:.1%} of all)"],
        ["ONNX Runtime parity (CPU)", parity],
    ]
    derivation = manifest.schedule_derivation or {}
    if derivation.get("base_nll") is not None:
        summary.append(["held-out NLL", f"{derivation['base_nll']:.4f} nats/token (perplexity "
                                        f"{math.exp(derivation['base_nll']):.2f}) on {_esc(derivation.get('calibration', ''))}"])
    if manifest.schedule:
        summary.append(["progressive schedule", _esc(",".join(f"{e.level}:{e.start}" for e in manifest.schedule))])
    ort = manifest.ort_format
    if ort:
        summary.append(["ORT format", f"{_esc(ort.file)} from {_esc(ort.source)}: max |logit difference| "
                                      f"{ort.check.get('max_abs_logit_diff', float('nan')):.2e} against the .onnx"])
    body = [f"<h1>{_esc(title)}</h1>", f"<p>{_esc(profile['description'])}</p>",
            '<table class="summary">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in summary) + "</table>"]

    body += ["<h2>Ranks per layer</h2>",
             '<p class="note">Colour: fraction of a projection\'s parameters kept; the number is its rank, D a '
             "projection kept dense.</p>", _img(ranks_png, "rank per layer and projection")]

    body.append("<h2>Quality vs compression</h2>")
    if quality_png is not None:
        body.append(_img(quality_png, "predicted loss increase vs fraction of projection parameters removed"))
        curve = (m.allocation_curve or {}).get("points") or []
        if curve:
            body.append('<p class="note">Predicted: the allocator run again at other budgets on the same Fisher '
                        "importances; the loss increase it predicts is half the Fisher mass of the components it "
                        "drops (a second-order estimate, not a measurement). Measured: the rank levels' mean "
                        "next-token NLL increase over the full level on held-out calibration windows.</p>")
            body.append(_table(["projection parameters removed", "predicted loss increase (nats/token)"],
                               [[f"{c['fraction_removed']:.1%}", f"{c['predicted_loss_increase']:.4g}"] for c in curve]))
    else:
        why = ("the model was exported dense: nothing was allocated" if m.allocation == "none" else
               f"the ranks were not chosen from Fisher importances (allocation {_esc(m.allocation)})")
        body.append(f'<p class="note">No curve: {why}, so there is no predicted loss to plot.</p>')

    rows, note = budget_rows(directory, manifest, sizes)
    table, classes = [], []
    for r in rows:
        fit, fit_cls = _verdict(r["weights_fit"])
        pred, pred_cls = _verdict(r["predicted_passed"])
        table.append([_esc(r["budget"]) + (" (binds)" if r["binds"] else ""), f"{r['limit']:g} {_esc(r['unit'])}",
                      f"{r['weights_allowed_bytes'] / MB:,.1f}", f"{r['weights_bytes'] / MB:,.1f}", fit,
                      "-" if r["predicted"] is None else f"{r['predicted']:,.2f} {_esc(r['unit'])}", pred])
        classes.append(["binds" if r["binds"] else "", "", "", "", fit_cls, "", pred_cls])
    b = manifest.budget
    body += ["<h2>Device budget</h2>",
             f"<p>{_esc(profile['name'])}: KV cache at max context {profile['budget']['max_context']} takes "
             f"{b['kv_cache_bytes'] / MB:,.1f} MB; the {_esc(b['binding'])} budget binds (allows the fewest weight "
             f"bytes at {_esc(b['precision'])}).</p>",
             _table(["budget", "limit", "weights may take (MB)", "this export's weights (MB)", "weights fit",
                     "predicted by the cost model", "predicted"], table, classes),
             '<p class="note">Weights: the ONNX graph and its external data as stored. Predicted: the cost model of '
             "<code>exporter validate</code> on the recorded profile (decode from the bytes read per token, prefill "
             "from compute, RAM with the KV cache at max context and the runtime): an estimate, not a measurement. "
             "Measure with <code>exporter validate ARTIFACT</code> on the host or <code>pytest runtime_tests "
             "--artifact ARTIFACT</code> on the device." + (f" {_esc(note[0].upper() + note[1:])}." if note
                                                          else "") + "</p>"]

    parts = bytes_by_part(directory / manifest.onnx.file)
    total = sum(parts.values())
    body += [f"<h2>Where the weight bytes are ({_esc(manifest.onnx.file)})</h2>",
             _table(["part", "MB", "share"], [[_esc(name), f"{size / MB:,.2f}", f"{size / total:.1%}"]
                                              for name, size in parts.items()])]
    body.append("<h2>Sizes on disk</h2>")
    total = sum(sizes.values())
    body.append(_table(["file", "MB", "share"], [[_esc(name), f"{size / MB:,.3f}", f"{size / total:.1%}" if total else "-"]
                                                  for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])]
                       + [["<b>total</b>", f"<b>{total / MB:,.3f}</b>", ""]]))
    body.append(f'<p class="note">Every file but {HTML} itself and {MANIFEST}, which is written last and lists '
                f"the size and sha256 of every other file, {HTML} included.</p>")

    if manifest.levels and len(manifest.levels) > 1:
        body += ["<h2>Rank levels</h2>", _table(
            ["level", "file", "weight bytes read (MB)", "measured NLL increase (nats/token)", "parity"],
            [[_esc(e.name), _esc(e.file), f"{(e.weight_bytes or 0) / MB:,.3f}",
              "-" if e.nll_increase is None else f"{e.nll_increase:.4g}",
              "passed" if (e.parity or {}).get("passed") else "-"] for e in manifest.levels])]
    body += ["<h2>Time per stage (s)</h2>",
             _table(list(manifest.timings_s), [[f"{v:g}" for v in manifest.timings_s.values()]])]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body)
            + "\n</body>\n</html>\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    return buffer.getvalue()
