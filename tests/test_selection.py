"""Selections from M4 weights: the cube method keeps the weights' totals and tolerances."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from fairclip.balance.m4 import solve_batch
from fairclip.balance.selection import balancing_columns, cube_sample, select
from fairclip.balance.stats import data_bias, planted_annotations


def test_cube_sample_keeps_every_column_total_and_each_rows_probability() -> None:
    rng = np.random.default_rng(0)
    n = 300
    q = rng.uniform(0.05, 0.95, n)
    q[:20], q[20:30] = 0.0, 1.0
    z = sp.csr_matrix(np.column_stack([np.ones(n), rng.integers(0, 2, (n, 4))]).astype(float))
    draws = np.stack([cube_sample(q, z, seed) for seed in range(400)])
    totals = draws.astype(float) @ z.toarray()
    expected = q @ z.toarray()
    # the landing rounds at most p rows without balance: each total is off by < p
    assert np.abs(totals - expected).max() < z.shape[1]
    assert np.abs(totals[:, 0] - expected[0]).max() <= 1.0  # the row count: floor or ceil
    assert not draws[:, :20].any() and draws[:, 20:30].all()
    # marginally every row is still a Bernoulli(q_i) draw (4 sigma over 400 draws)
    freq = draws.mean(0)
    assert np.all(np.abs(freq - q) <= 4 * np.sqrt(q * (1 - q) / 400) + 1e-9)
    assert np.array_equal(cube_sample(q, z, 7), cube_sample(q, z, 7))


def _selection_rates(seeds: range) -> tuple[float, float, float]:
    """On ~5k rows with 80 multi-labels and a binary attribute: the weights at the default
    tolerances less the cube margin, then each selection's rate of meeting eps over seeds."""
    s, y = planted_annotations(5000, family_sizes=(2,), num_labels=80, association=0.4, seed=11)
    eps_r, eps_d, margin = 0.02, 0.03, 0.1
    res = solve_batch(s, y, family_sizes=(2,), eta=0.5, eps_r=eps_r * (1 - margin),
                      eps_d=eps_d * (1 - margin))  # fmt: skip
    weights = data_bias(s, y, family_sizes=(2,), weights=res.q)
    assert weights.rb <= eps_r and weights.ab <= eps_d

    def meets(method: str, seed: int) -> bool:
        keep = select(res.q, s, y, (2,), seed, method)
        bias = data_bias(s, y, family_sizes=(2,), weights=keep.astype(float))
        return bool(bias.rb <= eps_r and bias.ab <= eps_d)

    cube = np.mean([meets("cube", 1000 + seed) for seed in seeds])
    bernoulli = np.mean([meets("bernoulli", 1000 + seed) for seed in seeds])
    return float(cube), float(bernoulli), float(res.q.mean())


def test_cube_selection_meets_eps_where_the_weights_do() -> None:
    cube, bernoulli, eta = _selection_rates(range(10))
    assert eta == pytest.approx(0.5)
    assert cube == 1.0 and bernoulli < 0.5


@pytest.mark.slow  # a minute: 100 cube draws of 5k rows
def test_cube_selection_meets_eps_in_95_percent_of_100_seeds() -> None:
    cube, bernoulli, _ = _selection_rates(range(100))
    print(f"cube meets eps in {cube:.0%} of 100 seeds, Bernoulli in {bernoulli:.0%}")
    assert cube >= 0.95


def test_balancing_columns_pick_the_cells_nearest_their_bound() -> None:
    s = np.array([[0], [0], [1], [1]])
    y = sp.csr_matrix(np.array([[1, 0], [1, 1], [0, 1], [0, 1]]))
    z = balancing_columns(s, y, (2,), np.full(4, 0.5), cells=1)
    # label 0: rate 1 in group 0, 0 in group 1 (gap 1), label 1: 0.5 vs 1 (gap 0.5)
    assert z.shape == (4, 1 + 2 + 1)
    np.testing.assert_array_equal(z.toarray()[:, 3], [1, 1, 0, 0])  # (group 0, label 0)
    with pytest.raises(ValueError, match="balance.selection='coin'"):
        select(np.full(4, 0.5), s, y, (2,), 0, "coin")
