"""`--weights auto`: one format per graph weight (bits and block size) under a byte budget, priced by loss.

Units. The graph multiplies by one MatMulNBits per input it reads (projections sharing an input are one
fused first stage; a folded corrective branch shares its projection's second stage), and one MatMulNBits
has one format, so the linears that feed one node are one unit (`format_units`).

Menu. Every unit can take each format of `MENU` (int4 at blocks 256 to 16, int8 at 128 and 32), each with exact
bytes (QuantFormat.matrix_bytes) and an estimated loss increase; below what that menu reaches, also the 2-bit
formats of `LOW_BIT_MENU` and low-rank options (not lm_head): a unit's linears factorized jointly at rank r
(the whitened SVD of their stacked weights under the input Gram they share, one down factor and an up factor per
linear), both factors on a grid of `LOW_RANK_FORMATS`, the up factor refitted by least squares to the quantized
down factor before its own GPTQ; and row splits: the unit's output rows on two grids, those that save the most
estimate per byte on a 4-bit format of `SPLIT_HIGH`, the rest on `SPLIT_LOW` (GPTQ rounds each row on its own and
the estimate below is a sum over rows, so both are exact from the two formats' grids; one MatMulNBits per grid in
the graph). They fill the bits per weight between 2.5 and 4.1 that no MatMulNBits format has. lm_head's rows are
the vocabulary: a split keeps the tokens that matter on 4 bits (a tied embedding gathers each token's row from
its part's blocks) and the rest, most of a 49152-token vocabulary that calibration text rarely or never shows, on 2.
At every budget lm_head's rows also split between 8 and 4 bits (`HEAD_SPLIT_HIGH`, `HEAD_SPLIT_LOWS`): the few
frequent tokens carry most of a 4-bit head's estimate.

Estimator. Quantizing W to Q moves a linear's output y = W x by E x (E = W - Q). To second order, with the
diagonal empirical Fisher of the loss with respect to y as the Hessian, factored into a weight per output
channel a_i and per position w_t (exporter.compress.importance.output_sensitivity: one backward pass per
sequence prices every linear at once), and the error's energy per output taken from the position-weighted
input Gram G = sum_t w_t x_t x_t^T over the T_G calibration tokens (the same Gram GPTQ minimizes):

    dL ~= 1/2 * sum_i a_i (E G E^T)_ii / T_G

E is the actual GPTQ error of that format, so the estimate sees the grid, the block size and GPTQ's
compensation; for a low-rank option E = W - Q(up) Q(down), truncation and both grids together. Cross-terms
between units are ignored (their errors are independent), so the estimates add.

Data-parallel (torchrun): each process prices every N-th unit, the prices are exchanged, and every process
computes the grids of the options chosen.

Choice. A multiple-choice knapsack (exporter.compress.allocate.multiple_choice_knapsack): the least total
estimated loss whose bytes fit the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from exporter.compress import compute, distributed
from exporter.compress.error_correction import CORRECTION_FORMAT, group_correction, install_correction
from exporter.compress.factorize import install_unit, unit_name, unit_weight
from exporter.compress.gptq import gptq_shared
from exporter.compress.grams import iter_layer_grams
from exporter.compress.grid import GridWeights, QuantFormat, round_to_nearest, scattered, split_rows
from exporter.compress.importance import EMBEDDING, Sensitivity, output_sensitivity, position_weights, token_sensitivity
from exporter.compress.lowrank import CorrectedLinear, LowRankLinear, break_even_rank, decompose
from exporter.compress.quantize import embedding_format, grid_linears, head_gram, module_name, set_grid
from exporter.source.model import layers_prefix

CLIP = False  # the grids' clipping search: measured worse on SmolLM2-135M (benchmarks/RESULTS.md)
# Mostly asymmetric grids (uint8 zero points): as fast as symmetric ones in ONNX Runtime's CPU kernel and closer;
# symmetric b64 and asymmetric b256 are the byte-saving steps (a 576-wide row at b128 pads to 640).
# Min-max grids (float zero points, exact for a Q4_1 source) are offered as offset grids (int4-b32-offset: integer
# zero points, the remainders as offsets multiplying the input's block sums), as fast as integer ones but for the
# block sums' nodes: that kernel runs float zero points ~20x slower.
MENU = tuple(QuantFormat.parse(name) for name in
             ("int4-b256-asym", "int4-b128-asym", "int4-b64", "int4-b64-asym", "int4-b32-asym", "int4-b32-offset",
              "int4-b16-asym", "int8-b128", "int8-b32"))
# 2-bit grids, offered where a budget is below what MENU reaches (exporter.pipeline.choose_formats): ONNX Runtime
# runs 2-bit MatMulNBits about 2x slower per node than 4-bit. A tied embedding gathers 2-bit blocks of lm_head as
# it gathers 4-bit ones (GatherBlockQuantized reads 2, 4 and 8 bits; ONNX Runtime 1.27 and later).
LOW_BIT_MENU = tuple(QuantFormat.parse(name) for name in ("int2-b64-asym", "int2-b32-asym"))
# Low-rank options, offered with LOW_BIT_MENU: the factors' grids, and the ranks as fractions of the unit's
# break-even rank (whole 32-column blocks where the unit is large enough). A factorized unit is two MatMulNBits.
LOW_RANK_FORMATS = tuple(QuantFormat.parse(name) for name in ("int4-b64", "int4-b32-asym"))
# Row-split options, offered with LOW_BIT_MENU: a unit's output rows that save the most estimated loss per byte on
# a 4-bit grid of SPLIT_HIGH, the others on SPLIT_LOW, in SPLIT_PARTS steps of its rows (the bits per weight between
# 2.5 and 4.1 that no single MatMulNBits format has). In the graph: one MatMulNBits per grid, a Concat and a
# GatherElements of the rows back into order (its int32 indices counted in the option's bytes); lm_head's, up to
# SCATTER_MAX_SHARE of its rows on the higher grid, instead multiplies all its rows on the lower grid and writes the
# higher rows over theirs (exporter.graph.matmul_nbits: its logits are the graph's largest tensor), so its bytes
# count those rows twice, their indices, and, tied, each token's place in the higher part (the embedding's gather).
SPLIT_LOW = QuantFormat.parse("int2-b64-asym")
SPLIT_HIGH = tuple(QuantFormat.parse(name) for name in ("int4-b64", "int4-b256-asym"))
SPLIT_PARTS = 16
ROW_INDEX_BYTES = 4
# lm_head's rows split between 8 and 4 bits, offered with MENU (no decoder unit: their rows carry no vocabulary's
# skew, and a split adds ROW_SPLIT_NODES to decoding): the tokens that save the most estimate on HEAD_SPLIT_HIGH, the
# rest on one of HEAD_SPLIT_LOWS, in SPLIT_PARTS steps and at the small shares 1/2^k, k <= HEAD_SPLIT_HALVINGS.
HEAD_SPLIT_HIGH = QuantFormat.parse("int8-b32")
HEAD_SPLIT_LOWS = tuple(QuantFormat.parse(name) for name in ("int4-b32-asym",))
HEAD_SPLIT_HALVINGS = 7
LOW_RANK_FRACTIONS = (0.3, 0.45, 0.6, 0.75)
# Every format an option may write a MatMulNBits in (the decode ceiling's measurement takes them all at once)
WRITTEN_FORMATS = tuple(dict.fromkeys((*MENU, *LOW_BIT_MENU, *LOW_RANK_FORMATS, SPLIT_LOW, *SPLIT_HIGH, HEAD_SPLIT_HIGH,
                                       *HEAD_SPLIT_LOWS, CORRECTION_FORMAT)))
# Rows one GPTQ column loop takes at once (exporter.compress.gptq.gptq_shared; memory: rows x in floats, several
# times): a decoder unit's whole menu goes through one loop, lm_head (49152 rows in SmolLM2) a format at a time.
SHARED_ROWS = 1 << 16


def unit_menu(menu, members: list[str], head_name: str, in_features: int, tied: bool = False) -> list[QuantFormat]:
    """The formats a unit may take: all of `menu`, but no offset format for lm_head and, tied, only blocks that
    divide its rows (the embedding gathers its blocks, which can hold neither offsets nor padding), and offsets only
    where the input is whole blocks (its block sums are a reshape)."""
    head = head_name in members
    return [f for f in menu if not (head and (f.offset or (tied and in_features % f.block_size)))
            and not (f.offset and in_features % f.block_size)]


def low_rank_ranks(out_features: int, in_features: int) -> list[int]:
    """The ranks a unit of this shape may be factorized to (LOW_RANK_FRACTIONS of its break-even rank)."""
    even = break_even_rank(out_features, in_features)
    multiple = 32 if even >= 128 else 8
    return sorted({int(f * even) // multiple * multiple for f in LOW_RANK_FRACTIONS} - {0})


def factorizable(members: list[str], head_name: str) -> bool:
    """Whether a unit may take low-rank options: not lm_head (the tied embedding gathers its rows), and
    siblings of one module (the joint factorization's naming, exporter.compress.factorize.unit_name)."""
    return head_name not in members and len({m.rpartition(".")[0] for m in members}) == 1


def low_rank_bytes(fmt: QuantFormat, rank: int, shapes: list[tuple[int, int]]) -> int:
    """Bytes of a unit whose linears (out, in) share a down factor of `rank` and each keep an up factor."""
    return fmt.matrix_bytes(rank, shapes[0][1]) + sum(fmt.matrix_bytes(out, rank) for out, _ in shapes)


@dataclass
class Unit:
    """Linears written as one MatMulNBits, and each menu format's bytes, estimated loss and grids."""

    name: str
    members: list[str]
    options: list[QuantFormat]
    methods: list[str]  # gptq | rtn, per option
    bytes: list[int]
    loss: list[float]
    grids: list[dict[str, GridWeights]]
    weights: int = 0  # parameters of its linears
    choice: int = -1
    corrections: list[int] = field(default_factory=list)  # per option: rank of its error correction (0: none)
    ranks: list[int] = field(default_factory=list)  # per option: rank of its joint factorization (0: dense)
    splits: list[int] = field(default_factory=list)  # per option: rows on its format, the rest on a lower one (0: none)
    lows: list[str] = field(default_factory=list)  # per option: a row split's lower format ("": SPLIT_LOW or none)

    def correction(self, option: int) -> int:
        return self.corrections[option] if self.corrections else 0

    def rank(self, option: int) -> int:
        return self.ranks[option] if self.ranks else 0

    def split(self, option: int) -> int:
        return self.splits[option] if self.splits else 0

    def split_low(self, option: int) -> QuantFormat:
        """The lower format of a row split (records from before `lows` split to SPLIT_LOW only)."""
        name = self.lows[option] if self.lows else ""
        return QuantFormat.parse(name) if name else SPLIT_LOW

    def add(self, fmt: QuantFormat, method: str, grids: dict | None, size: int, loss: float, correction: int = 0,
            rank: int = 0, split: int = 0, low: QuantFormat | None = None) -> None:
        """One more menu option (`low`: a row split's lower format)."""
        for values, value in ((self.options, fmt), (self.methods, method), (self.grids, grids), (self.bytes, size),
                              (self.loss, loss), (self.corrections, correction), (self.ranks, rank),
                              (self.splits, split), (self.lows, low.name if split and low else "")):
            values.append(value)

    def format_name(self, option: int) -> str:
        """The option's format; a row split's as `high/low`."""
        name = self.options[option].name
        return f"{name}/{self.split_low(option).name}" if self.split(option) else name

    def record(self) -> dict:
        """Everything but the grids, for the statistics store (`from_record` reads it back)."""
        return {"name": self.name, "members": self.members, "options": [f.name for f in self.options],
                "methods": self.methods, "bytes": self.bytes, "loss": self.loss, "weights": self.weights,
                "corrections": self.corrections, "ranks": self.ranks, "splits": self.splits, "lows": self.lows}

    @classmethod
    def from_record(cls, record: dict) -> Unit:
        """A priced unit without grids (`fill_chosen_grids` computes the chosen option's)."""
        return cls(record["name"], record["members"], [QuantFormat.parse(f) for f in record["options"]],
                   record["methods"], record["bytes"], record["loss"], [None] * len(record["options"]),
                   weights=record["weights"], corrections=record["corrections"], ranks=record.get("ranks", []),
                   splits=record.get("splits", []), lows=record.get("lows", []))

    @staticmethod
    def narrowed(record: dict, menu) -> dict:
        """A record priced on a wider menu (a lower budget's: 2-bit grids, low-rank options, row splits) narrowed to
        the options of `menu`, in their order: its formats, and row splits between two of them; each option's bytes
        and estimate are those a pricing of `menu` alone gives (every grid is its own GPTQ, every estimate its own
        error's), so they serve it as they are."""
        names, count = {f.name for f in menu}, len(record["options"])
        ranks, splits = record.get("ranks") or [0] * count, record.get("splits") or [0] * count
        lows = record.get("lows") or [""] * count
        keep = [k for k in range(count) if record["options"][k] in names and not ranks[k]
                and (not splits[k] or (lows[k] or SPLIT_LOW.name) in names)]
        fields = ("options", "methods", "bytes", "loss", "corrections", "ranks", "splits", "lows")
        return {**record, **{name: [record[name][k] for k in keep] for name in fields if record.get(name)}}

    def to_dict(self) -> dict:
        return {"unit": self.name, "weights": self.weights, "format": self.format_name(self.choice),
                "method": self.methods[self.choice], "correction_rank": self.correction(self.choice),
                "rank": self.rank(self.choice) or None, "high_rows": self.split(self.choice) or None,
                "bytes": self.bytes[self.choice], "predicted_loss_increase": self.loss[self.choice],
                "menu": [{"format": self.format_name(k), "method": m, "correction_rank": self.correction(k),
                          "rank": self.rank(k) or None, "high_rows": self.split(k) or None, "bytes": b,
                          "predicted_loss_increase": loss}
                         for k, (m, b, loss) in enumerate(zip(self.methods, self.bytes, self.loss))]}


def option_matrices(unit: Unit, option: int, in_features: int, head: bool) -> list[tuple[int, str]]:
    """(weights, format name) of each MatMulNBits an option writes for a unit whose linears read `in_features`
    (`head`: lm_head, whose small row splits are scattered), as the writer does: a row split's two parts (a scattered
    one's lower part over all rows), a factorization's two factors, an error correction's two beside the unit's."""
    fmt, rows = unit.options[option], unit.weights // in_features
    high, rank, correction = unit.split(option), unit.rank(option), unit.correction(option)
    if high:
        low = unit.split_low(option).name
        below = rows if head and scattered(high, rows) else rows - high
        return [(high * in_features, fmt.name), (below * in_features, low)]
    if rank:
        return [(rank * in_features, fmt.name), (rows * rank, fmt.name)]
    added = [(correction * in_features, fmt.name), (rows * correction, CORRECTION_FORMAT.name)] if correction else []
    return [(unit.weights, fmt.name), *added]


def format_units(model) -> list[list[str]]:
    """Groups of grid linears that one MatMulNBits holds: those reading one input tensor (found by running
    one short sequence), each folded corrective branch's up factor with its projection's up factor."""
    linears = grid_linears(model)
    by_module = {id(m): name for name, m in linears.items()}
    seen: dict[tuple, tuple] = {}  # (address, shape) -> (the input, readers)

    def hook(name):
        def grab(_module, args):
            x = args[0]
            # holding x keeps its memory from going to a later tensor of the same shape
            seen.setdefault((x.data_ptr(), tuple(x.shape)), (x, []))[1].append(name)
        return grab

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    sample = torch.arange(min(8, model.config.vocab_size)).unsqueeze(0)
    try:
        with torch.no_grad():
            model(sample, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    parent = list(range(len(linears)))
    index = {name: i for i, name in enumerate(linears)}

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: str, b: str):
        parent[find(index[a])] = find(index[b])

    for _x, names in seen.values():
        for other in names[1:]:
            union(other, names[0])
    for module in model.modules():
        if isinstance(module, CorrectedLinear) and isinstance(module.base, LowRankLinear):
            union(by_module[id(module.corrective_up)], by_module[id(module.base.up)])
    groups: dict[int, list[str]] = {}
    for name in linears:
        groups.setdefault(find(index[name]), []).append(name)
    return list(groups.values())


def _error(weight: torch.Tensor, grid: GridWeights) -> torch.Tensor:
    return weight.detach().double() - torch.from_numpy(grid.dequantize()).double()


def estimated_loss(weight: torch.Tensor, grid: GridWeights, gram: torch.Tensor, fisher: torch.Tensor,
                   tokens: int) -> float:
    return error_loss(_error(weight, grid), gram, fisher, tokens)


def error_loss(error: torch.Tensor, gram: torch.Tensor, fisher: torch.Tensor, tokens: int) -> float:
    """1/2 sum_i a_i (E G E^T)_ii / T: the loss increase a weight error E (out x in) is estimated to cost."""
    return 0.5 * float(fisher.double() @ _output_errors(error, gram)) / tokens


def _output_errors(error: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """(E G E^T)_ii per output row i, in float64: the product in float32 (relative error about 1e-9 on SmolLM2's
    units, half float64's time: the pricing's largest share after GPTQ), its row sums in float64."""
    error = error.float()
    return ((error @ gram.float()) * error).sum(dim=1, dtype=torch.float64)


def corrected_options(members: list[str], linears: dict, grams: dict, fisher: dict, grids: dict, fmt: QuantFormat,
                      ranks: tuple[int, ...], tokens: int) -> list[tuple[int, int, float, dict]]:
    """(rank, bytes added, estimated loss, grids) of each whitened error correction rank for a unit whose members
    sit on `grids` (exporter.compress.error_correction: one R on the unit's format, L at CORRECTION_FORMAT; each
    output channel weighted by its Fisher, as the estimate is)."""
    errors = {n: _error(linears[n].weight, grids[n]) for n in members}
    channels = torch.cat([fisher[n] for n in members])
    found = []
    for rank in ranks:
        down_grid, up_grids = group_correction(errors, grams, rank, fmt, channels=channels)
        down = torch.from_numpy(down_grid.dequantize()).double()
        chosen, loss = {}, 0.0
        for n in members:
            residual = errors[n] - torch.from_numpy(up_grids[n].dequantize()).double() @ down
            loss += error_loss(residual, grams[n], fisher[n], tokens)
            chosen[f"{n}.corrective_down"], chosen[f"{n}.corrective_up"] = down_grid, up_grids[n]
        added = fmt.matrix_bytes(rank, linears[members[0]].in_features) + sum(
            CORRECTION_FORMAT.matrix_bytes(linears[n].out_features, rank) for n in members)
        found.append((rank, added, loss, chosen))
    return found


def row_losses(statistics: PricingStatistics, members: list[str], grids: dict) -> torch.Tensor:
    """The estimate of each output row on `grids`, the members' rows stacked (the estimate is a sum over rows); a
    tied lm_head's rows also carry their embedding rows' (`embedding_loss`, row by row)."""
    parts = []
    for n in members:
        error = _error(statistics.linears[n].weight, grids[n])
        losses = 0.5 * statistics.fisher[n].double() * _output_errors(error, statistics.grams[n]) / statistics.tokens
        if statistics.tied and n == statistics.head_name:
            losses += 0.5 * statistics.embedding_row_weights * (error**2 @ statistics.fisher[EMBEDDING].double())
        parts.append(losses)
    return torch.cat(parts)


def split_counts(rows: int, halvings: int = 0) -> list[int]:
    """The rows a split puts on its higher format: each SPLIT_PARTS-th share, and the shares 1/2^k, k <= halvings."""
    counts = {rows * k // SPLIT_PARTS for k in range(1, SPLIT_PARTS)} | {rows >> k for k in range(1, halvings + 1)}
    return sorted(counts - {0, rows})


def unit_splits(members: list[str], head_name: str, formats) -> list[tuple[QuantFormat, QuantFormat, int]]:
    """(higher format, lower format, halvings of `split_counts`) of each row split a unit whose menu holds `formats`
    is offered: SPLIT_HIGH over SPLIT_LOW where SPLIT_LOW is offered; lm_head also HEAD_SPLIT_HIGH over each of
    HEAD_SPLIT_LOWS."""
    pairs = [(high, SPLIT_LOW, 0) for high in SPLIT_HIGH]
    if head_name in members:
        pairs += [(HEAD_SPLIT_HIGH, low, HEAD_SPLIT_HALVINGS) for low in HEAD_SPLIT_LOWS]
    return [(high, low, halvings) for high, low, halvings in pairs if high in formats and low in formats]


def split_options(statistics: PricingStatistics, members: list[str], high: QuantFormat, high_grids: dict,
                  low: QuantFormat, low_grids: dict, counts: list[int]) -> list[tuple[int, int, float, dict]]:
    """(rows on `high`, bytes, estimated loss, grids) of each row split of a unit between `high_grids` and
    `low_grids` (grids of the members' whole weights on `low`): the rows that save the most estimate on the
    high grid (bytes per row are equal) go there, `counts` of them (`split_counts`). Bytes: as the graph writes it
    (SPLIT_LOW's comment above)."""
    linears = statistics.linears
    low_losses = row_losses(statistics, members, low_grids)
    saved = (low_losses - row_losses(statistics, members, high_grids)).numpy()
    order = np.argsort(-saved, kind="stable")  # ties in row order: the same rows whenever it is recomputed
    rows, width = len(order), linears[members[0]].in_features
    found = []
    for count in counts:
        chosen = np.sort(order[:count])
        grids, start = {}, 0
        for n in members:
            end = start + linears[n].out_features
            grids[n] = split_rows(high_grids[n], low_grids[n], chosen[(chosen >= start) & (chosen < end)] - start)
            start = end
        if statistics.head_name in members and scattered(count, rows):  # written over all rows on `low`
            size = high.matrix_bytes(count, width) + low.matrix_bytes(rows, width) + ROW_INDEX_BYTES * count
            size += ROW_INDEX_BYTES * rows if statistics.tied else 0
        else:
            size = high.matrix_bytes(count, width) + low.matrix_bytes(rows - count, width) + ROW_INDEX_BYTES * rows
        found.append((count, size, float(low_losses.sum()) - float(saved[chosen].sum()), grids))
    return found


def low_rank_options(members: list[str], linears: dict, grams: dict, fisher: dict, formats, ranks: list[int],
                     tokens: int) -> list[tuple[QuantFormat, int, int, float, dict]]:
    """(format, rank, bytes, estimated loss, grids) of each low-rank option of a unit: its linears' stacked
    weight factorized by the whitened SVD under the Gram they share (exporter.compress.lowrank.decompose), the
    down factor on its grid by GPTQ on that Gram, the up factor refitted by least squares to the quantized down
    factor (its input is that factor's output) and put on its grid by GPTQ on the down factor's output Gram.
    Grids: `{first member}.down`, `{member}.up`."""
    weight = torch.cat([linears[n].weight.detach() for n in members]).double()
    gram = grams[members[0]].double()
    rows = [linears[n].out_features for n in members]
    decomposition = decompose(weight, gram, max_rank=max(ranks))
    # GPTQ rounds rows on their own, so the down factor of each rank is the first rows of the largest rank's
    downs = gptq_shared([decomposition.down] * len(formats), gram, list(formats), CLIP)
    found = []
    for fmt, largest in zip(formats, downs):
        for rank in ranks:
            down_grid = largest.first_rows(rank)
            down = torch.from_numpy(down_grid.dequantize()).double()
            up_gram = down @ gram @ down.T
            shift = 1e-8 * up_gram.diagonal().mean().clamp_min(1e-30) * torch.eye(rank, dtype=torch.float64)
            up = torch.linalg.solve(up_gram + shift, down @ gram @ weight.T).T  # min ||(W - up down) X||
            chosen, loss = {f"{members[0]}.down": down_grid}, 0.0
            up_grids = gptq_shared(list(up.split(rows)), up_gram, [fmt] * len(members), CLIP)
            for n, up_grid, original in zip(members, up_grids, weight.split(rows)):
                residual = original - torch.from_numpy(up_grid.dequantize()).double() @ down
                loss += error_loss(residual, grams[n], fisher[n], tokens)
                chosen[f"{n}.up"] = up_grid
            size = low_rank_bytes(fmt, rank, [(linears[n].out_features, linears[n].in_features) for n in members])
            found.append((fmt, rank, size, loss, chosen))
    return found


def embedding_loss(weight: torch.Tensor, grid: GridWeights, row_weights: torch.Tensor, fisher: torch.Tensor) -> float:
    """The estimate for a tied embedding's rows: its Gram is diagonal, each row weighted by its token's share of the
    calibration and sensitivity (`PricingStatistics.embedding_row_weights`)."""
    return 0.5 * float(fisher @ (row_weights @ _error(weight, grid) ** 2))


@dataclass
class PricingStatistics:
    """What prices every menu option of every unit and computes its grids: the output sensitivities, the
    position-weighted input Grams (lm_head's plain), each token's share of the calibration and its sensitivity
    (read by a tied embedding's term only: zeros and ones where the embedding is untied)."""

    linears: dict
    sensitivity: dict[str, Sensitivity]
    grams: dict[str, torch.Tensor]
    share: torch.Tensor
    head_name: str
    tied: bool
    tokens: int
    token_sensitivity: torch.Tensor
    # the dense model's head inputs on every calibration window, as the Gram pass computed them (on the host;
    # None where data-parallel ranks each held a share): scale tuning's teacher reads them instead of running
    # the dense model on those windows again (corrective.TeacherTargets)
    head_inputs: torch.Tensor | None = None

    @property
    def fisher(self) -> dict[str, torch.Tensor]:
        return {name: s.channels for name, s in self.sensitivity.items()}

    @property
    def embedding_row_weights(self) -> torch.Tensor:
        """Each row's weight in a tied embedding's estimate: its token's share times its token's sensitivity."""
        return self.share * self.token_sensitivity


def pricing_statistics(model, input_ids: torch.Tensor, fisher_ids: torch.Tensor | None = None,
                       sensitivity: dict[str, Sensitivity] | None = None, progress: bool = True) -> PricingStatistics:
    """The statistics of `price_units`; the sensitivities from `fisher_ids` (one backward pass per sequence)
    unless given (read from the statistics store), the Grams from `input_ids` (one forward pass per layer)."""
    linears = grid_linears(model)
    if sensitivity is None:
        sensitivity = output_sensitivity(model, fisher_ids, list(linears), progress)
    tokens = input_ids.numel()
    grams: dict[str, torch.Tensor] = {}
    last: list = []  # the last layer's outputs: lm_head's Gram without another pass through the layers
    for _index, _layer, layer_grams in iter_layer_grams(model, input_ids, progress=progress,
                                                        position_weights=position_weights(sensitivity),
                                                        last_outputs=last):
        grams.update(layer_grams)
    head = model.get_output_embeddings()
    head_name = module_name(model, head)
    tied = head.weight is model.get_input_embeddings().weight
    # each token's expected share of the calibration, weighted by its position as the embedding's output
    # sensitivity says: the first token's own, then the model's next-token probabilities (read in the head's Gram
    # pass). Counts of the calibration's own tokens (16K of them, 3.2K distinct) left 20% of that mass on tokens it
    # never shows, and a split of lm_head's rows put tokens a test text uses on 2-bit embedding rows: estimated
    # 0.027 nats, measured 0.178 (benchmarks/RESULTS.md, "lm_head's rows split")
    at = sensitivity[EMBEDDING].positions[: input_ids.shape[1]].double()
    share = torch.zeros(head.out_features, dtype=torch.float64, device=compute.current())

    def predicted(_module, _args, logits):
        probabilities = torch.softmax(logits.float(), dim=-1)[:, :-1]
        share.add_(torch.einsum("t,btv->v", at[1 : logits.shape[1]].to(probabilities), probabilities).double())

    # the softmax over the vocabulary at every calibration token is work only a tied embedding's term reads
    handle = head.register_forward_hook(predicted) if tied else None
    inputs: list[torch.Tensor] = []
    keep = None if distributed.active() else head.register_forward_pre_hook(
        lambda _module, args: inputs.append(args[0].detach().float().cpu()))
    try:
        grams[head_name] = head_gram(model, input_ids, last_outputs=last)
    finally:
        for h in (handle, keep):
            if h is not None:
                h.remove()
    if tied:
        distributed.sum_over_ranks([share])  # data-parallel: each rank's sequences
        share.index_add_(0, input_ids[:, 0].to(share.device), at[0].expand(input_ids.shape[0]).to(share))
    share = share.cpu() / tokens
    weights = token_sensitivity(sensitivity[EMBEDDING], share) if tied else torch.ones_like(share)
    head_inputs = torch.cat(inputs) if keep is not None else None
    return PricingStatistics(linears, sensitivity, grams, share, head_name, tied, tokens, weights, head_inputs)


def _grids(statistics: PricingStatistics, members: list[str], fmt: QuantFormat, method: str) -> dict:
    if method == "gptq":
        return gptq_grids(statistics, members, [fmt])[0]
    return {n: round_to_nearest(statistics.linears[n].weight.detach().float().numpy(), fmt, CLIP) for n in members}


def gptq_grids(statistics: PricingStatistics, members: list[str], formats: list[QuantFormat]) -> list[dict]:
    """Each format's GPTQ grids of a unit's members, members that share a Gram (they read one input) and as many
    formats as SHARED_ROWS holds in one column loop: the grids one call per linear and format would give."""
    linears, grams = statistics.linears, statistics.grams
    found = [{} for _ in formats]
    by_gram: dict[int, list[str]] = {}
    for n in members:
        by_gram.setdefault(id(grams[n]), []).append(n)
    for names in by_gram.values():
        weights = [linears[n].weight for n in names]
        step = max(1, SHARED_ROWS // sum(w.shape[0] for w in weights))
        for first in range(0, len(formats), step):
            batch = formats[first : first + step]
            grids = iter(gptq_shared([w for _ in batch for w in weights], grams[names[0]],
                                     [f for f in batch for _ in weights], CLIP))
            for k in range(first, first + len(batch)):
                found[k].update({n: next(grids) for n in names})
    return found


def price_units(model, input_ids: torch.Tensor, fisher_ids: torch.Tensor, menu=MENU, progress: bool = True,
                groups: list[list[str]] | None = None, corrections: tuple[int, ...] = (),
                statistics: PricingStatistics | None = None, low_rank: tuple[QuantFormat, ...] = ()) -> list[Unit]:
    """Every unit's menu: bytes, estimated loss and the grids of each format (GPTQ; a tied lm_head also
    round-to-nearest, whose rows serve the embedding better than GPTQ's error-spreading ones may); with
    `corrections`, each int4 format of a decoder unit also with a whitened error correction of each rank; with
    `low_rank` (factor formats), each factorizable unit also at each of its `low_rank_ranks`; and the unit's row
    splits between two of its formats (`unit_splits`, `split_options`)."""
    from tqdm.auto import tqdm

    statistics = statistics or pricing_statistics(model, input_ids, fisher_ids, progress=progress)
    linears, grams, fisher, tokens = statistics.linears, statistics.grams, statistics.fisher, statistics.tokens
    head_name, tied = statistics.head_name, statistics.tied
    head = linears[head_name]
    groups = groups or format_units(model)
    mine, merge = distributed.split_work(list(range(len(groups))))  # data-parallel: every N-th unit per rank
    priced: dict[int, Unit] = {}
    for index in tqdm(mine, desc="pricing formats", unit="unit", disable=not progress):
        members = groups[index]
        methods = ("gptq", "rtn") if tied and head_name in members else ("gptq",)
        unit = Unit(unit_name(members), members, [], [], [], [], [],
                    weights=sum(linears[n].weight.numel() for n in members))
        formats = unit_menu(menu, members, head_name, linears[members[0]].in_features, tied)
        for fmt, shared in zip(formats, gptq_grids(statistics, members, formats)):
            for method in methods:
                grids = shared if method == "gptq" else _grids(statistics, members, fmt, method)
                loss = sum(estimated_loss(linears[n].weight, grids[n], grams[n], fisher[n], tokens) for n in members)
                if tied and head_name in members:
                    loss += embedding_loss(head.weight, grids[head_name], statistics.embedding_row_weights,
                                           fisher[EMBEDDING])
                size = sum(fmt.matrix_bytes(*linears[n].weight.shape) for n in members)
                unit.add(fmt, method, grids, size, loss)
                if corrections and fmt.bits == 4 and not fmt.offset and head_name not in members:
                    for rank, added, corrected, extra in corrected_options(members, linears, grams, fisher, grids,
                                                                           fmt, corrections, tokens):
                        unit.add(fmt, method, {**grids, **extra}, size + added, corrected, correction=rank)
        ranks = low_rank_ranks(sum(linears[n].out_features for n in members), linears[members[0]].in_features) \
            if low_rank and factorizable(members, head_name) else []
        if ranks:  # a unit too small for any rank below its break-even has none
            for fmt, rank, size, loss, grids in low_rank_options(members, linears, grams, fisher, low_rank, ranks,
                                                                 tokens):
                unit.add(fmt, "gptq", grids, size, loss, rank=rank)
        gptq_of = {f: unit.grids[k] for k, (f, m) in enumerate(zip(unit.options, unit.methods))
                   if m == "gptq" and not unit.correction(k) and not unit.rank(k)}
        rows = sum(linears[n].out_features for n in members)
        for high, low, halvings in unit_splits(members, head_name, gptq_of):
            for count, size, loss, grids in split_options(statistics, members, high, gptq_of[high], low, gptq_of[low],
                                                          split_counts(rows, halvings)):
                unit.add(high, "gptq", grids, size, loss, split=count, low=low)
        priced[index] = unit
    if len(mine) == len(groups):
        return [priced[index] for index in range(len(groups))]
    # the other ranks' units as records, without grids: each rank computes the chosen ones (fill_chosen_grids)
    records = merge({index: unit.record() for index, unit in priced.items()})
    return [priced[index] if index in priced else Unit.from_record(records[index]) for index in range(len(groups))]


def option_grids(statistics: PricingStatistics, unit: Unit, option: int) -> dict[str, GridWeights]:
    """The grids of one option of a unit, exactly as `price_units` computes them (GPTQ and the correction's SVD
    are deterministic): for units whose prices were read from the statistics store, which keeps no grids."""
    members, fmt, rank = unit.members, unit.options[option], unit.correction(option)
    if unit.split(option):
        low = unit.split_low(option)
        high_grids, low_grids = gptq_grids(statistics, members, [fmt, low])  # one column loop where rows allow
        (*_, grids), = split_options(statistics, members, fmt, high_grids, low, low_grids, [unit.split(option)])
        return grids
    if unit.rank(option):
        (*_, grids), = low_rank_options(members, statistics.linears, statistics.grams, statistics.fisher, (fmt,),
                                        [unit.rank(option)], statistics.tokens)
        return grids
    grids = _grids(statistics, members, fmt, unit.methods[option])
    if rank:
        (_rank, _added, _loss, extra), = corrected_options(members, statistics.linears, statistics.grams,
                                                           statistics.fisher, grids, fmt, (rank,), statistics.tokens)
        grids.update(extra)
    return grids


def fill_chosen_grids(units: list[Unit], statistics: PricingStatistics) -> None:
    """Compute the chosen option's grids of every unit that has none (its prices were read from the store)."""
    for unit in units:
        if unit.grids[unit.choice] is None:
            unit.grids[unit.choice] = option_grids(statistics, unit, unit.choice)


def byte_range(model, groups: list[list[str]], menu=MENU, embedding_block_size: int = 32,
               low_rank: tuple[QuantFormat, ...] = ()) -> tuple[int, int, int]:
    """(smallest, largest) weight bytes the menu (with `low_rank`: and the low-rank options) allows for the units
    `groups`, fixed bytes included, and the bytes of the smallest option of any unit (it sets the knapsack's
    granularity): known before any pricing."""
    linears = grid_linears(model)
    head_name = module_name(model, model.get_output_embeddings())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    per_unit = []
    for members in groups:
        shapes = [tuple(linears[n].weight.shape) for n in members]
        sizes = [sum(f.matrix_bytes(*shape) for shape in shapes)
                 for f in unit_menu(menu, members, head_name, shapes[0][1], tied)]
        if low_rank and factorizable(members, head_name):
            ranks = low_rank_ranks(sum(out for out, _ in shapes), shapes[0][1])
            sizes += [low_rank_bytes(f, rank, shapes) for f in low_rank for rank in ranks]
        per_unit.append(sizes)
    fixed = fixed_bytes(model, embedding_block_size)
    return (fixed + sum(min(b) for b in per_unit), fixed + sum(max(b) for b in per_unit),
            min(min(b) for b in per_unit))


def fixed_bytes(model, embedding_block_size: int = 32) -> int:
    """Weight bytes outside the units: float parameters the graph stores as they are (norms, biases), and an
    untied embedding, which the int4 graph stores as 4-bit blocks of `embedding_block_size` (exporter.graph.
    writer); a tied embedding is gathered from lm_head's blocks."""
    grid_weights = {id(m.weight) for m in grid_linears(model).values()}
    embedding = model.get_input_embeddings().weight
    total = 0
    for p in model.parameters():
        if p is embedding and id(p) not in grid_weights and p.shape[1] % embedding_block_size == 0:
            total += embedding_format(embedding_block_size).matrix_bytes(*p.shape)
        elif id(p) not in grid_weights:
            total += p.numel() * 4
    return total


def apply_choices(model, units: list[Unit]) -> None:
    """Each unit's chosen grids into the model; a chosen error correction as a CorrectedLinear per member, a
    chosen factorization as LowRankLinears sharing one down factor (exporter.compress.factorize.install_unit)."""
    linears = grid_linears(model)
    for unit in units:
        grids = unit.grids[unit.choice]
        if unit.rank(unit.choice):
            install_low_rank(model, unit.members, grids)
            continue
        for name in unit.members:
            set_grid(linears[name], grids[name])
        if unit.correction(unit.choice):
            install_correction(model, linears, unit.members, grids[f"{unit.members[0]}.corrective_down"],
                               {n: grids[f"{n}.corrective_up"] for n in unit.members})


def install_low_rank(model, members: list[str], grids: dict) -> None:
    """The members' LowRankLinears (one down factor, their biases on the up factors) holding `grids`."""
    def weight(grid: GridWeights) -> torch.Tensor:
        return torch.from_numpy(grid.dequantize())

    name = unit_name(members)
    dense, bias = unit_weight(model, name)  # the members' biases stacked (absent ones as zeros)
    down_grid, up_grids = grids[f"{members[0]}.down"], [grids[f"{n}.up"] for n in members]
    module = LowRankLinear.from_factors(torch.cat([weight(g) for g in up_grids]), weight(down_grid),
                                        None if bias is None else bias.detach())
    parts = install_unit(model, name, module.to(dense.dtype))
    set_grid(parts[0].down, down_grid)
    for part, grid in zip(parts, up_grids):
        set_grid(part.up, grid)


def layer_of(name: str, model) -> int | None:
    prefix = layers_prefix(model) + "."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix):].split(".", 1)[0])

