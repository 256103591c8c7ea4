"""Multi-process training.

PML's ``DistributedLossWrapper`` serves ``EmbeddingExpansionLoss`` and ``HPHNTripletLoss``
directly (they are ``BaseMetricLossFunction``s; use ``efficient=False``). It hands every rank the
global batch with that rank's rows first; EE's adjacent pairing (and order-dependent wrapped losses
such as N-pair) depend on row order, so both losses put the rows back in rank order first
(:func:`in_rank_order`): every rank then computes the one-process loss on the batch concatenated in
rank order. HDML needs more: it takes backbone *features* and applies the embedding head, generator
and classifier itself, so those modules see every sample of the global batch on every rank.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["DistributedHDMLWrapper", "gather_features", "in_rank_order"]


def _gathered_by_pml_wrapper(loss: torch.nn.Module) -> Optional[int]:
    """If ``loss`` is being called by PML's ``DistributedLossWrapper`` (efficient=False) in a
    process group of more than one rank, the world size; else None. PML gives no other signal
    than its own frame, so the caller's frames are inspected (a few, not the whole stack)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    code = DistributedLossWrapper.forward_regular_loss.__code__
    frame = sys._getframe(2)
    for _ in range(8):  # forward <- Module._call_impl <- _wrapped_call_impl <- forward_regular_loss
        if frame is None:
            return None
        if frame.f_code is code:
            wrapper = frame.f_locals.get("self")
            ok = wrapper is not None and wrapper.loss is loss and not wrapper.efficient
            return dist.get_world_size() if ok else None
        frame = frame.f_back
    return None


def in_rank_order(loss: torch.nn.Module, embeddings: torch.Tensor, labels: torch.Tensor,
                  indices_tuple: Optional[Tuple[torch.Tensor, ...]] = None):
    """``(embeddings, labels, indices_tuple)`` in rank order when PML's ``DistributedLossWrapper``
    gathered them (it puts this rank's rows first, then the other ranks' in rank order); as given
    otherwise. Indices are remapped to the new row order; gradients flow back through the gather."""
    world = _gathered_by_pml_wrapper(loss)
    if world is None:
        return embeddings, labels, indices_tuple
    n, rank = embeddings.shape[0], dist.get_rank()
    if n % world:
        raise ValueError(f"the gathered batch has {n} rows, not a multiple of the world size {world}")
    b = n // world
    # block of the gathered batch that holds rank k's rows: 0 for this rank, then the others in order
    block = torch.tensor([0 if k == rank else k + 1 if k < rank else k for k in range(world)],
                         device=embeddings.device)
    perm = (block[:, None] * b + torch.arange(b, device=embeddings.device)[None, :]).flatten()
    if indices_tuple is not None:
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(n, device=perm.device)
        indices_tuple = tuple(inverse[t] for t in indices_tuple)
    return embeddings[perm], labels[perm], indices_tuple


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
    them in sync. HDML's random choices (the ``max_synthetic_tuples`` subsets, any dropout in a
    custom generator) draw from one seed that rank 0 broadcasts every step, so every rank makes
    the same ones; each rank's own random stream is left as it was. Outside a process group it
    calls ``hdml`` as is.
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
        seed = torch.randint(0, 2**62, (1,), dtype=torch.long).to(features.device)  # NCCL: on the GPU
        dist.broadcast(seed, src=0)
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(int(seed))
            return self.hdml(all_features, all_labels, embedder)
