"""Report JSON: strict serialisation (NaN -> null), loading with checks, flat metric names.

A report is the dict :func:`fairclip.eval.run.evaluate_model` returns: ``metrics`` nested by
section (``zeroshot``, ``retrieval``, ``skew.<query set>``, ``bias``, ``able``) so readers
find a metric by meaning, and flattened to ``section/.../name`` keys for wandb and
comparisons. Every skew/RB/ABLE name carries its ``k`` and target.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fairclip.files import atomic_write_text

REPORT_SCHEMA = "fairclip.bias_report/1"
COMPARISON_SCHEMA = "fairclip.bias_comparison/1"
DEBIAS_TABLE_SCHEMA = "fairclip.debias_compare/1"
REPORT_FILE = "report.json"


def _clean(obj: Any) -> Any:
    """Replace NaN/inf by None so the file is strict JSON (readable by any parser)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def to_json(report: Mapping[str, Any]) -> str:
    return json.dumps(_clean(report), indent=1, allow_nan=False)


def save_json(report: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    atomic_write_text(path, to_json(report) + "\n")
    return path


def _nan_for_none(obj: Any) -> Any:
    if obj is None:
        return float("nan")
    if isinstance(obj, Mapping):
        return {k: _nan_for_none(v) for k, v in obj.items()}
    return obj


def load_report(source: str | Path) -> dict[str, Any]:
    """Read a ``report.json`` (or a directory holding one); null metrics come back as NaN."""
    path = Path(source)
    if path.is_dir():
        path = path / REPORT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{source}: report not found (expected a {REPORT_FILE} written by fairclip-eval, "
            "or a directory holding one)"
        )
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(report, dict) or report.get("schema") != REPORT_SCHEMA:
        raise ValueError(f"{path}: not a fairclip bias report (expected schema {REPORT_SCHEMA!r})")
    report["metrics"] = _nan_for_none(report.get("metrics", {}))
    report["source"] = str(path)
    return report


def flatten_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """``{"zeroshot/acc": .., "skew/concepts/maxskew@10/gender/eq_opp": .., ...}``."""
    out: dict[str, float] = {}

    def walk(prefix: str, node: Mapping[str, Any]) -> None:
        for key, value in node.items():
            name = f"{prefix}/{key}" if prefix else key
            if isinstance(value, Mapping):
                walk(name, value)
            elif value is None:
                out[name] = float("nan")
            else:
                out[name] = float(value)

    walk("", report.get("metrics", {}))
    return out


def headline_keys(report: Mapping[str, Any]) -> list[str]:
    """The metrics a reader looks at first: accuracy and its worst group, skew and NDKL at the
    smallest k for p* = uniform, model RB/AB, Cramér's V, ABLE, recall@1."""
    flat = flatten_metrics(report)
    settings = report.get("settings", {})
    k = (settings.get("skew_ks") or [10])[0]
    keys = ["zeroshot/acc"]
    for attr in settings.get("attributes", {}):
        keys += [f"zeroshot/worst_group_acc/{attr}", f"zeroshot/group_gap/{attr}"]
        keys += [f"zeroshot/worst_class_group_acc/{attr}", f"zeroshot/class_group_gap/{attr}"]
    for name in report.get("metrics", {}).get("skew", {}):
        for attr in settings.get("attributes", {}):
            keys += [
                f"skew/{name}/maxskew@{k}/{attr}/eq_opp",
                f"skew/{name}/ndkl@{k}/{attr}/eq_opp",
            ]
    for attr in settings.get("attributes", {}):
        keys += [f"bias/rb/{attr}/eq_opp", f"bias/ab/{attr}", f"bias/cramers_v/{attr}"]
    keys += [f"able/able@{k}/{attr}/eq_opp" for attr in settings.get("attributes", {})]
    r1 = (settings.get("recall_ks") or [1])[0]
    keys += [f"retrieval/i2t_R@{r1}", f"retrieval/t2i_R@{r1}"]
    return [key for key in keys if key in flat]
