"""What every label-file adapter shares: records, label mapping, and writing labelled shards
with their summary."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fairclip.data.shards import IMAGE_EXTENSIONS, write_shards
from fairclip.files import atomic_write_text

log = logging.getLogger(__name__)

MISSING_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class Record:
    """One labelled image: where it is, its WebDataset key and its attribute labels."""

    path: Path
    key: str
    labels: dict[str, Any]


def sample_key(relative: str) -> str:
    """A WebDataset key from a relative image path: no dots or slashes (they split keys)."""
    return relative.replace("\\", "/").replace("/", "_").replace(".", "_")


def image_extension(path: Path, where: str) -> str:
    ext = path.suffix.lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(
            f"{where}: {path.name!r} is not an image (expected one of {IMAGE_EXTENSIONS})"
        )
    return ext


def map_value(raw: str, mapping: Mapping[str, str], field: str, where: str, config_key: str) -> str:
    """Raw label -> vocabulary value; an unknown label names the file, field and config key."""
    if raw not in mapping:
        raise ValueError(
            f"{where}: {field}={raw!r} is not in {config_key} (expected one of {list(mapping)})"
        )
    return str(mapping[raw])


def config_mapping(cfg: DictConfig, key: str) -> dict[str, dict[str, str]]:
    node = OmegaConf.select(cfg, key)
    if node is None:
        raise ValueError(f"{key}: expected a mapping attribute -> raw label -> value")
    return {
        str(a): {str(k): str(v) for k, v in m.items()}
        for a, m in OmegaConf.to_container(node, resolve=True).items()
    }


def read_csv_rows(
    path: Path, required: Sequence[str], what: str
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """``(header, [(line, row)])`` of a label CSV; a missing column or a short row names the
    file (and line) and the columns ``what`` (e.g. "a FairFace label CSV") must have."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; expected {what} with columns "
                f"{list(required)}, got {header}"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            if None in row.values():  # csv leaves the missing fields of a short row as None
                raise ValueError(
                    f"{path}:{line}: row has {sum(v is not None for v in row.values())} fields, "
                    f"expected the {len(header)} columns {header}"
                )
            rows.append((line, row))
    return header, rows


def check_policy(cfg: DictConfig) -> str:
    policy = cfg.get("missing_images", "error")
    if policy not in MISSING_POLICIES:
        raise ValueError(f"missing_images={policy!r}: expected one of {list(MISSING_POLICIES)}")
    return policy


def write_labelled_shards(
    records: Sequence[Record],
    cfg: DictConfig,
    source: str,
    skipped: Mapping[str, int] | None = None,
    caption: str | None = None,
) -> dict[str, int]:
    """Write ``records`` to ``cfg.out/cfg.split`` and return the counts ``fairclip-data`` prints.

    Counts: ``<split>`` (samples written), ``missing_images``, the adapter's own ``skipped``
    reasons (e.g. ``malformed_labels``) and ``<attribute>=<value>`` for every label written.
    """
    policy = check_policy(cfg)
    split = str(cfg.split)
    keys = Counter(r.key for r in records)
    duplicated = [k for k, n in keys.items() if n > 1]
    if duplicated:
        raise ValueError(
            f"{source}: {len(duplicated)} duplicated image key(s), e.g. {duplicated[:3]}"
        )
    missing = [r for r in records if not r.path.is_file()]
    if missing and policy == "error":
        raise FileNotFoundError(
            f"{source}: {len(missing)} of {len(records)} image file(s) not found under "
            f"images={str(cfg.images)!r}, e.g. {str(missing[0].path)!r} (check images=, or set "
            "missing_images=skip to skip and count them)"
        )
    if missing:
        log.warning(
            "%s: skipping %d of %d records whose image file is missing, e.g. %s",
            source,
            len(missing),
            len(records),
            missing[0].path,
        )
    missing_set = {r.key for r in missing}
    kept = [r for r in records if r.key not in missing_set]
    if not kept:
        raise ValueError(f"{source}: no images to write (all {len(records)} records skipped)")

    def samples() -> Iterator[dict]:
        for r in kept:
            sample = {
                "__key__": r.key,
                image_extension(r.path, source): r.path.read_bytes(),
                "json": r.labels,
            }
            if caption:
                sample["txt"] = caption
            yield sample

    out_dir = Path(cfg.out) / split
    shards = write_shards(
        samples(), out_dir, prefix=split, shard_size=int(cfg.shard_size), total=len(kept)
    )
    counts: dict[str, int] = {split: sum(s.size for s in shards), "missing_images": len(missing)}
    counts.update({k: int(v) for k, v in (skipped or {}).items()})
    groups = Counter(
        f"{attr}={value}"
        for r in kept
        for attr, value in r.labels.items()
        if isinstance(value, str)
    )
    counts.update(dict(sorted(groups.items())))
    atomic_write_text(
        out_dir / "summary.json",
        json.dumps({"source": source, "counts": counts}, indent=1) + "\n",
    )
    return counts
