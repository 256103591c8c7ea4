"""A new label pattern's layout arrays (Ko & Gu, CVPR 2020, Eq. 1) as compiled loops (numba).

Imported only where numba imports (a dependency; without it the tensor code runs), by
:func:`~pml_ext.functional.embedding_expansion_layouts.batch_layout`. Random and long-tailed
batches bring a new label pattern every step; with NumPy its layout costs ~40 calls on a few
hundred integers, each with its fixed cost (~0.4 ms per step under cold caches, as much as the
compiled search). These loops build the same arrays (tested equal, field by field, to the NumPy
builder) in one call each.
"""
from __future__ import annotations

import numba
import numpy as np

__all__ = ["first_appearance", "layout_arrays"]


@numba.njit(cache=True, nogil=True)
def first_appearance(lab):
    """(class of every sample numbered by first appearance, each class's first position) of
    non-empty labels."""
    b = lab.size
    order = np.argsort(lab, kind="mergesort")  # stable: equal labels in batch order
    block_of = np.empty(b, np.int64)  # each sample's block of equal labels in the sorted order
    blocks = 0
    for t in range(b):
        if t == 0 or lab[order[t]] != lab[order[t - 1]]:
            blocks += 1
        block_of[order[t]] = blocks - 1
    rank = np.full(blocks, -1, np.int64)
    first = np.empty(blocks, np.int64)
    cls = np.empty(b, np.int64)
    c = 0
    for i in range(b):  # blocks numbered as the batch meets them
        k = block_of[i]
        if rank[k] < 0:
            rank[k], first[c] = c, i
            c += 1
        cls[i] = rank[k]
    return cls, first


@numba.njit(cache=True, nogil=True)
def layout_arrays(cls, c, n_points, all_pairs, w):
    """What :func:`~pml_ext.functional.embedding_expansion_layouts.numpy_layout` builds from
    ``cls`` (classes by first appearance, non-empty) for ``n_points`` division points of weights
    ``w`` (EE Eq. 1) between every same-class pair i < j by (i, j) (``all_pairs``) or the 1st and
    2nd sample of each class, the 3rd and 4th, ... by class: ``(first, second, w_first, w_second,
    point_class, is_synthetic, first_index, original_slots, class_sizes, negative, positive,
    pair_index, class_eye)``."""
    b = cls.size
    counts = np.zeros(c, np.int64)
    for i in range(b):
        counts[cls[i]] += 1
    original_slots = np.full((c, max(counts.max(), 1)), b, np.int64)  # each class's samples, batch order
    filled = np.zeros(c, np.int64)
    first_index = np.empty(c, np.int64)
    for i in range(b):
        k = cls[i]
        if filled[k] == 0:
            first_index[k] = i
        original_slots[k, filled[k]] = i
        filled[k] += 1
    if all_pairs:
        pairs = 0
        for k in range(c):
            pairs += counts[k] * (counts[k] - 1) // 2
        pi, pj = np.empty(pairs, np.int64), np.empty(pairs, np.int64)
        t = 0
        for i in range(b):
            for j in range(i + 1, b):
                if cls[i] == cls[j]:
                    pi[t], pj[t] = i, j
                    t += 1
    else:
        pairs = 0
        for k in range(c):
            pairs += counts[k] // 2
        pi, pj = np.empty(pairs, np.int64), np.empty(pairs, np.int64)
        t = 0
        for k in range(c):
            for s in range(0, counts[k] - 1, 2):
                pi[t], pj[t] = original_slots[k, s], original_slots[k, s + 1]
                t += 1
    m = b + pairs * n_points
    first, second = np.empty(m, np.int64), np.empty(m, np.int64)
    w_first = np.ones(m, w.dtype)
    for i in range(b):
        first[i] = second[i] = i
    for t in range(pairs):  # pair-major, point-minor
        for k in range(n_points):
            p = b + t * n_points + k
            first[p], second[p], w_first[p] = pi[t], pj[t], w[k]
    w_second = np.ones(m, w.dtype) - w_first
    point_class = np.empty(m, np.int64)
    class_sizes = np.zeros(c, np.int64)
    is_synthetic = np.empty(m, np.bool_)
    for p in range(m):
        point_class[p] = cls[first[p]]
        class_sizes[point_class[p]] += 1
        is_synthetic[p] = p >= b
    negative = np.empty((b, b), np.bool_)
    positive = np.empty((b, b), np.bool_)
    pair_index = np.empty((b, b), np.int64)
    for i in range(b):
        for j in range(b):
            negative[i, j] = cls[i] != cls[j]
            positive[i, j] = cls[i] == cls[j] and i != j
            pair_index[i, j] = cls[i] * c + cls[j]
    class_eye = np.zeros((c, c), np.bool_)
    for k in range(c):
        class_eye[k, k] = True
    return (first, second, w_first, w_second, point_class, is_synthetic, first_index, original_slots, class_sizes,
            negative, positive, pair_index, class_eye)

