"""The one prompt grammar of every prompt list in the configs, and caption corpus files.

A prompt list is a list of strings, or ``{templates, words}``: every template formatted with
every word. ``words`` is a list for templates with one ``{}`` placeholder (word-major order:
all templates of the first word, then the next), or a mapping ``{name: [...]}`` for templates
with named placeholders such as ``{c}`` (template-major order, each combination once).
A list may mix strings and such mappings."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf


def expand_prompts(spec: Any, key: str) -> list[str]:
    """A prompt list from a list of strings, or ``{templates, words}`` (or a list of those):
    every template formatted with every combination of its placeholder words."""
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, Mapping):
        templates = spec.get("templates")
        words = spec.get("words") or {}
        if templates and isinstance(words, list | tuple) and words:
            for t in templates:
                if t.count("{}") != 1:
                    raise ValueError(
                        f"{key}.templates: template {t!r} must contain exactly one '{{}}' "
                        "placeholder (words is a list)"
                    )
            return [t.format(w) for w in _flatten(words) for t in templates]
        if not templates or not isinstance(words, Mapping):
            raise ValueError(
                f"{key}: expected {{templates: [...], words: [...]}} or "
                "{templates: [...], words: {name: [...]}}"
            )
        names = list(words)
        lists = [_flatten(words[n]) for n in names]
        out = []
        for t in templates:
            used = [i for i, n in enumerate(names) if "{" + n + "}" in t]
            for combo in itertools.product(*(lists[i] for i in used)):
                out.append(t.format(**{names[i]: w for i, w in zip(used, combo, strict=True)}))
        return list(dict.fromkeys(out))
    if isinstance(spec, list | tuple):
        if all(isinstance(s, str) for s in spec):
            return list(spec)
        out = []
        for i, item in enumerate(spec):
            out.extend([item] if isinstance(item, str) else expand_prompts(item, f"{key}[{i}]"))
        return list(dict.fromkeys(out))
    raise ValueError(f"{key}: expected a list of prompts or {{templates, words}}, got {spec!r}")


def _flatten(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [w for v in value for w in _flatten(v)]
    return [str(value)]
