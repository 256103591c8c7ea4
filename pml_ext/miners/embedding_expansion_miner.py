"""The hard negative pair mining of Embedding Expansion (Ko & Gu, CVPR 2020, §3.2) as a PML miner."""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
from pytorch_metric_learning.miners import BaseMiner

from .. import functional as F

__all__ = ["EmbeddingExpansionMiner", "HardenedBatch"]


class HardenedBatch(NamedTuple):
    """What EE mining yields for one batch."""

    classes: torch.Tensor  # [B] class index of every original, 0..C-1 in order of first appearance
    unique_labels: torch.Tensor  # [C]
    hardest: torch.Tensor  # [C, C] hardest value between two classes' expanded sets (has grad)
    hardest_rows: torch.Tensor  # [C, C] expanded-set index of the hardest pair's first point
    hardest_cols: torch.Tensor  # [C, C] ... and of its second point
    expanded: F.ExpandedSet
    best: torch.Tensor  # [C, C] detached search value of the hardest pair (see search_inverted)
    search_inverted: bool  # larger search values are harder
    slots: torch.Tensor  # [C, K] expanded-set index of each slot (padding = M)
    originals_mat: torch.Tensor  # [B, B] the distance on the batch (has grad)
    layout: F.BatchLayout  # the label-pattern structures (cached across batches)

    def hardened_matrix(self) -> torch.Tensor:
        """The batch's own [B, B] matrix with every negative pair's value replaced by the hardest
        value of its class pair (positives keep theirs): what a wrapped loss sees."""
        lay = self.layout
        return torch.where(lay.negative, self.hardest.reshape(-1)[lay.pair_index], self.originals_mat)


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
    the synthetic points, as in :attr:`HardenedBatch.expanded`: :func:`pml_ext.functional.expand`
    of the batch's class indices, classes numbered by first appearance) and give the hardest
    pair of every ordered class pair. Label-pattern structures are cached across batches
    (:func:`pml_ext.functional.batch_layout`). :meth:`harden` gives the differentiable hardest values that
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
        layout = F.batch_layout(labels, self.n_points, self.pairs, embeddings.dtype)
        hp = F.hardest_negative_pairs_in_layout(embeddings, layout, distance, self.normalize,
                                                originals_best=self.collect_stats)
        ex = layout.expanded._replace(labels=labels[layout.expanded.first])
        if self.collect_stats:
            self._record_stats(hp, layout)
        return HardenedBatch(layout.classes, labels[layout.first_index], hp.hardest, hp.rows, hp.cols, ex,
                             hp.best, hp.search_inverted, hp.slots, hp.originals_mat, layout)

    @torch.no_grad()
    def _record_stats(self, hp: F.HardestPairs, layout: F.BatchLayout):
        c = layout.num_classes
        self.num_synthetic = int(layout.expanded.is_synthetic.sum())
        self.num_class_pairs = c * (c - 1)
        if self.num_class_pairs == 0:
            self.synthetic_selection_ratio = 0.0
            return
        # Hardest value per class pair over all points vs over originals only (both from the
        # search, padding slots excluded).
        best, originals_only = hp.best, hp.best_originals
        off_diag = ~layout.class_eye
        harder = best > originals_only if hp.search_inverted else best < originals_only
        self.synthetic_selection_ratio = float(harder[off_diag].float().mean())

    def mine(self, embeddings, labels, ref_emb, ref_labels) -> Tuple[torch.Tensor, ...]:
        if ref_emb is not embeddings:
            raise ValueError("EmbeddingExpansionMiner does not support ref_emb: it expands one batch")
        hb = self.harden(embeddings, labels)
        same = labels[:, None] == labels[None, :]
        same.fill_diagonal_(False)
        a1, p = same.nonzero(as_tuple=True)
        off_diag = ~hb.layout.class_eye
        return a1, p, hb.hardest_rows[off_diag], hb.hardest_cols[off_diag]
