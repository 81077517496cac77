"""Calibration statistics collected one decoder layer at a time (bounded memory).

The model's embedding runs once to capture the inputs of the first decoder layer (with whatever
keyword arguments the architecture passes: rotary embeddings, masks); then every layer runs on the
stored hidden states of all calibration samples, with hooks on its nn.Linear modules accumulating
the Gram matrix X^T X of their inputs. Only one layer's activations are alive at a time, as in
llm-compressor's sequential pipeline, so 1B-class models fit in a few GB. Both run on the compute
device (exporter.compress.compute), one layer's weights moved there at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from exporter.compress import compute, distributed
from exporter.source.model import decoder_layers, layers_prefix


class _StopForward(Exception):
    pass


@contextmanager
def layer_forwards(model, forward_of):
    """Every decoder layer's forward replaced by `forward_of(index)` for the block: an instance attribute, which
    nn.Module.__call__ runs, hooks and all; a wrapper already set on the instance (accelerate's) is put back."""
    layers = decoder_layers(model)
    own = [layer.__dict__.get("forward") for layer in layers]
    for index, layer in enumerate(layers):
        layer.forward = forward_of(index)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def capture_layer_inputs(model, input_ids: torch.Tensor, batch_size: int, device: torch.device | None = None):
    """[(hidden states entering decoder layer 0, [keyword arguments of layer 0, 1, ...])], one entry per batch,
    on `device` (default: the compute device; the model's tensors outside its layers are moved there for the pass).

    Each layer keeps its own keyword arguments: models that interleave sliding-window and global attention
    (Gemma 3, Qwen 2/3 with layer_types) give each layer type its own mask and rotary tables. Every layer's
    forward is replaced by a recorder for the pass, so it costs the embedding and no layer compute."""
    layers = decoder_layers(model)
    captured, current = [], {}

    def recorder(index):
        def record(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            if index == 0:
                current["hidden"] = hidden.detach()
            current.setdefault("kwargs", []).append(kwargs)
            if index == len(layers) - 1:
                raise _StopForward
            # kwargs are computed before the layer loop, so what later recorders receive does not change them;
            # a one-tuple survives both loops: those that pass a layer's output on (Llama: the next recorder
            # ignores it) and those that take its [0] (Gemma 3: a bare tensor lost a dimension per layer and
            # failed at the fifth, on the real 18-layer checkpoint)
            return (hidden,)
        return record

    device = torch.device(device or compute.current())
    with layer_forwards(model, recorder), compute.outside_layers(model, device):
        for begin in range(0, input_ids.shape[0], batch_size):
            current.clear()
            try:
                with torch.no_grad():
                    model(input_ids[begin : begin + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
            captured.append((current["hidden"], current["kwargs"]))
    return captured


def run_layer(layer, hidden: torch.Tensor, kwargs) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def iter_layer_grams(model, input_ids: torch.Tensor, batch_size: int = 4, progress: bool = True,
                     position_weights: dict[str, torch.Tensor] | None = None, last_outputs: list | None = None
                     ) -> Iterator[tuple[int, nn.Module, dict[str, torch.Tensor]]]:
    """Yield (index, layer, {qualified linear name: X^T X}) for every decoder layer, in order.

    Linears that read the same tensor (q/k/v; gate/up) share one Gram matrix object: it is
    accumulated once. Statistics come from the original (dense) activations, so they can be
    reused for any rank choice. Accumulation is float32 per batch and float64 across batches.
    `position_weights` {name: weight per position}: that linear's Gram weights each token by its
    position's weight, X^T diag(w) X (exporter.compress.importance.output_sensitivity: the first
    tokens' keys and values, which every later token attends to, weigh hundreds of times more).
    Computed on the compute device (exporter.compress.compute), the layer moved there for its pass; the layer
    is back on the host, and the Grams there, when yielded. `last_outputs`: a list that receives, with the last
    layer's Grams, each batch's output of that layer and whether the layers return tuples (what the model's head
    needs to run on, exporter.compress.layerwise.head_inputs, without the layers again).
    """
    weighted = position_weights or {}
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    prefix = layers_prefix(model)
    device = compute.current()
    # data-parallel (exporter.compress.distributed): this rank's windows; the Grams are summed over ranks
    states = capture_layer_inputs(model, distributed.shard(input_ids), batch_size, device)
    for index in tqdm(range(len(layers)), desc="calibration statistics", unit="layer", disable=not progress):
        layer = layers[index]
        batch_grams: dict[str, torch.Tensor] = {}
        by_input: dict[tuple, torch.Tensor] = {}

        def hook(name):
            def accumulate(_module, args):
                x = args[0].detach()
                if name in weighted:
                    w = weighted[name][: x.shape[-2]].to(x.device, x.dtype)
                    batch_grams[name] = (x * w[:, None]).reshape(-1, x.shape[-1]).float().T @ \
                        x.reshape(-1, x.shape[-1]).float()
                    return
                key = (x.data_ptr(), tuple(x.shape))
                if key not in by_input:
                    flat = x.reshape(-1, x.shape[-1]).float()
                    # Holding x keeps its memory from being reused by a later input with
                    # the same address and shape within this forward pass.
                    by_input[key] = (x, flat.T @ flat)
                batch_grams[name] = by_input[key][1]
            return accumulate

        handles = [
            module.register_forward_pre_hook(hook(f"{prefix}.{index}.{name}"))
            for name, module in layer.named_modules() if isinstance(module, nn.Linear)
        ]
        totals: dict[str, torch.Tensor] = {}  # shared inputs map to one float64 tensor
        try:
            with compute.onloaded(layer, device):
                for b, (hidden, kwargs) in enumerate(states):
                    batch_grams.clear()
                    by_input.clear()
                    with torch.no_grad():
                        out = layer(hidden, **kwargs[index])
                    as_tuple = isinstance(out, tuple)
                    states[b] = (out[0] if as_tuple else out, kwargs)
                    added: dict[int, torch.Tensor] = {}
                    for name, gram in batch_grams.items():
                        if id(gram) not in added:
                            total = totals.get(name)
                            if total is None:
                                total = torch.zeros(gram.shape, dtype=torch.float64, device=device)
                            added[id(gram)] = total.add_(gram.double())
                        totals[name] = added[id(gram)]
        finally:
            for handle in handles:
                handle.remove()
        distributed.sum_over_ranks(totals.values())
        on_host: dict[int, torch.Tensor] = {}  # shared Grams stay shared
        for gram in totals.values():
            if id(gram) not in on_host:
                on_host[id(gram)] = gram.cpu()
        if last_outputs is not None and index == len(layers) - 1:
            last_outputs.extend((hidden, as_tuple) for hidden, _ in states)
        yield index, layer, {name: on_host[id(gram)] for name, gram in totals.items()}
