"""FairFace (Kärkkäinen & Joo, 2021): label CSV + image folder -> eval shards.

The CSV has columns ``file, age, gender, race, service_test``; ``file`` is relative to the
image root (``val/1.jpg``). Raw labels are mapped to the vocabularies of
``conf/data/fairface.yaml`` by ``label_map`` in ``conf/source/fairface.yaml``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from omegaconf import DictConfig

from fairclip.data.adapters.labelled import (
    Record,
    config_mapping,
    map_value,
    sample_key,
    write_labelled_shards,
)

COLUMNS = ("file", "age", "gender", "race")


def read_fairface(
    labels: str | Path,
    images: str | Path,
    values: dict[str, dict[str, str]],
    service_test_only: bool,
) -> list[Record]:
    """Records of a FairFace label CSV; unknown labels raise with the line number."""
    path = Path(labels)
    if not path.is_file():
        raise FileNotFoundError(f"labels={str(labels)!r}: FairFace label CSV not found")
    for attr in ("age", "gender", "race"):
        if attr not in values:
            raise ValueError(
                f"label_map.{attr}: missing raw label mapping for FairFace column {attr!r}"
            )
    records = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; expected a FairFace label CSV with "
                f"columns {list(COLUMNS) + ['service_test']}, got {header}"
            )
        if service_test_only and "service_test" not in header:
            raise ValueError(f"{path}: service_test_only=true needs a service_test column")
        for line, row in enumerate(reader, start=2):
            if None in row.values():  # csv leaves the missing fields of a short row as None
                raise ValueError(
                    f"{path}:{line}: row has {sum(v is not None for v in row.values())} fields, "
                    f"expected the {len(header)} columns {header}"
                )
            if service_test_only and row["service_test"].strip().lower() != "true":
                continue
            where = f"{path}:{line}"
            labels_out = {
                attr: map_value(row[attr].strip(), values[attr], attr, where, f"label_map.{attr}")
                for attr in ("gender", "race", "age")
            }
            file = row["file"].strip()
            records.append(
                Record(
                    Path(images) / file,
                    sample_key(Path(file).with_suffix("").as_posix()),
                    labels_out,
                )
            )
    if not records:
        raise ValueError(f"{path}: no rows selected")
    return records


def write_fairface(cfg: DictConfig) -> dict[str, int]:
    """`fairclip-data fairface labels=<csv> images=<root> [out=...] [missing_images=skip]`."""
    records = read_fairface(
        cfg.labels, cfg.images, config_mapping(cfg, "label_map"), bool(cfg.service_test_only)
    )
    return write_labelled_shards(records, cfg, "fairface", caption=cfg.get("caption"))
