"""Compression of decoders the fused writer does not know: found from the model's modules, not from names.
Tiny random-config Gemma 3 (interleaved sliding-window and global layers, each with its own mask and rotary
tables, and its layers under `model.layers` while its base_model_prefix says `language_model`)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from exporter.compress.grams import capture_layer_inputs, iter_layer_grams
from exporter.errors import ModelError
from exporter.source.model import decoder_layers, layers_prefix

SEQ_LEN = 32  # > the sliding window: sliding and global layers see different masks
LAYERS = 6  # more than 4: Gemma 3 indexes each layer's output, which the statistics pass must survive


@pytest.fixture(scope="module")
def gemma3(tokenizer):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def gemma3_dir(gemma3, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma3")
    gemma3.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_layers_found_where_the_model_keeps_them(gemma3):
    assert gemma3.base_model_prefix != "model"  # the old lookup (prefix + .layers) missed these
    assert decoder_layers(gemma3) is gemma3.model.layers
    assert layers_prefix(gemma3) == "model.layers"


def test_each_layer_gets_its_own_mask(gemma3, calib_ids):
    states = capture_layer_inputs(gemma3, calib_ids[:2, :SEQ_LEN], batch_size=2)
    masks = [kwargs["attention_mask"] for kwargs in states[0][1]]
    assert len(masks) == LAYERS
    assert torch.equal(masks[0], masks[2]) and torch.equal(masks[1], masks[3]) and torch.equal(masks[1], masks[5])
    assert not torch.equal(masks[0], masks[1])  # sliding vs global


def test_grams_equal_a_plain_forward(gemma3, calib_ids):
    """The layer-by-layer statistics pass sees what the whole model computes, on every layer type."""
    ids = calib_ids[:4, :SEQ_LEN]
    reference, handles = {}, []
    for name, module in gemma3.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("model.layers."):
            def grab(_m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                reference[name] = reference.get(name, 0) + x.T @ x
            handles.append(module.register_forward_pre_hook(grab))
    with torch.no_grad():
        for begin in range(0, 4, 2):
            gemma3(ids[begin:begin + 2], use_cache=False)
    for handle in handles:
        handle.remove()
    grams = {name: gram for _, _, totals in iter_layer_grams(gemma3, ids, batch_size=2, progress=False)
             for name, gram in totals.items()}
    assert set(grams) == set(reference) and len(grams) == LAYERS * 7
    for name, gram in grams.items():
        assert torch.allclose(gram, reference[name], rtol=1e-4, atol=1e-4 * float(reference[name].abs().max())), name


def test_export_compresses_and_writes_the_fused_graph(gemma3_dir, calib_file, tmp_path):
    """Gemma 3 through the CLI: compressed like any decoder, then the fused int4 graph (tied embedding gathered
    from lm_head's blocks and scaled by sqrt(hidden); sliding and global layers on their own rope tables)."""
    from exporter.cli import main

    out = tmp_path / "art"
    code = main(["export", "--device", "raspberry-pi-5", "--model", str(gemma3_dir), "--ratio", "0.2",
                 "--weights", "int4", "--no-correctives", "--calib", str(calib_file), "--calib-samples", "4",
                 "--calib-seq-len", str(SEQ_LEN), "--out", str(out), "--no-progress"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["onnx"]["graph"] == "fused"
    assert len(manifest["ranks"]) == LAYERS * 7
    assert any(entry["rank"] is not None for entry in manifest["ranks"].values()), "nothing factorized"
    assert manifest["parameters"]["projection_fraction_removed"] == pytest.approx(0.2, abs=0.02)
    assert manifest["parity"]["passed"]  # the fp32 twin, against PyTorch
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == "gemma3_text"
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert {"GatherBlockQuantized", "FastGelu", "MatMulNBits"} <= ops
    assert manifest["onnx"]["oldest_onnxruntime"] == "1.24"  # its sliding window (onnxruntime_releases)


def test_an_older_runtime_is_refused_before_the_work(gemma3_dir, calib_file, tmp_path, capsys):
    from exporter.cli import main

    code = main(["export", "--device", "raspberry-pi-5", "--model", str(gemma3_dir), "--ratio", "0.2",
                 "--onnxruntime-version", "1.22", "--calib", str(calib_file), "--calib-samples", "4",
                 "--calib-seq-len", str(SEQ_LEN), "--out", str(tmp_path / "art"), "--no-progress"])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("exporter:")]
    assert len(err) == 1 and "Gemma3ForCausalLM on ONNX Runtime 1.22: its sliding-window attention needs 1.24" in err[0]
    assert not (tmp_path / "art").exists()


def test_a_model_without_decoder_blocks_is_a_one_line_error():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"num_hidden_layers": 2})()
            self.head = nn.Linear(4, 4)

    with pytest.raises(ModelError, match="no module list of config.num_hidden_layers=2 blocks"):
        decoder_layers(NoBlocks())


def _odd_classes():
    """A made-up decoder with its own names: `trunk.stages[i].mixer.{wq,wk,wv,out}` and `.ffn.{expand,contract}`,
    blocks called with the hidden states only, no keyword arguments."""
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    class OddConfig(PretrainedConfig):
        model_type = "odd-decoder"
        attribute_map = {"hidden_size": "width", "num_attention_heads": "heads"}  # its own names for these

        def __init__(self, vocab_size=384, width=32, depth=2, heads=2, **kwargs):
            self.vocab_size, self.width, self.num_hidden_layers, self.heads = vocab_size, width, depth, heads
            super().__init__(**kwargs)

    class Block(nn.Module):
        def __init__(self, config):
            super().__init__()
            w, self.heads = config.width, config.heads
            self.norm_a, self.norm_b = nn.LayerNorm(w), nn.LayerNorm(w)
            self.mixer = nn.ModuleDict({"wq": nn.Linear(w, w), "wk": nn.Linear(w, w), "wv": nn.Linear(w, w),
                                        "out": nn.Linear(w, w)})
            self.ffn = nn.ModuleDict({"expand": nn.Linear(w, 3 * w), "contract": nn.Linear(3 * w, w)})

        def forward(self, x):
            b, t, w = x.shape
            h = self.norm_a(x)
            q, k, v = (self.mixer[n](h).view(b, t, self.heads, -1).transpose(1, 2) for n in ("wq", "wk", "wv"))
            a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.mixer["out"](a.transpose(1, 2).reshape(b, t, w))
            return x + self.ffn["contract"](nn.functional.gelu(self.ffn["expand"](self.norm_b(x))))

    class OddForCausalLM(PreTrainedModel, GenerationMixin):
        config_class = OddConfig
        base_model_prefix = "backbone"  # names nothing: the blocks live under `trunk.stages`

        def __init__(self, config):
            super().__init__(config)
            self.embed = nn.Embedding(config.vocab_size, config.width)
            self.trunk = nn.Module()
            self.trunk.stages = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
            self.head = nn.Linear(config.width, config.vocab_size, bias=False)
            self.post_init()

        def forward(self, input_ids, labels=None, **_):
            x = self.embed(input_ids)
            for stage in self.trunk.stages:
                x = stage(x)
            logits = self.head(x)
            loss = None
            if labels is not None:
                loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   labels[:, 1:].reshape(-1))
            return CausalLMOutput(loss=loss, logits=logits)

    return OddConfig, OddForCausalLM


def test_a_made_up_architecture_is_compressed(tokenizer, calib_file, tmp_path):
    """Every nn.Linear of its blocks is found, grouped by shared input, factorized; at full rank it is exact."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from exporter.pipeline import ExportOptions, Stopwatch, compress, prepare

    config_class, model_class = _odd_classes()
    AutoConfig.register("odd-decoder", config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=len(tokenizer)))
    model.save_pretrained(tmp_path / "odd")
    tokenizer.save_pretrained(tmp_path / "odd")
    options = ExportOptions(device="raspberry-pi-5", model=str(tmp_path / "odd"), calib=str(calib_file), calib_samples=4,
                            calib_seq_len=SEQ_LEN, ratio=0.2, weights="fp32", progress=False)
    prepared = prepare(options, Stopwatch())
    assert layers_prefix(prepared.model) == "trunk.stages"
    plan = compress(prepared, model=AutoModelForCausalLM.from_pretrained(tmp_path / "odd"))
    assert set(plan.ranks) == {f"trunk.stages.{i}.{n}" for i in range(2)
                               for n in ("mixer.wq", "mixer.wk", "mixer.wv", "mixer.out", "ffn.expand", "ffn.contract")}
    assert any(rank is not None for rank in plan.ranks.values())
    assert plan.parameters["projection_fraction_removed"] == pytest.approx(0.2, abs=0.03)
    # one Gram for the three projections that read the same normed input
    grams = dict(next(iter_layer_grams(prepared.model, prepared.calibration()[0], progress=False))[2])
    assert grams["trunk.stages.0.mixer.wq"] is grams["trunk.stages.0.mixer.wk"] is grams["trunk.stages.0.mixer.wv"]
    assert grams["trunk.stages.0.mixer.out"] is not grams["trunk.stages.0.mixer.wq"]


def test_an_architecture_nothing_can_write_is_a_one_line_error(tokenizer, calib_file, tmp_path, capsys):
    """Compressed through the generic path, then neither writer knows it: one line, exit 2, nothing written."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from exporter.cli import main

    config_class, model_class = _odd_classes()
    AutoConfig.register("odd-decoder", config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    model_class(config_class(vocab_size=len(tokenizer))).save_pretrained(tmp_path / "odd")
    tokenizer.save_pretrained(tmp_path / "odd")
    code = main(["export", "--device", "raspberry-pi-5", "--model", str(tmp_path / "odd"), "--ratio", "0.2",
                 "--weights", "fp32", "--calib", str(calib_file), "--calib-samples", "4", "--calib-seq-len",
                 str(SEQ_LEN), "--out", str(tmp_path / "art"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("exporter: error: neither the fused graph writer nor optimum-onnx can export "
                              "OddForCausalLM (model_type 'odd-decoder')")
    assert not (tmp_path / "art").exists()
