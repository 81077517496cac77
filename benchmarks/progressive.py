"""Progressive low-rank decoding on SmolLM2-135M (issue 5, item 5), every row from one run.

    python benchmarks/progressive.py [--examples 100] [--ratio 0.2] [--levels 1.0,0.85,0.7] [--schedule TEXT]
                                     [--correctives] [--baselines uniform,flrc] [--work DIR]

1. `exporter export --device host --ratio R --calib wikitext-2/valid.txt` (FLRC ranks; CALR correctives only
   with --correctives, to keep it fast): one artifact with the rank levels and the schedule derived from
   calibration measurements;
2. ROUGE-L on the first --examples CNN/DailyMail validation articles (`exporter evaluate --task summarization`:
   greedy, 96 new tokens) of the dense model (reference), and of the artifact at static full rank and with
   the progressive schedule (the artifact's, or --schedule);
3. the average active decoder-projection parameters per generated token of the progressive run (every
   generated token counted at the level of the pass that produced it) give the matching ratio; the baselines
   are exported at it as one static level: uniform ranks (the issue's static uniform-rank compression) and
   FLRC ranks; ROUGE-L of each;
4. fresh processes: decode tokens/s of every level (2 threads, 128-token prompt, 64 new tokens, medians of
   interleaved repeats) with plain sessions and with the shared sessions a multi-level schedule uses; peak RSS
   (VmHWM) with one level loaded (plain session, as `static` loads it; and shared) and with every level loaded
   (a schedule that visits them all: shared sessions);
5. disk: every level's files against the full level alone.

Prints a Markdown summary and writes it with the JSON figures to benchmarks/results/progressive-*.{md,json}.
--work keeps the artifacts; a later run with the same --work reuses them.
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


def exporter(*args: str, capture: bool = False) -> str:
    """`python -m exporter ARGS` in a fresh process; progress bars (and, without `capture`, its output) go to
    stderr, so this script's stdout is the summary."""
    result = subprocess.run([sys.executable, "-m", "exporter", *args], check=True, text=True,
                            stdout=subprocess.PIPE if capture else sys.stderr)
    return result.stdout if capture else ""


def export(out: Path, ratio: float, allocation: str, levels: str, correctives: bool) -> dict:
    if not (out / "manifest.json").is_file():
        exporter("export", "--device", "host", "--ratio", f"{ratio:.6f}", "--allocation", allocation,
                 "--calib", str(DATA / "wikitext-2" / "valid.txt"), "--levels", levels, "--out", str(out), "--force",
                 "--correctives" if correctives else "--no-correctives")
    return json.loads((out / "manifest.json").read_text())


def summarize(artifact: Path, examples: int, schedule: str) -> dict:
    return json.loads(exporter("evaluate", str(artifact), "--task", "summarization", "--limit", str(examples),
                               "--data", str(DATA / "cnn_dailymail" / "validation.jsonl"), "--schedule", schedule,
                               "--threads", str(THREADS), "--json", capture=True))


def level_projection_params(manifest: dict) -> dict[str, int]:
    """Decoder-projection parameters each level computes with: the dense projections, plus its factors."""
    total, levels = manifest["parameters"]["projection_params"], manifest["levels"]
    full = levels[0].get("active_factor_params", 0)
    return {lv["name"]: total - full + lv.get("active_factor_params", full) for lv in levels}


def average_params(manifest: dict, level_tokens: dict[str, int]) -> float:
    params = level_projection_params(manifest)
    return sum(params[level] * n for level, n in level_tokens.items()) / sum(level_tokens.values())


def model_mb(artifact: Path, files) -> float:
    return sum((artifact / f).stat().st_size for f in files) / 1e6


# --------------------------------------------------------------------------- fresh-process measurements


def memory_mb() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024 / 1e6  # kB -> MB (10^6 bytes)
    return fields


def _prompt(runtime) -> list[int]:
    text = (DATA / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:20000]
    return runtime.encode(text)[1000:1000 + PROMPT_TOKENS]


def child_rss(artifact: str, schedule: str) -> dict:
    """Peak RSS of a process that generates 16 tokens with `schedule` (the sessions it loads are the product's);
    `shared`: the full level alone in a shared session, as a multi-level schedule loads it."""
    from exporter.runtime.generation import Runtime

    runtime = Runtime(artifact, threads=THREADS)
    if schedule == "shared":
        runtime.decoder(runtime.level_names[0], shared=True).greedy(_prompt(runtime), 16)
    else:
        list(runtime.generate(_prompt(runtime), 16, runtime.parse_schedule(schedule), stop=False))
    return memory_mb()


def child_speed(artifact: str, repeats: int) -> dict:
    """Decode tokens/s of every level, plain and shared sessions, interleaved repeats; medians."""
    from exporter.runtime.generation import Runtime

    runtimes = {"plain": Runtime(artifact, threads=THREADS), "shared": Runtime(artifact, threads=THREADS)}
    prompt = _prompt(runtimes["plain"])
    names = runtimes["plain"].level_names
    for mode, runtime in runtimes.items():  # warm-up: first runs allocate and pick kernels
        for name in names:
            runtime.decoder(name, mode == "shared").greedy(prompt[:16], 4)
    steps = {mode: {name: [] for name in names} for mode in runtimes}
    for _ in range(repeats):
        for mode, runtime in runtimes.items():
            for name in names:
                _, _, timing = runtime.decoder(name, mode == "shared").greedy(prompt, NEW_TOKENS)
                steps[mode][name].append(float(np.median(timing.step_s)))
    return {mode: {name: 1.0 / float(np.median(s)) for name, s in per.items()} for mode, per in steps.items()}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def summary(r: dict) -> str:
    rows, levels = r["rows"], r["levels"]
    lines = [f"# Progressive low-rank decoding: SmolLM2-135M-Instruct, FLRC {r['ratio']:.0%} of projection "
             f"parameters removed{', CALR correctives' if r['correctives'] else ', no correctives'}", "",
             f"ROUGE-L F1 on the first {r['examples']} CNN/DailyMail validation articles (greedy, <= 96 new tokens, "
             f"{THREADS} threads). Schedule `{r['schedule']}` ({r['schedule_source']}). Active projection params: "
             "mean over generated tokens of the decoder-projection parameters of the level that produced each.", "",
             "| row | schedule | active projection params / token | removed | ROUGE-L | ROUGE-1 | ROUGE-2 | "
             "tokens / summary | decode tok/s | artifact MB |", "|---" * 10 + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['schedule']} | {row['active_params'] / 1e6:.2f}M | {row['removed']:.1%} | "
                     f"{row['rougeL']:.4f} | {row['rouge1']:.4f} | {row['rouge2']:.4f} | "
                     f"{row['mean_generated_tokens']:.1f} | {row['decode_tokens_per_s']:.1f} | "
                     f"{row['artifact_mb']:.1f} |")
    lines.append("")
    for name in rows:
        if name.startswith("static-") and name != "static-full":
            ratio = rows["progressive"]["rougeL"] / max(rows[name]["rougeL"], 1e-9)
            lines.append(f"- progressive / {name} ROUGE-L: {ratio:.2f}"
                         + (" (target >= 1.17)" if "uniform" in name else ""))
    lines += ["", "target tok/s = 0.9 x (weight bytes at r100 / at the level) x r100 tok/s of the same sessions", "",
              "| level | weight MB | factor params | NLL increase (nats/token) | parity max diff | start | "
              "plain tok/s (target) | shared tok/s (target) |", "|---" * 8 + "|"]
    starts = dict((level, start) for level, start in r["schedule_entries"])
    full_bytes = levels[0]["weight_bytes"]
    for lv in levels:
        share = full_bytes / lv["weight_bytes"]
        cells = [f"{r['speed'][m][lv['name']]:.1f} ({0.9 * share * r['speed'][m][levels[0]['name']]:.1f})"
                 for m in ("plain", "shared")]
        lines.append(f"| {lv['name']} | {lv['weight_bytes'] / 1e6:.1f} | {lv['active_factor_params']:,} | "
                     f"{lv.get('nll_increase', float('nan')):.4f} | {lv['parity']['max_abs_logit_diff']:.2e} | "
                     f"{starts.get(lv['name'], '-')} | {cells[0]} | {cells[1]} |")
    rss, disk = r["rss_mb"], r["disk_mb"]
    lines += ["", f"disk: every level {disk['all_levels']:.1f} MB = {disk['all_levels'] / disk['full_level']:.4f}x the "
              f"full level alone ({disk['full_level']:.1f} MB) (target <= 1.05x)",
              f"peak RSS (fresh process, 16 tokens): one level {rss['one_level']['VmHWM']:.0f} MB as `static` loads "
              f"it (plain session), {rss['one_level_shared']['VmHWM']:.0f} MB in a shared session; every level "
              f"(schedule {r['rss_schedule']}, shared) {rss['all_levels']['VmHWM']:.0f} MB = "
              f"{rss['all_levels']['VmHWM'] / rss['one_level']['VmHWM']:.3f}x / "
              f"{rss['all_levels']['VmHWM'] / rss['one_level_shared']['VmHWM']:.3f}x (target <= 1.15x)", ""]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, artifact, value = sys.argv[2:5]
        print(json.dumps(child_rss(artifact, value) if kind == "rss" else child_speed(artifact, int(value))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100, help="CNN/DailyMail articles (default: 100)")
    parser.add_argument("--ratio", type=float, default=0.2, help="projection parameters removed (default: 0.2)")
    parser.add_argument("--levels", default="1.0,0.85,0.7")
    parser.add_argument("--schedule", help="progressive schedule to evaluate (default: the artifact's)")
    parser.add_argument("--correctives", action="store_true", help="CALR correctives (slower export)")
    parser.add_argument("--baselines", default="uniform,flrc", help="static baselines at the matching ratio")
    parser.add_argument("--repeats", type=int, default=3, help="decode speed repeats (default: 3)")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="also score the dense model (default: on)")
    parser.add_argument("--work", type=Path, help="keep the artifacts here (default: a temporary directory)")
    args = parser.parse_args()

    from exporter.runtime.generation import parse_schedule, schedule_text

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="progressive-") as tmp:
        work = args.work or Path(tmp)
        art = work / f"flrc-{args.ratio:g}"
        manifest = export(art, args.ratio, "fisher", args.levels, args.correctives)
        names = [lv["name"] for lv in manifest["levels"]]
        schedule = args.schedule or ",".join(f"{e['level']}:{e['start']}" for e in manifest["schedule"])
        entries = parse_schedule(schedule, names)
        dense_params = manifest["parameters"]["projection_params_dense"]
        rows = {}

        def add(name, artifact, manifest, schedule, result):
            active = average_params(manifest, result["level_tokens"])
            rows[name] = {"schedule": schedule, "active_params": active, "removed": 1 - active / dense_params,
                          "artifact_mb": sum(f.stat().st_size for f in artifact.iterdir()) / 1e6, **result}

        if args.reference:
            dense = export(work / "dense", 0.0, "fisher", "1.0", False)  # the uncompressed model, for reference
            add("dense", work / "dense", dense, "static", summarize(work / "dense", args.examples, "static"))
        add("static-full", art, manifest, "static", summarize(art, args.examples, "static"))
        add("progressive", art, manifest, schedule_text(entries), summarize(art, args.examples, schedule))
        matched = rows["progressive"]["removed"]
        for label in filter(None, args.baselines.split(",")):  # uniform | flrc
            base = work / f"{label}-{matched:.4f}"
            base_manifest = export(base, matched, {"flrc": "fisher"}.get(label, label), "1.0", args.correctives)
            add(f"static-{label}", base, base_manifest, "static", summarize(base, args.examples, "static"))

        full = manifest["levels"][0]["file"]
        visit_all = ",".join(f"{name}:{4 * k}" for k, name in enumerate(names))  # 16 tokens touch every level
        result = {
            "model": manifest["source_model"]["path"], "ratio": args.ratio, "correctives": args.correctives,
            "examples": args.examples, "schedule": schedule_text(entries), "schedule_entries": entries,
            "schedule_source": "--schedule" if args.schedule else manifest["schedule_derivation"]["source"],
            "schedule_derivation": manifest["schedule_derivation"], "levels": manifest["levels"], "rows": rows,
            "speed": run_child("speed", str(art), str(args.repeats)),
            "rss_schedule": visit_all,
            "rss_mb": {"one_level": run_child("rss", str(art), "static"),
                       "one_level_shared": run_child("rss", str(art), "shared"),
                       "all_levels": run_child("rss", str(art), visit_all)},
            "disk_mb": {"all_levels": model_mb(art, {p.name for p in art.glob("model*")}),
                        "full_level": model_mb(art, [full, full + ".data"])},
        }
        result["seconds"] = round(time.perf_counter() - start, 1)
    publish_results("progressive", result, summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
