"""TextSpan (Gandelsman, Efros, Steinhardt, ICLR 2024): describe what one attention head's
direct contributions encode by a few text directions from a pool.

For one (layer, head), with ``C`` the ``[N, D]`` contributions of N images and ``T`` the
``[M, D]`` unit text embeddings of a pool of descriptions:

1. project the texts on the span of the head's top ``rank`` right singular vectors of ``C``
   (the directions the head can write at all);
2. centre ``C``;
3. ``n_texts`` times: pick the text whose projection ``C tᵀ`` has the largest standard
   deviation over the images, then remove that text's direction from ``C`` and from every
   remaining text (so the next choice explains what is left).

This follows the authors' ``compute_complete_text_set.py``. The chosen texts are the head's
description; :func:`explained_variance` says how much of the head's variance their span
holds, which is how a description is compared with, e.g., random pool entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class HeadDescription:
    """The texts TextSpan chose for one head, in order, and the variance they explain."""

    layer: int
    head: int
    texts: tuple[str, ...]
    indices: tuple[int, ...]
    explained: float  # fraction of the centred contributions' variance in the chosen span


def text_span(contrib: Tensor, texts: Tensor, n_texts: int, rank: int = 80) -> list[int]:
    """Indices into ``texts`` of the ``n_texts`` directions chosen for ``contrib`` ``[N, D]``
    (see the module docstring; ``rank`` is capped at what the contributions have)."""
    if contrib.ndim != 2 or texts.ndim != 2 or contrib.shape[1] != texts.shape[1]:
        raise ValueError(
            f"text_span: expected contributions [N, D] and texts [M, D], got "
            f"{tuple(contrib.shape)} and {tuple(texts.shape)}"
        )
    if not 0 < n_texts <= texts.shape[0]:
        raise ValueError(f"text_span: n_texts={n_texts}: expected 1..{texts.shape[0]} texts")
    data = contrib.double()
    _, _, vh = torch.linalg.svd(data, full_matrices=False)
    basis = vh[: min(rank, vh.shape[0])]  # orthonormal rows
    pool = texts.double() @ basis.T @ basis  # the texts within the head's span
    data = data - data.mean(0, keepdim=True)
    chosen: list[int] = []
    for _ in range(n_texts):
        spread = (data @ pool.T).std(0)
        if chosen:
            spread[chosen] = -1.0  # a removed direction projects to zero anyway
        best = int(spread.argmax())
        chosen.append(best)
        t = pool[best]
        norm = t @ t
        if float(norm) <= 1e-24:
            break  # nothing left to explain
        data = data - torch.outer(data @ t / norm, t)
        pool = pool - torch.outer(pool @ t / norm, t)
    return chosen


def explained_variance(contrib: Tensor, directions: Tensor) -> float:
    """Fraction of the variance of the centred ``contrib`` ``[N, D]`` that lies in the span
    of ``directions`` ``[K, D]``."""
    data = contrib.double() - contrib.double().mean(0, keepdim=True)
    total = float(data.pow(2).sum())
    if total == 0.0:
        return 0.0
    q, _ = torch.linalg.qr(directions.double().T)  # [D, K] orthonormal basis of the span
    return float((data @ q).pow(2).sum()) / total


def describe_heads(
    contrib: Tensor,
    heads: Sequence[tuple[int, int]],
    texts: Tensor,
    names: Sequence[str],
    n_texts: int = 5,
    rank: int = 80,
) -> list[HeadDescription]:
    """TextSpan of each (layer, head) of ``heads`` from contributions ``[N, L, H, D]``."""
    out = []
    for layer, head in heads:
        c = contrib[:, layer, head]
        idx = text_span(c, texts, n_texts, rank)
        out.append(
            HeadDescription(
                layer,
                head,
                tuple(names[i] for i in idx),
                tuple(idx),
                explained_variance(c, texts[idx]),
            )  # fmt: skip
        )
    return out


def bias_descriptions(
    attributes: dict[str, Sequence[str]] | Sequence[str], templates: Sequence[str]
) -> list[str]:
    """Bias-related pool entries: every attribute word in every template
    (``"a photo of a {}."``)."""
    words = (
        [w for values in attributes.values() for w in values]
        if isinstance(attributes, dict)
        else list(attributes)
    )
    return list(dict.fromkeys(t.format(w) for w in words for t in templates))
