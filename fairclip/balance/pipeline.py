"""Balancing shards for ``fairclip-balance`` and the ``balance=`` group of ``fairclip-train``.

annotate (one pass, txt+json) -> weights (M4, group-balanced baseline) -> deterministic keep
mask (seeded Bernoulli) -> balanced shards + report. The output folder name carries a hash of
the balance settings, so changing a setting never silently reuses stale shards, and rerunning
with the same settings reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fairclip.balance.annotate import Annotations, Annotator, annotate_shards
from fairclip.balance.apply import balance_report, write_balanced_shards, write_report
from fairclip.balance.baseline import group_balanced_weights
from fairclip.balance.m4 import acceptance_weights, sample_mask, solve_batch, solve_streaming
from fairclip.data.shards import list_shards

log = logging.getLogger(__name__)
METHODS = ("none", "m4", "group")


def settings_hash(cfg: DictConfig) -> str:
    payload = json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:8]


def resolve_output(cfg: DictConfig, input_spec: Any) -> Path:
    """``balance.output``, or ``<input dir>_<method>-<settings hash>`` beside the input."""
    if cfg.get("output"):
        return Path(cfg.output)
    first = Path(list_shards(input_spec, "balance.input")[0].url).parent
    return first.with_name(f"{first.name}_{cfg.method}-{settings_hash(cfg)}")


def _targets(cfg: DictConfig, ann: Annotations) -> np.ndarray | None:
    """Per-column target shares: uniform by default, ``prior`` keeps a family's data marginal
    (then M4 removes only its associations), or explicit ``{value: share}``."""
    if not cfg.get("targets"):
        return None
    shares = []
    for j, (family, values) in enumerate(ann.families.items()):
        given = cfg.targets.get(family)
        if given is None:
            shares += [1 / len(values)] * len(values)
        elif given == "prior":
            shares += (np.bincount(ann.s[:, j], minlength=len(values)) / len(ann.s)).tolist()
        elif not isinstance(given, DictConfig | dict) or set(given) != set(values):
            raise ValueError(
                f"balance.targets.{family}: expected shares for exactly {values}, got {list(given)}"
            )
        else:
            shares += [float(given[v]) for v in values]
    return np.asarray(shares)


def compute_weights(cfg: DictConfig, ann: Annotations) -> tuple[np.ndarray, dict]:
    """Acceptance probabilities ``q`` for the configured method, and solver diagnostics."""
    targets = _targets(cfg, ann)
    common = {"family_sizes": ann.family_sizes, "targets": targets, "eta": cfg.eta}
    if cfg.method == "group":
        return group_balanced_weights(ann.s, **common), {}
    if cfg.solver == "batch":
        result = solve_batch(
            ann.s, ann.y, num_labels=len(ann.labels), eps_r=cfg.eps_r, eps_d=cfg.eps_d,
            utility=ann.utility, utility_weight=cfg.utility_weight, association=cfg.association,
            **common,
        )  # fmt: skip
        return result.q, result.summary()
    if cfg.solver == "streaming":
        chunk = int(cfg.stream_chunk)
        chunks = [
            (ann.s[i : i + chunk], ann.y[i : i + chunk]) for i in range(0, len(ann.keys), chunk)
        ]
        duals = solve_streaming(
            chunks, num_labels=len(ann.labels), eps_r=cfg.eps_r, eps_d=cfg.eps_d,
            association=cfg.association, epochs=cfg.stream_epochs, seed=cfg.seed, **common,
        )  # fmt: skip
        return acceptance_weights(duals, ann.s, ann.y), {"steps": duals.steps}
    raise ValueError(f"balance.solver={cfg.solver!r}: expected 'batch' or 'streaming'")


def balance_shards(cfg: DictConfig, input_spec: Any) -> Path:
    """Balance ``input_spec`` shards per ``cfg`` (the ``balance`` group); return the output dir.

    Reuses an existing output with the same settings. One process writes: ``fairclip-balance``,
    or global rank 0 in :meth:`ShardDataModule.prepare_data` while the other ranks wait at
    Lightning's barrier and then read the result with :func:`balanced_shards`.
    """
    out = resolve_output(_checked(cfg), input_spec)
    if (out / "sizes.json").exists():
        _check_same_settings(out, cfg)
        log.info("reusing balanced shards in %s", out)
        return out
    _balance(cfg, input_spec, out)
    return out


def balanced_shards(cfg: DictConfig, input_spec: Any) -> Path:
    """The balanced shards :func:`balance_shards` wrote for these settings; an error if there
    are none (a rank that reads them before global rank 0 has written them)."""
    out = resolve_output(_checked(cfg), input_spec)
    if not (out / "sizes.json").exists():
        raise FileNotFoundError(
            f"balance: {out} holds no sizes.json: balanced shards are written by "
            "fairclip-balance or by global rank 0 in ShardDataModule.prepare_data"
        )
    _check_same_settings(out, cfg)
    return out


class ShardBalancer:
    """What :class:`fairclip.data.datamodule.ShardDataModule` calls to train on balanced shards
    (``balance=m4|group``): ``write`` on global rank 0 in ``prepare_data``, ``output`` on every
    rank in ``setup``."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = _checked(cfg)

    def write(self, input_spec: Any) -> Path:
        return balance_shards(self.cfg, input_spec)

    def output(self, input_spec: Any) -> Path:
        return balanced_shards(self.cfg, input_spec)


def _checked(cfg: DictConfig) -> DictConfig:
    if cfg.method not in METHODS:
        raise ValueError(f"balance.method={cfg.method!r}: expected one of {METHODS}")
    return cfg


def _check_same_settings(out: Path, cfg: DictConfig) -> None:
    """Reuse balanced shards only if they were made with these settings (an explicit
    ``balance.output`` is not keyed by them, unlike the default output name)."""
    report = report_dir(out) / "balance_report.json"
    if not report.is_file():
        return
    old = json.loads(report.read_text()).get("settings", {})
    new = OmegaConf.to_container(cfg, resolve=True)
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k)]  # fmt: skip
    if changed:
        raise FileExistsError(
            f"balance.output={out}: holds shards balanced with other settings "
            f"({'; '.join(changed)}); choose a new balance.output, or delete it to rebuild"
        )


def _balance(cfg: DictConfig, input_spec: Any, out: Path) -> None:
    """Annotate, solve, sample and write the balanced shards and their report (rank 0)."""
    shards = list_shards(input_spec, "balance.input")
    annotator = Annotator(
        cfg.attributes,
        cfg.labels,
        cfg.label_fields,
        cfg.label_keywords,
        cfg.group_keywords,
        cfg.utility_field,
    )
    ann = annotate_shards(shards, annotator)
    folder = report_dir(out)
    ann.save(folder / "annotations.parquet")
    start = time.perf_counter()
    q, diagnostics = compute_weights(cfg, ann)
    keep = sample_mask(q, cfg.seed)
    extra = {
        "method": cfg.method,
        "settings": OmegaConf.to_container(cfg, resolve=True),
        "solve_seconds": round(time.perf_counter() - start, 3),
        "solver": diagnostics,
        "output": str(out),
    }
    report = balance_report(ann, q, keep, _targets(cfg, ann), extra)
    write_report(report, folder)
    write_balanced_shards(ann, keep, out, cfg.shard_size)
    log.info("balanced %d -> %d samples into %s (report: %s)", len(keep), keep.sum(), out, folder)


def report_dir(out: Path) -> Path:
    """Where the report of the balanced shards in ``out`` lives (beside them)."""
    return out.with_name(out.name + "_report")


def summarize_balance(out: Path) -> str:
    """The lines ``fairclip-balance`` prints: where the shards and report are, RB/AB, kept."""
    folder = report_dir(out)
    report = json.loads((folder / "balance_report.json").read_text())
    lines = [f"balanced shards: {out}", f"report: {folder}/balance_report.md"]
    for name, bias in report["data_bias"].items():
        lines.append(f"  {name:15s} RB={bias['rb']:.4f} AB={bias['ab']:.4f}")
    lines.append(f"  kept {report['kept']}/{report['rows']} ({report['kept_fraction']:.3f})")
    return "\n".join(lines)
