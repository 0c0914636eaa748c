"""Per-group zero-shot accuracy, plus the input checks shared by all fairclip metrics.

Group labels everywhere in ``fairclip.metrics`` are integer tensors ``[N, A]``: column ``a``
holds the value index for attribute ``list(attributes)[a]`` and ``-1`` means unknown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "GroupZeroShotAccuracy",
    "attribute_index",
    "check_groups",
    "check_ks",
    "validate_attributes",
]


def validate_attributes(attributes: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Return a plain copy of ``attributes`` after checking it is usable as a group vocabulary.

    Every metric indexes group columns by the order of this mapping, so an empty family or a
    duplicated value would silently shift indices; we fail early instead.
    """
    if not isinstance(attributes, Mapping) or len(attributes) == 0:
        raise ValueError(
            f"attributes: expected a non-empty mapping attribute name -> list of values, "
            f"got {attributes!r}"
        )
    out: dict[str, list[str]] = {}
    for name, values in attributes.items():
        if not isinstance(name, str):
            raise ValueError(f"attributes: expected str attribute names, got {name!r}")
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise ValueError(
                f"attributes[{name!r}]: expected a list of value names, got {values!r}"
            )
        values = [str(v) for v in values]
        if len(values) == 0:
            raise ValueError(f"attributes[{name!r}]: expected at least one value, got []")
        if len(set(values)) != len(values):
            raise ValueError(f"attributes[{name!r}]: expected unique values, got {values}")
        out[name] = values
    return out


def attribute_index(attributes: Mapping[str, Sequence[str]], name: str) -> int:
    """Column of ``name`` in the ``groups`` tensors; ValueError lists the known names."""
    names = list(attributes)
    if name not in names:
        raise ValueError(f"attribute: unknown attribute {name!r}, expected one of {names}")
    return names.index(name)


def check_ks(ks: Sequence[int], arg: str = "ks") -> tuple[int, ...]:
    """Validate a non-empty sequence of positive integer cut-offs (duplicates removed)."""
    if isinstance(ks, int):
        ks = (ks,)
    ks = tuple(ks)
    if len(ks) == 0:
        raise ValueError(f"{arg}: expected at least one cut-off k, got ()")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"{arg}: expected positive integers, got {k!r} in {ks}")
    return tuple(dict.fromkeys(ks))


def check_groups(
    groups: Tensor, num_values: Sequence[int], n: int | None = None, arg: str = "groups"
) -> Tensor:
    """Check an ``[N, A]`` (or ``[N]`` when A == 1) integer group tensor; return it as ``[N, A]``.

    Values must lie in ``[-1, num_values[a])``; out-of-range indices would otherwise be
    scattered into another attribute's slots.
    """
    num_attr = len(num_values)
    if not isinstance(groups, Tensor):
        raise ValueError(f"{arg}: expected a torch.Tensor, got {type(groups).__name__}")
    if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
        raise ValueError(f"{arg}: expected an integer tensor, got dtype {groups.dtype}")
    if groups.ndim == 1 and num_attr == 1:
        groups = groups.unsqueeze(1)
    if groups.ndim != 2 or groups.shape[1] != num_attr:
        raise ValueError(
            f"{arg}: expected shape [N, {num_attr}] (one column per attribute), "
            f"got {tuple(groups.shape)}"
        )
    if n is not None and groups.shape[0] != n:
        raise ValueError(
            f"{arg}: expected {n} rows to match the other inputs, got {groups.shape[0]}"
        )
    if groups.numel():
        upper = torch.as_tensor(list(num_values), device=groups.device)
        bad = (groups < -1) | (groups >= upper)
        if bool(bad.any()):
            row, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{arg}: expected values in [-1, {num_values[col]}) for column {col}, "
                f"got {int(groups[row, col])} at row {row}"
            )
    return groups.long()


def _check_labels(x: Tensor, num_classes: int, arg: str, n: int | None = None) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 1:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{arg}: expected a 1-D integer tensor [N], got {shape}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{arg}: expected an integer tensor, got dtype {x.dtype}")
    if n is not None and x.shape[0] != n:
        raise ValueError(
            f"{arg}: expected {n} elements to match the other inputs, got {x.shape[0]}"
        )
    if x.numel() and bool(((x < 0) | (x >= num_classes)).any()):
        raise ValueError(f"{arg}: expected class indices in [0, {num_classes}), got {x.tolist()}")
    return x.long()


def _check_positive_int(value: int, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{arg}: expected a positive integer, got {value!r}")
    return value


def _offsets(num_values: Sequence[int]) -> list[int]:
    """Start of each attribute's block when all values are concatenated into one axis."""
    out, start = [], 0
    for m in num_values:
        out.append(start)
        start += m
    return out


class GroupZeroShotAccuracy(Metric):
    """Zero-shot accuracy overall, per group value, worst group and max-min gap per attribute.

    Worst-group accuracy and the gap expose failures hidden by a good average (e.g. a spurious
    background). Values with no sample are reported as NaN and excluded from worst/gap; samples
    with group ``-1`` still count towards ``"acc"``.

    Per (true class, group value) cell it also reports ``"worst_class_group_acc/{attr}"`` (the
    worst cell, as in worst-group robustness benchmarks) and ``"class_group_gap/{attr}"``: the
    mean over classes of the max-min accuracy gap between that class's groups. The cell view
    catches stereotype bias that averages out per group (female doctors called nurses while
    male nurses are called doctors leaves both genders' overall accuracy equal).

    ``update(preds [N], target [N], groups [N, A])``; ``compute()`` returns ``"acc"``,
    ``"acc/{attr}={value}"``, ``"worst_group_acc/{attr}"``, ``"group_gap/{attr}"``,
    ``"worst_class_group_acc/{attr}"`` and ``"class_group_gap/{attr}"``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor
    group_correct: Tensor
    group_total: Tensor

    def __init__(
        self,
        num_classes: int,
        attributes: dict[str, list[str]],
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes = _check_positive_int(num_classes, "num_classes")
        self.attributes = validate_attributes(attributes)
        self.validate_args = validate_args
        self._num_values = [len(v) for v in self.attributes.values()]
        self.register_buffer("_offsets", torch.tensor(_offsets(self._num_values)), persistent=False)
        num_slots = sum(self._num_values)
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("group_correct", torch.zeros(num_slots, dtype=torch.long), "sum")
        self.add_state("group_total", torch.zeros(num_slots, dtype=torch.long), "sum")
        cells = num_classes * num_slots
        self.add_state("cell_correct", torch.zeros(cells, dtype=torch.long), "sum")
        self.add_state("cell_total", torch.zeros(cells, dtype=torch.long), "sum")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor) -> None:
        """Accumulate hits per group slot with one scatter_add over all attributes."""
        if self.validate_args:
            preds = _check_labels(preds, self.num_classes, "preds")
            target = _check_labels(target, self.num_classes, "target", n=preds.shape[0])
            groups = check_groups(groups, self._num_values, n=preds.shape[0])
        elif groups.ndim == 1:
            groups = groups.unsqueeze(1)
        hit = (preds == target).long()
        self.correct += hit.sum()
        self.total += hit.numel()
        known = groups >= 0
        slots = (groups + self._offsets)[known]
        hits = hit.unsqueeze(1).expand_as(groups)[known]
        self.group_correct.scatter_add_(0, slots, hits)
        self.group_total.scatter_add_(0, slots, torch.ones_like(hits))
        cells = (target.unsqueeze(1) * self.group_total.numel() + groups + self._offsets)[known]
        self.cell_correct.scatter_add_(0, cells, hits)
        self.cell_total.scatter_add_(0, cells, torch.ones_like(hits))

    def compute(self) -> dict[str, Tensor]:
        """Accuracies as float tensors; NaN where a value (or the whole set) had no sample."""
        out: dict[str, Tensor] = {"acc": self.correct.double().div(self.total).float()}
        acc = self.group_correct.double() / self.group_total.double()
        for (name, values), start in zip(
            self.attributes.items(), self._offsets.tolist(), strict=True
        ):
            block = acc[start : start + len(values)]
            for value, a in zip(values, block, strict=True):
                out[f"acc/{name}={value}"] = a.float()
            seen = block[self.group_total[start : start + len(values)] > 0]
            if seen.numel():
                worst, best = seen.min(), seen.max()
            else:
                worst = best = torch.tensor(float("nan"), device=acc.device, dtype=acc.dtype)
            out[f"worst_group_acc/{name}"] = worst.float()
            out[f"group_gap/{name}"] = (best - worst).float()
            out.update(self._cell_stats(name, start, len(values)))
        return out

    def cell_accuracy(self) -> dict[str, Tensor]:
        """Per attribute, the accuracy of every (true class, value) cell ``[C, V]``; NaN where
        a cell has no sample. What the worst cell and the class gap summarise: which class
        fails for which group."""
        return {
            name: self._cell_block(start, len(values))[0].float()
            for (name, values), start in zip(
                self.attributes.items(), self._offsets.tolist(), strict=True
            )
        }

    def _cell_block(self, start: int, size: int) -> tuple[Tensor, Tensor]:
        shape = (self.num_classes, self.group_total.numel())
        total = self.cell_total.view(shape)[:, start : start + size].double()
        return self.cell_correct.view(shape)[:, start : start + size].double() / total, total

    def _cell_stats(self, name: str, start: int, size: int) -> dict[str, Tensor]:
        """Worst (class, value) cell and mean within-class gap, over cells with samples."""
        acc, total = self._cell_block(start, size)
        seen = total > 0
        nan = torch.tensor(float("nan"), dtype=acc.dtype, device=acc.device)
        worst = acc[seen].min() if seen.any() else nan
        rows = seen.sum(1) >= 2  # a gap needs two groups of the same class
        hi = torch.where(seen, acc, -torch.inf).amax(1)
        lo = torch.where(seen, acc, torch.inf).amin(1)
        gap = (hi - lo)[rows].mean() if rows.any() else nan
        return {
            f"worst_class_group_acc/{name}": worst.float(),
            f"class_group_gap/{name}": gap.float(),
        }
