"""Simulated int4 (exporter.compress.simulated_quant) against ONNX Runtime's own MatMulNBits quantization."""

import numpy as np
import pytest
import torch

from exporter.compress.simulated_quant import fake_quantize_int4


def _ort_int4_matmul(weight: np.ndarray, x: np.ndarray, block_size: int) -> np.ndarray:
    """x @ W^T through a MatMul that ONNX Runtime's quantizer turns into MatMulNBits."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from exporter.graph.writer import _quantize_int4

    out_features, in_features = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, out_features])],
        [numpy_helper.from_array(np.ascontiguousarray(weight.T), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto = _quantize_int4(proto, block_size, None)
    assert [n.op_type for n in proto.graph.node] == ["MatMulNBits"]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("in_features", [64, 48])  # 48: a padded last block
def test_matches_onnxruntime_matmulnbits(in_features):
    torch.manual_seed(0)
    weight = torch.randn(24, in_features) * torch.linspace(0.1, 3.0, in_features)
    x = torch.randn(5, in_features)
    expected = _ort_int4_matmul(weight.numpy(), x.numpy(), 32)
    simulated = (x @ fake_quantize_int4(weight, 32).T).numpy()
    plain = (x @ weight.T).numpy()
    assert np.abs(expected - plain).max() > 1e-2  # quantization changed the result ...
    np.testing.assert_allclose(simulated, expected, rtol=1e-4, atol=1e-4)  # ... exactly as simulated


def test_requantizing_is_exact():
    torch.manual_seed(1)
    weight = torch.randn(8, 96)
    once = fake_quantize_int4(weight, 32)
    assert not torch.equal(once, weight)
    assert torch.equal(fake_quantize_int4(once, 32), once)
