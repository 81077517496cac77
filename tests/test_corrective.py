"""CALR corrective branches (exporter.compress.corrective, lowrank.CorrectedLinear) on tiny models."""

import numpy as np
import pytest
import torch

from exporter.compress.corrective import (
    CorrectiveOptions,
    attach_correctives,
    dense_teacher,
    train_blockwise,
    train_correctives,
)
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
from exporter.compress.lowrank import CorrectedLinear, LowRankLinear
from exporter.graph.writer import ProjectionWeights


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def compressed(tiny_models, calib_ids, family="llama", ratio=0.5, rank=4):
    """(teacher, student with untrained correctives, decompositions) for a tiny model."""
    model = tiny_models.load(family)
    teacher = dense_teacher(model)
    decompositions = decompose_model(model, "whitened", calib_ids, progress=False)
    apply_ranks(model, decompositions, uniform_ranks(decoder_projections(model), ratio))
    attach_correctives(model, decompositions, rank)
    return teacher, model, decompositions


def test_untrained_branch_reproduces_the_svd_path_exactly(tiny_models, calib_ids):
    model = tiny_models.load("llama")
    decompositions = decompose_model(model, "whitened", calib_ids, progress=False)
    apply_ranks(model, decompositions, uniform_ranks(decoder_projections(model), 0.5))
    before = logits(model, calib_ids[:2])
    attached = attach_correctives(model, decompositions, 4)
    assert len(attached) == 14 and set(attached.values()) == {4}
    wrapped = [m for m in model.modules() if isinstance(m, CorrectedLinear)]
    assert len(wrapped) == 14
    assert all(float(m.corrective_down.weight.detach().abs().sum()) > 0 for m in wrapped)  # a real subspace, not zeros
    assert torch.equal(logits(model, calib_ids[:2]), before)


def test_branch_down_starts_at_the_next_whitened_directions(tiny_models, calib_ids):
    _, model, decompositions = compressed(tiny_models, calib_ids)
    name = "model.layers.0.self_attn.q_proj"
    module = model.get_submodule(name)
    r = module.rank
    assert torch.equal(module.corrective_down.weight, decompositions[name].down[r : r + 4])


def test_blockwise_training_lowers_held_out_block_error(tiny_models, calib_ids):
    teacher, student, _ = compressed(tiny_models, calib_ids)
    report = train_blockwise(student, teacher, calib_ids, CorrectiveOptions(rank=4, epochs=20, lr=3e-3, holdout=2),
                             progress=False)
    assert len(report.block_error_before) == 2
    # Held-out sequences (the last 2 of 8) were never trained on.
    for before, after in zip(report.block_error_before, report.block_error_after):
        assert after < 0.95 * before, (report.block_error_before, report.block_error_after)
    # Only the branches moved: the primary factors are frozen by default.
    fresh = compressed(tiny_models, calib_ids)[1]
    for (name, a), (_, b) in zip(student.named_parameters(), fresh.named_parameters()):
        if "corrective" not in name:
            assert torch.equal(a, b), name


def test_training_brings_the_model_closer_to_the_original(tiny_models, calib_ids):
    teacher, student, _ = compressed(tiny_models, calib_ids)
    held = calib_ids[-2:]
    target = torch.log_softmax(logits(teacher, held), -1)

    def kl():
        return float(torch.nn.functional.kl_div(torch.log_softmax(logits(student, held), -1), target,
                                                log_target=True, reduction="batchmean"))

    start = kl()
    report = train_correctives(student, teacher, calib_ids,
                               CorrectiveOptions(rank=4, epochs=10, lr=3e-3, holdout=2, kl_steps=10, kl_lr=1e-3),
                               progress=False)
    assert report.kl_before is not None and report.kl_after < report.kl_before
    assert kl() < 0.9 * start


def test_tune_factors_moves_the_primary_path(tiny_models, calib_ids):
    teacher, student, _ = compressed(tiny_models, calib_ids)
    q = student.get_submodule("model.layers.0.self_attn.q_proj")
    before = q.base.down.weight.clone()
    train_blockwise(student, teacher, calib_ids, CorrectiveOptions(rank=4, epochs=2, holdout=2, tune_factors=True),
                    progress=False)
    assert not torch.equal(q.base.down.weight, before)


def test_folded_factors_equal_the_separate_branch(tiny_models, calib_ids):
    teacher, student, _ = compressed(tiny_models, calib_ids)
    train_blockwise(student, teacher, calib_ids, CorrectiveOptions(rank=4, epochs=3, holdout=2), progress=False)
    module = student.get_submodule("model.layers.1.mlp.down_proj")
    weights = ProjectionWeights.from_module("down_proj", module)
    assert [p.rank for p in weights.pairs] == [module.rank, 4]
    down, up = weights.fold()
    assert down.shape[0] == module.rank + 4
    x = torch.randn(5, module.in_features)
    with torch.no_grad():
        separate = module(x).numpy()
    folded = (x.numpy() @ down.T) @ up.T
    np.testing.assert_allclose(folded, separate, rtol=1e-4, atol=1e-5)
    # A rank-sliced level keeps the whole branch and a prefix of the primary pair.
    down_sliced, _ = weights.fold(active_rank=2)
    assert down_sliced.shape[0] == 2 + 4


def test_parameter_accounting_counts_the_branches(tiny_models, calib_ids):
    _, model, _ = compressed(tiny_models, calib_ids, rank=4)
    projections = decoder_projections(tiny_models.load("llama"))  # of the dense model: names and shapes
    ranks, branches = effective_ranks(model, projections), corrective_ranks(model, projections)
    assert set(branches.values()) == {4}
    plain = parameter_summary(projections, ranks, count_params(model))
    corrected = parameter_summary(projections, ranks, count_params(model), branches)
    extra = sum(4 * (p.in_features + p.out_features) for p in projections)
    assert corrected["projection_params"] - plain["projection_params"] == extra
    # The modules really hold that many parameters.
    held = sum(sum(w.numel() for w in model.get_submodule(p.name).parameters()) for p in projections)
    assert held == corrected["projection_params"]


def test_dense_projections_get_no_branch(tiny_models, calib_ids):
    model = tiny_models.load("llama")
    decompositions = decompose_model(model, "whitened", calib_ids, progress=False)
    ranks = uniform_ranks(decoder_projections(model), 0.5)
    ranks["model.layers.0.self_attn.q_proj"] = None
    apply_ranks(model, decompositions, ranks)
    attached = attach_correctives(model, decompositions, 4)
    assert "model.layers.0.self_attn.q_proj" not in attached
    assert type(model.get_submodule("model.layers.0.self_attn.q_proj")).__name__ == "Linear"
    assert isinstance(model.get_submodule("model.layers.0.self_attn.k_proj").base, LowRankLinear)


def test_too_few_calibration_sequences_is_a_clear_error(tiny_models, calib_ids):
    from exporter.errors import ExporterError

    teacher, student, _ = compressed(tiny_models, calib_ids)
    with pytest.raises(ExporterError, match="at least 2 calibration sequences"):
        train_blockwise(student, teacher, calib_ids[:1], CorrectiveOptions(rank=4), progress=False)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fused_graph_with_correctives_matches_pytorch(tiny_models, calib_ids, tmp_path, family):
    from exporter.graph.optimum_export import check_parity
    from exporter.graph.writer import write_decoder

    teacher, student, _ = compressed(tiny_models, calib_ids, family=family)
    train_blockwise(student, teacher, calib_ids, CorrectiveOptions(rank=4, epochs=3, holdout=2), progress=False)
    path = write_decoder(student, tmp_path)
    report = check_parity(student, path, calib_ids[0, :12].tolist(), steps=8, atol=1e-4)
    assert report.passed and report.max_abs_logit_diff < 1e-4


def test_least_squares_fit_alone_lowers_held_out_block_error(tiny_models, calib_ids):
    teacher, student, _ = compressed(tiny_models, calib_ids)
    report = train_blockwise(student, teacher, calib_ids, CorrectiveOptions(rank=4, epochs=0, holdout=2),
                             progress=False)
    # Each block either improves on held-out text or falls back to the plain SVD path (branch zeroed).
    kept = [i for i in range(2) if i not in report.blocks_reset]
    assert kept, report.to_dict()
    for i, (before, after) in enumerate(zip(report.block_error_before, report.block_error_after)):
        assert after < before if i in kept else after == before
    for i in report.blocks_reset:
        layer = student.model.layers[i]
        assert all(float(m.corrective_up.weight.detach().abs().sum()) == 0 for m in layer.modules()
                   if isinstance(m, CorrectedLinear))
    # Without the fit (and no epochs) nothing changes: the branch still outputs zero.
    teacher, student, _ = compressed(tiny_models, calib_ids)
    report = train_blockwise(student, teacher, calib_ids, CorrectiveOptions(rank=4, epochs=0, holdout=2, solve=False),
                             progress=False)
    assert report.block_error_after == report.block_error_before


def test_branch_ranks_round_to_whole_blocks_and_shrink_unrounded_when_over_budget():
    from exporter.compress.corrective import branch_ranks
    from exporter.compress.factorize import Projection

    projections = [Projection(f"model.layers.{i}.mlp.up_proj", 1536, 576) for i in range(4)]
    ranks = {p.name: 64 for p in projections}
    dense = sum(p.params for p in projections)
    blocks = branch_ranks(projections, ranks, CorrectiveOptions(rank=16, rank_multiple=32), dense)
    assert set(blocks.values()) == {32}  # int4: a folded branch adds whole blocks, no zero padding
    assert set(branch_ranks(projections, ranks, CorrectiveOptions(rank=16), dense).values()) == {16}
    tight = branch_ranks(projections, ranks, CorrectiveOptions(rank=16, rank_multiple=32), 200_000)
    assert all(1 <= r < 32 for r in tight.values())  # over the budget share: shrunk below a block
    assert sum(r * 2112 for r in tight.values()) <= 0.1 * 200_000


def test_joint_units_share_their_down_factors_through_training(tiny_models, calib_ids):
    """Joint factorization (q/k/v, gate/up as units): the stacked weight's whitened SVD, one down factor per
    unit shared by its projections, and CALR branches whose down factor is shared too, before and after
    block-wise solving and training; the graph writer then finds each unit's projections equal-down."""
    model = tiny_models.load("llama")
    teacher = dense_teacher(model)
    units = decoder_projections(model, joint=True)
    assert [u.kind for u in units[:4]] == ["q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj"]
    assert units[0].out_features == 64 + 32 + 32 and units[0].members[1] == "model.layers.0.self_attn.k_proj"
    decompositions = decompose_model(model, "whitened", calib_ids, progress=False, joint=True)
    assert set(decompositions) == {u.name for u in units}
    dense_logits = logits(model, calib_ids[:2])
    ranks = uniform_ranks(units, 0.4)
    apply_ranks(model, decompositions, ranks)
    assert effective_ranks(model, units) == ranks
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.down is attn.k_proj.down is attn.v_proj.down
    # The stacked factorization is the unit's: q/k/v rows of U @ V approximate the stacked weight.
    stacked = torch.cat([m.up.weight @ m.down.weight for m in (attn.q_proj, attn.k_proj, attn.v_proj)])
    decomposition = decompositions[units[0].name]
    r = ranks[units[0].name]
    assert torch.allclose(stacked, decomposition.up[:, :r] @ decomposition.down[:r], atol=1e-6)
    # Joint parameters: the shared down factor counted once.
    summary = parameter_summary(units, ranks, 0)
    assert count_params(model) == count_params(teacher) - summary["projection_params_dense"] + summary["projection_params"]

    attached = attach_correctives(model, decompositions, 4)
    assert set(attached) == {u.name for u in units}
    before = float((logits(model, calib_ids[:2]) - dense_logits).norm())
    train_correctives(model, teacher, calib_ids, CorrectiveOptions(rank=4, epochs=5, kl_steps=5, holdout=2),
                      progress=False)
    for layer in model.model.layers:
        q, k, v = layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj
        assert q.corrective_down is k.corrective_down is v.corrective_down and q.base.down is v.base.down
        assert layer.mlp.gate_proj.corrective_down is layer.mlp.up_proj.corrective_down
        downs = [ProjectionWeights.from_module("p", m).fold()[0] for m in (q, k, v)]
        assert all(np.array_equal(downs[0], d) for d in downs[1:])
    assert corrective_ranks(model, units) == {u.name: 4 for u in units}
    assert float((logits(model, calib_ids[:2]) - dense_logits).norm()) < before
