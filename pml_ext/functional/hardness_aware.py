"""Hardness-Aware Deep Metric Learning (Zheng, Chen, Lu, Zhou, CVPR 2019, arXiv 1903.05503):
pure tensor math.

The augmentor of HDML (the paper's "hardness-aware augmentation"; official code ``lib/HDML.py``,
``Pulling``) moves
every negative of a tuple toward its anchor along the anchor-negative segment, by an amount
that grows as training progresses (as the running average metric loss ``J_avg`` falls):

    d+ = ||z - z+||,  d- = ||z - z-||        (Euclidean, on the *unnormalised* embeddings)

    z^- = z + (z- - z) * [d+ + (d- - d+) * exp(-alpha / J_avg)] / d-     if d+ < d-
    z^- = z-                                                            otherwise

``exp(-alpha / J_avg)`` is ~1 early in training (``J_avg`` large: nothing is pulled) and falls to
0 as the loss falls (the negative is pulled until it sits at distance ``d+`` from the anchor,
never closer). No stop-gradient is applied: gradients flow to the anchor, the positive (through
``d+``) and the negative.

The generator's objective (``J_gen = J_recon + J_soft``) and the adaptive combination of the real
and synthetic metric losses (``J_metric``) are provided as small helpers; the stateful module that owns the
generator and classifier is :class:`pml_ext.losses.hdml_loss.HDMLLoss`.

Everything is vectorised; nothing here owns parameters or state.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Tuple, Union

import torch

__all__ = [
    "hardness_decay",
    "hardness_aware_coefficients",
    "hardness_aware_negatives",
    "hardness_aware_npair_negatives",
    "adaptive_metric_weight",
    "hdml_metric_objective",
    "hdml_reconstruction_loss",
    "hdml_soft_loss",
]

Scalar = Union[float, int, torch.Tensor]


def _check_alpha_javg(alpha: Scalar, j_avg: Scalar) -> None:
    for name, value, allow_zero in (("alpha", alpha, True), ("j_avg", j_avg, False)):
        if torch.is_tensor(value):
            if value.numel() != 1:
                raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
            v = float(value.detach())
        elif isinstance(value, Real):
            v = float(value)
        else:
            raise ValueError(f"{name} must be a real number or a scalar tensor, got {type(value).__name__}")
        if math.isnan(v):
            raise ValueError(f"{name} must not be NaN")
        if v < 0 or (v == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{name} must be {bound}, got {v}")


def _safe_norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean norm whose gradient at 0 is 0 (not NaN)."""
    sq = (x * x).sum(dim=dim)
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def hardness_decay(alpha: Scalar, j_avg: Scalar) -> torch.Tensor:
    """``exp(-alpha / J_avg)``, the adaptive factor of the HDML augmentor.

    1 means "no pull" (J_avg large, early training), 0 means "pull all the way to d+".
    ``j_avg = inf`` is allowed (gives 1). Returns a 0-d tensor (float64 unless a tensor is given).
    """
    _check_alpha_javg(alpha, j_avg)
    ref = j_avg if torch.is_tensor(j_avg) else (alpha if torch.is_tensor(alpha) else None)
    if ref is None:
        return torch.tensor(math.exp(-float(alpha) / float(j_avg)), dtype=torch.float64)
    alpha_t = torch.as_tensor(alpha, dtype=ref.dtype, device=ref.device)
    javg_t = torch.as_tensor(j_avg, dtype=ref.dtype, device=ref.device)
    return torch.exp(-alpha_t / javg_t).reshape(())


def hardness_aware_coefficients(
    d_pos: torch.Tensor, d_neg: torch.Tensor, alpha: Scalar, j_avg: Scalar
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Interpolation coefficient ``lambda_0`` of the HDML augmentor and the pull mask.

    Returns ``(coef, mask)`` where ``mask = d_pos < d_neg`` and
    ``coef = [d+ + (d- - d+) exp(-alpha/J_avg)] / d-`` where ``mask`` else 1, so that
    ``z^- = z + coef * (z- - z)``. ``coef`` lies in ``[d+/d-, 1]``; where the mask is False
    (including ``d- = 0``) it is exactly 1 and has zero gradient (no NaN).
    """
    if d_pos.shape != d_neg.shape:
        raise ValueError(f"d_pos and d_neg must have the same shape, got {tuple(d_pos.shape)} and {tuple(d_neg.shape)}")
    decay = hardness_decay(alpha, j_avg).to(dtype=d_neg.dtype, device=d_neg.device)
    mask = d_pos < d_neg  # implies d_neg > 0
    safe_dneg = torch.where(mask, d_neg, torch.ones_like(d_neg))
    coef = (d_pos + (d_neg - d_pos) * decay) / safe_dneg
    coef = torch.where(mask, coef, torch.ones_like(coef))
    return coef, mask


def _check_embeddings(**tensors: torch.Tensor) -> None:
    shapes = {}
    for name, t in tensors.items():
        if not torch.is_tensor(t):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [num_tuples, embedding_size], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        shapes[name] = tuple(t.shape)
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must match, got {shapes}")


def hardness_aware_negatives(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    alpha: Scalar,
    j_avg: Scalar,
    return_coefficients: bool = False,
):
    """Hardness-aware synthetic negatives for triplets (HDML, Zheng et al. CVPR 2019, augmentor).

    Args:
        anchors, positives, negatives: ``[T, d]`` embeddings of ``T`` triplets (row ``t`` of each
            forms one triplet). Distances are Euclidean on these tensors as given (the official
            code uses the unnormalised embeddings).
        alpha: the pulling factor ``alpha >= 0`` (official default 90).
        j_avg: the running average metric loss ``J_avg > 0`` (``inf`` allowed).
        return_coefficients: also return the per-triplet interpolation coefficient and pull mask.

    Returns:
        ``z^-`` of shape ``[T, d]``: where ``d+ < d-`` the negative moved toward the anchor to
        distance ``d+ + (d- - d+) exp(-alpha/J_avg)``; elsewhere the negative itself.
        With ``return_coefficients``: ``(z^-, coef, mask)`` (see :func:`hardness_aware_coefficients`).

    Differentiable everywhere (no NaN when ``d- = 0`` or ``d+ = 0``).
    """
    _check_embeddings(anchors=anchors, positives=positives, negatives=negatives)
    d_pos = _safe_norm(anchors - positives)
    d_neg = _safe_norm(anchors - negatives)
    coef, mask = hardness_aware_coefficients(d_pos, d_neg, alpha, j_avg)
    pulled = anchors + (negatives - anchors) * coef.unsqueeze(-1)
    out = torch.where(mask.unsqueeze(-1), pulled, negatives)
    if return_coefficients:
        return out, coef, mask
    return out


def _own_columns(n: int, rows: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """Where each N-pair candidate row holds its anchor's own positive: the ``[N, N]`` diagonal, or
    with ``rows`` (some anchors' rows only) ``[R, N]`` with row ``r``'s at column ``rows[r]``."""
    if rows is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    return rows.to(device).unsqueeze(1) == torch.arange(n, device=device)


def hardness_aware_npair_negatives(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    alpha: Scalar,
    j_avg: Scalar,
    return_coefficients: bool = False,
    *,
    targets: Optional[torch.Tensor] = None,
):
    """Hardness-aware negatives in the N-pair layout (HDML augmentor; official ``Pulling``, N-pair branch).

    Anchor ``i`` (``anchors[i]``) has positive ``positives[i]``; every other positive
    ``positives[j]`` (j != i) is one of its negatives and is pulled toward ``anchors[i]`` with
    ``d+ = ||anchors[i] - positives[i]||`` and ``d- = ||anchors[i] - positives[j]||``.

    ``targets`` (optional, ``[R]`` integer, keyword only) gives some anchors' rows only: then
    ``anchors`` is ``[R, d]`` and anchor ``i``'s own positive is ``positives[targets[i]]`` (its
    column in the ``N`` candidates; the rows ``targets`` of the full layout, for
    ``anchors = all_anchors[targets]``).

    Returns:
        ``out`` of shape ``[N, N, d]`` (``[R, N, d]`` with ``targets``) with ``out[i, j]`` = the
        (possibly pulled) negative ``positives[j]`` seen from anchor ``i``, and
        ``out[i, i] = positives[i]`` (``out[i, targets[i]]``: the anchor's own positive, never
        modified). Row ``i`` is therefore the candidate set of anchor ``i`` for an N-pair loss
        whose target is column ``i`` (``targets[i]``).
        With ``return_coefficients``: ``(out, coef, mask)``, each ``[N, N]`` (``[R, N]``); the own
        positive has ``coef = 1`` and ``mask = False``.
    """
    if targets is None:
        _check_embeddings(anchors=anchors, positives=positives)
        own_positives = positives
    else:
        _check_embeddings(positives=positives)
        if not torch.is_tensor(targets) or targets.dim() != 1 or targets.is_floating_point() or targets.is_complex():
            raise ValueError("targets must be a 1-D integer tensor (each anchor's column in positives)")
        own_positives = positives.index_select(0, targets.to(device=positives.device, dtype=torch.long))
        _check_embeddings(anchors=anchors, own_positives=own_positives)
    r, n, d = anchors.shape[0], positives.shape[0], positives.shape[1]
    own = _own_columns(n, targets, anchors.device)
    d_pos = _safe_norm(anchors - own_positives)  # [R]
    diff = positives.unsqueeze(0) - anchors.unsqueeze(1)  # [R, N, d]: positives[j] - anchors[i]
    d_neg = _safe_norm(diff)  # [R, N]
    coef, mask = hardness_aware_coefficients(d_pos.unsqueeze(1).expand(r, n), d_neg, alpha, j_avg)
    mask = mask & ~own
    coef = torch.where(own, torch.ones_like(coef), coef)
    negs = positives.unsqueeze(0).expand(r, n, d)
    pulled = anchors.unsqueeze(1) + diff * coef.unsqueeze(-1)
    out = torch.where(mask.unsqueeze(-1), pulled, negs)
    if return_coefficients:
        return out, coef, mask
    return out


def adaptive_metric_weight(j_gen: Scalar, beta: Scalar) -> torch.Tensor:
    """``exp(-beta / J_gen)``, the weight of the real-sample metric loss in HDML's ``J_metric``.

    ``beta = 0`` gives 1 (plain metric loss only); ``beta -> inf`` gives 0 (synthetic loss only);
    early in training ``J_gen`` is large and the weight is close to 1. Returns a 0-d tensor.
    """
    _check_alpha_javg(beta, j_gen)  # same constraints: beta >= 0, J_gen > 0
    return hardness_decay(beta, j_gen)


def hdml_metric_objective(j_m: torch.Tensor, j_syn: torch.Tensor, j_gen: Scalar, beta: Scalar) -> torch.Tensor:
    """``J_metric = exp(-beta/J_gen) J_m + (1 - exp(-beta/J_gen)) J_syn`` (HDML, Zheng et al. CVPR 2019)."""
    w = adaptive_metric_weight(j_gen, beta).to(dtype=j_m.dtype, device=j_m.device)
    return w * j_m + (1 - w) * j_syn


def hdml_reconstruction_loss(reconstructed: torch.Tensor, features: torch.Tensor, lambda_: float) -> torch.Tensor:
    """``J_recon = (1 - lambda) * sum ||y' - y||^2`` (HDML's reconstruction term; a sum over the batch
    and dimensions, as in the official code)."""
    if reconstructed.shape != features.shape:
        raise ValueError(
            f"reconstructed and features must have the same shape, got {tuple(reconstructed.shape)} and {tuple(features.shape)}"
        )
    diff = reconstructed - features
    if diff.dtype in (torch.float16, torch.bfloat16):  # a sum of squares overflows half precision
        diff = diff.float()
    return (1.0 - lambda_) * (diff * diff).sum()


def hdml_soft_loss(logits: torch.Tensor, labels: torch.Tensor, lambda_: float, softmax_factor: float) -> torch.Tensor:
    """``J_soft = softmax_factor * lambda * CE(logits, labels)`` (HDML's softmax term; mean CE over the
    synthetic samples, which keep the labels of the tuple members they were made from)."""
    if logits.dtype in (torch.float16, torch.bfloat16):  # softmax_factor ~1e4 nears the half range
        logits = logits.float()
    return softmax_factor * lambda_ * torch.nn.functional.cross_entropy(logits, labels)
