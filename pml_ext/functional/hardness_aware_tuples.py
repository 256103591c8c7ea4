"""Hardness-Aware Deep Metric Learning (Zheng, Chen, Lu, Zhou, CVPR 2019, arXiv 1903.05503): the
synthetic tuples of a batch, pure tensor math.

A batch's tuples are index tensors into its embeddings (``a_idx``, ``p_idx``, ``n_idx`` for
triplets; ``a_idx``, ``p_idx`` for N-pair, one positive pair per class). This module gathers their
rows, pulls their negatives toward the anchors (:mod:`pml_ext.functional.hardness_aware`) and lays
the synthetic tuples out for the wrapped metric loss:

- triplets: the ``B`` originals (or their regenerated copies) first, then one synthetic negative
  per triplet, so triplet ``t`` is ``(a_idx[t], p_idx[t], B + t)``;
- N-pair: anchor ``i``'s candidates are row ``i`` of a ``[N, N, d]`` tensor, its own positive at
  column ``i`` (the target); when only some anchors' rows are synthesised (``rows``, the N-pair
  cap), ``[R, N, d]`` with anchor ``a_idx[rows[r]]``'s own positive at column ``rows[r]``.

It also holds the per-tuple values the loss computes on them (row-wise pair values, each anchor's
similarities to its own candidate row). Nothing here owns parameters or state; the module that
calls the metric loss, the generator and the embedder is :class:`pml_ext.losses.HDMLLoss`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .hardness_aware import Scalar, _own_columns, hardness_aware_negatives, hardness_aware_npair_negatives

__all__ = [
    "gather_rows",
    "cap_tuples",
    "cap_npair_rows",
    "batch_triplet_negatives",
    "batch_npair_negatives",
    "synthetic_triplets",
    "npair_candidates_with_positives",
    "row_pair_values",
    "own_row_similarities",
]


def gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[idx] for thousands of mined tuples: index_select's backward is a vectorised index_add,
    the [] gather's a serial accumulating index_put (several ms per HDML step on CPU)."""
    return t.index_select(0, idx)


def cap_tuples(indices: Tuple[torch.Tensor, ...], max_tuples: Optional[int]) -> Tuple[torch.Tensor, ...]:
    """A random subset of ``max_tuples`` tuples (one ``torch.randperm`` on the indices' device) when
    there are more; else the tuples as given. ``None`` = no cap."""
    first = indices[0]
    if max_tuples is not None and len(first) > max_tuples:
        keep = torch.randperm(len(first), device=first.device)[:max_tuples]
        return tuple(t[keep] for t in indices)
    return tuple(indices)


def cap_npair_rows(num_anchors: int, max_negatives: Optional[int], device=None) -> Optional[torch.Tensor]:
    """The N-pair anchors whose candidate rows are synthesised under a cap on synthetic negatives.

    ``None`` (every row) when ``N·(N-1) <= max_negatives`` or ``max_negatives`` is None; no random
    number is drawn then. Else ``R = max(1, max_negatives // (N-1))`` anchor positions chosen
    uniformly at random (one ``torch.randperm`` on ``device``, as :func:`cap_tuples`): ``R·(N-1)``
    synthetic negatives, at most ``max_negatives`` unless it is below ``N-1`` (one row then)."""
    n = num_anchors
    if max_negatives is None or n * (n - 1) <= max_negatives:
        return None
    return torch.randperm(n, device=device)[: max(1, max_negatives // (n - 1))]


def batch_triplet_negatives(
    emb: torch.Tensor, a_idx: torch.Tensor, p_idx: torch.Tensor, n_idx: torch.Tensor, alpha: Scalar, j_avg: Scalar
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z^- [T, d], coef [T], mask [T])``: every triplet's negative pulled toward its anchor
    (:func:`~pml_ext.functional.hardness_aware.hardness_aware_negatives` on the gathered rows)."""
    anchors, positives, negatives = gather_rows(emb, a_idx), gather_rows(emb, p_idx), gather_rows(emb, n_idx)
    return hardness_aware_negatives(anchors, positives, negatives, alpha, j_avg, return_coefficients=True)


def batch_npair_negatives(
    emb: torch.Tensor,
    a_idx: torch.Tensor,
    p_idx: torch.Tensor,
    alpha: Scalar,
    j_avg: Scalar,
    rows: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cands [N, N, d], coef, mask)``: the N-pair candidate rows with pulled negatives
    (:func:`~pml_ext.functional.hardness_aware.hardness_aware_npair_negatives`); ``coef`` and
    ``mask`` cover the ``N·(N-1)`` real negatives only (the diagonal, each anchor's own positive,
    is left out of the statistics). ``rows`` (positions in ``a_idx``, e.g. from
    :func:`cap_npair_rows`): only those anchors' rows, ``[R, N, d]``, and ``R·(N-1)`` statistics."""
    anchors = gather_rows(emb, a_idx if rows is None else a_idx.index_select(0, rows))
    z_neg, coef, mask = hardness_aware_npair_negatives(
        anchors, gather_rows(emb, p_idx), alpha, j_avg, return_coefficients=True, targets=rows
    )  # [R, N, D] (R = N without rows)
    off = ~_own_columns(len(p_idx), rows, coef.device)
    return z_neg, coef[off], mask[off]


def synthetic_triplets(
    base: torch.Tensor,
    negatives: torch.Tensor,
    labels: torch.Tensor,
    a_idx: torch.Tensor,
    p_idx: torch.Tensor,
    n_idx: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The synthetic triplets as one batch: ``(embeddings, labels, (a_idx, p_idx, n_idx'))``.

    ``base`` are the ``B`` rows the anchors and positives index (the real embeddings or their
    regenerated copies), ``negatives`` the ``T`` synthetic negatives, appended after them with
    their negatives' labels; triplet ``t`` is ``(a_idx[t], p_idx[t], B + t)``."""
    syn_emb = torch.cat([base, negatives], 0)
    syn_labels = torch.cat([labels, labels[n_idx]], 0)
    syn_tuple = (a_idx, p_idx, base.shape[0] + torch.arange(len(a_idx), device=base.device))
    return syn_emb, syn_labels, syn_tuple


def npair_candidates_with_positives(
    cands: torch.Tensor, positives: torch.Tensor, rows: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The candidate rows ``cands [N, N, d]`` with the real positives ``[N, d]`` on the diagonal
    (anchor ``i``'s target at column ``i``); with ``rows``, ``cands`` is ``[R, N, d]`` and row ``r``
    gets its positive at column ``rows[r]``."""
    own = _own_columns(cands.shape[1], rows, positives.device)
    return torch.where(own.unsqueeze(-1), positives.unsqueeze(0).expand_as(cands), cands)


def row_pair_values(q: torch.Tensor, i: torch.Tensor, j: torch.Tensor, kind: str, power) -> torch.Tensor:
    """Per tuple, the value between rows ``q[i]`` and ``q[j]``: their inner product
    (``kind="inner"``) or Euclidean distance (else), raised to ``power``."""
    u, v = gather_rows(q, i), gather_rows(q, j)
    val = (u * v).sum(1) if kind == "inner" else torch.linalg.vector_norm(u - v, dim=1)
    return val**power if power != 1 else val


def own_row_similarities(mat: torch.Tensor, n: int) -> torch.Tensor:
    """From ``mat [R, R*N]`` (anchor ``i`` against every candidate of every row; ``R = N`` unless
    only some rows were synthesised), anchor ``i`` against its own candidate row:
    ``out[i, j] = mat[i, i*N + j]``, ``[R, N]``."""
    rows = torch.arange(mat.shape[0], device=mat.device)
    cols = rows.unsqueeze(1) * n + torch.arange(n, device=mat.device).unsqueeze(0)
    return mat[rows.unsqueeze(1), cols]
