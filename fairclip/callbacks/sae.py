"""Train Matryoshka TopK SAEs on the embeddings of the model being fine-tuned.

Why a callback: the SAE (for SEM and for analysis) must describe the exact weights the run
ends with, and watching its FVU / dead latents during training shows how the embedding space
drifts. During training, every ``every_n_steps`` training batches, a few :func:`sae_step`
updates run on a FIFO buffer of fresh text (caption) and image embeddings of the training
batches. At the end of training an SAE per modality is trained to convergence
(:func:`train_sae`) on embeddings of the final model, evaluated (:func:`sae_metrics`),
logged under ``sae/...`` with the top-activating captions per latent (a wandb table if a
WandbLogger is attached, else ``<dirpath>/top_activating.json``), and saved as
``<dirpath>/{text,image}_sae.safetensors`` (``dirpath`` defaults to ``<output_dir>/sae``,
beside ``checkpoints/``).

Under DDP every rank buffers the embeddings of its own batches (the ones its training step
already computed, so nothing is encoded twice) and the buffers are gathered to rank 0, which
trains, logs and saves: the SAE sees the data of all ranks, ``ceil(buffer_size / world)``
and ``ceil(final_samples / world)`` rows from each, not rank 0's share only.

The during-training SAEs, their optimisers and the batch count are part of every Lightning
checkpoint (``state_dict``), so a requeued or resumed run continues the monitoring curve and
its update cadence instead of starting a fresh SAE. The embedding buffers are not saved (under
DDP each rank holds its own, and a checkpoint holds rank 0's state only): they refill from
the first batches after the resume.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

from fairclip.callbacks.embeddings import encode_batch, step_embeddings
from fairclip.files import atomic_write_text
from fairclip.sae import (
    MatryoshkaTopKSAE,
    SAEConfig,
    make_optimizer,
    sae_metrics,
    sae_step,
    save_sae,
    top_activating,
    train_sae,
)
from fairclip.sae.presets import sae_settings

log = logging.getLogger(__name__)

MODALITIES = ("text", "image")
_SPECIAL = re.compile(r"<start_of_text>|<end_of_text>|!+$")
_LOGGED = ("fvu", "l0", "dead_fraction", "cos")


class SAECallback(L.Callback):
    """SAEs on the module's text and image embeddings, during and after training.

    The module must expose ``model`` (open_clip ``encode_text``/``encode_image``) and
    ``tokenizer`` (to turn caption tokens back into text for the top-activating table), as
    :class:`~fairclip.model.module.FairCLIPModule` does.
    """

    def __init__(
        self,
        dirpath: str | Path,
        modalities: Sequence[str] = MODALITIES,
        preset: str = "auto",
        model_name: str | None = None,
        n_latents: int | None = None,
        k_levels: Sequence[int] | None = None,
        level_weights: str | Sequence[float] | None = None,
        lr: float = 1e-3,
        batch_size: int = 256,
        every_n_steps: int = 20,
        steps_per_update: int = 4,
        buffer_size: int = 2048,
        final_samples: int = 4096,
        final_epochs: int = 50,
        top_n: int = 8,
        top_latents: int = 32,
        seed: int = 0,
    ) -> None:
        bad = [m for m in modalities if m not in MODALITIES]
        if not modalities or bad:
            raise ValueError(
                f"callbacks.sae.modalities={list(modalities)}: expected a non-empty subset of "
                f"{list(MODALITIES)}"
            )
        for name, value in (
            ("every_n_steps", every_n_steps),
            ("steps_per_update", steps_per_update),
            ("buffer_size", buffer_size),
            ("final_samples", final_samples),
            ("final_epochs", final_epochs),
            ("batch_size", batch_size),
            ("top_n", top_n),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"callbacks.sae.{name}={value!r}: expected an int >= 1")
        self.dirpath = Path(dirpath)
        self.modalities = tuple(modalities)
        self.preset, self.model_name = str(preset), model_name
        self.explicit = {
            "n_latents": int(n_latents) if n_latents is not None else None,
            "k_levels": tuple(k_levels) if k_levels else None,
            "level_weights": level_weights,
        }
        self.sae_kwargs = {
            "lr": float(lr),
            "batch_size": int(batch_size),
            "seed": int(seed),
        }
        self.every_n_steps, self.steps_per_update = every_n_steps, steps_per_update
        self.buffer_size, self.final_samples = buffer_size, final_samples
        self.final_epochs, self.top_n, self.top_latents = final_epochs, top_n, top_latents
        self.saes: dict[str, MatryoshkaTopKSAE] = {}
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.buffers: dict[str, Tensor] = {}
        self.final_metrics: dict[str, dict[str, float]] = {}
        self._batches = 0
        self._restored: dict[str, dict[str, Any]] = {}  # from a checkpoint, built on first use

    # -- helpers -----------------------------------------------------------------------------
    def _config(self, d_in: int) -> SAEConfig:
        settings = sae_settings(
            self.preset, self.model_name, d_in, self.explicit, "callbacks.sae.preset"
        )
        return SAEConfig(d_in=d_in, epochs=self.final_epochs, **settings, **self.sae_kwargs)

    def _sae_for(self, mod: str, d_in: int, device: torch.device) -> MatryoshkaTopKSAE:
        """The modality's during-training SAE: restored from the checkpoint if there was one
        (its optimiser state too), else new."""
        if mod not in self.saes:
            saved = self._restored.pop(mod, None)
            cfg = SAEConfig.from_dict(saved["config"]) if saved else self._config(d_in)
            if cfg.d_in != d_in:
                raise ValueError(
                    f"callbacks.sae: the checkpoint's {mod} SAE takes {cfg.d_in}-dim "
                    f"embeddings, the model gives {d_in}"
                )
            self.saes[mod] = MatryoshkaTopKSAE(cfg).to(device)
            self.opts[mod] = make_optimizer(self.saes[mod])
            if saved:
                self.saes[mod].load_state_dict(saved["sae"])
                self.opts[mod].load_state_dict(saved["optimizer"])
        return self.saes[mod]

    # -- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        saes = {
            mod: {
                "config": sae.cfg.to_dict(),
                "sae": {k: v.detach().cpu() for k, v in sae.state_dict().items()},
                "optimizer": self.opts[mod].state_dict(),
            }
            for mod, sae in self.saes.items()
            if mod in self.opts  # the final SAEs of on_fit_end have no optimiser to resume
        }
        return {"batches": self._batches, "saes": {**self._restored, **saes}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._batches = int(state_dict.get("batches", 0))
        self._restored = dict(state_dict.get("saes", {}))
        self.saes, self.opts = {}, {}

    # -- during training -----------------------------------------------------------------
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        keep = -(-self.buffer_size // trainer.world_size)  # this rank's share of the buffer
        for mod, emb in step_embeddings(pl_module, outputs, batch, self.modalities).items():
            buf = self.buffers.get(mod)
            buf = emb if buf is None else torch.cat([buf, emb])
            self.buffers[mod] = buf[-keep:]
        self._batches += 1  # global_step would repeat under gradient accumulation
        if self._batches % self.every_n_steps:
            return
        gathered = {mod: gather_rows(trainer, buf) for mod, buf in self.buffers.items()}
        if not trainer.is_global_zero:
            return
        logs: dict[str, float] = {}
        for mod, buf in gathered.items():
            if buf.shape[0] < 2:
                continue
            sae = self._sae_for(mod, buf.shape[1], buf.device)
            bs = min(self.sae_kwargs["batch_size"], buf.shape[0])
            for _ in range(self.steps_per_update):
                idx = torch.randperm(buf.shape[0], device=buf.device)[:bs]
                step_logs = sae_step(sae, self.opts[mod], buf[idx])
            sae.eval()
            m = sae_metrics(sae, buf)
            logs.update({f"sae/{mod}/{k}": float(m[k]) for k in _LOGGED})
            logs[f"sae/{mod}/train_fvu"] = step_logs["fvu"]
            logs[f"sae/{mod}/buffer_rows"] = float(buf.shape[0])
        if logs:
            logs["sae/fvu"] = max(v for k, v in logs.items() if k.endswith("/fvu"))
            # Straight to the loggers: updates are already every N steps, and self.log would
            # drop them unless N is a multiple of trainer.log_every_n_steps.
            for logger in trainer.loggers:
                logger.log_metrics(logs, step=trainer.global_step)

    # -- after training ------------------------------------------------------------------
    @torch.no_grad()
    def _final_embeddings(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> tuple[dict[str, Tensor], list[str]]:
        """Embeddings of the final model on fresh training batches of this rank (its share of
        ``final_samples``), and their captions."""
        dm = trainer.datamodule
        loader = dm.train_dataloader() if dm is not None else trainer.train_dataloader
        was_training = pl_module.training
        pl_module.eval()
        embs: dict[str, list[Tensor]] = {m: [] for m in self.modalities}
        captions: list[str] = []
        seen, quota = 0, -(-self.final_samples // trainer.world_size)
        for batch in loader:
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            for mod, emb in encode_batch(pl_module, batch, self.modalities).items():
                embs[mod].append(emb)
            captions.extend(self._decode(pl_module, batch["text"]))
            seen += batch["text"].shape[0]
            if seen >= quota:
                break
        pl_module.train(was_training)
        if not seen:
            raise ValueError(
                f"callbacks.sae: the training dataloader of rank {trainer.global_rank} "
                "yielded no batch"
            )
        return {m: torch.cat(v)[:quota] for m, v in embs.items()}, captions[:quota]

    @staticmethod
    def _decode(pl_module: L.LightningModule, tokens: Tensor) -> list[str]:
        tok = getattr(pl_module, "tokenizer", None)
        hf = getattr(tok, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers one
        if hasattr(hf, "batch_decode"):
            texts = hf.batch_decode(tokens.tolist(), skip_special_tokens=True)
            return [t.strip() for t in texts]
        decode = getattr(tok, "decode", None)
        if decode is None:
            return [f"<caption {i}>" for i in range(tokens.shape[0])]
        return [_SPECIAL.sub("", decode([t for t in row if t])).strip() for row in tokens.tolist()]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        embs, captions = self._final_embeddings(trainer, pl_module)
        embs = {mod: gather_rows(trainer, x) for mod, x in embs.items()}
        captions = gather_objects(trainer, captions)
        if not trainer.is_global_zero:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        logs: dict[str, float] = {}
        for mod, x in embs.items():
            sae, hist = train_sae(x, self._config(x.shape[1]), progress=False)
            self.saes[mod] = sae
            self.opts.pop(mod, None)
            save_sae(sae, self.dirpath / f"{mod}_sae.safetensors")
            m = sae_metrics(sae, x)
            self.final_metrics[mod] = {**m, "train_seconds": hist["seconds"], "n": x.shape[0]}
            logs.update({f"sae/{mod}/final_{k}": float(m[k]) for k in _LOGGED})
        logs["sae/final_fvu"] = max(v for k, v in logs.items() if k.endswith("final_fvu"))
        atomic_write_text(self.dirpath / "metrics.json", json.dumps(self.final_metrics, indent=1))
        top = self._top_activating(embs, captions)
        for logger in trainer.loggers:
            logger.log_metrics(logs, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                rows = [[lat, rank, text, act] for lat, hits in top.items()
                        for rank, (text, act) in enumerate(hits)]  # fmt: skip
                logger.log_table(
                    "sae/text/top_activating",
                    columns=["latent", "rank", "caption", "activation"],
                    data=rows,
                )
            logger.save()
        log.info("SAEs written to %s: %s", self.dirpath, logs)

    def _top_activating(self, embs: dict[str, Tensor], captions: list[str]) -> dict[int, list]:
        """Top captions of the text SAE's most often active latents (JSON file always)."""
        if "text" not in embs:
            return {}
        sae, x = self.saes["text"], embs["text"]
        freq = (sae.encode(x) > 0).float().mean(0)
        latents = freq.argsort(descending=True)[: self.top_latents].tolist()
        # Unique captions only: a table of the same template repeated says nothing.
        first = {c: i for i, c in reversed(list(enumerate(captions)))}
        rows = torch.tensor(sorted(first.values()), device=x.device)
        top = top_activating(
            sae, x[rows], [captions[i] for i in rows.tolist()], self.top_n, latents
        )
        path = self.dirpath / "top_activating.json"
        atomic_write_text(path, json.dumps({str(k): v for k, v in top.items()}, indent=1))
        return top


def gather_rows(trainer: L.Trainer, x: Tensor) -> Tensor:
    """The rows of ``x`` from every rank, in rank order (ranks may hold different counts);
    a collective: every rank must call it. ``gather_all_tensors`` pads and trims uneven
    first dimensions for us."""
    if trainer.world_size == 1:
        return x
    return torch.cat(gather_all_tensors(x.contiguous()))


def gather_objects(trainer: L.Trainer, items: list) -> list:
    """``items`` (picklable) of every rank concatenated in rank order; a collective."""
    if trainer.world_size == 1:
        return items
    parts: list[list] = [[] for _ in range(trainer.world_size)]
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]
