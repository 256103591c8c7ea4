"""FontGlyphs: a font-identification data set rendered from Debian font packages.

Each class is one typeface; each class has 62 images, the glyphs ``0-9A-Za-z``
as 32x32 uint8 (white ink on black).  The fonts are split, with a fixed seed,
into class-disjoint train and test halves, as in deep-metric-learning
benchmarks (CUB, Cars196, SOP).  A second view uses the 62 characters as the
classes.

Two files exist:

* the **embedded subset** ``pml_ext/data/fontglyphs_subset.npz`` (shipped in
  the package; 120 train + 60 test fonts), used when ``path=None``;
* the **full set** ``data/fontglyphs/fontglyphs.npz`` in the repository
  (534 fonts), built by ``benchmarks/build_fontglyphs.py``.

Both have the same arrays: ``images`` uint8 [N,32,32], ``font_labels``,
``char_labels``, ``font_names``, ``font_files``, ``font_packages``,
``train_classes``, ``test_classes`` (font ids), ``chars`` and ``metadata``
(a JSON string).
"""
from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from .npz_arrays import read_npz_arrays

__all__ = [
    "FontGlyphs",
    "load_font_glyphs",
    "subset_path",
    "full_dataset_path",
    "SPLITS",
    "VIEWS",
    "CHARS",
]

CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SPLITS = ("train", "test", "all")
VIEWS = ("font", "char")
SUBSET_FILE = "fontglyphs_subset.npz"
_REQUIRED = ("images", "font_labels", "char_labels", "font_names", "train_classes", "test_classes")

PathLike = Union[str, "os.PathLike[str]"]


def subset_path() -> str:
    """File system path of the embedded subset shipped inside ``pml_ext.data``."""
    ref = resources.files("pml_ext.data").joinpath(SUBSET_FILE)
    # The package is installed as files (not zipped), so the path is real.
    return str(ref)


def full_dataset_path() -> str:
    """Path of the full set in a source checkout (``<repo>/data/fontglyphs/fontglyphs.npz``).

    The file is not part of the installed package; this only finds it when
    ``pml_ext`` is imported from the repository.  Existence is not checked.
    """
    pkg_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(os.path.dirname(pkg_dir), "data", "fontglyphs", "fontglyphs.npz")


_CACHE: Dict[Tuple[str, float], Dict[str, Any]] = {}


def _read(path: Optional[PathLike]) -> Tuple[str, Dict[str, Any]]:
    p = subset_path() if path is None else os.fspath(path)
    if not os.path.isfile(p):
        if path is None:
            raise FileNotFoundError(
                f"FontGlyphs: the embedded subset {p} is missing; reinstall pml_ext or rebuild it with "
                "benchmarks/build_fontglyphs.py"
            )
        raise FileNotFoundError(
            f"FontGlyphs: dataset file not found: {p} (the full set is data/fontglyphs/fontglyphs.npz in the "
            "repository; build it with benchmarks/build_fontglyphs.py, or pass path=None for the embedded subset)"
        )
    return p, read_npz_arrays(p, "FontGlyphs", _REQUIRED, _CACHE)


def _select(data: Dict[str, Any], split: str, view: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    fonts = data["font_labels"]
    if split == "all":
        classes = np.unique(fonts)
    else:
        classes = np.sort(data[f"{split}_classes"])
    mask = np.isin(fonts, classes)
    idx = np.nonzero(mask)[0]
    if view == "font":
        labels = np.searchsorted(classes, fonts[idx])  # remap to 0..C-1
    else:
        chars = data["char_labels"][idx]
        labels = np.searchsorted(np.unique(chars), chars)
    return idx, labels.astype(np.int64), classes


def load_font_glyphs(
    path: Optional[PathLike] = None, split: str = "train", view: str = "font"
) -> Tuple[np.ndarray, np.ndarray]:
    """Load FontGlyphs images and labels as numpy arrays.

    Args:
        path: ``None`` for the embedded subset, or the path of a FontGlyphs
            ``.npz`` file (e.g. ``data/fontglyphs/fontglyphs.npz``).
        split: ``"train"``, ``"test"`` (class-disjoint halves of the fonts) or
            ``"all"``.
        view: ``"font"`` (classes = fonts) or ``"char"`` (classes = the 62
            characters).

    Returns:
        ``(images, labels)``: uint8 array [N, 32, 32] (ink = 255) and int64
        labels remapped to ``0..C-1`` within the split.
    """
    _, data = _read(path)
    idx, labels, _ = _select(data, split, view)
    return data["images"][idx], labels


class FontGlyphs(Dataset):
    """FontGlyphs as a torch ``Dataset`` of ``(image, label)``.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.  Train and test fonts are
            disjoint (seeded split stored in the file).
        view: ``"font"`` (font identification, 62 images per class) or
            ``"char"`` (62 character classes).
        path: ``None`` for the embedded subset; otherwise a FontGlyphs ``.npz``
            (the full set is ``data/fontglyphs/fontglyphs.npz``).
        transform: optional callable applied to a ``PIL.Image`` (mode ``"L"``);
            without it the image is a float tensor [1, 32, 32] in [0, 1].

    Attributes:
        images (np.ndarray): uint8 [N, 32, 32].
        labels (np.ndarray): int64 [N], in ``0..num_classes-1``.
        font_ids (np.ndarray): the font id (row of ``font_names`` in the file)
            of every image.
        class_names (list[str]): name of each class (font names or characters).
        num_classes (int)
        metadata (dict): build metadata (versions, packages, seed, ...).
    """

    def __init__(
        self,
        split: str = "train",
        view: str = "font",
        path: Optional[PathLike] = None,
        transform: Optional[Callable[[Any], Any]] = None,
    ) -> None:
        self.path, data = _read(path)
        idx, labels, classes = _select(data, split, view)
        self.split, self.view, self.transform = split, view, transform
        self.images: np.ndarray = data["images"][idx]
        self.labels: np.ndarray = labels
        self.font_ids: np.ndarray = data["font_labels"][idx]
        self.char_ids: np.ndarray = data["char_labels"][idx]
        if view == "font":
            self.class_names = [str(data["font_names"][c]) for c in classes]
        else:
            self.class_names = [CHARS[c] for c in np.unique(self.char_ids)]
        self.num_classes: int = len(self.class_names)
        meta = data.get("metadata")
        self.metadata: Dict[str, Any] = json.loads(str(meta)) if meta is not None else {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[Any, int]:
        img = self.images[i]
        if self.transform is not None:
            from PIL import Image

            x = self.transform(Image.fromarray(img))  # 2-D uint8 -> mode "L"
        else:
            x = torch.from_numpy(img.astype(np.float32) / 255.0).unsqueeze(0)
        return x, int(self.labels[i])

    def __repr__(self) -> str:
        return (
            f"FontGlyphs(split={self.split!r}, view={self.view!r}, images={len(self)}, "
            f"classes={self.num_classes}, path={self.path!r})"
        )
