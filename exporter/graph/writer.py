"""A fused ONNX Runtime decoder graph for (possibly factorized) decoders of the families in
exporter.architectures (Llama, Mistral, Qwen2/3, Gemma 3, SmolLM3, Phi-3), each a spec there, not a branch here.

The graph uses ONNX Runtime's fused contrib ops (domain com.microsoft), as the onnxruntime-genai
model builder does, which decodes markedly faster than a traced export of the same weights:

* `GroupQueryAttention` with the KV cache and rotary embedding inside (`do_rotary=1`, cos/sin caches);
* `SkipSimplifiedLayerNormalization` for every RMSNorm that follows a residual add (it also returns the
  new residual stream); the plain RMSNorms (layer 0's input norm, per-head q/k norms, Gemma's norms on
  the branch outputs) use ONNX's own `RMSNormalization` (opset 23; ORT's `SimplifiedLayerNormalization`
  would work too, but it sits in the default domain without an ONNX schema, so onnx.checker rejects it),
  composed of opset-21 operators for an older ONNX Runtime (`_rms_norm`);
* one first-stage MatMul for q/k/v and one for gate/up (projections that share an input are fused);
* `MatMulNBits` for 4-bit (and 8-bit) weights, packed from the grids the PyTorch model holds
  (exporter.graph.matmul_nbits), so the graph's weights are exactly those PyTorch was checked with.

Projections. Each decoder projection is read as `ProjectionWeights`: an optional dense W (out x in),
a list of low-rank pairs (down V: r x in, up U: out x r) and an optional bias; y = W x + sum U_k V_k x + b.
A `LowRankLinear` is one pair; an `nn.Linear` is dense. `_emit_projections` writes a group of projections
that share an input: the first stage is one MatMul of x with the column concatenation of every W^T and
V^T, then a Split, then one MatMul by U^T per low-rank projection. A CALR corrective branch
y += B(A x) is written in one of two forms (`corrective_form`, below).

Initializer layout (fp32 and fp16). Every weight is stored MatMul-ready (in x out, transposed when written):
ONNX Runtime pre-packs a constant MatMul B, and `MatMulNBitsQuantizer` only quantizes MatMul (and
Gather) nodes, so a V stored r x in behind Gemm/FusedMatMul(transB=1) would stay fp32 in the int4 graph.
Hence the second stage U^T (r x out) has the rank as its outer dimension, while V^T sits as columns of
the fused first stage (in x cols); after MatMulNBits packing (B packed N-outer) it is the other way
round: V's rank outer, U's rank the blocked inner dimension.

Rank-sliced levels (`write_levels`): one complete decoder per level (model.onnx at full rank,
model.rNN.onnx below), all reading the full level's one data file. In a level graph
(`_emit_level_projections`) every rank-dependent tensor has the rank outer and is ordered so that each
level's tensor is a byte prefix of the full level's. The first stage stacks rows (out x in): per
projection its dense W, corrective rows and the smallest level's primary rows, then the rows each larger
level adds; fp32/fp16 multiply by it with FusedMatMul(transB=1), int4 with MatMulNBits (N-outer: the same
prefix), and each projection's columns of the product come out of one Split (smallest level) or a Gather.
U^T (rank x out, corrective rows first) is a row prefix in fp32; int4's MatMulNBits blocks the rank (its
inner K), so an int4 level reads the full U^T through a Slice of whole blocks (level ranks rounded up to
block_size), which ONNX Runtime folds at load. A level file's external-data entries point at the full
level's offsets with their own lengths (`_point_into` compares every byte). Tied fp32/fp16 levels gather the
embedding from lm_head's columns instead of a folded transposed copy, which would be private to each
session. In memory, each session maps and prepacks its weights privately; `exporter.runtime.shared_weights`
gives fp32 sessions one copy (benchmarks/levels_probe.py measures the trade-offs).

Corrective branches (`corrective_form`). y += B(A x) is one more `LowRankPair` in
`ProjectionWeights.pairs` (a `CorrectedLinear`: primary pair first). "folded" (default): `fold` stacks all
pairs of a projection into one (down [V; A], up [U, B]), so a branch costs extra columns in the fused
first stage and rows in U^T, no extra node. "separate" (`_emit_branches`): one more first-stage MatMul
per group of projections sharing an input, by the concatenated A^T of the group (fused like the V^T),
a Split, then a MatMul by B^T and an Add per projection. Both compute the same function (fp32: equal
to float rounding). int4: separate B^T is quantized in blocks of its own; folded, U^T's last block
shares scales with B^T's rows unless the primary rank is a whole number of blocks (as the pipeline's
int4 Fisher ranks are), in which case both forms hold the same 4-bit weights; the pipeline also rounds int4 branch ranks up to whole blocks, since MatMulNBits pads a partial block of K with zeros. Levels: the separate
form keeps the branches out of the rank-prefixed stacks, and int4 level ranks round the primary rank
alone to whole blocks (`level_ranks(..., corrective_form)`). Folded stays the default because it decodes
faster: SmolLM2-135M, 20% removed (uniform ranks in whole blocks), r_c 16 on all 210 projections, 128-token
prompt, 64 greedy steps, 2 threads, 7 alternating repeats (benchmarks/corrective_form.py, on the shared
2-core machine at load average 4-6): fp32 63.5 folded vs 71.3 ms/token separate, int4 28.0 vs 34.4
(paired separate/folded 1.11x and 1.22x; every repeat slower). The separate form doubles the node count
(580 -> 1180 nodes), and at decode every node's fixed cost outweighs the few FLOPs a branch adds.

fp16 graphs (`weights="fp16"`, for the CUDA execution provider, which registers GroupQueryAttention for fp16
and bf16 only). Every float tensor is float16: weights, norm weights and biases, the rotary cos/sin caches
(GroupQueryAttention takes them at its activations' type, SkipSimplifiedLayerNormalization its gamma),
activations, past_key_values.* / present.* and logits; input_ids and attention_mask stay int64. This is
the onnxruntime-genai builder's fp16 CUDA graph (its io_dtype float16). Logits stay fp16 as there (the
builder switches logits to fp32 for bf16 graphs only): lm_head's MatMul produces them at fp16 precision
anyway, so a Cast would add a node and a vocab-sized copy per step without adding precision, and the
readers handle fp16 (onnxruntime-genai converts them; exporter.runtime.generation widens each step's row to fp32).
The layout is the fp32 one, levels included (`_emit_level_projections`: FusedMatMul(transB=1), which CUDA
registers for fp16). ONNX Runtime's CPU provider (1.32, x86-64) has fp16 kernels for GroupQueryAttention,
SkipSimplifiedLayerNormalization, RMSNormalization, Gather, Split, Reshape and Transpose, but not for
MatMul, FusedMatMul, Add, Mul or Sigmoid: its InsertCastTransformer runs those in fp32 between Casts it
inserts (their fp16 weights widened at load), so the same file runs on CPU and is tested there against
PyTorch. On CUDA (checked once by hand on an H200, onnxruntime-gpu 1.31.1, levels included) every node but
the attention mask's integer Gather and Cast runs on the GPU.

Unsupported (NotImplementedError, so callers can fall back to the optimum export): dynamic / longrope
rope scaling (sequence-length dependent), partial rotary, activations other than SiLU, architectures
other than Llama/Mistral/Qwen2/Qwen3.

int4 weights with fp16 activations (`activations="fp16"`, the builder's CUDA int4 graph): the fp16 graph,
then MatMulNBits with fp16 scales (ONNX Runtime's quantizer keeps B's type for them), so
GroupQueryAttention stays on the CUDA provider as in the fp16 graph; the tied embedding gathers from
lm_head's blocks as in fp32 int4. int8 graphs are int4's at 8 bits (MatMulNBits bits=8, the tied embedding
gathered from lm_head's 8-bit blocks), with fp32 activations only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from exporter.architectures import MODEL_CLASSES, architecture_of
from exporter.compress.lowrank import CorrectedLinear, LowRankLinear
from exporter.errors import ExporterError
from exporter.graph.levels import DEFAULT_LEVELS, check_levels, level_name
from exporter.graph.onnxruntime_releases import (
    PACKED_GATHER_RELEASE,
    RMS_NORMALIZATION_OPSET,
    SLIDING_WINDOW_RELEASE,
    check_release,
    limits,
)
from exporter.graph.onnxruntime_releases import name as release_name
from exporter.precisions import GRID_BITS, check_activations

# Float weight formats are built at their own type (weights, activations, KV cache, logits); int4 and int8
# graphs are built at their activations' type, then their MatMuls packed as MatMulNBits (_quantize_grids).
FLOAT_TYPES = {"fp32": np.float32, "fp16": np.float16}
OPSET = 23  # RMSNormalization; lower for an older ONNX Runtime (exporter.graph.onnxruntime_releases)
MS_DOMAIN = "com.microsoft"
# Rope types whose cos/sin tables do not depend on the sequence length: HF's inv_freq and
# attention_scaling (which multiplies cos and sin) describe them completely.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# LongRoPE (Phi-3 128k, Phi-4-mini): one table pair below original_max_position_embeddings, another above; the
# graph picks a pair per call from the total sequence length, as HF picks its inv_freq per forward
SWITCHED_ROPE_TYPES = ("longrope",)
# The gated MLP activations the writer emits (config names -> how): SiLU, tanh-approximated GELU (ONNX
# Runtime's FastGelu), exact GELU (its Gelu)
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "FastGelu", "gelu_new": "FastGelu",
               "gelu": "Gelu"}
CORRECTIVE_FORMS = ("folded", "separate")  # how CALR branches are written; see the module docstring
DEFAULT_CORRECTIVE_FORM = "folded"


def _check_form(corrective_form: str) -> str:
    if corrective_form not in CORRECTIVE_FORMS:
        raise ValueError(f"unknown corrective_form {corrective_form!r}; expected one of {CORRECTIVE_FORMS}")
    return corrective_form


# --------------------------------------------------------------------------- projection weights


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).cpu().numpy()


@dataclass
class LowRankPair:
    """x -> up @ (down @ x); components ordered by importance, so a rank prefix is a smaller pair."""

    down: np.ndarray  # r x in
    up: np.ndarray  # out x r

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class ProjectionWeights:
    """y = dense @ x + sum_k up_k @ (down_k @ x) + bias, all parts optional but not all empty."""

    name: str
    in_features: int
    out_features: int
    dense: np.ndarray | None = None  # out x in
    pairs: list[LowRankPair] = field(default_factory=list)
    bias: np.ndarray | None = None

    @classmethod
    def from_module(cls, name: str, module: nn.Module) -> ProjectionWeights:
        if isinstance(module, CorrectedLinear):  # CALR: primary pair first, then the corrective branch
            weights = cls.from_module(name, module.base)
            weights.pairs.append(LowRankPair(_np(module.corrective_down.weight), _np(module.corrective_up.weight)))
            return weights
        if isinstance(module, LowRankLinear):
            bias = None if module.up.bias is None else _np(module.up.bias)
            pair = LowRankPair(_np(module.down.weight), _np(module.up.weight))
            return cls(name, module.in_features, module.out_features, pairs=[pair], bias=bias)
        if isinstance(module, nn.Linear):
            bias = None if module.bias is None else _np(module.bias)
            return cls(name, module.in_features, module.out_features, dense=_np(module.weight), bias=bias)
        raise NotImplementedError(f"{name}: cannot write a {type(module).__name__} projection")

    def fold(self, active_rank: int | None = None, correctives: bool = True
             ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """All pairs as one (down r_total x in, up out x r_total); `active_rank` keeps a prefix of the
        first (primary) pair, the rank-sliced level; further (corrective) pairs are kept whole.
        `correctives=False`: the primary pair alone (the separate form writes `corrective()` apart)."""
        if not self.pairs:
            return None, None
        downs, ups = [], []
        for index, pair in enumerate(self.pairs if correctives else self.pairs[:1]):
            rank = pair.rank if index or active_rank is None else active_rank
            if not 1 <= rank <= pair.rank:
                raise ValueError(f"{self.name}: active rank {rank} outside 1..{pair.rank}")
            downs.append(pair.down[:rank])
            ups.append(pair.up[:, :rank])
        return np.concatenate(downs, axis=0), np.concatenate(ups, axis=1)

    def corrective(self) -> LowRankPair | None:
        """The corrective pairs (all but the first) stacked into one, or None without any."""
        if len(self.pairs) < 2:
            return None
        rest = self.pairs[1:]
        return LowRankPair(np.concatenate([p.down for p in rest], axis=0), np.concatenate([p.up for p in rest], axis=1))


# --------------------------------------------------------------------------- graph building


class _Graph:
    """Nodes and initializers with unique, readable names. `dtype` is the graph's float type: every
    floating-point constant (weights, norms, biases, rotary caches) is stored at it, because the fused
    ops take their weights at the type of their activations (GroupQueryAttention's cos/sin caches,
    SkipSimplifiedLayerNormalization's gamma, MatMul's B); integer constants (shapes, indices) stay as given."""

    def __init__(self, dtype=np.float32, opset: int = OPSET):
        from onnx import helper

        self.helper = helper
        self.dtype = np.dtype(dtype)
        self.opset = opset
        self.nodes, self.initializers, self.names = [], [], set()

    def constant(self, name: str, array: np.ndarray, keep_type: bool = False) -> str:
        """An initializer; float arrays at the graph's float type unless `keep_type`."""
        from onnx import numpy_helper

        if name in self.names:
            raise ValueError(f"duplicate initializer {name}")
        self.names.add(name)
        if np.issubdtype(array.dtype, np.floating) and not keep_type:
            array = array.astype(self.dtype, copy=False)
        self.initializers.append(numpy_helper.from_array(np.require(array, requirements="C"), name))  # keeps 0-d
        return name

    def op(self, op_type: str, inputs: Sequence[str], name: str, outputs: int | Sequence[str] = 1,
           domain: str = "", **attrs):
        """Add a node named `name`; returns its output name (or names when several are asked for)."""
        if name in self.names:
            raise ValueError(f"duplicate node name {name}")
        self.names.add(name)
        if isinstance(outputs, int):
            outs = [f"{name}/output_{k}" for k in range(outputs)]
        else:
            outs = list(outputs)
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outs, name=name, domain=domain or None,
                                                **attrs))
        return outs[0] if len(outs) == 1 else outs


def _sum(g: _Graph, terms: Sequence[str], name: str) -> str:
    """terms[0] + terms[1] + ..., as a chain of Adds (`name`, `name`_1, ...)."""
    y = terms[0]
    for k, term in enumerate(terms[1:]):
        y = g.op("Add", [y, term], name if k == 0 else f"{name}_{k}")
    return y


def _rms_norm(g: _Graph, x: str, gamma: str, name: str, eps: float) -> str:
    """RMSNorm over the last axis: ONNX's RMSNormalization (opset 23), or below that opset its composition
    x / sqrt(mean(x^2) + eps) * gamma, computed in float32 as RMSNormalization's stash_type does. The
    composition is the pattern ONNX Runtime's SimplifiedLayerNormFusion rewrites into its fused kernel."""
    from onnx import TensorProto

    if g.opset >= RMS_NORMALIZATION_OPSET:
        return g.op("RMSNormalization", [x, gamma], f"{name}/RMSNorm", axis=-1, epsilon=eps)
    if g.dtype != np.float32:
        x = g.op("Cast", [x], f"{name}/Cast", to=TensorProto.FLOAT)
    stem = name.strip("/").replace("/", ".")
    square = g.op("Pow", [x, g.constant(f"{stem}.two", np.array(2.0, np.float32), keep_type=True)], f"{name}/Pow")
    mean = g.op("ReduceMean", [square, g.constant(f"{stem}.last_axis", np.array([-1], np.int64))],
                f"{name}/ReduceMean", keepdims=1)
    shifted = g.op("Add", [mean, g.constant(f"{stem}.epsilon", np.array(eps, np.float32), keep_type=True)],
                   f"{name}/Add")
    y = g.op("Div", [x, g.op("Sqrt", [shifted], f"{name}/Sqrt")], f"{name}/Div")
    if g.dtype != np.float32:
        y = g.op("Cast", [y], f"{name}/Cast_1", to=int(g.helper.np_dtype_to_tensor_dtype(g.dtype)))
    return g.op("Mul", [y, gamma], f"{name}/Mul")


def _skip_norm(g: _Graph, x: str, residual: str, gamma: str, name: str, eps: float) -> tuple[str, str]:
    """RMSNorm(x + residual) and the new residual x + residual, in one SkipSimplifiedLayerNormalization.
    Its mean and inverse-std outputs stay unnamed, as the genai builder leaves them: ONNX Runtime then
    skips writing them (SmolLM2-135M int4, 20% removed, two paired decode_probe runs on a loaded machine:
    128.0 -> 133.5 and 126.5 -> 142.5 tokens/s)."""
    normed, new_residual = f"{name}/output_0", f"{name}/output_3"
    g.op("SkipSimplifiedLayerNormalization", [x, residual, gamma], name,
         outputs=[normed, "", "", new_residual], domain=MS_DOMAIN, epsilon=eps)
    return normed, new_residual


def _gated(g: _Graph, gate: str, up: str, activation: str, prefix: str) -> str:
    """act(gate) * up: SiLU as Sigmoid and Mul (ONNX Runtime fuses them), tanh GELU as FastGelu, GELU as Gelu."""
    if ACTIVATIONS[activation] == "silu":
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{prefix}/act/Sigmoid")], f"{prefix}/act/Mul")
    else:
        act = g.op(ACTIVATIONS[activation], [gate], f"{prefix}/act/{ACTIVATIONS[activation]}", domain=MS_DOMAIN)
    return g.op("Mul", [act, up], f"{prefix}/Mul")


def _emit_branches(g: _Graph, x: str, projections: Sequence[ProjectionWeights], prefix: str, *,
                   fuse: bool = True) -> dict[int, str]:
    """The separate corrective form: B (A x) of every projection of input `x` that has a branch, as
    {projection index: output}. fuse: one MatMul of x by the column concatenation of the group's A^T,
    then a Split (as the primary first stage is fused); otherwise one MatMul per branch. Then one MatMul
    by B^T (r_c x out) per branch."""
    stem = prefix.strip("/").replace("/", ".")
    branches = [(index, pair) for index, proj in enumerate(projections)
                if (pair := proj.corrective()) is not None]
    if not branches:
        return {}
    if fuse:
        weight = np.concatenate([pair.down.T for _, pair in branches], axis=1)
        y = g.op("MatMul", [x, g.constant(f"{stem}.corrective.MatMul.weight", weight)], f"{prefix}/corrective/MatMul")
        if len(branches) > 1:
            sizes = g.constant(f"{stem}.corrective.Split.sizes", np.array([p.rank for _, p in branches], np.int64))
            downs = g.op("Split", [y, sizes], f"{prefix}/corrective/Split", outputs=len(branches), axis=-1)
        else:
            downs = [y]
    else:
        downs = []
        for index, pair in branches:
            short = projections[index].name.rsplit(".", 1)[-1]
            weight = g.constant(f"{stem}.{short}.corrective_down.MatMul.weight", pair.down.T)
            downs.append(g.op("MatMul", [x, weight], f"{prefix}/{short}/corrective_down/MatMul"))
    outputs = {}
    for (index, pair), down in zip(branches, downs):
        proj = projections[index]
        up_t = g.constant(f"{proj.name}.corrective_up.weight_T", pair.up.T)  # r_c x out
        outputs[index] = g.op("MatMul", [down, up_t], f"{prefix}/{proj.name.rsplit('.', 1)[-1]}/corrective_up/MatMul")
    return outputs


def _shared_groups(downs: dict[int, np.ndarray]) -> list[list[int]]:
    """Projection indices grouped by equal down factors (a joint factorization of projections that
    share an input: one V, their U's stacked), in first-appearance order; unshared ones alone."""
    groups: list[list[int]] = []
    for index, down in downs.items():
        for group in groups:
            first = downs[group[0]]
            if first.shape == down.shape and np.array_equal(first, down):
                group.append(index)
                break
        else:
            groups.append([index])
    return groups


def _emit_second_stages(g: _Graph, prefix: str, projections: Sequence[ProjectionWeights], groups: list[list[int]],
                        downs: Sequence[str], ups: dict[int, np.ndarray], packed: bool = False
                        ) -> tuple[dict[int, str], str | None]:
    """One MatMul by U^T (rank x out: rank outer) per group of equal down factors (`groups`, their first-stage
    outputs `downs`; `ups`: each projection's out x rank factor), a joint group's U^T stacked along out and
    then Split. Returns ({projection index: output}, None), or, with `packed` and one joint group of every
    projection, ({}, the stacked output)."""
    stem = prefix.strip("/").replace("/", ".")
    seconds: dict[int, str] = {}
    for k, (group, down) in enumerate(zip(groups, downs)):
        if len(group) == 1:
            proj = projections[group[0]]
            up_t = g.constant(f"{proj.name}.up.weight_T", ups[group[0]].T)
            seconds[group[0]] = g.op("MatMul", [down, up_t], f"{prefix}/{proj.name.rsplit('.', 1)[-1]}/up/MatMul")
            continue
        up_t = g.constant(f"{stem}.joint{k}.up.weight_T", np.concatenate([ups[i] for i in group]).T)
        y = g.op("MatMul", [down, up_t], f"{prefix}/joint{k}/up/MatMul")
        if packed and len(group) == len(projections):
            return {}, y
        sizes = g.constant(f"{stem}.joint{k}.Split.sizes",
                           np.array([projections[i].out_features for i in group], np.int64))
        seconds.update(zip(group, g.op("Split", [y, sizes], f"{prefix}/joint{k}/Split", outputs=len(group), axis=-1)))
    return seconds, None


def _emit_projections(g: _Graph, x: str, projections: Sequence[ProjectionWeights], prefix: str, *,
                      fuse: bool = True, packed: bool = False,
                      active_ranks: dict[str, int | None] | None = None,
                      corrective_form: str = "folded") -> list[str]:
    """Write projections of one input `x`; returns one output per projection, or, with `packed` when the
    group allows it, one output holding them all concatenated along the last axis.

    fuse: one first-stage MatMul against [W^T | V^T ...] for the whole group, then a Split; otherwise
    one first-stage MatMul per block. Low-rank projections with equal down factors (a joint
    factorization) share one V^T block and one second-stage MatMul by their stacked U^T, then a Split.
    Then adds and biases. packed: possible when the group is all dense (fused) or all one joint
    factorization, with no separate corrective branches.
    corrective_form: "folded" stacks each corrective branch onto its primary pair (V^T columns, U^T
    rows); "separate" writes the branches apart (`_emit_branches`) and adds them to the primary outputs.
    """
    active_ranks = active_ranks or {}
    separate = _check_form(corrective_form) == "separate"
    stem = prefix.strip("/").replace("/", ".")  # initializer names: model.layers.0.attn.qkv_proj...
    folded = [proj.fold(active_ranks.get(proj.name), correctives=not separate) for proj in projections]
    groups = _shared_groups({i: down for i, (down, _) in enumerate(folded) if down is not None})
    group_of = {i: k for k, group in enumerate(groups) for i in group}
    blocks = []  # (projection index or ("group", k), "dense" | "down", in x cols matrix)
    for index, proj in enumerate(projections):
        if proj.dense is not None:
            blocks.append((index, "dense", proj.dense.T))
        if index in group_of and groups[group_of[index]][0] == index:
            blocks.append((("group", group_of[index]), "down", folded[index][0].T))
    all_dense = not groups
    has_bias = any(p.bias is not None for p in projections)
    joint = (len(groups) == 1 and len(groups[0]) == len(projections) and len(projections) > 1
             and not (separate and any(p.corrective() for p in projections))
             and all(p.dense is None for p in projections))
    if packed:
        packed = (all_dense and fuse) or joint

    def group_bias(y: str) -> str:  # one Add of the group's concatenated biases, on its packed output
        bias = np.concatenate([p.bias if p.bias is not None else np.zeros(p.out_features, np.float32)
                               for p in projections])
        return g.op("Add", [y, g.constant(f"{stem}.Add.bias", bias)], f"{prefix}/Add")

    # First stage.
    first: list[str] = []
    if fuse:
        weight = np.concatenate([b[2] for b in blocks], axis=1) if len(blocks) > 1 else blocks[0][2]
        y = g.op("MatMul", [x, g.constant(f"{stem}.MatMul.weight", weight)], f"{prefix}/MatMul")
        if all_dense and has_bias:  # one Add for the whole group
            y = group_bias(y)
        if packed and all_dense:
            return [y]
        if len(blocks) > 1:
            sizes = g.constant(f"{stem}.Split.sizes", np.array([b[2].shape[1] for b in blocks], np.int64))
            first = g.op("Split", [y, sizes], f"{prefix}/Split", outputs=len(blocks), axis=-1)
        else:
            first = [y]
    else:
        for (owner, kind, matrix) in blocks:
            members = groups[owner[1]] if isinstance(owner, tuple) else [owner]
            short = projections[members[0]].name.rsplit(".", 1)[-1] if len(members) == 1 else f"joint{owner[1]}"
            weight = g.constant(f"{stem}.{short}.{kind}.MatMul.weight", matrix)
            first.append(g.op("MatMul", [x, weight], f"{prefix}/{short}/{kind}/MatMul"))

    # Second stage (and the separate corrective branches).
    branches = _emit_branches(g, x, projections, prefix, fuse=fuse) if separate else {}
    position = {owner: b for b, (owner, _, _) in enumerate(blocks)}
    downs = [first[position["group", k]] for k in range(len(groups))]
    seconds, whole = _emit_second_stages(g, prefix, projections, groups, downs, {i: folded[i][1] for i in group_of},
                                         packed=joint and packed)
    if whole is not None:
        return [group_bias(whole) if has_bias else whole]

    # Sums and biases.
    outputs = []
    for index, proj in enumerate(projections):
        short = f"{prefix}/{proj.name.rsplit('.', 1)[-1]}"
        terms = [first[b] for b, (owner, kind, _) in enumerate(blocks) if owner == index and kind == "dense"]
        terms += [seconds[index]] if index in seconds else []
        terms += [branches[index]] if index in branches else []
        y = _sum(g, terms, f"{short}/Sum")
        if proj.bias is not None and not (fuse and all_dense):
            y = g.op("Add", [y, g.constant(f"{proj.name}.bias", proj.bias)], f"{short}/Add")
        outputs.append(y)
    return outputs


def _emit_level_projections(g: _Graph, x: str, projections: Sequence[ProjectionWeights], prefix: str,
                            levels: Sequence[dict[str, int]], level: int, transposed: bool,
                            corrective_form: str = "folded", packed: bool = False) -> list[str]:
    """Write projections of one input at rank level `level` of `levels` (one dict per level, largest first:
    primary rank of every low-rank projection), laid out so that every level's factors are byte prefixes of
    the full level's.

    First stage: one stack of rows (out x in, rank outer): per projection (per joint group: once) its dense W,
    its corrective rows and the primary rows of the smallest level; then, level by level up to `level`, the
    primary rows that level adds. fp32/fp16 (`transposed`) multiply by it with FusedMatMul(transB=1); int4
    writes a MatMul by its transpose, which MatMulNBits stores N-outer (rows outer) again. Each projection's
    columns of the product are taken with one Split where they are contiguous (the smallest level), else one
    Gather each. Second stage: U^T with the corrective rows first, then the primary rows by importance
    (rank x out), a joint group's stacked along out, then a Split (or, `packed` and one joint group of
    every projection, the packed output). The separate corrective form leaves the corrective rows out of
    both stages and writes the branches with `_emit_branches` (their tensors do not depend on the level, so
    every level reads the same bytes).
    """
    separate = _check_form(corrective_form) == "separate"
    stem = prefix.strip("/").replace("/", ".")
    groups = _shared_groups({i: proj.fold(correctives=not separate)[0]
                             for i, proj in enumerate(projections) if proj.pairs})
    for group in groups:
        if any(len({ranks[projections[i].name] for i in group}) > 1 for ranks in levels):
            raise ValueError(f"{prefix}: a joint group's projections must have one rank per level")
    owners = [group[0] for group in groups]  # the projection that carries a group's first-stage rows
    rows: list[np.ndarray] = []
    columns: dict[tuple[int, str], list[int]] = {}  # (projection or group owner, part) -> its columns

    def add(index: int, part: str, block: np.ndarray) -> None:
        start = sum(len(r) for r in rows)
        rows.append(block)
        columns.setdefault((index, part), []).extend(range(start, start + len(block)))

    for index, proj in enumerate(projections):
        if proj.dense is not None:
            add(index, "dense", proj.dense)
        if index in owners:
            corrections = [] if separate else [pair.down for pair in proj.pairs[1:]]
            add(index, "down", np.concatenate([*corrections, proj.pairs[0].down[:levels[-1][proj.name]]]))
    for j in range(len(levels) - 2, level - 1, -1):  # the rows each larger level adds
        for index in owners:
            proj = projections[index]
            add(index, "down", proj.pairs[0].down[levels[j + 1][proj.name]:levels[j][proj.name]])
    weight = np.concatenate(rows)
    if transposed:
        y = g.op("FusedMatMul", [x, g.constant(f"{stem}.MatMul.weight_T", weight)], f"{prefix}/MatMul",
                 domain=MS_DOMAIN, transB=1)
    else:
        y = g.op("MatMul", [x, g.constant(f"{stem}.MatMul.weight", weight.T)], f"{prefix}/MatMul")

    parts = list(columns)
    flat = [c for key in parts for c in columns[key]]
    if len(parts) == 1:
        first = {parts[0]: y}
    elif flat == list(range(len(flat))):  # each part contiguous and in order
        sizes = g.constant(f"{stem}.Split.sizes", np.array([len(columns[k]) for k in parts], np.int64))
        first = dict(zip(parts, g.op("Split", [y, sizes], f"{prefix}/Split", outputs=len(parts), axis=-1)))
    else:
        first = {}
        for index, part in parts:
            short = projections[index].name.rsplit(".", 1)[-1]
            indices = g.constant(f"{stem}.{short}.{part}.columns", np.array(columns[index, part], np.int64))
            first[index, part] = g.op("Gather", [y, indices], f"{prefix}/{short}/{part}/Gather", axis=-1)

    def up_rows(proj: ProjectionWeights) -> np.ndarray:  # out x (corrective ranks + this level's primary rank)
        corrections = [] if separate else [pair.up for pair in proj.pairs[1:]]
        return np.concatenate([*corrections, proj.pairs[0].up[:, :levels[level][proj.name]]], axis=1)

    branches = _emit_branches(g, x, projections, prefix) if separate else {}
    pack = packed and not branches and all(p.dense is None and p.bias is None for p in projections)
    seconds, whole = _emit_second_stages(g, prefix, projections, groups, [first[group[0], "down"] for group in groups],
                                         {i: up_rows(projections[i]) for group in groups for i in group}, pack)
    if whole is not None:
        return [whole]

    outputs = []
    for index, proj in enumerate(projections):
        short = f"{prefix}/{proj.name.rsplit('.', 1)[-1]}"
        terms = [first[index, "dense"]] if proj.dense is not None else []
        terms += [seconds[index]] if index in seconds else []
        terms += [branches[index]] if index in branches else []
        y = _sum(g, terms, f"{short}/Sum")
        if proj.bias is not None:
            y = g.op("Add", [y, g.constant(f"{proj.name}.bias", proj.bias)], f"{short}/Add")
        outputs.append(y)
    return outputs


# --------------------------------------------------------------------------- model inspection


def _arch(model) -> str:
    return type(model).__name__


def _activation(config) -> str:
    """The gated MLP's activation (Gemma's configs name it hidden_activation, the others hidden_act)."""
    return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")


def _local_rotary(model):
    """The rotary embedding of the sliding-window layers where the family has its own (else None)."""
    name = architecture_of(model).local_rotary
    return getattr(model.model, name) if name else None


def _rotary(model):
    base = model.model
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        rotary = getattr(base.layers[0].self_attn, "rotary_emb", None)
    return rotary


def _check(model) -> None:
    """Raise NotImplementedError naming the first feature this writer cannot express."""
    arch = _arch(model)
    if architecture_of(model) is None:
        raise NotImplementedError(f"graph writer supports {', '.join(MODEL_CLASSES)}, not {arch}")
    config = model.config
    act = _activation(config)
    if act not in ACTIVATIONS:
        raise NotImplementedError(f"graph writer supports the MLP activations {', '.join(ACTIVATIONS)}, not {act!r}")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError("graph writer does not write attention logit soft-capping")
    rotary = _rotary(model)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise NotImplementedError("graph writer needs the model's rotary embedding (rotary_emb.inv_freq)")
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES + SWITCHED_ROPE_TYPES:
        raise NotImplementedError(
            f"graph writer does not implement rope_scaling type {rope_type!r} (its tables depend on the "
            f"sequence length); supported: {', '.join(STATIC_ROPE_TYPES + SWITCHED_ROPE_TYPES)}")
    head_dim = _head_dim(config)
    half = rotary.inv_freq.numel()  # the rotated part of each head, halved (the cos/sin caches' width)
    if 2 * half != head_dim and (2 * half > head_dim or half % 8):
        # GroupQueryAttention rotates a head's first 2 x cache-width dims, for widths that are multiples of 8
        raise NotImplementedError(f"graph writer writes partial rotary embeddings over a multiple of 16 dims only, "
                                  f"not {2 * half} of {head_dim}")
    for layer in model.model.layers:
        if getattr(layer.self_attn, "is_causal", True) is False:
            raise NotImplementedError("graph writer writes causal attention only")
    if getattr(model.lm_head, "bias", None) is not None:
        raise NotImplementedError("graph writer does not write an lm_head bias")


def supports(model) -> bool:
    """Whether `write_decoder` can write this model (architecture, activation, rope type)."""
    return unsupported_reason(model) is None


def unsupported_reason(model) -> str | None:
    """Why `write_decoder` cannot write this model, or None when it can."""
    try:
        _check(model)
    except (NotImplementedError, AttributeError) as exc:
        return str(exc) or type(exc).__name__
    return None


def release_reason(model, release: tuple[int, int]) -> str | None:
    """Why ONNX Runtime `release` cannot run this model's fused graph (what the weights do not decide), or None."""
    if release < SLIDING_WINDOW_RELEASE and any(_sliding_window(model, layer) for layer in model.model.layers):
        return (f"its sliding-window attention needs {release_name(SLIDING_WINDOW_RELEASE)} or later (older "
                f"GroupQueryAttention computes other values once a prompt is longer than the window)")
    return None


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _sliding_window(model, layer) -> int | None:
    window = getattr(layer.self_attn, "sliding_window", None)  # Qwen2/3: None on full-attention layers
    if window is None and architecture_of(model).window_from_config:
        window = getattr(model.config, "sliding_window", None)
    return window


def served_positions(config, max_context: int | None = None) -> int:
    """Rows of the rotary tables: the model's positions, or the context the artifact serves where that is shorter
    (a device profile's max_context: Gemma 3 270M's four fp32 tables for 32,768 positions are 67 MB)."""
    positions = int(getattr(config, "max_position_embeddings", 4096))
    return min(positions, int(max_context)) if max_context else positions


GRAPH_BYTES_PER_LAYER = 8_000  # model.onnx's own protobuf (nodes, names, shapes): SmolLM2-135M int4, ~5.6 KB/layer
GRAPH_BYTES_BASE = 32_000


def constant_bytes(model, activations: str = "fp32", max_context: int | None = None) -> int:
    """Bytes the graph files hold besides the model's parameters: the rotary cos/sin caches (for `max_context`
    positions, as build_decoder writes them), and an allowance for the graph's own protobuf, so that a byte
    budget holds for everything named model.onnx*."""
    positions = served_positions(model.config, max_context)
    rope = 2 * positions * (_head_dim(model.config) // 2) * (4 if activations == "fp32" else 2)
    if _local_rotary(model) is not None or _long_rope_switch(model, positions) is not None:  # a second pair
        rope *= 2
    return rope + GRAPH_BYTES_BASE + GRAPH_BYTES_PER_LAYER * model.config.num_hidden_layers


def _rope_tables(model, max_positions: int, rotary=None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [max_positions, head_dim / 2] of `rotary` (default: the model's), computed like HF
    (float32, times attention_scaling)."""
    rotary = rotary or _rotary(model)
    # the frequencies the module was built with: a LongRoPE module's inv_freq is whichever pair it last used
    inv_freq = getattr(rotary, "original_inv_freq", rotary.inv_freq).detach().float().cpu()
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    return (freqs.cos() * scaling).numpy(), (freqs.sin() * scaling).numpy()


# --------------------------------------------------------------------------- the decoder


def _long_rope_switch(model, positions: int) -> int | None:
    """LongRoPE's switch position (original_max_position_embeddings), or None: not LongRoPE, or a context of
    `positions` that never passes it (then the short tables are all the graph needs)."""
    if getattr(_rotary(model), "rope_type", "default") not in SWITCHED_ROPE_TYPES:
        return None
    config = model.config
    switch = int(getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
    return switch if positions > switch else None


def _long_rope(model, positions: int) -> tuple[int, np.ndarray, np.ndarray] | None:
    """LongRoPE's switch position and its long-factor cos/sin tables for `positions` rows, or None (see
    _long_rope_switch)."""
    if (switch := _long_rope_switch(model, positions)) is None:
        return None
    rotary, config = _rotary(model), model.config
    long_inv_freq, _ = rotary.rope_init_fn(config, None, seq_len=switch + 1)
    positions = torch.arange(positions, dtype=torch.float32)
    freqs = positions[:, None] * long_inv_freq.float()[None, :]
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    return switch, (freqs.cos() * scaling).numpy(), (freqs.sin() * scaling).numpy()


def _switched_caches(g: _Graph, total_len: str, short: tuple[str, str], long: tuple[np.ndarray, np.ndarray],
                     switch: int) -> tuple[str, str]:
    """The long tables where the total sequence length exceeds `switch`, else the short ones: an If whose
    branches pass on outer-scope initializers (no copy of the tables per step)."""
    helper = g.helper
    long_names = g.constant("cos_cache_long", long[0]), g.constant("sin_cache_long", long[1])
    longer = g.op("Greater", [total_len, g.constant("rope_switch", np.array(switch, np.int32))], "/model/rope/Greater")

    def branch(name: str, sources: tuple[str, str]):
        outs = [f"/model/rope/{name}/{kind}" for kind in ("cos", "sin")]
        nodes = [helper.make_node("Identity", [src], [out], name=f"/model/rope/{name}/Identity_{k}")
                 for k, (src, out) in enumerate(zip(sources, outs))]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(o, helper.np_dtype_to_tensor_dtype(
            g.dtype), None) for o in outs])

    cos, sin = g.op("If", [longer], "/model/rope/If", outputs=2, then_branch=branch("long", long_names),
                    else_branch=branch("short", short))
    return cos, sin


def _norm_weight(module, offset: float = 0.0) -> tuple[np.ndarray, float]:
    """An RMSNorm's scale (its weight, plus `offset` where the family scales by offset + weight) and epsilon."""
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(module, "eps")
    weight = _np(module.weight)
    return (weight + np.float32(offset) if offset else weight), float(eps)


def _projections(layer_prefix: str, parent, names: Sequence[str]) -> list[ProjectionWeights]:
    return [ProjectionWeights.from_module(f"{layer_prefix}.{n}", getattr(parent, n)) for n in names]


def _head_norm(g: _Graph, x: str, module, prefix: str, head_dim: int, offset: float = 0.0) -> str:
    """RMSNorm over head_dim of [batch, seq, heads * head_dim] (Qwen3's and Gemma 3's q_norm / k_norm)."""
    weight, eps = _norm_weight(module, offset)
    stem = prefix.strip("/").replace("/", ".")
    shape = g.constant(f"{stem}.heads_shape", np.array([0, 0, -1, head_dim], np.int64))
    flat = g.constant(f"{stem}.flat_shape", np.array([0, 0, -1], np.int64))
    y = g.op("Reshape", [x, shape], f"{prefix}/Reshape")
    y = _rms_norm(g, y, g.constant(f"{stem}.weight", weight), prefix, eps)
    return g.op("Reshape", [y, flat], f"{prefix}/Reshape_1")


def build_decoder(model, *, fuse: bool = True, active_ranks: dict[str, int | None] | None = None,
                  share_tied: bool = True, levels: Sequence[dict[str, int]] | None = None, level: int = 0,
                  transposed: bool = True, corrective_form: str = DEFAULT_CORRECTIVE_FORM, dtype=np.float32,
                  onnxruntime: tuple[int, int] | None = None, max_context: int | None = None):
    """The decoder as an onnx.ModelProto (weights inline; save with external data).

    dtype: the float type of weights, activations, KV cache and logits (np.float32 or np.float16; see
    "fp16 graphs" in the module docstring); input_ids and attention_mask are int64 either way.

    levels, level: write rank level `level` of `levels` in the prefix layout of `_emit_level_projections`
    (`transposed`: float first stages as FusedMatMul(transB=1); False: MatMul, for the int4 quantizer).
    corrective_form: CALR branches "folded" into the primary factors or written as a "separate" branch.
    onnxruntime: the oldest ONNX Runtime release (major, minor) that must load the graph; None: the newest.
    max_context: the longest sequence (prompt + generated) the graph serves: its rotary tables' rows (None: the
    model's max_position_embeddings); recorded as the graph's `max_context` metadata.
    """
    from onnx import TensorProto, helper

    _check_form(corrective_form)
    _check(model)
    config = model.config
    base = model.model
    layers = base.layers
    n_layers = len(layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = _head_dim(config)
    vocab = config.vocab_size
    max_positions = served_positions(config, max_context)
    g = _Graph(dtype, limits(onnxruntime)[0])
    float_type = helper.np_dtype_to_tensor_dtype(g.dtype)

    # Inputs / outputs.
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", float_type, ["batch_size", "sequence_length", vocab])]
    for i in range(n_layers):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kv}", float_type,
                ["batch_size", kv_heads, "past_sequence_length", head_dim]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kv}", float_type,
                ["batch_size", kv_heads, "total_sequence_length", head_dim]))

    # Sequence lengths for GroupQueryAttention (it derives positions from them).
    mask_sum = g.op("ReduceSum", ["attention_mask", g.constant("one_axis", np.array([1], np.int64))],
                    "/model/attn_mask_reformat/ReduceSum", keepdims=0)
    seqlens = g.op("Sub", [mask_sum, g.constant("one_i64", np.array(1, np.int64))],
                   "/model/attn_mask_reformat/Sub")
    seqlens_k = g.op("Cast", [seqlens], "/model/attn_mask_reformat/seqlens_k", to=TensorProto.INT32)
    mask_shape = g.op("Shape", ["attention_mask"], "/model/attn_mask_reformat/Shape")
    total = g.op("Gather", [mask_shape, g.constant("one_index", np.array(1, np.int64))],
                 "/model/attn_mask_reformat/Gather", axis=0)
    total_len = g.op("Cast", [total], "/model/attn_mask_reformat/total_seq_len", to=TensorProto.INT32)
    cos, sin = _rope_tables(model, max_positions)
    cos_cache, sin_cache = g.constant("cos_cache", cos), g.constant("sin_cache", sin)
    if (long_rope := _long_rope(model, max_positions)) is not None:
        cos_cache, sin_cache = _switched_caches(g, total_len, (cos_cache, sin_cache), long_rope[1:], long_rope[0])
    local_caches = None  # the sliding-window layers' own tables (Gemma 3's local rope base)
    if (local := _local_rotary(model)) is not None:
        cos, sin = _rope_tables(model, max_positions, local)
        local_caches = g.constant("cos_cache_local", cos), g.constant("sin_cache_local", sin)

    # Embedding. Tied fp32/fp16 weights are stored once, MatMul-ready for lm_head (hidden x vocab); the
    # embedding gathers from its Transpose, which ONNX Runtime folds at load (as the genai builder does).
    # Quantized graphs keep a separate embedding: the quantizer rewrites lm_head's MatMul, and int4
    # then gathers from lm_head's 4-bit blocks instead (_share_tied_embedding).
    # Level graphs gather lm_head's columns instead ([hidden, batch, seq], then a Transpose of those few
    # values): a folded table would be a private copy per session, and level sessions share one copy.
    tied_once = share_tied and model.lm_head.weight is base.embed_tokens.weight
    if tied_once and levels is not None:
        columns = g.op("Gather", [g.constant("lm_head.MatMul.weight", _np(model.lm_head.weight).T), "input_ids"],
                       "/model/embed_tokens/Gather", axis=1)
        hidden = g.op("Transpose", [columns], "/model/embed_tokens/Transpose", perm=[1, 2, 0])
    else:
        if tied_once:
            table = g.op("Transpose", [g.constant("lm_head.MatMul.weight", _np(model.lm_head.weight).T)],
                         "/model/embed_tokens/Transpose", perm=[1, 0])
        else:
            table = g.constant("model.embed_tokens.weight", _np(base.embed_tokens.weight))
        hidden = g.op("Gather", [table, "input_ids"], "/model/embed_tokens/Gather")
    embed_scale = getattr(base.embed_tokens, "embed_scale", None)  # Gemma: sqrt(hidden), at the weights' type
    if embed_scale is not None and float(embed_scale) != 1.0:
        hidden = g.op("Mul", [hidden, g.constant("model.embed_tokens.embed_scale", np.array(float(embed_scale)))],
                      "/model/embed_tokens/Mul")

    def emit(x: str, projections: list[ProjectionWeights], prefix: str, packed: bool = False) -> list[str]:
        if levels is not None and any(p.pairs for p in projections):
            return _emit_level_projections(g, x, projections, prefix, levels, level, transposed, corrective_form,
                                           packed=packed)
        return _emit_projections(g, x, projections, prefix, fuse=fuse, packed=packed, active_ranks=active_ranks,
                                 corrective_form=corrective_form)

    spec = architecture_of(model)
    activation = _activation(config)

    def norm_weight(module):
        return _norm_weight(module, spec.norm_offset)

    def output_norm(x: str, layer, name: str | None, i: int) -> str:
        """The family's norm on a branch's output before its residual add, where it has one."""
        if name is None:
            return x
        weight, eps = norm_weight(getattr(layer, name))
        return _rms_norm(g, x, g.constant(f"model.layers.{i}.{name}.weight", weight), f"/model/layers.{i}/{name}",
                         eps)

    residual, normed = hidden, None
    for i, layer in enumerate(layers):
        lp = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        weight, eps = norm_weight(layer.input_layernorm)
        if i == 0:
            normed = _rms_norm(g, hidden, g.constant(f"{lp}.input_layernorm.weight", weight),
                               f"/model/layers.{i}/input_layernorm", eps)
        # else: `normed` and `residual` come from the previous layer's last SkipSimplifiedLayerNorm.

        # Attention.
        qkv = _projections(f"{lp}.self_attn", attn, spec.qkv)
        ys = emit(normed, qkv, f"/model/layers.{i}/attn/qkv_proj", packed=not spec.head_norms)
        if len(ys) == 1:  # packed q/k/v: GroupQueryAttention splits them
            q, k, v = ys[0], "", ""
        else:
            q, k, v = ys
        if spec.head_norms:
            q = _head_norm(g, q, attn.q_norm, f"/model/layers.{i}/attn/q_norm", head_dim, spec.norm_offset)
            k = _head_norm(g, k, attn.k_norm, f"/model/layers.{i}/attn/k_norm", head_dim, spec.norm_offset)
        window = _sliding_window(model, layer)
        caches = local_caches if window is not None and local_caches else (cos_cache, sin_cache)
        rotary = getattr(attn, "use_rope", True)  # SmolLM3's NoPE layers: no rotation, no caches
        if not rotary:
            caches = ()
        attrs = dict(num_heads=heads, kv_num_heads=kv_heads, do_rotary=int(bool(rotary)), rotary_interleaved=0,
                     scale=float(attn.scaling), local_window_size=-1 if window is None else int(window))
        attn_out, _, _ = g.op(
            "GroupQueryAttention",
            [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len,
             *caches],
            f"/model/layers.{i}/attn/GroupQueryAttention",
            outputs=[f"/model/layers.{i}/attn/GroupQueryAttention/output_0", f"present.{i}.key",
                     f"present.{i}.value"],
            domain=MS_DOMAIN, **attrs)
        (o,) = emit(attn_out, _projections(f"{lp}.self_attn", attn, ["o_proj"]), f"/model/layers.{i}/attn/o_proj")

        o = output_norm(o, layer, spec.attention_output_norm, i)
        weight, eps = norm_weight(getattr(layer, spec.mlp_norm))
        normed, residual = _skip_norm(g, o, residual, g.constant(f"{lp}.{spec.mlp_norm}.weight", weight),
                                      f"/model/layers.{i}/{spec.mlp_norm}/SkipLayerNorm", eps)

        # MLP: down(act(gate(x)) * up(x)).
        gate_up = emit(normed, _projections(f"{lp}.mlp", mlp, spec.gate_up), f"/model/layers.{i}/mlp/gate_up_proj")
        if len(gate_up) == 1:  # one fused module: [gate; up]
            gate_up = g.op("Split", gate_up, f"/model/layers.{i}/mlp/gate_up_proj/Split", outputs=2, axis=-1,
                           num_outputs=2)
        gate, up = gate_up
        prod = _gated(g, gate, up, activation, f"/model/layers.{i}/mlp")
        (down,) = emit(prod, _projections(f"{lp}.mlp", mlp, ["down_proj"]), f"/model/layers.{i}/mlp/down_proj")
        down = output_norm(down, layer, spec.mlp_output_norm, i)

        # Next norm (next layer's input norm, or the final norm) fused with the residual add.
        if i + 1 < n_layers:
            weight, eps = norm_weight(layers[i + 1].input_layernorm)
            gamma = g.constant(f"model.layers.{i + 1}.input_layernorm.weight", weight)
            node = f"/model/layers.{i + 1}/input_layernorm/SkipLayerNorm"
            normed, residual = _skip_norm(g, down, residual, gamma, node, eps)
        else:
            weight, eps = norm_weight(base.norm)
            normed = g.op("SkipSimplifiedLayerNormalization",
                          [down, residual, g.constant("model.norm.weight", weight)],
                          "/model/norm/SkipLayerNorm", outputs=["/model/norm/output_0"], domain=MS_DOMAIN,
                          epsilon=eps)

    lm_head = "lm_head.MatMul.weight" if tied_once else g.constant("lm_head.MatMul.weight",
                                                                   _np(model.lm_head.weight).T)  # hidden x vocab
    cap = getattr(config, "final_logit_softcapping", None)  # logits = cap * tanh(logits / cap)
    if cap is None:
        g.op("MatMul", [normed, lm_head], "/lm_head/MatMul", outputs=["logits"])
    else:
        logits = g.op("MatMul", [normed, lm_head], "/lm_head/MatMul")
        cap = g.constant("lm_head.softcap", np.array(float(cap)))
        capped = g.op("Tanh", [g.op("Div", [logits, cap], "/lm_head/softcap/Div")], "/lm_head/softcap/Tanh")
        g.op("Mul", [capped, cap], "/lm_head/softcap/Mul", outputs=["logits"])

    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.initializers)
    opsets = [helper.make_opsetid("", g.opset), helper.make_opsetid(MS_DOMAIN, 1)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="exporter.graph_writer")
    proto.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    # GroupQueryAttention appends to a past buffer bound as its own present: a runtime may share them
    # (exporter.runtime.generation.OrtDecoder's kv_buffer, onnxruntime-genai's past_present_share_buffer).
    # max_context: the rotary tables end there (runtimes read it to stop before running past them).
    helper.set_model_props(proto, {"past_present_share_buffer": "1", "max_context": str(max_positions)})
    return proto


# --------------------------------------------------------------------------- quantization and files


def _quantize_grids(proto, model, bits: int, block_size: int, accuracy_level: int | None, registry=None):
    """MatMulNBits for every MatMul by a constant: the grids the PyTorch model holds (exporter.compress.quantize)
    where it holds them, symmetric round-to-nearest at `bits` and `block_size` elsewhere."""
    from exporter.compress.grid import QuantFormat
    from exporter.graph.matmul_nbits import GridRegistry, quantize_matmuls

    registry = registry if registry is not None else GridRegistry.from_model(model)
    return quantize_matmuls(proto, QuantFormat(bits, block_size, True), registry, accuracy_level)


def _share_tied_embedding(proto, packed_gather: bool = True) -> None:
    """With tied embeddings, gather the embedding from lm_head's blocks.

    MatMulNBits stores lm_head as [vocab, blocks, block_size * bits / 8] uint8 with scales (and packed zero
    points) per (row, block):
    row v is exactly embedding row v quantized along hidden, which is GatherBlockQuantized's layout
    (gather_axis 0, quantize_axis 1). Dropping the fp32 embedding saves vocab x hidden x 4 bytes.
    packed_gather: one GatherBlockQuantized (ONNX Runtime 1.23 and later read this packed uint8 layout);
    otherwise the same bytes are gathered and dequantized with standard operators (`_gather_blocks`).
    An lm_head whose rows sit on grids of several formats (one MatMulNBits per part, exporter.graph.matmul_nbits)
    is gathered from each part at the token's place in it and the part that holds the token selected: the place read
    from the logits' row order where they are reordered (`_select_reordered`), from each part's row indices where
    a base of all rows takes the other parts' logits scattered over it (`_select_scattered`). A quantized lm_head
    whose blocks the gather cannot read is an error: the embedding would stay in the artifact whole, in fp32,
    outside every byte budget.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    init = {t.name: t for t in graph.initializer}
    parts = [n for n in graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/")]
    gather = next((n for n in graph.node if n.name == "/model/embed_tokens/Gather"), None)
    if not parts or gather is None or gather.input[0] not in init:
        return
    vocab, hidden = init[gather.input[0]].dims
    found = []  # (stem, rows, bits, block size, zero points) per part
    for index, part in enumerate(parts):
        attributes = {a.name: helper.get_attribute_value(a) for a in part.attribute}
        bits, block_size, rows = attributes["bits"], attributes["block_size"], attributes["N"]
        zero_points = part.input[3] if len(part.input) > 3 else None
        if hidden % block_size:
            raise ExporterError(f"the tied embedding cannot gather lm_head's blocks of {block_size} from rows of "
                                f"{hidden}: use a block size that divides {hidden}")
        if zero_points and init[zero_points].data_type != 2:  # packed uint8 zero points only
            raise ExporterError("the tied embedding cannot gather lm_head's blocks with float zero points")
        stem = "/model/embed_tokens" if len(parts) == 1 else f"/model/embed_tokens/rows{index}"
        shape_data = helper.make_tensor(f"{stem}/data_shape", 7, [2], [rows, hidden * bits // 8])
        shape_scales = helper.make_tensor(f"{stem}/scales_shape", 7, [2], [rows, hidden // block_size])
        graph.initializer.extend([shape_data, shape_scales])
        found.append((stem, rows, bits, block_size, zero_points, [
            helper.make_node("Reshape", [part.input[1], shape_data.name], [f"{stem}/data"], name=f"{stem}/ReshapeData"),
            helper.make_node("Reshape", [part.input[2], shape_scales.name], [f"{stem}/scales"],
                             name=f"{stem}/ReshapeScales")]))
    scatters = {n.input[2]: n for n in graph.node if n.op_type == "ScatterElements" and n.name.startswith("/lm_head/")}
    rows_held = found[0][1] if scatters else sum(rows for _, rows, *_ in found)  # a scattered base holds them all
    if rows_held != vocab:
        raise ExporterError(f"lm_head's grids hold {rows_held} rows, the tied embedding {vocab}")
    scale_type = init[parts[0].input[2]].data_type
    if len(found) == 1:
        stem, rows, bits, block_size, zero_points, nodes = found[0]
        _gather_quantized(graph, gather, nodes, zero_points, bits, block_size, vocab, hidden, scale_type,
                          packed_gather)
        return
    expands = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Expand"}
    if scatters:
        tokens = [numpy_helper.to_array(init[expands[scatters[p.output[0]].input[1]]]).reshape(-1) for p in parts[1:]]
        nodes, outputs, select = _select_scattered(graph, gather.input[1], vocab, tokens, gather.output[0])
    else:
        order = next(n.input[0] for n in graph.node if n.op_type == "Expand" and n.name.startswith("/lm_head/")
                     and n.name.endswith("/RowOrderExpand"))
        nodes, outputs, select = _select_reordered(graph, gather.input[1], order, [rows for _, rows, *_ in found],
                                                   gather.output[0])
    for (stem, rows, bits, block_size, zero_points, reshapes), (ids, output) in zip(found, outputs):
        nodes += reshapes
        nodes += _gather_nodes(graph, stem, ids, output, zero_points, bits, block_size, rows, hidden, scale_type,
                               packed_gather)
    _replace_gather(graph, gather, nodes + select)


def _select_reordered(graph, ids: str, order: str, counts: list[int], output: str) -> tuple[list, list, list]:
    """A token's embedding from the part of lm_head's rows that holds it, its logits reordered: `order` [1, 1,
    vocab] is each token's place among the parts' rows (part 0's first). Returns (the nodes that find each token's
    place in every part, [(that place in part j, the output part j's gather writes)], the nodes that select each
    token's embedding from those outputs into `output`)."""
    from onnx import helper, numpy_helper

    stem = "/model/embed_tokens"
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{stem}/order_shape"))
    nodes = [helper.make_node("Reshape", [order, f"{stem}/order_shape"], [f"{stem}/order"], name=f"{stem}/Order"),
             helper.make_node("Gather", [f"{stem}/order", ids], [f"{stem}/place"], name=f"{stem}/Place")]
    places, start = [], 0
    for index, count in enumerate(counts):
        key = f"{stem}/rows{index}"
        bounds = [("start", start), ("last", count - 1), ("zero", 0)]
        bounds += [("end", start + count)] if index < len(counts) - 1 else []
        graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int32), f"{key}/{name}") for name, v in bounds)
        nodes += [helper.make_node("Sub", [f"{stem}/place", f"{key}/start"], [f"{key}/offset"], name=f"{key}/Offset"),
                  helper.make_node("Max", [f"{key}/offset", f"{key}/zero"], [f"{key}/low"], name=f"{key}/Low"),
                  helper.make_node("Min", [f"{key}/low", f"{key}/last"], [f"{key}/ids"], name=f"{key}/Ids")]
        places.append((f"{key}/ids", f"{key}/rows"))
        start += count
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{stem}/hidden_axis"))
    selected, select = places[-1][1], []
    for index in range(len(counts) - 2, -1, -1):  # earlier parts hold the lower places
        key = f"{stem}/rows{index}"
        out = output if index == 0 else f"{key}/selected"
        select += [helper.make_node("Less", [f"{stem}/place", f"{key}/end"], [f"{key}/holds"], name=f"{key}/Holds"),
                  helper.make_node("Unsqueeze", [f"{key}/holds", f"{stem}/hidden_axis"], [f"{key}/mask"],
                                   name=f"{key}/Mask"),
                  helper.make_node("Where", [f"{key}/mask", places[index][1], selected], [out], name=f"{key}/Where")]
        selected = out
    return nodes, places, select


def _select_scattered(graph, ids: str, vocab: int, held: list[np.ndarray], output: str) -> tuple[list, list, list]:
    """A token's embedding from the part of lm_head's rows that holds it, its logits scattered: the base (part 0)
    holds every token at its id, part j > 0 the tokens `held[j - 1]` (its rows in order), written over the base's.
    Returns (the nodes that find each token's place in every part, [(that place in part j, the output part j's
    gather writes)], the nodes that select each token's embedding from those outputs into `output`)."""
    from onnx import helper, numpy_helper

    stem = "/model/embed_tokens"
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{stem}/hidden_axis"))
    graph.initializer.append(numpy_helper.from_array(np.array(0, np.int32), f"{stem}/zero"))
    nodes, places, select, selected = [], [(ids, f"{stem}/rows0/rows")], [], f"{stem}/rows0/rows"
    for index, tokens in enumerate(held, start=1):
        key = f"{stem}/rows{index}"
        place = np.full(vocab, -1, np.int32)  # each token's row in this part, -1 where the part does not hold it
        place[tokens] = np.arange(len(tokens), dtype=np.int32)
        graph.initializer.append(numpy_helper.from_array(place, f"{key}/place_of_token"))
        nodes += [helper.make_node("Gather", [f"{key}/place_of_token", ids], [f"{key}/place"], name=f"{key}/Place"),
                  helper.make_node("Max", [f"{key}/place", f"{stem}/zero"], [f"{key}/ids"], name=f"{key}/Ids")]
        places.append((f"{key}/ids", f"{key}/rows"))
        out = output if index == len(held) else f"{key}/selected"
        select += [helper.make_node("GreaterOrEqual", [f"{key}/place", f"{stem}/zero"], [f"{key}/holds"],
                                    name=f"{key}/Holds"),
                   helper.make_node("Unsqueeze", [f"{key}/holds", f"{stem}/hidden_axis"], [f"{key}/mask"],
                                    name=f"{key}/Mask"),
                   helper.make_node("Where", [f"{key}/mask", f"{key}/rows", selected], [out], name=f"{key}/Where")]
        selected = out
    return nodes, places, select


def _quantize_untied_embedding(proto, model, packed_gather: bool = True) -> None:
    """An untied embedding on a grid in PyTorch (exporter.compress.quantize.quantize_embedding: the int4 and int8
    pipelines put it at their bits, as their byte budgets count every parameter at those bits) is stored as that
    grid's blocks and gathered as the tied one is; one without a grid stays a float table."""
    from onnx import helper, numpy_helper

    from exporter.compress.quantize import grid_of
    from exporter.graph.matmul_nbits import pack_codes

    graph = proto.graph
    init = {t.name: t for t in graph.initializer}
    gather = next((n for n in graph.node if n.name == "/model/embed_tokens/Gather"), None)
    grid = grid_of(model.get_input_embeddings())
    if gather is None or gather.input[0] not in init or grid is None:
        return
    table = init[gather.input[0]]  # at the activations' type: the scales take it
    vocab, hidden = table.dims
    fmt, dtype = grid.fmt, helper.tensor_dtype_to_np_dtype(table.data_type)
    if hidden % fmt.block_size or fmt.float_zero:
        raise ValueError(f"the embedding's grid {fmt.name} cannot be gathered in blocks of its rows")
    # the grid's own codes (not a lookup of the table's values, which an fp16 graph holds rounded)
    codes = grid.codes.reshape(vocab, -1, fmt.block_size)
    graph.initializer.extend([
        numpy_helper.from_array(pack_codes(codes, fmt.bits).reshape(vocab, -1), "/model/embed_tokens/data"),
        numpy_helper.from_array(grid.scales.astype(dtype), "/model/embed_tokens/scales")])
    zero_points = None
    if not fmt.symmetric:
        zero_points = "/model/embed_tokens/zero_points"
        graph.initializer.append(numpy_helper.from_array(pack_codes(grid.zeros, fmt.bits), zero_points))
    _gather_quantized(graph, gather, [], zero_points, fmt.bits, fmt.block_size, vocab, hidden, table.data_type,
                      packed_gather)


def _gather_quantized(graph, gather, nodes: list, zero_points: str | None, bits: int, block_size: int, vocab: int,
                      hidden: int, scale_type: int, packed_gather: bool) -> None:
    """Replace the embedding's `gather` by `nodes` (which provide "/model/embed_tokens/data" [vocab, bytes per
    row] and ".../scales" [vocab, blocks] where they are not initializers) and a gather of those blocks."""
    nodes += _gather_nodes(graph, "/model/embed_tokens", gather.input[1], gather.output[0], zero_points, bits,
                           block_size, vocab, hidden, scale_type, packed_gather)
    _replace_gather(graph, gather, nodes)


def _replace_gather(graph, gather, nodes: list) -> None:
    init = {t.name: t for t in graph.initializer}
    position = list(graph.node).index(gather)
    graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    if gather.input[0] in init:
        graph.initializer.remove(init[gather.input[0]])


def _gather_nodes(graph, stem: str, ids: str, output: str, zero_points: str | None, bits: int, block_size: int,
                  vocab: int, hidden: int, scale_type: int, packed_gather: bool) -> list:
    """The rows `ids` of the blocks "{stem}/data" [vocab, bytes per row] and "{stem}/scales" [vocab, blocks]
    dequantized into `output`: GatherBlockQuantized, or its standard-operator form (`_gather_blocks`)."""
    from onnx import helper

    if packed_gather:
        return [helper.make_node(
            "GatherBlockQuantized", [f"{stem}/data", ids, f"{stem}/scales", *([zero_points] if zero_points else [])],
            [output], name=f"{stem}/GatherBlockQuantized", domain=MS_DOMAIN,
            bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1)]
    return _gather_blocks(graph, stem, ids, zero_points, bits, block_size, vocab, hidden, scale_type, output)


def _gather_blocks(graph, stem: str, ids: str, zero_points: str | None, bits: int, block_size: int, vocab: int,
                   hidden: int, scale_type: int, output: str) -> list:
    """Standard-operator nodes for GatherBlockQuantized over "{stem}/data" and "{stem}/scales": the rows' codes
    (below 8 bits: 8 / bits per byte, low bits first), their zero points (packed the same way, default
    2^(bits-1)) and scales gathered, then (q - z) * s, as MatMulNBits dequantizes."""
    from onnx import helper, numpy_helper

    blocks = hidden // block_size
    nodes = []

    def const(key: str, array) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(array), f"{stem}/{key}"))
        return f"{stem}/{key}"

    def node(op: str, inputs: list[str], key: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{stem}/{key}/output_0"], name=f"{stem}/{key}", **attrs))
        return f"{stem}/{key}/output_0"

    def codes(packed: str, key: str, count: int) -> str:
        """[batch, seq, count] float codes from [batch, seq, bytes] uint8."""
        if bits < 8:
            axis = const(f"{key}_axis", np.array([-1], np.int64))
            mask = const(f"{key}_mask", np.array((1 << bits) - 1, np.uint8))
            fields = []
            for i in range(8 // bits):  # field i of byte j holds code j * 8 / bits + i
                shifted = node("BitShift", [packed, const(f"{key}_shift{i}", np.array(i * bits, np.uint8))],
                               f"{key}_Shift{i}", direction="RIGHT") if i else packed
                field = node("BitwiseAnd", [shifted, mask], f"{key}_Field{i}")
                fields.append(node("Unsqueeze", [field, axis], f"{key}_Field{i}Axis"))
            packed = node("Reshape", [node("Concat", fields, f"{key}_Fields", axis=-1),
                                      const(f"{key}_flat", np.array([0, 0, -1], np.int64))], f"{key}_Flat")
            packed = node("Slice", [packed, const(f"{key}_start", np.array([0], np.int64)),
                                    const(f"{key}_end", np.array([count], np.int64)),
                                    const(f"{key}_last", np.array([-1], np.int64))], f"{key}_Count")
        return node("Cast", [packed], f"{key}_Cast", to=scale_type)

    q = codes(node("Gather", [f"{stem}/data", ids], "GatherData"), "data", hidden)
    q = node("Reshape", [q, const("blocks_shape", np.array([0, 0, blocks, block_size], np.int64))], "Blocks")
    last = const("last_axis", np.array([-1], np.int64))
    if zero_points is None:
        z = const("zero_point", np.array(2 ** (bits - 1), helper.tensor_dtype_to_np_dtype(scale_type)))
    else:  # MatMulNBits keeps them flat: [vocab * bytes per row]
        rows = node("Reshape", [zero_points, const("zero_points_shape", np.array([vocab, -1], np.int64))],
                    "ZeroPointRows")
        z = codes(node("Gather", [rows, ids], "GatherZeroPoints"), "zero_points", blocks)
        z = node("Unsqueeze", [z, last], "ZeroPointsAxis")
    s = node("Unsqueeze", [node("Gather", [f"{stem}/scales", ids], "GatherScales"), last], "ScalesAxis")
    y = node("Mul", [node("Sub", [q, z], "Sub"), s], "Mul")
    nodes.append(helper.make_node("Reshape", [y, const("hidden_shape", np.array([0, 0, hidden], np.int64))],
                                  [output], name=f"{stem}/Reshape"))
    return nodes


SIZE_THRESHOLD = 1024  # initializers of at least this many bytes go to the external data file


def _small_weight(tensor) -> bool:
    """Below SIZE_THRESHOLD but external in level artifacts, so levels share it too (tiny models' int4
    blocks); shape and index vectors (int64) stay inline, where shape inference can read them."""
    from onnx import TensorProto

    return tensor.data_type != TensorProto.INT64 and 64 <= len(tensor.raw_data) < SIZE_THRESHOLD


def _save(proto, path: Path, small_weights: bool = False) -> None:
    import onnx
    from onnx.external_data_helper import set_external_data

    data = path.with_name(path.name + ".data")
    for stale in (path, data):  # onnx appends to an existing data file
        if stale.exists():
            stale.unlink()
    if small_weights:
        for tensor in proto.graph.initializer:
            if _small_weight(tensor):
                set_external_data(tensor, data.name)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=SIZE_THRESHOLD)


def _registry(model, weights: str):
    from exporter.graph.matmul_nbits import GridRegistry

    return GridRegistry.from_model(model) if weights in GRID_BITS else None


def _quantized(proto, model, weights: str, block_size: int, accuracy_level: int | None, registry=None,
               onnxruntime: tuple[int, int] | None = None):
    """The proto at `weights` precision (float formats are built at theirs and pass through), checked to run on
    ONNX Runtime `onnxruntime` (None: the newest)."""
    if weights in GRID_BITS:
        _quantize_grids(proto, model, GRID_BITS[weights], block_size, accuracy_level, registry)
        packed = onnxruntime is None or onnxruntime >= PACKED_GATHER_RELEASE
        if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
            _share_tied_embedding(proto, packed_gather=packed)
        else:
            _quantize_untied_embedding(proto, model, packed_gather=packed)
    check_release(proto, onnxruntime, f"the {weights} graph")
    return proto


def _set_props(proto, meta: dict[str, str]) -> None:
    import onnx

    existing = {p.key: p.value for p in proto.metadata_props}
    onnx.helper.set_model_props(proto, {**existing, "writer": "exporter.graph_writer", **meta})


def _save_configs(model, out_dir: Path) -> None:
    model.config.save_pretrained(out_dir)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out_dir)


def write_decoder(model, out_dir: Path, *, weights: str = "fp32", block_size: int = 32,
                  accuracy_level: int | None = None, filename: str = "model.onnx", _fuse: bool = True,
                  corrective_form: str = DEFAULT_CORRECTIVE_FORM, activations: str | None = None,
                  onnxruntime: tuple[int, int] | None = None, max_context: int | None = None) -> Path:
    """Write the fused decoder to out_dir/filename (+ filename.data) and config.json; returns the path.

    weights: "fp32"; "fp16" (weights, activations, KV cache and logits in float16: the module docstring's
    "fp16 graphs"); "int4" and "int8" (MatMulNBits, lm_head included: the grids the model holds, symmetric
    round-to-nearest at `block_size` elsewhere; `accuracy_level`).
    corrective_form: how CALR branches are written, "folded" (default) or "separate" (module docstring).
    activations: "fp32" or "fp16" (int4 only: the CUDA int4 graph); None: fp16 for fp16 weights, else fp32.
    onnxruntime: the oldest ONNX Runtime release (major, minor) that must run the graph (None: the newest);
    an ExporterError names what it lacks.
    max_context: the longest sequence the graph serves (build_decoder); None: the model's max_position_embeddings.
    """
    import onnx

    activations = check_activations(weights, activations)  # its float type is build_decoder's dtype
    _check_form(corrective_form)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        proto = build_decoder(model, fuse=_fuse, share_tied=weights in FLOAT_TYPES, corrective_form=corrective_form,
                              dtype=FLOAT_TYPES[activations], onnxruntime=onnxruntime, max_context=max_context)
    proto = _quantized(proto, model, weights, block_size, accuracy_level, onnxruntime=onnxruntime)
    meta = {"weights": weights, "activations": activations, "fused": str(_fuse),
            "corrective_form": corrective_form}
    if weights in GRID_BITS:
        meta.update(block_size=str(block_size), accuracy_level=str(accuracy_level))
    _set_props(proto, meta)
    path = out_dir / filename
    _save(proto, path)
    onnx.checker.check_model(str(path))
    _save_configs(model, out_dir)
    return path


# --------------------------------------------------------------------------- rank-sliced levels


LEVEL_WEIGHTS = ("fp32", "fp16", "int4", "int8")


def _pair_ranks(model) -> dict[str, list[int]]:
    """Ranks of every decoder projection's pairs (primary first, then correctives); [] for dense ones."""
    ranks, spec = {}, architecture_of(model)
    for i, layer in enumerate(model.model.layers):
        for part, names in (("self_attn", (*spec.qkv, "o_proj")), ("mlp", (*spec.gate_up, "down_proj"))):
            for proj in _projections(f"model.layers.{i}.{part}", getattr(layer, part), names):
                ranks[proj.name] = [pair.rank for pair in proj.pairs]
    return ranks


def level_ranks(model, fractions: Sequence[float], multiple: int = 1,
                corrective_form: str = DEFAULT_CORRECTIVE_FORM) -> list[dict[str, int]]:
    """Primary rank of every low-rank projection at each level: ceil(fraction x allocated rank), rounded up
    so that corrective + primary rank is a multiple of `multiple` (int4: the block size, so a level's second
    stage keeps whole blocks of the full level's), and at most the allocated rank. In the separate
    corrective form the second stage holds the primary rank alone, so that is what gets rounded."""
    separate = _check_form(corrective_form) == "separate"
    levels: list[dict[str, int]] = [{} for _ in fractions]
    for name, pair_ranks in _pair_ranks(model).items():
        if not pair_ranks:
            continue
        full, extra = pair_ranks[0], 0 if separate else sum(pair_ranks[1:])
        for level, fraction in zip(levels, fractions):
            rank = math.ceil(round(fraction * full, 6))  # round: 0.85 * 100 is 85.00000000000001
            level[name] = min(full, -(-(extra + rank) // multiple) * multiple - extra)
    return levels


def sliced_copy(model, ranks: dict[str, int]):
    """A copy of `model` whose low-rank projections keep their first `ranks[name]` primary components (the
    PyTorch reference of a level); corrective branches are kept whole."""
    import copy

    from exporter.compress.factorize import replace_module

    sliced = copy.deepcopy(model)
    for name, rank in ranks.items():
        module = sliced.get_submodule(name)
        primary = module.base if isinstance(module, CorrectedLinear) else module
        if not isinstance(primary, LowRankLinear):
            raise NotImplementedError(f"{name}: cannot slice a {type(primary).__name__}")
        with torch.no_grad():
            smaller = LowRankLinear.from_factors(primary.up.weight[:, :rank], primary.down.weight[:rank],
                                                 primary.up.bias)
        if isinstance(module, CorrectedLinear):
            module.base = smaller
        else:
            replace_module(sliced, name, smaller)
    return sliced


def _external_index(onnx_path: Path) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """name -> (offset, length, dims) of every external initializer of a saved model."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    proto = onnx.load(str(onnx_path), load_external_data=False)
    return {t.name: (ExternalDataInfo(t).offset or 0, ExternalDataInfo(t).length, tuple(t.dims))
            for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}


def _set_external(tensor, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")


def _point_into(proto, data: Path, index: dict) -> None:
    """Make a level graph read its weights from the full level's data file instead of carrying copies.

    A tensor equal to the full level's, or to its prefix along axis 0 (rank-outer factors), becomes an
    external-data entry at the same offset with its own length. A prefix along another axis (the int4
    second stage: MatMulNBits blocks of the rank) reads the full tensor through a Slice, which ONNX Runtime
    folds at load. Every tensor is compared with the bytes it will read, so a layout bug cannot pass silently.
    """
    from onnx import helper, numpy_helper

    mapped = np.memmap(data, dtype=np.uint8, mode="r")
    graph = proto.graph
    for tensor in list(graph.initializer):
        if tensor.name not in index:
            if len(tensor.raw_data) >= SIZE_THRESHOLD or _small_weight(tensor):
                raise ValueError(f"{tensor.name}: level tensor has no counterpart in the full level")
            continue  # small constants stay inline
        offset, length, dims = index[tensor.name]
        array = numpy_helper.to_array(tensor)
        full = np.frombuffer(mapped, array.dtype, length // array.itemsize, offset).reshape(dims)
        axes = [a for a, (n, m) in enumerate(zip(array.shape, dims)) if n != m]
        if array.ndim != len(dims) or len(axes) > 1 or any(array.shape[a] > dims[a] for a in axes):
            raise ValueError(f"{tensor.name}: level shape {array.shape} is not a slice of {dims}")
        axis = axes[0] if axes else 0
        if not np.array_equal(full[(slice(None),) * axis + (slice(0, array.shape[axis]),)], array):
            raise ValueError(f"{tensor.name}: level tensor is not a prefix of the full level's")
        if axis == 0:
            _set_external(tensor, data.name, offset, array.nbytes)
            continue
        sliced = f"{tensor.name}/level_slice"
        for node in graph.node:
            node.input[:] = [sliced if name == tensor.name else name for name in node.input]
        del tensor.dims[:]
        tensor.dims.extend(dims)  # the initializer is now the full tensor
        _set_external(tensor, data.name, offset, length)
        bounds = [numpy_helper.from_array(np.array(v, np.int64), f"{sliced}/{key}")
                  for key, v in (("starts", [0]), ("ends", [array.shape[axis]]), ("axes", [axis]))]
        graph.initializer.extend(bounds)
        graph.node.insert(0, helper.make_node("Slice", [tensor.name, *(b.name for b in bounds)], [sliced],
                                              name=f"/levels/{tensor.name}/Slice"))


def write_levels(model, out_dir: Path, fractions: Sequence[float] = DEFAULT_LEVELS, *, weights: str = "fp32",
                 block_size: int = 32, accuracy_level: int | None = None, progress: bool = True,
                 corrective_form: str = DEFAULT_CORRECTIVE_FORM, activations: str | None = None,
                 onnxruntime: tuple[int, int] | None = None, max_context: int | None = None) -> list[dict]:
    """Write one decoder per rank level, all reading one data file, and config.json; returns the manifest's
    `levels` list.

    Level 0 (fraction 1.0) is model.onnx with model.onnx.data; level rNN is model.rNN.onnx, whose
    external-data entries point into that same model.onnx.data (see `_point_into`). Entries: name,
    fraction, file, and rank_multiple (level ranks are rounded up to it: the int4 block size),
    active_factor_params (primary + corrective factor parameters of the low-rank projections) and
    weight_bytes (the initializers the level reads). `corrective_form` as in `write_decoder`; level ranks
    then come from `level_ranks(model, fractions, rank_multiple, corrective_form)`; `activations` and
    `onnxruntime` as there.
    """
    import onnx
    from onnx import numpy_helper
    from tqdm.auto import tqdm

    fractions = [float(f) for f in fractions]
    try:  # the rule of --levels; the writer's callers get the whole rule in one message
        check_levels(fractions)
    except ExporterError:
        raise ExporterError(f"rank levels must start at 1.0 and strictly decrease within (0, 1], at least 0.01 "
                            f"apart; got {list(fractions)}") from None
    if weights not in LEVEL_WEIGHTS:
        raise ExporterError(f"rank levels are written with weights {', '.join(LEVEL_WEIGHTS)}, not {weights!r}")
    activations = check_activations(weights, activations)
    _check_form(corrective_form)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    multiple = block_size if weights in GRID_BITS else 1
    ranks = level_ranks(model, fractions, multiple, corrective_form)
    extra = {name: sum(r[1:]) for name, r in _pair_ranks(model).items() if r}
    sizes = {name: model.get_submodule(name).in_features + model.get_submodule(name).out_features for name in extra}
    data, index, entries = out_dir / "model.onnx.data", {}, []
    registry = _registry(model, weights)  # once for all levels
    for j, fraction in enumerate(tqdm(fractions, desc="writing levels", unit="level", disable=not progress)):
        name = level_name(fraction)
        path = out_dir / ("model.onnx" if j == 0 else f"model.{name}.onnx")
        with torch.no_grad():
            proto = build_decoder(model, share_tied=weights in FLOAT_TYPES, levels=ranks, level=j,
                                  transposed=weights in FLOAT_TYPES, corrective_form=corrective_form,
                                  dtype=FLOAT_TYPES[activations], onnxruntime=onnxruntime, max_context=max_context)
        proto = _quantized(proto, model, weights, block_size, accuracy_level, registry, onnxruntime)
        meta = {"weights": weights, "activations": activations, "level": name, "fraction": str(fraction),
                "corrective_form": corrective_form}
        if weights in GRID_BITS:
            meta.update(block_size=str(block_size), accuracy_level=str(accuracy_level))
        _set_props(proto, meta)
        weight_bytes = sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
        if j == 0:
            _save(proto, path, small_weights=True)
            index = _external_index(path)
        else:
            _point_into(proto, data, index)
            path.write_bytes(proto.SerializeToString())
        onnx.checker.check_model(str(path))
        entries.append({"name": name, "fraction": fraction, "file": path.name, "rank_multiple": multiple,
                        "active_factor_params": sum((extra[n] + r) * sizes[n] for n, r in ranks[j].items()),
                        "weight_bytes": weight_bytes})
    _save_configs(model, out_dir)
    return entries
