"""exporter.runtime.generation: greedy parity with PyTorch, seeded sampling, schedules, rank-level switching with
the KV cache carried across, incremental detokenization, chat templates. Tiny Llama only."""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.compress.factorize import apply_ranks, decoder_projections, decompose_model, uniform_ranks
from exporter.compress.lowrank import LowRankLinear
from exporter.errors import ExporterError
from exporter.graph.optimum_export import torch_greedy
from exporter.graph.writer import build_decoder, write_decoder
from exporter.runtime.generation import (
    GenerationStats,
    OrtDecoder,
    Runtime,
    TextStream,
    level_at,
    parse_schedule,
    sample_token,
)

PROMPT = "The engineer explains the last question with great care. Then a small robot"
STEPS = 12
SWITCH = 3  # the leveled artifact's schedule: r100 for tokens 0-2, r50 from token 3
CHATML = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
          "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return tokenizer(PROMPT, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def dense(tiny_models, tokenizer, tmp_path_factory):
    """(model, directory): the dense tiny Llama as a plain directory (no manifest) with a chat template."""
    model = tiny_models.load("llama")
    out = tmp_path_factory.mktemp("dense")
    write_decoder(model, out)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    return model, out


def _save(proto, path):
    import onnx

    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def _sliced(model, ranks):
    """A copy of `model` whose low-rank projections keep the first `ranks[name]` components."""
    model = copy.deepcopy(model)
    for name, rank in ranks.items():
        module = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LowRankLinear.from_factors(
            module.up.weight[:, :rank], module.down.weight[:rank], module.up.bias))
    return model


@pytest.fixture(scope="module")
def leveled(tiny_models, calib_ids, tokenizer, tmp_path_factory):
    """(full model, r50 model, directory): a factorized tiny Llama exported at full rank and at half
    of every rank, with a manifest that switches levels at token SWITCH."""
    model = tiny_models.load("llama")
    apply_ranks(model, decompose_model(model, "whitened", calib_ids[:4], progress=False),
                uniform_ranks(decoder_projections(model), 0.3))
    ranks = {name: math.ceil(0.5 * m.rank) for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert len(ranks) == 14
    out = tmp_path_factory.mktemp("leveled")
    with torch.no_grad():
        _save(build_decoder(model), out / "model.onnx")
        _save(build_decoder(model, active_ranks=ranks), out / "model.r50.onnx")
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    manifest = {"onnx": {"file": "model.onnx"},
                "levels": [{"name": "r100", "fraction": 1.0, "file": "model.onnx"},
                           {"name": "r50", "fraction": 0.5, "file": "model.r50.onnx"}],
                "schedule": [{"level": "r100", "start": 0}, {"level": "r50", "start": SWITCH}]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return model, _sliced(model, ranks), out


def test_greedy_equals_pytorch_greedy(dense, prompt):
    model, out = dense
    expected, ref_logits = torch_greedy(model, prompt, STEPS)
    runtime = Runtime(out, threads=1)
    assert [lv.name for lv in runtime.levels] == ["r100"] and runtime.schedule == [("r100", 0)]
    steps = list(runtime.generate(prompt, STEPS, stop=False))
    assert [s.token for s in steps] == expected
    assert np.abs(np.stack([s.logits for s in steps]) - ref_logits).max() < 1e-3
    assert {s.level for s in steps} == {"r100"}
    # OrtDecoder.greedy (benchmarks, parity check) runs the same loop.
    tokens, logits, timing = OrtDecoder(out / "model.onnx", threads=1).greedy(prompt, STEPS)
    assert tokens == expected and logits.shape == (STEPS, model.config.vocab_size)
    assert len(timing.step_s) == STEPS - 1 and timing.prefill_s > 0


def test_generation_stops_at_a_stop_token(dense, prompt):
    _, out = dense
    runtime = Runtime(out, threads=1)
    free = [s.token for s in runtime.generate(prompt, STEPS, stop=False)]
    runtime.stop_ids = {free[4]}  # pretend the fifth token is an end of sequence
    stopped = [s.token for s in runtime.generate(prompt, STEPS)]
    assert stopped == free[: free.index(free[4]) + 1]


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(dense, prompt):
    _, out = dense
    runtime = Runtime(out, threads=1)

    def sample(seed, temperature=1.5, top_p=1.0):
        return [s.token for s in runtime.generate(prompt, STEPS, temperature=temperature, top_p=top_p, seed=seed,
                                                  stop=False)]

    greedy = sample(0, temperature=0.0)
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(1) != greedy
    assert sample(1, top_p=1e-6) == sample(2, top_p=1e-6) == greedy


def test_sample_token_distribution_and_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)
    rng = np.random.default_rng(0)
    draws = np.bincount([sample_token(logits, 1.0, 1.0, rng) for _ in range(20000)], minlength=4) / 20000
    assert np.abs(draws - probs).max() < 0.015
    # top_p 0.7: the smallest set with mass >= 0.7 is {0, 1}, renormalized to 0.625 / 0.375.
    draws = np.bincount([sample_token(logits, 1.0, 0.7, rng) for _ in range(20000)], minlength=4) / 20000
    assert draws[2:].sum() == 0 and abs(draws[0] - 0.625) < 0.015
    assert sample_token(logits, 0.0, 0.7, rng) == 0


def test_parse_schedule_valid():
    names = ["r100", "r85", "r70"]
    assert parse_schedule("static", names) == [("r100", 0)]
    assert parse_schedule("r85", names) == [("r85", 0)]
    assert parse_schedule("r100:0, r85:32,r70:64", names) == [("r100", 0), ("r85", 32), ("r70", 64)]
    schedule = parse_schedule("r100:0,r85:32,r70:64", names)
    assert [level_at(schedule, t) for t in (0, 31, 32, 63, 64, 500)] == ["r100", "r100", "r85", "r85", "r70", "r70"]


@pytest.mark.parametrize("text, fragment", [
    ("r50", "unknown level 'r50'; known levels: r100, r85, r70"),
    ("r100:0,r60:8", "unknown level 'r60'; known levels: r100, r85, r70"),
    ("r100:0,r85:32,r70:32", "starts must strictly increase, got r70:32 after r85:32"),
    ("r100:0,r85:32,r70:16", "starts must strictly increase, got r70:16 after r85:32"),
    ("r85:4,r70:8", "the first entry must start at 0, got r85:4"),
    ("r100:0,r85:-3", "negative start r85:-3"),
    ("r100:zero", "cannot parse --schedule 'r100:zero'"),
    ("r100:0,,r85:3", "cannot parse"),
    (":5", "cannot parse"),
    ("", "unknown level ''"),
])
def test_parse_schedule_errors(text, fragment):
    with pytest.raises(ExporterError) as info:
        parse_schedule(text, ["r100", "r85", "r70"])
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_level_switch_carries_the_kv_cache(leveled, prompt):
    full, sliced, out = leveled
    # PyTorch reference: the full-rank model up to the switch, the rank-sliced copy after it, one cache.
    with torch.no_grad():
        result = full(torch.tensor([prompt]), use_cache=True)
        cache, logits = result.past_key_values, [result.logits[0, -1].numpy()]
        expected = [int(np.argmax(logits[-1]))]
        for t in range(1, STEPS):
            model = full if t < SWITCH else sliced
            result = model(torch.tensor([[expected[-1]]]), past_key_values=cache, use_cache=True)
            cache = result.past_key_values
            logits.append(result.logits[0, -1].numpy())
            expected.append(int(np.argmax(logits[-1])))

    runtime = Runtime(out, threads=1)
    assert runtime.level_names == ["r100", "r50"] and runtime.schedule == [("r100", 0), ("r50", SWITCH)]
    steps = list(runtime.generate(prompt, STEPS, stop=False))
    assert [s.level for s in steps] == ["r100"] * SWITCH + ["r50"] * (STEPS - SWITCH)
    assert [s.token for s in steps] == expected
    switched = np.stack([s.logits for s in steps])
    assert np.abs(switched - np.stack(logits)).max() < 1e-3
    # The switch matters: the full-rank schedule gives other logits from the switch on, the same before.
    static = np.stack([s.logits for s in runtime.generate(prompt, STEPS, runtime.parse_schedule("static"),
                                                          stop=False, forced_tokens=expected)])
    assert np.abs(static[:SWITCH] - switched[:SWITCH]).max() < 1e-5
    assert np.abs(static[SWITCH:] - switched[SWITCH:]).max() > 1e-2

    stats = GenerationStats().add(steps)
    assert stats.level_tokens == {"r100": SWITCH, "r50": STEPS - SWITCH}
    assert set(stats.level_tokens_per_s) == {"r100", "r50"} and stats.decode_tokens_per_s > 0


def test_manifest_levels_are_checked(leveled, tmp_path):
    _, _, out = leveled
    broken = tmp_path / "broken"
    broken.mkdir()
    manifest = json.loads((out / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "schedule": [{"level": "r30", "start": 0}]}))
    with pytest.raises(ExporterError, match="unknown level 'r30'; known levels: r100, r50"):
        Runtime(broken)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExporterError, match="level r100's model.onnx is missing"):
        Runtime(broken)
    with pytest.raises(ExporterError, match="artifact not found"):
        Runtime(tmp_path / "absent")
    (broken / "manifest.json").unlink()
    with pytest.raises(ExporterError, match="is not an artifact"):
        Runtime(broken)


def test_text_stream_never_splits_characters(dense, tokenizer):
    _, out = dense
    runtime = Runtime(out)
    text = "naïve café, 日本語 and 🙂 emoji: the engineer reads."
    ids = runtime.encode(text)
    assert len(ids) > len(text.encode("utf-8")) // 2  # byte-level pieces: characters span several tokens
    stream = TextStream(runtime.tokenizer)
    pieces = [stream.add(token) for token in ids] + [stream.finish()]
    assert "".join(pieces) == text == tokenizer.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece) > 10  # it streams, not one piece at the end


def test_chat_template_and_stop_tokens_match_transformers(dense, tokenizer):
    from transformers import AutoTokenizer

    _, out = dense
    runtime = Runtime(out)
    reference = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "What does the engineer read?"}]
    assert runtime.render_chat(messages) == reference.apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)
    assert runtime.prompt_ids(messages[0]["content"]) == reference.apply_chat_template(messages,
                                                                                       add_generation_prompt=True)
    assert runtime.stop_ids == {tokenizer.eos_token_id}


def test_runtime_imports_neither_torch_nor_transformers():
    code = ("import sys, exporter.runtime.generation, exporter.runtime.evaluate; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_providers_take_the_profile_options(leveled, tmp_path):
    """Providers named plainly get the artifact profile's provider_options (the Jetson profiles' CUDA
    attention backend); (name, options) pairs are kept as given; no providers: the CPU, as before."""
    _, _, out = leveled
    copy = Path(shutil.copytree(out, tmp_path / "copy"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["profile"] = {"runtime": {"provider_options": {"CUDAExecutionProvider": {"sdpa_kernel": "3"}}}}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    runtime = Runtime(copy, providers=["CUDAExecutionProvider", ("CPUExecutionProvider", {}), "CPUExecutionProvider"])
    assert runtime.providers == [("CUDAExecutionProvider", {"sdpa_kernel": "3"}), ("CPUExecutionProvider", {}),
                                 "CPUExecutionProvider"]
    assert Runtime(copy).providers is None
    assert Runtime(out, providers=["CUDAExecutionProvider"]).providers == ["CUDAExecutionProvider"]


def test_kv_cache_modes_decode_the_same(leveled, prompt, monkeypatch):
    """The KV cache as numpy arrays fed back (growing), as OrtValues left in session memory (kv_device: "cuda"
    on a GPU, exercised here with ONNX Runtime's CPU allocator), and as one shared buffer per layer that
    GroupQueryAttention appends to in place (the writer's graphs declare it: the default); across a level
    switch, and with the shared buffer outgrown mid-prompt. The same logits and caches in every mode."""
    import onnxruntime as ort

    import exporter.runtime.generation as runtime

    _, _, out = leveled
    monkeypatch.setattr(runtime, "SHARED_CAPACITY", 4)  # outgrown by the prompt (27 tokens) and by a decode step
    files = ("model.onnx", "model.r50.onnx")
    modes = {"growing": dict(kv_buffer="growing"), "bound": dict(kv_buffer="growing", kv_device="cpu"),
             "shared": {}}
    results = {}
    for mode, options in modes.items():
        decoders = [OrtDecoder(out / f, threads=1, **options) for f in files]
        logits, cache = decoders[0].step(np.array([prompt]), decoders[0].empty_cache(1))
        rows = [logits[0, -1]]
        for t in range(1, STEPS):
            logits, cache = decoders[t >= SWITCH].step(np.array([[int(np.argmax(rows[-1]))]]), cache)
            rows.append(logits[0, -1])
        results[mode] = (np.stack(rows), cache, decoders[0])
    assert results["growing"][2].kv_device is None and results["shared"][2].kv_buffer == "shared"
    assert all(isinstance(v, np.ndarray) for v in results["growing"][1].tensors.values())
    assert all(isinstance(v, ort.OrtValue) for mode in ("bound", "shared") for v in results[mode][1].tensors.values())
    shared = results["shared"][1]
    assert len(prompt) <= 32 < shared.length <= shared.capacity == 64  # 4 -> 32 at prefill, -> 64 at step 33
    plain_logits, plain_cache, _ = results["growing"]
    for mode in ("bound", "shared"):
        logits, cache, _ = results[mode]
        assert cache.length == plain_cache.length == len(prompt) + STEPS - 1
        assert np.abs(logits - plain_logits).max() <= 1e-6
        name = results[mode][2].past_names[0]
        assert np.array_equal(cache.arrays()[name], plain_cache.tensors[name])


def test_a_shared_kv_buffer_holds_the_declared_sliding_window(leveled, prompt, tmp_path):
    """A graph whose genai_config declares a sliding window (the onnxruntime-genai builder's Gemma 3: its
    GroupQueryAttention refuses a shared buffer shorter than the window) gets buffers at least that long."""
    import json
    import shutil

    _, _, out = leveled
    folder = tmp_path / "windowed"
    shutil.copytree(out, folder)
    genai = folder / "genai_config.json"
    config = json.loads(genai.read_text()) if genai.is_file() else {"model": {"decoder": {}}}
    config["model"]["decoder"]["sliding_window"] = {"window_size": 600, "layers": [0]}
    genai.write_text(json.dumps(config))
    plain, windowed = OrtDecoder(out / "model.onnx", threads=1), OrtDecoder(folder / "model.onnx", threads=1)
    assert plain.min_capacity == 0 and windowed.min_capacity == 600
    _, cache = windowed.step(np.array([prompt]), windowed.empty_cache(1))
    assert cache.capacity >= 600 and plain.step(np.array([prompt]), plain.empty_cache(1))[1].capacity < 600


def test_a_shared_kv_buffer_cannot_branch(leveled, prompt):
    """A shared buffer is written in place: stepping twice from one cache would read the first step's keys."""
    _, _, out = leveled
    decoder = OrtDecoder(out / "model.onnx", threads=1)
    _, cache = decoder.step(np.array([prompt]), decoder.empty_cache(1))
    _, later = decoder.step(np.array([[5]]), cache)
    with pytest.raises(ValueError, match="cannot branch"):
        decoder.step(np.array([[6]]), cache)
    decoder.step(np.array([[6]]), later)  # the newest cache steps on