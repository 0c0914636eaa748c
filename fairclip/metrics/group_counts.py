"""Images per attribute value in a split (DDP-summed), for the empty-group check."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


class GroupCounts(Metric):
    """Images per attribute value in a split, plus labelled / captioned / skipped counts.

    Summed over DDP ranks, so the empty-group check sees the whole split on every rank.
    """

    full_state_update = False
    counts: Tensor
    totals: Tensor

    def __init__(self, attributes: dict[str, list[str]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.attributes = attributes
        sizes = [len(v) for v in attributes.values()]
        self.register_buffer(
            "_offsets", torch.tensor([sum(sizes[:i]) for i in range(len(sizes))]), persistent=False
        )
        self.add_state("counts", torch.zeros(sum(sizes), dtype=torch.long), "sum")
        # images, with a concept label, with a caption, skipped as corrupt
        self.add_state("totals", torch.zeros(4, dtype=torch.long), "sum")

    def update(self, groups: Tensor, labelled: Tensor, captioned: Tensor, skipped: int) -> None:
        known = groups >= 0
        slots = (groups + self._offsets)[known]
        self.counts.scatter_add_(0, slots, torch.ones_like(slots))
        self.totals += torch.tensor(
            [groups.shape[0], int(labelled.sum()), int(captioned.sum()), int(skipped)],
            device=self.totals.device,
        )

    def compute(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(
            zip(("images", "labelled", "captioned", "skipped"), self.totals.tolist(), strict=True)
        )
        counts = self.counts.tolist()
        out["group_counts"] = {
            name: dict(zip(values, counts[start : start + len(values)], strict=True))
            for (name, values), start in zip(
                self.attributes.items(), self._offsets.tolist(), strict=True
            )
        }
        return out
