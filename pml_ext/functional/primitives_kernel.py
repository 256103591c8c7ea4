"""The normalised Gram matrix's [B, B] steps as compiled loops (numba).

Imported only where numba imports (a dependency; without it the tensor code runs), by
:class:`~pml_ext.functional.primitives._NormalizedGram`. Around its two matrix products the fused
L2-normalise + Gram function does ~12 small tensor operations on [B, B] and [B, 1] (norms, their
clamp and inverse, the outer product of inverses, the scaling; in the backward the symmetrised
gradient, its row sums against G, the scaling and the diagonal's correction): on CPU their fixed
cost is about half of the function's time at B = 128. Here each pass is one call (tested equal,
values and gradients, to the tensor operations and to normalise-then-Gram).
"""
from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["normalize_gram_", "normalized_gram_backward"]


_TILE = 16  # the mirrored writes and transposed reads go tile by tile: column by column they cost
# ~2x at B = 128 and ~4.5x at B = 256 (power-of-two strides share cache sets)


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
    for t0 in range(0, b, _TILE):
        for u0 in range(t0, b, _TILE):
            for i in range(t0, min(t0 + _TILE, b)):
                f = inv[i]
                for j in range(max(u0, i), min(u0 + _TILE, b)):
                    v = gram[i, j] * (f * inv[j])
                    gram[i, j] = v
                    gram[j, i] = v
    return inv, projected


@numba.njit(cache=True, nogil=True, fastmath=True)
def _dot64(a, b):
    """⟨a, b⟩ accumulated in float64 (fastmath: LLVM may reorder the sum, and vectorises it)."""
    t = 0.0
    for j in range(a.shape[0]):
        t += np.float64(a[j]) * np.float64(b[j])
    return t


@numba.njit(cache=True, nogil=True)
def normalized_gram_backward(g, gram, inv, projected):
    """A = N⁻¹ (g + gᵀ) N⁻¹ − diag(⟨(g + gᵀ)ᵢ, Gᵢ⟩ / nᵢ²) [B, B] for the incoming gradient ``g`` and
    the normalised Gram matrix ``gram`` (the gradient with respect to x is A x); the diagonal's
    term only for ``projected`` rows."""
    b = g.shape[0]
    s = np.empty_like(g)
    for t0 in range(0, b, _TILE):
        for u0 in range(t0, b, _TILE):
            for i in range(t0, min(t0 + _TILE, b)):
                for j in range(max(u0, i), min(u0 + _TILE, b)):
                    v = g[i, j] + g[j, i]
                    s[i, j] = v
                    s[j, i] = v
    for i in range(b):
        row = s[i]
        along = _dot64(row, gram[i])
        f = inv[i]
        for j in range(np.uint64(b)):
            row[j] *= f * inv[j]
        if projected[i]:
            row[i] -= along * (f * f)
    return s
