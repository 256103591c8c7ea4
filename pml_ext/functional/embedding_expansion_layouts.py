"""Layouts of balanced label patterns in any batch order, mapped from one canonical layout.

A balanced batch (every class with k samples) in a new order is a new label pattern, so its
:class:`~pml_ext.functional.BatchLayout` would be built from scratch every step. But sorting the
batch by class (stable) gives the canonical pattern ``0…0 1…1 …`` (classes numbered by first
appearance), and every structure of the layout is that pattern's mapped through the sort: batch
indices through the permutation, expanded-set indices through the order in which the batch lists
its synthetic points (``pairs="all"``: same-class pairs by batch index, a sort of the mapped
pairs; ``"adjacent"``: class by class, as in the canonical pattern). The weights and masks over
class slots are the canonical ones (a class's originals keep their batch order). A few gathers
instead of the full construction; tested equal, field by field, to the direct construction.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch

from .embedding_expansion import BatchLayout, ExpandedSet, expand

__all__: list = []

_CANONICAL: "OrderedDict[tuple, BatchLayout]" = OrderedDict()
_CANONICAL_SIZE = 4


def _canonical(c: int, k: int, n_points: int, pairs: str, dtype, device) -> BatchLayout:
    """The layout of ``0…0 1…1 …`` (c classes of k), its class-slot structures built (cached)."""
    key = (c, k, n_points, pairs, dtype, str(device))
    layout = _CANONICAL.get(key)
    if layout is None:
        classes = torch.arange(c, device=device).repeat_interleave(k)
        layout = BatchLayout(classes, c, expand(classes, n_points, pairs, dtype))
        layout.slot_points  # noqa: B018 - builds the class-slot structures once
        _CANONICAL[key] = layout
        if len(_CANONICAL) > _CANONICAL_SIZE:
            _CANONICAL.popitem(last=False)
    else:
        _CANONICAL.move_to_end(key)
    return layout


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
        classes=classes, num_classes=c, expanded=ex,
        _extras={"block_index": perm[:, None] * b + perm[None, :]},  # the Gram matrix in class blocks
        first_index=perm.view(c, k)[:, 0], _original_slots=perm.view(c, k), class_sizes=canon.class_sizes,
        slots=psi[canon.slots], weights=canon.weights, valid_slot=canon.valid_slot,
        synthetic_slot=canon.synthetic_slot, original_slot=canon.original_slot, has_synthetic=canon.has_synthetic,
        row_base=canon.row_base, col_base=canon.col_base, slot_weights=canon.slot_weights,
        slot_points=torch.stack([psi[canon.slot_points[:, 0]], perm[canon.slot_points[:, 1]],
                                 perm[canon.slot_points[:, 2]]], 1),
    )
    return layout
