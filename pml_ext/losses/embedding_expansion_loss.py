"""Embedding Expansion around any PML tuple loss (Ko & Gu, CVPR 2020, §3.2-3.3)."""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

import torch
from pytorch_metric_learning import losses, reducers
from pytorch_metric_learning.losses import BaseMetricLossFunction, NPairsLoss
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .. import functional as F
from ..miners.embedding_expansion_miner import EmbeddingExpansionMiner, HardenedBatch
from ..utils.distributed import in_rank_order

__all__ = ["EmbeddingExpansionLoss", "UNSUPPORTED_LOSSES", "unsupported_reason"]

_STATS = ("num_synthetic", "num_class_pairs", "synthetic_selection_ratio")
_DELEGATED = ("distance", "reducer")  # the wrapped loss's own, as PML's classes hold theirs

_PROXY_REASON = (
    "it compares each embedding with learned class weights or proxies, not with the other "
    "embeddings of the batch, so there is no negative pair of the batch for EE to harden"
)
_OWN_GEOMETRY_REASON = (
    "it computes its values from the embeddings itself and never calls its distance on pairs of "
    "the batch, so EE would return exactly the plain loss"
)
# Losses EE cannot change, by PML class name (subclasses included), with the reason; kept in step
# with PML by tests/test_pml_machinery.py, which runs every loss class PML exports.
UNSUPPORTED_LOSSES: Dict[str, str] = {
    **{name: _PROXY_REASON for name in (
        "ArcFaceLoss", "CosFaceLoss", "LargeMarginSoftmaxLoss", "NormalizedSoftmaxLoss",
        "ProxyAnchorLoss", "ProxyNCALoss", "SoftTripleLoss", "SphereFaceLoss",
        "SubCenterArcFaceLoss", "ManifoldLoss", "P2SGradLoss")},
    "AngularLoss": _OWN_GEOMETRY_REASON,
    "ThresholdConsistentMarginLoss": _OWN_GEOMETRY_REASON,
    "VICRegLoss": "it takes no labels (two views of each sample); EE builds synthetic points within classes",
    "MultipleLosses": "it is a container: wrap each loss, MultipleLosses([EmbeddingExpansionLoss(l) for l in ...])",
    "SelfSupervisedLoss": "it passes its loss a reference set (the second view), which EE cannot expand",
    "CrossBatchMemory": "its loss sees a memory of earlier batches as a reference set; EE expands one batch",
}


def unsupported_reason(loss) -> Optional[str]:
    """Why ``EmbeddingExpansionLoss`` cannot wrap ``loss`` (None if it can)."""
    for name, reason in UNSUPPORTED_LOSSES.items():
        cls = getattr(losses, name, None)
        if cls is not None and isinstance(loss, cls):
            return reason
    return None


class _Held:
    """Holds the miner outside the module tree: record-keeper and PML's hooks walk submodules, and
    the statistics belong on the wrapper (recorded once)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj


class EmbeddingExpansionLoss(BaseMetricLossFunction):
    """Wrap a PML loss so that it sees EE's hardest negative pairs (EE §3.2, Eqs. 3-6).

    The wrapped loss runs on the original batch with its own distance, reducer and (if given)
    mined ``indices_tuple``; the only change is that every negative pair's value between
    classes a and b becomes the hardest value over all pairs between the two classes' expanded
    sets (originals + internal division points). Positive pairs keep their values. Gradients
    reach the originals through the selected pair (and through the division points).

    Add EE to a PML loop by changing the loss construction only::

        loss_fn = EmbeddingExpansionLoss(losses.MultiSimilarityLoss())
        loss = loss_fn(embeddings, labels, miner(embeddings, labels))

    As on PML's own losses, ``distance`` and ``reducer`` are attributes (here the wrapped loss's:
    reading or assigning them reads or sets the wrapped loss's), and ``get_default_distance`` /
    ``get_default_reducer`` are the wrapped loss's. Losses EE cannot change are refused at
    construction with the reason (:data:`UNSUPPORTED_LOSSES`: proxy / classification losses,
    losses that never call their distance on the batch, containers).

    Args:
        loss: a PML ``BaseMetricLossFunction`` whose ``distance`` gives pair values
            (Triplet, (Generalized)LiftedStructure, NPairs, MultiSimilarity, Contrastive,
            Circle, NTXent, SupCon, ...).
        n_points: synthetic points per same-class pair (default 2, the paper's).
        normalize: L2-normalise the synthetic points (default on, the paper's).
        pairs: ``"all"`` same-class pairs (default, paper) or ``"adjacent"`` (official code).
        miner: an :class:`EmbeddingExpansionMiner` instead of the three arguments above (giving
            both with different values is an error). The hardened values are always computed
            with the wrapped loss's distance.
        collect_stats: record ``num_synthetic``, ``num_class_pairs`` and
            ``synthetic_selection_ratio`` on this object (default: PML's default, or the
            miner's setting when a miner is given).
    """

    def __init__(
        self,
        loss: BaseMetricLossFunction,
        n_points: Optional[int] = None,
        normalize: Optional[bool] = None,
        pairs: Optional[str] = None,
        miner: Optional[EmbeddingExpansionMiner] = None,
        **kwargs,
    ):
        if isinstance(loss, EmbeddingExpansionLoss):
            raise ValueError("loss is already an EmbeddingExpansionLoss")
        reason = unsupported_reason(loss)
        if reason is not None:
            raise ValueError(f"EmbeddingExpansionLoss cannot wrap {type(loss).__name__}: {reason}")
        if not isinstance(loss, torch.nn.Module) or not hasattr(loss, "distance"):
            raise ValueError(
                "loss must be a PML loss with a distance (a BaseMetricLossFunction), "
                f"got {type(loss).__name__}"
            )
        for arg in ("distance", "reducer", "embedding_regularizer"):
            if arg in kwargs:
                raise ValueError(f"give {arg} to the wrapped loss; EmbeddingExpansionLoss uses the loss's own")
        given = {"n_points": n_points, "normalize": normalize, "pairs": pairs}
        if miner is None:
            defaults = {"n_points": 2, "normalize": True, "pairs": "all"}
            miner = EmbeddingExpansionMiner(**{k: defaults[k] if v is None else v for k, v in given.items()},
                                            distance=loss.distance, collect_stats=False)
        else:
            _check_miner(miner, given)
            if kwargs.get("collect_stats") is None:
                kwargs["collect_stats"] = miner.collect_stats
        # PML's base __init__ assigns distance and reducer; both are the wrapped loss's (see
        # __setattr__), so the placeholders given here are dropped.
        super().__init__(distance=loss.distance, reducer=reducers.DoNothingReducer(), **kwargs)
        self.loss = loss
        self.__dict__["_held_miner"] = _Held(miner)
        self.__dict__["_ee_ready"] = True
        self.add_to_recordable_attributes(list_of_names=["n_points"], is_stat=False)
        self.add_to_recordable_attributes(list_of_names=list(_STATS), is_stat=True)

    # -- PML conventions: distance / reducer / defaults are the wrapped loss's ------------------
    def __setattr__(self, name, value):
        if name in _DELEGATED:
            if self.__dict__.get("_ee_ready"):
                setattr(self.loss, name, value)
            return  # during PML's base __init__: the wrapped loss's own are used
        if name == "miner":
            _check_miner(value, {})
            self.__dict__["_held_miner"] = _Held(value)
            return
        super().__setattr__(name, value)

    @property
    def distance(self):
        return self.loss.distance

    @property
    def reducer(self):
        return self.loss.reducer

    @property
    def miner(self) -> EmbeddingExpansionMiner:
        return self.__dict__["_held_miner"].obj

    @property
    def n_points(self) -> int:
        return self.miner.n_points

    def get_default_distance(self):
        return self.loss.get_default_distance()

    def get_default_reducer(self):
        return self.loss.get_default_reducer()

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: Optional[Tuple[torch.Tensor, ...]] = None,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if ref_emb is not None or ref_labels is not None:
            raise ValueError(
                "EmbeddingExpansionLoss does not support ref_emb/ref_labels: EE expands and "
                "mines within one batch (with PML's DistributedLossWrapper use efficient=False)"
            )
        _check_batch(embeddings, labels)
        embeddings, labels, indices_tuple = in_rank_order(self, embeddings, labels, indices_tuple)
        distance = self.loss.distance
        hardened = self.miner.harden(embeddings, labels, distance=distance, record_on=self)
        dense = _dense_loss(self.loss, indices_tuple)
        if dense is not None:
            self.loss.reset_stats()
            return self.loss.reducer(dense(self.loss, hardened, labels), embeddings, labels)
        hints = _index_hints(self.loss, indices_tuple, labels)
        proxy = _hardened_distance(distance, embeddings, hardened, hints)
        self.loss.distance = proxy
        try:
            out = self.loss(embeddings, labels, indices_tuple)
        finally:
            self.loss.distance = distance
            for name in getattr(distance, "_record_these_stats", []):
                setattr(distance, name, getattr(proxy, name, 0))
        if not proxy._ee_called and indices_tuple is None and _has_pairs(hardened.layout):
            raise ValueError(
                f"{type(self.loss).__name__} never called its distance on the batch, so EE changed "
                "nothing; EmbeddingExpansionLoss cannot wrap it"
            )
        return out


def _check_miner(miner, given: Dict[str, object]) -> None:
    if not isinstance(miner, EmbeddingExpansionMiner):
        raise ValueError(f"miner must be an EmbeddingExpansionMiner, got {type(miner).__name__}")
    for name, value in given.items():
        if value is not None and getattr(miner, name) != value:
            raise ValueError(
                f"{name}={value!r} conflicts with the miner's {name}={getattr(miner, name)!r}; "
                "give it to the miner only"
            )


def _has_pairs(layout: F.BatchLayout) -> bool:
    return bool(layout.positive.any()) and bool(layout.negative.any())


# PML reducers that read the per-tuple losses alone (not their indices' embeddings): a dense
# path may produce the same losses its own way
PLAIN_REDUCERS = (reducers.MeanReducer, reducers.AvgNonZeroReducer, reducers.ThresholdReducer,
                  reducers.SumReducer)


def _reads_losses_alone(reducer) -> bool:
    """A plain reducer, or PML's MultipleReducers (the default of losses with several sub-losses,
    e.g. Contrastive) over plain ones."""
    if type(reducer) is reducers.MultipleReducers:
        return all(type(r) in PLAIN_REDUCERS for r in [*reducer.reducers.values(), reducer.default_reducer])
    return type(reducer) in PLAIN_REDUCERS


def _dense_loss(loss, indices_tuple):
    """A dense computation of the loss on the hardened matrix, when it gives exactly PML's value.

    PML evaluates Triplet and Lifted Structure through index lists built from a B³ mask or a
    (#positive x #negative pairs) mask, N-pair through sub-batches it hands its distance, and
    Contrastive through the [B, B] matrix at every pair;
    on the hardened matrix the same values need only dense per-anchor arithmetic, with the
    index lists built once per label pattern (:meth:`BatchLayout.extra`). Used with all tuples
    (no indices_tuple), PML's reducers that look at the losses alone, and no embedding
    regulariser; otherwise the wrapped loss runs as is.
    """
    if indices_tuple is not None or getattr(loss, "embedding_regularizer", None) is not None:
        return None
    if not _reads_losses_alone(loss.reducer):
        return None
    if type(loss) is losses.TripletMarginLoss and loss.triplets_per_anchor == "all" and not loss.swap:
        return _dense_triplet
    if type(loss) is losses.LiftedStructureLoss:
        return _dense_lifted
    if type(loss) is losses.NPairsLoss:
        return _dense_npairs
    if type(loss) is losses.ContrastiveLoss:
        return _dense_contrastive
    return None


def _triplet_structure(layout: F.BatchLayout):
    """Positives of every anchor padded to P slots, the (a, p, n) triplets in PML's order, and
    (when the padded box is mostly empty) their flat indices into the [B, B] matrix."""
    pos = layout.positive
    p = int(pos.sum(1).max()) if pos.numel() else 0
    if p == 0 or not bool(layout.negative.any()):
        return None
    pos8 = pos.to(torch.uint8)
    pos_idx = torch.sort(pos8, dim=1, descending=True, stable=True).indices[:, :p]
    # [B, P, B] as a uint8 product viewed as bool (the bool broadcast & is ~15x slower on CPU)
    valid = (pos8.gather(1, pos_idx)[:, :, None] * layout.negative.to(torch.uint8)[:, None, :]).view(torch.bool)
    a, slot, n = valid.nonzero(as_tuple=True)
    pp = pos_idx.reshape(-1)[a * p + slot]
    b = pos.shape[0]
    # a mostly empty [B, P, B] box (long-tailed classes: P is the largest class's): the triplets'
    # flat indices into the [B, B] matrix instead
    flat = (a * b + pp, a * b + n) if a.numel() < _FLAT_TRIPLETS * valid.numel() else None
    return pos_idx, valid, (a, pp, n), flat


_FLAT_TRIPLETS = 0.35  # below this fraction of valid (a, slot, n) entries, gather the triplets


class _TwoGathers(torch.autograd.Function):
    """``mat.flatten()[i]`` and ``mat.flatten()[j]``; the backward adds both gradients into one
    buffer with ``index_add_`` (faster on CPU than autograd's backward of two index operations)."""

    @staticmethod
    def forward(ctx, mat, i, j):
        ctx.save_for_backward(i, j)
        ctx.shape = mat.shape
        flat = mat.reshape(-1)
        return flat.index_select(0, i), flat.index_select(0, j)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gi, gj):
        i, j = ctx.saved_tensors
        grad = gi.new_zeros(ctx.shape[0] * ctx.shape[1])
        grad.index_add_(0, i, gi).index_add_(0, j, gj)
        return grad.view(ctx.shape), None, None


def _dense_triplet(loss, hb: HardenedBatch, labels):
    """TripletMarginLoss over all (a, p, n): [B, P, B] with P = most positives of an anchor."""
    structure = hb.layout.extra("triplet", _triplet_structure)
    if structure is None:
        return loss.zero_losses()
    pos_idx, valid, indices, flat = structure
    mat = hb.hardened_matrix()
    if flat is not None:
        margins = loss.distance.margin(*_TwoGathers.apply(mat, *flat))
    else:  # the triplets are selected right after the one [B, P, B] operation; PML's arithmetic follows
        margins = loss.distance.margin(mat.gather(1, pos_idx)[:, :, None], mat[:, None, :]).masked_select(valid)
    violation = margins + loss.margin
    per = torch.nn.functional.softplus(violation) if loss.smooth_loss else torch.relu(violation)
    return {"loss": {"losses": per, "indices": indices, "reduction_type": "triplet"}}


def _pair_structure(layout: F.BatchLayout):
    """Positive pairs (a, p) in PML's order, or None when the batch has no positive or no negative."""
    if not bool(layout.positive.any()) or not bool(layout.negative.any()):
        return None
    return layout.positive.nonzero(as_tuple=True)


def _dense_lifted(loss, hb: HardenedBatch, labels):
    """LiftedStructureLoss: the log-sum-exp over the negatives of a and of p is
    logaddexp(E_a, E_p) with E_i the log-sum-exp over i's own negatives."""
    pairs = hb.layout.extra("pairs", _pair_structure)
    if pairs is None:
        return loss.zero_losses()
    a, p = pairs
    mat = hb.hardened_matrix()
    neg_terms = loss.distance.margin(loss.neg_margin, mat).masked_fill(~hb.layout.negative, float("-inf"))
    e = torch.logsumexp(neg_terms, dim=1)
    pos = F.take(mat, a * mat.shape[0] + p)
    per_pair = torch.relu(torch.logaddexp(e.index_select(0, a), e.index_select(0, p))
                          + loss.distance.margin(pos, loss.pos_margin)) ** 2 / 2
    return {"loss": {"losses": per_pair, "indices": (a, p), "reduction_type": "pos_pair"}}


def _all_pairs_structure(layout: F.BatchLayout):
    """PML's get_all_pairs_indices (positive then negative pairs, row-major), with the flat index
    of every positive pair into the [B, B] matrix and of every negative pair's class pair into
    the [C, C] one."""
    a1, p = layout.positive.nonzero(as_tuple=True)
    a2, n = layout.negative.nonzero(as_tuple=True)
    b, c = layout.classes.numel(), layout.num_classes
    return (a1, p, a2, n), a1 * b + p, layout.classes[a2] * c + layout.classes[n]


def _dense_contrastive(loss, hb: HardenedBatch, labels):
    """ContrastiveLoss over all pairs: a positive pair's value from the batch's own matrix, a
    negative pair's from its class pair's hardest value, without the [B, B] hardened matrix."""
    pairs, pos_flat, neg_flat = hb.layout.extra("all_pairs", _all_pairs_structure)
    if all(len(x) <= 1 for x in pairs):  # PML's GenericPairLoss returns zero losses then
        return loss.zero_losses()
    pos_loss = neg_loss = 0
    if pos_flat.numel():
        pos_loss = loss.get_per_pair_loss(hb.originals_mat.reshape(-1).index_select(0, pos_flat), "pos")
    if neg_flat.numel():
        neg_loss = loss.get_per_pair_loss(hb.hardest.reshape(-1).index_select(0, neg_flat), "neg")
    return {"pos_loss": {"losses": pos_loss, "indices": pairs[:2], "reduction_type": "pos_pair"},
            "neg_loss": {"losses": neg_loss, "indices": pairs[2:], "reduction_type": "neg_pair"}}


def _npair_structure(layout: F.BatchLayout):
    """PML's N-pair choice: for every class with a positive pair, its first two samples."""
    c = layout.num_classes
    members = layout.originals.view(c, -1)  # batch order inside each class
    if members.shape[1] < 2:
        empty = members.new_empty(0)
        return empty, empty
    has_pair = torch.bincount(layout.classes, minlength=c) > 1
    return members[has_pair, 0], members[has_pair, 1]


def _dense_npairs(loss, hb: HardenedBatch, labels):
    """NPairsLoss: PML's anchors and positives (lmu.convert_to_pos_pairs_with_unique_labels:
    the first two samples of each class, ordered by label), the cross-entropy over their
    hardened similarity matrix."""
    a, p = hb.layout.extra("npairs", _npair_structure)
    loss.num_pairs = len(a)
    if loss.num_pairs == 0:
        return loss.zero_losses()
    order = torch.argsort(labels[a])
    a, p = a[order], p[order]
    # the anchors' classes differ, so the hardened [a, p] matrix holds each anchor's own positive on
    # its diagonal and its class pair's hardest value everywhere else: no [B, B] matrix needed
    ca = hb.classes[a]
    eye = torch.eye(len(a), dtype=torch.bool, device=a.device)
    c = hb.hardest.shape[0]
    sim = torch.where(eye, F.take(hb.originals_mat, a * len(labels) + p)[:, None],
                      F.take(hb.hardest, ca[:, None] * c + ca[None, :]))
    if not loss.distance.is_inverted:
        sim = -sim
    targets = torch.arange(len(a), device=sim.device)
    return {"loss": {"losses": loss.cross_entropy(sim, targets), "indices": a, "reduction_type": "element"}}


def _check_batch(embeddings: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2:
        raise ValueError(
            "embeddings must be a 2-D tensor (batch_size, embedding_size), got "
            f"{tuple(getattr(embeddings, 'shape', ()))}"
        )
    if not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}")
    if labels is None:
        raise ValueError("labels are required: EE builds synthetic points within classes")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D tensor, got {tuple(getattr(labels, 'shape', ()))}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.numel() != embeddings.shape[0]:
        raise ValueError(
            f"labels has {labels.numel()} entries but embeddings has {embeddings.shape[0]} rows"
        )
    if labels.device != embeddings.device:
        raise ValueError(
            f"labels are on {labels.device} but embeddings are on {embeddings.device}"
        )
    # A sum in the embeddings' own dtype is finite when every entry is (one reduction, no
    # conversion); only when it is not (NaN or inf, or finite values that overflowed it) does the
    # elementwise check decide.
    x = embeddings.detach()
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError("embeddings contain NaN or inf")


def _index_hints(loss, indices_tuple, labels) -> Tuple[torch.Tensor, ...]:
    """Row indices of the sub-batches a loss hands to its distance (N-pair: anchors, positives)."""
    if isinstance(loss, NPairsLoss):
        return lmu.convert_to_pos_pairs_with_unique_labels(indices_tuple, labels)
    return ()


class _HardenedDistanceMixin:
    """Placed before the user's distance class: same settings, hardened negative pairs."""

    _ee_embeddings: torch.Tensor
    _ee_batch: HardenedBatch
    _ee_hints: Tuple[torch.Tensor, ...]

    def forward(self, query_emb, ref_emb=None):
        self._ee_called = True
        x, batch = self._ee_embeddings, self._ee_batch
        if query_emb is x and (ref_emb is None or ref_emb is x):
            # The batch's own matrix was computed with the hardest pairs (same Gram matrix).
            return batch.hardened_matrix()
        mat = super().forward(query_emb, ref_emb)
        rows = self._ee_classes_of(query_emb)
        cols = rows if ref_emb is None else self._ee_classes_of(ref_emb)
        return F.hardened_pair_matrix(mat, rows, cols, self._ee_batch.hardest.to(mat.dtype))

    def _ee_classes_of(self, emb: torch.Tensor) -> torch.Tensor:
        x, classes = self._ee_embeddings, self._ee_batch.classes
        if emb is x:
            return classes
        for idx in self._ee_hints:
            if idx.numel() == emb.shape[0] and torch.equal(x[idx], emb):
                return classes[idx]
        return _classes_by_row_match(emb, x, classes)


def _classes_by_row_match(emb: torch.Tensor, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Class of each row of a sub-batch, found by exact equality with the batch's rows."""
    chunk = max(1, (1 << 24) // max(1, x.numel()))
    found = []
    for start in range(0, emb.shape[0], chunk):  # memory chunks, not a loop over samples
        eq = (emb[start : start + chunk, None, :] == x[None, :, :]).all(-1)
        if not bool(eq.any(1).all()):
            raise ValueError(
                "the wrapped loss passed its distance rows that are not rows of the batch (e.g. "
                "learned proxies or class weights); EmbeddingExpansionLoss cannot tell their classes"
            )
        first = eq.float().argmax(1)
        c = classes[first]
        if bool((eq & (classes[None, :] != c[:, None])).any()):
            raise ValueError(
                "identical embeddings with different labels in the batch: cannot tell which "
                "class a row the wrapped loss passed to its distance belongs to"
            )
        found.append(c)
    return torch.cat(found)


_PROXY_CLASSES: Dict[type, type] = {}


def _hardened_distance(distance, embeddings, hardened: HardenedBatch, hints):
    cls = type(distance)
    if cls not in _PROXY_CLASSES:
        _PROXY_CLASSES[cls] = type(f"Hardened{cls.__name__}", (_HardenedDistanceMixin, cls), {})
    proxy = copy.copy(distance)
    proxy.__class__ = _PROXY_CLASSES[cls]
    proxy._ee_embeddings = embeddings
    proxy._ee_batch = hardened
    proxy._ee_hints = hints
    proxy._ee_called = False
    return proxy
