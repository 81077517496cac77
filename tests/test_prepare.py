"""pipeline.prepare() and compress(): the export's steps, callable by every benchmark. One prepared model's
statistics (calibration, factorizations, Fisher importance, format prices) are computed once and serve every
compression of a copy; a copy compressed from shared statistics equals the export's own plan."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from exporter.pipeline import ExportOptions, Stopwatch, compress, plan_compression, prepare

SAMPLES, SEQ_LEN = 8, 32


@pytest.fixture()
def options(llama_dir, calib_file):
    return ExportOptions(device="host", model=str(llama_dir), calib=str(calib_file), calib_samples=SAMPLES,
                         calib_seq_len=SEQ_LEN, ratio=0.3, weights="fp32", progress=False)


def weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_statistics_are_computed_once_and_shared_by_copies(options):
    prepared = prepare(options)
    dense = weights(prepared.model)
    plans = [compress(prepared, replace(options, ratio=ratio), model=copy.deepcopy(prepared.model))
             for ratio in (0.2, 0.3, 0.4)]
    kinds = [kind for kind, _key in prepared.seconds]
    assert kinds.count("calibration") == 1 and kinds.count("factorize") == 1 and kinds.count("importance") == 1
    removed = [p.parameters["projection_fraction_removed"] for p in plans]
    assert removed == sorted(removed) and removed[0] < removed[-1]
    after = prepared.model.state_dict()  # the prepared model stays dense: copies were compressed
    assert after.keys() == dense.keys() and all(torch.equal(after[k], dense[k]) for k in dense)


def test_a_copy_compressed_from_shared_statistics_equals_the_export_plan(options):
    alone = plan_compression(options, Stopwatch())
    prepared = prepare(options)
    compress(prepared, replace(options, ratio=0.5), model=copy.deepcopy(prepared.model))  # another row first
    shared = compress(prepared, model=copy.deepcopy(prepared.model))
    assert shared.ranks == alone.ranks
    a, b = weights(alone.model), weights(shared.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compress_in_place_consumes_the_prepared_model(options):
    prepared = prepare(options)
    compress(prepared)
    with pytest.raises(RuntimeError, match="compressed in place"):
        prepared.decompositions("svd", joint=False, full_rank=False)


def test_options_that_key_the_statistics_must_match(options):
    prepared = prepare(options)
    with pytest.raises(ValueError, match="calib_samples"):
        compress(prepared, replace(options, calib_samples=SAMPLES + 1), model=copy.deepcopy(prepared.model))
