"""Calibration data with chat turns (`--calib-chat`): the file's paragraphs as user messages in the chat
template, the model's own answers after them, at seeded positions among the file's windows. Tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch

from exporter.errors import CalibrationError
from exporter.source.calibration import calibration_ids, chat_prefix, chat_suffix, paragraphs, windows_from_texts

CHATML = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
          "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SAMPLES, SEQ_LEN = 8, 48


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHATML
    return chat


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models.load("llama").eval()


def _contains(haystack: list[int], needle: list[int]) -> bool:
    """Is `needle` a contiguous run of `haystack`?"""
    return any(haystack[i:i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def test_template_parts_surround_the_user_message(chat_tokenizer):
    text = chat_tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}], tokenize=False,
                                              add_generation_prompt=True)
    prefix, suffix = chat_prefix(chat_tokenizer), chat_suffix(chat_tokenizer)
    assert chat_tokenizer.decode(prefix) + "hello there" + chat_tokenizer.decode(suffix) == text
    assert chat_tokenizer.decode(suffix).endswith("<|assistant|>\n")


def test_share_of_conversations_at_seeded_positions(model, chat_tokenizer, calib_file, calib_text):
    ids, description = calibration_ids(model, chat_tokenizer, str(calib_file), SAMPLES, SEQ_LEN, seed=3,
                                       progress=False, chat_share=0.5)
    assert ids.shape == (SAMPLES, SEQ_LEN)
    prefix, suffix = chat_prefix(chat_tokenizer), chat_suffix(chat_tokenizer)
    chats = [row for row in ids.tolist() if row[:len(prefix)] == prefix]
    assert len(chats) == 4 and "8 x 48 tokens: 4 windows and 4 of chat turns" in description
    file_ids = chat_tokenizer(calib_text, add_special_tokens=False)["input_ids"]
    messages = [chat_tokenizer(p, add_special_tokens=False)["input_ids"] for p in paragraphs([calib_text])]
    for row in chats:  # (the start of) a paragraph of the file as the user's message, then the model's answer
        end = next(i for i in range(len(prefix), len(row)) if row[i:i + len(suffix)] == suffix)
        message = row[len(prefix):end]
        assert message and any(m[:len(message)] == message for m in messages)
        answer = row[end + len(suffix):end + len(suffix) + 8]
        assert not _contains(file_ids, answer)  # the model's own text, not the file's
    windows = [row for row in ids.tolist() if row[:len(prefix)] != prefix]
    assert all(_contains(file_ids, row) for row in windows)
    # deterministic for a seed (no cache: model_key is empty), different for another
    again, _ = calibration_ids(model, chat_tokenizer, str(calib_file), SAMPLES, SEQ_LEN, seed=3, progress=False,
                               chat_share=0.5)
    assert torch.equal(ids, again)
    other, _ = calibration_ids(model, chat_tokenizer, str(calib_file), SAMPLES, SEQ_LEN, seed=4, progress=False,
                               chat_share=0.5)
    assert not torch.equal(ids, other)


def test_no_share_or_no_template_reads_the_file_only(model, tokenizer, chat_tokenizer, calib_file, calib_text):
    plain = windows_from_texts([calib_text], tokenizer, SAMPLES, SEQ_LEN, seed=0)
    for tok, share in ((chat_tokenizer, 0.0), (tokenizer, 0.5)):
        ids, description = calibration_ids(model, tok, str(calib_file), SAMPLES, SEQ_LEN, seed=0, progress=False,
                                            chat_share=share)
        assert torch.equal(ids, plain) and "chat" not in description


def test_all_conversations_and_a_bad_share(model, chat_tokenizer, calib_file):
    ids, _ = calibration_ids(model, chat_tokenizer, str(calib_file), 3, SEQ_LEN, progress=False, chat_share=1.0)
    prefix = chat_prefix(chat_tokenizer)
    assert ids.shape == (3, SEQ_LEN) and all(row[:len(prefix)] == prefix for row in ids.tolist())
    with pytest.raises(CalibrationError, match="between 0 and 1"):
        calibration_ids(model, chat_tokenizer, str(calib_file), SAMPLES, SEQ_LEN, chat_share=1.5)


def test_cli_rejects_a_share_outside_0_1(capsys):
    from exporter.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--device", "host", "--calib-chat", "2"])
    assert exit_info.value.code == 2
    assert "expected a number between 0 and 1, got 2.0" in capsys.readouterr().err
