"""EE + HPHN triplet loss, the official Embedding Expansion code's semantics (Ko & Gu, CVPR 2020)."""
from __future__ import annotations

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.reducers import MeanReducer
from pytorch_metric_learning.utils import common_functions as c_f

from .. import functional as F
from ..functional.embedding_expansion import _expanded_gram, _mat_from_gram, _pair_values_from_gram
from ..functional.primitives import segment_best
from ..utils.distributed import in_rank_order
from .embedding_expansion_loss import _check_batch

__all__ = ["HPHNTripletLoss"]


class HPHNTripletLoss(BaseMetricLossFunction):
    """Hard-positive hard-negative triplet loss with Embedding Expansion.

    For every original anchor i (official code, clovaai/embedding-expansion):

    - d_ap(i) = hardest original positive (largest distance to a same-class original j != i;
      synthetic points are never positives);
    - d_an(i) = hardest pair between the anchor's group {x_i} ∪ {synthetic points of i's pair}
      and every point, original or synthetic, of another class;
    - loss_i = [d_ap(i) − d_an(i) + margin]_+, reduced over anchors by the reducer
      (default mean over anchors with a positive and a negative; MXNet sums, a PyTorch port
      averages).

    With ``n_points=0`` this is the batch-hard triplet loss (BatchHardMiner + TripletMarginLoss).

    Defaults and their source: ``margin=1e-5`` (official command-line default), ``n_points=2``
    (paper), ``normalize=True`` (paper), ``pairs="adjacent"`` (official code), distance =
    Euclidean on L2-normalised embeddings, not squared (official code: sqrt of clipped squared
    distance), ``MeanReducer``.
    """

    def __init__(
        self,
        margin: float = 1e-5,
        n_points: int = 2,
        normalize: bool = True,
        pairs: str = "adjacent",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(n_points, int) or isinstance(n_points, bool) or n_points < 0:
            raise ValueError(f"n_points must be an int >= 0, got {n_points!r}")
        if pairs not in F.PAIR_MODES:
            raise ValueError(f"pairs must be one of {F.PAIR_MODES}, got {pairs!r}")
        self.margin = margin
        self.n_points = n_points
        self.normalize = normalize
        self.pairs = pairs
        self.add_to_recordable_attributes(list_of_names=["margin", "n_points"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["num_anchors", "synthetic_selection_ratio"], is_stat=True
        )

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if ref_emb is not None or ref_labels is not None:
            raise ValueError(
                "HPHNTripletLoss does not support ref_emb/ref_labels: it expands and mines within "
                "one batch (with PML's DistributedLossWrapper use efficient=False)"
            )
        if indices_tuple is not None:
            raise ValueError(
                "HPHNTripletLoss mines its own hardest positives and negatives; indices_tuple "
                "is not supported"
            )
        _check_batch(embeddings, labels)
        # under PML's DistributedLossWrapper: rank order, so adjacent pairs match one process
        embeddings, labels, _ = in_rank_order(self, embeddings, labels)
        return super().forward(embeddings, labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if labels.numel() == 0:  # an empty batch: no anchor, as PML's losses
            self.num_anchors = 0
            return self.zero_losses()
        inverted = self.distance.is_inverted
        ex = F.expand(labels, self.n_points, self.pairs, embeddings.dtype)
        b, m = ex.num_originals, ex.labels.numel()
        arange_b = torch.arange(b, device=labels.device)
        same = labels[:, None] == labels[None, :]
        pos_mask = same & ~torch.eye(b, dtype=torch.bool, device=labels.device)
        valid = pos_mask.any(1) & (~same).any(1)
        self.num_anchors = int(valid.sum())
        # The search runs without autograd (no [M, M] graph kept for the backward); the loss then
        # recomputes only each anchor's two selected distances, differentiably.
        kind = F.gram_kind(self.distance)
        # inner-product distances: one Gram matrix serves the search and the selected distances;
        # any other distance: its explicit [M, M] matrix, built once, searched detached
        gram = F.normalized_gram(embeddings, self.distance) if kind is not None else None
        full = None if gram is not None else F.expanded_distance_matrix(embeddings, ex, self.distance, self.normalize)
        with torch.no_grad():
            if gram is None:
                mat = full.detach()
            else:
                mat = _mat_from_gram(_expanded_gram(gram.detach(), ex, self.normalize), kind, self.distance.power)
            # values that a max (positives) / min (negatives) over distances ignores
            ignore_in_ap = c_f.pos_inf(mat.dtype) if inverted else c_f.neg_inf(mat.dtype)
            ignore_in_an = c_f.neg_inf(mat.dtype) if inverted else c_f.pos_inf(mat.dtype)
            hardest_pos = torch.min if inverted else torch.max
            hardest_neg = torch.max if inverted else torch.min
            # hardest original positive of every anchor (first one on ties, as PML's BatchHardMiner)
            ap_col = hardest_pos(mat[:b, :b].masked_fill(~pos_mask, ignore_in_ap), 1).indices
            # hardest negative of every expanded point, then over each anchor's group (the anchor
            # and the synthetic points of its pairs); the first entry attaining it
            neg_mask = ex.labels[:, None] != ex.labels[None, :]
            an_point, an_col = hardest_neg(mat.masked_fill(~neg_mask, ignore_in_an), 1)
            synth = torch.arange(b, m, device=labels.device)
            owners = torch.cat([arange_b, ex.first[synth], ex.second[synth]])
            rows = torch.cat([arange_b, synth, synth])  # the expanded point of every entry
            an_best, entry = segment_best(an_point[rows][:, None], owners, b, inverted, ignore_in_an)
            an_best, an_row = an_best[:, 0], rows[entry[:, 0]]
            if self.collect_stats:
                harder = an_best < an_point[:b] if not inverted else an_best > an_point[:b]
                self.synthetic_selection_ratio = float(harder[valid].float().mean()) if valid.any() else 0.0
        if not bool(valid.any()):
            return self.zero_losses()
        anchors = valid.nonzero(as_tuple=True)[0]
        rows = torch.cat([anchors, an_row[anchors]])
        cols = torch.cat([ap_col[anchors], an_col[an_row[anchors]]])
        if gram is None:
            values = F.take(full, rows * m + cols)
        else:
            values = _pair_values_from_gram(gram, ex, rows, cols, self.normalize, kind, self.distance.power)
        ap, an = values.split(anchors.numel())
        losses = torch.relu(self.distance.margin(ap, an) + self.margin)
        return {"loss": {"losses": losses, "indices": anchors, "reduction_type": "element"}}

    def get_default_distance(self):
        return LpDistance(normalize_embeddings=True, p=2, power=1)

    def get_default_reducer(self):
        return MeanReducer()
