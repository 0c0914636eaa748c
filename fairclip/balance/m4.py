"""M4, Multi-Modal Moment Matching (Alabdulmohsin et al., "CLIP the Bias", ICLR 2024).

Find acceptance probabilities ``q_i in [0, 1]`` that stay close to the subsampling rate
``eta`` (plus a utility bonus ``V * u_i``) while bounding the first-order (representation)
and second-order (association) statistics of the kept data::

    min_q  1/2 mean((q - eta)^2) - V mean(u q)
    s.t.   mean(q) = eta
           |mean(q (s_k - pi_k))|              <= eps_R eta    for every group column k
           |mean(q (s_k - c_k)(y_r - d_r))|    <= b_kr         for every k and label r

``association="moment"`` is the paper's problem: ``c = pi``, ``d = 0``, ``b = eps_D eta``.
The project's data AB (``fairclip.metrics.association``) is the *conditional* gap
``|E_q[y_r|s_k=1] - E_q[y_r|s_k=0]|``, which is ``Cov_q(s_k, y_r) / (p_k (1 - p_k))`` with
``p_k`` the achieved share of group ``k``. The default ``association="conditional"``
therefore bounds the covariance: ``c_k = p_k`` and ``d_r`` = the achieved rate of label
``r``, ``b_kr = eps_D eta p_k (1 - p_k)``. The centres depend on ``q``, so the solve is
repeated warm with re-centred constraints; the linearisation error is the product of the two
centre errors, so a few rounds reach a fixed point where the reported AB is ``<= eps_D``.

Dual: with multipliers ``mu`` (mean) and ``w = v+ - v-`` (one per constraint pair), the
Lagrangian is minimised row by row in closed form, ``q = clip(eta + V u - mu - a^T v, 0, 1)``.
``a^T v`` is never formed per row: rows are grouped into *cells* (observed combinations of
family values, e.g. 2 x 7 = 14) and ``a_i^T v = h[cell_i, 0] + sum_{r in y_i} h[cell_i, 1+r]``
with a small table ``h`` ``[cells, 1 + c]`` built from ``w``. One sparse incidence matrix
``B`` ``[N, cells * (1 + c)]`` (one entry per row plus one per label) gives every
``a^T v`` as ``B @ h`` and every constraint value from ``B.T @ q``: two sparse mat-vecs per
dual evaluation, O(nnz) time and memory; the one-hot ``s`` is never materialised.

Batch solver: L-BFGS-B on the smooth concave dual (bounds ``v+-, >= 0``), diagonally
(Jacobi) scaled by each constraint's curvature ``mean(a_j^2)``: on skewed label
frequencies it needs fewer evaluations than Jacobi-preconditioned FISTA, and without the
scaling L-BFGS-B crawls. A dual value above the largest possible primal value proves
infeasibility (weak duality), which turns "the ascent diverges" into a certificate.
The streaming solver is the paper's dual SGD, one minibatch step at a time (see
:func:`solve_streaming`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.optimize as so
import scipy.sparse as sp

from fairclip.balance.stats import (
    BiasStats,
    WeightedCounts,
    bias_from_counts,
    group_offsets,
    validate_family_sizes,
    validate_groups,
    validate_labels,
    validate_targets,
)

__all__ = [
    "M4Duals",
    "M4InfeasibleError",
    "M4Result",
    "acceptance_weights",
    "sample_mask",
    "solve_batch",
    "solve_streaming",
]

Association = Literal["conditional", "moment"]
Chunk = tuple[Any, Any] | tuple[Any, Any, Any]

_B_FLOOR = 1e-12  # bound below which a constraint counts as an equality (size-1 families)


def _single_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """Run BLAS single-threaded inside the solvers.

    Their BLAS work is tiny (L-BFGS-B on ~2k duals, 14 x 9 tables), so threads only add
    synchronisation, which on a shared, busy machine slows the solve down many times over.
    Uses ``threadpoolctl`` when installed, else changes nothing.
    """
    try:
        from threadpoolctl import threadpool_limits  # optional: not a fairclip dependency
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


class M4InfeasibleError(ValueError):
    """The balancing constraints cannot be met at this ``eta`` (or the solve did not converge).

    Attributes: ``reason`` (``"capacity"``: a group is too small/large for ``eta``;
    ``"certified"``: the dual value passed the largest feasible primal value, a proof;
    ``"stalled"``: the ascent stopped improving; ``"max_iter"``; ``"eta_one"``);
    ``rb``/``ab``: the tightest achievable values found at this ``eta`` (those of
    ``relaxed`` when the diagnosis found one, else of the closest attempt; for
    ``"capacity"`` ``rb`` is a proven lower bound and ``ab`` is ``None``); ``attempt``: the
    closest attempt's ``(rb, ab)``; ``relaxed_eps``: the ``(eps_r, eps_d)`` at which a
    relaxed solve succeeded (the association tolerance is loosened first, by doubling and
    then bisection, keeping ``eps_r``); ``relaxed``: that :class:`M4Result`, a fallback.
    AB is in the solver's measure (``M4Result.reached``).
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        rb: float | None,
        ab: float | None,
        attempt: tuple[float, float] | None = None,
        relaxed_eps: tuple[float, float] | None = None,
        relaxed: M4Result | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.rb = rb
        self.ab = ab
        self.attempt = attempt
        self.relaxed_eps = relaxed_eps
        self.relaxed = relaxed


@dataclass(frozen=True)
class M4Duals:
    """Everything needed to turn rows into acceptance probabilities (closed form).

    ``w`` ``[m, 1 + c]`` holds the net multipliers ``v+ - v-``: column 0 for representation,
    column ``1 + r`` for label ``r``. The association constraints are centred on
    ``group_center`` ``c`` ``[m]`` and ``label_center`` ``d`` ``[c]`` (``pi`` and 0 for
    ``"moment"``; achieved group shares and label rates for ``"conditional"``). ``steps``
    counts dual evaluations (batch) or SGD steps (streaming).
    """

    mu: float
    w: np.ndarray
    group_center: np.ndarray
    label_center: np.ndarray
    targets: np.ndarray
    family_sizes: tuple[int, ...]
    num_labels: int
    eta: float
    utility_weight: float
    steps: int = 0

    def weights(self, s: Any, y: Any, utility: Any = None) -> np.ndarray:
        """Acceptance probabilities of new rows; see :func:`acceptance_weights`."""
        return acceptance_weights(self, s, y, utility)


@dataclass(frozen=True)
class M4Result:
    """Batch M4 solution: weights, duals and the data bias before / after (expected).

    ``reached`` is ``(RB, AB)`` in the solver's own measure: AB is ``after.ab`` for
    ``"conditional"`` and ``max |mean(q (s_k - pi_k) y_r)| / eta`` for ``"moment"``;
    ``max_violation`` is the relative excess over ``(eps_r, eps_d)`` (0 when met).
    """

    q: np.ndarray
    duals: M4Duals
    iterations: int
    rounds: int
    converged: bool
    max_violation: float
    before: BiasStats
    after: BiasStats
    kept_fraction: float
    reached: tuple[float, float]

    def summary(self) -> dict[str, Any]:
        """JSON-ready scalars for logs and reports."""
        return {
            "iterations": self.iterations,
            "rounds": self.rounds,
            "converged": self.converged,
            "max_violation": self.max_violation,
            "kept_fraction": self.kept_fraction,
            "reached": list(self.reached),
            "before": self.before.as_dict(),
            "after": self.after.as_dict(),
        }


# --------------------------------------------------------------------------- design


class _Design:
    """Row -> (cell, labels) incidence ``B`` ``[N, cells * (1 + c)]`` with unit entries.

    Row ``i`` has an entry at ``cell_i * (1 + c)`` (its representation term) and one at
    ``cell_i * (1 + c) + 1 + r`` per label ``r``. ``S`` ``[cells, m]`` marks each cell's
    groups (one per family), so group-level sums are ``S.T @ cell_sums``.
    """

    def __init__(
        self, groups: np.ndarray, labels: sp.csr_matrix, family_sizes: Sequence[int]
    ) -> None:
        n, n_fam = groups.shape
        sizes = np.asarray(family_sizes, dtype=np.int64)
        self.n, self.m, self.c = n, int(sizes.sum()), labels.shape[1]
        self.width = self.c + 1
        strides = np.ones(n_fam, dtype=np.int64)
        strides[:-1] = np.cumprod(sizes[::-1])[:-1][::-1]
        code = groups @ strides
        n_codes = int(np.prod(sizes))
        if n_codes <= max(4 * n, 1 << 20):  # O(N) lookup instead of a sort
            present = np.flatnonzero(np.bincount(code, minlength=n_codes))
            lut = np.zeros(n_codes, dtype=np.int64)
            lut[present] = np.arange(present.shape[0])
            cell = lut[code]
        else:
            present, cell = np.unique(code, return_inverse=True)
        n_cells = present.shape[0]
        cell_groups = (present[:, None] // strides) % sizes + group_offsets(sizes)
        self.cell_groups = cell_groups
        self.S = np.zeros((n_cells, self.m))
        self.S[np.arange(n_cells)[:, None], cell_groups] = 1.0

        idx_dtype = np.int32 if n_cells * self.width < 2**31 else np.int64
        row_len = np.diff(labels.indptr)
        indptr = labels.indptr.astype(np.int64) + np.arange(n + 1, dtype=np.int64)
        start = cell.astype(idx_dtype) * idx_dtype(self.width)
        idx = np.empty(int(indptr[-1]), dtype=idx_dtype)
        is_label = np.ones(idx.shape[0], dtype=bool)
        is_label[indptr[:-1]] = False
        idx[indptr[:-1]] = start
        idx[is_label] = np.repeat(start, row_len) + labels.indices.astype(idx_dtype) + 1
        del is_label
        self.B = sp.csr_matrix(
            (np.ones(idx.shape[0]), idx, indptr), shape=(n, n_cells * self.width)
        )
        self.BT = self.B.T  # CSC view, no copy: B.T @ q is one scatter pass

    def h_table(self, w: np.ndarray, cen: _Centres) -> np.ndarray:
        """Per-cell table with ``a_i^T v = h[cell_i, 0] + sum_{r in y_i} h[cell_i, 1 + r]``.

        ``a_i^T v = sum_k w_k0 (s_ik - pi_k) + sum_{k,r} w_kr (s_ik - c_k)(y_ir - d_r)``;
        the ``- d_r`` part is constant per cell, so it folds into column 0.
        """
        h = self.S @ w
        h[:, 0] -= cen.targets @ w[:, 0]
        h[:, 1:] -= cen.groups @ w[:, 1:]
        if cen.labels.any():
            u = w[:, 1:] @ cen.labels
            h[:, 0] -= self.S @ u - cen.groups @ u
        return h

    def group_sums(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``J[k, r] = sum_i q_i s_ik Y_ir`` and ``L[r] = sum_i q_i Y_ir`` (``Y_i0 = 1``)."""
        cells = (self.BT @ q).reshape(-1, self.width)
        return self.S.T @ cells, cells.sum(axis=0)


@dataclass(frozen=True)
class _Centres:
    """Centres of the constraints: ``pi`` (representation), ``c`` / ``d`` (association)."""

    targets: np.ndarray  # pi [m]
    groups: np.ndarray  # c [m]
    labels: np.ndarray  # d [c]

    @staticmethod
    def moment(pi: np.ndarray, num_labels: int) -> _Centres:
        """The paper's constraints: ``c = pi``, ``d = 0``."""
        return _Centres(pi, pi.copy(), np.zeros(num_labels))

    @staticmethod
    def achieved(pi: np.ndarray, J: np.ndarray, L: np.ndarray) -> _Centres:
        """Conditional constraints centred on the shares / label rates of weights with sums
        ``J``, ``L``: then the constraint is ``Cov_q(s_k, y_r)`` exactly."""
        return _Centres(pi, J[:, 0] / L[0], L[1:] / L[0])


def _moments(J: np.ndarray, L: np.ndarray, n: int, cen: _Centres) -> np.ndarray:
    """Constraint values from group sums: ``F[k, 0] = mean(q (s_k - pi_k))`` and
    ``F[k, 1 + r] = mean(q (s_k - c_k)(y_r - d_r))``."""
    F = J.copy()
    F[:, 0] -= cen.targets * L[0]
    F[:, 1:] -= np.outer(cen.groups, L[1:])
    if cen.labels.any():
        F[:, 1:] -= np.outer(J[:, 0] - cen.groups * L[0], cen.labels)
    return F / n


def _bounds(eta: float, eps_r: float, eps_d: float, association: str, cen: _Centres,
            width: int) -> np.ndarray:  # fmt: skip
    """``b[k, 0] = eps_R eta``; ``b[k, r] = eps_D eta`` (moment) or ``eps_D eta c_k (1 - c_k)``
    (conditional: ``Cov(s_k, y_r) = c_k (1 - c_k) AB_kr``)."""
    b = np.empty((cen.targets.shape[0], width))
    b[:, 0] = eps_r * eta
    if association == "moment":
        b[:, 1:] = eps_d * eta
    else:
        b[:, 1:] = (eps_d * eta * cen.groups * (1.0 - cen.groups))[:, None]
    return b


def _curvature(J1: np.ndarray, L1: np.ndarray, n: int, cen: _Centres) -> np.ndarray:
    """Diagonal of the dual Hessian with all rows free, ``mean(a_j^2)``, from the unweighted
    group sums: the Jacobi preconditioner."""
    c0 = cen.targets[:, None]
    c = cen.groups[:, None]
    d = cen.labels[None, :]
    out = np.empty_like(J1)
    out[:, :1] = J1[:, :1] * (1.0 - 2.0 * c0) + c0**2 * L1[0]
    sy = J1[:, 1:] * (1.0 - 2.0 * c) + c**2 * L1[1:]  # sum (s - c)^2 y
    s1 = J1[:, :1] * (1.0 - 2.0 * c) + c**2 * L1[0]  # sum (s - c)^2
    out[:, 1:] = (1.0 - 2.0 * d) * sy + d**2 * s1
    return np.maximum(out, 0.0) / n


def _counts_from_sums(J: np.ndarray, L: np.ndarray) -> WeightedCounts:
    """Weighted counts (for the shared RB/AB) from the design's group sums."""
    return WeightedCounts(J[:, 0].copy(), J[:, 1:].copy(), L[1:].copy(), float(L[0]))


# --------------------------------------------------------------------------- validation


def _real(val: Any, name: str) -> float:
    """A finite Python float, or ValueError naming the argument."""
    try:
        out = float(val)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected a real number, got {val!r}") from err
    if not np.isfinite(out) or isinstance(val, bool):
        raise ValueError(f"{name}: expected a finite real number, got {val!r}")
    return out


def _check_scalars(
    eta: Any, eps_r: Any, eps_d: Any, utility_weight: Any
) -> tuple[float, float, float, float]:
    """Validated ``(eta, eps_r, eps_d, V)``."""
    eta_f = _real(eta, "eta")
    if not 0.0 < eta_f <= 1.0:
        raise ValueError(f"eta: expected a kept fraction in (0, 1], got {eta!r}")
    eps_f = []
    for name, val in (("eps_r", eps_r), ("eps_d", eps_d)):
        e = _real(val, name)
        if e <= 0:
            raise ValueError(f"{name}: expected a positive tolerance, got {val!r}")
        eps_f.append(e)
    v = _real(utility_weight, "utility_weight")
    if v < 0:
        raise ValueError(f"utility_weight: expected >= 0 (V rewards utility), got {v}")
    return eta_f, eps_f[0], eps_f[1], v


def _check_association(association: str) -> None:
    if association not in ("conditional", "moment"):
        raise ValueError(f"association: expected 'conditional' or 'moment', got {association!r}")


def _utility_shift(utility: Any, utility_weight: float, n: int) -> np.ndarray | None:
    """``V * u`` or ``None`` when there is no utility term."""
    if utility is None:
        if utility_weight != 0:
            raise ValueError("utility: required when utility_weight != 0")
        return None
    u = np.asarray(utility, dtype=np.float64)
    if u.shape != (n,):
        raise ValueError(f"utility: expected shape ({n},), got {u.shape}")
    if not np.all(np.isfinite(u)):
        raise ValueError("utility: expected finite values")
    return None if utility_weight == 0 else utility_weight * u


def _exact_mu(a: np.ndarray, eta: float, mu0: float) -> float:
    """``mu`` with ``mean(clip(a - mu, 0, 1)) = eta``: safeguarded Newton on a monotone
    piecewise-linear function (exact once the clipping pattern settles)."""
    lo, hi = float(a.min()) - 1.0, float(a.max())  # f(lo) = 1 - eta >= 0 >= f(hi)
    mu = min(max(mu0, lo), hi)
    for _ in range(100):
        v = a - mu
        free = np.count_nonzero((v > 0) & (v < 1)) / a.shape[0]
        f = float(np.clip(v, 0.0, 1.0, out=v).mean()) - eta
        if abs(f) <= 1e-13:
            break
        lo, hi = (mu, hi) if f > 0 else (lo, mu)
        nxt = mu + f / free if free > 0 else 0.5 * (lo + hi)
        mu = nxt if lo < nxt < hi else 0.5 * (lo + hi)
        if hi - lo <= 1e-15 * max(1.0, abs(mu)):
            break
    return mu


def _capacity_bound(
    groups: np.ndarray, family_sizes: Sequence[int], targets: np.ndarray, eta: float
) -> tuple[float, int, float]:
    """Lower bound on achievable RB from group sizes alone (and the eta that would fix it).

    At rate ``eta`` group ``k`` keeps between ``n_k - (1 - eta) N`` and ``n_k`` rows out of
    ``eta N``, so its share lies in ``[lo_k, hi_k]`` whatever ``q`` is.
    """
    n = groups.shape[0]
    gidx = groups + group_offsets(family_sizes)
    m = int(sum(family_sizes))
    counts = np.zeros(m)
    for f in range(groups.shape[1]):
        counts += np.bincount(gidx[:, f], minlength=m)
    kept = eta * n
    hi = np.minimum(counts, kept) / kept
    lo = np.maximum(counts - (n - kept), 0.0) / kept
    gap = np.maximum(np.maximum(targets - hi, lo - targets), 0.0)
    k = int(np.argmax(gap))
    return float(gap[k]), k, float(counts[k])


# --------------------------------------------------------------------------- batch solver


class _BatchDual:
    """Negated M4 dual (and gradient) for L-BFGS-B, in Jacobi-scaled coordinates ``z``.

    ``x = [mu, v+ (m x (1+c)), v- (m x (1+c))] = scale * z``. Tracks the KKT state of every
    evaluation so the solve can stop as soon as the primal is feasible and the duality gap
    is small, and so a stalled (infeasible) ascent is detected.
    """

    def __init__(
        self,
        design: _Design,
        targets: np.ndarray,
        eta: float,
        shift: np.ndarray | None,
        eps: tuple[float, float],
        association: Association,
        cen: _Centres,
        tol: float,
    ) -> None:
        self.d, self.targets, self.eta, self.shift = design, targets, eta, shift
        self.eps, self.association, self.tol = eps, association, tol
        self.base: np.ndarray | float = eta if shift is None else eta + shift
        # weak duality: a dual value above the largest possible primal value certifies that
        # the constraints are infeasible (the dual is unbounded along a Farkas direction)
        bonus = 0.0 if shift is None else float(np.abs(shift).mean())
        self.primal_max = 0.5 * max(eta, 1.0 - eta) ** 2 + bonus
        self.K = design.m * design.width
        self._J1, self._L1 = design.group_sums(np.ones(design.n))
        self.set_centres(cen)
        self.evals = 0
        self.reset()

    def reset(self) -> None:
        """Forget the progress trackers (new centring round)."""
        self.done_x: np.ndarray | None = None
        self.best: tuple[float, np.ndarray | None] = (np.inf, None)  # least violation
        self.feasible: tuple[float, np.ndarray | None] = (np.inf, None)  # least gap, viol <= 0
        self.since_progress = 0
        self.certified = False
        self.stalled = False

    def set_centres(self, cen: _Centres, tol: float | None = None) -> None:
        """Re-centre the constraints (and optionally change the tolerance); rescales the
        bounds and the preconditioner."""
        self.cen = cen
        self.tol = self.tol if tol is None else tol
        b = _bounds(self.eta, *self.eps, self.association, cen, self.d.width)
        self.b_true = np.maximum(b, _B_FLOOR)
        self.b = b * (1.0 - self.tol)  # aim inside, so polishing keeps the true bounds
        curv = _curvature(self._J1, self._L1, self.d.n, cen)
        inv = 1.0 / np.sqrt(np.maximum(curv, 1e-6 * max(float(curv.max()), 1e-300)))
        self.scale = np.concatenate([[1.0], inv.ravel(), inv.ravel()])

    def split(self, z: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        x = z * self.scale
        m, wd = self.d.m, self.d.width
        return float(x[0]), x[1 : 1 + self.K].reshape(m, wd), x[1 + self.K :].reshape(m, wd)

    def primal(self, mu: float, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(t, q)`` with ``t = a^T v`` per row and the closed-form ``q``."""
        t = self.d.B @ self.d.h_table(w, self.cen).ravel()
        q = np.subtract(self.base, t)
        q -= mu
        np.clip(q, 0.0, 1.0, out=q)
        return t, q

    def __call__(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        self.evals += 1
        d, eta, n = self.d, self.eta, self.d.n
        mu, vp, vm = self.split(z)
        w = vp - vm
        t, q = self.primal(mu, w)
        J, L = d.group_sums(q)
        # plain reductions, not BLAS dot: threaded ddot stalls on a shared, busy machine
        sq, tq = float(L[0]), float(np.multiply(t, q, out=t).sum())
        qq = float(np.multiply(q, q, out=t).sum())
        uq = 0.0 if self.shift is None else float(np.multiply(self.shift, q, out=t).sum())
        del t
        primal = (0.5 * (qq - 2.0 * eta * sq + n * eta * eta) - uq) / n
        dual = primal + (tq + mu * sq) / n - mu * eta - float((self.b * (vp + vm)).sum())
        F = _moments(J, L, n, self.cen)
        g_mu = sq / n - eta
        grad = np.concatenate([[g_mu], (F - self.b).ravel(), (-F - self.b).ravel()])
        # KKT state: feasibility w.r.t. the true bounds (margin tol/2) and duality gap
        viol = max(
            abs(g_mu) / eta - 0.5 * self.tol,
            float(((np.abs(F) - self.b_true) / self.b_true).max()) + 0.5 * self.tol,
        )
        gap = primal - dual
        if dual > self.primal_max * (1 + 1e-9) + 1e-12:
            self.certified = True
        self.since_progress += 1
        best = self.best[0]
        if viol < best and (not np.isfinite(best) or viol < best - 0.01 * abs(best)):
            self.best, self.since_progress = (viol, z.copy()), 0
        if viol <= 0 and gap < 0.99 * self.feasible[0]:
            self.feasible, self.since_progress = (gap, z.copy()), 0
        if viol <= 0 and gap <= 10 * self.tol * max(primal, 1e-12) and self.done_x is None:
            self.done_x = z.copy()
        return -dual, -grad * self.scale


def _run_lbfgs(prob: _BatchDual, z0: np.ndarray, max_evals: int, patience: int) -> np.ndarray:
    """L-BFGS-B with restarts; stops at the first KKT point, on a plateau, or ``max_evals``."""
    bounds = [(None, None)] + [(0.0, None)] * (2 * prob.K)  # cheaper than so.Bounds here
    z = z0
    stalled = False

    def callback(intermediate_result: so.OptimizeResult) -> None:
        nonlocal stalled
        if prob.done_x is not None or prob.certified:
            raise StopIteration
        if prob.since_progress > patience:  # no progress in feasibility nor in the gap
            stalled = True
            raise StopIteration

    for _ in range(4):  # restart when L-BFGS-B's own line search gives up
        left = max_evals - prob.evals
        if left <= 0 or stalled or prob.certified or prob.done_x is not None:
            break
        res = so.minimize(
            prob,
            z,
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            callback=callback,
            options={"maxfun": left, "maxiter": left, "maxcor": 20, "ftol": 0.0, "gtol": 0.0},
        )
        z = res.x
    if prob.done_x is None and prob.feasible[1] is not None:
        prob.done_x = prob.feasible[1]  # feasible; the gap just converges slowly
    prob.stalled = (stalled or prob.certified) and prob.done_x is None
    return z if prob.done_x is None else prob.done_x


def solve_batch(
    s: Any,
    y: Any,
    *,
    family_sizes: Sequence[int],
    num_labels: int | None = None,
    targets: Any = None,
    eta: float = 0.9,
    eps_r: float = 0.01,
    eps_d: float = 0.01,
    utility: Any = None,
    utility_weight: float = 0.0,
    association: Association = "conditional",
    tol: float = 1e-3,
    max_iter: int = 1000,
    diagnose: bool = True,
) -> M4Result:
    """Exact batch M4: acceptance weights ``q`` ``[N]`` meeting data RB <= ``eps_r`` and
    AB <= ``eps_d`` at kept fraction ``mean(q) = eta``.

    ``s`` ``[N, F]`` int group indices, ``y`` ``[N, c]`` sparse binary labels (scipy sparse,
    dense, or ``(indptr, indices)`` with ``num_labels``), ``targets`` per-family shares
    ``pi`` (uniform by default), ``utility`` ``u`` ``[N]`` rewarded with weight ``V``.
    ``tol`` is the relative constraint / duality-gap tolerance and ``max_iter`` the budget of
    dual evaluations (two sparse mat-vecs each) over all centring rounds.

    Raises :class:`M4InfeasibleError` (with the tightest RB/AB reached and, if ``diagnose``,
    the loosest-needed ``eps`` found by re-solving with relaxed tolerances) instead of
    returning weights that violate the constraints.
    """
    eta, eps_r, eps_d, utility_weight = _check_scalars(eta, eps_r, eps_d, utility_weight)
    _check_association(association)
    if not 0 < tol < 0.5:
        raise ValueError(f"tol: expected a relative tolerance in (0, 0.5), got {tol}")
    if max_iter < 1:
        raise ValueError(f"max_iter: expected >= 1, got {max_iter}")
    sizes = validate_family_sizes(family_sizes)
    groups = validate_groups(s, sizes)
    labels = validate_labels(y, groups.shape[0], num_labels)
    pi = validate_targets(targets, sizes)
    shift = _utility_shift(utility, utility_weight, groups.shape[0])
    design = _Design(groups, labels, sizes)
    del labels
    J0, L0 = design.group_sums(np.ones(design.n))
    before = bias_from_counts(_counts_from_sums(J0, L0), pi, sizes)
    with _single_blas_thread():
        return _solve_design(
            design, groups, pi, sizes, eta, (eps_r, eps_d), shift, utility_weight, association,
            tol, max_iter, diagnose, before,
        )  # fmt: skip


def _solve_design(
    design: _Design,
    groups: np.ndarray,
    pi: np.ndarray,
    sizes: tuple[int, ...],
    eta: float,
    eps: tuple[float, float],
    shift: np.ndarray | None,
    utility_weight: float,
    association: Association,
    tol: float,
    max_iter: int,
    diagnose: bool,
    before: BiasStats,
) -> M4Result:
    """Centring rounds of L-BFGS-B on a built design, then checks and diagnosis."""
    eps_r, eps_d = eps
    n = design.n
    if eta == 1.0:  # nothing may be dropped: q = 1 is the only candidate
        if before.rb > eps_r or before.ab > eps_d:
            raise M4InfeasibleError(
                f"M4 infeasible at eta=1 (no subsampling): the data itself has "
                f"RB={before.rb:.4g} (eps_r={eps_r}) and AB={before.ab:.4g} (eps_d={eps_d}); "
                "use eta < 1",
                reason="eta_one",
                rb=before.rb,
                ab=before.ab,
            )
        duals = M4Duals(0.0, np.zeros((design.m, design.width)), pi.copy(),
                        np.zeros(design.c), pi, sizes, design.c, eta, utility_weight)  # fmt: skip
        return M4Result(np.ones(n), duals, 0, 0, True, 0.0, before, before, 1.0,
                        (before.rb, before.ab))  # fmt: skip

    bound, k, n_k = _capacity_bound(groups, sizes, pi, eta)
    if bound > eps_r:
        f = int(np.searchsorted(np.cumsum(sizes), k, side="right"))
        local = k - int(group_offsets(sizes)[f])
        share = n_k / n
        if share < pi[k]:
            fix = f"eta <= {share / max(pi[k] - eps_r, 1e-12):.4g}"
        else:
            fix = f"eta <= {(1 - share) / max(1 - pi[k] - eps_r, 1e-12):.4g}"
        raise M4InfeasibleError(
            f"M4 infeasible: group {local} of family {f} has {int(n_k)} of {n} rows "
            f"(share {share:.4g}, target {pi[k]:.4g}); at eta={eta} the tightest achievable "
            f"RB is >= {bound:.4g} > eps_r={eps_r}. Use {fix}, change the targets, or loosen "
            "eps_r.",
            reason="capacity",
            rb=bound,
            ab=None,
        )

    if association == "moment":
        cen = _Centres.moment(pi, design.c)
    else:  # first round: target shares, the data's label rates
        cen = _Centres(pi, pi.copy(), before.counts.label_counts / before.counts.total)
    prob = _BatchDual(design, pi, eta, shift, eps, association, cen, tol)
    z = np.zeros(1 + 2 * prob.K)
    rounds, ok, tight = 0, False, False
    best: tuple[float, tuple[float, float], np.ndarray, float, np.ndarray, BiasStats, _Centres]
    best = (np.inf, (before.rb, before.ab), np.full(n, eta), 0.0,
            np.zeros((design.m, design.width)), before, cen)  # fmt: skip
    while prob.evals < max_iter and rounds < 12:
        rounds += 1
        if association == "conditional":  # early rounds only need to move the centres
            round_tol = tol if tight else max(tol, 0.05 * 0.3 ** (rounds - 1))
            prob.set_centres(prob.cen, round_tol)
        prob.reset()
        z = _run_lbfgs(prob, z, max_iter, patience=150)
        solved = prob.done_x is not None
        if not solved and prob.best[1] is not None:
            z = prob.best[1]  # least violation reached: reported as the tightest values
        mu, vp, vm = prob.split(z)
        w = vp - vm
        t, _ = prob.primal(mu, w)
        a = np.subtract(prob.base, t, out=t)
        mu = _exact_mu(a, eta, mu)  # mean(q) = eta exactly
        q = np.clip(a - mu, 0.0, 1.0)
        del a, t
        J, L = design.group_sums(q)
        after = bias_from_counts(_counts_from_sums(J, L), pi, sizes)
        if association == "moment":  # the paper's constraint, not the conditional AB
            F = _moments(J, L, n, prob.cen)
            reached = (after.rb, float(np.abs(F[:, 1:]).max()) / eta)
        else:
            reached = (after.rb, after.ab)
        ok = reached[0] <= eps_r * (1 + 1e-9) and reached[1] <= eps_d * (1 + 1e-9)
        score = max(reached[0] / eps_r, reached[1] / eps_d)
        if ok or score < best[0]:  # keep the round closest to feasible
            best = (score, reached, q, mu, w, after, prob.cen)
        if association == "moment" or (ok and prob.tol <= tol):
            break
        # feasible at a loose round tolerance: one more round for the duality gap; failed
        # at one: judge feasibility at the requested tolerance only
        tight = tight or ok or not solved
        # "conditional": the bounds held at the current centres; re-centre on the achieved
        # shares / label rates (the linearisation error is their product of deviations, so
        # this converges in a few rounds) and re-solve warm. A failed round is only final
        # (a certificate for the true AB) once its centres are self-consistent.
        new = _Centres.achieved(pi, J, L)
        moved = max(
            float(np.abs(new.groups - prob.cen.groups).max()),
            float(np.abs(new.labels - prob.cen.labels).max()),
        )
        if moved <= 1e-9:
            break
        x = np.concatenate([[mu], vp.ravel(), vm.ravel()])
        prob.set_centres(new)
        z = x / prob.scale

    score, reached, q, mu, w, after, cen = best
    ok = score <= 1 + 1e-9
    duals = M4Duals(mu, w, cen.groups.copy(), cen.labels.copy(), pi, sizes, design.c, eta,
                    utility_weight, prob.evals)  # fmt: skip
    result = M4Result(q, duals, prob.evals, rounds, ok, max(score - 1.0, 0.0), before, after,
                      float(q.mean()), reached)  # fmt: skip
    if ok:
        return result
    reason = "certified" if prob.certified else "stalled" if prob.stalled else "max_iter"
    relaxed_eps, relaxed = None, None
    if diagnose:
        relaxed_eps, relaxed = _relax(
            design, groups, pi, sizes, eta, eps, shift, utility_weight, association, tol,
            max_iter, before,
        )  # fmt: skip
    lin = " (linearised at the achieved shares)" if association == "conditional" else ""
    why = {
        "certified": f"the dual exceeds every feasible primal value, so no q meets the "
        f"constraints{lin}",
        "stalled": "the dual ascent stalled: the constraints look infeasible",
        "max_iter": f"no convergence within max_iter={max_iter} dual evaluations",
    }[reason]
    ab_name = "AB" if association == "conditional" else "moment AB"
    msg = (
        f"M4 infeasible at eta={eta} (eps_r={eps_r}, eps_d={eps_d}): {why}. Closest attempt: "
        f"RB={reached[0]:.4g}, {ab_name}={reached[1]:.4g} (data before: RB={before.rb:.4g}, "
        f"AB={before.ab:.4g})."
    )
    achievable = reached
    if relaxed is not None and relaxed_eps is not None:
        achievable = relaxed.reached
        msg += (
            f" Tightest achievable found: RB={achievable[0]:.4g}, {ab_name}={achievable[1]:.4g} "
            f"(solved with eps_r={relaxed_eps[0]:.4g}, eps_d={relaxed_eps[1]:.4g}; "
            "the fallback is on this error's .relaxed)."
        )
    msg += " Lower eta, loosen eps, or drop the offending labels/groups."
    raise M4InfeasibleError(
        msg,
        reason=reason,
        rb=achievable[0],
        ab=achievable[1],
        attempt=reached,
        relaxed_eps=relaxed_eps,
        relaxed=relaxed,
    )


def _relax(
    design: _Design,
    groups: np.ndarray,
    pi: np.ndarray,
    sizes: tuple[int, ...],
    eta: float,
    eps: tuple[float, float],
    shift: np.ndarray | None,
    utility_weight: float,
    association: Association,
    tol: float,
    max_iter: int,
    before: BiasStats,
) -> tuple[tuple[float, float] | None, M4Result | None]:
    """Smallest feasible ``eps_d`` at the requested ``eps_r`` (doubling, then two bisection
    steps in log space); if none up to 1, double ``eps_r`` with ``eps_d = 1``."""

    def attempt(e_r: float, e_d: float) -> M4Result | None:
        try:
            return _solve_design(
                design, groups, pi, sizes, eta, (e_r, e_d), shift, utility_weight, association,
                tol, max_iter, False, before,
            )  # fmt: skip
        except M4InfeasibleError:
            return None

    eps_r, lo = eps
    found: tuple[float, M4Result] | None = None
    while found is None and lo < 1.0:
        e_d = min(2.0 * lo, 1.0)
        res = attempt(eps_r, e_d)
        if res is not None:
            found = (e_d, res)
        else:
            lo = e_d
    if found is None:  # the representation bound itself is the obstacle
        e_r = eps_r
        while e_r < 1.0:
            e_r = min(2.0 * e_r, 1.0)
            res = attempt(e_r, 1.0)
            if res is not None:
                return (e_r, 1.0), res
        return None, None
    hi, best = found
    for _ in range(2):
        mid = float(np.sqrt(lo * hi))
        res = attempt(eps_r, mid)
        if res is not None:
            hi, best = mid, res
        else:
            lo = mid
    return (eps_r, hi), best


# --------------------------------------------------------------------------- closed form


def acceptance_weights(duals: M4Duals, s: Any, y: Any, utility: Any = None) -> np.ndarray:
    """``q = clip(eta + V u - mu - a^T v, 0, 1)`` for any rows (e.g. one streamed chunk)."""
    groups = validate_groups(s, duals.family_sizes)
    labels = validate_labels(y, groups.shape[0], duals.num_labels)
    shift = _utility_shift(utility, duals.utility_weight, groups.shape[0])
    design = _Design(groups, labels, duals.family_sizes)
    cen = _Centres(duals.targets, duals.group_center, duals.label_center)
    t = design.B @ design.h_table(duals.w, cen).ravel()
    q = np.subtract(duals.eta - duals.mu, t, out=t)
    if shift is not None:
        q += shift
    return np.clip(q, 0.0, 1.0, out=q)


def sample_mask(q: Any, seed: int) -> np.ndarray:
    """Deterministic Bernoulli(q) keep mask (same ``seed`` and ``q`` -> same mask)."""
    qa = np.asarray(q, dtype=np.float64)
    if qa.ndim != 1:
        raise ValueError(f"q: expected a 1-D array of probabilities, got shape {qa.shape}")
    if not np.all((qa >= 0) & (qa <= 1)):
        raise ValueError("q: expected probabilities in [0, 1]")
    return np.random.default_rng(seed).random(qa.shape[0]) < qa


# --------------------------------------------------------------------------- streaming


def _chunk_source(
    chunks: Iterable[Chunk] | Callable[[], Iterable[Chunk]], epochs: int
) -> Callable[[], Iterator[Chunk]]:
    if callable(chunks) and not hasattr(chunks, "__iter__"):
        return lambda: iter(chunks())  # type: ignore[operator]
    if epochs > 1 and iter(chunks) is chunks:  # type: ignore[arg-type]
        raise ValueError(
            "chunks: a one-shot iterator can be read once; for epochs > 1 pass a list or a "
            "callable returning a fresh iterator"
        )
    return lambda: iter(chunks)  # type: ignore[arg-type]


def solve_streaming(
    chunks: Iterable[Chunk] | Callable[[], Iterable[Chunk]],
    *,
    family_sizes: Sequence[int],
    num_labels: int,
    targets: Any = None,
    eta: float = 0.9,
    eps_r: float = 0.01,
    eps_d: float = 0.01,
    utility_weight: float = 0.0,
    association: Association = "conditional",
    batch_size: int = 256,
    lr: float = 0.1,
    epochs: int = 1,
    seed: int = 0,
) -> M4Duals:
    """The paper's dual SGD over a stream of row chunks ``(s, y)`` or ``(s, y, u)``.

    The paper updates ``(mu, v)`` after every example with that example's gradient
    ``(q_i - eta, +-a_i q_i - eps)``. Here every ``batch_size`` consecutive examples (rows
    shuffled within their chunk, so ordered shards do not bias the steps) share the duals
    and take one step with their mean gradient: ``batch_size=1`` is the paper's update,
    larger batches trade steps for vectorised numpy work (a Python step per example would
    not scale). Steps are Jacobi-preconditioned by running constraint curvatures,
    use ``lr / sqrt(1 + step / 100)`` and end with polynomial-decay iterate averaging.
    ``v+-, >= 0`` is kept as the soft-threshold of ``w = v+ - v-`` (its proximal form).
    For ``"conditional"`` the association centre tracks the running achieved shares.

    Returns :class:`M4Duals`; weights of any chunk follow from :func:`acceptance_weights`.
    Only a chunk at a time is held in memory.
    """
    eta, eps_r, eps_d, utility_weight = _check_scalars(eta, eps_r, eps_d, utility_weight)
    _check_association(association)
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr: expected > 0, got {lr}")
    if epochs < 1:
        raise ValueError(f"epochs: expected >= 1, got {epochs}")
    sizes = validate_family_sizes(family_sizes)
    pi = validate_targets(targets, sizes)
    source = _chunk_source(chunks, epochs)
    m, width = int(sum(sizes)), num_labels + 1
    rng = np.random.default_rng(seed)
    mu, w = 0.0, np.zeros((m, width))
    mu_avg, w_avg = 0.0, np.zeros((m, width))
    cen = _Centres.moment(pi, num_labels)
    J1, L1, n_seen = np.zeros((m, width)), np.zeros(width), 0  # unweighted, for curvature
    Jq, Lq = np.zeros((m, width)), np.zeros(width)  # q-weighted, decayed: running centres
    step = 0
    with _single_blas_thread():
        for _ in range(epochs):
            n_chunks = 0
            for chunk in source():
                n_chunks += 1
                if not isinstance(chunk, tuple) or len(chunk) not in (2, 3):
                    raise ValueError("chunks: expected tuples (s, y) or (s, y, utility)")
                groups = validate_groups(chunk[0], sizes)
                labels = validate_labels(chunk[1], groups.shape[0], num_labels)
                util = chunk[2] if len(chunk) == 3 else None
                shift = _utility_shift(util, utility_weight, groups.shape[0])
                perm = rng.permutation(groups.shape[0])
                design = _Design(groups[perm], labels[perm], sizes)
                base = np.full(design.n, eta) if shift is None else eta + shift[perm]
                cj, cl = design.group_sums(np.ones(design.n))
                J1, L1, n_seen = J1 + cj, L1 + cl, n_seen + design.n
                if association == "conditional" and Lq[0] == 0:
                    cen = _Centres(pi, pi.copy(), L1[1:] / L1[0])
                curv = _curvature(J1, L1, n_seen, cen)  # per chunk: a preconditioner only
                precond = 1.0 / np.maximum(curv, 1e-6 * max(float(curv.max()), 1e-300))
                ptr, idx = design.B.indptr, design.B.indices
                n_cols = design.B.shape[1]
                for lo in range(0, design.n, batch_size):
                    # minibatch B @ h and B.T @ q on the raw CSR arrays: scipy's row slicing
                    # costs more than the arithmetic at these sizes (every row has its
                    # representation entry, so no reduceat segment is empty)
                    hi = min(lo + batch_size, design.n)
                    rows_ptr = ptr[lo : hi + 1] - ptr[lo]
                    cols = idx[ptr[lo] : ptr[hi]]
                    t = np.add.reduceat(design.h_table(w, cen).ravel()[cols], rows_ptr[:-1])
                    q = np.clip(base[lo:hi] - mu - t, 0.0, 1.0)
                    qn = np.repeat(q, np.diff(rows_ptr))
                    cells = np.bincount(cols, weights=qn, minlength=n_cols).reshape(-1, width)
                    J, L = design.S.T @ cells, cells.sum(axis=0)
                    F = _moments(J, L, hi - lo, cen)
                    b = _bounds(eta, eps_r, eps_d, association, cen, width)
                    step += 1
                    rate = lr / np.sqrt(1.0 + step / 100.0)
                    mu += rate * (L[0] / (hi - lo) - eta)
                    z = w + rate * precond * F
                    w = np.sign(z) * np.maximum(np.abs(z) - rate * precond * b, 0.0)
                    frac = 4.0 / (step + 3.0)  # polynomial-decay averaging (Shamir & Zhang)
                    mu_avg += frac * (mu - mu_avg)
                    w_avg += frac * (w - w_avg)
                    if association == "conditional":
                        Jq, Lq = 0.999 * Jq + J, 0.999 * Lq + L
                        if Lq[0] > 0:
                            cen = _Centres.achieved(pi, Jq, Lq)
            if n_chunks == 0:
                raise ValueError("chunks: expected at least one chunk of rows")
    return M4Duals(mu_avg, w_avg, cen.groups, cen.labels, pi, sizes, num_labels, eta,
                   utility_weight, step)  # fmt: skip
