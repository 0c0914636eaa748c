"""The joint vision-language debiasing heads (Zhang, Guo, Kankanhalli, CVPR 2025).

Why two small MLPs on a frozen CLIP: debiasing should not cost a full fine-tune, and the text
and image sides must remove the *same* bias. Text: ``t̃ = f_t + MLP2(f_t)``; image:
``ṽ = f_v + MLP2(MLP1(f_v) + f_v)`` with MLP2 shared (MLP1 maps image features toward the
text side first). Both are :class:`~fairclip.debias.debiased_clip.Intervention`\\ s
(``joint_text``, ``joint_image``) so a :class:`DebiasedCLIP` carries them; on disk each holds
its own copy of MLP2.

Forms (``form``):

* ``paper`` (default, the authors' code): each MLP is Linear → ReLU → Linear → ReLU with
  PyTorch's default initialisation, hidden 512 (MLP1) and 1024 (MLP2), on the *raw*
  (un-normalised) CLIP features. The heads are not the identity at initialisation, which is
  what gives the losses a gradient on a batch whose captions all name a group.
* ``zero_init`` (this project's extension): Linear → GELU → Linear with the last layer at
  zero, on unit-normalised features: an untrained head is exactly the identity, so a run that
  never steps the heads changes nothing.
"""

from __future__ import annotations

import copy

import torch.nn.functional as F
from torch import Tensor, nn

from fairclip.debias.debiased_clip import Intervention

VARIANTS = ("joint", "image", "text")
HEAD_FORMS = ("paper", "zero_init")


def _check_form(form: str) -> str:
    if form not in HEAD_FORMS:
        raise ValueError(f"joint heads form={form!r}: expected one of {HEAD_FORMS}")
    return form


def _mlp(dim: int, hidden: int, form: str) -> nn.Sequential:
    if form == "paper":
        return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim), nn.ReLU())
    mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


def _input(emb: Tensor, form: str) -> Tensor:
    return emb if form == "paper" else F.normalize(emb, dim=-1)


class JointTextHead(Intervention):
    """``t̃ = f_t + MLP2(f_t)``."""

    kind = "joint_text"

    def __init__(self, dim: int, hidden: int = 1024, form: str = "paper") -> None:
        super().__init__(dim=int(dim), hidden=int(hidden), form=_check_form(form))
        self.form = form
        self.mlp2 = _mlp(dim, hidden, form)

    def forward(self, emb: Tensor) -> Tensor:
        f = _input(emb, self.form)
        return f + self.mlp2(f)


class JointImageHead(Intervention):
    """``ṽ = f_v + MLP2(MLP1(f_v) + f_v)``."""

    kind = "joint_image"

    def __init__(
        self, dim: int, hidden: int = 1024, hidden_image: int = 512, form: str = "paper"
    ) -> None:
        super().__init__(
            dim=int(dim), hidden=int(hidden), hidden_image=int(hidden_image),
            form=_check_form(form),
        )  # fmt: skip
        self.form = form
        self.mlp1 = _mlp(dim, hidden_image, form)
        self.mlp2 = _mlp(dim, hidden, form)

    def forward(self, emb: Tensor) -> Tensor:
        f = _input(emb, self.form)
        return f + self.mlp2(self.mlp1(f) + f)


class JointHeads(nn.Module):
    """The trainable pair (or one side for the ablations), MLP2 shared in the joint variant.

    ``hidden`` is MLP2's width (text and image), ``hidden_image`` MLP1's.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 1024,
        variant: str = "joint",
        hidden_image: int = 512,
        form: str = "paper",
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r}: expected one of {VARIANTS}")
        self.variant, self.form = variant, _check_form(form)
        self.text = JointTextHead(dim, hidden, form) if variant in ("joint", "text") else None
        self.image = (
            JointImageHead(dim, hidden, hidden_image, form)
            if variant in ("joint", "image")
            else None
        )
        if self.text is not None and self.image is not None:
            self.image.mlp2 = self.text.mlp2  # shared MLP2 (Zhang et al.)

    def encode_image(self, fv: Tensor) -> Tensor:
        """Unit debiased image features from original (raw) ones."""
        return F.normalize(self.image(fv) if self.image is not None else fv, dim=-1)

    def encode_text(self, ft: Tensor) -> Tensor:
        """Unit debiased text features from original (raw) ones."""
        return F.normalize(self.text(ft) if self.text is not None else ft, dim=-1)

    def interventions(self) -> tuple[list[Intervention], list[Intervention]]:
        """(text, image) intervention lists for a DebiasedCLIP (independent copies)."""
        text = [copy.deepcopy(self.text).eval()] if self.text is not None else []
        image = [copy.deepcopy(self.image).eval()] if self.image is not None else []
        return text, image
