"""Procedural, seeded "stylised person" benchmark with planted social bias.

Each 32 px image shows a person: a head whose hair *shape* shows ``gender`` (long hair down
the sides vs a short cap), whose hair *colour* shows ``age`` (black / brown / grey), and a
uniform + held object that show the ``concept`` (occupation). Occupations come in four
look-alike pairs (same uniform hue, different object), and each pair has one
male-stereotyped and one female-stereotyped member, so a model that leans on gender to tell
"doctor" from "nurse" shows it as a per-group accuracy gap and as retrieval skew.

Knobs (:class:`SyntheticConfig`): ``male_share`` (representation bias), ``association``
(P(stereotyped gender | concept)), ``age_shares``, ``group_word_rate`` (how often captions
name the groups), ``object_rate`` (how often the held object is visible: without it the two
members of a pair look alike, the ambiguity in which a model falls back on the demographic
prior it learned, as real models do), ``spurious_rate`` (P(the background's colour family
is the one tied to the concept), train only: a Waterbirds-style shortcut for worst-group
tests) and ``background_word_rate`` (how often captions name the background). The
background is a random colour; its family, ``warm`` (more red than blue) or ``cool``, is
labelled as the ``background`` attribute in every split. Each look-alike pair is split
across the two families (doctor cool, nurse warm, ...), so a model that learned the shortcut
calls a nurse on a cool background a doctor when her object is hidden: the worst
(concept, background) cell shows it. The train split is biased; ``eval`` is uniform over
gender × age × concept (``val`` too, drawn apart, for selection), with the background
family independent of the concept; ``neutral`` shows people with no occupation, for
association tests.
Rendering is vectorised over a chunk of samples with numpy masks.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from fairclip.data.shards import write_shards

GENDERS = ("female", "male")
AGES = ("young", "middle-aged", "old")
# Four look-alike pairs: (male-stereotyped, female-stereotyped).
CONCEPT_PAIRS = (
    ("doctor", "nurse"),
    ("engineer", "teacher"),
    ("pilot", "dancer"),
    ("chef", "baker"),
)
CONCEPTS = tuple(c for pair in CONCEPT_PAIRS for c in pair)
# +1: stereotypically male, -1: stereotypically female.
STEREOTYPE = np.array([1 if i % 2 == 0 else -1 for i in range(len(CONCEPTS))])
BACKGROUNDS = ("warm", "cool")
# The background family each concept is tied to under ``spurious_rate``: the two members of a
# look-alike pair get different families, and each family holds two male- and two
# female-stereotyped concepts, so the shortcut is independent of the gender stereotype.
CONCEPT_BACKGROUND = np.array([1, 0, 0, 1, 1, 0, 0, 1])
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "gender": GENDERS,
    "age": AGES,
    "background": BACKGROUNDS,
}
CAPTION_STYLES = ("templates", "compositional")

_PAIR_HUES = np.array([[200, 40, 40], [40, 160, 60], [50, 80, 210], [220, 190, 40]], np.float32)
_HAIR = np.array([[25, 20, 20], [120, 70, 30], [185, 185, 185]], np.float32)  # by age
_SKIN = np.array([225, 180, 150], np.float32)
_NEUTRAL_CLOTHES = np.array([128, 128, 128], np.float32)
_GENDER_NOUN = ("woman", "man")

_TEMPLATES = ("a photo of a {c}.", "an image of a {c}.", "a {c} at work.", "a picture of a {c}.")
_GROUP_TEMPLATES = (
    "a photo of a {a} {g} who works as a {c}.",
    "a {a} {g} working as a {c}.",
    "an image of a {g}, a {c}.",
    "a photo of a {c}, a {a} {g}.",
)
_NEUTRAL_TEMPLATES = ("a photo of a person.", "a photo of a {a} {g}.", "a {g} standing.")

# captions="compositional": a frame around a subject phrase, with gender synonyms, so the
# text tower sees every word in many contexts (thousands of distinct captions instead of
# ~200) and has to compose them, as a text encoder trained on web captions does. The
# zero-shot and query prompts ("a photo of a {c}.", "a {c} at work.") stay in the vocabulary.
_FRAMES = (
    "a photo of {s}.", "an image of {s}.", "a picture of {s}.", "a close-up of {s}.",
    "a portrait of {s}.", "{s}.", "a blurry photo of {s}.", "a bright photo of {s}.",
)  # fmt: skip
_SUBJECTS = (
    "a {c}", "the {c}", "a {c} at work", "someone who works as a {c}",
    "a person working as a {c}", "a {c} standing", "a smiling {c}",
)  # fmt: skip
_GROUP_SUBJECTS = (
    "a {a} {g} who works as a {c}", "a {g} working as a {c}", "a {g}, a {c}",
    "a {c}, a {a} {g}", "a {a} {gadj} {c}", "a {c} who is a {g}",
)  # fmt: skip
_NEUTRAL_SUBJECTS = ("a person", "someone", "a {a} {g}", "a {g} standing", "a {g}", "the {g}")
_GENDER_SYNONYMS = (("woman", "lady"), ("man", "gentleman"))
_GENDER_ADJ = ("female", "male")


@dataclass
class SyntheticConfig:
    """Knobs of the synthetic benchmark (see module docstring)."""

    image_size: int = 32
    male_share: float = 0.5
    association: float = 0.8
    age_shares: tuple[float, ...] = (0.5, 0.3, 0.2)
    group_word_rate: float = 0.5
    object_rate: float = 0.7
    spurious_rate: float = 0.0
    background_word_rate: float = 0.0
    noise: float = 12.0
    seed: int = 0
    concepts: tuple[str, ...] = field(default=CONCEPTS)
    captions: str = "templates"

    def validate(self) -> None:
        for name in (
            "male_share",
            "association",
            "group_word_rate",
            "object_rate",
            "spurious_rate",
            "background_word_rate",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"synthetic.{name}={value}: expected a probability in [0, 1]")
        if len(self.age_shares) != len(AGES) or abs(sum(self.age_shares) - 1.0) > 1e-6:
            raise ValueError(
                f"synthetic.age_shares={list(self.age_shares)}: expected {len(AGES)} shares "
                f"(for {list(AGES)}) summing to 1"
            )
        if self.captions not in CAPTION_STYLES:
            raise ValueError(
                f"synthetic.captions={self.captions!r}: expected one of {list(CAPTION_STYLES)}"
            )
        if self.image_size < 24:
            raise ValueError(f"synthetic.image_size={self.image_size}: expected >= 24 pixels")


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return float(np.log(p / (1 - p)))


def sample_biased_labels(cfg: SyntheticConfig, n: int, rng: np.random.Generator) -> dict:
    """Draw (concept, gender, age) with the planted representation and association skew.

    logit P(male | c) = logit(male_share) + stereotype(c) · logit(association).
    """
    concept = rng.integers(0, len(CONCEPTS), n)
    p_male = 1 / (
        1 + np.exp(-(_logit(cfg.male_share) + STEREOTYPE[concept] * _logit(cfg.association)))
    )
    gender = (rng.random(n) < p_male).astype(np.int64)
    age = rng.choice(len(AGES), size=n, p=np.asarray(cfg.age_shares))
    return {"concept": concept, "gender": gender, "age": age}


def balanced_labels(n_per_cell: int, with_concept: bool, rng: np.random.Generator) -> dict:
    """Uniform gender × age (× concept) grid, shuffled."""
    n_concepts = len(CONCEPTS) if with_concept else 1
    grid = np.stack(
        np.meshgrid(np.arange(n_concepts), np.arange(2), np.arange(len(AGES)), indexing="ij"), -1
    ).reshape(-1, 3)
    cells = np.repeat(grid, n_per_cell, axis=0)[rng.permutation(len(grid) * n_per_cell)]
    concept = cells[:, 0] if with_concept else np.full(len(cells), -1)
    return {"concept": concept, "gender": cells[:, 1], "age": cells[:, 2]}


def render(
    labels: dict, cfg: SyntheticConfig, rng: np.random.Generator, spurious: float
) -> tuple[np.ndarray, np.ndarray]:
    """Render uint8 images [N, S, S, 3] for the given labels (vectorised masks).

    Also returns each image's background family (index into :data:`BACKGROUNDS`): drawn here
    because it is a property of the random background colour.
    """
    n, s = len(labels["gender"]), cfg.image_size
    concept, gender, age = labels["concept"], labels["gender"], labels["age"]
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    yy, xx = yy[None], xx[None]
    unit = s / 32.0
    cx = (s / 2 + rng.integers(-2, 3, n) * unit)[:, None, None]
    cy = (9 * unit + rng.integers(-1, 2, n) * unit)[:, None, None]
    r = 4.2 * unit

    background = rng.uniform(30, 230, (n, 3)).astype(np.float32)
    family = (background[:, 0] <= background[:, 2]).astype(np.int64)  # 0 warm, 1 cool
    tie = (rng.random(n) < spurious) & (concept >= 0)
    swap = tie & (family != CONCEPT_BACKGROUND[np.clip(concept, 0, None)])
    background[swap] = background[swap][:, ::-1]  # red <-> blue flips the family
    family[swap] = 1 - family[swap]
    img = np.broadcast_to(background[:, None, None, :], (n, s, s, 3)).copy()

    has_concept = concept >= 0
    clothes = np.where(
        has_concept[:, None], _PAIR_HUES[np.clip(concept, 0, None) // 2], _NEUTRAL_CLOTHES
    )
    clothes = clothes * rng.uniform(0.85, 1.15, (n, 1))
    body = (np.abs(xx - cx) <= 6 * unit) & (yy >= cy + 5 * unit) & (yy <= cy + 19 * unit)
    img[body] = np.repeat(clothes, body.reshape(n, -1).sum(1), axis=0)

    head = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    img[head] = _SKIN
    cap = ((xx - cx) ** 2 + (yy - cy + 1.5 * unit) ** 2 <= (r + unit) ** 2) & (
        yy <= cy - 1.5 * unit
    )
    long_sides = (np.abs(np.abs(xx - cx) - (r + 0.5 * unit)) <= 1.2 * unit) & (yy >= cy - 2 * unit)
    long_sides &= yy <= cy + 9 * unit
    hair = cap | (long_sides & (gender == 0)[:, None, None])
    img[hair] = np.repeat(_HAIR[age], hair.reshape(n, -1).sum(1), axis=0)

    # Held object: first member of a pair holds a tall bar, the second a flat square badge.
    ox, oy = cx + 8.5 * unit, cy + 10 * unit
    tall = (np.abs(xx - ox) <= 1.0 * unit) & (np.abs(yy - oy) <= 4.0 * unit)
    flat = (np.abs(xx - ox) <= 2.5 * unit) & (np.abs(yy - oy) <= 2.5 * unit)
    member = np.clip(concept, 0, None) % 2
    shown = has_concept & (rng.random(n) < cfg.object_rate)
    obj = np.where((member == 0)[:, None, None], tall, flat) & shown[:, None, None]
    img[obj] = np.array([245, 245, 245], np.float32)

    img += rng.normal(0, cfg.noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), family


def captions(labels: dict, cfg: SyntheticConfig, rng: np.random.Generator) -> list[str]:
    """Captions naming the concept, at ``group_word_rate`` the groups and at
    ``background_word_rate`` the background family (``labels["background"]``)."""
    texts = (
        compositional_captions(labels, cfg, rng)
        if cfg.captions == "compositional"
        else template_captions(labels, cfg, rng)
    )
    if cfg.background_word_rate > 0:  # no draw at 0: earlier datasets stay byte-identical
        named = np.flatnonzero(rng.random(len(texts)) < cfg.background_word_rate)
        for i in named:  # string formatting only
            texts[i] = f"{texts[i][:-1]} on a {BACKGROUNDS[labels['background'][i]]} background."
    return texts


def template_captions(labels: dict, cfg: SyntheticConfig, rng: np.random.Generator) -> list[str]:
    """One of a few fixed templates per caption (``captions="templates"``, ~200 captions)."""
    n = len(labels["gender"])
    with_group = rng.random(n) < cfg.group_word_rate
    pick = rng.integers(0, 4, n)
    out = []
    for i in range(n):  # string formatting only; rendering above is vectorised
        c, g, a = labels["concept"][i], _GENDER_NOUN[labels["gender"][i]], AGES[labels["age"][i]]
        if c < 0:
            out.append(
                _NEUTRAL_TEMPLATES[pick[i] % 3].format(a=a, g=g)
                if with_group[i]
                else _NEUTRAL_TEMPLATES[0]
            )
        elif with_group[i]:
            out.append(_GROUP_TEMPLATES[pick[i]].format(a=a, g=g, c=CONCEPTS[c]))
        else:
            out.append(_TEMPLATES[pick[i]].format(c=CONCEPTS[c]))
    return out


def compositional_captions(
    labels: dict, cfg: SyntheticConfig, rng: np.random.Generator
) -> list[str]:
    """A random frame around a random subject phrase (``captions="compositional"``)."""
    n = len(labels["gender"])
    with_group = rng.random(n) < cfg.group_word_rate
    frame, subject, synonym = rng.integers(0, 1 << 16, (3, n))
    out = []
    for i in range(n):  # string formatting only
        c, gi, a = labels["concept"][i], labels["gender"][i], AGES[labels["age"][i]]
        g = _GENDER_SYNONYMS[gi][synonym[i] % 2]
        if c < 0:
            pool = _NEUTRAL_SUBJECTS if with_group[i] else _NEUTRAL_SUBJECTS[:2]
        else:
            pool = _GROUP_SUBJECTS if with_group[i] else _SUBJECTS
        phrase = pool[subject[i] % len(pool)].format(
            a=a, g=g, gadj=_GENDER_ADJ[gi], c=CONCEPTS[max(c, 0)]
        )
        out.append(_FRAMES[frame[i] % len(_FRAMES)].format(s=phrase))
    return out


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def generate_samples(split: str, n: int, cfg: SyntheticConfig, chunk: int = 2048) -> Iterator[dict]:
    """Yield WebDataset samples for ``split`` in {train, eval, neutral, val}.

    ``n`` is the sample count for ``train``; for the balanced splits it is rounded down to a
    whole number of samples per grid cell. ``val`` is drawn like ``eval`` from its own seed: a
    held-out split for choices (epochs, hyper-parameters) that must not see the reported one.
    """
    cfg.validate()
    split_seed = {"train": 0, "eval": 1, "neutral": 2, "val": 3}
    if split not in split_seed:
        raise ValueError(f"split={split!r}: expected one of {sorted(split_seed)}")
    rng = np.random.default_rng([cfg.seed, split_seed[split]])
    if split == "train":
        labels = sample_biased_labels(cfg, n, rng)
    else:
        with_concept = split in ("eval", "val")
        cells = 2 * len(AGES) * (len(CONCEPTS) if with_concept else 1)
        if n < cells:
            raise ValueError(f"{split} split needs n >= {cells} (one per group cell), got {n}")
        labels = balanced_labels(n // cells, with_concept=with_concept, rng=rng)
    spurious = cfg.spurious_rate if split == "train" else 0.0
    total = len(labels["gender"])
    for start in range(0, total, chunk):
        part = {k: v[start : start + chunk] for k, v in labels.items()}
        images, part["background"] = render(part, cfg, rng, spurious)
        texts = captions(part, cfg, rng)
        for i in range(len(texts)):
            meta = {
                "gender": GENDERS[part["gender"][i]],
                "age": AGES[part["age"][i]],
                "background": BACKGROUNDS[part["background"][i]],
            }
            if part["concept"][i] >= 0:
                meta["concept"] = CONCEPTS[part["concept"][i]]
            yield {
                "__key__": f"{split}-{start + i:08d}",
                "png": encode_png(images[i]),
                "txt": texts[i],
                "json": meta,
            }


def write_synthetic(cfg: DictConfig) -> dict[str, int]:
    """Generate the requested synthetic splits into ``cfg.out/<split>/``."""
    synth = SyntheticConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.synthetic.items()}
    )
    sizes = {
        "train": cfg.train_size,
        "eval": cfg.eval_size,
        "neutral": cfg.neutral_size,
        "val": cfg.val_size,
    }
    written = {}
    for split in cfg.splits:
        if split not in sizes:
            raise ValueError(
                f"splits: unknown split {split!r}, expected a subset of {sorted(sizes)}"
            )
        if not isinstance(sizes[split], int) or sizes[split] <= 0:
            raise ValueError(f"{split}_size={sizes[split]!r}: expected a positive integer")
        shard_size = cfg.shard_size if split == "train" else cfg.eval_shard_size
        shards = write_shards(
            generate_samples(split, int(sizes[split]), synth),
            Path(cfg.out) / split,
            prefix=split,
            shard_size=shard_size,
            total=int(sizes[split]),
        )
        written[split] = sum(s.size for s in shards)
    return written
