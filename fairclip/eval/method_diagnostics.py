"""The comparison table's columns from an evaluation report, and the text-side diagnostic
(class-prompt lean along the bias directions)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fairclip.debias.debiased_clip import DebiasedCLIP
from fairclip.eval.method_context import MethodContext
from fairclip.model.encode import encode_prompts
from fairclip.model.factory import ModelBundle


def summarize(
    report: Mapping[str, Any],
    attribute: str,
    target: str,
    k: int,
    recall_k: int,
    queries: str = "concepts",
) -> dict[str, float]:
    """The table's columns from an evaluate_model report; skew of the query set ``queries``."""
    m = report["metrics"]
    zs, skew = m.get("zeroshot", {}), m.get("skew", {}).get(queries, {})
    able, bias, rec = m.get("able", {}), m.get("bias", {}), m.get("retrieval", {})
    nan = float("nan")
    return {
        "acc": zs.get("acc", nan),
        "worst_group_acc": zs.get(f"worst_group_acc/{attribute}", nan),
        "worst_class_group_acc": zs.get(f"worst_class_group_acc/{attribute}", nan),
        "class_group_gap": zs.get(f"class_group_gap/{attribute}", nan),
        f"maxskew@{k}": skew.get(f"maxskew@{k}/{attribute}/{target}", nan),
        f"ndkl@{k}": skew.get(f"ndkl@{k}/{attribute}/{target}", nan),
        f"able@{k}": able.get(f"able@{k}/{attribute}/{target}", nan),
        "cramers_v": bias.get(f"cramers_v/{attribute}", nan),
        f"i2t_R@{recall_k}": rec.get(f"i2t_R@{recall_k}", nan),
        f"t2i_R@{recall_k}": rec.get(f"t2i_R@{recall_k}", nan),
    }


@torch.no_grad()
def class_lean(model: DebiasedCLIP, bundle: ModelBundle, ctx: MethodContext) -> float:
    """Mean lean of the class prompts along ``cfg.attribute``'s bias-prompt directions.

    Each (prompt, value) lean is signed by the base model's, so the clip row reads the mean
    |lean| and a method reads lower when it removes the lean (negative: flipped it). A text-
    side diagnostic: how far each class prompt sits toward one group. NaN without bias prompts.
    """
    basis = ctx.lean_basis()
    if basis is None:
        return float("nan")
    directions, base = basis
    emb = encode_prompts(model, bundle.tokenizer, ctx.class_prompt_list(), ctx.device)
    return float(((emb @ directions.T) * (base @ directions.T).sign()).mean())


def skew_by_depth(
    report: Mapping[str, Any],
    attribute: str,
    target: str,
    ks: Sequence[int],
    queries: str = "concepts",
) -> dict[str, float]:
    """MaxSkew@k and NDKL@k of the query set ``queries`` at every depth ``k`` of ``ks``.

    Why: one k hides where in the ranking a method moves the groups; on the demo the top of a
    concept's ranking is counter-stereotypical and its tail stereotypical, so a text-side fix
    that flattens the tail (MaxSkew@300) can make the top one-sided (MaxSkew@10).
    """
    skew = report["metrics"].get("skew", {}).get(queries, {})
    nan = float("nan")
    return {
        f"{name}@{k}": skew.get(f"{name}@{k}/{attribute}/{target}", nan)
        for name in ("maxskew", "ndkl")
        for k in ks
    }
