"""Quality measures: perplexity on non-overlapping windows of a text file (PyTorch or ONNX Runtime), and
summarization ROUGE of an artifact generating through exporter.runtime.generation.

Only the PyTorch `perplexity` imports torch, so `exporter evaluate` runs wherever the runtime runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from exporter.errors import CalibrationError, ExporterError

# The user message of the summarization task; {article} is the (possibly truncated) article.
SUMMARY_REQUEST = "Summarize the following news article in two or three sentences.\n\nArticle:\n{article}"


def encode(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids (without special tokens by default), from a `tokenizers.Tokenizer` or a transformers tokenizer."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def leading_special_ids(tokenizer) -> list[int]:
    """The special ids the tokenizer puts before any text: Gemma 3's <bos>, none for SmolLM2."""
    probe = "a"
    plain, full = encode(tokenizer, probe), encode(tokenizer, probe, add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def text_windows(tokenizer, path: str | Path, window: int = 512, max_windows: int = 64) -> np.ndarray:
    """The first `max_windows` non-overlapping windows of the tokenized file, [n, window] int64 (fewer where the
    file is shorter). Each starts with the ids the tokenizer puts before a text (BOS), as every sequence the model
    reads in use does: Gemma 3 270M scored 135 on WikiText-2 windows without its <bos>, 53 with it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ExporterError(f"data file not found: {path}") from None
    prefix = leading_special_ids(tokenizer)
    body = window - len(prefix)
    ids = np.asarray(encode(tokenizer, text), dtype=np.int64)
    count = min(max_windows, len(ids) // body) if body > 0 else 0
    if count < 1:
        raise CalibrationError(f"{path} is too short for one {window}-token window ({len(ids)} tokens)")
    rows = ids[: count * body].reshape(count, body)
    return np.concatenate([np.tile(np.asarray(prefix, dtype=np.int64), (count, 1)), rows], axis=1)


def perplexity(model, windows, batch_size: int = 4, progress: bool = True) -> float:
    """exp(mean next-token NLL) of a PyTorch model over all windows, each scored independently."""
    import torch
    from tqdm.auto import tqdm

    windows = torch.as_tensor(windows)
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        batches = range(0, windows.shape[0], batch_size)
        for begin in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
            batch = windows[begin : begin + batch_size]
            logits = model(batch, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += nll.item()
            total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def ort_perplexity(decoder, windows, progress: bool = True) -> float:
    """Perplexity of an ONNX decoder (an exporter.runtime.generation.OrtDecoder): one prefill per window.

    Lets artifacts that exist only as ONNX (quantized graphs, other exporters' outputs) be scored
    on exactly the windows the PyTorch models are scored on.
    """
    from tqdm.auto import tqdm

    total_nll, total_tokens = 0.0, 0
    for window in tqdm(np.asarray(windows), desc="perplexity (onnxruntime)", unit="window", disable=not progress):
        logits, _ = decoder.step(window[None, :-1], decoder.empty_cache(1))
        logits = logits[0].astype(np.float64)
        peak = logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
        total_nll += float((log_norm - logits[np.arange(len(window) - 1), window[1:]]).sum())
        total_tokens += len(window) - 1
    return math.exp(total_nll / total_tokens)


# --------------------------------------------------------------------------- summarization


def read_articles(path: str | Path, limit: int) -> list[dict]:
    """The first `limit` records of a jsonl file with string fields `article` and `highlights`."""
    path = Path(path)
    if not path.is_file():
        raise ExporterError(f"data file not found: {path}")
    examples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if len(examples) == limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ExporterError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            for key in ("article", "highlights"):
                if not isinstance(record, dict) or not isinstance(record.get(key), str):
                    raise ExporterError(f"{path}:{number}: no string field {key!r}")
            examples.append({"article": record["article"], "highlights": record["highlights"]})
    if not examples:
        raise ExporterError(f"{path} has no examples")
    return examples


def summary_prompt(runtime, article: str, budget: int, chat: bool = True) -> tuple[list[int], bool]:
    """Prompt ids of the summary request, the article cut by tokens so the prompt has at most `budget`
    tokens; returns (ids, whether the article was cut)."""
    def ids_for(text):
        return runtime.prompt_ids(SUMMARY_REQUEST.format(article=text), chat=chat)

    ids = ids_for(article)
    if len(ids) <= budget:
        return ids, False
    overhead = len(ids_for(""))
    if overhead >= budget:
        raise ExporterError(f"the summary prompt takes {overhead} tokens without the article; "
                            f"the prompt budget is {budget} (--max-prompt-tokens, context minus --max-new-tokens)")
    article_ids = runtime.encode(article)
    keep = len(article_ids) - (len(ids) - budget)
    while len(ids) > budget:  # re-tokenizing a cut text can merge differently: cut again if needed
        ids = ids_for(runtime.decode_text(article_ids[:max(keep, 0)]).rstrip("\ufffd"))
        keep -= max(1, len(ids) - budget)
    return ids, True


def evaluate_summarization(runtime, examples: list[dict], schedule, max_new_tokens: int = 96,
                           max_prompt_tokens: int = 1024, chat: bool = True, progress: bool = True) -> dict:
    """Greedy summaries of each article, ROUGE (stemmed) against its highlights, and decode speed."""
    from rouge_score.rouge_scorer import RougeScorer
    from tqdm.auto import tqdm

    from exporter.runtime.generation import GenerationStats, schedule_text

    budget = max_prompt_tokens
    if runtime.max_context is not None:
        budget = min(budget, runtime.max_context - max_new_tokens)
    if budget < 1:
        raise ExporterError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt "
                            f"in the context of {runtime.max_context} tokens")
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = {"rouge1": [], "rouge2": [], "rougeL": []}
    stats, prompt_tokens, truncated, generated = GenerationStats(), [], 0, []
    for example in tqdm(examples, desc="summarization", unit="article", disable=not progress):
        ids, cut = summary_prompt(runtime, example["article"], budget, chat)
        steps = list(runtime.generate(ids, max_new_tokens, schedule))
        stats.add(steps)
        prompt_tokens.append(len(ids))
        generated.append(len(steps))
        truncated += cut
        summary = runtime.decode_text([s.token for s in steps])
        for key, score in scorer.score(example["highlights"], summary).items():
            scores[key].append(score.fmeasure)
    return {
        "task": "summarization",
        "artifact": str(runtime.directory),
        "schedule": schedule_text(schedule),
        "examples": len(examples),
        **{key: float(np.mean(values)) for key, values in scores.items()},
        "mean_prompt_tokens": float(np.mean(prompt_tokens)),
        "truncated_articles": truncated,
        "mean_generated_tokens": stats.tokens / len(examples),
        "prefill_s_mean": stats.prefill_s / len(examples),
        "decode_tokens_per_s": stats.decode_tokens_per_s,
        "level_decode_tokens_per_s": stats.level_tokens_per_s,
        "level_tokens": stats.level_tokens,
        "max_new_tokens": max_new_tokens,
        "chat_template": chat,
        # each article's scores, in the file's order: two artifacts' runs compare article by article
        # (bootstrap_ratio), which 100 articles' spread needs
        "per_example": {**{key: [round(float(v), 6) for v in values] for key, values in scores.items()},
                        "generated_tokens": generated},
    }


def bootstrap_ratio(reference: list[float], other: list[float], draws: int = 10000, seed: int = 0,
                 level: float = 0.95, target: float | None = None) -> dict:
    """mean(other) / mean(reference) over the same examples, with a paired bootstrap interval: the examples
    drawn with replacement `draws` times, the same draw for both, so what the two share (an article hard for
    both) cancels. Returns {"ratio", "low", "high", "draws"}, and with `target` the share of draws at or above it."""
    reference, other = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    if reference.shape != other.shape or reference.ndim != 1 or not len(reference):
        raise ExporterError(f"paired scores need the same examples: {reference.shape} against {other.shape}")
    if reference.sum() <= 0:
        raise ExporterError("the reference's scores are all zero: no ratio")
    picks = np.random.default_rng(seed).integers(0, len(reference), (draws, len(reference)))
    ratios = other[picks].sum(axis=1) / np.maximum(reference[picks].sum(axis=1), 1e-300)
    tail = (1 - level) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    found = {"ratio": float(other.sum() / reference.sum()), "low": float(low), "high": float(high), "draws": draws}
    if target is not None:
        found["at_least_target"] = float(np.mean(ratios >= target))
    return found


def evaluate_perplexity(runtime, windows: np.ndarray, level: str, progress: bool = True) -> dict:
    """Perplexity of one level of an artifact (a prefill per window)."""
    return {
        "task": "perplexity",
        "artifact": str(runtime.directory),
        "schedule": level,
        "examples": int(windows.shape[0]),
        "window": int(windows.shape[1]),
        "perplexity": ort_perplexity(runtime.decoder(level), windows, progress),
    }
