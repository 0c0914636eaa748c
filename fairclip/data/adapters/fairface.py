"""FairFace (Kärkkäinen & Joo, 2021): label CSV + image folder -> eval shards.

The CSV has columns ``file, age, gender, race, service_test``; ``file`` is relative to the
image root (``val/1.jpg``). Raw labels are mapped to the vocabularies of
``conf/data/fairface.yaml`` by ``label_map`` in ``conf/source/fairface.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from fairclip.data.adapters.labelled import (
    Record,
    config_mapping,
    map_value,
    read_csv_rows,
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
    header, rows = read_csv_rows(path, COLUMNS, "a FairFace label CSV")
    if service_test_only and "service_test" not in header:
        raise ValueError(f"{path}: service_test_only=true needs a service_test column")
    records = []
    for line, row in rows:
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
