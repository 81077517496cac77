"""`exporter validate`: an artifact's speed, memory and accuracy against its device profile's budgets.

On a measured profile (`host`) latency and memory are measured in a fresh process that imports only
onnxruntime and numpy (so its peak RSS is the model's, not torch's); the cost model of
exporter.device.cost_model predicts them too, and the two are compared (with the machine's load, measured
before and after, as a factor). For any other device they are predicted and marked so. Accuracy
(perplexity, summarization ROUGE, agreement with the PyTorch model) is always measured here, through
ONNX Runtime. `--report DIR` writes validation.md and latency.png there.

This module imports no torch at the top: `python -m exporter.validate MODEL PROMPT NEW` is the probe.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from exporter.artifact.manifest import MANIFEST, Manifest, read_manifest, sha256_file
from exporter.console import say
from exporter.device.cost_model import predict
from exporter.errors import ExporterError

EXIT_BUDGET_FAILED = 4
DECODE_TOKENS = 64
PPL_WINDOW = 512
REFERENCE_STEPS = 16
COST_MODEL_TARGET = 0.2  # predicted decode latency within +-20% of the measured one
LOAD_NODES = 64  # MatMulNBits nodes of load_gauge's graph
LOAD_WINDOW_S = 0.3  # each load_gauge measurement, before and after the probe
SUMMARY_NEW_TOKENS = 96  # summary length cap of the ROUGE check (exporter evaluate's default)


@dataclass
class BudgetCheck:
    figure: str
    value: float
    budget: float
    unit: str
    source: str  # measured | predicted

    @property
    def passed(self) -> bool:
        return self.value <= self.budget

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def verify_files(artifact: Path, manifest: Manifest) -> None:
    """Every file of the manifest's table present with its size and sha256; raises naming the first bad one."""
    if not manifest.files:
        raise ExporterError(f"{artifact}/{MANIFEST} has no file table")
    for name, entry in sorted(manifest.files.items()):
        path = artifact / name
        if not path.is_file():
            raise ExporterError(f"{artifact}: {name} is listed in the manifest but missing")
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            raise ExporterError(f"{artifact}: {name} does not match the manifest (size or sha256 differs)")


def artifact_profile(manifest: Manifest, device: str | None):
    """--device, else the profile recorded in the manifest (a measured one is re-measured here)."""
    from exporter.device.profiles import DeviceProfile, load_profile

    recorded = manifest.profile
    if device is not None:
        return load_profile(device)
    if recorded.get("measured"):
        return load_profile(recorded["path"] if Path(recorded["path"]).is_file() else recorded["name"])
    return DeviceProfile.from_dict({**recorded, "measured": False})


@contextlib.contextmanager
def load_gauge():
    """Yields measure(): how much slower ONNX Runtime runs on this machine now than at its best.

    The graph: LOAD_NODES MatMulNBits nodes alternating 576 <-> 1536 (int4, 35 MB of weights, beyond
    the caches as a decode step's are), default threads as the probe uses; measure() runs it back to
    back for LOAD_WINDOW_S: factor = mean time per run / fastest run. A decode step lasts many such
    runs, so its typical time is their mean: on an idle machine the factor is about 1, on a shared one
    it grows with the share of the CPU that other processes take. Independent of the artifact."""
    import tempfile

    from exporter.device.host_probes import int4_chain, probe_session

    with tempfile.TemporaryDirectory(prefix="exporter-load-") as folder:
        nodes, weights = int4_chain(LOAD_NODES, (576, 1536))
        session = probe_session(folder, nodes, 576, 576, (), weights)
        del weights
        feed = {"x": np.ones((1, 576), np.float32)}
        session.run(None, feed)

        def measure() -> dict:
            times, start = [], time.perf_counter()
            while time.perf_counter() - start < LOAD_WINDOW_S or len(times) < 3:
                t = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - t)
            wall = time.perf_counter() - start
            return {"factor": wall / len(times) / min(times), "runs": len(times), "best_ms": min(times) * 1e3,
                    "mean_ms": wall / len(times) * 1e3, "loadavg_1min": os.getloadavg()[0]}

        yield measure
        session = None  # released before the folder goes (measure() may still be referenced)


def measure(model_path: Path, prompt_tokens: int, new_tokens: int = DECODE_TOKENS) -> dict:
    """Run the probe below in a fresh process and return its figures."""
    from exporter.device.host_probes import run_apart

    return run_apart("exporter.validate", str(model_path), str(prompt_tokens), str(new_tokens),
                     failure=f"cannot run {model_path.name} in ONNX Runtime")


def _probe(model_path: str, prompt_tokens: int, new_tokens: int) -> dict:
    """Load, time to first token (cold prefill), warm prefill (median of 3), `new_tokens` decode steps."""
    from exporter.runtime.generation import OrtDecoder

    start = time.perf_counter()
    decoder = OrtDecoder(model_path)
    load_s = time.perf_counter() - start
    config = json.loads((Path(model_path).parent / "config.json").read_text())
    prompt_tokens = min(prompt_tokens, (decoder.max_context or 1 << 30) - new_tokens)  # the rotary tables' end
    prompt = np.random.default_rng(0).integers(0, config["vocab_size"], (1, prompt_tokens))

    def prefill():
        start = time.perf_counter()
        logits, cache = decoder.step(prompt, decoder.empty_cache(1))
        token = int(np.argmax(logits[0, -1]))
        return (time.perf_counter() - start) * 1e3, token, cache

    ttft_ms = prefill()[0]
    runs = [prefill() for _ in range(3)]
    _, token, cache = runs[-1]
    steps = []
    for _ in range(new_tokens):
        start = time.perf_counter()
        logits, cache = decoder.step(np.array([[token]]), cache)
        token = int(np.argmax(logits[0, -1]))
        steps.append((time.perf_counter() - start) * 1e3)
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "load_s": load_s, "ttft_ms": ttft_ms,
            "prefill_ms": float(np.median([r[0] for r in runs])),
            "decode_ms_p50": float(np.percentile(steps, 50)), "decode_ms_p95": float(np.percentile(steps, 95)),
            "decode_ms_steps": steps, "peak_rss_mb": _peak_rss_mb(), "imports_torch": "torch" in sys.modules}


def _peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM on Linux, ru_maxrss (bytes) on macOS."""
    status = Path("/proc/self/status")
    if status.is_file():
        return next(int(line.split()[1]) * 1024 / 1e6 for line in status.read_text().splitlines()
                    if line.startswith("VmHWM:"))
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _text_windows(artifact: Path, text: Path, windows: int):
    from transformers import AutoTokenizer

    from exporter.runtime.evaluate import text_windows

    if not text.is_file():
        raise ExporterError(f"text file not found: {text}")
    config = json.loads((artifact / "config.json").read_text())
    window = min(PPL_WINDOW, config.get("max_position_embeddings", PPL_WINDOW))
    tokenizer = AutoTokenizer.from_pretrained(artifact, local_files_only=True)
    ids = text_windows(tokenizer, text, window, windows)
    if ids.shape[0] < windows:
        raise ExporterError(f"{text} is too short: it gives {ids.shape[0]} windows of {window} tokens, "
                            f"--windows asks for {windows}")
    return ids


def _reference(manifest: Manifest, model_path: Path, prompts: list[list[int]]) -> dict:
    """Greedy agreement and max logit error of the graph against the source model (PyTorch)."""
    from exporter.graph.optimum_export import check_parity
    from exporter.source.model import load_model, resolve_model

    source = manifest.source_model.path
    try:
        model, _ = load_model(resolve_model(source))
    except ExporterError as exc:
        return {"skipped": f"reference model not loadable: {exc}"}
    reports = [check_parity(model, model_path, ids, REFERENCE_STEPS, atol=math.inf, min_agreement=0.0,
                            raise_on_fail=False) for ids in prompts]
    return {"model": source, "prompts": len(prompts), "steps": REFERENCE_STEPS,
            "greedy_agreement": float(np.mean([r.greedy_agreement for r in reports])),
            "max_abs_logit_diff": max(r.max_abs_logit_diff for r in reports)}


def check_report_dir(report: Path, artifact: Path) -> Path:
    """--report DIR: a directory outside the artifact (whose manifest lists every file's sha256)."""
    report = Path(report)
    inside = report.resolve() == artifact.resolve() or artifact.resolve() in report.resolve().parents
    if inside:
        raise ExporterError(f"--report {report} is inside the artifact {artifact}; its manifest lists every file's "
                            f"sha256, so write the report elsewhere")
    if report.exists() and not report.is_dir():
        raise ExporterError(f"--report {report} exists and is not a directory")
    return report


def _summarization(artifact: Path, examples: list[dict], progress: bool) -> dict:
    """ROUGE of greedy summaries through ONNX Runtime (exporter.runtime.evaluate), at the artifact's schedule."""
    from exporter.runtime.evaluate import evaluate_summarization
    from exporter.runtime.generation import Runtime

    runtime = Runtime(artifact)
    runtime.require_tokenizer()
    chat = runtime.chat_template is not None
    result = evaluate_summarization(runtime, examples, runtime.schedule, SUMMARY_NEW_TOKENS, chat=chat,
                                    progress=progress)
    return {key: result[key] for key in ("examples", "rouge1", "rouge2", "rougeL", "schedule", "mean_prompt_tokens",
                                         "truncated_articles", "mean_generated_tokens", "max_new_tokens",
                                         "chat_template")}


def validate(artifact: Path, device: str | None = None, text: Path | None = None, windows: int = 8,
             progress: bool = True, summaries: Path | None = None, summary_examples: int = 20,
             report: Path | None = None) -> dict:
    """Every figure, and the budget checks; raises ExporterError on bad input before measuring.
    `report`: also write report/validation.md and report/latency.png (write_report)."""
    from exporter.artifact.golden import GOLDEN

    artifact = Path(artifact)
    if not artifact.is_dir():
        raise ExporterError(f"{artifact} is not an artifact directory")
    manifest = read_manifest(artifact)
    try:
        verify_files(artifact, manifest)
        profile = artifact_profile(manifest, device)
        model_path = artifact / manifest.onnx.file
    except (KeyError, TypeError, AttributeError) as exc:  # the recorded profile, a dict of its own
        raise ExporterError(f"{artifact}/{MANIFEST} is malformed ({type(exc).__name__}: {exc})") from None
    if report is not None:
        report = check_report_dir(report, artifact)
    windows_ids = _text_windows(artifact, Path(text), windows) if text is not None else None
    examples = None
    if summaries is not None:
        from exporter.runtime.evaluate import read_articles

        examples = read_articles(summaries, summary_examples)
        if not (artifact / "tokenizer.json").is_file():
            raise ExporterError(f"{artifact} has no tokenizer.json: --summaries needs one")
    prompt_tokens = profile.budget.prefill_prompt_tokens
    budget = profile.budget
    mode = "measured" if profile.measured else "predicted"

    say(f"cost model for {profile.name}")
    predicted = predict(artifact, manifest, profile, prompt_tokens)
    performance = {"artifact_mb": sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file()) / 1e6}
    cost_model = None
    if profile.measured:
        say(f"measuring {model_path.name} in ONNX Runtime: prefill of {prompt_tokens} tokens, "
            f"{DECODE_TOKENS} decode steps, in a fresh process (and this machine's load before and after)")
        with load_gauge() as gauge:
            before = gauge()
            measured = measure(model_path, prompt_tokens)
            after = gauge()
        performance.update(measured)
        load = {"factor": (before["factor"] + after["factor"]) / 2, "before": before, "after": after}
        under_load = predicted["decode_ms"] * load["factor"]
        ratio = under_load / measured["decode_ms_p50"]
        cost_model = {"predicted_decode_ms": predicted["decode_ms"], "decode_terms": predicted["decode_terms"],
                      "load_factor": load["factor"], "load": load, "predicted_decode_ms_under_load": under_load,
                      "measured_decode_ms_p50": measured["decode_ms_p50"], "ratio": ratio,
                      "ratio_idle_model": predicted["decode_ms"] / measured["decode_ms_p50"],
                      "within_target": abs(ratio - 1.0) <= COST_MODEL_TARGET,
                      "predicted_prefill_ms": predicted["prefill_ms"], "measured_prefill_ms": measured["prefill_ms"]}
        checks = [BudgetCheck("peak RSS", measured["peak_rss_mb"], budget.model_ram_mb, "MB", mode),
                  BudgetCheck("decode p95", measured["decode_ms_p95"], budget.decode_ms_per_token, "ms/token", mode),
                  BudgetCheck(f"prefill ({measured['prompt_tokens']} tokens)", measured["prefill_ms"],
                              budget.prefill_ms, "ms", mode)]
    else:
        performance.update({"prompt_tokens": prompt_tokens, "ttft_ms": predicted["prefill_ms"],
                            "prefill_ms": predicted["prefill_ms"], "decode_ms_p50": predicted["decode_ms"],
                            "decode_ms_p95": predicted["decode_ms"], "peak_rss_mb": predicted["ram_mb"]})
        checks = [BudgetCheck("RAM", predicted["ram_mb"], budget.model_ram_mb, "MB", mode),
                  BudgetCheck("decode", predicted["decode_ms"], budget.decode_ms_per_token, "ms/token", mode),
                  BudgetCheck(f"prefill ({prompt_tokens} tokens)", predicted["prefill_ms"], budget.prefill_ms, "ms", mode)]

    accuracy = {}
    if windows_ids is not None:
        from exporter.runtime.evaluate import ort_perplexity
        from exporter.runtime.generation import OrtDecoder

        accuracy["perplexity"] = ort_perplexity(OrtDecoder(model_path), windows_ids, progress=progress)
        accuracy["perplexity_text"] = f"{windows_ids.shape[0]} x {windows_ids.shape[1]} tokens of {text}"
    else:
        accuracy["perplexity"] = None
        accuracy["perplexity_text"] = "skipped (no --text)"
    if examples is not None:
        say(f"summarizing {len(examples)} articles of {summaries} through ONNX Runtime for ROUGE")
        accuracy["summarization"] = {"data": str(summaries), **_summarization(artifact, examples, progress),
                                     "budget": "none (no ROUGE threshold in the profile or manifest): reported only"}
    else:
        accuracy["summarization"] = {"skipped": "no --summaries"}
    golden_path = artifact / GOLDEN
    if golden_path.is_file():
        say(f"comparing with the PyTorch reference {manifest.source_model.path}")
        prompts = [case["prompt_ids"] for case in json.loads(golden_path.read_text())["cases"]]
        accuracy["reference"] = _reference(manifest, model_path, prompts)
    else:
        accuracy["reference"] = {"skipped": f"no {GOLDEN} in the artifact (its prompts are the reference's)"}
    result = {"artifact": str(artifact), "device": profile.name, "mode": mode, "precision": manifest.precision,
              "decode_budget_ms": budget.decode_ms_per_token,
              "performance": performance, "predicted": predicted, "cost_model": cost_model, "accuracy": accuracy,
              "budgets": [c.to_dict() for c in checks], "passed": all(c.passed for c in checks)}
    if report is not None:
        result["report"] = write_report(result, report)
    return result


def _terms_text(terms: dict) -> str:
    return (f"bandwidth {terms['bandwidth_ms']:.2f} + overhead {terms['overhead_ms']:.2f} + "
            f"dequant {terms['dequant_ms']:.2f} ms")


def format_result(result: dict) -> str:
    perf, acc, cost, pred = result["performance"], result["accuracy"], result["cost_model"], result["predicted"]
    how = ("latency and memory measured on this machine" if result["mode"] == "measured" else
           "latency and memory PREDICTED by the cost model, not measured; accuracy measured on this machine")
    lines = [f"validate {result['artifact']} for {result['device']}, weights {result['precision']}: {how}", ""]
    if result["mode"] == "measured":
        lines.append(f"time to first token   {perf['ttft_ms']:9.1f} ms (cold prefill of {perf['prompt_tokens']} "
                     f"tokens after a {perf['load_s']:.2f} s load)")
    lines += [f"decode p50            {perf['decode_ms_p50']:9.2f} ms/token" + (" (predicted)" if cost is None else ""),
              f"artifact size         {perf['artifact_mb']:9.1f} MB", "",
              f"{'budget':22} {'value':>9} {'limit':>9}  {'unit':9} {'source':10} result"]
    for c in result["budgets"]:
        lines.append(f"{c['figure']:22} {c['value']:9.2f} {c['budget']:9g}  {c['unit']:9} {c['source']:10} "
                     f"{'pass' if c['passed'] else 'FAIL'}")
    lines += ["", f"cost model: decode {pred['decode_ms']:.2f} ms/token = {_terms_text(pred['decode_terms'])} "
              f"({pred['bytes_per_token'] / 1e6:.1f} MB at {pred['decode_bandwidth_gbs']:.1f} GB/s; {pred['graph_nodes']} "
              f"nodes x {pred['node_us']:.2f} us; "
              + ", ".join(f"{n / 1e6:.1f}M {p} weights x {pred['dequant_ns_per_param'][p]:.4f} ns"
                          + (f" (int4 streams at {pred['int4_stream_gbs']:.1f} GB/s)" if p == "int4" else "")
                          for p, n in pred["quantized_params"].items() if n)
              + ("" if any(pred["quantized_params"].values()) else "no quantized weights") + ")",
              f"  figures: {pred['decode_costs_source']}"]
    if cost:
        lines += [f"  on this host: x {cost['load_factor']:.2f} for the machine's load now (ONNX Runtime runs this much "
                  f"slower than at their best) = {cost['predicted_decode_ms_under_load']:.2f} ms vs measured p50 "
                  f"{cost['measured_decode_ms_p50']:.2f}: ratio {cost['ratio']:.2f} (target 1 +- {COST_MODEL_TARGET:.0%}: "
                  f"{'within' if cost['within_target'] else 'OUTSIDE'}; without the load factor "
                  f"{cost['ratio_idle_model']:.2f})",
                  f"  prefill predicted {cost['predicted_prefill_ms']:.1f} ms vs measured {cost['measured_prefill_ms']:.1f}"]
    lines.append("")
    ppl = acc["perplexity"]
    lines.append(f"perplexity            {acc['perplexity_text'] if ppl is None else f'{ppl:.2f} on ' + acc['perplexity_text']}")
    lines.append("summarization         " + _summary_text(acc["summarization"]))
    ref = acc["reference"]
    lines.append("vs PyTorch reference  " + (ref["skipped"] if "skipped" in ref else
                 f"greedy agreement {ref['greedy_agreement']:.0%}, max |logit diff| {ref['max_abs_logit_diff']:.3g} "
                 f"({ref['prompts']} prompts x {ref['steps']} steps; {ref['model']}, before compression)"))
    failed = [c["figure"] for c in result["budgets"] if not c["passed"]]
    lines += ["", f"budgets: {len(result['budgets']) - len(failed)} passed, {len(failed)} failed"
              + (f" ({', '.join(failed)})" if failed else "")]
    if "report" in result:
        lines.append(f"report: {result['report']['markdown']}, {result['report']['plot']}")
    return "\n".join(lines)


def _summary_text(summary: dict) -> str:
    if "skipped" in summary:
        return f"skipped ({summary['skipped']})"
    return (f"ROUGE-L F1 {summary['rougeL']:.4f} (ROUGE-1 {summary['rouge1']:.4f}, ROUGE-2 {summary['rouge2']:.4f}) "
            f"on {summary['examples']} articles of {summary['data']}, summaries of at most {summary['max_new_tokens']} "
            f"tokens; no ROUGE budget")


# --------------------------------------------------------------------------- --report DIR


def _plot_latency(result: dict, path: Path) -> None:
    """Latency per decode step against the decode budget, p50 and p95 marked (predicted: one line)."""
    try:
        import matplotlib
    except ImportError:
        raise ExporterError("--report needs matplotlib for latency.png (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    perf, budget = result["performance"], result["decode_budget_ms"]
    figure, axes = plt.subplots(figsize=(8, 4.5))
    steps = perf.get("decode_ms_steps")
    if steps:
        axes.plot(range(1, len(steps) + 1), steps, marker=".", linewidth=1, label="measured, per step")
        axes.axhline(perf["decode_ms_p50"], color="tab:green", linestyle="--", linewidth=1,
                     label=f"p50 {perf['decode_ms_p50']:.2f} ms")
        axes.axhline(perf["decode_ms_p95"], color="tab:orange", linestyle="--", linewidth=1,
                     label=f"p95 {perf['decode_ms_p95']:.2f} ms")
        cost = result["cost_model"]
        if cost:
            axes.axhline(cost["predicted_decode_ms_under_load"], color="tab:purple", linestyle=":", linewidth=1,
                         label=f"cost model x load {cost['predicted_decode_ms_under_load']:.2f} ms")
        axes.set_xlim(0, len(steps) + 1)
        title = f"decode latency per step on {result['device']} (measured, {perf['prompt_tokens']}-token prompt)"
    else:
        axes.axhline(perf["decode_ms_p50"], color="tab:blue", linewidth=2,
                     label=f"predicted {perf['decode_ms_p50']:.2f} ms (cost model, not measured)")
        title = f"decode latency on {result['device']}: PREDICTED, not measured"
    axes.axhline(budget, color="tab:red", linewidth=2, label=f"budget {budget:g} ms/token")
    axes.set_ylim(0, max([budget, perf["decode_ms_p95"], *(steps or [])]) * 1.35)  # room for the legend
    axes.set_xlabel("decode step")
    axes.set_ylabel("ms per token")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, loc="upper left", ncol=3)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def format_markdown(result: dict) -> str:
    perf, acc, cost, pred = result["performance"], result["accuracy"], result["cost_model"], result["predicted"]
    how = ("latency and memory **measured** on this machine" if result["mode"] == "measured" else
           "latency and memory **predicted** by the cost model, not measured; accuracy measured on this machine")
    failed = [c for c in result["budgets"] if not c["passed"]]
    lines = [f"# Validation of `{result['artifact']}`", "",
             f"Device profile `{result['device']}`, weights {result['precision']}: {how}.", "",
             f"**{'PASS' if result['passed'] else 'FAIL'}**: {len(result['budgets']) - len(failed)} of "
             f"{len(result['budgets'])} budgets pass.", "",
             "| budget | value | limit | unit | source | result |", "|---|---:|---:|---|---|---|"]
    lines += [f"| {c['figure']} | {c['value']:.2f} | {c['budget']:g} | {c['unit']} | {c['source']} | "
              f"{'pass' if c['passed'] else '**FAIL**'} |" for c in result["budgets"]]
    lines += ["", "![decode latency per step](latency.png)", "", "## Latency and memory", ""]
    if result["mode"] == "measured":
        lines += [f"- time to first token: {perf['ttft_ms']:.1f} ms (cold prefill of {perf['prompt_tokens']} tokens "
                  f"after a {perf['load_s']:.2f} s load); prefill {perf['prefill_ms']:.1f} ms",
                  f"- decode: p50 {perf['decode_ms_p50']:.2f}, p95 {perf['decode_ms_p95']:.2f} ms/token over "
                  f"{perf['new_tokens']} steps (budget {result['decode_budget_ms']:g})",
                  f"- peak RSS {perf['peak_rss_mb']:.0f} MB (a process with onnxruntime and numpy only)"]
    else:
        lines += [f"- decode {perf['decode_ms_p50']:.2f} ms/token, prefill {perf['prefill_ms']:.1f} ms for "
                  f"{perf['prompt_tokens']} tokens, RAM {perf['peak_rss_mb']:.0f} MB: all predicted"]
    lines += [f"- artifact size {perf['artifact_mb']:.1f} MB", "", "## Cost model", "",
              f"decode = bytes / bandwidth + nodes x per-node cost + quantized weights x dequantisation cost "
              f"= {_terms_text(pred['decode_terms'])} = **{pred['decode_ms']:.2f} ms/token**", "",
              "| term | figure |", "|---|---|",
              f"| bytes read per token | {pred['bytes_per_token'] / 1e6:.1f} MB at {pred['decode_bandwidth_gbs']:.2f} GB/s |",
              f"| graph nodes | {pred['graph_nodes']} x {pred['node_us']:.3f} us |",
              *(f"| {p} weights | {n / 1e6:.2f}M x {pred['dequant_ns_per_param'][p]:.5f} ns"
                + (f" (int4 streams at {pred['int4_stream_gbs']:.2f} GB/s in all) |" if p == "int4" else " |")
                for p, n in pred["quantized_params"].items() if n),
              f"| source of the figures | {pred['decode_costs_source']} |"]
    if cost:
        load = cost["load"]
        lines += ["", f"On this host the machine's load multiplies it by {cost['load_factor']:.2f} (ONNX Runtime runs of a "
                  f"synthetic graph took {load['before']['mean_ms']:.2f} / {load['after']['mean_ms']:.2f} ms on average "
                  f"before / after the measurement, at best {load['before']['best_ms']:.2f} / {load['after']['best_ms']:.2f} "
                  f"ms): {cost['predicted_decode_ms_under_load']:.2f} ms vs measured p50 "
                  f"{cost['measured_decode_ms_p50']:.2f} ms, ratio **{cost['ratio']:.2f}** (target 1 +- "
                  f"{COST_MODEL_TARGET:.0%}: {'within' if cost['within_target'] else 'outside'}); without the load factor "
                  f"{cost['ratio_idle_model']:.2f}. Prefill: predicted {cost['predicted_prefill_ms']:.1f} ms, measured "
                  f"{cost['measured_prefill_ms']:.1f} ms."]
    ppl, ref = acc["perplexity"], acc["reference"]
    lines += ["", "## Accuracy (ONNX Runtime)", "",
              f"- perplexity: {acc['perplexity_text'] if ppl is None else f'{ppl:.2f} on ' + acc['perplexity_text']}",
              f"- summarization: {_summary_text(acc['summarization'])}",
              "- vs the PyTorch reference: " + (ref["skipped"] if "skipped" in ref else
              f"greedy agreement {ref['greedy_agreement']:.0%}, max |logit diff| {ref['max_abs_logit_diff']:.3g} "
              f"({ref['prompts']} prompts x {ref['steps']} steps; {ref['model']}, before compression)"), ""]
    return "\n".join(lines)


def write_report(result: dict, directory: Path) -> dict:
    """DIR/validation.md (pass/fail table per budget, figures, cost model) and DIR/latency.png."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        plot = directory / "latency.png"
        _plot_latency(result, plot)
        markdown = directory / "validation.md"
        markdown.write_text(format_markdown(result), encoding="utf-8")
    except OSError as exc:
        raise ExporterError(f"cannot write the report in {directory}: {exc.strerror or exc}") from None
    return {"markdown": str(markdown), "plot": str(plot)}


if __name__ == "__main__":  # the probe: python -m exporter.validate MODEL PROMPT_TOKENS NEW_TOKENS
    print(json.dumps(_probe(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
