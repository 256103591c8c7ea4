"""The dense N-pair loss's gather and cross-entropy as compiled loops (numba).

Imported only where numba imports (a dependency; without it the tensor code runs), by
:mod:`~pml_ext.losses.embedding_expansion_dense`. PML's N-pair loss is a cross-entropy over the
anchors' [n, n] similarity matrix; on EE's hardened values that matrix is one gather from the
class pairs' hardest values (its own positive pair on each anchor's diagonal). With tensor
operations the choice of anchors, the gather, the sign, the log-softmax, the negative
log-likelihood, the ordering by label and their backward are ~20 small operations whose fixed cost
(10-40 µs each with a training step's cold caches) is most of their time; here they are two calls
(tested equal, values and gradients, to PML's path).
"""
from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["npair_cross_entropy", "npair_cross_entropy_backward"]


@numba.njit(cache=True, nogil=True)
def npair_cross_entropy(hardest, batch, slots, labels, negate):
    """``(losses, prob, anchor_classes, order, anchors)`` of PML's N-pair loss on hardened values.
    Its anchors and positives are the first two samples of every class with two (``slots`` [C, K]:
    each class's samples in batch order, padding B), in class order; anchor i's similarities are
    ``sim[i, j] = ±hardest[c_i, c_j]`` for j ≠ i and ``±batch[a_i, p_i]`` on the diagonal
    (``negate`` for a distance, where smaller is more similar). ``losses[k]``: the cross-entropy of
    row ``order[k]`` with target its diagonal, rows ordered by their anchor's label (PML's order;
    the anchors' labels differ), ``anchors[k]`` its anchor; ``prob`` [n, n] the rows' softmax for
    the backward. As ``torch.nn.functional.cross_entropy``: x − max − log Σ exp(x − max)."""
    b = batch.shape[0]
    # a [C, 1] table holds singletons only: no anchor
    anchor_classes = np.empty(slots.shape[0] if slots.shape[1] >= 2 else 0, np.int64)
    n = 0
    for x in range(anchor_classes.size):
        if slots[x, 1] < b:
            anchor_classes[n] = x
            n += 1
    anchor_classes = anchor_classes[:n]
    sign = -1.0 if negate else 1.0
    prob = np.empty((n, n), hardest.dtype)
    per_row = np.empty(n, hardest.dtype)
    for i in range(n):
        row, ci = prob[i], anchor_classes[i]
        for j in range(n):
            row[j] = sign * hardest[ci, anchor_classes[j]]
        row[i] = sign * batch[slots[ci, 0], slots[ci, 1]]
        top = row.max()
        diagonal = row[i] - top
        total = 0.0
        for j in range(n):
            row[j] = math.exp(row[j] - top)
            total += row[j]
        for j in range(n):
            row[j] /= total
        per_row[i] = math.log(total) - diagonal
    anchor_labels = np.empty(n, labels.dtype)
    for i in range(n):
        anchor_labels[i] = labels[slots[anchor_classes[i], 0]]
    order = np.argsort(anchor_labels)
    losses = np.empty(n, hardest.dtype)
    anchors = np.empty(n, np.int64)
    for k in range(n):
        losses[k] = per_row[order[k]]
        anchors[k] = slots[anchor_classes[order[k]], 0]
    return losses, prob, anchor_classes, order, anchors


@numba.njit(cache=True, nogil=True)
def npair_cross_entropy_backward(grad, prob, anchor_classes, order, slots, negate, c, b):
    """The gradient of :func:`npair_cross_entropy`'s ``losses`` (incoming ``grad`` [n]) with respect to
    ``hardest`` [C, C] and ``batch`` [B, B]: row i's softmax minus its one-hot target, scaled by its
    loss's gradient, added at the entries the row read (each entry is read once: the anchors'
    classes differ)."""
    n = anchor_classes.size
    sign = -1.0 if negate else 1.0
    g_hardest = np.zeros((c, c), grad.dtype)
    g_batch = np.zeros((b, b), grad.dtype)
    for k in range(n):
        i = order[k]
        g = grad[k] * sign
        ci = anchor_classes[i]
        for j in range(n):
            if j != i:
                g_hardest[ci, anchor_classes[j]] += g * prob[i, j]
        g_batch[slots[ci, 0], slots[ci, 1]] += g * (prob[i, i] - 1.0)
    return g_hardest, g_batch
