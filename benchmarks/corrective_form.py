"""Decode speed of the two ONNX forms of CALR corrective branches on SmolLM2-135M (issues #4, #8).

    python benchmarks/corrective_form.py                       # fp32 and int4, 20% removed, r_c = 16
    python benchmarks/corrective_form.py --weights int4 --repeats 9

The graph writer can write a branch y += B (A x) folded into the primary factors ([V; A] as extra
first-stage columns, [U, B] as extra second-stage rows: no extra node) or as a separate branch
(one more first-stage MatMul per group of projections sharing an input, whose A^T are concatenated
like the V^T are, then a MatMul by B^T and an Add per projection). Both compute the same function;
this measures which decodes faster.

The model: the embedded SmolLM2-135M-Instruct, whitened SVD on a small calibration set (`--calib`,
default WikiText-2 valid from ../shared/data, `--calib-samples` x `--calib-seq-len` tokens; plain SVD
with `--calib none`, which at 20% leaves a model so damaged that int4 rounding noise changes its
outputs wholesale and the int4 parity check means little) at `--ratio` of the decoder projection
parameters removed, with uniform ranks rounded to `--rank-multiple` (32: whole int4 blocks, as the
pipeline's Fisher ranks are for int4), the branches paying for themselves out of the same budget
(`settle_ranks`), and random small B (an untrained branch is zero; the values do not change the
speed, but make the parity check mean something). `--cache` keeps the built model for reruns.

Both forms are written at fp32 and int4 (MatMulNBits, block 32, accuracy_level 4 as the pipeline
writes it), checked against each other and PyTorch, then timed with `exporter.runtime.generation.OrtDecoder`:
a `--prompt-tokens` prompt, `--new-tokens` greedy steps, `--threads` intra-op threads; the two forms'
sessions are loaded side by side and run alternately (folded first on even repeats, separate first on
odd ones) so that drift in the machine's load hits both alike. Reported: the median over repeats of
each repeat's median step time (ms/token), the min and max of those, and the prefill time.

Prints a JSON object and writes it to benchmarks/results/corrective-form-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from results_io import publish_results  # benchmarks/results_io.py: a script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.compress.corrective import attach_correctives, settle_ranks  # noqa: E402
from exporter.compress.factorize import (  # noqa: E402
    apply_ranks,
    corrective_ranks,
    count_params,
    decoder_projections,
    effective_ranks,
    parameter_summary,
    uniform_ranks,
)
from exporter.compress.lowrank import CorrectedLinear  # noqa: E402
from exporter.graph.optimum_export import torch_greedy  # noqa: E402
from exporter.graph.writer import write_decoder  # noqa: E402
from exporter.pipeline import ExportOptions, prepare  # noqa: E402
from exporter.runtime.generation import OrtDecoder  # noqa: E402
from exporter.settings import CorrectiveOptions  # noqa: E402

FORMS = ("folded", "separate")
DATA = ROOT.parent / "shared" / "data"
TEXT = ("The engineer explains how a small language model is compressed for an edge device: every projection "
        "becomes two thin matrices, a correction branch recovers what the truncation lost, and the graph is "
        "exported with its key-value cache so that each new token costs one short pass. ")


def build_model(ratio: float, corrective_rank: int, multiple: int, seed: int, calib: str | None,
                samples: int, seq_len: int):
    """(model, tokenizer, summary): SmolLM2 with uniform ranks and random-B branches of `corrective_rank`."""
    prepared = prepare(ExportOptions(device="host", calib=calib, calib_samples=samples, calib_seq_len=seq_len,
                                     seed=seed, progress=False))
    model, tokenizer = prepared.model, prepared.tokenizer
    projections = decoder_projections(model)
    dense = sum(p.params for p in projections)
    budget = round((1.0 - ratio) * dense)

    def primary_ranks(params: int) -> dict:
        ranks = uniform_ranks(projections, 1.0 - params / dense)
        return {n: None if r is None else max(multiple, multiple * round(r / multiple)) for n, r in ranks.items()}

    options = CorrectiveOptions(rank=corrective_rank)
    ranks, branches = settle_ranks(primary_ranks, projections, options, budget)
    total = count_params(model)
    decompositions = prepared.decompositions("svd" if calib is None else "whitened", joint=False, full_rank=False)
    apply_ranks(model, decompositions, ranks)
    applied = effective_ranks(model, projections)
    attach_correctives(model, decompositions, {n: r for n, r in branches.items() if applied[n] is not None})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CorrectedLinear):  # small, like a trained branch next to the primary path
                module.corrective_up.weight.normal_(0, 0.01, generator=generator)
    summary = parameter_summary(projections, applied, total, corrective_ranks(model, projections))
    summary["primary_ranks"] = sorted({r for r in applied.values() if r is not None})
    summary["corrective_ranks"] = sorted(set(corrective_ranks(model, projections).values()))
    return model, tokenizer, summary


def prompt_ids(tokenizer, length: int) -> list[int]:
    text = TEXT
    while len(ids := tokenizer(text, add_special_tokens=False)["input_ids"]) < length:
        text += TEXT
    return ids[:length]


def _diff(a: np.ndarray, b: np.ndarray) -> dict:
    return {"max_abs_logit_diff": float(np.abs(a - b).max()), "mean_abs_logit_diff": float(np.abs(a - b).mean()),
            "argmax_agreement": float(np.mean(np.argmax(a, -1) == np.argmax(b, -1)))}


def parity(paths: dict[str, Path], prompt: list[int], reference: tuple[list[int], np.ndarray], steps: int) -> dict:
    """|logit difference| of separate vs folded, and of each vs the reference (PyTorch's greedy run), over
    `steps` teacher-forced greedy steps after the prompt."""
    tokens, ref_logits = reference
    logits = {form: OrtDecoder(paths[form], threads=2).greedy(prompt, steps, forced_tokens=tokens)[1]
              for form in FORMS}
    return {"separate_vs_folded": _diff(logits["separate"], logits["folded"]),
            **{f"{form}_vs_pytorch": _diff(logits[form], ref_logits) for form in FORMS}}


def time_forms(paths: dict[str, Path], prompt: list[int], new_tokens: int, threads: int, repeats: int) -> dict:
    decoders = {form: OrtDecoder(paths[form], threads=threads) for form in FORMS}
    for decoder in decoders.values():  # warm-up: first runs allocate and pick kernels
        decoder.greedy(prompt, 8)
    steps = {form: [] for form in FORMS}
    prefill = {form: [] for form in FORMS}
    for repeat in range(repeats):
        for form in FORMS if repeat % 2 == 0 else FORMS[::-1]:
            _, _, timing = decoders[form].greedy(prompt, new_tokens)
            steps[form].append(1000.0 * float(np.median(timing.step_s)))
            prefill[form].append(1000.0 * timing.prefill_s)
    result = {form: {"decode_ms_per_token": float(np.median(steps[form])),
                     "decode_ms_min": float(np.min(steps[form])), "decode_ms_max": float(np.max(steps[form])),
                     "per_repeat_ms": [round(s, 3) for s in steps[form]],
                     "prefill_ms": float(np.median(prefill[form]))} for form in FORMS}
    ratio = [s / f for s, f in zip(steps["separate"], steps["folded"])]  # paired: same repeat, adjacent runs
    result["separate_over_folded"] = {"median": float(np.median(ratio)), "min": float(np.min(ratio)),
                                      "max": float(np.max(ratio))}
    return result


def graph_stats(path: Path) -> dict:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    data = path.with_name(path.name + ".data")
    return {"nodes": len(graph.node), "disk_mb": round((path.stat().st_size + data.stat().st_size) / 2**20, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--corrective-rank", type=int, default=16)
    parser.add_argument("--rank-multiple", type=int, default=32, help="primary ranks rounded to a multiple of this")
    parser.add_argument("--weights", default="fp32,int4", help="comma-separated: fp32, int4")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--accuracy-level", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib", default=str(DATA / "wikitext-2" / "valid.txt"),
                        help="calibration text for the whitened SVD, or 'none' for plain SVD")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--parity-steps", type=int, default=8)
    parser.add_argument("--cache", type=Path, default=None, help="pickle of the built model, prompt and reference")
    parser.add_argument("--work", type=Path, default=None, help="where the graphs go (default: a temporary folder)")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/corrective-form-*.json")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    calib = None if args.calib == "none" else args.calib
    key = (args.ratio, args.corrective_rank, args.rank_multiple, args.seed, calib, args.calib_samples,
           args.calib_seq_len, args.prompt_tokens, args.parity_steps)
    cached = torch.load(args.cache, weights_only=False) if args.cache and args.cache.is_file() else None
    if cached is not None and cached["key"] == key:
        model, summary, prompt, reference = cached["model"], cached["summary"], cached["prompt"], cached["reference"]
    else:
        model, tokenizer, summary = build_model(args.ratio, args.corrective_rank, args.rank_multiple, args.seed,
                                                calib, args.calib_samples, args.calib_seq_len)
        prompt = prompt_ids(tokenizer, args.prompt_tokens)
        reference = torch_greedy(model, prompt, args.parity_steps)
        if args.cache:
            torch.save({"key": key, "model": model, "summary": summary, "prompt": prompt, "reference": reference},
                       args.cache)
    print(f"built in {time.perf_counter() - start:.0f}s: primary ranks {summary['primary_ranks']}, branch ranks "
          f"{summary['corrective_ranks']}, {100 * summary['projection_fraction_removed']:.1f}% of the projections "
          "removed", file=sys.stderr, flush=True)
    result = {"model": "SmolLM2-135M-Instruct (embedded)", "ratio": args.ratio, "calib": calib,
              "projection_fraction_removed": summary["projection_fraction_removed"],
              "primary_ranks": summary["primary_ranks"], "corrective_ranks": summary["corrective_ranks"],
              "prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "threads": args.threads,
              "repeats": args.repeats, "load_average_at_start": list(os.getloadavg()), "weights": {}}
    with tempfile.TemporaryDirectory(prefix="corrective-form-") as tmp:
        work = args.work or Path(tmp)
        for weights in args.weights.split(","):
            quant = {"weights": weights}
            if weights == "int4":
                quant.update(block_size=args.block_size, accuracy_level=args.accuracy_level)
            paths = {form: write_decoder(model, work / f"{weights}-{form}", corrective_form=form, **quant)
                     for form in FORMS}
            entry = {"graph": {form: graph_stats(paths[form]) for form in FORMS},
                     "parity": parity(paths, prompt, reference, args.parity_steps)}
            entry.update(time_forms(paths, prompt, args.new_tokens, args.threads, args.repeats))
            result["weights"][weights] = entry
            print(f"{weights}: folded {entry['folded']['decode_ms_per_token']:.2f} ms/token, separate "
                  f"{entry['separate']['decode_ms_per_token']:.2f} ms/token (separate/folded paired median "
                  f"{entry['separate_over_folded']['median']:.3f}); separate vs folded max |logit diff| "
                  f"{entry['parity']['separate_vs_folded']['max_abs_logit_diff']:.2e}", file=sys.stderr, flush=True)
    result["load_average_at_end"] = list(os.getloadavg())
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=1))
    if not args.no_save:
        publish_results("corrective-form", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
