"""Annotation tables (parquet, CSV, a folder of parquet parts, or a DataFrame) as M4 input,
and keep lists as its output.

Why tables: a researcher's metadata (DataComp, LAION, COCO) is a table with one row per
sample, not WebDataset shards; balancing it needs no image and no shard rewrite. A keep list
(parquet ``key, q, keep``) is what training reads back (``data.keep``).

Columns, named by :class:`TableSpec`:

* ``key``: unique sample key (the shards' ``__key__`` when the table describes shards);
* ``attributes``: sensitive-attribute columns, one value per row (a missing value is an
  error: M4 needs every row's groups), vocabulary given or the sorted values found;
* ``labels``: label columns, each either *scalar* (the value names the label, e.g.
  ``concept=doctor``; null = none), *list-valued* (multi-label, e.g. ``objects=[dog, car]``)
  or *boolean* (the column name is a label where true, one-hot style);
* ``utility`` (optional): a numeric column, the per-sample utility ``u``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import scipy.sparse as sp

from fairclip.balance.annotate import Annotations

KEEP_SCHEMA = pa.schema([("key", pa.string()), ("q", pa.float64()), ("keep", pa.bool_())])


@dataclass(frozen=True)
class TableSpec:
    """Which columns of an annotation table M4 reads (see the module docstring)."""

    key: str = "key"
    attributes: Mapping[str, Sequence[str] | None] = field(default_factory=dict)
    labels: Sequence[str] = ()
    label_vocab: Sequence[str] | None = None  # null: every label found, sorted
    utility: str | None = None

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], key: str = "table") -> TableSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{key}: unknown keys {sorted(unknown)}, expected {sorted(known)}")
        attributes = raw.get("attributes") or {}
        if not isinstance(attributes, Mapping) or not attributes:
            raise ValueError(
                f"{key}.attributes: expected {{column: [values] or null}}, got {attributes!r}"
            )
        labels = raw.get("labels") or []
        if isinstance(labels, str):
            labels = [labels]
        return cls(
            key=str(raw.get("key", "key")),
            attributes={
                str(c): None if v is None else [str(x) for x in v] for c, v in attributes.items()
            },  # fmt: skip
            labels=[str(c) for c in labels],
            label_vocab=None
            if raw.get("label_vocab") is None
            else [str(v) for v in raw["label_vocab"]],
            utility=None if raw.get("utility") is None else str(raw["utility"]),
        )


def read_table(path: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """A parquet file, a CSV file or a folder of parquet parts, as one pyarrow table."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input={str(path)!r}: no such table file or folder")
    if p.suffix.lower() == ".csv":
        import pyarrow.csv as pcsv

        # an empty CSV cell is a missing value, not the empty string
        table = pcsv.read_csv(p, convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
        missing = [c for c in columns or [] if c not in table.column_names]
        if missing:
            raise ValueError(f"{p}: no column(s) {missing}; the table has {table.column_names}")
        return table.select(list(columns)) if columns else table
    dataset = ds.dataset(p, format="parquet")
    missing = [c for c in columns or [] if c not in dataset.schema.names]
    if missing:
        raise ValueError(f"{p}: no column(s) {missing}; the table has {dataset.schema.names}")
    return dataset.to_table(columns=list(columns) if columns else None)


def as_arrow(table: Any) -> pa.Table:
    """A pyarrow table from a pyarrow table, a pandas or a polars DataFrame."""
    if isinstance(table, pa.Table):
        return table
    if hasattr(table, "to_arrow"):  # polars
        return table.to_arrow()
    if hasattr(table, "to_pandas") or type(table).__module__.startswith("pandas"):
        return pa.Table.from_pandas(table, preserve_index=False)
    raise TypeError(
        f"{type(table).__name__}: expected a pyarrow Table or a pandas/polars DataFrame"
    )


def _column(table: pa.Table, name: str, where: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise ValueError(f"{where}: no column {name!r}; the table has {table.column_names}")
    return table.column(name)


def _codes(column: pa.ChunkedArray, vocab: Sequence[str] | None, name: str, keys: np.ndarray,
           where: str) -> tuple[np.ndarray, list[str]]:  # fmt: skip
    """Integer codes of a scalar attribute column against its vocabulary."""
    values = column.cast(pa.string()) if not pa.types.is_string(column.type) else column
    nulls = values.is_null().to_numpy(zero_copy_only=False)
    if nulls.any():
        first = keys[np.flatnonzero(nulls)[:3]].tolist()
        raise ValueError(
            f"{where}: attribute column {name!r} is empty in {int(nulls.sum())} row(s) (keys "
            f"{first}...); M4 needs every row's groups: fill them or filter those rows out"
        )
    found = sorted(pc.unique(values).to_pylist())
    vocab = list(vocab) if vocab is not None else found
    unknown = sorted(set(found) - set(vocab))
    if unknown:
        raise ValueError(
            f"{where}: attribute {name!r} has value(s) {unknown[:5]} outside its vocabulary {vocab}"
        )
    codes = pc.index_in(values, value_set=pa.array(vocab)).to_numpy(zero_copy_only=False)
    return codes.astype(np.int64), vocab


def _label_lists(table: pa.Table, columns: Sequence[str], where: str) -> pa.ListArray:
    """One list of label names per row, from scalar, list-valued and boolean columns."""
    n = table.num_rows
    parts: list[pa.ListArray] = []
    for name in columns:
        col = _column(table, name, where).combine_chunks()
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            lists = col.cast(pa.list_(pa.string()))
        elif pa.types.is_boolean(col.type) or pa.types.is_integer(col.type):
            truth = col.cast(pa.bool_()).fill_null(False).to_numpy(zero_copy_only=False)
            offsets = np.concatenate([[0], np.cumsum(truth)]).astype(np.int32)
            lists = pa.ListArray.from_arrays(
                offsets, pa.array([name] * int(truth.sum()), pa.string())
            )
        else:
            text = col.cast(pa.string())
            present = pc.fill_null(pc.not_equal(text, ""), False).to_numpy(zero_copy_only=False)
            offsets = np.concatenate([[0], np.cumsum(present)]).astype(np.int32)
            lists = pa.ListArray.from_arrays(offsets, text.filter(pa.array(present)))
        parts.append(lists)
    if not parts:
        return pa.ListArray.from_arrays(np.zeros(n + 1, np.int32), pa.array([], pa.string()))
    if len(parts) == 1:
        return parts[0]
    # concatenate the columns' lists row by row (vectorised: sort the values by row)
    rows = np.concatenate([np.repeat(np.arange(n), np.diff(p.offsets.to_numpy())) for p in parts])
    values = pa.concat_arrays([p.flatten() for p in parts])
    order = np.argsort(rows, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int32)
    return pa.ListArray.from_arrays(offsets, values.take(pa.array(order)))


def annotations_from_table(table: Any, spec: TableSpec, where: str = "table") -> Annotations:
    """M4 annotations of an annotation table (see the module docstring)."""
    table = as_arrow(table)
    keys = _column(table, spec.key, where).cast(pa.string())
    if keys.null_count:
        raise ValueError(f"{where}: key column {spec.key!r} has {keys.null_count} empty row(s)")
    key_array = np.asarray(keys.to_pylist(), dtype=object)
    if pc.count_distinct(keys).as_py() != len(key_array):
        counts = pc.value_counts(keys).to_pylist()
        dupes = [c["values"] for c in counts if c["counts"] > 1][:3]
        raise ValueError(f"{where}: key column {spec.key!r} repeats keys, e.g. {dupes}")
    families: dict[str, list[str]] = {}
    codes = []
    for name, vocab in spec.attributes.items():
        c, families[name] = _codes(_column(table, name, where), vocab, name, key_array, where)
        codes.append(c)
    lists = _label_lists(table, spec.labels, where)
    flat = lists.flatten()
    found = sorted(set(pc.unique(flat).to_pylist()) - {None}) if len(flat) else []
    vocab = list(spec.label_vocab) if spec.label_vocab is not None else found
    unknown = sorted(set(found) - set(vocab))
    if unknown:
        raise ValueError(
            f"{where}: label(s) {unknown[:5]} of {list(spec.labels)} are not in label_vocab"
        )
    index = pc.index_in(flat, value_set=pa.array(vocab, pa.string())).to_numpy(zero_copy_only=False)
    offsets = np.array(lists.offsets.to_numpy(), dtype=np.int64)
    offsets -= offsets[0]  # a sliced list array's offsets start where its slice does
    y = sp.csr_matrix((np.ones(len(index), np.int8), index.astype(np.int32), offsets),
                      shape=(table.num_rows, len(vocab)))  # fmt: skip
    y.sum_duplicates()
    y.data[:] = 1
    utility = None
    if spec.utility is not None:
        u = _column(table, spec.utility, where)
        if u.null_count or not (pa.types.is_integer(u.type) or pa.types.is_floating(u.type)):
            raise ValueError(
                f"{where}: utility column {spec.utility!r}: expected numbers in every row"
            )
        utility = u.to_numpy().astype(np.float64)
    return Annotations(
        key_array, np.zeros(len(key_array), np.int32), [str(where)],
        np.stack(codes, axis=1), y, families, vocab, utility,
    )  # fmt: skip


def write_keep_list(path: str | Path, keys: np.ndarray, q: np.ndarray, keep: np.ndarray,
                    meta: Mapping[str, Any] | None = None) -> Path:  # fmt: skip
    """Atomically write the keep list (parquet ``key, q, keep``; ``meta`` in the schema)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {"key": pa.array(list(keys), pa.string()), "q": np.asarray(q, np.float64),
         "keep": np.asarray(keep, bool)}, schema=KEEP_SCHEMA,
    )  # fmt: skip
    if meta:
        table = table.replace_schema_metadata({"fairclip": json.dumps(dict(meta))})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path
