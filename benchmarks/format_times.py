"""Each weight format's decode time in the model's own graph, beside the exporter's layer probe.

    python benchmarks/format_times.py [--model M] [--formats a,b,...] [--repeat N] [--json FILE]

The decode ceiling of `--weights auto` prices each format by `exporter.device.host_probes.measure_format_costs` (the
model's decoder layer shapes, without the rest of the graph). This script checks those figures where they matter:
the model's fp32 decoder (`build_decoder`, lm_head its own MatMul) with every decoder MatMul re-encoded as a
MatMulNBits on one format (random codes, distinct per node: ONNX Runtime shares identical pre-packed weights;
lm_head kept on int4-b32), one decode step bound as onnxruntime-genai binds it (past and present KV in one buffer,
128 positions in use), timed in blocks of 16 steps against a graph on int4-b32, the order alternating over 12
rounds. Per pass and format: the layer probe's time per weight / int4-b32's, the graph's step / the reference
graph's (over the same ratio of a second int4-b32 graph, built as late as the others), and that step difference as
a time per weight (over the re-encoded weights, with the layer probe's absolute int4-b32 figure). `--repeat` runs
the whole comparison again: how much the figures move on this machine between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REFERENCE = "int4-b32"
FORMATS = ("int4-b32-asym", "int4-b64", "int4-b64-asym", "int4-b128-asym", "int4-b256-asym", "int4-b32-offset",
           "int8-b128", "int8-b32", "int2-b64-asym")
ROUNDS, STEPS, PAST = 12, 16, 128


def strip_matmuls(proto):
    """`proto` serialized without its MatMuls' 2-D float weights, and those nodes: {name: (input, output, K, N)}."""
    from onnx import TensorProto

    initializers = {t.name: t for t in proto.graph.initializer}
    matmuls, weights = {}, set()
    for node in proto.graph.node:
        tensor = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        if tensor is not None and len(tensor.dims) == 2 and tensor.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            matmuls[node.name] = (node.input[0], node.output[0], *tensor.dims)
            weights.add(tensor.name)
    stripped = type(proto)()
    stripped.CopyFrom(proto)
    del stripped.graph.initializer[:]
    stripped.graph.initializer.extend(t for t in proto.graph.initializer if t.name not in weights)
    return stripped.SerializeToString(), matmuls


def format_session(skeleton: bytes, matmuls: dict, name: str, fixed: set, folder: str, seed: int, threads: int):
    """A session of `skeleton` with each of `matmuls` a MatMulNBits on `name` (`fixed` ones on REFERENCE)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from exporter.compress.grid import QuantFormat
    from exporter.device.host_probes import matmul_nbits_node
    from exporter.graph.matmul_nbits import block_sums_nodes

    proto = onnx.ModelProto()
    proto.ParseFromString(skeleton)
    rng = np.random.default_rng(seed)
    nodes, large = [], {}
    for node in proto.graph.node:
        if node.name not in matmuls:
            nodes.append(node)
            continue
        x, y, k, n = matmuls[node.name]
        fmt, i = QuantFormat.parse(REFERENCE if node.name in fixed else name), len(nodes)
        if fmt.offset:  # the block sums as the exporter writes them
            nodes += block_sums_nodes(x, fmt.block_size, f"sums{i}")
            x, k = f"sums{i}/output", k + k // fmt.block_size
        nodes.append(matmul_nbits_node(i, x, y, k, n, fmt.bits, fmt.block_size, not fmt.symmetric, large))
        large[f"b{i}"] = rng.integers(0, 256, large[f"b{i}"].shape, dtype=np.uint8)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    for key, array in large.items():
        proto.graph.initializer.append(numpy_helper.from_array(array, key))
    path = os.path.join(folder, f"{name}-{seed}.onnx")
    onnx.save(proto, path, save_as_external_data=True, location=f"{name}-{seed}.data", size_threshold=1024)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def decode_binding(session):
    """One decode step bound as onnxruntime-genai binds it: logits to the host, each past input and its present
    output one buffer of 2 x PAST positions, PAST of them in use; token ids and attention mask ones."""
    import onnxruntime as ort

    binding = session.io_binding()
    binding.bind_output("logits", "cpu")
    for value in session.get_inputs():
        shape = [d if isinstance(d, int) else 2 * PAST if "past" in str(d) else PAST + 1 if "total" in str(d) else 1
                 for d in value.shape]
        if value.name.startswith("past_key_values"):
            buffer = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
            binding.bind_ortvalue_input(value.name, buffer)
            binding.bind_ortvalue_output(value.name.replace("past_key_values", "present"), buffer)
        else:
            binding.bind_cpu_input(value.name, np.ones(shape, np.int64))
    return binding


def block(session, binding) -> float:
    """Median seconds of STEPS decode steps, after 2 untimed ones (the other session's threads park)."""
    times = []
    for step in range(STEPS + 2):
        t = time.perf_counter()
        session.run_with_iobinding(binding)
        if step >= 2:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def one_pass(skeleton, matmuls, fixed, formats, layer, threads) -> dict:
    from exporter.device.host_probes import measure_format_costs

    probe = measure_format_costs(formats, layer, REFERENCE)
    weights = sum(k * n for name, (_, _, k, n) in matmuls.items() if name not in fixed)
    ratios, steps = {}, []
    with tempfile.TemporaryDirectory(prefix="format-times-") as folder:
        base = format_session(skeleton, matmuls, REFERENCE, fixed, folder, 0, threads)
        bound = decode_binding(base)
        block(base, bound)
        for seed, name in enumerate((REFERENCE, *formats), 1):
            session = format_session(skeleton, matmuls, name, fixed, folder, seed, threads)
            binding, pairs = decode_binding(session), []
            for r in range(ROUNDS):
                order = [(session, binding), (base, bound)][::1 - 2 * (r % 2)]
                times = [block(*s) for s in order]
                pairs.append(times[::1 - 2 * (r % 2)])
            ratios[name] = float(np.median([a / b for a, b in pairs]))
            steps += [b for _, b in pairs]
            del session, binding
    step_s, reference_ns = float(np.median(steps)), probe[REFERENCE]
    rows = {}
    for name in (REFERENCE, *formats):
        step = ratios[name] / ratios[REFERENCE]
        per_weight = 1 + (step - 1) * step_s / weights * 1e9 / reference_ns
        rows[name] = {"probe": round(probe[name] / reference_ns, 3), "graph_step": round(step, 3),
                      "graph_per_weight": round(per_weight, 3)}
    return {"reference_step_ms": round(step_s * 1e3, 3), "reference_ns_per_weight": reference_ns,
            "decoder_weights": weights, "formats": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model path or Hub id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="formats beside int4-b32, comma-separated")
    parser.add_argument("--repeat", type=int, default=1, help="passes, one after the other")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="write every pass here")
    args = parser.parse_args(argv)

    import torch

    from exporter.graph.writer import build_decoder
    from exporter.source.model import load_model, resolve_model

    model, _ = load_model(resolve_model(args.model))
    with torch.no_grad():
        proto = build_decoder(model, share_tied=False)
    fixed = {node.name for node in proto.graph.node if node.name.startswith("/lm_head/")}
    skeleton, matmuls = strip_matmuls(proto)
    del proto
    layer_shapes = {(k, n) for name, (_, _, k, n) in matmuls.items() if name not in fixed}
    formats = tuple(f for f in args.formats.split(",") if f and f != REFERENCE)
    passes = []
    for p in range(args.repeat):
        started = time.strftime("%H:%M:%S")
        passes.append(one_pass(skeleton, matmuls, fixed, formats, tuple(sorted(layer_shapes)), args.threads))
        result = passes[-1]
        print(f"pass {p + 1} ({started}): int4-b32 step {result['reference_step_ms']:.2f} ms, "
              f"{result['reference_ns_per_weight']:.4f} ns per weight in the layer probe")
        print(f"{'format':16s} {'layer probe':>11s} {'graph step':>10s} {'graph per weight':>16s}")
        for name, row in result["formats"].items():
            print(f"{name:16s} {row['probe']:11.3f} {row['graph_step']:10.3f} {row['graph_per_weight']:16.3f}")
    if args.json:
        args.json.write_text(json.dumps(passes, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
