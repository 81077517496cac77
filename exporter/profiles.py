"""Device profiles: the hardware, runtime and budget of each deployment target.

Built-in profiles are TOML files in ``device_profiles/`` (one per device, the file stem is the name);
users may also pass a path to their own ``.toml`` with the same schema.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .errors import ProfileError

PROFILES_DIR = Path(__file__).resolve().parent.parent / "device_profiles"
PROFILES_DIR_ENV = "EXPORTER_PROFILES_DIR"  # read at each call, so tests and users can point elsewhere

WEIGHT_PRECISIONS = ("fp32", "fp16", "int8", "int4")
COMPUTE_PRECISIONS = ("fp32", "fp16", "int8")
HARDWARE_FIGURES = ("memory_gb", "memory_bandwidth_gbs", "compute_tflops")


@dataclass(frozen=True)
class Hardware:
    memory_gb: float
    memory_bandwidth_gbs: float
    compute_tflops: dict[str, float]  # precision -> peak TFLOP/s (int8: TOPS)
    sources: dict[str, str]  # figure name -> where it comes from
    # Measured profiles only: ONNX Runtime decode costs (exporter.budget.DECODE_COST_KEYS), measured by
    # measure_host(); other profiles use exporter.budget's labelled estimates.
    decode_costs: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Runtime:
    execution_providers: tuple[str, ...]
    weight_precision: str
    # Ranks are rounded to multiples of this: matrix kernels run full tiles only at such sizes.
    rank_multiple: int = 16
    # Provider name -> its ONNX Runtime provider options (strings), for every session on the device
    # (runtime_tests, README's app snippets), e.g. CUDA's attention kernel choice.
    provider_options: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Budget:
    model_ram_mb: float
    decode_ms_per_token: float
    prefill_ms: float
    prefill_prompt_tokens: int
    max_context: int


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    aliases: tuple[str, ...]
    measured: bool
    hardware: Hardware
    runtime: Runtime
    budget: Budget
    path: Path

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable copy, for manifests."""
        d = dataclasses.asdict(self)
        d["aliases"] = list(self.aliases)
        d["runtime"]["execution_providers"] = list(self.runtime.execution_providers)
        d["path"] = str(self.path)
        return d


# ---------------------------------------------------------------------------------------------
# Validation: every error names the file and the dotted field.

_MISSING = object()


def _is_number(v: Any) -> bool:
    # bool is an int subclass: `true` must not pass for a number.
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v: Any) -> bool:
    return _is_number(v) and v > 0


def _non_negative(v: Any) -> bool:
    return _is_number(v) and v >= 0


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _text(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _text_list(v: Any) -> bool:
    return isinstance(v, list) and all(_text(x) for x in v)


def _short_repr(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


class _Table:
    """One TOML table of a profile file: rejects unknown keys and reads typed fields.

    Missing fields are reported by get()/sub(), which know what was expected.
    """

    def __init__(self, path: Path, data: Any, prefix: str, keys: tuple[str, ...]):
        self.path, self.data, self.prefix = path, data, prefix
        if not isinstance(data, dict):
            self.fail(prefix, "expected a table", data)
        unknown = sorted(set(data) - set(keys))  # typo protection
        if unknown:
            valid = ", ".join(sorted(keys))
            raise ProfileError(
                f"{path}: unknown key '{self.dotted(unknown[0])}' (valid keys: {valid})"
            )

    def dotted(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, field: str, expected: str, value: Any) -> None:
        raise ProfileError(f"{self.path}: field '{field}': {expected}, got {_short_repr(value)}")

    def get(self, key: str, check: Callable[[Any], bool], expected: str, default: Any = _MISSING):
        value = self.data.get(key, default)
        if value is _MISSING:
            raise ProfileError(f"{self.path}: missing field '{self.dotted(key)}' ({expected})")
        if not check(value):
            self.fail(self.dotted(key), expected, value)
        return value

    def sub(self, key: str, keys: tuple[str, ...]) -> "_Table":
        if key not in self.data:
            raise ProfileError(f"{self.path}: missing field '{self.dotted(key)}' (expected a table)")
        return _Table(self.path, self.data[key], self.dotted(key), keys)


def _parse(path: Path, builtin: bool) -> DeviceProfile:
    """Read and validate one profile file (hardware of measured profiles left as placeholders)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ProfileError(f"{path}: invalid TOML: not UTF-8 ({e})") from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot read device profile: {e.strerror or e}") from None

    top = _Table(path, data, "", ("name", "aliases", "description", "measured",
                                  "hardware", "runtime", "budget"))
    name = top.get("name", _text, "expected a non-empty string")
    if builtin and name != path.stem:
        top.fail("name", f"expected the file stem '{path.stem}' for a built-in profile", name)
    aliases = top.get("aliases", _text_list, "expected a list of non-empty strings", default=[])
    description = top.get("description", _text, "expected a non-empty string")
    measured = top.get("measured", lambda v: isinstance(v, bool), "expected true or false")

    # Measured profiles carry 0.0 placeholders until measure_host() replaces them, and need no
    # sources: the measurement is the source. Every other figure must say where it comes from.
    if measured:
        figure, figure_msg, needs_source = _non_negative, "expected a number >= 0", ()
    else:
        figure, figure_msg, needs_source = _positive, "expected a positive number", HARDWARE_FIGURES

    hw = top.sub("hardware", (*HARDWARE_FIGURES, "sources"))
    compute = hw.sub("compute_tflops", COMPUTE_PRECISIONS)
    if not compute.data:
        hw.fail("hardware.compute_tflops",
                f"expected at least one of {', '.join(COMPUTE_PRECISIONS)}", compute.data)
    sources = {}
    if "sources" in hw.data or needs_source:
        src = hw.sub("sources", HARDWARE_FIGURES)
        for k in (*needs_source, *src.data):
            sources[k] = src.get(k, _text, "expected a string naming where the figure comes from")
    hardware = Hardware(
        memory_gb=float(hw.get("memory_gb", figure, figure_msg)),
        memory_bandwidth_gbs=float(hw.get("memory_bandwidth_gbs", figure, figure_msg)),
        compute_tflops={k: float(compute.get(k, figure, figure_msg)) for k in compute.data},
        sources=sources,
    )

    rt = top.sub("runtime", ("execution_providers", "weight_precision", "rank_multiple", "provider_options"))
    providers = tuple(rt.get("execution_providers", lambda v: _text_list(v) and len(v) > 0,
                             "expected a non-empty list of provider names"))
    options = rt.get("provider_options", lambda v: isinstance(v, dict) and all(k in providers for k in v),
                     f"expected a table keyed by the profile's execution providers ({', '.join(providers)})",
                     default={})
    for provider, values in options.items():
        field = f"runtime.provider_options.{provider}"
        if not isinstance(values, dict) or not all(isinstance(v, (str, int, float, bool)) for v in values.values()):
            raise ProfileError(f"{path}: field '{field}': expected a table of option = value, got "
                               f"{_short_repr(values)}")
    runtime = Runtime(
        execution_providers=providers,
        weight_precision=rt.get(
            "weight_precision", lambda v: v in WEIGHT_PRECISIONS,
            f"expected one of {', '.join(WEIGHT_PRECISIONS)}"),
        rank_multiple=rt.get("rank_multiple", _positive_int, "expected a positive integer", default=16),
        # ONNX Runtime takes provider options as strings (TOML booleans as its "1"/"0").
        provider_options={provider: {key: str(int(v)) if isinstance(v, bool) else str(v) for key, v in values.items()}
                          for provider, values in options.items()},
    )

    bd = top.sub("budget", (
        "model_ram_mb", "decode_ms_per_token", "prefill_ms", "prefill_prompt_tokens", "max_context"))
    pos, pos_msg = _positive, "expected a positive number"
    budget = Budget(
        model_ram_mb=float(bd.get("model_ram_mb", pos, pos_msg)),
        decode_ms_per_token=float(bd.get("decode_ms_per_token", pos, pos_msg)),
        prefill_ms=float(bd.get("prefill_ms", pos, pos_msg)),
        prefill_prompt_tokens=bd.get("prefill_prompt_tokens", _positive_int, "expected a positive integer"),
        max_context=bd.get("max_context", _positive_int, "expected a positive integer"),
    )
    return DeviceProfile(
        name=name, description=description, aliases=tuple(aliases), measured=measured,
        hardware=hardware, runtime=runtime, budget=budget, path=path,
    )


def _with_measurements(profile: DeviceProfile) -> DeviceProfile:
    """Replace a measured profile's placeholder hardware by this machine's figures."""
    if not profile.measured:
        return profile
    return dataclasses.replace(profile, hardware=measure_host())


def _profiles_dir() -> Path:
    return Path(os.environ.get(PROFILES_DIR_ENV) or PROFILES_DIR)


def _builtin_profiles() -> list[DeviceProfile]:
    """All profiles of the profiles directory, unmeasured, sorted by name; names and aliases unique."""
    directory = _profiles_dir()
    if not directory.is_dir():
        raise ProfileError(f"device profile directory not found: {directory}")
    profiles = sorted((_parse(p, builtin=True) for p in directory.glob("*.toml")),
                      key=lambda p: p.name)
    owner: dict[str, Path] = {}
    for p in profiles:
        for key in (p.name, *p.aliases):
            if key in owner:
                raise ProfileError(f"{p.path}: device name '{key}' is already used by {owner[key]}")
            owner[key] = p.path
    return profiles


# ---------------------------------------------------------------------------------------------
# Public API


def list_profiles() -> list[DeviceProfile]:
    """Every built-in profile, sorted by name (measured profiles measured)."""
    return [_with_measurements(p) for p in _builtin_profiles()]


def profile_names() -> list[str]:
    """Every name and alias a user may pass as a device, sorted."""
    return sorted(key for p in _builtin_profiles() for key in (p.name, *p.aliases))


def _looks_like_path(s: str) -> bool:
    seps = {"/", os.sep, os.altsep} - {None}
    return s.endswith(".toml") or any(sep in s for sep in seps)


def load_profile(name_or_path: str) -> DeviceProfile:
    """A built-in profile by name or alias, or a user's profile from a path to a .toml file."""
    if _looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            what = "is not a file" if path.exists() else "not found"
            raise ProfileError(f"device profile file {what}: {path}")
        return _with_measurements(_parse(path, builtin=False))
    profiles = _builtin_profiles()
    for p in profiles:
        if name_or_path == p.name or name_or_path in p.aliases:
            return _with_measurements(p)
    valid = ", ".join(sorted(k for p in profiles for k in (p.name, *p.aliases)))
    raise ProfileError(
        f"unknown device '{name_or_path}'; valid devices: {valid} (or a path to a .toml profile)"
    )


@functools.lru_cache(maxsize=None)  # measure once per process: figures do not change mid-run
def measure_host() -> Hardware:
    """Measure this machine's RAM, memory bandwidth, fp32 matmul throughput and decode costs (about 5 s)."""
    import numpy as np  # here, so that loading device profiles does not import numpy

    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        ram_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError) as e:
        raise ProfileError(f"cannot measure this machine's memory: {e}") from None

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


def probe_session(folder: str, nodes, k: int, n: int, small=(), large=None):
    """An ONNX Runtime session (CPU, default threads) of a synthetic graph x [1, k] -> y [1, n] for
    micro-benchmarks. `small` (name, array) pairs are stored in the graph; `large` {name: array} go to
    an external file in `folder` (much faster to write and load than a serialized graph)."""
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
    vectors = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, size]) for name, size in (("x", k), ("y", n))]
    graph = helper.make_graph(nodes, "probe", vectors[:1], vectors[1:], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    path = os.path.join(folder, stem + ".onnx")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def int4_chain(length: int, sizes: tuple[int, int], block: int = 32, distinct: bool = False) -> tuple[list, dict]:
    """Nodes and weights of `length` MatMulNBits (4 bits, accuracy level 4, as exported) alternating
    sizes[0] -> sizes[1] -> sizes[0], from x to y (int4_sequence).

    ONNX Runtime shares identical pre-packed weights within a session, so without `distinct` every
    node reads the same weights (in cache whatever `length` is); `distinct` makes each node's differ,
    so the chain reads all of them from memory as a decode step does."""
    return int4_sequence(_alternating(length, sizes), block, distinct)


def int4_sequence(shapes: list[tuple[int, int]], block: int = 32, distinct: bool = False) -> tuple[list, dict]:
    """Nodes and weights of one MatMulNBits per (in, out) of `shapes`, chained from x to y (see int4_chain)."""
    from onnx import helper

    import numpy as np

    nodes, large = [], {}
    for i, (x, y, rows, cols) in enumerate(_sequence(shapes)):
        large[f"b{i}"] = np.resize(np.arange(256, dtype=np.uint8), (cols, rows // block, block // 2))
        large[f"s{i}"] = np.full(cols * rows // block, 0.01, np.float32)
        nodes.append(helper.make_node("MatMulNBits", [x, f"b{i}", f"s{i}"], [y], domain="com.microsoft",
                                      K=rows, N=cols, bits=4, block_size=block, accuracy_level=4))
    return nodes, _distinct(large) if distinct else large


def fp32_chain(length: int, sizes: tuple[int, int]) -> tuple[list, dict]:
    """Nodes and weights of `length` fp32 MatMul alternating sizes[0] -> sizes[1] -> sizes[0], from x to
    y, each with its own weights (see int4_chain)."""
    from onnx import helper

    import numpy as np

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


def solve_decode_costs(fp32_node_s: float, fp32_node_bytes: int, int4_node_s: float, int4_node_bytes: int,
                       int4_node_params: int, node_s: float) -> dict[str, float]:
    """The bandwidth figures from the seconds per node of the fp32 and int4 chains beyond the caches,
    less the fixed cost per node `node_s` (the cost model's overhead term counts it):
    gemv_bandwidth_gbs = fp32 bytes / time; int4_ns_per_param = what an int4 weight takes beyond
    reading its bytes at that bandwidth (the dequantisation the reads do not hide), so that the cost
    model's bytes / gemv_bandwidth + weights x int4_ns_per_param is the int4 chain's time: int4
    weights stream at their own effective bytes/s (exporter.budget.int4_stream_gbs). Not below 0:
    where int4 streams faster per byte than fp32, the model counts its bytes at the fp32 rate."""
    fp32_s, int4_s = max(fp32_node_s - node_s, 1e-12), max(int4_node_s - node_s, 1e-12)
    bandwidth = fp32_node_bytes / fp32_s
    extra_s = max(0.0, int4_s - int4_node_bytes / bandwidth)
    return {"gemv_bandwidth_gbs": round(bandwidth / 1e9, 3),
            "int4_ns_per_param": round(extra_s / int4_node_params * 1e9, 5)}


def _measure_decode_costs() -> dict[str, float]:
    """What one decode step costs in ONNX Runtime here (about 3 s; empty where onnxruntime or onnx
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
    * int8_ns_per_param: in-cache compute of quantize_dynamic's int8 pattern (DynamicQuantizeLinear,
      MatMulInteger, Cast, 2 Mul: five nodes), 1536 x 1536, less its five nodes, added to its bytes;
    * factor_node_us: what one rank-64 factor node (576 -> 64 -> 576 in MatMulNBits) adds beyond its
      bytes at the int4 stream rate between the MLP-sized reads of the streamed chain, as in a decode
      step: a short stream that starts cold, besides the node's fixed cost. The price of the
      second-stage node a factorization adds (exporter.allocate's node price, `--latency-aware`).

    Each figure comes from the fastest of several runs: other load on the machine only slows a run,
    and `exporter validate` scales the prediction by the load it measures (mean run / fastest run).
    """
    import tempfile

    import numpy as np

    from .budget import stream_gbs

    try:
        import onnxruntime  # noqa: F401
        from onnx import TensorProto, helper
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
        weights), as long as needed to hold STREAM_CACHE_MULTIPLE x the last-level cache (RAM allowing)."""
        node_bytes = sum(a.nbytes for a in chain(2, DECODE_SHAPES)[1].values()) // 2
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        total = min(STREAM_CACHE_MULTIPLE * last_level_cache_bytes(), ram // 16)
        length = max(4, math.ceil(total / node_bytes))
        nodes, large = chain(length, DECODE_SHAPES)
        session = probe_session(folder, nodes, DECODE_SHAPES[0], DECODE_SHAPES[0], (), large)
        del large
        return best(session, DECODE_SHAPES[0], 40) / length, node_bytes

    def int8_pattern(prefix: str, x: str, y: str) -> list:
        """quantize_dynamic's int8 MatMul: five nodes."""
        return [helper.make_node("DynamicQuantizeLinear", [x], [f"{prefix}q", f"{prefix}s", f"{prefix}z"]),
                helper.make_node("MatMulInteger", [f"{prefix}q", "w", f"{prefix}z", "wz"], [f"{prefix}i"]),
                helper.make_node("Cast", [f"{prefix}i"], [f"{prefix}f"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{prefix}s", "ws"], [f"{prefix}c"]),
                helper.make_node("Mul", [f"{prefix}f", f"{prefix}c"], [y])]

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
        pairs = max(2, math.ceil(STREAM_CACHE_MULTIPLE * last_level_cache_bytes() / (2 * int4_bytes)))
        nodes, weights = int4_sequence([(hidden, inner), (inner, hidden), factor, factor[::-1]] * pairs, distinct=True)
        mixed_s = best(probe_session(folder, nodes, hidden, hidden, (), weights), hidden, 40) / pairs
        del weights
        factor_bytes = sum(a.nbytes for a in int4_chain(2, factor)[1].values()) / 2
        added_s = (mixed_s - 2 * int4_s) / 2 - factor_bytes / (stream_gbs(costs, "int4") * 1e9)
        costs["factor_node_us"] = round(max(node_s, added_s) * 1e6, 4)

        # int8: five chained patterns vs one, 1536 x 1536 (in cache): per pattern, less its five nodes.
        weight8 = np.resize(np.arange(-128, 128, dtype=np.int8), (inner, inner))
        consts = [("wz", np.zeros(inner, np.int8)), ("ws", np.full(inner, 0.01, np.float32))]
        times = []
        for count in (5, 1):
            names = ["x", *(f"h{i}" for i in range(count - 1)), "y"]
            nodes = [node for i in range(count) for node in int8_pattern(f"p{i}", names[i], names[i + 1])]
            times.append(best(probe_session(folder, nodes, inner, inner, consts, {"w": weight8}), inner, 20))
        int8_s = max(0.0, (times[0] - times[1]) / 4 - 5 * node_s)
    return {**costs, "node_us": round(node_s * 1e6, 4), "int8_ns_per_param": round(int8_s / weight8.size * 1e9, 5)}


def _tflops_text(compute: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in compute.items())


def format_profile(p: DeviceProfile) -> str:
    """Multi-line description of one profile, with each hardware figure's source."""
    hw, rt, bd = p.hardware, p.runtime, p.budget
    src = hw.sources
    aliases = f"  (aliases: {', '.join(p.aliases)})" if p.aliases else ""
    lines = [
        f"{p.name}{aliases}",
        f"  {p.description}",
        f"  file: {p.path}",
        "hardware:" + ("  (measured on this machine)" if p.measured else ""),
        f"  memory:            {hw.memory_gb:g} GB",
        f"      source: {src.get('memory_gb', '-')}",
        f"  memory bandwidth:  {hw.memory_bandwidth_gbs:g} GB/s",
        f"      source: {src.get('memory_bandwidth_gbs', '-')}",
        f"  compute (TFLOP/s, int8 TOPS): {_tflops_text(hw.compute_tflops)}",
        f"      source: {src.get('compute_tflops', '-')}",
        "runtime:",
        f"  execution providers: {', '.join(rt.execution_providers)}",
        f"  weight precision:    {rt.weight_precision}",
        f"  rank multiple:       {rt.rank_multiple}",
        *(f"  {provider} options: " + ", ".join(f"{k}={v}" for k, v in values.items())
          for provider, values in rt.provider_options.items()),
        "budget:",
        f"  model RAM:   {bd.model_ram_mb:g} MB (weights + KV cache + runtime)",
        f"  decode:      {bd.decode_ms_per_token:g} ms/token",
        f"  prefill:     {bd.prefill_ms:g} ms for {bd.prefill_prompt_tokens} prompt tokens",
        f"  max context: {bd.max_context} tokens",
    ]
    return "\n".join(lines)


def format_profile_table(profiles: list[DeviceProfile]) -> str:
    """One line per profile: name, aliases, RAM, bandwidth, precision and budgets."""
    header = ("device", "aliases", "RAM GB", "BW GB/s", "weights", "model MB", "decode ms/tok")
    rows = [header] + [
        (
            p.name,
            ", ".join(p.aliases) or "-",
            f"{p.hardware.memory_gb:g}",
            f"{p.hardware.memory_bandwidth_gbs:g}",
            p.runtime.weight_precision,
            f"{p.budget.model_ram_mb:g}",
            f"{p.budget.decode_ms_per_token:g}",
        )
        for p in profiles
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    # Text columns left-aligned, numbers right-aligned.
    left = {0, 1, 4}
    return "\n".join(
        "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    )
