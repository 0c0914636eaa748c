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


def test_caption_codes_match_the_captions_and_draw_other_phrases() -> None:
    """The vectorised form: every caption indexed, label rows -> the same caption as
    AttributeCaptions, counterfactuals that change exactly the swapped attributes' phrases
    (race uniform over the six others; binned age never to another bin of the same phrase)."""
    import torch

    from fairclip.data.attribute_captions import CaptionCodes

    bins = list(AGE_BINS)
    attributes = {"gender": ["Female", "Male"], "race": list(RACES), "age": bins}
    config = {**CONFIG, "words": {**CONFIG["words"], "age": AGE_BINS}, "swap": ["race", "age"]}
    captions = AttributeCaptions.from_config(config, attributes)
    codes = CaptionCodes(captions, attributes)
    assert len(codes.texts) == 2 * 7 * 3 == len(set(codes.texts))
    with FAIRFACE_CSV.open(newline="") as f:
        rows = list(csv.DictReader(f))
    groups = torch.tensor([[attributes[a].index(r[a]) for a in attributes] for r in rows])
    phrases = codes.phrase_codes(groups)
    factual = codes.index(phrases)
    for i in range(0, len(rows), 97):
        assert codes.texts[int(factual[i])] == captions.caption(rows[i])
    moved = codes.counterfactual(phrases, torch.Generator().manual_seed(0))
    age, race, gender = (list(captions.words).index(a) for a in ("age", "race", "gender"))
    assert torch.equal(moved[:, gender], phrases[:, gender])  # gender is not swapped
    assert bool((moved[:, [race, age]] != phrases[:, [race, age]]).all())  # both always change
    white = phrases[:, race] == list(RACES).index("White")
    counts = torch.bincount(moved[white, race], minlength=7).float()
    assert counts[0] == 0 and bool((counts[1:] / counts.sum() - 1 / 6).abs().max() < 0.03)
    # an unlabelled attribute has no caption
    groups[0, list(attributes).index("race")] = -1
    assert int(codes.index(codes.phrase_codes(groups))[0]) == -1


def test_label_only_samples_get_their_caption_from_the_labels() -> None:
    """data.captions: a shard sample without txt is captioned from its JSON labels in the
    loader; one missing a label the template needs is a corrupt sample (skipped, counted)."""
    import io
    import json

    from PIL import Image

    from fairclip.data.samples import SampleDecoder
    from fairclip.data.stream import CorruptSample

    attributes = {"gender": ["Female", "Male"], "race": list(RACES), "age": list(ATTRIBUTES["age"])}
    decode = SampleDecoder(lambda im: im.size, attributes, [], require_caption=True,
                           captions=AttributeCaptions.from_config(CONFIG, attributes))  # fmt: skip
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    labels = {"gender": "Female", "race": "Middle Eastern", "age": "old"}
    sample = {"__key__": "k", "png": buf.getvalue(), "json": json.dumps(labels).encode()}
    assert decode(sample)["text"] == "a photo of a old Middle Eastern woman."
    assert decode({**sample, "txt": b"own caption"})["text"] == "own caption"
    del labels["race"]
    with pytest.raises(CorruptSample, match="none from data.captions: .*label race=None"):
        decode({**sample, "json": json.dumps(labels).encode()})
