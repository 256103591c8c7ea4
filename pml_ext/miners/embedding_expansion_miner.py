"""The hard negative pair mining of Embedding Expansion (Ko & Gu, CVPR 2020, §3.2) as a PML miner."""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.utils import common_functions as c_f

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
    originals_mat: torch.Tensor  # [B, B] the distance on the batch (has grad)
    layout: F.BatchLayout  # the label-pattern structures (cached across batches)

    @property
    def slots(self) -> torch.Tensor:
        """[C, K] expanded-set index of each class slot (padding = M), built on first use."""
        return self.layout.slots

    def hardened_matrix(self) -> torch.Tensor:
        """The batch's own [B, B] matrix with every negative pair's value replaced by the hardest
        value of its class pair (positives keep theirs): what a wrapped loss sees."""
        lay = self.layout
        return torch.where(lay.negative, F.take(self.hardest, lay.pair_index), self.originals_mat)


_HOW_TO_USE = (
    "EmbeddingExpansionMiner's tuples index the expanded set (the batch plus its synthetic "
    "points), which a PML loss only sees as a reference set, so it needs that reference set: "
    "ref_emb, ref_labels = miner.expand(embeddings, labels); "
    "loss(embeddings, labels, miner(embeddings, labels, ref_emb, ref_labels), ref_emb, ref_labels). "
    "Where PML calls a miner without a reference set (a trainer's tuple_miner, "
    "loss(embeddings, labels, miner(embeddings, labels))), use "
    "EmbeddingExpansionLoss(loss) as the loss instead, with any PML miner or none"
)


class EmbeddingExpansionMiner(BaseMiner):
    """Hard negative pair mining over originals and internal division points (EE, Eqs. 1-2, §3.2).

    EE's synthetic points are extra points, which PML calls a reference set (``ref_emb`` /
    ``ref_labels``, as :class:`~pytorch_metric_learning.losses.CrossBatchMemory` uses), so the
    miner works in PML's reference-set convention::

        ref_emb, ref_labels = miner.expand(embeddings, labels)   # differentiable
        tuples = miner(embeddings, labels, ref_emb, ref_labels)
        loss = loss_fn(embeddings, labels, tuples, ref_emb, ref_labels)

    ``tuples = (a1, p, a2, n)``: anchors are rows of the batch; ``p`` the anchor's original
    same-class rows (synthetic points are never positives); ``n``, for every anchor and every
    other class, that class's hardest point (original or synthetic) for the anchor. Any PML miner
    can also mine over ``ref_emb`` (``BatchHardMiner()(embeddings, labels, ref_emb,
    ref_labels)``; it treats synthetic points of the anchor's class as positives). Called without a
    reference set (a trainer's ``tuple_miner``) it raises an error that says this; the exact
    paper semantics (every negative pair's value replaced by the hardest over the two classes'
    expanded sets, synthetic anchors included) is :class:`pml_ext.losses.EmbeddingExpansionLoss`.

    Args:
        n_points: synthetic points per same-class pair (paper default 2; 0 = originals only).
        normalize: L2-normalise the synthetic points (EE Eq. 2; paper default on).
        pairs: ``"all"`` same-class pairs (paper) or ``"adjacent"`` disjoint consecutive pairs
            per class (official code).
        distance, collect_stats: as for every PML miner. Give it the loss's distance.

    :meth:`harden` gives the differentiable per-class-pair hardest values (both sides over the
    expanded sets) that :class:`~pml_ext.losses.EmbeddingExpansionLoss` uses. Label-pattern
    structures are cached across batches (:func:`pml_ext.functional.batch_layout`).

    Recorded statistics (``collect_stats=True``): ``num_synthetic``, ``num_class_pairs`` and
    ``synthetic_selection_ratio``: for :meth:`harden`, the fraction of class pairs whose hardest
    pair involves a synthetic point (strictly harder than the hardest original pair; the paper's
    Fig. 5); for the mined tuples, the fraction of (anchor, class) negatives that are synthetic
    (strictly harder than every original of the class).
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

    def expand(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The expanded set as PML's reference set ``(ref_emb, ref_labels)``: the batch (as the
        miner's distance normalises it) in batch order, then the synthetic points (EE Eqs. 1-2).
        Differentiable: gradients reach the batch through the synthetic points."""
        layout = F.batch_layout(labels, self.n_points, self.pairs, embeddings.dtype)
        ex = layout.expanded
        ref = F.expanded_embeddings(self.distance.maybe_normalize(embeddings), ex, self.normalize)
        return ref, labels[ex.first]

    def harden(self, embeddings: torch.Tensor, labels: torch.Tensor, distance=None,
               record_on=None) -> HardenedBatch:
        """Differentiable per-class-pair hardest values over the expanded batch. The statistics
        go to ``record_on`` (default: this miner) if its ``collect_stats`` is on."""
        distance = self.distance if distance is None else distance
        record_on = self if record_on is None else record_on
        labels = c_f.to_device(labels, embeddings)  # as PML's miners do in forward
        layout = F.batch_layout(labels, self.n_points, self.pairs, embeddings.dtype)
        hp = F.hardest_negative_pairs_in_layout(embeddings, layout, distance, self.normalize,
                                                originals_best=record_on.collect_stats)
        ex = layout.expanded._replace(labels=labels.index_select(0, layout.expanded.first))
        if record_on.collect_stats:
            _record_stats(record_on, hp, layout)
        return HardenedBatch(layout.classes, labels.index_select(0, layout.first_index), hp.hardest, hp.rows,
                             hp.cols, ex, hp.best, hp.search_inverted, hp.originals_mat, layout)

    def mine(self, embeddings, labels, ref_emb, ref_labels) -> Tuple[torch.Tensor, ...]:
        if ref_emb is embeddings:
            raise ValueError(_HOW_TO_USE)
        layout = F.batch_layout(labels, self.n_points, self.pairs, embeddings.dtype)
        ex, b = layout.expanded, labels.numel()
        m = ex.labels.numel()
        if ref_labels is None or ref_emb.shape[0] != m or not torch.equal(ref_labels, labels[ex.first]):
            raise ValueError(
                f"ref_emb must be the expanded set miner.expand(embeddings, labels) ({m} rows with "
                f"its labels), got {ref_emb.shape[0]} rows. " + _HOW_TO_USE
            )
        same = layout.positive
        a1, p = same.nonzero(as_tuple=True)
        c = layout.num_classes
        if c < 2:
            empty = a1[:0]
            return a1, p, empty, empty
        # [B, C, K]: every anchor against every class's expanded slots (padding = column m)
        mat = self.distance(embeddings, ref_emb)
        worst = c_f.neg_inf(mat.dtype) if self.distance.is_inverted else c_f.pos_inf(mat.dtype)
        padded = torch.cat([mat, mat.new_full((b, 1), worst)], dim=1)
        per_class = padded[:, layout.slots]
        slot = per_class.argmax(2) if self.distance.is_inverted else per_class.argmin(2)  # first best
        neg = ~layout.class_eye[layout.classes]  # [B, C]: classes other than the anchor's
        a2, cls = neg.nonzero(as_tuple=True)
        n = layout.slots[cls, slot[a2, cls]]
        if self.collect_stats:
            self.num_synthetic = int(ex.is_synthetic.sum())
            self.num_class_pairs = c * (c - 1)
            self.synthetic_selection_ratio = float(ex.is_synthetic[n].float().mean()) if n.numel() else 0.0
        return a1, p, a2, n


@torch.no_grad()
def _record_stats(target, hp: F.HardestPairs, layout: F.BatchLayout) -> None:
    """num_synthetic, num_class_pairs, synthetic_selection_ratio of one hardening, on target."""
    c = layout.num_classes
    target.num_synthetic = int(layout.expanded.is_synthetic.sum())
    target.num_class_pairs = c * (c - 1)
    if target.num_class_pairs == 0:
        target.synthetic_selection_ratio = 0.0
        return
    # Hardest value per class pair over all points vs over originals only (both from the
    # search, padding slots excluded).
    best, originals_only = hp.best, hp.best_originals
    off_diag = ~layout.class_eye
    harder = best > originals_only if hp.search_inverted else best < originals_only
    target.synthetic_selection_ratio = float(harder[off_diag].float().mean())
