"""Would another basis put SmolLM2's projections on a grid with less output error? Two function-preserving changes:

    python benchmarks/basis_probe.py [--layers 2,15,28] [--windows 8] [--formats int2-b64-asym,int4-b64]

- **rotation** (QuaRot, SpinQuant): the residual stream turned by an orthogonal Q, here the Kronecker product of two
  seeded random orthogonal matrices (24 x 24 twice for width 576: a graph would apply it in two small MatMuls after
  the embedding and before the final norm). Readers (q/k/v, gate/up) take W diag(gamma) Q with their norm's gamma
  folded in, writers (o, down) Q^T W.
- **equalization** (AWQ, SmoothQuant): each input channel j of a group scaled by s_j = (H_jj / mean H)^(alpha/2),
  W diag(s) on the input x / s (1/s folded into the norm's gamma, v_proj's or up_proj's rows).

Each is scored as GPTQ's output error tr(E H E^T) on its own input Gram H (8 WikiText-2 validation windows of 512
tokens), over the same error of the unchanged projection: below 1 the change helps that format. Output errors are
comparable because both changes leave each projection's output (or its norm, for writers) unchanged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.compress.gptq import gptq  # noqa: E402
from exporter.compress.grid import QuantFormat, dequantize  # noqa: E402
from exporter.source.model import load_model, resolve_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
GROUPS = {"attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp_in": ("mlp.gate_proj", "mlp.up_proj"), "o_in": ("self_attn.o_proj",), "down_in": ("mlp.down_proj",)}
NORMS = {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"}  # readers of the residual stream
ALPHAS = (0.15, 0.3, 0.5)


def input_grams(model, tokenizer, layers: list[int], windows: int, length: int = 512) -> dict[str, torch.Tensor]:
    """Each group's input Gram (float64, summed over every position of `windows` windows)."""
    ids = tokenizer(DATA.read_text()[: 4_000 * length // 512 * windows], return_tensors="pt").input_ids[0]
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return record

    handles = [model.model.layers[i].get_submodule(modules[0]).register_forward_pre_hook(hook(f"{i}.{group}"))
               for i in layers for group, modules in GROUPS.items()]
    with torch.no_grad():
        for w in range(windows):
            model(ids[None, w * length:(w + 1) * length])
    for handle in handles:
        handle.remove()
    return grams


def output_error(weight: torch.Tensor, gram: torch.Tensor, fmt: QuantFormat) -> float:
    grid = gptq(weight.float(), gram.float(), fmt)
    quantized = dequantize(grid.codes, grid.scales, grid.zeros, fmt.block_size)[:, : weight.shape[1]]
    error = weight - torch.from_numpy(quantized).double()
    return float(torch.einsum("ij,jk,ik->", error, gram, error))


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def kronecker_rotation(width: int, seed: int = 0) -> torch.Tensor:
    a = int(width ** 0.5)
    while width % a:
        a -= 1
    generator = torch.Generator().manual_seed(seed)
    return torch.kron(random_orthogonal(a, generator), random_orthogonal(width // a, generator))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2,15,28", help="decoder layers, comma-separated, or 'all'")
    parser.add_argument("--windows", type=int, default=8, help="WikiText-2 validation windows of 512 tokens")
    parser.add_argument("--formats", default="int2-b64-asym,int4-b64,int4-b256-asym")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(resolve_model(None))
    n_layers = len(model.model.layers)
    layers = list(range(n_layers)) if args.layers == "all" else [int(i) for i in args.layers.split(",")]
    formats = [QuantFormat.parse(f) for f in args.formats.split(",")]
    grams = input_grams(model, tokenizer, layers, args.windows)
    rotation = kronecker_rotation(model.config.hidden_size)
    print(f"GPTQ output error / the unchanged projection's ({args.windows} windows of 512 tokens)")
    print("| layer | input | format | rotation | " + " | ".join(f"alpha {a}" for a in ALPHAS) + " |")
    print("|---|---|---|---|" + "---|" * len(ALPHAS))
    for i in layers:
        layer = model.model.layers[i]
        for group, modules in GROUPS.items():
            gram = grams[f"{i}.{group}"]
            weights = [layer.get_submodule(m).weight.detach().double() for m in modules]
            if group in NORMS:  # readers: the norm's gamma folded in, the input Gram without it
                gamma = layer.get_submodule(NORMS[group]).weight.detach().double()
                rotated = [w * gamma @ rotation for w in weights]
                rotated_gram = rotation.T @ (gram / torch.outer(gamma, gamma)) @ rotation
            else:  # writers into the residual stream turn their output; their inputs stay as they are
                rotated = [rotation.T @ w for w in weights]
                rotated_gram = gram
            energy = torch.diagonal(gram).clamp_min(1e-12)
            for fmt in formats:
                base = sum(output_error(w, gram, fmt) for w in weights)
                turned = sum(output_error(w, rotated_gram, fmt) for w in rotated) / base
                scaled = []
                for alpha in ALPHAS:
                    s = (energy / energy.mean()) ** (alpha / 2)
                    scaled_gram = gram / torch.outer(s, s)
                    scaled.append(sum(output_error(w * s, scaled_gram, fmt) for w in weights) / base)
                print(f"| {i} | {group} | {fmt.name} | {turned:.3f} | " + " | ".join(f"{r:.3f}" for r in scaled) + " |",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
