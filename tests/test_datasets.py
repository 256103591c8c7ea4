"""Tests of the data set loaders (benchmarks/datasets.py, pml_ext.data).

Every benchmark layout is built in tmp_path with a few generated images, so
no real data set is needed.
"""
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.datasets import (  # noqa: E402
    CUB200,
    Cars196,
    CorruptImageError,
    ImageFolderSplit,
    StanfordOnlineProducts,
    class_disjoint_split,
    paper_transforms,
)
from pml_ext.data import CHARS, FontGlyphs, full_dataset_path, load_font_glyphs, subset_path  # noqa: E402


def _img(path, seed=0, size=(40, 30), mode="RGB"):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)


def _corrupt(path):
    with open(path, "wb") as fh:
        fh.write(b"\xff\xd8\xff\xe0 this is not a jpeg")


# ---------------------------------------------------------------- CUB-200-2011


@pytest.fixture
def cub_root(tmp_path):
    base = tmp_path / "CUB_200_2011"
    items = []  # (id, class, relpath)
    k = 1
    for c in (1, 2, 100, 101, 150, 200):
        for j in range(2 if c != 150 else 3):
            rel = f"{c:03d}.Bird_{c}/img_{j}.jpg"
            _img(str(base / "images" / rel), seed=k, mode="RGB" if c != 2 else "L")
            items.append((k, c, rel))
            k += 1
    (base / "images.txt").write_text("".join(f"{i} {r}\n" for i, _, r in items))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c, _ in items))
    return tmp_path


def test_cub_splits_and_labels(cub_root):
    tr = CUB200(str(cub_root), "train")
    te = CUB200(str(cub_root), "test", transform=None)
    al = CUB200(str(cub_root / "CUB_200_2011"), "all", transform=None)  # root may be the folder itself
    assert len(tr) == 6 and tr.num_classes == 3 and tr.class_ids == [1, 2, 100]
    assert len(te) == 7 and te.num_classes == 3 and te.class_ids == [101, 150, 200]
    assert len(al) == 13 and al.num_classes == 6
    assert sorted(set(tr.labels)) == [0, 1, 2] and sorted(set(te.labels)) == [0, 1, 2]
    x, y = tr[2]  # a grey-scale image is converted to RGB
    assert x.shape == (3, 227, 227) and x.dtype == torch.float32 and y == 1
    img, y = te[0]
    assert img.mode == "RGB" and y == 0


def test_cub_missing_files(cub_root):
    os.remove(cub_root / "CUB_200_2011" / "image_class_labels.txt")
    with pytest.raises(FileNotFoundError, match="image_class_labels.txt"):
        CUB200(str(cub_root))
    with pytest.raises(FileNotFoundError, match="CUB_200_2011"):
        CUB200(str(cub_root / "nowhere"))


def test_cub_missing_and_corrupt_image(cub_root):
    ds = CUB200(str(cub_root), "test", transform=None)
    bad = ds.paths[1]
    _corrupt(bad)
    with pytest.raises(CorruptImageError, match=os.path.basename(bad)):
        ds[1]
    os.remove(bad)
    with pytest.raises(FileNotFoundError, match=os.path.basename(bad)):
        ds[1]
    with pytest.raises(FileNotFoundError, match=os.path.basename(bad)):
        CUB200(str(cub_root), "test", check_files=True)


# ---------------------------------------------------------------- Cars196


@pytest.fixture
def cars_root(tmp_path):
    import scipy.io

    classes = [1, 1, 50, 98, 99, 99, 150, 196, 196]
    n = len(classes)
    dt = [(f, "O") for f in ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")]
    ann = np.zeros((1, n), dtype=dt)
    for i, c in enumerate(classes):
        rel = f"car_ims/{i + 1:06d}.jpg"
        _img(str(tmp_path / rel), seed=i)
        ann[0, i] = (rel, 1, 2, 30, 20, np.uint8(c), np.uint8(i % 2))
    names = np.array([f"car {c}" for c in range(1, 197)], dtype=object)
    scipy.io.savemat(str(tmp_path / "cars_annos.mat"), {"annotations": ann, "class_names": names})
    return tmp_path


def test_cars_splits(cars_root):
    tr = Cars196(str(cars_root), "train")
    te = Cars196(str(cars_root), "test", transform=None)
    assert len(tr) == 4 and tr.class_ids == [1, 50, 98] and tr.labels == [0, 0, 1, 2]
    assert len(te) == 5 and te.class_ids == [99, 150, 196] and te.labels == [0, 0, 1, 2, 2]
    assert len(Cars196(str(cars_root), "all")) == 9
    x, y = tr[0]
    assert x.shape == (3, 227, 227) and y == 0
    assert te[4][0].size == (40, 30)


def test_cars_missing_and_corrupt(cars_root, tmp_path):
    ds = Cars196(str(cars_root), "train", transform=None)
    _corrupt(ds.paths[3])
    with pytest.raises(CorruptImageError, match="000004.jpg"):
        ds[3]
    os.rename(cars_root / "cars_annos.mat", cars_root / "annos.mat")
    with pytest.raises(FileNotFoundError, match="cars_annos.mat"):
        Cars196(str(cars_root))
    os.rename(cars_root / "annos.mat", cars_root / "cars_annos.mat")
    os.rename(cars_root / "car_ims", cars_root / "images")
    with pytest.raises(FileNotFoundError, match="car_ims"):
        Cars196(str(cars_root))


# ---------------------------------------------------------------- Stanford Online Products


@pytest.fixture
def sop_root(tmp_path):
    rows = {"train": [(1, 1, 1), (2, 1, 1), (3, 2, 1), (4, 3, 2), (5, 3, 2)],
            "test": [(6, 11319, 1), (7, 11319, 1), (8, 11320, 3)]}
    for split, items in rows.items():
        lines = ["image_id class_id super_class_id path"]
        for i, c, s in items:
            rel = f"{['bicycle', 'chair', 'kettle'][s - 1]}_final/{c}_{i}.JPG"
            _img(str(tmp_path / rel), seed=i)
            lines.append(f"{i} {c} {s} {rel}")
        (tmp_path / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_sop_splits(sop_root):
    tr = StanfordOnlineProducts(str(sop_root), "train")
    te = StanfordOnlineProducts(str(sop_root), "test")
    al = StanfordOnlineProducts(str(sop_root), "all")
    assert (len(tr), tr.num_classes, tr.labels) == (5, 3, [0, 0, 1, 2, 2])
    assert (len(te), te.num_classes, te.labels) == (3, 2, [0, 0, 1])
    assert (len(al), al.num_classes) == (8, 5)
    assert te.super_labels == [1, 1, 3]
    assert not set(tr.class_ids) & set(te.class_ids)
    assert tr[0][0].shape == (3, 227, 227)


def test_sop_missing_and_corrupt(sop_root):
    ds = StanfordOnlineProducts(str(sop_root), "test", transform=None)
    _corrupt(ds.paths[2])
    with pytest.raises(CorruptImageError, match="11320_8.JPG"):
        ds[2]
    os.remove(sop_root / "Ebay_test.txt")
    with pytest.raises(FileNotFoundError, match="Ebay_test.txt"):
        StanfordOnlineProducts(str(sop_root), "test")
    StanfordOnlineProducts(str(sop_root), "train")  # the train file is still there


# ---------------------------------------------------------------- own data (ImageFolder layout)


@pytest.fixture
def folder_root(tmp_path):
    for ci, c in enumerate(["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]):
        for j in range(2 + ci % 2):
            _img(str(tmp_path / c / f"{j}.png"), seed=10 * ci + j)
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    return tmp_path


def test_folder_class_disjoint_split(folder_root):
    al = ImageFolderSplit(str(folder_root), "all", transform=None)
    assert al.num_classes == 7 and len(al) == 17  # notes.txt skipped
    tr = ImageFolderSplit(str(folder_root), "train", test_fraction=0.4, seed=3)
    te = ImageFolderSplit(str(folder_root), "test", test_fraction=0.4, seed=3)
    assert set(tr.class_names).isdisjoint(te.class_names)
    assert sorted(tr.class_names + te.class_names) == al.class_names
    assert te.num_classes == 3 and len(tr) + len(te) == 17
    assert sorted(set(tr.labels)) == list(range(tr.num_classes))
    # deterministic for a seed, different for another seed
    assert ImageFolderSplit(str(folder_root), "test", test_fraction=0.4, seed=3).class_names == te.class_names
    others = {tuple(class_disjoint_split(al.class_names, 0.4, s)[1]) for s in range(6)}
    assert len(others) > 1
    x, y = tr[0]
    assert x.shape == (3, 227, 227)


def test_folder_errors(folder_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        ImageFolderSplit(str(tmp_path / "missing_dir"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        ImageFolderSplit(str(empty))
    ds = ImageFolderSplit(str(folder_root), "all", transform=None)
    _corrupt(ds.paths[0])
    with pytest.raises(CorruptImageError, match=os.path.join("ant", "0.png")):
        ds[0]
    with pytest.raises(ValueError):
        ImageFolderSplit(str(folder_root), "val")


def test_paper_transforms():
    from PIL import Image

    im = Image.new("RGB", (500, 300), (255, 128, 0))
    tr, te = paper_transforms(True)(im), paper_transforms(False)(im)
    assert tr.shape == te.shape == (3, 227, 227)
    # ImageNet normalisation: red channel of pure 255 -> (1-0.485)/0.229
    assert torch.allclose(te[0], torch.full((227, 227), (1 - 0.485) / 0.229), atol=1e-4)


# ---------------------------------------------------------------- FontGlyphs


def test_fontglyphs_subset_shapes_and_split():
    assert os.path.isfile(subset_path())
    tr, te = FontGlyphs("train"), FontGlyphs("test")
    assert tr.images.shape[1:] == (32, 32) and tr.images.dtype == np.uint8
    for ds in (tr, te):
        counts = np.bincount(ds.labels)
        assert len(counts) == ds.num_classes and (counts == 62).all()  # 62 glyphs per font
        assert sorted(set(ds.labels.tolist())) == list(range(ds.num_classes))
        # each font has each character once
        for f in np.unique(ds.font_ids)[:5]:
            assert sorted(ds.char_ids[ds.font_ids == f].tolist()) == list(range(62))
    assert set(tr.font_ids.tolist()).isdisjoint(te.font_ids.tolist())
    assert set(tr.class_names).isdisjoint(te.class_names)
    assert tr.num_classes >= 100 and te.num_classes >= 50
    x, y = tr[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert isinstance(y, int)
    al = FontGlyphs("all")
    assert len(al) == len(tr) + len(te) and al.num_classes == tr.num_classes + te.num_classes
    assert al.metadata["versions"]["freetype"] and al.metadata["name"] == "FontGlyphs"


def test_fontglyphs_char_view_and_numpy_loader():
    ds = FontGlyphs("test", view="char")
    assert ds.num_classes == 62 and ds.class_names == list(CHARS)
    assert (np.bincount(ds.labels) == len(ds) // 62).all()
    assert CHARS[ds.labels[ds.char_ids == 10][0]] == "A"
    imgs, labels = load_font_glyphs(split="train", view="font")
    assert imgs.dtype == np.uint8 and imgs.shape == (len(labels), 32, 32)
    assert labels.max() + 1 == len(labels) // 62
    # not blank, not saturated
    assert 0.02 < imgs.mean() / 255 < 0.6 and (imgs.reshape(len(imgs), -1).max(1) > 64).all()


def test_fontglyphs_transform_and_errors(tmp_path):
    seen = []
    ds = FontGlyphs("train", transform=lambda im: seen.append(im.mode) or np.asarray(im).shape)
    assert ds[3][0] == (32, 32) and seen == ["L"]
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        FontGlyphs(path=tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_font_glyphs(path=str(tmp_path / "nope.npz"))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz"):
        FontGlyphs(path=tmp_path / "other.npz")
    with pytest.raises(ValueError, match="split"):
        FontGlyphs("val")
    with pytest.raises(ValueError, match="view"):
        FontGlyphs(view="glyph")


@pytest.mark.skipif(not os.path.isfile(full_dataset_path()), reason="full FontGlyphs file not in this checkout")
def test_fontglyphs_full_file():
    with np.load(full_dataset_path()) as z:
        n_fonts = len(z["font_names"])
        tr, te = set(z["train_classes"].tolist()), set(z["test_classes"].tolist())
        assert z["images"].shape == (62 * n_fonts, 32, 32)
        assert tr.isdisjoint(te) and tr | te == set(range(n_fonts)) and abs(len(tr) - len(te)) <= 1
        assert len(set(z["font_names"].tolist())) == n_fonts
        assert n_fonts > 400
    ds = FontGlyphs("test", path=full_dataset_path())
    assert ds.num_classes == len(te) and len(ds) == 62 * len(te)
