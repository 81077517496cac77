"""Quantize a PyTorch model's linears onto block grids, in place, before the graph is written.

Every nn.Linear the graph stores as MatMulNBits (decoder projections, low-rank factors, corrective
branches, lm_head) gets a grid (exporter.compress.grid): GPTQ on the Gram of its own input where
calibration ids are given (one pass over the decoder layers, exporter.compress.grams; lm_head's Gram from
one forward pass), round-to-nearest otherwise (the data-free fallback). The module keeps the dequantized
weights, so every later check in PyTorch sees what the graph computes, and `weight_grid`, from which
the graph writer packs the very same codes (exporter.graph.matmul_nbits). A module that already holds a
grid (quantization-aware corrective training) keeps it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from exporter.compress import compute, distributed
from exporter.compress.gptq import gptq
from exporter.compress.grams import iter_layer_grams
from exporter.compress.grid import GridWeights, QuantFormat, round_to_nearest
from exporter.compress.layerwise import head_inputs
from exporter.source.model import decoder_layers, layers_prefix

METHODS = ("gptq", "rtn")
GRID_ATTRIBUTE = "weight_grid"


def set_grid(module: nn.Linear, grid: GridWeights) -> None:
    """Hold `grid`'s dequantized weights (tied weights change with it) and the grid itself."""
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(grid.dequantize()).to(module.weight.dtype))
    setattr(module, GRID_ATTRIBUTE, grid)


def grid_of(module: nn.Module) -> GridWeights | None:
    return getattr(module, GRID_ATTRIBUTE, None)


def model_grids(model) -> dict[str, GridWeights]:
    """{module name: a copy of its grid} of every module on a grid (the linears, an untied embedding)."""
    return {name: copy.deepcopy(grid) for name, module in model.named_modules()
            if (grid := grid_of(module)) is not None}


def restore_grids(model, grids: dict[str, GridWeights]) -> None:
    """Put `model_grids`' copies back on a model of the same structure whose weights already hold them (its
    state_dict loaded): the grids alone, as copies (scale tuning trains a grid in place)."""
    for name, grid in grids.items():
        setattr(model.get_submodule(name), GRID_ATTRIBUTE, copy.deepcopy(grid))


def quantize_rtn(modules: list[nn.Linear], fmt: QuantFormat, clip: bool = False) -> None:
    """Round-to-nearest grids for `modules` (each once)."""
    for module in {id(m): m for m in modules}.values():
        set_grid(module, round_to_nearest(module.weight.detach().float().numpy(), fmt, clip))


def embedding_format(block_size: int, bits: int = 4) -> QuantFormat:
    """The grid of an untied embedding in an int4 (int8) graph: 4-bit (8-bit) symmetric blocks of `block_size`
    along hidden."""
    return QuantFormat(bits, block_size, True)


def quantize_embedding(model, block_size: int, bits: int = 4) -> None:
    """An untied input embedding on its round-to-nearest grid (embedding_format), once: the int4 (int8) graph
    stores it as blocks of `bits` (exporter.graph.writer), so PyTorch holds the same values. A tied one follows
    lm_head's grid."""
    fmt = embedding_format(block_size, bits)
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if (head is not None and head.weight is embedding.weight) or grid_of(embedding) is not None \
            or embedding.weight.shape[1] % fmt.block_size:
        return
    set_grid(embedding, round_to_nearest(embedding.weight.detach().float().numpy(), fmt))


def grid_linears(model) -> dict[str, nn.Linear]:
    """{qualified name: module} of the linears the graph writes as MatMulNBits: the decoder layers' and lm_head."""
    prefix = layers_prefix(model)
    found = {f"{prefix}.{i}.{name}": module for i, layer in enumerate(decoder_layers(model))
             for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        found[module_name(model, head)] = head
    return found


def module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


@torch.no_grad()
def head_gram(model, input_ids: torch.Tensor, batch_size: int = 4, last_outputs: list | None = None) -> torch.Tensor:
    """X^T X of lm_head's input (the final norm's output) over `input_ids` (float64), on the compute device;
    from the last layer's outputs where a Gram pass kept them (`last_outputs`, grams.iter_layer_grams)."""
    head = model.get_output_embeddings()
    total = torch.zeros(head.in_features, head.in_features, dtype=torch.float64, device=compute.current())

    def accumulate(x):
        flat = x.reshape(-1, head.in_features).float()
        total.add_((flat.T @ flat).double())

    head_inputs(model, distributed.shard(input_ids), batch_size, accumulate, last_outputs)
    distributed.sum_over_ranks([total])
    return total.cpu()


def quantize_model(model, format_of: Callable[[str], QuantFormat | None], input_ids: torch.Tensor | None = None,
                   method: str = "gptq", clip: bool = False, head_method: str = "rtn", fisher_samples: int = 8,
                   progress: bool = True) -> dict[str, QuantFormat]:
    """Put every grid linear without a grid (`grid_linears`) on the grid `format_of(name)` (None: leave it
    float); returns {name: format} of those quantized here. `method`: gptq (needs `input_ids`; each linear's
    Gram weights positions by its output sensitivity over the first `fisher_samples` sequences,
    exporter.compress.importance) or rtn; `head_method` for lm_head (rtn by default: with tied embeddings its
    rows are also the embedding's, which GPTQ's output-error objective does not see). `clip`: the grids'
    clipping search (off: measured worse on SmolLM2-135M)."""
    from tqdm.auto import tqdm

    from exporter.compress.importance import output_sensitivity, position_weights

    if method not in METHODS or head_method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}/{head_method!r}; expected one of {METHODS}")
    if input_ids is None:
        method = head_method = "rtn"
    linears = grid_linears(model)
    todo = {name: fmt for name, module in linears.items()
            if grid_of(module) is None and (fmt := format_of(name)) is not None}
    head_name = module_name(model, model.get_output_embeddings())
    if not todo:
        return todo
    if method == "gptq" and any(name != head_name for name in todo):
        names = [n for n in todo if n != head_name]
        weights = position_weights(output_sensitivity(model, input_ids[:fisher_samples], names, progress))
        for _index, _layer, grams in iter_layer_grams(model, input_ids, progress=progress, position_weights=weights):
            mine, merge = distributed.split_work([n for n in grams if n in todo])  # data-parallel: one rank each
            grids = merge({name: gptq(linears[name].weight, grams[name], todo[name], clip) for name in mine})
            for name, grid in grids.items():
                set_grid(linears[name], grid)
    else:
        for name in tqdm([n for n in todo if n != head_name], desc="quantizing", unit="linear",
                         disable=not progress):
            quantize_rtn([linears[name]], todo[name], clip)
    if head_name in todo:
        head = linears[head_name]
        if head_method == "gptq":
            set_grid(head, gptq(head.weight, head_gram(model, input_ids), todo[head_name], clip))
        else:
            quantize_rtn([head], todo[head_name], clip)
    return todo
