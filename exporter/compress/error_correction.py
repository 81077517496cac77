"""Whitened correction of the quantization error (LQER, arXiv 2402.02446; QERA, arXiv 2410.06040).

After a projection's weight W is put on a grid Q, a rank-k branch L R is added beside it: y = Q x + L (R x).
The rank-k L R minimizing ||(W - Q - L R) X|| on the calibration inputs is the whitened SVD
(exporter.compress.lowrank.decompose, the one FLRC factorizes with) of the error W - Q under the input
Gram X^T X. The projections of one input group (q/k/v; gate/up: `decoder_projections(joint=True)`) share
one R, their errors stacked along out, so the graph writes it as a joint factorization: R's rows join the
group's fused first-stage MatMulNBits, then one MatMul by the stacked L^T and a Split (docs/quantization.md).

R goes on its group's grid (it is more rows of the same MatMulNBits), by GPTQ on the group's Gram; L is then
refit to the quantized R in closed form (least squares in the whitened metric) and put on `up_format`, the
rank being its K. The Grams weight positions by output sensitivity as GPTQ's do
(exporter.compress.importance.position_weights); a group's Gram is its members' mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from exporter.compress.factorize import decoder_projections, replace_module, unit_members
from exporter.compress.gptq import gptq
from exporter.compress.grams import iter_layer_grams
from exporter.compress.grid import GridWeights, QuantFormat
from exporter.compress.lowrank import CorrectedLinear, decompose, whitening_factor
from exporter.compress.quantize import grid_linears, grid_of, set_grid

CORRECTION_FORMAT = QuantFormat(8, 16, True)  # the up factor L: its K is the rank (a multiple of 16)


def correction_factors(error: torch.Tensor, gram: torch.Tensor, rank: int, fmt: QuantFormat | None = None,
                       channels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, GridWeights | None]:
    """(down R: rank x in, up L: out x rank, R's grid or None) with L R the best rank-`rank` fit of `error`
    (out x in) on inputs of Gram `gram`; `fmt`: R put on that grid (GPTQ; R returned dequantized) and L refit
    to it. `channels` (out, positive): fit sum_i channels_i ||(E - L R)_i S||^2 instead, the output channels
    weighted by their Fisher (the loss estimate --weights auto prices with), by the SVD of diag(c)^1/2 E S."""
    scale = None if channels is None else channels.double().clamp_min(1e-12).sqrt()
    dec = decompose(error if scale is None else error.double() * scale[:, None], gram, max_rank=rank)
    down, up, grid = dec.down.double(), dec.up.double(), None
    if scale is not None:
        up = up / scale[:, None]
    if fmt is not None:
        grid = gptq(down.float(), gram, fmt)
        down = torch.from_numpy(grid.dequantize()).double()
        # L = E G R^T (R G R^T)^-1: the least-squares up factor for the quantized R (whitened metric).
        g = gram.double()
        lhs = down @ g @ down.T
        lhs += torch.eye(rank, dtype=lhs.dtype) * lhs.diagonal().mean().clamp_min(1e-30) * 1e-8
        up = torch.linalg.solve(lhs, (error.double() @ g @ down.T).T).T
    return down.to(error.dtype), up.to(error.dtype), grid


def whitened_error(weight: torch.Tensor, approximation: torch.Tensor, gram: torch.Tensor,
                   channels: torch.Tensor | None = None) -> float:
    """||(W - A) S||_F^2 with S S^T = gram: the output error on the calibration inputs (`channels`: each output
    channel's squared error weighted by it)."""
    rows = ((weight.double() - approximation.double()) @ whitening_factor(gram)).square().sum(dim=1)
    return float(rows.sum() if channels is None else (rows * channels.double()).sum())


def quantize_with_correction(model, input_ids: torch.Tensor, format_of: Callable[[str], QuantFormat | None],
                             rank_of: Callable[[str], int], up_format: QuantFormat, fisher_samples: int = 8,
                             progress: bool = True, fisher_channels: bool = False) -> dict[str, dict]:
    """GPTQ grids for the decoder layers' linears (`format_of(name)`; None: leave it float) and, for every
    input group whose `rank_of(first member)` is positive, a whitened correction branch of that rank
    (CorrectedLinear around each member, one R shared by the group, all on grids). lm_head is left for
    `quantize_model`. Returns {group's first member: {"rank", "error_before", "error_after"}} (whitened
    output errors of the group, after quantization and after the correction, both on grids).
    `fisher_channels`: each output channel's error weighted by its Fisher (`correction_factors`), and the
    errors reported so weighted."""
    from exporter.compress.importance import output_sensitivity, position_weights

    linears = grid_linears(model)
    groups = [unit_members(p.name) for p in decoder_projections(model, joint=True)]
    todo = {name: fmt for members in groups for name in members
            if grid_of(linears[name]) is None and (fmt := format_of(name)) is not None}
    if not todo:
        return {}
    sensitivity = output_sensitivity(model, input_ids[:fisher_samples], list(todo), progress)
    weights = position_weights(sensitivity)
    channels = {n: s.channels / s.channels.mean().clamp_min(1e-30) for n, s in sensitivity.items()} \
        if fisher_channels else None
    group_of = {members[0]: members for members in groups}
    report = {}
    for _index, _layer, grams in iter_layer_grams(model, input_ids, progress=progress, position_weights=weights):
        with torch.no_grad():
            report.update(_correct_layer(model, linears, grams, group_of, todo, rank_of, up_format, channels))
    return report


def group_correction(errors: dict[str, torch.Tensor], grams: dict[str, torch.Tensor], rank: int, fmt: QuantFormat,
                     up_format: QuantFormat = CORRECTION_FORMAT, channels: torch.Tensor | None = None
                     ) -> tuple[GridWeights, dict[str, GridWeights]]:
    """One input group's correction of its members' quantization errors (out x in each): (R's grid at `fmt`,
    {member: its L's grid at `up_format`}). R from the stacked errors under the members' mean Gram
    (`correction_factors`); each L by GPTQ on its input's Gram R G R^T."""
    members = list(errors)
    gram = sum(grams[m].double() for m in members) / len(members)
    down, up, down_grid = correction_factors(torch.cat([errors[m] for m in members]), gram, rank, fmt, channels)
    ups, row = {}, 0
    for m in members:
        out = errors[m].shape[0]
        part = up[row : row + out].float()
        row += out
        ups[m] = gptq(part, down.double() @ grams[m].double() @ down.double().T, up_format)
    return down_grid, ups


def install_correction(model, linears: dict, members: list[str], down_grid: GridWeights,
                       up_grids: dict[str, GridWeights]) -> None:
    """Each member (its linear on its grid) wrapped in a CorrectedLinear holding the group's one R module and
    its own L, both on their grids, as a joint unit shares its down factor."""
    shared = None
    for m in members:
        corrected = CorrectedLinear(linears[m], down_grid.codes.shape[0])
        if shared is None:
            set_grid(corrected.corrective_down, down_grid)
            shared = corrected.corrective_down
        corrected.corrective_down = shared
        set_grid(corrected.corrective_up, up_grids[m])
        replace_module(model, m, corrected)


def _correct_layer(model, linears, grams, group_of, todo, rank_of, up_format, channels) -> dict[str, dict]:
    """One decoder layer of quantize_with_correction (its Grams `grams`)."""
    report = {}
    for first in [n for n in grams if n in group_of]:
        members = [m for m in group_of[first] if m in todo]
        if not members:
            continue
        originals = {m: linears[m].weight.detach().clone() for m in members}
        for m in members:
            set_grid(linears[m], gptq(originals[m], grams[m], todo[m]))
        rank = rank_of(first)
        if rank <= 0 or len({todo[m] for m in members}) != 1:  # one R serves one MatMulNBits format
            continue
        gram = sum(grams[m].double() for m in members) / len(members)
        weight = torch.cat([originals[m] for m in members])
        quantized = torch.cat([linears[m].weight.detach() for m in members])
        weighted = None if channels is None else torch.cat([channels[m] for m in members])
        errors = {m: originals[m] - linears[m].weight.detach() for m in members}
        down_grid, up_grids = group_correction(errors, grams, rank, todo[members[0]], up_format, weighted)
        install_correction(model, linears, members, down_grid, up_grids)
        after = torch.cat([model.get_submodule(m).base.weight + model.get_submodule(m).corrective_up.weight
                           @ model.get_submodule(m).corrective_down.weight for m in members])
        report[first] = {"rank": rank, "error_before": whitened_error(weight, quantized, gram, weighted),
                         "error_after": whitened_error(weight, after, gram, weighted)}
    return report
