"""Fit the joint V-L debiasing heads (fairclip.debias.joint) during or after fine-tuning.

Why a callback: the heads must match the exact weights the run ends with. ``mode=train_end``
fits them once CLIP is final, frozen (the paper's setting); ``mode=during`` steps them on the
labelled part of every training batch (raw features from the model being fine-tuned, no
gradient into CLIP). Either way the heads are scored on the selection split every
``select.every`` epochs and the best epoch is kept (early stopping after ``select.patience``
evaluations without a better score; in ``mode=during`` the heads then stop stepping while
CLIP trains on). Rank 0 writes a loadable DebiasedCLIP to ``dirpath`` with ``history.json``.

Text: with ``captions`` ({template, words[, swap]}, by default ``data.captions``) every
labelled image's caption and counterfactual are written from its labels (the paper's; the
only way on label-only face shards); without, the shards' captions with ``swaps`` swapped.

Under DDP each rank steps its own copy on its shard of the data (the heads are tiny) with
the gradients averaged over ranks, from rank 0's initial weights, so every rank holds the
same heads (trained on all shards) and the ABLE computed over all ranks' eval shards scores
those heads; rank 0's copy is saved.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from fairclip.callbacks.embeddings import step_embeddings
from fairclip.data.attribute_captions import AttributeCaptions, CaptionCodes
from fairclip.debias.debiased_clip import DebiasedCLIP
from fairclip.debias.joint import (
    EarlyStopping,
    JointFitConfig,
    Selection,
    config_from,
    fit_joint_heads,
    headline,
    selection_score,
)
from fairclip.debias.joint_heads import VARIANTS, JointHeads
from fairclip.debias.joint_loss import JointLossConfig, JointTrainer
from fairclip.debias.joint_pairs import TokenSwapper, encode_pairs
from fairclip.eval.run import evaluate_model
from fairclip.eval.spec import EvalSpec, resolve_splits
from fairclip.files import atomic_write_text

log = logging.getLogger(__name__)


class JointHeadsCallback(L.Callback):
    """Fit joint (or image-/text-only) heads and select their epoch on ``eval_shards``."""

    def __init__(
        self,
        prompts: Mapping[str, Any],
        eval_shards: Any,
        dirpath: str | Path,
        train_shards: Any = None,
        neutral_shards: Any = "auto",
        mode: str = "train_end",
        variant: str = "joint",
        attribute: str = "gender",
        captions: Mapping[str, Any] | None = None,
        swap: Sequence[str] | None = None,
        swaps: Mapping[str, str] | None = None,
        form: str = "paper",
        hidden: int = 1024,
        hidden_image: int = 512,
        lr: float = 5e-6,
        epochs: int = 100,
        batch_size: int = 512,
        max_samples: int | None = None,
        loss: Mapping[str, Any] | None = None,
        select: Mapping[str, Any] | None = None,
        skew_ks: Sequence[int] = (1000,),
        label_key: str = "concept",
    ) -> None:
        if mode not in ("during", "train_end"):
            raise ValueError(f"callbacks.joint.mode={mode!r}: expected 'during' or 'train_end'")
        if variant not in VARIANTS:
            raise ValueError(f"callbacks.joint.variant={variant!r}: expected one of {VARIANTS}")
        if mode == "train_end" and train_shards is None:
            raise ValueError("callbacks.joint.train_shards: required for mode=train_end")
        self.prompts, self.eval_shards, self.neutral_shards = (
            dict(prompts),
            eval_shards,
            neutral_shards,
        )
        self.dirpath, self.train_shards = Path(dirpath), train_shards
        self.mode, self.attribute = mode, attribute
        self.raw_captions = None if captions is None else dict(captions)
        if self.raw_captions is not None and swap is not None:
            self.raw_captions["swap"] = list(swap)
        self.swaps = dict(swaps) if swaps is not None else None
        self.max_samples, self.skew_ks, self.label_key = max_samples, list(skew_ks), label_key
        self.fit = JointFitConfig(
            variant=variant, form=form, hidden=int(hidden), hidden_image=int(hidden_image),
            epochs=int(epochs), batch_size=int(batch_size), lr=float(lr),
            select=config_from(Selection, select, "callbacks.joint.select"),
            loss=config_from(JointLossConfig, loss, "callbacks.joint.loss"),
        )  # fmt: skip
        self.spec: Any = None
        self.captions: AttributeCaptions | None = None
        self.trainer_: JointTrainer | None = None
        self.stopping = EarlyStopping(self.fit.select)
        self.stopped = False
        self.history: list[dict[str, float]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.spec = EvalSpec.from_config(
            self.prompts,
            pl_module.attributes,
            pl_module.concepts,
            skew_ks=self.skew_ks,
            recall_ks=[5],
            targets=["eq_opp"],
            label_key=self.label_key,
            key="callbacks.joint.prompts",
        )
        if self.attribute not in self.spec.attributes:
            raise ValueError(
                f"callbacks.joint.attribute={self.attribute!r}: expected one of "
                f"{list(self.spec.attributes)}"
            )
        if self.raw_captions is not None:
            self.captions = AttributeCaptions.from_config(
                self.raw_captions, self.spec.attributes, "callbacks.joint.captions"
            )
        self.column = list(self.spec.attributes).index(self.attribute)
        if self.mode == "during":
            if self.captions is not None:
                self.codes = CaptionCodes(self.captions, self.spec.attributes)
                self.draws = torch.Generator().manual_seed(self.fit.seed)
            else:
                self.swapper = TokenSwapper(pl_module.tokenizer, self.swaps)

    def _splits(self) -> dict[str, Any]:
        return resolve_splits(self.eval_shards, self.neutral_shards)

    # -- mode=during ---------------------------------------------------------------------
    def _batch_text(
        self, pl_module: L.LightningModule, batch: dict, raw_text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows kept, raw factual text, raw counterfactual text) of a training batch."""
        model = pl_module.model
        if self.captions is None:
            keep = torch.ones_like(batch["concept"], dtype=torch.bool)  # training rows have text
            if self.fit.loss.target == "balance_groups":
                keep &= (batch["concept"] >= 0) & (batch["groups"][:, self.column] >= 0)
            with torch.no_grad():
                ftc = model.encode_text(self.swapper(batch["text"][keep])).float()
            return keep, raw_text[keep], ftc
        phrases = self.codes.phrase_codes(batch["groups"])
        keep = (phrases >= 0).all(-1)
        factual = self.codes.index(phrases[keep])
        counter = self.codes.index(self.codes.counterfactual(phrases[keep], self.draws))
        # each distinct caption of the batch is encoded once, by the model as it is now
        wanted, where = torch.cat([factual, counter]).unique(return_inverse=True)
        texts = [self.codes.texts[i] for i in wanted.tolist()]
        with torch.no_grad():
            tokens = pl_module.tokenizer(texts).to(pl_module.device)
            feats = model.encode_text(tokens).float()[where]
        return keep, feats[: factual.numel()], feats[factual.numel() :]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self.mode != "during" or self.stopped:
            return
        emb = step_embeddings(pl_module, outputs, batch, ("image", "text"), raw=True)
        keep, ft, ftc = self._batch_text(pl_module, batch, emb["text"])
        n_kept = keep.sum().float()
        if trainer.world_size > 1:  # every rank steps, or none: the gradient mean is collective
            n_kept = trainer.strategy.reduce(n_kept, reduce_op="min")  # type: ignore[arg-type]
        if int(n_kept) < 2:
            return
        fv = emb["image"][keep]
        if self.trainer_ is None:
            self.trainer_ = self._new_trainer(trainer, fv.shape[1], pl_module.device)
        with torch.enable_grad():
            out = self.trainer_.step(
                fv, ft, ftc, trainer.current_epoch, batch["groups"][keep][:, self.column],
                batch["concept"][keep], float(pl_module.model.logit_scale.detach().exp()),
            )  # fmt: skip
        pl_module.log_dict({f"joint/{k}": v for k, v in out.items()}, on_step=True)

    def _new_trainer(self, trainer: L.Trainer, dim: int, device: torch.device) -> JointTrainer:
        fit = self.fit
        heads = JointHeads(dim, fit.hidden, fit.variant, fit.hidden_image, fit.form).to(device)
        grad_mean = None
        if trainer.world_size > 1:
            state = trainer.strategy.broadcast(heads.state_dict(), src=0)
            heads.load_state_dict(state)

            def grad_mean(flat: torch.Tensor) -> torch.Tensor:
                return trainer.strategy.reduce(flat, reduce_op="mean")  # type: ignore[arg-type]

        return JointTrainer(heads, fit.lr, fit.weight_decay, fit.loss, grad_mean, fit.seed)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.mode != "during" or self.trainer_ is None or self.stopped:
            return
        if not self.stopping.due(epoch) and epoch != trainer.max_epochs - 1:
            return
        model = self._debiased(pl_module, self.trainer_.heads)
        report = evaluate_model(
            model,
            pl_module.tokenizer,
            pl_module.preprocess_val,
            self.spec,
            self._splits(),
            device=pl_module.device,
            num_workers=0,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            progress=False,
        )
        row = {"epoch": float(epoch), **headline(report, self.spec, self.attribute)}
        row["rank_spread"] = self._rank_spread(trainer)
        row["score"], what = selection_score(row, self.spec, self.fit.select)
        heads = self.trainer_.heads

        def state() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
            # the heads fit the CLIP of this epoch: keep both
            return copy.deepcopy(heads.state_dict()), copy.deepcopy(pl_module.model.state_dict())

        self.stopped = self.stopping.update(row["score"], what, state)
        self.history.append(row)
        pl_module.log("joint/score", row["score"])
        if self.stopped:
            log.info("joint heads: early stop at epoch %d; CLIP trains on without them", epoch)

    def _rank_spread(self, trainer: L.Trainer) -> float:
        """Largest difference of any head weight between ranks (0.0: every rank holds the same
        heads, so the DDP-synced score of this epoch scores the heads rank 0 saves)."""
        assert self.trainer_ is not None
        flat = torch.cat([p.detach().reshape(-1) for p in self.trainer_.heads.parameters()])
        if trainer.world_size == 1:
            return 0.0
        high = trainer.strategy.reduce(flat.clone(), reduce_op="max")  # type: ignore[arg-type]
        low = trainer.strategy.reduce(flat.clone(), reduce_op="min")  # type: ignore[arg-type]
        return float((high - low).abs().max())

    # -- end -------------------------------------------------------------------------------
    def _debiased(self, pl_module: L.LightningModule, heads: JointHeads) -> DebiasedCLIP:
        text, image = heads.interventions()
        return DebiasedCLIP(pl_module.model, pl_module.model_name, text=text, image=image)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.mode == "train_end":
            pl_module.model.eval()
            pairs = encode_pairs(
                pl_module.model, pl_module.tokenizer, pl_module.preprocess_val,
                self.train_shards, self.spec.attributes, self.spec.concepts, self.attribute,
                self.swaps, self.max_samples, captions=self.captions,
                need_concepts=self.fit.loss.target == "balance_groups",
            )  # fmt: skip
            evaluate = functools.partial(
                evaluate_model,
                tokenizer=pl_module.tokenizer,
                preprocess=pl_module.preprocess_val,
                spec=self.spec,
                splits=self._splits(),
                device=pl_module.device,
                num_workers=0,
                progress=False,
            )
            heads, self.history = fit_joint_heads(
                pl_module.model, pairs, self.fit, self.spec, evaluate, self.attribute
            )
            base = pl_module.model
        elif self.trainer_ is not None and self.stopping.best_state is not None:
            heads = self.trainer_.heads
            heads_state, model_state = self.stopping.best_state
            heads.load_state_dict(heads_state)
            base = copy.deepcopy(pl_module.model)
            base.load_state_dict(model_state)
        else:
            log.warning("joint heads: no labelled batch seen or no epoch scored, nothing saved")
            return
        if not trainer.is_global_zero:
            return
        text, image = heads.cpu().interventions()
        model = DebiasedCLIP(base.cpu(), pl_module.model_name, text=text, image=image)
        model.save(self.dirpath)
        atomic_write_text(self.dirpath / "history.json", json.dumps(self.history, indent=2))
        log.info(
            "joint debiasing heads (%s, %s) saved to %s", self.fit.variant, self.mode, self.dirpath
        )
        pl_module.model.to(pl_module.device)
