"""Micro-benchmarks of this machine for the measured `host` profile: RAM, memory bandwidth, matmul throughput and
the five decode-cost figures of the cost model (exporter/device/cost_model.py). Each returns plain figures.

They run ONNX Runtime graphs built here (chains of MatMulNBits / MatMul nodes sized like SmolLM2's
projections); `exporter validate`'s load gauge reuses the same chains."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from exporter.device.cost_model import HEAD_SPLIT_COST, ROW_SPLIT_COST
from exporter.device.profiles import Hardware
from exporter.errors import ExporterError, ProfileError
from exporter.settings import cache_dir


# Part of the kept measurement's key: measure again where the method changes.
HOST_MEASUREMENT_VERSION = 1
# Measurements whose median is kept: one decides every later plan on the machine, and single ones spread widely here
# (node_us 1.7-2.8 us in runs minutes apart).
HOST_MEASUREMENTS = 3


@functools.lru_cache(maxsize=None)  # read once per process
def measure_host() -> Hardware:
    """This machine's figures (measure_hardware), measured once per machine and ONNX Runtime release and kept in
    EXPORTER_CACHE/host (delete the file to measure again). Measured afresh in every process, the decode costs moved a
    few percent between runs (`factor_node_us` 2.9 and 6.0 us a minute apart) and with them any plan that prices
    graph nodes: kept, the same command gives the same plan, as the kept format costs do for the decode ceiling."""
    return kept_hardware(cache_dir() / "host")


def kept_hardware(folder: Path | None) -> Hardware:
    """measure_hardware(), read from or written to `folder` under a key of this machine (CPU model, cores, RAM) and
    ONNX Runtime release; measured and not kept where `folder` is None."""
    import hashlib
    import json
    import platform

    if folder is None:
        return measure_hardware()
    try:
        import onnxruntime

        release = onnxruntime.__version__
    except ImportError:
        release = None
    key = json.dumps([HOST_MEASUREMENT_VERSION, release, platform.machine(), _cpu_model(), os.cpu_count(),
                      _ram_bytes()])
    path = folder / f"hardware-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        try:
            return Hardware(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            pass  # unreadable or from another layout: measured again below
    hardware = median_hardware([measure_hardware() for _ in range(HOST_MEASUREMENTS)])
    _keep(path, dataclasses.asdict(hardware))
    return hardware


def _keep(path: Path, figures: dict) -> None:
    """Write `figures` to `path` as JSON whole or not at all (a temporary file, then a rename): another process
    reading the cache never sees half a file."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    temporary.write_text(json.dumps(figures, indent=1))
    temporary.replace(path)


def median_hardware(measured: list[Hardware]) -> Hardware:
    """Each figure of `measured` (one machine's measurements) at its median, the first one's sources."""
    import statistics

    def median(figures: list[dict]) -> dict:
        return {key: statistics.median(f[key] for f in figures) for key in figures[0] if all(key in f for f in figures)}

    first = measured[0]
    return dataclasses.replace(
        first, memory_bandwidth_gbs=statistics.median(h.memory_bandwidth_gbs for h in measured),
        compute_tflops=median([h.compute_tflops for h in measured]),
        decode_costs=median([h.decode_costs for h in measured]),
        sources={name: f"{source}; the median of {len(measured)} measurements" if len(measured) > 1 else source
                 for name, source in first.sources.items()})


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError) as e:
        raise ProfileError(f"cannot measure this machine's memory: {e}") from None


def measure_hardware() -> Hardware:
    """Measure this machine's RAM, memory bandwidth, fp32 matmul throughput and decode costs (about 15 s on this
    project's 2-core machines)."""
    import numpy as np  # here, so that loading device profiles does not import numpy

    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    ram_bytes = _ram_bytes()

    # Bandwidth: copy a large array (well beyond any cache) and count bytes read + written.
    # 256 MB, or less on small machines so the measurement cannot push them into swap.
    n = min(256 << 20, ram_bytes // 16) // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    best_copy = math.inf
    for _ in range(4):  # the first copy also faults dst's pages in; best-of drops it
        t = time.perf_counter()
        np.copyto(dst, src)
        best_copy = min(best_copy, time.perf_counter() - t)
    bandwidth_gbs = 2 * src.nbytes / best_copy / 1e9
    del src, dst

    # Compute: fp32 matmul through numpy's BLAS (all cores), best of a few.
    size = 1024
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b  # warm up BLAS threads
    best_mm = math.inf
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best_mm = min(best_mm, time.perf_counter() - t)
    fp32_tflops = 2 * size**3 / best_mm / 1e12

    where = f"measured on this machine at {stamp}"
    decode_costs = _measure_decode_costs()
    return Hardware(
        # RAM is sized in binary units, so an "8 GB" machine reads as ~8 here; GB/s is decimal.
        memory_gb=round(ram_bytes / 2**30, 2),
        memory_bandwidth_gbs=round(bandwidth_gbs, 2),
        # fp16/int8 are left out: numpy has no representative kernels for them.
        compute_tflops={"fp32": round(fp32_tflops, 4)},
        sources={
            "memory_gb": f"{where} (os.sysconf page size x physical pages)",
            "memory_bandwidth_gbs": f"{where} (numpy copy of {n * 4 >> 20} MB, read + write bytes, best of 4)",
            "compute_tflops": f"{where} (numpy fp32 {size}x{size} matmul, best of 5)",
        },
        decode_costs=decode_costs,
    )


def probe_session(folder: str, nodes, k: int, n: int, small=(), large=None, inputs=None, outputs=None,
                  in_turn: bool = False, tokens: bool = False):
    """An ONNX Runtime session (CPU, default threads) of a synthetic graph x [1, k] -> y [1, n] (or `inputs` and
    `outputs`, {name: size} each) for micro-benchmarks. `small` (name, array) pairs are stored in the graph;
    `large` {name: array} go to an external file in `folder` (much faster to write and load than a serialized
    graph). `in_turn`: for sessions run in turn, the threads spin between a run's nodes, as a decode's do, and stop
    at its end, so that they take no core from the next session's run. `tokens`: inputs and outputs of shape
    [batch, sequence, size], as a decoder's activations (ONNX Runtime computes their shapes as it runs), not [1, size]."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    initializers = [numpy_helper.from_array(a, name) for name, a in small]
    stem, offset = f"probe{len(os.listdir(folder))}", 0  # a new file each: sessions may map theirs
    with open(os.path.join(folder, stem + ".bin"), "wb") as data:
        for name, array in (large or {}).items():
            tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                 dims=array.shape, data_location=TensorProto.EXTERNAL)
            for key, value in (("location", stem + ".bin"), ("offset", str(offset)), ("length", str(array.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            array.tofile(data)
            offset += array.nbytes
            initializers.append(tensor)
    inputs, outputs = inputs or {"x": k}, outputs or {"y": n}
    dims = ["batch", "sequence"] if tokens else [1]
    vectors = {name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [*dims, size])
               for name, size in {**inputs, **outputs}.items()}
    graph = helper.make_graph(nodes, "probe", [vectors[x] for x in inputs], [vectors[y] for y in outputs],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    path = os.path.join(folder, stem + ".onnx")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if in_turn:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def int4_chain(length: int, sizes: tuple[int, int], block: int = 32, distinct: bool = False,
               bits: int = 4) -> tuple[list, dict]:
    """Nodes and weights of `length` MatMulNBits (4 bits or `bits`, accuracy level 4, as exported) alternating
    sizes[0] -> sizes[1] -> sizes[0], from x to y (int4_sequence).

    ONNX Runtime shares identical pre-packed weights within a session, so without `distinct` every
    node reads the same weights (in cache whatever `length` is); `distinct` makes each node's differ,
    so the chain reads all of them from memory as a decode step does."""
    return int4_sequence(_alternating(length, sizes), block, distinct, bits)


def int4_sequence(shapes: list[tuple[int, int]], block: int = 32, distinct: bool = False,
                  bits: int = 4) -> tuple[list, dict]:
    """Nodes and weights of one MatMulNBits per (in, out) of `shapes`, chained from x to y (see int4_chain)."""
    import numpy as np
    from onnx import helper

    large = {}
    nodes = [matmul_nbits_node(i, x, y, rows, cols, bits, block, False, large)
             for i, (x, y, rows, cols) in enumerate(_sequence(shapes))]
    return nodes, _distinct(large) if distinct else large


def matmul_nbits_node(i: int, x: str, y: str, k: int, n: int, bits: int, block: int, zero_points: bool, large: dict):
    """A MatMulNBits node x [1, k] -> y [1, n] (accuracy level 4, as exported), its weights added to `large` as
    b<i>, s<i> and, with `zero_points`, z<i>: packed codes, float32 scales, packed zero points."""
    import numpy as np
    from onnx import helper

    blocks = -(-k // block)
    large[f"b{i}"] = np.resize(np.arange(256, dtype=np.uint8), (n, blocks, block * bits // 8))
    large[f"s{i}"] = np.full(n * blocks, 0.01, np.float32)
    inputs = [x, f"b{i}", f"s{i}"]
    if zero_points:
        large[f"z{i}"] = np.full(n * -(-blocks * bits // 8), 0x88 if bits == 4 else 1 << (bits - 1), np.uint8)
        inputs.append(f"z{i}")
    return helper.make_node("MatMulNBits", inputs, [y], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=4)


def fp32_chain(length: int, sizes: tuple[int, int]) -> tuple[list, dict]:
    """Nodes and weights of `length` fp32 MatMul alternating sizes[0] -> sizes[1] -> sizes[0], from x to
    y, each with its own weights (see int4_chain)."""
    import numpy as np
    from onnx import helper

    nodes, large = [], {}
    for i, (x, y, rows, cols) in enumerate(_sequence(_alternating(length, sizes))):
        large[f"w{i}"] = np.full((rows, cols), 0.01, np.float32)
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y]))
    return nodes, _distinct(large)


def _alternating(length: int, sizes: tuple[int, int]) -> list[tuple[int, int]]:
    """(in, out) of `length` nodes alternating sizes[0] -> sizes[1] -> sizes[0]."""
    return [sizes if i % 2 == 0 else sizes[::-1] for i in range(length)]


def _sequence(shapes: list[tuple[int, int]]):
    """(input, output, in size, out size) of each node of a chain from x to y through `shapes`."""
    x = "x"
    for i, (rows, cols) in enumerate(shapes):
        y = "y" if i == len(shapes) - 1 else f"t{i}"
        yield x, y, rows, cols
        x = y


def _distinct(weights: dict) -> dict:
    """Make each array differ from the others, in place: its first element(s) encode its index (floats
    barely move, so the activations of a long chain stay as they were)."""
    for i, array in enumerate(weights.values()):
        flat = array.reshape(-1)
        if flat.dtype.kind == "f":
            flat[0] += i * 1e-6
        else:
            flat[:2] = (i % 256, i // 256)
    return weights


def last_level_cache_bytes() -> int:
    """The largest CPU cache of this machine (Linux sysfs; 32 MB, the project's x86 host's L3, where it
    cannot be read: edge boards and phones have less)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except (OSError, ValueError, IndexError):
            continue
    return max(sizes, default=32 << 20)


# Decode-shaped chains for the bandwidth figures: SmolLM2-135M's MLP (576 <-> 1536, the project's
# reference model). Fixed, not scaled to the model being validated: the host is measured once per
# process, before any model is known (budgets are planned from it too), and what sets the bandwidth is
# the size class of the matrices (a decode step of the small decoders this tool targets reads most of
# its bytes from 0.1-3.5 MB matrices, with a thread-pool join between them), which these shapes share.
# The chain's length does scale, with the cache: STREAM_CACHE_MULTIPLE x the last-level cache, so a
# run reads its weights from memory, not from a cache that held them since the previous run. 3x was not
# enough: the 32 MB L3 of this project's host still served part of a 96 MB chain (fp32 34-36 GB/s vs
# 29-33 at 8x and 28-31 at 16x; three alternating measurements each, `exporter validate` of 20% SmolLM2
# exports then predicted int4 0.70 and fp32 0.75 of the measured decode at 3x, 0.78 and 0.85 at 8x,
# 0.80 and 0.88 at 16x, before the load factor). 8x: the smallest that reads from memory.
DECODE_SHAPES = (576, 1536)
STREAM_CACHE_MULTIPLE = 8
# ... and at most this much: this project's 2-core VMs later read a 480 MB L3 from sysfs, and the 3.8 GB chain took
# 145 s a measurement (a third of the test suite) for what 512 MB gives within 10% (gemv bandwidth, idle, 2026-12-05:
# 25.1 GB/s at 3.8 GB, 23.5 at 1 GB, 22.9-24.3 at 512 MB, 26.3-26.8 at 256 MB; about 7 s at 512 MB).
STREAM_MAX_BYTES = 512 << 20


def stream_bytes() -> int:
    """The weight bytes a streamed chain holds: STREAM_CACHE_MULTIPLE x the last-level cache, at most
    STREAM_MAX_BYTES and a sixteenth of the RAM."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(STREAM_CACHE_MULTIPLE * last_level_cache_bytes(), STREAM_MAX_BYTES, ram // 16)


def solve_decode_costs(fp32_node_s: float, fp32_node_bytes: int, int4_node_s: float, int4_node_bytes: int,
                       int4_node_params: int, node_s: float) -> dict[str, float]:
    """The bandwidth figures from the seconds per node of the fp32 and int4 chains beyond the caches,
    less the fixed cost per node `node_s` (the cost model's overhead term counts it):
    gemv_bandwidth_gbs = fp32 bytes / time; int4_ns_per_param = what an int4 weight takes beyond
    reading its bytes at that bandwidth (the dequantisation the reads do not hide), so that the cost
    model's bytes / gemv_bandwidth + weights x int4_ns_per_param is the int4 chain's time: int4
    weights stream at their own effective bytes/s (exporter.device.cost_model.int4_stream_gbs). Not below 0:
    where int4 streams faster per byte than fp32, the model counts its bytes at the fp32 rate."""
    fp32_s, int4_s = max(fp32_node_s - node_s, 1e-12), max(int4_node_s - node_s, 1e-12)
    bandwidth = fp32_node_bytes / fp32_s
    extra_s = max(0.0, int4_s - int4_node_bytes / bandwidth)
    return {"gemv_bandwidth_gbs": round(bandwidth / 1e9, 3),
            "int4_ns_per_param": round(extra_s / int4_node_params * 1e9, 5)}


def _measure_decode_costs() -> dict[str, float]:
    """What one decode step costs in ONNX Runtime here (about 10 s; empty where onnxruntime or onnx
    is missing, and the cost model then uses its estimates):

    * gemv_bandwidth_gbs: bytes/s of a chain of fp32 MatMul alternating DECODE_SHAPES (3.5 MB each),
      STREAM_CACHE_MULTIPLE x the last-level cache in all, less node_us per node. Not one large matrix:
      one 64 MB matrix (2 threads, one long sequential read) streams much faster than a decode step's
      many medium ones, each a short stream ended by a thread-pool join; measured that way, the cost
      model predicted decode ~27% fast on both int4 and fp32 artifacts;
    * int4_ns_per_param: the same chain in MatMulNBits (4 bits, block 32, accuracy level 4, as
      exported), its time beyond its bytes at gemv_bandwidth_gbs (solve_decode_costs): measured beyond
      the caches, as a decode step reads its weights, the dequantisation counts only where the reads
      do not hide it (in cache it would count whole);
    * node_us: a MatMulNBits node takes node_us + weights x c when its weights are in cache, solved from
      chains of rank-64 factors (576 -> 64 -> 576, the commonest node of a factorized graph) and of
      MLP-sized nodes (576 -> 1536 -> 576), both sharing one node's weights (see int4_chain);
    * int8_ns_per_param: as int4_ns_per_param, for the same chain in 8-bit MatMulNBits (the int8 graphs');
    * factor_node_us: what one rank-64 factor node (576 -> 64 -> 576 in MatMulNBits) adds beyond its
      bytes at the int4 stream rate between the MLP-sized reads of the streamed chain, as in a decode
      step: a short stream that starts cold, besides the node's fixed cost. The price of the
      second-stage node a factorization adds (exporter.compress.allocate's node price, `--latency-aware`).

    Each figure comes from the fastest of several runs: other load on the machine only slows a run,
    and `exporter validate` scales the prediction by the load it measures (mean run / fastest run).
    """
    import numpy as np

    from exporter.device.cost_model import stream_gbs

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return {}

    def best(sess, k: int, runs: int, seconds: float = 0.2) -> float:
        """Fastest of `runs` runs, fewer (at least 3) past `seconds`."""
        feed = {"x": np.ones((1, k), np.float32)}
        sess.run(None, feed)
        fastest, start = math.inf, time.perf_counter()
        for i in range(runs):
            t = time.perf_counter()
            sess.run(None, feed)
            fastest = min(fastest, time.perf_counter() - t)
            if i >= 2 and t - start > seconds:
                break
        return fastest

    def per_node(folder: str, sizes: tuple[int, int], short: int, long: int) -> float:
        """Seconds per MatMulNBits node of a chain alternating `sizes`: (long chain - short chain) / extra nodes."""
        times = []
        for length in (long, short):
            nodes, large = int4_chain(length, sizes)
            times.append(best(probe_session(folder, nodes, sizes[0], sizes[0], (), large), sizes[0], 20))
        return (times[0] - times[1]) / (long - short)

    def streamed(folder: str, chain) -> tuple[float, int]:
        """Seconds per node and weight bytes per node of `chain` (fp32_chain or int4_chain with distinct
        weights), as long as needed to hold `stream_bytes()`."""
        node_bytes = sum(a.nbytes for a in chain(2, DECODE_SHAPES)[1].values()) // 2
        length = max(4, math.ceil(stream_bytes() / node_bytes))
        nodes, large = chain(length, DECODE_SHAPES)
        session = probe_session(folder, nodes, DECODE_SHAPES[0], DECODE_SHAPES[0], (), large)
        del large
        return best(session, DECODE_SHAPES[0], 40) / length, node_bytes

    factor, (hidden, inner) = (576, 64), DECODE_SHAPES
    with tempfile.TemporaryDirectory(prefix="exporter-probe-") as folder:
        # Per node t = node + params x c: rank-64 factors (36,864 weights) and MLP-sized nodes (884,736), in cache.
        small, large = factor[0] * factor[1], hidden * inner
        t_small, t_large = per_node(folder, factor, 2, 202), per_node(folder, (hidden, inner), 2, 18)
        in_cache_s = max(0.0, (t_large - t_small) / (large - small))
        node_s = max(0.0, t_small - small * in_cache_s)

        fp32_s, fp32_bytes = streamed(folder, fp32_chain)
        int4_s, int4_bytes = streamed(folder, lambda length, sizes: int4_chain(length, sizes, distinct=True))
        costs = solve_decode_costs(fp32_s, fp32_bytes, int4_s, int4_bytes, large, node_s)
        # The streamed int4 chain with a rank-64 factor pair after every MLP-sized pair: per factor node,
        # the time it adds to that chain's (int4_s per node) beyond its bytes at the int4 stream rate (at
        # least the in-cache node cost).
        pairs = max(2, math.ceil(stream_bytes() / (2 * int4_bytes)))
        nodes, weights = int4_sequence([(hidden, inner), (inner, hidden), factor, factor[::-1]] * pairs, distinct=True)
        mixed_s = best(probe_session(folder, nodes, hidden, hidden, (), weights), hidden, 40) / pairs
        del weights
        factor_bytes = sum(a.nbytes for a in int4_chain(2, factor)[1].values()) / 2
        added_s = (mixed_s - 2 * int4_s) / 2 - factor_bytes / (stream_gbs(costs, "int4") * 1e9)
        costs["factor_node_us"] = round(max(node_s, added_s) * 1e6, 4)

        # int8: the int4 solve, on the same chain at 8 bits.
        int8_s, int8_bytes = streamed(folder, lambda length, sizes: int4_chain(length, sizes, distinct=True, bits=8))
        int8 = solve_decode_costs(fp32_s, fp32_bytes, int8_s, int8_bytes, large, node_s)["int4_ns_per_param"]
    return {**costs, "node_us": round(node_s * 1e6, 4), "int8_ns_per_param": int8}


# Per-format decode cost (`--weights auto`'s decode ceiling, exporter.device.cost_model.format_costs). ONNX Runtime's
# CPU MatMulNBits does not take time in proportion to bytes: its work per block (scale, zero point, the int8
# activations' block sums) makes block 128 ~0.77x block 32's time at the same bits and 2-bit grids no faster than
# 4-bit ones at block 64. 8-bit blocks come out 0.15-0.4 slower here than in a decode graph, where int8-b128 takes
# ~0.93x int4-b32's time (benchmarks/RESULTS.md, "A decode ceiling"; not from the probe's nodes running back to back:
# elementwise nodes between them changed nothing). Each format is timed
# on the model's own MatMulNBits shapes (a decoder layer's units, each reading its own input, as many layers as hold
# FORMAT_GRAPH_CACHE_MULTIPLE x the last-level cache at int4-b32, at most FORMAT_GRAPH_MAX_BYTES and, for small
# models, FORMAT_GRAPH_MAX_NODES: their weights stay in cache, as they do when they decode).
FORMAT_GRAPH_CACHE_MULTIPLE = 4
FORMAT_GRAPH_MAX_BYTES = 128 << 20
FORMAT_GRAPH_MAX_NODES = 192  # SmolLM2-135M: 176
# Each format's ratio to the reference: the median of FORMAT_COST_PASSES passes (the order alternating, so that the
# machine's state falls on early and late formats alike) of FORMAT_COST_PAIRS runs each, paired with a run of the
# reference. Each session's threads spin between its run's nodes, as a decode's do, and stop at the run's end: left
# spinning, one session's threads took a core from the other's run (the reference at twice its time), and not spinning
# at all, every node paid the threads' wake-up (a row split at 20-25 us where a decode pays 13-15). Each unit reads an
# input of its own, [batch, sequence, size] (format_graph), bound once (format_io): read from one input, ONNX Runtime's
# optimizer merged the offset grids' block sums of all units into one per input width, and from [1, size] inputs it
# folded a split's shape nodes away, so the table put the offset grid at 1.08x and a split at 11 us where SmolLM2's
# graphs paid more (plans at 1.0 raced 0.89-0.96x our int4-b32 graph). So measured: int4-b32-offset ~1.2-1.26x,
# int8-b32 ~1.48x, a split ~15.5 us (benchmarks/RESULTS.md, "Each probe unit reads its own input").
FORMAT_COST_PAIRS = 30
FORMAT_COST_PASSES = 5
FORMAT_COST_VERSION = 7  # part of the cached file's key: measure again where the method changes
# What a row split adds to a unit (its second MatMulNBits and the reorder, exporter.graph.matmul_nbits), in
# microseconds per split under cost_model.ROW_SPLIT_COST: each layer shape's unit split in half on the reference
# format, timed beside the unsplit reference.
# Five nodes at node_us priced a split at 8.7 us where SmolLM2's 52 MB graph took about 13-15 (benchmarks/RESULTS.md,
# "A row split's own time").
ROW_SPLIT = "row-split"
# The output head split the same way, timed in pairs with the head alone (cost_model.HEAD_SPLIT_COST): its parts'
# order is put back over the whole vocabulary's logits each step (SmolLM2: 49152), not a layer unit's outputs.
HEAD_SPLIT = "head-split"


def format_graph(name: str, shapes: list[tuple[int, int]], reference: str = "int4-b32") -> tuple[list, dict, dict]:
    """Nodes, small initializers and (distinct) weights of one MatMulNBits on format `name` per (in, out) of
    `shapes`, each reading its own graph input x<i> and writing its own output y<i> ([batch, sequence, size] each,
    see format_io), as exported: packed codes, float32 scales, packed zero points where asymmetric; an offset grid
    reads its input's block sums as more K columns (the writer's nodes). ROW_SPLIT: each unit's rows in two halves
    on `reference`, put back in row order as the writer does (why each unit has its own input: the comment above
    FORMAT_COST_PAIRS)."""
    import numpy as np

    from exporter.compress.grid import QuantFormat  # numpy only: the format names' one grammar
    from exporter.graph.matmul_nbits import block_sums_nodes, row_order_nodes

    if name == ROW_SPLIT:
        fmt, nodes, small, large = QuantFormat.parse(reference), [], {}, {}
        for i, (rows, cols) in enumerate(shapes):
            half, parts = (cols + 1) // 2, [f"y{i}a", f"y{i}b"]  # the even rows, then the odd ones
            nodes.append(matmul_nbits_node(2 * i, f"x{i}", parts[0], rows, half, fmt.bits, fmt.block_size,
                                           not fmt.symmetric, large))
            nodes.append(matmul_nbits_node(2 * i + 1, f"x{i}", parts[1], rows, cols - half, fmt.bits,
                                           fmt.block_size, not fmt.symmetric, large))
            # each row's place in the halves' concatenation: every place moves, as a split's rows do
            order = np.concatenate([np.arange(0, cols, 2), np.arange(1, cols, 2)]).argsort(kind="stable")
            small[f"order{i}"] = order.astype(np.int32).reshape(1, 1, cols)
            nodes += row_order_nodes(parts, f"order{i}", f"y{i}", f"split{i}")
        return nodes, small, _distinct(large)

    fmt = QuantFormat.parse(name)
    block = fmt.block_size
    nodes, small, large = [], {}, {}
    for i, (rows, cols) in enumerate(shapes):
        x, k = f"x{i}", rows
        if fmt.offset:
            nodes += block_sums_nodes(x, block, f"sums{i}")
            x, k = nodes[-1].output[0], rows + fmt.blocks(rows)  # K as the writer's offset_inputs
        nodes.append(matmul_nbits_node(i, x, f"y{i}", k, cols, fmt.bits, block, not fmt.symmetric, large))
    return nodes, small, _distinct(large)


def format_io(shapes: list[tuple[int, int]]) -> tuple[dict, dict, dict]:
    """format_graph's inputs and outputs ({name: size} each, for probe_session) and a feed of one token's
    activations for its inputs."""
    import numpy as np

    ones = {k: np.ones((1, 1, k), np.float32) for k in {k for k, _ in shapes}}
    return ({f"x{i}": k for i, (k, _) in enumerate(shapes)}, {f"y{i}": n for i, (_, n) in enumerate(shapes)},
            {f"x{i}": ones[k] for i, (k, _) in enumerate(shapes)})


def measure_format_costs(names: tuple[str, ...], layer: tuple[tuple[int, int], ...], reference: str = "int4-b32",
                         passes: int | None = None, pairs: int | None = None,
                         head: tuple[int, int] | None = None) -> dict[str, float]:
    """Nanoseconds per weight of each format on a decoder layer's MatMulNBits shapes `layer` ((in, out) each),
    repeated to be read from memory as a decode step reads them (ONNX Runtime's default threads): each a ratio to
    `reference`, timed in pairs (the reference's graph stays loaded and each run of a format's graph is paired with
    one of it, the order alternating; each session's threads stop spinning at the end of its run), the median of
    `pairs` (FORMAT_COST_PAIRS) pairs per pass and of `passes` (FORMAT_COST_PASSES) passes, times the reference's own
    median figure (about 3 s per format on this project's 2-core host); under ROW_SPLIT_COST, a row split's time
    beyond the unsplit reference unit, in microseconds per split; and, with the output head's shape `head`, under
    HEAD_SPLIT_COST the same for a split of the head (its logits put back in row order)."""
    import numpy as np
    import onnxruntime as ort

    names = tuple(name for name in dict.fromkeys((*names, ROW_SPLIT)) if name != reference)
    layer_weights = sum(k * n for k, n in layer)
    graph_bytes = min(FORMAT_GRAPH_CACHE_MULTIPLE * last_level_cache_bytes(), FORMAT_GRAPH_MAX_BYTES)
    layers = min(math.ceil(graph_bytes / (layer_weights * 0.625)), FORMAT_GRAPH_MAX_NODES // len(layer))
    shapes = list(layer) * max(1, layers)  # int4-b32: 0.625 bytes per weight
    ratios: dict[str, list[float]] = {name: [] for name in names}
    seconds: list[float] = []

    def session(folder: str, name: str, units: list[tuple[int, int]]):
        """The format's session and its inputs and outputs bound once, as a decode's are between its nodes (fed
        through `run`, converting 176 inputs and outputs took 15% of the reference's time)."""
        nodes, small, large = format_graph(name, units, reference)
        inputs, outputs, feed = format_io(units)
        loaded = probe_session(folder, nodes, 0, 0, tuple(small.items()), large, inputs=inputs, outputs=outputs,
                               in_turn=True, tokens=True)
        bound = loaded.io_binding()
        for x, array in feed.items():
            bound.bind_ortvalue_input(x, ort.OrtValue.ortvalue_from_numpy(array))
        for y, n in outputs.items():
            bound.bind_ortvalue_output(y, ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, n), np.float32)))
        for _ in range(3):
            loaded.run_with_iobinding(bound)
        return loaded, bound

    def timed(loaded) -> float:
        start = time.perf_counter()
        loaded[0].run_with_iobinding(loaded[1])
        return time.perf_counter() - start

    def paired_passes(base, graphs: dict, folder: str, record: list[float]) -> None:
        """Each of `graphs` ({name: (format, shapes)}) timed in pairs with `base`, passes in alternating order."""
        order = tuple(graphs)
        for names_in_turn in (order[::1 - 2 * (p % 2)] for p in range(passes or FORMAT_COST_PASSES)):
            for name in names_in_turn:
                other, paired = session(folder, *graphs[name]), []
                for i in range(pairs or FORMAT_COST_PAIRS):  # the machine's drift falls on both graphs of a pair alike
                    first, second = (base, other) if i % 2 == 0 else (other, base)
                    a, b = timed(first), timed(second)
                    base_s, other_s = (a, b) if i % 2 == 0 else (b, a)
                    record.append(base_s)
                    paired.append(other_s / base_s)
                ratios[name].append(float(np.median(paired)))
                del other
                for file in os.listdir(folder):  # up to 2 x FORMAT_GRAPH_MAX_BYTES a graph (8 bits)
                    os.remove(os.path.join(folder, file))

    head_seconds: list[float] = []
    with tempfile.TemporaryDirectory(prefix="exporter-formats-") as kept, \
            tempfile.TemporaryDirectory(prefix="exporter-formats-") as folder:
        base = session(kept, reference, shapes)
        paired_passes(base, {name: (name, shapes) for name in names}, folder, seconds)
        del base
        if head:  # paired with the head alone (as a difference of two ratios to the layer's graph it would carry
            ratios[HEAD_SPLIT] = []  # both ratios' noise, ~1% of that graph: ~40 us)
            base = session(kept, reference, [tuple(head)])
            paired_passes(base, {HEAD_SPLIT: (ROW_SPLIT, [tuple(head)])}, folder, head_seconds)
            del base
    reference_ns = float(np.median(seconds)) / (len(shapes) // len(layer) * layer_weights) * 1e9
    costs = {reference: round(reference_ns, 6)}
    costs |= {name: round(float(np.median(ratios[name])) * reference_ns, 6) for name in names}
    split_ns = costs.pop(ROW_SPLIT) - costs[reference]  # per weight of the graph: over its units, per split
    costs[ROW_SPLIT_COST] = round(split_ns * layer_weights / len(layer) / 1e3, 4)
    if head:
        head_s = float(np.median(head_seconds))
        costs[HEAD_SPLIT_COST] = round((float(np.median(ratios[HEAD_SPLIT])) - 1) * head_s * 1e6, 4)
    return costs


def run_apart(module: str, *args: str, stdin: str | None = None, failure: str,
              error: type[ExporterError] = ExporterError):
    """`python -m module args` in a fresh interpreter (this package importable), its stdout read as JSON; where it
    fails, `error` says "`failure`: " and the last line of its stderr."""
    import json
    import subprocess
    import sys

    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", module, *args], input=stdin, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise error(f"{failure}: {last}")
    return json.loads(done.stdout)


def measure_format_costs_apart(names: tuple[str, ...], layer: tuple[tuple[int, int], ...],
                               head: tuple[int, int] | None = None) -> dict[str, float]:
    """measure_format_costs in a fresh interpreter, as an app's decode runs: nothing of the calling process's state
    in the timings. Measured inside three exports (after the model's load and pricing), the offset grid came out at
    1.03-1.05x int4-b32 where fresh processes put it at 1.07-1.09x, and the 105.5 MB plan bought 78 offset grids
    that decoded at 0.90x the builder (benchmarks/RESULTS.md, "The format table's threads spin within a run")."""
    import json

    request = {"names": list(names), "layer": [list(shape) for shape in layer], "passes": FORMAT_COST_PASSES,
               "pairs": FORMAT_COST_PAIRS, "head": list(head) if head else None}
    return run_apart("exporter.device.host_probes", stdin=json.dumps(request),
                     failure="cannot time the weight formats in ONNX Runtime", error=ProfileError)


def format_costs(names: tuple[str, ...], layer: tuple[tuple[int, int], ...], cache: Path | None = None,
                 head: tuple[int, int] | None = None) -> dict[str, float]:
    """measure_format_costs_apart, kept in `cache` (a folder) for this machine, ONNX Runtime release, set of formats,
    layer shapes and head shape: measured once, the same figures give every later export the same plan."""
    import hashlib
    import json
    import platform

    import onnxruntime

    key = json.dumps([FORMAT_COST_VERSION, sorted(names), sorted(layer), list(head) if head else None,
                      onnxruntime.__version__, platform.machine(), platform.processor(), _cpu_model(), os.cpu_count()])
    path = cache / f"format-costs-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json" if cache else None
    if path is not None and path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    costs = measure_format_costs_apart(names, layer, head)
    if path is not None:
        _keep(path, costs)
    return costs


def _cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), '' where unreadable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":  # measure_format_costs_apart's child: a request as JSON on stdin, the costs on stdout
    import json
    import sys

    _request = json.load(sys.stdin)
    print(json.dumps(measure_format_costs(tuple(_request["names"]), tuple(map(tuple, _request["layer"])),
                                          passes=_request["passes"], pairs=_request["pairs"],
                                          head=tuple(_request["head"]) if _request.get("head") else None)))
