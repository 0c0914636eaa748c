"""What one evaluation measures: the :class:`EvalSpec` (query sets, prompts, ks, targets)
built from a composed config, and where its splits are."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fairclip.data.prompts import expand_prompts
from fairclip.data.shards import list_shards
from fairclip.metrics import (
    TARGETS,
    validate_attributes,
)
from fairclip.metrics.folds import FoldSpec
from fairclip.metrics.zeroshot import check_ks

log = logging.getLogger(__name__)

SPLITS = ("eval", "neutral")


# -- specification ----------------------------------------------------------------------------
@dataclass(frozen=True)
class QuerySet:
    """Retrieval queries ranked over one split; skew is measured for ``attributes``.

    ``relevant``: ``(attribute, value per prompt)`` for labelled queries (an image is relevant
    to prompt ``i`` when its ``attribute`` is the ``i``-th value), for precision@k."""

    name: str
    split: str
    prompts: tuple[str, ...]
    attributes: tuple[str, ...]
    relevant: tuple[str, tuple[str, ...]] | None = None


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
    folds: FoldSpec | None = None
    whole_ranking: bool = False

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
        folds: Mapping[str, Any] | None = None,
        whole_ranking: bool = False,
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
            folds=_fold_spec(folds),
            whole_ranking=bool(whole_ranking),
        )

    def splits_used(self) -> set[str]:
        used = {qs.split for qs in self.query_sets}
        if self.concepts:
            used.add("eval")
        if self.association_words:
            used.add("neutral")
        return used or {"eval"}


def _fold_spec(raw: Any) -> FoldSpec | None:
    """``folds`` (null, or ``{n_folds, seed, k, confidence}``) as a :class:`FoldSpec`."""
    if raw is None:
        return None
    if OmegaConf.is_config(raw):
        raw = OmegaConf.to_container(raw, resolve=True)
    if not isinstance(raw, Mapping):
        raise ValueError(f"folds: expected null or a mapping {{n_folds, seed, k}}, got {raw!r}")
    known = [f.name for f in fields(FoldSpec)]
    unknown = set(raw) - set(known)
    if unknown:
        raise ValueError(f"folds: unknown key(s) {sorted(unknown)}, expected some of {known}")
    return FoldSpec(**raw)


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
        prompts = expand_prompts({"templates": templates, "words": words}, key)
    else:
        raise ValueError(f"{key}: expected `prompts: [...]` or `templates: [...]` + `words: [...]`")
    attrs = raw.get("attributes")
    attrs = list(attributes) if attrs is None else _str_list(attrs, f"{key}.attributes")
    for attr in attrs:
        _check_attribute(attr, attributes, f"{key}.attributes")
    return QuerySet(
        name, split, tuple(prompts), tuple(attrs), _relevant(raw, prompts, attributes, key)
    )


def _relevant(
    raw: Mapping[str, Any], prompts: Sequence[str], attributes: dict[str, list[str]], key: str
) -> tuple[str, tuple[str, ...]] | None:
    """``relevant: {attribute: a, values: [one per prompt]}`` of a labelled query set."""
    rel = raw.get("relevant")
    if rel is None:
        return None
    if not isinstance(rel, Mapping) or set(rel) != {"attribute", "values"}:
        raise ValueError(f"{key}.relevant: expected {{attribute: <name>, values: [per prompt]}}")
    attr = str(rel["attribute"])
    _check_attribute(attr, attributes, f"{key}.relevant.attribute")
    values = _str_list(rel["values"], f"{key}.relevant.values")
    if len(values) != len(prompts):
        raise ValueError(
            f"{key}.relevant.values: expected one value per prompt ({len(prompts)}), "
            f"got {len(values)}"
        )
    unknown = [v for v in values if v not in attributes[attr]]
    if unknown:
        raise ValueError(
            f"{key}.relevant.values: {unknown} are not values of data.attributes.{attr}="
            f"{attributes[attr]}"
        )
    return attr, tuple(values)


# -- text side ---------------------------------------------------------------------------------


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
        folds=cfg.get("folds"),
        whole_ranking=bool(cfg.get("whole_ranking", False)),
    )
