"""Evaluation: datasets (generic JSONL, VQA-RAD, SLAKE), scoring, metrics, the harness and the
HTML report. Entry point: ``medloupe eval DATASET --out DIR``."""

from __future__ import annotations

from medloupe.evaluation.data import EvalItem, filter_items, load_dataset
from medloupe.evaluation.harness import ABLATION_GRID, Ablation, Evaluation, run_ablations
from medloupe.evaluation.metrics import compute_metrics
from medloupe.evaluation.scoring import ItemScore, score

__all__ = [
    "ABLATION_GRID",
    "Ablation",
    "EvalItem",
    "Evaluation",
    "ItemScore",
    "compute_metrics",
    "filter_items",
    "load_dataset",
    "run_ablations",
    "score",
]
