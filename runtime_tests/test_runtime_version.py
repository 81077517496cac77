"""This onnxruntime is one the artifact was written for: at least the oldest release its manifest records
(the exporter writes for `--onnxruntime-version` / the profile's runtime.onnxruntime_version)."""

import re

import onnxruntime
import pytest


def _release(text: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


def test_onnxruntime_is_recent_enough(manifest, measured):
    oldest = manifest["onnx"].get("oldest_onnxruntime")
    if oldest is None:
        pytest.skip("the manifest records no oldest ONNX Runtime release (an artifact from before the exporter recorded it)")
    measured.append(f"onnxruntime {onnxruntime.__version__} (the artifact needs {oldest} or later"
                    + (f", written for {manifest['onnx']['target_onnxruntime']})"
                       if manifest["onnx"].get("target_onnxruntime") else ")"))
    assert _release(onnxruntime.__version__) >= _release(oldest), (
        f"onnxruntime {onnxruntime.__version__} is older than {oldest}, the oldest release this artifact runs on: "
        f"re-export with --onnxruntime-version {'.'.join(onnxruntime.__version__.split('.')[:2])}")
