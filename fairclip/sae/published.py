"""The SAE checkpoints their authors released (``.pth``), loaded into :class:`MatryoshkaTopKSAE`.

Two key layouts exist, both for ``z = ReLU(W_enc (x' - b_pre) + b_enc)``, ``x'_hat = W_dec z +
b_pre`` with all positive latents kept at inference:

* **SEM** (Guimard et al. 2026, e.g. ``MSAE_ViT-B-16_512_16384_256x512_reverse.pth``): a plain
  state dict ``bpre [d]``, ``encoder.weight [n, d]``, ``encoder.bias [n]``,
  ``decoder.weight [d, n]``, applied to the raw text embeddings (``x' = x``).
* **MSAE** (Zaigrajew et al. 2025, ``train.py``): ``{"model": {pre_bias [d], encoder [d, n],
  latent_bias [n], decoder [n, d], ...}, "mean_center", "scaling_factor", "target_norm"}``,
  applied to ``x' = (x - mean_center) * scaling_factor`` and undone after decoding.

MSAE's centring and scaling fold exactly into this project's SAE: ``input_scale = s`` and
``b_pre = pre_bias + s * mean_center`` give the same latents and ``decode`` the same output.
Both kinds are marked ``input_norm="raw"``: their authors feed unnormalised embeddings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fairclip.sae.model import MatryoshkaTopKSAE, SAEConfig

SEM_KEYS = ("bpre", "encoder.weight", "encoder.bias", "decoder.weight")
MSAE_KEYS = ("pre_bias", "encoder", "latent_bias", "decoder")
PUBLISHED_SUFFIXES = (".pth", ".pt")

# SEM's file names end in ``_<k levels joined by x>_<reverse|uniform>``
_SEM_NAME = re.compile(r"_(\d+(?:x\d+)*)_(reverse|uniform)$")
# MSAE's: ``<n>_<d>_<activation>[_<k>]_<RW|UW>_<tied>_<normalize>_<soft cap>_...``
_MSAE_NAME = re.compile(r"^\d+_\d+_\w*?TopK\w*?_(\d+)_(RW|UW)_(True|False)_(True|False)_([\d.]+)")


def is_published_sae(path: str | Path) -> bool:
    return Path(path).suffix in PUBLISHED_SUFFIXES


def load_published_sae(path: str | Path, device: str | torch.device = "cpu") -> MatryoshkaTopKSAE:
    """Load an authors' ``.pth`` SAE (SEM or MSAE layout); errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SAE file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle with code, not a torch file at all
        raise ValueError(
            f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(raw).__name__}")
    if isinstance(raw.get("model"), dict):
        weights, scale, shift = _msae(raw, path)
    elif any(k in raw for k in SEM_KEYS):
        weights, scale, shift = _sem(raw, path), 1.0, None
    else:
        raise ValueError(
            f"{path}: neither SEM's SAE layout (keys {list(SEM_KEYS)}) nor MSAE's (a 'model' "
            f"dict with {list(MSAE_KEYS)}); found keys {sorted(map(str, raw))[:8]}"
        )
    w_enc, b_enc, w_dec, b_pre = weights
    n, d = w_enc.shape
    k_levels, level_weights = _levels_from_name(path, n, d)
    cfg = SAEConfig(
        d_in=d,
        n_latents=n,
        k_levels=k_levels,
        level_weights=level_weights,
        normalize=False,
        input_norm="raw",
    )
    sae = MatryoshkaTopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_pre.copy_(b_pre if shift is None else b_pre + scale * shift)
        sae.input_scale.fill_(scale)
        sae.initialized.fill_(True)
    return sae.to(device).eval()


def _tensor(state: dict[str, Any], key: str, path: Path, ndim: int) -> Tensor:
    if key not in state:
        raise ValueError(f"{path}: missing key {key!r} (has {sorted(map(str, state))})")
    value = state[key]
    if not isinstance(value, Tensor) or value.ndim != ndim:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{path}: {key!r} should be a {ndim}-D tensor, got {shape}")
    return value.float()


def _check_shapes(path: Path, shapes: dict[str, tuple[int, ...]], n: int, d: int) -> None:
    expected = {"decoder": (n, d), "encoder bias": (n,), "pre-bias": (d,)}
    for name, shape in shapes.items():
        if shape != expected[name]:
            raise ValueError(
                f"{path}: {name} has shape {shape}, expected {expected[name]} for an SAE with "
                f"{n} latents on {d}-dim inputs"
            )


def _sem(state: dict[str, Any], path: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w_enc = _tensor(state, "encoder.weight", path, 2)
    b_enc = _tensor(state, "encoder.bias", path, 1)
    w_dec = _tensor(state, "decoder.weight", path, 2).T
    b_pre = _tensor(state, "bpre", path, 1)
    n, d = w_enc.shape
    shapes = {"decoder": tuple(w_dec.shape), "encoder bias": tuple(b_enc.shape)}
    _check_shapes(path, {**shapes, "pre-bias": tuple(b_pre.shape)}, n, d)
    return w_enc, b_enc, w_dec.contiguous(), b_pre


def _msae(raw: dict[str, Any], path: Path) -> tuple[tuple[Tensor, ...], float, Tensor | None]:
    state = raw["model"]
    w_enc = _tensor(state, "encoder", path, 2).T.contiguous()
    b_enc = _tensor(state, "latent_bias", path, 1)
    w_dec = _tensor(state, "decoder", path, 2)
    b_pre = _tensor(state, "pre_bias", path, 1)
    n, d = w_enc.shape
    shapes = {"decoder": tuple(w_dec.shape), "encoder bias": tuple(b_enc.shape)}
    _check_shapes(path, {**shapes, "pre-bias": tuple(b_pre.shape)}, n, d)
    for key in ("mean_center", "scaling_factor"):
        if key not in raw:
            raise ValueError(f"{path}: missing key {key!r} of MSAE's checkpoint layout")
    scale = float(torch.as_tensor(raw["scaling_factor"]))
    if not scale > 0:
        raise ValueError(f"{path}: scaling_factor={scale}, expected a float > 0")
    mean = torch.as_tensor(raw["mean_center"], dtype=torch.float32)
    mean = mean.expand(d).clone() if mean.ndim == 0 else mean
    if tuple(mean.shape) != (d,):
        raise ValueError(f"{path}: mean_center has shape {tuple(mean.shape)}, expected ({d},)")
    return (w_enc, b_enc, w_dec, b_pre), scale, mean


def _levels_from_name(path: Path, n: int, d: int) -> tuple[tuple[int, ...] | None, str]:
    """k levels and level weighting from the authors' file-name conventions (else MSAE's
    defaults). They only matter for further training: inference keeps every latent."""
    sem = _SEM_NAME.search(path.stem)
    if sem:
        return tuple(int(k) for k in sem.group(1).split("x")), sem.group(2)
    msae = _MSAE_NAME.search(path.stem)
    if msae:
        _, weighting, _, normalize, soft_cap = msae.groups()
        if normalize == "True" or float(soft_cap) != 0.0:
            raise ValueError(
                f"{path}: per-sample normalisation or a latent soft cap (from the file name) is "
                "not supported; only MSAE's default TopK-ReLU SAEs load"
            )
        return None, "reverse" if weighting == "RW" else "uniform"
    return None, "reverse"
