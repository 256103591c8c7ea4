"""Embedding Expansion around any PML tuple loss (Ko & Gu, CVPR 2020, §3.2-3.3)."""
from __future__ import annotations

import copy
import math
from typing import Dict, Optional, Tuple

import torch
from pytorch_metric_learning import losses, reducers
from pytorch_metric_learning.losses import BaseMetricLossFunction, NPairsLoss
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .. import functional as F
from ..miners.embedding_expansion_miner import EmbeddingExpansionMiner, HardenedBatch
from ..utils.distributed import in_rank_order
from .embedding_expansion_dense import dense_loss

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
        dense = dense_loss(self.loss, indices_tuple)
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
    if not math.isfinite(x.sum().item()) and not bool(torch.isfinite(x).all()):
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
