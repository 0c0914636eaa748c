"""M4 batch solver: L-BFGS-B on the Jacobi-scaled smooth dual, with a weak-duality
infeasibility certificate and the conditional re-centring rounds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.optimize as so

from fairclip.balance.m4.problem import (
    _B_FLOOR,
    DEFAULT_EPS_D,
    DEFAULT_EPS_R,
    DEFAULT_ETA,
    Association,
    M4Duals,
    M4InfeasibleError,
    M4Result,
    _bounds,
    _Centres,
    _check_association,
    _check_scalars,
    _counts_from_sums,
    _curvature,
    _Design,
    _moments,
    _single_blas_thread,
    _utility_shift,
)
from fairclip.balance.stats import (
    BiasStats,
    bias_from_counts,
    group_offsets,
    validate_family_sizes,
    validate_groups,
    validate_labels,
    validate_targets,
)


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
    eta: float = DEFAULT_ETA,
    eps_r: float = DEFAULT_EPS_R,
    eps_d: float = DEFAULT_EPS_D,
    utility: Any = None,
    utility_weight: float = 0.0,
    association: Association = "conditional",
    tol: float = 1e-3,
    max_iter: int = 1000,
    diagnose: bool = True,
    group_names: Sequence[str] | None = None,
) -> M4Result:
    """Exact batch M4: acceptance weights ``q`` ``[N]`` meeting data RB <= ``eps_r`` and
    AB <= ``eps_d`` at kept fraction ``mean(q) = eta``.

    ``s`` ``[N, F]`` int group indices, ``y`` ``[N, c]`` sparse binary labels (scipy sparse,
    dense, or ``(indptr, indices)`` with ``num_labels``), ``targets`` per-family shares
    ``pi`` (uniform by default), ``utility`` ``u`` ``[N]`` rewarded with weight ``V``.
    ``tol`` is the relative constraint / duality-gap tolerance and ``max_iter`` the budget of
    dual evaluations (two sparse mat-vecs each) over all centring rounds.

    ``group_names`` (``"gender=female"``, one per group column) name the groups in errors.

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
            tol, max_iter, diagnose, before, group_names,
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
    group_names: Sequence[str] | None = None,
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
            largest = share / max(pi[k] - eps_r, 1e-12)
        else:
            largest = (1 - share) / max(1 - pi[k] - eps_r, 1e-12)
        # rounded down, so that the suggested eta itself passes
        fix = f"eta <= {math.floor(largest * 1e4) / 1e4:.4f}"
        group = group_names[k] if group_names is not None else f"{local} of family {f}"
        raise M4InfeasibleError(
            f"M4 infeasible: group {group} has {int(n_k)} of {n} rows "
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
            f" It solves with eps_r={relaxed_eps[0]:.4g}, eps_d={relaxed_eps[1]:.4g}, reaching "
            f"RB={achievable[0]:.4g}, {ab_name}={achievable[1]:.4g} (an upper bound on the "
            "tightest achievable; from Python, those weights are the error's .relaxed)."
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
