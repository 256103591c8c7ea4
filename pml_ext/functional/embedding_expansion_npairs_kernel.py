"""The dense N-pair loss's gather and cross-entropy as compiled loops (numba).

Imported only when numba is installed (``pip install pml_ext[fast]``), by
:mod:`~pml_ext.losses.embedding_expansion_dense`. PML's N-pair loss is a cross-entropy over the
anchors' [n, n] similarity matrix; on EE's hardened values that matrix is one gather from the
class pairs' hardest values (its own positive pair on each anchor's diagonal). With tensor
operations the gather, the sign, the log-softmax, the negative log-likelihood, the reordering and
their backward are ~10 small operations whose fixed cost is most of their time; here they are two
calls (tested equal, values and gradients, to PML's path).
"""
from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["npair_cross_entropy", "npair_cross_entropy_backward"]


@numba.njit(cache=True, nogil=True)
def npair_cross_entropy(hardest, batch, index, order, negate):
    """``(losses, prob)``: for the [n, n] matrix ``sim[i, j] = ±src[index[i, j]]`` (``src`` the
    flattened ``hardest`` [C, C] followed by the flattened ``batch`` [B, B]; ``negate`` for a
    distance, where smaller is more similar), every row's cross-entropy with target i (its diagonal),
    ``losses[k]`` that of row ``order[k]``, and the rows' softmax ``prob`` [n, n] for the backward.
    As ``torch.nn.functional.cross_entropy``: x − max − log Σ exp(x − max)."""
    n = index.shape[0]
    c2 = hardest.size
    h, o = hardest.ravel(), batch.ravel()
    sign = -1.0 if negate else 1.0
    prob = np.empty((n, n), hardest.dtype)
    per_row = np.empty(n, hardest.dtype)
    for i in range(n):
        row = prob[i]
        for j in range(n):
            t = index[i, j]
            row[j] = sign * (h[t] if t < c2 else o[t - c2])
        top = row.max()
        diagonal = row[i] - top
        total = 0.0
        for j in range(n):
            row[j] = math.exp(row[j] - top)
            total += row[j]
        for j in range(n):
            row[j] /= total
        per_row[i] = math.log(total) - diagonal
    losses = np.empty(n, hardest.dtype)
    for k in range(n):
        losses[k] = per_row[order[k]]
    return losses, prob


@numba.njit(cache=True, nogil=True)
def npair_cross_entropy_backward(grad, prob, index, order, negate, c2, b2):
    """The gradient of :func:`npair_cross_entropy`'s ``losses`` (incoming ``grad`` [n]) with respect to
    the flattened ``hardest`` [c2] and ``batch`` [b2]: row i's softmax minus its one-hot target,
    scaled by its loss's gradient, added at the entries ``index`` read (each entry is read once: the
    anchors' classes differ)."""
    n = index.shape[0]
    sign = -1.0 if negate else 1.0
    g_hardest = np.zeros(c2, grad.dtype)
    g_batch = np.zeros(b2, grad.dtype)
    for k in range(n):
        i = order[k]
        g = grad[k] * sign
        for j in range(n):
            d = g * (prob[i, j] - (1.0 if j == i else 0.0))
            t = index[i, j]
            if t < c2:
                g_hardest[t] += d
            else:
                g_batch[t - c2] += d
    return g_hardest, g_batch
