"""The generator of Hardness-Aware Deep Metric Learning (Zheng, Chen, Lu, Zhou, CVPR 2019,
arXiv 1903.05503) and how :class:`pml_ext.losses.HDMLLoss` calls it and the softmax classifier.

:func:`default_hdml_generator` is the paper's generator (embedding space -> feature space). The
private helpers call a module so that each HDML objective's gradient reaches only its own
parameters in one backward: :class:`_RoutedCall` (one forward, two outputs: one for the
generator's J_gen, one for the embedding's J_syn), :func:`_frozen_call` (parameters used as
constants) and :func:`_zero_from` (a zero that still reaches every parameter, so their gradients
are 0 rather than None).
"""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["default_hdml_generator"]


def default_hdml_generator(embedding_size: int, feature_size: int, hidden_size: int = 512) -> torch.nn.Module:
    """The paper's generator: embedding -> Linear(hidden) -> ReLU -> BatchNorm -> Linear(feature_size)
    (official ``fc_block`` order: matmul + bias, ReLU, then BN)."""
    return torch.nn.Sequential(
        torch.nn.Linear(embedding_size, hidden_size),
        torch.nn.ReLU(),
        torch.nn.BatchNorm1d(hidden_size),
        torch.nn.Linear(hidden_size, feature_size),
    )


class _RoutedCall(torch.autograd.Function):
    """``module(x)`` computed once, returned twice: the first copy's gradient reaches only the
    module's parameters, the second's only ``x`` (HDML's generator: J_gen trains the generator,
    J_syn trains the embedding through it). One forward (BatchNorm statistics, dropout masks:
    once) instead of two calls; the backward asks autograd for exactly the two gradients."""

    @staticmethod
    def forward(ctx, module, x, *params):
        names = [n for n, _ in module.named_parameters()]
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(x.requires_grad)
            p_in = [p.detach().requires_grad_(p.requires_grad) for p in params]
            y = torch.func.functional_call(module, {**dict(module.named_buffers()), **dict(zip(names, p_in))},
                                           (x_in,))
        ctx.inner = (y, x_in, p_in)
        out = y.detach()
        return out, out.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_params, g_input):
        y, x_in, p_in = ctx.inner
        trainable = [p for p in p_in if p.requires_grad]
        grads = dict.fromkeys(range(len(p_in)))
        if trainable and g_params is not None:
            found = torch.autograd.grad(y, trainable, g_params, retain_graph=True, allow_unused=True)
            grads.update(zip([i for i, p in enumerate(p_in) if p.requires_grad], found))
        g_x = None
        if x_in.requires_grad and g_input is not None:
            # the inner graph lives as long as the outer one (ctx): the outer graph may be
            # retained and differentiated again, term by term
            (g_x,) = torch.autograd.grad(y, x_in, g_input, retain_graph=True, allow_unused=True)
        return (None, g_x, *[grads[i] for i in range(len(p_in))])


def _frozen_call(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with the module's parameters treated as constants (detached) and its buffers
    cloned (so BatchNorm running statistics are not updated a second time). Gradient still flows
    to ``x``."""
    tensors = {n: p.detach() for n, p in module.named_parameters()}
    tensors.update({n: b.clone() for n, b in module.named_buffers()})
    return torch.func.functional_call(module, tensors, (x,))


def _zero_from(tensors: Iterable[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A zero connected to every given tensor (so their grads become 0, not None)."""
    out = like.new_zeros(())
    for t in tensors:
        if t.requires_grad:
            out = out + (t * 0).sum()
    return out
