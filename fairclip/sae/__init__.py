"""Matryoshka top-k sparse autoencoders on CLIP/SigLIP embeddings.

Its own package because three parts of fairclip use it and none owns it: the training
callback (``callbacks=sae``), SEM (which modulates its latents) and the debias comparison
(which trains or loads one). It is not a debiasing method.
"""

from fairclip.sae.io import load_sae, save_sae
from fairclip.sae.metrics import sae_metrics, top_activating
from fairclip.sae.model import MatryoshkaTopKSAE, SAEConfig, SAEOutput, default_k_levels
from fairclip.sae.train import lr_schedule, make_optimizer, sae_step, train_sae

__all__ = [
    "MatryoshkaTopKSAE",
    "SAEConfig",
    "SAEOutput",
    "default_k_levels",
    "load_sae",
    "lr_schedule",
    "make_optimizer",
    "sae_metrics",
    "sae_step",
    "save_sae",
    "top_activating",
    "train_sae",
]
