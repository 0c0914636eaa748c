"""SAE presets per backbone: the MSAE widths and TopK levels SEM's authors released, chosen
from the model's name, and a scaled preset with the same shape for any other model.

Every preset is over-complete (16,384 latents for the CLIP backbones; 32 x d scaled), uses
the "reverse" level weighting (the sparsest level weighs most) and keeps all positive latents
at inference (:meth:`MatryoshkaTopKSAE.encode`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fairclip.sae.model import check_int


@dataclass(frozen=True)
class SAEPreset:
    """Width, nested TopK levels and level weighting of an SAE for ``d_in``-dim embeddings."""

    name: str
    d_in: int
    n_latents: int
    k_levels: tuple[int, ...]
    level_weights: str = "reverse"

    def settings(self) -> dict[str, Any]:
        """SAEConfig keyword arguments."""
        return {
            "n_latents": self.n_latents,
            "k_levels": self.k_levels,
            "level_weights": self.level_weights,
        }


# The backbones of SEM's released SAEs (mardgui/SEM configs; ViT-B/32 takes ViT-B/16's
# levels: same width, no released file).
PRESETS: dict[str, SAEPreset] = {
    p.name: p
    for p in (
        SAEPreset("ViT-B-16", 512, 16384, (256, 512)),
        SAEPreset("ViT-B-32", 512, 16384, (256, 512)),
        SAEPreset("ViT-L-14", 768, 16384, (256, 512)),
        SAEPreset("RN50", 1024, 16384, (512, 1024)),
        SAEPreset("RN101", 512, 16384, (128, 256, 512)),
    )
}
SCALED_EXPANSION = 32  # MSAE's ViT-B/16 width over d (16,384 / 512)

# open_clip spellings of one backbone: "ViT-B-16", "ViT-B/16", "ViT-B-16-quickgelu",
# "ViT-L-14-336"; "ViT-B-16-SigLIP" and "ViT-B-16-plus" are other models
_SUFFIX = re.compile(r"^(-quickgelu|-336|@336px)?$", re.IGNORECASE)


def scaled_preset(d_in: int) -> SAEPreset:
    """The MSAE shape for any width: ``32 d`` latents, TopK levels ``d/2`` and ``d``."""
    check_int("d_in", d_in, 2)
    return SAEPreset("scaled", d_in, SCALED_EXPANSION * d_in, (d_in // 2, d_in))


def preset_for(model_name: str | None, d_in: int) -> SAEPreset:
    """The backbone's preset when ``model_name`` names one with ``d_in``-dim embeddings,
    else the scaled preset (a checkpoint path, a tiny demo model, SigLIP)."""
    name = str(model_name or "").replace("/", "-").rsplit(":", 1)[-1]
    for key, preset in PRESETS.items():
        same = name.lower().startswith(key.lower()) and _SUFFIX.match(name[len(key) :])
        if same and preset.d_in == d_in:
            return preset
    return scaled_preset(d_in)


def resolve_preset(choice: str, model_name: str | None, d_in: int, key: str) -> dict[str, Any]:
    """SAEConfig settings of ``choice``: ``auto`` (:func:`preset_for`), ``scaled``, a backbone
    name of :data:`PRESETS`, or ``none`` (no preset: the explicit settings alone)."""
    if choice == "none":
        return {}
    if choice == "auto":
        return preset_for(model_name, d_in).settings()
    if choice == "scaled":
        return scaled_preset(d_in).settings()
    if choice not in PRESETS:
        raise ValueError(
            f"{key}={choice!r}: expected auto, scaled, none or one of {sorted(PRESETS)}"
        )
    preset = PRESETS[choice]
    if preset.d_in != d_in:
        raise ValueError(
            f"{key}={choice!r}: that preset is for {preset.d_in}-dim embeddings, the model "
            f"gives {d_in}"
        )
    return preset.settings()


def sae_settings(
    choice: str, model_name: str | None, d_in: int, explicit: dict[str, Any], key: str
) -> dict[str, Any]:
    """The preset's settings with every non-null ``explicit`` one (e.g. ``n_latents``) on top.

    A narrower explicit ``n_latents`` than the preset's TopK levels allow, without explicit
    ``k_levels``, takes MSAE's default levels for that width (:func:`default_k_levels`).
    """
    settings = resolve_preset(choice, model_name, d_in, key)
    given = {k: v for k, v in explicit.items() if v is not None}
    narrower = "n_latents" in given and "k_levels" not in given
    if narrower and max(settings.get("k_levels") or (0,)) > given["n_latents"]:
        settings.pop("k_levels")
    settings.update(given)
    if "n_latents" not in settings:
        raise ValueError(f"{key}=none: set n_latents (no preset gives it)")
    return settings
