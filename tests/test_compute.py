"""`--compute`: the torch stages on a chosen device, one decoder layer there at a time.

The layer-at-a-time backward (exporter.compress.layerwise) is checked against one whole-model backward per
sequence, on a Llama and on a Gemma 3 (whose layers return tuples and interleave mask types). Where CUDA is
present (the GPU machine), every pass also runs there and is compared with the CPU's figures."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from exporter.compress import compute
from exporter.compress.factorize import decompose_model, install_unit
from exporter.compress.gptq import gptq
from exporter.compress.grams import iter_layer_grams
from exporter.compress.grid import QuantFormat
from exporter.compress.importance import EMBEDDING, component_fisher, output_sensitivity
from exporter.compress.layerwise import drawn_labels
from exporter.errors import ExporterError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SEQ_LEN = 32


@pytest.fixture(scope="module")
def gemma3(tokenizer):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention"] * 2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(params=["llama", "gemma3"])
def model(request, tiny_models, gemma3):
    return tiny_models.load("llama") if request.param == "llama" else copy.deepcopy(gemma3)


def reference_fisher(model, decompositions, input_ids) -> dict[str, torch.Tensor]:
    """F_k from one backward pass of the whole full-rank factored model per sequence (FLRC's definition)."""
    factored = copy.deepcopy(model)
    installed = {n: install_unit(factored, n, d.linear(d.max_rank)) for n, d in decompositions.items()}
    for p in factored.parameters():
        p.requires_grad_(False)
    gates = {}
    for name, modules in installed.items():
        gate = gates[name] = nn.Parameter(torch.ones(modules[0].rank))
        for module in modules:
            module.up.register_forward_pre_hook(lambda _m, args, g=gate: (args[0] * g,))
    fisher = {n: torch.zeros(g.numel(), dtype=torch.float64) for n, g in gates.items()}
    for sequence in input_ids:
        batch = sequence.unsqueeze(0)
        grads = torch.autograd.grad(factored(batch, labels=batch, use_cache=False).loss, list(gates.values()))
        for name, grad in zip(gates, grads):
            fisher[name] += grad.double() ** 2
    return fisher


def reference_sensitivity(model, input_ids, names) -> dict[str, torch.Tensor]:
    """Sum over sequences and positions of (dL/dy)^2 per channel, from whole-model backward passes."""
    modules = dict(model.named_modules())
    energy = {n: torch.zeros(modules[n].out_features, dtype=torch.float64) for n in names}
    energy[EMBEDDING] = torch.zeros(model.get_input_embeddings().embedding_dim, dtype=torch.float64)
    outputs = {}
    handles = [modules[n].register_forward_hook(lambda _m, _a, out, n=n: outputs.__setitem__(n, out)) for n in names]
    handles.append(model.get_input_embeddings().register_forward_hook(
        lambda _m, _a, out: outputs.__setitem__(EMBEDDING, out.detach().requires_grad_(True)) or outputs[EMBEDDING]))
    try:
        for sequence in input_ids:
            batch = sequence.unsqueeze(0)
            loss = model(batch, labels=batch, use_cache=False).loss
            keys = [n for n in energy if n != EMBEDDING]
            for name, grad in zip(keys, torch.autograd.grad(loss, [outputs[k] for k in keys])):
                energy[name] += (grad.double() ** 2).sum(dim=(0, 1))
            # the embedding's: the loss on next tokens drawn from the model
            logits = model(batch, use_cache=False).logits
            loss = model(batch, labels=drawn_labels(logits, batch), use_cache=False).loss
            (grad,) = torch.autograd.grad(loss, [outputs[EMBEDDING]])
            energy[EMBEDDING] += (grad.double() ** 2).sum(dim=(0, 1))
    finally:
        for handle in handles:
            handle.remove()
    return energy


@pytest.mark.parametrize("device", DEVICES)
def test_layerwise_fisher_equals_whole_model_backward(model, calib_ids, device):
    ids = calib_ids[:3, :SEQ_LEN]
    decompositions = decompose_model(model, "whitened", ids, progress=False, full_rank=True)
    expected = reference_fisher(model, decompositions, ids)
    with compute.using(device):
        fisher = component_fisher(model, decompositions, ids, progress=False)
    assert set(fisher) == set(expected)
    for name in expected:
        assert fisher[name].device.type == "cpu"
        torch.testing.assert_close(fisher[name], expected[name], rtol=2e-3, atol=1e-9 * float(expected[name].max()))
    assert all(p.device.type == "cpu" for p in model.parameters())  # nothing left on the device


@pytest.mark.parametrize("device", DEVICES)
def test_layerwise_sensitivity_equals_whole_model_backward(model, calib_ids, device):
    ids = calib_ids[:3, :SEQ_LEN]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert any(n.endswith("lm_head") for n in names)  # the head's output gradient comes from the head pass
    expected = reference_sensitivity(model, ids, names)
    with compute.using(device):
        sensitivity = output_sensitivity(model, ids, names, progress=False)
    for name, energy in expected.items():
        # channels: mean over sequences of T * sum over positions
        torch.testing.assert_close(sensitivity[name].channels, energy * SEQ_LEN / len(ids), rtol=2e-3,
                                   atol=1e-9 * float(energy.max()))
        assert sensitivity[name].positions.mean().item() == pytest.approx(1.0)
    assert all(p.requires_grad for p in model.parameters())  # restored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grams_on_cuda_equal_the_cpu(model, calib_ids):
    ids = calib_ids[:4, :SEQ_LEN]
    on_cpu = {n: g for _, _, grams in iter_layer_grams(model, ids, progress=False) for n, g in grams.items()}
    with compute.using("cuda"):
        on_gpu = {}
        for _, layer, grams in iter_layer_grams(model, ids, progress=False):
            assert all(p.device.type == "cpu" for p in layer.parameters())  # back on the host when yielded
            on_gpu.update(grams)
    for name, gram in on_cpu.items():
        assert on_gpu[name].device.type == "cpu" and on_gpu[name].dtype == torch.float64
        torch.testing.assert_close(on_gpu[name], gram, rtol=1e-5, atol=1e-6 * float(gram.abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gptq_on_cuda_matches_the_cpu():
    torch.manual_seed(0)
    weight = torch.randn(96, 128)
    x = torch.randn(512, 128) @ torch.randn(128, 128) * 0.3
    gram = (x.T @ x).double()
    fmt = QuantFormat(4, 32, True)
    on_cpu = gptq(weight, gram, fmt)
    with compute.using("cuda"):
        on_gpu = gptq(weight, gram, fmt)
    # float sums in another order can move a code where a value sits on a rounding boundary (and GPTQ carries
    # that on along its row): few codes differ, and the output error is GPTQ's either way
    assert (on_cpu.codes != on_gpu.codes).mean() < 0.05

    def output_error(grid):
        return float(((weight - torch.from_numpy(grid.dequantize())) @ x.T).norm())
    assert output_error(on_gpu) == pytest.approx(output_error(on_cpu), rel=0.02)


def test_compute_names_resolve_or_fail_in_one_line(monkeypatch):
    assert compute.resolve("cpu") == torch.device("cpu")
    assert compute.resolve("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x"):
        with pytest.raises(ExporterError, match="expected auto, cpu, cuda or cuda:N"):
            compute.resolve(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExporterError) as error:
        compute.resolve("cuda:0")
    assert "no CUDA device" in str(error.value) and "\n" not in str(error.value)


def test_cli_compute_cuda_without_cuda_is_a_one_line_error(monkeypatch, capsys, llama_dir, tmp_path):
    from exporter import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = cli.main(["export", "--device", "host", "--model", str(llama_dir), "--compute", "cuda",
                     "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--compute cuda" in err[0] and "no CUDA device" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_onloading_moves_tied_weights_once_and_restores_them(tiny_models):
    model = tiny_models.load("llama")
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    before = {n: p.data for n, p in model.named_parameters()}
    with compute.outside_layers(model, torch.device("cuda")):
        assert embedding.weight.device.type == "cuda" and head.weight.device.type == "cuda"
        assert all(p.device.type == "cpu" for p in model.model.layers.parameters())
    assert all(p.data is before[n] for n, p in model.named_parameters())  # the host tensors themselves


def test_drawn_labels_follow_the_model_and_the_sequence_alone():
    ids = torch.tensor([[5, 3, 7, 1, 2]])
    logits = torch.full((1, 5, 8), -30.0)
    logits[0, torch.arange(5), torch.tensor([4, 6, 0, 2, 3])] = 30.0  # each position sure of one next token
    labels = drawn_labels(logits, ids)
    assert labels.tolist() == [[5, 4, 6, 0, 2]]  # the first id kept (the model shifts), the last logits unused
    spread = torch.zeros(1, 5, 8)
    assert torch.equal(drawn_labels(spread, ids), drawn_labels(spread, ids))  # seeded by the ids
    assert not torch.equal(drawn_labels(spread, ids), drawn_labels(spread, torch.tensor([[5, 3, 7, 1, 4]])))
