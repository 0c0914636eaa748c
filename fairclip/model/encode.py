"""Encoding prompts with any CLIP-like model: eval mode that restores every submodule's mode,
unit-norm prompt embeddings in chunks, and zero-shot class embeddings (open_clip's builder for
class names x shared templates, ours for a prompt list per class)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch import Tensor
from tqdm import tqdm


def model_dtype(model: Any) -> torch.dtype:
    """Input dtype for images: the model's (fp16/bf16 models), float32 for wrappers."""
    try:
        dtype = next(model.parameters()).dtype
    except (StopIteration, AttributeError, TypeError):
        return torch.float32
    return dtype if dtype.is_floating_point else torch.float32


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Run ``model`` in eval mode (no dropout), then give every submodule back the exact mode
    it had.

    Why exact: ``model.train()`` would also switch on submodules that were meant to stay in
    eval mode, such as a locked LiT tower or the base model under a freshly built
    :class:`DebiasedCLIP` (a new ``nn.Module`` starts in train mode). A pretrained HF text
    tower has dropout, so every embedding computed afterwards would carry dropout noise.
    """
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    modes = [m.training for m in modules]
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if modules:
            for module, mode in zip(modules, modes, strict=True):
                module.training = mode
        elif was_training and hasattr(model, "train"):
            model.train()


@torch.no_grad()
def encode_prompts(
    model: Any,
    tokenizer: Callable,
    prompts: Sequence[str],
    device: torch.device,
    chunk: int = 512,
    normalize: bool = True,
) -> Tensor:
    """Text embeddings ``[len(prompts), D]`` (float32; unit-norm unless ``normalize=False``),
    encoded in chunks; a progress bar from 10 chunks on (a caption corpus for an SAE can take
    minutes on a CPU)."""
    starts = range(0, len(prompts), chunk)
    bar = tqdm(starts, desc="encoding prompts", unit="chunk", disable=len(starts) < 10 or None)
    with eval_mode(model):
        out = [
            model.encode_text(
                tokenizer(list(prompts[i : i + chunk])).to(device), normalize=normalize
            )
            for i in bar
        ]
    return torch.cat(out).float()


@torch.no_grad()
def class_embeddings(
    model: Any,
    tokenizer: Callable,
    prompts_per_class: Sequence[Sequence[str]],
    device: torch.device,
) -> Tensor:
    """Zero-shot classifier ``[C, D]``: mean of each class's unit prompt embeddings, renormalised
    (open_clip's rule), all prompts encoded in one batched pass.

    Kept beside :func:`zero_shot_classifier` for prompt lists that differ per class (the group
    prompts give each value its own list and count), which open_clip's builder cannot take: it
    formats the same templates for every class.
    """
    flat = [p for prompts in prompts_per_class for p in prompts]
    owner = torch.repeat_interleave(
        torch.arange(len(prompts_per_class)), torch.tensor([len(p) for p in prompts_per_class])
    ).to(device)
    emb = encode_prompts(model, tokenizer, flat, device)
    sums = torch.zeros(len(prompts_per_class), emb.shape[1], device=device).index_add_(
        0, owner, emb
    )
    return torch.nn.functional.normalize(sums, dim=-1)


@torch.no_grad()
def zero_shot_classifier(
    model: Any,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    device: torch.device,
    chunk: int = 512,
) -> Tensor:
    """Zero-shot classifier ``[C, D]`` (float32) for ``classnames`` x shared ``templates``:
    open_clip's ``build_zero_shot_classifier``, run in :func:`eval_mode`.

    The same value as ``class_embeddings(model, tokenizer, [[t.format(c) for t in templates]
    for c in classnames], device)``, transposed from open_clip's ``[D, C]``; classes are encoded
    a batch at a time, about ``chunk`` prompts per forward pass like :func:`encode_prompts`.
    """
    per_batch = max(1, chunk // max(len(templates), 1))
    with eval_mode(model):
        weights = build_zero_shot_classifier(
            model,
            tokenizer,
            list(classnames),
            list(templates),
            num_classes_per_batch=per_batch,
            device=device,
        )
    return weights.T.float().contiguous()
