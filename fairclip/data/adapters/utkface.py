"""UTKFace (Zhang et al., 2017): labels in file names -> eval shards.

Names are ``<age>_<gender>_<race>_<date>.jpg`` (``.jpg.chip.jpg`` for the aligned crops);
gender 0 = male, 1 = female; race 0..4 = White, Black, Asian, Indian, Others. A few names in
the release miss a field (e.g. ``39_1_20170116174525125.jpg.chip.jpg``): those and any name
whose codes are out of range are skipped, counted (``malformed_labels``) and warned about.
Ages are binned (``age_bins``) so results compare with FairFace; the exact age is kept as
``age_years`` in the json label.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fairclip.data.adapters.labelled import Record, sample_key, write_labelled_shards
from fairclip.data.shards import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

GENDERS = ("male", "female")
RACES = ("white", "black", "asian", "indian", "others")


def age_bin_labels(edges: Sequence[int]) -> list[str]:
    """``[3, 10, 20]`` -> ``["0-2", "3-9", "10-19", "20+"]`` (FairFace style)."""
    edges = list(edges)
    if not edges or edges != sorted(set(edges)) or edges[0] <= 0:
        raise ValueError(f"age_bins={edges}: expected strictly increasing positive ages")
    lows = [0, *edges]
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(lows[:-1], edges, strict=True)]
    return [*labels, f"{edges[-1]}+"]


def parse_name(name: str, edges: Sequence[int], labels: Sequence[str]) -> dict | None:
    """Labels from a UTKFace file name, or None if it is malformed."""
    fields = name.split(".", 1)[0].split("_")
    if len(fields) != 4 or not all(f.isdigit() for f in fields[:3]):
        return None
    age, gender, race = (int(f) for f in fields[:3])
    if gender >= len(GENDERS) or race >= len(RACES) or age > 130:
        return None
    return {
        "gender": GENDERS[gender],
        "race": RACES[race],
        "age": labels[bisect.bisect_right(list(edges), age)],
        "age_years": age,
    }


def read_utkface(images: str | Path, edges: Sequence[int]) -> tuple[list[Record], list[str]]:
    """Records of every image under ``images`` (recursively) and the malformed names."""
    root = Path(images)
    if not root.is_dir():
        raise FileNotFoundError(f"images={str(images)!r}: UTKFace image folder not found")
    labels = age_bin_labels(edges)
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    )
    if not files:
        raise FileNotFoundError(f"images={str(images)!r}: no image files found")
    records, malformed = [], []
    for path in files:
        parsed = parse_name(path.name, edges, labels)
        if parsed is None:
            malformed.append(path.name)
            continue
        rel = path.relative_to(root).as_posix().split(".", 1)[0]
        records.append(Record(path, sample_key(rel), parsed))
    if malformed:
        log.warning(
            "utkface: skipping %d file(s) whose names do not follow "
            "<age>_<gender>_<race>_<date>.jpg: %s",
            len(malformed),
            malformed[:5],
        )
    return records, malformed


def write_utkface(cfg: DictConfig) -> dict[str, int]:
    """`fairclip-data utkface images=<folder> [out=...]`."""
    edges = OmegaConf.to_container(cfg.age_bins, resolve=True)
    records, malformed = read_utkface(cfg.images, edges)
    return write_labelled_shards(
        records,
        cfg,
        "utkface",
        skipped={"malformed_labels": len(malformed)},
        caption=cfg.get("caption"),
    )
