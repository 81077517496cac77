"""Tests for exporter.device.profiles: shipped profiles, lookup, user files and validation errors."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from exporter.device.cost_model import DECODE_COST_KEYS, HEAD_SPLIT_COST, ROW_SPLIT_COST
from exporter.device.host_probes import (
    fp32_chain,
    int4_chain,
    kept_hardware,
    last_level_cache_bytes,
    measure_hardware,
    measure_host,
)
from exporter.device.profiles import (
    PROFILES_DIR,
    DeviceProfile,
    Hardware,
    format_profile,
    format_profile_table,
    list_profiles,
    load_profile,
    profile_names,
)
from exporter.errors import ProfileError

SHIPPED = [
    "jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb",
    "snapdragon-8-gen3", "iphone-15-pro", "raspberry-pi-5", "host",
]

# A valid user profile; malformed variants are made from it by text substitution.
VALID = """\
name = "my-board"
description = "A user's own board"
measured = false

[hardware]
memory_gb = 4.0
memory_bandwidth_gbs = 25.6
compute_tflops = { fp32 = 0.1, int8 = 0.4 }

[hardware.sources]
memory_gb = "board manual"
memory_bandwidth_gbs = "board manual"
compute_tflops = "estimate: cores x GHz x FLOPs/cycle"

[runtime]
execution_providers = ["CPUExecutionProvider"]
weight_precision = "int8"

[budget]
model_ram_mb = 1024
decode_ms_per_token = 80.0
prefill_ms = 3000.0
prefill_prompt_tokens = 256
max_context = 2048
"""


def write(tmp_path: Path, text: str, name: str = "user.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads(name):
    p = load_profile(name)
    assert p.name == name and p.path == PROFILES_DIR / f"{name}.toml"
    assert p.hardware.memory_gb > 0 and p.hardware.memory_bandwidth_gbs > 0
    assert all(v > 0 for v in p.hardware.compute_tflops.values())
    assert set(p.hardware.sources) == {"memory_gb", "memory_bandwidth_gbs", "compute_tflops"}
    assert p.runtime.execution_providers[-1] == "CPUExecutionProvider"
    json.dumps(p.to_dict())  # manifests need it serializable
    assert name in format_profile(p)


def test_list_profiles_sorted_and_complete():
    profiles = list_profiles()
    assert [p.name for p in profiles] == sorted(SHIPPED)
    table = format_profile_table(profiles)
    assert len(table.splitlines()) == len(SHIPPED) + 1
    assert set(profile_names()) == set(SHIPPED) | {"jetson-orin"}


def test_alias_resolves_to_smallest_orin():
    assert load_profile("jetson-orin").name == "jetson-orin-nano-8gb"


def test_unknown_device_lists_valid_names():
    with pytest.raises(ProfileError) as e:
        load_profile("jetson-thor")
    msg = str(e.value)
    assert "unknown device 'jetson-thor'" in msg
    for name in SHIPPED + ["jetson-orin"]:
        assert name in msg
    assert ".toml" in msg


def test_user_toml_path_loads(tmp_path):
    p = load_profile(str(write(tmp_path, VALID)))
    assert isinstance(p, DeviceProfile)
    assert p.name == "my-board"  # a user file's name need not match its stem
    assert p.runtime.weight_precision == "int8"
    assert p.budget.prefill_prompt_tokens == 256
    assert p.hardware.compute_tflops == {"fp32": 0.1, "int8": 0.4}


def test_provider_options_reach_the_manifest_as_strings(tmp_path):
    text = VALID.replace('weight_precision = "int8"', 'weight_precision = "int8"\n'
                         'provider_options.CPUExecutionProvider = { arena_extend_strategy = 1, use_arena = true }')
    p = load_profile(str(write(tmp_path, text)))
    options = {"CPUExecutionProvider": {"arena_extend_strategy": "1", "use_arena": "1"}}
    assert p.runtime.provider_options == options
    assert p.to_dict()["runtime"]["provider_options"] == options
    assert "CPUExecutionProvider options: arena_extend_strategy=1, use_arena=1" in format_profile(p)
    assert load_profile(str(write(tmp_path, VALID, "plain.toml"))).runtime.provider_options == {}
    # Every Jetson profile keeps GroupQueryAttention off cuDNN's flash attention (docs/deploying.md, "Jetson").
    for name in ("jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb"):
        assert load_profile(name).runtime.provider_options == {"CUDAExecutionProvider": {"sdpa_kernel": "3"}}


def test_missing_user_file(tmp_path):
    with pytest.raises(ProfileError, match="not found"):
        load_profile(str(tmp_path / "absent.toml"))


@pytest.mark.parametrize(
    "old, new, field, expected",
    [
        ("decode_ms_per_token = 80.0\n", "", "budget.decode_ms_per_token", "missing"),
        ("decode_ms_per_token = 80.0", 'decode_ms_per_token = "fast"', "budget.decode_ms_per_token",
         "expected a positive number, got 'fast'"),
        ("memory_gb = 4.0", "memory_gb = -4.0", "hardware.memory_gb", "positive"),
        ("max_context = 2048", "max_context = 2048.5", "budget.max_context", "integer"),
        ('weight_precision = "int8"', 'weight_precision = "int3"', "runtime.weight_precision",
         "expected one of fp32, fp16, int8, int4"),
        ('execution_providers = ["CPUExecutionProvider"]', "execution_providers = []",
         "runtime.execution_providers", "non-empty list"),
        ('memory_gb = "board manual"\n', "", "hardware.sources.memory_gb", "missing"),
        ("int8 = 0.4", "int4 = 0.4", "hardware.compute_tflops.int4", "unknown key"),
        ("measured = false", "measured = false\nmesured = true", "mesured", "unknown key"),
        ("max_context = 2048", "max_context = 2048\nmax_ctx = 4096", "budget.max_ctx", "unknown key"),
        ('weight_precision = "int8"', 'weight_precision = "int8"\nprovider_options.CUDAExecutionProvider = {}',
         "runtime.provider_options", "keyed by the profile's execution providers (CPUExecutionProvider)"),
        ('weight_precision = "int8"', 'weight_precision = "int8"\nprovider_options.CPUExecutionProvider = 3',
         "runtime.provider_options.CPUExecutionProvider", "expected a table of option = value"),
    ],
)
def test_malformed_profile_names_file_and_field(tmp_path, old, new, field, expected):
    assert old in VALID
    path = write(tmp_path, VALID.replace(old, new, 1))
    with pytest.raises(ProfileError) as e:
        load_profile(str(path))
    msg = str(e.value)
    assert str(path) in msg and f"'{field}'" in msg and expected in msg


def test_toml_syntax_error_names_file(tmp_path):
    path = write(tmp_path, VALID.replace("max_context = 2048", "max_context = = 2048"))
    with pytest.raises(ProfileError) as e:
        load_profile(str(path))
    assert str(path) in str(e.value) and "invalid TOML" in str(e.value)


def test_builtin_name_must_match_stem(tmp_path, monkeypatch):
    write(tmp_path, VALID, name="other-board.toml")
    monkeypatch.setenv("EXPORTER_PROFILES_DIR", str(tmp_path))
    with pytest.raises(ProfileError, match="'name'.*stem 'other-board'"):
        load_profile("other-board")


def test_profiles_dir_override(tmp_path, monkeypatch):
    write(tmp_path, VALID, name="my-board.toml")
    monkeypatch.setenv("EXPORTER_PROFILES_DIR", str(tmp_path))
    assert profile_names() == ["my-board"]
    assert load_profile("my-board").budget.model_ram_mb == 1024


def test_host_is_measured():
    fresh = measure_hardware()  # a fresh measurement works too (speed is not asserted: noisy)
    assert fresh.memory_bandwidth_gbs > 0 and set(fresh.decode_costs) == set(DECODE_COST_KEYS)
    hw = measure_host()
    assert hw.memory_gb > 0 and hw.memory_bandwidth_gbs > 0 and hw.compute_tflops["fp32"] > 0
    assert all("measured on this machine" in s for s in hw.sources.values())
    host = load_profile("host")
    assert host.measured and host.hardware == hw  # cached: one measurement per process


def test_the_host_is_measured_once_and_kept(tmp_path, monkeypatch):
    # Plans price nodes at the host's measured decode costs, which move between measurements: one measurement per
    # machine, kept, gives every later export the same figures.
    import exporter.device.host_probes as host_probes

    calls = []
    figures = Hardware(memory_gb=8.0, memory_bandwidth_gbs=20.0, compute_tflops={"fp32": 0.2},
                       sources={"memory_gb": "measured on this machine at now"},
                       decode_costs=dict.fromkeys(DECODE_COST_KEYS, 1.5))

    def measured():
        calls.append(1)
        return dataclasses.replace(figures, memory_bandwidth_gbs=20.0 + len(calls))

    monkeypatch.setattr(host_probes, "measure_hardware", measured)
    first = kept_hardware(tmp_path / "host")
    measurements = host_probes.HOST_MEASUREMENTS
    assert len(calls) == measurements and first.memory_bandwidth_gbs == 20.0 + (measurements + 1) / 2  # the median
    assert "median" in first.sources["memory_gb"] and first.decode_costs == figures.decode_costs
    assert kept_hardware(tmp_path / "host") == first and len(calls) == measurements  # read back: the same figures
    (kept,) = (tmp_path / "host").glob("hardware-*.json")
    kept.write_text("{not json")
    assert kept_hardware(tmp_path / "host") != first and len(calls) == 2 * measurements  # unreadable: measured again
    assert kept_hardware(None).memory_bandwidth_gbs == 21.0 + 2 * measurements  # no folder: measured once, not kept
    assert [p.name for p in (tmp_path / "host").iterdir()] == [kept.name]  # no temporary left behind


def test_streamed_chains_do_not_share_weights():
    # ONNX Runtime shares identical pre-packed weights: a chain meant to read its weights from memory
    # must give each node its own, or it measures one matrix in cache.
    import numpy as np

    for nodes, weights in (fp32_chain(4, (64, 96)), int4_chain(4, (64, 96), distinct=True)):
        arrays = list(weights.values())
        assert len(nodes) == 4 and len(arrays) == len({a.tobytes() for a in arrays})
    shared = int4_chain(4, (64, 96))[1]  # in-cache chains: one node's weights for all
    assert np.array_equal(shared["b0"], shared["b2"]) and np.array_equal(shared["s0"], shared["s2"])
    assert last_level_cache_bytes() >= 1 << 20


def test_streamed_chains_are_bounded_whatever_cache_the_machine_reports(monkeypatch):
    """A VM that reports a huge last-level cache (480 MB here) does not get a chain of gigabytes to write and load."""
    from exporter.device import host_probes

    monkeypatch.setattr(host_probes, "last_level_cache_bytes", lambda: 480 << 20)
    assert host_probes.stream_bytes() == host_probes.STREAM_MAX_BYTES
    monkeypatch.setattr(host_probes, "last_level_cache_bytes", lambda: 16 << 20)
    assert host_probes.stream_bytes() == host_probes.STREAM_CACHE_MULTIPLE * (16 << 20)


def test_profile_round_trips_through_its_manifest_form():
    """What the manifest records (`to_dict`) is read back by validate and the report as the same profile."""
    for profile in list_profiles():
        assert DeviceProfile.from_dict(profile.to_dict()) == profile, profile.name


@pytest.mark.parametrize("name", ["int4-b32", "int4-b64-asym", "int4-b32-offset", "int2-b64-asym", "int8-b128"])
def test_format_chains_run_as_exported(tmp_path, name):
    """The per-format probe's graphs (exporter.device.host_probes.format_graph) are valid MatMulNBits graphs of
    their format: ONNX Runtime runs them, and their weights are the format's bytes per weight."""
    import numpy as np

    from exporter.compress.grid import QuantFormat
    from exporter.device.host_probes import format_graph, format_io, probe_session

    shapes = [(64, 256), (256, 64)]
    nodes, small, large = format_graph(name, shapes)
    inputs, outputs, feed = format_io(shapes)
    session = probe_session(str(tmp_path), nodes, 0, 0, tuple(small.items()), large, inputs=inputs, outputs=outputs,
                            tokens=True)
    ys = session.run(None, feed)
    assert [y.shape for y in ys] == [(1, 1, 256), (1, 1, 64)] and all(np.isfinite(y).all() for y in ys)
    fmt = QuantFormat.parse(name)
    assert sum(a.nbytes for a in large.values()) == fmt.matrix_bytes(256, 64) + fmt.matrix_bytes(64, 256)


def test_a_row_split_is_timed_as_the_writer_splits(tmp_path):
    """The probe's row split (ROW_SPLIT): each unit's rows in two MatMulNBits on the reference format, put back in
    row order by the writer's own nodes (its time beyond the reference, per split: ROW_SPLIT_COST)."""
    import numpy as np

    from exporter.compress.grid import QuantFormat
    from exporter.device.host_probes import ROW_SPLIT, format_graph, format_io, probe_session

    shapes = [(64, 256), (256, 63)]
    nodes, small, large = format_graph(ROW_SPLIT, shapes)
    assert [n.op_type for n in nodes].count("MatMulNBits") == 4 and [n.op_type for n in nodes].count("GatherElements") == 2
    inputs, outputs, feed = format_io(shapes)
    session = probe_session(str(tmp_path), nodes, 0, 0, tuple(small.items()), large, inputs=inputs, outputs=outputs,
                            tokens=True)
    ys = session.run(None, feed)
    assert [y.shape for y in ys] == [(1, 1, 256), (1, 1, 63)] and all(np.isfinite(y).all() for y in ys)
    fmt = QuantFormat.parse("int4-b32")  # the reference's bytes: the split's rows are all of the unit's
    assert sum(a.nbytes for a in large.values()) == fmt.matrix_bytes(256, 64) + fmt.matrix_bytes(63, 256)


def test_format_costs_are_measured_once_and_kept(tmp_path, monkeypatch):
    from exporter.device import host_probes

    calls = []

    def measure(names, layer, head=None):
        calls.append((names, head))
        return {name: 0.01 * (i + 1) for i, name in enumerate(names)} | {ROW_SPLIT_COST: 0.01}

    monkeypatch.setattr(host_probes, "measure_format_costs_apart", measure)
    layer = ((64, 256), (256, 64))
    first = host_probes.format_costs(("int4-b32", "int8-b32"), layer, tmp_path)
    assert host_probes.format_costs(("int8-b32", "int4-b32"), layer[::-1], tmp_path) == first and len(calls) == 1
    assert host_probes.format_costs(("int4-b32", "int4-b64"), layer, tmp_path)["int4-b64"] > 0 and len(calls) == 2
    assert host_probes.format_costs(("int4-b32", "int8-b32"), ((64, 128),), tmp_path) and len(calls) == 3
    host_probes.format_costs(("int4-b32", "int8-b32"), layer, tmp_path, head=(64, 512))  # another head: measured
    assert calls[-1][1] == (64, 512) and len(calls) == 4
    host_probes.format_costs(("int4-b32", "int8-b32"), layer, tmp_path, head=(64, 512))
    assert len(calls) == 4


def test_format_costs_are_measured_per_weight(monkeypatch):
    """A real measurement on small shapes, in a fresh interpreter as exports take it: every format a positive time
    per weight, the reference's among them."""
    from exporter.device import host_probes

    monkeypatch.setattr(host_probes, "FORMAT_COST_PASSES", 2)  # the method, not its precision
    monkeypatch.setattr(host_probes, "FORMAT_COST_PAIRS", 6)
    costs = host_probes.measure_format_costs_apart(("int4-b64-asym", "int8-b128"), ((576, 1536), (1536, 576)),
                                                   head=(576, 4096))
    split_us = costs.pop(ROW_SPLIT_COST)  # differences of two timings: finite, their sign the machine's
    head_split_us = costs.pop(HEAD_SPLIT_COST)
    assert set(costs) == {"int4-b32", "int4-b64-asym", "int8-b128"} and all(v > 0 for v in costs.values())
    assert math.isfinite(split_us) and math.isfinite(head_split_us)


def test_format_costs_apart_say_why_they_failed():
    """The fresh interpreter's error comes back as one line, not a traceback of the parent's."""
    from exporter.device import host_probes

    with pytest.raises(ProfileError, match="cannot time the weight formats.*5-bit"):
        host_probes.measure_format_costs_apart(("int5-b32",), ((64, 64),))


def test_format_times_benchmark_runs_each_format_in_the_models_graph(llama_dir, tmp_path):
    """benchmarks/format_times.py on a tiny decoder: every decoder MatMul re-encoded per format beside the layer
    probe, the decode step bound with its KV buffers; int4-b32 is 1 by construction, every other time positive (the
    per-weight figure of a tiny model's few weights is the step's noise magnified: only finite)."""
    import math
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "format_times.py"
    out = tmp_path / "times.json"
    done = subprocess.run([sys.executable, str(script), "--model", str(llama_dir), "--formats",
                           "int8-b128,int4-b32-offset", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = json.loads(out.read_text())
    assert list(result["formats"]) == ["int4-b32", "int8-b128", "int4-b32-offset"]
    assert result["formats"]["int4-b32"] == {"probe": 1.0, "graph_step": 1.0, "graph_per_weight": 1.0}
    assert all(row["probe"] > 0 and row["graph_step"] > 0 and math.isfinite(row["graph_per_weight"])
               for row in result["formats"].values())
    config = json.loads((llama_dir / "config.json").read_text())
    assert result["decoder_weights"] > config["num_hidden_layers"] * config["hidden_size"] ** 2 and \
        result["reference_step_ms"] > 0


@pytest.mark.parametrize("name", ["int4-b32-offset", "row-split"])
def test_format_probes_keep_their_nodes_through_the_optimizer(tmp_path, name):
    """Each probe unit pays its own nodes, as in a decode: ONNX Runtime's optimizer neither merges the offset grids'
    block sums across units (they would read one input) nor folds a row split's Shape and Expand (static shapes)."""
    import onnx
    import onnxruntime as ort

    from exporter.device.host_probes import format_graph, format_io, probe_session

    shapes = [(64, 256), (256, 64)] * 2
    nodes, small, large = format_graph(name, shapes)
    inputs, outputs, _ = format_io(shapes)
    probe_session(str(tmp_path), nodes, 0, 0, tuple(small.items()), large, inputs=inputs, outputs=outputs, tokens=True)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "probe0.onnx"), options, providers=["CPUExecutionProvider"])
    kept = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node]
    written = [n.op_type for n in nodes]
    assert sorted(kept) == sorted(written), (kept, written)
