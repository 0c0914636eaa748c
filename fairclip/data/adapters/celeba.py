"""CelebA (Liu et al., 2015): ``list_attr_celeba.txt`` + image folder -> eval shards.

The attribute file has the image count on line 1, the 40 attribute names on line 2, then
``<file> ±1 ... ±1`` per image. ``attributes`` in ``conf/source/celeba.yaml`` turns columns
into labels: a binary column (``{column, positive, negative}``: ``Male`` -> gender male/female,
``Blond_Hair`` -> blond hair/dark hair) or a one-hot family (``{columns: {column: value},
otherwise}``: the hair colours; an image takes the first listed column that is 1, else
``otherwise``). An optional ``list_eval_partition.txt`` restricts the output to one official
split.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fairclip.data.adapters.labelled import Record, sample_key, write_labelled_shards

PARTITIONS = {"train": "0", "val": "1", "test": "2"}


def read_partition(path: str | Path, partition: str) -> set[str]:
    if partition not in PARTITIONS:
        raise ValueError(f"partition={partition!r}: expected one of {list(PARTITIONS)}")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"partition_file={str(path)!r}: list_eval_partition.txt not found")
    keep = set()
    for line, text in enumerate(file.read_text().splitlines(), start=1):
        parts = text.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in PARTITIONS.values():
            raise ValueError(f"{file}:{line}: expected '<file> <0|1|2>', got {text!r}")
        if parts[1] == PARTITIONS[partition]:
            keep.add(parts[0])
    return keep


def read_celeba(
    labels: str | Path,
    images: str | Path,
    attributes: dict[str, dict[str, str]],
    keep: set[str] | None = None,
) -> list[Record]:
    """Records of a CelebA attribute file; format errors name the file and line."""
    path = Path(labels)
    if not path.is_file():
        raise FileNotFoundError(f"labels={str(labels)!r}: list_attr_celeba.txt not found")
    lines = path.read_text().splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise ValueError(f"{path}:1: expected the image count, then the attribute names")
    names = lines[1].split()
    families = {a: _family(a, spec, names, path) for a, spec in attributes.items()}
    rows = [line.split() for line in lines[2:] if line.strip()]
    if len(rows) != int(lines[0]):
        raise ValueError(f"{path}: line 1 says {int(lines[0])} images, found {len(rows)} rows")
    records = []
    for line, row in enumerate(rows, start=3):
        if len(row) != len(names) + 1:
            raise ValueError(
                f"{path}:{line}: expected a file name and {len(names)} values, got {len(row)} fields"
            )
        if keep is not None and row[0] not in keep:
            continue
        out = {}
        for attr, (family, otherwise) in families.items():
            out[attr] = otherwise
            for col, label in family:
                value = row[col + 1]
                if value not in ("1", "-1"):
                    raise ValueError(f"{path}:{line}: {names[col]}={value!r}, expected 1 or -1")
                if value == "1":
                    out[attr] = label
                    break
        records.append(Record(Path(images) / row[0], sample_key(Path(row[0]).stem), out))
    if not records:
        raise ValueError(f"{path}: no images selected")
    return records


def _family(
    name: str, spec: dict, names: list[str], path: Path
) -> tuple[list[tuple[int, str]], str]:
    """``([(column index, label if 1)], label if none is 1)`` of one configured attribute."""
    key = f"attributes.{name}"
    if "columns" in spec:
        if "otherwise" not in spec or not isinstance(spec["columns"], dict) or not spec["columns"]:
            raise ValueError(f"{key}: expected {{columns: {{<column>: <value>}}, otherwise}}")
        pairs, otherwise = list(spec["columns"].items()), str(spec["otherwise"])
    else:
        for field in ("column", "positive", "negative"):
            if field not in spec:
                raise ValueError(f"{key}.{field}: missing")
        pairs, otherwise = [(spec["column"], spec["positive"])], str(spec["negative"])
    for column, _ in pairs:
        if column not in names:
            where = "columns" if "columns" in spec else "column"
            raise ValueError(
                f"{key}.{where}: {column!r} is not a column of {path} (expected one of {names})"
            )
    return [(names.index(c), str(v)) for c, v in pairs], otherwise


def write_celeba(cfg: DictConfig) -> dict[str, int]:
    """`fairclip-data celeba labels=<list_attr_celeba.txt> images=<img_align_celeba> ...`."""
    keep = None
    if cfg.get("partition") is not None:
        if cfg.get("partition_file") is None:
            raise ValueError("partition is set: give partition_file=<list_eval_partition.txt> too")
        keep = read_partition(cfg.partition_file, str(cfg.partition))
    attributes = OmegaConf.to_container(cfg.attributes, resolve=True)
    records = read_celeba(cfg.labels, cfg.images, attributes, keep)
    return write_labelled_shards(records, cfg, "celeba", caption=cfg.get("caption"))
