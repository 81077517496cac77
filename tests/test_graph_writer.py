"""The fused ONNX Runtime decoder writer (GroupQueryAttention, SkipSimplifiedLayerNormalization,
fused q/k/v and gate/up first stages, MatMulNBits): parity with PyTorch on dense, factorized and
mixed tiny models of every family, fusion structure, fp16 and quantized variants and config variants."""

from collections import Counter

import numpy as np
import pytest
import torch

from exporter.architectures import architecture_of
from exporter.compress.factorize import apply_ranks, decoder_projections, decompose_model, uniform_ranks
from exporter.compress.lowrank import LowRankLinear
from exporter.graph.optimum_export import torch_greedy
from exporter.graph.writer import (
    GRAPH_BYTES_BASE,
    GRAPH_BYTES_PER_LAYER,
    LowRankPair,
    ProjectionWeights,
    build_decoder,
    constant_bytes,
    supports,
    write_decoder,
)
from exporter.runtime.generation import OrtDecoder, decode, sample_token

FAMILIES = ["llama", "qwen3", "qwen2", "mistral", "gemma3_text", "smollm3", "phi3"]
PROMPT = "The engineer explains the last question with great care. Then a small robot"
STEPS = 8


@pytest.fixture(scope="module")
def prompt(tokenizer):
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"][:12]
    assert len(ids) == 12
    return ids


def _factorize(model, calib_ids, keep_dense=()):
    """Whitened SVD at ratio 0.3 on every projection except those whose name ends with keep_dense."""
    decompositions = decompose_model(model, "whitened", calib_ids[:4], progress=False)
    ranks = uniform_ranks(decoder_projections(model), 0.3)
    ranks = {name: None if name.endswith(tuple(keep_dense)) else rank for name, rank in ranks.items()}
    apply_ranks(model, decompositions, ranks)
    return model


@pytest.fixture(scope="module")
def models(tiny_models, calib_ids):
    """{(family, variant): model} for variant in dense / lowrank / mixed, built lazily."""
    cache = {}

    def get(family, variant):
        if (family, variant) not in cache:
            model = tiny_models.load(family)
            if variant == "lowrank":
                _factorize(model, calib_ids)
            elif variant == "mixed":  # layer 0: q, v, gate low-rank; layer 1: k, o, up, down low-rank
                _factorize(model, calib_ids, keep_dense=("0.self_attn.k_proj", "0.self_attn.o_proj",
                                                         "0.mlp.up_proj", "0.mlp.down_proj",
                                                         "1.self_attn.q_proj", "1.self_attn.v_proj",
                                                         "1.mlp.gate_proj"))
            cache[family, variant] = model
        return cache[family, variant]

    return get


def _run(path, prompt, ref_tokens):
    _, logits, _ = OrtDecoder(path, threads=1).greedy(prompt, STEPS, forced_tokens=ref_tokens)
    return logits


def _ops(path):
    import onnx

    return onnx.load(str(path), load_external_data=False).graph


@pytest.mark.parametrize("variant", ["dense", "lowrank", "mixed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_parity(models, family, variant, prompt, tmp_path):
    model = models(family, variant)
    spec = architecture_of(model)
    kinds = {type(getattr(getattr(layer, part), name)) for layer in model.model.layers
             for part, names in (("self_attn", (*spec.qkv, "o_proj")), ("mlp", (*spec.gate_up, "down_proj")))
             for name in names}
    assert kinds == {"dense": {torch.nn.Linear}, "lowrank": {LowRankLinear},
                     "mixed": {torch.nn.Linear, LowRankLinear}}[variant]
    ref_tokens, ref_logits = torch_greedy(model, prompt, STEPS)
    path = write_decoder(model, tmp_path)
    assert path == tmp_path / "model.onnx" and (tmp_path / "model.onnx.data").is_file()
    logits = _run(path, prompt, ref_tokens)
    assert logits.shape == ref_logits.shape == (STEPS, model.config.vocab_size)
    assert np.abs(logits - ref_logits).max() <= 1e-3
    assert list(np.argmax(logits, axis=-1)) == ref_tokens


# fp16 graphs against the fp32 PyTorch model. fp16 keeps 11 significant bits: a logit of 4 to 8 is stored to
# 1/256, and every fp16 activation between the ops is rounded as finely. Measured on these tiny models (logits
# up to about 7): at most 0.005, 8e-4 of the largest |logit|, over dense, low-rank and corrective variants of
# the four families; 2e-3 leaves 2.5x of margin.
FP16_RTOL = 2e-3


@pytest.mark.parametrize("variant", ["dense", "mixed"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_fp16_parity(models, family, variant, prompt, tmp_path):
    import onnx

    model = models(family, variant)
    ref_tokens, ref_logits = torch_greedy(model, prompt, STEPS)
    path = write_decoder(model, tmp_path, weights="fp16")
    graph = _ops(path)
    # Every float initializer is fp16 (weights, norms, rotary caches); shapes and indices stay int64.
    assert {t.data_type for t in graph.initializer} == {onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64}
    # The fp32 graph's nodes, in the same order: only the types differ.
    fp32 = _ops(write_decoder(model, tmp_path / "fp32"))
    assert [(n.op_type, n.name) for n in graph.node] == [(n.op_type, n.name) for n in fp32.node]

    decoder = OrtDecoder(path, threads=1)
    types = {v.name: v.type for v in [*decoder.session.get_inputs(), *decoder.session.get_outputs()]}
    assert types.pop("input_ids") == types.pop("attention_mask") == "tensor(int64)"
    assert set(types.values()) == {"tensor(float16)"}  # logits, past_key_values.*, present.*
    raw, _ = decoder.step(np.array([prompt]), decoder.empty_cache(1))
    assert raw.dtype == np.float16

    # Prefill, then STEPS - 1 decode steps through the fp16 KV cache, on PyTorch's tokens.
    _, logits, _ = decoder.greedy(prompt, STEPS, forced_tokens=ref_tokens)
    assert logits.dtype == np.float32  # the runtime widens each step's logits
    assert np.abs(logits - ref_logits).max() <= FP16_RTOL * np.abs(ref_logits).max()
    tokens, _, _ = decoder.greedy(prompt, STEPS)  # free-running: the graph's own tokens and cache
    assert tokens == ref_tokens
    rng = np.random.default_rng(0)
    sampled = [s.token for s in decode(lambda t: ("", decoder), prompt, STEPS,
                                       lambda row: sample_token(row, 0.8, 0.9, rng))]
    assert len(sampled) == STEPS and all(0 <= t < model.config.vocab_size for t in sampled)


def _first_stage_counts(graph):
    """MatMuls reading each norm output that feeds projections (attention input, MLP input)."""
    norms = [n.output[0] for n in graph.node
             if n.op_type in ("RMSNormalization", "SkipSimplifiedLayerNormalization") and "/norm/" not in n.name
             and "_norm/" not in n.name]  # final norm (lm_head) and Qwen3 q/k norms excluded
    matmuls = Counter(n.input[0] for n in graph.node if n.op_type in ("MatMul", "MatMulNBits"))
    return [matmuls[name] for name in norms]


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_fused_first_stage_and_unfused_equivalence(models, family, tmp_path):
    model = models(family, "mixed")
    layers = model.config.num_hidden_layers
    fused = write_decoder(model, tmp_path / "fused")
    unfused = write_decoder(model, tmp_path / "unfused", _fuse=False)
    assert _first_stage_counts(_ops(fused)) == [1, 1] * layers  # q/k/v, gate/up
    # Unfused: one first-stage MatMul per projection (a dense + low-rank projection would count twice).
    assert _first_stage_counts(_ops(unfused)) == [3, 2] * layers
    ids = np.array([[5, 17, 42, 9, 33, 2, 61, 7]], dtype=np.int64)
    outs = []
    for path in (fused, unfused):
        decoder = OrtDecoder(path, threads=1)
        logits, cache = decoder.step(ids, decoder.empty_cache(1))
        step, _ = decoder.step(ids[:, :1], cache)
        outs.append(np.concatenate([logits, step], axis=1))
    assert np.abs(outs[0] - outs[1]).max() <= 1e-4


def test_graph_ops_io_and_checker(models, tmp_path):
    import onnx
    import onnxruntime as ort

    model = models("qwen3", "lowrank")
    path = write_decoder(model, tmp_path)
    onnx.checker.check_model(str(path))
    graph = _ops(path)
    ops = Counter(n.op_type for n in graph.node)
    layers, kv_heads, head_dim = model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim
    assert ops["GroupQueryAttention"] == layers
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers  # post-attention, next input / final norm
    assert ops["RMSNormalization"] == 1 + 2 * layers  # layer 0's input norm, Qwen3's q/k norms
    assert {n.domain for n in graph.node if n.op_type == "GroupQueryAttention"} == {"com.microsoft"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", *past]
    assert [o.name for o in session.get_outputs()] == ["logits", *present]
    meta = {i.name: i for i in session.get_inputs()}
    assert meta["input_ids"].type == meta["attention_mask"].type == "tensor(int64)"
    assert meta["past_key_values.1.value"].shape[1::2] == [kv_heads, head_dim]
    assert meta["past_key_values.1.value"].type == "tensor(float)"
    logits = session.get_outputs()[0]
    assert logits.type == "tensor(float)" and logits.shape[2] == model.config.vocab_size
    assert (tmp_path / "config.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_int4(models, family, prompt, tmp_path):
    pytest.importorskip("onnx_ir")  # onnxruntime's MatMulNBitsQuantizer imports it
    model = models(family, "lowrank")
    ref_tokens, ref_logits = torch_greedy(model, prompt, STEPS)
    path = write_decoder(model, tmp_path, weights="int4", block_size=32)
    ops = Counter(n.op_type for n in _ops(path).node)
    # per layer: qkv first stage + an up per module (3; Phi-3's fused qkv_proj: 1), o (2), gate/up first stage +
    # an up per module, down (2); plus lm_head
    spec = architecture_of(model)
    per_layer = 1 + len(spec.qkv) + 2 + 1 + len(spec.gate_up) + 2
    assert ops["MatMulNBits"] == per_layer * model.config.num_hidden_layers + 1 and ops["MatMul"] == 0
    logits = _run(path, prompt, ref_tokens)
    # Tolerance: 4-bit symmetric blocks of 32 on 64-wide tiny layers; logits here span about +-7.
    agreement = np.mean(np.argmax(logits, axis=-1) == np.asarray(ref_tokens))
    assert agreement >= 0.75
    assert np.abs(logits - ref_logits).mean() <= 0.25


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_int4_with_fp16_activations(models, family, prompt, tmp_path):
    """The CUDA int4 graph: the fp16 graph's types (KV cache, logits, activations) with MatMulNBits holding
    fp16 scales; its logits follow the fp32-activation int4 graph's (same 4-bit weights)."""
    import onnx

    pytest.importorskip("onnx_ir")
    model = models(family, "lowrank")
    ref_tokens, _ = torch_greedy(model, prompt, STEPS)
    path = write_decoder(model, tmp_path / "fp16", weights="int4", activations="fp16")
    graph = _ops(path)
    scales = {t.name: t.data_type for t in graph.initializer}
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 11 * model.config.num_hidden_layers + 1
    assert {scales[n.input[2]] for n in nbits} == {onnx.TensorProto.FLOAT16}
    assert {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}[
        "activations"] == "fp16"
    decoder = OrtDecoder(path, threads=1)
    types = {v.name: v.type for v in [*decoder.session.get_inputs(), *decoder.session.get_outputs()]}
    assert types.pop("input_ids") == types.pop("attention_mask") == "tensor(int64)"
    assert set(types.values()) == {"tensor(float16)"}
    logits = _run(path, prompt, ref_tokens)
    fp32_activations = _run(write_decoder(model, tmp_path / "fp32", weights="int4"), prompt, ref_tokens)
    # Looser than fp16's FP16_RTOL: the scales are rounded to fp16 too, and the CPU kernel's fp16 path
    # accumulates differently from its fp32 one (measured: 0.9% of the largest logit).
    assert np.abs(logits - fp32_activations).max() <= 0.02 * np.abs(fp32_activations).max()
    assert np.mean(np.argmax(logits, -1) == np.argmax(fp32_activations, -1)) >= 0.875
    with pytest.raises(ValueError, match="int8 weights are written with fp32 activations, not fp16"):
        write_decoder(model, tmp_path / "bad", weights="int8", activations="fp16")


def test_int4_quantizes_an_untied_embedding(tiny_models, prompt, tmp_path):
    """The int4 byte budget counts every parameter at 4 bits: an untied embedding on its 4-bit grid in PyTorch
    (quantize_embedding, as the int4 pipeline does) is stored as that grid's blocks and gathered with
    GatherBlockQuantized; the graph then follows the PyTorch model as tightly as its linears do. Without a grid
    the table stays fp32."""
    import onnx
    from onnx import numpy_helper

    from exporter.compress.grid import QuantFormat, round_to_nearest
    from exporter.compress.quantize import grid_linears, quantize_embedding, quantize_rtn
    from exporter.graph.matmul_nbits import dequantize_inputs

    model = tiny_models.load("llama")
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    table = model.model.embed_tokens.weight.detach().numpy().copy()
    fp32_table = write_decoder(model, tmp_path / "no-grid", weights="int4")
    assert "model.embed_tokens.weight" in {t.name for t in _ops(fp32_table).initializer}

    fmt = QuantFormat(4, 32, True)
    quantize_rtn(list(grid_linears(model).values()), fmt)
    quantize_embedding(model, fmt.block_size)
    ref_tokens, ref_logits = torch_greedy(model, prompt, STEPS)
    path = write_decoder(model, tmp_path / "grid", weights="int4", block_size=32)
    graph = onnx.load(str(path)).graph  # with its external data
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    assert "model.embed_tokens.weight" not in init
    assert [n.op_type for n in graph.node if n.name.startswith("/model/embed_tokens/")] == ["GatherBlockQuantized"]
    vocab, hidden = table.shape
    data, scales = init["/model/embed_tokens/data"], init["/model/embed_tokens/scales"]
    assert data.shape == (vocab, hidden // 2) and scales.shape == (vocab, hidden // 32)
    stored = dequantize_inputs({"B": data.reshape(vocab, hidden // 32, 16), "scales": scales}, fmt, hidden)
    assert np.array_equal(stored, round_to_nearest(table, fmt).dequantize())  # RTN's grid of the table
    assert np.array_equal(stored, model.model.embed_tokens.weight.detach().numpy())  # what PyTorch holds
    logits = _run(path, prompt, ref_tokens)
    assert np.abs(logits - ref_logits).max() <= 2e-4 * np.abs(ref_logits).max()  # int4 graph, fp32 activations
    assert list(np.argmax(logits, axis=-1)) == ref_tokens


def test_int8(models, prompt, tmp_path):
    """int8 is the int4 graph at 8 bits: every weight a MatMulNBits of 8 bits holding the grids PyTorch holds
    (symmetric round-to-nearest where it holds none), so the graph follows the model on its 8-bit grids as
    tightly as the fp32 graph follows the float one."""
    import onnx

    from exporter.compress.grid import QuantFormat
    from exporter.compress.quantize import grid_linears, quantize_rtn

    model = models("llama", "mixed")
    ref_tokens, ref_logits = torch_greedy(model, prompt, STEPS)
    rounded = _run(write_decoder(model, tmp_path / "rtn", weights="int8"), prompt, ref_tokens)
    assert np.mean(np.argmax(rounded, axis=-1) == np.asarray(ref_tokens)) >= 0.875
    assert np.abs(rounded - ref_logits).mean() <= 0.02  # 8-bit blocks: 1/16 of int4's step

    quantize_rtn(list(grid_linears(model).values()), QuantFormat(8, 32, True))
    ref_tokens, ref_logits = torch_greedy(model, prompt, STEPS)
    path = write_decoder(model, tmp_path / "grid", weights="int8")
    graph = _ops(path)
    ops = Counter(n.op_type for n in graph.node)
    assert ops["MatMul"] == ops["MatMulInteger"] == 0
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nbits and {onnx.helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "bits"} == {8}
    logits = _run(path, prompt, ref_tokens)
    assert np.abs(logits - ref_logits).max() <= 2e-4 * np.abs(ref_logits).max()
    assert list(np.argmax(logits, axis=-1)) == ref_tokens


def test_active_rank_is_a_prefix_of_the_factors(tiny_models, calib_ids, prompt):
    """Rank-sliced levels: writing rank r' from rank-r factors equals the model factorized at r'."""
    import onnxruntime as ort

    model = tiny_models.load("llama")
    decompositions = decompose_model(model, "whitened", calib_ids[:4], progress=False)
    names = [p.name for p in decoder_projections(model)]
    apply_ranks(model, decompositions, {n: 16 for n in names})
    active = {n: 9 for n in names if n.endswith(("q_proj", "up_proj"))}
    proto = build_decoder(model, active_ranks=active)
    reference = tiny_models.load("llama")
    apply_ranks(reference, decompositions, {n: active.get(n, 16) for n in names})
    _, ref_logits = torch_greedy(reference, prompt, 1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    kv = model.config.num_key_value_heads, model.config.head_dim
    feed = {"input_ids": np.array([prompt]), "attention_mask": np.ones((1, len(prompt)), np.int64)}
    feed.update({i.name: np.zeros((1, kv[0], 0, kv[1]), np.float32) for i in session.get_inputs()[2:]})
    logits = session.run(["logits"], feed)[0]
    assert np.abs(logits[0, -1] - ref_logits[0]).max() <= 1e-3
    _, full_logits = torch_greedy(model, prompt, 1)  # the slicing matters: rank 16 differs
    assert np.abs(full_logits - ref_logits).max() > 1e-2


def test_corrective_pairs_fold_into_one_pair():
    rng = np.random.default_rng(0)
    main = LowRankPair(rng.normal(size=(6, 10)).astype(np.float32), rng.normal(size=(8, 6)).astype(np.float32))
    fix = LowRankPair(rng.normal(size=(2, 10)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32))
    proj = ProjectionWeights("p", 10, 8, pairs=[main, fix])
    down, up = proj.fold(4)
    assert down.shape == (6, 10) and up.shape == (8, 6)
    expected = main.up[:, :4] @ main.down[:4] + fix.up @ fix.down
    np.testing.assert_allclose(up @ down, expected, rtol=1e-5, atol=1e-5)


def _random_model(family, **overrides):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen3Config

    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen3": Qwen3Config,
                    "gemma3_text": Gemma3TextConfig, "phi3": Phi3Config}[family]
    sizes = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, max_position_embeddings=128, initializer_range=0.1)
    config = config_class(**{**sizes, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


VARIANTS = {
    "tied": ("llama", dict(tie_word_embeddings=True)),
    "biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "sliding-window": ("mistral", dict(sliding_window=5)),
    "llama3-rope": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "linear-rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "wide-heads": ("qwen3", dict(head_dim=32)),  # heads * head_dim != hidden
    # Gemma 3 as its checkpoints are: tied, sliding and global layers (their own rope bases), the 4B's linear
    # rope scaling on the global ones; soft-capped logits (Gemma 2's, in Gemma 3's config schema)
    "gemma3-tied": ("gemma3_text", dict(tie_word_embeddings=True, head_dim=16, sliding_window=4,
                                        layer_types=["sliding_attention", "full_attention"],
                                        rope_scaling={"rope_type": "linear", "factor": 8.0})),
    "gemma3-softcap": ("gemma3_text", dict(head_dim=16, sliding_window=4, final_logit_softcapping=0.5)),
    # Phi-4-mini rotates 3/4 of each head: here half of 32 dims; Phi-3's sliding window on every layer
    "phi3-partial-rotary": ("phi3", dict(num_attention_heads=2, num_key_value_heads=1, partial_rotary_factor=0.5,
                                         pad_token_id=0)),
    "phi3-window": ("phi3", dict(sliding_window=5, pad_token_id=0)),
    # LongRoPE: short factors up to 16 positions, long ones after; the prompt (12) and its steps cross the switch
    "phi3-longrope": ("phi3", dict(pad_token_id=0, original_max_position_embeddings=16, rope_scaling={
        "type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [2.0 + 0.5 * i for i in range(8)]})),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants(variant, tmp_path):
    family, overrides = VARIANTS[variant]
    model = _random_model(family, **overrides)
    assert supports(model)
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]
    ref_tokens, ref_logits = torch_greedy(model, prompt, STEPS)
    logits = _run(write_decoder(model, tmp_path), prompt, ref_tokens)
    assert np.abs(logits - ref_logits).max() <= 1e-4 * max(1.0, np.abs(ref_logits).max())


@pytest.mark.parametrize("variant", ["gemma3-tied", "phi3-longrope"])
def test_rotary_tables_end_at_the_served_context(variant, tmp_path):
    """max_context (a profile's context) sizes every rotary table, as constant_bytes counts them; the logits
    within it are the full tables' (Gemma 3: a global and a local pair; LongRoPE: the long pair only where the
    context passes its switch at 16); ONNX Runtime refuses a sequence past it instead of reading past the end."""
    import onnx

    family, overrides = VARIANTS[variant]
    model = _random_model(family, **overrides)
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]
    ref_tokens, ref_logits = torch_greedy(model, prompt, STEPS)
    for context, pairs in [(24, 2), (16, 2 if family == "gemma3_text" else 1)]:
        path = write_decoder(model, tmp_path / str(context), max_context=context)
        graph = onnx.load(str(path))
        tables = {i.name: list(i.dims) for i in graph.graph.initializer if "_cache" in i.name}
        assert len(tables) == 2 * pairs and all(dims[0] == context for dims in tables.values())
        assert {p.key: p.value for p in graph.metadata_props}["max_context"] == str(context)
        assert ("If" in Counter(n.op_type for n in graph.graph.node)) == (variant == "phi3-longrope" and pairs == 2)
        table_bytes = sum(np.prod(dims) * 4 for dims in tables.values())
        allowance = GRAPH_BYTES_BASE + GRAPH_BYTES_PER_LAYER * model.config.num_hidden_layers
        assert constant_bytes(model, "fp32", context) == table_bytes + allowance
        decoder = OrtDecoder(path, threads=1)
        assert decoder.max_context == context
        fits = prompt[: context - STEPS]
        tokens, _ = torch_greedy(model, fits, STEPS)
        _, logits, _ = decoder.greedy(fits, STEPS, forced_tokens=tokens)
        _, full_logits = torch_greedy(model, fits, STEPS)
        assert np.abs(logits - full_logits).max() <= 1e-4 * max(1.0, np.abs(full_logits).max())
    with pytest.raises(RuntimeError, match="cos_cache"):
        OrtDecoder(path, threads=1).greedy(prompt, STEPS, forced_tokens=ref_tokens)  # 20 positions > 16


def test_unsupported_models_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    dynamic = _random_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert not supports(dynamic)
    odd_rotary = _random_model("phi3", partial_rotary_factor=0.75, pad_token_id=0)  # 12 of 16 dims: GroupQueryAttention cannot
    with pytest.raises(NotImplementedError, match="partial rotary embeddings over a multiple of 16 dims only"):
        write_decoder(odd_rotary, tmp_path)
    with pytest.raises(NotImplementedError, match="dynamic"):
        write_decoder(dynamic, tmp_path)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert not supports(gpt2)
    with pytest.raises(NotImplementedError, match="GPT2LMHeadModel"):
        write_decoder(gpt2, tmp_path)
    with pytest.raises(ValueError, match="bf16"):
        write_decoder(_random_model("llama"), tmp_path, weights="bf16")


@pytest.mark.parametrize("family", FAMILIES)
def test_joint_units_write_one_down_and_one_stacked_up(tiny_models, calib_ids, family, prompt, tmp_path):
    """Jointly factorized q/k/v and gate/up (one down factor per unit): two MatMuls per unit, q/k/v packed
    into GroupQueryAttention where no per-head norm sits between (Qwen3: a Split), Qwen2's q/k/v biases
    added to the packed output; the same logits as PyTorch."""
    model = tiny_models.load(family)
    units = decoder_projections(model, joint=True)
    apply_ranks(model, decompose_model(model, "whitened", calib_ids[:4], progress=False, joint=True),
                uniform_ranks(units, 0.3))
    ref_tokens, ref_logits = torch_greedy(model, prompt, STEPS)
    path = write_decoder(model, tmp_path)
    graph = _ops(path)
    producers = {o: n for n in graph.node for o in n.output}
    layers = model.config.num_hidden_layers
    ops = Counter(n.op_type for n in graph.node)
    assert ops["MatMul"] == 8 * layers + 1  # V and stacked U of each of the 4 units per layer, lm_head
    head_norms = architecture_of(model).head_norms
    for attention in (n for n in graph.node if n.op_type == "GroupQueryAttention"):
        packed = attention.input[1] == attention.input[2] == ""
        assert packed == (not head_norms)
        if packed:
            qkv = producers[attention.input[0]]
            assert qkv.op_type == ("Add" if family == "qwen2" else "MatMul")
    assert ops["Split"] == (2 if head_norms else 1) * layers  # gate/up (and q/k/v before Qwen3's, Gemma's norms)
    logits = _run(path, prompt, ref_tokens)
    assert np.abs(logits - ref_logits).max() <= 1e-3
