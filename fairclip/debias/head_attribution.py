"""Attention-head bias localisation in open_clip's VisionTransformer (Yasser et al. 2026).

Why a decomposition: the image embedding of a pre-LN ViT with CLS pooling is *linear* in the
residual stream at the CLS token once the ln_post scale is fixed per image (Gandelsman et al.,
ICLR 2024). So ``emb = Σ_layers Σ_heads c_{l,h} + other`` exactly, where ``c_{l,h}`` is the
direct contribution of one head's CLS output through ``out_proj``, ``ls_1``, ``ln_post`` and
``proj``, and ``other`` collects the embeddings, MLPs and biases. open_clip's blocks use the
fused ``nn.MultiheadAttention``, which never exposes per-head outputs: forward hooks capture
each block's attention input and the heads are recomputed from ``in_proj``/``out_proj``.

Heads are scored by how much group information their contribution carries (projection on a
text group direction, "a photo of a woman" − "a photo of a man"; and a linear probe), the top
ones are mean-ablated inside :class:`~fairclip.debias.debiased_clip.DebiasedCLIP` (a registered
:class:`HeadMeanAblation` vision patch), and Cramér's V (group vs predicted class) and accuracy
are compared with a layer-matched random-head control. ``fairclip-heads`` runs it all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairclip.data.batches import iter_batches

# -- the decomposition -------------------------------------------------------------------------


def _blocks(visual: nn.Module) -> list[nn.Module]:
    """The residual blocks of an open_clip VisionTransformer, checked for what we support."""
    if not hasattr(visual, "transformer") or not hasattr(visual.transformer, "resblocks"):
        raise TypeError(f"{type(visual).__name__}: expected an open_clip VisionTransformer")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "") != "tok":
        raise ValueError(
            "head decomposition needs CLS-token pooling (pool_type='tok', no attn_pool)"
        )
    if getattr(visual, "final_ln_after_pool", False):
        raise ValueError("head decomposition expects ln_post before pooling (final_ln_after_pool)")
    blocks = list(visual.transformer.resblocks)
    for i, block in enumerate(blocks):
        if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
            raise TypeError(
                f"resblocks[{i}]: expected an nn.MultiheadAttention 'attn' "
                f"(open_clip ResidualAttentionBlock), got {type(block).__name__}"
            )
    return blocks


def head_shape(visual: nn.Module) -> tuple[int, int]:
    """(layers, heads per layer) of the vision tower."""
    blocks = _blocks(visual)
    return len(blocks), blocks[0].attn.num_heads


def _batch_first(visual: nn.Module) -> bool:
    return bool(getattr(visual.transformer, "batch_first", True))


def per_head_outputs(attn: nn.MultiheadAttention, x: Tensor, query: slice | None = None) -> Tensor:
    """Per-head attention outputs ``[B, Lq, H, head_dim]`` (before ``out_proj``) of a fused
    ``nn.MultiheadAttention`` for input ``x [B, L, W]`` (self-attention, no mask);
    ``query`` restricts the query tokens (e.g. ``slice(0, 1)`` for CLS only)."""
    b, n, w = x.shape
    h = attn.num_heads
    hd = w // h
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None, None, None)
    xq = x if query is None else x[:, query]
    q = F.linear(xq, wq, bq).view(b, -1, h, hd)
    k = F.linear(x, wk, bk).view(b, n, h, hd)
    v = F.linear(x, wv, bv).view(b, n, h, hd)
    att = torch.einsum("bqhd,bkhd->bhqk", q, k).mul(hd**-0.5).softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", att, v)


def heads_through_out_proj(attn: nn.MultiheadAttention, o: Tensor) -> Tensor:
    """``[..., H, hd]`` per-head outputs → ``[..., H, W]`` per-head shares of ``out_proj``
    (without its bias): summed over heads they equal ``out_proj(concat heads) − bias``."""
    h = attn.num_heads
    w_out = attn.out_proj.weight.view(attn.out_proj.weight.shape[0], h, -1)  # [W, H, hd]
    return torch.einsum("...hd,whd->...hw", o, w_out)


@torch.no_grad()
def decompose(visual: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head direct contributions ``[N, layers, heads, D]`` and the remaining terms ``[N, D]``
    (CLS embedding, MLPs, attention biases, ln_post bias); their sum is ``visual(images)``.

    The model's own forward runs; hooks record the CLS residual stream pieces, and ln_post is
    linearised with the per-image mean/scale of the final CLS residual.
    """
    blocks = _blocks(visual)
    bf = _batch_first(visual)
    rec: dict[str, list[Tensor]] = {"attn_in": [], "mlp": [], "attn": []}
    stream_in: list[Tensor] = []
    final: list[Tensor] = []

    def nld(t: Tensor) -> Tensor:
        return t if bf else t.transpose(0, 1)

    handles = [
        visual.transformer.register_forward_pre_hook(
            lambda m, args: stream_in.append(nld(args[0])[:, 0])
        ),
        visual.ln_post.register_forward_pre_hook(lambda m, args: final.append(args[0][:, 0])),
    ]
    for block in blocks:
        handles += [
            block.attn.register_forward_pre_hook(
                lambda m, args: rec["attn_in"].append(nld(args[0]))
            ),
            block.ls_1.register_forward_hook(lambda m, a, out: rec["attn"].append(nld(out)[:, 0])),
            block.ls_2.register_forward_hook(lambda m, a, out: rec["mlp"].append(nld(out)[:, 0])),
        ]
    try:
        visual(images)
    finally:
        for handle in handles:
            handle.remove()
    if len(rec["attn_in"]) != len(blocks) or len(final) != 1 or len(stream_in) != 1:
        raise RuntimeError("decompose: hooks did not fire once per block (unsupported forward)")

    heads, other = [], stream_in[0]
    for block, x, attn_total, mlp in zip(
        blocks, rec["attn_in"], rec["attn"], rec["mlp"], strict=True
    ):
        o = per_head_outputs(block.attn, x, query=slice(0, 1))[:, 0]  # [N, H, hd]
        per_head = block.ls_1(heads_through_out_proj(block.attn, o))  # [N, H, W]
        heads.append(per_head)
        # the out_proj bias and anything the heads miss (numerically ~0) stay in `other`
        other = other + (attn_total - per_head.sum(1)) + mlp
    head_res = torch.stack(heads, 1)  # [N, layers, H, W]
    resid = final[0]  # [N, W], equals other + head_res.sum((1, 2))
    ln = visual.ln_post
    scale = (resid.var(-1, unbiased=False, keepdim=True) + ln.eps).rsqrt()  # [N, 1]

    def through_ln_proj(c: Tensor, s: Tensor) -> Tensor:
        out = (c - c.mean(-1, keepdim=True)) * s * (ln.weight if ln.weight is not None else 1)
        return out @ visual.proj if visual.proj is not None else out

    head_emb = through_ln_proj(head_res, scale[:, None, None])
    other_emb = through_ln_proj(other, scale)
    if ln.bias is not None:
        bias = ln.bias @ visual.proj if visual.proj is not None else ln.bias
        other_emb = other_emb + bias
    return head_emb, other_emb


# -- head scores -------------------------------------------------------------------------------


@torch.no_grad()
def group_direction(
    model: Any, tokenizer: Callable, prompts: Mapping[str, Sequence[str]]
) -> Tensor:
    """Unit text direction between the first and second group value's prompts, e.g.
    mean e("a photo of a woman") − mean e("a photo of a man")."""
    if len(prompts) != 2:
        raise ValueError(f"group prompts: expected exactly two values, got {list(prompts)}")
    return value_directions(model, tokenizer, prompts)[0]


@torch.no_grad()
def value_directions(
    model: Any, tokenizer: Callable, prompts: Mapping[str, Sequence[str]]
) -> Tensor:
    """``[values, D]`` one-vs-rest unit text directions: each value's mean prompt embedding
    minus the mean of the other values' (for two values, ±the group direction)."""
    if len(prompts) < 2:
        raise ValueError(f"group prompts: expected two or more values, got {list(prompts)}")
    means = torch.stack([
        F.normalize(model.encode_text(tokenizer(list(p)), normalize=True).mean(0), dim=-1)
        for p in prompts.values()
    ])  # fmt: skip
    n = means.shape[0]
    rest = (means.sum(0, keepdim=True) - means) / (n - 1)
    return F.normalize(means - rest, dim=-1)


def value_projection_scores(contrib: Tensor, groups: Tensor, directions: Tensor) -> Tensor:
    """``[values, layers, heads]``: for each value v, |mean of v's images − mean of the other
    images| of every head's contribution projected on v's one-vs-rest direction. Images of
    a value absent from ``groups`` give NaN for it."""
    proj = torch.einsum("nlhd,vd->vnlh", contrib, directions)  # [V, N, L, H]
    out = []
    for v in range(directions.shape[0]):
        inside = groups == v
        if not bool(inside.any()) or bool(inside.all()):
            out.append(torch.full(proj.shape[2:], float("nan")))
            continue
        out.append((proj[v, inside].mean(0) - proj[v, ~inside].mean(0)).abs())
    return torch.stack(out)


def projection_scores(contrib: Tensor, groups: Tensor, direction: Tensor) -> Tensor:
    """``[layers, heads]``: |difference of the group means| of each head's contribution
    projected on ``direction``, in units of the mean embedding norm (binary groups 0/1)."""
    proj = contrib @ direction  # [N, L, H]
    a, b = proj[groups == 0].mean(0), proj[groups == 1].mean(0)
    return (a - b).abs()


def probe_scores(
    contrib: Tensor, groups: Tensor, steps: int = 200, lr: float = 0.05, seed: int = 0
) -> Tensor:
    """``[layers, heads]`` held-out accuracy of a multinomial logistic probe per head (all
    heads fitted at once as one batched model; half the images train, half test). Groups are
    value indices ``0..V-1``; two values give the binary probe."""
    n, layers, heads, d = contrib.shape
    classes = int(groups.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    tr, te = perm[: n // 2], perm[n // 2 :]
    x = contrib.permute(1, 2, 0, 3).reshape(layers * heads, n, d).float()
    mu, sd = x[:, tr].mean(1, keepdim=True), x[:, tr].std(1, keepdim=True) + 1e-6
    x = (x - mu) / sd
    w = torch.zeros(layers * heads, d, classes, requires_grad=True)
    b = torch.zeros(layers * heads, 1, classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    y = groups[tr].expand(layers * heads, -1)
    with torch.enable_grad():
        for _ in range(steps):
            logits = torch.einsum("knd,kdc->knc", x[:, tr], w) + b
            loss = F.cross_entropy(logits.reshape(-1, classes), y.reshape(-1))
            loss = loss + 1e-3 * w.pow(2).sum((1, 2)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = (torch.einsum("knd,kdc->knc", x[:, te], w) + b).argmax(-1)
        acc = (pred == groups[te]).float().mean(1)
    return acc.view(layers, heads)


# -- audit: scores, ablations, control ---------------------------------------------------------

DEFAULT_GROUP_PROMPTS = {"female": ["a photo of a woman."], "male": ["a photo of a man."]}


@torch.no_grad()
def head_contributions(
    model: Any,
    tokenizer: Callable,
    preprocess: Callable,
    shards: Any,
    attributes: Mapping[str, Sequence[str]],
    concepts: Sequence[str],
    max_samples: int = 1000,
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Per-head direct contributions ``[N, layers, heads, D]`` of the images of ``shards``
    and their group labels ``[N, attributes]`` (-1 unlabelled)."""
    model.eval()
    contribs, groups = [], []
    for batch in iter_batches(
        shards, preprocess, tokenizer, attributes, concepts, batch_size, max_samples
    ):
        heads, _ = decompose(model.visual, batch["image"])
        contribs.append(heads)
        groups.append(batch["groups"])
    if not contribs:
        raise ValueError(f"head contributions: no images in {shards!r}")
    return torch.cat(contribs), torch.cat(groups)


def score_attribute(
    model: Any,
    tokenizer: Callable,
    contrib: Tensor,
    groups: Tensor,
    attributes: Mapping[str, Sequence[str]],
    attribute: str,
    group_prompts: Mapping[str, Sequence[str]] | None = None,
    probe: bool = True,
) -> dict[str, Tensor]:
    """Head scores of one attribute from :func:`head_contributions`: ``per_value``
    ``[values, layers, heads]`` (one-vs-rest projection), ``projection`` (their maximum over
    values; for two values the group gap along the group direction) and ``probe``
    (multinomial probe accuracy)."""
    if attribute not in attributes:
        raise ValueError(f"attribute={attribute!r}: expected one of {list(attributes)}")
    values = list(attributes[attribute])
    g = groups[:, list(attributes).index(attribute)]
    keep = g >= 0
    contrib, g = contrib[keep], g[keep]
    if g.unique().numel() < 2:
        raise ValueError(f"score_heads: the images show fewer than two values of {attribute!r}")
    prompts = group_prompts or (DEFAULT_GROUP_PROMPTS if attribute == "gender" else None)
    if prompts is None or list(prompts) != values:
        raise ValueError(
            f"group prompts of {attribute!r}: expected one prompt list per value {values}, got "
            f"{list(prompts) if prompts else None} (prompts.group_prompts.{attribute})"
        )
    per_value = value_projection_scores(contrib, g, value_directions(model, tokenizer, prompts))
    out = {"per_value": per_value, "projection": per_value.nan_to_num(-1.0).amax(0)}
    if probe:
        out["probe"] = probe_scores(contrib, g)
    out["contribution_norm"] = contrib.norm(dim=-1).mean(0)
    return out


def score_heads(
    model: Any,
    tokenizer: Callable,
    preprocess: Callable,
    shards: Any,
    attributes: Mapping[str, Sequence[str]],
    concepts: Sequence[str],
    attribute: str = "gender",
    group_prompts: Mapping[str, Sequence[str]] | None = None,
    max_samples: int = 1000,
    batch_size: int = 256,
    probe: bool = True,
) -> dict[str, Tensor]:
    """Head scores ``[layers, heads]`` for ``attribute`` on labelled images of ``shards``
    (:func:`score_attribute`)."""
    contrib, groups = head_contributions(
        model, tokenizer, preprocess, shards, attributes, concepts, max_samples, batch_size
    )
    return score_attribute(
        model, tokenizer, contrib, groups, attributes, attribute, group_prompts, probe
    )


def top_heads(scores: Tensor, k: int) -> list[tuple[int, int]]:
    """The ``k`` highest-scoring (layer, head) pairs."""
    if not 0 < k <= scores.numel():
        raise ValueError(f"k={k}: expected 1..{scores.numel()} heads")
    idx = scores.flatten().topk(k).indices
    return [(int(i) // scores.shape[1], int(i) % scores.shape[1]) for i in idx]


def layer_matched_random(
    chosen: Sequence[Sequence[int]], shape: tuple[int, int], seed: int
) -> list[tuple[int, int]]:
    """Random heads with the same number per layer as ``chosen``, avoiding ``chosen`` where
    the layer has enough other heads (the control for "is it these heads or just any?")."""
    gen = torch.Generator().manual_seed(seed)
    chosen_set = {(int(a), int(b)) for a, b in chosen}
    per_layer: dict[int, int] = {}
    for layer, _ in chosen_set:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    out = []
    for layer, count in sorted(per_layer.items()):
        others = [h for h in range(shape[1]) if (layer, h) not in chosen_set]
        pool = others if len(others) >= count else list(range(shape[1]))
        pick = torch.randperm(len(pool), generator=gen)[:count]
        out += [(layer, pool[int(i)]) for i in pick]
    return out
