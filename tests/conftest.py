"""Shared fixtures: tiny seeded decoder models saved as local HF directories, their tokenizer,
calibration text, and a session-wide EXPORTER_CACHE so no test writes to ~/.cache.

Everything is built in-process (no downloads, no files from outside the repository):

* a byte-level BPE tokenizer trained with `tokenizers` on generated English-like text;
* one model per family (Llama, Qwen3, Qwen2, Mistral, Gemma 3, SmolLM3, Phi-3): hidden 64, 2 layers, 4 heads, 2 KV heads,
  intermediate 128. Each is briefly trained (a few dozen Adam steps, seeded) on the same text so
  its activations are anisotropic like a real LM's (whitening then matters) and its logits are
  decisive (greedy comparisons between runtimes do not hinge on near-ties).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

FAMILIES = ("llama", "qwen3", "qwen2", "mistral", "gemma3_text", "smollm3", "phi3")
SEQ_LEN = 32  # calibration window length used throughout the tests

_SUBJECTS = ["the model", "a small robot", "the engineer", "my neighbour", "the old river", "a quiet student",
             "the city council", "every farmer", "the young doctor", "a tired traveller", "the red fox",
             "our teacher", "the busy market", "a careful pilot", "the night train", "this device"]
_VERBS = ["reads", "builds", "watches", "follows", "carries", "explains", "remembers", "measures",
          "compresses", "exports", "checks", "finds", "writes", "opens", "moves", "answers"]
_OBJECTS = ["a long letter", "the heavy box", "the bright morning", "an old map", "the last question",
            "every small detail", "the green garden", "a simple model", "the edge device", "the warm bread",
            "a new language", "the second page", "the narrow bridge", "a strange noise", "the weekly report"]
_TAILS = ["before the rain starts", "after a long day", "with great care", "near the station",
          "in the early evening", "without a word", "because it matters", "for the whole village",
          "during the winter", "at the end of the road", "", "", ""]
_CONNECTIVES = ["Then", "Later", "However,", "Meanwhile", "Still", "So", "And", "Yet"]


def synthetic_text(lines: int, seed: int) -> str:
    """Deterministic English-like text, one or two sentences a line."""
    rng = random.Random(seed)

    def sentence() -> str:
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_TAILS)]
        text = " ".join(w for w in words if w)
        return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "!", "?"])

    out = []
    for _ in range(lines):
        line = sentence()
        if rng.random() < 0.5:
            line += f" {rng.choice(_CONNECTIVES)} {sentence()[0].lower()}{sentence()[1:]}"
        out.append(line)
    return "\n".join(out) + "\n"


def build_tokenizer(text: str, vocab_size: int = 384):
    """A byte-level BPE tokenizer (every string encodes, no unknowns) with bos/eos/unk/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(text.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def model_config(family: str, tokenizer):
    from transformers import (
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
        SmolLM3Config,
    )

    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen3":
        return Qwen3Config(head_dim=16, **common)  # Qwen3's default head_dim is 128
    if family == "qwen2":
        return Qwen2Config(**common)  # q/k/v carry biases
    if family == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if family == "gemma3_text":  # a sliding layer (window 8, shorter than the tests' prompts) and a global one
        return Gemma3TextConfig(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                **common)
    if family == "smollm3":  # layer 1 without rotary embedding (NoPE)
        return SmolLM3Config(no_rope_layers=[1, 0], **common)
    if family == "phi3":  # fused qkv_proj and gate_up_proj modules
        return Phi3Config(**common)
    raise ValueError(family)


def build_model(family: str, tokenizer, text: str, seed: int = 0, steps: int = 40):
    """A seeded tiny causal LM of `family`, briefly trained on `text`, in eval mode (float32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(family, tokenizer), dtype=torch.float32)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - 65, (16,), generator=generator)
        batch = torch.stack([ids[s : s + 64] for s in starts.tolist()])
        loss = model(batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


def genai_greedy(og, directory, prompt, steps) -> list[int]:
    """The tokens onnxruntime-genai generates greedily after `prompt` from the artifact in `directory`."""
    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt):]


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP's spin-waiting
    threads slow down by 50x or more when another process holds the cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session", autouse=True)
def exporter_cache(tmp_path_factory):
    """EXPORTER_CACHE (and HF offline mode) for the whole session, restored afterwards."""
    path = tmp_path_factory.mktemp("exporter-cache")
    saved = {k: os.environ.get(k) for k in ("EXPORTER_CACHE", "HF_HUB_OFFLINE")}
    os.environ["EXPORTER_CACHE"] = str(path)
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield path
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _own_statistics_store(tmp_path_factory, monkeypatch):
    """Each test starts with an empty statistics store (outside its tmp_path): what it computes is what it
    checks; two runs within one test share it."""
    from exporter.compress import statistics_store

    root = tmp_path_factory.mktemp("statistics")
    monkeypatch.setattr(statistics_store, "default_root", lambda: root)


@pytest.fixture(scope="session")
def corpus_text() -> str:
    """Training text of the tiny models and tokenizer (a few hundred lines)."""
    return synthetic_text(600, seed=1)


@pytest.fixture(scope="session")
def tokenizer(corpus_text):
    return build_tokenizer(corpus_text)


@pytest.fixture(scope="session")
def calib_text() -> str:
    """Held-out generated text (another seed) of a few thousand tokens."""
    return synthetic_text(100, seed=2)


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory, calib_text, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(calib_text, encoding="utf-8")
    assert 2000 < len(tokenizer(calib_text, add_special_tokens=False)["input_ids"]) < 10000
    return path


@pytest.fixture(scope="session")
def calib_ids(tokenizer, calib_text) -> torch.Tensor:
    """8 seeded windows of SEQ_LEN tokens from the calibration text, [8, SEQ_LEN]."""
    from exporter.source.calibration import windows_from_texts

    return windows_from_texts([calib_text], tokenizer, 8, SEQ_LEN, seed=0)


class _ModelFactory:
    """Builds each family once per session and saves it with the tokenizer as an HF directory."""

    def __init__(self, root: Path, tokenizer, text: str):
        self.root, self.tokenizer, self.text = root, tokenizer, text
        self.dirs: dict[str, Path] = {}

    def dir(self, family: str) -> Path:
        if family not in self.dirs:
            model = build_model(family, self.tokenizer, self.text)
            path = self.root / f"tiny-{family}"
            model.save_pretrained(path, safe_serialization=True)
            self.tokenizer.save_pretrained(path)
            self.dirs[family] = path
        return self.dirs[family]

    def load(self, family: str):
        """A fresh copy (tests may modify it in place), in eval mode."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.dir(family), local_files_only=True,
                                                    dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer, corpus_text) -> _ModelFactory:
    """`tiny_models.dir(family)` -> saved model dir; `tiny_models.load(family)` -> fresh model."""
    return _ModelFactory(tmp_path_factory.mktemp("models"), tokenizer, corpus_text)


@pytest.fixture(scope="session")
def llama_dir(tiny_models) -> Path:
    return tiny_models.dir("llama")


@pytest.fixture(scope="session")
def qwen3_dir(tiny_models) -> Path:
    return tiny_models.dir("qwen3")


@pytest.fixture(scope="session")
def qwen2_dir(tiny_models) -> Path:
    return tiny_models.dir("qwen2")


@pytest.fixture(scope="session")
def mistral_dir(tiny_models) -> Path:
    return tiny_models.dir("mistral")
