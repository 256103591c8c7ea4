"""Multi-process training for HDML: every rank evaluates HDML on the whole global batch.

PML's ``DistributedLossWrapper`` serves ``EmbeddingExpansionLoss`` and ``HPHNTripletLoss``
directly (they are ``BaseMetricLossFunction``s; use ``efficient=False``). HDML needs more: it takes
backbone *features* and applies the embedding head, generator and classifier itself, so those
modules see every sample of the global batch on every rank.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.distributed as dist

__all__ = ["DistributedHDMLWrapper", "gather_features"]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def gather_features(features: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The global batch, in rank order. This rank's rows stay in the graph with their gradient
    multiplied by the world size; the other ranks' rows are constants.

    Why the scale: every rank then computes the same global loss, so the parameters applied to
    all rows (head, generator, classifier) get the full gradient on every rank, which DDP's
    averaging keeps; the backbone only sees its own rows, and ``world_size x`` its part averaged
    over ranks is the sum of the parts — the one-process gradient.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=features.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([features.shape[0]], device=features.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"every rank needs the same batch size, got {[int(s) for s in sizes]}")
    feats = [torch.empty_like(features) for _ in range(world)]
    labs = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(feats, features.detach().contiguous())
    dist.all_gather(labs, labels.contiguous())
    feats[rank] = _ScaleGrad.apply(features, float(world))
    return torch.cat(feats), torch.cat(labs)


class DistributedHDMLWrapper(torch.nn.Module):
    """``HDMLLoss`` under ``torch.distributed``: gathers features and labels, then runs HDML on the
    global batch on every rank (same value as one process on the concatenated batch; gradients
    equal once DDP averages them, tested with 2 gloo processes).

    Wrap the trunk (and head) in ``DistributedDataParallel`` as usual; the generator and classifier
    receive identical gradients on every rank, so DDP over ``hdml`` (or no all-reduce at all) keeps
    them in sync. Outside a process group it calls ``hdml`` as is.
    """

    def __init__(self, hdml: torch.nn.Module):
        super().__init__()
        self.hdml = hdml

    def forward(self, features: torch.Tensor, labels: torch.Tensor, embedder: Callable,
                indices_tuple=None) -> torch.Tensor:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.hdml(features, labels, embedder, indices_tuple)
        if indices_tuple is not None:
            raise ValueError("indices_tuple refers to one rank's batch; give HDMLLoss a miner instead")
        all_features, all_labels = gather_features(features, labels.to(features.device))
        return self.hdml(all_features, all_labels, embedder)
