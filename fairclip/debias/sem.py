"""SEM, Sparse Embedding Modulation (Guimard et al., CVPR Findings 2026), as Interventions.

Why in SAE space: CLIP text embeddings mix concept and group information in every dense
dimension; a sparse code separates them into latents, so group latents can be pulled to
their "neutral" value while the query's own latents are kept (a non-linear edit).

With an SAE (all positive activations at inference), a reference set ``D`` of neutral
prompts (activations ``A_D``, medians ``med_D``) and a query latent ``z_q``:

* content score ``c_j = mean_d 1[A_D[d, j] < z_q,j]`` (how unusually active latent j is for
  the query compared with neutral text);
* bias score, per group class ``k`` (e.g. gender=female) with median latent ``m_k`` over its
  prompts: ``b_j = max_k min(pct of m_k,j in A_D[:, j], pct of m_k,j among the prompts of the
  other classes of that attribute)``;
* modulation ``M_j = c_j^2`` (SEM_i) or ``(1 + c_j - b_j)^2`` (SEM_b, SEM_bi), then
  ``z'_j = M_j z_j + (1 - M_j) med_D,j`` and ``e' = decode(z')``.

Variants (which side information each uses):

* ``i``  (SEM_i):  class paraphrases only; ``z_q`` is the median latent of the paraphrases of
  the class the input matches, no bias prompts (``b = 0``, ``M = c^2``), and ``z_q`` is also
  the latent that is modulated (``z' = M z_q + (1 - M) med_D``, as in the authors' code);
* ``b``  (SEM_b):  bias prompts, content score on the input's own latent,
  ``M = (1 + c - b)^2``;
* ``bi`` (SEM_bi): both: bias score and paraphrase-median content, ``M = (1 + c - b)^2``.

An input that matches no class (cosine to every stored paraphrase below
``match_threshold``) uses its own latent for ``c`` (SEM_i, SEM_bi), so every variant works on
arbitrary text embeddings.

Inputs and output, as the authors: the SAE sees the embeddings it was trained on
(``sae.cfg.input_norm``: raw for the authors' released SAEs, unit-norm for this project's,
which are trained on unit-norm embeddings; a unit-norm input's output is scaled back to the
input's norm), and the output is the decode ``W_dec z' + b_pre`` alone.

Extension (``keep_residual=True``, off by default): add the SAE's reconstruction residual
``x - decode(encode(x))`` back, so that an SAE with FVU > 0 does not by itself move what SEM
leaves unmodulated; the paper's decode drops that residual, and with it whatever the SAE
fails to reconstruct.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fairclip.debias.debiased_clip import DebiasedCLIP, Intervention
from fairclip.sae import MatryoshkaTopKSAE, SAEConfig

__all__ = ["SEM", "VARIANTS", "content_score", "bias_score", "fit_sem", "flagged_lean_share"]

VARIANTS = ("i", "b", "bi")
Encoder = Callable[[Sequence[str]], Tensor]


def _pct_below(sorted_ref: Tensor, values: Tensor) -> Tensor:
    """Share of each latent's reference activations strictly below ``values`` [N, L] -> [N, L].

    ``sorted_ref`` is ``A_D`` sorted along the prompt axis and stored transposed [L, |D|], so
    one batched ``searchsorted`` computes every (row, latent) share.
    """
    below = torch.searchsorted(sorted_ref.contiguous(), values.T.contiguous(), side="left")
    return (below.T.to(values.dtype)) / sorted_ref.shape[1]


def content_score(sorted_ref: Tensor, z_query: Tensor) -> Tensor:
    """``c_j = mean_d 1[A_D[d, j] < z_q,j]`` for every row of ``z_query`` [N, L]."""
    return _pct_below(sorted_ref, z_query)


def bias_score(sorted_ref: Tensor, class_latents: Sequence[Sequence[Tensor]]) -> Tensor:
    """``b_j = max_k min(pct of m_k,j in D, pct of m_k,j among the other classes' prompts)``.

    ``class_latents[a][k]`` holds the latents [n_k, L] of the prompts of class ``k`` of
    attribute ``a``; "other classes" are the other values of the same attribute.
    """
    n_latents = sorted_ref.shape[0]
    b = torch.zeros(n_latents, device=sorted_ref.device, dtype=torch.float32)
    for classes in class_latents:
        if len(classes) < 2:
            raise ValueError("bias prompts: every attribute needs prompts for >= 2 values")
        for k, z_k in enumerate(classes):
            m_k = z_k.median(dim=0).values
            pct_ref = _pct_below(sorted_ref, m_k[None])[0]
            others = torch.cat([z for i, z in enumerate(classes) if i != k])
            pct_other = (others < m_k).float().mean(0)
            b = torch.maximum(b, torch.minimum(pct_ref, pct_other))
    return b


class SEM(Intervention):
    """Sparse Embedding Modulation of text embeddings through a stored SAE (see module doc).

    Build with :func:`fit_sem`; the constructor only allocates buffers of the right shapes
    so that :meth:`DebiasedCLIP.load` can rebuild it from ``debias.json``.
    """

    kind = "sem"

    def __init__(
        self,
        variant: str,
        sae_config: dict[str, Any],
        n_reference: int,
        n_keys: int = 0,
        n_classes: int = 0,
        class_names: Sequence[str] = (),
        match_threshold: float = 0.99,
        keep_residual: bool = False,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"sem.variant={variant!r}: expected one of {list(VARIANTS)}")
        if not 0.0 < match_threshold <= 1.0:
            raise ValueError(f"sem.match_threshold={match_threshold}: expected a float in (0, 1]")
        super().__init__(
            variant=variant,
            sae_config=dict(sae_config),
            n_reference=int(n_reference),
            n_keys=int(n_keys),
            n_classes=int(n_classes),
            class_names=list(class_names),
            match_threshold=float(match_threshold),
            keep_residual=bool(keep_residual),
        )
        self.sae = MatryoshkaTopKSAE(SAEConfig.from_dict(dict(sae_config)))
        n_lat, d = self.sae.cfg.n_latents, self.sae.cfg.d_in
        self.register_buffer("ref_sorted", torch.zeros(n_lat, n_reference))  # A_D^T, sorted
        self.register_buffer("ref_median", torch.zeros(n_lat))
        self.register_buffer("bias", torch.zeros(n_lat))
        self.register_buffer("class_latents", torch.zeros(n_classes, n_lat))
        self.register_buffer("keys", torch.zeros(n_keys, d))
        self.register_buffer("key_owner", torch.zeros(n_keys, dtype=torch.long))

    @property
    def variant(self) -> str:
        return self.config["variant"]

    def query_latents(self, emb_unit: Tensor, z: Tensor) -> Tensor:
        """``z_q``: the matched class's paraphrase-median latent, else the input's own."""
        if self.keys.shape[0] == 0:
            return z
        sim = emb_unit @ self.keys.T
        best, idx = sim.max(dim=1)
        matched = best >= self.config["match_threshold"]
        return torch.where(matched[:, None], self.class_latents[self.key_owner[idx]], z)

    def modulation(self, emb_unit: Tensor, z: Tensor) -> Tensor:
        """``M`` [N, L]: ``c^2`` (SEM_i) or ``(1 + c - b)^2`` (SEM_b, SEM_bi)."""
        return self._modulation(self.query_latents(emb_unit, z))

    def _modulation(self, zq: Tensor) -> Tensor:
        # SEM_b stores no paraphrases (fit_sem), so its z_q is the input's own latent
        c = content_score(self.ref_sorted, zq)
        if self.variant == "i":
            return c.square()
        return (1.0 + c - self.bias).square()

    def modulated_latents(self, emb_unit: Tensor, z: Tensor) -> Tensor:
        """``z' = M z + (1 - M) med_D``; SEM_i modulates ``z_q`` itself (the class's median).

        SEM_i has no bias score to tell group latents from content, so, as in the authors'
        code, a matched query is replaced by the median over its paraphrases (which averages
        away wording-specific latents) before the modulation; SEM_b and SEM_bi modulate the
        input's own latent.
        """
        zq = self.query_latents(emb_unit, z)
        m = self._modulation(zq)
        if self.variant == "i":
            z = zq
        return m * z + (1.0 - m) * self.ref_median

    def forward(self, emb: Tensor) -> Tensor:
        dtype = emb.dtype
        x = emb.float()
        x_in = self.sae.prepare(x)
        z = self.sae.encode(x_in)
        out = self.sae.decode(self.modulated_latents(F.normalize(x, dim=-1), z))
        if self.config["keep_residual"]:
            out = out + (x_in - self.sae.decode(z))
        if self.sae.cfg.input_norm == "unit":
            out = out * x.norm(dim=-1, keepdim=True)
        return out.to(dtype)


def _latents(sae: MatryoshkaTopKSAE, encode: Encoder, prompts: Sequence[str], key: str) -> Tensor:
    if not prompts:
        raise ValueError(f"{key}: expected at least one prompt, got []")
    with torch.no_grad():
        return sae.encode(sae.prepare(encode(list(prompts))))


def fit_sem(
    variant: str,
    sae: MatryoshkaTopKSAE,
    encode: Encoder,
    reference_prompts: Sequence[str],
    bias_prompts: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    class_prompts: Mapping[str, Sequence[str]] | None = None,
    match_threshold: float = 0.99,
    keep_residual: bool = False,
    key: str = "debias.sem",
) -> SEM:
    """Compute SEM's statistics with ``encode`` (prompts -> the base model's text embeddings,
    raw or unit-norm: each is prepared as the SAE was trained, see ``cfg.input_norm``).

    ``bias_prompts``: attribute -> value -> prompts (SEM_b, SEM_bi); ``class_prompts``: class
    -> paraphrases (SEM_i, SEM_bi; the query itself should be among them). Errors name ``key``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"{key}.variant={variant!r}: expected one of {list(VARIANTS)}")
    if variant in ("b", "bi") and not bias_prompts:
        raise ValueError(f"{key}.bias_prompts: SEM_{variant} needs bias prompts per group value")
    if variant in ("i", "bi") and not class_prompts:
        raise ValueError(f"{key}.class_prompts: SEM_{variant} needs paraphrases per class")
    sae = sae.eval()
    ref = _latents(sae, encode, reference_prompts, f"{key}.reference_prompts")
    class_prompts = dict(class_prompts or {}) if variant != "b" else {}
    keys = [p for ps in class_prompts.values() for p in ps]
    sem = SEM(
        variant,
        sae.cfg.to_dict(),
        n_reference=ref.shape[0],
        n_keys=len(keys),
        n_classes=len(class_prompts),
        class_names=list(class_prompts),
        match_threshold=match_threshold,
        keep_residual=keep_residual,
    )
    sem.sae.load_state_dict(sae.state_dict())
    device = ref.device
    sem.to(device)
    sem.ref_sorted.copy_(ref.T.sort(dim=1).values)
    sem.ref_median.copy_(ref.median(dim=0).values)
    if variant != "i":
        groups = [
            [
                _latents(sae, encode, prompts, f"{key}.bias_prompts.{attr}.{value}")
                for value, prompts in values.items()
            ]
            for attr, values in (bias_prompts or {}).items()
        ]
        sem.bias.copy_(bias_score(sem.ref_sorted, groups))
    if keys:
        medians = [
            _latents(sae, encode, ps, f"{key}.class_prompts.{name}").median(dim=0).values
            for name, ps in class_prompts.items()
        ]
        sem.class_latents.copy_(torch.stack(medians))
        with torch.no_grad():
            sem.keys.copy_(F.normalize(encode(keys).float(), dim=-1))
        owner = torch.repeat_interleave(
            torch.arange(len(class_prompts)), torch.tensor([len(p) for p in class_prompts.values()])
        )
        sem.key_owner.copy_(owner)
    return sem.eval()


@torch.no_grad()
def flagged_lean_share(sem: SEM, emb: Tensor, directions: Tensor, threshold: float = 0.5) -> float:
    """Share of the rows' lean along ``directions`` [V, D] decoded from bias-flagged latents.

    SEM can only shrink the part of a prompt's group lean that the SAE puts in latents the
    bias prompts flag (``b > threshold``); the rest sits in content latents, which SEM_b
    amplifies (``M = (1 + c)^2``). Each row's lean is signed by its own sign, so near 1 SEM
    can remove the lean and near 0 it cannot; below 0 or above 1 the flagged and content
    parts point opposite ways (the lean also has a b_pre and a residual part).
    """
    x_in = sem.sae.prepare(emb)
    flagged = sem.bias > threshold
    z = sem.sae.encode(x_in)[:, flagged]
    part = (z @ sem.sae.W_dec[flagged]) / sem.sae.input_scale
    total = x_in @ directions.T
    return float((total.sign() * (part @ directions.T)).sum() / total.abs().sum().clamp_min(1e-12))


def build_sem(bundle: Any, ctx: Any, variant: str) -> DebiasedCLIP:
    """Comparison builder: SEM_``variant`` (Guimard et al. 2026) on the model's text SAE.

    ``ctx`` (the comparison's method context) gives the SAE, the base text encoder and the
    prompt sets of ``cfg.debias``; the flagged-lean diagnostic goes to ``ctx.sae_info``.
    """
    sem = fit_sem(
        variant,
        ctx.sae,
        ctx.encode_raw,
        ctx.prompt_list("reference_prompts"),
        bias_prompts=ctx.bias_prompts() if variant != "i" else None,
        class_prompts=ctx.class_prompts() if variant != "b" else None,
        match_threshold=float(ctx.cfg.debias.match_threshold),
        keep_residual=bool(ctx.cfg.debias.keep_residual),
        key="debias",
    )
    basis = ctx.lean_basis()
    if variant != "i" and basis is not None:
        directions, base = basis
        ctx.sae_info["flagged_lean_share"] = flagged_lean_share(sem, base, directions)
    return DebiasedCLIP(bundle.model, bundle.name, text=[sem])
