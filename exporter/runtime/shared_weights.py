"""ONNX Runtime sessions that read one copy of their weights: every rank level of an artifact loaded at once.

A level file's external-data entries point into the artifact's one data file (`graph.writer.write_levels`),
but each InferenceSession still maps (or prepacks) its initializers privately, so a process with every
level loaded would hold the weights once per level. `SharedWeights` maps each data file once (a read-only
numpy memmap) and gives every session its initializers as views into that map
(`SessionOptions.add_initializer`: no copy). Sharing needs weight prepacking off, because a prepacked
weight is a private re-laid-out copy per session. Measured on SmolLM2-135M at 20% removed, levels
1.0/0.85/0.7, 2 threads (benchmarks/levels_probe.py): fp32 peak RSS with every level loaded 1.02x one
level (2.5x with plain sessions), at about 0.77x the decode speed of prepacked weights; int4
`MatMulNBits` without prepacking dequantizes every weight on every call (about 25x slower), so quantized
graphs are loaded unshared, with prepacking (all levels: about 2x one level's RSS).

Every session also gets ONNX Runtime's CPU memory arena turned off: an arena keeps the buffers of its
session's largest run (a 128-token prefill's logits alone are 25 MB for SmolLM2), once per loaded level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

QUANTIZED_OPS = ("MatMulNBits", "MatMulInteger", "GatherBlockQuantized", "DynamicQuantizeMatMul")


class SharedWeights:
    """One memory map per data file, shared by the sessions built from `session_options`; keep this
    object alive as long as those sessions."""

    def __init__(self):
        self._maps: dict[Path, np.memmap] = {}
        self._values: list = []  # the OrtValues (and their arrays) must outlive the sessions

    def session_options(self, onnx_path, options=None):
        """`options` (or new SessionOptions) set up to read `onnx_path`'s external initializers from the
        shared maps, prepacking and the memory arena off; quantized graphs only lose the arena."""
        import onnx
        import onnxruntime as ort
        from onnx.external_data_helper import ExternalDataInfo

        options = options or ort.SessionOptions()
        options.enable_cpu_mem_arena = False
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        if any(node.op_type in QUANTIZED_OPS for node in graph.node):
            return options
        options.add_session_config_entry("session.disable_prepacking", "1")
        for tensor in graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = ExternalDataInfo(tensor)
            file = (Path(onnx_path).parent / info.location).resolve()
            if file not in self._maps:
                self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
            array = np.frombuffer(self._maps[file], dtype, info.length // dtype.itemsize, info.offset or 0)
            array = array.reshape(tuple(tensor.dims))
            value = ort.OrtValue.ortvalue_from_numpy(array)
            self._values.append((array, value))
            options.add_initializer(tensor.name, value)
        return options
