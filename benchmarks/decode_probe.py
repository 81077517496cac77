"""Decode speed and peak memory of one ONNX decoder, measured in a fresh process.

    python benchmarks/decode_probe.py MODEL.onnx --prompt-ids 1,2,3 --new-tokens 64 --threads 2

Prints one JSON object: decode tokens/s (median step), prefill ms (median), peak RSS in MB of this
process (session + cache + loop; ru_maxrss), and the session load time. A fresh process keeps the
RSS figure free of the benchmark's own PyTorch memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter.runtime.generation import OrtDecoder  # noqa: E402


def peak_rss_mb() -> float:
    """VmHWM: this process's peak resident set, in MB (10^6 bytes, as exporter validate and runtime_tests report
    it; before 2026-12-02 this probe reported MiB). (ru_maxrss would carry the parent's peak across exec.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    prompt = [int(t) for t in args.prompt_ids.split(",")]
    start = time.perf_counter()
    decoder = OrtDecoder(args.model, threads=args.threads)
    load_s = time.perf_counter() - start
    decoder.greedy(prompt[:16], 4)  # warm-up: first runs allocate and pick kernels
    steps, prefills = [], []
    for _ in range(args.repeats):
        _, _, timing = decoder.greedy(prompt, args.new_tokens)
        steps.extend(timing.step_s)
        prefills.append(timing.prefill_s)
    print(json.dumps({
        "decode_tok_s": 1.0 / float(np.median(steps)),
        "prefill_ms": 1000.0 * float(np.median(prefills)),
        "peak_rss_mb": peak_rss_mb(),
        "load_s": load_s,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
