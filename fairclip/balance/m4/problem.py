"""The M4 problem: data layout (cells, incidence matrix), moments, bounds, results, input
checks and the closed-form acceptance weights, shared by the batch and streaming solvers."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from fairclip.balance.stats import (
    BiasStats,
    WeightedCounts,
    group_offsets,
    validate_groups,
    validate_labels,
)

Association = Literal["conditional", "moment"]
Chunk = tuple[Any, Any] | tuple[Any, Any, Any]

# the defaults of solve_batch, solve_streaming and conf/balance/m4.yaml (one set: tested)
DEFAULT_ETA = 0.9
DEFAULT_EPS_R = 0.02
DEFAULT_EPS_D = 0.03

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
