"""The hard negative pair mining of Embedding Expansion (Ko & Gu, CVPR 2020, §3.2) as a PML miner."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from pytorch_metric_learning.miners import BaseMiner

from .. import functional as F

__all__ = ["EmbeddingExpansionMiner", "HardenedBatch"]


class HardenedBatch(NamedTuple):
    """What EE mining yields for one batch (tensors keep their graph)."""

    classes: torch.Tensor  # [B] class index of every original, 0..C-1
    unique_labels: torch.Tensor  # [C]
    hardest: torch.Tensor  # [C, C] hardest value between the expanded sets of two classes
    expanded: F.ExpandedSet
    expanded_mat: torch.Tensor  # [M, M] the distance over originals + synthetic points


class EmbeddingExpansionMiner(BaseMiner):
    """Hard negative pair mining over originals and internal division points (EE, Eqs. 1-2, §3.2).

    For every pair of classes (a, b) it finds the hardest pair (p, q), p in a's expanded set
    (originals + synthetic points), q in b's: the smallest distance, or the largest similarity
    for an inverted distance.

    Args:
        n_points: synthetic points per same-class pair (paper default 2; 0 = originals only).
        normalize: L2-normalise the synthetic points (EE Eq. 2; paper default on).
        pairs: ``"all"`` same-class pairs (paper) or ``"adjacent"`` disjoint consecutive pairs
            per class (official code).
        distance, collect_stats: as for every PML miner.

    ``miner(embeddings, labels)`` returns PML's pair tuple ``(a1, p, a2, n)``: ``a1, p`` are the
    positive pairs of the batch; ``a2, n`` index the *expanded set* (originals ``0..B-1``, then
    the synthetic points, in the order of :func:`pml_ext.functional.expand`) and give the hardest
    pair of every ordered class pair. :meth:`harden` gives the differentiable hardest values that
    :class:`pml_ext.losses.EmbeddingExpansionLoss` uses.

    Recorded statistics (``collect_stats=True``): ``num_synthetic``, ``num_class_pairs`` and
    ``synthetic_selection_ratio``, the fraction of class pairs whose hardest pair involves a
    synthetic point (strictly harder than the hardest original pair; the paper's Fig. 5).
    """

    def __init__(self, n_points: int = 2, normalize: bool = True, pairs: str = "all", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(n_points, int) or isinstance(n_points, bool) or n_points < 0:
            raise ValueError(f"n_points must be an int >= 0, got {n_points!r}")
        if pairs not in F.PAIR_MODES:
            raise ValueError(f"pairs must be one of {F.PAIR_MODES}, got {pairs!r}")
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be a bool, got {normalize!r}")
        self.n_points = n_points
        self.normalize = normalize
        self.pairs = pairs
        self.add_to_recordable_attributes(list_of_names=["n_points"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["num_synthetic", "num_class_pairs", "synthetic_selection_ratio"],
            is_stat=True,
        )

    def harden(self, embeddings: torch.Tensor, labels: torch.Tensor, distance=None) -> HardenedBatch:
        """Differentiable per-class-pair hardest values over the expanded batch."""
        distance = self.distance if distance is None else distance
        unique, classes = F.class_indices(labels)
        ex = F.expand(labels, self.n_points, self.pairs, embeddings.dtype)
        ex_classes = torch.cat([classes, classes[ex.first[ex.num_originals :]]])
        mat = F.expanded_distance_matrix(embeddings, ex, distance, self.normalize)
        hardest = F.class_pair_hardest(mat, ex_classes, ex_classes, unique.numel(), distance.is_inverted)
        if self.collect_stats:
            self._record_stats(mat, classes, hardest, ex, distance.is_inverted)
        return HardenedBatch(classes, unique, hardest, ex, mat)

    @torch.no_grad()
    def _record_stats(self, mat, classes, hardest, ex, inverted):
        b, c = ex.num_originals, hardest.shape[0]
        self.num_synthetic = int(ex.is_synthetic.sum())
        off_diag = ~torch.eye(c, dtype=torch.bool, device=mat.device)
        self.num_class_pairs = int(off_diag.sum())
        if self.num_class_pairs == 0:
            self.synthetic_selection_ratio = 0.0
            return
        originals_only = F.class_pair_hardest(mat[:b, :b], classes, classes, c, inverted)
        harder = hardest > originals_only if inverted else hardest < originals_only
        self.synthetic_selection_ratio = float(harder[off_diag].float().mean())

    def mine(self, embeddings, labels, ref_emb, ref_labels) -> Tuple[torch.Tensor, ...]:
        if ref_emb is not embeddings:
            raise ValueError("EmbeddingExpansionMiner does not support ref_emb: it expands one batch")
        hb = self.harden(embeddings, labels)
        same = labels[:, None] == labels[None, :]
        same.fill_diagonal_(False)
        a1, p = same.nonzero(as_tuple=True)
        a2, n = _argbest_per_class_pair(hb, self.distance.is_inverted)
        return a1, p, a2, n


def _argbest_per_class_pair(hb: HardenedBatch, inverted: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(row, col) in the expanded set of the hardest pair of every ordered class pair a != b."""
    mat, ex = hb.expanded_mat, hb.expanded
    m = mat.shape[0]
    c = hb.hardest.shape[0]
    ex_classes = torch.cat([hb.classes, hb.classes[ex.first[ex.num_originals :]]])
    pair_id = ex_classes[:, None] * c + ex_classes[None, :]
    is_best = (mat == hb.hardest.flatten()[pair_id]) & (ex_classes[:, None] != ex_classes[None, :])
    flat = torch.arange(m * m, device=mat.device).view(m, m)
    first_best = torch.full((c * c,), m * m, dtype=torch.long, device=mat.device)
    first_best = first_best.scatter_reduce(0, pair_id[is_best], flat[is_best], "amin")
    first_best = first_best[first_best < m * m]
    return first_best // m, first_best % m
