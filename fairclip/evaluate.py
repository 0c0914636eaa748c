"""`fairclip-eval`: bias evaluation of any CLIP-like model on labelled WebDataset shards.

Why a single :func:`evaluate_model` that only calls ``encode_image(x, normalize=True)`` and
``encode_text(tokens, normalize=True)``: pretrained open_clip models, fairclip runs and
debiasing wrappers (e.g. a DebiasedCLIP) are then judged by the same code and numbers.
Each split is encoded once, batch by batch; every metric is a torchmetrics object fed per
batch, so the same code runs in one process (this CLI) or on every DDP rank (the bias-eval
callback), with the states synced in ``compute``.

Splits (DESIGN.md): ``eval`` holds labelled images (group attributes, concepts for zero-shot
accuracy, captions for recall); ``neutral`` holds people without a concept, for association
tests (stereotype queries, model RB/AB, Cramér's V). Query sets (``conf/prompts``) name the
split they rank.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torchmetrics import Metric
from tqdm import tqdm

from fairclip.data.samples import CaptionCollate, SampleDecoder
from fairclip.data.shards import list_shards
from fairclip.data.stream import ShardStream, stream_loader
from fairclip.metrics import (
    TARGETS,
    CramersV,
    GroupZeroShotAccuracy,
    ModelBias,
    RetrievalRecall,
    SkewMetrics,
    able,
    validate_attributes,
)
from fairclip.metrics.zeroshot import check_ks
from fairclip.report.io import REPORT_SCHEMA
from fairclip.runtime import CONF_DIR, stable_id

log = logging.getLogger(__name__)

SPLITS = ("eval", "neutral")


# -- specification ----------------------------------------------------------------------------
@dataclass(frozen=True)
class QuerySet:
    """Retrieval queries ranked over one split; skew is measured for ``attributes``."""

    name: str
    split: str
    prompts: tuple[str, ...]
    attributes: tuple[str, ...]


@dataclass
class EvalSpec:
    """Everything :func:`evaluate_model` measures, validated once with config-key errors."""

    attributes: dict[str, list[str]]
    concepts: list[str]
    zero_shot_templates: list[str]
    group_prompts: dict[str, dict[str, list[str]]]
    association_words: list[str]
    association_templates: list[str]
    query_sets: list[QuerySet]
    skew_ks: tuple[int, ...] = (10, 50)
    recall_ks: tuple[int, ...] = (1, 5, 10)
    targets: tuple[str, ...] = TARGETS
    able_query_set: str | None = None
    require_all_groups: bool = True
    label_key: str = "concept"

    @classmethod
    def from_config(
        cls,
        prompts: Mapping[str, Any],
        attributes: Mapping[str, Sequence[str]],
        concepts: Sequence[str],
        skew_ks: Sequence[int] = (10, 50),
        recall_ks: Sequence[int] = (1, 5, 10),
        targets: Sequence[str] = TARGETS,
        require_all_groups: bool = True,
        label_key: str = "concept",
        key: str = "prompts",
    ) -> EvalSpec:
        """Check a prompt-set config (``conf/prompts/*.yaml``) against the data vocabularies."""
        if OmegaConf.is_config(prompts):
            prompts = OmegaConf.to_container(prompts, resolve=True)
        if not isinstance(prompts, Mapping):
            raise ValueError(f"{key}: expected a mapping (a conf/prompts/*.yaml), got {prompts!r}")
        try:
            attrs = validate_attributes(attributes)
        except ValueError as err:
            raise ValueError(f"data.attributes: {err}") from err
        concepts = _str_list(concepts or [], "data.concepts", allow_empty=True)
        known = ("zero_shot_templates", "group_prompts", "association", "able_query_set")
        unknown = set(prompts) - {*known, "query_sets"}
        if unknown:
            raise ValueError(
                f"{key}: unknown key(s) {sorted(unknown)}, expected some of "
                f"{[*known, 'query_sets']}"
            )
        zs_templates = _templates(
            prompts.get("zero_shot_templates", ["a photo of a {}."]), f"{key}.zero_shot_templates"
        )
        group_prompts = _group_prompts(prompts.get("group_prompts") or {}, attrs, key)
        assoc = prompts.get("association") or {}
        if not isinstance(assoc, Mapping):
            raise ValueError(f"{key}.association: expected a mapping with words/templates")
        assoc_words = _str_list(
            assoc.get("words", concepts), f"{key}.association.words", allow_empty=True
        )
        assoc_templates = _templates(
            assoc.get("templates", zs_templates), f"{key}.association.templates"
        )
        raw_sets = prompts.get("query_sets") or {}
        if not isinstance(raw_sets, Mapping):
            raise ValueError(f"{key}.query_sets: expected a mapping name -> query set")
        query_sets = [
            _query_set(name, raw, attrs, f"{key}.query_sets.{name}")
            for name, raw in raw_sets.items()
        ]
        able_set = prompts.get("able_query_set")
        if able_set is not None and able_set not in raw_sets:
            raise ValueError(
                f"{key}.able_query_set={able_set!r}: no such query set, expected one of "
                f"{list(raw_sets)}"
            )
        target_list = tuple(targets)
        if not target_list or any(t not in TARGETS for t in target_list):
            raise ValueError(
                f"targets={list(target_list)}: expected a non-empty subset of {TARGETS}"
            )
        return cls(
            attributes=attrs,
            concepts=concepts,
            zero_shot_templates=zs_templates,
            group_prompts=group_prompts,
            association_words=assoc_words,
            association_templates=assoc_templates,
            query_sets=query_sets,
            skew_ks=check_ks(list(skew_ks), "skew_ks"),
            recall_ks=check_ks(list(recall_ks), "recall_ks"),
            targets=target_list,
            able_query_set=able_set,
            require_all_groups=bool(require_all_groups),
            label_key=label_key,
        )

    def splits_used(self) -> set[str]:
        used = {qs.split for qs in self.query_sets}
        if self.concepts:
            used.add("eval")
        if self.association_words:
            used.add("neutral")
        return used or {"eval"}


def _str_list(value: Any, key: str, allow_empty: bool = False) -> list[str]:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{key}: expected a list of strings, got {value!r}")
    out = [str(v) for v in value]
    if not out and not allow_empty:
        raise ValueError(f"{key}: expected at least one string, got []")
    if any(not v.strip() for v in out):
        raise ValueError(f"{key}: expected non-empty strings, got {out}")
    return out


def _templates(value: Any, key: str) -> list[str]:
    out = _str_list(value, key)
    for t in out:
        if t.count("{}") != 1:
            raise ValueError(f"{key}: template {t!r} must contain exactly one '{{}}' placeholder")
    return out


def _check_attribute(name: str, attributes: Mapping[str, Any], key: str) -> None:
    if name not in attributes:
        raise ValueError(
            f"{key}: unknown attribute {name!r}, expected one of data.attributes {list(attributes)}"
        )


def _group_prompts(
    raw: Mapping[str, Any], attributes: dict[str, list[str]], key: str
) -> dict[str, dict[str, list[str]]]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{key}.group_prompts: expected a mapping attribute -> value -> prompts")
    out = {}
    for attr, per_value in raw.items():
        _check_attribute(attr, attributes, f"{key}.group_prompts")
        if not isinstance(per_value, Mapping):
            raise ValueError(f"{key}.group_prompts.{attr}: expected a mapping value -> prompts")
        values = [str(v) for v in per_value]
        if set(values) != set(attributes[attr]):
            missing = [v for v in attributes[attr] if v not in values]
            extra = [v for v in values if v not in attributes[attr]]
            raise ValueError(
                f"{key}.group_prompts.{attr}: expected prompts for exactly the values "
                f"data.attributes.{attr}={attributes[attr]}; missing {missing}, unknown {extra}"
            )
        out[attr] = {
            v: _str_list(per_value[v], f"{key}.group_prompts.{attr}.{v}") for v in attributes[attr]
        }
    return out


def _query_set(name: str, raw: Any, attributes: dict[str, list[str]], key: str) -> QuerySet:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{key}: expected a mapping with split and prompts or templates+words")
    split = raw.get("split", "eval")
    if split not in SPLITS:
        raise ValueError(f"{key}.split={split!r}: expected one of {list(SPLITS)}")
    if raw.get("prompts") is not None:
        prompts = _str_list(raw["prompts"], f"{key}.prompts")
    elif raw.get("templates") is not None and raw.get("words") is not None:
        templates = _templates(raw["templates"], f"{key}.templates")
        words = _str_list(raw["words"], f"{key}.words")
        prompts = [t.format(w) for w in words for t in templates]
    else:
        raise ValueError(f"{key}: expected `prompts: [...]` or `templates: [...]` + `words: [...]`")
    attrs = raw.get("attributes")
    attrs = list(attributes) if attrs is None else _str_list(attrs, f"{key}.attributes")
    for attr in attrs:
        _check_attribute(attr, attributes, f"{key}.attributes")
    return QuerySet(name, split, tuple(prompts), tuple(attrs))


# -- text side ---------------------------------------------------------------------------------
def _model_dtype(model: Any) -> torch.dtype:
    """Input dtype for images: the model's (fp16/bf16 models), float32 for wrappers."""
    try:
        dtype = next(model.parameters()).dtype
    except (StopIteration, AttributeError, TypeError):
        return torch.float32
    return dtype if dtype.is_floating_point else torch.float32


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Run ``model`` in eval mode (no dropout), then give every submodule back the exact mode
    it had.

    Why exact: ``model.train()`` would also switch on submodules that were meant to stay in
    eval mode, such as a locked LiT tower or the base model under a freshly built
    :class:`DebiasedCLIP` (a new ``nn.Module`` starts in train mode). A pretrained HF text
    tower has dropout, so every embedding computed afterwards would carry dropout noise.
    """
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    modes = [m.training for m in modules]
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if modules:
            for module, mode in zip(modules, modes, strict=True):
                module.training = mode
        elif was_training and hasattr(model, "train"):
            model.train()


@torch.no_grad()
def encode_prompts(
    model: Any, tokenizer: Callable, prompts: Sequence[str], device: torch.device, chunk: int = 512
) -> Tensor:
    """Unit-norm text embeddings ``[len(prompts), D]`` (float32), encoded in chunks; a progress
    bar from 10 chunks on (a caption corpus for an SAE can take minutes on a CPU)."""
    starts = range(0, len(prompts), chunk)
    bar = tqdm(starts, desc="encoding prompts", unit="chunk", disable=len(starts) < 10 or None)
    with eval_mode(model):
        out = [
            model.encode_text(tokenizer(list(prompts[i : i + chunk])).to(device), normalize=True)
            for i in bar
        ]
    return torch.cat(out).float()


@torch.no_grad()
def class_embeddings(
    model: Any,
    tokenizer: Callable,
    prompts_per_class: Sequence[Sequence[str]],
    device: torch.device,
) -> Tensor:
    """Zero-shot classifier ``[C, D]``: mean of each class's unit prompt embeddings, renormalised
    (open_clip's rule), all prompts encoded in one batched pass."""
    flat = [p for prompts in prompts_per_class for p in prompts]
    owner = torch.repeat_interleave(
        torch.arange(len(prompts_per_class)), torch.tensor([len(p) for p in prompts_per_class])
    ).to(device)
    emb = encode_prompts(model, tokenizer, flat, device)
    sums = torch.zeros(len(prompts_per_class), emb.shape[1], device=device).index_add_(
        0, owner, emb
    )
    return torch.nn.functional.normalize(sums, dim=-1)


# -- metrics -----------------------------------------------------------------------------------
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


class BiasMetrics(torch.nn.Module):
    """All torchmetrics of one evaluation, fed per batch by :func:`evaluate_model`."""

    def __init__(self, spec: EvalSpec) -> None:
        super().__init__()
        self.spec = spec
        attrs = spec.attributes
        self.zero_shot = GroupZeroShotAccuracy(len(spec.concepts), attrs) if spec.concepts else None
        self.recall = RetrievalRecall(spec.recall_ks)
        # ModuleDict keys are prefixed: names like "eval" or "train" clash with Module methods.
        self.skew = torch.nn.ModuleDict(
            {
                f"q_{qs.name}": SkewMetrics(
                    {a: attrs[a] for a in qs.attributes}, ks=spec.skew_ks, targets=spec.targets
                )
                for qs in spec.query_sets
            }
        )
        n_assoc = len(spec.association_words)
        self.bias = torch.nn.ModuleDict(
            {t: ModelBias(attrs, n_assoc, target=t) for t in spec.targets} if n_assoc else {}
        )
        self.cramers = torch.nn.ModuleDict(
            {f"a_{a}": CramersV(len(v), n_assoc) for a, v in attrs.items()} if n_assoc else {}
        )
        self.counts = torch.nn.ModuleDict({f"s_{s}": GroupCounts(attrs) for s in SPLITS})


# -- evaluation --------------------------------------------------------------------------------
def resolve_splits(eval_shards: Any, neutral: Any = "auto") -> dict[str, Any]:
    """``{"eval": spec, "neutral": spec}``; ``neutral="auto"`` picks ``<eval dir>/../neutral``
    when it exists, else (and for ``None``) the eval split itself."""
    if eval_shards is None:
        raise ValueError("splits.eval: expected eval shards (a directory, pattern or list)")
    if OmegaConf.is_config(eval_shards):
        eval_shards = OmegaConf.to_container(eval_shards, resolve=True)
    if isinstance(neutral, str) and neutral == "auto":
        neutral = sibling_split(eval_shards, "neutral")
    return {"eval": eval_shards, "neutral": neutral if neutral is not None else eval_shards}


def sibling_split(shards: Any, name: str) -> str | None:
    """The folder ``name`` beside a split given as a directory (``fairclip-data`` writes
    train/, eval/, val/ and neutral/ side by side), if it exists and is not that split."""
    first = Path(str(shards[0] if isinstance(shards, list | tuple) else shards))
    sibling = first.parent / name
    return str(sibling) if first.is_dir() and sibling.is_dir() and sibling != first else None


def _stream(
    shards: Any,
    key: str,
    spec: EvalSpec,
    preprocess: Callable,
    tokenizer: Callable,
    batch_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
) -> ShardStream:
    decode = SampleDecoder(
        preprocess, spec.attributes, spec.concepts, spec.label_key, require_caption=False
    )
    stream = ShardStream(
        list_shards(shards, key),
        decode,
        CaptionCollate(tokenizer),
        batch_size,
        train=False,
        num_workers=num_workers,
        config_key=key,
    )
    stream.set_distributed(rank, world_size)
    return stream


@dataclass
class TextSide:
    """Everything encoded from prompts, once per evaluation (unit-norm rows)."""

    queries: dict[str, Tensor]
    concepts: Tensor | None
    association: Tensor | None
    groups: dict[int, Tensor]  # attribute column -> [num values, D]


def encode_text_side(
    model: Any, tokenizer: Callable, spec: EvalSpec, device: torch.device
) -> TextSide:
    def classes(words: Sequence[str], templates: Sequence[str]) -> Tensor | None:
        if not words:
            return None
        return class_embeddings(
            model, tokenizer, [[t.format(w) for t in templates] for w in words], device
        )

    names = list(spec.attributes)
    return TextSide(
        queries={
            qs.name: encode_prompts(model, tokenizer, qs.prompts, device) for qs in spec.query_sets
        },
        concepts=classes(spec.concepts, spec.zero_shot_templates),
        association=classes(spec.association_words, spec.association_templates),
        groups={
            names.index(attr): class_embeddings(model, tokenizer, list(per_value.values()), device)
            for attr, per_value in spec.group_prompts.items()
        },
    )


@dataclass
class ImageCache:
    """Image embeddings (with their batch's labels and captions) of whole evaluation passes.

    Why: the text-side rows of a comparison table (Orth-Proj, SEM, a text head) share the base
    model's image encoder, so every row after the first would decode and encode the same images
    again. The caller vouches that the models it shares a cache between embed images alike.
    """

    passes: dict[str, list[tuple[dict, Tensor]]] = field(default_factory=dict)


def _passes(splits: Mapping[str, Any], used: set[str]) -> list[tuple[Any, list[str]]]:
    """One pass per distinct shard spec: a split given twice (neutral = eval) is read once."""
    passes: list[tuple[Any, list[str]]] = []
    for split in SPLITS:
        if split not in used:
            continue
        for shards, roles in passes:
            if shards == splits[split]:
                roles.append(split)
                break
        else:
            passes.append((splits[split], [split]))
    return passes


def _update(
    metrics: BiasMetrics,
    spec: EvalSpec,
    text: TextSide,
    model: Any,
    batch: dict,
    img: Tensor,
    roles: list[str],
) -> None:
    """Feed one batch of image embeddings to every metric of the roles this split plays."""
    device = img.device
    groups = batch["groups"].to(device)
    concepts = batch["concept"].to(device)
    has_text = batch["has_text"].to(device)
    labelled = concepts >= 0
    skipped = int(batch.get("skipped", 0))
    for split in roles:
        metrics.counts[f"s_{split}"].update(groups, labelled, has_text, skipped)
    names = list(spec.attributes)
    for qs in spec.query_sets:
        if qs.split in roles:
            columns = [names.index(a) for a in qs.attributes]
            metrics.skew[f"q_{qs.name}"].update(img @ text.queries[qs.name].T, groups[:, columns])
    if "eval" in roles:
        if text.concepts is not None and bool(labelled.any()):
            preds = (img[labelled] @ text.concepts.T).argmax(dim=1)
            metrics.zero_shot.update(preds, concepts[labelled], groups[labelled])
        if bool(has_text.any()):
            tokens = batch["text"][has_text.cpu()].to(device)
            captions = model.encode_text(tokens, normalize=True).float()
            metrics.recall.update(img[has_text], captions)
    if "neutral" in roles and text.association is not None:
        pred_class = (img @ text.association.T).argmax(dim=1)
        pred_groups = torch.full_like(groups, -1)  # -1: no group prompts for that attribute
        for column, weights in text.groups.items():
            pred_groups[:, column] = (img @ weights.T).argmax(dim=1)
        for bias in metrics.bias.values():
            bias.update(pred_groups, groups, pred_class)
        for column, attr in enumerate(names):
            metrics.cramers[f"a_{attr}"].update(groups[:, column], pred_class)


@torch.no_grad()
def evaluate_model(
    model: Any,
    tokenizer: Callable,
    preprocess: Callable,
    spec: EvalSpec,
    splits: Mapping[str, Any],
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    num_workers: int = 1,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    image_cache: ImageCache | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (anything with ``encode_image``/``encode_text(..., normalize=True)``).

    ``splits`` maps ``eval``/``neutral`` to shard specs (see :func:`resolve_splits`). Under
    DDP call it on every rank with its ``rank``/``world_size``: each rank encodes its share and
    the metric states are synced. ``image_cache``: reuse (and fill) the image embeddings of an
    earlier call; pass one only to models with the same image encoder. Returns the report dict
    (see :mod:`fairclip.report`).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
    device = torch.device(device)
    used = spec.splits_used()
    for split in used:
        if splits.get(split) is None:
            raise ValueError(f"splits.{split}: expected shards for this split, got None")
    with eval_mode(model):
        start = time.perf_counter()
        metrics = BiasMetrics(spec).to(device)
        text = encode_text_side(model, tokenizer, spec, device)
        dtype = _model_dtype(model)
        for shards, roles in _passes(splits, used):
            cache_key = repr((shards, rank, world_size, dict(spec.attributes), spec.concepts,
                              spec.label_key))  # fmt: skip
            cached = image_cache.passes.get(cache_key) if image_cache is not None else None
            if cached is not None:
                for batch, img in cached:
                    _update(metrics, spec, text, model, batch, img, roles)
                continue
            key = f"splits.{roles[0]}"
            stream = _stream(
                shards, key, spec, preprocess, tokenizer, batch_size, num_workers, rank, world_size
            )
            loader = stream_loader(stream, num_workers)
            desc = f"embedding {'+'.join(roles)} images"
            kept: list[tuple[dict, Tensor]] = []
            for batch in tqdm(
                loader, total=len(stream), desc=desc, unit="batch", disable=not progress
            ):
                images = batch.pop("image").to(device, dtype)
                img = model.encode_image(images, normalize=True).float()
                _update(metrics, spec, text, model, batch, img, roles)
                if image_cache is not None:
                    kept.append((batch, img))
            if image_cache is not None:  # only a whole pass: a failed one is read again
                image_cache.passes[cache_key] = kept
        report = _compute_report(metrics, spec, splits, used)
        report["seconds"] = round(time.perf_counter() - start, 2)
        return report


def _f(x: Tensor | float) -> float:
    return float(x)


def _compute_report(
    metrics: BiasMetrics,
    spec: EvalSpec,
    splits: Mapping[str, Any],
    used: set[str],
) -> dict[str, Any]:
    """Sync + compute every metric into the report dict (same on every rank)."""
    split_info: dict[str, Any] = {}
    for split in SPLITS:
        if split not in used:
            continue
        info = metrics.counts[f"s_{split}"].compute()
        info["shards"] = splits[split] if isinstance(splits[split], list) else str(splits[split])
        split_info[split] = info
        if info["images"] == 0:
            raise ValueError(f"splits.{split}={info['shards']!r}: no images could be read")
        if spec.require_all_groups:
            for attr, counts in info["group_counts"].items():
                empty = [v for v, n in counts.items() if n == 0]
                if len(empty) == len(counts):
                    raise ValueError(
                        f"splits.{split}={info['shards']!r}: no image has a label for attribute "
                        f"{attr!r}: its JSON labels lack the field, or spell it differently "
                        f"(data.attributes.{attr}); set require_all_groups=false to report NaN"
                    )
                if empty:
                    raise ValueError(
                        f"splits.{split}={info['shards']!r}: attribute {attr!r} value(s) {empty} "
                        f"have no images (counts {counts}); every value of data.attributes.{attr} "
                        "must occur, or set require_all_groups=false to report NaN for them"
                    )

    if metrics.zero_shot is not None and split_info.get("eval", {}).get("labelled", 1) == 0:
        raise ValueError(
            f"splits.eval={split_info['eval']['shards']!r}: no image has a concept label under "
            f"{spec.label_key!r} (label_key), so zero-shot accuracy would be left out; set "
            "label_key to the labels' field, or data.concepts=[] for a split without concepts"
        )
    out: dict[str, dict[str, Any]] = {}
    cells: dict[str, dict[str, dict[str, float]]] = {}
    if metrics.zero_shot is not None and "eval" in split_info:  # labelled > 0, checked above
        out["zeroshot"] = {k: _f(v) for k, v in metrics.zero_shot.compute().items()}
        for attr, acc in metrics.zero_shot.cell_accuracy().items():
            cells[attr] = {
                concept: dict(zip(spec.attributes[attr], map(float, row), strict=True))
                for concept, row in zip(spec.concepts, acc.tolist(), strict=True)
            }
    if "eval" in split_info and split_info["eval"]["captioned"] > 0:
        out["retrieval"] = {k: _f(v) for k, v in metrics.recall.compute().items()}
    per_query: dict[str, Any] = {}
    skew: dict[str, dict[str, float]] = {}
    for qs in spec.query_sets:
        values = metrics.skew[f"q_{qs.name}"].compute_per_query()
        skew[qs.name] = {k: _f(v.mean()) for k, v in values.items()}
        per_query[qs.name] = {
            "split": qs.split,
            "attributes": list(qs.attributes),
            "prompts": list(qs.prompts),
            "values": {k: [float(x) for x in v.tolist()] for k, v in values.items()},
        }
    if skew:
        out["skew"] = skew
    if metrics.bias:
        bias: dict[str, float] = {}
        for target, metric in metrics.bias.items():
            for k, v in metric.compute().items():
                kind, attr = k.split("/", 1)
                if kind == "rb" and attr in spec.group_prompts:
                    bias[f"rb/{attr}/{target}"] = _f(v)
                elif kind == "ab":
                    bias[f"ab/{attr}"] = _f(v)
        for key, metric in metrics.cramers.items():
            bias[f"cramers_v/{key.removeprefix('a_')}"] = _f(metric.compute())
        out["bias"] = dict(sorted(bias.items()))
    acc = out.get("zeroshot", {}).get("acc")
    if spec.able_query_set and acc is not None and not math.isnan(acc):
        out["able"] = {
            f"able{k.removeprefix('maxskew')}": _f(able(acc, v))
            for k, v in skew[spec.able_query_set].items()
            if k.startswith("maxskew@")
        }
    return {
        "schema": REPORT_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": {},
        "settings": {
            "attributes": spec.attributes,
            "concepts": spec.concepts,
            "skew_ks": list(spec.skew_ks),
            "recall_ks": list(spec.recall_ks),
            "targets": list(spec.targets),
            "able_query_set": spec.able_query_set,
            "association_words": spec.association_words,
            "zero_shot_templates": spec.zero_shot_templates,
            "group_prompts": spec.group_prompts,
        },
        "splits": split_info,
        "metrics": out,
        # zero-shot accuracy per (true concept, group value) cell: attr -> concept -> value
        "cells": cells,
        "queries": per_query,
    }


# -- entry point -------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r}: expected auto, cpu, cuda or cuda:<index>") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: no CUDA GPU is available here; use device=auto")
    return resolved


def warn_if_ks_cover_split(ks: Sequence[int], eval_shards: Any) -> None:
    """Warn about a skew depth k at or beyond the eval split's size: MaxSkew@k/NDKL@k then
    cover the whole (balanced) split and say nothing about the ranking."""
    n_images = sum(s.size for s in list_shards(eval_shards, "splits.eval"))
    for k in sorted(set(ks)):
        if k >= n_images:
            log.warning(
                "skew k=%d: the eval split (%s) has only %d images, so MaxSkew@%d/NDKL@%d "
                "cover all of it and say nothing about the ranking", k, eval_shards, n_images,
                k, k,
            )  # fmt: skip


def spec_from_cfg(cfg: DictConfig) -> EvalSpec:
    """The :class:`EvalSpec` of a composed ``conf/eval.yaml``."""
    return EvalSpec.from_config(
        cfg.prompts,
        OmegaConf.to_container(cfg.data.attributes, resolve=True),
        OmegaConf.to_container(cfg.data.concepts, resolve=True) if cfg.data.get("concepts") else [],
        skew_ks=list(cfg.skew_ks) if cfg.skew_ks is not None else [],
        recall_ks=list(cfg.recall_ks) if cfg.recall_ks is not None else [],
        targets=list(cfg.targets),
        require_all_groups=cfg.require_all_groups,
        label_key=cfg.label_key,
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.model`` (or compare ``cfg.compare`` reports) and write the outputs."""
    from fairclip.model.factory import load_model
    from fairclip.report import compare_reports, log_to_wandb, write_report

    out_dir = Path(cfg.output_dir)
    wandb_cfg = cfg.get("wandb") or {}
    wandb_kwargs = (
        {
            "project": wandb_cfg.get("project", "fairclip"),
            "name": wandb_cfg.get("name"),
            "group": wandb_cfg.get("group"),
            "tags": list(wandb_cfg.get("tags") or []),
            "offline": bool(wandb_cfg.get("offline", True)),
            "run_id": stable_id(str(out_dir.resolve())),
        }
        if wandb_cfg.get("enabled")
        else None
    )
    if cfg.get("compare"):
        if isinstance(cfg.compare, str):
            raise ValueError(f"compare={cfg.compare!r}: expected a list, e.g. compare=[runA,runB]")
        labels = list(cfg.compare_labels) if cfg.get("compare_labels") else None
        return compare_reports(
            list(cfg.compare), out_dir, labels=labels, plots=cfg.plots, wandb=wandb_kwargs
        )
    spec = spec_from_cfg(cfg)  # config errors before the (slow) model load
    splits = resolve_splits(cfg.splits.eval, cfg.splits.neutral)
    warn_if_ks_cover_split(spec.skew_ks, splits["eval"])
    device = resolve_device(cfg.device)
    bundle = load_model(
        cfg.model.name,
        pretrained=cfg.model.pretrained,
        config_file=cfg.model.config_file,
        precision=cfg.model.precision,
        device=device,
    )
    report = evaluate_model(
        bundle.model,
        bundle.tokenizer,
        bundle.preprocess_val,
        spec,
        splits,
        device=device,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        progress=cfg.progress,
    )
    report["model"] = {
        "spec": str(cfg.model.name),
        "pretrained": cfg.model.pretrained,
        "name": bundle.name,
    }
    files = write_report(report, out_dir, plots=cfg.plots)
    if wandb_kwargs is not None:
        log_to_wandb(report, files, out_dir, **wandb_kwargs)
    log.info("bias report written to %s", files["json"])
    print(json.dumps({"report": str(files["json"]), **_headline(report)}, indent=1))
    return report


def _headline(report: Mapping[str, Any]) -> dict[str, float]:
    """A few numbers for the console; the full set is in report.json."""
    m = report["metrics"]
    out = {}
    if "zeroshot" in m:
        out["acc"] = m["zeroshot"]["acc"]
    for name, values in m.get("skew", {}).items():
        first = next((k for k in values if k.startswith("maxskew@")), None)
        if first:
            out[f"{name}/{first}"] = values[first]
    return {k: round(v, 4) for k, v in out.items()}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
