"""Defaults and option records the command line needs, kept free of torch so `exporter generate`,
`evaluate` and `validate` start without importing it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def cache_dir() -> Path:
    """User cache for converted models, calibration samples, statistics and this machine's measurements
    (EXPORTER_CACHE overrides)."""
    root = os.environ.get("EXPORTER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "exporter"
    )
    return Path(root)


DEFAULT_NUM_SAMPLES = 32  # calibration sequences
DEFAULT_SEQ_LEN = 512  # tokens per calibration sequence
# with a calibration file, the share of sequences that are chat turns (`--calib-chat`; measured in
# benchmarks/RESULTS.md, "Chat-format calibration")
CALIB_CHAT = 0.5
# `--weights auto`: end-to-end KL steps that train the grids' scales (`--tune-scales`; the CLI's default with auto,
# 0 with int4 and for library callers). Measured in benchmarks/RESULTS.md, "Scale tuning" and "Statistics kept on
# disk": -0.6 to -1.3 perplexity at 78-105.5 MB for 2-3 minutes on SmolLM2-135M; "Scale tuning in bfloat16": 40
# steps lower it again at 52-86.5 MB (52 MB 43.26 -> 41.43) in 4 minutes, what 20 float32 steps took; "60 tuning
# steps by default": 60 at 65 MB 30.94 -> 30.44 and CNN/DailyMail 0.832x -> 0.852x dense (105.5 MB at 93.5 MB's plan
# 26.62 -> 26.52), part of the time they add bought back by the teacher reading the Gram pass's head inputs.
TUNE_SCALES_STEPS = 60
# ... and more windows of the calibration file for those steps than the calibration's 28 (`--tune-windows`; 60 steps
# of 2 windows draw 120): "Scale tuning on more windows" in benchmarks/RESULTS.md.
TUNE_WINDOWS = 64
# ONNX Runtime against PyTorch, fp32: the export's parity check and golden.json's fp32 tolerance on devices
PARITY_ATOL = 1e-2


@dataclass
class CorrectiveOptions:
    rank: int = 16  # r_c of every factorized projection ...
    rank_by_kind: dict[str, int] = field(default_factory=dict)  # ... or per projection type (q_proj: 8)
    max_budget_share: float = 0.1  # branches take at most this share of the projection budget
    rank_multiple: int = 1  # int4: whole MatMulNBits blocks, or the folded factor pads the last one with zeros
    solve: bool = True  # start each block from the least-squares fit of its projections' residuals
    epochs: int = 0  # block-wise gradient passes over the training part of the calibration set
    lr: float = 1e-3
    batch_size: int = 4
    holdout: int = 4  # calibration sequences kept out of training to measure the error
    kl_steps: int = 40  # end-to-end KL distillation steps after the block-wise stage (measured: benchmarks/RESULTS.md, CALR probe)
    kl_lr: float = 1e-3
    # A later profile of `--device a,b` at other ranks starts its branches from the previous profile's and trains
    # only this many KL steps, kept where they lower the held-out KL (no block-wise stage; measured on SmolLM2:
    # 10 steps at kl_lr raised the KL, benchmarks/RESULTS.md, warm-started branches).
    warm_kl_steps: int = 0
    kl_batch_size: int = 2
    tune_factors: bool = False  # also train the primary factors (lower learning rate)
    factor_lr_scale: float = 0.1
