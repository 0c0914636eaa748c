"""Training the SAE: Adam, warm-up + cosine schedule, one step, and the offline loop."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fairclip.sae.model import EPS, MatryoshkaTopKSAE, SAEConfig, check_int


def make_optimizer(sae: MatryoshkaTopKSAE, lr: float | None = None) -> torch.optim.Adam:
    """Adam over all SAE parameters (lr defaults to ``sae.cfg.lr``).

    Uses the fused kernel where the device supports it: the optimiser step is a sizeable part
    of a sparse SAE step (see ``benchmarks/RESULTS.md``).
    """
    lr = sae.cfg.lr if lr is None else lr
    try:
        return torch.optim.Adam(sae.parameters(), lr=lr, fused=True)
    except (RuntimeError, ValueError):  # device/dtype without a fused kernel
        return torch.optim.Adam(sae.parameters(), lr=lr)


def lr_schedule(cfg: SAEConfig, total_steps: int):
    """Warm-up / stable / linear-decay multiplier for ``LambdaLR``."""
    decay_steps = int(cfg.decay_frac * total_steps)
    decay_start = total_steps - decay_steps

    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if decay_steps and step >= decay_start:
            return warm * max(0.0, (total_steps - step) / decay_steps)
        return warm

    return f


def sae_step(
    sae: MatryoshkaTopKSAE,
    opt: torch.optim.Optimizer,
    batch: Tensor,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> dict[str, float]:
    """One optimiser step on a batch of embeddings; usable incrementally from a callback.

    Initialises ``b_pre``/``input_scale`` from the first batch if the SAE was never
    initialised. Keeps decoder rows unit-norm and advances the dead-latent counters.
    Returns scalar logs: loss, fvu (largest level), aux_loss, dead_fraction.
    """
    if not bool(sae.initialized):
        sae.init_from_data(batch)
    sae.train()
    opt.zero_grad(set_to_none=True)
    out = sae(batch)
    out.loss.backward()
    sae.project_decoder_grad_()
    if sae.cfg.grad_clip is not None:
        nn.utils.clip_grad_norm_(sae.parameters(), sae.cfg.grad_clip)
    opt.step()
    if scheduler is not None:
        scheduler.step()
    sae.normalize_decoder_()
    sae.update_dead_(out.top_values.detach(), out.top_indices)
    logs = (
        torch.stack([out.loss, out.level_losses[-1], out.aux_loss, sae.dead_mask.float().mean()])
        .detach()
        .tolist()
    )  # one device sync
    return dict(zip(("loss", "fvu", "aux_loss", "dead_fraction"), logs, strict=True))


def train_sae(
    embeddings: Tensor, cfg: SAEConfig, progress: bool = True, log_every: int = 25
) -> tuple[MatryoshkaTopKSAE, dict[str, Any]]:
    """Train an SAE on an in-memory (N, d_in) buffer for ``cfg.steps`` or ``cfg.epochs``.

    Runs on the device of ``embeddings``. Returns the SAE (eval mode) and a history with
    per-``log_every`` step losses, dead fraction, wall time and training samples/s.
    """
    if not isinstance(embeddings, Tensor) or embeddings.ndim != 2:
        raise ValueError(
            f"embeddings: expected a 2-D tensor (N, {cfg.d_in}), got "
            f"{tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings)}"
        )
    if embeddings.shape[1] != cfg.d_in:
        raise ValueError(
            f"embeddings: expected {cfg.d_in} columns (cfg.d_in), got {embeddings.shape[1]}"
        )
    if embeddings.shape[0] < 2:
        raise ValueError(f"embeddings: expected at least 2 rows, got {embeddings.shape[0]}")
    check_int("log_every", log_every, 1)

    n = embeddings.shape[0]
    device = embeddings.device
    sae = MatryoshkaTopKSAE(cfg).to(device)
    sae.init_from_data(embeddings)
    data = embeddings.to(dtype=sae.W_dec.dtype)
    bs = min(cfg.batch_size, n)
    per_epoch = n // bs  # drop the ragged last batch: tiny batches give noisy FVU denominators
    total = cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch
    opt = make_optimizer(sae)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg, total))
    gen = torch.Generator().manual_seed(cfg.seed)
    hist: dict[str, Any] = {"step": [], "loss": [], "fvu": [], "aux_loss": [], "dead_fraction": []}
    step = 0
    seen = 0
    t0 = time.perf_counter()
    with tqdm(total=total, disable=not progress, desc="SAE", dynamic_ncols=True) as bar:
        while step < total:
            perm = torch.randperm(n, generator=gen).to(device)
            for b in range(per_epoch):
                if step >= total:
                    break
                logs = sae_step(sae, opt, data[perm[b * bs : (b + 1) * bs]], sched)
                step += 1
                seen += bs
                bar.update(1)
                if step % log_every == 0 or step == total:
                    hist["step"].append(step)
                    for key in ("loss", "fvu", "aux_loss", "dead_fraction"):
                        hist[key].append(logs[key])
                    bar.set_postfix(fvu=f"{logs['fvu']:.4f}", dead=f"{logs['dead_fraction']:.3f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    hist.update(steps=step, samples=seen, seconds=elapsed, samples_per_s=seen / max(elapsed, EPS))
    return sae.eval(), hist
