"""The split-half protocol of the SEM paper (Guimard et al. 2026, ``main_eval.py`` of mardgui/SEM):
retrieval KL@K, MaxSkew@K and precision@K, and zero-shot accuracy and worst-group accuracy,
each as a mean with a 95% Student-t half-width over random 50/50 splits of the eval set.

Why its own metric and not :class:`~fairclip.metrics.SkewMetrics` at another k: the paper's
numbers differ in three ways that each move a table.

* **Folds.** ``n_folds`` random halvings of the eval images (seeded); each fold ranks only its
  eval half (the other half is the reference set methods such as BendVLM may use; the methods
  here use none). A record is one (fold, query) for retrieval, one (fold, image) for zero-shot;
  the reported value is the mean over records and ``t_{0.975, n-1} * sem`` its half-width.
* **Target.** The desired shares are the eval half's own group shares (``p*`` = dataset prior,
  Berg's ``dem_par``), recomputed per fold.
* **Logs.** ``KL = sum_a p(a) log(max(p(a)/p*(a), 1e-10))`` and
  ``MaxSkew = max(0, max_a log(max(p(a)/p*(a), 1e-10)))``: a group absent from the top K
  contributes 0 to KL and ``log 1e-10`` to the max, not Berg's ``1/k`` share. A group absent
  from the eval half has ``p* = 0`` and is skipped (the authors' code would give NaN).

Ties at the top-K boundary break by image order (:func:`~fairclip.metrics.stable_topk`);
``K`` above the eval half's size is clipped to it. Under DDP the folds index the gathered
order (rank 0's images first), as every ranking metric here does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from fairclip.metrics.skew import stable_topk
from fairclip.metrics.zeroshot import check_groups, validate_attributes

__all__ = [
    "FoldSpec",
    "FoldedRetrieval",
    "FoldedZeroShot",
    "half_splits",
    "mean_ci",
    "retrieval_kl",
    "retrieval_max_skew",
]

LOG_FLOOR = 1e-10  # the authors' log_with_eps floor


@dataclass(frozen=True)
class FoldSpec:
    """``n_folds`` seeded 50/50 splits; retrieval at depth ``k``; ``confidence`` of the CI."""

    n_folds: int = 10
    seed: int = 42
    k: int = 500
    confidence: float = 0.95

    def __post_init__(self) -> None:
        for name in ("n_folds", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"folds.{name}={value!r}: expected a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"folds.seed={self.seed!r}: expected an integer")
        if not 0.0 < float(self.confidence) < 1.0:
            raise ValueError(f"folds.confidence={self.confidence!r}: expected a value in (0, 1)")


def half_splits(n: int, n_folds: int, seed: int, device: Any = None) -> Tensor:
    """Eval-half masks ``[n_folds, n]`` (bool): per fold a random permutation, whose last
    ``n - n // 2`` images are evaluated (the first half is the reference half)."""
    if n < 2:
        raise ValueError(f"folds: expected at least 2 images to split in halves, got {n}")
    generator = torch.Generator().manual_seed(int(seed))
    masks = torch.zeros(n_folds, n, dtype=torch.bool)
    for fold in range(n_folds):  # n_folds permutations, not a loop over images
        perm = torch.randperm(n, generator=generator)
        masks[fold, perm[n // 2 :]] = True
    return masks.to(device) if device is not None else masks


def _ratios(shares: Tensor, prior: Tensor) -> Tensor:
    return torch.log(torch.clamp(shares / prior, min=LOG_FLOOR))


def retrieval_kl(shares: Tensor, prior: Tensor) -> Tensor:
    """``KL(p || p*)`` per row of ``shares [..., m]`` against ``prior [m]`` (see module doc)."""
    counted = prior > 0
    terms = torch.where(shares > 0, shares * _ratios(shares, prior), torch.zeros_like(shares))
    return torch.where(counted, terms, torch.zeros_like(terms)).sum(-1)


def retrieval_max_skew(shares: Tensor, prior: Tensor) -> Tensor:
    """``max(0, max_a log(max(p(a)/p*(a), 1e-10)))`` per row, over groups with ``p* > 0``."""
    logs = torch.where(prior > 0, _ratios(shares, prior), torch.full_like(shares, -torch.inf))
    return logs.amax(-1).clamp_min(0.0)


def mean_ci(values: Tensor | Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and Student-t half-width ``t_{(1+c)/2, n-1} * std/sqrt(n)`` (scipy.stats);
    NaN half-width for fewer than two values."""
    x = np.asarray(values.cpu() if isinstance(values, Tensor) else values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size < 2:
        return float(x.mean()), float("nan")
    half = stats.sem(x) * stats.t.ppf((1 + confidence) / 2.0, x.size - 1)
    return float(x.mean()), float(half)


class _Rows(Metric):
    """Shared state: one flattened float32 row per image, gathered under DDP (cat)."""

    is_differentiable = False
    full_state_update = False
    rows: list[Tensor]
    num_images: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("rows", [], dist_reduce_fx="cat")
        self.add_state("num_images", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def _store(self, columns: Tensor) -> None:
        self.rows.append(columns.detach().float().flatten())
        self.num_images += columns.shape[0]

    def _matrix(self, width: int) -> Tensor:
        if int(self.num_images) == 0:
            return torch.empty(0, width, device=self.num_images.device)
        return dim_zero_cat(self.rows).view(int(self.num_images), width)


class FoldedRetrieval(_Rows):
    """KL@K, MaxSkew@K (and precision@K for labelled queries) under the split-half protocol.

    ``update(scores [N, Q], groups [N, A])``: ``groups`` has one column per attribute of
    ``attributes`` (-1 unknown; such images are left out of that attribute's rankings).
    ``relevant``: optional ``(attribute, [value per query])``: query ``q`` retrieves relevant
    images when their ``attribute`` equals its value (the paper's labelled hair-colour
    queries), giving ``precision@{k}``. Keys of :meth:`compute`: ``kl@{k}/{attr}``,
    ``maxskew@{k}/{attr}`` and ``precision@{k}``, each with a ``/ci`` half-width.
    """

    higher_is_better = False

    def __init__(
        self,
        attributes: Mapping[str, Sequence[str]],
        folds: FoldSpec,
        skew_attributes: Sequence[str] | None = None,
        relevant: tuple[str, Sequence[str]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.attributes = validate_attributes(attributes)
        self.folds = folds
        names = list(self.attributes)
        self.skew_attributes = list(skew_attributes) if skew_attributes is not None else names
        for attr in self.skew_attributes:
            if attr not in self.attributes:
                raise ValueError(f"skew_attributes: unknown attribute {attr!r}, expected {names}")
        self.relevant: tuple[int, Tensor] | None = None
        if relevant is not None:
            attr, values = relevant
            if attr not in self.attributes:
                raise ValueError(f"relevant: unknown attribute {attr!r}, expected one of {names}")
            vocab = self.attributes[attr]
            unknown = [v for v in values if v not in vocab]
            if unknown:
                raise ValueError(f"relevant: values {unknown} are not in attributes.{attr}={vocab}")
            self.relevant = (names.index(attr), torch.tensor([vocab.index(v) for v in values]))
        self._num_values = [len(v) for v in self.attributes.values()]
        self._num_queries: int | None = None

    def update(self, scores: Tensor, groups: Tensor) -> None:
        if scores.ndim != 2 or not scores.is_floating_point() or scores.shape[1] == 0:
            raise ValueError(f"scores: expected a float tensor [N, Q], got {tuple(scores.shape)}")
        if self._num_queries is not None and scores.shape[1] != self._num_queries:
            raise ValueError(f"scores: expected {self._num_queries} queries as in earlier batches")
        if self.relevant is not None and self.relevant[1].numel() != scores.shape[1]:
            raise ValueError(
                f"relevant: {self.relevant[1].numel()} values for {scores.shape[1]} queries"
            )
        groups = check_groups(groups, self._num_values, n=scores.shape[0])
        self._num_queries = scores.shape[1]
        self._store(torch.cat([scores.float(), groups.float()], dim=1))

    def per_record(self) -> dict[str, Tensor]:
        """Every record ``[n_folds * Q]`` (fold-major) under the keys of :meth:`compute`."""
        num_attr, q = len(self.attributes), self._num_queries or 0
        rows = self._matrix(q + num_attr)
        scores, groups = rows[:, :q], rows[:, q:].long()
        n, k, out = rows.shape[0], self.folds.k, {}
        masks = half_splits(n, self.folds.n_folds, self.folds.seed, rows.device)
        names = list(self.attributes)
        for attr in self.skew_attributes:
            a = names.index(attr)
            kl, mx = [], []
            for mask in masks:  # one ranking per fold, vectorised over queries
                keep = mask & (groups[:, a] >= 0)
                g = groups[keep, a]
                prior = torch.bincount(g, minlength=self._num_values[a]).double() / g.numel()
                top = g[stable_topk(scores[keep], min(k, g.numel()))]  # [Q, k]
                shares = torch.nn.functional.one_hot(top, self._num_values[a]).double().mean(1)
                kl.append(retrieval_kl(shares, prior))
                mx.append(retrieval_max_skew(shares, prior))
            out[f"kl@{k}/{attr}"] = torch.cat(kl)
            out[f"maxskew@{k}/{attr}"] = torch.cat(mx)
        if self.relevant is not None:
            column, values = self.relevant
            values = values.to(rows.device)
            precision = []
            for mask in masks:
                top = stable_topk(scores[mask], min(k, int(mask.sum())))  # [Q, k]
                hit = groups[mask, column][top] == values[:, None]
                precision.append(hit.double().mean(1))
            out[f"precision@{k}"] = torch.cat(precision)
        return out

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, records in self.per_record().items():
            out[key], out[f"{key}/ci"] = mean_ci(records, self.folds.confidence)
        return out


class FoldedZeroShot(_Rows):
    """Zero-shot accuracy and worst-group accuracy under the split-half protocol.

    ``update(preds [N], target [N], groups [N, A])``. Records are (fold, eval-half image).
    ``acc`` is their mean; ``wg_acc/{attr}`` is the lowest accuracy of a (true class, value of
    ``attr``) cell over the pooled records, and its ``/ci`` that cell's half-width, as the
    paper reports. Cells with no record are skipped.
    """

    higher_is_better = True

    def __init__(
        self, attributes: Mapping[str, Sequence[str]], num_classes: int, folds: FoldSpec, **kw: Any
    ) -> None:
        super().__init__(**kw)
        self.attributes = validate_attributes(attributes)
        self.num_classes = int(num_classes)
        self.folds = folds
        self._num_values = [len(v) for v in self.attributes.values()]

    def update(self, preds: Tensor, target: Tensor, groups: Tensor) -> None:
        groups = check_groups(groups, self._num_values, n=preds.shape[0])
        self._store(torch.cat([preds[:, None].float(), target[:, None].float(), groups], dim=1))

    def compute(self) -> dict[str, float]:
        rows = self._matrix(2 + len(self.attributes)).long()
        masks = half_splits(rows.shape[0], self.folds.n_folds, self.folds.seed, rows.device)
        fold_rows = torch.cat([rows[mask] for mask in masks])  # pooled (fold, image) records
        correct = (fold_rows[:, 0] == fold_rows[:, 1]).double()
        out: dict[str, float] = {}
        out["acc"], out["acc/ci"] = mean_ci(correct, self.folds.confidence)
        for a, (attr, values) in enumerate(self.attributes.items()):
            g = fold_rows[:, 2 + a]
            cell = torch.where(g >= 0, fold_rows[:, 1] * len(values) + g, -1)
            known = cell >= 0
            size = self.num_classes * len(values)
            hits = torch.bincount(cell[known], weights=correct[known], minlength=size)
            counts = torch.bincount(cell[known], minlength=size)
            if not bool((counts > 0).any()):
                out[f"wg_acc/{attr}"] = out[f"wg_acc/{attr}/ci"] = float("nan")
                continue
            acc = torch.where(counts > 0, hits / counts.clamp_min(1), torch.inf)
            worst = int(acc.argmin())
            cell_records = correct[known][cell[known] == worst]
            out[f"wg_acc/{attr}"], out[f"wg_acc/{attr}/ci"] = mean_ci(
                cell_records, self.folds.confidence
            )
        return out
