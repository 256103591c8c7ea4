"""EE's hard negative pair search over groups of equal-size classes (Ko & Gu, CVPR 2020, §3.2).

The blocked search (:func:`~pml_ext.functional.hardest_negative_pairs_in_layout`) pads every class to
the largest class's expanded size K and searches C²K² entries. That is exact work for balanced
batches, but with unequal classes (random labels, long-tailed data) the padded box is far larger
than the M² pairs of the expanded set that exists: with ``pairs="all"`` a class of k samples has
k + n·k(k−1)/2 points, so one large class sets K for all. Here the cost follows the expanded set:

- the expanded points are reordered class by class, classes by ascending expanded size, and
  classes are grouped by size (equal sizes share a group without padding; neighbouring sizes are
  merged when one more group costs more than its padding: :func:`_partition`, a dynamic
  programme over the distinct sizes);
- stage 1: for every group, the inner products of its points with every point from the group's
  own first one on, ``W_g · G[originals_g, :]`` (a batched product over each class's originals,
  as in the blocked search), reduced over each class's points (values only): the best point of
  every class against every later point, [C, M]. Search values are symmetric, so a pair of
  classes in different groups is searched once (from the smaller class's group), and a class
  alone in its group is not searched against itself (no loss reads the diagonal);
- stage 2: for every class pair, the best row point (two scatter reductions over [C, M]);
- stage 3: the chosen points against every point of the other class of their pair give the other
  point (one batched product per group over each class's originals, C·M values in all); pairs
  searched from the other side are mirrored.

For the label patterns the row search (:mod:`~pml_ext.functional.embedding_expansion_rows`) does
not take (equal classes, or many points per class: :func:`~pml_ext.functional.search_path`),
:func:`use_groups` chooses between this search and the blocked one from the label pattern alone (a
cost model of both searches' entries and fixed work). The gradient flows only through the C²
selected pairs, from the endpoints of their points
(:func:`~pml_ext.functional.embedding_expansion_pairs.selected_pair_values`).
"""
from __future__ import annotations

from typing import List, NamedTuple

import numpy as np
import torch

from . import embedding_expansion as _ee
from .embedding_expansion import HardestPairs, _mat_from_gram, _originals_best, _sq_norms, take
from .embedding_expansion_pairs import point_pair_values, scaled_points, search_values
from .primitives import segment_best

__all__ = ["ClassGroup", "ClassGroups", "class_groups", "use_groups", "hardest_negative_pairs_in_groups"]

# Cost model, in units of one stage-1 search entry. Measured on CPU (B = 128, d = 512, one thread;
# ``python -m benchmarks.perf_ee --paths`` times both searches side by side): an entry costs about
# the same in both searches (~1 ns, batched products), the grouped search has ~0.4 ms more fixed
# work (stage 2/3, the ordering) and each group adds a few small operations; a padded blocked
# search (classes of unequal size) masks its padding and costs ~4x per entry; each memory chunk of
# the blocked search costs ~0.1 ms more. Equal classes take the blocked search (no padding) unless
# it runs in more than 8 memory chunks: measured in the losses (``perf_ee --n-points``), 16x8 with
# n=2 (8 chunks) is faster blocked (N-pair 2.4 vs 2.6 ms), 16x8 with n=4 (16 chunks) and 32x4
# with n=8 (32) grouped (3.7 vs 5.0 ms, 3.6 vs 5.5 ms).
_EQUAL_CLASSES_MAX_CHUNKS = 8
_BLOCKED_PADDED_ENTRY_COST = 4.0
_BLOCKED_CHUNK_COST = 100_000
_GROUPED_FIXED_COST = 400_000
_GROUP_COST = 50_000
_SEARCH_CHUNK_ENTRIES = 1 << 17  # bound on the transient stage-1 block, in entries (512 kB in float32)


class ClassGroup(NamedTuple):
    """Classes searched together, their points at positions of :attr:`ClassGroups.order`.
    ``slots[c, s]`` is the position of the s-th point of the group's c-th class; a class smaller
    than the group's size repeats its last point (a duplicate changes no minimum or maximum), so
    no slot is masked. ``weights[c, s]`` writes that point over the class's originals
    ``originals[c]`` (batch indices, the last repeated with weight 0), as in
    :class:`~pml_ext.functional.BatchLayout`. Stage 1 searches the group's points against
    positions ``row_start..M-1``: the points of its own group (when it has several classes) and of
    every later group; a pair of classes in different groups is searched once, from the earlier
    (smaller) group."""

    classes: torch.Tensor  # [C_g] class indices
    slots: torch.Tensor  # [C_g, K_g] positions
    weights: torch.Tensor  # [C_g, K_g, k_g] (EE Eq. 1, before Eq. 2's scaling)
    originals: torch.Tensor  # [C_g·k_g] batch indices
    row_start: int


class ClassGroups(NamedTuple):
    """The expanded set reordered class by class, classes by ascending expanded size."""

    order: torch.Tensor  # [M] expanded-set index at each position
    point_class: torch.Tensor  # [M] class of the point at each position
    first: torch.Tensor  # [M] the point's two originals and their weights, by position
    second: torch.Tensor
    w_first: torch.Tensor
    w_second: torch.Tensor
    synthetic: torch.Tensor  # [M] bool
    alone: torch.Tensor  # [C] bool: the class is alone in its group (its own pairs are not searched)
    direct: torch.Tensor  # [C, C] bool: pair (x, y) searched with x's points as rows (group x >= group y)
    mirror: torch.Tensor  # [C, C] bool: searched from the other side (group x < group y)
    first_position: torch.Tensor  # [C] position of each class's first point
    endpoints: torch.Tensor  # [2, M] first and second original of each point, by position
    endpoint_weights: torch.Tensor  # [2, M] their weights (EE Eq. 1)
    has_synthetic: bool
    groups: List[ClassGroup]

    def entries(self) -> int:
        """Stage-1 search entries (the cost model's measure)."""
        m = self.order.numel()
        return sum(g.slots.numel() * (m - g.row_start) for g in self.groups)


def _partition(sizes: List[int], counts: List[int], m: int) -> List[int]:
    """Ends of the groups over the distinct class sizes sorted ascending (indices into ``sizes``,
    exclusive): the grouping with the fewest stage-1 entries plus _GROUP_COST per group (dynamic
    programme over the distinct sizes, a handful). A group of sizes i..j-1 pads its classes to
    sizes[j-1] and searches them against every point from its own first one (after its own points
    when it holds one class)."""
    d = len(sizes)
    classes, points = [0], [0]  # prefix counts of classes and of points
    for size, n in zip(sizes, counts):
        classes.append(classes[-1] + n)
        points.append(points[-1] + n * size)
    best, cut = [0.0] + [float("inf")] * d, [0] * (d + 1)
    for j in range(1, d + 1):
        for i in range(j):
            n_classes = classes[j] - classes[i]
            rows = m - points[i] - (sizes[j - 1] if n_classes == 1 else 0)
            cost = best[i] + sizes[j - 1] * n_classes * rows + _GROUP_COST
            if cost < best[j]:
                best[j], cut[j] = cost, i
    ends, j = [], d
    while j > 0:
        ends.append(j)
        j = cut[j]
    return ends[::-1]


def class_groups(layout) -> ClassGroups:
    """The class groups of a :class:`~pml_ext.functional.BatchLayout` (cached on it)."""
    return layout.extra("groups", _build_groups)


def _build_groups(layout) -> ClassGroups:
    """The groups of a label pattern, built on the CPU with NumPy: index arithmetic over a few
    hundred integers, paid once per pattern (every step for random batches), where each of the
    ~50 steps would cost a tensor operation's fixed overhead."""
    ex, c, device = layout.expanded, layout.num_classes, layout.classes.device
    b, m = ex.num_originals, ex.labels.numel()
    sizes = layout.class_sizes.cpu().numpy()
    classes = layout.classes.cpu().numpy()
    e_first, e_second = ex.first.cpu().numpy(), ex.second.cpu().numpy()
    by_size = np.argsort(sizes, kind="stable")
    sorted_sizes = sizes[by_size]
    rank = np.empty_like(by_size)
    rank[by_size] = np.arange(c)
    order = np.argsort(rank[classes[e_first]], kind="stable")  # class by class, originals first
    first, second = e_first[order], e_second[order]
    # the weights in float64 (NumPy has no bfloat16), back in the layout's dtype below: EE Eq. 1's
    # k/(n+1) and their sums with 0 are exact in both
    w_first, w_second = ex.w_first.cpu().double().numpy()[order], ex.w_second.cpu().double().numpy()[order]
    start = np.cumsum(sorted_sizes) - sorted_sizes  # [C] first position, by rank
    k_sizes = np.bincount(classes, minlength=c)[by_size]  # originals per class, by rank
    distinct, counts = np.unique(sorted_sizes, return_counts=True)
    distinct, counts = distinct.tolist(), counts.tolist()
    # the groups: classes, points per class, originals per class, first searched position
    n_g, big_k, small_k, row_starts = [], [], [], []
    k_run = np.maximum.accumulate(k_sizes).tolist() if c else []  # originals of the largest so far
    first_size, first_rank, first_point = 0, 0, 0
    for end in _partition(distinct, counts, m) if m else []:
        n = sum(counts[first_size:end])
        n_g.append(n)
        big_k.append(distinct[end - 1])
        small_k.append(k_run[first_rank + n - 1])
        row_starts.append(first_point if n > 1 else first_point + distinct[end - 1])
        first_point += sum(cn * sz for cn, sz in zip(counts[first_size:end], distinct[first_size:end]))
        first_size, first_rank = end, first_rank + n
    # every group at once, flattened class by class (by rank): slots, weights, originals
    per_class_k = np.repeat(np.array(big_k, dtype=np.int64), n_g)
    per_class_k_orig = np.repeat(np.array(small_k, dtype=np.int64), n_g)
    cls = np.repeat(np.arange(c), per_class_k)  # rank of each slot
    slot = np.arange(cls.size) - (np.cumsum(per_class_k) - per_class_k)[cls]
    slots = start[cls] + np.minimum(slot, sorted_sizes[cls] - 1)  # [Σ C_g·K_g] positions
    original_slots = layout._original_slots.cpu().numpy()  # [C, k] batch indices, padding = B
    place = np.zeros(b + 1, dtype=np.int64)  # every original's place among its class's originals
    place[original_slots] = np.broadcast_to(np.arange(original_slots.shape[1]), original_slots.shape)
    rows = per_class_k_orig[cls]
    base = np.cumsum(rows) - rows  # each slot's weight row
    w = np.zeros(int(rows.sum()), dtype=w_first.dtype)
    np.add.at(w, base + place[first[slots]], w_first[slots])
    np.add.at(w, base + place[second[slots]], w_second[slots])
    cls_o = np.repeat(np.arange(c), per_class_k_orig)
    i = np.arange(cls_o.size) - (np.cumsum(per_class_k_orig) - per_class_k_orig)[cls_o]
    members = original_slots[by_size[cls_o], np.minimum(i, k_sizes[cls_o] - 1)]  # the last repeated, weight 0
    group = np.repeat(np.arange(len(n_g)), n_g)[rank]  # [C] by class
    alone = np.repeat(np.array(n_g) == 1, n_g)[rank]
    same_group = group[:, None] == group[None, :]
    direct = (group[:, None] > group[None, :]) | (same_group & ~(np.eye(c, dtype=bool) & alone[:, None]))

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    def tw(a):
        return t(a).to(ex.w_first.dtype)

    split = np.cumsum([0] + [n * kk for n, kk in zip(n_g, big_k)])
    split_w = np.cumsum([0] + [n * kk * k for n, kk, k in zip(n_g, big_k, small_k)])
    split_o = np.cumsum([0] + [n * k for n, k in zip(n_g, small_k)])
    split_c = np.cumsum([0] + n_g)
    groups = [ClassGroup(t(by_size[split_c[j]:split_c[j + 1]]), t(slots[split[j]:split[j + 1]]).view(n, kk),
                         tw(w[split_w[j]:split_w[j + 1]]).view(n, kk, k), t(members[split_o[j]:split_o[j + 1]]), rs)
              for j, (n, kk, k, rs) in enumerate(zip(n_g, big_k, small_k, row_starts))]
    return ClassGroups(t(order), t(classes[first]), t(first), t(second), tw(w_first), tw(w_second),
                       t(ex.is_synthetic.cpu().numpy()[order]), t(alone), t(direct),
                       t(group[:, None] < group[None, :]), t(start[rank]), t(np.stack([first, second])),
                       tw(np.stack([w_first, w_second])), ex.has_synthetic, groups)


def use_groups(layout) -> bool:
    """Whether the grouped search is expected to be cheaper than the blocked one for this label
    pattern (from class sizes only; the answer is cached on the layout)."""
    return layout.extra("use_groups", _choose)


def _choose(layout) -> bool:
    sizes = layout.class_sizes
    c, m = layout.num_classes, int(sizes.sum())
    if c == 0 or m == 0:
        return False
    kk = int(sizes.max())
    classes_per_chunk = max(1, _ee._SEARCH_CHUNK_ENTRIES // max(1, c * kk * kk))
    chunks = -(-c // classes_per_chunk)
    if int(sizes.min()) == kk:
        # equal classes: the blocked search has no padding; it loses only when it runs in many
        # memory chunks (many points per class: 16x8 with n=4, 32x4 with n=8)
        return chunks > _EQUAL_CLASSES_MAX_CHUNKS
    k = int(torch.bincount(layout.classes, minlength=c).max())
    blocked = _BLOCKED_PADDED_ENTRY_COST * (c * kk) * (c * kk + c * k)  # the [C, C, K, K] search and W·G
    blocked += _BLOCKED_CHUNK_COST * chunks
    # every pair of points of different classes is searched at least once
    if blocked <= _GROUPED_FIXED_COST + (m * m - int((sizes * sizes).sum())) / 2:
        return False
    groups = class_groups(layout)
    return groups.entries() + _GROUP_COST * len(groups.groups) + _GROUPED_FIXED_COST < blocked


def hardest_negative_pairs_in_groups(embeddings: torch.Tensor, layout, distance, kind: str,
                                     normalize: bool = True, originals_best: bool = False) -> HardestPairs:
    """EE's hard negative pair mining (§3.2) by the grouped search (module docstring); the same
    result as :func:`~pml_ext.functional.hardest_negative_pairs_in_layout` off the diagonal (up
    to exact ties). On the diagonal (a class against itself, which no loss uses) a class alone
    in its group gets its first point paired with itself.

    Stage 1 computes, group by group, only the best value of each class against every later
    point (values, no indices: a plain reduction over the slots). Stage 2 finds, for every class
    pair, the best point on one side from that [C, M] table; stage 3 computes, group by group, the
    values of those points against every point of the other class (C·M values in all) to find the
    point on the other side. Pairs searched from the other side are mirrored (the search values
    are symmetric).
    """
    ex, c = layout.expanded, layout.num_classes
    m = ex.labels.numel()
    grouped = class_groups(layout)
    gram = _ee.normalized_gram(embeddings, distance)
    normalizing = normalize and grouped.has_synthetic
    with torch.no_grad():
        gd = gram.detach()
        order, point_class = grouped.order, grouped.point_class
        # everything below is in position order
        endpoint_weights = grouped.endpoint_weights.to(gd.dtype)  # EE Eq. 1
        sq = _sq_norms(gd, grouped.first, grouped.second, *endpoint_weights)  # [M] squared norms before EE Eq. 2
        # EE Eq. 2; gt[j, p] = <original j, point at position p>
        point_weights, sq, scale, gt = scaled_points(gd, grouped.endpoints, endpoint_weights, sq, grouped.synthetic,
                                                     normalizing)
        transform, inverted, worst = search_values(sq, kind, distance, normalize)

        def group_weights(g: ClassGroup) -> torch.Tensor:
            """[C_g, K_g, k_g] the group's points over their classes' originals, EE Eq. 2 included."""
            w = g.weights.to(gd.dtype)
            return w if scale is None else w * take(scale, g.slots)[..., None]

        def against(g: ClassGroup, w: torch.Tensor, lo: int, hi: int):
            """Search values of classes lo..hi-1 of group g against positions g.row_start..M-1,
            [classes, K_g, positions]: a batched product over each class's originals."""
            k = w.shape[2]
            rows = gt[:, g.row_start:].index_select(0, g.originals[lo * k:hi * k]).view(hi - lo, k, -1)
            return transform(torch.bmm(w[lo:hi], rows), lambda: take(sq, g.slots[lo:hi])[..., None],
                             lambda: sq[g.row_start:])

        def best_points(g: ClassGroup, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            """[C_g, C] the first point (a position) of each class of g that is best against
            ``targets[c, y]``, one point per class y: a batched product over each class's originals."""
            cg, k = w.shape[0], w.shape[2]
            lin = g.originals.view(cg, k, 1) * m + targets[:, None, :]  # gt[original, target]
            r = torch.bmm(take(gt, lin).transpose(1, 2), w.transpose(1, 2))  # [C_g, C, K_g]
            vals = transform(r, lambda: take(sq, targets)[..., None], lambda: take(sq, g.slots)[:, None, :])
            _, slot = (torch.max if inverted else torch.min)(vals, dim=2)
            return g.slots.gather(1, slot)

        reduce = torch.amax if inverted else torch.amin
        best_cp = gd.new_full((c, m), worst)  # best value of each class's points against each point
        searched = [g for g in grouped.groups if g.row_start < m]  # the last, largest class alone:
        weights = [group_weights(g) for g in searched]  # its pairs were searched from the other side
        for g, w in zip(searched, weights):
            cg, kg = g.slots.shape
            step = max(1, _SEARCH_CHUNK_ENTRIES // max(1, kg * (m - g.row_start)))
            for lo in range(0, cg, step):  # memory chunks of classes (one for usual batches)
                best_cp[g.classes[lo:lo + step], g.row_start:] = reduce(against(g, w, lo, min(cg, lo + step)), dim=1)
        # stage 2: [column class y, row class x]: best over x's points, and the first point attaining it
        best_yx, rows_yx = (t.t() for t in segment_best(best_cp.t().contiguous(), point_class, c, inverted, worst))
        # stage 3: every point of class x against the point of y chosen for (x, y): the first best
        # one, group by group (a class searched only from the other side is skipped: never read)
        cols = torch.zeros_like(rows_yx)  # [x, y], transposed below
        for g, w in zip(searched, weights):
            cols[g.classes] = best_points(g, w, rows_yx.index_select(0, g.classes))
        rows, cols = rows_yx.t(), cols.t()
        # pairs searched from the other side are mirrored; a class alone in its group is paired with
        # its first point on the diagonal
        direct, mirror, first = grouped.direct, grouped.mirror, grouped.first_position
        rows, cols = (torch.where(direct, rows, torch.where(mirror, cols.t(), first[:, None])),
                      torch.where(direct, cols, torch.where(mirror, rows.t(), first[None, :])))
        best = torch.where(direct, best_yx.t(), best_yx)
        if bool(grouped.alone.any()):
            sq_first = take(sq, first)
            self_value = transform(sq_first, lambda: sq_first, lambda: sq_first)
            best.diagonal().copy_(torch.where(grouped.alone, self_value, best.diagonal()))
        best_orig = _originals_best(gd, layout.classes, c, transform, inverted, worst) if originals_best else None
    # the pairs' values from their positions; the pairs as expanded-set indices
    hardest = point_pair_values(gram, rows, cols, grouped.endpoints, point_weights, sq,
                                grouped.synthetic if normalizing else None, rows == cols, kind, distance.power)
    return HardestPairs(hardest, take(order, rows), take(order, cols), best, best_orig, inverted, layout,
                        _mat_from_gram(gram, kind, distance.power))

