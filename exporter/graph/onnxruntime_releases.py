"""Which ONNX Runtime releases load a graph, and what the writer may emit for a given one (torch-free).

Apps pin the ONNX Runtime they bundle (onnxruntime-android/-c/-node, a Jetson's JetPack wheel). A profile's
`runtime.onnxruntime_version` (or `--onnxruntime-version`) names it; the writer then emits only operators,
opsets and IR versions that release loads, and every artifact's manifest records the oldest release that
loads it (`oldest_release`).

The facts below were measured, not read from release notes: `benchmarks/runtime_versions.py` installs each
release from PyPI and loads the artifacts of every weight format (benchmarks/RESULTS.md, "ONNX Runtime
releases"). Per release: the highest default-domain opset and IR version it loads. Per contrib operator
form: the first release whose CPU kernel runs it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from exporter.errors import ExporterError

MS_DOMAIN = "com.microsoft"

# release -> (highest ai.onnx opset, highest IR version) it loads. Releases after the last listed load
# what it loads (and more).
OPSETS = {
    (1, 18): (21, 10), (1, 19): (21, 10), (1, 20): (21, 10),
    (1, 21): (22, 10), (1, 22): (22, 10),
    (1, 23): (23, 11), (1, 24): (23, 11),
}
OLDEST = min(OPSETS)  # 1.17 has no CPU GroupQueryAttention for float (only CUDA fp16): the fused graph needs it
NEWEST_KNOWN = max(OPSETS)
# ONNX's RMSNormalization is opset 23; below it the writer composes Pow/ReduceMean/Add/Sqrt/Div/Mul, the
# pattern ONNX Runtime's optimizer fuses back into its own SimplifiedLayerNormalization.
RMS_NORMALIZATION_OPSET = 23
EIGHT_BIT_MATMUL_RELEASE = (1, 22)  # MatMulNBits bits=8 on the CPU ("Only 4b quantization" before)
# MatMulNBits bits=2 on the CPU: 1.24 to 1.27 run it 80-95x slower than 4 bits (a 576 x 1536 node: 1.9-2.3 ms
# against 23 us); from 1.28, about 2x (44-68 us; measured here, benchmarks/RESULTS.md)
TWO_BIT_MATMUL_RELEASE = (1, 28)
PACKED_GATHER_RELEASE = (1, 23)  # GatherBlockQuantized with its `bits` attribute and packed uint8 data
# GatherBlockQuantized bits=2 (a tied lm_head's 2-bit rows): 1.23 to 1.26 refuse it at load ("only support bits==4
# or 8"); 1.27, 1.28 and 1.32 give the same logits (within 4e-7; measured here, benchmarks/RESULTS.md)
TWO_BIT_GATHER_RELEASE = (1, 27)
# GroupQueryAttention's local_window_size: 1.18 to 1.23 load it but compute other logits than PyTorch once a
# prompt is longer than the window (Gemma 3, Phi-3 and Mistral-style tiny models, 20-token prompts: max |logit
# difference| 0.9 to 2.2; 1.24 to 1.32: 2e-6)
SLIDING_WINDOW_RELEASE = (1, 24)


@dataclass(frozen=True)
class Requirement:
    """A graph feature and the first release that runs it."""
    release: tuple[int, int]
    what: str


def parse_release(text: str | None) -> tuple[int, int] | None:
    """"1.20", "1.20.1" or "v1.20" -> (1, 20); None stays None. One-line errors for anything else."""
    if text is None:
        return None
    match = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.\d+)?", str(text).strip())
    if not match:
        raise ExporterError(f"ONNX Runtime version {text!r}: expected MAJOR.MINOR such as 1.20")
    release = (int(match[1]), int(match[2]))
    if release < OLDEST:
        raise ExporterError(f"ONNX Runtime {name(release)} cannot run the exported decoder (its CPU kernels lack "
                            f"GroupQueryAttention for float); the oldest supported release is {name(OLDEST)}")
    return release


def name(release: tuple[int, int]) -> str:
    return f"{release[0]}.{release[1]}"


def limits(release: tuple[int, int] | None) -> tuple[int, int]:
    """(opset, IR version) the writer emits for `release` (None: the newest known)."""
    known = [r for r in OPSETS if r <= (release or NEWEST_KNOWN)]
    return OPSETS[max(known)]


def _attribute(node, key: str, default=None):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == key), default)


def requirements(proto) -> list[Requirement]:
    """What in `proto` needs a release newer than the oldest supported one, each with that release."""
    needs = []
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    for release in sorted(OPSETS):
        if OPSETS[release][0] >= opset:
            if release > OLDEST:
                needs.append(Requirement(release, f"opset {opset}"))
            break
    else:
        needs.append(Requirement(NEWEST_KNOWN, f"opset {opset}"))
    for release in sorted(OPSETS):
        if OPSETS[release][1] >= proto.ir_version:
            if release > OLDEST:
                needs.append(Requirement(release, f"IR version {proto.ir_version}"))
            break
    for node in proto.graph.node:
        if node.domain != MS_DOMAIN:
            continue
        if node.op_type == "MatMulNBits" and _attribute(node, "bits", 4) == 2:
            needs.append(Requirement(TWO_BIT_MATMUL_RELEASE, "2-bit MatMulNBits at speed"))
        elif node.op_type == "MatMulNBits" and _attribute(node, "bits", 4) != 4:
            needs.append(Requirement(EIGHT_BIT_MATMUL_RELEASE, f"{_attribute(node, 'bits')}-bit MatMulNBits"))
        elif node.op_type == "GatherBlockQuantized" and _attribute(node, "bits") == 2:
            needs.append(Requirement(TWO_BIT_GATHER_RELEASE, "2-bit GatherBlockQuantized"))
        elif node.op_type == "GatherBlockQuantized" and _attribute(node, "bits") is not None:
            needs.append(Requirement(PACKED_GATHER_RELEASE, "GatherBlockQuantized with packed uint8 data"))
        elif node.op_type == "GroupQueryAttention" and _attribute(node, "local_window_size", -1) > 0:
            needs.append(Requirement(SLIDING_WINDOW_RELEASE, "a sliding-window GroupQueryAttention"))
    return needs


def oldest_release(proto) -> str:
    """The oldest ONNX Runtime release that loads and runs `proto` ("MAJOR.MINOR")."""
    return name(max([OLDEST, *(r.release for r in requirements(proto))]))


def check_release(proto, release: tuple[int, int] | None, what: str = "the graph") -> None:
    """Raise a one-line ExporterError when `release` cannot run `proto`, naming each feature and the release
    it needs."""
    if release is None:
        return
    too_new = {}
    for need in requirements(proto):
        if need.release > release:
            too_new.setdefault(need.what, need.release)
    if too_new:
        listed = "; ".join(f"{what_} needs {name(r)}" for what_, r in too_new.items())
        raise ExporterError(f"{what} cannot run on ONNX Runtime {name(release)}: {listed} (target ONNX Runtime "
                            f"{name(max(too_new.values()))} or later)")
