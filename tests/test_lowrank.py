"""exporter.compress.lowrank: exactness, truncation error, whitening, balancing, prefix slicing, break-even."""

import pytest
import torch

from exporter.compress.lowrank import Decomposition, LowRankLinear, break_even_rank, decompose, whitening_factor


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def weight(out=24, inp=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g, dtype=torch.float64).to(dtype)


def activations(n=300, dim=40, seed=1, anisotropic=True):
    """Calibration-like inputs: correlated features with a decaying spectrum (as in real LMs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    if anisotropic:
        scales = torch.logspace(1, -2, dim, dtype=torch.float64)
        mix = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
        x = (x * scales) @ mix
    return x


@pytest.mark.parametrize("whitened", [False, True], ids=["plain", "whitened"])
def test_full_rank_is_exact(whitened):
    w = weight()
    gram = activations().T @ activations() if whitened else None
    d = decompose(w, gram)
    assert d.max_rank == min(w.shape)
    assert d.up.shape == (24, 24) and d.down.shape == (24, 40) and d.up.dtype == w.dtype
    assert rel(d.up @ d.down, w) < 1e-5
    assert torch.all(d.sigma[:-1] >= d.sigma[1:])  # components sorted by importance


def test_decompose_leaves_inputs_alone():
    w, x = weight(), activations()
    gram = x.T @ x
    w0, g0 = w.clone(), gram.clone()
    decompose(w, gram, max_rank=5, bias=torch.ones(24))
    assert torch.equal(w, w0) and torch.equal(gram, g0)


def test_whitened_truncation_error_is_sum_of_dropped_sigma_squared():
    w, x = weight(dtype=torch.float64), activations()
    gram = x.T @ x
    s = whitening_factor(gram)
    assert torch.allclose(s @ s.T, gram, rtol=1e-10, atol=1e-8)
    d = decompose(w, gram)
    sigma2 = d.sigma.double() ** 2
    for r in (1, 4, 10, 20):
        w_r = d.up[:, :r] @ d.down[:r]
        dropped = float(sigma2[r:].sum())
        whitened_norm = float(((w - w_r) @ s).norm() ** 2)
        output_error = float((x @ (w - w_r).T).norm() ** 2)
        assert whitened_norm == pytest.approx(dropped, rel=1e-5)
        assert output_error == pytest.approx(dropped, rel=1e-5)


def test_whitened_beats_plain_svd_on_calibration_weighted_error():
    w, x = weight(dtype=torch.float64), activations()
    gram = x.T @ x
    whitened, plain = decompose(w, gram), decompose(w)
    errors = []
    for r in (2, 6, 12, 18):
        err_w = float((x @ (w - whitened.up[:, :r] @ whitened.down[:r]).T).norm())
        err_p = float((x @ (w - plain.up[:, :r] @ plain.down[:r]).T).norm())
        assert err_w < err_p
        errors.append(err_w)
    assert errors == sorted(errors, reverse=True)  # more rank, less error
    # ... while plain SVD wins in the unweighted Frobenius norm it optimizes (Eckart-Young).
    r = 6
    assert (w - plain.up[:, :r] @ plain.down[:r]).norm() < (w - whitened.up[:, :r] @ whitened.down[:r]).norm()


@pytest.mark.parametrize("case", ["fewer-samples-than-features", "dead-feature"])
def test_whitening_factor_handles_singular_gram(case):
    x = activations(n=10, anisotropic=False) if case == "fewer-samples-than-features" else activations(n=200)
    if case == "dead-feature":
        x[:, 5] = 0.0  # an input feature that is never active: an exactly zero row and column
    gram = x.T @ x
    assert torch.linalg.matrix_rank(gram) < gram.shape[0]
    assert int(torch.linalg.cholesky_ex(gram)[1]) != 0  # plain Cholesky fails: the jitter is needed
    s = whitening_factor(gram)
    assert s.dtype == torch.float64 and torch.isfinite(s).all()
    assert torch.equal(s, torch.tril(s))
    assert rel(s @ s.T, gram) < 1e-4  # the shift is tiny relative to the Gram's scale
    w = weight(dtype=torch.float64)
    d = decompose(w, gram)
    assert torch.isfinite(d.up).all() and torch.isfinite(d.down).all()
    # Inside the span of the data the factorization is still exact.
    assert rel(x @ (d.up @ d.down).T, x @ w.T) < 1e-6


def test_whitening_factor_gives_up_on_a_negative_definite_matrix():
    with pytest.raises(torch.linalg.LinAlgError):
        whitening_factor(-torch.eye(8, dtype=torch.float64))


@pytest.mark.parametrize("whitened", [False, True], ids=["plain", "whitened"])
def test_factors_are_balanced(whitened):
    w = weight(dtype=torch.float64)
    x = activations()
    d = decompose(w, x.T @ x if whitened else None)
    up_norms, down_norms = d.up.norm(dim=0), d.down.norm(dim=1)
    assert torch.allclose(up_norms, down_norms, rtol=1e-8)
    # Each component's up and down norms multiply to what the component carries.
    assert torch.allclose(up_norms * down_norms, torch.stack(
        [torch.outer(d.up[:, k], d.down[k]).norm() for k in range(d.max_rank)]), rtol=1e-8)


def test_low_rank_linear_with_bias_matches_dense():
    w, x = weight(), activations().float()
    bias = torch.linspace(-1, 1, 24)
    dense = torch.nn.Linear(40, 24)
    with torch.no_grad():
        dense.weight.copy_(w)
        dense.bias.copy_(bias)
    d = decompose(dense.weight, (x.T @ x).double(), bias=dense.bias)
    assert d.bias is not dense.bias and torch.equal(d.bias, bias)  # a copy, not the live parameter
    low = d.linear(d.max_rank)
    assert isinstance(low, LowRankLinear)
    assert (low.in_features, low.out_features, low.rank) == (40, 24, 24)
    assert low.down.bias is None and torch.equal(low.up.bias, bias)
    assert "rank=24" in repr(low)
    with torch.no_grad():
        assert rel(low(x), dense(x)) < 1e-5
    # The module owns its parameters: changing the decomposition afterwards does not leak in.
    d.bias.zero_()
    assert torch.equal(low.up.bias, bias)


def test_from_factors_shapes_and_no_bias():
    up, down = torch.randn(24, 5), torch.randn(5, 40)
    low = LowRankLinear.from_factors(up, down)
    assert low.rank == 5 and low.up.bias is None
    x = torch.randn(3, 7, 40)
    with torch.no_grad():
        assert torch.allclose(low(x), x @ down.T @ up.T, atol=1e-5)


@pytest.mark.parametrize("whitened", [False, True], ids=["plain", "whitened"])
def test_smaller_rank_is_a_prefix(whitened):
    w, x = weight(), activations()
    gram = x.T @ x if whitened else None
    full = decompose(w, gram)
    for r in (1, 3, 9):
        low = full.linear(r)
        assert low.rank == r
        assert torch.equal(low.down.weight, full.down[:r]) and torch.equal(low.up.weight, full.up[:, :r])
        capped = decompose(w, gram, max_rank=r)  # capping the decomposition keeps the same components
        assert capped.max_rank == r
        assert torch.allclose(capped.up, full.up[:, :r]) and torch.allclose(capped.down, full.down[:r])
        assert torch.equal(capped.sigma, full.sigma[:r])
    assert decompose(w, gram, max_rank=1000).max_rank == 24


def test_decomposition_from_given_factors():
    d = Decomposition(up=torch.randn(6, 3), down=torch.randn(3, 8), sigma=torch.ones(3))
    assert d.max_rank == 3 and d.bias is None
    low = d.linear(2)
    assert low.rank == 2 and (low.in_features, low.out_features) == (8, 6) and low.up.bias is None


@pytest.mark.parametrize("out_features, in_features, expected", [
    (64, 64, 31), (128, 64, 42), (64, 128, 42), (576, 1536, 418), (2, 2, 0), (1, 1, 0), (1, 100, 0),
])
def test_break_even_rank_values(out_features, in_features, expected):
    assert break_even_rank(out_features, in_features) == expected


def test_break_even_rank_is_the_largest_saving_rank():
    for out_features in range(1, 40):
        for in_features in range(1, 40):
            r = break_even_rank(out_features, in_features)
            dense = out_features * in_features
            assert r * (out_features + in_features) < dense or r == 0
            assert (r + 1) * (out_features + in_features) >= dense
