"""End-to-end tuning of the grids' scales: the quantized model's next-token distributions pulled toward the
dense model's, at no byte cost.

A grid weight reads back as (q - z) * s (exporter.compress.grid). GPTQ chooses the codes q one linear at a time
against that linear's own output error; the scales s are stored as float32 whatever their value, so they can
be trained afterwards against what the user sees: KL(dense || quantized) of the next-token distributions on
the calibration windows (chat turns included, `--calib-chat`) and more of the calibration file's
(`--tune-windows`, exporter.pipeline.Prepared.tuning_windows), with every code and zero point fixed. The
weights stay exactly on their grids, so the graph packs the same codes with the tuned scales and PyTorch and
ONNX Runtime still compute the same thing. (EfficientQAT's end-to-end stage trains the same parameters.)

Each scale is trained as s0 * (1 + d), d starting at 0 (one learning rate fits every block's magnitude). The
held-out windows measure the KL before and after; where it did not fall, the scales go back to GPTQ's. The
rate is in proportion to that KL before: grids far from the dense model take large steps, grids close to it
small ones (measured best: 3e-3 at held-out KL 0.24, 1e-3 at 0.067, 3e-4 at 0.034 where 1e-3 raised it;
benchmarks/RESULTS.md, 2026-12-05). The training steps run in bfloat16 where the CPU computes it natively
(`compute.training_precision`); the held-out KL that decides is measured in float32.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from exporter.compress import compute, distributed
from exporter.compress.corrective import TeacherTargets, kl_divergence
from exporter.compress.grid import GridWeights, RowSplitGrid
from exporter.compress.quantize import grid_linears, grid_of, set_grid
from exporter.errors import ExporterError

RATE_PER_KL = 0.015  # the learning rate per nat of held-out KL before tuning (1e-3 at 0.067) ...
RATE_RANGE = (1e-4, 3e-3)  # ... within these


@dataclass
class ScaleTuningReport:
    steps: int
    scales: int  # trained scale values
    kl_before: float
    kl_after: float
    kept: bool  # False: the held-out KL did not fall, GPTQ's scales were put back
    seconds: float
    lr: float
    precision: str = "float32"  # the training steps' student
    windows: int = 0  # the windows the steps drew from (the held-out ones apart)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "scales": self.scales, "windows": self.windows, "lr": float(f"{self.lr:.3g}"),
                "precision": self.precision, "kl_before": round(self.kl_before, 5),
                "kl_after": round(self.kl_after, 5), "kept": self.kept, "seconds": round(self.seconds, 1)}


class TunedScales(nn.Module):
    """A parametrization of a grid module's weight: (q - z) * s0 * (1 + d), d trained (an offset grid's offsets
    added, fixed)."""

    def __init__(self, grid: GridWeights, dtype: torch.dtype):
        super().__init__()
        out_features = grid.codes.shape[0]
        steps = grid.codes.reshape(out_features, -1, grid.fmt.block_size).astype(np.float32) \
            - grid.zeros[..., None].astype(np.float32)
        self.register_buffer("steps", torch.from_numpy(steps).to(dtype))
        self.register_buffer("base", torch.from_numpy(grid.scales.astype(np.float32)).to(dtype))
        self.delta = nn.Parameter(torch.zeros_like(self.base))
        self.grid, self.in_features = grid, grid.in_features
        offsets = None if grid.offsets is None else grid.offsets.dequantize()[..., None]
        self.register_buffer("offsets", None if offsets is None else torch.from_numpy(offsets).to(dtype))

    def scales(self) -> torch.Tensor:
        return self.base * (1 + self.delta)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        weight = self.steps * self.scales()[..., None]
        if self.offsets is not None:
            weight = weight + self.offsets
        return weight.reshape(weight.shape[0], -1)[:, : self.in_features]

    def tuned_grid(self) -> GridWeights:
        scales = self.scales().detach().float().cpu().numpy().astype(np.float32)
        return GridWeights(self.grid.fmt, self.grid.codes, scales, self.grid.zeros, self.in_features,
                           self.grid.offsets)


class TunedSplitScales(nn.Module):
    """TunedScales of a RowSplitGrid: each part's scales trained, the rows put back in order."""

    def __init__(self, grid: RowSplitGrid, dtype: torch.dtype):
        super().__init__()
        mask = grid.mask()
        self.grid = grid
        self.high, self.low = (TunedScales(part, dtype) for part in grid.parts())
        self.register_buffer("high_rows", torch.from_numpy(np.flatnonzero(mask)))
        self.register_buffer("low_rows", torch.from_numpy(np.flatnonzero(~mask)))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        high, low = self.high(original), self.low(original)
        weight = high.new_zeros(len(self.high_rows) + len(self.low_rows), high.shape[1])
        return weight.index_copy(0, self.high_rows, high).index_copy(0, self.low_rows, low)

    def tuned_grid(self) -> RowSplitGrid:
        """The tuned parts as whole-weight grids again (the other rows keep their scales; `rows` selects)."""
        def whole(grid: GridWeights, tuned: GridWeights, rows: torch.Tensor) -> GridWeights:
            scales = grid.scales.copy()
            scales[rows.cpu().numpy()] = tuned.scales
            return GridWeights(grid.fmt, grid.codes, scales, grid.zeros, grid.in_features, grid.offsets)

        return RowSplitGrid(whole(self.grid.high, self.high.tuned_grid(), self.high_rows),
                            whole(self.grid.low, self.low.tuned_grid(), self.low_rows), self.grid.rows)


def tuning_of(grid, dtype: torch.dtype) -> nn.Module:
    return TunedSplitScales(grid, dtype) if isinstance(grid, RowSplitGrid) else TunedScales(grid, dtype)


def grid_modules(model) -> list[nn.Module]:
    """Every module holding a grid: the graph's MatMulNBits linears and an untied input embedding on its grid."""
    modules = [m for m in grid_linears(model).values() if grid_of(m) is not None]
    embedding = model.get_input_embeddings()
    if grid_of(embedding) is not None:
        modules.append(embedding)
    return list({id(m): m for m in modules}.values())


def holdout_windows(windows: int, most: int = 4) -> int:
    """How many of `windows` tune_scales holds out to judge the tuning: a quarter, at least 1, at most `most`."""
    return max(1, min(most, windows // 4))


def tune_scales(model, teacher, input_ids: torch.Tensor, steps: int, lr: float | None = None, batch_size: int = 2,
                holdout: int = 4, seed: int = 0, progress: bool = True,
                precision: torch.dtype | None | str = "auto",
                head_inputs: dict[bytes, torch.Tensor] | None = None) -> ScaleTuningReport:
    """Train the scales of every grid in `model` (in place) for `steps` steps of KL(teacher || model) on
    `input_ids` (the last `holdout` windows measure); the codes and zero points stay. `lr`: default
    RATE_PER_KL times the held-out KL before tuning, within RATE_RANGE. `precision`: the steps' autocast dtype
    (None: float32; "auto": compute.training_precision of the windows' device). `head_inputs`: the teacher's
    head inputs already known for some windows (corrective.TeacherTargets)."""
    from tqdm.auto import tqdm

    if input_ids.shape[0] < 2:
        raise ExporterError(f"scale tuning needs at least 2 calibration sequences (got {input_ids.shape[0]})")
    start = time.perf_counter()
    holdout = holdout_windows(input_ids.shape[0], holdout)
    held, train = input_ids[-holdout:], input_ids[:-holdout]
    if precision == "auto":
        precision = compute.training_precision(input_ids.device)
    modules = grid_modules(model)
    for p in model.parameters():
        p.requires_grad_(False)
    tunings = {id(m): tuning_of(grid_of(m), m.weight.dtype).to(m.weight.device) for m in modules}
    # A tied embedding shares lm_head's weight: it reads lm_head's tuned values too.
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    shared = head is not None and embedding.weight is head.weight and id(head) in tunings
    for module in modules:
        parametrize.register_parametrization(module, "weight", tunings[id(module)], unsafe=True)
    if shared:
        parametrize.register_parametrization(embedding, "weight", tunings[id(head)], unsafe=True)
    deltas = [p for t in tunings.values() for p in t.parameters()]
    teacher = TeacherTargets(teacher, head_inputs)
    try:
        with torch.no_grad():
            kl_before = float(kl_divergence(model, teacher, held))
        if lr is None:
            lr = min(max(RATE_PER_KL * kl_before, RATE_RANGE[0]), RATE_RANGE[1])
        optimizer = torch.optim.Adam(deltas, lr=lr)
        # Cosine decay to 0: large first steps, then settling (the held-out KL rose when a constant rate ran on).
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
        generator = torch.Generator().manual_seed(seed)
        trained = distributed.data_parallel(model)  # torchrun: each rank its share of a batch
        bar = tqdm(range(steps), desc="tuning scales", unit="step", disable=not progress)
        for _ in bar:
            batch = train[torch.randint(len(train), (batch_size,), generator=generator)]
            loss = kl_divergence(trained, teacher, distributed.batch_share(batch), precision)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(kl=f"{loss.item():.4f}")
        with torch.no_grad():
            kl_after = float(kl_divergence(model, teacher, held))
    finally:
        grids = {key: t.tuned_grid() for key, t in tunings.items()}
        if shared:
            parametrize.remove_parametrizations(embedding, "weight", leave_parametrized=False)
        for module in modules:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    kept = kl_after < kl_before
    for module in modules:
        set_grid(module, grids[id(module)] if kept else grid_of(module))
    return ScaleTuningReport(steps, sum(int(d.numel()) for d in deltas), kl_before, kl_after, kept,
                             time.perf_counter() - start, lr, str(precision or torch.float32).removeprefix("torch."),
                             len(train))
