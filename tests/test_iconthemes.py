"""IconThemes: the shipped file (loader, split, label cleanliness) and the build's deterministic core
functions on a tiny hand-made theme tree."""
import copy
import hashlib
import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import build_iconthemes as B  # noqa: E402
from benchmarks.datasets import ICONTHEMES_PATH, IconThemes, load_iconthemes  # noqa: E402


@pytest.fixture(scope="module")
def raw():
    with np.load(ICONTHEMES_PATH, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------- the shipped file
def test_loader_shapes_dtypes_and_labels():
    n_all = 0
    for split in ("train", "test"):
        x, y = load_iconthemes(split=split)
        assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (64, 64, 3)
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert np.array_equal(np.unique(y), np.arange(y.max() + 1))  # remapped to 0..C-1
        assert np.bincount(y).min() >= 5  # every concept drawn by >= 5 themes
        n_all += len(x)
    assert n_all == len(load_iconthemes(split="all")[0])
    ds = IconThemes("test")
    img, label = ds[0]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and 0.0 <= img.min() <= img.max() <= 1.0
    assert torch.equal(img, torch.from_numpy(ds.images[0]).permute(2, 0, 1).float() / 255)
    assert isinstance(label, int) and len(ds.class_names) == ds.num_classes == int(ds.labels.max()) + 1
    assert len(ds.theme_names) == 13 and ds.metadata["versions"]["rsvg-convert"].startswith("rsvg-convert")
    t_img, _ = IconThemes("test", transform=lambda im: im.size)[0]
    assert t_img == (64, 64)


def test_split_is_class_disjoint_and_covers_every_concept(raw):
    tr, te = set(raw["train_classes"].tolist()), set(raw["test_classes"].tolist())
    assert not tr & te
    assert tr | te == set(np.unique(raw["labels"]).tolist())
    assert abs(len(tr) - len(te)) <= 1
    names_tr = set(IconThemes("train").class_names)
    names_te = set(IconThemes("test").class_names)
    assert not names_tr & names_te


def test_no_image_in_two_classes_and_no_repeat_inside_a_class(raw):
    x, y = raw["images"], raw["labels"]
    owner = {}
    for img, c in zip(x, y):
        h = hashlib.sha256(img.tobytes()).hexdigest()
        assert owner.setdefault(h, c) == c, "one image under two concepts"
    per_class = {}
    for img, c in zip(x, y):
        per_class.setdefault(int(c), []).append(hashlib.sha256(img.tobytes()).hexdigest())
    for c, hs in per_class.items():
        assert len(hs) == len(set(hs)), f"byte-identical images inside concept {c}"


def test_one_image_per_theme_and_near_copies_removed(raw):
    x, y, th = raw["images"], raw["labels"], raw["themes"]
    meta = json.loads(str(raw["metadata"]))
    pairs = set(zip(y.tolist(), th.tolist()))
    assert len(pairs) == len(y)  # one drawing per (concept, theme)
    names = [str(t) for t in raw["theme_names"]]
    forks = {tuple(p) for p in meta["fork_pairs"]}
    assert ("gnome", "mate") in forks
    for c in np.unique(y)[::5]:  # a sample of the concepts: every pair is farther apart than the rules
        idx = np.nonzero(y == c)[0]
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                assert B.mad(x[i], x[j]) > meta["near_mad"]
                if (names[th[i]], names[th[j]]) in forks or (names[th[j]], names[th[i]]) in forks:
                    assert B.mad(x[i], x[j], block=8) > meta["fork_mad"]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_iconthemes(split="val")
    with pytest.raises(FileNotFoundError, match="not found"):
        IconThemes("train", path=str(tmp_path / "nope.npz"))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        load_iconthemes(str(bad))
    other = tmp_path / "other.npz"
    np.savez(other, images=np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="missing arrays"):
        load_iconthemes(str(other))


def test_harness_trains_the_glyph_cnn_on_rgb_icons(tmp_path):
    from benchmarks import harness
    from benchmarks.run import load_config

    cfg = copy.deepcopy(load_config("iconthemes_cpu"))
    cfg["data"]["path"] = ICONTHEMES_PATH
    tr_x, tr_y, va_x, va_y = harness.load_arrays(cfg, "val")
    assert tr_x.shape[1:] == (64, 64, 3) and not set(np.unique(tr_y)) & set(np.unique(va_y))
    assert harness.to_float(tr_x[:2]).shape == (2, 3, 64, 64)
    cfg["train"].update(epochs=1, iters_per_epoch=2, batch_size=32)
    r = harness.train_cell(cfg, "ee", "triplet", 0, str(tmp_path / "run"), split="val", progress=False)
    assert all(np.isfinite(v) for v in r["metrics"].values()) and 0.0 <= r["metrics"]["recall_at_1"] <= 1.0


# ----------------------------------------------------------------------------- build core, tiny fixture
def _png(path, rgba):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(rgba, np.uint8), "RGBA").save(path)


def _theme(root, seed):
    """A two-size theme with a symlinked alias, a byte-identical copy, a symbolic variant, an @2x dir."""
    rng = np.random.RandomState(seed)
    with open(os.path.join(root, "index.theme"), "w") as fh:
        fh.write("[Icon Theme]\nName=T\nDirectories=16x16/actions,48x48/actions,64x64/actions,32x32@2x/actions,"
                 "scalable/actions\n\n[16x16/actions]\nSize=16\nContext=Actions\nType=Fixed\n\n"
                 "[48x48/actions]\nSize=48\nContext=Actions\nType=Fixed\n\n"
                 "[64x64/actions]\nSize=64\nContext=Actions\nType=Fixed\n\n"
                 "[32x32@2x/actions]\nSize=32\nScale=2\nContext=Actions\nType=Fixed\n\n"
                 "[scalable/actions]\nSize=16\nMinSize=8\nMaxSize=512\nContext=Actions\nType=Scalable\n")
    for size in (16, 48, 64):
        d = os.path.join(root, f"{size}x{size}/actions")
        for name in ("edit-copy", "edit-cut", "folder"):
            _png(os.path.join(d, f"{name}.png"), rng.randint(0, 256, (size, size, 4)))
        os.symlink("edit-copy.png", os.path.join(d, "gtk-copy.png"))
        _png(os.path.join(d, "edit-cut-symbolic.png"), rng.randint(0, 256, (size, size, 4)))
    with open(os.path.join(root, "48x48/actions/folder.png"), "rb") as fh:
        data = fh.read()
    with open(os.path.join(root, "48x48/actions/folder-copy.png"), "wb") as fh:  # identical bytes
        fh.write(data)
    _png(os.path.join(root, "32x32@2x/actions/edit-copy.png"), rng.randint(0, 256, (64, 64, 4)))


def _core(tmp_path, tag):
    import collections

    files, skipped = [], collections.Counter()
    for k in range(2):
        root = tmp_path / f"{tag}{k}"
        root.mkdir()
        _theme(str(root), seed=k)
        files += B.scan_theme(f"T{k}", str(root), skipped)
    groups = B.shared_files(files)
    uf = B.UnionFind()
    B.alias_unions(files, groups, uf, min_themes=2, min_frac=2 / 3)
    best = B.best_files(files)
    concepts = B.build_concepts(best, uf)
    imgs = {k: B.render(f, "unused-for-png") for k, f in best.items()}
    return files, skipped, best, uf, concepts, imgs


def test_build_core_rules_and_determinism(tmp_path):
    files, skipped, best, uf, concepts, imgs = _core(tmp_path, "a")
    names = {f.name for f in files}
    assert "edit-cut-symbolic" not in names  # variant
    assert skipped[("T0", "variant -symbolic")] == 3 and skipped[("T0", "scaled directory (@2x)")] == 1
    assert best["T0/edit-copy"].dir.size == 64  # nearest to 64 px
    assert best["T0/folder-copy"].dir.size == 48  # only size it has
    # symlink alias in both themes -> one concept; identical copy in both themes -> one concept
    assert uf.find("gtk-copy") == uf.find("edit-copy")
    assert uf.find("folder-copy") == uf.find("folder")
    assert uf.find("edit-cut") != uf.find("edit-copy")
    by_name = {c.name: c for c in concepts}
    # display name: the member drawn by most themes, ties -> the shorter name
    assert set(by_name) == {"gtk-copy", "edit-cut", "folder"}
    assert sorted(by_name["gtk-copy"].names) == ["edit-copy", "gtk-copy"]
    assert by_name["folder"].images["T0"].name == "folder"  # one image per theme: the most drawn name
    assert all(im.shape == (64, 64, 3) and im.dtype == np.uint8 for im in imgs.values())
    # a second run on a fresh copy gives the same files, concepts and pixels
    files2, _, best2, _, concepts2, imgs2 = _core(tmp_path, "b")
    assert [(f.theme, f.name, f.sha) for f in files] == [(f.theme, f.name, f.sha) for f in files2]
    assert [(c.name, c.names, sorted(c.images)) for c in concepts] == \
        [(c.name, c.names, sorted(c.images)) for c in concepts2]
    assert all(np.array_equal(imgs[k], imgs2[k]) for k in imgs)


def test_conflicting_shared_file_is_dropped_for_all_but_its_owner(tmp_path):
    import collections

    files, skipped = [], collections.Counter()
    for k in range(3):
        root = tmp_path / f"t{k}"
        root.mkdir()
        _theme(str(root), seed=k)
        if k == 0:  # only theme 0 links edit-cut to folder: not a consistent alias
            d = root / "64x64/actions"
            os.remove(d / "edit-cut.png")
            os.symlink("folder.png", d / "edit-cut.png")
        files += B.scan_theme(f"T{k}", str(root), skipped)
    groups = B.shared_files(files)
    uf = B.UnionFind()
    B.alias_unions(files, groups, uf, min_themes=2, min_frac=2 / 3)
    assert uf.find("edit-cut") != uf.find("folder")
    dropped = B.conflicts(files, groups, uf)
    assert ("T0", "edit-cut") in dropped and ("T0", "folder") not in dropped


def test_render_composite_mad_and_split():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    rgba[1, 1] = (0, 0, 255, 128)
    out = B.composite(rgba)
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == (255, 255, 255)
    assert tuple(out[1, 1]) == (127, 127, 255)
    assert B.fit(np.zeros((32, 16, 3), np.uint8)).shape == (64, 64, 3)
    a = np.full((64, 64, 3), 255, np.uint8)
    a[8:24, 8:24] = 0
    b = a.copy()
    b[8:24, 8:24] = 10
    assert B.mad(a, a) == 0.0 and B.mad(a, b) == pytest.approx(10.0)
    assert B.near_duplicate(np.stack([a, b, a]), 10.0) == [0]
    assert B.near_duplicate(np.stack([a, b]), 9.9) == [0, 1]
    tr, te = B.split_classes(11, seed=3)
    assert not set(tr) & set(te) and len(tr) + len(te) == 11 and len(te) == 5
    tr2, te2 = B.split_classes(11, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert B.is_faint(np.full((64, 64, 3), 250, np.uint8)) and not B.is_faint(a)
    # fork pairs: themes 0 and 1 copy each other in 2 of 2 concepts, theme 2 draws its own
    c = np.full((64, 64, 3), 255, np.uint8)
    c[40:60, 0:30] = 0
    stats, forks = B.fork_pairs([[(0, a), (1, b), (2, c)], [(1, b), (0, a)]], close=15.0, min_frac=0.5)
    assert stats[(0, 1)] == (2, 2) and stats[(0, 2)] == (1, 0) and forks == {(0, 1)}
    assert B.fork_copies([0, 1, 2], np.stack([a, b, c]), forks, thr=25.0) == [0, 2]
    assert B.fork_copies([0, 2], np.stack([a, a]), forks, thr=25.0) == [0, 1]  # not a fork pair: kept
