"""M4 on annotation tables: parquet/CSV/DataFrame in, keep lists out, list-valued labels."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from fairclip.balance.annotate import Annotator
from fairclip.balance.m4 import solve_batch, solve_streaming
from fairclip.balance.m4.problem import DEFAULT_EPS_D, DEFAULT_EPS_R, DEFAULT_ETA
from fairclip.balance.pipeline import balance_table
from fairclip.balance.stats import data_bias, planted_annotations
from fairclip.balance.table import TableSpec, annotations_from_table, read_keep_list
from fairclip.cli.balance import main as balance_main
from fairclip.runtime import CONF_DIR
from tests.conftest import run_app

OBJECTS = [f"object_{i:02d}" for i in range(80)]
SPEC = {"key": "id", "attributes": {"gender": ["female", "male"]}, "labels": ["objects"]}


def objects_table(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    """A COCO-like table: id, a binary sensitive attribute, ~80 multi-labels (list column)
    with planted gender associations."""
    s, y = planted_annotations(n, family_sizes=(2,), num_labels=80, association=0.4, seed=seed)
    rows = [OBJECTS[i] for i in y.indices]
    lists = np.split(np.asarray(rows, dtype=object), y.indptr[1:-1])
    return pd.DataFrame({
        "id": [f"img{i:05d}" for i in range(n)],
        "gender": np.where(s[:, 0] == 0, "female", "male"),
        "objects": [list(v) for v in lists],
    })  # fmt: skip


def test_table_annotations_equal_the_planted_arrays() -> None:
    n = 500
    s, y = planted_annotations(n, family_sizes=(2,), num_labels=80, association=0.4, seed=1)
    df = objects_table(n, seed=1)
    ann = annotations_from_table(df, TableSpec.from_config({**SPEC, "label_vocab": OBJECTS}))
    np.testing.assert_array_equal(ann.s[:, 0], s[:, 0])
    assert (ann.y != y.astype(np.int8)).nnz == 0
    assert ann.families == {"gender": ["female", "male"]} and ann.labels == OBJECTS


def test_list_valued_table_balances_the_same_from_the_cli_and_python(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    df = objects_table()
    path = tmp_path / "meta.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    run_app(balance_main, [f"input={path}", "table={key: id, attributes: {gender: null}, "
                           "labels: [objects]}", "balance.eta=0.5", f"hydra.run.dir={tmp_path / 'h'}"])  # fmt: skip
    printed = capsys.readouterr().out
    out = next(tmp_path.glob("meta_m4-*"))
    assert f"balanced: {out / 'keep.parquet'}" in printed
    keep_cli = pq.read_table(out / "keep.parquet").to_pandas()
    keep_py, report = balance_table(df, SPEC, eta=0.5)
    keep_py = keep_py.to_pandas()
    assert list(keep_cli["key"]) == list(df["id"]) == list(keep_py["key"])
    np.testing.assert_allclose(keep_cli["q"], keep_py["q"], atol=1e-12)
    assert (keep_cli["keep"] == keep_py["keep"]).all()
    assert abs(keep_py["q"].mean() - 0.5) < 1e-6
    # the report puts the weights' RB/AB beside the kept sample's
    saved = json.loads((out / "balance_report.json").read_text())
    assert set(saved["data_bias"]) == {"before", "expected_after", "after"}
    assert saved["data_bias"]["expected_after"]["ab"] <= DEFAULT_EPS_D * (1 + 1e-6)
    assert saved["data_bias"] == report["data_bias"]
    assert read_keep_list(out / "keep.parquet") == set(keep_py["key"][keep_py["keep"]])
    # rerun: the keep list is reused, not rewritten
    mtime = (out / "keep.parquet").stat().st_mtime_ns
    run_app(balance_main, [f"input={path}", "table={key: id, attributes: {gender: null}, "
                           "labels: [objects]}", "balance.eta=0.5", f"hydra.run.dir={tmp_path / 'h'}"])  # fmt: skip
    assert (out / "keep.parquet").stat().st_mtime_ns == mtime


def test_csv_and_parquet_parts_with_scalar_and_boolean_labels(tmp_path: Path) -> None:
    df = objects_table(1200, seed=3)
    flat = pd.DataFrame({
        "id": df["id"], "gender": df["gender"],
        "concept": [v[0] if len(v) else None for v in df["objects"]],
        "has_dog": ["object_00" in v for v in df["objects"]],
    })  # fmt: skip
    flat.to_csv(tmp_path / "meta.csv", index=False)
    parts = tmp_path / "parts"
    parts.mkdir()
    for i in range(3):
        chunk = flat.iloc[i * 400 : (i + 1) * 400]
        pq.write_table(pa.Table.from_pandas(chunk, preserve_index=False), parts / f"{i}.parquet")
    spec = TableSpec.from_config({"key": "id", "attributes": {"gender": None},
                                  "labels": ["concept", "has_dog"]})  # fmt: skip
    from fairclip.balance.table import read_table

    a = annotations_from_table(read_table(tmp_path / "meta.csv"), spec)
    b = annotations_from_table(read_table(parts), spec)
    assert list(a.keys) == list(b.keys) and (a.y != b.y).nnz == 0
    dog = a.labels.index("has_dog")
    np.testing.assert_array_equal(a.y[:, dog].toarray()[:, 0], flat["has_dog"].to_numpy())
    first = a.labels.index(flat["concept"][0])
    assert a.y[0, first] == 1 and a.y[0].nnz == 1 + int(flat["has_dog"][0])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gender": ["female", None, "male"]}, r"attribute column 'gender' is empty in 1 row\(s\) \(keys \['b'\]"),
        ({"id": ["a", "a", "c"]}, r"key column 'id' repeats keys, e.g. \['a'\]"),
        ({"gender": ["female", "other", "male"]}, r"attribute 'gender' has value\(s\) \['other'\] outside"),
    ],
)  # fmt: skip
def test_bad_tables_name_the_column_and_rows(change: dict, message: str) -> None:
    df = pd.DataFrame({"id": ["a", "b", "c"], "gender": ["female", "male", "male"],
                       "objects": [["dog"], [], ["car", "dog"]], **change})  # fmt: skip
    spec = TableSpec.from_config({"key": "id", "attributes": {"gender": ["female", "male"]},
                                  "labels": ["objects"]})  # fmt: skip
    with pytest.raises(ValueError, match=message):
        annotations_from_table(df, spec)


def test_missing_columns_and_unknown_labels_are_named() -> None:
    df = pd.DataFrame({"id": ["a", "b"], "gender": ["female", "male"],
                       "objects": [["dog"], ["car", "dog"]]})  # fmt: skip
    with pytest.raises(ValueError, match=r"no column 'race'; the table has \['id', 'gender'"):
        annotations_from_table(df, TableSpec.from_config({**SPEC, "attributes": {"race": None}}))
    with pytest.raises(ValueError, match=r"label\(s\) \['car'\] of \['objects'\] are not in"):
        annotations_from_table(df, TableSpec.from_config({**SPEC, "label_vocab": ["dog"]}))
    with pytest.raises(ValueError, match=r"table: unknown keys \['label'\]"):
        TableSpec.from_config({**SPEC, "label": "x"})


def test_list_valued_json_labels_in_shards() -> None:
    annotator = Annotator({"gender": ["female", "male"]}, ["car", "dog"], label_fields=["objects"])
    assert annotator({"gender": "male", "objects": ["dog", "car"]}, "", "s1") == ([1], [0, 1], 0.0)
    assert annotator({"gender": "male", "objects": "dog"}, "", "s2")[1] == [1]
    with pytest.raises(ValueError, match=r"s3: label field objects=\['cat'\]: 'cat' is not in"):
        annotator({"gender": "male", "objects": ["cat"]}, "", "s3")
    with pytest.raises(ValueError, match=r"s4: gender=\['male'\] is not in the vocabulary"):
        annotator({"gender": ["male"]}, "", "s4")


def test_one_set_of_defaults_for_the_api_and_the_cli() -> None:
    conf = OmegaConf.load(Path(CONF_DIR) / "balance" / "m4.yaml")
    assert (conf.eta, conf.eps_r, conf.eps_d) == (DEFAULT_ETA, DEFAULT_EPS_R, DEFAULT_EPS_D)
    for fn in (solve_batch, solve_streaming):
        params = inspect.signature(fn).parameters
        assert (params["eta"].default, params["eps_r"].default, params["eps_d"].default) == (
            DEFAULT_ETA, DEFAULT_EPS_R, DEFAULT_EPS_D,
        )  # fmt: skip
    # the Python API's result meets the defaults it was given
    df = objects_table(2000, seed=5)
    keep, report = balance_table(df, SPEC, eta=0.5)
    ann = annotations_from_table(df, TableSpec.from_config(SPEC))
    bias = data_bias(ann.s, ann.y, family_sizes=ann.family_sizes, weights=keep["q"].to_numpy())
    assert bias.rb <= DEFAULT_EPS_R * (1 + 1e-6) and bias.ab <= DEFAULT_EPS_D * (1 + 1e-6)
    assert report["data_bias"]["expected_after"]["ab"] == pytest.approx(bias.ab)


def test_the_suggested_largest_eta_passes() -> None:
    """The capacity error names the group by its value and suggests an eta, rounded down so
    that it solves."""
    import re

    from fairclip.balance.m4 import M4InfeasibleError

    df = objects_table(2000, seed=5)
    with pytest.raises(M4InfeasibleError, match=r"group gender=female has \d+ of 2000 rows") as err:
        balance_table(df, SPEC, eta=0.9)
    eta = float(re.search(r"Use eta <= ([0-9.]+)", str(err.value)).group(1))
    keep, _ = balance_table(df, SPEC, eta=eta, eps_d=0.2)
    assert keep["q"].to_numpy().mean() == pytest.approx(eta)
