"""Dataset adapters (FairFace, UTKFace, CelebA) -> eval shards, checked against the labels."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
import yaml
from PIL import Image

from fairclip.cli.data import main as data_main
from fairclip.data.adapters import ADAPTERS
from fairclip.data.shards import list_shards
from fairclip.eval.run import evaluate_config as run
from tests.conftest import compose_eval, run_app

FAIRFACE_CSV = Path("/work/shared/data/fairface_label_val.csv")
EVERY = 7  # tiny images for every 7th FairFace row; the rest are missing on purpose
# fmt: off
CELEBA_NAMES = [
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup",
    "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns",
    "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
]
# fmt: on


def tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 120, 90)).save(buf, format="JPEG")
    return buf.getvalue()


def run_cli(capsys: pytest.CaptureFixture, *args: str, stderr: list[str] | None = None) -> dict:
    """`fairclip-data source=<args[0]> <args[1:]>`; returns the counts it prints on stdout (its
    log goes to stderr, appended to ``stderr`` when given)."""
    run_app(data_main, [f"source={args[0]}", *args[1:]])
    captured = capsys.readouterr()
    if stderr is not None:
        stderr.append(captured.err)
    return yaml.safe_load(captured.out)["samples"]


def read_labels(folder: Path) -> dict[str, dict]:
    urls = [s.url for s in list_shards(folder)]
    return {s["__key__"]: json.loads(s["json"]) for s in wds.WebDataset(urls, shardshuffle=False)}


def test_registry_matches_source_configs() -> None:
    conf = Path(__file__).parent.parent / "conf" / "source"
    for name in ADAPTERS:
        text = (conf / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_"), name


# -- FairFace: the real validation label file ----------------------------------------------------
@pytest.fixture(scope="module")
def fairface(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    """Tiny JPEGs standing in for every 7th FairFace validation photo; the shards written."""
    if not FAIRFACE_CSV.is_file():
        pytest.skip(f"{FAIRFACE_CSV} not available")
    root = tmp_path_factory.mktemp("fairface")
    with FAIRFACE_CSV.open(newline="") as f:
        rows = list(csv.DictReader(f))
    jpeg = tiny_jpeg()
    (root / "images" / "val").mkdir(parents=True)
    for row in rows[::EVERY]:
        (root / "images" / row["file"]).write_bytes(jpeg)
    return root, root / "images", rows


def expected_fairface_counts(rows: list[dict]) -> Counter:
    """Independent of the adapter: the CSV labels mapped to the vocabularies by hand."""
    counts: Counter = Counter()
    for row in rows:
        counts[f"gender={row['gender'].lower()}"] += 1
        counts[f"race={row['race'].lower().replace(' ', '_')}"] += 1
        counts[f"age={'70+' if row['age'] == 'more than 70' else row['age']}"] += 1
    return counts


def test_fairface_counts_match_the_label_file(
    fairface: tuple[Path, Path, list[dict]], capsys: pytest.CaptureFixture
) -> None:
    root, images, rows = fairface
    assert len(rows) == 10954
    present = rows[::EVERY]
    out = root / "shards"
    counts = run_cli(capsys, "fairface", f"labels={FAIRFACE_CSV}", f"images={images}",
                     f"out={out}", "missing_images=skip", "shard_size=500")  # fmt: skip
    assert counts["val"] == len(present)
    assert counts["missing_images"] == len(rows) - len(present)
    expected = expected_fairface_counts(present)
    assert {k: v for k, v in counts.items() if "=" in k} == dict(expected)
    assert len([k for k in expected if k.startswith("race=")]) == 7
    assert json.loads((out / "val" / "summary.json").read_text())["counts"] == counts

    labels = read_labels(out / "val")
    assert len(labels) == len(present)
    first = rows[0]  # val/1.jpg,3-9,Male,East Asian
    assert labels["val_1"] == {"gender": "male", "race": "east_asian", "age": "3-9"}
    assert first["file"] == "val/1.jpg"
    assert sum(s.size for s in list_shards(out / "val")) == len(present)

    # the default policy stops and says how many are missing and where it looked
    with pytest.raises(FileNotFoundError, match=rf"fairface: {len(rows) - len(present)} of "
                       rf"{len(rows)} image file\(s\) not found under images="):  # fmt: skip
        run_cli(capsys, "fairface", f"labels={FAIRFACE_CSV}", f"images={images}", f"out={root}/x")


def fairface_shards(fairface: tuple[Path, Path, list[dict]], capsys: pytest.CaptureFixture) -> Path:
    root, images, _ = fairface
    out = root / "shards"
    if not (out / "val" / "sizes.json").exists():
        run_cli(capsys, "fairface", f"labels={FAIRFACE_CSV}", f"images={images}", f"out={out}",
                "missing_images=skip")  # fmt: skip
    return out / "val"


def test_fairface_shards_evaluate_with_the_fairface_configs(
    fairface: tuple[Path, Path, list[dict]], capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    rows = fairface[2]
    out = fairface_shards(fairface, capsys).parent
    cfg = compose_eval(
        ["data=fairface", "prompts=fairface", f"data.val_shards={out}/val",
         "model.name=fairclip-tiny", "progress=false", "num_workers=0", "wandb.enabled=false",
         "plots=false", "skew_ks=[10,100]"],
        tmp_path,
    )  # fmt: skip
    report = run(cfg)
    assert "zeroshot" not in report["metrics"]  # FairFace has no concept labels
    assert report["splits"]["neutral"]["shards"] == str(out / "val")  # no neutral/ beside it
    expected = expected_fairface_counts(rows[::EVERY])
    race = report["splits"]["neutral"]["group_counts"]["race"]  # all sets rank "neutral"
    assert {f"race={k}": v for k, v in race.items()} == {
        k: v for k, v in expected.items() if k.startswith("race=")
    }
    for attr in ("gender", "race", "age"):
        assert 0 <= report["metrics"]["bias"][f"cramers_v/{attr}"] <= 1
        assert f"maxskew@100/{attr}/dem_par" in report["metrics"]["skew"]["stereotypes"]


def test_compare_debiases_the_occupation_queries_on_fairface(
    fairface: tuple[Path, Path, list[dict]],
    capsys: pytest.CaptureFixture,
    trained_run: Path,
    tmp_path: Path,
) -> None:
    """Orth-Proj and SEM with `debias=social` on FairFace shards, which have no concepts: the
    table reads the skew of the occupation queries on the neutral split (query_set), and the
    lean is measured on those queries, for gender and for race."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fairclip.eval.method_table import compare_methods as compare
    from fairclip.runtime import CONF_DIR

    shards = fairface_shards(fairface, capsys)

    def cfg(out: Path, *extra: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            return compose(
                config_name="debias_compare",
                overrides=[
                    f"model.name={trained_run}", "data=fairface", "prompts=fairface",
                    "debias=social", f"data.val_shards={shards}", f"output_dir={out}",
                    "sae_train.epochs=50", "methods=[clip,orth_proj,sem_b,sem_i]",
                    "wandb.enabled=false", *extra,
                ],
            )  # fmt: skip

    for attribute in ("gender", "race"):
        out = tmp_path / attribute
        result = compare(
            cfg(out, "query_set=occupations", f"attribute={attribute}",
                "debias.orth_proj.variant=centred")
        )  # fmt: skip
        rows = result["rows"]
        assert result["query_set"] == "occupations"
        assert all(r["maxskew@300"] >= 0 and r["ndkl@300"] >= 0 for r in rows.values())
        # the occupation prompts lean toward a group; the centred Orth-Proj projects out the
        # very directions the lean is measured along, so it removes it by construction
        assert rows["clip"]["class_lean"] > 0.01
        assert abs(rows["orth_proj"]["class_lean"]) < 0.05 * rows["clip"]["class_lean"]
        assert -1.0 <= result["sae"]["flagged_lean_share"] <= 1.5
        assert math.isnan(rows["clip"]["acc"])  # no concept labels: in the JSON only
        md = (out / "compare.md").read_text()
        assert "| acc |" not in md and "| maxskew@300 |" in md and "query set occupations" in md
        assert result["sae"]["corpus_prompts"] > 300  # social.yaml's corpus and D

        if attribute == "gender":  # the same weights by architecture name + weights file
            by_name = compare(cfg(
                tmp_path / "by_name", "query_set=occupations", "methods=[clip]",
                "model.name=fairclip-tiny",
                f"model.pretrained={trained_run}/export/open_clip_model.safetensors",
            ))  # fmt: skip
            assert by_name["rows"]["clip"] == pytest.approx(rows["clip"], nan_ok=True)

    with pytest.raises(ValueError, match=r"query_set=concepts: data.concepts is empty.*"
                       r"'occupations'"):  # fmt: skip
        compare(cfg(tmp_path / "x"))
    with pytest.raises(ValueError, match=r"query_set='nope': .*expected one of \['neutral'"):
        compare(cfg(tmp_path / "y", "query_set=nope"))


def test_debias_sets_must_name_the_datasets_groups() -> None:
    """debias=social holds FairFace's seven race groups; on UTKFace (five) it stops with both
    lists, and debias=utkface holds UTKFace's."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fairclip.eval.method_context import MethodContext as CompareContext
    from fairclip.runtime import CONF_DIR

    def bias_prompts(debias: str) -> dict:
        GlobalHydra.instance().clear()
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose(
                config_name="debias_compare",
                overrides=["model.name=unused", "data=utkface", "prompts=utkface",
                           f"debias={debias}", "attribute=race"],
            )  # fmt: skip
        return CompareContext(cfg, None, torch.device("cpu")).bias_prompts()  # type: ignore[arg-type]

    with pytest.raises(ValueError, match=r"debias.bias_prompts.race: prompts for \['white', "
                       r"'black', 'latino_hispanic'.*data.attributes.race=\['white', 'black', "
                       r"'asian', 'indian', 'others'\]"):  # fmt: skip
        bias_prompts("social")
    race = bias_prompts("utkface")["race"]
    assert list(race) == ["white", "black", "asian", "indian", "others"]
    assert "a photo of a latino person." in race["others"] and len(race["white"]) == 20


def test_fairface_bad_label_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("file,age,gender,race,service_test\nval/1.jpg,3-9,Male,White,True\n"
                   "val/2.jpg,20-29,Nonbinary,White,False\n")  # fmt: skip
    with pytest.raises(ValueError, match=r"bad.csv:3: gender='Nonbinary' is not in "
                       r"label_map.gender \(expected one of \['Female', 'Male'\]\)"):  # fmt: skip
        run_cli(capsys, "fairface", f"labels={bad}", f"images={tmp_path}", f"out={tmp_path}/o")
    with pytest.raises(FileNotFoundError, match=r"labels='.*nope.csv': FairFace label CSV"):
        run_cli(capsys, "fairface", f"labels={tmp_path}/nope.csv", f"images={tmp_path}")
    bad.write_text("file,age,gender,race,service_test\nval/1.jpg,3-9\n")  # a short row
    with pytest.raises(ValueError, match=r"bad.csv:2: row has 2 fields, expected the 5 columns"):
        run_cli(capsys, "fairface", f"labels={bad}", f"images={tmp_path}", f"out={tmp_path}/o")
    with pytest.raises(ValueError, match=r"train_size=-5: expected a positive integer"):
        run_cli(capsys, "synthetic", f"out={tmp_path}/s", "train_size=-5", "splits=[train]")


# -- UTKFace: labels in the file names ------------------------------------------------------------
def test_utkface_parses_names_and_skips_malformed_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    valid = {
        "1_0_0_20161219140623097.jpg.chip.jpg": ("male", "white", "0-2", 1),
        "3_1_2_20161219140623098.jpg.chip.jpg": ("female", "asian", "3-9", 3),
        "25_1_1_20170109142408075.jpg.chip.jpg": ("female", "black", "20-29", 25),
        "69_0_3_20170109150557335.jpg": ("male", "indian", "60-69", 69),
        "70_1_4_20170116174525125.jpg.chip.jpg": ("female", "others", "70+", 70),
    }
    malformed = [
        "39_1_20170116174525125.jpg.chip.jpg",  # known release errors: a field is missing
        "61_1_20170109142408075.jpg.chip.jpg",
        "61_3_20170109150557335.jpg.chip.jpg",
        "25_0_7_20170101000000000.jpg.chip.jpg",  # race code out of range
        "notes.png",
    ]
    images = tmp_path / "UTKFace"
    images.mkdir()
    for name in [*valid, *malformed]:
        (images / name).write_bytes(tiny_jpeg())
    err: list[str] = []
    counts = run_cli(capsys, "utkface", f"images={images}", f"out={tmp_path}/out", stderr=err)
    assert counts["test"] == 5 and counts["malformed_labels"] == 5
    assert counts["gender=female"] == 3 and counts["race=others"] == 1 and counts["age=70+"] == 1
    assert "skipping 5 file(s)" in err[0] and "39_1_20170116174525125" in err[0]
    labels = read_labels(tmp_path / "out" / "test")
    for name, (gender, race, age, years) in valid.items():
        key = name.split(".", 1)[0]
        assert labels[key] == {"gender": gender, "race": race, "age": age, "age_years": years}
    with pytest.raises(FileNotFoundError, match=r"images='.*missing': UTKFace image folder"):
        run_cli(capsys, "utkface", f"images={tmp_path}/missing")


# -- CelebA: list_attr_celeba.txt -----------------------------------------------------------------
def write_celeba(folder: Path, rows: dict[str, dict[str, int]], count: int | None = None) -> Path:
    lines = [str(len(rows) if count is None else count), " ".join(CELEBA_NAMES)]
    for file, attrs in rows.items():
        values = [str(attrs.get(n, -1)) for n in CELEBA_NAMES]
        lines.append(f"{file} " + " ".join(f"{v:>2}" for v in values))  # CelebA pads with spaces
    path = folder / "list_attr_celeba.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_celeba_maps_columns_and_partitions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = {
        "000001.jpg": {"Male": -1, "Young": 1},
        "000002.jpg": {"Male": 1, "Young": 1, "Blond_Hair": 1},
        "000003.jpg": {"Male": 1, "Young": -1, "Black_Hair": 1, "Gray_Hair": 1},
        "000004.jpg": {"Male": -1, "Young": -1},
    }
    labels_file = write_celeba(tmp_path, rows)
    images = tmp_path / "img_align_celeba"
    images.mkdir()
    for file in rows:
        (images / file).write_bytes(tiny_jpeg())
    partition = tmp_path / "list_eval_partition.txt"
    partition.write_text("000001.jpg 0\n000002.jpg 2\n000003.jpg 2\n000004.jpg 1\n")
    common = [f"labels={labels_file}", f"images={images}", f"out={tmp_path}/out"]
    counts = run_cli(capsys, "celeba", *common, f"partition_file={partition}", "partition=test")
    assert counts == {"test": 2, "missing_images": 0, "age=old": 1, "age=young": 1,
                      "gender=male": 2, "hair=blond hair": 1, "hair=dark hair": 1,
                      "hair_colour=black": 1, "hair_colour=blond": 1}  # fmt: skip
    labels = read_labels(tmp_path / "out" / "test")
    # a one-hot family takes its first listed column that is 1 (Black before Gray)
    assert labels == {
        "000002": {"gender": "male", "age": "young", "hair": "blond hair", "hair_colour": "blond"},
        "000003": {"gender": "male", "age": "old", "hair": "dark hair", "hair_colour": "black"},
    }
    counts = run_cli(capsys, "celeba", *common, f"out={tmp_path}/all")
    assert counts["hair_colour=other"] == 2  # no hair-colour column is 1

    with pytest.raises(ValueError, match=r"attributes.gender.column: 'Mal' is not a column of"):
        run_cli(capsys, "celeba", *common, "attributes.gender.column=Mal")
    with pytest.raises(ValueError, match=r"attributes.hair_colour.columns: 'Red_Hair' is not a"):
        run_cli(capsys, "celeba", *common, "+attributes.hair_colour.columns.Red_Hair=red")
    write_celeba(tmp_path, rows, count=5)
    with pytest.raises(ValueError, match=r"list_attr_celeba.txt: line 1 says 5 images, found 4"):
        run_cli(capsys, "celeba", *common)


# -- Waterbirds: metadata.csv -----------------------------------------------------------------------
def test_waterbirds_maps_codes_and_splits_and_evaluates(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A metadata.csv in the released layout -> test-split shards whose bird is the zero-shot
    class and whose place is the background group, read by data=waterbirds prompts=waterbirds."""
    root = tmp_path / "waterbird_complete95_forest2water2"
    rows = [  # (img_filename, y, split, place)
        ("001.Black_footed_Albatross/a.jpg", 1, 2, 1),
        ("001.Black_footed_Albatross/b.jpg", 1, 2, 0),
        ("002.Song_Sparrow/c.jpg", 0, 2, 0),
        ("002.Song_Sparrow/d.jpg", 0, 2, 1),
        ("002.Song_Sparrow/e.jpg", 0, 0, 0),
    ]
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    for i, (file, y, split, place) in enumerate(rows, start=1):
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        (root / file).write_bytes(tiny_jpeg())
        lines.append(f"{i},{file},{y},{split},{place},/x/{i}.jpg")
    metadata = root / "metadata.csv"
    metadata.write_text("\n".join(lines) + "\n")
    common = [f"labels={metadata}", f"images={root}", f"out={tmp_path}/out"]
    counts = run_cli(capsys, "waterbirds", *common)
    assert counts == {"test": 4, "missing_images": 0, "background=land": 2, "background=water": 2,
                      "bird=landbird": 2, "bird=waterbird": 2}  # fmt: skip
    labels = read_labels(tmp_path / "out" / "test")
    assert labels["001_Black_footed_Albatross_b"] == {"bird": "waterbird", "background": "land"}
    assert run_cli(capsys, "waterbirds", *common, "partition=train", "split=train")["train"] == 1

    cfg = compose_eval(
        ["data=waterbirds", "prompts=waterbirds", f"data.val_shards={tmp_path}/out/test",
         "model.name=fairclip-tiny", "progress=false", "num_workers=0", "wandb.enabled=false",
         "plots=false", "skew_ks=[2]"],
        tmp_path / "eval",
    )  # fmt: skip
    zeroshot = run(cfg)["metrics"]["zeroshot"]
    assert {"acc/background=land", "acc/background=water"} <= set(zeroshot)
    assert zeroshot["worst_class_group_acc/background"] <= zeroshot["acc"]

    bad = root / "bad.csv"
    bad.write_text(lines[0] + "\n1,002.Song_Sparrow/c.jpg,7,2,0,/x/1.jpg\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: y='7' is not in label_map.bird"):
        run_cli(capsys, "waterbirds", f"labels={bad}", f"images={root}", f"out={tmp_path}/bad")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['place'\]"):
        bad.write_text("img_id,img_filename,y,split\n1,a.jpg,0,2\n")
        run_cli(capsys, "waterbirds", f"labels={bad}", f"images={root}", f"out={tmp_path}/bad")
