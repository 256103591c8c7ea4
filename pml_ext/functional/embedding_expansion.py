"""Embedding Expansion (Ko & Gu, CVPR 2020, arXiv 2003.02546): pure tensor math.

Every synthetic point is a fixed linear combination of two originals, optionally rescaled to
unit norm. We therefore describe the expanded set (originals first, then synthetic points) by
two endpoint indices and two weights per point, and derive every inner product, norm and
Euclidean distance over the expanded set from the originals' B x B Gram matrix: the expanded
matrix costs gathers and a few multiply-adds per entry instead of another matrix product over d.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .primitives import _safe_inverse, normalized_gram, safe_sqrt, segment_best, take, take_columns

__all__ = [
    "PAIR_MODES",
    "ExpandedSet",
    "class_indices",
    "division_point_pairs",
    "expansion_weights",
    "expand",
    "division_points",
    "expanded_embeddings",
    "expanded_distance_matrix",
    "class_pair_hardest",
    "class_pair_argbest",
    "expanded_pair_values",
    "hardest_negative_pairs",
    "HardestPairs",
    "BatchLayout",
    "batch_layout",
    "first_appearance_classes",
    "hardest_negative_pairs_in_layout",
    "search_path",
    "hardened_pair_matrix",
    "safe_sqrt",
    "take",
    "take_columns",
    "gram_kind",
    "normalized_gram",
]

PAIR_MODES = ("all", "adjacent")


class ExpandedSet(NamedTuple):
    """The originals plus synthetic points, as endpoint indices and weights.

    Point m equals ``scale[m] * (w_first[m] * x[first[m]] + w_second[m] * x[second[m]])``;
    rows ``0..B-1`` are the originals (``first = second = m``, weights 1 and 0, scale 1).
    ``scale`` is None until the Gram matrix is known (it depends on the embeddings when the
    synthetic points are L2-normalised).
    """

    first: torch.Tensor  # [M] long
    second: torch.Tensor  # [M] long
    w_first: torch.Tensor  # [M] float
    w_second: torch.Tensor  # [M] float
    labels: torch.Tensor  # [M]
    is_synthetic: torch.Tensor  # [M] bool
    num_originals: int

    @property
    def has_synthetic(self) -> bool:
        """Whether there is any synthetic point (they follow the originals: no tensor operation)."""
        return self.first.numel() > self.num_originals


def class_indices(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unique labels and each sample's class index into them (0..C-1)."""
    unique, inverse = torch.unique(labels, return_inverse=True)
    return unique, inverse


def division_point_pairs(
    labels: torch.Tensor, pairs: str = "all"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same-class pairs (i, j) between which synthetic points are made.

    ``pairs="all"``: every unordered same-class pair i < j (the paper's Fig. 1).
    ``pairs="adjacent"``: the official code's disjoint consecutive pairs within each class in
    batch order: the 1st and 2nd sample of a class, the 3rd and 4th, ...; an odd leftover
    sample stays unpaired.
    """
    if pairs not in PAIR_MODES:
        raise ValueError(f"pairs must be one of {PAIR_MODES}, got {pairs!r}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    device = labels.device
    if pairs == "all":
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        i, j = torch.triu(same, diagonal=1).nonzero(as_tuple=True)
        return i, j
    n = labels.numel()
    if n < 2:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty
    order = torch.sort(labels, stable=True).indices  # class blocks, batch order inside
    sorted_labels = labels[order]
    positions = torch.arange(n, device=device)
    new_block = torch.ones(n, dtype=torch.bool, device=device)
    new_block[1:] = sorted_labels[1:] != sorted_labels[:-1]
    block_start = torch.cummax(torch.where(new_block, positions, 0), dim=0).values
    rank = positions - block_start
    has_next = torch.zeros(n, dtype=torch.bool, device=device)
    has_next[:-1] = sorted_labels[1:] == sorted_labels[:-1]
    starts = positions[(rank % 2 == 0) & has_next]
    return order[starts], order[starts + 1]


def expansion_weights(
    first: torch.Tensor, second: torch.Tensor, n_points: int, dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Endpoints and weights of the n internal division points of every pair (EE Eq. 1).

    x̄_k = (k·x_i + (n+1−k)·x_j)/(n+1), k = 1..n; returned pair-major, k-minor.
    """
    k = torch.arange(1, n_points + 1, device=first.device, dtype=dtype)
    w_i = (k / (n_points + 1)).repeat(first.numel())
    w_j = 1 - w_i
    return (
        first.repeat_interleave(n_points),
        second.repeat_interleave(n_points),
        w_i,
        w_j,
    )


def expand(
    labels: torch.Tensor, n_points: int = 2, pairs: str = "all", dtype: torch.dtype = torch.float32
) -> ExpandedSet:
    """Describe the expanded set (originals + synthetic points) of a batch."""
    if not isinstance(n_points, int) or isinstance(n_points, bool) or n_points < 0:
        raise ValueError(f"n_points must be an int >= 0, got {n_points!r}")
    b = labels.numel()
    device = labels.device
    arange = torch.arange(b, device=device)
    pi, pj = division_point_pairs(labels, pairs)
    si, sj, swi, swj = expansion_weights(pi, pj, n_points, dtype)
    ones = torch.ones(b, dtype=dtype, device=device)
    return ExpandedSet(
        first=torch.cat([arange, si]),
        second=torch.cat([arange, sj]),
        w_first=torch.cat([ones, swi]),
        w_second=torch.cat([ones * 0, swj]),
        labels=torch.cat([labels, labels[si]]),
        is_synthetic=torch.cat(
            [torch.zeros(b, dtype=torch.bool, device=device), torch.ones(si.numel(), dtype=torch.bool, device=device)]
        ),
        num_originals=b,
    )


def _sq_norms(gram, f, s, wf, ws) -> torch.Tensor:
    """‖wf·x_f + ws·x_s‖² of each point from the Gram matrix."""
    return wf * wf * gram[f, f] + 2 * wf * ws * gram[f, s] + ws * ws * gram[s, s]


def _point_weights(gram: torch.Tensor, ex: ExpandedSet, normalize: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weights of each expanded point's two endpoints, with EE Eq. 2's 1/‖x̄‖ folded in."""
    f, s = ex.first, ex.second
    wf, ws = ex.w_first.to(gram.dtype), ex.w_second.to(gram.dtype)
    if normalize and ex.has_synthetic:
        inv = _safe_inverse(safe_sqrt(_sq_norms(gram, f, s, wf, ws)))
        scale = torch.where(ex.is_synthetic, inv, torch.ones_like(inv))
        wf, ws = wf * scale, ws * scale
    return wf, ws


def _expanded_gram(gram: torch.Tensor, ex: ExpandedSet, normalize: bool) -> torch.Tensor:
    """Inner products over the expanded set from the originals' Gram matrix: W G Wᵀ.

    W has two non-zeros per row, so W G is two row gathers and (W G) Wᵀ two column gathers
    (index_select, whose backward is a vectorised index_add).
    """
    f, s = ex.first, ex.second
    wf, ws = _point_weights(gram, ex, normalize)
    wg = wf[:, None] * gram.index_select(0, f) + ws[:, None] * gram.index_select(0, s)
    return wg.index_select(1, f) * wf[None, :] + wg.index_select(1, s) * ws[None, :]


def expanded_embeddings(x: torch.Tensor, ex: ExpandedSet, normalize: bool) -> torch.Tensor:
    """The explicit expanded set [M, d] (originals first). Used by the fallback path and tests."""
    wf = ex.w_first.to(x.dtype)[:, None]
    ws = ex.w_second.to(x.dtype)[:, None]
    points = wf * x[ex.first] + ws * x[ex.second]
    if normalize and ex.has_synthetic:
        inv = _safe_inverse(safe_sqrt((points * points).sum(dim=1, keepdim=True)))
        points = torch.where(ex.is_synthetic[:, None], points * inv, points)
    return points


def division_points(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    n_points: int = 2,
    normalize: bool = True,
    pairs: str = "all",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Synthetic points of EE (Eq. 1, and Eq. 2 when ``normalize``): returns (points, labels).

    Only the synthetic points are returned, pair-major; the originals are not repeated.
    """
    ex = expand(labels, n_points, pairs, embeddings.dtype)
    pts = expanded_embeddings(embeddings, ex, normalize)
    return pts[ex.num_originals :], ex.labels[ex.num_originals :]


def gram_kind(distance) -> Optional[str]:
    """"inner" (dot / cosine) or "euclidean" (Lp, p = 2) when ``distance`` computes its matrix
    exactly as PML's own classes do, so that it can be derived from inner products; else None."""
    from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance

    compute_mat = type(distance).compute_mat
    if compute_mat is DotProductSimilarity.compute_mat or compute_mat is CosineSimilarity.compute_mat:
        return "inner"
    if compute_mat is LpDistance.compute_mat and distance.p == 2:
        return "euclidean"
    return None


def _mat_from_gram(g: torch.Tensor, kind: str, power) -> torch.Tensor:
    """A PML distance matrix from inner products of the same point set (squared norms: the
    diagonal).

    The diagonal is exactly 0 for Euclidean: n_i + n_i − 2·g_ii cancels exactly in floating point.
    """
    if kind == "euclidean":
        sq_norms = torch.diagonal(g)
        g = safe_sqrt(sq_norms[:, None] + sq_norms[None, :] - 2 * g)
    return g**power if power != 1 else g


def expanded_distance_matrix(
    embeddings: torch.Tensor, ex: ExpandedSet, distance, normalize: bool = True
) -> torch.Tensor:
    """The user's PML distance over the expanded set, [M, M].

    The originals are first passed through ``distance.maybe_normalize`` (what the distance
    itself would do); synthetic points are then built from them and L2-normalised when
    ``normalize`` (EE Eq. 2) — they are not re-normalised by the distance, so that
    ``normalize=False`` keeps the paper's ablation meaning. ``distance.power`` is applied.
    """
    x = distance.maybe_normalize(embeddings)
    kind = gram_kind(distance)
    if kind is None:
        points = expanded_embeddings(x, ex, normalize)
        mat = distance.compute_mat(points, points)
        return mat**distance.power if distance.power != 1 else mat
    return _mat_from_gram(_expanded_gram(x @ x.t(), ex, normalize), kind, distance.power)


def _class_slots(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, K] indices of each class's members (K = largest class), padded with len(classes)."""
    m = classes.numel()
    order = torch.sort(classes, stable=True).indices
    counts = torch.bincount(classes, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    sorted_classes = classes[order]
    slot = torch.arange(m, device=classes.device) - starts[sorted_classes]
    k = int(counts.max()) if m else 0
    out = torch.full((num_classes, max(k, 1)), m, dtype=torch.long, device=classes.device)
    out[sorted_classes, slot] = order
    return out


def _best_in_slots(search: torch.Tensor, slots: torch.Tensor, m: int, inverted: bool
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) [C, C] of the best entry per class pair of a slot-ordered [C·K, C·K] matrix.

    ``search`` rows and columns follow ``slots.flatten()``; padding slots (index m) are ignored.
    """
    c, k = slots.shape
    valid = slots.flatten() < m
    if not bool(valid.all()):
        pad = float("-inf") if inverted else float("inf")
        search = search.masked_fill(~(valid[:, None] & valid[None, :]), pad)
    reduce = torch.max if inverted else torch.min
    per_row, col_slot = reduce(search.view(c, k, c, k), dim=3)  # [C, K, C]
    _, row_slot = reduce(per_row, dim=1)  # [C, C]
    col_slot = col_slot.gather(1, row_slot[:, None, :]).squeeze(1)  # [C, C]
    rows = slots.gather(1, row_slot)
    cols = slots.gather(1, col_slot.t()).t()
    return rows, cols


def class_pair_argbest(
    mat: torch.Tensor,
    classes: torch.Tensor,
    num_classes: int,
    inverted: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row and column, [C, C] each, of the hardest entry of ``mat`` for every class pair.

    Hardest = smallest distance, or largest similarity when ``inverted``. Members of each class
    are laid out in padded [C, K] slots, so the search is one dense min/max over a
    [C, K, C, K] view: no loop, no [M, M] index arithmetic. Not differentiable (indices).
    """
    with torch.no_grad():
        slots = _class_slots(classes, num_classes)
        return _best_in_slots(_in_slot_order(mat, slots), slots, mat.shape[0], inverted)


def _in_slot_order(mat: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows and columns of an [M, M] matrix in class-slot order (padding slots repeat row M-1;
    ``_best_in_slots`` masks them)."""
    idx = slots.flatten().clamp(max=mat.shape[0] - 1)
    return mat.index_select(0, idx).index_select(1, idx)


def class_pair_hardest(
    mat: torch.Tensor,
    classes: torch.Tensor,
    num_classes: int,
    inverted: bool,
) -> torch.Tensor:
    """Hardest value of ``mat`` over all pairs of each class pair, [C, C]; the gradient flows
    through the selected entry."""
    rows, cols = class_pair_argbest(mat, classes, num_classes, inverted)
    return mat[rows, cols]


def _pair_values_from_gram(gram, ex, rows, cols, normalize, kind, power):
    """Distances of selected expanded-point pairs (rows[k], cols[k]), a few gathers each."""
    f, s = ex.first, ex.second
    wf, ws = _point_weights(gram, ex, normalize)
    fr, sr, fc, sc = f[rows], s[rows], f[cols], s[cols]
    g = (wf[rows] * wf[cols] * gram[fr, fc] + wf[rows] * ws[cols] * gram[fr, sc]
         + ws[rows] * wf[cols] * gram[sr, fc] + ws[rows] * ws[cols] * gram[sr, sc])
    if kind == "euclidean":
        sq_norms = _sq_norms(gram, f, s, wf, ws)
        g = safe_sqrt((sq_norms[rows] + sq_norms[cols] - 2 * g).masked_fill(rows == cols, 0))
    return g**power if power != 1 else g


def expanded_pair_values(
    embeddings: torch.Tensor,
    ex: ExpandedSet,
    rows: torch.Tensor,
    cols: torch.Tensor,
    distance,
    normalize: bool = True,
) -> torch.Tensor:
    """The distance between expanded points rows[k] and cols[k], differentiable, any shape.

    Equals ``expanded_distance_matrix(...)[rows, cols]`` but, for inner-product distances,
    costs a few gathers from the B x B Gram matrix instead of an [M, M] graph.
    """
    kind = gram_kind(distance)
    if kind is None:
        return expanded_distance_matrix(embeddings, ex, distance, normalize)[rows, cols]
    x = distance.maybe_normalize(embeddings)
    return _pair_values_from_gram(x @ x.t(), ex, rows, cols, normalize, kind, distance.power)


def _originals_best(gd, classes, c, transform, inverted, worst):
    """Best search value of every class pair over originals only, [C, C] (the miner's statistics), from
    the search's ``transform`` of inner products (the grouped and the row search)."""
    sq = torch.diagonal(gd)
    per_class, _ = segment_best(transform(gd, lambda: sq[:, None], lambda: sq[None, :]), classes, c, inverted,
                                worst)  # [x, j]: best of x's originals against original j
    return segment_best(per_class.t().contiguous(), classes, c, inverted, worst)[0].t()  # [y, x] -> [x, y]


class HardestPairs(NamedTuple):
    hardest: torch.Tensor  # [C, C] differentiable
    rows: torch.Tensor  # [C, C] expanded-set index of the first point of the hardest pair
    cols: torch.Tensor  # [C, C] ... of the second point
    best: torch.Tensor  # [C, C] detached search value of the hardest pair (see search_inverted)
    best_originals: Optional[torch.Tensor]  # [C, C] the same over originals only (if asked for)
    search_inverted: bool  # True when larger search values are harder
    layout: "BatchLayout"  # the label pattern searched
    originals_mat: torch.Tensor  # [B, B] the distance on the batch, differentiable

    @property
    def slots(self) -> torch.Tensor:
        """[C, K] expanded-set index of each class slot (padding = M), built on first use."""
        return self.layout.slots


_SEARCH_CHUNK_ENTRIES = 1 << 17  # bound on the transient search block, in entries (512 kB in float32)
# "auto": the search the cost model expects cheapest for the label pattern (search_path); "blocked",
# "groups" or "rows" force one (tests, benchmarks)
_SEARCH = "auto"


def search_path(layout: "BatchLayout") -> str:
    """The search the cost model picks for a label pattern (cached on the layout): "rows"
    (:mod:`~pml_ext.functional.embedding_expansion_rows`; with the compiled kernel for every pattern
    of two or more classes whose kernel block fits, with tensor operations for unequal classes with a
    small expanded set: :func:`~pml_ext.functional.use_rows`), else "groups"
    (:mod:`~pml_ext.functional.embedding_expansion_groups`) or "blocked"
    (:mod:`~pml_ext.functional.embedding_expansion_blocked`)."""
    from .embedding_expansion_groups import use_groups
    from .embedding_expansion_rows import use_rows

    if use_rows(layout):
        return "rows"
    return "groups" if use_groups(layout) else "blocked"


def hardest_negative_pairs(
    embeddings: torch.Tensor,
    ex: ExpandedSet,
    classes: torch.Tensor,
    num_classes: int,
    distance,
    normalize: bool = True,
) -> HardestPairs:
    """EE's hard negative pair mining (§3.2): for every class pair, the hardest pair of points.

    ``classes`` [B] numbers the originals' classes 0..C-1 (any order); ``ex`` is the expanded
    set of the same batch. See :func:`hardest_negative_pairs_in_layout`.
    """
    return hardest_negative_pairs_in_layout(embeddings, BatchLayout(classes, num_classes, ex), distance, normalize)


def hardest_negative_pairs_in_layout(embeddings: torch.Tensor, layout: BatchLayout, distance,
                                     normalize: bool = True, originals_best: bool = False) -> HardestPairs:
    """EE's hard negative pair mining (§3.2) on a :class:`BatchLayout`.

    The search runs without autograd, by the blocked search
    (:func:`~pml_ext.functional.embedding_expansion_blocked.hardest_in_blocks`), the grouped one
    (:func:`~pml_ext.functional.hardest_negative_pairs_in_groups`) or the row search
    (:func:`~pml_ext.functional.hardest_negative_pairs_in_rows`), whichever the cost model
    (:func:`search_path`) expects cheapest for the label pattern; any distance
    that is not an inner-product one searches its explicit [M, M] matrix. The gradient flows only
    through the C² selected pairs, recomputed from the Gram matrix. ``originals_best`` also
    returns the best value per class pair over originals only (the miner's statistics).
    """
    from . import embedding_expansion_blocked as blocked

    if layout.num_classes == 0:  # an empty batch: no class pair, a [0, 0] result on the graph
        mat = distance(embeddings)
        none = torch.zeros(0, 0, dtype=torch.long, device=embeddings.device)
        best = mat.detach()
        return HardestPairs(mat, none, none, best, best if originals_best else None, distance.is_inverted, layout,
                            mat)
    kind = gram_kind(distance)
    if kind is None:
        return blocked.hardest_from_full_matrix(embeddings, layout, distance, normalize, originals_best)
    path = search_path(layout) if _SEARCH == "auto" else _SEARCH
    if path == "rows":
        from .embedding_expansion_rows import hardest_negative_pairs_in_rows

        return hardest_negative_pairs_in_rows(embeddings, layout, distance, kind, normalize, originals_best)
    if path == "groups":
        from .embedding_expansion_groups import hardest_negative_pairs_in_groups

        return hardest_negative_pairs_in_groups(embeddings, layout, distance, kind, normalize, originals_best)
    return blocked.hardest_in_blocks(embeddings, layout, distance, kind, normalize, originals_best)


def hardened_pair_matrix(
    mat: torch.Tensor,
    row_classes: torch.Tensor,
    col_classes: torch.Tensor,
    hardest: torch.Tensor,
) -> torch.Tensor:
    """Replace every negative pair's value by its class pair's hardest value (EE §3.2).

    Positive pairs (same class) keep their original value from ``mat``.
    """
    negative = row_classes[:, None] != col_classes[None, :]
    return torch.where(negative, hardest[row_classes[:, None], col_classes[None, :]], mat)


# the label-pattern layouts live in their own module; imported last (it builds on the above)
from .embedding_expansion_layouts import (  # noqa: E402
    _LAYOUT_CACHE,
    BatchLayout,
    batch_layout,
    first_appearance_classes,
)
