"""Low-rank factorization of linear layers: whitened SVD (SVD-LLM) and plain SVD.

A projection W (out x in) becomes U (out x r) @ V (r x in), stored as two nn.Linear layers so
every exporter and runtime sees ordinary MatMuls. Components are ordered by singular value, so a
smaller rank is always a prefix of the same factors (rank-sliced levels rely on this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """y = up(down(x)) with down: in -> rank and up: rank -> out (bias on `up`)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype)

    @property
    def rank(self) -> int:
        return self.down.out_features

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None):
        module = cls(down.shape[1], up.shape[0], down.shape[0], bias=bias is not None, dtype=up.dtype)
        with torch.no_grad():
            module.down.weight.copy_(down)
            module.up.weight.copy_(up)
            if bias is not None:
                module.up.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class CorrectedLinear(nn.Module):
    """A primary path plus a parallel low-rank corrective branch: y = base(x) + corrective_up(corrective_down(x)).

    CALR: `base` is a LowRankLinear and the branch is learned (exporter.compress.corrective) against what the
    compressed model's outputs lose, not the weight residual; `corrective_up` starts at zero, so an untrained
    branch reproduces the primary path exactly. Quantization error correction: `base` is a dense nn.Linear on
    a grid and the branch the whitened SVD of its error (exporter.compress.error_correction). Wraps the
    primary module the way PEFT's LoRA layers wrap a base Linear.
    """

    def __init__(self, base: LowRankLinear | nn.Linear, rank: int, down_init: torch.Tensor | None = None):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        dtype = (base.down.weight if isinstance(base, LowRankLinear) else base.weight).dtype
        self.corrective_down = nn.Linear(self.in_features, rank, bias=False, dtype=dtype)
        self.corrective_up = nn.Linear(rank, self.out_features, bias=False, dtype=dtype)
        with torch.no_grad():
            if down_init is not None:  # e.g. the next whitened SVD directions: a useful input subspace
                self.corrective_down.weight.copy_(down_init)
            nn.init.zeros_(self.corrective_up.weight)

    @property
    def rank(self) -> int | None:
        """The primary path's rank (None: a dense base)."""
        return self.base.rank if isinstance(self.base, LowRankLinear) else None

    @property
    def corrective_rank(self) -> int:
        return self.corrective_down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.corrective_up(self.corrective_down(x))

    def extra_repr(self) -> str:
        return f"corrective_rank={self.corrective_rank}"


def break_even_rank(out_features: int, in_features: int) -> int:
    """Largest rank at which the two factors hold fewer parameters than the dense matrix."""
    return (out_features * in_features - 1) // (out_features + in_features)


def split_rows(module: LowRankLinear | CorrectedLinear, sizes: list[int]) -> list[nn.Module]:
    """One module per block of `sizes` output rows of `module`, all sharing its down factor (the same
    nn.Linear, trained as one parameter) and, for a CorrectedLinear, its corrective down factor: a joint
    factorization of projections that read one input (exporter.compress.factorize, joint units)."""
    if sum(sizes) != module.out_features:
        raise ValueError(f"row blocks {sizes} do not add up to {module.out_features} outputs")
    base = module.base if isinstance(module, CorrectedLinear) else module
    parts, start = [], 0
    for size in sizes:
        rows = slice(start, start + size)
        part = LowRankLinear(base.in_features, size, base.rank, bias=base.up.bias is not None,
                             dtype=base.up.weight.dtype)
        part.down = base.down
        with torch.no_grad():
            part.up.weight.copy_(base.up.weight[rows])
            if base.up.bias is not None:
                part.up.bias.copy_(base.up.bias[rows])
        if isinstance(module, CorrectedLinear):
            corrected = CorrectedLinear(part, module.corrective_rank)
            corrected.corrective_down = module.corrective_down
            with torch.no_grad():
                corrected.corrective_up.weight.copy_(module.corrective_up.weight[rows])
            part = corrected
        parts.append(part)
        start += size
    return parts


def join_rows(modules: list[LowRankLinear]) -> LowRankLinear:
    """The LowRankLinears of one joint unit (`split_rows`' parts: one down factor) as one module whose up
    factor stacks theirs; a single module is returned as it is."""
    if len(modules) == 1:
        return modules[0]
    if any(m.down is not modules[0].down for m in modules):
        raise ValueError("only modules that share one down factor can be joined")
    first = modules[0]
    joined = LowRankLinear(first.in_features, sum(m.out_features for m in modules), first.rank,
                           bias=first.up.bias is not None, dtype=first.up.weight.dtype)
    joined.down = first.down
    with torch.no_grad():
        joined.up.weight.copy_(torch.cat([m.up.weight for m in modules]))
        if first.up.bias is not None:
            joined.up.bias.copy_(torch.cat([m.up.bias for m in modules]))
    return joined


@dataclass
class Decomposition:
    """W ~= up[:, :r] @ down[:r] for any r <= len(sigma); components in descending importance."""

    up: torch.Tensor  # out x k
    down: torch.Tensor  # k x in
    sigma: torch.Tensor  # k singular values of W (plain) or of W @ S (whitened)
    bias: torch.Tensor | None = None

    @property
    def max_rank(self) -> int:
        return self.sigma.numel()

    def linear(self, rank: int) -> LowRankLinear:
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} outside 1..{self.max_rank}")
        return LowRankLinear.from_factors(
            self.up[:, :rank].contiguous(), self.down[:rank].contiguous(), self.bias
        )


def whitening_factor(gram: torch.Tensor, max_tries: int = 8) -> torch.Tensor:
    """Lower-triangular S with S @ S.T = gram (+ a growing diagonal shift when gram is singular)."""
    gram = gram.double()
    scale = gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    jitter = 0.0
    for attempt in range(max_tries):
        factor, info = torch.linalg.cholesky_ex(gram + jitter * scale * eye)
        if int(info) == 0:
            return factor
        jitter = 1e-6 * 10**attempt
    raise torch.linalg.LinAlgError("Gram matrix is not positive definite even with a diagonal shift")


def decompose(
    weight: torch.Tensor,
    gram: torch.Tensor | None = None,
    max_rank: int | None = None,
    bias: torch.Tensor | None = None,
) -> Decomposition:
    """SVD of W (plain) or of W @ S with S S^T = X^T X (truncation-aware whitening, SVD-LLM).

    Whitening makes singular values measure the output error on the calibration inputs: dropping
    component k costs exactly sigma_k^2 of ||X W^T - X W_r^T||^2. Each component is split so its two
    factor vectors have equal norm, which keeps later gradient training of the factors stable.
    """
    from exporter.compress import compute

    device = compute.current()
    w = weight.detach().to(device).double()
    gram = None if gram is None else gram.to(device)
    if gram is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        down_dir = vh
    else:
        chol = whitening_factor(gram)
        u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
        # down = vh @ S^-1, computed as a triangular solve: S^T down^T = vh^T.
        down_dir = torch.linalg.solve_triangular(chol.T, vh.T, upper=True).T
    k = s.numel() if max_rank is None else min(max_rank, s.numel())
    u, s, down_dir = u[:, :k], s[:k], down_dir[:k]
    down_norm = down_dir.norm(dim=1).clamp_min(1e-30)
    up_scale = (s * down_norm).sqrt().clamp_min(1e-30)  # ||u_k|| = 1: this balances the norms
    up = u * up_scale
    down = down_dir * (s / up_scale).unsqueeze(1)
    return Decomposition(
        up.to("cpu", weight.dtype), down.to("cpu", weight.dtype), s.to("cpu", torch.float32),
        None if bias is None else bias.detach().clone(),
    )
