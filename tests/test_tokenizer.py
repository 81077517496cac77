"""The artifact's tokenizer: rebuilt from a GGUF's vocabulary, checked at export, and read alike by the exporter's
runtime and onnxruntime-genai (text in, text out) for every family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import genai_greedy

from exporter.errors import ModelError, TokenizerMismatchError
from exporter.source.tokenizer import (
    CONTROL,
    NORMAL,
    USER_DEFINED,
    check_artifact_tokenizer,
    gguf_tokenizer,
    sample_lines,
    save_tokenizer,
)

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
BYTE = 6


def write_gguf(path: Path, fields: dict) -> Path:
    """A GGUF holding only metadata (no tensors): all the tokenizer rebuilder reads."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif value and isinstance(value[0], str):
            writer.add_array(key, value)
        elif value and isinstance(value[0], float):
            writer.add_array(key, value)
        else:
            writer.add_array(key, [int(v) for v in value])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def byte_level_fields(tokenizer, pre: str = "gpt-2", **extra) -> dict:
    """GGUF tokenizer metadata of the tests' byte-level BPE tokenizer, as llama.cpp's converter writes it,
    plus ChatML turn tokens as control tokens."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {t["content"] for t in spec["added_tokens"] if t["special"]}
    types = [CONTROL if t in specials else NORMAL for t in tokens]
    tokens += ["<|im_start|>", "<|im_end|>", "<tool>"]
    types += [CONTROL, CONTROL, USER_DEFINED]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id, "tokenizer.ggml.eos_token_id": len(tokens) - 2,
            "tokenizer.ggml.unknown_token_id": tokenizer.unk_token_id,
            "tokenizer.ggml.padding_token_id": tokenizer.pad_token_id, "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": CHATML, **extra}


def test_byte_level_gguf_rebuilds_the_source_tokenizer(tmp_path, tokenizer):
    rebuilt = gguf_tokenizer(write_gguf(tmp_path / "t.gguf", byte_level_fields(tokenizer)))
    for text in sample_lines():
        assert rebuilt(text)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"], text
        assert rebuilt.decode(rebuilt(text)["input_ids"]) == text  # byte-level BPE is lossless
    assert rebuilt.eos_token == "<|im_end|>" and rebuilt.bos_token == "<s>" and rebuilt.unk_token == "<unk>"
    turn = rebuilt.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    ids = rebuilt(turn)["input_ids"]
    assert ids[0] == rebuilt.convert_tokens_to_ids("<|im_start|>") and ids.count(rebuilt.eos_token_id) == 1
    assert rebuilt.decode(ids, skip_special_tokens=True) == "user\nhi\nassistant\n"  # control tokens are special
    assert rebuilt("a<tool>b")["input_ids"][1] == rebuilt.convert_tokens_to_ids("<tool>")  # user-defined: whole


def test_gguf_flags_add_bos_and_eos(tmp_path, tokenizer):
    fields = byte_level_fields(tokenizer, **{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True})
    rebuilt = gguf_tokenizer(write_gguf(tmp_path / "t.gguf", fields))
    ids = rebuilt("the model reads")["input_ids"]
    assert ids[0] == rebuilt.bos_token_id and ids[-1] == rebuilt.eos_token_id
    assert ids[1:-1] == tokenizer("the model reads", add_special_tokens=False)["input_ids"]


def test_pre_tokenizer_splits_digits_as_the_gguf_names(tmp_path, tokenizer):
    smollm = gguf_tokenizer(write_gguf(tmp_path / "s.gguf", byte_level_fields(tokenizer, pre="smollm")))
    gpt2 = gguf_tokenizer(write_gguf(tmp_path / "g.gguf", byte_level_fields(tokenizer, pre="gpt-2")))
    assert len(smollm("2026")["input_ids"]) == 4  # one digit a piece (llama.cpp's "\p{N}")
    assert smollm.decode(smollm("year 2026")["input_ids"]) == gpt2.decode(gpt2("year 2026")["input_ids"]) == "year 2026"


@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.model": "bert"}, "GGUF tokenizer model 'bert' is not supported"),
    ({"tokenizer.ggml.pre": "made-up"}, "GGUF pre-tokenizer 'made-up' is not supported"),
    ({"tokenizer.ggml.merges": ["zz qq"]}, "makes a token missing from its vocabulary"),
])
def test_a_vocabulary_the_rebuilder_does_not_understand_is_a_one_line_error(tmp_path, tokenizer, change, message):
    path = write_gguf(tmp_path / "t.gguf", {**byte_level_fields(tokenizer), **change})
    with pytest.raises(ModelError, match=message) as info:
        gguf_tokenizer(path)
    assert "\n" not in str(info.value)


def _sentencepiece_tokenizer(tmp_path, **fields):
    """A SentencePiece GGUF vocabulary (tokenizer.ggml.model llama): <unk> <s> </s>, the 256 bytes, a few pieces."""
    pieces = ["\u2581", "t", "h", "e", "a", "n", "d", "\u2581t", "he", "\u2581the", "an", "\u2581an", "\u2581and"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(pieces)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    return gguf_tokenizer(write_gguf(tmp_path / "spm.gguf", {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, **fields}))


def test_windows_start_with_the_bos_the_tokenizer_adds(tmp_path, tokenizer):
    """Perplexity and calibration windows read text as the model does in use: after its BOS where it has one."""
    from exporter.runtime.evaluate import leading_special_ids, text_windows
    from exporter.source.calibration import windows_from_texts

    spm = _sentencepiece_tokenizer(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("the and the an " * 200)
    assert leading_special_ids(spm) == [1] and leading_special_ids(tokenizer) == []
    windows = text_windows(spm, text, 16, 3)
    assert windows.shape == (3, 16) and (windows[:, 0] == 1).all() and (windows[:, 1:] != 1).all()
    assert windows[:, 1:].reshape(-1).tolist() == spm("the and the an " * 200, add_special_tokens=False)[
        "input_ids"][: 3 * 15]  # consecutive text, one BOS per window
    calibration = windows_from_texts(["the and the an " * 50], spm, 4, 16, seed=0)
    assert calibration.shape == (4, 16) and (calibration[:, 0] == 1).all()
    plain = text_windows(tokenizer, text, 16, 3)  # no BOS: plain consecutive windows, as before
    assert plain.reshape(-1).tolist() == tokenizer("the and the an " * 200, add_special_tokens=False)[
        "input_ids"][: 3 * 16]


def test_sentencepiece_gguf_encodes_with_byte_fallback_and_bos(tmp_path):
    """tokenizer.ggml.model llama: SentencePiece BPE; merges follow the scores, unknown characters fall back to
    byte tokens, a space prefix is added, BOS by default."""
    spm = _sentencepiece_tokenizer(tmp_path)
    ids = spm("the and é")["input_ids"]
    assert ids[0] == 1 and spm.convert_ids_to_tokens(ids[1:3]) == ["\u2581the", "\u2581and"]
    assert spm.convert_ids_to_tokens(ids[-2:]) == ["<0xC3>", "<0xA9>"]  # é as its UTF-8 bytes
    assert spm.decode(ids, skip_special_tokens=True) == "the and é"


def test_a_bos_tokenizer_reads_the_same_in_onnxruntime_genai(tmp_path, tiny_models):
    """A SentencePiece GGUF that adds BOS (Gemma 3's): onnxruntime-genai's encode leaves special tokens out unless
    asked, so the export's check (and runtime_tests) ask, and the artifact's ids match the source's, BOS first."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    from exporter.graph.genai_config import write_genai_config
    from exporter.source.tokenizer import genai_tokenizer

    spm = _sentencepiece_tokenizer(tmp_path, **{"tokenizer.ggml.add_bos_token": True})
    artifact = tmp_path / "artifact"
    save_tokenizer(spm, artifact)
    write_genai_config(artifact, tiny_models.load("llama"), spm, "model.onnx")
    texts = ["the and é", "and the", "the"]
    assert check_artifact_tokenizer(spm, artifact, texts)["readers"] == ["onnxruntime-genai", "tokenizers",
                                                                         "transformers"]
    assert [int(i) for i in genai_tokenizer(artifact).encode("the and")] == spm("the and")["input_ids"]
    assert spm("the and")["input_ids"][0] == 1


def test_export_check_names_the_first_text_a_reader_encodes_differently(tmp_path, tokenizer):
    save_tokenizer(tokenizer, tmp_path)
    assert check_artifact_tokenizer(tokenizer, tmp_path)["agreement"] == 1.0
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][1:]  # the most frequent merge lost
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerMismatchError, match=r"read by \w+ differs from the source's on '") as info:
        check_artifact_tokenizer(tokenizer, tmp_path)
    assert "\n" not in str(info.value)


FAMILIES = ("llama", "qwen3", "qwen2", "mistral", "gemma3_text", "smollm3", "phi3")


@pytest.mark.parametrize("family", FAMILIES)
def test_onnxruntime_genai_and_the_runtime_agree_text_in_text_out(tmp_path, tiny_models, tokenizer, family):
    """Same ids for the same text, the same chat prompt through each one's template, and the same greedy text."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    import numpy as np

    from exporter.graph.genai_config import write_genai_config
    from exporter.graph.writer import write_decoder
    from exporter.runtime.generation import Runtime

    model = tiny_models.load(family)
    path = write_decoder(model, tmp_path)
    chat = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>", pad_token="<pad>")
    chat.chat_template = CHATML.replace("<|im_start|>", "<s>").replace("<|im_end|>", "</s>")
    save_tokenizer(chat, tmp_path)
    write_genai_config(tmp_path, model, chat, path.name)
    check_artifact_tokenizer(chat, tmp_path)  # what the export runs

    runtime, og_model = Runtime(tmp_path, threads=1), og.Model(str(tmp_path))
    og_tokenizer = og.Tokenizer(og_model)
    for text in sample_lines()[:40]:
        assert [int(i) for i in og_tokenizer.encode(text)] == runtime.encode(text, add_special_tokens=True), text
    message = "the engineer reads a long letter"
    ours = runtime.prompt_ids(message)
    rendered = og_tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": message}]),
                                                add_generation_prompt=True)
    assert [int(i) for i in og_tokenizer.encode(rendered)] == ours

    steps = 12
    expected = [s.token for s in runtime.generate(ours, max_new_tokens=steps, stop=False)]
    generated = genai_greedy(og, tmp_path, ours, steps)
    assert generated == expected[: len(generated)] and generated
    assert og_tokenizer.decode(np.asarray(generated, dtype=np.int32)) == runtime.require_tokenizer().decode(
        generated, skip_special_tokens=True)
