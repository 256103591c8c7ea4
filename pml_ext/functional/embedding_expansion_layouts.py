"""Label-pattern layouts of EE's expanded set (Ko & Gu, CVPR 2020), built once per pattern.

:class:`BatchLayout` holds everything about a batch that depends only on which samples share a
class, and :func:`batch_layout` caches it by label pattern. A balanced batch (every class with k
samples) in a new order is a new label pattern, so its layout would be built from scratch every
step. But sorting the batch by class (stable) gives the canonical pattern ``0…0 1…1 …`` (classes
numbered by first appearance), and every structure of the layout is that pattern's mapped through
the sort (:func:`balanced_layout`): batch indices through the permutation, expanded-set indices
through the order in which the batch lists its synthetic points (``pairs="all"``: same-class pairs
by batch index, a sort of the mapped pairs; ``"adjacent"``: class by class, as in the canonical
pattern). The weights and masks over class slots are the canonical ones (a class's originals keep
their batch order). A few gathers instead of the full construction; tested equal, field by field,
to the direct construction. Any other new pattern on CPU (random labels, long-tailed data) is
built with NumPy (:func:`numpy_layout`), also tested equal field by field.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Tuple

import numpy as np
import torch

from .compiled import compiled_available
from .embedding_expansion import ExpandedSet, _class_slots, expand

__all__ = ["BatchLayout", "batch_layout", "first_appearance_classes"]


class BatchLayout:
    """Everything about a batch that depends only on which samples share a class.

    Built once per label pattern and cached (:func:`batch_layout`): for a PML sampler such as
    ``MPerClassSampler`` the pattern repeats every batch even though the classes change, so a
    training step does no index arithmetic. Classes are numbered by first appearance.

    The expanded set is laid out in class slots: ``slots[c, s]`` is the expanded-set index of
    class c's s-th point (originals first, padding = M), and ``weights[c, s]`` expresses that
    point over class c's originals ``originals[c]`` (padding = B): every inner product between
    two classes' expanded sets is ``weights[c] · G[c, d] · weights[d]ᵀ`` with G[c, d] the
    k x k block of the originals' Gram matrix.
    """

    _BLOCKED = ("slots", "weights", "valid_slot", "synthetic_slot", "original_slot", "has_synthetic",
                "row_base", "col_base", "slot_points", "slot_weights")

    def __init__(self, classes: torch.Tensor, num_classes: int, ex: ExpandedSet):
        self.classes, self.num_classes, self.expanded = classes, num_classes, ex
        c = num_classes
        self.first_index = _first_positions(classes, c)
        self._original_slots = _class_slots(classes, c)  # [C, k]
        # points of each class's expanded set, K_c: what the search's cost follows
        self.class_sizes = torch.bincount(classes[ex.first], minlength=c)
        self._extras: dict = {}
        self.uses = 0  # batches that got this layout from batch_layout (see extra)

    # built on first use (a new label pattern every step pays only for what its loss and search read)
    _LAZY = {
        "originals": lambda self: self._original_slots.flatten().clamp(max=max(self.classes.numel() - 1, 0)),
        "class_eye": lambda self: torch.eye(self.num_classes, dtype=torch.bool, device=self.classes.device),
        "pair_index": lambda self: self.classes[:, None] * self.num_classes + self.classes[None, :],
        "negative": lambda self: self.classes[:, None] != self.classes[None, :],
        # same class, i != j
        "positive": lambda self: (self.classes[:, None] == self.classes[None, :]).fill_diagonal_(False),
    }

    def __getattr__(self, name):
        # the padded [C, K] slot structures are built on first use: the grouped search
        # (embedding_expansion_groups) does not need them
        if name == "slots":
            m = self.expanded.labels.numel()
            self.slots = _class_slots(self.classes[self.expanded.first] if m else self.classes, self.num_classes)
            return self.slots
        if name in BatchLayout._BLOCKED:
            self._build_blocked()
            return self.__dict__[name]
        if name in BatchLayout._LAZY:
            value = BatchLayout._LAZY[name](self)
            setattr(self, name, value)
            return value
        raise AttributeError(name)

    def _build_blocked(self) -> None:
        ex, classes, c = self.expanded, self.classes, self.num_classes
        b, m, device = ex.num_originals, ex.labels.numel(), classes.device
        originals = self._original_slots
        k = originals.shape[1]
        kk = self.slots.shape[1]  # [C, K]
        valid = self.slots < m
        self.valid_slot = None if bool(valid.all()) else valid
        flat = self.slots.flatten().clamp(max=max(m - 1, 0))
        # position of every original inside its class's k original slots
        position = torch.zeros(b + 1, dtype=torch.long, device=device)
        position[originals.flatten()] = torch.arange(k, device=device).repeat(c)
        w = torch.zeros(c * kk, k, dtype=ex.w_first.dtype, device=device)
        ok = valid.flatten()
        ends = torch.stack([ex.first[flat], ex.second[flat]], 1) * ok[:, None]  # [C·K, 2], padding 0
        ends_w = torch.stack([ex.w_first[flat], ex.w_second[flat]], 1) * ok[:, None]
        w.scatter_add_(1, position[ends], ends_w)
        self.weights = w.view(c, kk, k)
        # every slot's expanded-set index and its point's two originals (padding: M, 0, 0), and their
        # weights (EE Eq. 1; padding 0): what the selected pairs' values read
        self.slot_points = torch.cat([self.slots.reshape(-1, 1), ends], 1)
        self.slot_weights = ends_w
        self.synthetic_slot = ex.is_synthetic[flat].view(c, kk) & valid
        self.original_slot = (self.slots < b) & valid
        self.has_synthetic = bool(self.synthetic_slot.any())
        # [C, C] base offsets of class x's and class y's slots in the flattened [C·K] layout
        self.row_base = (torch.arange(c, device=device) * kk)[:, None]
        self.col_base = (torch.arange(c, device=device) * kk)[None, :]

    def extra(self, name: str, build, keep: bool = True):
        """A per-layout cache for structures the losses derive from the label pattern. ``keep=False``
        for structures as large as the batch's pairs or tuples: they are cached only once the label
        pattern has recurred (:attr:`uses` > 1). A new pattern every step (random batches) would
        otherwise fill the layout cache with structures that are never read again."""
        if name in self._extras:
            return self._extras[name]
        value = build(self)
        if keep or self.uses > 1:
            self._extras[name] = value
        return value


_LAYOUT_CACHE: "OrderedDict[tuple, BatchLayout]" = OrderedDict()
_LAYOUT_CACHE_SIZE = 8  # each holds a few [B, B] index tensors, plus the dense losses' lists when used
# (Triplet: its triplets; Contrastive: three [#pairs] int64 lists, ~25 MB at B = 1024)


def _first_positions(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C] position of each class's first sample."""
    b = classes.numel()
    return torch.full((num_classes,), b, dtype=torch.long, device=classes.device).scatter_reduce(
        0, classes, torch.arange(b, device=classes.device), "amin")


def first_appearance_classes(labels: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Class index of every sample, classes numbered in order of first appearance."""
    if labels.device.type == "cpu" and labels.numel():
        cls, first = _first_appearance_numpy(labels.numpy())
        return torch.from_numpy(cls), first.size
    _, inverse = torch.unique(labels, return_inverse=True)
    c = int(inverse.max()) + 1 if labels.numel() else 0
    first = _first_positions(inverse, c)
    rank = torch.empty_like(first)
    rank[first.argsort()] = torch.arange(c, device=labels.device)
    return rank[inverse], c


def _first_appearance_numpy(lab: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(class of every sample, numbered by first appearance; each class's first position) of
    non-empty labels, by one stable sort (a new label pattern pays this every step); with numba
    installed by compiled loops (the same arrays)."""
    if compiled_available() and lab.dtype.kind in "iu":
        from .embedding_expansion_layouts_kernel import first_appearance

        return first_appearance(lab)
    b = lab.size
    order = np.argsort(lab, kind="stable")
    sorted_lab = lab[order]
    new = np.empty(b, dtype=bool)
    new[0] = True
    np.not_equal(sorted_lab[1:], sorted_lab[:-1], out=new[1:])
    starts = np.flatnonzero(new)  # each label's block in the sorted order
    by_appearance = np.argsort(order[starts])  # blocks by their first sample's position
    rank = np.empty(starts.size, dtype=np.int64)
    rank[by_appearance] = np.arange(starts.size)
    cls = np.empty(b, dtype=np.int64)
    cls[order] = rank[np.cumsum(new) - 1]
    return cls, order[starts[by_appearance]]


def _same_pattern(layout: BatchLayout, labels: torch.Tensor, lab: Optional[np.ndarray]) -> bool:
    """Whether ``labels`` has the label pattern of ``layout`` (same classes, any class ids): every
    sample carries its class's first sample's label, and different classes different labels.
    ``lab``: the labels as a NumPy array (CPU), else None."""
    if layout.classes.numel() != labels.numel() or labels.numel() == 0:
        return False
    if lab is not None:  # a few NumPy calls on B integers
        first, classes = layout.extra("numpy_pattern", lambda lay: (lay.first_index.numpy(), lay.classes.numpy()))
        ids = lab[first]
        return bool(np.array_equal(ids[classes], lab)) and np.unique(ids).size == ids.size
    ids = labels[layout.first_index]  # [C] each class's label
    if not torch.equal(ids[layout.classes], labels):
        return False
    ids = ids.sort().values
    return not bool((ids[1:] == ids[:-1]).any())


def batch_layout(labels: torch.Tensor, n_points: int = 2, pairs: str = "all",
                 dtype: torch.dtype = torch.float32) -> BatchLayout:
    """The :class:`BatchLayout` of a batch's labels, cached by label pattern (LRU, 8 entries)."""
    lab = labels.numpy() if labels.device.type == "cpu" and labels.numel() else None
    # with the compiled class numbering (one call) the numbering itself is the cache key, below; else
    # the most recent pattern first: a sampler repeats one pattern every batch
    numbered = lab is not None and compiled_available() and lab.dtype.kind in "iu"
    if _LAYOUT_CACHE and not numbered:
        key, layout = next(reversed(_LAYOUT_CACHE.items()))
        if key[1:] == (n_points, pairs, str(labels.device), dtype) and _same_pattern(layout, labels, lab):
            layout.uses += 1
            return layout
    if lab is None:
        classes, c = first_appearance_classes(labels)
        cls = first = None
        pattern = classes.cpu().numpy().tobytes()
    else:  # NumPy from here on: a new label pattern (every step for random batches) pays this
        cls, first = _first_appearance_numpy(lab)
        classes, c = torch.from_numpy(cls), first.size
        pattern = cls.tobytes()
    key = (pattern, n_points, pairs, str(labels.device), dtype)

    def build() -> BatchLayout:
        layout = None
        by_numpy = cls is not None and dtype in _NUMPY_DTYPES
        # a balanced batch in any order, mapped from its canonical layout; with the compiled layout
        # builder a direct build costs less (0.07 vs 0.29 ms for a shuffled 32x4 batch)
        if not (by_numpy and compiled_available()) and (cls is None or np.ptp(np.bincount(cls)) == 0):
            layout = balanced_layout(classes, c, n_points, pairs, dtype)
        if layout is None:
            if by_numpy:
                layout = numpy_layout(classes, c, n_points, pairs, dtype)
            else:
                layout = BatchLayout(classes, c, expand(classes, n_points, pairs, dtype))
        if first is not None:  # what _same_pattern reads next step
            layout._extras["numpy_pattern"] = (first, cls)
        return layout

    layout = _lru_get(_LAYOUT_CACHE, key, _LAYOUT_CACHE_SIZE, build)
    layout.uses += 1
    return layout


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def numpy_layout(classes: torch.Tensor, c: int, n_points: int, pairs: str, dtype) -> BatchLayout:
    """The :class:`BatchLayout` of CPU labels built from NumPy arrays, field by field the one
    ``BatchLayout(classes, c, expand(classes, n_points, pairs, dtype))`` builds (tested): a new
    label pattern (every step for random batches) pays ~40 NumPy calls on a few hundred integers
    instead of ~60 tensor operations, each with its fixed cost, or with numba installed one call
    of compiled loops (:func:`~pml_ext.functional.embedding_expansion_layouts_kernel.layout_arrays`,
    the same arrays). ``classes`` numbers classes by first appearance; ``dtype`` float32 or float64."""
    cls = classes.numpy()
    np_dtype = _NUMPY_DTYPES[dtype]
    w = np.arange(1, n_points + 1, dtype=np_dtype) / np_dtype(n_points + 1)  # EE Eq. 1, as expansion_weights
    if compiled_available() and cls.size:
        from .embedding_expansion_layouts_kernel import layout_arrays

        arrays = layout_arrays(cls, c, n_points, pairs == "all", w)
    else:
        arrays = _layout_arrays(cls, c, n_points, pairs, w)
    (first, second, w_first, w_second, point_class, is_synthetic, first_index, original_slots, class_sizes,
     negative, positive, pair_index, class_eye) = arrays
    t = torch.from_numpy
    ex = ExpandedSet(t(first), t(second), t(w_first), t(w_second), t(point_class), t(is_synthetic), cls.size)
    layout = BatchLayout.__new__(BatchLayout)
    # the NumPy arrays the row search starts from (embedding_expansion_rows)
    extras = {"numpy": (first, second, w_first, w_second, point_class, class_sizes)}
    layout.__dict__.update(classes=classes, num_classes=c, expanded=ex, _extras=extras, uses=0,
                           first_index=t(first_index), _original_slots=t(original_slots), class_sizes=t(class_sizes),
                           # the [B, B] masks most losses read, here rather than lazily by tensor operations
                           negative=t(negative), positive=t(positive), pair_index=t(pair_index),
                           class_eye=t(class_eye))
    return layout


def _layout_arrays(cls: np.ndarray, c: int, n_points: int, pairs: str, w: np.ndarray):
    """:func:`numpy_layout`'s arrays by NumPy calls (the tuple
    :func:`~pml_ext.functional.embedding_expansion_layouts_kernel.layout_arrays` returns)."""
    b = cls.size
    counts = np.bincount(cls, minlength=c)
    order = np.argsort(cls, kind="stable")  # class by class, batch order inside
    starts = np.cumsum(counts) - counts
    sorted_cls = cls[order]
    slot = np.arange(b) - starts[sorted_cls]  # each sample's place among its class's samples
    original_slots = np.full((c, max(int(counts.max()) if b else 0, 1)), b, dtype=np.int64)
    original_slots[sorted_cls, slot] = order
    if pairs == "all":  # every same-class pair i < j, by (i, j): each sample with the later ones of its class
        later = counts[sorted_cls] - 1 - slot
        pos = np.repeat(np.arange(b), later)
        pos_j = pos + 1 + np.arange(pos.size) - np.repeat(np.cumsum(later) - later, later)
        pi, pj = order[pos], order[pos_j]
        by_pair = np.argsort(pi * b + pj)
        pi, pj = pi[by_pair], pj[by_pair]
    else:  # the 1st and 2nd sample of a class, the 3rd and 4th, ...: by class, then batch order
        starts_of_pairs = np.nonzero((slot % 2 == 0) & (slot + 1 < counts[sorted_cls]))[0]
        pi, pj = order[starts_of_pairs], order[starts_of_pairs + 1]
    m = b + pi.size * n_points
    first, second = np.empty(m, dtype=np.int64), np.empty(m, dtype=np.int64)
    first[:b] = second[:b] = np.arange(b)
    w_first = np.ones(m, dtype=w.dtype)
    if n_points:  # pair-major, k-minor
        first[b:].reshape(-1, n_points)[:] = pi[:, None]
        second[b:].reshape(-1, n_points)[:] = pj[:, None]
        w_first[b:].reshape(-1, n_points)[:] = w
    w_second = 1 - w_first
    point_class = cls[first]
    negative = cls[:, None] != cls[None, :]
    positive = ~negative
    np.fill_diagonal(positive, False)
    first_index = order[starts] if b else np.zeros(c, dtype=np.int64)
    return (first, second, w_first, w_second, point_class, np.arange(m) >= b, first_index, original_slots,
            np.bincount(point_class, minlength=c), negative, positive, cls[:, None] * c + cls[None, :],
            np.eye(c, dtype=bool))


def _lru_get(cache: "OrderedDict", key: tuple, size: int, build):
    """``cache[key]``, built by ``build()`` on a miss; the least recently used entry beyond ``size`` goes."""
    value = cache.get(key)
    if value is None:
        value = cache[key] = build()
        if len(cache) > size:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


_CANONICAL: "OrderedDict[tuple, BatchLayout]" = OrderedDict()
_CANONICAL_SIZE = 4


def _canonical(c: int, k: int, n_points: int, pairs: str, dtype, device) -> BatchLayout:
    """The layout of ``0…0 1…1 …`` (c classes of k), its class-slot structures built (cached)."""
    def build() -> BatchLayout:
        classes = torch.arange(c, device=device).repeat_interleave(k)
        layout = BatchLayout(classes, c, expand(classes, n_points, pairs, dtype))
        layout.slot_points  # noqa: B018 - builds the class-slot structures once
        return layout

    return _lru_get(_CANONICAL, (c, k, n_points, pairs, dtype, str(device)), _CANONICAL_SIZE, build)


def balanced_layout(classes: torch.Tensor, c: int, n_points: int, pairs: str, dtype) -> Optional[BatchLayout]:
    """The layout of a balanced batch mapped from its canonical one, or None when the batch is not
    balanced (then it is built directly). ``classes`` numbers classes by first appearance."""
    b = classes.numel()
    if c == 0 or b % c:
        return None
    k = b // c
    if not bool((torch.bincount(classes, minlength=c) == k).all()):
        return None
    canon = _canonical(c, k, n_points, pairs, dtype, classes.device)
    if torch.equal(classes, canon.classes):
        return canon
    ex0, device = canon.expanded, classes.device
    m = ex0.labels.numel()
    perm = torch.sort(classes, stable=True).indices  # canonical position -> batch index
    # phi: the batch's expanded-set index -> the canonical one; originals through the inverse sort
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(b, device=device)
    if pairs == "all" and m > b:
        # the batch lists its same-class pairs by (i, j) batch index; the canonical list, mapped
        first_of_pair = ex0.first[b::n_points], ex0.second[b::n_points]
        order = torch.argsort(perm[first_of_pair[0]] * b + perm[first_of_pair[1]])
        synthetic = (b + order[:, None] * n_points + torch.arange(n_points, device=device)).reshape(-1)
    else:
        synthetic = torch.arange(b, m, device=device)
    phi = torch.cat([inverse, synthetic])
    psi = torch.empty(m + 1, dtype=torch.long, device=device)  # canonical -> batch (padding M -> M)
    psi[phi] = torch.arange(m, device=device)
    psi[m] = m
    first, second = perm[ex0.first[phi]], perm[ex0.second[phi]]
    ex = ExpandedSet(first, second, ex0.w_first[phi], ex0.w_second[phi], classes[first], ex0.is_synthetic, b)
    layout = BatchLayout.__new__(BatchLayout)
    layout.__dict__.update(
        classes=classes, num_classes=c, expanded=ex, uses=0,
        _extras={"block_index": perm[:, None] * b + perm[None, :]},  # the Gram matrix in class blocks
        first_index=perm.view(c, k)[:, 0], _original_slots=perm.view(c, k), class_sizes=canon.class_sizes,
        slots=psi[canon.slots], weights=canon.weights, valid_slot=canon.valid_slot,
        synthetic_slot=canon.synthetic_slot, original_slot=canon.original_slot, has_synthetic=canon.has_synthetic,
        row_base=canon.row_base, col_base=canon.col_base, slot_weights=canon.slot_weights,
        slot_points=torch.stack([psi[canon.slot_points[:, 0]], perm[canon.slot_points[:, 1]],
                                 perm[canon.slot_points[:, 2]]], 1),
    )
    return layout
