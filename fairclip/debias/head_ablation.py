"""Mean-ablation of attention heads in the vision tower, as a DebiasedCLIP vision patch, and
the comparison-table builders (top-scored heads, and the layer-matched random control)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from fairclip.data.batches import iter_batches
from fairclip.debias.debiased_clip import DebiasedCLIP, VisionPatch
from fairclip.debias.head_attribution import (
    DEFAULT_GROUP_PROMPTS,
    _batch_first,
    _blocks,
    head_shape,
    layer_matched_random,
    per_head_outputs,
    score_heads,
    top_heads,
)

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


def _images(batches: Iterator[dict]) -> Iterator[Tensor]:
    return (b["image"] for b in batches)


def ablation_model(
    bundle: Any,
    heads: Sequence[Sequence[int]],
    shards: Any,
    context: Mapping[str, Any],
    max_samples: int = 1000,
    batch_size: int = 256,
) -> DebiasedCLIP:
    """DebiasedCLIP with ``heads`` mean-ablated (means over ``max_samples`` images of
    ``shards``; ``context`` gives the label vocabularies ``attributes`` and ``concepts``)."""
    batches = iter_batches(
        shards, bundle.preprocess_val, bundle.tokenizer, context["attributes"],
        context["concepts"], int(batch_size), int(max_samples),
    )  # fmt: skip
    patch = HeadMeanAblation.fit(bundle.model.visual, heads, _images(batches))
    return DebiasedCLIP(bundle.model, bundle.name, vision_patches=[patch])


def group_prompts_for(context: Mapping[str, Any], attribute: str) -> Mapping[str, Sequence[str]]:
    """The group prompts of ``attribute``: the eval spec's, else ``context["group_prompts"]``,
    else "a photo of a woman/man"."""
    spec = context.get("spec")
    if spec is not None and attribute in getattr(spec, "group_prompts", {}):
        return spec.group_prompts[attribute]
    return context.get("group_prompts") or DEFAULT_GROUP_PROMPTS


HEAD_SCORES = ("projection", "probe")


def scored_heads(
    bundle: Any, context: Mapping[str, Any], head_score: str, num_heads: int, max_samples: int
) -> list[tuple[int, int]]:
    """The ``num_heads`` heads of the highest ``head_score`` on ``context["train_shards"]``."""
    if head_score not in HEAD_SCORES:
        raise ValueError(f"head_score={head_score!r}: expected one of {list(HEAD_SCORES)}")
    attribute = context.get("attribute", "gender")
    scores = score_heads(
        bundle.model, bundle.tokenizer, bundle.preprocess_val, context["train_shards"],
        context["attributes"], context["concepts"], attribute=attribute,
        group_prompts=group_prompts_for(context, attribute), max_samples=int(max_samples),
        probe=head_score == "probe",
    )  # fmt: skip
    return top_heads(scores[head_score], int(num_heads))


def build_head_ablation(
    bundle: Any,
    context: Mapping[str, Any],
    head_score: str = "projection",
    num_heads: int = 1,
    max_samples: int = 1000,
    batch_size: int = 256,
    random_control: bool = False,
) -> DebiasedCLIP:
    """Comparison builder: mean-ablate the ``num_heads`` top-scored heads, or with
    ``random_control`` the layer-matched random heads (``context["seed"]`` draws them).

    ``context`` (the method context or a plain mapping): ``train_shards``, ``attributes``,
    ``concepts`` (required); optional ``spec`` (EvalSpec: its group prompts), ``attribute``.
    """
    heads = scored_heads(bundle, context, head_score, num_heads, max_samples)
    if random_control:
        heads = layer_matched_random(
            heads, head_shape(bundle.model.visual), int(context.get("seed", 0))
        )
    return ablation_model(bundle, heads, context["train_shards"], context, max_samples, batch_size)
