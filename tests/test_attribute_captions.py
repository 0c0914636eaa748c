"""Captions and counterfactuals from attribute labels (the joint-heads paper's training text),
on FairFace's real validation labels (../shared/data)."""

from __future__ import annotations

import csv
import random
from collections import Counter
from pathlib import Path

import pytest

from fairclip.data.attribute_captions import AttributeCaptions

FAIRFACE_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "fairface_label_val.csv"
RACES = {"White": "White", "Black": "Black", "Latino_Hispanic": "Latino Hispanic",
         "East Asian": "East Asian", "Southeast Asian": "Southeast Asian", "Indian": "Indian",
         "Middle Eastern": "Middle Eastern"}  # fmt: skip
ATTRIBUTES = {"gender": ["Female", "Male"], "race": list(RACES),
              "age": ["young", "middle-aged", "old"]}  # fmt: skip
CONFIG = {
    "template": "a photo of a {age} {race} {gender}.",
    "words": {"gender": {"Female": "woman", "Male": "man"}, "race": RACES,
              "age": {"young": "young", "middle-aged": "middle-aged", "old": "old"}},
    "swap": ["gender", "race"],
}  # fmt: skip
AGE_BINS = {"0-2": "young", "3-9": "young", "10-19": "young", "20-29": "young",
            "30-39": "middle-aged", "40-49": "middle-aged", "50-59": "middle-aged",
            "60-69": "old", "more than 70": "old"}  # fmt: skip


def test_captions_and_counterfactuals_of_fairface_labels() -> None:
    captions = AttributeCaptions.from_config(CONFIG, ATTRIBUTES)
    with FAIRFACE_CSV.open(newline="") as f:
        rows = [{**r, "age": AGE_BINS[r["age"]]} for r in csv.DictReader(f)]
    assert len(rows) == 10954
    first = rows[0]  # val/1.jpg,3-9,Male,East Asian
    assert captions.caption(first) == "a photo of a young East Asian man."
    rng = random.Random(0)
    drawn: Counter[str] = Counter()
    for row in rows:
        factual, counter = captions.caption(row), captions.counterfactual(row, rng)
        assert counter.endswith("woman." if row["gender"] == "Male" else " man.")
        race = next(r for r in RACES.values() if f" {r} " in counter)
        assert race != RACES[row["race"]] and counter != factual
        assert counter.startswith(f"a photo of a {row['age']} ")  # age is not swapped
        if row["race"] == "White":
            drawn[race] += 1
    # a White row's counterfactual race is uniform over the six others
    n = sum(drawn.values())
    assert set(drawn) == set(RACES.values()) - {"White"}
    for count in drawn.values():
        assert abs(count / n - 1 / 6) < 4 * (1 / 6 * 5 / 6 / n) ** 0.5
    # seeded: the same draws again
    again = [captions.counterfactual(r, random.Random(7)) for r in rows[:50]]
    assert again == [captions.counterfactual(r, random.Random(7)) for r in rows[:50]]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"template": "a photo of a {colour}."}, r"captions.template: \{colour\} is not an attr"),
        ({"words": {**CONFIG["words"], "race": {"White": "White"}}},
         r"captions.words.race: expected a phrase for exactly the values"),
        ({"swap": ["hair"]}, r"captions.swap: 'hair' is not a placeholder of the template"),
        ({"swap": []}, r"captions.swap: expected a non-empty list"),
    ],
)  # fmt: skip
def test_caption_config_errors_name_the_key(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AttributeCaptions.from_config({**CONFIG, **change}, ATTRIBUTES)


def test_a_label_without_a_phrase_names_the_sample() -> None:
    captions = AttributeCaptions.from_config(CONFIG, ATTRIBUTES)
    with pytest.raises(ValueError, match=r"val_7: label race='Martian' has no caption phrase"):
        captions.caption({"gender": "Male", "race": "Martian", "age": "old"}, where="val_7")
