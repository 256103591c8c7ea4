"""Data of the pretrained-trunk regime (benchmarks/regime.py): the image data set of a config,
its cached trunk features, and the train / validation / test splits and curve probes."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np

from . import harness
from .pretrained import FeatureSet, _file_digest, cached_features, load_features

def image_data(cfg: Dict[str, Any]):
    """(get_image(i) -> PIL image, labels, is_test, data id) of the configured image data set."""
    from PIL import Image

    data = cfg["data"]
    if data["name"] in ("fontglyphs", "iconthemes"):
        path = data["path"]
        if not os.path.exists(path):
            raise SystemExit(f"{path} not found: {data.get('how_to_build', 'build it first')}")
        z = np.load(path, allow_pickle=False)
        images = z["images"]
        labels = z["font_labels"] if data["name"] == "fontglyphs" else z["labels"]
        is_test = np.isin(labels, z["test_classes"])
        mode = "L" if images.ndim == 3 else "RGB"
        return (lambda i: Image.fromarray(images[i], mode)), labels.astype(np.int64), is_test, \
            f"{data['name']}:{_file_digest(path)}"
    cls, root = harness.folder_dataset(cfg)
    tr = cls(root, split="train", transform=None)
    te = cls(root, split="test", transform=None)
    # class ids of the two splits are renumbered from 0 each: keep them apart
    labels = np.concatenate([np.asarray(tr.labels), np.asarray(te.labels) + max(tr.labels) + 1])
    is_test = np.r_[np.zeros(len(tr), bool), np.ones(len(te), bool)]
    get = lambda i: tr.load_image(i) if i < len(tr) else te.load_image(i - len(tr))  # noqa: E731
    return get, labels.astype(np.int64), is_test, f"{data['name']}:{os.path.abspath(root)}:{len(labels)}"


def feature_sets(cfg: Dict[str, Any], progress: bool = True) -> Dict[str, FeatureSet]:
    """{"pooled": ..., "maps": ...} (extracted or from the cache), or {"pooled": user features}."""
    if cfg["data"]["name"] == "features":
        return {"pooled": load_features(cfg["data"]["path"])}
    get_image, labels, is_test, data_id = image_data(cfg)
    return cached_features(cfg.get("cache_dir", "runs/cache"), data_id, get_image, labels, is_test, cfg["trunk"],
                           progress=progress)


def splits(fs: FeatureSet, val_seed: int, train_classes: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Indices of train (train classes minus validation), val (a seeded quarter of the train
    classes) and test samples. ``train_classes``: train on a seeded subset of that many of the
    remaining classes (a small training set, as CUB's 100 classes are); val and test are unchanged."""
    train_idx = np.nonzero(~fs.is_test)[0]
    is_val = harness.validation_mask(fs.labels[train_idx], val_seed)
    train = train_idx[~is_val]
    if train_classes is not None:
        classes = np.unique(fs.labels[train])
        if not 2 <= train_classes <= len(classes):
            raise ValueError(f"train_classes must be in [2, {len(classes)}] (the training classes left after "
                             f"the validation split), got {train_classes}")
        keep = np.random.RandomState(val_seed + 1).choice(classes, size=train_classes, replace=False)
        train = train[np.isin(fs.labels[train], keep)]
    return {"train": train, "val": train_idx[is_val], "test": np.nonzero(fs.is_test)[0]}


def curve_probes(fs: FeatureSet, parts: Dict[str, np.ndarray], seed: int) -> Dict[str, np.ndarray]:
    """The samples the curves are measured on: all validation classes, and as many classes of the
    training split and of the test split (fixed by ``seed``, the same for every run), so that the
    three curves are R@1 among equally many classes and show the generalisation gap directly.
    The table's test metrics use every test class."""
    n_val = len(np.unique(fs.labels[parts["val"]]))
    out = {}
    for part in ("train", "val", "test"):
        idx = parts[part]
        classes = np.unique(fs.labels[idx])
        if part != "val" and len(classes) > n_val:
            keep = np.random.RandomState(seed).choice(classes, size=n_val, replace=False)
            idx = idx[np.isin(fs.labels[idx], keep)]
        out[part] = idx
    return out
