"""The chosen grids refitted in sequence, on the inputs the quantized model itself gives each layer.

`--weights auto` prices every option on the dense model's Grams (exporter.compress.format_allocation), so each
unit's grid minimizes ||(W - Q) X|| with X the dense model's inputs. Once the layers before it are quantized, a
unit sees other inputs, X_s, while the output it should give is still the dense one, W X. This pass goes through
the decoder layer by layer (llm-compressor's sequential pipeline) and refits each unit's chosen option to

    min_Q || (W X - Q X_s) diag(w)^(1/2) ||     (w: the unit's position weights, as its Gram has them)

which is the chosen option's own computation (GPTQ, or the low-rank factorization and its GPTQ) on the weight
W' = W + (X_s^T D X_t - G_s) W^T ... written out: W'^T = W^T + (G_s + damping)^-1 X_s^T D (X_t - X_s) W^T, and
the student's Gram G_s = X_s^T D X_s (D = diag(w)). Where the inputs agree (layer 0) W' = W and nothing changes;
the damping (GPTQ's, 1% of the mean diagonal) keeps W' near W where the calibration says little. (GPTAQ, arXiv
2504.02692, derives the same asymmetric target for GPTQ.) Each layer is then put on its grids, and its outputs
on the student's inputs become the next layer's student inputs. lm_head keeps its priced grid: a tied one is also
the embedding, which every layer's inputs already read on its grid.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from exporter.compress import compute
from exporter.compress.gptq import DAMPING
from exporter.compress.grams import capture_layer_inputs, run_layer
from exporter.compress.quantize import head_gram
from exporter.source.model import decoder_layers, layers_prefix


def _inputs(layer, prefix: str, states, index: int) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
    """Each batch's input of every nn.Linear of `layer` ({qualified name: [batch, tokens, in]}) and its outputs."""
    recorded, outputs, handles, current = [], [], [], {}
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            def grab(_m, args, name=f"{prefix}.{index}.{name}"):
                current[name] = args[0].detach()
            handles.append(module.register_forward_pre_hook(grab))
    try:
        with torch.no_grad():
            for hidden, kwargs in states:
                current = {}
                outputs.append(run_layer(layer, hidden, kwargs[index]))
                recorded.append(current)
    finally:
        for handle in handles:
            handle.remove()
    return recorded, outputs


def refit_weights(names: list[str], student_inputs: list[dict], teacher_inputs: list[dict], weights: dict,
                  position_weights: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """({name: W'}, {name: G_s}) of the named linears (see the module doc), float64."""
    refit, grams = {}, {}
    for name in names:
        w = weights[name].detach().double()
        gram = cross = None
        for xs_by, xt_by in zip(student_inputs, teacher_inputs):
            xs, xt = xs_by[name], xt_by[name]
            pw = position_weights.get(name)
            weighted = xs if pw is None else xs * pw[: xs.shape[-2]].to(xs.device, xs.dtype)[:, None]
            weighted = weighted.reshape(-1, xs.shape[-1]).float()  # float32 per batch, float64 across (as Grams)
            g = (weighted.T @ xs.reshape(-1, xs.shape[-1]).float()).double()
            c = (weighted.T @ (xt - xs).reshape(-1, xs.shape[-1]).float()).double()
            gram = g if gram is None else gram + g
            cross = c if cross is None else cross + c
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        damped = gram + DAMPING * gram.diagonal().mean() * eye
        refit[name] = (w.T + torch.linalg.solve(damped, cross @ w.T)).T
        grams[name] = gram
    return refit, grams


def refit_sequentially(model, teacher, units: list, input_ids: torch.Tensor, position_weights: dict, fisher: dict,
                       tokens: int, option_grids, apply, batch_size: int = 4, progress: bool = True) -> dict:
    """Refit and apply the chosen grids of `units` (exporter.compress.format_allocation.Unit, chosen; their decoder
    members still dense in `model`) layer by layer; `teacher`: the dense model. `option_grids(statistics, unit,
    option)` computes an option's grids and `apply(model, units)` installs them (format_allocation's). Units
    outside the decoder layers are applied as priced, first (their grids computed here where the prices came
    without them). Returns the manifest's summary: how many units were refitted and the relative error of each
    layer's hidden states against the dense model's on the calibration windows."""
    from tqdm.auto import tqdm

    prefix = layers_prefix(model)
    by_layer: dict[int, list] = {}
    outside = []
    for unit in units:
        name = unit.members[0]
        if name.startswith(prefix + "."):
            by_layer.setdefault(int(name[len(prefix) + 1:].split(".", 1)[0]), []).append(unit)
        else:
            outside.append(unit)
    missing = [unit for unit in outside if unit.grids[unit.choice] is None]  # prices read from the store
    if missing:
        linears = {n: model.get_submodule(n) for unit in missing for n in unit.members}
        grams = {n: head_gram(model, input_ids) for n in linears}  # the dense head's input, as priced
        statistics = SimpleNamespace(linears=linears, grams=grams, fisher=fisher, tokens=tokens)
        for unit in missing:
            unit.grids[unit.choice] = option_grids(statistics, unit, unit.choice)
    apply(model, outside)  # lm_head (and a tied embedding with it): what the layers' inputs read from now on
    device = compute.current()
    student_states = capture_layer_inputs(model, input_ids, batch_size, device)
    teacher_states = capture_layer_inputs(teacher, input_ids, batch_size, device)
    s_layers, t_layers = decoder_layers(model), decoder_layers(teacher)
    errors = []
    for index in tqdm(range(len(s_layers)), desc="refitting grids", unit="layer", disable=not progress):
        chosen = by_layer.get(index, [])
        with compute.onloaded(t_layers[index], device):
            teacher_inputs, teacher_outputs = _inputs(t_layers[index], prefix, teacher_states, index)
        with compute.onloaded(s_layers[index], device):
            student_inputs, _ = _inputs(s_layers[index], prefix, student_states, index)
        if chosen:
            names = [n for unit in chosen for n in unit.members]
            linears = {n: model.get_submodule(n) for n in names}
            refit, grams = refit_weights(names, student_inputs, teacher_inputs,
                                         {n: m.weight for n, m in linears.items()}, position_weights)
            statistics = SimpleNamespace(
                linears={n: SimpleNamespace(weight=refit[n].to(linears[n].weight.dtype),
                                            in_features=linears[n].in_features, out_features=linears[n].out_features)
                         for n in names},
                grams=grams, fisher=fisher, tokens=tokens)
            for unit in chosen:
                unit.grids[unit.choice] = option_grids(statistics, unit, unit.choice)
            apply(model, chosen)
        del student_inputs, teacher_inputs
        with compute.onloaded(s_layers[index], device), torch.no_grad():
            student_states = [(run_layer(s_layers[index], hidden, kwargs[index]), kwargs)
                              for hidden, kwargs in student_states]
        teacher_states = [(out, kwargs) for out, (_, kwargs) in zip(teacher_outputs, teacher_states)]
        num = sum(float((s - t).pow(2).sum()) for (s, _), (t, _) in zip(student_states, teacher_states))
        errors.append((num / max(sum(float(t.pow(2).sum()) for t, _ in teacher_states), 1e-30)) ** 0.5)
    return {"units": sum(len(u) for u in by_layer.values()), "hidden_error": [round(e, 5) for e in errors]}
