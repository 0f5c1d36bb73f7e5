"""Evaluation harness: methods x budgets x tasks on a real model and real text.

``python -m vllm_kvshrink.eval --preset smoke|quick|full --out DIR`` or
:class:`ResearchEvaluator` from Python; statistics in
:mod:`vllm_kvshrink.eval.stats`.
"""

from vllm_kvshrink.eval.evaluator import EvalError, ResearchEvaluator
from vllm_kvshrink.eval.presets import BASELINES, PRESETS

__all__ = ["BASELINES", "EvalError", "PRESETS", "ResearchEvaluator"]
