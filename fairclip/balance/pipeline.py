"""Balancing shards for ``fairclip-balance`` and the ``balance=`` group of ``fairclip-train``.

annotate (one pass, txt+json) -> weights (M4, group-balanced baseline) -> seeded selection
(the cube method, which keeps the weights' balance, or Bernoulli) -> balanced shards or a keep
list + report. The output folder name carries a hash of
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
import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from fairclip.balance.annotate import Annotations, Annotator, annotate_shards
from fairclip.balance.apply import balance_report, write_balanced_shards, write_report
from fairclip.balance.baseline import group_balanced_weights
from fairclip.balance.m4 import (
    M4InfeasibleError,
    acceptance_weights,
    solve_batch,
    solve_streaming,
)
from fairclip.balance.selection import SELECTIONS, select
from fairclip.balance.table import (
    TableSpec,
    annotations_from_table,
    as_arrow,
    read_table,
    write_keep_list,
)
from fairclip.data.shards import list_shards
from fairclip.runtime import CONF_DIR

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


def solver_tolerances(cfg: DictConfig) -> tuple[float, float]:
    """``(eps_r, eps_d)`` the weights are solved at: the configured ones, less the cube
    selection's margin (the rows its landing rounds without balance)."""
    margin = float(cfg.get("selection_margin", 0.0)) if cfg.get("selection") == "cube" else 0.0
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"balance.selection_margin={margin}: expected a value in [0, 1)")
    return float(cfg.eps_r) * (1 - margin), float(cfg.eps_d) * (1 - margin)


def compute_weights(cfg: DictConfig, ann: Annotations) -> tuple[np.ndarray, dict]:
    """Acceptance probabilities ``q`` for the configured method, and solver diagnostics."""
    targets = _targets(cfg, ann)
    common = {"family_sizes": ann.family_sizes, "targets": targets, "eta": cfg.eta}
    eps_r, eps_d = solver_tolerances(cfg)
    if cfg.method == "group":
        return group_balanced_weights(ann.s, **common), {}
    if cfg.solver == "batch":
        try:
            result = solve_batch(
                ann.s, ann.y, num_labels=len(ann.labels), eps_r=eps_r, eps_d=eps_d,
                utility=ann.utility, utility_weight=cfg.utility_weight,
                association=cfg.association, group_names=ann.group_names(), **common,
            )  # fmt: skip
        except M4InfeasibleError as err:
            if eps_r < float(cfg.eps_r):  # say why the tolerances are not the configured ones
                err.args = (
                    f"{err} (The weights are solved at balance.eps_r/eps_d x (1 - "
                    f"balance.selection_margin={cfg.selection_margin}), room for the cube "
                    "selection.)",
                )
            raise
        return result.q, result.summary()
    if cfg.solver == "streaming":
        chunk = int(cfg.stream_chunk)
        chunks = [
            (ann.s[i : i + chunk], ann.y[i : i + chunk]) for i in range(0, len(ann.keys), chunk)
        ]
        duals = solve_streaming(
            chunks, num_labels=len(ann.labels), eps_r=eps_r, eps_d=eps_d,
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
    if cfg.get("selection", "cube") not in SELECTIONS:
        raise ValueError(f"balance.selection={cfg.selection!r}: expected one of {SELECTIONS}")
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
    q, keep, report = _solve_and_select(cfg, ann)
    report["output"] = str(out)
    write_report(report, folder)
    write_balanced_shards(ann, keep, out, cfg.shard_size)
    log.info("balanced %d -> %d samples into %s (report: %s)", len(keep), keep.sum(), out, folder)


def report_dir(out: Path) -> Path:
    """Where the report of the balanced shards in ``out`` lives (beside them)."""
    return out.with_name(out.name + "_report")


def summarize_balance(out: Path, folder: Path | None = None) -> str:
    """The lines ``fairclip-balance`` prints: where the output and report are, the RB/AB of
    the data before, of the weights and of the sample kept, and how many rows were kept."""
    folder = report_dir(out) if folder is None else folder
    report = json.loads((folder / "balance_report.json").read_text())
    lines = [f"balanced: {report.get('output', out)}", f"report: {folder}/balance_report.md"]
    for name, bias in report["data_bias"].items():
        lines.append(f"  {name:15s} RB={bias['rb']:.4f} AB={bias['ab']:.4f}")
    lines.append(f"  kept {report['kept']}/{report['rows']} ({report['kept_fraction']:.3f})")
    return "\n".join(lines)


# -- tables in, keep lists out ----------------------------------------------------------------

KEEP_FILE = "keep.parquet"
TABLE_SUFFIXES = (".parquet", ".csv")
# balance settings that describe shards, not a table's M4 problem
_SHARD_KEYS = ("attributes", "labels", "label_fields", "label_keywords", "group_keywords",
               "utility_field", "shard_size")  # fmt: skip


def is_table(input_spec: Any) -> bool:
    """A parquet or CSV file, or a folder of parquet parts (not a shard folder)."""
    if not isinstance(input_spec, str | Path):
        return False
    p = Path(input_spec)
    if p.suffix.lower() in TABLE_SUFFIXES:
        return True
    return p.is_dir() and any(p.glob("*.parquet")) and not (p / "sizes.json").exists()


def method_settings(**overrides: Any) -> DictConfig:
    """The ``balance=m4`` settings of conf/balance/m4.yaml (one set of defaults for the CLI
    and the Python API) with ``overrides``."""
    raw = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "balance" / "m4.yaml"))
    base = OmegaConf.create({k: v for k, v in raw.items() if k not in _SHARD_KEYS})
    unknown = set(overrides) - set(base)
    if unknown:
        raise ValueError(f"balance settings: unknown {sorted(unknown)}, expected {sorted(base)}")
    return OmegaConf.merge(base, overrides)


def _solve_and_select(cfg: DictConfig, ann: Annotations) -> tuple[np.ndarray, np.ndarray, dict]:
    start = time.perf_counter()
    q, diagnostics = compute_weights(cfg, ann)
    keep = select(q, ann.s, ann.y, ann.family_sizes, int(cfg.seed), str(cfg.selection),
                  int(cfg.selection_cells))  # fmt: skip
    extra = {
        "method": cfg.method,
        "settings": OmegaConf.to_container(cfg, resolve=True),
        "solve_seconds": round(time.perf_counter() - start, 3),
        "solver": diagnostics,
    }
    return q, keep, balance_report(ann, q, keep, _targets(cfg, ann), extra)


def balance_table(table: Any, spec: TableSpec | dict, **settings: Any) -> tuple[pa.Table, dict]:
    """Balance an annotation table (pyarrow, pandas or polars) in Python: the keep list
    (``key, q, keep``) and the report. ``settings`` are ``balance.*`` keys (``eta``,
    ``eps_r``, ``eps_d``, ``solver``, ...), with the CLI's defaults."""
    spec = spec if isinstance(spec, TableSpec) else TableSpec.from_config(spec)
    cfg = _checked(method_settings(**settings))
    ann = annotations_from_table(as_arrow(table), spec)
    q, keep, report = _solve_and_select(cfg, ann)
    keep_table = pa.table({"key": pa.array(list(ann.keys), pa.string()), "q": q, "keep": keep})
    return keep_table, report


def balance_table_file(cfg: DictConfig, input_spec: Any, table_cfg: Any) -> Path:
    """``fairclip-balance input=<table>``: write ``keep.parquet`` and the report into the
    output folder (``balance.output``, else ``<table>_<method>-<settings hash>`` beside it)
    and return it; an existing output with the same settings is reused."""
    if table_cfg is None:
        raise ValueError(
            f"input={input_spec!r} is a table: set table.key, table.attributes and table.labels "
            "(conf/balance.yaml)"
        )
    raw = (
        OmegaConf.to_container(table_cfg, resolve=True)
        if OmegaConf.is_config(table_cfg)
        else table_cfg
    )
    spec = TableSpec.from_config(raw, "table")
    settings = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
                if k not in _SHARD_KEYS}  # fmt: skip
    method = _checked(OmegaConf.create({**settings, "table": raw}))
    src = Path(input_spec)
    out = Path(cfg.output) if cfg.get("output") else src.with_name(
        f"{src.stem}_{cfg.method}-{settings_hash(method)}"
    )  # fmt: skip
    if (out / KEEP_FILE).is_file():
        log.info("reusing the keep list in %s", out)
        return out
    columns = [spec.key, *spec.attributes, *spec.labels] + ([spec.utility] if spec.utility else [])
    ann = annotations_from_table(read_table(src, columns), spec, where=str(src))
    method.pop("table")
    q, keep, report = _solve_and_select(method, ann)
    report["output"] = str(out / KEEP_FILE)
    write_report(report, out)
    write_keep_list(out / KEEP_FILE, ann.keys, q, keep, {"settings": report["settings"]})
    log.info("balanced %d -> %d rows: %s", len(keep), int(keep.sum()), out / KEEP_FILE)
    return out
