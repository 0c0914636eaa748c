"""Load anything a user can point a fairclip app at, as a :class:`ModelBundle` in eval mode.

An open_clip name (with a pretrained tag or weights file), a fairclip export dir
(``local-dir:<dir>`` or the dir), a run dir (its ``export/``, else ``checkpoints/last.ckpt``),
a FairCLIPModule Lightning ``.ckpt``, an exported ``.safetensors``, or a saved
:class:`~fairclip.debias.debiased_clip.DebiasedCLIP`. It sits above ``fairclip.model`` and
``fairclip.debias`` because a saved DebiasedCLIP is one of the things a user points at.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors import safe_open

from fairclip.debias.debiased_clip import DEBIAS_CONFIG, DebiasedCLIP
from fairclip.model.factory import (
    DEFAULT_KEYS,
    EXPORT_CONFIG,
    ModelBundle,
    ModelKeys,
    create_model,
    load_export,
)

_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def _load_lightning_checkpoint(
    path: Path, device: str | torch.device, precision: str | None, keys: ModelKeys
) -> ModelBundle:
    """Rebuild the open_clip model named in a FairCLIPModule checkpoint's hparams.

    The architecture comes from the hparams, and from the pretrained tag's config (QuickGELU,
    image mean/std) without downloading its weights: the checkpoint replaces them anyway.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{keys.name}={str(path)!r}: not a readable Lightning checkpoint ({err})"
        ) from err
    hparams = ckpt.get("hyper_parameters") or {}
    spec = hparams.get("model")
    if not isinstance(spec, dict) or "name" not in spec or "state_dict" not in ckpt:
        raise ValueError(
            f"{keys.name}={str(path)!r}: expected a FairCLIPModule checkpoint (hyper_parameters.model "
            f"with a 'name' and a state_dict), got keys {sorted(ckpt)}"
        )
    name, tag = spec["name"], spec.get("pretrained")
    kwargs: dict[str, Any] = {}
    if tag and not os.path.isfile(tag) and not str(tag).endswith(_WEIGHT_SUFFIXES):
        tag_cfg = open_clip.get_pretrained_cfg(name, tag) or {}
        for src, dst in (
            ("mean", "image_mean"),
            ("std", "image_std"),
            ("interpolation", "image_interpolation"),
            ("resize_mode", "image_resize_mode"),
        ):
            if src in tag_cfg:
                kwargs[dst] = tag_cfg[src]
        if tag_cfg.get("quick_gelu"):
            kwargs["force_quick_gelu"] = True
    bundle = create_model(
        name,
        pretrained=None,
        config_file=spec.get("config_file"),
        precision=precision or spec.get("precision") or "fp32",
        device=device,
        **kwargs,
    )
    state = {
        k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")
    }
    if not state:
        raise ValueError(f"{keys.name}={str(path)!r}: state_dict has no 'model.*' weights")
    bundle.model.load_state_dict(state, strict=True)
    return bundle


def load_model(
    spec: str,
    pretrained: str | None = None,
    config_file: str | None = None,
    precision: str | None = None,
    device: str | torch.device = "cpu",
    keys: ModelKeys = DEFAULT_KEYS,
) -> ModelBundle:
    """Load any model fairclip can evaluate, in eval mode.

    ``spec`` is one of: an open_clip model name (with ``pretrained`` = tag or weights file);
    ``local-dir:<fairclip export dir>`` or the export dir itself; a fairclip run dir (its
    ``export/``, else ``checkpoints/last.ckpt``); a Lightning ``.ckpt`` of FairCLIPModule; or
    an exported ``.safetensors`` (the architecture name is in its metadata).
    """
    spec = str(spec)
    path = Path(spec.removeprefix("local-dir:"))
    looks_like_path = (
        spec.startswith("local-dir:")
        or os.sep in spec
        or spec.endswith((".ckpt", *_WEIGHT_SUFFIXES))
        or path.exists()  # a relative run dir such as `my_run`
    )
    if looks_like_path and not path.exists():
        raise FileNotFoundError(
            f"{keys.name}={spec!r}: file or directory not found (expected a fairclip run dir, an "
            "export dir, a Lightning .ckpt or a weights file)"
        )
    if path.is_dir() and looks_like_path:
        if (path / DEBIAS_CONFIG).is_file():  # a saved DebiasedCLIP: base export + interventions
            base = load_export(path, precision or "fp32", device)
            model = DebiasedCLIP.load(path, device=device)
            bundle = ModelBundle(
                model, base.preprocess_train, base.preprocess_val, base.tokenizer, base.name
            )
        elif (path / EXPORT_CONFIG).is_file():
            bundle = load_export(path, precision or "fp32", device)
        elif (path / "export" / EXPORT_CONFIG).is_file():
            bundle = load_export(path / "export", precision or "fp32", device)
        elif (path / "checkpoints" / "last.ckpt").is_file():
            bundle = _load_lightning_checkpoint(
                path / "checkpoints" / "last.ckpt", device, precision, keys
            )
        else:
            raise FileNotFoundError(
                f"{keys.name}={spec!r}: directory holds no {EXPORT_CONFIG}, export/{EXPORT_CONFIG} or "
                "checkpoints/last.ckpt (expected a fairclip export or run dir)"
            )
    elif looks_like_path and spec.endswith(".ckpt"):
        bundle = _load_lightning_checkpoint(path, device, precision, keys)
    elif looks_like_path and spec.endswith(".safetensors"):
        try:
            with safe_open(str(path), framework="pt") as f:
                name = (f.metadata() or {}).get("model_name")
        except Exception as err:  # safetensors' own error type for a bad header
            raise ValueError(f"{keys.name}={spec!r}: not a safetensors file ({err})") from err
        if not name:
            raise ValueError(
                f"{keys.name}={spec!r}: weights file has no 'model_name' metadata; give the "
                f"architecture instead: {keys.name}=<open_clip name> {keys.pretrained}=<file>"
            )
        bundle = create_model(
            name, pretrained=str(path), precision=precision or "fp32", device=device
        )
    elif looks_like_path:
        raise ValueError(
            f"{keys.name}={spec!r}: a weights file needs its architecture: "
            f"{keys.name}=<open_clip name> {keys.pretrained}={spec}"
        )
    else:
        bundle = create_model(
            spec,
            pretrained=pretrained,
            config_file=config_file,
            precision=precision or "fp32",
            device=device,
            keys=keys,
        )
    bundle.model.eval()
    return bundle
