"""Which ONNX Runtime releases run which artifacts, and how fast: each release installed from the package index.

    python benchmarks/runtime_versions.py ARTIFACT... --releases 1.18.1,1.20.1,1.22.1,1.23.2 --rounds 5
    python benchmarks/runtime_versions.py --families --releases 1.18.1,1.20.1,1.22.1,1.23.2,1.24.4

Each release goes into a directory of its own under --cache (`pip install --no-deps --target`; 1.18 gets
numpy < 2 beside it) and is put first on PYTHONPATH of the child processes, so this environment's numpy and
pytest serve every release. Per artifact and release: the on-device suite's release, provider and golden
checks (`pytest runtime_tests -k "not tokenizer and not budgets"`, the exporter's recorded outputs replayed
teacher-forced), then decode speed with runtime_tests/ort_loop.py in fresh processes, rounds interleaved over
releases (median tokens/s). The artifact's manifest says which release it was written for and the oldest it
records; this measures whether those claims hold.

--families: tiny random models of each family's features (Gemma 3's sliding and global layers, soft-capping,
Phi-3's partial rotary, LongRoPE and sliding window, SmolLM3's layers without rotary), written for the oldest
supported release, prefilled with 20 tokens on every release: max |logit difference| against PyTorch. This is
where exporter.graph.onnxruntime_releases' sliding-window requirement comes from.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import publish_results  # noqa: E402


def install(release: str, cache: Path) -> Path:
    target = cache / release
    if not (target / "onnxruntime").is_dir():
        packages = [f"onnxruntime=={release}"] + (["numpy<2"] if tuple(map(int, release.split(".")[:2])) < (1, 19)
                                                   else [])
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                        "--target", str(target), *packages], check=True)
    return target


def environment(target: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}


def suite(artifact: Path, env: dict) -> tuple[bool, str]:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                           "not tokenizer and not budgets", str(ROOT / "runtime_tests"), "--artifact", str(artifact)],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode == 0:
        return True, done.stdout.strip().splitlines()[-1]
    errors = [line for line in done.stdout.splitlines() if line.startswith("E ")]
    reason = next((line for line in errors if "older than" in line or "Fail" in line), errors[0] if errors else "")
    return False, reason[2:].strip()[:300]


def decode(artifact: Path, env: dict, threads: int, prompt: int, new: int) -> float:
    done = subprocess.run([sys.executable, str(ROOT / "runtime_tests" / "ort_loop.py"), str(artifact / "model.onnx"),
                           "--threads", str(threads), "--prompt-tokens", str(prompt), "--new-tokens", str(new)],
                          env=env, capture_output=True, text=True, check=True)
    return 1000.0 / json.loads(done.stdout.strip().splitlines()[-1])["decode_ms_p50"]


FAMILY_CASES = {  # name -> (transformers config class, overrides of the tiny sizes)
    "gemma3 sliding/global": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=4,
                                                       layer_types=["sliding_attention", "full_attention"])),
    "gemma3 soft-capped": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=4, final_logit_softcapping=0.5,
                                                    layer_types=["full_attention", "full_attention"])),
    "phi3 partial rotary": ("Phi3Config", dict(num_attention_heads=2, num_key_value_heads=1,
                                               partial_rotary_factor=0.5, pad_token_id=0)),
    "phi3 longrope": ("Phi3Config", dict(pad_token_id=0, original_max_position_embeddings=16, rope_scaling={
        "type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [2.0 + 0.5 * i for i in range(8)]})),
    "phi3 sliding window": ("Phi3Config", dict(pad_token_id=0, sliding_window=5)),
    "smollm3 no-rope layer": ("SmolLM3Config", dict(no_rope_layers=[1, 0], pad_token_id=0)),
}
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 5, 7, 9, 11, 13, 17, 19, 23]
CHECK = """
import json, sys, numpy as np, onnxruntime as ort
out = {}
for name, (path, ref) in json.loads(sys.argv[1]).items():
    try:
        s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        ids = np.array([%s], np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for i in s.get_inputs():
            if i.name.startswith("past"):
                feeds[i.name] = np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32)
        out[name] = float(np.abs(s.run(["logits"], feeds)[0] - np.load(ref)).max())
    except Exception as exc:
        out[name] = str(exc).splitlines()[0][:200]
print(json.dumps(out))
""" % PROMPT


def families(envs: dict, work: Path) -> str:
    """Each FAMILY_CASES model written for the oldest release; its prefill logits on every release."""
    import numpy as np
    import torch
    import transformers

    import exporter.graph.writer
    from exporter.graph.onnxruntime_releases import OLDEST
    from exporter.graph.writer import write_decoder

    # written for the oldest release even where the writer would refuse it: that refusal is what this measures
    exporter.graph.writer.check_release = lambda *args, **kwargs: None

    cases = {}
    for name, (config_name, overrides) in FAMILY_CASES.items():
        sizes = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=96, max_position_embeddings=128, initializer_range=0.1)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(
            getattr(transformers, config_name)(**{**sizes, **overrides})).eval()
        with torch.no_grad():
            reference = model(torch.tensor([PROMPT])).logits.numpy()
        directory = work / name.replace(" ", "-").replace("/", "-")
        path = write_decoder(model, directory, onnxruntime=OLDEST)
        np.save(directory / "reference.npy", reference)
        cases[name] = (str(path), str(directory / "reference.npy"))
    results = {release: json.loads(subprocess.run([sys.executable, "-c", CHECK, json.dumps(cases)], env=env,
                                                  capture_output=True, text=True, check=True).stdout)
               for release, env in envs.items()}
    lines = ["| case | " + " | ".join(f"ORT {r}" for r in results) + " |", "|---|" + "---|" * len(results)]
    for name in FAMILY_CASES:
        cells = [f"{v:.1e}" if isinstance(v, float) else f"fails: {v}" for v in (results[r][name] for r in results)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    publish_results("runtime-versions-families", {"cases": list(FAMILY_CASES), "results": results}, "\n".join(lines))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="*", type=Path)
    parser.add_argument("--families", action="store_true",
                        help="max |logit difference| against PyTorch of tiny models of each family's features")
    parser.add_argument("--releases", default="1.18.1,1.20.1,1.22.1,1.23.2",
                        help="comma-separated onnxruntime versions (this environment's own is added last)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "onnxruntime-releases")
    parser.add_argument("--rounds", type=int, default=5, help="decode timing rounds (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    import onnxruntime

    envs = {release: environment(install(release, args.cache)) for release in args.releases.split(",")}
    envs[onnxruntime.__version__] = dict(os.environ)
    if args.families:
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            families(envs, Path(work))
        return 0
    rows = {}
    for artifact in args.artifacts:
        onnx_entry = json.loads((artifact / "manifest.json").read_text())["onnx"]
        row = rows[str(artifact)] = {"target": onnx_entry.get("target_onnxruntime"),
                                     "oldest": onnx_entry.get("oldest_onnxruntime"), "releases": {}}
        for release, env in envs.items():
            ok, detail = suite(artifact, env)
            row["releases"][release] = {"suite_passed": ok, "detail": detail, "tokens_per_s": []}
            print(f"{artifact.name} on {release}: {'passed' if ok else 'FAILED'} ({detail})", file=sys.stderr)
    for r in range(args.rounds):
        print(f"decode round {r + 1}/{args.rounds}", file=sys.stderr)
        for artifact in args.artifacts:
            for release, env in envs.items():
                entry = rows[str(artifact)]["releases"][release]
                if entry["suite_passed"]:
                    entry["tokens_per_s"].append(decode(artifact, env, args.threads, args.prompt_tokens,
                                                        args.new_tokens))
    releases = list(envs)
    lines = ["| artifact | written for | oldest (manifest) | " + " | ".join(f"ORT {r}" for r in releases) + " |",
             "|---|---|---|" + "---|" * len(releases)]
    for artifact, row in rows.items():
        cells = []
        for release in releases:
            entry = row["releases"][release]
            speeds = entry["tokens_per_s"]
            cells.append(("runs" + (f", {statistics.median(speeds):.1f} tok/s" if speeds else ""))
                         if entry["suite_passed"] else "fails to load")
        lines.append(f"| {Path(artifact).name} | {row['target'] or 'newest'} | {row['oldest']} | "
                     + " | ".join(cells) + " |")
    publish_results("runtime-versions", {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                    "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
