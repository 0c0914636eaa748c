"""Orth-Proj baseline (Chuang et al. 2023, "Debiasing vision-language models via biased prompts").

Why: the simplest post-hoc text-side debiasing: remove from every text embedding the
subspace spanned by group directions (differences of group prompt embeddings, e.g.
"a photo of a woman." - "a photo of a man."), so queries cannot prefer one group through
those directions. A linear edit in the dense space, the reference SEM is compared with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fairclip.debias.debiased_clip import DebiasedCLIP, Intervention

__all__ = ["OrthProj", "group_directions", "fit_orth_proj", "score_gap_split"]


class OrthProj(Intervention):
    """``e' = e - U U^T e`` with ``U`` [D, r] an orthonormal basis of the group directions."""

    kind = "orth_proj"

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__(dim=int(dim), rank=int(rank))
        self.register_buffer("basis", torch.zeros(dim, rank))

    def forward(self, emb: Tensor) -> Tensor:
        u = self.basis.to(emb.dtype)
        return emb - (emb @ u) @ u.T


def group_directions(
    encode: Callable[[Sequence[str]], Tensor],
    group_prompts: Mapping[str, Mapping[str, Sequence[str]]],
    key: str = "debias.orth_proj.group_prompts",
) -> Tensor:
    """Differences of unit group prompt embeddings from their per-template mean, [M, D].

    Prompts of the values of one attribute are paired by position when the lists have equal
    length (e.g. the same template for woman/man), else each value's mean is used.
    """
    rows = []
    for attr, values in group_prompts.items():
        if len(values) < 2:
            raise ValueError(f"{key}.{attr}: expected prompts for >= 2 values, got {list(values)}")
        lists = [list(p) for p in values.values()]
        if any(not p for p in lists):
            raise ValueError(f"{key}.{attr}: every value needs at least one prompt")
        embs = [F.normalize(encode(p).float(), dim=-1) for p in lists]
        if len({len(p) for p in lists}) == 1:
            stack = torch.stack(embs)  # [V, T, D], paired by template
        else:
            stack = torch.stack([e.mean(0) for e in embs])[:, None]  # [V, 1, D]
        rows.append((stack - stack.mean(0, keepdim=True)).reshape(-1, stack.shape[-1]))
    if not rows:
        raise ValueError(f"{key}: expected at least one attribute with group prompts")
    return torch.cat(rows)


def fit_orth_proj(
    encode: Callable[[Sequence[str]], Tensor],
    group_prompts: Mapping[str, Mapping[str, Sequence[str]]],
    rank: int | None = None,
    rel_tol: float = 0.05,
    key: str = "debias.orth_proj",
) -> OrthProj:
    """Orthonormal basis (SVD) of the group directions: singular values above
    ``rel_tol * max``, at most ``rank`` of them (None: no cap)."""
    if rank is not None and rank < 1:
        raise ValueError(f"{key}.rank={rank}: expected None or an int >= 1")
    with torch.no_grad():
        dirs = group_directions(encode, group_prompts, f"{key}.group_prompts")
        _, s, vh = torch.linalg.svd(dirs, full_matrices=False)
    keep = int((s > rel_tol * s[0]).sum())
    keep = max(1, min(keep, rank or keep))
    proj = OrthProj(dirs.shape[1], keep).to(dirs.device)
    proj.basis.copy_(vh[:keep].T)
    return proj.eval()


@torch.no_grad()
def score_gap_split(
    class_emb: Tensor, images: Tensor, concepts: Tensor, groups: Tensor, directions: Tensor
) -> dict[str, float]:
    """Where a model's group score gap lives: in the prompts' lean, or in the images.

    For class ``c`` and group value ``v`` the ranking sees ``gap = t_c · (μ_cv − μ_c¬v)``
    (``μ``: mean image embedding of the class's images of that value, or of the others). It
    splits into the part along the span ``U`` of the bias-prompt ``directions``
    (``t_c U Uᵀ Δ``: the prompts' lean, all Orth-Proj removes and the part SEM targets) and
    the rest (how the image tower places the groups along everything else the prompt reads).
    ``offset`` = −Σ lean·rest / Σ lean² is the share of the lean the rest cancels. Near 1 (e.g.
    an image tower trained on balanced data against a biased locked text tower) the model is
    fair only because the two cancel, and a text-side edit that removes the lean exposes the
    rest: the gap flips (docs/results/ has the measured values). Means of |·| over classes and values with images
    of both sides. ``class_emb`` [C, D], ``images`` [N, D], ``concepts``/``groups`` [N] class
    and value indices (< 0: unlabelled), ``directions`` [V, D].
    """
    _, s, vh = torch.linalg.svd(directions.float(), full_matrices=False)
    basis = vh[s > 1e-6 * s[0]].T  # [D, r]
    keep = (concepts >= 0) & (groups >= 0)
    images, concepts, groups = images[keep].float(), concepts[keep], groups[keep]
    totals, leans = [], []
    for c in range(class_emb.shape[0]):  # classes x values: a few dozen
        for v in groups.unique().tolist():
            inside = (concepts == c) & (groups == v)
            outside = (concepts == c) & (groups != v)
            if not inside.any() or not outside.any():
                continue
            delta = images[inside].mean(0) - images[outside].mean(0)
            t = class_emb[c].float()
            totals.append(t @ delta)
            leans.append((t @ basis) @ (basis.T @ delta))
    if not totals:
        nan = float("nan")
        return {"gap": nan, "gap_lean": nan, "gap_rest": nan, "offset": nan}
    total, lean = torch.stack(totals), torch.stack(leans)
    rest = total - lean
    return {
        "gap": float(total.abs().mean()),
        "gap_lean": float(lean.abs().mean()),
        "gap_rest": float(rest.abs().mean()),
        "offset": float(-(lean * rest).sum() / (lean * lean).sum().clamp_min(1e-12)),
    }


def build_orth_proj(bundle: Any, ctx: Any) -> DebiasedCLIP:
    """Comparison builder: Chuang et al. 2023, the group directions of the bias prompts
    (``cfg.debias.bias_prompts``) projected out of the text embeddings."""
    oc = ctx.cfg.debias.orth_proj
    proj = fit_orth_proj(
        ctx.encode, ctx.bias_prompts(), rank=oc.rank, rel_tol=float(oc.rel_tol),
        key="debias.orth_proj",
    )  # fmt: skip
    return DebiasedCLIP(bundle.model, bundle.name, text=[proj])
