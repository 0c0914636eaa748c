"""Bias evaluation of any CLIP-like model: the spec of what is measured, encoding, the run."""

from fairclip.eval.run import evaluate_model
from fairclip.eval.spec import EvalSpec, QuerySet, resolve_splits, spec_from_cfg

__all__ = ["EvalSpec", "QuerySet", "evaluate_model", "resolve_splits", "spec_from_cfg"]
