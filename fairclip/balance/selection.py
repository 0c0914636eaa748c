"""From acceptance weights to a kept subset that keeps their balance.

Why not Bernoulli alone: independent coin flips keep each row with probability ``q_i`` but
let every constrained total (rows per group, rows per group and label) wander by its
binomial noise, so on a table of a few thousand rows the kept data misses the tolerances the
weights meet. The **cube method** (Deville & Tillé 2004, the fast flight phase of Chauvet &
Tillé 2006) draws a sample with the same inclusion probabilities ``q`` whose totals of
chosen *balancing columns* stay exactly those of the weights: while more fractional rows
remain than columns, it moves the fractional ``q`` of ``p + 1`` rows along a direction that
leaves every column total unchanged, until one of them reaches 0 or 1 (a random step whose
expectation is zero, so each row stays a Bernoulli(``q_i``) draw marginally). At the end
(the landing) the least important columns are dropped one at a time, so only a handful of
rows are rounded without balance.

Balancing columns: the row count, every group indicator (representation), and the
group × label cells of the association constraints nearest their bound (``cells``; each
cell's count fixes the conditional label rate of its group). Cost: one small QR per
fractional row, ``O(N p²)``; tables larger than ``chunk`` rows are balanced chunk by chunk
(each chunk's totals are kept, so their sums are too).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from fairclip.balance.stats import group_offsets

SELECTIONS = ("cube", "bernoulli")
_INT = 1e-9  # a probability this close to 0 or 1 is integer


def balancing_columns(
    s: np.ndarray, y: sp.csr_matrix, family_sizes: Sequence[int], q: np.ndarray, cells: int
) -> sp.csr_matrix:
    """``[N, 1 + m + t]``: ones, group indicators, and the ``t <= cells`` group × label cells
    whose conditional label-rate gap under ``q`` is largest (nearest their bound first)."""
    n = s.shape[0]
    offsets = group_offsets(family_sizes)
    m = int(sum(family_sizes))
    rows = np.repeat(np.arange(n), s.shape[1])
    onehot = sp.csr_matrix((np.ones(rows.size), (rows, (s + offsets).ravel())), shape=(n, m))
    y = sp.csr_matrix(y, dtype=np.float64)
    kept = onehot.T @ q  # [m] weighted rows per group
    joint = np.asarray((onehot.T @ sp.diags(q) @ y).todense())  # [m, c] weighted (group, label)
    total = q.sum()
    label_total = np.asarray(y.T @ q).ravel()  # [c]
    inside = joint / np.maximum(kept[:, None], 1e-12)
    outside = (label_total[None, :] - joint) / np.maximum(total - kept[:, None], 1e-12)
    gap = np.abs(inside - outside)
    order = np.argsort(-gap, axis=None)[: max(int(cells), 0)]
    ks, rs = np.unravel_index(order, gap.shape)
    cell_cols = [onehot[:, [k]].multiply(y[:, [r]]) for k, r in zip(ks, rs, strict=True)]
    parts = [sp.csr_matrix(np.ones((n, 1))), onehot, *cell_cols]
    return sp.hstack(parts, format="csr")


def _null_direction(z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A unit vector ``u`` with ``u @ z = 0`` for ``z`` ``[k, p]``, ``k > p``."""
    basis, _ = np.linalg.qr(z, mode="complete")
    null = basis[:, z.shape[1] :]  # orthogonal to every column of z: u @ z = 0
    u = null @ rng.standard_normal(null.shape[1])
    return u / np.linalg.norm(u)


def cube_sample(q: np.ndarray, z: sp.csr_matrix, seed: int, chunk: int = 200_000) -> np.ndarray:
    """A keep mask with inclusion probabilities ``q`` whose column totals ``z.T @ keep``
    equal ``z.T @ q`` up to the landing's few rows (see the module docstring); seeded."""
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 1 or z.shape[0] != q.shape[0]:
        raise ValueError(f"cube_sample: q [{q.shape}] and z [{z.shape}] must have the same rows")
    if not np.all((q >= 0) & (q <= 1)):
        raise ValueError("q: expected probabilities in [0, 1]")
    rng = np.random.default_rng(seed)
    pi = q.copy()
    pi[pi < _INT] = 0.0
    pi[pi > 1 - _INT] = 1.0
    fractional = rng.permutation(np.flatnonzero((pi > 0) & (pi < 1)))
    for start in range(0, fractional.size, chunk):
        rows = fractional[start : start + chunk]
        pi[rows] = _flight(pi[rows], z[rows].toarray(), rng)
    return pi > 0.5


def _flight(pi: np.ndarray, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fast flight phase over the rows of one chunk, then the landing by dropping columns."""
    pi = pi.copy()
    cols = z.shape[1]
    queue = iter(range(pi.size))
    active: list[int] = []
    while True:
        while len(active) < cols + 1:
            nxt = next(queue, None)
            if nxt is None:
                break
            active.append(nxt)
        if not active:
            return pi
        if len(active) <= cols:  # landing: drop the least important balancing column
            cols = len(active) - 1
            if cols == 0:  # one row left: a Bernoulli draw
                i = active[0]
                pi[i] = float(rng.random() < pi[i])
                return pi
        idx = np.asarray(active)
        u = _null_direction(z[idx, :cols], rng)
        p = pi[idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            up = np.where(u > 0, (1 - p) / u, np.where(u < 0, p / -u, np.inf)).min()
            down = np.where(u > 0, p / u, np.where(u < 0, (1 - p) / -u, np.inf)).min()
        p = p + up * u if rng.random() * (up + down) < down else p - down * u
        p[p < _INT] = 0.0
        p[p > 1 - _INT] = 1.0
        pi[idx] = p
        active = [i for i, v in zip(active, p, strict=True) if 0.0 < v < 1.0]


def select(
    q: np.ndarray,
    s: np.ndarray,
    y: sp.csr_matrix,
    family_sizes: Sequence[int],
    seed: int,
    method: str = "cube",
    cells: int = 32,
) -> np.ndarray:
    """The keep mask of weights ``q``: ``cube`` (balanced) or ``bernoulli``."""
    if method == "bernoulli":
        return np.random.default_rng(seed).random(q.shape[0]) < q
    if method != "cube":
        raise ValueError(f"balance.selection={method!r}: expected one of {SELECTIONS}")
    return cube_sample(q, balancing_columns(s, y, family_sizes, q, cells), seed)
