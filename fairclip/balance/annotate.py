"""Annotations for M4: sensitive attributes ``s`` and labels/proxies ``y`` per sample.

One streaming pass over the shards reads only the ``txt`` and ``json`` members (images are
never decoded). Attributes come from the sample JSON or, where it lacks them, from caption
keyword lexicons; labels come from JSON fields and/or caption keywords. The result is stored
column-wise in parquet with the sample keys, so balancing never touches the shards again
until the balanced ones are written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
import webdataset as wds
from tqdm import tqdm

from fairclip.data.shards import Shard

_WORD = re.compile(r"[a-z][a-z\-']*")


@dataclass
class Annotations:
    """Column-wise annotations, row ``i`` = ``keys[i]`` in shard ``shard_ids[i]``."""

    keys: np.ndarray  # [N] str
    shard_ids: np.ndarray  # [N] int32, index into ``shards``
    shards: list[str]
    s: np.ndarray  # [N, F] int, value index per family
    y: sp.csr_matrix  # [N, c] binary
    families: dict[str, list[str]]
    labels: list[str]
    utility: np.ndarray | None = None

    @property
    def family_sizes(self) -> list[int]:
        return [len(v) for v in self.families.values()]

    def group_names(self) -> list[str]:
        return [f"{f}={v}" for f, vals in self.families.items() for v in vals]

    def save(self, path: str | Path) -> Path:
        """Write parquet atomically (tmp + rename); schema metadata holds the vocabularies."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = {"key": self.keys, "shard": self.shard_ids}
        columns.update({f"s_{f}": self.s[:, j] for j, f in enumerate(self.families)})
        columns["labels"] = pa.ListArray.from_arrays(self.y.indptr.astype(np.int32), self.y.indices)
        if self.utility is not None:
            columns["utility"] = self.utility
        meta = {"families": self.families, "labels": self.labels, "shards": self.shards}
        table = pa.table(columns).replace_schema_metadata({"fairclip": json.dumps(meta)})
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Annotations:
        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(b"fairclip")
        if raw is None:
            raise ValueError(f"{path}: not a fairclip annotation file (no 'fairclip' metadata)")
        meta = json.loads(raw)
        labels = table.column("labels").combine_chunks()
        y = sp.csr_matrix(
            (
                np.ones(len(labels.values), np.int8),
                labels.values.to_numpy(),
                labels.offsets.to_numpy(),
            ),
            shape=(table.num_rows, len(meta["labels"])),
        )
        s = np.stack([table.column(f"s_{f}").to_numpy() for f in meta["families"]], axis=1)
        utility = table.column("utility").to_numpy() if "utility" in table.column_names else None
        return cls(
            table.column("key").to_numpy(zero_copy_only=False),
            table.column("shard").to_numpy(),
            meta["shards"],
            s,
            y,
            meta["families"],
            meta["labels"],
            utility,
        )


class Annotator:
    """Map one sample's JSON + caption to (group indices, label indices).

    ``families``: attribute -> values (e.g. from ``data.attributes``). ``group_keywords``:
    attribute -> value -> caption words, used when the JSON lacks the attribute.
    ``label_fields``: JSON fields whose value is a label or a list of labels (multi-label;
    vocabulary ``labels``).
    ``label_keywords``: label -> caption words (labels may come from both).
    """

    def __init__(
        self,
        families: Mapping[str, Sequence[str]],
        labels: Sequence[str],
        label_fields: Sequence[str] = (),
        label_keywords: Mapping[str, Sequence[str]] | None = None,
        group_keywords: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
        utility_field: str | None = None,
    ) -> None:
        self.families = {f: list(v) for f, v in families.items()}
        self.labels = list(labels)
        self.label_index = {name: i for i, name in enumerate(self.labels)}
        self.label_fields = list(label_fields)
        self.word_to_labels: dict[str, list[int]] = {}
        for label, words in (label_keywords or {}).items():
            if label not in self.label_index:
                raise ValueError(
                    f"balance.label_keywords: unknown label {label!r}, expected one of {self.labels}"
                )
            for word in words:
                self.word_to_labels.setdefault(word.lower(), []).append(self.label_index[label])
        self.word_to_group: dict[str, dict[str, int]] = {}
        for family, by_value in (group_keywords or {}).items():
            if family not in self.families:
                raise ValueError(
                    f"balance.group_keywords: unknown attribute {family!r}, expected one of {list(self.families)}"
                )
            for value, words in by_value.items():
                if value not in self.families[family]:
                    raise ValueError(
                        f"balance.group_keywords.{family}: unknown value {value!r}, expected one of {self.families[family]}"
                    )
                for word in words:
                    self.word_to_group.setdefault(family, {})[word.lower()] = self.families[
                        family
                    ].index(value)
        self.utility_field = utility_field

    def __call__(self, meta: dict, caption: str, where: str) -> tuple[list[int], list[int], float]:
        words = (
            _WORD.findall(caption.lower()) if (self.word_to_labels or self.word_to_group) else []
        )
        groups = []
        for family, values in self.families.items():
            value = meta.get(family)
            if value is None:
                hits = {self.word_to_group.get(family, {}).get(w) for w in words} - {None}
                if len(hits) != 1:
                    found = "no" if not hits else "conflicting"
                    raise ValueError(
                        f"{where}: attribute {family!r} missing from the JSON and {found} caption keywords "
                        f"(caption {caption!r}); M4 needs every sample's groups: add the label, extend "
                        f"balance.group_keywords.{family}, or filter such samples out first"
                    )
                groups.append(hits.pop())
            elif isinstance(value, str) and value in values:
                groups.append(values.index(value))
            else:
                raise ValueError(f"{where}: {family}={value!r} is not in the vocabulary {values}")
        labels = set()
        for field in self.label_fields:
            value = meta.get(field)
            if value is None:
                continue
            for item in value if isinstance(value, list) else [value]:  # multi-label fields
                if not isinstance(item, str | int) or item not in self.label_index:
                    raise ValueError(
                        f"{where}: label field {field}={value!r}: {item!r} is not in "
                        f"balance.labels {self.labels}"
                    )
                labels.add(self.label_index[item])
        for word in words:
            labels.update(self.word_to_labels.get(word, ()))
        utility = float(meta.get(self.utility_field, 0.0)) if self.utility_field else 0.0
        return groups, sorted(labels), utility


def annotate_shards(
    shards: Sequence[Shard], annotator: Annotator, progress: bool = True
) -> Annotations:
    """One streaming pass over ``shards`` (txt + json only)."""
    keys, shard_ids, groups, indices, indptr, utility = [], [], [], [], [0], []
    total = sum(s.size for s in shards)
    bar = tqdm(total=total, desc="annotating", unit="sample", disable=None if progress else True)
    for shard_id, shard in enumerate(shards):
        for sample in wds.tarfile_to_samples()(iter([{"url": shard.url}])):
            where = f"{shard.url}: sample {sample['__key__']!r}"
            try:
                meta = json.loads(sample["json"]) if "json" in sample else {}
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: malformed JSON label ({err.msg})") from err
            caption = sample.get("txt", b"").decode("utf-8")
            g, labels, u = annotator(meta, caption, where)
            keys.append(sample["__key__"])
            shard_ids.append(shard_id)
            groups.append(g)
            indices.extend(labels)
            indptr.append(len(indices))
            utility.append(u)
            bar.update()
    bar.close()
    n = len(keys)
    y = sp.csr_matrix(
        (
            np.ones(len(indices), np.int8),
            np.asarray(indices, np.int32),
            np.asarray(indptr, np.int64),
        ),
        shape=(n, len(annotator.labels)),
    )
    return Annotations(
        np.asarray(keys, dtype=object),
        np.asarray(shard_ids, np.int32),
        [s.url for s in shards],
        np.asarray(groups, np.int64).reshape(n, len(annotator.families)),
        y,
        annotator.families,
        annotator.labels,
        np.asarray(utility) if annotator.utility_field else None,
    )
