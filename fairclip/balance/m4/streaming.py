"""M4 streaming solver: the paper's dual SGD over minibatches of a chunked source."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from fairclip.balance.m4.problem import (
    DEFAULT_EPS_D,
    DEFAULT_EPS_R,
    DEFAULT_ETA,
    Association,
    Chunk,
    M4Duals,
    _bounds,
    _Centres,
    _check_association,
    _check_scalars,
    _curvature,
    _Design,
    _moments,
    _single_blas_thread,
    _utility_shift,
)
from fairclip.balance.stats import (
    validate_family_sizes,
    validate_groups,
    validate_labels,
    validate_targets,
)

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
    eta: float = DEFAULT_ETA,
    eps_r: float = DEFAULT_EPS_R,
    eps_d: float = DEFAULT_EPS_D,
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
