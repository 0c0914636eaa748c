"""Turn weights into data: keep masks, balanced shards, and the before/after report."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import webdataset as wds  # noqa: E402

from fairclip.balance.annotate import Annotations  # noqa: E402
from fairclip.balance.stats import data_bias, group_label_table  # noqa: E402
from fairclip.data.shards import Shard, write_shards  # noqa: E402
from fairclip.files import atomic_write_text  # noqa: E402


def kept_samples(ann: Annotations, keep: np.ndarray) -> Iterator[dict]:
    """Stream the kept samples (all members, keys unchanged) in the original shard order."""
    if keep.shape != ann.keys.shape:
        raise ValueError(
            f"keep mask has {keep.shape[0]} rows, annotations have {ann.keys.shape[0]}"
        )
    for shard_id, url in enumerate(ann.shards):
        wanted = set(ann.keys[(ann.shard_ids == shard_id) & keep])
        if not wanted:
            continue
        for sample in wds.tarfile_to_samples()(iter([{"url": url}])):
            if sample["__key__"] in wanted:
                yield {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}


def write_balanced_shards(
    ann: Annotations, keep: np.ndarray, out_dir: str | Path, shard_size: int
) -> list[Shard]:
    """Write the kept samples as new shards (atomic, with ``sizes.json``)."""
    out = Path(out_dir)
    if (out / "sizes.json").exists():
        raise FileExistsError(
            f"{out} already holds shards (sizes.json); choose a new balance.output"
        )
    prefix = out.name or "balanced"
    return write_shards(kept_samples(ann, keep), out, prefix, shard_size, total=int(keep.sum()))


def balance_report(
    ann: Annotations, weights: np.ndarray, keep: np.ndarray, targets: Any, extra: dict
) -> dict:
    """Data RB/AB and group x label tables of the raw data, the weights and the sample kept."""
    kw = {"family_sizes": ann.family_sizes, "targets": targets}
    stats = {
        "before": data_bias(ann.s, ann.y, **kw).as_dict(),
        "expected_after": data_bias(ann.s, ann.y, weights=weights, **kw).as_dict(),
        "after": data_bias(ann.s, ann.y, weights=keep.astype(np.float64), **kw).as_dict(),
    }
    table = group_label_table(
        ann.s,
        ann.y,
        family_sizes=ann.family_sizes,
        weights_after=keep.astype(np.float64),
        group_names=ann.group_names(),
        label_names=ann.labels,
    )
    return {
        **extra,
        "rows": int(len(keep)),
        "kept": int(keep.sum()),
        "kept_fraction": float(keep.mean()),
        "families": ann.families,
        "data_bias": stats,
        "group_label_table": table.to_dict(),
        "table_markdown": table.to_markdown(),
    }


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """``balance_report.json``, ``balance_report.md`` and ``balance_rates.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "balance_report.json",
        "md": out / "balance_report.md",
        "png": out / "balance_rates.png",
    }
    atomic_write_text(paths["json"], json.dumps(report, indent=1))
    bias = report["data_bias"]
    lines = [
        f"# Data balancing: {report.get('method', '?')}",
        "",
        f"Kept {report['kept']} of {report['rows']} samples ({report['kept_fraction']:.3f}).",
        "",
        "| | RB | AB | RB per family | AB per family |",
        "|---|---|---|---|---|",
    ]
    for name in ("before", "expected_after", "after"):
        b = bias[name]
        per = (
            ", ".join(f"{x:.3f}" for x in b["rb_per_family"]),
            ", ".join(f"{x:.3f}" for x in b["ab_per_family"]),
        )
        lines.append(f"| {name} | {b['rb']:.4f} | {b['ab']:.4f} | {per[0]} | {per[1]} |")
    lines += ["", "P(label | group), before → after:", "", report["table_markdown"], ""]
    atomic_write_text(paths["md"], "\n".join(lines))
    _plot_rates(report["group_label_table"], paths["png"])
    return paths


def _plot_rates(table: dict, path: Path) -> None:
    groups, labels = table["groups"], table["labels"]
    before = np.asarray(table["before"]) / np.maximum(
        np.asarray(table["group_totals_before"])[:, None], 1
    )
    after = np.asarray(table["after"]) / np.maximum(
        np.asarray(table["group_totals_after"])[:, None], 1
    )
    fig, axes = plt.subplots(
        1, 2, figsize=(max(8, len(labels) * 0.9), 3 + 0.25 * len(groups)), sharey=True
    )
    vmax = max(before.max(), after.max(), 1e-9)
    for ax, data, title in ((axes[0], before, "before"), (axes[1], after, "after")):
        im = ax.imshow(data, aspect="auto", vmin=0, vmax=vmax, cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(groups)), groups, fontsize=8)
        ax.set_title(f"P(label | group), {title}")
    fig.colorbar(im, ax=axes, shrink=0.8)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
