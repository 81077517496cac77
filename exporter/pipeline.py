"""The export job: load -> calibrate -> factorize -> export ONNX -> check parity -> write artifact."""

from __future__ import annotations

import copy
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from exporter import __version__
from exporter.artifact.golden import write_golden
from exporter.artifact.manifest import (
    FORMAT_VERSION,
    Level,
    Manifest,
    Method,
    OnnxGraph,
    OrtFormat,
    Parameters,
    RankEntry,
    ScheduleEntry,
    SourceModel,
    write_manifest,
)
from exporter.artifact.report import write_report
from exporter.artifact.staging import check_target, staging_dir
from exporter.compress import compute, distributed, statistics_store
from exporter.compress.allocate import Allocation, allocate, allocation_curve
from exporter.compress.corrective import (
    CorrectiveOptions,
    attach_correctives,
    branch_ranks,
    branch_weights,
    dense_teacher,
    settle_ranks,
    train_correctives,
)
from exporter.compress.error_correction import CORRECTION_FORMAT
from exporter.compress.factorize import (
    apply_ranks,
    corrective_ranks,
    count_params,
    decoder_projections,
    decompose_model,
    effective_ranks,
    parameter_summary,
    uniform_ranks,
)
from exporter.compress.grid import QuantFormat
from exporter.compress.importance import SENSITIVITY_FIELDS, Sensitivity, component_fisher
from exporter.compress.lowrank import CorrectedLinear, LowRankLinear
from exporter.compress.quantize import METHODS as QUANTIZERS
from exporter.compress.quantize import (grid_linears, model_grids, module_name, quantize_embedding, quantize_model,
                                       restore_grids)
from exporter.console import say
from exporter.device.cost_model import (BYTES_PER_PARAM, DECODE_CEILING, HEAD_SPLIT_COST, MB, REFERENCE_FORMAT,
                                        ROW_SPLIT_COST, decode_costs, format_costs, node_price, projection_budget,
                                        weight_budget)
from exporter.device.profiles import load_profile
from exporter.errors import BudgetError, ExporterError
from exporter.graph.genai_config import write_genai_config
from exporter.graph.matmul_nbits import BLOCK_SUM_NODES, ROW_SPLIT_NODES, TIED_SPLIT_NODES
from exporter.graph.onnxruntime_releases import (
    EIGHT_BIT_MATMUL_RELEASE,
    TWO_BIT_MATMUL_RELEASE,
    check_release,
    oldest_release,
    parse_release,
)
from exporter.graph.onnxruntime_releases import name as release_name
from exporter.graph.optimum_export import check_parity, export_onnx
from exporter.graph.writer import constant_bytes, served_positions, unsupported_reason, write_decoder
from exporter.precisions import ACTIVATIONS, GRID_BITS, check_activations
from exporter.precisions import WEIGHT_FORMATS as WEIGHTS
from exporter.settings import PARITY_ATOL, TUNE_WINDOWS
from exporter.source.calibration import (DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, calibration_ids, read_texts,
                                         text_window_count, tuning_windows)
from exporter.source.model import load_model, resolve_model
from exporter.source.tokenizer import check_artifact_tokenizer, save_tokenizer

PARITY_PROMPT = (
    "Edge devices run small language models close to their users. To fit, a model is compressed: "
    "each projection becomes the product of two thin matrices, and the result is checked"
)
ALLOCATIONS = ("fisher", "uniform")
# --weights auto warns above this estimated loss increase (nats/token, 1.22x perplexity): SmolLM2-135M measured 1.45x
# at 72 MB (estimate 0.31), 2.8x at 65 MB (0.62), garbage at 52 MB (1.68), all mostly 2-bit
WEAK_FORMATS_LOSS = 0.2
FORMAT_BYTES_STEP = 4096  # the format knapsack's byte granularity (at most; an eighth of the smallest option)
GRAPHS = ("auto", "fused", "optimum")
# A quantized graph is checked twice: its fp32 twin must match PyTorch tightly (the graph is right),
# and the quantized graph's greedy agreement is recorded; this loose floor only catches a broken one.
QUANTIZED_MIN_AGREEMENT = 0.25


@dataclass
class ExportOptions:
    device: str
    model: str | None = None  # a local directory, a .gguf file or a Hub id (exporter.source.model.resolve_model)
    trust_remote_code: bool = False  # run the model's own Python code (transformers' trust_remote_code)
    out: Path | None = None
    ratio: float | None = None
    budget_mb: float | None = None
    allocation: str = "fisher"  # fisher (FLRC) | uniform
    method: str = "whitened"
    calib: str | None = None
    calib_field: str = "text"
    calib_samples: int = DEFAULT_NUM_SAMPLES
    calib_seq_len: int = DEFAULT_SEQ_LEN
    # share of the calibration sequences that are conversations (the file's paragraphs as user turns, the
    # model's own answers; exporter.source.calibration.chat_windows), where the tokenizer has a chat template
    calib_chat: float = 0.0
    fisher_samples: int = 8
    seed: int = 0
    force: bool = False
    graph: str = "auto"  # fused (exporter.graph.writer) where supported, else optimum
    # Factorize q/k/v and gate/up jointly, one rank per group (exporter.compress.factorize): fewer graph nodes.
    joint: bool = False
    # Price the second-stage node each factorization adds (exporter.compress.allocate, from the profile's decode
    # cost model, or from factor_node_us where given): fewer, deeper factorizations for the same
    # parameters, so faster decoding.
    latency_aware: bool = False
    factor_node_us: float | None = None
    # `--weights auto`: its MatMulNBits may take at most this many times the decode time of the same weights on
    # int4-b32 (the onnxruntime-genai builder's default), each format's time per weight measured on the device
    # (exporter.device.cost_model.format_costs; devices where nothing is measured get no ceiling); None: none.
    decode_ceiling: float | None = DECODE_CEILING
    weights: str | None = None  # None: the profile's runtime.weight_precision (resolve_precision)
    # Activations, KV cache and logits: fp32 | fp16 (None: fp16 with fp16 weights, and with int4 weights
    # where the profile's first provider is CUDA, whose GroupQueryAttention is fp16/bf16 only; else fp32).
    activations: str | None = None
    # The oldest ONNX Runtime release ("1.20") that must run the artifact (exporter.graph.onnxruntime_releases);
    # None: the profile's runtime.onnxruntime_version, else the newest (resolve_precision).
    onnxruntime_version: str | None = None
    block_size: int = 32
    # int4 and int8 grids (exporter.compress.grid, grid_format): GPTQ on each linear's input Gram where
    # calibration is read, else round-to-nearest; asymmetric grids store a zero point per block (uint8, packed).
    quantizer: str = "gptq"
    asymmetric: bool = False
    # int4 dense weights: a whitened correction of each input group's quantization error, of this rank, beside
    # its GPTQ grid (exporter.compress.error_correction; 0: none). One level: no rank levels.
    error_correction: int = 0
    # int4, int8 and `--weights auto`: steps of end-to-end KL against the dense model that train every grid's
    # scales, codes and zero points fixed (exporter.compress.scale_tuning; 0: GPTQ's scales as they are).
    tune_scales: int = 0
    # More windows of the calibration file's text for those steps, beside the calibration's (Prepared.tuning_windows)
    tune_windows: int = TUNE_WINDOWS
    # `--weights auto`: int4 graph whose every MatMulNBits takes the format (bits, block size) a knapsack over
    # estimated loss chooses under the byte budget (exporter.compress.format_allocation); no low-rank.
    auto_formats: bool = False
    accuracy_level: int = 4  # int4/int8: int8 activations in MatMulNBits, as the genai builder does on CPU
    # CALR branches (None: the plain SVD path). None here, for library callers; the CLI turns them on
    # (`--no-correctives` turns them off), as they won on SmolLM2-135M at 20% (docs/method.md).
    correctives: CorrectiveOptions | None = None
    quantization_aware: bool = True  # int4/int8: train the correctives against the quantized primary path
    parity_steps: int = 16
    parity_atol: float = PARITY_ATOL
    progress: bool = True
    ort_format: bool = False  # also write model.ort for ONNX Runtime Mobile (exporter.graph.ort_format)
    # Read the Fisher importance and `--weights auto`'s prices from the statistics store where an earlier run of
    # the same model, calibration and exporter kept them (exporter.compress.statistics_store); False: compute them
    # again (and replace what is kept).
    reuse_statistics: bool = True
    # Where the torch stages compute (exporter.compress.compute): auto (CUDA where present), cpu, cuda or cuda:N.
    compute: str = "auto"
    # `--device a,b`: a later profile whose ranks differ from the previous one's starts its corrective branches
    # from that one's (CorrectiveOptions.warm_kl_steps); False: each trains its own, as a single-profile export.
    warm_branches: bool = True

    @property
    def release(self) -> tuple[int, int] | None:
        """onnxruntime_version as (major, minor); None: the newest."""
        return parse_release(self.onnxruntime_version)


@dataclass
class Stopwatch:
    stages: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start


@dataclass
class Plan:
    """A loaded model compressed as the options and the device budget ask, ready to export."""

    model: object
    tokenizer: object
    source: object
    profile: object
    projections: list
    total_dense: int
    budget: object  # WeightBudget from the profile
    budget_source: str
    target_params: int | None  # projection parameters allowed; None: dense
    ranks: dict
    calibration: str | None = None
    windows: torch.Tensor | None = None  # the calibration windows it read (Prepared.calibration)
    allocation: Allocation | None = None
    importance: dict | None = None  # projection -> Fisher score of each component
    corrective_ranks: dict = field(default_factory=dict)  # projection -> r_c (0: no branch)
    rank_multiple: int = 1
    corrective_report: object = None  # CorrectiveReport when correctives were trained
    formats: list | None = None  # format_allocation.Unit per MatMulNBits under --weights auto
    error_correction: dict | None = None  # --error-correction: rank, formats, output error kept
    scale_tuning: dict | None = None  # --tune-scales: steps, KL before and after on held-out windows
    formats_budget: dict | None = None

    @property
    def parameters(self) -> dict:
        return parameter_summary(self.projections, self.ranks, self.total_dense, self.corrective_ranks)


def default_out(model_name: str, device: str) -> Path:
    return Path("artifacts") / f"{model_name}-{device}"


def resolve_precision(options: ExportOptions, profile) -> ExportOptions:
    """`options` with concrete weights and activations (see ExportOptions); bad pairs fail here."""
    weights = options.weights or profile.runtime.weight_precision
    if weights not in WEIGHTS:
        raise ExporterError(f"unknown --weights {weights!r}; expected one of {', '.join(WEIGHTS)}")
    activations = options.activations
    if activations is None and "fp16" in ACTIVATIONS[weights] \
            and profile.runtime.execution_providers[0] == "CUDAExecutionProvider":
        activations = "fp16"
    try:
        activations = check_activations(weights, activations)
    except ValueError as exc:
        raise ExporterError(f"--activations: {exc}") from None
    release = parse_release(options.onnxruntime_version or profile.runtime.onnxruntime_version)
    return replace(options, weights=weights, activations=activations,
                   onnxruntime_version=release_name(release) if release else None)


# the keys of the statistics a Prepared caches; every option that changes them must match its own
CALIBRATION_FIELDS = ("model", "calib", "calib_field", "calib_samples", "calib_seq_len", "calib_chat", "seed")


@dataclass
class Prepared:
    """One loaded model and the statistics every compression of it reads, each computed once on first use:
    the calibration windows, the factorizations (with the whitening Grams) and the Fisher importance.

    The export compresses `model` itself; a benchmark or a multi-profile export hands `compress` a copy per
    row, so `model` stays dense and the statistics serve every row.
    """

    options: ExportOptions  # resolved; its CALIBRATION_FIELDS key the statistics
    profile: object
    source: object
    model: object
    tokenizer: object
    clock: Stopwatch
    seconds: dict = field(default_factory=dict)  # (statistic, key) -> seconds its first computation took
    _calibration: tuple | None = None
    _tuning: torch.Tensor | None = None  # tuning_windows
    _decompositions: dict = field(default_factory=dict)
    _importance: dict = field(default_factory=dict)
    _prices: dict = field(default_factory=dict)
    _sensitivities: dict = field(default_factory=dict)  # {Fisher samples: output sensitivities} pricing read
    # {Fisher samples: PricingStatistics}: kept by a data-parallel pricing, or for the profiles after this one
    _pricing_statistics: dict = field(default_factory=dict)
    # `--device a,b`: a later profile follows, so the Grams a store-read pricing needed are kept for it
    more_profiles: bool = False
    _trained: dict = field(default_factory=dict)  # {compression_key: ((state, grids), corrective report)}
    # {window key: the dense model's head input} on the calibration windows, where a Gram pass kept them
    head_inputs: dict = field(default_factory=dict)
    # Later compressions at other ranks start their branches from the last fully trained ones (`--device a,b`;
    # off for library callers such as the benchmark, whose rows must not depend on their order).
    warm_branches: bool = False
    _branches: dict = field(default_factory=dict)  # {(method, joint, corrective options): branch_weights}
    _store: statistics_store.StatisticsStore | None = None
    _consumed: bool = False  # `model` was compressed in place: no statistic may be read from it any more

    def _dense(self):
        if self._consumed:
            raise RuntimeError("the prepared model was compressed in place; prepare again (or compress copies)")
        return self.model

    def calibration(self) -> tuple[torch.Tensor, str]:
        """(input ids, description) of the calibration windows."""
        if self._calibration is None:
            o = self.options
            start = time.perf_counter()
            with self.clock.stage("calibration"):  # data-parallel: rank 0's windows, sent to the others
                self._calibration = distributed.from_rank_zero(lambda: calibration_ids(
                    self._dense(), self.tokenizer, o.calib, o.calib_samples, o.calib_seq_len, o.seed,
                    o.calib_field, model_key=self.source.describe(), progress=o.progress,
                    chat_share=o.calib_chat))
            self.seconds[("calibration", None)] = time.perf_counter() - start
        return self._calibration

    def tuning_windows(self) -> torch.Tensor:
        """The windows `--tune-scales` trains on: `--tune-windows` more of the calibration file's text
        (source.calibration.tuning_windows), then the calibration's own, whose last ones judge the tuning. Scale
        tuning draws 120 windows in its 60 steps; from the calibration's 28 alone it would see each four times."""
        ids = self.calibration()[0]
        o = self.options
        if o.calib is None or o.tune_windows < 1:  # self-generated text: more would be generated, at a cost
            return ids
        if self._tuning is None:
            texts = read_texts(o.calib, o.calib_field)
            calibration = text_window_count(self.tokenizer, o.calib_samples, o.calib_chat)
            extra = tuning_windows(texts, self.tokenizer, o.tune_windows, o.calib_seq_len, o.seed, calibration)
            self._tuning = torch.cat([extra, ids])
        return self._tuning

    def decompositions(self, method: str, joint: bool, full_rank: bool) -> dict:
        """Every decoder unit's factorization (exporter.compress.factorize.decompose_model)."""
        key = (method, joint, full_rank)
        if key not in self._decompositions:
            ids = self.calibration()[0] if method == "whitened" else None
            start = time.perf_counter()
            with self.clock.stage("factorize"):
                self._decompositions[key] = decompose_model(self._dense(), method, ids, progress=self.options.progress,
                                                            full_rank=full_rank, joint=joint)
            self.seconds[("factorize", key)] = time.perf_counter() - start
        return self._decompositions[key]

    def store(self) -> statistics_store.StatisticsStore:
        """The on-disk store of this model's statistics on these calibration windows (its digest is taken once)."""
        if self._store is None:
            self._store = statistics_store.StatisticsStore.for_run(statistics_store.default_root(), self._dense(),
                                                                   self.calibration()[0], self.options.seed)
        return self._store

    def _stored(self, statistic: str, key) -> tuple[dict, dict] | None:
        found = self.store().load(statistic, key) if self.options.reuse_statistics else None
        if not distributed.all_agree(found is not None):  # data-parallel: every rank reads, or all compute
            found = None
        if found is not None:
            say(f"{statistic}: read from {self.store().path(statistic, key)} (--fresh-statistics computes it again)")
        return found

    def _keep(self, statistic: str, key, tensors: dict, info: dict | None = None) -> None:
        if distributed.rank() == 0:  # one writer
            self.store().save(statistic, key, tensors, info)

    def importance(self, method: str, joint: bool, samples: int) -> dict:
        """Fisher importance of every component of the full-rank factorizations, on the first `samples` windows."""
        key = (method, joint, samples)
        if key not in self._importance:
            found = self._stored("importance", list(key))
            if found is not None:
                self._importance[key] = found[0]
                return self._importance[key]
            decompositions = self.decompositions(method, joint, full_rank=True)
            ids = self.calibration()[0]
            start = time.perf_counter()
            with self.clock.stage("importance"):
                self._importance[key] = component_fisher(self._dense(), decompositions, ids[:samples],
                                                         progress=self.options.progress)
            self.seconds[("importance", key)] = time.perf_counter() - start
            self._keep("importance", list(key), self._importance[key])
        return self._importance[key]

    def format_prices(self, groups: list[list[str]], samples: int, corrections: tuple[int, ...] = (),
                      menu: tuple | None = None, low_rank: tuple = ()) -> list:
        """`--weights auto`: every MatMulNBits unit's menu (default: format_allocation.MENU; with `low_rank`, the
        low-rank options on those factor formats) with bytes, grids and estimated loss (exporter.compress.
        format_allocation.price_units); a fresh copy of each unit per call, for its choice. Prices read from the
        statistics store come without grids: `chosen_grids`."""
        from exporter.compress.format_allocation import MENU, Unit, price_units, pricing_statistics

        menu = tuple(menu or MENU)
        key = (tuple(map(tuple, groups)), samples, corrections, tuple(f.name for f in menu),
               tuple(f.name for f in low_rank))
        if key not in self._prices:
            ids = self.calibration()[0]
            stored_key = [list(map(list, groups)), samples, list(corrections), [f.name for f in menu],
                          [f.name for f in low_rank]]
            found = self._stored("format prices", stored_key)
            if found is None and not low_rank:
                found = self._wider_prices(stored_key, menu)
            if found is not None:  # prices and sensitivities; the grids are computed for the chosen options
                tensors, info = found
                self._sensitivities[samples] = {name: Sensitivity(**{kind: tensors.get(f"{kind}:{name}")
                                                                     for kind in SENSITIVITY_FIELDS})
                                                for name in info["sensitivity"]}
                self._prices[key] = [Unit.from_record(record) for record in info["units"]]
            else:
                start = time.perf_counter()
                with self.clock.stage("price formats"):
                    statistics = pricing_statistics(self._dense(), ids, ids[:samples], progress=self.options.progress)
                    self._prices[key] = price_units(self._dense(), ids, ids[:samples], menu=menu,
                                                    progress=self.options.progress, groups=groups,
                                                    corrections=corrections, statistics=statistics,
                                                    low_rank=low_rank)
                self.seconds[("price formats", key)] = time.perf_counter() - start
                self._sensitivities[samples] = statistics.sensitivity
                self._keep_head_inputs(statistics)
                if distributed.active():  # the other ranks' units come without grids: `chosen_grids` needs these
                    self._pricing_statistics[samples] = statistics
                tensors = {f"{kind}:{name}": getattr(s, kind) for name, s in statistics.sensitivity.items()
                           for kind in SENSITIVITY_FIELDS if getattr(s, kind) is not None}
                self._keep("format prices", stored_key, tensors,
                                  {"sensitivity": list(statistics.sensitivity),
                                   "units": [unit.record() for unit in self._prices[key]]})
        # each call its own units (their choice); the grids are shared: an option's grids computed for one profile
        # (`chosen_grids`) are the ones any later profile choosing it would compute
        return [replace(unit) for unit in self._prices[key]]

    def _wider_prices(self, key: list, menu: tuple) -> tuple[dict, dict] | None:
        """Prices stored for a lower budget, whose menu (`menu`, 2-bit grids where the runtime has them, low-rank
        options, row splits) holds every option of this one, narrowed to `menu` (`Unit.narrowed`): an export at
        86.5 MB after one at 65 MB prices nothing."""
        from exporter.compress.format_allocation import Unit

        for wider, low_rank in (widened_menu(menu, two_bit) for two_bit in (True, False)):
            found = self._stored("format prices", [*key[:3], [f.name for f in wider], [f.name for f in low_rank]])
            if found is not None:
                say("format prices: a lower budget's menu, narrowed to this one's formats")
                tensors, info = found
                return tensors, {**info, "units": [Unit.narrowed(record, menu) for record in info["units"]]}
        return None

    def pricing_statistics(self, samples: int):
        """The Grams and the sensitivities a pricing on `samples` Fisher sequences read (one Gram pass; after
        `format_prices`), from which any option's grids are computed (format_allocation.option_grids)."""
        from exporter.compress.format_allocation import pricing_statistics

        if samples in self._pricing_statistics:  # a model's Grams: kept only while a later use is known
            return self._pricing_statistics[samples] if self.more_profiles else self._pricing_statistics.pop(samples)
        with self.clock.stage("price formats"):
            statistics = pricing_statistics(self._dense(), self.calibration()[0],
                                            sensitivity=self._sensitivities[samples], progress=self.options.progress)
        self._keep_head_inputs(statistics)
        if self.more_profiles:
            self._pricing_statistics[samples] = statistics
        return statistics

    def _keep_head_inputs(self, statistics) -> None:
        """The dense model's head inputs on the calibration windows, from the Gram pass that priced them: scale
        tuning's teacher reads them instead of running the dense model on those windows again (about 1 s a window
        of 512 tokens on SmolLM2-135M, 2 cores)."""
        from exporter.compress.corrective import window_key

        if statistics.head_inputs is not None:
            ids = self.calibration()[0]
            self.head_inputs = {window_key(row): hidden for row, hidden in zip(ids, statistics.head_inputs,
                                                                                strict=True)}

    def chosen_grids(self, units: list, samples: int) -> None:
        """Each unit's chosen grids where its prices were read from the store: one pass for the Grams (from the
        stored sensitivities), then GPTQ of the chosen format only (its own stage in the summary's times)."""
        from exporter.compress.format_allocation import fill_chosen_grids

        if all(unit.grids[unit.choice] is not None for unit in units):
            return
        statistics = self.pricing_statistics(samples)
        with self.clock.stage("chosen grids"):
            fill_chosen_grids(units, statistics)


def prepare(options: ExportOptions, clock: Stopwatch | None = None, target: Path | None = None,
            profile=None, source=None) -> Prepared:
    """Check the options and load the model: everything before the statistics (which Prepared computes on use)."""
    clock = clock or Stopwatch()
    torch.manual_seed(options.seed)
    if options.allocation not in ALLOCATIONS:
        raise ExporterError(f"unknown allocation {options.allocation!r}; expected one of {', '.join(ALLOCATIONS)}")
    profile = profile or load_profile(options.device)
    options = resolve_precision(options, profile)
    check_options(options)  # a bad block size, correction or runtime target fails before the work
    source = source or resolve_model(options.model, options.trust_remote_code)
    if target is not None:
        check_target(target, options.force)  # before minutes of work, not after
    with clock.stage("load"):
        say(f"loading {source.describe()}")
        model, tokenizer = load_model(source)
    check_model_runtime(model, options)
    return Prepared(options, profile, source, model, tokenizer, clock)


def plan_compression(options: ExportOptions, clock: Stopwatch, target: Path | None = None,
                     profile=None, source=None, train: bool = True) -> Plan:
    """Load the model, turn the budget into projection parameters, and factorize to fit it (in place)."""
    with compute.using(compute.resolve(options.compute)):
        return compress(prepare(options, clock, target, profile, source), train=train)


def compress(prepared: Prepared, options: ExportOptions | None = None, model=None, train: bool = True,
             profile=None) -> Plan:
    """Compress `model` (default: the prepared model itself, in place) as `options` (default: the prepared
    ones) and the budget of `profile` (default: the prepared one) ask: ranks, corrective branches, int4 grids
    or `--weights auto` formats.

    `train=False` attaches the corrective branches (they count in the budget) without training them.
    """
    profile = profile or prepared.profile
    options = resolve_precision(options or prepared.options, profile)
    changed = [f for f in CALIBRATION_FIELDS if getattr(options, f) != getattr(prepared.options, f)]
    if changed:
        raise ValueError(f"compress: {', '.join(changed)} differ from the prepared statistics' (prepare again)")
    if options.allocation not in ALLOCATIONS:
        raise ExporterError(f"unknown allocation {options.allocation!r}; expected one of {', '.join(ALLOCATIONS)}")
    check_options(options)
    if model is None or model is prepared.model:
        model, in_place = prepared.model, True
    else:
        in_place = False
    clock, tokenizer = prepared.clock, prepared.tokenizer
    projections = decoder_projections(model, options.joint)
    total_dense = count_params(model)
    dense_projection = sum(p.params for p in projections)
    budget = weight_budget(profile, model.config, options.weights, options.activations)
    multiple, base_multiple, correctives = rank_multiples(
        options.allocation, profile.runtime.rank_multiple, options.correctives,
        options.block_size if options.weights in GRID_BITS else None)

    if options.auto_formats:
        if options.ratio is not None:
            raise ExporterError("--weights auto chooses formats, not ranks: pass --budget-mb without --ratio")
        budget_source = "--budget-mb" if options.budget_mb is not None else f"{profile.name} {budget.binding} budget"
        target_params = None
    elif options.ratio is not None:
        uniform_ranks(projections, options.ratio)  # validates the range
        budget_source = "--ratio"
        target_params = None if options.ratio == 0 else round((1.0 - options.ratio) * dense_projection)
    else:
        budget_bytes = budget.bytes if options.budget_mb is None else options.budget_mb * MB
        budget_source = ("--budget-mb" if options.budget_mb is not None
                         else f"{profile.name} {budget.binding} budget")
        target_params = projection_budget(projections, total_dense, budget_bytes, options.weights, base_multiple)
        if target_params is None:
            say(f"the dense model ({total_dense * BYTES_PER_PARAM[options.weights] / MB:.0f} MB at "
                f"{options.weights}) fits {budget_source} ({budget_bytes / MB:.0f} MB of weights): "
                "exporting it dense (pass --ratio to compress anyway)")
    plan = Plan(model, tokenizer, prepared.source, profile, projections, total_dense, budget, budget_source,
                target_params, {p.name: None for p in projections})
    quantized = options.weights in GRID_BITS and train
    gptq = (quantized and options.quantizer == "gptq") or options.auto_formats  # auto prices GPTQ grids
    tuned = quantized and options.tune_scales > 0
    compressed = target_params is not None
    ids = None
    if gptq or tuned or (compressed and (options.method == "whitened" or options.allocation == "fisher"
                                         or options.correctives is not None)):
        ids, plan.calibration = prepared.calibration()
        plan.windows = ids
    if not compressed:
        teacher = dense_teacher(model) if tuned else None
        if options.auto_formats:  # also without `train`: `exporter allocate` shows the choice
            choose_formats(plan, options, prepared, ids)
        if quantized:
            def quantize_and_tune():
                with clock.stage("quantize"):
                    if options.error_correction and not options.auto_formats:
                        plan.error_correction = correct_errors(model, options, ids)
                    quantize_grids(model, options, ids)
                if tuned:
                    plan.scale_tuning = tune_grid_scales(model, teacher, prepared.tuning_windows(), options, clock,
                                                         prepared.head_inputs)

            key = compression_key(options, plan, None, quantized)
            compress_once(prepared, key, model, plan, in_place, quantize_and_tune)
        prepared._consumed |= in_place and (quantized or options.auto_formats)
        return plan

    if options.error_correction:
        raise ExporterError("--error-correction corrects dense int4 weights: pass --ratio 0 (or a budget the dense "
                            "int4 model fits), without low-rank factorization")
    fisher = options.allocation == "fisher"
    decompositions = prepared.decompositions(options.method, options.joint, full_rank=fisher)
    if fisher:
        plan.importance = prepared.importance(options.method, options.joint, options.fisher_samples)

    with clock.stage("allocate"):
        price = node_price(profile, options.weights, options.factor_node_us) if options.latency_aware else 0.0
        ranks, _, plan.allocation, plan.rank_multiple = choose_ranks(
            projections, options.allocation, plan.importance, target_params, correctives, multiple, base_multiple,
            node_params=price)
    teacher = dense_teacher(model) if (correctives is not None and train) or tuned else None
    prepared._consumed |= in_place
    apply_ranks(model, decompositions, ranks)
    plan.ranks = effective_ranks(model, projections)
    if correctives is not None:
        attach_correctives(model, decompositions, branch_ranks(projections, plan.ranks, correctives, target_params))
        plan.corrective_ranks = corrective_ranks(model, projections)
        del decompositions

    def train_and_quantize():
        if correctives is not None and train:
            if quantized and options.quantization_aware:  # train against the primary path as the grids compute it
                with clock.stage("quantize"):
                    quantize_grids(model, options, ids, only=primary_linears(model, projections))
            # Other ranks (or another grid): with warm_branches, start from the previous compression's
            # branches, which already hold most of what these learn, and train a few KL steps.
            family = (options.method, options.joint, repr(options.correctives))  # not the rounding
            warm = prepared._branches.get(family) if prepared.warm_branches else None
            with clock.stage("correctives"):
                plan.corrective_report = train_correctives(model, teacher, ids, correctives, options.progress,
                                                           warm=warm)
            if prepared.warm_branches and not plan.corrective_report.warm_start:
                prepared._branches = {family: branch_weights(model)}  # the branches alone: small
        if quantized:  # everything not on a grid yet (branches after their training), so PyTorch and the graph agree
            with clock.stage("quantize"):
                quantize_grids(model, options, ids)
        if tuned:
            plan.scale_tuning = tune_grid_scales(model, teacher, prepared.tuning_windows(), options, clock)

    if train:
        compress_once(prepared, compression_key(options, plan, correctives, quantized), model, plan, in_place,
                      train_and_quantize)
    return plan


def compression_key(options: ExportOptions, plan: Plan, correctives: CorrectiveOptions | None,
                    quantized: bool) -> tuple | None:
    """What a compression's weights depend on besides the prepared statistics: the ranks, the branch ranks and
    their training options, (quantized) the grids' options and scale tuning's steps, and (`--weights auto`) each
    unit's chosen format. None where the state does not hold them (`--error-correction`'s added terms)."""
    if options.error_correction:
        return None
    grids = (grid_format(options).name, options.quantizer, options.fisher_samples, options.quantization_aware,
             options.tune_scales, options.tune_windows) if quantized else None
    formats = tuple((u.name, u.format_name(u.choice), u.methods[u.choice], u.rank(u.choice), u.correction(u.choice),
                     u.split(u.choice)) for u in plan.formats or ())  # the choice, not its index: menus differ by runtime
    return (options.method, options.joint, repr(correctives), tuple((plan.ranks or {}).items()),
            tuple((plan.corrective_ranks or {}).items()), grids, formats)


def compress_once(prepared: Prepared, key: tuple | None, model, plan: Plan, in_place: bool, work) -> None:
    """`work()` (it trains the branches, puts the weights on their grids and tunes their scales), or its result
    from the previous compression of a multi-device export with the same `key` (compression_key): training,
    GPTQ and tuning are deterministic, so they would compute the same weights again (SmolLM2 int8 at 20%: 247 s
    of GPTQ; `--weights auto` at one `--budget-mb`: 60 tuning steps, about 300 s)."""
    if key is not None and key in prepared._trained:
        (state, grids), plan.corrective_report, plan.scale_tuning = prepared._trained[key]
        model.load_state_dict(state)
        restore_grids(model, grids)
        say("weights" + (", branches" if plan.corrective_report else "") + (" and grids" if grids else "")
            + (" (scales tuned)" if plan.scale_tuning else "") + " as the previous profile's (the same "
            + ("formats" if plan.formats else "ranks") + " and options)")
        return
    work()
    if key is not None and not in_place:  # the last one only: a model's worth of memory
        prepared._trained = {key: (({k: v.clone() for k, v in model.state_dict().items()}, model_grids(model)),
                                   plan.corrective_report, plan.scale_tuning)}


def tune_grid_scales(model, teacher, ids, options: ExportOptions, clock: Stopwatch,
                     head_inputs: dict | None = None) -> dict:
    """--tune-scales: the grids' scales trained end to end against `teacher` (exporter.compress.scale_tuning;
    `head_inputs`: the teacher's known ones, Prepared.head_inputs); returns the manifest's summary."""
    from exporter.compress.scale_tuning import holdout_windows, tune_scales

    # the calibration's windows come last (Prepared.tuning_windows): the held-out ones among them, as many as
    # the calibration alone would give
    holdout = holdout_windows(options.calib_samples)
    device = compute.current()  # the two models whole on the compute device, the tuned weights written back
    with clock.stage("tune scales"), compute.onloaded(model, device, write_back=True), \
            compute.onloaded(teacher, device):
        report = tune_scales(model, teacher, ids.to(device), options.tune_scales, holdout=holdout, seed=options.seed,
                             progress=options.progress, head_inputs=head_inputs)
    say(f"scale tuning: {report.steps} steps at {report.lr:.2g} on {report.scales:,} scales ({report.windows} "
        f"windows), held-out KL "
        f"{report.kl_before:.4f} -> {report.kl_after:.4f}" + ("" if report.kept else " (no better: GPTQ's scales kept)"))
    return report.to_dict()


def choose_formats(plan: Plan, options: ExportOptions, prepared: Prepared, ids) -> None:
    """`--weights auto`: price every MatMulNBits' menu and put each on the format the knapsack chooses."""
    from exporter.compress.allocate import multiple_choice_knapsack, time_limited_knapsack
    from exporter.compress.format_allocation import apply_choices, byte_range, fixed_bytes, format_units

    clock = prepared.clock
    if ids is None:
        raise ExporterError("--weights auto needs calibration data to price formats (it reads --calib or "
                            "self-generated text); pass --quantizer gptq")
    budget_bytes = int(plan.budget.bytes if options.budget_mb is None else options.budget_mb * MB)
    groups = format_units(plan.model)
    menu = runtime_menu(options)
    context = plan.profile.budget.max_context  # the rotary tables' rows (the writer's max_context)

    def reach(menu, factor_formats=()) -> tuple[int, int, int]:
        """The smallest and largest bytes `menu` (and low-rank options on `factor_formats`) allows, and the
        knapsack's step: an eighth of the smallest option, at most FORMAT_BYTES_STEP (SmolLM2-135M: 4096; tiny
        models: finer)."""
        smallest, largest, option = byte_range(plan.model, groups, menu, options.block_size, factor_formats)
        tables = constant_bytes(plan.model, options.activations, context)
        return smallest + tables, largest + tables, min(FORMAT_BYTES_STEP, max(256, option // 8))

    low_rank = ()
    smallest, largest, step = reach(menu)
    if budget_bytes < smallest + step * len(groups):  # below what 4 bits reach: low-rank options (and 2-bit grids)
        menu, low_rank = widened_menu(menu, options.release is None or options.release >= TWO_BIT_MATMUL_RELEASE)
        smallest, _, step = reach(menu, low_rank)
    if budget_bytes < smallest + step * len(groups):  # before minutes of pricing
        raise BudgetError(f"--weights auto: {budget_bytes / MB:.2f} MB of weights ({plan.budget_source}) cannot hold "
                          f"this model: its formats need {smallest / MB:.2f} MB to {largest / MB:.2f} MB")
    units = prepared.format_prices(groups, options.fisher_samples,
                                   (options.error_correction,) if options.error_correction else (), menu, low_rank)
    fixed = fixed_bytes(plan.model, options.block_size) + constant_bytes(plan.model, options.activations, context)
    # --latency-aware: each option also pays, in the bytes that stream in the same time, for the graph nodes it adds
    node_bytes = node_price(plan.profile, "int4", options.factor_node_us) * BYTES_PER_PARAM["int4"] \
        if options.latency_aware else 0.0
    sizes = [[b + round(node_bytes * option_nodes(u, k)) for k, b in enumerate(u.bytes)] for u in units]
    timing = format_times(plan, units) if options.decode_ceiling else None
    with clock.stage("allocate"):
        if timing:
            limit = options.decode_ceiling * timing["reference_ms"]
            choice, multiplier = time_limited_knapsack(sizes, [u.loss for u in units], timing["times"],
                                                       budget_bytes - fixed, limit, granularity=step)
        else:
            choice = multiple_choice_knapsack(sizes, [u.loss for u in units], budget_bytes - fixed, granularity=step)
    if choice is None:  # the step rounding's slack: only just above the smallest
        raise BudgetError(f"--weights auto: {budget_bytes / MB:.2f} MB of weights ({plan.budget_source}) cannot hold "
                          f"this model: its formats need {smallest / MB:.2f} MB to {largest / MB:.2f} MB")
    for unit, option in zip(units, choice):
        unit.choice = option
    prepared.chosen_grids(units, options.fisher_samples)
    apply_choices(plan.model, units)
    plan.formats = units
    plan.ranks = effective_ranks(plan.model, plan.projections)
    plan.formats_budget = {"budget_bytes": budget_bytes, "fixed_bytes": fixed,
                           "chosen_bytes": fixed + sum(u.bytes[u.choice] for u in units),
                           "smallest_bytes": smallest, "largest_bytes": largest,
                           "predicted_loss_increase": sum(u.loss[u.choice] for u in units)}
    if timing:
        chosen_ms = sum(times[u.choice] for times, u in zip(timing["times"], units))
        plan.formats_budget["decode_ceiling"] = {
            "ceiling": options.decode_ceiling, "reference_format": REFERENCE_FORMAT,
            "reference_ms": round(timing["reference_ms"], 6), "limit_ms": round(limit, 6),
            "chosen_ms": round(chosen_ms, 6), "multiplier": multiplier if math.isfinite(multiplier) else None,
            "format_ns_per_weight": timing["costs"], "row_split_us": timing["row_split_us"],
            "head_split_us": timing["head_split_us"],
            "source": timing["source"]}
        say(f"decode ceiling: the MatMulNBits' time {chosen_ms:.2f} ms per token of {limit:.2f} ms allowed "
            f"({options.decode_ceiling:g} x the same weights on {REFERENCE_FORMAT}, each format measured here)"
            + ("" if multiplier == 0.0 else ", formats traded for speed" if math.isfinite(multiplier) else
               ": not kept, no choice within the bytes is that fast (the fastest taken)"))
    if node_bytes:
        plan.formats_budget["node_bytes"] = round(node_bytes)
        plan.formats_budget["nodes_priced_bytes"] = sum(s[u.choice] - u.bytes[u.choice] for s, u in zip(sizes, units))
    say(f"formats: {plan.formats_budget['chosen_bytes'] / MB:.1f} MB of {budget_bytes / MB:.1f} MB, "
        + ", ".join(f"{n} {name}" for name, n in _format_counts(units).items()))
    predicted = plan.formats_budget["predicted_loss_increase"]
    if predicted > WEAK_FORMATS_LOSS:  # the estimate understates 2-bit losses (docs/quantization.md)
        two_bit = sum(u.options[u.choice].bits == 2 or bool(u.split(u.choice)) and u.split_low(u.choice).bits == 2
                      for u in units)
        say(f"warning: the formats that fit {budget_bytes / MB:.1f} MB are estimated to raise perplexity "
            f"{math.exp(predicted):.2f}x over the dense model"
            + (f", and its {two_bit} 2-bit grids more than estimated" if two_bit else "")
            + ": check the artifact (exporter evaluate) or give it more bytes")


def format_times(plan: Plan, units) -> dict | None:
    """Each unit's options' decode time (ms per token: their MatMulNBits' weights at each format's measured time
    per weight, plus a row split's measured time or node_us for each node a factorization adds; an offset grid's
    block means per unit, from its format's time) and the reference's (every unit's weights on REFERENCE_FORMAT); None
    where the profile's device has no measured format costs."""
    from exporter.compress.format_allocation import WRITTEN_FORMATS, option_matrices
    from exporter.settings import cache_dir

    head = module_name(plan.model, plan.model.get_output_embeddings())
    widths = [plan.model.get_submodule(u.members[0]).in_features for u in units]  # the input every member reads
    matrices = [[option_matrices(u, k, width, head in u.members) for k in range(len(u.options))]
                for u, width in zip(units, widths)]
    # every format an export may write, measured once for this machine: the same figures for every budget
    names = tuple(sorted({f.name for f in WRITTEN_FORMATS} | {name for per_unit in matrices for parts in per_unit
                                                             for _, name in parts}))
    layer = layer_shapes(units, widths, head)
    head_shape = next(((k, u.weights // k) for u, k in zip(units, widths) if head in u.members), None)
    # measured by one process (data-parallel ranks would time each other's load) and sent to every rank
    costs = distributed.from_rank_zero(lambda: format_costs(plan.profile, names, layer, cache_dir() / "host",
                                                            head_shape))
    if costs is None:
        say(f"decode ceiling: none ({plan.profile.name}: no format's decode time measured on its device)")
        return None
    costs = dict(costs)
    node_us = decode_costs(plan.profile)[0]["node_us"]
    split_ms = costs.pop(ROW_SPLIT_COST, ROW_SPLIT_NODES * node_us) / 1e3  # measured with the formats
    # the head's split: its logits' reorder measured apart, and where the embedding is tied, the gather's selection
    tied = bool(getattr(plan.model.config, "tie_word_embeddings", False))
    head_split_ms = costs.pop(HEAD_SPLIT_COST, split_ms * 1e3) / 1e3 + tied * TIED_SPLIT_NODES * node_us / 1e3
    node_ms = node_us / 1e3

    def added_ms(unit, option: int) -> float:
        if unit.split(option):
            return head_split_ms if head in unit.members else split_ms
        return 0.0 if unit.options[option].offset else option_nodes(unit, option) * node_ms

    # An offset grid's block means are two nodes per unit whatever its size: its time is its integer grid's over its
    # K + K/block columns, plus what the table's figure adds beyond that, per unit of the layer it was measured on
    # (at the figure per weight, a layer's small units were priced low and its large ones high)
    per_unit = sum(k * n for k, n in layer) / len(layer)

    def part_ns(weights: int, name: str) -> float:
        fmt = QuantFormat.parse(name)
        if not fmt.offset or fmt.integer.name not in costs:
            return weights * costs[name]
        columns = costs[fmt.integer.name] * (1 + 1 / fmt.block_size)
        return weights * columns + max(0.0, costs[name] - columns) * per_unit

    times = [[sum(part_ns(weights, name) for weights, name in parts) / 1e6 + added_ms(u, k)
              for k, parts in enumerate(options)] for u, options in zip(units, matrices)]
    return {"times": times, "reference_ms": sum(u.weights for u in units) * costs[REFERENCE_FORMAT] / 1e6,
            "costs": costs, "row_split_us": round(split_ms * 1e3, 4), "head_split_us": round(head_split_ms * 1e3, 4),
            "source": "measured on this machine (exporter.device.host_probes.format_costs)"}


def layer_shapes(units, widths: list[int], head: str) -> tuple[tuple[int, int], ...]:
    """(in, out) of one decoder layer's units (`widths`: each unit's in): every unit's but lm_head's, each shape as
    often as a layer has it (its count over the greatest common divisor of the counts)."""
    counts: dict[tuple[int, int], int] = {}
    for u, k in zip(units, widths):
        if head not in u.members or len(units) == 1:
            counts[k, u.weights // k] = counts.get((k, u.weights // k), 0) + 1
    layers = math.gcd(*counts.values()) if counts else 1
    return tuple(shape for shape, n in sorted(counts.items()) for _ in range(n // layers))


def option_nodes(unit, option: int) -> int:
    """Graph nodes an option adds to a unit's one MatMulNBits: an offset grid's block means (AveragePool,
    Concat; a shared input's once, priced per unit), a factorization's second MatMulNBits, a row split's
    `ROW_SPLIT_NODES`."""
    if unit.split(option):
        return ROW_SPLIT_NODES
    return BLOCK_SUM_NODES if unit.options[option].offset else 1 if unit.rank(option) else 0


def widened_menu(menu: tuple, two_bit: bool) -> tuple[tuple, tuple]:
    """(menu, low-rank factor formats) of a budget below what `menu` reaches: low-rank options and, where the runtime
    runs them (`two_bit`), 2-bit grids and row splits beside every format of `menu`."""
    from exporter.compress.format_allocation import LOW_BIT_MENU, LOW_RANK_FORMATS

    return (menu + LOW_BIT_MENU if two_bit else menu), LOW_RANK_FORMATS


def runtime_menu(options: ExportOptions) -> tuple:
    """`--weights auto`'s formats that the target ONNX Runtime runs (8-bit MatMulNBits: 1.22 and later)."""
    from exporter.compress.format_allocation import MENU

    release = options.release
    if release is None or release >= EIGHT_BIT_MATMUL_RELEASE:
        return MENU
    return tuple(f for f in MENU if f.bits == 4)


def _format_counts(units) -> dict[str, int]:
    counts: dict[str, int] = {}
    for unit in units:
        rank, factorized = unit.correction(unit.choice), unit.rank(unit.choice)
        name = unit.format_name(unit.choice) + (f"+lqer{rank}" if rank else "") + (" low-rank" if factorized else "")
        counts[name] = counts.get(name, 0) + 1
    return counts


def check_options(options: ExportOptions) -> None:
    """The checks of resolved options that need no model: grid format, error correction, runtime target."""
    if options.weights in GRID_BITS:
        grid_format(options)
    check_error_correction(options)
    check_runtime(options)


def check_error_correction(options: ExportOptions) -> None:
    """--error-correction needs int4 GPTQ grids (it corrects what the grid lost on calibration inputs); with
    --weights auto it is one more option of each unit's menu."""
    rank = options.error_correction
    if not rank:
        return
    if rank < 0 or rank % CORRECTION_FORMAT.block_size:
        raise ExporterError(f"--error-correction: the rank must be a positive multiple of "
                            f"{CORRECTION_FORMAT.block_size} (its up factor's block), got {rank}")
    if options.weights != "int4" or options.quantizer != "gptq":
        raise ExporterError("--error-correction needs --weights int4 (or auto) with --quantizer gptq")


def check_runtime(options: ExportOptions) -> None:
    """What an older ONNX Runtime target (--onnxruntime-version, resolved) rules out, before the work."""
    import onnxruntime

    release = options.release
    if release is None:
        return
    if options.weights == "int8" and release < EIGHT_BIT_MATMUL_RELEASE:
        raise ExporterError(f"--weights int8 writes 8-bit MatMulNBits, which ONNX Runtime {release_name(release)} "
                            f"does not run (it needs {release_name(EIGHT_BIT_MATMUL_RELEASE)}); pass --weights int4 or "
                            "fp16, or target a newer release")
    if options.error_correction and CORRECTION_FORMAT.bits != 4 and release < EIGHT_BIT_MATMUL_RELEASE:
        raise ExporterError(f"--error-correction stores its factors as {CORRECTION_FORMAT.bits}-bit MatMulNBits, "
                            f"which ONNX Runtime {release_name(release)} does not run (it needs "
                            f"{release_name(EIGHT_BIT_MATMUL_RELEASE)}); drop it or target a newer release")
    installed = parse_release(".".join(onnxruntime.__version__.split(".")[:2]))
    if options.ort_format and installed and release < installed:
        raise ExporterError(f"--ort: the ORT format this ONNX Runtime ({onnxruntime.__version__}) writes is read by "
                            f"it and later releases only, not by {release_name(release)}; convert model.onnx with "
                            f"ONNX Runtime {release_name(release)}'s own tools")


def check_model_runtime(model, options: ExportOptions) -> None:
    """What the target ONNX Runtime cannot run of this model's fused graph, before minutes of compression."""
    from exporter.graph.writer import release_reason

    release = options.release
    if release is not None and options.graph != "optimum" and unsupported_reason(model) is None:
        reason = release_reason(model, release)
        if reason:
            raise ExporterError(f"{type(model).__name__} on ONNX Runtime {release_name(release)}: {reason}")


def correct_errors(model, options: ExportOptions, ids) -> dict:
    """GPTQ grids for the decoder projections with a whitened correction of rank --error-correction per input
    group (exporter.compress.error_correction); returns the manifest's summary."""
    from exporter.compress.error_correction import quantize_with_correction

    fmt = grid_format(options)
    report = quantize_with_correction(model, ids, lambda _name: fmt, lambda _name: options.error_correction,
                                      CORRECTION_FORMAT, fisher_samples=options.fisher_samples,
                                      progress=options.progress)
    kept = [r["error_after"] / r["error_before"] for r in report.values() if r["error_before"] > 0]
    summary = {"rank": options.error_correction, "groups": len(report), "down_format": fmt.name,
               "up_format": CORRECTION_FORMAT.name,
               "output_error_kept": round(sum(kept) / len(kept), 4) if kept else None}
    say(f"error correction: rank {options.error_correction} on {len(report)} input groups; "
        f"{summary['output_error_kept']:.0%} of the quantization's output error left on calibration inputs")
    return summary


def grid_format(options: ExportOptions) -> QuantFormat:
    """The grid every MatMulNBits weight of an int4 or int8 export takes (--weights auto: the int4 one, the
    format of what the menu does not reach)."""
    try:
        return QuantFormat(GRID_BITS.get(options.weights, 4), options.block_size, not options.asymmetric)
    except ValueError as exc:
        raise ExporterError(f"--block-size: {exc}") from None


def quantize_grids(model, options: ExportOptions, ids, only: list | None = None) -> None:
    """Put the graph's MatMulNBits weights (all, or the linears `only`) on grid_format's grids
    (exporter.compress.quantize)."""
    if options.quantizer not in QUANTIZERS:
        raise ExporterError(f"unknown --quantizer {options.quantizer!r}; expected one of {', '.join(QUANTIZERS)}")
    fmt = grid_format(options)
    chosen = None if only is None else {id(m) for m in only}
    linears = grid_linears(model)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    hidden = embedding.weight.shape[1]
    if (head is not None and head.weight is embedding.weight and (chosen is None or id(head) in chosen)
            and hidden % fmt.block_size):  # before minutes of quantization: the writer could not gather its blocks
        feasible = " or ".join(str(b) for b in (16, 32, 64, 128, 256) if hidden % b == 0)
        raise ExporterError(f"--block-size {fmt.block_size}: the tied embedding gathers lm_head's blocks from its "
                            f"rows of {hidden}, which that does not divide; "
                            + (f"use {feasible}" if feasible else "no block size does: use --weights fp16"))
    quantize_model(model, lambda name: fmt if chosen is None or id(linears[name]) in chosen else None,
                   ids if options.quantizer == "gptq" else None, fisher_samples=options.fisher_samples,
                   progress=options.progress)
    quantize_embedding(model, options.block_size, fmt.bits)  # --weights auto counts it in fixed_bytes


def rank_multiples(allocation: str, profile_multiple: int, correctives: CorrectiveOptions | None,
                   int4_block: int | None = None) -> tuple[int, int, CorrectiveOptions | None]:
    """(primary rank multiple, fallback multiple, corrective options) of an export: Fisher ranks in
    multiples of the profile's `rank_multiple` (uniform ranks unrounded). int4 (`int4_block`, its block
    size): Fisher ranks in whole blocks where they fit (MatMulNBits blocks run along the rank in U, so a
    rank ending mid-block would share a scale with the corrective branch folded after it, and the rank
    levels cut the same blocks), and branch ranks rounded up to whole blocks (MatMulNBits pads a partial
    block of K with zeros)."""
    multiple = base = profile_multiple if allocation == "fisher" else 1
    if int4_block:
        if allocation == "fisher":
            multiple = math.lcm(multiple, int4_block)
        if correctives is not None:
            correctives = replace(correctives, rank_multiple=int4_block)
    return multiple, base, correctives


def choose_ranks(projections, allocation: str, importance: dict | None, target_params: int,
                 correctives: CorrectiveOptions | None, multiple: int, base_multiple: int | None = None,
                 node_params: float = 0.0) -> tuple[dict, dict, Allocation | None, int]:
    """The export's choice of ranks: (primary ranks, branch ranks, Fisher allocation or None, rank multiple).

    The primary ranks of `allocation` (fisher: `allocate` on the `importance` scores in multiples of
    `multiple`, or of `base_multiple` where those do not fit, each factorization's node priced at
    `node_params`; uniform: not rounded, multiple 1) are settled with the corrective branches so that
    together they fit `target_params`.
    """
    dense = sum(p.params for p in projections)
    chosen, used = None, 1  # the last try's: settle_ranks returns the ranks of its last try

    def primary_ranks(params: int) -> dict:
        nonlocal chosen, used
        if allocation == "uniform":
            return uniform_ranks(projections, 1.0 - params / dense)
        used = multiple
        try:
            chosen = allocate(projections, importance, params, multiple=multiple, node_params=node_params)
        except BudgetError:
            if base_multiple is None or multiple == base_multiple:
                raise
            # Whole int4 blocks everywhere do not fit (tiny models): the profile's multiple does.
            used = base_multiple
            chosen = allocate(projections, importance, params, multiple=base_multiple, node_params=node_params)
        return chosen.ranks

    ranks, branches = settle_ranks(primary_ranks, projections, correctives, target_params)
    return ranks, branches, chosen, used


def device_names(device: str) -> list[str]:
    """`--device` as a list: one profile, or several separated by commas (each once)."""
    names = [name.strip() for name in device.split(",")]
    if not all(names):
        raise ExporterError(f"--device {device!r}: an empty profile name in the list")
    if len(set(names)) != len(names):
        raise ExporterError(f"--device {device!r}: a profile named twice")
    return names


def run_exports(options: ExportOptions, levels: tuple[float, ...] | None = None,
                schedule: str | None = None) -> list[dict]:
    """`run_export` for each profile of `--device a,b,...`, from one load and one statistics pass: the
    calibration windows, factorizations, Fisher importance and format prices are computed for the first
    profile and reused by the others (Prepared), each of which compresses a copy of the dense model to its
    own budget. With several profiles, `--out DIR` holds one artifact per profile, DIR/<profile name>."""
    names = device_names(options.device)
    device = compute.resolve(options.compute)
    distributed.start(device)  # torchrun: join the data-parallel group (exporter.compress.distributed)
    if distributed.rank() > 0:
        options = replace(options, progress=False)
    with compute.using(device):
        results = _run_exports(options, names, levels, schedule)
    # after a failure the group is left as it is: leaving it waits for the peers, while this process's exit
    # closes its connections at once and fails their next collective
    distributed.stop()
    return results


def _run_exports(options: ExportOptions, names: list[str], levels, schedule) -> list[dict]:
    if len(names) == 1:
        return [run_export(options, levels, schedule)]
    profiles = [load_profile(name) for name in names]  # a bad name fails before any work
    source = resolve_model(options.model, options.trust_remote_code)
    runs = []
    for name, profile in zip(names, profiles):
        target = Path(options.out) / profile.name if options.out else default_out(source.name, profile.name)
        runs.append((profile, resolve_precision(replace(options, device=name, out=target), profile)))
    for profile, run in runs:  # every option and every target checked before minutes of work
        _requested_levels(run, levels, schedule)
        check_options(run)
        check_target(run.out, options.force)
    clocks = [Stopwatch() for _ in runs]  # each artifact's times; the model's load and a statistic land in the
    prepared = prepare(runs[0][1], clocks[0], None, runs[0][0], source)  # first artifact that needs them
    prepared.warm_branches = options.warm_branches
    results = []
    for number, ((profile, run), clock) in enumerate(zip(runs, clocks), 1):
        say(f"[{number}/{len(runs)}] {profile.name}: {run.out}")
        prepared.clock = clock
        prepared.more_profiles = number < len(runs)
        results.append(run_export(run, levels, schedule, prepared=prepared, profile=profile))
    return results


def run_export(options: ExportOptions, levels: tuple[float, ...] | None = None, schedule: str | None = None,
               prepared: Prepared | None = None, profile=None) -> dict:
    """Run the whole job; returns the manifest written into the artifact (Manifest.to_dict(), without the file
    table) with the artifact's path and size on disk (`artifact`, `artifact_bytes`).

    `levels`: rank fractions of the progressive levels to write (default `schedule.DEFAULT_LEVELS`; one level
    where the graph cannot be sliced); `schedule`: `--schedule` text, instead of the one derived from
    calibration measurements (exporter.graph.levels). `prepared`: statistics shared with other exports
    (run_exports); a copy of its dense model is compressed for `profile`.
    """
    from exporter.graph.levels import level_name
    from exporter.graph.writer import write_levels
    from exporter.runtime.generation import schedule_text

    device = compute.resolve(options.compute)  # a bad --compute fails before the work
    if prepared is None:
        clock = Stopwatch()
        profile, source = load_profile(options.device), resolve_model(options.model, options.trust_remote_code)
    else:
        clock, source = prepared.clock, prepared.source
    options = resolve_precision(options, profile)
    target = Path(options.out or default_out(source.name, profile.name))
    fractions = _requested_levels(options, levels, schedule)  # bad --levels / --schedule fail before the work
    if prepared is None:
        plan = plan_compression(options, clock, target, profile, source)
    else:
        with clock.stage("load"):
            model = copy.deepcopy(prepared.model)  # the prepared model stays dense for the next profile
        with compute.using(device):
            plan = compress(prepared, options, model=model, profile=profile)
    if distributed.rank() > 0:  # data-parallel: rank 0 writes the artifact
        return {"artifact": None, "rank": distributed.rank()}
    model, tokenizer, profile, params = plan.model, plan.tokenizer, plan.profile, plan.parameters
    say(f"{params['projection_fraction_removed']:.1%} of decoder projection parameters removed "
        f"({plan.budget_source}), {params['total_fraction_removed']:.1%} of all parameters "
        f"({plan.total_dense / 1e6:.1f}M -> {params['total_params'] / 1e6:.1f}M)")

    graph = choose_graph(model, options)
    release = options.release
    fractions = _exported_levels(plan, graph, options, fractions, explicit=levels is not None)
    leveled = len(fractions) > 1
    # the longest sequence the artifact serves: the profile's context (the rotary tables end there)
    context = served_positions(model.config, profile.budget.max_context)
    with staging_dir(target, options.force) as staging:
        prompt = tokenizer(PARITY_PROMPT, add_special_tokens=False)["input_ids"]
        prompt = prompt[: max(1, context - options.parity_steps)]  # prompt and steps within the context
        with clock.stage("export"):
            say(f"writing the ONNX decoder with KV cache ({graph} graph, fp32"
                + (f", levels {', '.join(level_name(f) for f in fractions)})" if leveled else ")"))
            if graph == "optimum":
                onnx_path = export_onnx(model, staging)
                check_release(_graph_proto(onnx_path), release, "optimum-onnx's graph")
            elif leveled and options.weights == "fp32":
                entries = write_levels(model, staging, fractions, progress=options.progress, onnxruntime=release,
                                       max_context=context)
                onnx_path = staging / entries[0]["file"]
            else:  # one level, or the fp32 twin of the quantized levels
                onnx_path = write_decoder(model, staging, onnxruntime=release, max_context=context)
            save_tokenizer(tokenizer, staging)
            if graph == "fused":  # the builder's I/O contract: onnxruntime-genai can load it
                write_genai_config(staging, model, tokenizer, onnx_path.name, context)
        with clock.stage("tokenizer"):  # every installed runtime reads the artifact's tokenizer as the source's
            tokenizer_check = check_artifact_tokenizer(tokenizer, staging)
        with clock.stage("parity"):
            parity = check_parity(model, onnx_path, prompt, options.parity_steps, options.parity_atol).to_dict()
        if options.weights != "fp32":
            with clock.stage("quantize"):
                say((f"writing {options.weights} weights" if options.weights == "fp16"
                     else f"quantizing weights to {options.weights}") + f" ({options.activations} activations)")
                accuracy_level = options.accuracy_level if options.weights in GRID_BITS else None
                if leveled:
                    entries = write_levels(model, staging, fractions, weights=options.weights,
                                           block_size=options.block_size, accuracy_level=accuracy_level,
                                           progress=options.progress, activations=options.activations,
                                           onnxruntime=release, max_context=context)
                else:
                    write_decoder(model, staging, weights=options.weights, block_size=options.block_size,
                                  accuracy_level=accuracy_level, activations=options.activations,
                                  onnxruntime=release, max_context=context)
            with clock.stage("parity"):
                parity["quantized"] = check_parity(model, onnx_path, prompt, options.parity_steps,
                                                   atol=float("inf"), min_agreement=QUANTIZED_MIN_AGREEMENT).to_dict()
        with clock.stage("levels"):
            if leveled:
                level_entries, derivation = _check_levels(plan, options, staging, entries, prompt, parity)
            else:
                level_entries = [{"name": level_name(1.0), "fraction": 1.0, "file": onnx_path.name}]
                derivation = {"source": "single level"}
            chosen = _choose_schedule(level_entries, derivation, schedule)
        say(f"schedule: {schedule_text(chosen)} ({derivation['source']})")
        ort_format = None
        if options.ort_format:  # before the report and the manifest's file table, which list it
            from exporter.graph.ort_format import write_ort_format

            with clock.stage("ort format"):
                say(f"converting {onnx_path.name} to the ORT format (ONNX Runtime Mobile)")
                ort_format = write_ort_format(staging, onnx_path, prompt, [e["file"] for e in level_entries[1:]])
        compressed = plan.target_params is not None
        grids = options.weights in GRID_BITS
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            exporter_version=__version__,
            source_model=SourceModel(name=plan.source.name, path=plan.source.describe(), hub_id=plan.source.hub_id,
                                     architecture=type(model).__name__, model_type=model.config.model_type),
            profile=profile.to_dict(),
            method=Method(
                factorization=(f"{options.method}-svd" if options.method == "whitened" else "svd")
                if compressed else "none",
                allocation=options.allocation if compressed else "none",
                budget_source=plan.budget_source,
                projection_params_target=plan.target_params,
                rank_multiple=plan.rank_multiple,
                allocation_details=plan.allocation.to_dict() if plan.allocation else None,
                allocation_curve=allocation_curve(plan.projections, plan.importance, plan.rank_multiple,
                                                  node_params=plan.allocation.node_params)
                if plan.allocation else None,
                calibration=plan.calibration, seed=options.seed,
                correctives=_corrective_summary(options, plan) if compressed else None,
                formats={**plan.formats_budget, "units": [u.to_dict() for u in plan.formats]}
                if plan.formats else None,
                error_correction=plan.error_correction,
                scale_tuning=plan.scale_tuning,
                compute=compute.describe(device),
                **({"world_size": distributed.world_size(), "sharding": distributed.describe()["sharding"]}
                   if distributed.active() else {}),
            ),
            precision=options.weights,
            budget=plan.budget.to_dict(),
            parameters=Parameters.from_dict(params),
            ranks={p.name: RankEntry(rank=plan.ranks[p.name], corrective_rank=plan.corrective_ranks.get(p.name, 0),
                                     out_features=p.out_features, in_features=p.in_features)
                   for p in plan.projections},
            onnx=OnnxGraph(file=onnx_path.name, task="text-generation-with-past", graph=graph,
                           weights=options.weights, activations=options.activations,
                           block_size=options.block_size if grids else None,
                           accuracy_level=options.accuracy_level if grids else None,
                           quantization=_quantization_summary(options, staging / onnx_path.name) if grids else None,
                           **_runtime_summary(staging, [e["file"] for e in level_entries], release)),
            levels=[Level.from_dict(entry) for entry in level_entries],
            schedule=[ScheduleEntry(level=level, start=start) for level, start in chosen],
            schedule_derivation=derivation,
            ort_format=OrtFormat.from_dict(ort_format) if ort_format else None,
            parity=parity,
            tokenizer_check=tokenizer_check,
            versions=_versions(),
            timings_s={k: round(v, 2) for k, v in clock.stages.items()},
        )
        write_golden(staging, onnx_path, tokenizer, manifest.onnx.to_dict())  # golden.json, checked on devices
        write_report(staging, manifest)
        write_manifest(staging, manifest)
    return {**manifest.to_dict(), "artifact": str(target),
            "artifact_bytes": sum(f.stat().st_size for f in target.rglob("*") if f.is_file())}


def _graph_proto(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _runtime_summary(directory: Path, files: list[str], release: tuple[int, int] | None) -> dict:
    """The manifest's opset, IR version, target and oldest ONNX Runtime release over every level's graph."""
    protos = [_graph_proto(directory / f) for f in files]
    opset = max(next(o.version for o in p.opset_import if o.domain in ("", "ai.onnx")) for p in protos)
    oldest = max((oldest_release(p) for p in protos), key=parse_release)
    return {"opset": opset, "ir_version": max(p.ir_version for p in protos), "oldest_onnxruntime": oldest,
            "target_onnxruntime": release_name(release) if release else None}


def primary_linears(model, projections) -> list:
    """The nn.Linear layers of every projection's primary path (dense, or both low-rank factors), each
    once (a joint unit's projections share their down factor)."""
    linears = {}
    for module in (model.get_submodule(name) for p in projections for name in p.members):
        module = getattr(module, "base", module)  # CorrectedLinear -> its LowRankLinear
        for linear in ([module.down, module.up] if isinstance(module, LowRankLinear) else [module]):
            linears[id(linear)] = linear
    return list(linears.values())


def branch_linears(model, projections) -> list:
    modules = [model.get_submodule(name) for p in projections for name in p.members]
    linears = {id(linear): linear for m in modules if isinstance(m, CorrectedLinear)
               for linear in (m.corrective_down, m.corrective_up)}
    return list(linears.values())


def _quantization_summary(options: ExportOptions, onnx_path: Path) -> dict:
    from exporter.graph.matmul_nbits import graph_formats

    return {"quantizer": options.quantizer, "grid": grid_format(options).name,
            "formats": "auto" if options.auto_formats else "fixed", "matmul_nbits": graph_formats(onnx_path)}


def _corrective_summary(options: ExportOptions, plan: Plan) -> dict | None:
    c = options.correctives
    if c is None:
        return None
    report = plan.corrective_report.to_dict() if plan.corrective_report else {}
    warm = report.get("warm_start", False)  # from the previous profile's branches: KL steps alone
    return {"rank": c.rank, "epochs": 0 if warm else c.epochs, "lr": c.lr,
            "kl_steps": c.warm_kl_steps if warm else c.kl_steps, "kl_lr": c.kl_lr,
            "tune_factors": c.tune_factors, "form": "folded",
            "quantization_aware": options.weights in GRID_BITS and options.quantization_aware, **report}


def choose_graph(model, options: ExportOptions) -> str:
    """The fused writer where it supports the model (say so when falling back), else optimum."""
    if options.graph not in GRAPHS:
        raise ExporterError(f"unknown --graph {options.graph!r}; expected one of {', '.join(GRAPHS)}")
    if options.graph == "optimum":
        if options.weights != "fp32":
            raise ExporterError(f"--weights {options.weights} needs the fused graph (--graph fused)")
        return "optimum"
    reason = unsupported_reason(model)
    if reason is None:
        return "fused"
    if options.graph == "fused" or options.weights != "fp32":
        raise ExporterError(f"the fused graph writer cannot write this model: {reason}"
                            + ("" if options.graph == "fused" else
                               f"; {options.weights} weights need it (pass --weights fp32 for the optimum export)"))
    say(f"the fused graph writer cannot write this model ({reason}): using the optimum-onnx export")
    return "optimum"


def _versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    return {"exporter": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": sys.version.split()[0]}


# --------------------------------------------------------------------------- progressive decoding levels


def _requested_levels(options: ExportOptions, levels: tuple[float, ...] | None,
                      schedule: str | None) -> tuple[float, ...]:
    """The checked `--levels` (default: schedule.DEFAULT_LEVELS); one level where the options rule levels out
    (an error if levels were asked for explicitly). A `--schedule` must name these levels."""
    from exporter.graph.levels import DEFAULT_LEVELS, check_levels, level_name
    from exporter.graph.writer import LEVEL_WEIGHTS
    from exporter.runtime.generation import parse_schedule

    fractions = check_levels(DEFAULT_LEVELS if levels is None else levels)
    reason = None
    if options.graph == "optimum":
        reason = "the optimum graph has no rank levels (the fused graph has)"
    elif options.weights not in LEVEL_WEIGHTS:
        reason = f"{options.weights} graphs have no rank levels (only {', '.join(LEVEL_WEIGHTS)} have)"
    elif options.weights in GRID_BITS and options.asymmetric:
        # a level reads a prefix of the full level's blocks; packed 4-bit zero points split bytes between blocks
        reason = f"asymmetric {options.weights} graphs have no rank levels"
    elif options.error_correction:
        reason = "int4 graphs with --error-correction have no rank levels"
    if len(fractions) > 1 and reason:
        if levels is not None:
            raise ExporterError(f"--levels: {reason}; pass --levels 1.0")
        say(f"{reason}: writing one level")
        fractions = (1.0,)
    if schedule is not None:
        parse_schedule(schedule, [level_name(f) for f in fractions])
    return fractions


def _exported_levels(plan: Plan, graph: str, options: ExportOptions, fractions: tuple[float, ...],
                     explicit: bool) -> tuple[float, ...]:
    """One level where the compressed model has nothing to slice or the graph cannot be sliced."""
    if len(fractions) == 1:
        return fractions
    if graph != "fused":
        if explicit:
            raise ExporterError("--levels: this model is exported with the optimum graph, which has no rank levels; "
                                "pass --levels 1.0")
        say("the optimum graph has no rank levels: writing one level")
        return (1.0,)
    if all(rank is None for rank in plan.ranks.values()):
        if explicit:
            say("--levels: the model is exported dense, nothing to slice: writing one level")
        return (1.0,)
    if options.auto_formats:  # a level reads a prefix of the factors' blocks; their formats differ per unit
        if explicit:
            say("--levels: --weights auto graphs have no rank levels: writing one level")
        return (1.0,)
    return fractions


def _held_out_windows(plan: Plan, options: ExportOptions):
    """(windows, description): the calibration windows corrective training holds out (the last ones; Fisher
    importance reads the first), or (None, reason) where the export read no calibration data."""
    from exporter.settings import CorrectiveOptions

    if options.calib is None and plan.calibration is None:
        return None, "no calibration data was read (plain SVD, uniform ranks, no correctives)"
    if plan.windows is not None:  # the windows compression read, not read (or sampled) again
        ids, description = plan.windows, plan.calibration
    else:
        ids, description = calibration_ids(plan.model, plan.tokenizer, options.calib, options.calib_samples,
                                           options.calib_seq_len, options.seed, options.calib_field,
                                           model_key=plan.source.describe(), progress=options.progress,
                                           chat_share=options.calib_chat)
    holdout = (options.correctives or CorrectiveOptions()).holdout
    count = max(1, min(holdout, ids.shape[0] // 4))
    return ids[-count:], f"the last {count} windows of {description}"


def _check_levels(plan: Plan, options: ExportOptions, staging: Path, entries: list[dict], prompt: list[int],
                  parity: dict) -> tuple[list[dict], dict]:
    """Every level against the PyTorch model sliced to its ranks: ONNX Runtime parity (fp32: the export's
    tolerances; quantized: the quantized floor), and the NLL increase on held-out calibration windows that the
    schedule is derived from. Returns the manifest's `levels` entries and the schedule's derivation."""
    from tqdm.auto import tqdm

    from exporter.errors import ParityError
    from exporter.graph.levels import (
        FULL_RANK_TOKENS,
        HORIZON_TOKENS,
        POSITION_BUCKETS,
        RULE,
        TOLERANCE_NATS,
        derive_schedule,
        nll_increase,
        token_nll,
    )
    from exporter.graph.writer import level_ranks, sliced_copy
    from exporter.runtime.generation import schedule_text

    model, quantized = plan.model, options.weights != "fp32"
    windows, calibration = _held_out_windows(plan, options)
    base = token_nll(model, windows) if windows is not None else None
    ranks = level_ranks(model, [e["fraction"] for e in entries], entries[0]["rank_multiple"])
    checked = []
    bar = tqdm(list(zip(entries, ranks)), desc="checking levels", unit="level", disable=not options.progress)
    for j, (entry, level) in enumerate(bar):
        entry = dict(entry)
        reference = model if j == 0 else sliced_copy(model, level)
        if j == 0:
            entry["parity"] = parity.get("quantized", parity)
        else:
            report = check_parity(reference, staging / entry["file"], prompt, options.parity_steps,
                                  float("inf") if quantized else options.parity_atol,
                                  QUANTIZED_MIN_AGREEMENT if quantized else 0.9, raise_on_fail=False)
            if not report.passed and quantized:
                # The fp32 graph's slicing is checked tightly elsewhere (tests, fp32 exports); a quantized
                # level this far from PyTorch is a fragile one (deep ranks on a heavily compressed model
                # amplify the quantization error), not worth shipping nor failing the export for.
                say(f"level {entry['name']} left out: its {options.weights} graph agrees with PyTorch at its ranks "
                    f"on {report.greedy_agreement:.0%} of greedy tokens (at least {QUANTIZED_MIN_AGREEMENT:.0%} "
                    "needed)")
                (staging / entry["file"]).unlink()
                continue
            if not report.passed:
                raise ParityError(f"level {entry['name']}: ONNX Runtime parity against PyTorch at its ranks failed: "
                                  f"max |logit diff| {report.max_abs_logit_diff:.3g}, greedy agreement "
                                  f"{report.greedy_agreement:.0%}")
            entry["parity"] = report.to_dict()
        if base is not None:
            entry.update(nll_increase(base, base if j == 0 else token_nll(reference, windows)))
        checked.append(entry)
        del reference
    derivation = {"source": "calibration", "rule": RULE, "horizon_tokens": HORIZON_TOKENS,
                  "tolerance_nats": TOLERANCE_NATS, "full_rank_tokens": FULL_RANK_TOKENS, "calibration": calibration}
    if base is None:
        derivation["source"] = "static: " + calibration
        return checked, derivation
    derived = derive_schedule([e["name"] for e in checked], [e["nll_increase"] for e in checked])
    derivation.update(base_nll=round(float(base.mean()), 6), position_buckets=POSITION_BUCKETS,
                      derived=schedule_text(derived))
    return checked, derivation


def _choose_schedule(entries: list[dict], derivation: dict, schedule: str | None) -> list[tuple[str, int]]:
    """`--schedule` where given (recorded as the source), else the derived schedule, else full rank."""
    from exporter.runtime.generation import parse_schedule

    names = [e["name"] for e in entries]
    if schedule is not None:
        derivation["source"] = f"--schedule {schedule}"
        return parse_schedule(schedule, names)
    return parse_schedule(derivation.get("derived", "static"), names)

