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
from fairclip.balance.table import TableSpec, annotations_from_table
from fairclip.cli.balance import main as balance_main
from fairclip.data.keep import read_keep_list
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


# -- training on a keep list ------------------------------------------------------------------
def _shard_table(train: Path) -> pd.DataFrame:
    """The annotation table of the synthetic train shards (key, gender, concept)."""
    from fairclip.data.shards import iter_members

    rows = [{"key": key, **json.loads(raw)} for _, key, raw in iter_members(train, "json")]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def keep_list(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set]:
    """A keep list of the synthetic train shards made by balance_table (gender x concept)."""
    from fairclip.balance.table import write_keep_list

    table = _shard_table(synthetic_dir / "train")
    spec = {"key": "key", "attributes": {"gender": None}, "labels": ["concept"]}
    keep, _ = balance_table(table, spec, eta=0.5, eps_d=0.3)
    path = tmp_path_factory.mktemp("keep") / "keep.parquet"
    keys = keep.column("key").to_numpy(zero_copy_only=False)
    mask = keep.column("keep").to_numpy()
    write_keep_list(path, keys, keep.column("q").to_numpy(), mask)
    return path, set(keys[mask])


def test_data_keep_trains_on_exactly_the_kept_keys(
    synthetic_dir: Path, keep_list: tuple[Path, set], tmp_path: Path
) -> None:
    from fairclip.training import train
    from tests.conftest import compose_train, small_run_overrides

    path, kept = keep_list
    cfg = compose_train(small_run_overrides(
        synthetic_dir, "callbacks=audit", f"data.keep={path}", "trainer.max_epochs=2",
        "trainer.limit_val_batches=0", "data.num_workers=2",
    ), tmp_path)  # fmt: skip
    train(cfg)
    for epoch in (0, 1):
        seen = (tmp_path / "seen_keys" / f"rank0-epoch{epoch}.txt").read_text().split()
        assert set(seen) <= kept and len(seen) == len(set(seen))  # only kept, none twice
        assert len(seen) > 0.75 * len(kept)  # the epoch plan's share of the kept samples


def test_keep_list_for_other_shards_is_an_error(synthetic_dir: Path, tmp_path: Path) -> None:
    from fairclip.balance.table import write_keep_list
    from fairclip.data.keep import kept_shards, read_keep_list
    from fairclip.data.shards import list_shards

    path = write_keep_list(tmp_path / "k.parquet", np.array(["nope_1", "nope_2"], dtype=object),
                           np.ones(2), np.ones(2, bool))  # fmt: skip
    with pytest.raises(ValueError, match=r"data.keep: 2 of its 2 kept keys are in none of the 16"):
        kept_shards(list_shards(synthetic_dir / "train"), read_keep_list(path))
    with pytest.raises(FileNotFoundError, match=r"data.keep='/nope.parquet': no keep list"):
        read_keep_list("/nope.parquet")


@pytest.mark.slow  # a 2-process DDP fit
def test_data_keep_under_two_process_ddp(
    synthetic_dir: Path, keep_list: tuple[Path, set], tmp_path: Path
) -> None:
    from tests.conftest import run_train_process

    path, kept = keep_list
    out = tmp_path / "ddp_keep"
    run_train_process(synthetic_dir, out, tmp_path, "trainer=ddp_cpu", "callbacks=audit",
                      f"data.keep={path}", "trainer.max_epochs=1", "trainer.limit_val_batches=0")  # fmt: skip
    seen = [(out / "seen_keys" / f"rank{r}-epoch0.txt").read_text().split() for r in range(2)]
    assert len(seen[0]) == len(seen[1]) > 0  # equal steps on both ranks
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) <= kept
