"""Captions built from attribute labels, and their counterfactuals (Zhang, Guo, Kankanhalli 2025).

Why: face datasets (FairFace, UTKFace, CelebA) have group labels but no captions and no
concepts. The joint-heads paper trains on such images with a caption made from the labels
("a photo of a {age} {race} {gender}.") and a counterfactual caption in which the named
attributes take another value: the other one of a binary attribute, a uniformly drawn other
value of an attribute with more than two (race, binned age). Building both from the labels,
not by swapping tokens, handles multi-word values ("Middle Eastern", "East Asian") and any
number of values.
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

__all__ = ["AttributeCaptions"]


def _placeholders(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


@dataclass(frozen=True)
class AttributeCaptions:
    """``template`` with one ``{attribute}`` placeholder per attribute it names; ``words``:
    attribute -> label value -> the phrase written in the caption; ``swap``: the attributes a
    counterfactual changes (every one of them, as the paper's joint variant)."""

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
        if not isinstance(raw, Mapping) or set(raw) != {"template", "words", "swap"}:
            raise ValueError(f"{key}: expected {{template, words, swap}}, got {raw!r}")
        template, words, swap = str(raw["template"]), raw["words"], raw["swap"]
        names = _placeholders(template)
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
            if len(attributes[name]) < 2:
                raise ValueError(f"{key}.swap: {name!r} has one value, there is nothing to swap")
        phrases = {n: {str(v): str(p) for v, p in words[n].items()} for n in names}
        return cls(template, phrases, tuple(str(s) for s in swap))

    def caption(self, labels: Mapping[str, Any], where: str = "sample") -> str:
        """The factual caption of one sample's labels."""
        return self.template.format(**{n: self._phrase(n, labels, where) for n in self.words})

    def counterfactual(
        self, labels: Mapping[str, Any], rng: random.Random, where: str = "sample"
    ) -> str:
        """The caption with every ``swap`` attribute at a uniformly drawn other value."""
        values = {n: self._value(n, labels, where) for n in self.words}
        for name in self.swap:
            others = [v for v in self.words[name] if v != values[name]]
            values[name] = others[rng.randrange(len(others))]
        return self.template.format(**{n: self.words[n][v] for n, v in values.items()})

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
