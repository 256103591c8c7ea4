"""The running loss averages of Hardness-Aware Deep Metric Learning (Zheng, Chen, Lu, Zhou,
CVPR 2019, arXiv 1903.05503): ``J_avg``, the average metric loss that sets how far the augmentor
pulls the negatives (``exp(-alpha / J_avg)``), and ``J_gen_avg``, the average generator loss that
weighs the real against the synthetic metric loss (``exp(-beta / J_gen_avg)``).

:class:`RunningLossAverage` keeps one such average in registered buffers (so it checkpoints with
the module that owns it, :class:`pml_ext.losses.HDMLLoss`). The block mode follows the official
TensorFlow code's ``data_collector`` (wzzheng/HDML); no code was copied.
"""
from __future__ import annotations

import math

import torch

__all__ = ["RunningLossAverage"]


class RunningLossAverage(torch.nn.Module):
    """Running average of a scalar loss, kept in registered buffers so it checkpoints.

    ``mode="block"`` (official HDML ``data_collector``): values are collected; the average that
    :meth:`read` returns is replaced by the mean of the collected values once ``block_size`` of
    them have accumulated (then the collection restarts). Before the first full block it is
    ``initial`` (official: 1e6). NaN/inf values are skipped (as the official code skips NaN).

    ``mode="ema"``: bias-corrected exponential moving average with ``momentum`` (so the first
    update returns that value exactly); ``initial`` is returned before any update.

    Buffers: ``value`` (float64 scalar, what :meth:`read` returns), ``block`` (float64
    ``[block_size]``, the current partial block; empty in ema mode), ``count`` (int64, values in
    the current block, or total updates in ema mode), ``ema`` (float64 scalar, un-corrected EMA).
    """

    MODES = ("block", "ema")

    def __init__(self, mode: str = "block", block_size: int = 64, momentum: float = 0.99, initial: float = 1e6):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"average mode must be one of {self.MODES}, got {mode!r}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if not (0.0 <= float(momentum) < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not (float(initial) > 0):
            raise ValueError(f"initial average must be > 0 (it divides alpha/beta), got {initial!r}")
        self.mode = mode
        self.block_size = block_size
        self.momentum = float(momentum)
        self.register_buffer("value", torch.tensor(float(initial), dtype=torch.float64))
        self.register_buffer("block", torch.zeros(block_size if mode == "block" else 0, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("ema", torch.tensor(0.0, dtype=torch.float64))

    def read(self) -> float:
        return float(self.value)

    @torch.no_grad()
    def update(self, v: float) -> bool:
        """Feed one value; returns False (and changes nothing) if it is not finite."""
        v = float(v)
        if not math.isfinite(v):
            return False
        if self.mode == "block":
            i = int(self.count)
            self.block[i] = v
            self.count += 1
            if int(self.count) >= self.block_size:
                self.value.fill_(float(self.block.mean()))
                self.block.zero_()
                self.count.zero_()
        else:
            self.count += 1
            self.ema.mul_(self.momentum).add_((1.0 - self.momentum) * v)
            correction = 1.0 - self.momentum ** int(self.count)
            self.value.fill_(float(self.ema) / correction)
        return True

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, block_size={self.block_size}, momentum={self.momentum}"
