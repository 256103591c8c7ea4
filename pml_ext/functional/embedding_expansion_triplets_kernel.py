"""The dense Triplet loss's triplet lists and their gathers as compiled loops (numba).

Imported only where numba imports (a dependency; without it the tensor code runs), by
:mod:`~pml_ext.losses.embedding_expansion_dense` on batches whose [B, P, B] box of (anchor,
positive slot, negative) is mostly empty (long-tailed and random labels): three index lists in
PML's order and nothing else, where tensor operations build the box and two flat index lists
besides (tested equal to PML's lists, values and gradients).
"""
from __future__ import annotations

import numba
import numpy as np

__all__ = ["all_triplets", "gather_triplets", "gather_triplets_backward"]


@numba.njit(cache=True, nogil=True)
def all_triplets(cls):
    """Every (anchor, positive, negative) of a batch with classes ``cls``, as three int64 lists in
    PML's order (``lmu.get_all_triplets_indices``: by anchor, then positive, then negative)."""
    b = cls.size
    counts = np.zeros(cls.max() + 1, np.int64)
    for i in range(b):
        counts[cls[i]] += 1
    total = 0
    for i in range(b):
        total += (counts[cls[i]] - 1) * (b - counts[cls[i]])
    a, p, n = np.empty(total, np.int64), np.empty(total, np.int64), np.empty(total, np.int64)
    t = 0
    for i in range(b):
        for j in range(b):
            if j == i or cls[j] != cls[i]:
                continue
            for k in range(b):
                if cls[k] != cls[i]:
                    a[t], p[t], n[t] = i, j, k
                    t += 1
    return a, p, n


@numba.njit(cache=True, nogil=True)
def gather_triplets(mat, a, p, n):
    """(mat[a, p], mat[a, n]) of a [B, B] matrix."""
    ap, an = np.empty(a.size, mat.dtype), np.empty(a.size, mat.dtype)
    for t in range(a.size):
        ap[t], an[t] = mat[a[t], p[t]], mat[a[t], n[t]]
    return ap, an


@numba.njit(cache=True, nogil=True)
def gather_triplets_backward(g_ap, g_an, a, p, n, b):
    """The [B, B] gradient of :func:`gather_triplets` for the gradients of its two outputs."""
    grad = np.zeros((b, b), g_ap.dtype)
    for t in range(a.size):
        grad[a[t], p[t]] += g_ap[t]
        grad[a[t], n[t]] += g_an[t]
    return grad
