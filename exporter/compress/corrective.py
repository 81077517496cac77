"""CALR corrective branches: attach them beside the factorized projections and train them.

A branch fitted to its own layer's weight residual on the original inputs is no better than whitened
SVD at rank r + r_c (that is already the best rank-(r + r_c) fit). Correctives pay off when they learn
the *functional* residual, so training is:

1. block by block (sequential, as llm-compressor calibrates): decoder block i of the compressed model
   runs on the hidden states produced by the already-corrected blocks 0..i-1, and its correctives are
   fitted so its output matches the original block's output on the original hidden states. Each block
   thus corrects the error it inherits as well as its own. Only one block's activations (original
   inputs, their original outputs, compressed inputs) are alive at a time.
2. optionally end to end: KL divergence between the original and the compressed next-token
   distributions on calibration text.

The primary factors stay frozen unless `tune_factors` is set.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from exporter.compress import compute, distributed
from exporter.compress.factorize import Projection, install_unit, unit_name
from exporter.compress.grams import capture_layer_inputs, run_layer
from exporter.compress.lowrank import CorrectedLinear, Decomposition, LowRankLinear, join_rows
from exporter.errors import ExporterError
from exporter.settings import CorrectiveOptions
from exporter.source.model import decoder_layers


@dataclass
class CorrectiveReport:
    """Held-out relative error of every block's output before and after training, and timings."""

    block_error_before: list[float] = field(default_factory=list)
    block_error_after: list[float] = field(default_factory=list)
    blocks_reset: list[int] = field(default_factory=list)  # blocks whose fit raised the held-out error
    kl_before: float | None = None
    kl_after: float | None = None
    seconds: float = 0.0
    warm_start: tuple[int, int] | None = None  # (branches started from another profile's, branches): KL steps only
    warm_steps_undone: bool = False  # those KL steps raised the held-out KL: the branches as they started

    def to_dict(self) -> dict:
        found = {"block_error_before": [round(e, 5) for e in self.block_error_before],
                 "block_error_after": [round(e, 5) for e in self.block_error_after],
                 "blocks_reset": self.blocks_reset,
                 "kl_before": self.kl_before, "kl_after": self.kl_after, "seconds": round(self.seconds, 1)}
        if self.warm_start:
            found["warm_start"] = {"branches": self.warm_start[0], "of": self.warm_start[1],
                                   "steps_undone": self.warm_steps_undone}
        return found


def branch_ranks(projections: list[Projection], ranks: dict[str, int | None], options: CorrectiveOptions,
                 budget_params: int) -> dict[str, int]:
    """r_c of every factorized projection (dense ones get none).

    The configured ranks are rounded up to `rank_multiple` (int4: whole blocks, so that a folded branch
    adds whole blocks to the primary factors instead of a zero-padded half block: measured 0.78 MB of
    padding on SmolLM2 at rank 16, block 32). They shrink in proportion, unrounded, when the branches
    would take more than `max_budget_share` of the projection budget (small models, tight budgets), down to 1.
    """
    multiple = max(1, options.rank_multiple)
    wanted = {p.name: -(-options.rank_by_kind.get(p.kind, options.rank) // multiple) * multiple
              for p in projections if ranks.get(p.name) is not None}
    sizes = {p.name: p.in_features + p.out_features for p in projections}
    cost = sum(r * sizes[name] for name, r in wanted.items())
    limit = options.max_budget_share * budget_params
    scale = min(1.0, limit / cost) if cost else 1.0
    return {name: max(1, int(r * scale)) for name, r in wanted.items()}


def settle_ranks(primary_ranks, projections: list[Projection], options: CorrectiveOptions | None,
                 budget_params: int) -> tuple[dict[str, int | None], dict[str, int]]:
    """Primary ranks and branch ranks that together fit `budget_params`.

    `primary_ranks(params)` allocates the primary path (Fisher or uniform). The branches count in
    the budget, so the primary ranks get what they leave; which projections stay dense (and carry
    no branch) depends on the primary budget, so this settles in a few passes.
    """
    ranks = primary_ranks(budget_params)
    if options is None:
        return ranks, {}
    primary_params = budget_params
    for _ in range(4):
        branches = branch_ranks(projections, ranks, options, budget_params)
        total = sum(p.factor_params(ranks[p.name], branches.get(p.name, 0)) for p in projections)
        if total <= budget_params:
            break
        primary_params -= total - budget_params
        ranks = primary_ranks(primary_params)
    return ranks, branch_ranks(projections, ranks, options, budget_params)


def factorized_units(model) -> dict[str, list[str]]:
    """{unit name: its module names} of the model's LowRankLinears: a joint unit's projections share one
    down factor (exporter.compress.factorize; named `parent.q_proj+k_proj+v_proj`), any other is a unit alone."""
    by_down: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            by_down.setdefault(id(module.down), []).append(name)
    return {unit_name(names): names for names in by_down.values()}


def attach_correctives(model, decompositions: dict[str, Decomposition], ranks: dict[str, int] | int
                       ) -> dict[str, int]:
    """Wrap each factorized unit named in `ranks` (an int: every one) in a CorrectedLinear whose branch of
    that rank outputs zero until trained; a joint unit's projections share the branch's down factor.

    The branch's down factor starts at the next r_c whitened directions after the primary rank (the
    input subspace the truncation dropped first) where the decomposition has them, else random.
    """
    attached = {}
    generator = torch.Generator().manual_seed(0)
    for unit, names in factorized_units(model).items():
        if isinstance(ranks, dict) and unit not in ranks:
            continue
        rank = ranks[unit] if isinstance(ranks, dict) else ranks
        module = join_rows([model.get_submodule(name) for name in names])
        down = decompositions[unit].down
        r = module.rank
        if down.shape[0] >= r + rank:
            init = down[r : r + rank]
        else:  # LoRA's Kaiming-uniform scale
            bound = 1.0 / math.sqrt(module.in_features)
            init = (torch.rand(rank, module.in_features, generator=generator) * 2 - 1) * bound
        install_unit(model, unit, CorrectedLinear(module, rank, init.to(module.down.weight.dtype)))
        attached[unit] = rank
    return attached


def _trainable(module: nn.Module, tune_factors: bool) -> tuple[list, list]:
    branch, factors = {}, {}  # by id: a joint unit's projections share their down factors
    for sub in module.modules():
        if isinstance(sub, CorrectedLinear):
            for p in (sub.corrective_down.weight, sub.corrective_up.weight):
                branch[id(p)] = p
            if tune_factors and isinstance(sub.base, LowRankLinear):
                for p in (sub.base.down.weight, sub.base.up.weight):
                    factors[id(p)] = p
    return list(branch.values()), list(factors.values())


def _optimizer(module: nn.Module, options: CorrectiveOptions, lr: float):
    branch, factors = _trainable(module, options.tune_factors)
    groups = [{"params": branch, "lr": lr}]
    if factors:
        groups.append({"params": factors, "lr": lr * options.factor_lr_scale})
    for p in branch + factors:
        p.requires_grad_(True)
    return torch.optim.Adam(groups), branch + factors


def _relative_error(layer, states, targets) -> float:
    num = den = 0.0
    with torch.no_grad():
        for (hidden, kwargs), target in zip(states, targets):
            out = run_layer(layer, hidden, kwargs)
            num += float((out - target).pow(2).sum())
            den += float(target.pow(2).sum())
    return math.sqrt(num / max(den, 1e-30))


def _linear_inputs(layer, states, names: list[str]) -> tuple[list[dict], list[torch.Tensor]]:
    """Run `layer` on each state, recording the input of each named sub-module ([{name: [tokens, in]}])
    and the layer's outputs."""
    recorded, outputs, handles = [], [], []
    current: dict = {}
    for name in names:
        def grab(_m, args, name=name):
            current[name] = args[0].detach().reshape(-1, args[0].shape[-1])
        handles.append(layer.get_submodule(name).register_forward_pre_hook(grab))
    try:
        with torch.no_grad():
            for hidden, kwargs in states:
                current = {}
                outputs.append(run_layer(layer, hidden, kwargs))
                recorded.append(current)
    finally:
        for handle in handles:
            handle.remove()
    return recorded, outputs


def _solve_block(s_layer, t_layer, student_states, teacher_inputs: list[dict]) -> None:
    """Least-squares branches for every CorrectedLinear of one block.

    For a projection with teacher weight W, student primary path P = U V, and inputs X_t (original
    model) and X_s (compressed model, inheriting upstream error), the branch M (rank r_c) minimises
    ||X_t W^T - X_s P^T - X_s M^T||: a reduced-rank regression, solved exactly by whitening with
    X_s^T X_s = S S^T and truncating the SVD of S^-1 X_s^T (X_t W^T - X_s P^T). One pass of the block
    gives every projection's inputs (the branches of one block are fitted together; projections that
    read the same tensor, q/k/v and gate/up, share their statistics).
    """
    from exporter.compress.lowrank import whitening_factor

    names = [n for n, m in s_layer.named_modules() if isinstance(m, CorrectedLinear)]
    if not names:
        return
    student_inputs, _ = _linear_inputs(s_layer, student_states, names)
    groups: dict[tuple, list[str]] = {}
    for name, x in student_inputs[0].items():
        groups.setdefault((x.data_ptr(), tuple(x.shape)), []).append(name)
    for group in groups.values():
        gram = cross = None
        for xs_by_name, xt_by_name in zip(student_inputs, teacher_inputs):
            xs, xt = xs_by_name[group[0]].float(), xt_by_name[group[0]].float()
            g, c = (xs.T @ xs).double(), (xs.T @ xt).double()
            gram = g if gram is None else gram + g
            cross = c if cross is None else cross + c
        # Ridge damping (1% of the mean input energy, as GPTQ damps its Hessian): without it, input
        # directions the calibration barely excites get huge, ill-conditioned branch weights.
        damped = gram + 0.01 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype,
                                                                   device=gram.device)
        chol = whitening_factor(damped)
        branches: dict[int, list[str]] = {}  # a joint unit's projections share one branch down factor
        for name in group:
            branches.setdefault(id(s_layer.get_submodule(name).corrective_down), []).append(name)
        for names in branches.values():
            modules = [s_layer.get_submodule(name) for name in names]
            teacher_weight = torch.cat([t_layer.get_submodule(name).weight.double() for name in names])  # out x in
            primary = torch.cat([primary_weight(m.base) for m in modules])
            target = cross @ teacher_weight.T - gram @ primary.T  # X_s^T R, in x out (undamped)
            z = torch.linalg.solve_triangular(chol, target, upper=False)  # S^-1 X_s^T R
            u, sigma, vh = torch.linalg.svd(z, full_matrices=False)
            r = modules[0].corrective_rank
            down = torch.linalg.solve_triangular(chol.T, u[:, :r], upper=True).T  # r x in
            up = vh[:r].T * sigma[:r]  # out x r
            scale = (up.norm(dim=0) / down.norm(dim=1).clamp_min(1e-30)).sqrt().clamp_min(1e-30)
            with torch.no_grad():  # balanced, as the primary factors are (stable Adam steps later)
                modules[0].corrective_down.weight.copy_(down * scale.unsqueeze(1))
                start = 0
                for module in modules:
                    module.corrective_up.weight.copy_((up / scale)[start:start + module.out_features])
                    start += module.out_features


def primary_weight(base: nn.Module) -> torch.Tensor:
    """The out x in weight a branch's primary path computes (float64): U V, or a dense base's (quantized) W."""
    if isinstance(base, LowRankLinear):
        return base.up.weight.double() @ base.down.weight.double()
    return base.weight.double()


def _reset_branches(layer) -> None:
    with torch.no_grad():
        for module in layer.modules():
            if isinstance(module, CorrectedLinear):
                module.corrective_up.weight.zero_()


def _holdout(input_ids: torch.Tensor, options: CorrectiveOptions) -> int:
    """Sequences kept out of training: `options.holdout`, at most a quarter of them, at least one."""
    n = input_ids.shape[0]
    if n < 2:
        raise ExporterError(f"corrective training needs at least 2 calibration sequences (got {n}); "
                            "raise --calib-samples or drop --correctives")
    return max(1, min(options.holdout, n // 4))


def train_blockwise(student, teacher, input_ids: torch.Tensor, options: CorrectiveOptions,
                    progress: bool = True, report: CorrectiveReport | None = None) -> CorrectiveReport:
    """Sequential block-wise training of the correctives of `student` against `teacher` (see module doc)."""
    from tqdm.auto import tqdm

    report = report or CorrectiveReport()
    start = time.perf_counter()
    holdout = _holdout(input_ids, options)
    for p in student.parameters():
        p.requires_grad_(False)
    # One sequence per entry, so training batches can be reshuffled; the last `holdout` measure.
    teacher_states = capture_layer_inputs(teacher, input_ids, 1)
    student_hidden = [hidden.clone() for hidden, _ in teacher_states]
    n_train = len(teacher_states) - holdout
    student_layers, teacher_layers = decoder_layers(student), decoder_layers(teacher)
    generator = torch.Generator().manual_seed(0)
    bar = tqdm(range(len(student_layers)), desc="training correctives", unit="block", disable=not progress)
    for index in bar:
        s_layer, t_layer = student_layers[index], teacher_layers[index]
        branches = [n for n, m in s_layer.named_modules() if isinstance(m, CorrectedLinear)]
        layer_states = [(hidden, kwargs[index]) for hidden, kwargs in teacher_states]  # this layer's kwargs
        teacher_inputs, targets = _linear_inputs(t_layer, layer_states, branches if options.solve else [])
        student_states = [(hidden, kwargs) for hidden, (_, kwargs) in zip(student_hidden, layer_states)]
        held = slice(n_train, None)
        before = _relative_error(s_layer, student_states[held], targets[held])
        if options.solve:
            _solve_block(s_layer, t_layer, student_states[:n_train], teacher_inputs[:n_train])
        del teacher_inputs
        optimizer, params = _optimizer(s_layer, options, options.lr)
        if params and options.epochs:
            s_layer.train()
            for _epoch in range(options.epochs):
                order = torch.randperm(n_train, generator=generator).tolist()
                for begin in range(0, n_train, options.batch_size):
                    batch = order[begin : begin + options.batch_size]
                    hidden = torch.cat([student_states[b][0] for b in batch])
                    target = torch.cat([targets[b] for b in batch])
                    kwargs = _batched_kwargs(student_states[batch[0]][1], len(batch))
                    out = run_layer(s_layer, hidden, kwargs)
                    loss = (out - target).pow(2).mean() / target.pow(2).mean()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            s_layer.eval()
            for p in params:
                p.requires_grad_(False)
        after = _relative_error(s_layer, student_states[held], targets[held])
        if after > before:  # the fit did not carry over to held-out text: keep the plain SVD path here
            _reset_branches(s_layer)
            after = before
            report.blocks_reset.append(index)
        report.block_error_before.append(before)
        report.block_error_after.append(after)
        bar.set_postfix(err=f"{before:.4f}->{after:.4f}")
        with torch.no_grad():
            student_hidden = [run_layer(s_layer, hidden, kwargs) for hidden, kwargs in student_states]
        teacher_states = [(target, kwargs) for target, (_, kwargs) in zip(targets, teacher_states)]
    report.seconds += time.perf_counter() - start
    return report


def _batched_kwargs(kwargs: dict, batch: int) -> dict:
    """Per-sequence layer kwargs (rotary tables, masks) expanded to a batch of `batch` sequences."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 1 and batch > 1:
            value = value.expand(batch, *value.shape[1:])
        elif isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            value = tuple(v.expand(batch, *v.shape[1:]) if v.dim() > 0 and v.shape[0] == 1 else v for v in value)
        out[key] = value
    return out


class TeacherTargets:
    """The teacher's next-token log-probabilities on calibration windows, its decoder run once per window.

    KL training draws a few windows a step from a few dozen (scale tuning: 60 steps of 2 of ~90) and measures the
    held-out ones before and after, so most windows come back; the teacher's decoder would compute them again
    each time (a quarter of a step's arithmetic). Kept per window is the output head's input (SmolLM2: 512 x
    576 floats, not 512 x 49,152 logits), the head applied per use. Where the head's output is not the logits
    (a softcap, a scaling), the first window shows it and every batch runs the whole teacher instead.
    `known`: head inputs already computed for some windows ({window's token bytes (`window_key`): head input};
    the Gram pass's of the calibration windows), used once the first window the teacher runs has shown that
    the head's output is the logits.
    """

    def __init__(self, teacher, known: dict[bytes, torch.Tensor] | None = None):
        self.teacher = teacher
        self.head = teacher.get_output_embeddings()
        self.hidden: dict[bytes, torch.Tensor] = {}  # window's token bytes -> the head's input
        self.known = dict(known or {})
        self.exact: bool | None = None  # head(hidden) == logits, checked on the first windows

    def log_probs(self, batch: torch.Tensor) -> torch.Tensor:
        if self.exact is False or self.head is None:
            return torch.log_softmax(self.teacher(batch, use_cache=False).logits.float(), dim=-1)
        keys = [window_key(row) for row in batch]
        new = [key for key in dict.fromkeys(keys) if key not in self.hidden]
        if self.exact:
            for key in [key for key in new if key in self.known]:
                self.hidden[key] = self.known.pop(key).to(batch.device)
        rows = [keys.index(key) for key in new if key not in self.hidden and key not in self.known]  # each once
        if self.exact is None and not rows and new:  # every window known: run the teacher on one to check
            rows = [keys.index(new[0])]
        if rows:
            captured = []
            hook = self.head.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
            try:
                logits = self.teacher(batch[rows], use_cache=False).logits
            finally:
                hook.remove()
            if self.exact is None:
                self.exact = len(captured) == 1 and torch.equal(self.head(captured[0]), logits)
                if not self.exact:
                    self.known.clear()
                    return self.log_probs(batch)
            for i, hidden in zip(rows, captured[0]):
                self.hidden[keys[i]] = hidden.clone()
                self.known.pop(keys[i], None)
            return self.log_probs(batch)  # the known windows now that the head is checked
        return torch.log_softmax(self.head(torch.stack([self.hidden[key] for key in keys])).float(), dim=-1)


def window_key(window: torch.Tensor) -> bytes:
    """A window's identity among TeacherTargets' kept head inputs: its token ids' bytes (int64)."""
    return window.to(torch.int64).cpu().numpy().tobytes()


def kl_divergence(student, teacher, batch: torch.Tensor, precision: torch.dtype | None = None) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions on `batch`, per token (`teacher`: a model, or its
    TeacherTargets). `precision`: the student's forward under autocast to that dtype (the teacher's targets and
    the softmaxes stay float32)."""
    with torch.no_grad():
        target = teacher.log_probs(batch) if isinstance(teacher, TeacherTargets) \
            else torch.log_softmax(teacher(batch, use_cache=False).logits.float(), dim=-1)
    with torch.autocast(batch.device.type, dtype=precision or torch.float32, enabled=precision is not None):
        logits = student(batch, use_cache=False).logits
    logits = logits.float()
    return nn.functional.kl_div(torch.log_softmax(logits, dim=-1), target, log_target=True, reduction="batchmean") \
        / batch.shape[1]


def held_out_kl(student, teacher, input_ids: torch.Tensor, options: CorrectiveOptions) -> float:
    """KL(teacher || student) per token on the sequences kept out of training."""
    with torch.no_grad():
        return float(kl_divergence(student, teacher, input_ids[-_holdout(input_ids, options):]))


def train_end_to_end(student, teacher, input_ids: torch.Tensor, options: CorrectiveOptions,
                     progress: bool = True, report: CorrectiveReport | None = None) -> CorrectiveReport:
    """KL(teacher || student) on calibration text, per token, over `options.kl_steps` steps."""
    from tqdm.auto import tqdm

    report = report or CorrectiveReport()
    if options.kl_steps <= 0:
        return report
    start = time.perf_counter()
    for p in student.parameters():
        p.requires_grad_(False)
    holdout = _holdout(input_ids, options)
    train = input_ids[:-holdout]
    teacher = teacher if isinstance(teacher, TeacherTargets) else TeacherTargets(teacher)
    report.kl_before = held_out_kl(student, teacher, input_ids, options)
    optimizer, params = _optimizer(student, options, options.kl_lr)
    generator = torch.Generator().manual_seed(1)
    student.train()
    trained = distributed.data_parallel(student)  # torchrun: each rank its share of a batch
    bar = tqdm(range(options.kl_steps), desc="end-to-end KL", unit="step", disable=not progress)
    for _ in bar:
        batch = train[torch.randint(len(train), (options.kl_batch_size,), generator=generator)]
        loss = kl_divergence(trained, teacher, distributed.batch_share(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(kl=f"{loss.item():.4f}")
    student.eval()
    for p in params:
        p.requires_grad_(False)
    report.kl_after = held_out_kl(student, teacher, input_ids, options)
    report.seconds += time.perf_counter() - start
    return report


def branch_weights(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every corrective branch's (down, up) factors by module name: what a later profile of the run starts from."""
    return {name: (m.corrective_down.weight.detach().clone(), m.corrective_up.weight.detach().clone())
            for name, m in model.named_modules() if isinstance(m, CorrectedLinear)}


def _best_rank(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The leading `rank` (at most) singular directions of the map up @ down, balanced as factors."""
    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u, sigma, vh = torch.linalg.svd(r_up @ r_down.T)
    k = min(rank, sigma.numel())
    root = sigma[:k].sqrt()
    return (root[:, None] * (q_down @ vh[:k].T).T).to(down.dtype), ((q_up @ u[:, :k]) * root).to(up.dtype)


def _matching_branches(model, weights: dict) -> tuple[list, int]:
    """([(branch, previous down, previous up)] for `model`'s branches whose module in `weights` has the same input
    and output widths, the number of branches in `model`)."""
    branches = [(name, m) for name, m in model.named_modules() if isinstance(m, CorrectedLinear)]
    found = []
    for name, module in branches:
        down, up = weights.get(name, (None, None))
        if down is not None and down.shape[1] == module.in_features and up.shape[0] == module.out_features:
            found.append((module, down, up))
    return found, len(branches)


def _start_from(module: CorrectedLinear, down: torch.Tensor, up: torch.Tensor) -> None:
    if down.shape[0] != module.corrective_rank:
        down, up = _best_rank(down, up, module.corrective_rank)
    k = down.shape[0]
    with torch.no_grad():
        module.corrective_down.weight[:k] = down
        module.corrective_up.weight.zero_()
        module.corrective_up.weight[:, :k] = up


def load_branches(model, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, int]:
    """Start each branch of `model` from the branch of its module in `weights` (branch_weights of the same
    architecture) where both have the same input and output widths; a branch of another rank starts from that
    map's best approximation at its rank (a larger one keeps its start in the directions left over). Returns
    (branches loaded, branches in `model`)."""
    found, total = _matching_branches(model, weights)
    for branch in found:
        _start_from(*branch)
    return len(found), total


def train_correctives(student, teacher, input_ids: torch.Tensor, options: CorrectiveOptions,
                      progress: bool = True, warm: dict | None = None) -> CorrectiveReport:
    """Both stages on the compute device (exporter.compress.compute), the two models whole there; the trained
    values are written back to the student's host tensors.

    `warm` (branch_weights of another compression of the same model, e.g. the previous profile of `--device
    a,b` at other ranks): where at least half the branches have a branch of their shape there, they start from
    it and all train `options.warm_kl_steps` end-to-end steps, without the block-wise stage; else both stages.
    """
    device = compute.current()
    with compute.onloaded(student, device, write_back=True), compute.onloaded(teacher, device):
        input_ids = input_ids.to(device)
        found, total = _matching_branches(student, warm) if warm is not None else ([], 0)
        if found and 2 * len(found) >= total:  # the rest (other units factorized) keep their start
            loaded, total = load_branches(student, warm)
            return _train_warm(student, teacher, input_ids, options, progress, (loaded, total))
        report = train_blockwise(student, teacher, input_ids, options, progress)
        return train_end_to_end(student, teacher, input_ids, options, progress, report)


def _train_warm(student, teacher, input_ids: torch.Tensor, options: CorrectiveOptions, progress: bool,
                warm_start: tuple[int, int]) -> CorrectiveReport:
    """`options.warm_kl_steps` KL steps from branches already trained for other ranks; kept only where they
    lower the held-out KL (Adam's first steps, at the rate that trains branches from the start, can undo a
    trained state: measured on SmolLM2, benchmarks/RESULTS.md)."""
    report = CorrectiveReport(warm_start=warm_start)
    start = time.perf_counter()
    if options.warm_kl_steps <= 0:
        report.kl_before = report.kl_after = held_out_kl(student, teacher, input_ids, options)
        report.seconds = time.perf_counter() - start
        return report
    started = branch_weights(student)
    train_end_to_end(student, teacher, input_ids, replace(options, kl_steps=options.warm_kl_steps), progress, report)
    if report.kl_after > report.kl_before:
        load_branches(student, started)
        report.kl_after = report.kl_before
        report.warm_steps_undone = True
    return report


def dense_teacher(model):
    """A frozen copy of the model before factorization (the functional target)."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
