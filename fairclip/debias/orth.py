"""Orth-Proj and Orth-Cali (Chuang et al. 2023, "Debiasing vision-language models via biased
prompts"): linear post-hoc edits of the text embeddings, the dense-space baselines SEM is
compared with.

* Orth-Proj (published, ``variant=published``): ``P0 = I - V (V^T V)^-1 V^T`` with ``V`` the
  unit embeddings of the *spurious prompts* themselves (e.g. "a photo of a male person.",
  "a photo of a female person."), a projection of rank ``V``.
* Orth-Cali: ``P* = P0 (I + lam/|S| sum_{(i,j) in S} (z_i - z_j)(z_i - z_j)^T)^-1``, the
  minimiser of ``||P - P0||^2 + lam/|S| sum ||P z_i - P z_j||^2`` over the positive pairs
  ``S`` (prompts that differ only in the group, e.g. "a photo of a male doctor." / "a photo of
  a female doctor."), with the authors' ``lam = 1000``.
* ``variant=centred`` (this project's extension): the span of the group prompts' differences
  from their per-template mean (rank ``V - 1`` per attribute), so a direction shared by every
  group prompt ("a photo of a person") is kept.

All act on raw embeddings: a linear map commutes with the later L2 normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor

from fairclip.debias.debiased_clip import DebiasedCLIP, Intervention

__all__ = [
    "ORTH_VARIANTS",
    "OrthCali",
    "OrthProj",
    "fit_orth_cali",
    "fit_orth_proj",
    "fit_orth_proj_published",
    "group_directions",
    "score_gap_split",
]

ORTH_VARIANTS = ("published", "centred")


class OrthProj(Intervention):
    """``e' = e - U U^T e`` with ``U`` [D, r] an orthonormal basis of the group directions."""

    kind = "orth_proj"

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__(dim=int(dim), rank=int(rank))
        self.register_buffer("basis", torch.zeros(dim, rank))

    def forward(self, emb: Tensor) -> Tensor:
        u = self.basis.to(emb.dtype)
        return emb - (emb @ u) @ u.T


class OrthCali(Intervention):
    """``e' = P* e`` with the calibrated projection ``P*`` [D, D] (not symmetric)."""

    kind = "orth_cali"

    def __init__(self, dim: int) -> None:
        super().__init__(dim=int(dim))
        self.register_buffer("matrix", torch.eye(dim))

    def forward(self, emb: Tensor) -> Tensor:
        return emb @ self.matrix.to(emb.dtype).T


def _span_basis(rows: Tensor, rel_tol: float = 1e-6) -> Tensor:
    """Orthonormal basis [D, r] of the row span (numerical rank: singular values above
    ``rel_tol`` times the largest), so ``I - U U^T = I - V (V^T V)^-1 V^T`` for ``V = rows^T``."""
    _, s, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    return vh[s > rel_tol * s[0]].T


def _unit(encode: Callable[[Sequence[str]], Tensor], prompts: Sequence[str], key: str) -> Tensor:
    if not prompts:
        raise ValueError(f"{key}: expected at least one prompt, got []")
    with torch.no_grad():
        return F.normalize(encode(list(prompts)).float(), dim=-1)


def fit_orth_proj_published(
    encode: Callable[[Sequence[str]], Tensor],
    spurious_prompts: Sequence[str],
    key: str = "debias.orth_proj",
) -> OrthProj:
    """Chuang et al.'s ``P0``: project out the span of the spurious prompt embeddings."""
    basis = _span_basis(_unit(encode, spurious_prompts, f"{key}.spurious_prompts"))
    proj = OrthProj(basis.shape[0], basis.shape[1])
    proj.basis.copy_(basis.float())
    return proj.eval()


def fit_orth_cali(
    encode: Callable[[Sequence[str]], Tensor],
    spurious_prompts: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    lam: float = 1000.0,
    key: str = "debias.orth_proj",
) -> OrthCali:
    """Chuang et al.'s calibrated projection ``P* = P0 (I + lam M)^-1``, ``M`` the mean of
    ``(z_i - z_j)(z_i - z_j)^T`` over the unit embeddings of the positive ``pairs``."""
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"{key}.lam={lam}: expected a finite float >= 0")
    if not pairs:
        raise ValueError(f"{key}.pair_templates: expected at least one positive pair, got none")
    basis = _span_basis(_unit(encode, spurious_prompts, f"{key}.spurious_prompts"))
    dim = basis.shape[0]
    p0 = torch.eye(dim, dtype=torch.float64) - basis @ basis.T
    left = _unit(encode, [a for a, _ in pairs], f"{key}.pairs").double()
    right = _unit(encode, [b for _, b in pairs], f"{key}.pairs").double()
    diff = left - right
    gram = torch.eye(dim, dtype=torch.float64) + lam * (diff.T @ diff) / len(pairs)
    cali = OrthCali(dim)
    # P0 G^-1 = (G^-1 P0)^T: G and P0 are symmetric
    cali.matrix.copy_(torch.linalg.solve(gram, p0).T.float())
    return cali.eval()


Templates = Sequence[str] | Mapping[str, Sequence[str]]


def _templates_of(templates: Templates, attr: str, key: str) -> list[str]:
    if isinstance(templates, Mapping):
        if attr not in templates:
            raise ValueError(f"{key}: no templates for {attr!r} (has {list(templates)})")
        return [str(t) for t in templates[attr]]
    return [str(t) for t in templates]


def orth_prompts(
    group_words: Mapping[str, Mapping[str, Any]],
    spurious_templates: Templates,
    pair_templates: Templates,
    classes: Sequence[str],
    key: str = "debias.orth_proj",
) -> tuple[list[str], list[tuple[str, str]]]:
    """Spurious prompts (templates x every value's words) and Orth-Cali's positive pairs (per
    pair template and class, every two words of different values of one attribute).
    Templates are one list for every attribute or a list per attribute."""
    spurious: list[str] = []
    pairs: list[tuple[str, str]] = []
    for attr, values in group_words.items():
        spurious_t = _templates_of(spurious_templates, attr, f"{key}.spurious_templates")
        pair_t = _templates_of(pair_templates, attr, f"{key}.pair_templates")
        if len(values) < 2:
            raise ValueError(f"{key}.group_words.{attr}: expected >= 2 values, got {list(values)}")
        words = [
            (v, str(w))
            for v, ws in values.items()
            for w in (ws if isinstance(ws, list | tuple) else [ws])
        ]
        spurious += [t.format(g=w) for t in spurious_t for _, w in words]
        for t in pair_t:
            for c in classes:
                for i, (vi, wi) in enumerate(words):
                    pairs += [
                        (t.format(g=wi, c=c), t.format(g=wj, c=c))
                        for vj, wj in words[i + 1 :]
                        if vj != vi
                    ]
    if not spurious:
        raise ValueError(f"{key}: expected group words and spurious_templates, got none")
    return spurious, pairs


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


def _prompts_of(ctx: Any) -> tuple[list[str], list[tuple[str, str]]]:
    oc = ctx.cfg.debias.orth_proj
    return orth_prompts(
        ctx.group_words(),
        OmegaConf.to_container(oc.spurious_templates, resolve=True),
        OmegaConf.to_container(oc.pair_templates, resolve=True),
        [str(c) for c in ctx.cfg.debias.classes],
    )


def build_orth_proj(bundle: Any, ctx: Any) -> DebiasedCLIP:
    """Comparison builder: Orth-Proj of ``debias.orth_proj.variant`` (published: the spurious
    prompts' span; centred: the bias prompts' group directions)."""
    oc = ctx.cfg.debias.orth_proj
    variant = str(oc.get("variant", "published"))
    if variant not in ORTH_VARIANTS:
        raise ValueError(
            f"debias.orth_proj.variant={variant!r}: expected one of {list(ORTH_VARIANTS)}"
        )
    if variant == "published":
        proj = fit_orth_proj_published(ctx.encode, _prompts_of(ctx)[0])
    else:
        proj = fit_orth_proj(
            ctx.encode, ctx.bias_prompts(), rank=oc.rank, rel_tol=float(oc.rel_tol),
            key="debias.orth_proj",
        )  # fmt: skip
    return DebiasedCLIP(bundle.model, bundle.name, text=[proj])


def build_orth_cali(bundle: Any, ctx: Any) -> DebiasedCLIP:
    """Comparison builder: Orth-Cali (the spurious prompts' ``P0`` calibrated on pairs of
    class prompts that differ only in the group)."""
    spurious, pairs = _prompts_of(ctx)
    lam = float(ctx.cfg.debias.orth_proj.lam)
    return DebiasedCLIP(
        bundle.model, bundle.name, text=[fit_orth_cali(ctx.encode, spurious, pairs, lam)]
    )
