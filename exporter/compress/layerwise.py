"""The LM loss's gradient carried back through the decoder one layer at a time (sequential onloading).

A backward pass through the whole model needs every layer's weights, and autograd keeps every layer's
activations, at once. Here each sequence's inputs to every layer are kept from one forward pass (a layer on
the compute device at a time); the head (final norm, lm_head, the model's own loss) gives dL/d(last hidden
state); then, from the last layer down, each layer is moved to the device, re-run on its kept input and
back-propagated, which gives the gradient of its input (the next layer's output gradient) and whatever its
parameters, gates or hooks collect. The result is the chain rule of the whole-model backward, so the Fisher
scores and output sensitivities it feeds are those of one backward pass per sequence (tests check them
against it), at one extra forward per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from exporter.compress import compute
from exporter.compress.grams import capture_layer_inputs, layer_forwards, run_layer
from exporter.source.model import decoder_layers

# (layer index, the model's layer) -> a context holding the module to run for that layer, on the device
OpenLayer = Callable[[int, torch.nn.Module], AbstractContextManager]


def _layers_return(model, hidden: torch.Tensor, as_tuple: bool):
    """Every decoder layer's forward replaced by one that returns `hidden`: the model's forward then runs only
    what lies outside its layers (final norm, head, logit soft-capping, loss) on it, as its architecture defines."""
    def passthrough(*_args, **_kwargs):
        return (hidden,) if as_tuple else hidden

    return layer_forwards(model, lambda _index: passthrough)


def drawn_labels(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Labels (as `labels=` takes them, shifted by the model) whose next tokens are drawn from the model's own
    distributions `logits` (1 x tokens x vocabulary), seeded by the sequence's ids: the same draw on every process
    and device."""
    ids = input_ids[0].cpu()
    seed = int((ids.long() * torch.arange(1, ids.numel() + 1)).sum()) % (2**31)
    probabilities = torch.softmax(logits[0, :-1].detach().double().cpu(), dim=-1)
    drawn = torch.multinomial(probabilities, 1, generator=torch.Generator().manual_seed(seed))[:, 0]
    return torch.cat([ids[:1], drawn]).unsqueeze(0).to(input_ids.device)


def _head_gradient(model, input_ids: torch.Tensor, hidden: torch.Tensor, as_tuple: bool,
                   drawn: bool = False) -> torch.Tensor:
    """dL/d(last layer's output) of the model's own loss on `input_ids`; with `drawn`, of the loss on next tokens
    drawn from the model (drawn_labels): squared, the Fisher whose quadratic form the KL is to second order."""
    leaf = hidden.detach().requires_grad_(True)
    with _layers_return(model, leaf, as_tuple):
        if drawn:  # one head pass: the draw reads the logits the loss differentiates (the model's own loss form)
            logits = model(input_ids, use_cache=False).logits.float()
            drawn_ids = drawn_labels(logits, input_ids)[0, 1:]
            torch.nn.functional.cross_entropy(logits[0, :-1], drawn_ids).backward()
        else:
            model(input_ids, labels=input_ids, use_cache=False).loss.backward()
    return leaf.grad


def _forward_layers(model, states: list, device: torch.device, keep: bool) -> tuple[list, bool]:
    """Run `states` ([(first layer's input, [kwargs per layer])]) through every layer, one on `device` at a time:
    (every layer's inputs and the last one's outputs when `keep`, else the last outputs alone; whether layers
    return tuples)."""
    inputs = [[hidden for hidden, _ in states]]
    as_tuple = False
    for index, layer in enumerate(decoder_layers(model)):
        with compute.onloaded(layer, device), torch.no_grad():
            outputs = []
            for hidden, (_, layer_kwargs) in zip(inputs[-1], states):
                out = layer(hidden, **layer_kwargs[index])
                as_tuple = isinstance(out, tuple)
                outputs.append(out[0] if as_tuple else out)
        inputs = [*inputs, outputs] if keep else [outputs]
    return inputs, as_tuple


def head_inputs(model, input_ids: torch.Tensor, batch_size: int, hook: Callable[[torch.Tensor], None],
                last_outputs: list | None = None) -> None:
    """`hook(x)` on every batch's input to the output head (the final norm's output), computed on the compute
    device one decoder layer there at a time (no whole-model forward); from `last_outputs` where given (each
    batch's output of the last layer and whether layers return tuples, as exporter.compress.grams.
    iter_layer_grams keeps them), without running the layers."""
    device = compute.current()
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _module, args: hook(args[0].detach()))
    try:
        with compute.outside_layers(model, device):
            if last_outputs is None:
                states = capture_layer_inputs(model, input_ids, batch_size, device)
                (last,), as_tuple = _forward_layers(model, states, device, keep=False)
                last_outputs = [(hidden, as_tuple) for hidden in last]
            for begin, (hidden, as_tuple) in zip(range(0, input_ids.shape[0], batch_size), last_outputs, strict=True):
                with _layers_return(model, hidden, as_tuple), torch.no_grad():
                    model(input_ids[begin : begin + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()


def backward_layerwise(model, input_ids: torch.Tensor, open_layer: OpenLayer,
                       after_sequence: Callable[[int, int], None] | None = None,
                       drawn: bool = False) -> list[torch.Tensor]:
    """Back-propagate each sequence's LM loss (`input_ids`: sequences x tokens, one backward each) through the
    decoder on the compute device, one layer there at a time. For layer i (last first), the module that
    `open_layer(i, layer)` yields is run with autograd on each sequence's kept input; `after_sequence(i, s)` is
    called after sequence s's backward through it (read and clear gradients there). The model's parameters do not
    require gradients for the pass. Returns dL/d(first layer's input) of each sequence (the embedding's output).
    `drawn`: the loss on next tokens drawn from the model instead of the sequence's own (drawn_labels)."""
    device = compute.current()
    layers = decoder_layers(model)
    parameters = list(model.parameters())
    flags = [p.requires_grad for p in parameters]
    for p in parameters:
        p.requires_grad_(False)
    try:
        with compute.outside_layers(model, device):
            states = capture_layer_inputs(model, input_ids, 1, device)
            kwargs = [layer_kwargs for _, layer_kwargs in states]
            inputs, as_tuple = _forward_layers(model, states, device, keep=True)
            grads = [_head_gradient(model, input_ids[s : s + 1].to(device), inputs[-1][s], as_tuple, drawn)
                     for s in range(len(input_ids))]
        for index in reversed(range(len(layers))):
            inputs.pop()  # the outputs of this layer: no longer needed
            with open_layer(index, layers[index]) as module:
                for s, layer_kwargs in enumerate(kwargs):
                    x = inputs[index][s].detach().requires_grad_(True)
                    out = run_layer(module, x, layer_kwargs[index])
                    torch.autograd.backward(out, grads[s])
                    grads[s] = x.grad
                    if after_sequence is not None:
                        after_sequence(index, s)
    finally:
        for p, flag in zip(parameters, flags):
            p.requires_grad_(flag)
    return grads
