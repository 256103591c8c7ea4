"""Trunks and embedding heads for the two protocols (PML's trunk + embedder convention)."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import nn

__all__ = ["GlyphConvNet", "EmbeddingHead", "googlenet_trunk", "build_model"]


class GlyphConvNet(nn.Module):
    """A small CNN for 32x32 grey glyphs (CPU protocol): four conv blocks, global average pool.

    ``in_channels=3`` takes RGB images (IconThemes); ``input_pool=2`` first averages 2x2 blocks
    (64x64 icons -> 32x32, a quarter of the compute on CPU); the global pool makes it size-agnostic."""

    def __init__(self, width: int = 32, feature_size: int = 128, in_channels: int = 1, input_pool: int = 1):
        super().__init__()

        def block(cin, cout, pool=True):
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(2))
            return layers

        self.features = nn.Sequential(
            *([nn.AvgPool2d(input_pool)] if input_pool > 1 else []),
            *block(in_channels, width), *block(width, 2 * width), *block(2 * width, 4 * width),
            *block(4 * width, feature_size, pool=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feature_size = feature_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class EmbeddingHead(nn.Module):
    """Linear projection to the embedding (L2 normalisation is left to the PML distance)."""

    def __init__(self, feature_size: int, embedding_size: int):
        super().__init__()
        self.fc = nn.Linear(feature_size, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def googlenet_trunk(weights_path: Optional[str] = None) -> Tuple[nn.Module, int]:
    """torchvision GoogLeNet up to the pooled 1024-d feature (paper protocol).

    ImageNet weights are never downloaded: pass a local ``weights_path`` (a torchvision
    state_dict) or train from scratch.
    """
    import torchvision

    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    if weights_path:
        if not os.path.exists(weights_path):
            raise FileNotFoundError(f"GoogLeNet weights file not found: {weights_path}")
        state = torch.load(weights_path, map_location="cpu")
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(f"{weights_path} is not a GoogLeNet state_dict (a dict of tensors)")
        state = {k: v for k, v in state.items() if not k.startswith("aux")}  # unused aux heads
        _load_strict(model, state, weights_path)
    model.fc = nn.Identity()
    model.dropout = nn.Identity()
    return model, 1024


def key_mismatch(model: nn.Module, state: dict, source: str, what: str) -> Optional[str]:
    """None when ``state`` has exactly the model's keys, else a message naming the missing and the
    unexpected ones: a wrong weights file must not leave layers at their random initialisation."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if not (missing or unexpected):
        return None
    return (f"{source} does not match {what}: {len(missing)} missing keys "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")


def _load_strict(model: nn.Module, state: dict, source: str) -> None:
    """load_state_dict that refuses a file whose keys are not exactly GoogLeNet's."""
    problem = key_mismatch(model, state, source, "torchvision's GoogLeNet")
    if problem:
        raise ValueError(problem)
    model.load_state_dict(state, strict=True)  # shape mismatches raise here, naming the key


def build_model(kind: str, embedding_size: int, weights_path: Optional[str] = None, in_channels: int = 1,
                input_pool: int = 1):
    """(trunk, head, feature_size) for a config's model name (``in_channels``, ``input_pool``: glyph CNN only)."""
    if kind == "glyph_cnn":
        trunk = GlyphConvNet(in_channels=in_channels, input_pool=input_pool)
        size = trunk.feature_size
    elif kind == "googlenet":
        trunk, size = googlenet_trunk(weights_path)
    else:
        raise ValueError(f"unknown model {kind!r}; expected 'glyph_cnn' or 'googlenet'")
    return trunk, EmbeddingHead(size, embedding_size), size
