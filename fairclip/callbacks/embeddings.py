"""The unit embeddings of a training batch, shared by the callbacks that learn from them.

Why one place: ``FairCLIPModule.training_step`` returns the batch's unit embeddings
(detached) beside its loss, and encoding the batch again in a callback would cost a second
forward pass of both towers per step. The SAE and joint-head callbacks both take them from
here, and encode anew only when the module returns no embeddings (a user's own module).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor


@torch.no_grad()
def encode_batch(
    pl_module: L.LightningModule, batch: dict, modalities: Sequence[str], raw: bool = False
) -> dict[str, Tensor]:
    """Unit-norm (raw with ``raw``) float32 embeddings of ``batch`` for ``modalities``
    ("text", "image")."""
    model = pl_module.model
    out = {}
    if "text" in modalities:
        out["text"] = model.encode_text(batch["text"], normalize=not raw).float()
    if "image" in modalities:
        out["image"] = model.encode_image(batch["image"], normalize=not raw).float()
    return out


def step_embeddings(
    pl_module: L.LightningModule,
    outputs: Any,
    batch: dict,
    modalities: Sequence[str],
    raw: bool = False,
) -> dict[str, Tensor]:
    """The unit embeddings the training step returned (``outputs["embeddings"]``; the raw
    tower outputs, ``outputs["raw_embeddings"]``, with ``raw``), else the batch encoded anew;
    float32 and detached either way."""
    name = "raw_embeddings" if raw else "embeddings"
    given = outputs.get(name) if isinstance(outputs, dict) else None
    if given is None or any(m not in given for m in modalities):
        return encode_batch(pl_module, batch, modalities, raw)
    return {m: given[m].detach().float() for m in modalities}
