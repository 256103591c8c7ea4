"""Evaluation (PML AccuracyCalculator with Recall@K and clustering F1) and multi-process helpers."""

from .accuracy_calculator import AccuracyCalculator, pair_counting_f1
from .distributed import DistributedHDMLWrapper, gather_features, in_rank_order

__all__ = ["AccuracyCalculator", "pair_counting_f1", "DistributedHDMLWrapper", "gather_features", "in_rank_order"]
