"""DebiasedCLIP: an open_clip model plus embedding interventions, saved beside its export.

Every debiasing method is an :class:`Intervention` (an ``nn.Module`` mapping embeddings to
debiased embeddings, e.g. SEM, orthogonal projection, joint V-L heads) on the text and/or
image side, or a :class:`VisionPatch` (a context manager that changes the vision tower while
it runs, e.g. mean-ablation of attention heads). ``DebiasedCLIP`` exposes open_clip's
``encode_image``/``encode_text`` so evaluation, retrieval and zero-shot code never need to
know which interventions are active.

On disk (``save(dir)``): the base model as a plain open_clip export
(``open_clip_config.json`` + ``open_clip_model.safetensors``) and ``debias.json`` +
``debias.safetensors`` listing the interventions (kind, side, constructor config) and their
tensors. ``load(dir)`` rebuilds it; ``fairclip-eval model.name=<dir>`` evaluates it.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fairclip.debias.registry import component_class
from fairclip.files import atomic_path, atomic_write_text
from fairclip.model.factory import EXPORT_CONFIG, export_open_clip, load_export

DEBIAS_CONFIG = "debias.json"
DEBIAS_WEIGHTS = "debias.safetensors"


class Intervention(nn.Module):
    """Maps un-normalised embeddings ``[N, D]`` to debiased embeddings ``[N, D]``.

    Subclasses store every constructor argument needed to rebuild them in ``self.config``
    (JSON-able) and every learned tensor as parameters/buffers (saved with safetensors).
    """

    kind: ClassVar[str] = "intervention"

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self.config = config

    def forward(self, emb: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class VisionPatch:
    """Changes the vision tower while active (``with patch.patch(visual): ...``)."""

    kind: ClassVar[str] = "vision_patch"

    def patch(self, visual: nn.Module):  # pragma: no cover - abstract
        raise NotImplementedError

    def state(self) -> tuple[dict, dict[str, Tensor]]:  # pragma: no cover - abstract
        """(JSON-able config, tensors) to save."""
        raise NotImplementedError


class DebiasedCLIP(nn.Module):
    """An open_clip model with text/image interventions and vision patches applied in order."""

    def __init__(
        self,
        model: nn.Module,
        model_name: str,
        text: list[Intervention] | None = None,
        image: list[Intervention] | None = None,
        vision_patches: list[VisionPatch] | None = None,
    ) -> None:
        super().__init__()
        self.model, self.model_name = model, model_name
        self.text = nn.ModuleList(text or [])
        self.image = nn.ModuleList(image or [])
        self.vision_patches = list(vision_patches or [])

    # open_clip's interface -----------------------------------------------------------------
    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> Tensor | None:
        return getattr(self.model, "logit_bias", None)

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        emb = self.model.encode_text(text)
        for step in self.text:
            emb = step(emb)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        with ExitStack() as stack:
            for patch in self.vision_patches:
                stack.enter_context(patch.patch(self.model.visual))
            emb = self.model.encode_image(image)
        for step in self.image:
            emb = step(emb)
        return F.normalize(emb, dim=-1) if normalize else emb

    def forward(self, image: Tensor | None = None, text: Tensor | None = None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {"logit_scale": self.logit_scale.exp()}
        if image is not None:
            out["image_features"] = self.encode_image(image, normalize=True)
        if text is not None:
            out["text_features"] = self.encode_text(text, normalize=True)
        return out

    # persistence ---------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        """Write the base model export plus ``debias.json``/``debias.safetensors`` atomically."""
        out = Path(out_dir)
        export_open_clip(self.model, self.model_name, out)
        entries, tensors = [], {}
        for side, steps in (("text", self.text), ("image", self.image)):
            for i, step in enumerate(steps):
                entries.append({"side": side, "kind": step.kind, "config": step.config})
                tensors.update(
                    {
                        f"{side}.{i}.{k}": v.detach().contiguous().cpu()
                        for k, v in step.state_dict().items()
                    }
                )
        for i, patch in enumerate(self.vision_patches):
            config, state = patch.state()
            entries.append({"side": "vision_patch", "kind": patch.kind, "config": config})
            tensors.update(
                {f"vision_patch.{i}.{k}": v.contiguous().cpu() for k, v in state.items()}
            )
        with atomic_path(out / DEBIAS_WEIGHTS) as tmp:
            save_file(tensors, str(tmp))
        # the config last: it is what marks the folder as a DebiasedCLIP
        atomic_write_text(
            out / DEBIAS_CONFIG,
            json.dumps({"model_name": self.model_name, "interventions": entries}, indent=2),
        )
        return out

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> DebiasedCLIP:
        path = Path(path)
        if not (path / EXPORT_CONFIG).is_file():
            raise FileNotFoundError(f"{path}: expected a DebiasedCLIP folder with {EXPORT_CONFIG}")
        bundle = load_export(path, "fp32", device)
        spec = (
            json.loads((path / DEBIAS_CONFIG).read_text())
            if (path / DEBIAS_CONFIG).is_file()
            else {}
        )
        tensors = (
            load_file(str(path / DEBIAS_WEIGHTS), device=str(device))
            if (path / DEBIAS_WEIGHTS).is_file()
            else {}
        )
        text, image, patches = [], [], []
        counters = {"text": 0, "image": 0, "vision_patch": 0}
        for entry in spec.get("interventions", []):
            side, kind = entry["side"], entry["kind"]
            index = counters[side]
            counters[side] += 1
            prefix = f"{side}.{index}."
            state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            component = component_class(kind, str(path / DEBIAS_CONFIG))
            if side == "vision_patch":
                patches.append(component.from_state(entry["config"], state))
                continue
            step = component(**entry["config"])
            step.load_state_dict(state)
            (text if side == "text" else image).append(step.to(device))
        return cls(bundle.model, bundle.name, text, image, patches)


def build_unchanged(bundle: Any, ctx: Any) -> DebiasedCLIP:
    """Comparison builder: the model as trained, no component (the table's ``clip`` row)."""
    return DebiasedCLIP(bundle.model, bundle.name)
