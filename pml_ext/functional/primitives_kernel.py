"""The normalised Gram matrix's [B, B] steps as compiled loops (numba).

Imported only when numba is installed (``pip install pml_ext[fast]``), by
:class:`~pml_ext.functional.primitives._NormalizedGram`. Around its two matrix products the fused
L2-normalise + Gram function does ~12 small tensor operations on [B, B] and [B, 1] (norms, their
clamp and inverse, the outer product of inverses, the scaling; in the backward the symmetrised
gradient, its row sums against G, the scaling and the diagonal's correction): on CPU their fixed
cost is about half of the function's time at B = 128. Here each pass is one call (tested equal, values and
gradients, to the tensor operations and to normalise-then-Gram).
"""
from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["normalize_gram_", "normalized_gram_backward"]


@numba.njit(cache=True, nogil=True)
def normalize_gram_(gram, eps):
    """Turn the Gram matrix x xᵀ [B, B] in place into ŷ ŷᵀ, ŷ = x / max(‖x‖, eps) row-wise, with
    ‖xᵢ‖ = √Gᵢᵢ; the upper triangle scaled by one symmetric factor and mirrored, so the result is
    exactly symmetric. Returns ``(inv, projected)``: 1 / max(‖xᵢ‖, eps), and whether ‖xᵢ‖ > eps
    (a clamped row is divided by a constant, so its gradient has no projection)."""
    b = gram.shape[0]
    inv = np.empty(b, gram.dtype)
    projected = np.empty(b, np.bool_)
    for i in range(b):
        norm = math.sqrt(max(gram[i, i], 0.0))
        projected[i] = norm > eps
        inv[i] = 1 / max(norm, eps)
    for i in range(b):
        row, f = gram[i], inv[i]
        for j in range(i, b):
            v = row[j] * (f * inv[j])
            row[j] = v
            gram[j, i] = v
    return inv, projected


@numba.njit(cache=True, nogil=True)
def normalized_gram_backward(g, gram, inv, projected):
    """A = N⁻¹ (g + gᵀ) N⁻¹ − diag(⟨(g + gᵀ)ᵢ, Gᵢ⟩ / nᵢ²) [B, B] for the incoming gradient ``g`` and
    the normalised Gram matrix ``gram`` (the gradient with respect to x is A x); the diagonal's
    term only for ``projected`` rows. Row sums accumulated in float64."""
    b = g.shape[0]
    s = np.empty_like(g)
    for i in range(b):
        along = 0.0
        f = inv[i]
        for j in range(b):
            v = g[i, j] + g[j, i]
            along += v * gram[i, j]
            s[i, j] = v * (f * inv[j])
        if projected[i]:
            s[i, i] -= along * (f * f)
    return s
