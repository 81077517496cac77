"""Does a compressed artifact still chat like its dense model? Greedy answers to everyday chat prompts.

    python benchmarks/chat_behaviour.py DENSE_ARTIFACT ARTIFACT [ARTIFACT ...] [--new-tokens 96]

Every artifact answers the same PROMPTS through its own chat template (the exporter's runtime, greedy, full
rank level); each compressed answer is scored against the dense artifact's answer to the same prompt with
ROUGE-L (rouge-score), and every artifact's rate of answers that end at end of turn within --new-tokens
tokens is counted (issue 20's behaviour measure). Free-running answers part for good at the first token
that differs, so ROUGE-L over 20 prompts is coarse; each artifact is also read teacher-forced on the dense
answers (one prefill of prompt + dense answer): the share of answer tokens where its greedy choice is the dense
model's, and the dense answers' perplexity under it. Prints a Markdown table, writes the answers under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_io import publish_results  # noqa: E402

from exporter.runtime.generation import Runtime  # noqa: E402

PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "How do I boil an egg?",
    "Write a short poem about the sea.",
    "What is photosynthesis?",
    "Can you suggest a name for a pet cat?",
    "How many days are there in a leap year?",
    "Explain what a computer virus is in simple terms.",
    "What should I pack for a weekend trip to the mountains?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Give me a healthy breakfast idea.",
    "What is the difference between weather and climate?",
    "How can I be more productive when working from home?",
    "Tell me a fun fact about octopuses.",
    "What is 15 multiplied by 4?",
    "Write a one-sentence birthday message for my friend.",
    "How do plants drink water?",
    "What are the primary colors?",
    "Recommend a good habit to start this month.",
)


def answers(artifact: Path, new_tokens: int, threads: int) -> list[dict]:
    runtime = Runtime(artifact, threads=threads)
    full = runtime.levels[0].name
    out = []
    for prompt in PROMPTS:
        steps = list(runtime.generate(runtime.prompt_ids(prompt), new_tokens, schedule=[(full, 0)]))
        tokens = [s.token for s in steps]
        stopped = bool(tokens) and tokens[-1] in runtime.stop_ids
        out.append({"prompt": prompt, "text": runtime.decode_text(tokens[:-1] if stopped else tokens).strip(),
                    "stopped": stopped, "tokens": len(tokens), "ids": tokens})
    return out


def teacher_forced(artifact: Path, reference: list[dict], threads: int) -> tuple[float, float]:
    """(greedy agreement, perplexity) of the artifact on the dense answers' tokens, end-of-turn included."""
    import numpy as np

    runtime = Runtime(artifact, threads=threads)
    decoder = runtime.decoder(runtime.levels[0].name)
    agree = total = 0
    nll = 0.0
    for answer in reference:
        prompt = runtime.prompt_ids(answer["prompt"])
        ids = np.array(prompt + answer["ids"], dtype=np.int64)
        logits, _ = decoder.step(ids[None, :-1], decoder.empty_cache(1))
        logits = logits[0, len(prompt) - 1:].astype(np.float64)
        targets = ids[len(prompt):]
        peak = logits.max(axis=-1)
        log_norm = np.log(np.exp(logits - peak[:, None]).sum(axis=-1)) + peak
        nll += float((log_norm - logits[np.arange(len(targets)), targets]).sum())
        agree += int((logits.argmax(axis=-1) == targets).sum())
        total += len(targets)
    return agree / total, math.exp(nll / total)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dense", type=Path, help="the dense (reference) artifact")
    parser.add_argument("artifacts", type=Path, nargs="+", help="compressed artifacts")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    reference = answers(args.dense, args.new_tokens, args.threads)
    rows = []
    for artifact in [args.dense, *args.artifacts]:
        result = reference if artifact == args.dense else answers(artifact, args.new_tokens, args.threads)
        scores = [scorer.score(r["text"], a["text"])["rougeL"].fmeasure for r, a in zip(reference, result)]
        agreement, answer_ppl = teacher_forced(artifact, reference, args.threads)
        rows.append({"artifact": str(artifact), "rouge_l_vs_dense": round(statistics.mean(scores), 4),
                     "ended_at_end_of_turn": sum(a["stopped"] for a in result) / len(PROMPTS),
                     "teacher_forced_agreement": round(agreement, 4), "dense_answer_perplexity": round(answer_ppl, 3),
                     "answers": result})
        print(f"[{artifact}] ROUGE-L {rows[-1]['rouge_l_vs_dense']}, teacher-forced agreement {agreement:.3f}",
              file=sys.stderr)
    lines = [f"{len(PROMPTS)} chat prompts, greedy, at most {args.new_tokens} new tokens, full rank level", "",
             "| artifact | ROUGE-L vs dense answers | ended at end of turn | teacher-forced agreement "
             "| dense answers' perplexity |", "|---|---|---|---|---|"]
    lines += [f"| {r['artifact']} | {r['rouge_l_vs_dense']} | {r['ended_at_end_of_turn']:.0%} | "
              f"{r['teacher_forced_agreement']:.3f} | {r['dense_answer_perplexity']:.3f} |" for r in rows]
    lines += ["", "First three answers of each:"]
    for r in rows:
        lines += [f"- {r['artifact']}: " + " / ".join(repr(a["text"][:80]) for a in r["answers"][:3])]
    publish_results("chat-behaviour", {"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}},
                    "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
