"""Calibration data: token windows from a user's text file, or text sampled from the model itself."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from exporter.errors import CalibrationError
from exporter.settings import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN  # noqa: F401 (re-exported)
from exporter.settings import cache_dir

log = logging.getLogger(__name__)


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Plain text (one document) or jsonl (one object a line, text in `text_field`)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file not found: {path}")
    if path.suffix == ".jsonl":
        try:
            return _read_jsonl(path, text_field)
        except UnicodeDecodeError as exc:
            raise CalibrationError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return [path.read_text(encoding="utf-8", errors="replace")]


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise CalibrationError(
                    f"{path}:{number}: no field '{text_field}' (fields: {fields}); choose one with --calib-field"
                )
            texts.append(str(record[text_field]))
    return texts


def windows_from_texts(texts, tokenizer, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`num_samples` random windows of `seq_len` tokens from the joined texts (seeded), each after the ids the
    tokenizer puts before a text (BOS, where it adds one), as the model reads text in use."""
    prefix, ids, body = _token_stream(texts, tokenizer, seq_len)
    if ids.numel() < body or body < 1:
        raise CalibrationError(
            f"calibration text too short: {ids.numel()} tokens, need at least --calib-seq-len={seq_len}"
        )
    return _windows_at(prefix, ids, body, _window_starts(ids.numel(), body, num_samples, seed))


def _token_stream(texts, tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(the ids a window starts with, the joined texts' ids, the text tokens a window holds after them)."""
    from exporter.runtime.evaluate import leading_special_ids

    prefix = torch.tensor(leading_special_ids(tokenizer), dtype=torch.long)
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return prefix, ids, seq_len - prefix.numel()


def _windows_at(prefix: torch.Tensor, ids: torch.Tensor, body: int, starts: list[int]) -> torch.Tensor:
    return torch.stack([torch.cat([prefix, ids[s : s + body]]) for s in starts])


def _window_starts(tokens: int, body: int, count: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, tokens - body + 1, (count,), generator=generator).tolist()


def tuning_windows(texts, tokenizer, count: int, seq_len: int, seed: int, calibration_windows: int) -> torch.Tensor:
    """Up to `count` more windows of the calibration text for end-to-end tuning (exporter.compress.scale_tuning),
    none overlapping the `calibration_windows` windows windows_from_texts drew with `seed`: the tuning measures
    itself on some of those (the held-out windows), and a window it also trained on would flatter it. Fewer where
    the text has no room; [0, seq_len] where it has none."""
    prefix, ids, body = _token_stream(texts, tokenizer, seq_len)
    if count < 1 or body < 1 or ids.numel() < body:
        return torch.empty(0, seq_len, dtype=torch.long)
    taken = _window_starts(ids.numel(), body, calibration_windows, seed) if calibration_windows else []
    starts = starts_apart(ids.numel(), body, count, seed + 1, taken)
    if not starts:
        return torch.empty(0, seq_len, dtype=torch.long)
    return _windows_at(prefix, ids, body, starts)


def starts_apart(tokens: int, body: int, count: int, seed: int, taken: list[int]) -> list[int]:
    """Up to `count` seeded starts of `body`-token windows in `tokens`, none overlapping another or a window at
    `taken`."""
    taken, starts = list(taken), []
    for start in _window_starts(tokens, body, 4 * count, seed):  # draws to spare for the ones that overlap
        if all(abs(start - other) >= body for other in taken):
            starts.append(start)
            taken.append(start)
            if len(starts) == count:
                break
    return starts


def _around_user_message(tokenizer) -> tuple[str, str] | None:
    """The chat template's text before and after a user's message, the assistant's turn opened (None: no
    template, or one that needs other roles or fields)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\x00USER\x00"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:
        return None
    if marker not in text:
        return None
    before, after = text.split(marker, 1)
    return before, after


def chat_prefix(tokenizer) -> list[int] | None:
    """Token ids of the chat template up to where a user's message begins (None without a template)."""
    parts = _around_user_message(tokenizer)
    return (tokenizer(parts[0], add_special_tokens=False)["input_ids"] or None) if parts else None


def chat_suffix(tokenizer) -> list[int] | None:
    """Token ids that close a user's message and open the assistant's answer (None without a template)."""
    parts = _around_user_message(tokenizer)
    return (tokenizer(parts[1], add_special_tokens=False)["input_ids"] or None) if parts else None


def sample_from_model(model, tokenizer, num_samples: int, seq_len: int, seed: int, batch_size: int = 16,
                      progress: bool = True) -> torch.Tensor:
    """Data-free calibration: sequences generated by the model itself.

    Sampling (temperature 1, top-p 0.95) rather than greedy keeps the text diverse, so the
    activations cover the model's own distribution instead of one repeated continuation. For chat
    models half the sequences start at the chat template's user turn, so the calibration covers the
    conversations the model will serve (turn markers, end-of-turn tokens, answers), not only free text.
    End-of-sequence tokens are sampled like any other token and generation runs on past them:
    suppressing them would leave the compressed model's end-of-turn behaviour uncalibrated.
    """
    from tqdm.auto import tqdm

    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    chat = chat_prefix(tokenizer)
    if chat:  # alternate batches start at BOS and at the user turn: at least one of each
        batch_size = max(1, min(batch_size, (num_samples + 1) // 2))
    torch.manual_seed(seed)
    batches = []
    bar = tqdm(total=num_samples, desc="sampling calibration text", unit="seq", disable=not progress)
    for begin in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - begin)
        start = chat if chat and (begin // batch_size) % 2 == 1 else [start_id]
        prompt = torch.tensor([start] * n, dtype=torch.long)
        with torch.no_grad():
            out = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_p=0.95,
                max_new_tokens=seq_len - len(start), eos_token_id=None, pad_token_id=start_id,
            )
        batches.append(out[:, :seq_len])
        bar.update(n)
    bar.close()
    return torch.cat(batches)


def paragraphs(texts) -> list[str]:
    """The user's text as candidate chat messages: its lines of 40 characters or more (no `= Heading =`)."""
    lines = [line.strip() for text in texts for line in text.splitlines()]
    return [p for p in lines if len(p) >= 40 and not p.startswith("=")] or [p for p in lines if p] or \
        ["\n\n".join(texts)]


def chat_windows(model, tokenizer, texts, count: int, seq_len: int, seed: int, batch_size: int = 16,
                 progress: bool = True) -> torch.Tensor:
    """`count` windows [count, seq_len] of conversations in the model's chat template: a seeded paragraph of the
    user's text as the user turn (at most seq_len / 4 tokens), then the model's own answer, sampled as in
    sample_from_model up to its end of turn (at most seq_len / 4 tokens); conversations follow each other until
    a window is full, and each window starts at a conversation. Short answers keep the turn markers, answer
    openings and end-of-turn tokens, what chat use reads most, frequent, and generation cheap."""
    from tqdm.auto import tqdm

    prefix, suffix = chat_prefix(tokenizer), chat_suffix(tokenizer)
    candidates = paragraphs(texts)
    quarter = max(1, seq_len // 4)
    end = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    generator = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed)
    windows, current = [], []
    bar = tqdm(total=count, desc="sampling chat turns", unit="window", disable=not progress)
    while len(windows) < count:
        picks = torch.randint(0, len(candidates), (batch_size,), generator=generator).tolist()
        prompts = [prefix + tokenizer(candidates[i], add_special_tokens=False)["input_ids"][:quarter] + suffix
                   for i in picks]
        width = max(len(p) for p in prompts)
        # left padding: every answer starts right after its own prompt
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=0.95,
                                 max_new_tokens=quarter, eos_token_id=end, pad_token_id=pad)
        for prompt, row in zip(prompts, out[:, width:].tolist()):
            answer = row[: row.index(end) + 1] if end in row else row
            current += prompt + answer
            if len(current) >= seq_len and len(windows) < count:
                windows.append(current[:seq_len])
                current = []
                bar.update(1)
    bar.close()
    return torch.tensor(windows, dtype=torch.long)


def calibration_ids(model, tokenizer, calib: str | None, num_samples: int = DEFAULT_NUM_SAMPLES,
                    seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0, text_field: str = "text",
                    model_key: str = "", progress: bool = True, chat_share: float = 0.0) -> tuple[torch.Tensor, str]:
    """Token ids [num_samples, seq_len] and a description of where they came from.

    With a calibration file and `chat_share` > 0, that share of the sequences are conversations (chat_windows:
    the file's paragraphs as user messages, the model's own answers), at seeded positions among the file's
    windows; models without a chat template read the file only."""
    if num_samples < 1 or seq_len < 2:
        raise CalibrationError("--calib-samples must be >= 1 and --calib-seq-len >= 2")
    if not 0.0 <= chat_share <= 1.0:
        raise CalibrationError(f"--calib-chat must be between 0 and 1, got {chat_share}")
    if calib is not None:
        texts = read_texts(calib, text_field)
        if not any(t.strip() for t in texts):
            raise CalibrationError(f"calibration file is empty: {calib}")
        chats = num_samples - text_window_count(tokenizer, num_samples, chat_share)
        description = f"{calib} ({num_samples} x {seq_len} tokens, seed {seed})"
        if chats == 0:
            return windows_from_texts(texts, tokenizer, num_samples, seq_len, seed), description
        text_ids = windows_from_texts(texts, tokenizer, num_samples - chats, seq_len, seed) \
            if chats < num_samples else torch.empty(0, seq_len, dtype=torch.long)
        digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
        key = hashlib.sha256(f"chat-v2:{model_key}:{digest}:{chats}:{seq_len}:{seed}".encode()).hexdigest()[:16]
        turns = _cached(cache_dir() / "calibration" / f"chat-{key}.pt", model_key, lambda: chat_windows(
            model, tokenizer, texts, chats, seq_len, seed, progress=progress))
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
        ids = torch.cat([text_ids, turns])[order]  # the conversations at seeded positions
        return ids, (f"{calib} ({num_samples} x {seq_len} tokens: {num_samples - chats} windows and {chats} of "
                     f"chat turns, seed {seed})")
    # v2: chat-turn starts and unsuppressed end-of-sequence tokens (see sample_from_model)
    key = hashlib.sha256(f"v2:{model_key}:{num_samples}:{seq_len}:{seed}".encode()).hexdigest()[:16]
    ids = _cached(cache_dir() / "calibration" / f"self-{key}.pt", model_key,
                  lambda: sample_from_model(model, tokenizer, num_samples, seq_len, seed, progress=progress))
    return ids, f"self-generated ({num_samples} x {seq_len} tokens, seed {seed})"


def text_window_count(tokenizer, num_samples: int, chat_share: float) -> int:
    """How many of `num_samples` calibration windows read the calibration file as text (the rest are chat turns,
    where the tokenizer has a chat template)."""
    chats = round(num_samples * chat_share) if chat_prefix(tokenizer) and chat_suffix(tokenizer) else 0
    return num_samples - chats


def _cached(path: Path, model_key: str, compute) -> torch.Tensor:
    """compute(), kept at `path` for the next export of the same model (model_key empty: never cached)."""
    if model_key and path.is_file():
        return torch.load(path)
    ids = compute()
    if model_key:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(ids, tmp)
            tmp.replace(path)
        except OSError as exc:
            log.warning("could not cache calibration samples: %s", exc)
    return ids
