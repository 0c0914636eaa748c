"""Training pairs of the joint heads: original raw features of images, their captions and the
counterfactual captions.

Two sources of text, chosen by whether ``captions`` (an :class:`AttributeCaptions`) is given:

* **Attribute captions** (the paper's, and the only choice for label-only face shards): each
  labelled image's caption is written from its labels ("This is the photo of a {age} {race}
  {gender}."), its counterfactual moves every swapped attribute to another value, drawn anew
  each time a batch is drawn (as the authors' dataset does per epoch). Every caption the
  template can write is encoded once (:class:`CaptionCodes`), so a batch is two lookups.
* **Shard captions** with a group-word lexicon swapped at token level (:class:`TokenSwapper`):
  for captioned data whose captions name the group in single-token words (woman ↔ man).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fairclip.data.attribute_captions import AttributeCaptions, CaptionCodes
from fairclip.data.batches import iter_batches
from fairclip.model.encode import encode_prompts

log = logging.getLogger(__name__)

DEFAULT_SWAPS: dict[str, str] = {
    "woman": "man",
    "women": "men",
    "female": "male",
    "girl": "boy",
    "she": "he",
    "her": "his",
    "mother": "father",
}


class TokenSwapper:
    """Swap group words in tokenised captions (both directions of every lexicon pair).

    Why token level: training batches arrive tokenised; open_clip's BPE gives common words
    one token (``woman</w>``), so a swap is an id lookup, vectorised over the batch.
    """

    def __init__(self, tokenizer: Any, swaps: Mapping[str, str] | None = None) -> None:
        swaps = dict(DEFAULT_SWAPS if swaps is None else swaps)
        encode = getattr(tokenizer, "encode", None)
        if encode is None:
            raise TypeError(f"{type(tokenizer).__name__}: expected an open_clip SimpleTokenizer")
        table: dict[int, int] = {}
        for a, b in swaps.items():
            ia, ib = encode(a), encode(b)
            if len(ia) != 1 or len(ib) != 1:
                log.warning("swap %r<->%r skipped: not single tokens (%s, %s)", a, b, ia, ib)
                continue
            table[ia[0]], table[ib[0]] = ib[0], ia[0]
        if not table:
            raise ValueError(f"swap lexicon {swaps}: no pair tokenises to single tokens")
        size = max(table) + 1
        self.lut = torch.arange(size)
        self.lut[list(table)] = torch.tensor(list(table.values()))

    def __call__(self, tokens: Tensor) -> Tensor:
        lut = self.lut.to(tokens.device)
        inside = tokens < lut.numel()
        return torch.where(inside, lut[tokens.clamp(max=lut.numel() - 1)], tokens)


@dataclass
class PairFeatures:
    """Raw original features of labelled pairs; ``groups``/``concepts`` index the debiased
    attribute's value and the concept (-1 unknown). Either ``ft``/``ftc`` (shard captions) or
    ``codes``/``phrases``/``bank`` (attribute captions) are set."""

    fv: Tensor
    groups: Tensor
    concepts: Tensor
    ft: Tensor | None = None
    ftc: Tensor | None = None
    codes: CaptionCodes | None = None
    phrases: Tensor | None = None  # [N, A] phrase codes of each image's labels
    bank: Tensor | None = None  # [len(codes.texts), D] raw features of every caption

    def __len__(self) -> int:
        return self.fv.shape[0]

    def batch(
        self, idx: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(fv, ft, ftc, groups, concepts) of rows ``idx``; attribute counterfactuals drawn
        with ``generator``."""
        if self.codes is None:
            assert self.ft is not None and self.ftc is not None
            ft, ftc = self.ft[idx], self.ftc[idx]
        else:
            assert self.phrases is not None and self.bank is not None
            phrases = self.phrases[idx]
            ft = self.bank[self.codes.index(phrases)]
            ftc = self.bank[self.codes.index(self.codes.counterfactual(phrases, generator))]
        return self.fv[idx], ft, ftc, self.groups[idx], self.concepts[idx]


@torch.no_grad()
def encode_pairs(
    model: nn.Module,
    tokenizer: Any,
    preprocess: Callable,
    shards: Any,
    attributes: Mapping[str, Sequence[str]],
    concepts: Sequence[str],
    attribute: str = "gender",
    swaps: Mapping[str, str] | None = None,
    max_samples: int | None = None,
    batch_size: int = 256,
    captions: AttributeCaptions | None = None,
    need_concepts: bool = False,
) -> PairFeatures:
    """Raw original features of the training pairs of ``shards`` (see the module docstring):
    with ``captions``, every image whose labels the template needs; else every captioned image
    (with a concept label too when ``need_concepts``)."""
    column = list(attributes).index(attribute)
    codes = CaptionCodes(captions, attributes) if captions is not None else None
    swapper = TokenSwapper(tokenizer, swaps) if codes is None else None
    device = next(model.parameters()).device
    out: dict[str, list[Tensor]] = {"fv": [], "ft": [], "ftc": [], "g": [], "c": [], "p": []}
    model.eval()
    for batch in iter_batches(
        shards, preprocess, tokenizer, attributes, concepts, batch_size, max_samples
    ):
        groups = batch["groups"].to(device)
        if codes is not None:
            phrases = codes.phrase_codes(groups)
            keep = (phrases >= 0).all(-1).cpu()
        else:
            keep = batch["has_text"] & ((batch["concept"] >= 0) | (not need_concepts))
        if not bool(keep.any()):
            continue
        out["fv"].append(model.encode_image(batch["image"][keep].to(device)).float())
        out["g"].append(groups[keep.to(device)][:, column])
        out["c"].append(batch["concept"][keep].to(device))
        if codes is not None:
            out["p"].append(phrases[keep.to(device)])
        else:
            assert swapper is not None
            tokens = batch["text"][keep].to(device)
            out["ft"].append(model.encode_text(tokens).float())
            out["ftc"].append(model.encode_text(swapper(tokens)).float())
    if not out["fv"]:
        need = f"labels for {list(captions.words)}" if captions is not None else "captions"
        raise ValueError(f"{shards!r}: no training pairs (no image with {need})")
    cat = {k: torch.cat(v) if v else None for k, v in out.items()}
    if codes is None:
        return PairFeatures(cat["fv"], cat["g"], cat["c"], ft=cat["ft"], ftc=cat["ftc"])
    bank = encode_prompts(model, tokenizer, codes.texts, device, normalize=False)
    return PairFeatures(cat["fv"], cat["g"], cat["c"], codes=codes, phrases=cat["p"], bank=bank)
