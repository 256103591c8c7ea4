"""pml_ext: Embedding Expansion (Ko & Gu, CVPR 2020) and Hardness-Aware DML
(Zheng et al., CVPR 2019) as components for pytorch-metric-learning."""

__version__ = "0.1.0"

from . import functional, losses, miners, trainers  # noqa: E402,F401

__all__ = ["functional", "losses", "miners", "trainers", "__version__"]
