"""What Hardness-Aware Deep Metric Learning (Zheng, Chen, Lu, Zhou, CVPR 2019, arXiv 1903.05503)
accepts, as :class:`pml_ext.losses.HDMLLoss` checks it: the PML losses it cannot wrap (with the
reason), its numeric arguments, and each batch it is given (features, labels, embedder). Every
failure is a ValueError naming the argument.
"""
from __future__ import annotations

import math

import torch

__all__: list = []  # internal to HDMLLoss and its trainer


# wrapped losses HDML cannot use, with the reason (checked by class name, so PML versions that
# lack one of them still import)
_UNUSABLE_LOSSES = {
    "EmbeddingExpansionLoss": "it expands every batch it is given, and HDML calls its loss on the real batch plus "
    "one synthetic negative per tuple (thousands with all or mined triplets), so EE's expanded set and its "
    "class-pair search grow with the square of that (a batch of 40 asked for 33 GB); use the PML loss itself",
    "HDMLLoss": "HDML inside HDML is not defined (the inner one needs features and an embedder)",
    "CrossBatchMemory": "it would enqueue HDML's synthetic embeddings into its memory as if they were real",
    "SelfSupervisedLoss": "it takes (embeddings, ref_emb), not labels and tuples",
    "InstanceLoss": "it does not accept an indices_tuple, which HDML needs for the synthetic tuples",
    "P2SGradLoss": "it does not accept an indices_tuple, which HDML needs for the synthetic tuples",
    "PNPLoss": "it does not accept an indices_tuple, which HDML needs for the synthetic tuples",
    "RankedListLoss": "it does not accept an indices_tuple, which HDML needs for the synthetic tuples",
    "VICRegLoss": "it does not accept an indices_tuple, which HDML needs for the synthetic tuples",
}


def _check_wrapped_loss(loss) -> None:
    for cls in type(loss).__mro__:
        if cls.__name__ in _UNUSABLE_LOSSES:
            raise ValueError(f"HDMLLoss cannot wrap {type(loss).__name__}: {_UNUSABLE_LOSSES[cls.__name__]}")


def _check_nonneg(name, value, upper=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if value < 0 or (upper is not None and value > upper):
        rng = f"[0, {upper}]" if upper is not None else ">= 0"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")


def _check_pos_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_batch(features, labels, embedder, use_generator: bool, classifier, num_classes) -> None:
    """The batch HDMLLoss is given (features, labels, embedder), checked before anything runs."""
    if not torch.is_tensor(features) or not features.is_floating_point() or features.dim() == 0:
        raise ValueError("features must be a floating-point tensor")
    if not bool(torch.isfinite(features.detach()).all()):
        raise ValueError("features contain NaN or inf (the backbone diverged or the input is bad); "
                         "HDML cannot make finite synthetic tuples from them")
    if use_generator and features.dim() != 2:
        raise ValueError(f"features must be 2-D [batch, feature_size] with a generator, got shape {tuple(features.shape)}")
    if not torch.is_tensor(labels) or labels.dim() != 1:
        raise ValueError("labels must be a 1-D tensor")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels ({labels.shape[0]}) and features ({features.shape[0]}) differ in batch size")
    if features.shape[0] == 0:
        raise ValueError("empty batch: features has 0 rows; HDML synthesises its tuples from the batch's samples")
    if not callable(embedder):
        raise ValueError("embedder must be callable (the embedding head)")
    if use_generator:
        lo, hi = int(labels.min()), int(labels.max())
        n = getattr(classifier, "out_features", num_classes)
        if lo < 0 or (n is not None and hi >= n):
            raise ValueError(f"labels must lie in [0, {n}) for the softmax classifier, got range [{lo}, {hi}]")
