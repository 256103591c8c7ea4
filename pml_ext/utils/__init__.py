"""Evaluation utilities: PML AccuracyCalculator with Recall@K and clustering F1."""

from .accuracy_calculator import AccuracyCalculator, pair_counting_f1

__all__ = ["AccuracyCalculator", "pair_counting_f1"]
