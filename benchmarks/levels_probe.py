"""Rank-sliced levels on SmolLM2-135M: disk, peak RSS with every level loaded, decode speed per level, parity.

    python benchmarks/levels_probe.py [--ratio 0.2] [--fractions 1.0,0.85,0.7] [--weights fp32,int4]
                                      [--repeats 5] [--work DIR]

Factorizes the default model once (plain SVD, uniform ranks: fast, no calibration), writes the levels
(`write_levels`) and, for reference, the single-level decoder (`write_decoder`) per weight format, checks
every level against the sliced PyTorch model, then measures in fresh processes (VmHWM is per process):

* rss: peak RSS of one level's session vs every level's, each used either as a schedule would ("sched":
  prefill at the first level, then 8 decode steps at each level with the KV cache carried across) or
  "each" (a 128-token prefill through every level: every session's arena at its largest). Sessions are
  plain (default options: prepacking on, each session its own weights) or from `SharedWeights` (shared:
  one copy, prepacking and the CPU memory arena off; int4: only the arena off); shared-arena keeps the arena;
* speed: decode tokens/s per level (2 threads, 128-token prompt, 64 new tokens): every variant loaded in one
  process and run interleaved, `--repeats` times, medians, so the ratios come from one run.

Prints a Markdown summary and writes it with the JSON figures to benchmarks/results/levels-*.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results_io import publish_results  # benchmarks/results_io.py: a script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
THREADS, PROMPT_TOKENS, NEW_TOKENS = 2, 128, 64


def memory_mb() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024.0
    return fields


def _decoders(paths: list[str], mode: str):
    """One OrtDecoder per path, sessions as `mode` says (plain | shared | shared-arena)."""
    import onnxruntime as ort

    from exporter.runtime.generation import OrtDecoder
    from exporter.runtime.shared_weights import SharedWeights

    shared = SharedWeights()
    decoders = []
    for path in paths:
        options = ort.SessionOptions()
        if mode.startswith("shared"):
            options = shared.session_options(path, options)
            options.enable_cpu_mem_arena = mode == "shared-arena"
        decoders.append(OrtDecoder(path, threads=THREADS, session_options=options))
    return decoders, shared


def child_rss(mode: str, use: str, paths: list[str], prompt: list[int]) -> dict:
    decoders, _shared = _decoders(paths, mode)
    if use == "each":
        for decoder in decoders:
            decoder.greedy(prompt, 8)
    else:
        logits, cache = decoders[0].step(np.array([prompt]), decoders[0].empty_cache(1))
        for decoder in decoders:
            for _ in range(8):
                logits, cache = decoder.step(np.array([[int(np.argmax(logits[0, -1]))]]), cache)
    return memory_mb()


def child_speed(variants: dict[str, tuple[str, list[str]]], prompt: list[int], repeats: int) -> dict:
    """variants: name -> (mode, level paths). Returns name -> [tokens/s per level] (median over repeats)."""
    loaded = {name: _decoders(paths, mode) for name, (mode, paths) in variants.items()}
    for decoders, _ in loaded.values():
        for decoder in decoders:
            decoder.greedy(prompt[:16], 4)  # warm-up: first runs allocate and pick kernels
    steps = {name: [[] for _ in decoders] for name, (decoders, _) in loaded.items()}
    for _ in range(repeats):  # interleaved, so load from other processes hits every variant alike
        for name, (decoders, _) in loaded.items():
            for k, decoder in enumerate(decoders):
                _, _, timing = decoder.greedy(prompt, NEW_TOKENS)
                steps[name][k].append(float(np.median(timing.step_s)))
    return {name: [1.0 / float(np.median(s)) for s in per_level] for name, per_level in steps.items()}


def _run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _prompt(tokenizer) -> list[int]:
    text = (DATA / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:20000]
    return tokenizer(text, add_special_tokens=False)["input_ids"][1000:1000 + PROMPT_TOKENS]


def _max_diff(path_a, path_b, prompt: list[int]) -> float:
    from exporter.runtime.generation import OrtDecoder

    tokens, logits_a, _ = OrtDecoder(path_a, threads=THREADS).greedy(prompt, 16)
    _, logits_b, _ = OrtDecoder(path_b, threads=THREADS).greedy(prompt, 16, forced_tokens=tokens)
    return float(np.abs(logits_a - logits_b).max())


def _dir_mb(paths) -> float:
    return sum(Path(p).stat().st_size for p in paths) / 1e6


def build(args, work: Path) -> dict:

    from exporter.graph.optimum_export import check_parity
    from exporter.graph.writer import level_ranks, sliced_copy, write_decoder, write_levels
    from exporter.pipeline import ExportOptions, compress, prepare

    prepared = prepare(ExportOptions(device="host", ratio=args.ratio, method="svd", allocation="uniform",
                                     weights="fp32", seed=0, progress=False))
    model, tokenizer = prepared.model, prepared.tokenizer
    model.eval()
    start = time.perf_counter()
    compress(prepared)  # plain SVD, uniform ranks: no calibration read
    prompt = _prompt(tokenizer)
    result = {"model": model.config.name_or_path, "ratio": args.ratio, "fractions": args.fractions,
              "factorize_s": round(time.perf_counter() - start, 1), "prompt": prompt, "formats": {}}
    for weights in args.weights:
        levels_dir, single_dir = work / f"levels-{weights}", work / f"single-{weights}"
        quant = dict(weights=weights, accuracy_level=4 if weights == "int4" else None)  # as the CLI's int4
        start = time.perf_counter()
        entries = write_levels(model, levels_dir, args.fractions, **quant)
        write_s = time.perf_counter() - start
        write_decoder(model, single_dir, **quant)
        multiple = entries[0]["rank_multiple"]
        parity = []
        for entry, ranks in zip(entries, level_ranks(model, args.fractions, multiple)):
            reference = sliced_copy(model, ranks)
            report = check_parity(reference, levels_dir / entry["file"], prompt[:32], steps=16, raise_on_fail=False)
            row = {"level": entry["name"], "max_abs_logit_diff": report.max_abs_logit_diff,
                   "greedy_agreement": report.greedy_agreement}
            if weights == "int4":  # the level must be exactly the single-level int4 graph at its ranks
                direct = write_decoder(reference, work / f"direct-{weights}-{entry['name']}", **quant)
                row["max_diff_vs_write_decoder"] = _max_diff(levels_dir / entry["file"], direct, prompt[:32])
            parity.append(row)
            del reference
        single = check_parity(model, single_dir / "model.onnx", prompt[:32], steps=16, raise_on_fail=False)
        result["formats"][weights] = {
            "levels": entries, "write_s": round(write_s, 1), "parity": parity,
            "write_decoder_parity": {"max_abs_logit_diff": single.max_abs_logit_diff,
                                     "greedy_agreement": single.greedy_agreement},
            "disk_mb": {"all_levels": _dir_mb(levels_dir.glob("model*")),
                        "full_level_alone": _dir_mb([levels_dir / "model.onnx", levels_dir / "model.onnx.data"]),
                        "write_decoder": _dir_mb(single_dir.glob("model*"))},
            "paths": {"levels": [str(levels_dir / e["file"]) for e in entries],
                      "single": str(single_dir / "model.onnx")},
        }
    return result


def measure(result: dict, repeats: int) -> None:
    prompt = json.dumps(result["prompt"])
    variants = {}
    for weights, fmt in result["formats"].items():
        levels, single = fmt["paths"]["levels"], fmt["paths"]["single"]
        modes = ("plain", "shared", "shared-arena") if weights == "fp32" else ("plain", "shared")
        rss = {"write_decoder/each": _run_child(["rss", "plain", "each", prompt, single])}
        for mode in modes:
            for use in ("sched", "each"):
                rss[f"{mode}/{use}/full_level"] = _run_child(["rss", mode, use, prompt, levels[0]])
                rss[f"{mode}/{use}/all_levels"] = _run_child(["rss", mode, use, prompt, *levels])
        fmt["rss_mb"] = rss
        variants[f"{weights}/write_decoder"] = ("plain", [single])
        for mode in modes:
            variants[f"{weights}/{mode}"] = (mode, levels)
    speeds = _run_child(["speed", prompt, str(repeats), json.dumps(variants)])
    for weights, fmt in result["formats"].items():
        fmt["tok_s"] = {name.split("/", 1)[1]: s for name, s in speeds.items() if name.startswith(weights + "/")}


def summary(result: dict) -> str:
    lines = [f"# Rank-sliced levels: {result['model']}, {result['ratio']:.0%} of projection parameters removed "
             f"(plain SVD, uniform), levels {result['fractions']}", "",
             f"{THREADS} threads, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens; tok/s are medians of "
             "interleaved runs in one process; RSS is VmHWM of a fresh process per row.", ""]
    for weights, fmt in result["formats"].items():
        entries, disk, rss, speeds = fmt["levels"], fmt["disk_mb"], fmt["rss_mb"], fmt["tok_s"]
        lines += [f"## {weights}", "",
                  f"disk: all levels {disk['all_levels']:.1f} MB = {disk['all_levels'] / disk['full_level_alone']:.4f}x "
                  f"the full level alone ({disk['full_level_alone']:.1f} MB); write_decoder's single level "
                  f"{disk['write_decoder']:.1f} MB (target <= 1.05x)", "",
                  "| sessions / use / loaded | peak RSS MB | RssAnon | RssFile | all / one level |", "|---|---|---|---|---|"]
        for name, m in rss.items():
            one = rss.get(name.replace("all_levels", "full_level"))
            ratio = f"{m['VmHWM'] / one['VmHWM']:.3f}" if name.endswith("all_levels") else ""
            lines.append(f"| {name} | {m['VmHWM']:.0f} | {m['RssAnon']:.0f} | {m['RssFile']:.0f} | {ratio} |")
        variants = [v for v in speeds if v != "write_decoder"]
        lines += ["", "target tok/s = 0.9 x (weight bytes at r100 / at the level) x r100 tok/s of the same sessions", "",
                  "| level | weight MB | factor params | parity max diff | agreement | "
                  + " | ".join(f"{v} tok/s (target)" for v in variants) + " |", "|---" * (5 + len(variants)) + "|"]
        full_bytes = entries[0]["weight_bytes"]
        for k, (entry, parity) in enumerate(zip(entries, fmt["parity"])):
            share = full_bytes / entry["weight_bytes"]
            cells = [f"{speeds[v][k]:.1f} ({0.9 * share * speeds[v][0]:.1f})" for v in variants]
            diff = f"{parity['max_abs_logit_diff']:.2e}"
            if "max_diff_vs_write_decoder" in parity:
                diff += f" (vs write_decoder int4: {parity['max_diff_vs_write_decoder']:.1e})"
            lines.append(f"| {entry['name']} | {entry['weight_bytes'] / 1e6:.1f} | {entry['active_factor_params']:,} | "
                         f"{diff} | {parity['greedy_agreement']:.0%} | " + " | ".join(cells) + " |")
        ref = fmt["write_decoder_parity"]
        lines += ["", f"write_decoder single level: {speeds['write_decoder'][0]:.1f} tok/s (plain sessions); parity "
                  f"max diff {ref['max_abs_logit_diff']:.2e}, agreement {ref['greedy_agreement']:.0%}", ""]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "rss":
            print(json.dumps(child_rss(rest[0], rest[1], rest[3:], json.loads(rest[2]))))
        else:
            print(json.dumps(child_speed(json.loads(rest[2]), json.loads(rest[0]), int(rest[1]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--fractions", type=lambda s: [float(f) for f in s.split(",")], default=[1.0, 0.85, 0.7])
    parser.add_argument("--weights", type=lambda s: s.split(","), default=["fp32", "int4"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path,
                        help="keep the artifacts here (default: a temporary directory); a later run with the same "
                             "--work measures them again without rebuilding")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="levels-probe-") as tmp:
        built = args.work / "build.json" if args.work else None
        if built and built.is_file():
            result = json.loads(built.read_text())
        else:
            result = build(args, args.work or Path(tmp))
            if built:
                built.write_text(json.dumps(result))
        measure(result, args.repeats)
    publish_results("levels", result, summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
