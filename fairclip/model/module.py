"""FairCLIPModule: contrastive (CLIP) or sigmoid (SigLIP) fine-tuning of an open_clip model."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torchmetrics import MeanMetric

from fairclip.metrics import GroupZeroShotAccuracy, RetrievalRecall, SkewMetrics
from fairclip.model.factory import PACKAGED_MODELS, ModelKeys, create_model

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def split_weight_decay(named_params: Sequence[tuple[str, torch.nn.Parameter]]) -> tuple[list, list]:
    """open_clip's rule: no weight decay on gains, biases, embeddings' scales and logit_scale."""
    decay, no_decay = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        exclude = (
            param.ndim < 2
            or "bn" in name
            or "ln" in name
            or "bias" in name
            or "logit_scale" in name
        )
        (no_decay if exclude else decay).append(param)
    return decay, no_decay


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class FairCLIPModule(L.LightningModule):
    """Fine-tunes any open_clip model; validates zero-shot accuracy per group and recall@k.

    Hyper-parameters are plain containers (Hydra passes ``_convert_="all"``), so checkpoints
    hold no pickled config objects. The open_clip loss is built in :meth:`setup`, once the
    rank and world size are known, with ``local_loss`` + ``gather_with_grad`` under DDP.
    """

    # Read by Lightning's ThroughputMonitor (fairclip.callbacks.throughput): FLOPs per batch
    # are not measured, so it logs no FLOP rate or MFU (and does not warn about the attribute).
    flops_per_batch: int | None = None

    def __init__(
        self,
        model: dict[str, Any],
        concepts: Sequence[str],
        attributes: dict[str, Sequence[str]],
        loss: str = "auto",
        lr: float = 5e-4,
        weight_decay: float = 0.1,
        betas: Sequence[float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.0,
        logit_scale_max: float = 100.0,
        lock_image: bool = False,
        lock_image_unlocked_groups: int = 0,
        lock_text: bool = False,
        lock_text_unlocked_layers: int = 0,
        grad_checkpointing: bool = False,
        local_loss: bool = True,
        gather_with_grad: bool = True,
        zero_shot_templates: Sequence[str] = DEFAULT_TEMPLATES,
        recall_ks: Sequence[int] = (1, 5, 10),
        skew_ks: Sequence[int] = (10, 50),
    ) -> None:
        super().__init__()
        if loss not in ("auto", "clip", "siglip"):
            raise ValueError(f"module.loss={loss!r}: expected one of 'auto', 'clip', 'siglip'")
        if not lr > 0:  # torch would say so only at configure_optimizers, without the key
            raise ValueError(f"module.lr={lr!r}: expected a positive learning rate")
        self.save_hyperparameters()
        for tower, locked in (("image", lock_image), ("text", lock_text)):
            if not locked or _has_weights(model, tower):
                continue
            raise ValueError(
                f"module.lock_{tower}=true keeps the {tower} tower as it starts, but "
                f"model.pretrained is not set and model.name={model.get('name')!r} "
                "loads no weights: the locked tower would stay random. Set "
                "model.pretrained=<tag or weights file> (or name=local-dir:<export dir>)."
            )
        bundle = create_model(**model, keys=ModelKeys())
        self.model = bundle.model
        self.model_name = bundle.name
        self.preprocess_train, self.preprocess_val = bundle.preprocess_train, bundle.preprocess_val
        self.tokenizer = bundle.tokenizer
        has_bias = getattr(self.model, "logit_bias", None) is not None
        self.loss_type = ("siglip" if has_bias else "clip") if loss == "auto" else loss
        if self.loss_type == "siglip" and not has_bias:
            raise ValueError(
                "module.loss='siglip' needs a model with a logit_bias (set init_logit_bias)"
            )
        if lock_image:
            self.model.lock_image_tower(unlocked_groups=lock_image_unlocked_groups)
        if lock_text:
            self.model.lock_text_tower(unlocked_layers=lock_text_unlocked_layers)
        # A fully locked tower runs in eval mode, as in LiT: a pretrained HF text tower has
        # dropout, which would otherwise add noise to embeddings nothing can learn from. (The
        # built-in CLIP's text tower is not one submodule and has no dropout: left as it is.)
        self._frozen_towers = [
            tower
            for tower, locked, unlocked in (
                (getattr(self.model, "visual", None), lock_image, lock_image_unlocked_groups),
                (getattr(self.model, "text", None), lock_text, lock_text_unlocked_layers),
            )
            if locked and not unlocked and tower is not None
        ]
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.concepts, self.attributes = list(concepts), {k: list(v) for k, v in attributes.items()}
        # Face datasets (data=fairface|utkface|celeba) name no concepts: validation then has
        # no zero-shot classes to score and measures loss and retrieval recall only.
        self.zero_shot = (
            GroupZeroShotAccuracy(len(self.concepts), self.attributes) if self.concepts else None
        )
        self.recall = RetrievalRecall(recall_ks)
        # Retrieval skew of the concept queries over the eval images: the planted bias shows
        # here first (e.g. "a photo of a doctor" ranking men above equally good women).
        self.skew = (
            SkewMetrics(self.attributes, ks=skew_ks, targets=("eq_opp",)) if self.concepts else None
        )
        self.val_loss = MeanMetric()
        self.loss_fn: torch.nn.Module | None = None
        self.val_loss_fn: torch.nn.Module | None = None
        self.classifier: torch.Tensor | None = None

    # -- model -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FairCLIPModule:
        super().train(mode)
        for tower in self._frozen_towers:
            tower.eval()
        return self

    def setup(self, stage: str) -> None:
        self.loss_fn = self.build_loss(self.trainer.global_rank, self.trainer.world_size)
        # Validation ranks may see different batch counts: never gather across ranks there.
        self.val_loss_fn = self.build_loss(0, 1)

    def build_loss(self, rank: int, world: int) -> torch.nn.Module:
        if self.loss_type == "siglip":
            return SigLipLoss(rank=rank, world_size=world)
        distributed = world > 1
        return ClipLoss(
            local_loss=self.hparams.local_loss and distributed,
            gather_with_grad=self.hparams.gather_with_grad and distributed,
            cache_labels=True,
            rank=rank,
            world_size=world,
        )

    def encode(self, batch: dict, raw: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit (image, text) embeddings of ``batch``; the towers' raw outputs with ``raw``."""
        image = self.model.encode_image(batch["image"])
        text = self.model.encode_text(batch["text"])
        if raw:
            return image, text
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1)

    def contrastive_loss(
        self, image: torch.Tensor, text: torch.Tensor, loss_fn: torch.nn.Module
    ) -> torch.Tensor:
        scale = self.model.logit_scale.exp()
        if self.loss_type == "siglip":
            return loss_fn(image, text, scale, self.model.logit_bias)
        return loss_fn(image, text, scale)

    # -- training ----------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        """The contrastive loss; the batch's unit embeddings ride along (detached) so that
        callbacks such as the SAE's reuse them instead of encoding the batch again (the raw
        tower outputs too, for the joint heads, which act on un-normalised features)."""
        raw_image, raw_text = self.encode(batch, raw=True)
        image, text = F.normalize(raw_image, dim=-1), F.normalize(raw_text, dim=-1)
        loss = self.contrastive_loss(image, text, self.loss_fn)
        bs = image.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/logit_scale", self.model.logit_scale.exp().detach(), batch_size=bs)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        if "skipped" in batch:
            skipped = batch["skipped"].float()
            self.log(
                "train/skipped_samples",
                skipped,
                reduce_fx="sum",
                on_step=False,
                on_epoch=True,
                sync_dist=True,
            )
        return {
            "loss": loss,
            "embeddings": {"image": image.detach(), "text": text.detach()},
            "raw_embeddings": {"image": raw_image.detach(), "text": raw_text.detach()},
        }

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # open_clip clamps the temperature after each step: logit_scale <= ln(100).
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(self.hparams.logit_scale_max))

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        decay, no_decay = split_weight_decay(list(self.model.named_parameters()))
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": hp.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=hp.lr,
            betas=tuple(hp.betas),
            eps=hp.eps,
        )
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- validation --------------------------------------------------------------------
    @torch.no_grad()
    def concept_classifier(self) -> torch.Tensor:
        """Zero-shot classifier [D, C] from the concept names and prompt templates."""
        return build_zero_shot_classifier(
            self.model,
            self.tokenizer,
            self.concepts,
            list(self.hparams.zero_shot_templates),
            num_classes_per_batch=None,
            device=self.device,
        )

    def on_validation_epoch_start(self) -> None:
        self.classifier = self.concept_classifier() if self.concepts else None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        image, text = self.encode(batch)
        self.val_loss.update(
            self.contrastive_loss(image, text, self.val_loss_fn), weight=image.shape[0]
        )
        self.recall.update(image.float(), text.float())
        if self.classifier is None:
            return
        labelled = batch["concept"] >= 0
        scores = image @ self.classifier.to(image.dtype)
        self.zero_shot.update(
            scores.argmax(dim=-1)[labelled], batch["concept"][labelled], batch["groups"][labelled]
        )
        self.skew.update(scores.float(), batch["groups"])

    def on_validation_epoch_end(self) -> None:
        scored = [
            m for m in (self.val_loss, self.zero_shot, self.recall, self.skew) if m is not None
        ]
        metrics = {"loss": self.val_loss.compute()}
        for metric in scored[1:]:
            metrics.update(metric.compute())
        # torchmetrics already synced these in compute(), so every rank holds the same values;
        # sync_dist=True averages identical numbers (exact) and stops Lightning's per-key warning
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=True)
        for metric in scored:
            metric.reset()


def _has_weights(model: Mapping[str, Any], tower: str) -> bool:
    """Whether ``create_model(**model)`` starts ``tower`` from trained weights."""
    name = str(model.get("name") or "")
    if tower == "text" and name in PACKAGED_MODELS:  # a pretrained text tower from a package
        return True
    return bool(model.get("pretrained")) or name.startswith(("local-dir:", "hf-hub:"))
