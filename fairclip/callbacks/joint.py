"""Fit the joint V-L debiasing heads (fairclip.debias.joint) during or after fine-tuning.

Why a callback: the heads must match the exact weights the run ends with. ``mode=during``
steps the heads on the labelled part of every training batch (features from the model being
fine-tuned, no gradient into CLIP) and scores ABLE (averaged over ``skew_ks``) on the
selection split at each epoch end, keeping the best epoch; ``mode=train_end`` fits them once
CLIP is final, frozen (the paper's setting). Either way rank 0 writes a loadable DebiasedCLIP to ``dirpath`` with
``history.json``. Under DDP each rank steps its own copy on its shard of the data
(the heads are tiny) with the gradients averaged over ranks, from rank 0's initial weights,
so every rank holds the same heads (trained on all shards) and the per-epoch ABLE, computed
over all ranks' eval shards, scores those heads; rank 0's copy is saved.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from fairclip.callbacks.embeddings import step_embeddings
from fairclip.debias.debiased_clip import DebiasedCLIP
from fairclip.debias.joint import (
    SELECT_KEY,
    VARIANTS,
    JointHeads,
    JointLossConfig,
    JointTrainer,
    TokenSwapper,
    fit_joint_heads,
    headline,
)
from fairclip.eval.run import evaluate_model
from fairclip.eval.spec import EvalSpec, resolve_splits
from fairclip.files import atomic_write_text

log = logging.getLogger(__name__)


class JointHeadsCallback(L.Callback):
    """Fit joint (or image-/text-only) heads; select the epoch by ABLE averaged over
    ``skew_ks`` on ``eval_shards`` (the selection split)."""

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
        swaps: Mapping[str, str] | None = None,
        hidden: int = 256,
        lr: float = 1e-3,
        epochs: int = 10,
        batch_size: int = 256,
        max_samples: int | None = None,
        alpha: float = 0.3,
        tau: float = 0.07,
        queue_size: int = 1024,
        skew_ks: Sequence[int] = (10, 50),
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
        self.mode, self.variant, self.attribute = mode, variant, attribute
        self.swaps = dict(swaps) if swaps is not None else None
        self.hidden, self.lr, self.epochs, self.batch_size = hidden, lr, epochs, batch_size
        self.max_samples, self.skew_ks, self.label_key = max_samples, list(skew_ks), label_key
        self.loss = JointLossConfig(alpha=alpha, tau=tau, queue_size=queue_size)
        self.spec: Any = None
        self.trainer_: JointTrainer | None = None
        self.best: tuple[float, dict[str, torch.Tensor]] | None = None
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
        if self.mode == "during":
            self.swapper = TokenSwapper(pl_module.tokenizer, self.swaps)
            self.column = list(self.spec.attributes).index(self.attribute)

    def _splits(self) -> dict[str, Any]:
        return resolve_splits(self.eval_shards, self.neutral_shards)

    # -- mode=during ---------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self.mode != "during":
            return
        keep = (batch["concept"] >= 0) & (batch["groups"][:, self.column] >= 0)
        n_labelled = keep.sum().float()
        if trainer.world_size > 1:  # every rank steps, or none: the gradient mean is collective
            n_labelled = trainer.strategy.reduce(n_labelled, reduce_op="min")  # type: ignore[arg-type]
        if int(n_labelled) < 2:
            return
        model = pl_module.model
        # the step's own embeddings: only the counterfactual captions need a forward pass
        emb = step_embeddings(pl_module, outputs, batch, ("image", "text"))
        fv, ft = emb["image"][keep], emb["text"][keep]
        with torch.no_grad():
            ftc = model.encode_text(self.swapper(batch["text"][keep]), normalize=True).float()
        if self.trainer_ is None:
            self.trainer_ = self._new_trainer(trainer, fv.shape[1], pl_module.device)
        with torch.enable_grad():
            out = self.trainer_.step(
                fv, ft, ftc, batch["groups"][keep][:, self.column], batch["concept"][keep],
                float(model.logit_scale.detach().exp()),
            )  # fmt: skip
        pl_module.log_dict({f"joint/{k}": v for k, v in out.items()}, on_step=True)

    def _new_trainer(self, trainer: L.Trainer, dim: int, device: torch.device) -> JointTrainer:
        heads = JointHeads(dim, self.hidden, self.variant).to(device)
        grad_mean = None
        if trainer.world_size > 1:
            state = trainer.strategy.broadcast(heads.state_dict(), src=0)
            heads.load_state_dict(state)

            def grad_mean(flat: torch.Tensor) -> torch.Tensor:
                return trainer.strategy.reduce(flat, reduce_op="mean")  # type: ignore[arg-type]

        return JointTrainer(heads, lr=self.lr, loss=self.loss, grad_mean=grad_mean)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.mode != "during" or self.trainer_ is None:
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
        row = {"epoch": float(trainer.current_epoch), **headline(report, self.spec, self.attribute)}
        row["rank_spread"] = self._rank_spread(trainer)
        self.history.append(row)
        score = row[SELECT_KEY]
        if self.best is None or (not math.isnan(score) and score > self.best[0]):
            # the heads fit the CLIP of this epoch: keep both
            self.best = (score, copy.deepcopy(self.trainer_.heads.state_dict()))
            self.best_model = copy.deepcopy(pl_module.model.state_dict())
        pl_module.log(f"joint/{SELECT_KEY}", score)

    def _rank_spread(self, trainer: L.Trainer) -> float:
        """Largest difference of any head weight between ranks (0.0: every rank holds the same
        heads, so the DDP-synced ABLE of this epoch scores the heads rank 0 saves)."""
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
            heads, self.history = fit_joint_heads(
                pl_module.model,
                pl_module.tokenizer,
                pl_module.preprocess_val,
                self.train_shards,
                self.spec.attributes,
                self.spec.concepts,
                spec=self.spec,
                evaluate=functools.partial(
                    evaluate_model,
                    tokenizer=pl_module.tokenizer,
                    preprocess=pl_module.preprocess_val,
                    spec=self.spec,
                    splits=self._splits(),
                    device=pl_module.device,
                    num_workers=0,
                    progress=False,
                ),  # fmt: skip
                variant=self.variant,
                attribute=self.attribute,
                swaps=self.swaps,
                epochs=self.epochs,
                batch_size=self.batch_size,
                hidden=self.hidden,
                lr=self.lr,
                loss=self.loss,
                max_samples=self.max_samples,
            )
            base = pl_module.model
        elif self.trainer_ is not None and self.best is not None:
            heads = self.trainer_.heads
            heads.load_state_dict(self.best[1])
            base = copy.deepcopy(pl_module.model)
            base.load_state_dict(self.best_model)
        else:
            log.warning("joint heads: no labelled batch seen, nothing saved")
            return
        if not trainer.is_global_zero:
            return
        text, image = heads.cpu().interventions()
        model = DebiasedCLIP(base.cpu(), pl_module.model_name, text=text, image=image)
        model.save(self.dirpath)
        atomic_write_text(self.dirpath / "history.json", json.dumps(self.history, indent=2))
        log.info(
            "joint debiasing heads (%s, %s) saved to %s", self.variant, self.mode, self.dirpath
        )
        pl_module.model.to(pl_module.device)
