"""Wall time and peak memory of the torch stages per compute device (issue 22, items 1 and 4).

  python benchmarks/compute_devices.py model [--like DIR] [--config-only] --out DIR
      a randomly initialized model of SmolLM2-135M's shape (the embedded model's config and tokenizer) saved as
      a Hugging Face directory: `exporter export --model DIR --compute cpu|cuda` then times the whole export on
      the same weights wherever it runs (the GPU machine cannot receive the 98 MB embedded GGUF).
  python benchmarks/compute_devices.py passes --shape qwen3-8b --layers 4 [--compute cuda] [--json FILE]
      the statistics pass (Grams), the full-rank whitened factorization, the Fisher importance and GPTQ at int4
      block 32 on a random model of that shape (depth cut to --layers), each timed with its peak device memory
      (CUDA) and the process's peak RSS; per-layer figures project deeper models.

Random weights cost what real ones do: every pass is the same arithmetic on the same shapes.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Shapes from the models' published configs (hidden, intermediate, layers, heads, kv heads, head dim, vocab, tied).
SHAPES = {
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
}


def random_model(config, seed: int = 0, on_gpu: bool = False):
    """A model of `config` with its architecture's random initialization (on the GPU where asked and present:
    fast for billions of weights; on the CPU the same seed gives the same weights on every machine)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    where = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    with torch.device(where):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to("cpu").eval()


def make_model(args) -> None:
    """The embedded model's config and tokenizer (or those in --like, a directory without weights: what travels to
    the GPU machine) with random weights."""
    from exporter.source.tokenizer import save_tokenizer

    if args.like:
        from transformers import AutoConfig, AutoTokenizer

        config, tokenizer = AutoConfig.from_pretrained(args.like), AutoTokenizer.from_pretrained(args.like)
    else:
        from exporter.source.model import load_model, resolve_model

        source_model, tokenizer = load_model(resolve_model(None))
        config = source_model.config
        del source_model
    out = Path(args.out)
    if args.config_only:
        config.save_pretrained(out)
    else:
        random_model(config, args.seed).save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    print(f"{'config and tokenizer' if args.config_only else 'random model'} of SmolLM2-135M's shape in {out}")


def qwen3_config(shape: str, layers: int | None):
    from transformers import Qwen3Config

    fields = dict(SHAPES[shape])
    if layers:
        fields["num_hidden_layers"] = layers
    return Qwen3Config(max_position_embeddings=4096, **fields)


class Meter:
    """Each stage's wall seconds and peak device memory."""

    def __init__(self, device: torch.device):
        self.device, self.stages = device, {}

    def run(self, name: str, work):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = work()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None
        self.stages[name] = {"seconds": round(seconds, 2), "peak_device_gib": None if peak is None else round(peak, 2),
                             "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
        print(f"{name:>12}: {seconds:8.1f} s" + ("" if peak is None else f", peak device memory {peak:.2f} GiB"),
              flush=True)
        return result


def passes(args) -> None:
    from exporter.compress import compute
    from exporter.compress.factorize import decompose_model
    from exporter.compress.grams import iter_layer_grams
    from exporter.compress.grid import QuantFormat
    from exporter.compress.importance import component_fisher
    from exporter.compress.quantize import quantize_model

    device = compute.resolve(args.compute)
    config = qwen3_config(args.shape, args.layers)
    start = time.perf_counter()
    model = random_model(config, on_gpu=True)
    built = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    ids = torch.randint(0, config.vocab_size, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    print(f"{args.shape} shape, {config.num_hidden_layers} layers: {params / 1e9:.2f}B parameters "
          f"({layer_params / 1e6:.0f}M per layer), built in {built:.0f} s; {args.samples} x {args.seq_len} "
          f"calibration tokens; compute {compute.describe(device)}", flush=True)
    meter = Meter(device)
    with compute.using(device):
        meter.run("statistics", lambda: [None for _ in iter_layer_grams(model, ids, progress=False)])
        decompositions = meter.run("factorize", lambda: decompose_model(model, "whitened", ids, progress=False,
                                                                        full_rank=True))
        meter.run("fisher", lambda: component_fisher(model, decompositions, ids[: args.fisher_samples],
                                                     progress=False))
        decompositions = None  # its memory back before GPTQ
        fmt = QuantFormat(4, 32, True)
        meter.run("gptq", lambda: quantize_model(model, lambda _name: fmt, ids, fisher_samples=args.fisher_samples,
                                                 progress=False))
    result = {"shape": args.shape, "layers": config.num_hidden_layers, "parameters": params,
              "layer_parameters": layer_params, "calibration": [args.samples, args.seq_len],
              "fisher_samples": args.fisher_samples, "compute": compute.describe(device),
              "torch": torch.__version__, "stages": meter.stages}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    model = commands.add_parser("model")
    model.add_argument("--like", help="a directory with config.json and the tokenizer (default: the embedded model)")
    model.add_argument("--config-only", action="store_true", help="write the config and tokenizer, no weights")
    model.add_argument("--out", required=True)
    model.add_argument("--seed", type=int, default=0)
    run = commands.add_parser("passes")
    run.add_argument("--shape", choices=sorted(SHAPES), required=True)
    run.add_argument("--layers", type=int, help="decoder layers (default: the model's own count)")
    run.add_argument("--compute", default="auto")
    run.add_argument("--samples", type=int, default=32, help="calibration sequences (the exporter's default: 32)")
    run.add_argument("--seq-len", type=int, default=512)
    run.add_argument("--fisher-samples", type=int, default=8)
    run.add_argument("--json")
    args = parser.parse_args()
    make_model(args) if args.command == "model" else passes(args)


if __name__ == "__main__":
    main()
