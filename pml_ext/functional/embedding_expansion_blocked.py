"""EE's hard negative pair search in class blocks (Ko & Gu, CVPR 2020, §3.2), and the explicit
fallback for distances that do not follow from inner products.

Every synthetic point combines its own class's originals, so the inner products between the
expanded sets of classes x and y are ``W_x G_xy W_yᵀ`` with W [K, k] per class (a
:class:`~pml_ext.functional.BatchLayout`'s ``weights``): two batched products with inner
dimension k (points per class), not B, then one min/max per class pair over a [C, C, K·K] view.
Exact work for balanced batches (every class pads to the largest class's K otherwise; the
grouped search serves those). The search runs without autograd; the C² selected pairs' values
are recomputed from the Gram matrix (:func:`~pml_ext.functional.embedding_expansion_pairs.
selected_pair_values`).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import embedding_expansion as _ee
from .embedding_expansion import (
    BatchLayout,
    HardestPairs,
    _in_slot_order,
    _mat_from_gram,
    expanded_distance_matrix,
    safe_sqrt,
    take,
)
from .embedding_expansion_pairs import selected_pair_values, synthetic_scale

__all__: list = []


def _search_class_pairs(block, c: int, kk: int, inverted: bool, valid: Optional[torch.Tensor],
                        originals: Optional[torch.Tensor]):
    """Best slot pair of every class pair over a search tensor produced in row-class chunks.

    ``block(lo, hi)`` returns the search values of row classes lo..hi-1 as [h, C, K, K] with the
    last two dimensions swapped ([x, y, q, p]: slot q of column class y, slot p of row class x).
    Chunks bound the transient memory to ``_SEARCH_CHUNK_ENTRIES`` (a loop over memory chunks,
    one iteration for usual batches). Returns (p, q, best, best over originals only or None).
    """
    worst = float("-inf") if inverted else float("inf")
    reduce = torch.max if inverted else torch.min
    step = max(1, _ee._SEARCH_CHUNK_ENTRIES // max(1, c * kk * kk))
    ps, qs, bests, orig_bests = [], [], [], []
    for lo in range(0, c, step):
        hi = min(c, lo + step)
        vals = block(lo, hi)
        if valid is not None:
            keep = valid[None, :, :, None] & valid[lo:hi, None, None, :]
            vals = vals.masked_fill(~keep, worst)
        best, p, q = _first_best(vals, reduce, inverted)
        ps.append(p)
        qs.append(q)
        bests.append(best)
        if originals is not None:
            keep = originals[None, :, :, None] & originals[lo:hi, None, None, :]
            orig_bests.append(reduce(vals.masked_fill(~keep, worst).reshape(hi - lo, c, kk * kk), dim=2).values)
        del vals  # before the next chunk is made

    def cat(parts):
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    return cat(ps), cat(qs), cat(bests), (torch.cat(orig_bests) if originals is not None else None)


_TWO_STAGE_SLOTS = 32  # from this many slots per class on, _first_best reduces in two stages


def _first_best(vals: torch.Tensor, reduce, inverted: bool):
    """(best, p, q) over the last two dimensions of ``vals`` [x, y, q, p]: the best value and the
    first (q, p) in row-major order attaining it. With many slots per class, the best value of
    every q first (a values-only reduction, several times faster than one with indices over
    K² values), then the first best q and the first best p in its row; the same answer."""
    h, c, kk = vals.shape[0], vals.shape[1], vals.shape[2]
    if kk < _TWO_STAGE_SLOTS:
        best, flat = reduce(vals.reshape(h, c, kk * kk), dim=2)
        q = torch.div(flat, kk, rounding_mode="floor")
        return best, flat - q * kk, q
    per_q = (torch.amax if inverted else torch.amin)(vals, dim=3)  # [x, y, q]
    best, q = reduce(per_q, dim=2)
    _, p = reduce(vals.gather(2, q[:, :, None, None].expand(h, c, 1, kk)).squeeze(2), dim=2)
    return best, p, q


def _block_index(layout: BatchLayout) -> Optional[torch.Tensor]:
    """[C·k, C·k] flat Gram indices of the class-blocked Gram matrix, or None when the batch is
    already in class blocks (classes contiguous and of equal size, as PML's MPerClassSampler
    gives): cached on the layout."""
    def build(lay):
        o, b = lay.originals, lay.expanded.num_originals
        if o.numel() == b and torch.equal(o, torch.arange(b, device=o.device)):
            return None
        return o[:, None] * b + o[None, :]
    return layout.extra("block_index", build)


def hardest_in_blocks(embeddings: torch.Tensor, layout: BatchLayout, distance, kind: str,
                      normalize: bool = True, originals_best: bool = False) -> HardestPairs:
    """The blocked search (module docstring). When every point is on the unit sphere
    (L2-normalising Lp distance, ``normalize=True``), the Euclidean distance decreases with the
    inner product, so the search runs on the inner products themselves
    (``search_inverted=True``) without square roots."""
    c, kk, k = layout.weights.shape
    gram = _ee.normalized_gram(embeddings, distance)
    normalizing = normalize and layout.has_synthetic
    with torch.no_grad():
        gd = gram.detach()
        block_index = _block_index(layout)
        gs = (gd if block_index is None else take(gd, block_index)).view(c, k, c, k)
        w = layout.weights.to(gd.dtype)
        gcc = torch.diagonal(gs, dim1=0, dim2=2).permute(2, 0, 1)  # [C, k, k] within-class blocks
        sq = ((w @ gcc) * w).sum(-1)  # [C, K] squared norms before EE Eq. 2
        wn, scale = w, None
        if normalizing:
            scale = synthetic_scale(sq, layout.synthetic_slot)
            wn, sq = w * scale[..., None], sq * scale * scale
        # t[a, (b, s), j] = Σ_i wn[b, s, i] G[b, i, a, j]: slot s of class b against original j of a
        t = torch.bmm(wn, gs.reshape(c, k, c * k)).view(c * kk, c, k).transpose(0, 1)
        wnt = wn.transpose(1, 2)  # [a, j, u]
        valid = layout.valid_slot
        on_sphere = (kind == "euclidean" and normalize and distance.normalize_embeddings and distance.power > 0
                     and bool(((sq > 0.5) if valid is None else ((sq > 0.5) | ~valid)).all()))
        inverted = True if on_sphere else distance.is_inverted

        def block(lo, hi):
            # r[a, b, s, u] = <slot s of class b, slot u of class a>: row class a, column class b,
            # column slot s, row slot u, the [x, y, q, p] layout _search_class_pairs reads
            r = torch.bmm(t[lo:hi], wnt[lo:hi]).view(hi - lo, c, kk, kk)
            if on_sphere:
                return r
            if kind == "euclidean":
                r = safe_sqrt(sq[None, :, :, None] + sq[lo:hi, None, None, :] - 2 * r)
            return r**distance.power if distance.power != 1 else r

        p_slot, q_slot, best, best_orig = _search_class_pairs(
            block, c, kk, inverted, valid, layout.original_slot if originals_best else None)
        # the selected points as flat slots: [2, C, C] (row point, column point)
        idx = torch.stack([layout.row_base + p_slot, layout.col_base + q_slot])
        # [2, C, C, 3]: expanded-set index, two originals
        points = layout.slot_points.index_select(0, idx.reshape(-1)).view(*idx.shape, -1)
        ends = points[..., 1:].movedim(-1, 1).reshape(4, c, c)  # [r1, r2, c1, c2]
        wsel = layout.slot_weights.index_select(0, idx.reshape(-1)).view(*idx.shape, -1).to(gd.dtype)
        if scale is not None:
            wsel = wsel * take(scale, idx)[..., None]
        wsel = wsel.movedim(-1, 1).reshape(4, c, c)
        sqn = take(sq, idx)
        if normalizing:
            syn = take(layout.synthetic_slot, idx)
        else:
            syn = torch.zeros_like(idx, dtype=torch.bool)
        same_point = layout.class_eye & (p_slot == q_slot)
    hardest = selected_pair_values(gram, ends, wsel, sqn[0], sqn[1], syn[0], syn[1], same_point, kind,
                                   distance.power)
    return HardestPairs(hardest, points[0, ..., 0], points[1, ..., 0], best, best_orig, inverted, layout,
                        _mat_from_gram(gram, kind, distance.power))


def hardest_from_full_matrix(embeddings, layout: BatchLayout, distance, normalize, originals_best=False
                             ) -> HardestPairs:
    """Any other distance: its full [M, M] matrix over the explicit expanded set."""
    ex, slots, b = layout.expanded, layout.slots, layout.expanded.num_originals
    c, kk = slots.shape
    mat = expanded_distance_matrix(embeddings, ex, distance, normalize)
    with torch.no_grad():
        search = _in_slot_order(mat.detach(), slots).view(c, kk, c, kk).permute(0, 2, 3, 1)  # [x, y, q, p]
        inverted = distance.is_inverted
        p_slot, q_slot, best, best_orig = _search_class_pairs(
            lambda lo, hi: search[lo:hi], c, kk, inverted, layout.valid_slot,
            layout.original_slot if originals_best else None)
        flat_slots = slots.view(-1)
        rows, cols = flat_slots[layout.row_base + p_slot], flat_slots[layout.col_base + q_slot]
    return HardestPairs(mat[rows, cols], rows, cols, best, best_orig, inverted, layout, mat[:b, :b])
