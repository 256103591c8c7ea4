"""EE's row search (Ko & Gu, CVPR 2020, §3.2) as one compiled CPU kernel (numba).

Imported only where numba imports (a dependency; without it the tensor code runs), by
:func:`~pml_ext.functional.embedding_expansion_rows.compiled_row_search`. The row search with tensor
operations issues ~200 of them per call; on CPU, for the few hundred points of a random or
long-tailed batch, their fixed cost (6-20 µs each with cold caches, as in a training step) is most
of its time, not arithmetic. This kernel does the search's no-grad part in one call, with the row
search's arithmetic, stages and tie rules (tested: the same pairs and values): every point's squared
norm and EE Eq. 2's scale; the points ordered class by class; stage 1 per class x but the largest,
the inner products of x's originals with every point (x's block of G Wᵀ), then every point of x
against every point of the other classes, kept as the best per column point and the first point of
x attaining it in two [M] accumulators (an elementwise multiply-add and select over contiguous rows,
which LLVM vectorises); stage 2 per class pair, the first column point of y attaining the segment's
best, whose row point stage 1 kept (the row search's stage 3); the largest class's pairs from the
other class's side; the diagonal. No [C, M] table or index list is built.
"""
from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["row_search"]


@numba.njit(cache=True, nogil=True, fastmath=True)
def segment_max(h, lo, hi):
    """max(h[lo:hi]), hi > lo (a maximum is exact in any order; fastmath lets LLVM reorder it, ~5%
    faster on a long-tailed batch's stage 2 than without)."""
    best = h[lo]
    for q in range(lo + 1, hi):
        best = max(best, h[q])
    return best


@numba.njit(cache=True, nogil=True)
def _combine_into(out, g, f, s, wf, ws, m):
    """out[q] = g[f[q]]·wf[q] + g[s[q]]·ws[q]; unsigned indices spare numba's negative-index
    wraparound (~0.64 vs ~1.0 ns per entry)."""
    for q in range(np.uint64(m)):
        out[q] = g[f[q]] * wf[q] + g[s[q]] * ws[q]


@numba.njit(cache=True, nogil=True)
def _max_into(acc, gf, gs, wf, ws, lo, hi):
    """acc[q] = max(acc[q], gf[q]·wf + gs[q]·ws) for q in [lo, hi): no reduction, so LLVM vectorises
    it (the unsigned range spares the negative-index wraparound that keeps it scalar)."""
    for q in range(np.uint64(lo), np.uint64(hi)):
        acc[q] = max(acc[q], gf[q] * wf + gs[q] * ws)


@numba.njit(cache=True, nogil=True)
def _argmax_into(acc, idx, i, gf, gs, wf, ws, lo, hi):
    """acc[q], idx[q] = v, i where v = gf[q]·wf + gs[q]·ws is larger than acc[q] (the first best
    is kept, NaN never), for q in [lo, hi): selects, not branches, and an unsigned range (no
    negative-index wraparound), so LLVM vectorises it."""
    for q in range(np.uint64(lo), np.uint64(hi)):
        v = gf[q] * wf + gs[q] * ws
        a = acc[q]
        c = v > a
        acc[q] = v if c else a
        idx[q] = i if c else idx[q]


@numba.njit(cache=True, nogil=True)
def _hardness(inner, sq_r, sq_q, off_sphere, pw, sign, tiny, buf):
    """±(the distance's value) of a pair from its inner product and squared norms (larger: harder),
    rounded to the Gram matrix's dtype after every step (``buf``: one entry of that dtype), as the
    row search's tensor operations round them."""
    buf[0] = inner
    if off_sphere:
        d = sq_r + sq_q - 2 * buf[0]
        buf[0] = math.sqrt(max(d, tiny)) if d > 0 else 0.0
    if pw != 1.0:
        buf[0] = buf[0] ** pw
    buf[0] = sign * buf[0]
    return buf[0]


@numba.njit(cache=True, nogil=True)
def row_search(gram, first, second, w_first, w_second, point_class, first_index, num_classes, largest,
               normalizing, euclidean, normalize, distance_normalizes, distance_inverted, power, track_below):
    """``(best, rows, cols, weights, sq, inverted)``: see
    :func:`~pml_ext.functional.embedding_expansion_rows.compiled_row_search`. ``gram`` [B, B] the
    originals' Gram matrix; ``first``/``second``/``w_first``/``w_second`` [M] every point's
    endpoints and EE Eq. 1 weights; ``point_class`` [M]; ``first_index`` [C] each class's first
    original; ``largest`` the class whose pairs the tensor row search takes from the other class's
    side (which decides their ties). Stage 1 keeps each column point's row point while there are
    fewer than ``track_below`` points per class on average; beyond, stage 3 rescans x per class pair
    instead (tracking costs a select and a store per stage-1 entry, the rescan C scattered loads per
    point of x: at 8 synthetic points per pair tracking was 1.3x slower on 16x8, at 2 the rescan
    1.1-1.6x)."""
    b, m, c = gram.shape[0], first.shape[0], num_classes
    weights = np.empty((2, m), gram.dtype)
    sq = np.empty(m, gram.dtype)
    tiny = np.finfo(gram.dtype).tiny
    on_sphere = euclidean and normalize and distance_normalizes and power > 0
    for p in range(m):  # squared norm before EE Eq. 2, then its scale folded in
        f, s, wf, ws = first[p], second[p], w_first[p], w_second[p]
        n = gram[f, f] * (wf * wf) + gram[f, s] * (2 * wf * ws) + gram[s, s] * (ws * ws)
        if normalizing and p >= b:  # a synthetic point (they follow the originals)
            scale = 1 / math.sqrt(max(n, tiny)) if n > 0 else 0.0
            wf, ws, n = wf * scale, ws * scale, n * scale * scale
        weights[0, p], weights[1, p], sq[p] = wf, ws, n
        on_sphere = on_sphere and n > 0.5
    # on the unit sphere the Euclidean distance falls as the inner product rises: search inner products
    inverted = on_sphere or distance_inverted
    off_sphere = euclidean and not on_sphere
    pw = 1.0 if on_sphere else power
    # the points class by class (batch order inside): each class's columns are one segment, whose
    # first best point is the lowest-numbered one, as in the row search
    start = np.zeros(c + 1, np.int64)
    for p in range(m):
        start[point_class[p] + 1] += 1
    for y in range(c):
        start[y + 1] += start[y]
    order = np.empty(m, np.int64)
    fill = start[:c].copy()
    for p in range(m):
        order[fill[point_class[p]]] = p
        fill[point_class[p]] += 1
    sq_o, f_o, s_o = sq[order], first[order].astype(np.uint64), second[order].astype(np.uint64)
    wf_o, ws_o = weights[0][order], weights[1][order]
    # a class's originals open its segment (they precede the synthetic points); local[j]: original
    # j's place among its class's, its row in that class's block of G Wᵀ
    n_orig = np.zeros(c, np.int64)
    for j in range(b):
        n_orig[point_class[j]] += 1
    local = np.empty(b, np.int64)
    block_rows = 1
    for x in range(c):
        for k in range(n_orig[x]):
            local[order[start[x] + k]] = k
        if x != largest:
            block_rows = max(block_rows, n_orig[x])
    gt = np.empty((block_rows, m), gram.dtype)  # gt[local[j], q] = <original j, point order[q]>, one class's
    # hardness h = ±value, larger is harder; without a transform the sign goes into the weights
    # (exact: negation commutes with rounding) and a row's pass is a vectorised multiply-add-select
    typed = np.ones(2, gram.dtype)  # the sign in the Gram matrix's dtype, and _hardness's rounding buffer
    if not inverted:
        typed[0] = -1.0
    sg, buf = typed[0], typed[1:]
    plain = not off_sphere and pw == 1.0
    best = np.empty((c, c), gram.dtype)
    rows = np.zeros((c, c), np.int64)
    cols = np.zeros((c, c), np.int64)
    acc = np.empty(m, gram.dtype)
    idx = np.empty(m, np.int32)  # a point of x per column point (int32: twice the lanes of int64)
    track = m < track_below * c
    for x in range(c):
        if x == largest:  # its pairs come from the other classes' side, below
            continue
        x0, x1 = start[x], start[x + 1]
        for k in range(n_orig[x]):  # x's block of G Wᵀ (the largest class's is never needed)
            _combine_into(gt[k], gram[order[x0 + k]], f_o, s_o, wf_o, ws_o, m)
        acc[:] = -np.inf
        idx[:] = x0
        # stage 1: acc[q] = the best hardness of x's points against point q (every other class's),
        # idx[q] the first point of x attaining it (x's first point if none does: NaN values)
        for i in range(x0, x1):
            r = order[i]
            gf, gs, sq_r = gt[local[first[r]]], gt[local[second[r]]], sq[r]
            if plain and track:
                _argmax_into(acc, idx, i, gf, gs, weights[0, r] * sg, weights[1, r] * sg, 0, x0)
                _argmax_into(acc, idx, i, gf, gs, weights[0, r] * sg, weights[1, r] * sg, x1, m)
            elif plain:
                _max_into(acc, gf, gs, weights[0, r] * sg, weights[1, r] * sg, 0, x0)
                _max_into(acc, gf, gs, weights[0, r] * sg, weights[1, r] * sg, x1, m)
            else:
                for q in range(m):
                    if q < x0 or q >= x1:
                        v = _hardness(gf[q] * weights[0, r] + gs[q] * weights[1, r], sq_r, sq_o[q], off_sphere,
                                      pw, sg, tiny, buf)
                        if v > acc[q]:
                            acc[q], idx[q] = v, i
        for y in range(c):
            if y == x:
                continue
            # stage 2: the first point of y attaining the best (none: NaN values; its first then)
            s0, s1 = start[y], start[y + 1]
            bh = segment_max(acc, s0, s1)
            q = s0
            while q < s1 and acc[q] != bh:
                q += 1
            q = s0 if q == s1 else q
            # stage 3: the first point of x attaining it against that point: kept by stage 1, or its
            # values recomputed as stage 1 computed them (the first best, should rounding ever differ)
            i_best = idx[q]
            if plain and not track:
                top = -np.inf
                for i in range(x0, x1):
                    r = order[i]
                    v = gt[local[first[r]], q] * (weights[0, r] * sg) + gt[local[second[r]], q] * (weights[1, r] * sg)
                    if v > top:
                        top, i_best = v, i
            best[x, y], rows[x, y], cols[x, y] = sg * bh, order[i_best], order[q]
    if largest < c:  # the largest class's pairs from the other class's side, as the row search
        for y in range(c):
            if y != largest:
                best[largest, y], rows[largest, y] = best[y, largest], cols[y, largest]
                cols[largest, y] = rows[y, largest]
    for x in range(c):  # every class against itself: its first original
        i = first_index[x]
        v = sq[i]
        if off_sphere:
            v = 0.0
        if pw != 1.0:
            v = v**pw
        best[x, x], rows[x, x], cols[x, x] = v, i, i
    return best, rows, cols, weights, sq, inverted


@numba.njit(cache=True, nogil=True)
def pair_values(gram, rows, cols, first, second, weights, sq, synthetic_from, euclidean, power):
    """The selected pairs' values, as :class:`~pml_ext.functional.embedding_expansion_pairs._SelectedPairs`
    computes them: ``(out, value, base)`` [C, C] each, for the pair (``rows[x, y]``, ``cols[x, y]``)
    of expanded points given by their endpoints and ``weights`` / ``sq`` with EE Eq. 2's scale
    (points from ``synthetic_from`` on are L2-normalised synthetic points; pass M for none). ``base``
    is the inner product, ``value`` the distance before the power."""
    c = rows.shape[0]
    out = np.empty((c, c), gram.dtype)
    value = np.empty((c, c), gram.dtype)
    base = np.empty((c, c), gram.dtype)
    tiny = np.finfo(gram.dtype).tiny
    for x in range(c):
        for y in range(c):
            r, q = rows[x, y], cols[x, y]
            e_r, e_q = (first[r], second[r]), (first[q], second[q])
            w_r, w_q = (weights[0, r], weights[1, r]), (weights[0, q], weights[1, q])
            inner = 0.0
            for i in range(2):
                for j in range(2):
                    inner += gram[e_r[i], e_q[j]] * (w_r[i] * w_q[j])
            v = inner
            if euclidean:
                d = 0.0 if x == y else sq[r] + sq[q] - 2 * inner
                v = math.sqrt(max(d, tiny)) if d > 0 else 0.0
            base[x, y], value[x, y] = inner, v
            out[x, y] = v**power if power != 1.0 else v
    return out, value, base


@numba.njit(cache=True, nogil=True)
def pair_values_backward(u, b, rows, cols, first, second, weights, value, base, synthetic_from, euclidean, power):
    """The gradient of :func:`pair_values`' ``out`` with respect to the Gram matrix, [B, B], for the
    incoming gradient ``u`` [C, C]: the twelve Gram entries of every pair, as
    ``_SelectedPairs.backward`` writes them (the inner product's four, and each point's squared
    norm's four, through EE Eq. 2's scale or, for Euclidean values, the norm itself)."""
    c = rows.shape[0]
    grad = np.zeros((b, b), u.dtype)
    tiny = np.finfo(u.dtype).tiny
    for x in range(c):
        for y in range(c):
            g = u[x, y]
            if g == 0:  # a pair the loss did not read (N-pair reads only its anchors' classes)
                continue
            v = value[x, y]
            if power != 1.0:
                g = g * power * v ** (power - 1)
            if euclidean:
                g_d2 = 0.5 * g / max(v, tiny) if v > 0 else 0.0
                g_inner = -2 * g_d2
            else:
                g_d2, g_inner = 0.0, g
            syn_term = -0.5 * g_inner * base[x, y]
            r, q = rows[x, y], cols[x, y]
            c_r = syn_term if r >= synthetic_from else g_d2
            c_q = syn_term if q >= synthetic_from else g_d2
            e_r, e_q = (first[r], second[r]), (first[q], second[q])
            w_r, w_q = (weights[0, r], weights[1, r]), (weights[0, q], weights[1, q])
            for i in range(2):
                for j in range(2):
                    grad[e_r[i], e_q[j]] += g_inner * (w_r[i] * w_q[j])
                    grad[e_r[i], e_r[j]] += c_r * (w_r[i] * w_r[j])
                    grad[e_q[i], e_q[j]] += c_q * (w_q[i] * w_q[j])
    return grad
