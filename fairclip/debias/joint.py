"""Fit the joint vision-language bias removal heads (Zhang, Guo, Kankanhalli, CVPR 2025) on a
frozen CLIP, select the epoch as the paper does, and build them for the comparison table.

The heads are :mod:`fairclip.debias.joint_heads`, the losses :mod:`fairclip.debias.joint_loss`,
the training pairs (attribute captions and counterfactuals) :mod:`fairclip.debias.joint_pairs`.

Selection (the authors' ``train.py``): every ``every`` epochs (2) the heads are scored on the
selection split by ABLE = 2 / (1/acc + 1/exp(−MaxSkew@k)), k the first of the spec's
``skew_ks`` (1000 under ``protocol=joint2025``); the best scoring heads are kept and training
stops after ``patience`` (10) evaluations without a better score. ``score=able_depths`` (this
project's extension) averages ABLE over every k of ``skew_ks`` instead: at one deep k any
order within a concept is balanced, so heads chosen there alone can put counter-stereotypical
images at the top and raise the skew at small k. A selection split without zero-shot
accuracy (no concepts, e.g. FairFace) scores exp(−MaxSkew@k) alone, and says so.

:class:`fairclip.callbacks.joint.JointHeadsCallback` fits them during or at the end of
fine-tuning.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairclip.data.attribute_captions import AttributeCaptions
from fairclip.debias.debiased_clip import DebiasedCLIP
from fairclip.debias.joint_heads import JointHeads
from fairclip.debias.joint_loss import JointLossConfig, JointTrainer
from fairclip.debias.joint_pairs import PairFeatures, encode_pairs

log = logging.getLogger(__name__)

# model -> evaluation report (evaluate_model with its splits bound)
Evaluator = Callable[[nn.Module], Mapping[str, Any]]

SCORES = ("able", "able_depths")
DEPTHS_KEY = "able@depths"


@dataclass
class Selection:
    """Epoch selection and early stopping (the authors' defaults)."""

    score: str = "able"  # able: ABLE at skew_ks[0] | able_depths: mean over skew_ks (extension)
    every: int = 2  # evaluate every this many epochs
    patience: int = 10  # stop after this many evaluations without a better score

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"joint heads select.score={self.score!r}: expected one of {SCORES}")
        if self.every < 1 or self.patience < 1:
            raise ValueError(
                f"joint heads select.every={self.every}, patience={self.patience}: expected >= 1"
            )


@dataclass
class JointFitConfig:
    """Heads and optimisation; the defaults are the paper's (the authors' ``train.py``)."""

    variant: str = "joint"  # joint | image | text (ablations)
    form: str = "paper"  # paper | zero_init (extension)
    hidden: int = 1024  # MLP2 width
    hidden_image: int = 512  # MLP1 width
    epochs: int = 100
    batch_size: int = 512
    lr: float = 5e-6
    weight_decay: float = 0.0
    seed: int = 0
    select: Selection = field(default_factory=Selection)
    loss: JointLossConfig = field(default_factory=JointLossConfig)


def config_from(cls: type, raw: Mapping[str, Any] | None, key: str) -> Any:
    """``cls(**raw)`` for a config dataclass, with an error that names the config key."""
    try:
        return cls(**dict(raw or {}))
    except TypeError as err:
        names = sorted(cls.__dataclass_fields__)  # type: ignore[attr-defined]
        raise ValueError(f"{key}: {err}; expected keys among {names}") from err


class _CachedEncoder(nn.Module):
    """A frozen CLIP whose raw embeddings are cached by input bytes, plus heads on top.

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
            self.cache[key] = fn(x).float()
        return self.cache[key]

    def encode_image(self, x: Tensor, normalize: bool = False) -> Tensor:
        f = self._base("image", x)
        return self.heads.encode_image(f) if self.heads is not None else F.normalize(f, dim=-1)

    def encode_text(self, x: Tensor, normalize: bool = False) -> Tensor:
        f = self._base("text", x)
        return self.heads.encode_text(f) if self.heads is not None else F.normalize(f, dim=-1)


def headline(report: Mapping[str, Any], spec: Any, attribute: str = "gender") -> dict[str, float]:
    """acc, MaxSkew@k, ABLE@k, Cramér's V and recall of one report (NaN where absent), k the
    first of ``spec.skew_ks``; plus :data:`DEPTHS_KEY`, ABLE averaged over every k."""
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
        f"able@{k}": able.get(f"able@{k}/{attribute}/eq_opp", math.nan),
        DEPTHS_KEY: sum(depths) / len(depths),
        f"cramers_v/{attribute}": m.get("bias", {}).get(f"cramers_v/{attribute}", math.nan),
    }
    for name, value in m.get("retrieval", {}).items():
        out[f"retrieval/{name}"] = value
    return out


def selection_score(row: Mapping[str, float], spec: Any, select: Selection) -> tuple[float, str]:
    """(score, what it is) of one evaluated epoch: ABLE as configured, or exp(−MaxSkew@k)
    where the split gives no accuracy."""
    k = spec.skew_ks[0]
    key = f"able@{k}" if select.score == "able" else DEPTHS_KEY
    score = row.get(key, math.nan)
    if math.isnan(score) and math.isnan(row.get("acc", math.nan)):
        skew = row.get(f"maxskew@{k}", math.nan)
        return math.exp(-skew) if not math.isnan(skew) else math.nan, f"exp(-maxskew@{k})"
    return score, key


class EarlyStopping:
    """Keeps the best score's state; says when ``patience`` evaluations brought none better."""

    def __init__(self, select: Selection) -> None:
        self.select = select
        self.best = -math.inf
        self.best_state: Any = None
        self.stale = 0
        self.warned = False

    def due(self, epoch: int) -> bool:
        """Is epoch ``epoch`` (0-based) an evaluation epoch?"""
        return (epoch + 1) % self.select.every == 0

    def update(self, score: float, what: str, state: Callable[[], Any]) -> bool:
        """Record one evaluation; True when training should stop."""
        if what.startswith("exp(") and not self.warned:
            log.warning(
                "joint heads: the selection split gives no zero-shot accuracy (no concepts), so "
                "epochs are selected by %s alone, not ABLE",
                what,
            )
            self.warned = True
        if not math.isnan(score) and score > self.best:
            self.best, self.best_state, self.stale = score, state(), 0
        else:
            self.stale += 1
        return self.stale >= self.select.patience


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


def fit_joint_heads(
    model: nn.Module,
    pairs: PairFeatures,
    fit: JointFitConfig | None = None,
    spec: Any = None,
    evaluate: Evaluator | None = None,
    attribute: str = "gender",
) -> tuple[JointHeads, list[dict[str, float]]]:
    """Fit joint heads on the frozen ``model``'s ``pairs`` (:func:`encode_pairs`); with
    ``spec`` and ``evaluate`` (a model -> report function over the selection split), select
    the epoch and stop early as the module docstring says, else keep the last. Returns
    (heads, history)."""
    fit = fit or JointFitConfig()
    if (spec is None) != (evaluate is None):
        raise ValueError(
            "fit_joint_heads: give both spec and evaluate (epoch selection) or neither"
        )
    torch.manual_seed(fit.seed)
    n, dim = pairs.fv.shape
    device = pairs.fv.device
    heads = JointHeads(dim, fit.hidden, fit.variant, fit.hidden_image, fit.form).to(device)
    trainer = JointTrainer(heads, fit.lr, fit.weight_decay, fit.loss, seed=fit.seed)
    scale = float(model.logit_scale.detach().exp())
    cached = _CachedEncoder(model) if spec is not None else None
    stopping = EarlyStopping(fit.select)
    history: list[dict[str, float]] = []
    gen = torch.Generator().manual_seed(fit.seed)
    for epoch in range(fit.epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        sums: dict[str, float] = {}
        steps = 0
        for start in range(0, n, fit.batch_size):
            idx = perm[start : start + fit.batch_size]
            if idx.numel() < 2:
                continue
            fv, ft, ftc, groups, concepts = pairs.batch(idx, gen)
            out = trainer.step(fv, ft, ftc, epoch, groups, concepts, scale)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
        row = {"epoch": float(epoch), "pairs": float(n)}
        row.update({k: v / max(steps, 1) for k, v in sums.items()})
        stop = False
        if cached is not None and stopping.due(epoch):
            row.update(evaluate_heads(cached, heads, evaluate, spec, attribute))  # type: ignore[arg-type]
            row["score"], what = selection_score(row, spec, fit.select)
            stop = stopping.update(row["score"], what, lambda: copy.deepcopy(heads.state_dict()))
        history.append(row)
        log.info("joint heads epoch %d: %s", epoch, row)
        if stop:
            log.info(
                "joint heads: early stop after epoch %d (%d evaluations without a better score)",
                epoch,
                fit.select.patience,
            )
            break
    if stopping.best_state is not None:
        heads.load_state_dict(stopping.best_state)
    heads.eval()
    return heads, history


# -- comparison-table builders -----------------------------------------------------------------


def _build(bundle: Any, context: Mapping[str, Any], variant: str, **settings: Any) -> DebiasedCLIP:
    spec = context.get("spec")
    if "train_shards" not in context or (
        spec is None and not (context.get("attributes") and context.get("concepts") is not None)
    ):
        raise ValueError(
            "joint heads context: expected 'train_shards' and 'attributes'+'concepts' or 'spec', "
            f"got keys {sorted(context)}"
        )
    attributes = context.get("attributes") or spec.attributes
    concepts = context.get("concepts") or spec.concepts
    attribute = context.get("attribute", "gender")
    captions = (
        AttributeCaptions.from_config(settings["captions"], attributes, "methods.joint.captions")
        if settings["captions"] is not None
        else None
    )
    loss = config_from(JointLossConfig, settings["loss"], "methods.joint.build.loss")
    pairs = encode_pairs(
        bundle.model, bundle.tokenizer, bundle.preprocess_val, context["train_shards"],
        attributes, concepts, attribute, settings["swaps"], settings["max_samples"],
        captions=captions, need_concepts=loss.target == "balance_groups",
    )  # fmt: skip
    fit = JointFitConfig(
        variant=variant,
        form=settings["form"],
        hidden=int(settings["hidden"]),
        hidden_image=int(settings["hidden_image"]),
        epochs=int(settings["epochs"]),
        batch_size=int(settings["batch_size"]),
        lr=float(settings["lr"]),
        seed=int(context.get("seed", 0)),
        select=config_from(Selection, settings["select"], "methods.joint.build.select"),
        loss=loss,
    )
    evaluate = context.get("select_evaluate") if spec is not None else None
    heads, _ = fit_joint_heads(
        bundle.model, pairs, fit, spec if evaluate is not None else None, evaluate, attribute
    )
    text, image = heads.interventions()
    return DebiasedCLIP(bundle.model, bundle.name, text=text, image=image)


def build_joint(
    bundle: Any,
    context: Mapping[str, Any],
    epochs: int = 100,
    batch_size: int = 512,
    hidden: int = 1024,
    hidden_image: int = 512,
    form: str = "paper",
    lr: float = 5e-6,
    loss: Mapping[str, Any] | None = None,
    select: Mapping[str, Any] | None = None,
    max_samples: int | None = None,
    captions: Mapping[str, Any] | None = None,
    swaps: Mapping[str, str] | None = None,
) -> DebiasedCLIP:
    """Comparison builder: joint text + image heads fitted on a frozen ``bundle.model``.

    ``context`` (the method context or a plain mapping): ``train_shards`` and
    ``attributes``/``concepts`` or ``spec`` (EvalSpec) required; ``spec`` + ``select_evaluate``
    (model -> report on the selection split, which the comparison provides) turn on epoch
    selection; optional ``attribute``, ``seed``. ``captions`` ({template, words[, swap]}) trains
    on attribute captions, else on the shards' captions with ``swaps``. ``loss`` and
    ``select`` are :class:`JointLossConfig` and :class:`Selection` fields. The settings are
    conf/methods/joint_vl.yaml's.
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
    out = {k: values[k] for k in _DEFAULTS}
    out["loss"], out["select"] = dict(out["loss"] or {}), dict(out["select"] or {})
    return out


_DEFAULTS = {
    k: p.default
    for k, p in inspect.signature(build_joint).parameters.items()
    if k not in ("bundle", "context")
}
