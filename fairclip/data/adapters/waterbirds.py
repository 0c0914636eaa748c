"""Waterbirds (Sagawa et al., 2020): ``metadata.csv`` + image folder -> eval shards.

The CSV has columns ``img_id, img_filename, y, split, place``: ``y`` the bird (0 land,
1 water), ``place`` the background (0 land, 1 water), ``split`` 0/1/2 = train/val/test, and
``img_filename`` relative to the dataset folder. ``label_map`` in
``conf/source/waterbirds.yaml`` names the codes; the bird becomes the zero-shot class
(``data=waterbirds``: ``label_key: bird``), the place the spurious group attribute.
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

COLUMNS = ("img_filename", "y", "split", "place")
SPLITS = {"train": "0", "val": "1", "test": "2"}


def read_waterbirds(
    labels: str | Path, images: str | Path, values: dict[str, dict[str, str]], split: str | None
) -> list[Record]:
    """Records of a Waterbirds ``metadata.csv`` (one official split, or all with ``None``)."""
    path = Path(labels)
    if not path.is_file():
        raise FileNotFoundError(f"labels={str(labels)!r}: Waterbirds metadata.csv not found")
    if split is not None and split not in SPLITS:
        raise ValueError(f"partition={split!r}: expected one of {list(SPLITS)} or null")
    for field in ("bird", "background"):
        if field not in values:
            raise ValueError(f"label_map.{field}: missing (raw code -> value)")
    _, rows = read_csv_rows(path, COLUMNS, "a Waterbirds metadata.csv")
    records = []
    for line, row in rows:
        if split is not None and row["split"].strip() != SPLITS[split]:
            continue
        where = f"{path}:{line}"
        labels_out = {
            "bird": map_value(row["y"].strip(), values["bird"], "y", where, "label_map.bird"),
            "background": map_value(
                row["place"].strip(), values["background"], "place", where,
                "label_map.background",
            ),
        }  # fmt: skip
        file = row["img_filename"].strip()
        key = sample_key(Path(file).with_suffix("").as_posix())
        records.append(Record(Path(images) / file, key, labels_out))
    if not records:
        raise ValueError(f"{path}: no rows selected (partition={split!r})")
    return records


def write_waterbirds(cfg: DictConfig) -> dict[str, int]:
    """`fairclip-data source=waterbirds labels=<metadata.csv> images=<dataset folder>`."""
    partition = cfg.get("partition")
    records = read_waterbirds(
        cfg.labels, cfg.images, config_mapping(cfg, "label_map"),
        None if partition is None else str(partition),
    )  # fmt: skip
    return write_labelled_shards(records, cfg, "waterbirds", caption=cfg.get("caption"))
