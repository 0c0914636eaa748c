"""The attention-head audit (Yasser et al. 2026): score heads, mean-ablate the top ones and a
layer-matched random control, and compare Cramér's V (group vs predicted class) and accuracy."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fairclip.data.batches import iter_batches
from fairclip.data.shards import list_shards
from fairclip.debias.head_ablation import HEAD_SCORES, ablation_model, group_prompts_for
from fairclip.debias.head_attribution import (
    head_contributions,
    head_shape,
    layer_matched_random,
    score_attribute,
    top_heads,
)
from fairclip.debias.joint import config_from
from fairclip.debias.text_span import bias_descriptions, describe_heads, explained_variance
from fairclip.eval.run import evaluate_model
from fairclip.eval.spec import EvalSpec, resolve_splits
from fairclip.files import atomic_write_text
from fairclip.loading import load_model
from fairclip.metrics import CramersV, cramers_v
from fairclip.model.encode import encode_prompts, zero_shot_classifier
from fairclip.report.head_audit import (
    ablation_markdown,
    audit_markdown,
    plot_attribute_scores,
    plot_curve,
    plot_scores,
)
from fairclip.report.io import save_json


@torch.no_grad()
def group_class_association(
    model: Any,
    tokenizer: Callable,
    preprocess: Callable,
    spec: Any,
    shards: Any,
    attribute: str = "gender",
    batch_size: int = 256,
) -> dict[str, Any]:
    """Cramér's V between ``attribute`` and the zero-shot predicted concept, and accuracy, on
    a labelled split; ``per_class``: for every predicted class, Cramér's V of (predicted as
    it or not) × group, the classes the group decides most. On the balanced eval split the
    true concept is independent of the group, so any association is the model's (more images
    than the neutral split: less noise)."""
    column = list(spec.attributes).index(attribute)
    weights = zero_shot_classifier(
        model, tokenizer, spec.concepts, spec.zero_shot_templates, torch.device("cpu")
    )
    n_groups, n_classes = len(spec.attributes[attribute]), len(spec.concepts)
    metric = CramersV(n_groups, n_classes)
    table = torch.zeros(n_groups, n_classes, dtype=torch.float64)
    correct = total = 0
    for batch in iter_batches(
        shards, preprocess, tokenizer, spec.attributes, spec.concepts, batch_size
    ):
        pred = (model.encode_image(batch["image"], normalize=True).float() @ weights.T).argmax(1)
        groups = batch["groups"][:, column]
        metric.update(groups, pred)
        known = groups >= 0
        table.index_put_((groups[known], pred[known]), torch.ones(int(known.sum()),
                         dtype=torch.float64), accumulate=True)  # fmt: skip
        labelled = batch["concept"] >= 0
        correct += int((pred[labelled] == batch["concept"][labelled]).sum())
        total += int(labelled.sum())
    return {
        f"cramers_v_eval/{attribute}": float(metric.compute()),
        "acc": correct / total if total else math.nan,
        "per_class": per_class_cramers_v(table, spec.concepts),
    }


def per_class_cramers_v(table: torch.Tensor, classes: Sequence[str]) -> dict[str, float]:
    """Cramér's V of the 2 × groups table (predicted as the class or not) × group, for every
    class of a group × predicted-class contingency table, most biased first."""
    out = {}
    for c, name in enumerate(classes):
        two = torch.stack([table[:, c], table.sum(1) - table[:, c]], 1)
        out[str(name)] = float(cramers_v(two))
    return dict(sorted(out.items(), key=lambda kv: -kv[1] if not math.isnan(kv[1]) else 0.0))


def _row(
    report: Mapping[str, Any], assoc: Mapping[str, float], attribute: str, k: int
) -> dict[str, float]:
    m = report["metrics"]
    skew = m.get("skew", {}).get(report["settings"].get("able_query_set") or "concepts", {})
    return {
        f"cramers_v_eval/{attribute}": assoc[f"cramers_v_eval/{attribute}"],
        f"cramers_v_neutral/{attribute}": m["bias"][f"cramers_v/{attribute}"],
        "acc": m["zeroshot"]["acc"],
        f"maxskew@{k}": skew.get(f"maxskew@{k}/{attribute}/eq_opp", math.nan),
        "i2t_R@5": m.get("retrieval", {}).get("i2t_R@5", math.nan),
    }


@dataclass
class TextSpanSettings:
    """TextSpan descriptions of the top heads (``heads.textspan``)."""

    top: int = 5  # describe this many of the highest-scoring heads (0: none)
    n_texts: int = 5  # descriptions per head
    rank: int = 80  # span of the head's contributions the texts are projected on
    pool_file: str | None = None  # extra descriptions, one per line (e.g. TextSpan's word list)
    random_draws: int = 10  # random pool subsets of the same size, the baseline


def text_pool(spec: Any, pool_file: str | None) -> list[str]:
    """TextSpan's pool: every group prompt, every attribute word and concept in the zero-shot
    templates, and the lines of ``pool_file``."""
    words = {a: [str(v).replace("_", " ") for v in vals] for a, vals in spec.attributes.items()}
    templates = list(spec.zero_shot_templates)[:4] or ["a photo of a {}."]
    pool = [t for prompts in spec.group_prompts.values() for ps in prompts.values() for t in ps]
    pool += bias_descriptions(words, templates)
    pool += bias_descriptions(list(spec.concepts), templates)
    if pool_file is not None:
        path = Path(pool_file)
        if not path.is_file():
            raise FileNotFoundError(f"heads.textspan.pool_file={pool_file!r}: no such file")
        pool += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return list(dict.fromkeys(pool))


def describe_top_heads(
    bundle: Any, contrib: torch.Tensor, chosen: Sequence[tuple[int, int]], spec: Any,
    settings: TextSpanSettings, seed: int = 0,
) -> list[dict[str, Any]]:  # fmt: skip
    """TextSpan of ``chosen`` heads with the variance explained by their texts and, as the
    baseline, by as many random pool entries (mean over ``random_draws``)."""
    names = text_pool(spec, settings.pool_file)
    texts = encode_prompts(bundle.model, bundle.tokenizer, names, torch.device("cpu"))
    n = min(settings.n_texts, len(names))
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for d in describe_heads(contrib, chosen, texts, names, n, settings.rank):
        c = contrib[:, d.layer, d.head]
        draws = [
            torch.randperm(len(names), generator=gen)[:n] for _ in range(settings.random_draws)
        ]
        baseline = sum(explained_variance(c, texts[i]) for i in draws) / max(len(draws), 1)
        rows.append({"head": [d.layer, d.head], "texts": list(d.texts),
                     "explained": d.explained, "random_explained": baseline})  # fmt: skip
    return rows


def ablation_curve(
    evaluate: Callable[[Any], dict[str, float]], bundle: Any, scores: torch.Tensor,
    max_heads: int, seeds: Sequence[int], train_shards: Any, context: Mapping[str, Any],
    max_samples: int, keys: Sequence[str],
) -> list[dict[str, Any]]:  # fmt: skip
    """The metrics ``keys`` with the top 1..``max_heads`` heads ablated, beside the mean of
    layer-matched random controls of each size."""
    shape = head_shape(bundle.model.visual)
    rows = []
    for n in range(1, max_heads + 1):
        chosen = top_heads(scores, n)
        top = evaluate(ablation_model(bundle, chosen, train_shards, context, max_samples))
        controls = [
            evaluate(
                ablation_model(
                    bundle,
                    layer_matched_random(chosen, shape, seed),
                    train_shards,
                    context,
                    max_samples,
                )
            )  # fmt: skip
            for seed in seeds
        ]
        row: dict[str, Any] = {"heads": n}
        for key in keys:
            row[key] = top[key]
            if controls:
                row[f"random/{key}"] = sum(c[key] for c in controls) / len(controls)
        rows.append(row)
    return rows


def audit(
    bundle: Any,
    spec: Any,
    splits: Mapping[str, Any],
    train_shards: Any,
    out_dir: str | Path,
    attribute: str = "gender",
    num_heads: int = 1,
    random_seeds: Sequence[int] = (0, 1, 2),
    head_score: str = "projection",
    max_samples: int = 1000,
    plots: bool = True,
    score_attributes: Sequence[str] | None = None,
    curve: int = 0,
    textspan: TextSpanSettings | None = None,
) -> dict[str, Any]:
    """Score heads for every attribute of ``score_attributes`` (default: each with group
    prompts), ablate the top ``attribute`` heads and layer-matched random controls (and, with
    ``curve``, 1..``curve`` heads), describe the top heads with TextSpan; write
    ``head_scores_<attribute>.png``, ``ablation_curve.png``, ``ablation.md`` and
    ``ablation.json`` in ``out_dir``."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    context = {
        "train_shards": train_shards,
        "attributes": spec.attributes,
        "concepts": spec.concepts,
        "spec": spec,
        "attribute": attribute,
        "max_samples": max_samples,
    }
    contrib, groups = head_contributions(
        bundle.model, bundle.tokenizer, bundle.preprocess_val, train_shards, spec.attributes,
        spec.concepts, max_samples,
    )  # fmt: skip
    names = list(score_attributes) if score_attributes is not None else [
        a for a in spec.attributes if a in spec.group_prompts or a == attribute
    ]  # fmt: skip
    if attribute not in names:
        names.insert(0, attribute)
    all_scores = {}
    for name in names:
        all_scores[name] = score_attribute(
            bundle.model, bundle.tokenizer, contrib, groups, spec.attributes, name,
            group_prompts_for(context, name), probe=True,
        )  # fmt: skip
    scores = all_scores[attribute]
    chosen = top_heads(scores[head_score], num_heads)
    k = spec.skew_ks[0]

    def evaluate(model: Any) -> dict[str, Any]:
        report = evaluate_model(
            model, bundle.tokenizer, bundle.preprocess_val, spec, splits, num_workers=0,
            progress=False,
        )  # fmt: skip
        assoc = group_class_association(
            model, bundle.tokenizer, bundle.preprocess_val, spec, splits["eval"], attribute
        )
        return {**_row(report, assoc, attribute, k), "per_class": assoc["per_class"]}

    original = evaluate(bundle.model)
    top = evaluate(ablation_model(bundle, chosen, train_shards, context, max_samples))
    per_class = {"original": original.pop("per_class"), "top": top.pop("per_class")}
    rows = [{"variant": "original", "heads": [], **original}]
    rows.append({"variant": f"top-{num_heads} ({head_score})", "heads": [list(h) for h in chosen],
                 **top})  # fmt: skip
    shape = head_shape(bundle.model.visual)
    controls = []
    for seed in random_seeds:
        heads = layer_matched_random(chosen, shape, seed)
        row = {"variant": f"random layer-matched (seed {seed})", "heads": [list(h) for h in heads]}
        row.update(evaluate(ablation_model(bundle, heads, train_shards, context, max_samples)))
        row.pop("per_class")
        controls.append(row)
    rows += controls
    if controls:
        mean = {
            key: sum(r[key] for r in controls) / len(controls)
            for key in controls[0]
            if key not in ("variant", "heads")
        }
        rows.append({"variant": "random layer-matched (mean)", "heads": [], **mean})
    curve_rows = []
    if curve > 0:
        keys = [f"cramers_v_eval/{attribute}", "acc", f"maxskew@{k}"]
        curve_rows = ablation_curve(
            evaluate, bundle, scores[head_score], curve, random_seeds, train_shards, context,
            max_samples, keys,
        )  # fmt: skip
    settings = textspan or TextSpanSettings()
    described = []
    if settings.top > 0:
        top_k = top_heads(scores[head_score], min(settings.top, scores[head_score].numel()))
        described = describe_top_heads(bundle, contrib, top_k, spec, settings)
        for row in described:
            layer, head = row["head"]
            row["scores"] = {n: float(s[head_score][layer, head]) for n, s in all_scores.items()}
    result = {
        "attribute": attribute,
        "head_score": head_score,
        "scores": {name: s.tolist() for name, s in scores.items()},
        "attributes": {
            name: {
                "values": list(spec.attributes[name]),
                **{key: s.tolist() for key, s in sc.items()},
            }
            for name, sc in all_scores.items()
        },
        "rows": rows,
        "per_class": per_class,
        "curve": curve_rows,
        "textspan": described,
    }
    save_json(result, out / "ablation.json")
    atomic_write_text(out / "ablation.md", audit_markdown(result))
    if plots:
        for name, sc in all_scores.items():
            plot_attribute_scores(sc, list(spec.attributes[name]), name,
                                  out / f"head_scores_{name}.png", chosen if name == attribute else ())  # fmt: skip
        plot_scores(scores, out / "head_scores.png", chosen)
        if curve_rows:
            plot_curve(curve_rows, out / "ablation_curve.png")
    return result


def audit_config(cfg: DictConfig) -> dict[str, Any]:
    """:func:`audit` of a composed ``conf/heads.yaml``; prints the ablation table."""
    for key in ("num_heads", "max_samples"):
        value = cfg.heads[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"heads.{key}={value!r}: expected a positive integer")
    if cfg.heads.score not in HEAD_SCORES:
        raise ValueError(f"heads.score={cfg.heads.score!r}: expected one of {list(HEAD_SCORES)}")
    curve = cfg.heads.get("curve", 0)
    if isinstance(curve, bool) or not isinstance(curve, int) or curve < 0:
        raise ValueError(f"heads.curve={curve!r}: expected a non-negative integer")
    raw_textspan = cfg.heads.get("textspan")
    textspan = config_from(
        TextSpanSettings,
        OmegaConf.to_container(raw_textspan) if raw_textspan is not None else None,
        "heads.textspan",
    )
    attrs = cfg.heads.get("attributes")
    for name in attrs or []:
        if name not in cfg.data.attributes:
            raise ValueError(
                f"heads.attributes: {name!r} is not in data.attributes {list(cfg.data.attributes)}"
            )
    list_shards(cfg.splits.train, "splits.train")  # a missing split fails now, by its key
    list_shards(cfg.splits.eval, "splits.eval")
    data = OmegaConf.to_container(cfg.data, resolve=True)
    spec = EvalSpec.from_config(
        OmegaConf.to_container(cfg.prompts, resolve=True), data["attributes"], data["concepts"]
    )
    bundle = load_model(
        str(cfg.model.name), pretrained=cfg.model.pretrained, config_file=cfg.model.config_file,
        precision=cfg.model.precision,
    )  # fmt: skip
    result = audit(
        bundle,
        spec,
        resolve_splits(cfg.splits.eval, cfg.splits.neutral),
        OmegaConf.to_container(cfg.splits.train) if OmegaConf.is_config(cfg.splits.train)
        else cfg.splits.train,
        cfg.output_dir,
        attribute=str(cfg.attribute),
        num_heads=int(cfg.heads.num_heads),
        random_seeds=[int(s) for s in cfg.heads.random_seeds],
        head_score=str(cfg.heads.score),
        max_samples=int(cfg.heads.max_samples),
        score_attributes=None if attrs is None else [str(a) for a in attrs],
        curve=curve,
        textspan=textspan,
    )  # fmt: skip
    print(ablation_markdown(result["rows"]))
    return result
