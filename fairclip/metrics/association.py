"""Representation / association bias (RB, AB), Cramér's V and ABLE.

RB and AB are the single definition used for data (M4 balancing, with weighted counts) and for
models (counts of zero-shot predictions), so a balanced dataset and an unbiased model are
judged by the same numbers:

* ``RB = max_k |pi_k - n_k / n|`` over all one-hot group columns ``k``;
* ``AB = max_{k,r} |P(y_r | s_k = 1) - P(y_r | s_k = 0)|`` from joint counts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.nominal import CramersV as _LibraryCramersV

from fairclip.metrics.zeroshot import (
    _check_labels,
    _check_positive_int,
    _offsets,
    check_groups,
    validate_attributes,
)

__all__ = [
    "CramersV",
    "ModelBias",
    "able",
    "association_bias",
    "cramers_v",
    "representation_bias",
]


def _float(x: Tensor | float, arg: str) -> Tensor:
    x = torch.as_tensor(x)
    if x.is_complex():
        raise ValueError(f"{arg}: expected real numbers, got dtype {x.dtype}")
    return x.double() if x.dtype != torch.float64 else x


def representation_bias(group_counts: Tensor, total: Tensor | float, target: Tensor) -> Tensor:
    """``max_k |target_k - group_counts_k / total|`` (float64 scalar).

    ``group_counts`` ``[m]`` may be weighted (float); ``m`` is every one-hot group column of
    every family concatenated, with ``target`` the desired shares in the same order. A zero
    ``total`` gives NaN (shares are undefined).
    """
    counts, target_t, total_t = (
        _float(group_counts, "group_counts"),
        _float(target, "target"),
        _float(total, "total"),
    )
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(
            f"group_counts: expected a non-empty 1-D tensor [m], got {tuple(counts.shape)}"
        )
    if target_t.shape != counts.shape:
        raise ValueError(
            f"target: expected shape {tuple(counts.shape)} like group_counts, got {tuple(target_t.shape)}"
        )
    if total_t.ndim != 0:
        raise ValueError(f"total: expected a scalar, got shape {tuple(total_t.shape)}")
    target_t = target_t.to(counts.device)
    return (target_t - counts / total_t.to(counts.device)).abs().max()


def association_bias(
    joint_counts: Tensor, group_counts: Tensor, label_counts: Tensor, total: Tensor | float
) -> Tensor:
    """``max_{k,r} |joint[k,r]/group[k] - (label[r] - joint[k,r])/(total - group[k])|``.

    ``joint_counts[k, r]`` counts examples with group column ``k`` and label ``r``; the others
    are the marginals (all may be weighted). A pair ``(k, r)`` whose group is empty or covers
    every example (a zero denominator: one conditional is undefined) contributes 0 rather
    than a one-sided rate. Returns a float64 scalar.
    """
    joint = _float(joint_counts, "joint_counts")
    group = _float(group_counts, "group_counts").to(joint.device)
    label = _float(label_counts, "label_counts").to(joint.device)
    total_t = _float(total, "total").to(joint.device)
    if joint.ndim != 2 or joint.numel() == 0:
        raise ValueError(
            f"joint_counts: expected a non-empty [m, c] tensor, got {tuple(joint.shape)}"
        )
    m, c = joint.shape
    if group.shape != (m,):
        raise ValueError(
            f"group_counts: expected shape ({m},) like joint_counts rows, got {tuple(group.shape)}"
        )
    if label.shape != (c,):
        raise ValueError(
            f"label_counts: expected shape ({c},) like joint_counts columns, got {tuple(label.shape)}"
        )
    if total_t.ndim != 0:
        raise ValueError(f"total: expected a scalar, got shape {tuple(total_t.shape)}")
    rest = total_t - group
    valid = ((group > 0) & (rest > 0)).unsqueeze(1)
    inside = joint / group.unsqueeze(1).where(valid, torch.ones_like(joint))
    outside = (label - joint) / rest.unsqueeze(1).where(valid, torch.ones_like(joint))
    return torch.where(valid, (inside - outside).abs(), torch.zeros_like(joint)).max()


def cramers_v(table: Tensor) -> Tensor:
    """Bias-uncorrected Cramér's V ``sqrt(chi2 / (n * (min(r, c) - 1)))`` of a contingency table.

    Empty rows and columns are dropped first (a class never predicted carries no evidence and
    would make the expected counts zero). If fewer than two rows or columns remain there is no
    association to measure and V is 0; an empty table gives NaN.

    Kept rather than torchmetrics' functional ``cramers_v``, because that one takes the two raw
    series instead of a table and returns NaN instead of 0 when one row or column remains.
    """
    t = _float(table, "table")
    if t.ndim != 2:
        raise ValueError(f"table: expected a 2-D contingency table, got shape {tuple(t.shape)}")
    if bool((t < 0).any()):
        raise ValueError("table: expected non-negative counts")
    t = t[t.sum(1) > 0][:, t.sum(0) > 0]
    n = t.sum()
    if n == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=t.device)
    dof = min(t.shape) - 1
    if dof == 0:
        return torch.zeros((), dtype=torch.float64, device=t.device)
    expected = t.sum(1, keepdim=True) * t.sum(0, keepdim=True) / n
    chi2 = ((t - expected) ** 2 / expected).sum()
    return (chi2 / (n * dof)).sqrt()


def able(accuracy: Tensor | float, max_skew: Tensor | float) -> Tensor:
    """ABLE = ``2 / (1/acc + 1/exp(-MaxSkew))``: harmonic mean of accuracy and ``exp(-MaxSkew)``.

    Rewards debiasing only when accuracy survives (Zhang et al. 2025). Broadcasts; acc = 0
    gives 0.
    """
    acc = torch.as_tensor(accuracy)
    acc = acc if acc.is_floating_point() else acc.to(torch.get_default_dtype())
    skew = torch.as_tensor(max_skew, dtype=acc.dtype, device=acc.device)
    if bool(((acc < 0) | (acc > 1)).any()):
        raise ValueError(f"accuracy: expected values in [0, 1], got {accuracy}")
    return 2.0 / (1.0 / acc + torch.exp(skew))


class ModelBias(Metric):
    """Model RB and AB per attribute from zero-shot predictions (sum states only).

    ``update(pred_groups [N, A], true_groups [N, A], pred_classes [N])``:

    * ``"rb/{attr}"``: RB of the predicted group shares (images with a prediction, i.e. not
      -1) against the target: ``"eq_opp"`` uniform over the attribute's values, ``"dem_par"``
      the true group prior (images with a known true group).
    * ``"ab/{attr}"``: AB between the TRUE group and the PREDICTED class, over images with a
      known true group: does the model predict some classes more often for one group?

    NaN when an attribute has no usable image.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    pred_group_counts: Tensor
    joint: Tensor

    def __init__(
        self,
        attributes: dict[str, list[str]],
        num_classes: int,
        target: str = "eq_opp",
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.attributes = validate_attributes(attributes)
        self.num_classes = _check_positive_int(num_classes, "num_classes")
        if target not in ("eq_opp", "dem_par"):
            raise ValueError(f"target: expected 'eq_opp' or 'dem_par', got {target!r}")
        self.target = target
        self.validate_args = validate_args
        self._num_values = [len(v) for v in self.attributes.values()]
        self.register_buffer("_offsets", torch.tensor(_offsets(self._num_values)), persistent=False)
        slots = sum(self._num_values)
        self.add_state("pred_group_counts", torch.zeros(slots, dtype=torch.long), "sum")
        self.add_state("joint", torch.zeros(slots * num_classes, dtype=torch.long), "sum")

    def update(self, pred_groups: Tensor, true_groups: Tensor, pred_classes: Tensor) -> None:
        """Count predicted groups, and true group x predicted class, for all attributes at once."""
        if self.validate_args:
            pred_classes = _check_labels(pred_classes, self.num_classes, "pred_classes")
            n = pred_classes.shape[0]
            pred_groups = check_groups(pred_groups, self._num_values, n, "pred_groups")
            true_groups = check_groups(true_groups, self._num_values, n, "true_groups")
        else:
            pred_groups = pred_groups.view(pred_classes.shape[0], -1)
            true_groups = true_groups.view(pred_classes.shape[0], -1)
        known_pred = pred_groups >= 0
        slots = (pred_groups + self._offsets)[known_pred]
        self.pred_group_counts.scatter_add_(0, slots, torch.ones_like(slots))
        known_true = true_groups >= 0
        cells = (true_groups + self._offsets) * self.num_classes + pred_classes.unsqueeze(1)
        cells = cells[known_true]
        self.joint.scatter_add_(0, cells, torch.ones_like(cells))

    def compute(self) -> dict[str, Tensor]:
        """``{"rb/{attr}", "ab/{attr}"}`` as float32 scalars."""
        joint = self.joint.view(-1, self.num_classes).double()
        out: dict[str, Tensor] = {}
        for (name, values), start in zip(
            self.attributes.items(), self._offsets.tolist(), strict=True
        ):
            block = joint[start : start + len(values)]
            true_counts = block.sum(1)
            pred_counts = self.pred_group_counts[start : start + len(values)].double()
            if self.target == "eq_opp":
                target = torch.full_like(pred_counts, 1.0 / len(values))
            else:
                target = true_counts / true_counts.sum()
            out[f"rb/{name}"] = representation_bias(pred_counts, pred_counts.sum(), target).float()
            n_true = true_counts.sum()
            if n_true > 0:
                ab = association_bias(block, true_counts, block.sum(0), n_true)
            else:
                ab = torch.tensor(float("nan"), device=block.device)
            out[f"ab/{name}"] = ab.float()
        return out


class CramersV(_LibraryCramersV):
    """Cramér's V between group and predicted class: torchmetrics' ``CramersV`` without bias
    correction, over float64 counts.

    ``update(groups [N], classes [N])`` (group -1 = unknown, skipped); ``compute()`` is
    :func:`cramers_v` of the accumulated table (bias-uncorrected, empty rows/columns dropped),
    computed by torchmetrics on a square ``max(num_groups, num_classes)`` table, whose extra
    rows or columns stay empty. Used by the attention-head audit: 0 = predictions independent
    of group, 1 = group determines the prediction.

    Two things differ from the bare library metric: the arguments are (groups, classes) with
    unknown groups skipped and labels validated, and a table with a single non-empty row or
    column gives 0 like :func:`cramers_v`, where torchmetrics divides 0 by 0 and returns NaN.
    ``num_classes`` is torchmetrics' table side; the number of classes passed in is
    ``num_pred_classes``.
    """

    higher_is_better = False

    def __init__(
        self, num_groups: int, num_classes: int, validate_args: bool = True, **kwargs: Any
    ) -> None:
        num_groups = _check_positive_int(num_groups, "num_groups")
        num_pred_classes = _check_positive_int(num_classes, "num_classes")
        super().__init__(
            num_classes=max(num_groups, num_pred_classes), bias_correction=False, **kwargs
        )
        # float64 counts: exact past 2**24 per cell, and V is computed in float64
        self.set_dtype(torch.float64)
        self.num_groups = num_groups
        self.num_pred_classes = num_pred_classes
        self.validate_args = validate_args

    def update(self, groups: Tensor, classes: Tensor) -> None:  # type: ignore[override]
        """Add one batch of (group, class) pairs to the table (row = group, column = class)."""
        if self.validate_args:
            classes = _check_labels(classes, self.num_pred_classes, "classes")
            groups = check_groups(groups, [self.num_groups], classes.shape[0])[:, 0]
        known = groups >= 0
        # torchmetrics counts confmat[target, preds]
        super().update(classes[known], groups[known])

    def compute(self) -> Tensor:
        """Cramér's V as a float32 scalar."""
        table = self.confmat
        rows, cols = int((table.sum(1) > 0).sum()), int((table.sum(0) > 0).sum())
        if rows > 0 and min(rows, cols) < 2:  # no association to measure (cramers_v's rule)
            return torch.zeros((), dtype=torch.float32, device=table.device)
        return super().compute().float()
