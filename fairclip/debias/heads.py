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
ones are mean-ablated inside :class:`~fairclip.debias.pipeline.DebiasedCLIP` (a registered
:class:`HeadMeanAblation` vision patch), and Cramér's V (group vs predicted class) and accuracy
are compared with a layer-matched random-head control. ``fairclip-heads`` runs it all.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairclip.data.shards import atomic_write_text
from fairclip.debias.pipeline import VISION_PATCHES, DebiasedCLIP, VisionPatch
from fairclip.report.io import save_json

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


# -- loading labelled images -------------------------------------------------------------------


def iter_batches(
    shards: Any,
    preprocess: Callable,
    tokenizer: Callable,
    attributes: Mapping[str, Sequence[str]],
    concepts: Sequence[str],
    batch_size: int = 256,
    max_samples: int | None = None,
    label_key: str = "concept",
    key: str = "shards",
) -> Iterator[dict]:
    """Decoded batches (image, tokenised text, groups, concept) of a labelled shard split, in
    one process (small helper runs; training uses the DataModule)."""
    from fairclip.data.samples import CaptionCollate, SampleDecoder
    from fairclip.data.shards import list_shards
    from fairclip.data.stream import ShardStream

    decode = SampleDecoder(
        preprocess,
        {a: list(v) for a, v in attributes.items()},
        list(concepts),
        label_key,
        require_caption=False,
    )
    stream = ShardStream(
        list_shards(shards, key), decode, CaptionCollate(tokenizer), batch_size, train=False
    )
    seen = 0
    for batch in stream:
        if max_samples is not None and seen >= max_samples:
            break
        if max_samples is not None and seen + len(batch["key"]) > max_samples:
            keep = max_samples - seen
            batch = {
                k: v[:keep] if isinstance(v, list) or getattr(v, "ndim", 0) > 0 else v
                for k, v in batch.items()
            }
        seen += len(batch["key"])
        yield batch


# -- head scores -------------------------------------------------------------------------------


@torch.no_grad()
def group_direction(
    model: Any, tokenizer: Callable, prompts: Mapping[str, Sequence[str]]
) -> Tensor:
    """Unit text direction between the first and second group value's prompts, e.g.
    mean e("a photo of a woman") − mean e("a photo of a man")."""
    if len(prompts) != 2:
        raise ValueError(f"group prompts: expected exactly two values, got {list(prompts)}")
    a, b = (
        F.normalize(model.encode_text(tokenizer(list(p)), normalize=True).mean(0), dim=-1)
        for p in prompts.values()
    )
    return F.normalize(a - b, dim=-1)


def projection_scores(contrib: Tensor, groups: Tensor, direction: Tensor) -> Tensor:
    """``[layers, heads]``: |difference of the group means| of each head's contribution
    projected on ``direction``, in units of the mean embedding norm (binary groups 0/1)."""
    proj = contrib @ direction  # [N, L, H]
    a, b = proj[groups == 0].mean(0), proj[groups == 1].mean(0)
    return (a - b).abs()


def probe_scores(
    contrib: Tensor, groups: Tensor, steps: int = 200, lr: float = 0.05, seed: int = 0
) -> Tensor:
    """``[layers, heads]`` held-out accuracy of a logistic probe per head (all heads fitted at
    once as one batched model, half the images train, half test)."""
    n, layers, heads, d = contrib.shape
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    tr, te = perm[: n // 2], perm[n // 2 :]
    x = contrib.permute(1, 2, 0, 3).reshape(layers * heads, n, d).float()
    mu, sd = x[:, tr].mean(1, keepdim=True), x[:, tr].std(1, keepdim=True) + 1e-6
    x = (x - mu) / sd
    y = groups.float()
    w = torch.zeros(layers * heads, d, requires_grad=True)
    b = torch.zeros(layers * heads, 1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            logits = torch.einsum("knd,kd->kn", x[:, tr], w) + b
            loss = F.binary_cross_entropy_with_logits(logits, y[tr].expand_as(logits))
            loss = loss + 1e-3 * w.pow(2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = (torch.einsum("knd,kd->kn", x[:, te], w) + b) > 0
        acc = (pred == y[te].bool()).float().mean(1)
    return acc.view(layers, heads)


# -- mean ablation -----------------------------------------------------------------------------


@torch.no_grad()
def head_means(
    visual: nn.Module, batches: Iterator[Tensor], heads: Sequence[Sequence[int]]
) -> Tensor:
    """Mean per-head output ``[len(heads), tokens, head_dim]`` over images (per token)."""
    blocks = _blocks(visual)
    bf = _batch_first(visual)
    inputs: dict[int, Tensor] = {}
    layers = sorted({int(layer) for layer, _ in heads})
    sums: dict[int, Tensor] = {}
    count = 0
    handles = [
        blocks[layer].attn.register_forward_pre_hook(
            lambda m, args, layer=layer: inputs.__setitem__(
                layer, args[0] if bf else args[0].transpose(0, 1)
            )
        )
        for layer in layers
    ]
    try:
        for images in batches:
            visual(images)
            for layer in layers:
                o = per_head_outputs(blocks[layer].attn, inputs[layer])  # [B, L, H, hd]
                sums[layer] = sums.get(layer, 0) + o.sum(0)
            count += images.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("head_means: no images")
    return torch.stack([sums[int(layer)][:, int(h)] / count for layer, h in heads])


class HeadMeanAblation(VisionPatch):
    """Replace chosen heads' outputs (every token) by their dataset mean while active.

    Mean ablation (not zeroing) keeps the residual stream on-distribution, so what changes is
    only the image-specific information those heads carry.
    """

    kind = "head_mean_ablation"

    def __init__(self, heads: Sequence[Sequence[int]], means: Tensor) -> None:
        self.heads = [(int(layer), int(h)) for layer, h in heads]
        if means.ndim != 3 or means.shape[0] != len(self.heads):
            raise ValueError(
                f"means: expected [len(heads)={len(self.heads)}, tokens, head_dim], "
                f"got {list(means.shape)}"
            )
        self.means = means.detach().float()

    @classmethod
    def fit(
        cls, visual: nn.Module, heads: Sequence[Sequence[int]], images: Iterator[Tensor]
    ) -> HeadMeanAblation:
        return cls(heads, head_means(visual, images, heads))

    def state(self) -> tuple[dict, dict[str, Tensor]]:
        return {"heads": [list(h) for h in self.heads]}, {"means": self.means}

    @classmethod
    def from_state(
        cls, config: Mapping[str, Any], tensors: Mapping[str, Tensor]
    ) -> HeadMeanAblation:
        return cls(config["heads"], tensors["means"])

    @contextmanager
    def patch(self, visual: nn.Module) -> Iterator[None]:
        blocks = _blocks(visual)
        bf = _batch_first(visual)
        by_layer: dict[int, list[int]] = {}
        for i, (layer, _) in enumerate(self.heads):
            if (
                not 0 <= layer < len(blocks)
                or not 0 <= self.heads[i][1] < blocks[layer].attn.num_heads
            ):
                raise ValueError(f"head {self.heads[i]} out of range for {len(blocks)} layers")
            by_layer.setdefault(layer, []).append(i)

        def hook(attn: nn.MultiheadAttention, args: tuple, out: tuple, idx: list[int]) -> tuple:
            x = args[0] if bf else args[0].transpose(0, 1)
            o = per_head_outputs(attn, x)  # [B, L, H, hd]
            hs = [self.heads[i][1] for i in idx]
            mean = self.means[idx].to(o)  # [k, L, hd]
            delta = mean.transpose(0, 1)[None] - o[:, :, hs]  # [B, L, k, hd]
            w_out = attn.out_proj.weight.view(attn.out_proj.weight.shape[0], attn.num_heads, -1)
            change = torch.einsum("blkd,wkd->blw", delta, w_out[:, hs])
            change = change if bf else change.transpose(0, 1)
            return (out[0] + change, *out[1:])

        handles = [
            blocks[layer].attn.register_forward_hook(lambda m, a, o, idx=idx: hook(m, a, o, idx))
            for layer, idx in by_layer.items()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


VISION_PATCHES[HeadMeanAblation.kind] = HeadMeanAblation


# -- audit: scores, ablations, control ---------------------------------------------------------

DEFAULT_GROUP_PROMPTS = {"female": ["a photo of a woman."], "male": ["a photo of a man."]}


@torch.no_grad()
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
    """Head scores ``[layers, heads]`` for ``attribute`` on labelled images of ``shards``:
    ``projection`` (group gap along the text group direction) and ``probe`` (accuracy)."""
    if attribute not in attributes or len(attributes[attribute]) != 2:
        raise ValueError(
            f"attribute={attribute!r}: expected a binary attribute of {dict(attributes)}"
        )
    column = list(attributes).index(attribute)
    model.eval()
    contribs, groups = [], []
    for batch in iter_batches(
        shards, preprocess, tokenizer, attributes, concepts, batch_size, max_samples
    ):
        g = batch["groups"][:, column]
        keep = g >= 0
        heads, _ = decompose(model.visual, batch["image"][keep])
        contribs.append(heads)
        groups.append(g[keep])
    if not contribs:
        raise ValueError(f"score_heads: no labelled images in {shards!r}")
    contrib, group = torch.cat(contribs), torch.cat(groups)
    if group.unique().numel() < 2:
        raise ValueError(f"score_heads: {shards!r} shows only one value of {attribute!r}")
    prompts = group_prompts or DEFAULT_GROUP_PROMPTS
    direction = group_direction(model, tokenizer, prompts)
    out = {"projection": projection_scores(contrib, group, direction)}
    if probe:
        out["probe"] = probe_scores(contrib, group)
    out["contribution_norm"] = contrib.norm(dim=-1).mean(0)
    return out


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


def _images(batches: Iterator[dict]) -> Iterator[Tensor]:
    return (b["image"] for b in batches)


def ablation_model(
    bundle: Any, heads: Sequence[Sequence[int]], shards: Any, context: Mapping[str, Any]
) -> DebiasedCLIP:
    """DebiasedCLIP with ``heads`` mean-ablated (means over images of ``shards``)."""
    batches = iter_batches(
        shards,
        bundle.preprocess_val,
        bundle.tokenizer,
        context["attributes"],
        context["concepts"],
        int(context.get("batch_size", 256)),
        int(context.get("max_samples", 1000)),
    )
    patch = HeadMeanAblation.fit(bundle.model.visual, heads, _images(batches))
    return DebiasedCLIP(bundle.model, bundle.name, vision_patches=[patch])


def _context_prompts(context: Mapping[str, Any], attribute: str) -> Mapping[str, Sequence[str]]:
    spec = context.get("spec")
    if spec is not None and attribute in getattr(spec, "group_prompts", {}):
        return spec.group_prompts[attribute]
    return context.get("group_prompts") or DEFAULT_GROUP_PROMPTS


def _scored_heads(bundle: Any, context: Mapping[str, Any]) -> list[tuple[int, int]]:
    attribute = context.get("attribute", "gender")
    score = context.get("head_score", "projection")
    scores = score_heads(
        bundle.model,
        bundle.tokenizer,
        bundle.preprocess_val,
        context["train_shards"],
        context["attributes"],
        context["concepts"],
        attribute=attribute,
        group_prompts=_context_prompts(context, attribute),
        max_samples=int(context.get("max_samples", 1000)),
        probe=score == "probe",
    )
    if score not in scores:
        raise ValueError(f"head_score={score!r}: expected 'projection' or 'probe'")
    return top_heads(scores[score], int(context.get("num_heads", 1)))


def build_head_ablation(bundle: Any, context: Mapping[str, Any]) -> DebiasedCLIP:
    """Comparison-table builder: mean-ablate the ``num_heads`` top-scored heads.

    ``context``: ``train_shards``, ``attributes``, ``concepts`` (required); optional ``spec``
    (EvalSpec: its group prompts), ``attribute`` ("gender"), ``head_score`` ("projection" or
    "probe"), ``num_heads`` (1), ``max_samples`` (1000), ``batch_size`` (256).
    """
    return ablation_model(bundle, _scored_heads(bundle, context), context["train_shards"], context)


def build_random_head_ablation(bundle: Any, context: Mapping[str, Any]) -> DebiasedCLIP:
    """Comparison-table builder: the layer-matched random-head control of
    :func:`build_head_ablation` (same context, plus ``seed``)."""
    chosen = _scored_heads(bundle, context)
    heads = layer_matched_random(
        chosen, head_shape(bundle.model.visual), int(context.get("seed", 0))
    )
    return ablation_model(bundle, heads, context["train_shards"], context)


@torch.no_grad()
def group_class_association(
    model: Any,
    tokenizer: Callable,
    preprocess: Callable,
    spec: Any,
    shards: Any,
    attribute: str = "gender",
    batch_size: int = 256,
) -> dict[str, float]:
    """Cramér's V between ``attribute`` and the zero-shot predicted concept, and accuracy, on
    a labelled split. On the balanced eval split the true concept is independent of the group,
    so any association is the model's (more images than the neutral split: less noise)."""
    from fairclip.evaluate import class_embeddings
    from fairclip.metrics import CramersV

    column = list(spec.attributes).index(attribute)
    classes = [[t.format(c) for t in spec.zero_shot_templates] for c in spec.concepts]
    weights = class_embeddings(model, tokenizer, classes, torch.device("cpu"))
    metric = CramersV(len(spec.attributes[attribute]), len(spec.concepts))
    correct = total = 0
    for batch in iter_batches(
        shards, preprocess, tokenizer, spec.attributes, spec.concepts, batch_size
    ):
        pred = (model.encode_image(batch["image"], normalize=True).float() @ weights.T).argmax(1)
        metric.update(batch["groups"][:, column], pred)
        labelled = batch["concept"] >= 0
        correct += int((pred[labelled] == batch["concept"][labelled]).sum())
        total += int(labelled.sum())
    return {
        f"cramers_v_eval/{attribute}": float(metric.compute()),
        "acc": correct / total if total else math.nan,
    }


def _row(
    report: Mapping[str, Any], assoc: Mapping[str, float], attribute: str, k: int
) -> dict[str, float]:
    m = report["metrics"]
    skew = m.get("skew", {}).get(report["settings"].get("able_query_set") or "concepts", {})
    return {
        f"cramers_v_eval/{attribute}": assoc[f"cramers_v_eval/{attribute}"],
        f"cramers_v_neutral/{attribute}": m["bias"][f"cramers_v/{attribute}"],
        "acc": m["zeroshot"]["acc"],
        f"maxskew@{k}": skew.get(f"maxskew@{k}/{attribute}/eq_opp", math.nan),
        "i2t_R@5": m.get("retrieval", {}).get("i2t_R@5", math.nan),
    }


def audit(
    bundle: Any,
    spec: Any,
    splits: Mapping[str, Any],
    train_shards: Any,
    out_dir: str | Path,
    attribute: str = "gender",
    num_heads: int = 1,
    random_seeds: Sequence[int] = (0, 1, 2),
    head_score: str = "projection",
    max_samples: int = 1000,
    plots: bool = True,
) -> dict[str, Any]:
    """Score heads, ablate the top ones and layer-matched random controls, write
    ``head_scores.png``, ``ablation.md`` and ``ablation.json`` in ``out_dir``."""
    from fairclip.evaluate import evaluate_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    context = {
        "train_shards": train_shards,
        "attributes": spec.attributes,
        "concepts": spec.concepts,
        "spec": spec,
        "attribute": attribute,
        "max_samples": max_samples,
    }
    scores = score_heads(
        bundle.model,
        bundle.tokenizer,
        bundle.preprocess_val,
        train_shards,
        spec.attributes,
        spec.concepts,
        attribute=attribute,
        group_prompts=_context_prompts(context, attribute),
        max_samples=max_samples,
    )
    chosen = top_heads(scores[head_score], num_heads)
    k = spec.skew_ks[0]

    def evaluate(model: Any) -> dict[str, float]:
        report = evaluate_model(
            model, bundle.tokenizer, bundle.preprocess_val, spec, splits, num_workers=0,
            progress=False,
        )  # fmt: skip
        assoc = group_class_association(
            model, bundle.tokenizer, bundle.preprocess_val, spec, splits["eval"], attribute
        )
        return _row(report, assoc, attribute, k)

    rows = [{"variant": "original", "heads": [], **evaluate(bundle.model)}]
    rows.append(
        {
            "variant": f"top-{num_heads} ({head_score})",
            "heads": [list(h) for h in chosen],
            **evaluate(ablation_model(bundle, chosen, train_shards, context)),
        }
    )
    shape = head_shape(bundle.model.visual)
    controls = []
    for seed in random_seeds:
        heads = layer_matched_random(chosen, shape, seed)
        row = {"variant": f"random layer-matched (seed {seed})", "heads": [list(h) for h in heads]}
        row.update(evaluate(ablation_model(bundle, heads, train_shards, context)))
        controls.append(row)
    rows += controls
    if controls:
        mean = {
            key: sum(r[key] for r in controls) / len(controls)
            for key in controls[0]
            if key not in ("variant", "heads")
        }
        rows.append({"variant": "random layer-matched (mean)", "heads": [], **mean})
    result = {
        "attribute": attribute,
        "head_score": head_score,
        "scores": {name: s.tolist() for name, s in scores.items()},
        "rows": rows,
    }
    save_json(result, out / "ablation.json")
    atomic_write_text(out / "ablation.md", ablation_markdown(rows))
    if plots:
        plot_scores(scores, out / "head_scores.png", chosen)
    return result


def ablation_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    keys = [k for k in rows[0] if k not in ("variant", "heads")]
    lines = [
        "| variant | heads | " + " | ".join(keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for r in rows:
        heads = " ".join(f"L{a}H{b}" for a, b in r["heads"]) or "-"
        lines.append(
            f"| {r['variant']} | {heads} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |"
        )
    return "\n".join(lines) + "\n"


def plot_scores(
    scores: Mapping[str, Tensor], path: Path, chosen: Sequence[Sequence[int]] = ()
) -> Path:
    """Layer × head heatmaps, one panel per score; chosen heads boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("projection", "probe") if n in scores]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        s = scores[name].numpy()
        im = ax.imshow(s, cmap="viridis", aspect="auto")
        ax.set(title=name, xlabel="head", ylabel="layer")
        ax.set_xticks(range(s.shape[1]))
        ax.set_yticks(range(s.shape[0]))
        for layer, h in chosen:
            ax.add_patch(
                plt.Rectangle((h - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", lw=2)
            )
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """``fairclip-heads``: audit the attention heads of a model on labelled shards.

    Returns None: the console script exits with ``main()``'s value, so a result returned here
    made every successful audit exit 1 with the result dumped to stderr. The result is in
    ``<out>/ablation.json``."""
    from omegaconf import OmegaConf

    from fairclip.data.shards import list_shards
    from fairclip.evaluate import EvalSpec, resolve_splits
    from fairclip.model.factory import ModelKeys, load_model
    from fairclip.runtime import CONF_DIR

    conf = Path(CONF_DIR)

    def positive_int(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
        return int(text)

    def options(group: str) -> list[str]:
        return sorted(p.stem for p in (conf / group).glob("*.yaml"))

    parser = argparse.ArgumentParser(prog="fairclip-heads", description=main.__doc__)
    parser.add_argument("model", help="model spec (run dir, export dir, open_clip name, .ckpt)")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--train-shards", required=True, help="labelled shards to score heads on")
    parser.add_argument("--eval-shards", required=True)
    parser.add_argument("--neutral-shards", default="auto")
    parser.add_argument("--data", default="synthetic", choices=options("data"),
                        help="conf/data/<name>.yaml vocabularies")  # fmt: skip
    parser.add_argument("--prompts", default="synthetic", choices=options("prompts"),
                        help="conf/prompts/<name>.yaml")  # fmt: skip
    parser.add_argument("--attribute", default="gender")
    parser.add_argument("--num-heads", type=positive_int, default=1)
    parser.add_argument("--score", default="projection", choices=("projection", "probe"))
    parser.add_argument("--random-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--max-samples", type=positive_int, default=1000)
    parser.add_argument("--out", default="heads_audit")
    args = parser.parse_args(argv)
    list_shards(args.train_shards, "--train-shards")  # a missing split fails now, by its flag
    list_shards(args.eval_shards, "--eval-shards")

    cfg = OmegaConf.create(
        {
            "data": OmegaConf.load(conf / "data" / f"{args.data}.yaml"),
            "prompts": OmegaConf.load(conf / "prompts" / f"{args.prompts}.yaml"),
        }
    )
    data = OmegaConf.to_container(cfg.data, resolve=False)
    spec = EvalSpec.from_config(
        OmegaConf.to_container(cfg.prompts, resolve=True), data["attributes"], data["concepts"]
    )
    bundle = load_model(
        args.model,
        pretrained=args.pretrained,
        keys=ModelKeys("MODEL", "--pretrained", config_file=None),
    )
    result = audit(
        bundle,
        spec,
        resolve_splits(args.eval_shards, args.neutral_shards),
        args.train_shards,
        args.out,
        attribute=args.attribute,
        num_heads=args.num_heads,
        random_seeds=args.random_seeds,
        head_score=args.score,
        max_samples=args.max_samples,
    )
    print(ablation_markdown(result["rows"]))


if __name__ == "__main__":
    main()
