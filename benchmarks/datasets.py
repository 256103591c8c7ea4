"""Image data sets for the deep-metric-learning benchmarks.

Loaders for the three standard benchmarks used by Embedding Expansion (Ko & Gu,
CVPR 2020) and HDML (Zheng et al., CVPR 2019), and a generic folder loader for
one's own data.  All are ``torch.utils.data.Dataset`` returning
``(image, label)`` with labels remapped to ``0..C-1`` within the split; train and
test classes are disjoint.

* :class:`CUB200`: CUB-200-2011 (``CUB_200_2011/images.txt``,
  ``image_class_labels.txt``, ``images/``); train classes 1-100, test 101-200.
* :class:`Cars196`: Stanford Cars with ``cars_annos.mat`` and ``car_ims/``;
  train classes 1-98, test 99-196 (the ``test`` flag of the annotation file is
  ignored, as in the metric-learning protocol).
* :class:`StanfordOnlineProducts`: ``Ebay_train.txt`` / ``Ebay_test.txt``
  (``image_id class_id super_class_id path``).
* :class:`ImageFolderSplit`: ``root/<class>/<image>``, with an optional seeded
  class-disjoint split.
* :class:`IconThemes`: icon concepts drawn by 13 Debian icon themes, 64x64 RGB,
  shipped in the repository as ``data/iconthemes/iconthemes.npz`` (built by
  ``benchmarks/build_iconthemes.py``); :func:`load_iconthemes` gives arrays with
  the interface of ``pml_ext.data.load_font_glyphs``.

The papers' pre-processing is :func:`paper_transforms`: resize to 256x256,
random 227x227 crop and horizontal flip for training, centre 227x227 crop for
testing, ImageNet mean/std normalisation.  ``transform="paper"`` (the default)
picks it by split; ``transform=None`` returns PIL images.

The data sets themselves are not shipped (licences, size): download them and
point ``root`` at them.
"""
from __future__ import annotations

import json
import os
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from pml_ext.data.npz_arrays import read_npz_arrays

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "paper_transforms",
    "ImageListDataset",
    "CUB200",
    "Cars196",
    "StanfordOnlineProducts",
    "ImageFolderSplit",
    "class_disjoint_split",
    "CorruptImageError",
    "IMAGE_EXTENSIONS",
    "ICONTHEMES_PATH",
    "load_iconthemes",
    "IconThemes",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

TransformArg = Union[str, None, Callable[[Any], Any]]


class CorruptImageError(OSError):
    """An image file exists but cannot be decoded."""


def paper_transforms(train: bool) -> Callable[[Any], torch.Tensor]:
    """The pre-processing of Embedding Expansion / HDML (after Oh Song et al. 2016).

    Train: resize to 256x256, random crop 227x227, random horizontal flip.
    Test: resize to 256x256, centre crop 227x227.  Both: to tensor, ImageNet
    mean/std normalisation.
    """
    from torchvision import transforms as T

    if train:
        ops = [T.Resize((256, 256)), T.RandomCrop(227), T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize((256, 256)), T.CenterCrop(227)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: expected file not found: {path}")
    return path


def _require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: expected directory not found: {path}")
    return path


def _remap(labels: Sequence[int]) -> Tuple[List[int], List[int]]:
    classes = sorted(set(labels))
    pos = {c: i for i, c in enumerate(classes)}
    return [pos[c] for c in labels], classes


class ImageListDataset(Dataset):
    """A list of image files with integer labels.

    Args:
        paths: image file paths.
        labels: original class ids (any integers); remapped to ``0..C-1``.
        transform: ``"paper"`` (uses :func:`paper_transforms` with ``train``),
            ``None`` (return the RGB ``PIL.Image``) or any callable on a PIL image.
        train: selects the paper transform (random crop/flip) when
            ``transform="paper"``.
        check_files: check at construction that every image file exists
            (otherwise only the first is checked; a missing one raises when read).
        name: data set name used in error messages.

    Attributes:
        paths, labels (remapped), class_ids (original id per remapped label),
        num_classes.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        transform: TransformArg = "paper",
        train: bool = False,
        check_files: bool = False,
        name: str = "ImageListDataset",
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{name}: {len(paths)} paths but {len(labels)} labels")
        if len(paths) == 0:
            raise ValueError(f"{name}: no images found")
        self.name = name
        self.paths: List[str] = list(paths)
        self.labels, self.class_ids = _remap(list(labels))
        self.num_classes: int = len(self.class_ids)
        if isinstance(transform, str):
            if transform != "paper":
                raise ValueError(f"transform must be 'paper', None or a callable, got {transform!r}")
            transform = paper_transforms(train)
        self.transform = transform
        for p in self.paths if check_files else self.paths[:1]:
            _require_file(p, f"{name} image")

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, i: int):
        """The i-th image as an RGB ``PIL.Image``; errors name the file."""
        from PIL import Image, UnidentifiedImageError

        p = self.paths[i]
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{self.name}: image file not found: {p}")
        try:
            with Image.open(p) as im:
                im.load()
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise CorruptImageError(f"{self.name}: cannot decode image {p}: {type(e).__name__}: {e}") from e

    def __getitem__(self, i: int) -> Tuple[Any, int]:
        img = self.load_image(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[i]

    def __repr__(self) -> str:
        return f"{self.name}(images={len(self)}, classes={self.num_classes})"


def _check_split(split: str, allowed: Sequence[str] = ("train", "test", "all")) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {tuple(allowed)}, got {split!r}")


def _range_filter(split: str, n_train: int) -> Callable[[int], bool]:
    if split == "train":
        return lambda c: 1 <= c <= n_train
    if split == "test":
        return lambda c: c > n_train
    return lambda c: True


class CUB200(ImageListDataset):
    """CUB-200-2011.  ``root`` is the directory that contains ``CUB_200_2011/``
    (or that directory itself).  Train: classes 1-100 (5,864 images); test:
    classes 101-200 (5,924 images)."""

    N_TRAIN_CLASSES = 100

    def __init__(self, root: str, split: str = "train", transform: TransformArg = "paper",
                 check_files: bool = False) -> None:
        _check_split(split)
        base = root if os.path.isfile(os.path.join(root, "images.txt")) else os.path.join(root, "CUB_200_2011")
        _require_dir(base, "CUB200")
        images_txt = _require_file(os.path.join(base, "images.txt"), "CUB200")
        labels_txt = _require_file(os.path.join(base, "image_class_labels.txt"), "CUB200")
        img_dir = _require_dir(os.path.join(base, "images"), "CUB200")
        id2path: Dict[str, str] = {}
        with open(images_txt, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                parts = line.split(maxsplit=1)
                if len(parts) != 2:
                    raise ValueError(f"CUB200: malformed line {n} in {images_txt}: {line.rstrip()!r}")
                id2path[parts[0]] = parts[1].strip()
        keep = _range_filter(split, self.N_TRAIN_CLASSES)
        paths, labels = [], []
        with open(labels_txt, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2 or parts[0] not in id2path:
                    raise ValueError(f"CUB200: malformed or unknown image id on line {n} of {labels_txt}")
                c = int(parts[1])
                if keep(c):
                    paths.append(os.path.join(img_dir, id2path[parts[0]]))
                    labels.append(c)
        super().__init__(paths, labels, transform, split == "train", check_files, name="CUB200")


def _mat_field(rec: Any, name: str) -> Any:
    v = rec[name] if not hasattr(rec, name) else getattr(rec, name)
    while hasattr(v, "shape") and getattr(v, "size", 0) == 1 and v.shape != ():
        v = v.reshape(-1)[0]
    if hasattr(v, "item") and getattr(v, "shape", None) == ():
        v = v.item()
    return v


class Cars196(ImageListDataset):
    """Stanford Cars (196 classes) in the ``cars_annos.mat`` + ``car_ims/`` layout.

    Train: classes 1-98 (8,054 images); test: classes 99-196 (8,131 images).
    Reading the ``.mat`` file needs ``scipy``.
    """

    N_TRAIN_CLASSES = 98

    def __init__(self, root: str, split: str = "train", transform: TransformArg = "paper",
                 check_files: bool = False) -> None:
        _check_split(split)
        _require_dir(root, "Cars196")
        mat_path = _require_file(os.path.join(root, "cars_annos.mat"), "Cars196")
        _require_dir(os.path.join(root, "car_ims"), "Cars196")
        try:
            import scipy.io
        except ImportError as e:  # pragma: no cover
            raise ImportError("Cars196 needs scipy to read cars_annos.mat (pip install scipy)") from e
        try:
            mat = scipy.io.loadmat(mat_path, squeeze_me=True, struct_as_record=False)
        except Exception as e:
            raise ValueError(f"Cars196: cannot read {mat_path}: {type(e).__name__}: {e}") from e
        if "annotations" not in mat:
            raise ValueError(f"Cars196: {mat_path} has no 'annotations' variable")
        anns = mat["annotations"]
        anns = [anns] if not hasattr(anns, "__len__") else list(anns.reshape(-1))
        keep = _range_filter(split, self.N_TRAIN_CLASSES)
        paths, labels = [], []
        for a in anns:
            rel = str(_mat_field(a, "relative_im_path"))
            c = int(_mat_field(a, "class"))
            if keep(c):
                paths.append(os.path.join(root, rel))
                labels.append(c)
        super().__init__(paths, labels, transform, split == "train", check_files, name="Cars196")


class StanfordOnlineProducts(ImageListDataset):
    """Stanford Online Products.  ``root`` holds ``Ebay_train.txt``,
    ``Ebay_test.txt`` and the image folders (``bicycle_final/`` ...).

    Train: 59,551 images of 11,318 classes; test: 60,502 images of 11,316
    classes.  ``split="all"`` concatenates both.  The super-class of each image
    is kept in ``super_labels``.
    """

    def __init__(self, root: str, split: str = "train", transform: TransformArg = "paper",
                 check_files: bool = False) -> None:
        _check_split(split)
        _require_dir(root, "StanfordOnlineProducts")
        files = {"train": ["Ebay_train.txt"], "test": ["Ebay_test.txt"], "all": ["Ebay_train.txt", "Ebay_test.txt"]}
        paths, labels, supers = [], [], []
        for fname in files[split]:
            txt = _require_file(os.path.join(root, fname), "StanfordOnlineProducts")
            with open(txt, encoding="utf-8") as fh:
                header = fh.readline().split()
                if header[:4] != ["image_id", "class_id", "super_class_id", "path"]:
                    raise ValueError(f"StanfordOnlineProducts: unexpected header in {txt}: {header}")
                for n, line in enumerate(fh, 2):
                    if not line.strip():
                        continue
                    parts = line.split()
                    if len(parts) != 4:
                        raise ValueError(f"StanfordOnlineProducts: malformed line {n} in {txt}: {line.rstrip()!r}")
                    paths.append(os.path.join(root, parts[3]))
                    labels.append(int(parts[1]))
                    supers.append(int(parts[2]))
        self.super_labels: List[int] = supers
        super().__init__(paths, labels, transform, split == "train", check_files, name="StanfordOnlineProducts")


def class_disjoint_split(classes: Sequence[str], test_fraction: float = 0.5, seed: int = 0
                         ) -> Tuple[List[str], List[str]]:
    """Shuffle the sorted class names with ``seed`` and cut them into disjoint
    (train, test) lists; ``test_fraction`` of the classes go to test (at least
    one each when there are two or more classes)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    cls = sorted(classes)
    random.Random(seed).shuffle(cls)
    n_test = int(round(len(cls) * test_fraction))
    if len(cls) >= 2:
        n_test = min(max(n_test, 1), len(cls) - 1)
    return sorted(cls[n_test:]), sorted(cls[:n_test])


class ImageFolderSplit(ImageListDataset):
    """One's own data as ``root/<class name>/<image file>``.

    Args:
        root: folder with one sub-folder per class.
        split: ``"all"`` (every class), or ``"train"`` / ``"test"``: a seeded,
            class-disjoint split of the classes (see :func:`class_disjoint_split`).
        test_fraction: share of classes in the test split.
        seed: seed of the class split.
        transform, check_files: as in :class:`ImageListDataset`.
        extensions: image file name endings to include (case-insensitive).

    Attributes:
        class_names: folder name of each remapped label.
    """

    def __init__(self, root: str, split: str = "all", test_fraction: float = 0.5, seed: int = 0,
                 transform: TransformArg = "paper", check_files: bool = False,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS) -> None:
        _check_split(split)
        _require_dir(root, "ImageFolderSplit")
        all_classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not all_classes:
            raise FileNotFoundError(f"ImageFolderSplit: no class sub-folders in {root}")
        if split == "all":
            chosen = all_classes
        else:
            train, test = class_disjoint_split(all_classes, test_fraction, seed)
            chosen = train if split == "train" else test
        exts = tuple(e.lower() for e in extensions)
        paths, labels = [], []
        for ci, c in enumerate(all_classes):
            if c not in chosen:
                continue
            for dp, dns, fns in os.walk(os.path.join(root, c)):
                dns.sort()
                for f in sorted(fns):
                    if f.lower().endswith(exts):
                        paths.append(os.path.join(dp, f))
                        labels.append(ci)
        if not paths:
            raise FileNotFoundError(f"ImageFolderSplit: no images with extensions {exts} under {root} for split {split!r}")
        super().__init__(paths, labels, transform, split == "train", check_files, name="ImageFolderSplit")
        self.class_names: List[str] = [all_classes[c] for c in self.class_ids]


# ----------------------------------------------------------------------------- IconThemes
ICONTHEMES_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "data", "iconthemes", "iconthemes.npz")
_ICON_KEYS = ("images", "labels", "themes", "concept_names", "theme_names", "train_classes", "test_classes")
_ICON_CACHE: Dict[Tuple[str, float], Dict[str, Any]] = {}


def _read_iconthemes(path: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    p = ICONTHEMES_PATH if path is None else os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"IconThemes: dataset file not found: {p} (the repository ships "
                                "data/iconthemes/iconthemes.npz; rebuild it with benchmarks/build_iconthemes.py)")
    return p, read_npz_arrays(p, "IconThemes", _ICON_KEYS, _ICON_CACHE)


def _select_iconthemes(data: Dict[str, Any], split: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    _check_split(split)
    concepts = data["labels"]
    classes = np.unique(concepts) if split == "all" else np.sort(data[f"{split}_classes"])
    idx = np.nonzero(np.isin(concepts, classes))[0]
    return idx, np.searchsorted(classes, concepts[idx]).astype(np.int64), classes


def load_iconthemes(path: Optional[str] = None, split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """IconThemes images and labels as numpy arrays.

    Args:
        path: an IconThemes ``.npz``; ``None`` for ``data/iconthemes/iconthemes.npz`` of the checkout.
        split: ``"train"`` / ``"test"`` (class-disjoint halves of the concepts, seeded split stored
            in the file) or ``"all"``.

    Returns:
        ``(images, labels)``: uint8 [N, 64, 64, 3] (RGB, icons composited on white) and int64
        labels remapped to ``0..C-1`` within the split.
    """
    _, data = _read_iconthemes(path)
    idx, labels, _ = _select_iconthemes(data, split)
    return data["images"][idx], labels


class IconThemes(Dataset):
    """IconThemes as a torch ``Dataset`` of ``(image, label)``: a class is one icon concept
    (``edit-copy``, ``folder-music`` ...), its images are its drawings by 5-13 icon themes.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``; train and test concepts are disjoint.
        path: IconThemes ``.npz``; ``None`` for ``data/iconthemes/iconthemes.npz``.
        transform: optional callable on an RGB ``PIL.Image``; without it the image is a float
            tensor [3, 64, 64] in [0, 1].

    Attributes:
        images (np.ndarray): uint8 [N, 64, 64, 3].
        labels (np.ndarray): int64 [N] in ``0..num_classes-1``.
        concept_ids, theme_ids (np.ndarray): the concept (row of ``concept_names`` in the file)
            and theme (row of ``theme_names``) of every image.
        class_names (list[str]), theme_names (list[str]), num_classes (int),
        metadata (dict): build metadata (package versions, renderer, seed, ...).
    """

    def __init__(self, split: str = "train", path: Optional[str] = None,
                 transform: Optional[Callable[[Any], Any]] = None) -> None:
        self.path, data = _read_iconthemes(path)
        idx, labels, classes = _select_iconthemes(data, split)
        self.split, self.transform = split, transform
        self.images: np.ndarray = data["images"][idx]
        self.labels: np.ndarray = labels
        self.concept_ids: np.ndarray = data["labels"][idx]
        self.theme_ids: np.ndarray = data["themes"][idx]
        self.class_names: List[str] = [str(data["concept_names"][c]) for c in classes]
        self.theme_names: List[str] = [str(t) for t in data["theme_names"]]
        self.num_classes: int = len(classes)
        self.metadata: Dict[str, Any] = json.loads(str(data["metadata"])) if "metadata" in data else {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[Any, int]:
        img = self.images[i]
        if self.transform is not None:
            from PIL import Image

            return self.transform(Image.fromarray(img, "RGB")), int(self.labels[i])
        return torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0), int(self.labels[i])

    def __repr__(self) -> str:
        return f"IconThemes(split={self.split!r}, images={len(self)}, classes={self.num_classes})"
