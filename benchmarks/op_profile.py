"""Where a graph's decode step spends its time, by operator (ONNX Runtime's own profiler).

    python benchmarks/op_profile.py ARTIFACT_DIR [ARTIFACT_DIR ...] [--steps 200] [--past 128] [--threads 2]

Each graph (DIR/model.onnx) runs `--steps` single-token steps after a random KV cache of `--past` positions, with
session profiling on; the kernel times are summed by operator (MatMulNBits by its bits, read from the node name the
packer gives it) and printed per step. Profiling adds its own overhead: compare graphs measured the same way, and
time decoding with benchmarks/race.py.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort


def op_times(path: Path, steps: int, past: int, threads: int) -> tuple[dict[str, float], collections.Counter]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
    session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([[42]], np.int64), "attention_mask": np.ones((1, past + 1), np.int64)}
    rng = np.random.default_rng(0)
    decoder = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]  # symbolic dims: its sizes
    for cache in session.get_inputs()[2:]:
        heads, head_size = (d if isinstance(d, int) else decoder[key]
                            for d, key in zip(cache.shape[1::2], ("num_key_value_heads", "head_size")))
        feeds[cache.name] = rng.random((1, heads, past, head_size), np.float32)
    for _ in range(steps):
        session.run(None, feeds)
    times, nodes = collections.defaultdict(float), collections.Counter()
    for event in json.loads(Path(session.end_profiling()).read_text()):
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op = event["args"]["op_name"]
        if op == "MatMulNBits" and (bits := re.search(r"_Q(\d+)", event["name"])):
            op += f" {bits[1]}-bit"
        times[op] += event["dur"] / steps
        nodes[op] += 1
    return times, collections.Counter({op: n // steps for op, n in nodes.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("graphs", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for path in args.graphs:
        times, nodes = op_times(path, args.steps, args.past, args.threads)
        total = sum(times.values())
        print(f"\n{path}: {total:.0f} us of kernels per step\n\n| operator | us per step | nodes | share |\n|---|---|---|---|")
        for op, us in sorted(times.items(), key=lambda item: -item[1]):
            print(f"| {op} | {us:.0f} | {nodes[op]} | {us / total:.1%} |")


if __name__ == "__main__":
    main()
