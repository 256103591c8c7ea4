"""EE's hard negative pair search row by row over the expanded set (Ko & Gu, CVPR 2020, §3.2).

The blocked search pads every class to the largest class's expanded size; with unequal classes
(random labels, long-tailed data) that box is far larger than the expanded set. This search
follows the expanded set itself, in three dense stages. Every expanded point is
``s·(w₁·x_i + w₂·x_j)`` (EE Eqs. 1-2), so its inner product with any point is two gathered
entries of ``G Wᵀ`` (G: the originals' Gram matrix) and a multiply-add:

- stage 1: the points of every class but the largest ("rows", R of the M points) against every
  point, [R, M] values in memory chunks of rows, reduced over each row class's points (a scatter
  of maxima along rows, values only): the best point of class x against every point, [C, M].
  Search values are symmetric, so the largest class's pairs come from the other side and its
  block, usually the largest, is never computed;
- stage 2: for every class pair (x, y), the best value and the first point of y attaining it
  (a segment reduction over the [C, M] table);
- stage 3: every row point against the point chosen for its class and each y, [R, C] values,
  gives the first point of x attaining the best.

A handful of operations whatever the label pattern (the loop is over memory chunks: one for
usual batches), and no per-pattern structure beyond a few [M] index lists (cached on the layout):
on CPU this is the cheapest search for the small unequal classes of random and long-tailed
batches. Its cost is R·M entries at about four memory passes each; the grouped search
(:mod:`~pml_ext.functional.embedding_expansion_groups`) computes each class pair once with
batched products over the classes' originals, which is cheaper when classes have many points
(n = 8 on classes of similar size); :func:`~pml_ext.functional.use_groups` and
:func:`use_rows` choose. The gradient flows only through the C² selected pairs
(:func:`~pml_ext.functional.embedding_expansion_pairs.selected_pair_values`).

On CPU in float32 / float64, with numba (a dependency), the no-grad
part runs as one compiled kernel instead (:mod:`~pml_ext.functional.embedding_expansion_rows_kernel`,
:func:`compiled_row_search`): the same pairs, without the ~200 tensor operations' fixed costs.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch

from . import embedding_expansion as _ee
from .embedding_expansion import HardestPairs, _mat_from_gram, _originals_best, take
from .compiled import compiled_for
from .embedding_expansion_pairs import point_pair_values, scaled_points, search_values
from .primitives import segment_best

__all__ = ["RowPlan", "row_plan", "row_entries", "compiled_block_entries", "use_rows", "compiled_row_search",
           "hardest_negative_pairs_in_rows"]

# bound on the transient [rows, M] block, in entries (256 kB in float32): with 1 << 18, peak memory
# on random40 / zipf60 batches rose to 1.3x / 2.4x plain MS (RSS growth), at no measurable gain in time
_ROW_CHUNK_ENTRIES = 1 << 16
# The row search is chosen for unequal classes up to this many stage-1 entries (R·M). Measured on
# CPU (B = 128, d = 512, one thread): MS + miner with each search forced on 40 new label patterns
# per range, in random order (``python -m benchmarks.perf_search_crossover``,
# docs/results/perf_search_crossover.txt; medians, rows vs grouped): zipf60 n=2 0.8-1.9M entries 8.3
# vs 9.4 ms (rows faster on 39 of 40), zipf60 n=4 1.4-2.0M 10.4 vs 11.1, 2.0-3.5M 12.2 vs 12.8 (29 of
# 40), random40 n=4 0.8-1.0M 7.8 vs 8.1, random40 n=8 2.0-3.7M 11.5 vs 10.5 (2 of 40). With many
# points per class pair on classes of similar size (n = 8) the grouped search's batched products
# over each class's originals cost less per entry; on long-tailed batches the row search skips the
# one large class. 2M keeps random40 n=8 grouped and sends zipf60 n=4 beyond it there too (~4% slower).
_ROWS_MAX_ENTRIES = 2_000_000
# The compiled row search (numba) is chosen for every pattern of two or more classes whose kernel block
# fits this many entries (64 MB in float32): the kernel holds one class's rows of G Wᵀ at a time, [K, M]
# with K the originals of the largest class it searches from (:func:`compiled_block_entries`); beyond it
# the grouped search, whose batched products run in bounded chunks. The time does not set a bound: the
# kernel is the fastest search measured at every size (``python -m benchmarks.perf_ee --paths --clock
# cpu``, the search alone with its backward, B = 128, d = 512; docs/results/perf_ee_paths.txt): 32x4
# n=2 1.55 ms vs 2.44 (blocked), 16x8 n=8 (12.9M stage-1 entries) 3.23 vs 15.25 (grouped), zipf60 n=8
# (8.4M) 3.89 vs 12.50 (grouped); 4 per class, cosine, B = 256 n = 8 (10.9M) 5.1 vs 14.7 and B = 512
# n = 8 (44M) 21.4 vs 66.7 ms (grouped).
_COMPILED_MAX_BLOCK = 1 << 24
# points per class (M / C) below which the kernel's stage 1 keeps each column point's row point, above
# which stage 3 rescans (kernel alone, in-process, rescan vs tracking: 16x8 n = 2, 64 points per class,
# 0.29 vs 0.26 ms; n = 4, 120, equal; n = 8, 232, 1.74 vs 2.45; zipf60 n = 8, 128, 2.22 vs 2.52)
_TRACK_BELOW = 96


def compiled_row_search(gram: torch.Tensor, layout, kind: str, distance, normalize: bool, normalizing: bool
                        ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]]:
    """The row search's no-grad part by the compiled kernel, on the detached Gram matrix ``gram``:
    ``(best, rows, cols, weights, sq, inverted)``, the first three [C, C] as in
    :class:`~pml_ext.functional.HardestPairs`, every point's endpoint weights [2, M] and squared
    norm [M] with EE Eq. 2's scale folded in (what the selected pairs' values read), and whether
    larger search values are harder. None where it cannot run (numba not installed, not on CPU, a
    dtype NumPy lacks): the search then runs with tensor operations."""
    if not compiled_for(gram.device, gram.dtype):
        return None
    from .embedding_expansion_rows_kernel import row_search  # imports numba (~0.3 s, once)

    first, second, point_class, sizes = _index_arrays(layout)
    w_first, w_second = _weight_arrays(layout, gram.dtype)
    largest = int(np.argmax(sizes)) if sizes.size else 0  # the first largest, as row_plan
    out = row_search(gram.numpy(), first, second, w_first, w_second, point_class, layout.first_index.numpy(),
                     layout.num_classes, largest, normalizing, kind == "euclidean", normalize,
                     bool(distance.normalize_embeddings), bool(distance.is_inverted), float(distance.power),
                     _TRACK_BELOW)
    return (*(torch.from_numpy(a) for a in out[:5]), bool(out[5]))



def _index_arrays(layout):
    """(first, second, point_class, class_sizes) of a layout as NumPy arrays: the ones numpy_layout
    keeps, else from its tensors."""
    arrays = layout._extras.get("numpy")  # numpy_layout's
    if arrays is not None:
        first, second, _, _, point_class, sizes = arrays
        return first, second, point_class, sizes
    ex = layout.expanded
    first = ex.first.cpu().numpy()
    return first, ex.second.cpu().numpy(), layout.classes.cpu().numpy()[first], layout.class_sizes.cpu().numpy()


def _weight_arrays(layout, dtype: torch.dtype):
    """(w_first, w_second) of a layout as NumPy arrays of ``dtype`` (float32 or float64)."""
    arrays = layout._extras.get("numpy")
    if arrays is not None and arrays[2].dtype == (np.float32 if dtype == torch.float32 else np.float64):
        return arrays[2], arrays[3]
    ex = layout.expanded
    return ex.w_first.to(dtype).cpu().numpy(), ex.w_second.to(dtype).cpu().numpy()


class _CompiledPairValues(torch.autograd.Function):
    """The selected pairs' values, differentiable through the Gram matrix, by two compiled loops
    (:func:`~pml_ext.functional.embedding_expansion_rows_kernel.pair_values` and its backward): the
    arithmetic of :class:`~pml_ext.functional.embedding_expansion_pairs._SelectedPairs` without its
    ~25 tensor operations (gathers of the pairs' endpoints, weights and norms, index arithmetic)."""

    @staticmethod
    def forward(ctx, gram, rows, cols, first, second, weights, sq, synthetic_from: int, euclidean: bool, power: float):
        from .embedding_expansion_rows_kernel import pair_values

        arrays = (rows.numpy(), cols.numpy(), first, second, weights.numpy())
        out, value, base = pair_values(gram.detach().numpy(), *arrays, sq.numpy(), synthetic_from, euclidean, power)
        ctx.arrays, ctx.saved = arrays, (value, base, synthetic_from, euclidean, power)
        ctx.b = gram.shape[0]
        return torch.from_numpy(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, u):
        from .embedding_expansion_rows_kernel import pair_values_backward

        grad = pair_values_backward(u.contiguous().numpy(), ctx.b, *ctx.arrays, *ctx.saved)
        return torch.from_numpy(grad), None, None, None, None, None, None, None, None, None


def compiled_pair_values(gram: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, layout, weights: torch.Tensor,
                         sq: torch.Tensor, normalizing: bool, kind: str, power) -> torch.Tensor:
    """[C, C] values of the pairs (``rows``, ``cols``) that :func:`compiled_row_search` selected,
    differentiable through ``gram`` (CPU, float32 / float64; the caller checked)."""
    first, second = _index_arrays(layout)[:2]
    m = first.shape[0]
    synthetic_from = layout.expanded.num_originals if normalizing else m
    return _CompiledPairValues.apply(gram, rows, cols, first, second, weights, sq, synthetic_from,
                                     kind == "euclidean", float(power))


class RowPlan(NamedTuple):
    """The label pattern's index lists for the row search (built once per pattern)."""

    point_class: torch.Tensor  # [M] class of every expanded point
    rows: torch.Tensor  # [R] the points of every class but the largest (expanded-set indices)
    row_ends: torch.Tensor  # [2, R] their two originals
    row_class: torch.Tensor  # [R]
    # [2, R, 1] flat offsets of their originals' rows in the [B, M] matrix G Wᵀ, int32 when B·M allows
    # (stage 3's [2, R, C] index from them is the search's largest transient after G Wᵀ)
    row_offsets: torch.Tensor
    endpoints: torch.Tensor  # [2, M] every point's two originals
    weights: torch.Tensor  # [2, M] their weights (EE Eq. 1)
    norm_index: torch.Tensor  # [3, M] flat Gram indices of (f, f), (f, s), (s, s) for every point's norm
    norm_weights: torch.Tensor  # [3, M] their weights w_f², 2·w_f·w_s, w_s²
    largest: int  # the class whose pairs are searched from the other side


def row_plan(layout) -> RowPlan:
    """The :class:`RowPlan` of a :class:`~pml_ext.functional.BatchLayout` (cached on it)."""
    return layout.extra("rows", _build_plan, keep=False)


def row_entries(layout) -> int:
    """Stage-1 entries of the row search, R·M (the cost model's measure), from class sizes alone."""
    sizes = layout.class_sizes.tolist()
    return (sum(sizes) - max(sizes)) * sum(sizes) if sizes else 0


def compiled_block_entries(layout) -> int:
    """Entries of the compiled row search's largest transient, one class's rows of G Wᵀ: the
    originals of the largest class it searches from (every class but the first largest, whose pairs
    it takes from the other side) times the expanded set's M points."""
    sizes = layout.class_sizes.tolist()
    if len(sizes) < 2:
        return 0
    classes = layout.classes
    counts = (np.bincount(classes.numpy(), minlength=len(sizes)) if classes.device.type == "cpu"
              else torch.bincount(classes, minlength=len(sizes))).tolist()
    del counts[sizes.index(max(sizes))]
    return max(counts) * sum(sizes)


def use_rows(layout) -> bool:
    """Whether the row search is the one to use for this label pattern. By the compiled kernel
    (CPU, float32 / float64, numba installed): any pattern of two or more classes whose kernel block
    fits _COMPILED_MAX_BLOCK entries. With tensor operations: classes of unequal expanded size
    (equal classes have no padding in the blocked search, whose few large batched products are then
    cheaper) and at most _ROWS_MAX_ENTRIES stage-1 entries (beyond that the grouped search's batched
    products over each class's originals cost less per entry). Cached on the layout."""
    compiled = compiled_for(layout.classes.device, layout.expanded.w_first.dtype)

    def choose(lay) -> bool:
        sizes = lay.class_sizes.tolist()  # a few Python numbers: no tensor operation per call
        if len(sizes) < 2:
            return False
        if compiled:
            return compiled_block_entries(lay) <= _COMPILED_MAX_BLOCK
        return min(sizes) != max(sizes) and row_entries(lay) <= _ROWS_MAX_ENTRIES
    return layout.extra(("use_rows", compiled), choose)


def _build_plan(layout) -> RowPlan:
    """The plan's index lists with NumPy (a few hundred integers, paid once per label pattern: every
    step for random batches, where each tensor operation's fixed cost would dominate), from the
    NumPy arrays a layout built with NumPy keeps; the weights in the layout's dtype."""
    ex, device = layout.expanded, layout.classes.device
    b, m = ex.num_originals, ex.labels.numel()
    f, s, point_class, sizes = _index_arrays(layout)
    largest = int(np.argmax(sizes)) if layout.num_classes else 0  # the first largest
    rows = np.flatnonzero(point_class != largest)
    row_ends = np.stack([f[rows], s[rows]])

    def t(a):
        return torch.from_numpy(a).to(device)

    if "numpy" in layout._extras:  # float32 or float64: NumPy too
        wf, ws = _weight_arrays(layout, ex.w_first.dtype)
        weights, norm_weights = t(np.stack([wf, ws])), t(np.stack([wf * wf, 2 * wf * ws, ws * ws]))
    else:  # any dtype (bfloat16 has no NumPy type)
        wf, ws = ex.w_first, ex.w_second
        weights, norm_weights = torch.stack([wf, ws]), torch.stack([wf * wf, 2 * wf * ws, ws * ws])
    offsets = (row_ends[..., None] * m).astype(np.int32 if b * m < 1 << 31 else np.int64)
    return RowPlan(t(point_class), t(rows), t(row_ends), t(point_class[rows]), t(offsets),
                   t(np.stack([f, s])), weights, t(np.stack([f * b + f, f * b + s, s * b + s])), norm_weights,
                   largest)


def hardest_negative_pairs_in_rows(embeddings: torch.Tensor, layout, distance, kind: str,
                                   normalize: bool = True, originals_best: bool = False) -> HardestPairs:
    """EE's hard negative pair mining (§3.2) by the row search (module docstring): the same
    result as the blocked search off the diagonal (up to exact ties). On the diagonal (a class
    against itself, which no loss uses) every class gets its first original paired with itself.
    The no-grad search runs as one compiled kernel where it can (:func:`compiled_row_search`),
    else with tensor operations; the selected pairs' values are differentiable either way."""
    ex, c = layout.expanded, layout.num_classes
    gram = _ee.normalized_gram(embeddings, distance)
    normalizing = normalize and ex.has_synthetic
    gd = gram.detach()
    found = compiled_row_search(gd, layout, kind, distance, normalize, normalizing)
    compiled = found is not None
    if not compiled:
        found = _search_with_tensors(gd, layout, kind, distance, normalize, normalizing)
    best, rows, cols, w, sq, inverted = found
    best_orig = None
    if originals_best:
        transform, _, worst = search_values(sq, kind, distance, normalize)
        best_orig = _originals_best(gd, layout.classes, c, transform, inverted, worst)
    if compiled:
        hardest = compiled_pair_values(gram, rows, cols, layout, w, sq, normalizing, kind, distance.power)
    else:
        endpoints = torch.stack([ex.first, ex.second])
        hardest = point_pair_values(gram, rows, cols, endpoints, w, sq, ex.is_synthetic if normalizing else None,
                                    layout.class_eye, kind, distance.power)
    return HardestPairs(hardest, rows, cols, best, best_orig, inverted, layout,
                        _mat_from_gram(gram, kind, distance.power))


@torch.no_grad()
def _search_with_tensors(gd: torch.Tensor, layout, kind: str, distance, normalize: bool, normalizing: bool):
    """The row search's no-grad part with tensor operations (module docstring's three stages):
    what :func:`compiled_row_search` returns."""
    ex, c = layout.expanded, layout.num_classes
    m = ex.labels.numel()
    plan = row_plan(layout)
    sq = (take(gd, plan.norm_index) * plan.norm_weights.to(gd.dtype)).sum(0)  # [M] squared norms before EE Eq. 2
    # EE Eqs. 1-2; gt[j, p] = <original j, point p>
    w, sq, _, gt = scaled_points(gd, plan.endpoints, plan.weights.to(gd.dtype), sq, ex.is_synthetic, normalizing)
    transform, inverted, worst = search_values(sq, kind, distance, normalize)

    rows, row_class = plan.rows, plan.row_class
    fr, sr = plan.row_ends
    (wfr, wsr), sqr = w.index_select(1, rows), sq.index_select(0, rows)
    r_n = rows.numel()
    best_cp = gd.new_full((c, m), worst)  # [row class, point]: best of the class's points against it
    step = max(1, _ROW_CHUNK_ENTRIES // max(1, m))
    for lo in range(0, r_n, step):  # memory chunks of rows (one for usual batches)
        hi = min(r_n, lo + step)
        v = gt.index_select(0, fr[lo:hi]).mul_(wfr[lo:hi, None])
        v = transform(v.addcmul_(gt.index_select(0, sr[lo:hi]), wsr[lo:hi, None]),
                      lambda: sqr[lo:hi, None], lambda: sq)
        # self as wide as src: torch 2.14.1's CPU fast path for an expanded index writes wrong
        # entries when self is wider (checked 2026-12-02 against a loop; a materialised index is right)
        best_cp.scatter_reduce_(0, row_class[lo:hi, None].expand_as(v), v, "amax" if inverted else "amin")
    # stage 2: [x, y] the best over y's points, and the first point attaining it
    best_pc = best_cp.t().contiguous()
    del best_cp  # peak memory: one [C, M] table at a time
    best, cols = (t.t() for t in segment_best(best_pc, plan.point_class, c, inverted, worst))
    del best_pc
    # stage 3: every row point against the point chosen for its class and each y: the first best one
    target = cols.to(plan.row_offsets.dtype).index_select(0, row_class)  # [R, C]
    ends_rc = take(gt, plan.row_offsets + target)  # [2, R, C] the row points' originals against the targets
    v = transform(ends_rc[0].mul_(wfr[:, None]).addcmul_(ends_rc[1], wsr[:, None]), lambda: sqr[:, None],
                  lambda: take(sq, target))
    rows = take(rows, segment_best(v, row_class, c, inverted, worst)[1]) if r_n else torch.zeros_like(cols)
    # the largest class's pairs from the other side; every class against itself: its first original
    big, first, eye = plan.largest, layout.first_index, layout.class_eye
    rows[big], cols[big], best[big] = cols[:, big].clone(), rows[:, big].clone(), best[:, big].clone()
    rows = torch.where(eye, first[:, None], rows)
    cols = torch.where(eye, first[None, :], cols)
    sq_first = take(sq, first)
    best.diagonal().copy_(transform(sq_first, lambda: sq_first, lambda: sq_first))
    return best, rows, cols, w, sq, inverted
