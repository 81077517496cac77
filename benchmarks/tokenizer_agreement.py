"""Text in, text out across runtimes: does onnxruntime-genai read an artifact as the exporter does?

    python benchmarks/tokenizer_agreement.py ARTIFACT [--data ../shared/data] [--new-tokens 64]

1. Token ids: onnxruntime-genai's tokenizer (og.Tokenizer, what Android/iOS/C# apps call) against the
   `tokenizers` library (the exporter's runtime) on every line of WikiText-2 test.txt and every
   CNN/DailyMail article in the data folder.
2. Generation: the exporter's runtime (`exporter generate`'s code path: chat template, greedy, stop ids) and
   onnxruntime-genai (its own chat template call, og.Generator, greedy) on CHAT_PROMPTS: the same ids, the
   same text, and whether each stopped at end of turn. onnxruntime-genai runs the artifact's full-rank graph
   (model.onnx) only, so the runtime runs it too (--schedule, default the first level from token 0); the
   artifact's own progressive schedule switches to smaller levels and so generates other text by design.
Prints a Markdown summary and writes it with the details under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import publish_results  # noqa: E402

CHAT_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a haiku about the sea.",
    "Explain what a neural network is in two sentences.",
    "How many days are there in a leap year?",
)


def id_agreement(og_tokenizer, tokenizer, texts: list[str]) -> dict:
    same, first = 0, None
    for text in texts:
        a = [int(i) for i in og_tokenizer.encode(text)]
        b = tokenizer.encode(text, add_special_tokens=True).ids
        if a == b:
            same += 1
        elif first is None:
            first = {"text": text[:120], "onnxruntime_genai": a[:20], "tokenizers": b[:20]}
    return {"texts": len(texts), "identical": same, "agreement": same / max(1, len(texts)), "first_difference": first}


def og_generate(og, model, og_tokenizer, prompt_ids: list[int], new_tokens: int) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt_ids):]


def main(argv=None) -> int:
    import onnxruntime_genai as og
    from tokenizers import Tokenizer

    from exporter.runtime.generation import Runtime

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--schedule", help="the runtime's level schedule (default: the first level throughout)")
    args = parser.parse_args(argv)

    og_tokenizer = og.Tokenizer(og.Config(str(args.artifact)))
    tokenizer = Tokenizer.from_file(str(args.artifact / "tokenizer.json"))
    wiki = [line for line in (args.data / "wikitext-2" / "test.txt").read_text(encoding="utf-8").splitlines()]
    cnn = [json.loads(line)["article"] for line in
           (args.data / "cnn_dailymail" / "validation.jsonl").read_text(encoding="utf-8").splitlines()]
    ids = {"wikitext-2 test.txt lines": id_agreement(og_tokenizer, tokenizer, wiki),
           "cnn_dailymail articles": id_agreement(og_tokenizer, tokenizer, cnn)}

    runtime = Runtime(args.artifact, threads=2)
    schedule = runtime.parse_schedule(args.schedule or f"{runtime.level_names[0]}:0")
    model = og.Model(str(args.artifact))
    chats = []
    for prompt in CHAT_PROMPTS:
        ours_prompt = runtime.prompt_ids(prompt)
        rendered = og_tokenizer.apply_chat_template(
            json.dumps([{"role": "user", "content": prompt}]), add_generation_prompt=True)
        og_prompt = [int(i) for i in og_tokenizer.encode(rendered)]
        ours = [s.token for s in runtime.generate(ours_prompt, max_new_tokens=args.new_tokens,
                                                             schedule=schedule)]
        theirs = og_generate(og, model, og_tokenizer, og_prompt, args.new_tokens)
        ours_text = runtime.decode_text(ours)
        theirs_text = og_tokenizer.decode(np.asarray([t for t in theirs if t not in runtime.stop_ids], dtype=np.int32))
        ours_stopped = bool(ours) and ours[-1] in runtime.stop_ids
        # og.Generator's sequence may or may not hold the end-of-turn token: it stopped if it ended early
        theirs_stopped = (bool(theirs) and theirs[-1] in runtime.stop_ids) or len(theirs) < args.new_tokens
        content = ours[:-1] if ours_stopped else ours
        chats.append({"prompt": prompt, "same_prompt_ids": ours_prompt == og_prompt,
                      "same_ids": content == [t for t in theirs if t not in runtime.stop_ids],
                      "same_text": ours_text == theirs_text, "exporter": ours_text, "onnxruntime_genai": theirs_text,
                      "exporter_stopped": ours_stopped, "onnxruntime_genai_stopped": theirs_stopped,
                      "exporter_tokens": len(ours), "onnxruntime_genai_tokens": len(theirs)})

    lines = [f"# Tokenizer agreement: {args.artifact} (runtime schedule {args.schedule or 'first level'})", "",
             "| texts | count | identical ids (onnxruntime-genai vs tokenizers) |", "|---|---|---|"]
    lines += [f"| {name} | {r['texts']} | {r['identical']} ({r['agreement']:.2%}) |" for name, r in ids.items()]
    lines += ["", "| chat prompt | same prompt ids | same generated ids | same text | stopped at end of turn "
              "(exporter / og) |", "|---|---|---|---|---|"]
    lines += [f"| {c['prompt']} | {c['same_prompt_ids']} | {c['same_ids']} | {c['same_text']} | "
              f"{c['exporter_stopped']} / {c['onnxruntime_genai_stopped']} |" for c in chats]
    lines += ["", "Answers (exporter runtime):"] + [f"- {c['prompt']} -> {c['exporter']!r}" for c in chats]
    publish_results("tokenizer-agreement", {"artifact": str(args.artifact), "schedule": args.schedule,
                                            "ids": ids, "chats": chats},
                    "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
