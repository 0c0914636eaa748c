"""Bias evaluation of any CLIP-like model on labelled WebDataset shards.

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

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm import tqdm

from fairclip.data.stream import stream_loader
from fairclip.eval.encoding import ImageCache, TextSide, encode_text_side, eval_stream, split_passes
from fairclip.eval.spec import (
    SPLITS,
    EvalSpec,
    resolve_splits,
    spec_from_cfg,
    warn_if_ks_cover_split,
)
from fairclip.files import atomic_write_text
from fairclip.loading import load_model
from fairclip.metrics import (
    CramersV,
    GroupZeroShotAccuracy,
    ModelBias,
    RetrievalRecall,
    SkewMetrics,
    able,
)
from fairclip.metrics.folds import FoldedRetrieval, FoldedZeroShot
from fairclip.metrics.group_counts import GroupCounts
from fairclip.model.encode import eval_mode, model_dtype
from fairclip.report import compare_reports, log_to_wandb, write_report
from fairclip.report.io import REPORT_SCHEMA
from fairclip.report.protocol import protocol_markdown
from fairclip.runtime import stable_id

log = logging.getLogger(__name__)


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
                    {a: attrs[a] for a in qs.attributes},
                    ks=spec.skew_ks,
                    targets=spec.targets,
                    whole_ranking=spec.whole_ranking,
                )
                for qs in spec.query_sets
            }
        )
        # the SEM paper's split-half protocol (spec.folds), beside the whole-split metrics
        folds = spec.folds
        self.folded = torch.nn.ModuleDict(
            {
                f"q_{qs.name}": FoldedRetrieval(attrs, folds, qs.attributes, qs.relevant)
                for qs in spec.query_sets
            }
            if folds is not None
            else {}
        )
        self.folded_zero_shot = (
            FoldedZeroShot(attrs, len(spec.concepts), folds)
            if folds is not None and spec.concepts
            else None
        )
        n_assoc = len(spec.association_words)
        self.bias = torch.nn.ModuleDict(
            {t: ModelBias(attrs, n_assoc, target=t) for t in spec.targets} if n_assoc else {}
        )
        self.cramers = torch.nn.ModuleDict(
            {f"a_{a}": CramersV(len(v), n_assoc) for a, v in attrs.items()} if n_assoc else {}
        )
        self.counts = torch.nn.ModuleDict({f"s_{s}": GroupCounts(attrs) for s in SPLITS})


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
            scores = img @ text.queries[qs.name].T
            metrics.skew[f"q_{qs.name}"].update(scores, groups[:, columns])
            if metrics.folded:
                metrics.folded[f"q_{qs.name}"].update(scores, groups)
    if "eval" in roles:
        if text.concepts is not None and bool(labelled.any()):
            preds = (img[labelled] @ text.concepts.T).argmax(dim=1)
            metrics.zero_shot.update(preds, concepts[labelled], groups[labelled])
            if metrics.folded_zero_shot is not None:
                metrics.folded_zero_shot.update(preds, concepts[labelled], groups[labelled])
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
        dtype = model_dtype(model)
        for shards, roles in split_passes(splits, used):
            cache_key = repr((shards, rank, world_size, dict(spec.attributes), spec.concepts,
                              spec.label_key))  # fmt: skip
            cached = image_cache.passes.get(cache_key) if image_cache is not None else None
            if cached is not None:
                for batch, img in cached:
                    _update(metrics, spec, text, model, batch, img, roles)
                continue
            key = f"splits.{roles[0]}"
            stream = eval_stream(
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
    if metrics.folded:
        folded: dict[str, Any] = {
            "retrieval": {
                qs.name: metrics.folded[f"q_{qs.name}"].compute() for qs in spec.query_sets
            }
        }
        if metrics.folded_zero_shot is not None and "zeroshot" in out:
            folded["zeroshot"] = metrics.folded_zero_shot.compute()
        out["folds"] = folded
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
            "folds": dataclasses.asdict(spec.folds) if spec.folds is not None else None,
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


def evaluate_config(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.model`` (or compare ``cfg.compare`` reports) and write the outputs."""
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
    if cfg.get("protocol"):  # the paper's table layout, beside report.md
        protocol = OmegaConf.to_container(cfg.protocol, resolve=True)
        table = protocol_markdown(report, protocol)
        files["protocol"] = atomic_write_text(out_dir / "protocol.md", table + "\n")
        print(table)
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
