"""Ranking bias of text-to-image retrieval: Skew@k, MaxSkew@k, MinSkew@k and NDKL@k.

Definitions and conventions follow Berg et al. 2022, "A Prompt Array Keeps the Bias Away"
(reference code: ``debias_clip/measuring_bias.py`` in oxai/debias-vision-lang), itself after
Geyik et al. 2019. For a query, rank the images by score and let ``p_k(a)`` be the share of
group ``a`` among the top ``k``:

* ``Skew@k(a) = ln(p_k(a) / p*(a))`` (natural log). A group absent from the top ``k`` counts
  as share ``1/k`` instead of 0 (no log of zero), as in the reference.
* ``MaxSkew@k = max(0, max_a Skew@k(a))`` (the reference starts its max at 0; with the 1/k
  rule the top-k shares sum to >= 1, so the floor only absorbs rounding);
  ``MinSkew@k = min_a Skew@k(a)`` (not floored; same ``1/k`` rule).
* ``NDKL@k = (1/Z) sum_{i<=k} KL(D_i || p*) / log2(i + 1)`` with ``Z = sum_{i<=k} 1/log2(i + 1)``
  and ``D_i`` the group shares of the top ``i``. KL uses natural log and ``0 log 0 = 0``: a
  group missing from the top ``i`` contributes nothing (no ``1/k`` substitution here).
* ``p*``: ``"eq_opp"`` is uniform over the groups present in the evaluated set, ``"dem_par"``
  is the set's own prior of the groups. Group values absent from the whole set are skipped,
  as in the reference (which only iterates over labels that occur).

Deliberate deviations from the reference, both only visible in corner cases:

* Ties are broken stably by image index (among equal scores the earlier image ranks first),
  so the top ``k`` always holds exactly ``k`` images. The reference keeps every image tied
  at the boundary (``pandas.nlargest(keep="all")``) and still divides by ``k``.
* ``k`` larger than the number ``N`` of ranked images is clipped to ``N`` everywhere
  (shares divide by ``N``, the ``1/k`` rule becomes ``1/N`` and ``Z`` sums to ``N``). The
  reference divides by ``k`` and sums ``Z`` to ``k`` while only ``N`` images exist.

Scores are ranked in float32 (float64 inputs are rounded, which can create ties).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from fairclip.metrics.zeroshot import (
    attribute_index,
    check_groups,
    check_ks,
    validate_attributes,
)

__all__ = [
    "TARGETS",
    "SkewMetrics",
    "max_skew",
    "min_skew",
    "ndkl",
    "skew",
    "stable_topk",
    "target_distribution",
]

TARGETS = ("eq_opp", "dem_par")


def _check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if len(targets) == 0 or any(t not in TARGETS for t in targets):
        raise ValueError(f"targets: expected a non-empty subset of {TARGETS}, got {targets}")
    return tuple(dict.fromkeys(targets))


def stable_topk(scores: Tensor, k: int) -> Tensor:
    """Indices ``[Q, k]`` of the ``k`` highest ``scores[:, q]`` (``scores`` is ``[N, Q]``).

    Ties break stably by row index, which ``torch.topk`` does not guarantee. Fast path: where
    the top ``k + 1`` float values of a query are strictly decreasing, its top-k and their order
    are unique and plain ``topk`` is exact. The other queries map each float32 score to an
    order-preserving int32 packed with the reversed row index into a unique int64 key, so one
    integer ``topk`` is exact and deterministic on any device, without a full sort.
    """
    n = scores.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k: expected 1 <= k <= N = {n}, got {k}")
    s = scores.T.float()  # [Q, N]
    values, indices = torch.topk(s, min(k + 1, n), dim=1, sorted=True)
    indices = indices[:, :k]
    tied = ~(values[:, 1:] < values[:, :-1]).all(dim=1)
    if bool(tied.any()):  # exact path only for the queries with a tie near the top
        s = s[tied] + 0.0  # "+ 0.0" turns -0.0 into +0.0 so that they tie, as they compare equal
        bits = s.contiguous().view(torch.int32)
        # IEEE-754 floats order like sign-magnitude ints: flip the magnitude bits of negatives.
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
        tiebreak = (2**32 - 1) - torch.arange(n, device=scores.device)
        indices[tied] = torch.topk(ordered * 2**32 + tiebreak, k, dim=1, sorted=True).indices
    return indices


def target_distribution(
    groups: Tensor, num_groups: int, target: str | Tensor
) -> tuple[Tensor, Tensor]:
    """Desired shares ``p*`` ``[num_groups]`` (float64) and the mask of groups that count.

    ``groups`` holds the group of every ranked image (``-1`` not allowed here). A tensor
    ``target`` is used as given; groups with ``p* = 0`` are then skipped.
    """
    counts = torch.bincount(groups, minlength=num_groups).double()
    if isinstance(target, Tensor):
        if target.shape != (num_groups,):
            raise ValueError(
                f"target: expected a [{num_groups}] tensor of shares, got {tuple(target.shape)}"
            )
        p_star = target.to(device=groups.device, dtype=torch.float64)
        if bool((p_star < 0).any()) or abs(float(p_star.sum()) - 1.0) > 1e-6:
            raise ValueError(f"target: expected non-negative shares summing to 1, got {target}")
        return p_star, p_star > 0
    present = counts > 0
    if target == "eq_opp":
        return present.double() / present.sum(), present
    if target == "dem_par":
        return counts / counts.sum(), present
    raise ValueError(f"target: expected one of {TARGETS} or a tensor, got {target!r}")


def _ranked_counts(groups_ranked: Tensor, num_groups: int) -> Tensor:
    """Cumulative group counts ``[Q, K, m]`` (float64) of each ranking prefix."""
    return F.one_hot(groups_ranked, num_groups).double().cumsum(dim=1)


def _skew_from_counts(cum: Tensor, k: int, p_star: Tensor) -> Tensor:
    """Skew@k ``[Q, m]`` from prefix counts, with the 1/k rule for absent groups."""
    k = min(k, cum.shape[1])
    share = cum[:, k - 1] / k
    share = torch.where(share > 0, share, torch.full_like(share, 1.0 / k))
    return share.log() - p_star.log()


def _extreme_skews(cum: Tensor, k: int, p_star: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
    s = _skew_from_counts(cum, k, p_star)
    inf = torch.tensor(float("inf"), dtype=s.dtype, device=s.device)
    max_s = torch.where(present, s, -inf).amax(dim=1).clamp_min(0.0)
    min_s = torch.where(present, s, inf).amin(dim=1)
    return max_s, min_s


def _ndkl_prefix(cum: Tensor, p_star: Tensor) -> Tensor:
    """Running NDKL numerators ``[Q, K]``: entry ``i`` sums KL(D_j || p*)/log2(j+1), j <= i+1."""
    ranks = torch.arange(1, cum.shape[1] + 1, device=cum.device, dtype=cum.dtype)
    shares = cum / ranks[:, None]
    # xlogy gives 0 log 0 = 0, the reference's `np.where(p != 0, ...)`.
    kl = (torch.special.xlogy(shares, shares) - torch.special.xlogy(shares, p_star)).sum(-1)
    return (kl / torch.log2(ranks + 1)).cumsum(dim=1)


def _ndkl_at(prefix: Tensor, k: int) -> Tensor:
    k = min(k, prefix.shape[1])
    z = (1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))).sum()
    return prefix[:, k - 1] / z.to(prefix.device)


def _prepare(
    scores: Tensor, groups: Tensor, k: int, num_groups: int | None
) -> tuple[Tensor, Tensor, int, bool]:
    """Shared argument handling of the functional API; drops images with group -1."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k: expected a positive integer, got {k!r}")
    if not isinstance(scores, Tensor) or scores.ndim not in (1, 2):
        raise ValueError("scores: expected a tensor [N] or [N, Q]")
    single = scores.ndim == 1
    scores = scores.unsqueeze(1) if single else scores
    if not isinstance(groups, Tensor) or groups.ndim != 1 or groups.shape[0] != scores.shape[0]:
        raise ValueError(f"groups: expected an integer tensor [{scores.shape[0]}]")
    if num_groups is None:
        num_groups = int(groups.max()) + 1 if groups.numel() else 1
    groups = check_groups(groups, [num_groups])[:, 0]
    known = groups >= 0
    if not bool(known.any()):
        raise ValueError("groups: expected at least one image with a known group (>= 0)")
    return scores[known], groups[known], num_groups, single


def skew(
    scores: Tensor,
    groups: Tensor,
    k: int,
    target: str | Tensor = "eq_opp",
    num_groups: int | None = None,
) -> Tensor:
    """Skew@k per query and group, ``[Q, num_groups]`` (``[num_groups]`` for 1-D ``scores``).

    ``scores`` ``[N]`` or ``[N, Q]`` (image x query), ``groups`` ``[N]`` with -1 = excluded.
    Groups that do not count (absent from the set) are NaN. See the module docstring.
    """
    scores, groups, m, single = _prepare(scores, groups, k, num_groups)
    p_star, present = target_distribution(groups, m, target)
    k = min(k, scores.shape[0])
    cum = _ranked_counts(groups[stable_topk(scores, k)], m)
    out = _skew_from_counts(cum, k, p_star).masked_fill(~present, float("nan"))
    return out[0] if single else out


def max_skew(
    scores: Tensor,
    groups: Tensor,
    k: int,
    target: str | Tensor = "eq_opp",
    num_groups: int | None = None,
) -> Tensor:
    """MaxSkew@k per query ``[Q]`` (floored at 0); arguments as in :func:`skew`."""
    scores, groups, m, single = _prepare(scores, groups, k, num_groups)
    p_star, present = target_distribution(groups, m, target)
    k = min(k, scores.shape[0])
    cum = _ranked_counts(groups[stable_topk(scores, k)], m)
    out = _extreme_skews(cum, k, p_star, present)[0]
    return out[0] if single else out


def min_skew(
    scores: Tensor,
    groups: Tensor,
    k: int,
    target: str | Tensor = "eq_opp",
    num_groups: int | None = None,
) -> Tensor:
    """MinSkew@k per query ``[Q]`` (not floored); arguments as in :func:`skew`."""
    scores, groups, m, single = _prepare(scores, groups, k, num_groups)
    p_star, present = target_distribution(groups, m, target)
    k = min(k, scores.shape[0])
    cum = _ranked_counts(groups[stable_topk(scores, k)], m)
    out = _extreme_skews(cum, k, p_star, present)[1]
    return out[0] if single else out


def ndkl(
    scores: Tensor,
    groups: Tensor,
    k: int,
    target: str | Tensor = "eq_opp",
    num_groups: int | None = None,
) -> Tensor:
    """NDKL@k per query ``[Q]`` (0 = top-k shares match ``p*`` at every depth)."""
    scores, groups, m, single = _prepare(scores, groups, k, num_groups)
    p_star, _ = target_distribution(groups, m, target)
    k = min(k, scores.shape[0])
    cum = _ranked_counts(groups[stable_topk(scores, k)], m)
    out = _ndkl_at(_ndkl_prefix(cum, p_star), k)
    return out[0] if single else out


class SkewMetrics(Metric):
    """MaxSkew@k, MinSkew@k and NDKL@k of text->image retrieval, per attribute and target.

    ``update(scores [N, Q], groups [N, A])`` receives the similarity of each image in the
    batch to every query (all queries on every rank, images sharded). The states are the raw
    scores and groups (cat), so ``compute()`` ranks all images of all ranks: one
    :func:`stable_topk` per attribute at the largest ``k``, vectorised over queries, then every
    ``k`` and target reuses the prefix counts. Keys: ``"maxskew@{k}/{attr}/{target}"``,
    ``"minskew@{k}/{attr}/{target}"``, ``"ndkl@{k}/{attr}/{target}"``, each the mean over
    queries; :meth:`compute_per_query` gives the ``[Q]`` values for plots.

    Images with group ``-1`` for an attribute are left out of that attribute's ranking and
    prior. ``k`` above the number of ranked images is clipped to it; ties break by image
    order (under DDP the gathered order is rank 0's images, then rank 1's, ...). See the
    module docstring for the exact conventions. An attribute with no known image gives NaN.
    ``whole_ranking=True`` adds the same metrics over every ranked image under ``@all``
    (Berg et al.'s whole-set NDKL; MaxSkew@all against ``dem_par`` is 0 by construction).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    rows: list[Tensor]
    num_images: Tensor

    def __init__(
        self,
        attributes: dict[str, list[str]],
        ks: Sequence[int] = (10, 50, 100),
        targets: Sequence[str] = TARGETS,
        validate_args: bool = True,
        whole_ranking: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.attributes = validate_attributes(attributes)
        self.ks = check_ks(ks)
        self.whole_ranking = bool(whole_ranking)
        self.targets = _check_targets(targets)
        self.validate_args = validate_args
        self._num_values = [len(v) for v in self.attributes.values()]
        # One flattened float32 row [scores | groups] per image: a single all_gather per sync,
        # and 1-D so it concatenates with the empty tensor torchmetrics substitutes for a rank
        # that saw no data. Group ids are exact in float32 (< 2**24).
        self.add_state("rows", [], dist_reduce_fx="cat")
        self.add_state("num_images", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self._num_queries: int | None = None

    def update(self, scores: Tensor, groups: Tensor) -> None:
        """Store a batch: ``scores [N, Q]`` (image x query), ``groups [N, A]`` (-1 unknown)."""
        if self.validate_args:
            if not isinstance(scores, Tensor) or scores.ndim != 2 or not scores.is_floating_point():
                shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
                raise ValueError(f"scores: expected a float tensor [N, Q], got {shape}")
            if scores.shape[1] == 0:
                raise ValueError("scores: expected at least one query column, got Q = 0")
            if self._num_queries is not None and scores.shape[1] != self._num_queries:
                raise ValueError(
                    f"scores: expected {self._num_queries} queries as in earlier batches, "
                    f"got {scores.shape[1]}"
                )
            if bool(scores.isnan().any()):
                raise ValueError("scores: expected no NaN (they cannot be ranked)")
            groups = check_groups(groups, self._num_values, n=scores.shape[0])
        elif groups.ndim == 1:
            groups = groups.unsqueeze(1)
        self._num_queries = scores.shape[1]
        row = torch.cat([scores.detach().float(), groups.float()], dim=1)
        self.rows.append(row.flatten())
        self.num_images += scores.shape[0]

    def reset(self) -> None:
        """Clear the states and forget the number of queries of the previous run."""
        super().reset()
        self._num_queries = None

    def _gathered(self) -> tuple[Tensor, Tensor]:
        n = int(self.num_images)
        rows = dim_zero_cat(self.rows).view(n, -1)
        num_attr = len(self.attributes)
        return rows[:, :-num_attr], rows[:, -num_attr:].long()

    def _per_query(self, attribute: str | None = None) -> dict[str, Tensor]:
        names = list(self.attributes)
        if attribute is not None:
            names = [names[attribute_index(self.attributes, attribute)]]
        if int(self.num_images) == 0:  # nothing seen: empty per-query values, NaN means
            scores = torch.empty(0, 0, device=self.num_images.device)
            groups = torch.empty(0, len(self._num_values), dtype=torch.long, device=scores.device)
        else:
            scores, groups = self._gathered()
        num_q = scores.shape[1]
        out: dict[str, Tensor] = {}
        for name in names:
            a = attribute_index(self.attributes, name)
            m = self._num_values[a]
            g = groups[:, a]
            known = g >= 0
            n_a = int(known.sum())
            if n_a == 0:
                nan = torch.full((num_q,), float("nan"), device=scores.device)
                for k in self._depths():
                    for t in self.targets:
                        for metric in ("maxskew", "minskew", "ndkl"):
                            out[f"{metric}@{k}/{name}/{t}"] = nan.clone()
                continue
            all_known = n_a == g.shape[0]
            g, s = (g, scores) if all_known else (g[known], scores[known])
            k_max = n_a if self.whole_ranking else min(max(self.ks), n_a)
            cum = _ranked_counts(g[stable_topk(s, k_max)], m)
            for t in self.targets:
                p_star, present = target_distribution(g, m, t)
                prefix = _ndkl_prefix(cum, p_star)
                for k in self._depths():
                    k_eff = n_a if k == "all" else min(k, n_a)
                    mx, mn = _extreme_skews(cum, k_eff, p_star, present)
                    out[f"maxskew@{k}/{name}/{t}"] = mx.float()
                    out[f"minskew@{k}/{name}/{t}"] = mn.float()
                    out[f"ndkl@{k}/{name}/{t}"] = _ndkl_at(prefix, k_eff).float()
        order = [
            f"{metric}@{k}/{name}/{t}"
            for metric in ("maxskew", "minskew", "ndkl")
            for k in self._depths()
            for name in names
            for t in self.targets
        ]
        return {key: out[key] for key in order}

    def _depths(self) -> list[int | str]:
        return [*self.ks, "all"] if self.whole_ranking else list(self.ks)

    def compute(self) -> dict[str, Tensor]:
        """Mean over queries of every per-query value (scalar tensors)."""
        return {key: v.mean() for key, v in self._per_query().items()}

    def compute_per_query(self, attribute: str | None = None) -> dict[str, Tensor]:
        """Per-query ``[Q]`` values under the same keys as :meth:`compute` (synced under DDP).

        ``attribute`` restricts the output to one attribute (ValueError if unknown).
        """
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=self._to_sync and not self._is_synced,
            should_unsync=self._should_unsync,
        ):
            return self._per_query(attribute)
