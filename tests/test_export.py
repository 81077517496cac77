"""ONNX export with KV cache, ONNX Runtime parity and greedy decoding; atomic artifact directories (the
manifest written into them: test_manifest.py)."""

import os

import numpy as np
import pytest
import torch

from exporter.architectures import architecture_of
from exporter.artifact.staging import staging_dir
from exporter.compress.factorize import apply_ranks, count_params, decoder_projections, decompose_model, uniform_ranks
from exporter.compress.lowrank import LowRankLinear
from exporter.errors import ExporterError, ParityError
from exporter.graph.optimum_export import check_parity, export_onnx, torch_greedy
from exporter.runtime.generation import OrtDecoder

FAMILIES = ["llama", "qwen3", "qwen2", "mistral", "gemma3_text", "smollm3", "phi3"]
PROMPT = "The engineer explains the last question with great care. Then a small robot"


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tiny_models, calib_ids, tokenizer, tmp_path_factory):
    """(family, compressed model, model.onnx path, prompt ids): whitened SVD at ratio 0.3."""
    family = request.param
    model = tiny_models.load(family)
    projections = decoder_projections(model)
    decompositions = decompose_model(model, "whitened", calib_ids[:4], progress=False)
    apply_ranks(model, decompositions, uniform_ranks(projections, 0.3))
    assert all(isinstance(model.get_submodule(p.name), LowRankLinear) for p in projections)
    out = tmp_path_factory.mktemp(f"onnx-{family}")
    path = export_onnx(model, out)
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    return family, model, path, prompt


def test_parity_tight(exported):
    _family, model, path, prompt = exported
    report = check_parity(model, path, prompt, steps=8, atol=1e-3, min_agreement=1.0)
    assert report.passed
    assert report.max_abs_logit_diff <= 1e-3 and report.greedy_agreement == 1.0
    assert (report.prompt_tokens, report.decode_steps) == (len(prompt), 8)
    assert set(report.to_dict()) >= {"max_abs_logit_diff", "greedy_agreement", "passed"}


def test_onnx_has_optimum_io_names(exported):
    import onnxruntime as ort

    _family, model, path, _prompt = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    layers = model.config.num_hidden_layers
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert inputs[:2] == ["input_ids", "attention_mask"]
    assert set(inputs) - set(past) <= {"input_ids", "attention_mask", "position_ids"}
    assert set(past) <= set(inputs)
    assert outputs == ["logits", *present]
    kv_heads, head_dim = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    meta = {i.name: i for i in session.get_inputs()}
    assert meta["past_key_values.0.key"].shape[1] == kv_heads and meta["past_key_values.0.key"].shape[3] == head_dim
    assert meta["past_key_values.0.key"].type == "tensor(float)"
    assert (path.parent / "config.json").is_file()


def test_onnx_holds_the_factors_not_dense_weights(exported):
    """The exported weights are exactly the compressed model's parameters (nothing re-densified)."""
    import onnx
    from onnx import numpy_helper

    _family, model, path, _prompt = exported
    graph = onnx.load(str(path)).graph
    sizes = [numpy_helper.to_array(t).size for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert sum(sizes) == count_params(model)
    shapes = {tuple(t.dims) for t in graph.initializer}
    q = model.get_submodule(f"model.layers.0.self_attn.{architecture_of(model).qkv[0]}")
    assert (q.in_features, q.rank) in shapes and (q.rank, q.out_features) in shapes


def test_ort_greedy_equals_torch_greedy(exported):
    _family, model, path, prompt = exported
    steps = 12
    ref_tokens, ref_logits = torch_greedy(model, prompt, steps)
    decoder = OrtDecoder(path, threads=1)
    tokens, step_logits, timing = decoder.greedy(prompt, steps)
    assert tokens == ref_tokens
    assert step_logits.shape == (steps, model.config.vocab_size)
    np.testing.assert_allclose(step_logits, ref_logits, atol=1e-3)
    assert timing.prefill_s > 0 and len(timing.step_s) == steps - 1 and timing.tokens_per_s > 0
    # PyTorch's own generate() agrees too (it has its own cache implementation).
    with torch.no_grad():
        generated = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                   pad_token_id=model.config.pad_token_id)
    assert generated[0, len(prompt):].tolist() == tokens


def test_ort_greedy_stops_at_stop_ids(exported):
    _family, _model, path, prompt = exported
    decoder = OrtDecoder(path, threads=1)
    tokens, _, _ = decoder.greedy(prompt, 6)
    stopped, logits, timing = decoder.greedy(prompt, 6, stop_ids={tokens[2]})
    assert stopped == tokens[: tokens.index(tokens[2]) + 1]
    assert len(logits) == len(stopped)


def test_parity_failure_is_reported(exported, tiny_models):
    family, model, path, prompt = exported
    report = check_parity(model, path, prompt, steps=4, atol=-1.0, raise_on_fail=False)
    assert not report.passed  # no difference is below a negative tolerance
    dense = tiny_models.load(family)  # the uncompressed model is not what was exported
    with pytest.raises(ParityError, match="parity failed") as e:
        check_parity(dense, path, prompt, steps=4, atol=1e-3)
    assert e.value.exit_code == 3


# ---------------------------------------------------------------------------------------------
# Atomic artifact directories


def listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_staging_dir_renames_on_success(tmp_path):
    target = tmp_path / "artifact"
    with staging_dir(target) as staging:
        assert staging.parent == tmp_path and staging != target and not target.exists()
        (staging / "model.onnx").write_bytes(b"onnx")
        (staging / "sub").mkdir()
        (staging / "sub" / "x.txt").write_text("x")
    assert (target / "model.onnx").read_bytes() == b"onnx" and (target / "sub" / "x.txt").read_text() == "x"
    assert listing(tmp_path) == ["artifact"]
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's private 0o700


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_staging_dir_leaves_nothing_when_the_block_raises(tmp_path, error):
    target = tmp_path / "artifact"
    with pytest.raises(type(error)):
        with staging_dir(target) as staging:
            (staging / "half-written.onnx").write_bytes(b"\0" * 1000)
            raise error
    assert listing(tmp_path) == []


def test_staging_dir_keeps_existing_target_without_force(tmp_path):
    target = tmp_path / "artifact"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(ExporterError, match="already exists.*--force"):
        with staging_dir(target):
            pytest.fail("the block must not run")
    assert listing(tmp_path) == ["artifact"] and listing(target) == ["old.txt"]


def test_staging_dir_replaces_with_force(tmp_path):
    target = tmp_path / "artifact"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with staging_dir(target, force=True) as staging:
        (staging / "new.txt").write_text("new")
        assert listing(target) == ["old.txt"]  # the old artifact stays until the new one is complete
    assert listing(tmp_path) == ["artifact"] and listing(target) == ["new.txt"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_staging_dir_with_force_keeps_old_target_when_the_block_raises(tmp_path, error):
    target = tmp_path / "artifact"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(type(error)):
        with staging_dir(target, force=True) as staging:
            (staging / "new.txt").write_text("new")
            raise error
    assert listing(tmp_path) == ["artifact"] and listing(target) == ["old.txt"]


def test_staging_dir_refuses_a_file_target(tmp_path):
    target = tmp_path / "artifact"
    target.write_text("a file")
    with pytest.raises(ExporterError, match="not a directory"):
        with staging_dir(target, force=True):
            pytest.fail("the block must not run")
    assert target.read_text() == "a file" and listing(tmp_path) == ["artifact"]
