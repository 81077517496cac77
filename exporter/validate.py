"""`exporter validate`: an artifact's speed, memory and accuracy against its device profile's budgets.

On a measured profile (`host`) latency and memory are measured in a fresh process that imports only
onnxruntime and numpy (so its peak RSS is the model's, not torch's); the cost model of
exporter.budget predicts them too, and the two are compared. For any other device they are predicted
and marked so. Accuracy is always measured here, through ONNX Runtime.

This module imports no torch at the top: `python -m exporter.validate MODEL PROMPT NEW` is the probe.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .artifact import read_manifest, sha256_file
from .errors import ExporterError

EXIT_BUDGET_FAILED = 4
DECODE_TOKENS = 64
PPL_WINDOW = 512
REFERENCE_STEPS = 16
COST_MODEL_TARGET = 0.2  # predicted decode latency within +-20% of the measured one
KV_BYTES_PER_ELEM = 4.0  # the exporter's graphs keep the KV cache in fp32


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


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def verify_files(artifact: Path, manifest: dict) -> None:
    """Every file of the manifest's table present with its size and sha256; raises naming the first bad one."""
    files = manifest.get("files")
    if not files:
        raise ExporterError(f"{artifact}/manifest.json has no file table")
    for name, entry in sorted(files.items()):
        path = artifact / name
        if not path.is_file():
            raise ExporterError(f"{artifact}: {name} is listed in the manifest but missing")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise ExporterError(f"{artifact}: {name} does not match the manifest (size or sha256 differs)")


def artifact_profile(manifest: dict, device: str | None):
    """--device, else the profile recorded in the manifest (a measured one is re-measured here)."""
    from .profiles import Budget, DeviceProfile, Hardware, Runtime, load_profile

    recorded = manifest["profile"]
    if device is not None:
        return load_profile(device)
    if recorded.get("measured"):
        return load_profile(recorded["path"] if Path(recorded["path"]).is_file() else recorded["name"])
    return DeviceProfile(
        name=recorded["name"], description=recorded["description"], aliases=tuple(recorded["aliases"]),
        measured=False, hardware=Hardware(**recorded["hardware"]),
        runtime=Runtime(**{**recorded["runtime"], "execution_providers": tuple(recorded["runtime"]["execution_providers"])}),
        budget=Budget(**recorded["budget"]), path=Path(recorded["path"]))


def model_bytes(artifact: Path, manifest: dict) -> int:
    """The ONNX graph and its external data, as stored (weights at their precision)."""
    name = manifest["onnx"]["file"]
    return sum(e["bytes"] for f, e in manifest["files"].items() if f == name or f.startswith(name + "."))


def predict(artifact: Path, manifest: dict, profile, prompt_tokens: int) -> dict:
    """The cost model: decode reads every weight and the KV cache once per token (bandwidth-bound);
    prefill does 2 FLOPs per parameter per token (compute-bound); RAM holds weights, the KV cache at
    max_context and the runtime."""
    from .budget import BANDWIDTH_EFFICIENCY, COMPUTE_EFFICIENCY, MB, RUNTIME_OVERHEAD_MB, kv_cache_bytes

    config = SimpleNamespace(**json.loads((artifact / "config.json").read_text()))
    stored = model_bytes(artifact, manifest)
    read = stored
    if not getattr(config, "tie_word_embeddings", False):  # an untied embedding is read one row per token
        read -= config.vocab_size * config.hidden_size * 4
    kv_prompt = kv_cache_bytes(config, prompt_tokens, KV_BYTES_PER_ELEM)
    bandwidth = profile.hardware.memory_bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY
    compute = profile.hardware.compute_tflops
    tflops = compute.get(manifest["precision"]) or compute.get("fp32") or max(compute.values())
    params = manifest["parameters"]["total_params"]
    prefill_s = 2.0 * params * prompt_tokens / (tflops * 1e12 * COMPUTE_EFFICIENCY)
    kv_max = kv_cache_bytes(config, profile.budget.max_context, KV_BYTES_PER_ELEM)
    return {
        "decode_ms": (read + kv_prompt) / bandwidth * 1e3,
        "prefill_ms": prefill_s * 1e3,
        "ram_mb": (stored + kv_max) / MB + RUNTIME_OVERHEAD_MB,
        "bytes_per_token": read + kv_prompt,
        "bandwidth_gbs": profile.hardware.memory_bandwidth_gbs,
        "bandwidth_efficiency": BANDWIDTH_EFFICIENCY,
        "compute_tflops": tflops,
        "compute_efficiency": COMPUTE_EFFICIENCY,
    }


def measure(model_path: Path, prompt_tokens: int, new_tokens: int = DECODE_TOKENS) -> dict:
    """Run the probe below in a fresh process and return its figures."""
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "exporter.validate", str(model_path), str(prompt_tokens),
                           str(new_tokens)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExporterError(f"cannot run {model_path.name} in ONNX Runtime: {last}")
    return json.loads(done.stdout)


def _probe(model_path: str, prompt_tokens: int, new_tokens: int) -> dict:
    """Load, time to first token (cold prefill), warm prefill (median of 3), `new_tokens` decode steps."""
    from .runtime import OrtDecoder

    start = time.perf_counter()
    decoder = OrtDecoder(model_path)
    load_s = time.perf_counter() - start
    config = json.loads((Path(model_path).parent / "config.json").read_text())
    prompt_tokens = min(prompt_tokens, config.get("max_position_embeddings", 1 << 30) - new_tokens)
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
            "peak_rss_mb": _peak_rss_mb(), "imports_torch": "torch" in sys.modules}


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

    from .evaluate import text_windows

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


def _reference(manifest: dict, model_path: Path, prompts: list[list[int]]) -> dict:
    """Greedy agreement and max logit error of the graph against the source model (PyTorch)."""
    from .models import load_model, resolve_model
    from .onnx_export import check_parity

    source = manifest["source_model"]["path"]
    try:
        model, _ = load_model(resolve_model(source))
    except ExporterError as exc:
        return {"skipped": f"reference model not loadable: {exc}"}
    reports = [check_parity(model, model_path, ids, REFERENCE_STEPS, atol=math.inf, min_agreement=0.0,
                            raise_on_fail=False) for ids in prompts]
    return {"model": source, "prompts": len(prompts), "steps": REFERENCE_STEPS,
            "greedy_agreement": float(np.mean([r.greedy_agreement for r in reports])),
            "max_abs_logit_diff": max(r.max_abs_logit_diff for r in reports)}


def validate(artifact: Path, device: str | None = None, text: Path | None = None, windows: int = 8,
             progress: bool = True) -> dict:
    """Every figure, and the budget checks; raises ExporterError on bad input before measuring."""
    from .golden import GOLDEN

    artifact = Path(artifact)
    if not artifact.is_dir():
        raise ExporterError(f"{artifact} is not an artifact directory")
    manifest = read_manifest(artifact)
    try:
        verify_files(artifact, manifest)
        profile = artifact_profile(manifest, device)
        model_path = artifact / manifest["onnx"]["file"]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ExporterError(f"{artifact}/manifest.json is malformed ({type(exc).__name__}: {exc})") from None
    windows_ids = _text_windows(artifact, Path(text), windows) if text is not None else None
    prompt_tokens = profile.budget.prefill_prompt_tokens
    budget = profile.budget
    mode = "measured" if profile.measured else "predicted"

    say(f"cost model for {profile.name}")
    predicted = predict(artifact, manifest, profile, prompt_tokens)
    performance = {"artifact_mb": sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file()) / 1e6}
    cost_model = None
    if profile.measured:
        say(f"measuring {model_path.name} in ONNX Runtime: prefill of {prompt_tokens} tokens, "
            f"{DECODE_TOKENS} decode steps, in a fresh process")
        measured = measure(model_path, prompt_tokens)
        performance.update(measured)
        ratio = predicted["decode_ms"] / measured["decode_ms_p50"]
        cost_model = {"predicted_decode_ms": predicted["decode_ms"], "measured_decode_ms_p50": measured["decode_ms_p50"],
                      "ratio": ratio, "within_target": abs(ratio - 1.0) <= COST_MODEL_TARGET,
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
        from .evaluate import ort_perplexity
        from .runtime import OrtDecoder

        accuracy["perplexity"] = ort_perplexity(OrtDecoder(model_path), windows_ids, progress=progress)
        accuracy["perplexity_text"] = f"{windows_ids.shape[0]} x {windows_ids.shape[1]} tokens of {text}"
    else:
        accuracy["perplexity"] = None
        accuracy["perplexity_text"] = "skipped (no --text)"
    golden_path = artifact / GOLDEN
    if golden_path.is_file():
        say(f"comparing with the PyTorch reference {manifest['source_model']['path']}")
        prompts = [case["prompt_ids"] for case in json.loads(golden_path.read_text())["cases"]]
        accuracy["reference"] = _reference(manifest, model_path, prompts)
    else:
        accuracy["reference"] = {"skipped": f"no {GOLDEN} in the artifact (its prompts are the reference's)"}
    return {"artifact": str(artifact), "device": profile.name, "mode": mode, "precision": manifest["precision"],
            "performance": performance, "predicted": predicted, "cost_model": cost_model, "accuracy": accuracy,
            "budgets": [c.to_dict() for c in checks], "passed": all(c.passed for c in checks)}


def format_result(result: dict) -> str:
    perf, acc, cost = result["performance"], result["accuracy"], result["cost_model"]
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
    if cost:
        lines += ["", f"cost model on this host: decode predicted {cost['predicted_decode_ms']:.2f} ms/token vs measured "
                  f"p50 {cost['measured_decode_ms_p50']:.2f}: ratio {cost['ratio']:.2f} (target 1 +- "
                  f"{COST_MODEL_TARGET:.0%}: {'within' if cost['within_target'] else 'OUTSIDE'}); prefill predicted "
                  f"{cost['predicted_prefill_ms']:.1f} ms vs measured {cost['measured_prefill_ms']:.1f}"]
    lines.append("")
    ppl = acc["perplexity"]
    lines.append(f"perplexity            {acc['perplexity_text'] if ppl is None else f'{ppl:.2f} on ' + acc['perplexity_text']}")
    ref = acc["reference"]
    lines.append("vs PyTorch reference  " + (ref["skipped"] if "skipped" in ref else
                 f"greedy agreement {ref['greedy_agreement']:.0%}, max |logit diff| {ref['max_abs_logit_diff']:.3g} "
                 f"({ref['prompts']} prompts x {ref['steps']} steps; {ref['model']}, before compression)"))
    failed = [c["figure"] for c in result["budgets"] if not c["passed"]]
    lines += ["", f"budgets: {len(result['budgets']) - len(failed)} passed, {len(failed)} failed"
              + (f" ({', '.join(failed)})" if failed else "")]
    return "\n".join(lines)


if __name__ == "__main__":  # the probe: python -m exporter.validate MODEL PROMPT_TOKENS NEW_TOKENS
    print(json.dumps(_probe(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
