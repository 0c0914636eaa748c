"""Debiasing on top of a (frozen or fine-tuned) CLIP: SEM, Orth-Proj, joint V-L heads and
attention-head ablation, each a component of a :class:`DebiasedCLIP`."""

from fairclip.debias.debiased_clip import DebiasedCLIP, Intervention, VisionPatch

__all__ = ["DebiasedCLIP", "Intervention", "VisionPatch"]
