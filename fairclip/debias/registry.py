"""The kinds of saved debiasing components, by the name ``debias.json`` records.

A lazy table (kind -> ``module:Class``) rather than classes registering themselves on import:
loading a saved :class:`~fairclip.debias.debiased_clip.DebiasedCLIP` then imports only the
modules its components live in, and nothing depends on which modules happen to be imported.
Each class's ``kind`` attribute is its key here (checked by the tests).

The debiasing *methods* (how a component is fitted for the comparison table) are the config
group ``conf/methods/``: one YAML per method, its ``_target_`` the builder.
"""

from __future__ import annotations

import importlib
from typing import Any

COMPONENTS: dict[str, str] = {
    "sem": "fairclip.debias.sem:SEM",
    "orth_proj": "fairclip.debias.orth:OrthProj",
    "orth_cali": "fairclip.debias.orth:OrthCali",
    "joint_text": "fairclip.debias.joint_heads:JointTextHead",
    "joint_image": "fairclip.debias.joint_heads:JointImageHead",
    "head_mean_ablation": "fairclip.debias.head_ablation:HeadMeanAblation",
}


def component_class(kind: str, where: str = "debias.json") -> type[Any]:
    """The class saved under ``kind``; an unknown kind names ``where`` and the known kinds."""
    if kind not in COMPONENTS:
        raise ValueError(f"{where}: unknown component kind {kind!r}; known: {sorted(COMPONENTS)}")
    module, name = COMPONENTS[kind].split(":")
    return getattr(importlib.import_module(module), name)
