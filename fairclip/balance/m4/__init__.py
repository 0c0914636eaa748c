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

from fairclip.balance.m4.batch import solve_batch
from fairclip.balance.m4.problem import (
    M4Duals,
    M4InfeasibleError,
    M4Result,
    acceptance_weights,
    sample_mask,
)
from fairclip.balance.m4.streaming import solve_streaming

__all__ = [
    "M4Duals",
    "M4InfeasibleError",
    "M4Result",
    "acceptance_weights",
    "sample_mask",
    "solve_batch",
    "solve_streaming",
]
