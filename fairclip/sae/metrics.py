"""Reconstruction and sparsity metrics of an SAE, and the inputs that activate a latent most."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fairclip.sae.model import EPS, MatryoshkaTopKSAE, check_int


@torch.no_grad()
def sae_metrics(sae: MatryoshkaTopKSAE, x: Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Reconstruction and sparsity metrics over a whole set of embeddings.

    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the set. Keys without suffix are the
    inference view (all positive activations); ``*_topk`` is the largest training level and
    ``fvu_k{k}`` every level. ``l0`` counts active latents per row; ``dead_fraction`` is the
    share of latents never in a top-k_max on ``x`` (``dead_fraction_inference``: never
    positive; ``dead_fraction_train``: the training counter).
    """
    x = sae._check_input(x)
    check_int("batch_size", batch_size, 1)
    cfg = sae.cfg
    s = sae.input_scale
    mean = x.mean(0, dtype=torch.float64)
    total_var = 0.0
    sse = torch.zeros((), dtype=torch.float64, device=x.device)
    sse_levels = torch.zeros(len(cfg.k_levels), dtype=torch.float64, device=x.device)
    cos = torch.zeros((), dtype=torch.float64, device=x.device)
    cos_topk = torch.zeros_like(cos)
    l0 = torch.zeros_like(cos)
    l0_topk = torch.zeros_like(cos)
    fired = torch.zeros(cfg.n_latents, dtype=torch.bool, device=x.device)
    fired_topk = torch.zeros_like(fired)
    for chunk in x.split(batch_size):
        total_var += (chunk.double() - mean).square().sum().item()
        pre = torch.addmm(sae.b_enc, chunk * s - sae.b_pre, sae.W_enc.T)
        z = F.relu(pre)
        active = z > 0
        l0 += active.sum()
        fired |= active.any(0)
        rec = torch.addmm(sae.b_pre, z, sae.W_dec) / s
        sse += (chunk - rec).double().square().sum()
        cos += F.cosine_similarity(chunk, rec, dim=1).double().sum()
        vals, idx = z.topk(cfg.k_max, dim=1)
        fired_topk[idx[vals > 0]] = True
        l0_topk += (vals > 0).sum()
        recs = sae._decode_levels(vals, idx) / s
        sse_levels += (recs - chunk).double().square().sum(dim=(1, 2))
        cos_topk += F.cosine_similarity(chunk, recs[-1], dim=1).double().sum()
    n = x.shape[0]
    total_var = max(total_var, EPS)
    out = {
        "fvu": sse.item() / total_var,
        "fvu_topk": sse_levels[-1].item() / total_var,
        "cos": cos.item() / n,
        "cos_topk": cos_topk.item() / n,
        "l0": l0.item() / n,
        "l0_topk": l0_topk.item() / n,
        "dead_fraction": 1.0 - fired_topk.float().mean().item(),
        "dead_fraction_inference": 1.0 - fired.float().mean().item(),
        "dead_fraction_train": sae.dead_mask.float().mean().item(),
    }
    for k, v in zip(cfg.k_levels, sse_levels.tolist(), strict=True):
        out[f"fvu_k{k}"] = v / total_var
    return out


@torch.no_grad()
def top_activating(
    sae: MatryoshkaTopKSAE,
    x: Tensor,
    texts: Sequence[str],
    n: int = 10,
    latents: Sequence[int] | None = None,
    batch_size: int = 4096,
) -> dict[int, list[tuple[str, float]]]:
    """For each latent, the ``n`` texts of ``x`` with the highest (inference) activation.

    Only positive activations are listed and latents that never fire are left out, so the
    result is ready to log (e.g. as a wandb table). ``latents`` restricts the latent ids.
    """
    x = sae._check_input(x)
    if len(texts) != x.shape[0]:
        raise ValueError(
            f"texts: expected {x.shape[0]} strings (one per row of x), got {len(texts)}"
        )
    check_int("n", n, 1)
    check_int("batch_size", batch_size, 1)
    if latents is None:
        ids = torch.arange(sae.cfg.n_latents, device=x.device)
    else:
        ids = torch.as_tensor(list(latents), dtype=torch.long, device=x.device)
        if ids.ndim != 1 or (ids.numel() and (ids.min() < 0 or ids.max() >= sae.cfg.n_latents)):
            raise ValueError(f"latents: expected ids in [0, {sae.cfg.n_latents}), got {latents}")
    n = min(n, x.shape[0])
    best_v = torch.full((0, ids.numel()), -math.inf, device=x.device, dtype=x.dtype)
    best_i = torch.zeros((0, ids.numel()), dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], batch_size):
        z = sae.encode(x[start : start + batch_size])[:, ids]
        rows = torch.arange(start, start + z.shape[0], device=x.device)[:, None].expand_as(z)
        cand_v = torch.cat([best_v, z])
        cand_i = torch.cat([best_i, rows])
        best_v, pos = cand_v.topk(min(n, cand_v.shape[0]), dim=0)
        best_i = cand_i.gather(0, pos)
    out: dict[int, list[tuple[str, float]]] = {}
    vals, rows = best_v.T.tolist(), best_i.T.tolist()
    for lat, v_row, i_row in zip(ids.tolist(), vals, rows, strict=True):
        hits = [(texts[i], v) for v, i in zip(v_row, i_row, strict=True) if v > 0]
        if hits:
            out[lat] = hits
    return out
