"""The four methods beyond mergekit, kernel level: regmean, fisher (statistics given), tsv, iso_c."""

from __future__ import annotations

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.merge.methods.fisher import fisher
from evomerge.merge.methods.regmean import regmean, shrink_off_diagonal
from evomerge.merge.methods.subspace import iso_c, polar, tsv
from evomerge.merge.registry import get_method


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(tokens: int, n_in: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, n_in, generator=_gen(seed), dtype=torch.float64)


# ---- regmean ----------------------------------------------------------------------------------------


def test_regmean_alpha_one_solves_the_joint_least_squares() -> None:
    """alpha = 1: W minimises sum_i ||X_i W^T - X_i W_i^T||^2, the regression on the stacked inputs."""
    weights = [torch.randn(5, 4, generator=_gen(i), dtype=torch.float64) for i in range(3)]
    inputs = [_inputs(30, 4, 10 + i) for i in range(3)]
    grams = [x.T @ x / x.shape[0] for x in inputs]
    merged = regmean(weights, alpha=1.0, statistics=grams)
    scaled = [x / x.shape[0] ** 0.5 for x in inputs]  # the Gram matrices are per-token means
    stacked_x = torch.cat(scaled)
    stacked_y = torch.cat([x @ w.T for x, w in zip(scaled, weights, strict=True)])
    expected = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-8)


def test_regmean_alpha_zero_is_a_per_feature_weighted_mean() -> None:
    """alpha = 0 keeps only the diagonal: each input column is a mean weighted by w_i G_i[j, j]."""
    weights = [torch.randn(3, 4, generator=_gen(i), dtype=torch.float64) for i in range(2)]
    grams = [_inputs(20, 4, 5 + i).T @ _inputs(20, 4, 5 + i) for i in range(2)]
    merged = regmean(weights, alpha=0.0, weight=[1.0, 2.0], statistics=grams)
    d0, d1 = grams[0].diagonal(), 2.0 * grams[1].diagonal()
    expected = (weights[0] * d0 + weights[1] * d1) / (d0 + d1)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-8)


def test_regmean_equal_grams_give_the_mean() -> None:
    weights = [torch.randn(3, 4, generator=_gen(i)) for i in range(2)]
    gram = torch.eye(4) * 2.0
    torch.testing.assert_close(regmean(weights, statistics=[gram, gram]), (weights[0] + weights[1]) / 2)


def test_regmean_without_statistics_averages() -> None:
    """Norms, embeddings and biases have no Gram matrix: the weighted mean, as in the paper."""
    tensors = [torch.randn(7, generator=_gen(i)) for i in range(3)]
    merged = regmean(tensors, weight=[1.0, 1.0, 2.0], statistics=[None, None, None])
    torch.testing.assert_close(merged, (tensors[0] + tensors[1] + 2 * tensors[2]) / 4)


def test_regmean_lambda_scales_the_distance_from_the_base() -> None:
    weights = [torch.randn(3, 4, generator=_gen(i)) for i in range(2)]
    base = torch.randn(3, 4, generator=_gen(5))
    grams = [torch.eye(4), 3 * torch.eye(4)]
    plain = regmean(weights, statistics=grams)
    torch.testing.assert_close(regmean(weights, base=base, statistics=grams), plain)  # lambda 1: the paper's
    torch.testing.assert_close(
        regmean(weights, base=base, lambda_=2.0, statistics=grams), base + 2 * (plain - base)
    )
    with pytest.raises(ConfigError, match=r"lambda = 2\.0 scales the distance from a base; add base_model"):
        regmean(weights, lambda_=2.0, statistics=grams)


def test_fisher_lambda_scales_the_distance_from_the_base() -> None:
    a, b, base = torch.zeros(3), torch.full((3,), 2.0), torch.full((3,), 0.5)
    f = torch.ones(3)
    torch.testing.assert_close(
        fisher([a, b], base=base, lambda_=3.0, statistics=[f, f]), torch.full((3,), 2.0)
    )


def test_regmean_refuses_a_gram_of_another_shape() -> None:
    with pytest.raises(ConfigError, match=r"Gram matrix is \[3, 3\].*another model"):
        regmean([torch.ones(2, 4), torch.ones(2, 4)], statistics=[torch.eye(3), torch.eye(3)])


def test_shrink_off_diagonal_keeps_the_diagonal() -> None:
    gram = torch.arange(9.0).reshape(3, 3)
    shrunk = shrink_off_diagonal(gram, 0.25)
    assert torch.equal(shrunk.diagonal(), gram.diagonal())
    assert shrunk[0, 1] == gram[0, 1] * 0.25 and gram[0, 1] == 1.0  # the input is untouched


# ---- fisher -----------------------------------------------------------------------------------------


def test_fisher_follows_the_model_that_cares() -> None:
    a, b = torch.zeros(4), torch.ones(4)
    fa = torch.tensor([1e3, 1.0, 1e-3, 0.0])
    fb = torch.tensor([1e-3, 1.0, 1e3, 0.0])
    merged = fisher([a, b], statistics=[fa, fb])
    assert merged[0] < 1e-3 and merged[2] > 1 - 1e-3
    torch.testing.assert_close(merged[1:2], torch.tensor([0.5]))
    torch.testing.assert_close(merged[3:], torch.tensor([0.5]))  # nobody cares: the plain mean


def test_fisher_weights_scale_each_model() -> None:
    a, b = torch.zeros(3), torch.ones(3)
    f = torch.ones(3)
    torch.testing.assert_close(fisher([a, b], weight=[1.0, 3.0], statistics=[f, f]), torch.full((3,), 0.75))


def test_fisher_without_statistics_averages() -> None:
    tensors = [torch.zeros(2), torch.full((2,), 2.0)]
    torch.testing.assert_close(fisher(tensors, statistics=[None, None]), torch.ones(2))


# ---- tsv and iso_c ----------------------------------------------------------------------------------


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, rows, generator=_gen(seed), dtype=torch.float64))
    return q[:, :cols]


def test_tsv_of_disjoint_low_rank_tasks_is_their_sum() -> None:
    """Tasks of rank k = 6 // 2 in orthogonal subspaces: nothing to decorrelate, TSV = task arithmetic."""
    base = torch.randn(6, 6, generator=_gen(9), dtype=torch.float64)
    left, right = _orthonormal(6, 6, 1), _orthonormal(6, 6, 2)
    values_a = torch.diag(torch.tensor([3.0, 2.0, 0.5], dtype=torch.float64))
    values_b = torch.diag(torch.tensor([1.5, 1.0, 0.7], dtype=torch.float64))
    delta_a = left[:, :3] @ values_a @ right[:, :3].T
    delta_b = left[:, 3:] @ values_b @ right[:, 3:].T
    merged = tsv([base + delta_a, base + delta_b], base=base, weight=[1.0, 1.0])
    torch.testing.assert_close(merged, base + delta_a + delta_b)


def test_tsv_one_task_is_the_task() -> None:
    base = torch.randn(5, 3, generator=_gen(3))
    model = base + 0.1 * torch.randn(5, 3, generator=_gen(4))
    torch.testing.assert_close(
        tsv([model], base=base, weight=[1.0], lambda_=1.0), model, rtol=1e-4, atol=1e-5
    )


def test_tsv_decorrelates_overlapping_tasks() -> None:
    """Two tasks on the same direction: the sum would double it, TSV keeps an orthonormal basis."""
    base = torch.zeros(4, 4, dtype=torch.float64)
    u, v = _orthonormal(4, 1, 5), _orthonormal(4, 1, 6)
    delta = u @ v.T
    merged = tsv([base + delta, base + delta], base=base, weight=[1.0, 1.0])
    values = torch.linalg.svdvals(merged)
    assert values[0] < 1.99  # task arithmetic: 2.0 on one direction
    assert torch.allclose(values.sum(), torch.tensor(2.0, dtype=torch.float64))  # both tasks' energy kept


def test_iso_c_flattens_the_spectrum() -> None:
    base = torch.randn(8, 5, generator=_gen(1), dtype=torch.float64)
    models = [base + torch.randn(8, 5, generator=_gen(10 + i), dtype=torch.float64) for i in range(3)]
    merged = iso_c(models, base=base, weight=[1.0, 1.0, 1.0], lambda_=1.0)
    expected_level = torch.linalg.svdvals(sum(m - base for m in models)).mean()
    values = torch.linalg.svdvals(merged - base)
    torch.testing.assert_close(values, torch.full_like(values, float(expected_level)))


def test_subspace_methods_average_vectors() -> None:
    base = torch.zeros(4)
    models = [torch.full((4,), 1.0), torch.full((4,), 3.0)]
    for kernel in (tsv, iso_c):
        torch.testing.assert_close(kernel(models, base=base, weight=[1.0, 1.0]), torch.full((4,), 2.0))


def test_polar_is_orthonormal() -> None:
    matrix = torch.randn(6, 3, generator=_gen(2), dtype=torch.float64)
    q = polar(matrix)
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=torch.float64))


@pytest.mark.parametrize("name", ["regmean", "fisher", "tsv", "iso_c"])
def test_registered_kernels_never_mutate_inputs(name: str) -> None:
    method = get_method(name)
    tensors = [torch.randn(4, 3, generator=_gen(i)) for i in range(2)]
    base = torch.randn(4, 3, generator=_gen(7))
    copies = [t.clone() for t in (*tensors, base)]
    params: dict[str, object] = {"weight": [1.0, 1.0]}
    if method.statistics == "gram":
        params["statistics"] = [torch.eye(3), torch.eye(3) * 2]
    elif method.statistics == "fisher":
        params["statistics"] = [torch.ones(4, 3), torch.ones(4, 3)]
    result = method.kernel(tensors, base=base if method.accepts_base else None, generator=None, **params)  # type: ignore[misc]
    assert result.shape == (4, 3) and torch.isfinite(result).all()
    for tensor, copy in zip((*tensors, base), copies, strict=True):
        assert torch.equal(tensor, copy)
