"""M4 data balancing: solver bounds, baseline contrast, streaming agreement, infeasibility."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from fairclip.balance import (
    M4InfeasibleError,
    acceptance_weights,
    data_bias,
    group_balanced_weights,
    group_label_table,
    planted_annotations,
    sample_mask,
    solve_batch,
    solve_streaming,
    weighted_counts,
)
from fairclip.balance.m4.problem import _Design
from fairclip.balance.stats import validate_labels

SIZES = (2, 7)
ETA, EPS_R, EPS_D = 0.4, 0.01, 0.05


@pytest.fixture(scope="module")
def planted() -> tuple[np.ndarray, sp.csr_matrix]:
    """20k rows: gender 70/30, a mild race skew, P(group | label) skewed for 10 labels."""
    return planted_annotations(20_000, family_sizes=SIZES, association=0.5, seed=1)


@pytest.fixture(scope="module")
def solved(planted):
    s, y = planted
    return solve_batch(s, y, family_sizes=SIZES, eta=ETA, eps_r=EPS_R, eps_d=EPS_D)


def _dense_bias(s, y, q, targets):
    """RB/AB from a dense one-hot matrix: an independent check of the count plumbing."""
    onehot = np.concatenate([np.eye(k)[s[:, f]] for f, k in enumerate(SIZES)], axis=1)
    yd = y.toarray() if sp.issparse(y) else y
    total = q.sum()
    share = onehot.T @ q / total
    rb = np.abs(targets - share).max()
    inside = (onehot * q[:, None]).T @ yd / (onehot.T @ q)[:, None]
    outside = ((1 - onehot) * q[:, None]).T @ yd / ((1 - onehot).T @ q)[:, None]
    return rb, np.abs(inside - outside).max()


# --------------------------------------------------------------------------- statistics


def test_stats_match_dense_definition():
    s, y = planted_annotations(600, family_sizes=SIZES, seed=3)
    q = np.random.default_rng(0).random(600)
    pi = np.concatenate([np.full(2, 0.5), np.full(7, 1 / 7)])
    st = data_bias(s, y, family_sizes=SIZES, weights=q)
    rb, ab = _dense_bias(s, y, q, pi)
    assert st.rb == pytest.approx(rb, abs=1e-12)
    assert st.ab == pytest.approx(ab, abs=1e-12)
    assert max(st.rb_per_family) == pytest.approx(st.rb)
    # the solver's incidence matrix gives the same counts as the bincount path
    design = _Design(s, validate_labels(y, 600), SIZES)
    J, L = design.group_sums(q)
    counts = weighted_counts(s, y, family_sizes=SIZES, weights=q)
    np.testing.assert_allclose(J[:, 0], counts.group_counts)
    np.testing.assert_allclose(J[:, 1:], counts.joint_counts)
    np.testing.assert_allclose(L[1:], counts.label_counts)


def test_label_input_formats_agree():
    s, y = planted_annotations(500, family_sizes=SIZES, seed=4)
    ref = data_bias(s, y, family_sizes=SIZES)
    as_pair = data_bias(s, (y.indptr, y.indices), family_sizes=SIZES, num_labels=100)
    as_dense = data_bias(s, y.toarray(), family_sizes=SIZES)
    assert as_pair.ab == pytest.approx(ref.ab) and as_dense.ab == pytest.approx(ref.ab)


def test_group_label_table_report():
    s, y = planted_annotations(400, family_sizes=SIZES, num_labels=5, seed=5)
    table = group_label_table(s, y, family_sizes=SIZES, weights_after=np.full(400, 0.5))
    assert table.before.shape == (9, 5)
    np.testing.assert_allclose(table.after, 0.5 * table.before)
    np.testing.assert_allclose(table.rates("after"), table.rates("before"))
    assert table.to_markdown().count("\n") == 9 + 1
    assert set(table.to_dict()) >= {"groups", "labels", "before", "after"}


# --------------------------------------------------------------------------- batch solver


def test_planted_bias_is_present(solved):
    assert solved.before.rb > 0.19  # 70/30 gender against a 50/50 target
    assert solved.before.ab > 5 * EPS_D


def test_m4_meets_bounds_on_weights(planted, solved):
    s, y = planted
    assert solved.converged
    assert solved.kept_fraction == pytest.approx(ETA, abs=1e-9)
    assert solved.q.mean() == pytest.approx(ETA, abs=1e-9)
    assert solved.q.min() >= 0 and solved.q.max() <= 1
    # recomputed independently by stats.py (shared metric definitions) ...
    after = data_bias(s, y, family_sizes=SIZES, weights=solved.q)
    assert after.rb <= EPS_R * (1 + 1e-9)
    assert after.ab <= EPS_D * (1 + 1e-9)
    assert after.rb == pytest.approx(solved.after.rb) and after.ab == pytest.approx(solved.after.ab)
    # ... and by the dense definition on a subsample-free check of the same numbers
    pi = np.concatenate([np.full(2, 0.5), np.full(7, 1 / 7)])
    rb, ab = _dense_bias(s, y, solved.q, pi)
    assert rb <= EPS_R * (1 + 1e-9) and ab <= EPS_D * (1 + 1e-9)


def test_m4_sampled_mask_loose_bounds(planted, solved):
    """A Bernoulli(q) sample matches in expectation; the slack is sampling noise."""
    s, y = planted
    mask = sample_mask(solved.q, seed=0)
    kept = data_bias(s, y, family_sizes=SIZES, weights=mask.astype(np.float64))
    assert abs(mask.mean() - ETA) < 0.02
    assert kept.rb <= EPS_R + 0.02
    assert kept.ab <= EPS_D + 0.1
    assert kept.ab < 0.5 * solved.before.ab


def test_group_balancing_keeps_association_m4_removes_it(planted, solved):
    s, y = planted
    q = group_balanced_weights(s, family_sizes=SIZES, eta=ETA)
    assert q.mean() == pytest.approx(ETA)
    base = data_bias(s, y, family_sizes=SIZES, weights=q)
    assert base.rb < 1e-6  # first order fixed ...
    assert base.ab > 4 * EPS_D  # ... second order untouched
    assert solved.after.rb <= EPS_R * (1 + 1e-9) and solved.after.ab <= EPS_D * (1 + 1e-9)


def test_group_balancing_caps_at_one_when_a_group_is_too_small(planted):
    s, y = planted
    q = group_balanced_weights(s, family_sizes=SIZES, eta=0.9)  # 30% gender 1 < 45% needed
    assert q.mean() == pytest.approx(0.9) and q.max() == pytest.approx(1.0)
    assert np.all(q[s[:, 0] == 1] == 1.0)  # every minority row kept, still short of 50%
    assert data_bias(s, y, family_sizes=SIZES, weights=q).rb_per_family[0] > 0.1


def test_moment_mode_is_the_papers_constraint():
    s, y = planted_annotations(5000, family_sizes=SIZES, association=0.5, seed=2)
    res = solve_batch(
        s, y, family_sizes=SIZES, eta=ETA, eps_r=EPS_R, eps_d=0.005, association="moment"
    )
    pi = np.concatenate([np.full(2, 0.5), np.full(7, 1 / 7)])
    onehot = np.concatenate([np.eye(k)[s[:, f]] for f, k in enumerate(SIZES)], axis=1)
    centred = (onehot - pi) * res.q[:, None]
    assert np.abs(centred.mean(0)).max() <= EPS_R * ETA * (1 + 1e-9)
    assert np.abs(centred.T @ y.toarray() / len(s)).max() <= 0.005 * ETA * (1 + 1e-9)
    assert res.duals.label_center.max() == 0.0


def test_duals_reproduce_weights_per_chunk(planted, solved):
    s, y = planted
    parts = [
        acceptance_weights(solved.duals, s[i : i + 7000], y[i : i + 7000]) for i in (0, 7000, 14000)
    ]
    np.testing.assert_allclose(np.concatenate(parts), solved.q, atol=1e-12)


def test_utility_raises_acceptance_of_useful_rows():
    s, y = planted_annotations(5000, family_sizes=SIZES, association=0.3, seed=6)
    u = np.random.default_rng(1).standard_normal(5000)
    res = solve_batch(s, y, family_sizes=SIZES, eta=ETA, utility=u, utility_weight=0.2)
    assert res.converged and res.kept_fraction == pytest.approx(ETA)
    assert np.corrcoef(res.q, u)[0, 1] > 0.3
    np.testing.assert_allclose(res.duals.weights(s, y, u), res.q, atol=1e-12)


def test_sample_mask_is_deterministic():
    q = np.linspace(0, 1, 10_001)
    a, b = sample_mask(q, seed=3), sample_mask(q, seed=3)
    assert np.array_equal(a, b) and not np.array_equal(a, sample_mask(q, seed=4))
    assert abs(a.mean() - 0.5) < 0.02 and not a[0] and a[-1]


# --------------------------------------------------------------------------- streaming


def test_streaming_agrees_with_batch(planted, solved):
    s, y = planted
    chunks = [(s[i : i + 5000], y[i : i + 5000]) for i in range(0, len(s), 5000)]
    duals = solve_streaming(
        chunks, family_sizes=SIZES, num_labels=100, eta=ETA, eps_r=EPS_R, eps_d=EPS_D, epochs=20
    )
    q = acceptance_weights(duals, s, y)
    st = data_bias(s, y, family_sizes=SIZES, weights=q)
    assert np.abs(q - solved.q).mean() < 0.02
    assert q.mean() == pytest.approx(ETA, abs=0.01)
    assert st.rb <= 1.5 * EPS_R and st.ab <= 1.5 * EPS_D
    with pytest.raises(ValueError, match="one-shot iterator"):
        solve_streaming(iter(chunks), family_sizes=SIZES, num_labels=100, epochs=2)


# --------------------------------------------------------------------------- infeasible


def test_empty_group_is_infeasible_with_bound():
    s, y = planted_annotations(2000, family_sizes=SIZES, seed=7)
    s[:, 1] = np.where(s[:, 1] == 6, 0, s[:, 1])  # race group 6 has no members
    with pytest.raises(M4InfeasibleError, match=r"group 6 of family 1 has 0 of 2000 rows") as err:
        solve_batch(s, y, family_sizes=SIZES, eta=0.4)
    names = [f"g={i}" for i in range(2)] + [f"race={i}" for i in range(7)]
    with pytest.raises(M4InfeasibleError, match=r"group race=6 has 0 of 2000 rows"):
        solve_batch(s, y, family_sizes=SIZES, eta=0.4, group_names=names)
    assert err.value.reason == "capacity"
    assert err.value.rb == pytest.approx(1 / 7)  # share 0 against target 1/7
    assert "RB is >= 0.1429" in str(err.value)


def test_label_of_one_group_is_infeasible_with_achievable_values():
    """Label 0 is in 30% of rows, all gender 0: at eta = 0.9 at most 10% can be dropped."""
    rng = np.random.default_rng(8)
    n = 4000
    s = np.stack([rng.integers(0, 2, n), rng.integers(0, 3, n)], 1)
    has0 = (s[:, 0] == 0) & (rng.random(n) < 0.6)
    other = rng.integers(1, 5, n)
    rows = np.concatenate([np.flatnonzero(has0), np.arange(n)])
    cols = np.concatenate([np.zeros(has0.sum(), dtype=int), other])
    y = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n, 5))
    with pytest.raises(M4InfeasibleError) as err:
        solve_batch(s, y, family_sizes=(2, 3), eta=0.9, eps_r=0.02, eps_d=0.02)
    e = err.value
    assert e.reason in ("certified", "stalled")
    # with RB <= 0.02 gender 0 keeps >= 0.48 * 0.9 n rows, so at most n0 - that many of its
    # label-0 rows can go: the tightest AB is the label-0 rate of what must stay
    n0, c0 = (s[:, 0] == 0).sum(), has0.sum()
    keep0 = (0.5 - 0.02) * 0.9 * n
    tightest = (c0 - (n0 - keep0)) / keep0
    assert e.ab is not None and tightest - 1e-3 <= e.ab <= tightest * 2**0.25
    assert e.relaxed is not None and e.relaxed_eps is not None
    assert e.relaxed.after.ab <= e.relaxed_eps[1] * (1 + 1e-9)
    assert e.relaxed.kept_fraction == pytest.approx(0.9)
    msg = str(e)
    assert (
        "Closest attempt" in msg
        and f"reaching RB={e.rb:.4g}, AB={e.ab:.4g} (an upper bound on the tightest" in msg
    )


def test_eta_one_keeps_everything_or_raises():
    rng = np.random.default_rng(9)
    s = np.stack([np.arange(1000) % 2, np.arange(1000) % 7], 1)
    y = sp.csr_matrix(np.ones((1000, 1)))
    res = solve_batch(s, y, family_sizes=SIZES, eta=1.0, eps_r=0.01, eps_d=0.01)
    assert np.all(res.q == 1.0)
    skewed = np.stack([(rng.random(1000) < 0.7).astype(int), np.arange(1000) % 7], 1)
    with pytest.raises(M4InfeasibleError, match="eta=1"):
        solve_batch(skewed, y, family_sizes=SIZES, eta=1.0, eps_r=0.01)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eta": 0.0}, r"eta: expected a kept fraction in \(0, 1\]"),
        ({"eta": 1.5}, r"eta: expected a kept fraction in \(0, 1\]"),
        ({"eps_d": -0.1}, "eps_d: expected a positive tolerance"),
        (
            {"targets": [[0.5, 0.6], np.full(7, 1 / 7)]},
            r"targets\[0\]: expected shares summing to 1",
        ),
        ({"targets": [[0.5, 0.5]]}, "targets: expected one share vector per family"),
        ({"utility_weight": 1.0}, "utility: required when utility_weight"),
        ({"association": "joint"}, "association: expected 'conditional' or 'moment'"),
        ({"family_sizes": (2, 3)}, r"s\[:, 1\]: expected values in \[0, 2\]"),
        ({"num_labels": 7}, "y: expected 7 label columns"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
    s, y = planted_annotations(300, family_sizes=SIZES, seed=10)
    args = {"family_sizes": SIZES, "eta": 0.5} | kwargs
    with pytest.raises(ValueError, match=match):
        solve_batch(s, y, **args)


def test_bad_group_and_label_arrays():
    s, y = planted_annotations(300, family_sizes=SIZES, seed=11)
    with pytest.raises(ValueError, match=r"s\[:, 0\]: expected values in \[0, 1\].*got -1"):
        solve_batch(np.where(s == 1, -1, s), y, family_sizes=SIZES)
    with pytest.raises(ValueError, match="s: expected integer group indices"):
        solve_batch(s + 0.5, y, family_sizes=SIZES)
    with pytest.raises(ValueError, match="s: expected 2 columns"):
        solve_batch(s[:, :1], y, family_sizes=SIZES)
    with pytest.raises(ValueError, match="y: expected 300 rows like s"):
        solve_batch(s, y[:200], family_sizes=SIZES)
    with pytest.raises(ValueError, match="y indices: expected label ids in"):
        solve_batch(s, (y.indptr, y.indices + 100), family_sizes=SIZES, num_labels=100)
    with pytest.raises(ValueError, match="q: expected probabilities in"):
        sample_mask(np.array([0.5, 1.5]), seed=0)
