"""Captions built from attribute labels, and their counterfactuals (Zhang, Guo, Kankanhalli 2025).

Why: face datasets (FairFace, UTKFace, CelebA) have group labels but no captions and no
concepts. The joint-heads paper trains on such images with a caption made from the labels
("a photo of a {age} {race} {gender}.") and a counterfactual caption in which the named
attributes take another value: the other one of a binary attribute, a uniformly drawn other
value of an attribute with more than two (race, binned age). Building both from the labels,
not by swapping tokens, handles multi-word values ("Middle Eastern", "East Asian") and any
number of values.

Several label values may share one phrase (FairFace's nine age bins are written young,
middle-aged or old, as the paper bins them): a counterfactual then draws among the *other
phrases*, so it never repeats the factual one. :class:`CaptionCodes` is the vectorised form
for training loops: every caption the template can write, indexed, and label-index rows
mapped to caption indices (factual, or with fresh counterfactual draws) on the GPU.
"""

from __future__ import annotations

import itertools
import math
import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

__all__ = ["AttributeCaptions", "CaptionCodes"]

# every caption of a template is encoded once: more than this many is a config mistake
MAX_CAPTIONS = 100_000


def _placeholders(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


@dataclass(frozen=True)
class AttributeCaptions:
    """``template`` with one ``{attribute}`` placeholder per attribute it names; ``words``:
    attribute -> label value -> the phrase written in the caption; ``swap``: the attributes a
    counterfactual changes (default every placeholder, as the paper's joint variant)."""

    template: str
    words: Mapping[str, Mapping[str, str]]
    swap: tuple[str, ...]

    @classmethod
    def from_config(
        cls, raw: Any, attributes: Mapping[str, Sequence[str]], key: str = "captions"
    ) -> AttributeCaptions:
        """Check ``{template, words, swap}`` against the data's attribute vocabularies."""
        if OmegaConf.is_config(raw):
            raw = OmegaConf.to_container(raw, resolve=True)
        if not isinstance(raw, Mapping) or not {"template", "words"} <= set(raw) <= {
            "template",
            "words",
            "swap",
        }:
            raise ValueError(f"{key}: expected {{template, words[, swap]}}, got {raw!r}")
        template, words = str(raw["template"]), raw["words"]
        names = _placeholders(template)
        swap = raw.get("swap", names)
        if not names or len(set(names)) != len(names):
            raise ValueError(
                f"{key}.template={template!r}: expected distinct {{attribute}} placeholders"
            )
        if not isinstance(words, Mapping):
            raise ValueError(f"{key}.words: expected attribute -> value -> phrase")
        for name in names:
            if name not in attributes:
                raise ValueError(
                    f"{key}.template: {{{name}}} is not an attribute of data.attributes "
                    f"{list(attributes)}"
                )
            given = words.get(name)
            if not isinstance(given, Mapping) or set(map(str, given)) != set(attributes[name]):
                have = sorted(map(str, given)) if isinstance(given, Mapping) else given
                raise ValueError(
                    f"{key}.words.{name}: expected a phrase for exactly the values "
                    f"data.attributes.{name}={list(attributes[name])}, got {have}"
                )
        if isinstance(swap, str) or not isinstance(swap, Sequence) or not swap:
            raise ValueError(f"{key}.swap: expected a non-empty list of attributes, got {swap!r}")
        for name in swap:
            if name not in names:
                raise ValueError(f"{key}.swap: {name!r} is not a placeholder of the template")
        phrases = {n: {str(v): str(p) for v, p in words[n].items()} for n in names}
        for name in swap:
            if len(set(phrases[name].values())) < 2:
                raise ValueError(
                    f"{key}.swap: {name!r} has one phrase, there is nothing to swap it to"
                )
        return cls(template, phrases, tuple(str(s) for s in swap))

    def caption(self, labels: Mapping[str, Any], where: str = "sample") -> str:
        """The factual caption of one sample's labels."""
        return self.template.format(**{n: self._phrase(n, labels, where) for n in self.words})

    def phrases(self, name: str) -> list[str]:
        """The distinct phrases of one attribute, in the order of its first values."""
        return list(dict.fromkeys(self.words[name].values()))

    def counterfactual(
        self, labels: Mapping[str, Any], rng: random.Random, where: str = "sample"
    ) -> str:
        """The caption with every ``swap`` attribute at a uniformly drawn other phrase."""
        phrases = {n: self._phrase(n, labels, where) for n in self.words}
        for name in self.swap:
            others = [p for p in self.phrases(name) if p != phrases[name]]
            phrases[name] = others[rng.randrange(len(others))]
        return self.template.format(**phrases)

    def _value(self, name: str, labels: Mapping[str, Any], where: str) -> str:
        value = labels.get(name)
        if value is None or str(value) not in self.words[name]:
            raise ValueError(
                f"{where}: label {name}={value!r} has no caption phrase (expected one of "
                f"{list(self.words[name])})"
            )
        return str(value)

    def _phrase(self, name: str, labels: Mapping[str, Any], where: str) -> str:
        return self.words[name][self._value(name, labels, where)]


class CaptionCodes:
    """Every caption of ``captions``' template, and label-index rows mapped to them.

    Rows are the data's group indices (``batch["groups"]``, one column per attribute of
    ``attributes``, -1 unlabelled). A caption is a mixed-radix code over the template's
    attributes' phrases, so a batch's captions and counterfactuals are two tensor lookups:
    training encodes :attr:`texts` (a few dozen for FairFace) instead of every sample's caption.
    """

    def __init__(self, captions: AttributeCaptions, attributes: Mapping[str, Sequence[str]]):
        self.captions = captions
        names = list(captions.words)
        self.columns = torch.tensor([list(attributes).index(n) for n in names])
        phrases = [captions.phrases(n) for n in names]
        # value index (data order) -> phrase index, per template attribute
        self.luts = [
            torch.tensor([phrases[i].index(captions.words[n][str(v)]) for v in attributes[n]])
            for i, n in enumerate(names)
        ]
        self.sizes = torch.tensor([len(p) for p in phrases])
        total = math.prod(len(p) for p in phrases)
        if total > MAX_CAPTIONS:
            raise ValueError(
                f"captions.template {captions.template!r}: {total} distinct captions, expected at "
                f"most {MAX_CAPTIONS} (bin the attributes' values into fewer phrases)"
            )
        # radix of attribute i: product of the sizes after it (the last varies fastest)
        self.radix = torch.tensor(
            [math.prod(len(p) for p in phrases[i + 1 :]) for i in range(len(names))]
        )
        self.swap = torch.tensor([n in captions.swap for n in names])
        self.texts = [
            captions.template.format(**dict(zip(names, combo, strict=True)))
            for combo in itertools.product(*phrases)
        ]

    def phrase_codes(self, groups: Tensor) -> Tensor:
        """``[B, A]`` phrase index per template attribute; -1 where the label is missing."""
        values = groups[:, self.columns.to(groups.device)]
        out = torch.full_like(values, -1)
        for i, lut in enumerate(self.luts):
            known = values[:, i] >= 0
            out[known, i] = lut.to(groups.device)[values[known, i]]
        return out

    def index(self, codes: Tensor) -> Tensor:
        """Caption index of phrase codes ``[B, A]`` (-1 where any code is missing)."""
        flat = (codes * self.radix.to(codes.device)).sum(-1)
        return torch.where((codes >= 0).all(-1), flat, torch.full_like(flat, -1))

    def counterfactual(self, codes: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Phrase codes with every swapped attribute moved to a uniformly drawn other phrase."""
        sizes = self.sizes.to(codes.device)
        # an offset in 1..size-1 draws each other phrase with probability 1/(size-1)
        u = torch.rand(codes.shape, generator=generator).to(codes.device)
        offset = 1 + (u * (sizes - 1)).long().clamp(max=sizes - 2)
        moved = (codes + offset) % sizes
        return torch.where(self.swap.to(codes.device) & (codes >= 0), moved, codes)
