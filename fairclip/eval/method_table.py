"""One table comparing debiasing methods.

Why one command: every row (plain CLIP, Orth-Proj, SEM_i, SEM_b, SEM_bi, ...) is a
:class:`DebiasedCLIP` built from the same trained model and judged by the same
:func:`evaluate_model`, so the numbers are comparable by construction."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fairclip.data.shards import list_shards
from fairclip.debias.debiased_clip import DebiasedCLIP
from fairclip.eval.encoding import ImageCache
from fairclip.eval.method_context import SAE_FILE, MethodContext, eval_view, query_set
from fairclip.eval.method_diagnostics import class_lean, skew_by_depth, summarize
from fairclip.eval.run import evaluate_model, resolve_device
from fairclip.eval.spec import resolve_splits, sibling_split, spec_from_cfg, warn_if_ks_cover_split
from fairclip.files import atomic_write_text
from fairclip.loading import load_model
from fairclip.model.factory import ModelBundle
from fairclip.report.io import DEBIAS_TABLE_SCHEMA, to_json
from fairclip.report.method_table import (
    DEPTH_PLOT,
    log_compare_to_wandb,
    markdown_table,
    plot_skew_by_depth,
    rows_markdown,
    score_gap_note,
    seeds_note,
)
from fairclip.report.protocol import protocol_methods_markdown

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """One row's builder ``(bundle, ctx) -> DebiasedCLIP`` (its settings bound) and whether
    it depends on the seed (an unseeded row is evaluated once over several seeds)."""

    build: Callable[..., Any]
    seeded: bool


def method_builders(cfg: DictConfig) -> dict[str, Method]:
    """The methods the config group ``methods`` composed, in order, each instantiated from its
    ``build`` node (``_target_`` + settings, ``_partial_: true``): Hydra imports only the
    chosen methods' modules."""
    if not OmegaConf.is_dict(cfg.get("methods")) or not cfg.methods:
        raise ValueError(
            f"methods={cfg.get('methods')!r}: expected a selection of the config group "
            "methods, e.g. methods=[clip,orth_proj,sem_i]"
        )
    out = {}
    for name, node in cfg.methods.items():
        if not OmegaConf.is_dict(node) or "build" not in node or "_target_" not in node.build:
            raise ValueError(
                f"methods.{name}: expected {{seeded: bool, build: {{_target_: <builder>, "
                "_partial_: true, ...settings}}}} (see conf/methods/)"
            )
        out[str(name)] = Method(instantiate(node.build), bool(node.get("seeded", True)))
    return out


def compare_methods(cfg: DictConfig) -> dict[str, Any]:
    """Build and evaluate every method of ``cfg.methods``; write compare.{md,json}."""
    methods = method_builders(cfg)
    for key in ("table_k", "recall_k"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key}={value!r}: expected a positive integer")
    spec = spec_from_cfg(eval_view(cfg))
    if cfg.attribute not in spec.attributes:
        raise ValueError(f"attribute={cfg.attribute!r}: expected one of {list(spec.attributes)}")
    if str(cfg.query_set) == "concepts" and not spec.concepts:
        raise ValueError(
            "query_set=concepts: data.concepts is empty (a face dataset without concept "
            "labels); set query_set to one of the prompts' query sets: "
            f"{[q.name for q in spec.query_sets]}"
        )
    query_set(spec, str(cfg.query_set))
    torch.manual_seed(int(cfg.seed))
    device = resolve_device(cfg.device)
    bundle = load_model(
        str(cfg.model.name), pretrained=cfg.model.pretrained, config_file=cfg.model.config_file,
        precision=cfg.model.precision, device=device,
    )  # fmt: skip
    path = Path(str(cfg.model.name))
    run_dir = path if path.is_dir() else None
    if path.is_file() and path.parent.name == "checkpoints":  # <run dir>/checkpoints/last.ckpt
        run_dir = path.parent.parent
    if run_dir is not None and run_dir.name == "export" and not (run_dir / SAE_FILE).exists():
        run_dir = run_dir.parent
    splits = resolve_splits(cfg.splits.eval, cfg.splits.neutral)
    depth_ks = _depth_ks(cfg, splits["eval"])
    select = _selection_split(cfg.splits.get("select", "auto"), splits["eval"])
    options = {
        "attributes": spec.attributes,
        "concepts": spec.concepts,
        "attribute": str(cfg.attribute),
        "spec": spec,
        "splits": splits,
        "eval_shards": splits["eval"],
        "neutral_shards": splits["neutral"],
        "select_shards": select,
        "train_shards": OmegaConf.select(
            cfg, "data.train_shards", throw_on_resolution_failure=False
        ),
        "seed": int(cfg.seed),
        "batch_size": int(cfg.batch_size),
        "group_prompts": spec.group_prompts.get(str(cfg.attribute)),
        # joint heads choose their epoch by this evaluation (on the held-out split if any)
        "select_evaluate": functools.partial(
            evaluate_model,
            tokenizer=bundle.tokenizer,
            preprocess=bundle.preprocess_val,
            spec=spec,
            splits=resolve_splits(select, "auto") if select is not None else splits,
            device=device,
            num_workers=0,
            progress=False,
        ),  # fmt: skip
    }
    out_dir = Path(cfg.output_dir)
    seeds = _seeds(cfg)
    runs: list[SeedRun] = []
    cache: dict[str, torch.Tensor] = {}
    images = ImageCache()
    for seed in seeds:
        torch.manual_seed(seed)
        ctx = MethodContext(
            cfg, bundle, device, run_dir=run_dir, options={**options, "seed": seed}, cache=cache,
            images=images,
        )  # fmt: skip
        models_dir = out_dir / "models" / (f"seed{seed}" if len(seeds) > 1 else "")
        first = runs[0] if runs else None
        runs.append(
            _evaluate_methods(cfg, methods, bundle, ctx, spec, splits, depth_ks, models_dir, first)
        )
    rows, depth, sae_info, spread = runs[0].rows, runs[0].depth, runs[0].sae, {}
    if len(seeds) > 1:
        rows = _mean_rows([r.rows for r in runs])
        depth = _mean_rows([r.depth for r in runs])
        sae_info = _mean_sae_info([r.sae for r in runs])
        spread = _spread([r.rows for r in runs])
    table = markdown_table(rows, sae_info)
    if len(seeds) > 1:
        table += seeds_note(seeds, spread)
    selected_on = options["select_shards"] or splits["eval"]
    if any(str(m).startswith("joint") for m in cfg.methods):
        leaks = str(selected_on) == str(splits["eval"])
        leak = " (the reported split itself: set splits.select)" if leaks else ""
        table += f"\n\nJoint heads: {_joint_selection(cfg, spec)} on {selected_on}{leak}."
    result = {
        "schema": DEBIAS_TABLE_SCHEMA,
        "model": str(cfg.model.name),
        "attribute": cfg.attribute,
        "query_set": str(cfg.query_set),
        "target": cfg.target,
        "k": int(cfg.table_k),
        "selected_on": selected_on,
        "rows": rows,
        "depth_ks": depth_ks,
        "depth": depth,
        "sae": sae_info,
        "metrics": runs[0].reports,
    }
    if len(seeds) > 1:
        result["seeds"] = seeds
        result["per_seed"] = [
            {"seed": seed, "rows": r.rows, "depth": r.depth, "sae": r.sae}
            for seed, r in zip(seeds, runs, strict=True)
        ]
        result["spread"] = spread
    gap = ctx.score_gap()  # the base model's: the same in every seed's context
    if gap is not None:
        result["score_gap"] = gap
        table += score_gap_note(gap, str(cfg.attribute))
    queries = "" if cfg.query_set == "concepts" else f", query set {cfg.query_set}"
    table += (
        f"\n\nBy ranking depth ({cfg.attribute}, {cfg.target}{queries}; plot: {DEPTH_PLOT}):\n\n"
        + "\n".join(rows_markdown(depth))
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("protocol"):  # the paper's table layout, one row per method
        protocol = OmegaConf.to_container(cfg.protocol, resolve=True)
        paper = protocol_methods_markdown([r.reports for r in runs], protocol, str(cfg.attribute))
        atomic_write_text(out_dir / "protocol.md", paper + "\n")
        result["protocol"] = protocol["name"]
        table += "\n\n" + paper
    plot_skew_by_depth(depth, depth_ks, out_dir / DEPTH_PLOT, str(cfg.query_set))
    atomic_write_text(out_dir / "compare.md", table + "\n")
    atomic_write_text(out_dir / "compare.json", to_json(result) + "\n")
    log_compare_to_wandb(cfg, result, out_dir)
    print(table)
    return result


@dataclass
class SeedRun:
    """Every row of one seed: table columns, skew by depth, full metrics, the SAE line."""

    rows: dict[str, dict[str, float]]
    depth: dict[str, dict[str, float]]
    reports: dict[str, Any]
    sae: dict[str, Any]


def embeds_images_as_base(model: Any, bundle: ModelBundle) -> bool:
    """Whether ``model`` embeds images exactly as the base model does (a row that edits only
    text), so that it may reuse the base model's image embeddings."""
    if model is bundle.model:
        return True
    return (
        isinstance(model, DebiasedCLIP)
        and model.model is bundle.model
        and not model.image
        and not model.vision_patches
    )


def _evaluate_methods(
    cfg: DictConfig,
    methods: Mapping[str, Method],
    bundle: ModelBundle,
    ctx: MethodContext,
    spec: Any,
    splits: Mapping[str, Any],
    depth_ks: Sequence[int],
    models_dir: Path,
    first: SeedRun | None = None,
) -> SeedRun:
    """Build and evaluate every row of ``cfg.methods`` with one context (one seed).

    Rows of unseeded methods are copied from ``first`` (the first seed's run) when given.
    """
    rows, reports, depth = {}, {}, {}
    for name in cfg.methods:
        if first is not None and not methods[name].seeded:
            rows[name], depth[name] = dict(first.rows[name]), dict(first.depth[name])
            reports[name] = first.reports[name]
            continue
        model = methods[name].build(bundle, ctx)
        report = evaluate_model(
            model, bundle.tokenizer, bundle.preprocess_val, spec, splits, device=ctx.device,
            batch_size=int(cfg.batch_size), num_workers=int(cfg.num_workers),
            progress=bool(cfg.progress),
            image_cache=ctx.images if embeds_images_as_base(model, bundle) else None,
        )  # fmt: skip
        reports[name] = {**report["metrics"], "cells": report["cells"]}
        queries = str(cfg.query_set)
        rows[name] = summarize(
            report, cfg.attribute, cfg.target, int(cfg.table_k), int(cfg.recall_k), queries
        )
        rows[name]["class_lean"] = class_lean(model, bundle, ctx)
        depth[name] = skew_by_depth(report, cfg.attribute, cfg.target, depth_ks, queries)
        if cfg.save_models:
            model.save(models_dir / name)
        log.info("seed %s, %s: %s", ctx["seed"], name, rows[name])
    return SeedRun(rows, depth, reports, dict(ctx.sae_info))


def _seeds(cfg: DictConfig) -> list[int]:
    """``seeds`` (a list: one refit of every row per seed, the table their mean) or ``[seed]``.

    Why: the SAE behind SEM, the joint heads and the random heads are trained from a random
    start, and on a small model one seed's row can differ from the next by more than the
    effect being measured; the mean and the per-seed spread say how much a row depends on it.
    """
    seeds = cfg.get("seeds")
    if seeds is None:
        return [int(cfg.seed)]
    if (
        not OmegaConf.is_list(seeds)
        or not seeds
        or any(isinstance(v, bool) or not isinstance(v, int) for v in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ValueError(f"seeds={seeds!r}: expected null or a list of distinct integers")
    return [int(v) for v in seeds]


def _mean_rows(per_seed: Sequence[Mapping[str, Mapping[str, float]]]) -> dict:
    """Row-wise, column-wise mean over seeds."""
    first = per_seed[0]
    return {
        name: {col: sum(r[name][col] for r in per_seed) / len(per_seed) for col in cols}
        for name, cols in first.items()
    }


def _spread(per_seed: Sequence[Mapping[str, Mapping[str, float]]]) -> dict:
    """``{row: {column: {"std", "min", "max"}}}`` over seeds (population std)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, cols in per_seed[0].items():
        out[name] = {}
        for col in cols:
            vals = torch.tensor([r[name][col] for r in per_seed], dtype=torch.float64)
            out[name][col] = {
                "std": float(vals.std(unbiased=False)),
                "min": float(vals.min()),
                "max": float(vals.max()),
            }
    return out


def _mean_sae_info(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The SAE line under the table: numeric values averaged over seeds."""
    if not per_seed[0]:
        return {}
    return {
        k: sum(i[k] for i in per_seed) / len(per_seed) if isinstance(v, float) else v
        for k, v in per_seed[0].items()
    }


def _depth_ks(cfg: DictConfig, eval_shards: Any) -> list[int]:
    """``table_k`` and ``skew_ks`` (validated by the eval spec), sorted; a k beyond the eval
    split's size is warned about (the whole balanced split has no skew: that column is moot)."""
    ks = [int(cfg.table_k), *(int(k) for k in cfg.skew_ks)]
    warn_if_ks_cover_split(ks, eval_shards)
    return sorted(set(ks))


def _joint_selection(cfg: DictConfig, spec: Any) -> str:
    """How the joint heads of the table chose their epoch (the first joint method's setting)."""
    name = next(str(m) for m in cfg.methods if str(m).startswith("joint"))
    select = OmegaConf.select(cfg, f"methods.{name}.build.select") or {}
    every, patience = select.get("every", 2), select.get("patience", 10)
    if select.get("score", "able") == "able_depths":
        what = "ABLE averaged over k = " + ", ".join(str(k) for k in spec.skew_ks)
    else:
        what = f"ABLE@{spec.skew_ks[0]}"
    return f"epoch selected by {what} every {every} epochs, patience {patience},"


def _selection_split(select: Any, eval_shards: Any) -> Any:
    """``splits.select``: where methods make choices (joint heads' epoch). ``auto`` is the eval
    split's sibling ``val`` folder when there is one, else None (choices on the eval split)."""
    if select is None:
        return None
    if select != "auto":
        select = OmegaConf.to_container(select) if OmegaConf.is_config(select) else select
        list_shards(select, "splits.select")  # a missing split fails now, naming this key
        return select
    found = sibling_split(eval_shards, "val")
    if found is None:
        log.warning("splits.select: no val/ beside %s; joint heads select on the eval split",
                    eval_shards)  # fmt: skip
    return found
