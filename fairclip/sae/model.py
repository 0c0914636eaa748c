"""Matryoshka TopK sparse autoencoder (MSAE) for CLIP/SigLIP embeddings.

References: Zaigrajew et al. 2025, "Interpreting CLIP with Hierarchical Sparse Autoencoders"
(nested TopK levels, weighted reconstruction losses, all positive activations at inference) and
Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (TopK, AuxK loss on dead latents,
unit-norm decoder with tangent gradients, b_pre initialised from the data).

Why our own and not a library's: the SAE packages (``sparsify``, ``overcomplete``,
``sae-lens``) are built around language-model activations, and none gives MSAE's exact
combination that SEM needs: nested TopK levels with per-level loss weights, keep-all
inference, the fixed input scale stored with the weights, and a sparse-backward step.

Conventions (read these before touching the weights directly):

* Parameters live in a *scaled* input space ``x~ = s * e`` where ``s`` is the fixed buffer
  ``input_scale``, set by :meth:`MatryoshkaTopKSAE.init_from_data` so that
  ``E||x~ - mean||^2 = d_in`` (the Gao et al./MSAE practice of centring and scaling, so that
  one learning rate fits any embedding norm; ``s = 1`` when ``cfg.normalize`` is False). In
  that space the DESIGN equations hold exactly::

      z = ReLU(W_enc (x~ - b_pre) + b_enc),   x~_hat = W_dec z + b_pre

  and :meth:`decode` divides by ``s`` to return to embedding space. Inputs are *not*
  re-normalised: L2-normalised CLIP embeddings are reconstructed as given (their mean, which
  is far from zero for CLIP, is absorbed by ``b_pre``). Use :meth:`encode`/:meth:`decode`
  (e.g. for SEM's modulated latents) rather than ``W_dec``/``b_pre`` by hand.
* ``W_dec`` is stored as (n_latents, d_in): row ``j`` is the paper's decoder column ``j`` and
  has unit norm. ``W_enc`` is (n_latents, d_in) as in ``nn.Linear``.
* Training losses are normalised MSE (the batch FVU, as in Gao et al.), so they are free of the
  input scale and directly comparable with :func:`sae_metrics`.
* Training only touches the top-k latents: the decoder runs as ``embedding_bag`` over the
  selected rows and the encoder's backward pass is a sparse product, so a step costs one dense
  matmul (the encoder forward) instead of four or five, and autograd never stores the dense
  (N, n_latents) pre-activations.
* MSAE itself has no AuxK loss; we add Gao et al.'s, which keeps latents alive (see the tests).

Usage::

    sae, hist = train_sae(embeddings, SAEConfig(d_in=512, n_latents=4096))   # offline
    z = sae.encode(e)                      # all positive activations (MSAE inference)
    e_hat = sae.decode(z)                  # back to embedding space
    # incremental, e.g. from a Lightning callback every N steps:
    opt = make_optimizer(sae); logs = sae_step(sae, opt, fresh_embeddings)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-12
INPUT_NORMS = ("unit", "raw")
INIT_ROWS = 4096  # rows of the first batch that fit the initial encoder scale


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class SAEConfig:
    """Hyper-parameters of a :class:`MatryoshkaTopKSAE` and of its training.

    Attributes:
        d_in: embedding dimension.
        n_latents: dictionary size (width).
        k_levels: nested TopK levels, strictly ascending; the largest is the training sparsity
            and the one AuxK works on. None derives MSAE's recipe (:func:`default_k_levels`:
            doubling from 64 up to d_in, e.g. 64, 128, 256, 512 for d_in = 512). Inference keeps
            *all* positive activations, which reconstructs well only if the largest level is
            about that large; with a small largest k, evaluate with ``encode(x, k=k_max)``.
        level_weights: weight of each level's loss. ``"uniform"`` (MSAE "UW", the default: the
            paper finds it best for reconstruction and semantics), ``"reverse"`` (MSAE "RW":
            weights decreasing linearly from the sparsest level, L, L-1, ..., 1, which favours
            sparsity), or explicit non-negative floats, one per level. Always normalised to
            sum to 1 so the loss stays on the FVU scale.
        aux_k: dead latents used by the AuxK loss; None means ``2 * max(k_levels)``, capped at
            ``n_latents``. Gao et al. use a large k_aux (~d_in/2) on huge dictionaries; on
            small ones a large k_aux spreads the residual over many small activations that fit
            it but never win a top-k, so fewer latents revive. 0 disables AuxK.
        aux_coef: AuxK coefficient (Gao et al.: 1/32).
        dead_after: a latent is dead once it has not been in the top-k of this many training
            *samples* (Gao et al. use 10M tokens; embedding buffers are far smaller).
        lr: Adam learning rate.
        batch_size: training batch size.
        epochs: passes over the buffer in :func:`train_sae` (ignored if ``steps`` is set).
        steps: total optimiser steps for :func:`train_sae`; None derives it from ``epochs``.
        warmup_steps: linear warm-up steps of the learning rate.
        decay_frac: final fraction of steps over which the learning rate decays linearly to 0
            (warm-up / stable / decay schedule; lets a fixed budget converge).
        grad_clip: max global gradient norm, None to disable.
        normalize: scale inputs so that ``E||x - mean||^2 = d_in`` (see module docstring).
        seed: seeds the initialisation and the data order.
        input_norm: what embeddings the SAE was trained on, so that its users (SEM) give it
            the same: ``"unit"`` (L2-normalised, this project's SAEs) or ``"raw"`` (the
            encoder's output as is, as the MSAE/SEM authors' released SAEs).
    """

    d_in: int
    n_latents: int
    k_levels: tuple[int, ...] | None = None
    level_weights: str | tuple[float, ...] = "uniform"
    aux_k: int | None = None
    aux_coef: float = 1 / 32
    dead_after: int = 50_000
    lr: float = 1e-3
    batch_size: int = 1024
    epochs: int = 10
    steps: int | None = None
    warmup_steps: int = 50
    decay_frac: float = 0.2
    grad_clip: float | None = 1.0
    normalize: bool = True
    seed: int = 0
    input_norm: str = "unit"

    def __post_init__(self) -> None:
        check_int("d_in", self.d_in, 1)
        check_int("n_latents", self.n_latents, 1)
        if self.k_levels is None:
            self.k_levels = default_k_levels(self.d_in, self.n_latents)
        try:
            self.k_levels = tuple(int(k) for k in self.k_levels)
        except (TypeError, ValueError) as e:
            raise ValueError(f"k_levels: expected a sequence of ints, got {self.k_levels!r}") from e
        ks = self.k_levels
        if not ks:
            raise ValueError("k_levels: expected at least one level, got an empty sequence")
        if any(k < 1 for k in ks) or any(b <= a for a, b in zip(ks, ks[1:], strict=False)):
            raise ValueError(f"k_levels: expected strictly ascending positive ints, got {ks}")
        if ks[-1] > self.n_latents:
            raise ValueError(
                f"k_levels: expected every k <= n_latents={self.n_latents}, got max k={ks[-1]}"
            )
        if isinstance(self.level_weights, str):
            if self.level_weights not in ("uniform", "reverse"):
                raise ValueError(
                    "level_weights: expected 'uniform', 'reverse' or one float per level, "
                    f"got {self.level_weights!r}"
                )
        else:
            try:
                w = tuple(float(v) for v in self.level_weights)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"level_weights: expected 'uniform', 'reverse' or floats, "
                    f"got {self.level_weights!r}"
                ) from e
            if len(w) != len(ks) or any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
                raise ValueError(
                    f"level_weights: expected {len(ks)} finite non-negative floats with a "
                    f"positive sum (one per k level), got {w}"
                )
            self.level_weights = w
        if self.aux_k is not None:
            check_int("aux_k", self.aux_k, 0)
        if not (math.isfinite(self.aux_coef) and self.aux_coef >= 0):
            raise ValueError(f"aux_coef: expected a finite float >= 0, got {self.aux_coef}")
        check_int("dead_after", self.dead_after, 1)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: expected a finite float > 0, got {self.lr}")
        check_int("batch_size", self.batch_size, 1)
        check_int("epochs", self.epochs, 1)
        if self.steps is not None:
            check_int("steps", self.steps, 1)
        check_int("warmup_steps", self.warmup_steps, 0)
        if not 0.0 <= self.decay_frac <= 1.0:
            raise ValueError(f"decay_frac: expected a float in [0, 1], got {self.decay_frac}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip: expected None or a float > 0, got {self.grad_clip}")
        check_int("seed", self.seed, 0)
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(
                f"input_norm: expected one of {list(INPUT_NORMS)}, got {self.input_norm!r}"
            )

    @property
    def k_max(self) -> int:
        return self.k_levels[-1]

    @property
    def weights(self) -> tuple[float, ...]:
        """Level weights, resolved and normalised to sum to 1."""
        n = len(self.k_levels)
        if self.level_weights == "uniform":
            w: tuple[float, ...] = (1.0,) * n
        elif self.level_weights == "reverse":
            w = tuple(float(n - i) for i in range(n))
        else:
            w = tuple(self.level_weights)
        total = sum(w)
        return tuple(v / total for v in w)

    @property
    def resolved_aux_k(self) -> int:
        k = 2 * self.k_max if self.aux_k is None else self.aux_k
        return min(k, self.n_latents)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["k_levels"] = list(self.k_levels)
        if not isinstance(self.level_weights, str):
            d["level_weights"] = list(self.level_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"SAEConfig: unknown keys {sorted(unknown)}")
        return cls(**d)


def default_k_levels(d_in: int, n_latents: int) -> tuple[int, ...]:
    """MSAE's nesting: k doubles from ``min(64, d_in // 8)`` up to ``min(d_in, n_latents)``."""
    check_int("d_in", d_in, 1)
    check_int("n_latents", n_latents, 1)
    top = min(d_in, n_latents)
    k = min(64, max(1, d_in // 8), top)
    levels = []
    while k < top:
        levels.append(k)
        k *= 2
    return (*levels, top)


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class _GatherPreacts(torch.autograd.Function):
    """Selected pre-activations ``(x @ W.T + b)[i, idx[i, j]]`` with a sparse backward pass.

    The dense pre-activations are computed without autograd (for TopK selection), so autograd
    never stores the (N, n_latents) matrix and the weight gradient costs O(N k d) instead of
    O(N n d).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor, idx: Tensor, vals: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w, idx)
        return vals.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, w, idx = ctx.saved_tensors
        n_rows, m = idx.shape
        rows = torch.arange(n_rows, device=idx.device).repeat_interleave(m)
        cols = idx.reshape(-1)
        g = grad.reshape(-1).to(w.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            gt = torch.sparse_coo_tensor(
                torch.stack([cols, rows]), g, (w.shape[0], n_rows), check_invariants=False
            )
            grad_w = torch.sparse.mm(gt, x)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device).index_add_(0, cols, g)
        if ctx.needs_input_grad[0]:
            gm = torch.sparse_coo_tensor(
                torch.stack([rows, cols]), g, (n_rows, w.shape[0]), check_invariants=False
            )
            grad_x = torch.sparse.mm(gm, w)
        return grad_x, grad_w, grad_b, None, None


@dataclass
class SAEOutput:
    """Result of :meth:`MatryoshkaTopKSAE.forward` (training view: nested TopK levels).

    Attributes:
        recons: (L, N, d_in) reconstruction per k level, in embedding space.
        top_values: (N, k_max) ReLU'd activations of the k_max selected latents, descending.
        top_indices: (N, k_max) their latent ids; level ``k`` uses the first ``k`` columns.
        level_losses: (L,) normalised MSE (batch FVU) of each level.
        aux_loss: AuxK loss (normalised MSE of the dead latents' fit to the residual).
        loss: ``sum_l w_l level_losses[l] + aux_coef * aux_loss``.
        k_levels, n_latents: copied from the config, for :meth:`codes`.
    """

    recons: Tensor
    top_values: Tensor
    top_indices: Tensor
    level_losses: Tensor
    aux_loss: Tensor
    loss: Tensor
    k_levels: tuple[int, ...]
    n_latents: int

    def codes(self, level: int = -1) -> Tensor:
        """Dense (N, n_latents) codes of one level (an index into ``k_levels``)."""
        k = self.k_levels[level]
        z = self.top_values.new_zeros(self.top_values.shape[0], self.n_latents)
        return z.scatter_(1, self.top_indices[:, :k], self.top_values[:, :k])


class MatryoshkaTopKSAE(nn.Module):
    """Matryoshka TopK SAE: nested TopK levels in training, all positive latents at inference."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            raise ValueError(f"cfg: expected an SAEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        w_dec = torch.randn(cfg.n_latents, cfg.d_in, generator=gen)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        # Tied initialisation (Gao et al.): fewer dead latents at the start.
        self.W_enc = nn.Parameter(w_dec.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_pre = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("samples_since_fired", torch.zeros(cfg.n_latents, dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(False))
        starts = (0, *cfg.k_levels[:-1])
        self._segments = tuple(zip(starts, cfg.k_levels, strict=True))
        self.register_buffer("level_weights", torch.tensor(cfg.weights), persistent=False)

    # ---------------------------------------------------------------- data and bookkeeping
    def _check_input(self, x: Tensor, name: str = "x") -> Tensor:
        if not isinstance(x, Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.cfg.d_in:
            raise ValueError(f"{name}: expected shape (N, {self.cfg.d_in}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name}: expected at least one row, got 0")
        return x.to(device=self.W_dec.device, dtype=self.W_dec.dtype)

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> MatryoshkaTopKSAE:
        """Set ``input_scale`` and ``b_pre`` (to the data mean) from a sample of embeddings."""
        x = self._check_input(x)
        if not torch.isfinite(x).all():
            raise ValueError("x: expected finite values, found NaN or inf")
        mean = x.mean(0)
        if self.cfg.normalize:
            var = (x - mean).square().sum(1).mean()
            scale = math.sqrt(self.cfg.d_in / var.item()) if var.item() > EPS else 1.0
        else:
            scale = 1.0
        self.input_scale.fill_(scale)
        self.b_pre.copy_(mean * scale)
        self._fit_encoder_scale_(x[:INIT_ROWS] * scale - self.b_pre)
        self.initialized.fill_(True)
        return self

    @torch.no_grad()
    def _fit_encoder_scale_(self, xc: Tensor) -> None:
        """Scale the tied encoder so the initial top-k_max reconstruction fits the centred
        inputs in least squares.

        Why: with unit decoder rows, k_max active latents of a tied encoder sum to far more
        than the input's norm once k_max is a sizeable share of d_in (MSAE's levels go up to
        d_in), and a short run does not recover. With ``b_enc = 0`` the activations are linear
        in the scale and the selected latents do not depend on it, so the best scale is
        ``<x, r> / <r, r>`` for the reconstruction ``r`` at scale 1.
        """
        if bool(self.b_enc.any()):
            return  # not a fresh SAE: the activations are not linear in the scale
        vals, idx = F.relu(xc @ self.W_enc.T).topk(self.cfg.k_max, dim=1)
        recon = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum")
        denom = recon.square().sum()
        if denom.item() > EPS:
            self.W_enc.mul_((xc * recon).sum().clamp_min(EPS) / denom)

    @property
    def dead_mask(self) -> Tensor:
        """(n_latents,) True for latents not in any top-k of the last ``dead_after`` samples."""
        return self.samples_since_fired >= self.cfg.dead_after

    @torch.no_grad()
    def update_dead_(self, top_values: Tensor, top_indices: Tensor) -> None:
        """Advance the dead-latent counters by one batch of training codes."""
        fired = torch.zeros_like(self.samples_since_fired, dtype=torch.bool)
        fired[top_indices[top_values > 0]] = True
        self.samples_since_fired.add_(top_values.shape[0]).masked_fill_(fired, 0)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Project decoder rows back to unit norm (after each optimiser step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(EPS))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove the gradient component parallel to each decoder row (Gao et al.)."""
        g = self.W_dec.grad
        if g is not None:
            g.sub_((g * self.W_dec).sum(1, keepdim=True) * self.W_dec)

    # ------------------------------------------------------------------------ inference
    def prepare(self, emb: Tensor) -> Tensor:
        """Embeddings as this SAE was trained on them: unit-norm or raw (``cfg.input_norm``)."""
        x = emb.float()
        return F.normalize(x, dim=-1) if self.cfg.input_norm == "unit" else x

    def preacts(self, x: Tensor) -> Tensor:
        """Dense pre-activations ``W_enc (s x - b_pre) + b_enc``, shape (N, n_latents)."""
        x = self._check_input(x)
        return torch.addmm(self.b_enc, x * self.input_scale - self.b_pre, self.W_enc.T)

    def encode(self, x: Tensor, k: int | None = None) -> Tensor:
        """Latent codes (N, n_latents); all positive activations unless ``k`` is given.

        MSAE's inference keeps every positive activation (no TopK); ``k`` reproduces a
        training level instead.
        """
        z = F.relu(self.preacts(x))
        if k is None:
            return z
        check_int("k", k, 1)
        if k > self.cfg.n_latents:
            raise ValueError(f"k: expected <= n_latents={self.cfg.n_latents}, got {k}")
        vals, idx = z.topk(k, dim=1)
        return torch.zeros_like(z).scatter_(1, idx, vals)

    def decode(self, z: Tensor) -> Tensor:
        """Embeddings from codes: ``(W_dec z + b_pre) / s``, shape (N, d_in)."""
        if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[1] != self.cfg.n_latents:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"z: expected shape (N, {self.cfg.n_latents}), got {shape}")
        z = z.to(device=self.W_dec.device, dtype=self.W_dec.dtype)
        return torch.addmm(self.b_pre, z, self.W_dec) / self.input_scale

    def _decode_levels(self, vals: Tensor, idx: Tensor) -> Tensor:
        """Scaled-space reconstructions of every level from sorted top-k_max codes, (L, N, d)."""
        parts = [
            F.embedding_bag(idx[:, a:b], self.W_dec, per_sample_weights=vals[:, a:b], mode="sum")
            for a, b in self._segments
        ]
        return torch.stack(parts).cumsum(0) + self.b_pre

    # ------------------------------------------------------------------------- training
    def forward(self, x: Tensor) -> SAEOutput:
        """Training forward: nested TopK reconstructions, level losses and AuxK loss."""
        x = self._check_input(x)
        if x.shape[0] < 2:
            raise ValueError(
                f"x: expected a batch of at least 2 rows (losses are batch FVUs), got {x.shape[0]}"
            )
        cfg = self.cfg
        xs = x * self.input_scale
        xc = xs - self.b_pre
        dead = self.dead_mask
        n_aux = min(cfg.resolved_aux_k, int(dead.sum())) if cfg.aux_coef > 0 else 0
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, xc, self.W_enc.T)
            top_pre, top_idx = pre.topk(cfg.k_max, dim=1)
            if n_aux > 0:
                aux_pre, aux_idx = pre.masked_fill_(~dead, -math.inf).topk(n_aux, dim=1)
            del pre
        if n_aux > 0:
            idx = torch.cat([top_idx, aux_idx], 1)
            vals = F.relu(
                _GatherPreacts.apply(
                    xc, self.W_enc, self.b_enc, idx, torch.cat([top_pre, aux_pre], 1)
                )
            )
            top_vals, aux_vals = vals.split([cfg.k_max, n_aux], dim=1)
        else:
            top_vals = F.relu(_GatherPreacts.apply(xc, self.W_enc, self.b_enc, top_idx, top_pre))

        recons = self._decode_levels(top_vals, top_idx)  # scaled space
        denom = (xs - xs.mean(0)).square().sum().clamp_min(EPS)
        level_losses = (recons - xs).square().sum(dim=(1, 2)) / denom
        loss = (self.level_weights * level_losses).sum()
        if n_aux > 0:
            resid = (xs - recons[-1]).detach()
            aux_rec = F.embedding_bag(aux_idx, self.W_dec, per_sample_weights=aux_vals, mode="sum")
            aux_denom = (resid - resid.mean(0)).square().sum().clamp_min(EPS)
            aux_loss = (aux_rec - resid).square().sum() / aux_denom
            loss = loss + cfg.aux_coef * aux_loss
        else:
            aux_loss = loss.new_zeros(())
        return SAEOutput(
            recons=recons / self.input_scale,
            top_values=top_vals,
            top_indices=top_idx,
            level_losses=level_losses,
            aux_loss=aux_loss,
            loss=loss,
            k_levels=cfg.k_levels,
            n_latents=cfg.n_latents,
        )
