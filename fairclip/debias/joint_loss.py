"""Losses and the optimiser step of the joint V-L debiasing heads (Zhang et al. 2025).

Every feature below is the original CLIP's, raw (un-normalised) as the heads take it;
``o = norm(f)`` is the original unit feature and ``d = norm(head(f))`` the debiased one. The
queues hold the original unit features of past batches (a FIFO ring, as MoCo/ALBEF), so the
softmaxes run over ``[batch ∪ queue]``.

``target="paper"`` (default; the authors' ``model_vl_debiasing.py``):

* **Counterfactual distillation** ``L_cd``. Targets from the original model:
  image→text ``softmax(o_v · [o_t, Q_t] / τ)``, text→image ``softmax(o_t · [o_v, Q_v] / τ)``,
  with ``o_t`` the *factual* caption's. From epoch ``distill_from_epoch`` on they are mixed
  ``distill · momentum + (1 − distill) · original``, the momentum targets being the EMA
  heads' debiased image against the original texts and the EMA's debiased factual text
  against the original images. The debiased image is trained toward the image→text target
  (``d_v · [o_t, Q_t] / τ``); the debiased text toward the text→image target
  (``d · [o_v, Q_v] / τ``), where ``d`` is the factual caption or, by one fair coin per
  batch, its counterfactual: a caption naming another group must point at the same images.
  Soft cross-entropy, mean of the two directions.
* **Bias alignment** ``L_ba = KL(P_t ‖ P_v)``, ``P_t = softmax(b_t · [o_t, Q_t] / τ)``,
  ``P_v = softmax(b_v · [o_v, Q_v] / τ)``, bias vectors ``b = o − d`` (factual text).
* ``L = α L_cd + (1 − α) L_ba``; the image- and text-only ablations use ``L_cd`` alone.

``target="balance_groups"`` (this project's extension, for captioned data with concept
labels): image→text over {caption, counterfactual} toward the group-neutral mean of both,
text→image of group-neutral captions rebalanced so that within every concept each group's
images get the same distribution of mass (:func:`balance_groups`), at the model's logit
scale; L_ba as above against the queues.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from fairclip.debias.joint_heads import JointHeads

TARGETS = ("paper", "balance_groups")
QUEUE_INITS = ("random", "empty")


@dataclass
class JointLossConfig:
    """Loss knobs; the defaults are the paper's (the authors' code)."""

    alpha: float = 0.3  # L = alpha * L_cd + (1 - alpha) * L_ba
    tau: float = 0.07
    queue_size: int = 65536
    queue_init: str = "random"  # random: unit noise, as the authors' buffers; empty: grows
    distill: float = 0.4  # weight of the momentum model in the targets
    momentum: float = 0.995
    distill_from_epoch: int = 5  # the targets are the original model's alone before this
    counterfactual_p: float = 0.5  # chance that a batch's text→image term uses counterfactuals
    target: str = "paper"  # paper | balance_groups (extension)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"joint heads target={self.target!r}: expected one of {TARGETS}")
        if self.queue_init not in QUEUE_INITS:
            raise ValueError(
                f"joint heads queue_init={self.queue_init!r}: expected one of {QUEUE_INITS}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"joint heads alpha={self.alpha}: expected a value in [0, 1]")
        if self.tau <= 0 or self.queue_size < 0:
            raise ValueError(
                f"joint heads tau={self.tau}, queue_size={self.queue_size}: expected tau > 0 "
                "and queue_size >= 0"
            )


class FeatureQueue:
    """Paired FIFO rings of original unit (image, text) features."""

    def __init__(self, size: int, init: str = "random", generator: torch.Generator | None = None):
        self.size, self.init, self.generator = size, init, generator
        self.v: Tensor | None = None
        self.t: Tensor | None = None
        self.ptr = 0
        self.filled = 0

    def _allocate(self, like: Tensor) -> None:
        dim = like.shape[1]
        if self.init == "random":
            noise = torch.randn(2, self.size, dim, generator=self.generator)
            self.v, self.t = F.normalize(noise, dim=-1).to(like.device, like.dtype).unbind(0)
            self.filled = self.size
        else:
            self.v = like.new_zeros(self.size, dim)
            self.t = like.new_zeros(self.size, dim)

    def features(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The queued (image, text) features ``[n, D]`` (n = 0 before anything is queued
        with ``init="empty"``)."""
        if self.v is None:
            self._allocate(like)
        assert self.v is not None and self.t is not None
        return self.v[: self.filled], self.t[: self.filled]

    @torch.no_grad()
    def push(self, v: Tensor, t: Tensor) -> None:
        if self.size == 0:
            return
        if self.v is None:
            self._allocate(v)
        assert self.v is not None and self.t is not None
        n = min(v.shape[0], self.size)
        slots = (self.ptr + torch.arange(n, device=v.device)) % self.size
        self.v[slots], self.t[slots] = v[:n].to(self.v.dtype), t[:n].to(self.t.dtype)
        self.ptr = (self.ptr + n) % self.size
        self.filled = min(self.size, self.filled + n)


def _soft_ce(target: Tensor, logits: Tensor) -> Tensor:
    """Mean over rows of −Σ target · log softmax(logits)."""
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def _kl(target: Tensor, logits: Tensor) -> Tensor:
    """Mean over rows of KL(target ‖ softmax(logits))."""
    logp = logits.log_softmax(-1)
    return (target * (target.clamp_min(1e-12).log() - logp)).sum(-1).mean()


@torch.no_grad()
def distillation_targets(
    ov: Tensor,
    ot: Tensor,
    qv: Tensor,
    qt: Tensor,
    tau: float,
    momentum: tuple[Tensor, Tensor] | None = None,
    distill: float = 0.4,
) -> tuple[Tensor, Tensor]:
    """The paper's (image→text, text→image) targets over ``[batch ∪ queue]``: original unit
    features ``ov``/``ot`` (factual captions); with ``momentum = (m_v, m_t)`` (the EMA heads'
    unit debiased image and factual text) mixed ``distill · momentum + (1 − distill) · orig``."""
    texts, images = torch.cat([ot, qt]), torch.cat([ov, qv])
    i2t = (ov @ texts.T / tau).softmax(-1)
    t2i = (ot @ images.T / tau).softmax(-1)
    if momentum is not None:
        mv, mt = momentum
        i2t = distill * (mv @ texts.T / tau).softmax(-1) + (1 - distill) * i2t
        t2i = distill * (mt @ images.T / tau).softmax(-1) + (1 - distill) * t2i
    return i2t, t2i


def bias_alignment(
    ov: Tensor, ot: Tensor, dv: Tensor, dt: Tensor, qv: Tensor, qt: Tensor, tau: float
) -> Tensor:
    """``L_ba = KL(P_t ‖ P_v)`` of the bias vectors ``b = o − d`` against the originals and
    queues (mean over the batch)."""
    log_pt = ((ot - dt) @ torch.cat([ot, qt]).T / tau).log_softmax(-1)
    log_pv = ((ov - dv) @ torch.cat([ov, qv]).T / tau).log_softmax(-1)
    return (log_pt.exp() * (log_pt - log_pv)).sum(-1).mean()


def _rank_within(p: Tensor, segment: Tensor) -> tuple[Tensor, Tensor]:
    """Ascending rank of every entry of each row of ``p`` within its ``segment`` (ids >= 0,
    shared by all rows), and the row's values sorted by (segment, value). ``p`` in [0, 1]."""
    order = (segment[None].to(p.dtype) * 2 + p).argsort(dim=1)
    counts = torch.bincount(segment)
    start = counts.cumsum(0) - counts
    ranks_sorted = torch.arange(p.shape[1], device=p.device) - start[segment[order]]
    return torch.empty_like(order).scatter_(1, order, ranks_sorted), p.gather(1, order)


def balance_groups(p: Tensor, groups: Tensor, concepts: Tensor) -> Tensor:
    """Give each group the same distribution of target mass within every concept: an image at
    quantile q of its (concept, group) gets the concept's pooled value at quantile q, then each
    concept keeps its total mass. Rows of ``p`` are distributions over images; unlabelled
    images (-1) keep theirs.

    Why quantiles: a target that should not depend on the group must rank a concept's images
    the same way whatever their group. Equal mass per *group* makes each rare image a
    several-times stronger target; equal *mean* mass per image lifts the rare group's best
    images as much as its worst. Quantile matching lifts the rare group's ambiguous images to
    where the common group's ambiguous images are, and keeps the order within a group.
    """
    labelled = (groups >= 0) & (concepts >= 0)
    if int(labelled.sum()) < 2:
        return p
    n_groups = int(groups.max()) + 1
    n_concepts = int(concepts.max()) + 1
    concept = torch.where(labelled, concepts, n_concepts)  # unlabelled: a segment of their own
    cell = torch.where(labelled, concepts * n_groups + groups, n_concepts * n_groups)
    cell_rank, _ = _rank_within(p, cell)
    _, pooled = _rank_within(p, concept)  # each row's values sorted by (concept, value)
    n_cell, n_concept = torch.bincount(cell)[cell], torch.bincount(concept)
    start = n_concept.cumsum(0) - n_concept
    quantile = (cell_rank.to(p.dtype) + 0.5) / n_cell.to(p.dtype)
    offset = (quantile * n_concept[concept].to(p.dtype)).long()
    offset = torch.minimum(offset, n_concept[concept] - 1)
    target = pooled.gather(1, start[concept] + offset)
    onehot = (concept[:, None] == torch.arange(n_concepts, device=p.device)[None]).to(p.dtype)
    factor = (p @ onehot) / (target @ onehot).clamp_min(1e-12)  # [rows, concepts]: keep mass
    return torch.where(labelled[None], target * (factor @ onehot.T), p)


@dataclass
class JointTrainer:
    """One optimiser step per batch of frozen raw features; holds the queues and EMA heads.

    The optimiser is Adam (the authors'; ``weight_decay > 0`` gives AdamW). ``grad_mean`` (DDP)
    maps the flat gradient of every rank to their mean, so identical copies stay equal.
    """

    heads: JointHeads
    lr: float = 5e-6
    weight_decay: float = 0.0
    loss: JointLossConfig = field(default_factory=JointLossConfig)
    grad_mean: Callable[[Tensor], Tensor] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.ema = copy.deepcopy(self.heads).requires_grad_(False)
        self.opt = torch.optim.AdamW(
            self.heads.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        self.generator = torch.Generator().manual_seed(self.seed)
        self.queue = FeatureQueue(self.loss.queue_size, self.loss.queue_init, self.generator)

    def coin(self) -> bool:
        """This batch's draw: does the text→image term use the counterfactual captions?"""
        return bool(torch.rand((), generator=self.generator) < self.loss.counterfactual_p)

    def losses(
        self,
        fv: Tensor,
        ft: Tensor,
        ftc: Tensor,
        epoch: int = 0,
        counterfactual: bool = False,
        groups: Tensor | None = None,
        concepts: Tensor | None = None,
        scale: float | None = None,
    ) -> dict[str, Tensor]:
        """``l_cd``, ``l_ba`` (joint variant) and ``loss`` for raw original features ``[B, D]``
        of the images, their factual captions and the counterfactual captions."""
        cfg = self.loss
        ov, ot = F.normalize(fv, dim=-1), F.normalize(ft, dim=-1)
        qv, qt = self.queue.features(ov)
        dv, dt = self.heads.encode_image(fv), self.heads.encode_text(ft)
        if cfg.target == "paper":
            momentum = None
            if epoch >= cfg.distill_from_epoch:
                with torch.no_grad():
                    momentum = (self.ema.encode_image(fv), self.ema.encode_text(ft))
            i2t, t2i = distillation_targets(ov, ot, qv, qt, cfg.tau, momentum, cfg.distill)
            dtext = self.heads.encode_text(ftc) if counterfactual else dt
            l_cd = 0.5 * (
                _soft_ce(i2t, dv @ torch.cat([ot, qt]).T / cfg.tau)
                + _soft_ce(t2i, dtext @ torch.cat([ov, qv]).T / cfg.tau)
            )
        else:
            if groups is None or concepts is None or scale is None:
                raise ValueError(
                    "target=balance_groups: needs groups, concepts and the logit scale"
                )
            l_cd = self._balanced_cd(fv, ft, ftc, dv, dt, groups, concepts, scale)
        out = {"l_cd": l_cd}
        if self.heads.variant == "joint":
            out["l_ba"] = bias_alignment(ov, ot, dv, dt, qv, qt, cfg.tau)
            out["loss"] = cfg.alpha * l_cd + (1 - cfg.alpha) * out["l_ba"]
        else:
            out["loss"] = l_cd
        return out

    def _balanced_cd(
        self,
        fv: Tensor,
        ft: Tensor,
        ftc: Tensor,
        dv: Tensor,
        dt: Tensor,
        groups: Tensor,
        concepts: Tensor,
        scale: float,
    ) -> Tensor:
        ov, ot, otc = (F.normalize(x, dim=-1) for x in (fv, ft, ftc))
        texts = torch.cat([dt, self.heads.encode_text(ftc)])  # captions, then counterfactuals
        # captions without group words (counterfactual == caption) must not prefer a group
        neutral = torch.cat([(ot - otc).norm(dim=-1) < 1e-6] * 2)
        with torch.no_grad():
            orig_texts = torch.cat([ot, otc])
            ev = self.ema.encode_image(fv)
            ema_texts = torch.cat([self.ema.encode_text(ft), self.ema.encode_text(ftc)])
            mix, w = 1 - self.loss.distill, self.loss.distill
            i2t = mix * (scale * ov @ orig_texts.T).softmax(-1) + w * (
                scale * ev @ ema_texts.T
            ).softmax(-1)
            t2i = mix * (scale * orig_texts @ ov.T).softmax(-1) + w * (
                scale * ema_texts @ ev.T
            ).softmax(-1)
            t2i = torch.where(neutral[:, None], balance_groups(t2i, groups, concepts), t2i)
        return 0.5 * (_kl(i2t, scale * dv @ texts.T) + _kl(t2i, scale * texts @ dv.T))

    def step(
        self,
        fv: Tensor,
        ft: Tensor,
        ftc: Tensor,
        epoch: int = 0,
        groups: Tensor | None = None,
        concepts: Tensor | None = None,
        scale: float | None = None,
    ) -> dict[str, float]:
        """One update on a batch of raw original features (image, caption, counterfactual)."""
        fv, ft, ftc = (x.detach().float() for x in (fv, ft, ftc))
        self.heads.train()
        out = self.losses(fv, ft, ftc, epoch, self.coin(), groups, concepts, scale)
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if self.grad_mean is not None:
            params = [p for p in self.heads.parameters() if p.grad is not None]
            flat = self.grad_mean(torch.cat([p.grad.reshape(-1) for p in params]))
            for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
                p.grad.copy_(g.view_as(p))
        self.opt.step()
        with torch.no_grad():
            m = self.loss.momentum
            for pe, p in zip(self.ema.parameters(), self.heads.parameters(), strict=True):
                pe.mul_(m).add_(p.detach(), alpha=1 - m)
        self.queue.push(F.normalize(fv, dim=-1), F.normalize(ft, dim=-1))
        return {k: float(v.detach()) for k, v in out.items()}
