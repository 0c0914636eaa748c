"""Joint vision-language bias removal heads (Zhang, Guo, Kankanhalli, CVPR 2025).

Why two small MLPs on a frozen CLIP: debiasing should not cost a full fine-tune, and the text
and image sides must remove the *same* bias. Text: ``t̃ = f_t + MLP2(f_t)``; image:
``ṽ = f_v + MLP2(f_v + MLP1(f_v))`` with MLP2 shared (MLP1 maps image features toward the text
side first). Both are :class:`~fairclip.debias.debiased_clip.Intervention`\\ s (``joint_text``,
``joint_image``) so a :class:`DebiasedCLIP` carries them; on disk each holds its own copy of
MLP2. The last layer of each MLP starts at zero: untrained heads are the identity.

Losses, on frozen (normalised) features of labelled image-caption pairs:

* ``L_ba`` (bias alignment): bias vectors ``b = norm(f) − norm(f̃)``;
  ``KL(softmax(b_t·Q_tᵀ/τ) ‖ softmax(b_v·Q_vᵀ/τ))`` against paired FIFO queues of original
  text/image features (τ = 0.07): the text head removes what the image head removes.
* ``L_cd`` (counterfactual distillation): each caption gets a counterfactual with the group
  words swapped (woman↔man, configurable lexicon, swapped at token level). Targets come from
  the original model, mixed with a momentum (EMA) copy of the heads as in ALBEF: image→text
  over {caption, counterfactual} uses the group-neutral caption (mean of both), text→image
  rebalances each group-neutral caption's target so that, within every concept, each group's
  images get the same distribution of mass (quantile matching, :func:`balance_groups`;
  labelled images only). The debiased similarities of both caption versions are trained
  toward these targets, so group words and group looks stop moving the similarity while the
  concept ranking of the original model is kept.
* ``L = α L_cd + (1 − α) L_ba`` (α = 0.3). Image-only / text-only ablations drop ``L_ba``.

:func:`fit_joint_heads` fits them after training (CLIP frozen) and keeps the epoch with the
best ABLE = 2/(1/acc + 1/exp(−MaxSkew)) on a selection split (a held-out one when given);
``build_joint*`` are the comparison-table builders;
:class:`fairclip.callbacks.joint.JointHeadsCallback` fits them during or at the end of
fine-tuning.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairclip.data.batches import iter_batches
from fairclip.debias.debiased_clip import DebiasedCLIP, Intervention

log = logging.getLogger(__name__)

DEFAULT_SWAPS: dict[str, str] = {
    "woman": "man",
    "women": "men",
    "female": "male",
    "girl": "boy",
    "she": "he",
    "her": "his",
    "mother": "father",
}
# model -> evaluation report (evaluate_model with its splits bound)
Evaluator = Callable[[nn.Module], Mapping[str, Any]]

VARIANTS = ("joint", "image", "text")


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


class JointTextHead(Intervention):
    """``t̃ = f_t + MLP2(f_t)`` on the unit-normalised text feature (output ≈ unit scale)."""

    kind = "joint_text"

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__(dim=int(dim), hidden=int(hidden))
        self.mlp2 = _mlp(dim, hidden)

    def forward(self, emb: Tensor) -> Tensor:
        f = F.normalize(emb, dim=-1)
        return f + self.mlp2(f)


class JointImageHead(Intervention):
    """``ṽ = f_v + MLP2(f_v + MLP1(f_v))`` on the unit-normalised image feature."""

    kind = "joint_image"

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__(dim=int(dim), hidden=int(hidden))
        self.mlp1 = _mlp(dim, hidden)
        self.mlp2 = _mlp(dim, hidden)

    def forward(self, emb: Tensor) -> Tensor:
        f = F.normalize(emb, dim=-1)
        return f + self.mlp2(f + self.mlp1(f))


class JointHeads(nn.Module):
    """The trainable pair (or one side for the ablations), MLP2 shared in the joint variant."""

    def __init__(self, dim: int, hidden: int = 256, variant: str = "joint") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r}: expected one of {VARIANTS}")
        self.variant = variant
        self.text = JointTextHead(dim, hidden) if variant in ("joint", "text") else None
        self.image = JointImageHead(dim, hidden) if variant in ("joint", "image") else None
        if self.text is not None and self.image is not None:
            self.image.mlp2 = self.text.mlp2  # shared MLP2 (Zhang et al.)

    def encode(self, fv: Tensor, ft: Tensor) -> tuple[Tensor, Tensor]:
        """Unit debiased (image, text) features from unit original features."""
        v = self.image(fv) if self.image is not None else fv
        t = self.text(ft) if self.text is not None else ft
        return F.normalize(v, dim=-1), F.normalize(t, dim=-1)

    def interventions(self) -> tuple[list[Intervention], list[Intervention]]:
        """(text, image) intervention lists for a DebiasedCLIP (independent copies)."""
        text = [copy.deepcopy(self.text).eval()] if self.text is not None else []
        image = [copy.deepcopy(self.image).eval()] if self.image is not None else []
        return text, image


# -- counterfactual captions -------------------------------------------------------------------


class TokenSwapper:
    """Swap group words in tokenised captions (both directions of every lexicon pair).

    Why token level: training batches arrive tokenised; open_clip's BPE gives common words
    one token (``woman</w>``), so a swap is an id lookup, vectorised over the batch.
    """

    def __init__(self, tokenizer: Any, swaps: Mapping[str, str] | None = None) -> None:
        swaps = dict(DEFAULT_SWAPS if swaps is None else swaps)
        encode = getattr(tokenizer, "encode", None)
        if encode is None:
            raise TypeError(f"{type(tokenizer).__name__}: expected an open_clip SimpleTokenizer")
        table: dict[int, int] = {}
        for a, b in swaps.items():
            ia, ib = encode(a), encode(b)
            if len(ia) != 1 or len(ib) != 1:
                log.warning("swap %r<->%r skipped: not single tokens (%s, %s)", a, b, ia, ib)
                continue
            table[ia[0]], table[ib[0]] = ib[0], ia[0]
        if not table:
            raise ValueError(f"swap lexicon {swaps}: no pair tokenises to single tokens")
        size = max(table) + 1
        self.lut = torch.arange(size)
        self.lut[list(table)] = torch.tensor(list(table.values()))

    def __call__(self, tokens: Tensor) -> Tensor:
        lut = self.lut.to(tokens.device)
        inside = tokens < lut.numel()
        return torch.where(inside, lut[tokens.clamp(max=lut.numel() - 1)], tokens)


# -- losses ------------------------------------------------------------------------------------


def _kl(target: Tensor, logits: Tensor) -> Tensor:
    """Mean over rows of KL(target ‖ softmax(logits))."""
    logp = logits.log_softmax(-1)
    return (target * (target.clamp_min(1e-12).log() - logp)).sum(-1).mean()


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
    the same way whatever their group. Equal mass per *group* made each rare image (2 female
    doctors among 8 male ones) a several-times stronger target, and the heads put every female
    doctor above every male doctor; equal *mean* mass per image lifted the rare group's best
    images as much as its worst, so the top of the ranking stayed one-sided. Quantile matching
    lifts the rare group's ambiguous images to where the common group's ambiguous images are,
    and keeps the order within a group.
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
class JointLossConfig:
    """Loss knobs (paper defaults)."""

    alpha: float = 0.3
    tau: float = 0.07
    queue_size: int = 1024
    distill: float = 0.4  # weight of the momentum model in the targets
    momentum: float = 0.995


@dataclass
class JointTrainer:
    """One optimiser step per batch of frozen features; holds queues and the EMA heads."""

    heads: JointHeads
    lr: float = 1e-3
    weight_decay: float = 1e-4
    loss: JointLossConfig = field(default_factory=JointLossConfig)
    # DDP: maps the flat gradient of every rank to their mean, so identical copies stay equal
    grad_mean: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        self.ema = copy.deepcopy(self.heads).requires_grad_(False)
        self.opt = torch.optim.AdamW(
            self.heads.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        self.queue_t: Tensor | None = None
        self.queue_v: Tensor | None = None

    def _enqueue(self, ft: Tensor, fv: Tensor) -> None:
        keep = self.loss.queue_size
        self.queue_t = ft if self.queue_t is None else torch.cat([ft, self.queue_t])[:keep]
        self.queue_v = fv if self.queue_v is None else torch.cat([fv, self.queue_v])[:keep]

    def losses(
        self, fv: Tensor, ft: Tensor, ftc: Tensor, groups: Tensor, concepts: Tensor, scale: float
    ) -> dict[str, Tensor]:
        """``L_cd``, ``L_ba`` and the total for unit original features ``[B, D]``."""
        cfg = self.loss
        v, t = self.heads.encode(fv, ft)
        _, tc = self.heads.encode(fv, ftc)
        texts = torch.cat([t, tc])  # [2B, D]: captions, then their counterfactuals
        # captions without group words (counterfactual == caption) must not prefer a group
        neutral = torch.cat([(ft - ftc).norm(dim=-1) < 1e-6] * 2)
        with torch.no_grad():
            orig_texts = torch.cat([ft, ftc])
            ev, et = self.ema.encode(fv, ft)
            _, etc = self.ema.encode(fv, ftc)
            ema_texts = torch.cat([et, etc])
            mix = 1 - cfg.distill
            i2t = mix * (scale * fv @ orig_texts.T).softmax(-1) + cfg.distill * (
                scale * ev @ ema_texts.T
            ).softmax(-1)
            t2i = mix * (scale * orig_texts @ fv.T).softmax(-1) + cfg.distill * (
                scale * ema_texts @ ev.T
            ).softmax(-1)
            t2i = torch.where(neutral[:, None], balance_groups(t2i, groups, concepts), t2i)
        l_cd = 0.5 * (_kl(i2t, scale * v @ texts.T) + _kl(t2i, scale * texts @ v.T))
        out = {"l_cd": l_cd}
        if self.heads.variant == "joint":
            qt = ft if self.queue_t is None else torch.cat([ft, self.queue_t])
            qv = fv if self.queue_v is None else torch.cat([fv, self.queue_v])
            b_t, b_v = ft - t, fv - v
            p_t = (b_t @ qt.T / cfg.tau).softmax(-1)
            out["l_ba"] = _kl(p_t, b_v @ qv.T / cfg.tau)
            out["loss"] = cfg.alpha * l_cd + (1 - cfg.alpha) * out["l_ba"]
        else:
            out["loss"] = l_cd
        return out

    def step(
        self, fv: Tensor, ft: Tensor, ftc: Tensor, groups: Tensor, concepts: Tensor, scale: float
    ) -> dict[str, float]:
        """One update on a batch of pairs; ``groups``/``concepts`` label the images (-1 unknown)."""
        fv, ft, ftc = (F.normalize(x.float(), dim=-1) for x in (fv, ft, ftc))
        self.heads.train()
        out = self.losses(fv, ft, ftc, groups, concepts, scale)
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
        self._enqueue(ft.detach(), fv.detach())
        return {k: float(v.detach()) for k, v in out.items()}


# -- frozen-feature evaluation -----------------------------------------------------------------


class _CachedEncoder(nn.Module):
    """A frozen CLIP whose embeddings are cached by input bytes, plus heads on top.

    Why: selecting the epoch re-evaluates the same eval split many times; the frozen tower's
    output never changes, so only the (tiny) heads run again.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.cache: dict[tuple[str, bytes], Tensor] = {}
        self.heads: JointHeads | None = None

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale

    def _base(self, kind: str, x: Tensor) -> Tensor:
        key = (kind, hashlib.blake2b(x.detach().cpu().numpy().tobytes(), digest_size=16).digest())
        if key not in self.cache:
            fn = self.model.encode_image if kind == "image" else self.model.encode_text
            self.cache[key] = F.normalize(fn(x).float(), dim=-1)
        return self.cache[key]

    def encode_image(self, x: Tensor, normalize: bool = False) -> Tensor:
        f = self._base("image", x)
        if self.heads is not None and self.heads.image is not None:
            f = self.heads.image(f)
        return F.normalize(f, dim=-1)

    def encode_text(self, x: Tensor, normalize: bool = False) -> Tensor:
        f = self._base("text", x)
        if self.heads is not None and self.heads.text is not None:
            f = self.heads.text(f)
        return F.normalize(f, dim=-1)


def able_key(spec: Any, attribute: str = "gender") -> str:
    """The report key (``metrics.able``) used for epoch selection, e.g. ``able@10/gender/eq_opp``."""
    return f"able@{spec.skew_ks[0]}/{attribute}/eq_opp"


SELECT_KEY = "able@depths"


def headline(report: Mapping[str, Any], spec: Any, attribute: str = "gender") -> dict[str, float]:
    """acc, MaxSkew@k, ABLE, recall@k and Cramér's V of one report (NaN where absent), k the
    first of ``spec.skew_ks``; plus :data:`SELECT_KEY`, the selection score of joint heads: ABLE
    averaged over every k of ``spec.skew_ks``.

    Why all depths: at one deep k (e.g. a whole concept of the eval split) any order within a
    concept is balanced, so heads chosen there alone can put the counter-stereotypical images
    at the top and raise the skew at small k.
    """
    m = report["metrics"]
    k = spec.skew_ks[0]
    qs = spec.able_query_set or "concepts"
    able = m.get("able", {})
    depths = [able.get(f"able@{d}/{attribute}/eq_opp", math.nan) for d in spec.skew_ks]
    out = {
        "acc": m.get("zeroshot", {}).get("acc", math.nan),
        f"maxskew@{k}": m.get("skew", {})
        .get(qs, {})
        .get(f"maxskew@{k}/{attribute}/eq_opp", math.nan),
        f"able@{k}": able.get(able_key(spec, attribute), math.nan),
        SELECT_KEY: sum(depths) / len(depths),
        f"cramers_v/{attribute}": m.get("bias", {}).get(f"cramers_v/{attribute}", math.nan),
    }
    for name, value in m.get("retrieval", {}).items():
        out[f"retrieval/{name}"] = value
    return out


# -- post-hoc trainer --------------------------------------------------------------------------


@torch.no_grad()
def encode_pairs(
    model: nn.Module,
    tokenizer: Any,
    preprocess: Callable,
    shards: Any,
    attributes: Mapping[str, Sequence[str]],
    concepts: Sequence[str],
    attribute: str = "gender",
    swaps: Mapping[str, str] | None = None,
    max_samples: int | None = None,
    batch_size: int = 256,
) -> dict[str, Tensor]:
    """Unit original features of the labelled captioned pairs of ``shards``: ``fv``, ``ft``,
    ``ftc`` (counterfactual captions), ``groups`` (index of ``attribute``, -1 unknown) and
    ``concepts`` (concept index)."""
    swapper = TokenSwapper(tokenizer, swaps)
    column = list(attributes).index(attribute)
    out: dict[str, list[Tensor]] = {"fv": [], "ft": [], "ftc": [], "groups": [], "concepts": []}
    device = next(model.parameters()).device
    model.eval()
    for batch in iter_batches(
        shards, preprocess, tokenizer, attributes, concepts, batch_size, max_samples
    ):
        keep = batch["has_text"] & (batch["concept"] >= 0)
        if not bool(keep.any()):
            continue
        tokens = batch["text"][keep].to(device)
        image = batch["image"][keep].to(device)
        out["fv"].append(F.normalize(model.encode_image(image).float(), dim=-1))
        out["ft"].append(F.normalize(model.encode_text(tokens).float(), dim=-1))
        out["ftc"].append(F.normalize(model.encode_text(swapper(tokens)).float(), dim=-1))
        out["groups"].append(batch["groups"][keep][:, column].to(device))
        out["concepts"].append(batch["concept"][keep].to(device))
    if not out["fv"]:
        raise ValueError(f"{shards!r}: no labelled image-caption pairs")
    return {k: torch.cat(v) for k, v in out.items()}


def fit_joint_heads(
    model: nn.Module,
    tokenizer: Any,
    preprocess: Callable,
    train_shards: Any,
    attributes: Mapping[str, Sequence[str]],
    concepts: Sequence[str],
    spec: Any = None,
    evaluate: Evaluator | None = None,
    variant: str = "joint",
    attribute: str = "gender",
    swaps: Mapping[str, str] | None = None,
    epochs: int = 10,
    batch_size: int = 256,
    hidden: int = 256,
    lr: float = 1e-3,
    loss: JointLossConfig | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    pairs: Mapping[str, Tensor] | None = None,
) -> tuple[JointHeads, list[dict[str, float]]]:
    """Fit joint heads on a frozen CLIP; with ``spec`` and ``evaluate`` (a model -> report
    function over the selection split, e.g. ``evaluate_model`` with its split bound), keep the
    epoch with the best ABLE averaged over ``spec.skew_ks`` (:func:`headline`), else the last.
    ``pairs`` (from :func:`encode_pairs`) skips re-encoding ``train_shards`` when several
    variants are fitted. Returns (heads, history)."""
    torch.manual_seed(seed)
    data = pairs or encode_pairs(
        model, tokenizer, preprocess, train_shards, attributes, concepts, attribute, swaps,
        max_samples,
    )  # fmt: skip
    n, dim = data["fv"].shape
    heads = JointHeads(dim, hidden, variant).to(data["fv"].device)
    trainer = JointTrainer(heads, lr=lr, loss=loss or JointLossConfig())
    scale = float(model.logit_scale.detach().exp())
    if (spec is None) != (evaluate is None):
        raise ValueError(
            "fit_joint_heads: give both spec and evaluate (epoch selection) or neither"
        )
    cached = _CachedEncoder(model) if spec is not None else None
    history: list[dict[str, float]] = []
    best_state, best = copy.deepcopy(heads.state_dict()), -math.inf
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen).to(data["fv"].device)
        sums: dict[str, float] = {}
        steps = 0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            if idx.numel() < 2:
                continue
            out = trainer.step(
                *(data[k][idx] for k in ("fv", "ft", "ftc", "groups", "concepts")), scale
            )
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
        row = {"epoch": float(epoch), **{k: v / max(steps, 1) for k, v in sums.items()}}
        if cached is not None:
            row.update(evaluate_heads(cached, heads, evaluate, spec, attribute))
            score = row[SELECT_KEY]
            if score > best:
                best, best_state = score, copy.deepcopy(heads.state_dict())
        history.append(row)
        log.info("joint heads epoch %d: %s", epoch, row)
    if cached is not None:
        heads.load_state_dict(best_state)
    heads.eval()
    return heads, history


def evaluate_heads(
    cached: _CachedEncoder,
    heads: JointHeads,
    evaluate: Evaluator,
    spec: Any,
    attribute: str = "gender",
) -> dict[str, float]:
    """Headline metrics of the frozen model + ``heads`` (cached base features)."""
    cached.heads = heads.eval()
    try:
        report = evaluate(cached)
    finally:
        cached.heads = None
    return headline(report, spec, attribute)


# -- comparison-table builders -----------------------------------------------------------------


def _build(bundle: Any, context: Mapping[str, Any], variant: str, **settings: Any) -> DebiasedCLIP:
    spec = context.get("spec")
    if "train_shards" not in context or (
        spec is None and not (context.get("attributes") and context.get("concepts"))
    ):
        raise ValueError(
            "joint heads context: expected 'train_shards' and 'attributes'+'concepts' or 'spec', "
            f"got keys {sorted(context)}"
        )
    evaluate = context.get("select_evaluate") if spec is not None else None
    heads, _ = fit_joint_heads(
        bundle.model,
        bundle.tokenizer,
        bundle.preprocess_val,
        context["train_shards"],
        context.get("attributes") or spec.attributes,
        context.get("concepts") or spec.concepts,
        spec=spec if evaluate is not None else None,
        evaluate=evaluate,
        variant=variant,
        attribute=context.get("attribute", "gender"),
        swaps=settings["swaps"],
        epochs=int(settings["epochs"]),
        hidden=int(settings["hidden"]),
        lr=float(settings["lr"]),
        loss=JointLossConfig(
            alpha=float(settings["alpha"]),
            tau=float(settings["tau"]),
            queue_size=int(settings["queue_size"]),
        ),
        max_samples=settings["max_samples"],
        seed=int(context.get("seed", 0)),
    )
    text, image = heads.interventions()
    return DebiasedCLIP(bundle.model, bundle.name, text=text, image=image)


def build_joint(
    bundle: Any,
    context: Mapping[str, Any],
    epochs: int = 10,
    hidden: int = 256,
    lr: float = 1e-3,
    alpha: float = 0.3,
    tau: float = 0.07,
    queue_size: int = 1024,
    max_samples: int | None = None,
    swaps: Mapping[str, str] | None = None,
) -> DebiasedCLIP:
    """Comparison builder: joint text + image heads fitted on a frozen ``bundle.model``.

    ``context`` (the method context or a plain mapping): ``train_shards`` (labelled,
    captioned) and ``attributes``/``concepts`` or ``spec`` (EvalSpec) required; ``spec`` +
    ``select_evaluate`` (model -> report on the selection split, which the comparison
    provides) turn on best-epoch selection by ABLE; optional ``attribute``, ``seed``. The
    settings are conf/methods/joint_vl.yaml's.
    """
    return _build(bundle, context, "joint", **_settings(locals()))


def build_joint_image_only(
    bundle: Any, context: Mapping[str, Any], **settings: Any
) -> DebiasedCLIP:
    """Ablation: image head only (same context and settings as :func:`build_joint`)."""
    return _build(bundle, context, "image", **_settings({**_DEFAULTS, **settings}))


def build_joint_text_only(bundle: Any, context: Mapping[str, Any], **settings: Any) -> DebiasedCLIP:
    """Ablation: text head only (same context and settings as :func:`build_joint`)."""
    return _build(bundle, context, "text", **_settings({**_DEFAULTS, **settings}))


def _settings(values: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(values) - set(_DEFAULTS) - {"bundle", "context"}
    if unknown:
        raise TypeError(
            f"joint heads: unknown settings {sorted(unknown)}; known: {sorted(_DEFAULTS)}"
        )
    return {k: values[k] for k in _DEFAULTS}


_DEFAULTS = {
    k: p.default
    for k, p in inspect.signature(build_joint).parameters.items()
    if k not in ("bundle", "context")
}
