"""Packaging for ONNX Runtime Mobile: the artifact's decoder in the ORT format (`model.ort`).

The ORT format is the flatbuffer model format of ONNX Runtime's reduced-size builds; full builds
(the onnxruntime-android AAR, the onnxruntime-objc / onnxruntime-c pods, desktop wheels) load it as
well as `.onnx`. The conversion is ONNX Runtime's own, `onnxruntime.tools.convert_onnx_models_to_ort`
(`python -m onnxruntime.tools.convert_onnx_models_to_ort`): it loads model.onnx in an InferenceSession on
the CPU provider, applies the graph optimizations of level `all` in the 'Fixed' style (baked into the
file; the x86-only NCHWc layout transformer is left out, so the file is not host-specific) and saves the
optimized graph. It also writes `model.required_operators.config`, the operator list a custom minimal
build takes (`build.sh --minimal_build --include_ops_by_config ...`).

Checked on the exporter's graphs (fp32, int8, int4; fused and optimum): the contrib ops convert
(GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits, GatherBlockQuantized, and the
fusions ONNX Runtime adds: FusedMatMul, QuickGelu, DynamicQuantizeMatMul). External data is read at
conversion and embedded: ONNX Runtime writes no external data for ORT-format inference models
(`Graph::SaveToOrtFormat` stores every initializer inline), so the file is one flatbuffer, and
flatbuffers' 32-bit offsets cap it at 2 GiB. A graph whose weights are near that is refused before the
conversion, with the figures. Only the full level is converted: rank levels share model.onnx.data
through external-data offsets, which the ORT format cannot express (each level would carry its own copy).

After conversion `model.ort` is loaded in an InferenceSession and run beside `model.onnx` on one prompt
(prefill and a few greedy decode steps through the KV cache); the logits must match (`ORT_CHECK_ATOL`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from exporter.errors import ExporterError, ParityError

ORT_SUFFIX = ".ort"
OPERATORS_SUFFIX = ".required_operators.config"
# flatbuffers' offsets are 32-bit signed: a buffer stays below 2 GiB. Keep room for the graph itself and
# for initializers the optimizer adds (folded constants).
ORT_FORMAT_LIMIT_BYTES = 2**31 - 1
ORT_FORMAT_MARGIN_BYTES = 64 * 2**20
ORT_CHECK_STEPS = 4  # greedy decode steps after the prefill
ORT_CHECK_ATOL = 1e-4  # the same optimized graph on the same kernels: measured 0.0 on every graph tried


def graph_bytes(onnx_path: Path) -> int:
    """The bytes of an ONNX graph and of every external-data file it references."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    onnx_path = Path(onnx_path)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    locations = {ExternalDataInfo(t).location for t in proto.graph.initializer if uses_external_data(t)}
    return onnx_path.stat().st_size + sum((onnx_path.parent / loc).stat().st_size for loc in locations)


def converter():
    """ONNX Runtime's converter and its style enum; ExporterError where this onnxruntime lacks it."""
    try:
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort
    except ImportError as exc:
        raise ExporterError(f"--ort: this onnxruntime has no ORT-format converter "
                            f"(onnxruntime.tools.convert_onnx_models_to_ort: {exc})") from None
    return convert_onnx_models_to_ort, OptimizationStyle


def convert_to_ort(onnx_path: Path, out_dir: Path) -> tuple[Path, Path | None]:
    """Convert `onnx_path` (with its external data) to out_dir/NAME.ort; returns it and the
    required-operators config. Raises ExporterError naming the cause."""
    convert, style = converter()
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    size = graph_bytes(onnx_path)
    if size > ORT_FORMAT_LIMIT_BYTES - ORT_FORMAT_MARGIN_BYTES:
        raise ExporterError(
            f"--ort: {onnx_path.name} and its external data take {size / 2**30:.2f} GiB; an ORT-format file embeds "
            f"every weight in one flatbuffer, which is limited to 2 GiB (ONNX Runtime writes no external data for "
            f"ORT-format models). Export with --weights int4 (or int8), or ship the .onnx with its external data")
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".ort-") as tmp:
        log = io.StringIO()  # the converter prints its progress on stdout, which the CLI keeps for the summary
        chatty = logging.getLogger("ort_format_model.utils")  # set to DEBUG by onnxruntime.tools.logger
        level = chatty.level
        chatty.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(log):
                convert(onnx_path, output_dir=Path(tmp), optimization_styles=[style.Fixed])
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise ExporterError(f"--ort: ONNX Runtime could not convert {onnx_path.name} to the ORT format: "
                                f"{type(exc).__name__}: {exc}") from None
        finally:
            chatty.setLevel(level)
        converted = Path(tmp) / (onnx_path.stem + ORT_SUFFIX)
        if not converted.is_file():
            raise ExporterError(f"--ort: the converter wrote no {converted.name}: {log.getvalue().strip()[-500:]}")
        target = out_dir / converted.name
        shutil.move(converted, target)
        config = Path(tmp) / (onnx_path.stem + OPERATORS_SUFFIX)
        operators = None
        if config.is_file():
            operators = out_dir / config.name
            # the config names the temporary path it was generated from: keep only the file name
            operators.write_text(config.read_text().replace(str(Path(tmp)) + "/", ""))
    return target, operators


def compare_logits(onnx_path: Path, ort_path: Path, prompt_ids, steps: int = ORT_CHECK_STEPS) -> dict:
    """Both files in ONNX Runtime (CPU, one thread) on the same tokens: the prompt, then `steps` greedy tokens
    chosen by the .onnx session, each through its own KV cache. Every logit of the prefill and of each step is
    compared."""
    from exporter.runtime.generation import OrtDecoder

    reference, converted = OrtDecoder(onnx_path, threads=1), OrtDecoder(ort_path, threads=1)
    feed = np.asarray(prompt_ids, dtype=np.int64)[None, :]
    ref_cache, conv_cache = reference.empty_cache(1), converted.empty_cache(1)
    diff, agree = 0.0, []
    for _ in range(steps + 1):
        ref_logits, ref_cache = reference.step(feed, ref_cache)
        conv_logits, conv_cache = converted.step(feed, conv_cache)
        if conv_logits.shape != ref_logits.shape:
            raise ParityError(f"{Path(ort_path).name}: logits of shape {conv_logits.shape}, "
                              f"{Path(onnx_path).name} gives {ref_logits.shape}")
        diff = max(diff, float(np.abs(conv_logits - ref_logits).max()))
        token = int(np.argmax(ref_logits[0, -1]))
        agree.append(int(np.argmax(conv_logits[0, -1])) == token)
        feed = np.array([[token]], dtype=np.int64)
    return {"prompt_tokens": len(prompt_ids), "decode_steps": steps, "max_abs_logit_diff": diff,
            "greedy_agreement": float(np.mean(agree)), "atol": ORT_CHECK_ATOL, "passed": diff <= ORT_CHECK_ATOL}


def write_ort_format(directory: Path, onnx_path: Path, prompt_ids, not_converted=()) -> dict:
    """model.ort (and its required-operators config) beside `onnx_path` in the artifact directory, checked
    against the .onnx; returns the manifest's `ort_format` entry. Raises ParityError (exit 3) when the logits
    differ, ExporterError when the conversion is impossible."""
    import onnxruntime

    directory, onnx_path = Path(directory), Path(onnx_path)
    ort_path, operators = convert_to_ort(onnx_path, directory)
    check = compare_logits(onnx_path, ort_path, prompt_ids)
    if not check["passed"]:
        raise ParityError(f"--ort: {ort_path.name} and {onnx_path.name} disagree: max |logit diff| "
                          f"{check['max_abs_logit_diff']:.3g} (tolerance {ORT_CHECK_ATOL})")
    entry = {"file": ort_path.name, "source": onnx_path.name, "bytes": ort_path.stat().st_size,
             "converter": "onnxruntime.tools.convert_onnx_models_to_ort", "onnxruntime": onnxruntime.__version__,
             "optimization": {"style": "Fixed", "level": "all"}, "check": check}
    if operators is not None:
        entry["required_operators"] = operators.name
        entry["operators"] = [line for line in operators.read_text().splitlines() if line and not line.startswith("#")]
    if not_converted:
        entry["not_converted"] = {"files": list(not_converted),
                                  "why": "rank levels read model.onnx.data through external-data offsets, which the "
                                         "ORT format cannot hold: each level would embed its own copy of the weights"}
    return entry
