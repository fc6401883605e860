"""Evaluation: eval sets and their databases (`evalset`), execution-based SQL scoring (`scoring`),
the HTML/Markdown/PNG report (`report`), and the command-line entry points (`cli`)."""

from __future__ import annotations

from distill.evaluate.evalset import EvalRow, load_eval_set, load_predictions
from distill.evaluate.scoring import Evaluator, aggregate

__all__ = ["EvalRow", "Evaluator", "aggregate", "load_eval_set", "load_predictions"]
