"""Dense computations of PML losses on EE's hardened values (Ko & Gu, CVPR 2020, §3.2).

PML evaluates Triplet and Lifted Structure through index lists built from a B³ mask or a
(#positive x #negative pairs) mask, N-pair through sub-batches it hands its distance, and
Contrastive through the [B, B] matrix at every pair. On EE's hardened values (every negative pair
of classes x and y takes the hardest value between their expanded sets) the same per-tuple losses
need only dense arithmetic over the class-pair values, with the index lists built once per label
pattern (:meth:`~pml_ext.functional.BatchLayout.extra`). Each function returns the loss dict PML's
reducer reads; tested equal, value and gradient, to PML's own path on the hardened matrix.
"""
from __future__ import annotations

import numpy as np
import torch
from pytorch_metric_learning import losses, reducers

from .. import functional as F
from ..functional.compiled import compiled_for
from ..miners.embedding_expansion_miner import HardenedBatch

__all__ = ["PLAIN_REDUCERS", "dense_loss"]

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


def dense_loss(loss, indices_tuple):
    """The dense computation of ``loss`` (module docstring), or None where the wrapped loss must
    run as is: it is used with all tuples (no ``indices_tuple``), reducers that read the losses
    alone, and no embedding regulariser."""
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
    """The (a, p, n) triplets in PML's order and how the loss reads their values: ``("box",
    triplets, pos_idx, valid)``, positives of every anchor padded to P slots and the [B, P, B] mask
    of valid (a, slot, n); or, when that box is mostly empty (long-tailed classes: P is the largest
    class's), ``("lists", triplets)`` built by compiled loops where they run, else ``("flat",
    triplets, (ap, an))`` with the triplets' flat indices into the [B, B] matrix."""
    pos, neg = layout.positive, layout.negative
    p = int(pos.sum(1).max()) if pos.numel() else 0
    if p == 0 or not bool(neg.any()):
        return None
    b = pos.shape[0]
    sparse = int((pos.sum(1) * neg.sum(1)).sum()) < _FLAT_TRIPLETS * b * p * b
    if sparse and layout.classes.device.type == "cpu" and F.compiled_available():
        from ..functional.embedding_expansion_triplets_kernel import all_triplets

        return "lists", tuple(torch.from_numpy(t) for t in all_triplets(layout.classes.numpy()))
    pos8 = pos.to(torch.uint8)
    pos_idx = torch.sort(pos8, dim=1, descending=True, stable=True).indices[:, :p]
    # [B, P, B] as a uint8 product viewed as bool (the bool broadcast & is ~15x slower on CPU)
    valid = (pos8.gather(1, pos_idx)[:, :, None] * neg.to(torch.uint8)[:, None, :]).view(torch.bool)
    a, slot, n = valid.nonzero(as_tuple=True)
    pp = pos_idx.reshape(-1)[a * p + slot]
    if sparse:
        return "flat", (a, pp, n), (a * b + pp, a * b + n)
    return "box", (a, pp, n), pos_idx, valid


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


class _TripletGathers(torch.autograd.Function):
    """``(mat[a, p], mat[a, n])`` of a CPU float32 / float64 matrix by compiled loops, and their
    gradient into one [B, B] buffer (no flat index lists)."""

    @staticmethod
    def forward(ctx, mat, a, p, n):
        from ..functional.embedding_expansion_triplets_kernel import gather_triplets

        ctx.lists, ctx.b = (a.numpy(), p.numpy(), n.numpy()), mat.shape[0]
        return tuple(torch.from_numpy(v) for v in gather_triplets(mat.detach().numpy(), *ctx.lists))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_ap, g_an):
        from ..functional.embedding_expansion_triplets_kernel import gather_triplets_backward

        grad = gather_triplets_backward(g_ap.contiguous().numpy(), g_an.contiguous().numpy(), *ctx.lists, ctx.b)
        return torch.from_numpy(grad), None, None, None


def _dense_triplet(loss, hb: HardenedBatch, labels):
    """TripletMarginLoss over all (a, p, n), from the [B, B] hardened matrix (structure: above)."""
    structure = hb.layout.extra("triplet", _triplet_structure, keep=False)
    if structure is None:
        return loss.zero_losses()
    kind, indices = structure[:2]
    mat = hb.hardened_matrix()
    if kind == "lists" and mat.dtype in (torch.float32, torch.float64):
        margins = loss.distance.margin(*_TripletGathers.apply(mat, *indices))
    elif kind == "lists":  # half precision: no NumPy type for the compiled gathers
        a, p, n = indices
        b = mat.shape[0]
        margins = loss.distance.margin(*_TwoGathers.apply(mat, a * b + p, a * b + n))
    elif kind == "flat":
        margins = loss.distance.margin(*_TwoGathers.apply(mat, *structure[2]))
    else:  # the triplets are selected right after the one [B, P, B] operation; PML's arithmetic follows
        pos_idx, valid = structure[2:]
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
    pairs = hb.layout.extra("pairs", _pair_structure, keep=False)
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
    # the class-pair index of the ~B² negative pairs in one pass over the layout's [B, B] index,
    # row-major as nonzero lists them (four passes over int64 lists of that length cost more)
    return (a1, p, a2, n), a1 * layout.classes.numel() + p, layout.pair_index.masked_select(layout.negative)


def _dense_contrastive(loss, hb: HardenedBatch, labels):
    """ContrastiveLoss over all pairs: a positive pair's value from the batch's own matrix, a
    negative pair's from its class pair's hardest value, without the [B, B] hardened matrix."""
    pairs, pos_flat, neg_flat = hb.layout.extra("all_pairs", _all_pairs_structure, keep=False)
    if all(len(x) <= 1 for x in pairs):  # PML's GenericPairLoss returns zero losses then
        return loss.zero_losses()
    pos_loss = neg_loss = 0
    if pos_flat.numel():
        pos_loss = loss.get_per_pair_loss(F.take(hb.originals_mat, pos_flat), "pos")
    if neg_flat.numel():
        neg_loss = loss.get_per_pair_loss(F.take(hb.hardest, neg_flat), "neg")
    return {"pos_loss": {"losses": pos_loss, "indices": pairs[:2], "reduction_type": "pos_pair"},
            "neg_loss": {"losses": neg_loss, "indices": pairs[2:], "reduction_type": "neg_pair"}}


def _npair_structure(layout: F.BatchLayout):
    """PML's N-pair choice, for every class with a positive pair its first two samples (a, p), in
    class order, with what the dense loss's tensor path reads per call: the [n, n] flat index of the
    anchors' similarity matrix into the concatenated hardest values [C, C] and batch matrix [B, B]
    (each anchor's class pairs, its own positive pair on the diagonal). Built with NumPy on CPU (a
    new label pattern, every step for random batches, pays a few NumPy calls instead of ~15 tensor
    operations)."""
    build = _npair_index_numpy if layout.classes.device.type == "cpu" else _npair_index_tensors
    a, index = build(layout)
    return None if a.numel() == 0 else (a, index)


def _npair_index_numpy(layout: F.BatchLayout):
    """(a, index) of :func:`_npair_structure` with NumPy (CPU), from the layout's [C, K] table of
    each class's samples in batch order (padding: B)."""
    c, b = layout.num_classes, layout.classes.numel()
    slots = layout._original_slots.numpy()
    if slots.shape[1] < 2:  # only singletons
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long)
    ca = np.flatnonzero(slots[:, 1] < b)  # the anchors' classes
    a, p = slots[ca, 0], slots[ca, 1]
    index = ca[:, None] * c + ca[None, :]
    np.fill_diagonal(index, c * c + a * b + p)
    return torch.from_numpy(a), torch.from_numpy(index)


def _npair_index_tensors(layout: F.BatchLayout):
    """(a, index) of :func:`_npair_structure` with tensor operations (any device), from the same
    table."""
    c, b = layout.num_classes, layout.classes.numel()
    slots = layout._original_slots
    if slots.shape[1] < 2:  # only singletons
        return slots.new_zeros(0), slots.new_zeros(0, 0)
    has_pair = slots[:, 1] < b
    a, p = slots[has_pair, 0], slots[has_pair, 1]
    ca = layout.classes[a]
    index = ca[:, None] * c + ca[None, :]
    index.diagonal().copy_(c * c + a * b + p)
    return a, index


class _NPairCrossEntropy(torch.autograd.Function):
    """The dense N-pair loss from the hardened values by compiled loops
    (:mod:`~pml_ext.functional.embedding_expansion_npairs_kernel`): the anchors from the layout's
    per-class sample table, the gather of their similarity matrix, its sign, the cross-entropy and
    the ordering by label in one call, their gradient into the hardest values and the batch matrix
    in another. Returns the per-anchor losses and the anchors (PML's order), the latter not
    differentiable."""

    @staticmethod
    def forward(ctx, hardest, batch, slots, labels, negate: bool):
        from ..functional.embedding_expansion_npairs_kernel import npair_cross_entropy

        slots = slots.numpy()
        losses, prob, anchor_classes, order, anchors = npair_cross_entropy(
            hardest.detach().numpy(), batch.detach().numpy(), slots, labels.numpy(), negate)
        ctx.arrays = prob, anchor_classes, order, slots, negate, hardest.shape[0], batch.shape[0]
        anchors = torch.from_numpy(anchors)
        ctx.mark_non_differentiable(anchors)
        return torch.from_numpy(losses), anchors

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _):
        from ..functional.embedding_expansion_npairs_kernel import npair_cross_entropy_backward

        g_h, g_b = npair_cross_entropy_backward(grad.contiguous().numpy(), *ctx.arrays)
        return torch.from_numpy(g_h), torch.from_numpy(g_b), None, None, None


def _plain_cross_entropy(loss) -> bool:
    """Whether the N-pair loss's cross-entropy is PML's (unweighted, no label smoothing, no ignored
    target, per row): what the compiled cross-entropy computes."""
    ce = loss.cross_entropy
    return (type(ce) is torch.nn.CrossEntropyLoss and ce.weight is None and ce.label_smoothing == 0
            and ce.ignore_index < 0 and ce.reduction == "none")


def _dense_npairs(loss, hb: HardenedBatch, labels):
    """NPairsLoss: PML's anchors and positives (lmu.convert_to_pos_pairs_with_unique_labels:
    the first two samples of each class, ordered by label), the cross-entropy over their
    hardened similarity matrix (by compiled loops where they run and the cross-entropy is PML's)."""
    # the anchors' classes differ, so the hardened [a, p] matrix holds each anchor's own positive on
    # its diagonal and its class pair's hardest value everywhere else: one gather, no [B, B] matrix
    hardest, batch = hb.hardest, hb.originals_mat
    if compiled_for(hardest.device, hardest.dtype) and batch.dtype == hardest.dtype and _plain_cross_entropy(loss):
        per_anchor, anchors = _NPairCrossEntropy.apply(hardest, batch, hb.layout._original_slots, labels,
                                                       not loss.distance.is_inverted)
    else:
        per_anchor, anchors = _npair_losses_with_tensors(loss, hb, labels)
    loss.num_pairs = anchors.numel()
    if loss.num_pairs == 0:
        return loss.zero_losses()
    return {"loss": {"losses": per_anchor, "indices": anchors, "reduction_type": "element"}}


def _npair_losses_with_tensors(loss, hb: HardenedBatch, labels):
    """(per-anchor losses, anchors) of :func:`_dense_npairs` in PML's order, by tensor operations (GPU,
    half precision, a user's cross-entropy); both empty without an anchor."""
    structure = hb.layout.extra("npairs", _npair_structure)
    if structure is None:
        empty = labels.new_zeros(0, dtype=torch.long)
        return empty, empty
    a, index = structure
    # in class order (cached per label pattern), then in PML's order, by label: each anchor's loss
    # reads only its own row
    order = torch.argsort(labels.index_select(0, a))
    sim = F.take(torch.cat([hb.hardest.reshape(-1), hb.originals_mat.reshape(-1)]), index)
    if not loss.distance.is_inverted:
        sim = -sim
    per_anchor = loss.cross_entropy(sim, torch.arange(a.numel(), device=a.device)).index_select(0, order)
    return per_anchor, a.index_select(0, order)
