"""SAE files: this project's (safetensors weights, config as JSON metadata) and the authors'
``.pth`` checkpoints (:mod:`fairclip.sae.published`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fairclip.files import atomic_path
from fairclip.sae.model import MatryoshkaTopKSAE, SAEConfig
from fairclip.sae.published import is_published_sae, load_published_sae

FORMAT = "fairclip.sae/v1"


def save_sae(sae: MatryoshkaTopKSAE, path: str | os.PathLike[str]) -> Path:
    """Write weights and buffers as safetensors with the config as JSON metadata (atomic)."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(sae.cfg.to_dict())}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_sae(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> MatryoshkaTopKSAE:
    """Load an SAE written by :func:`save_sae`, or an authors' ``.pth`` (SEM's or MSAE's key
    layout); a missing or malformed file names the path."""
    path = Path(path)
    if is_published_sae(path):
        return load_published_sae(path, device)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SAE file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(
            f"{path}: not a fairclip SAE file (metadata format={meta.get('format')!r}, "
            f"expected {FORMAT!r} with a config)"
        )
    try:
        cfg = SAEConfig.from_dict(json.loads(meta["config"]))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: invalid SAE config in metadata ({e})") from e
    sae = MatryoshkaTopKSAE(cfg)
    try:
        sae.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the stored config ({e})") from e
    return sae.to(device).eval()
