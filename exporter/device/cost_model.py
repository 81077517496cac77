"""From a device profile's RAM and latency budgets to a byte budget for the model's weights.

RAM: weights + KV cache at the profile's max context + runtime overhead must fit the model's RAM
budget. Decode: the cost model below (the one `exporter validate` checks against measurements): a
decode budget of t ms, less the per-node cost of the graph and the KV cache traffic, allows the weight
bytes that stream in the rest of it at the precision's effective rate. Prefill: compute-bound (2 FLOPs
per parameter per prompt token), so a prefill budget of t ms for n tokens allows t * effective
throughput / (2 n) parameters.

`predict` runs the same model forward on an exported artifact (its stored bytes, its graph's nodes and
quantized weights): the figures `exporter validate` compares with measurements and the report shows.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from exporter.errors import BudgetError, ExporterError
from exporter.precisions import check_activations

if TYPE_CHECKING:  # only named in annotations: importing it would import torch
    from exporter.artifact.manifest import Manifest
    from exporter.compress.factorize import Projection

MB = 1_000_000
# ONNX Runtime's arena, activations and tokenizer of a small decoder: an estimate, checked against
# measured RSS by the validation step.
RUNTIME_OVERHEAD_MB = 100.0
# Fraction of the datasheet bandwidth a decode loop reaches (the project's CPU machines reach
# about 20 of ~28 GB/s copy bandwidth in ONNX Runtime): an estimate.
BANDWIDTH_EFFICIENCY = 0.7
# Fraction of peak matrix throughput a prefill reaches in ONNX Runtime: an estimate.
COMPUTE_EFFICIENCY = 0.5
# int4 and int8: 4-bit and 8-bit weights plus one fp32 scale per block of 32 (MatMulNBits, symmetric).
BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0 + 4.0 / 32, "int4": 0.5 + 4.0 / 32}
# The KV cache's element size by the graph's activation type (exporter.precisions.ACTIVATIONS says which
# activations each weight precision is written with).
KV_BYTES_PER_ELEM = {"fp32": 4.0, "fp16": 2.0}
# The KV cache's share of a decode step, as passes over it at the decode bandwidth. Measured by parts
# (docs/device-profiles.md, "Decode cost model"): 30 GroupQueryAttention nodes at 128 tokens of context take 1.04 ms on
# this machine, about 5 passes: attention over the cache runs well below the bandwidth of a weight
# read. A shared past/present buffer (the fused graph as exporter.runtime.generation runs it) removes the copies
# of a growing cache but not this; counting one pass for it under-predicted int4 decode (validate:
# 0.75-0.84 of the measured step), so the term stays at the measured 5.
KV_PASSES = 5
# Nodes of the fused graph (graph.writer) that budget planning counts, before the ranks are known: per
# layer 2 skip-norms, attention, the dense q/k/v, o, gate/up and down MatMuls, gate/up's Split, SiLU's
# Sigmoid and 2 Muls (11), plus at most 8 more when every projection is factorized (one second-stage
# MatMul each and q/k/v's Split; SmolLM2-135M: 341 nodes dense, 455 at 20% FLRC, 581 at most); and
# the embedding, final norm, lm_head and attention-mask nodes.
PLANNING_NODES_PER_LAYER = 19
PLANNING_NODES_FIXED = 11

# Decode cost model (exporter validate): per token, decode_ms = bandwidth_ms + overhead_ms + dequant_ms:
#   bandwidth_ms = (weights read + KV cache traffic) bytes / the bandwidth a decode step's matrix-vector
#                  products reach: many medium matrices (0.1-3.5 MB), each a short stream ended by a
#                  thread-pool join, read from memory (not one large matrix: that streams faster)
#   overhead_ms  = graph nodes x per-node cost
#   dequant_ms   = int4/int8 weights x their compute per weight not hidden behind those reads (a decode
#                  step's matrices are small: much of it is not)
# So int4 weights stream at their own effective rate, int4_stream_gbs(costs) bytes/s.
# The fifth figure, factor_node_us, is not in the step's sum: it prices the node a factorization adds
# when ranks are allocated latency-aware (node_params below, exporter.compress.allocate).
# A measured profile (host) carries all five figures in hardware.decode_costs (host_probes.measure_host:
# ONNX Runtime micro-benchmarks; bandwidth and int4 from decode-shaped chains beyond the caches, see
# host_probes._measure_decode_costs); other devices use the estimates below, labelled as such.
DECODE_COST_KEYS = ("gemv_bandwidth_gbs", "node_us", "int4_ns_per_param", "int8_ns_per_param", "factor_node_us")
# ESTIMATES for devices where nothing was measured, by the profile's first execution provider. CPU
# providers: about twice what measure_host() measured on this project's 2-core x86 host (ONNX Runtime
# 1.32: 1.1-1.5 us per node, int4 0.020 (then measured in cache) and int8 0.012 ns per weight), for
# the slower cores of edge boards and phones. CUDA: a kernel launch and its share of stream
# synchronisation per node: the fused graphs of SmolLM2-135M's shape decoded at 11-19 us per node on
# an H200 with a 16-core x86 host (340-631 nodes, 3.7-11.1 ms/step, weights read in well under 0.1 ms;
# onnxruntime-gpu 1.31.1, benchmarks/RESULTS.md, "On a GPU"), so 12 us is a floor for a Jetson's slower Arm cores;
# dequantisation assumed hidden behind the memory reads by the GPU's parallelism.
NODE_US_ESTIMATE = {"CPUExecutionProvider": 3.0, "CUDAExecutionProvider": 12.0}
# The price of the second-stage node a factorization adds (`--latency-aware`, exporter.compress.allocate): a
# small MatMul's time beyond its bytes between a decode step's larger reads (profiles: factor_node_us).
# CPU: about twice the host's measured 2.9-4.1 us (as above); CUDA: the launch, as for any node.
FACTOR_NODE_US_ESTIMATE = {"CPUExecutionProvider": 16.0, "CUDAExecutionProvider": 12.0}
DEQUANT_NS_ESTIMATE = {"CPUExecutionProvider": {"int4": 0.04, "int8": 0.025},
                       "CUDAExecutionProvider": {"int4": 0.0, "int8": 0.0}}
ESTIMATE_DEFAULT_PROVIDER = "CPUExecutionProvider"  # other providers (CoreML, QNN, XNNPACK): as for CPU
# Nodes whose input 1 is an int8 weight matrix (quantize_dynamic's graphs, as the exporter wrote int8 until
# 2026-12-05, and ORT's fused forms).
INT8_MATMULS = ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")


def kv_cache_bytes(config, context: int, bytes_per_elem: float = 4.0) -> float:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * context * bytes_per_elem


@dataclass
class WeightBudget:
    ram_bytes: float  # weights allowed by the RAM budget
    latency_bytes: float  # weights allowed by the decode latency budget
    prefill_bytes: float  # weights allowed by the prefill budget
    precision: str
    kv_cache_bytes: float

    @property
    def limits(self) -> dict[str, float]:
        return {"ram": self.ram_bytes, "decode latency": self.latency_bytes, "prefill latency": self.prefill_bytes}

    @property
    def bytes(self) -> float:
        return min(self.limits.values())

    @property
    def binding(self) -> str:
        return min(self.limits, key=self.limits.get)

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes": self.bytes, "binding": self.binding}


def weight_budget(profile, config, precision: str = "fp32", activations: str | None = None) -> WeightBudget:
    """The weight bytes a model may have on `profile` at `precision`. Decode: the cost model
    (decode_terms) solved for the weight bytes, counting the fused graph's nodes with every projection
    factorized (PLANNING_NODES_*) and the KV cache traffic at the profile's prompt length, as
    `exporter validate` predicts and measures it. `activations` ("fp32"/"fp16"; None: the precision's
    default, precisions.check_activations) sets the KV cache's element size."""
    per = BYTES_PER_PARAM[precision]
    kv_elem = KV_BYTES_PER_ELEM[check_activations(precision, activations)]
    kv = kv_cache_bytes(config, profile.budget.max_context, kv_elem)
    ram = profile.budget.model_ram_mb * MB - kv - RUNTIME_OVERHEAD_MB * MB
    costs, _ = decode_costs(profile)
    nodes = PLANNING_NODES_PER_LAYER * config.num_hidden_layers + PLANNING_NODES_FIXED
    kv_traffic = KV_PASSES * kv_cache_bytes(config, profile.budget.prefill_prompt_tokens, kv_elem)
    fixed_ms = decode_terms(kv_traffic, nodes, {}, costs)["decode_ms"]  # the step without its weights
    latency = max(profile.budget.decode_ms_per_token - fixed_ms, 0.0) / 1e3 * stream_gbs(costs, precision) * 1e9
    compute = profile.hardware.compute_tflops
    tflops = compute.get(precision) or compute.get("fp32") or max(compute.values())
    prefill_params = (profile.budget.prefill_ms / 1000.0 * tflops * 1e12 * COMPUTE_EFFICIENCY
                      / (2.0 * profile.budget.prefill_prompt_tokens))
    return WeightBudget(ram, latency, prefill_params * per, precision, kv)


def projection_budget(projections: list[Projection], total_params: int, budget_bytes: float,
                      precision: str = "fp32", min_rank: int = 1) -> int | None:
    """Parameters the decoder projections may keep so all weights fit `budget_bytes`.

    None when the dense model already fits. Raises BudgetError naming the smallest feasible budget
    when even rank `min_rank` everywhere does not fit.
    """
    per = BYTES_PER_PARAM[precision]
    if total_params * per <= budget_bytes:
        return None
    fixed = total_params - sum(p.params for p in projections)  # embeddings, norms: not factorized
    floor = fixed + sum(min(p.params, p.factor_params(min_rank)) for p in projections)
    if floor * per > budget_bytes:
        raise BudgetError(
            f"budget infeasible: weights may take {budget_bytes / MB:.1f} MB, but the smallest this model "
            f"can be made (rank {min_rank} everywhere) is {floor * per / MB:.1f} MB at {precision}; "
            f"the dense model is {total_params * per / MB:.1f} MB"
            + ("" if precision == "int4" else
               f"; with --weights int4 the smallest is {floor * BYTES_PER_PARAM['int4'] / MB:.1f} MB")
        )
    return int(budget_bytes / per) - fixed


def decode_costs(profile) -> tuple[dict[str, float], str]:
    """The decode cost figures of `profile` (DECODE_COST_KEYS) and where they come from: measured
    (hardware.decode_costs, a measured profile) or this module's estimates."""
    hardware = profile.hardware
    measured = getattr(hardware, "decode_costs", None) or {}
    if all(key in measured for key in DECODE_COST_KEYS):
        return ({key: float(measured[key]) for key in DECODE_COST_KEYS},
                "measured on this machine (ONNX Runtime micro-benchmarks of exporter.device.host_probes.measure_host)")
    providers = getattr(getattr(profile, "runtime", None), "execution_providers", None) or ("",)
    provider = providers[0] if providers[0] in NODE_US_ESTIMATE else ESTIMATE_DEFAULT_PROVIDER
    dequant = DEQUANT_NS_ESTIMATE[provider]
    costs = {"gemv_bandwidth_gbs": hardware.memory_bandwidth_gbs * BANDWIDTH_EFFICIENCY,
             "node_us": NODE_US_ESTIMATE[provider], "factor_node_us": FACTOR_NODE_US_ESTIMATE[provider],
             **{f"{precision}_ns_per_param": ns for precision, ns in dequant.items()}}
    return costs, (f"ESTIMATES (exporter.device.cost_model): bandwidth {BANDWIDTH_EFFICIENCY:g} x the profile's "
                   f"{hardware.memory_bandwidth_gbs:g} GB/s, {costs['node_us']:g} us per node "
                   f"({costs['factor_node_us']:g} us per factorization's node when latency-aware) and dequantisation "
                   f"int4 {dequant['int4']:g} / int8 {dequant['int8']:g} ns per weight as for {provider}")


def int4_stream_gbs(costs: dict[str, float]) -> float:
    """The bytes/s int4 weights (BYTES_PER_PARAM["int4"] each) stream at in the cost model: their bytes
    at gemv_bandwidth_gbs plus int4_ns_per_param each."""
    return stream_gbs(costs, "int4")


def stream_gbs(costs: dict[str, float], precision: str) -> float:
    """The bytes/s weights stored at `precision` stream at in the cost model: their bytes at
    gemv_bandwidth_gbs plus, for int4 and int8, their dequantisation per weight."""
    per = BYTES_PER_PARAM[precision]
    return per / (per / costs["gemv_bandwidth_gbs"] + costs.get(f"{precision}_ns_per_param", 0.0))


def node_params(costs: dict[str, float], precision: str) -> float:
    """The price of one factorization's extra graph node, in weights at `precision`: how many stream in
    the time the node takes beyond its bytes (factor_node_us). exporter.compress.allocate charges each factorized
    projection the importance that many parameters hold at the margin (`--latency-aware`)."""
    return costs["factor_node_us"] * 1e-6 * stream_gbs(costs, precision) * 1e9 / BYTES_PER_PARAM[precision]


def node_price(profile, precision: str, factor_node_us: float | None = None) -> float:
    """node_params for `profile` at `precision`: its cost model's factor_node_us, or `factor_node_us`
    where given (a fixed price, the same on every machine)."""
    costs = decode_costs(profile)[0]
    if factor_node_us:
        costs["factor_node_us"] = factor_node_us
    return node_params(costs, precision)


# `--weights auto`'s decode ceiling (exporter.pipeline.choose_formats): a plan's MatMulNBits may take at most
# `--decode-ceiling` x the time of the same weights on REFERENCE_FORMAT, the onnxruntime-genai builder's int4 default,
# each format's time per weight measured on this machine (host_probes.format_costs). Devices where nothing was
# measured get no ceiling: their kernels' costs per format are not known (estimates by bytes would misrank them).
REFERENCE_FORMAT = "int4-b32"
DECODE_CEILING = 1.0
# ... and a row split's time beyond its parts' weights, measured with the formats (microseconds per split), the
# output head's apart (its order put back over every logit)
ROW_SPLIT_COST = "row-split-us"
HEAD_SPLIT_COST = "head-split-us"


def format_costs(profile, names: tuple[str, ...], layer: tuple[tuple[int, int], ...], cache: Path | None = None,
                 head: tuple[int, int] | None = None) -> dict[str, float] | None:
    """Nanoseconds per weight of each format in `names` (and REFERENCE_FORMAT) decoding a decoder layer's MatMulNBits
    of shapes `layer` ((in, out) each) on `profile`'s device, and a row split's time (of the output head of shape
    `head` apart): measured where the profile is (the host; kept in `cache`), else None."""
    if not getattr(profile, "measured", False):
        return None
    from exporter.device.host_probes import format_costs as measured

    return measured(tuple(dict.fromkeys((REFERENCE_FORMAT, *names))), layer, cache, head)


def decode_terms(bytes_per_token: float, nodes: int, quantized_params: dict[str, int],
                 costs: dict[str, float]) -> dict[str, float]:
    """The three terms of one decode step in ms (see DECODE_COST_KEYS above) and their sum."""
    bandwidth_ms = bytes_per_token / (costs["gemv_bandwidth_gbs"] * 1e9) * 1e3
    overhead_ms = nodes * costs["node_us"] / 1e3
    dequant_ms = sum(params * costs.get(f"{precision}_ns_per_param", 0.0)
                     for precision, params in quantized_params.items()) / 1e6
    return {"bandwidth_ms": bandwidth_ms, "overhead_ms": overhead_ms, "dequant_ms": dequant_ms,
            "decode_ms": bandwidth_ms + overhead_ms + dequant_ms}


# --------------------------------------------------------------------------- an exported artifact's figures


def model_bytes(sizes: dict[str, int], onnx_file: str) -> int:
    """The ONNX graph and its external data as stored (weights at their precision), from {file: bytes}."""
    return sum(n for f, n in sizes.items() if f == onnx_file or f.startswith(onnx_file + "."))


def graph_stats(model_path: Path) -> dict:
    """Nodes of the ONNX graph (one pass each per decode step) and its quantized weights by precision:
    MatMulNBits' K x N (int4, or int8 at 8 bits) and the constant B of MatMulInteger-style nodes (int8).
    Reads the graph only (load_external_data=False)."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends on a corrupt file
        raise ExporterError(f"cannot read {model_path}: {type(exc).__name__}: {exc}") from None
    initializers = {t.name: t for t in model.graph.initializer}
    kv_bytes = KV_BYTES_PER_ELEM["fp32"]  # unless a past_key_values input says otherwise (fp16 graphs)
    for value in model.graph.input:
        if value.name.startswith("past_key_values."):
            kv_bytes = float(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).itemsize)
            break
    embedding = initializers.get("model.embed_tokens.weight")  # untied: read one row per token, not whole
    embedding_bytes = 0 if embedding is None else (
        math.prod(embedding.dims) * onnx.helper.tensor_dtype_to_np_dtype(embedding.data_type).itemsize)
    quantized = {"int4": 0, "int8": 0}
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            quantized["int8" if attrs.get("bits", 4) == 8 else "int4"] += int(attrs["K"]) * int(attrs["N"])
        elif node.op_type in INT8_MATMULS and len(node.input) > 1 and node.input[1] in initializers:
            quantized["int8"] += math.prod(initializers[node.input[1]].dims)
    return {"nodes": len(model.graph.node), "quantized_params": quantized, "kv_bytes_per_elem": kv_bytes,
            "embedding_bytes": embedding_bytes}


def predict(artifact: Path, manifest: Manifest, profile, prompt_tokens: int,
            sizes: dict[str, int] | None = None) -> dict:
    """An artifact's decode and prefill latency and RAM on `profile` (`exporter validate` checks it against
    measurements; the report shows it). Decode (decode_terms): every weight read once per token and the KV cache
    moved KV_PASSES times, at the bandwidth a decode step's matrix-vector products reach beyond the caches
    (exporter.device.host_probes._measure_decode_costs), plus a cost per graph node, plus the dequantisation of
    int4/int8 weights not hidden behind those reads; prefill does 2 FLOPs per parameter per token
    (compute-bound); RAM holds weights, the KV cache at max_context and the runtime. `sizes`: {file: bytes}
    where the manifest has no file table yet (the report, written before it)."""
    artifact = Path(artifact)
    config = SimpleNamespace(**json.loads((artifact / "config.json").read_text()))
    if sizes is None:
        sizes = {name: entry.bytes for name, entry in manifest.files.items()}
    stored = model_bytes(sizes, manifest.onnx.file)
    graph = graph_stats(artifact / manifest.onnx.file)
    read = stored - graph["embedding_bytes"]  # an untied embedding is read one row per token
    kv_prompt = KV_PASSES * kv_cache_bytes(config, prompt_tokens, graph["kv_bytes_per_elem"])
    costs, costs_source = decode_costs(profile)
    terms = decode_terms(read + kv_prompt, graph["nodes"], graph["quantized_params"], costs)
    compute = profile.hardware.compute_tflops
    tflops = compute.get(manifest.precision) or compute.get("fp32") or max(compute.values())
    params = manifest.parameters.total_params
    prefill_s = 2.0 * params * prompt_tokens / (tflops * 1e12 * COMPUTE_EFFICIENCY)
    kv_max = kv_cache_bytes(config, profile.budget.max_context, graph["kv_bytes_per_elem"])
    return {
        "decode_ms": terms["decode_ms"],
        "decode_terms": {key: terms[key] for key in ("bandwidth_ms", "overhead_ms", "dequant_ms")},
        "prefill_ms": prefill_s * 1e3,
        "ram_mb": (stored + kv_max) / MB + RUNTIME_OVERHEAD_MB,
        "bytes_per_token": read + kv_prompt,
        "graph_nodes": graph["nodes"],
        "quantized_params": graph["quantized_params"],
        "bandwidth_gbs": profile.hardware.memory_bandwidth_gbs,
        "decode_bandwidth_gbs": costs["gemv_bandwidth_gbs"],
        "bandwidth_efficiency": costs["gemv_bandwidth_gbs"] / profile.hardware.memory_bandwidth_gbs,
        "node_us": costs["node_us"],
        "dequant_ns_per_param": {key: costs[f"{key}_ns_per_param"] for key in ("int4", "int8")},
        "int4_stream_gbs": int4_stream_gbs(costs),  # bytes at the bandwidth + dequantisation, as bytes/s
        "decode_costs_source": costs_source,
        "compute_tflops": tflops,
        "compute_efficiency": COMPUTE_EFFICIENCY,
    }
