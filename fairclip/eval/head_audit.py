"""The attention-head audit (Yasser et al. 2026): score heads, mean-ablate the top ones and a
layer-matched random control, and compare Cramér's V (group vs predicted class) and accuracy."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fairclip.data.batches import iter_batches
from fairclip.data.shards import list_shards
from fairclip.debias.head_ablation import HEAD_SCORES, ablation_model, group_prompts_for
from fairclip.debias.head_attribution import (
    head_shape,
    layer_matched_random,
    score_heads,
    top_heads,
)
from fairclip.eval.run import evaluate_model
from fairclip.eval.spec import EvalSpec, resolve_splits
from fairclip.files import atomic_write_text
from fairclip.loading import load_model
from fairclip.metrics import CramersV
from fairclip.model.encode import zero_shot_classifier
from fairclip.report.head_audit import ablation_markdown, plot_scores
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
) -> dict[str, float]:
    """Cramér's V between ``attribute`` and the zero-shot predicted concept, and accuracy, on
    a labelled split. On the balanced eval split the true concept is independent of the group,
    so any association is the model's (more images than the neutral split: less noise)."""
    column = list(spec.attributes).index(attribute)
    weights = zero_shot_classifier(
        model, tokenizer, spec.concepts, spec.zero_shot_templates, torch.device("cpu")
    )
    metric = CramersV(len(spec.attributes[attribute]), len(spec.concepts))
    correct = total = 0
    for batch in iter_batches(
        shards, preprocess, tokenizer, spec.attributes, spec.concepts, batch_size
    ):
        pred = (model.encode_image(batch["image"], normalize=True).float() @ weights.T).argmax(1)
        metric.update(batch["groups"][:, column], pred)
        labelled = batch["concept"] >= 0
        correct += int((pred[labelled] == batch["concept"][labelled]).sum())
        total += int(labelled.sum())
    return {
        f"cramers_v_eval/{attribute}": float(metric.compute()),
        "acc": correct / total if total else math.nan,
    }


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
) -> dict[str, Any]:
    """Score heads, ablate the top ones and layer-matched random controls, write
    ``head_scores.png``, ``ablation.md`` and ``ablation.json`` in ``out_dir``."""

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
    scores = score_heads(
        bundle.model,
        bundle.tokenizer,
        bundle.preprocess_val,
        train_shards,
        spec.attributes,
        spec.concepts,
        attribute=attribute,
        group_prompts=group_prompts_for(context, attribute),
        max_samples=max_samples,
    )
    chosen = top_heads(scores[head_score], num_heads)
    k = spec.skew_ks[0]

    def evaluate(model: Any) -> dict[str, float]:
        report = evaluate_model(
            model, bundle.tokenizer, bundle.preprocess_val, spec, splits, num_workers=0,
            progress=False,
        )  # fmt: skip
        assoc = group_class_association(
            model, bundle.tokenizer, bundle.preprocess_val, spec, splits["eval"], attribute
        )
        return _row(report, assoc, attribute, k)

    rows = [{"variant": "original", "heads": [], **evaluate(bundle.model)}]
    rows.append(
        {
            "variant": f"top-{num_heads} ({head_score})",
            "heads": [list(h) for h in chosen],
            **evaluate(ablation_model(bundle, chosen, train_shards, context, max_samples)),
        }
    )
    shape = head_shape(bundle.model.visual)
    controls = []
    for seed in random_seeds:
        heads = layer_matched_random(chosen, shape, seed)
        row = {"variant": f"random layer-matched (seed {seed})", "heads": [list(h) for h in heads]}
        row.update(evaluate(ablation_model(bundle, heads, train_shards, context, max_samples)))
        controls.append(row)
    rows += controls
    if controls:
        mean = {
            key: sum(r[key] for r in controls) / len(controls)
            for key in controls[0]
            if key not in ("variant", "heads")
        }
        rows.append({"variant": "random layer-matched (mean)", "heads": [], **mean})
    result = {
        "attribute": attribute,
        "head_score": head_score,
        "scores": {name: s.tolist() for name, s in scores.items()},
        "rows": rows,
    }
    save_json(result, out / "ablation.json")
    atomic_write_text(out / "ablation.md", ablation_markdown(rows))
    if plots:
        plot_scores(scores, out / "head_scores.png", chosen)
    return result


def audit_config(cfg: DictConfig) -> dict[str, Any]:
    """:func:`audit` of a composed ``conf/heads.yaml``; prints the ablation table."""
    for key in ("num_heads", "max_samples"):
        value = cfg.heads[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"heads.{key}={value!r}: expected a positive integer")
    if cfg.heads.score not in HEAD_SCORES:
        raise ValueError(f"heads.score={cfg.heads.score!r}: expected one of {list(HEAD_SCORES)}")
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
    )  # fmt: skip
    print(ablation_markdown(result["rows"]))
    return result
