from .hardness_aware_deep_metric_learning import HardnessAwareDeepMetricLearning

__all__ = ["HardnessAwareDeepMetricLearning"]
