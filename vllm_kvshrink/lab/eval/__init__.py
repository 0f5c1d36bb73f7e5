"""Evaluation harness: methods x budgets x tasks on a real model and real text.

``python -m vllm_kvshrink.lab.eval --preset smoke|quick|full --out DIR`` or
:class:`ResearchEvaluator` from Python; statistics in
:mod:`vllm_kvshrink.lab.eval.stats`.
"""

from vllm_kvshrink.lab.eval.evaluator import EvalError, ResearchEvaluator
from vllm_kvshrink.lab.eval.presets import BASELINES, PRESETS

__all__ = ["BASELINES", "EvalError", "PRESETS", "ResearchEvaluator"]
