"""Training and evaluation of one table cell: (method, loss) under a config, one seed.

Resumable: the state (models, optimisers, RNGs, logs) is checkpointed atomically after every
epoch; a killed run continues from its last checkpoint and ends with the same result as an
uninterrupted one. The result JSON is written atomically at the end.
"""
from __future__ import annotations

import json
import os
import random
import resource
import sys
import tempfile
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from pytorch_metric_learning import losses, miners, samplers

from pml_ext.losses import EmbeddingExpansionLoss, HPHNTripletLoss

from .models import build_model

METHODS = ("plain", "ee", "hdml")
ARRAY_DATASETS = ("fontglyphs", "iconthemes")  # in-memory uint8 arrays (grey [N,H,W] or RGB [N,H,W,3])
LOSSES = ("triplet", "hphn", "npair", "lifted", "ms")


# ----------------------------------------------------------------------------- files
def atomic_write_bytes(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(obj: Any, path: str) -> None:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------- data
def load_arrays(cfg: Dict[str, Any], split: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, eval images, eval labels) as uint8 [N,H,W] / int arrays.

    ``split="test"``: train on the train classes, evaluate on the test classes.
    ``split="val"``: hyper-parameter tuning without the test classes: a seeded quarter of the
    train classes is held out for evaluation and the rest is trained on.
    """
    data = cfg["data"]
    if data["name"] not in ARRAY_DATASETS:
        raise ValueError(f"load_arrays handles {ARRAY_DATASETS}; {data['name']!r} goes through image_datasets()")
    if data["name"] == "iconthemes":
        from .datasets import load_iconthemes

        def load(split):
            return load_iconthemes(path=data.get("path"), split=split)
    else:
        from pml_ext.data import load_font_glyphs

        def load(split):
            return load_font_glyphs(path=data.get("path"), split=split, view=data.get("view", "font"))

    tr_x, tr_y = load("train")
    if split == "test":
        te_x, te_y = load("test")
        return tr_x, tr_y, te_x, te_y
    if split != "val":
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    is_val = validation_mask(tr_y, data.get("val_seed", 0))
    return tr_x[~is_val], tr_y[~is_val], tr_x[is_val], tr_y[is_val]


def validation_mask(labels: np.ndarray, seed: int) -> np.ndarray:
    """Samples of a seeded quarter of the classes (at least 2): the validation split of TRAIN."""
    classes = np.unique(labels)
    val_classes = np.random.RandomState(seed).choice(classes, size=max(2, len(classes) // 4), replace=False)
    return np.isin(labels, val_classes)


def augment(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (pad + crop), one offset per image."""
    if shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (shift,) * 4)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W] (grey) or [N,H,W,3] (RGB) -> float [N,C,H,W] in [0, 1]."""
    x = torch.from_numpy(images).float().div_(255.0)
    return x.permute(0, 3, 1, 2).contiguous() if x.dim() == 4 else x.unsqueeze(1)


class ArraySource:
    """In-memory images (FontGlyphs, IconThemes): batches are tensors, augmented by random shifts."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, shift: int = 0):
        self.images = to_float(images)
        self.labels = np.asarray(labels)
        self.shift = shift

    def subset(self, idx) -> "ArraySource":
        out = ArraySource.__new__(ArraySource)
        out.images, out.labels, out.shift = self.images[torch.as_tensor(idx)], self.labels[idx], self.shift
        return out

    def batches(self, batch_indices, generator: torch.Generator, train: bool):
        for idx in batch_indices:
            x = self.images[torch.as_tensor(idx)]
            yield (augment(x, self.shift, generator) if train else x), torch.as_tensor(self.labels[idx])


class DatasetSource:
    """A torch Dataset of (image tensor, label) (CUB/Cars/SOP/ImageFolder), read by a DataLoader."""

    def __init__(self, dataset, labels: np.ndarray, workers: int = 0):
        self.dataset = dataset
        self.labels = np.asarray(labels)
        self.workers = workers

    def subset(self, idx) -> "DatasetSource":
        return DatasetSource(torch.utils.data.Subset(self.dataset, list(map(int, idx))), self.labels[idx], self.workers)

    def batches(self, batch_indices, generator: torch.Generator, train: bool):
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=[list(map(int, b)) for b in batch_indices],
                                             num_workers=self.workers)
        for x, _ in loader:
            yield x, None


def folder_dataset(cfg: Dict[str, Any]):
    """(dataset class, root directory) of a config naming one of the papers' datasets or a user's
    ImageFolder; an unknown name is a ValueError, a missing root a SystemExit naming --data-root."""
    from . import datasets as ds

    data = cfg["data"]
    classes = {"cub": ds.CUB200, "cars": ds.Cars196, "sop": ds.StanfordOnlineProducts,
               "imagefolder": ds.ImageFolderSplit}
    if data["name"] not in classes:
        raise ValueError(f"unknown dataset {data['name']!r}; expected one of {ARRAY_DATASETS + tuple(sorted(classes))}")
    root = data.get("root")
    if not root:
        raise SystemExit(f"config {cfg['name']!r} needs the dataset directory: pass --data-root")
    return classes[data["name"]], root


def image_sources(cfg: Dict[str, Any], split: str):
    """(train source, eval source) for the papers' datasets or a user's ImageFolder."""
    data = cfg["data"]
    cls, root = folder_dataset(cfg)
    workers = cfg["train"].get("workers", 0)
    train = cls(root, split="train")
    if split == "test":
        test = cls(root, split="test", transform="paper")
        test_eval = _with_eval_transform(test)
        return DatasetSource(train, train.labels, workers), DatasetSource(test_eval, test.labels, workers)
    labels = np.asarray(train.labels)
    is_val = validation_mask(labels, data.get("val_seed", 0))
    tr_idx, va_idx = np.nonzero(~is_val)[0], np.nonzero(is_val)[0]
    val_ds = _with_eval_transform(cls(root, split="train"))
    return (DatasetSource(torch.utils.data.Subset(train, tr_idx), labels[tr_idx], workers),
            DatasetSource(torch.utils.data.Subset(val_ds, va_idx), labels[va_idx], workers))


def _with_eval_transform(dataset):
    """The papers' test transform (resize + centre crop) on a dataset built with the train one."""
    from .datasets import paper_transforms

    dataset.transform = paper_transforms(train=False)
    return dataset


def sources(cfg: Dict[str, Any], split: str):
    if cfg["data"]["name"] in ARRAY_DATASETS:
        tr_x, tr_y, ev_x, ev_y = load_arrays(cfg, split)
        return ArraySource(tr_x, tr_y, cfg["train"].get("shift", 0)), ArraySource(ev_x, ev_y)
    return image_sources(cfg, split)


# ----------------------------------------------------------------------------- methods
def build_loss(loss_name: str, hp: Dict[str, Any]):
    """The base PML loss (and miner) of a table row, with the row's hyper-parameters."""
    if loss_name == "triplet":
        return losses.TripletMarginLoss(margin=hp.get("margin", 0.1)), None
    if loss_name == "npair":
        return losses.NPairsLoss(), None
    if loss_name == "lifted":
        return losses.LiftedStructureLoss(neg_margin=hp.get("neg_margin", 1.0)), None
    if loss_name == "ms":
        return (
            losses.MultiSimilarityLoss(alpha=hp.get("alpha", 2), beta=hp.get("beta", 50), base=hp.get("base", 0.5)),
            miners.MultiSimilarityMiner(epsilon=hp.get("epsilon", 0.1)),
        )
    raise ValueError(f"unknown loss {loss_name!r}; expected one of {LOSSES}")


def build_method(method: str, loss_name: str, hp: Dict[str, Any], feature_size: int, embedding_size: int,
                 num_classes: int):
    """(loss module, miner or None, is_hdml)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    ee = dict(n_points=hp.get("n_points", 2), normalize=hp.get("normalize", True), pairs=hp.get("pairs", "all"))
    if loss_name == "hphn":
        if method == "hdml":
            raise ValueError("HDML is defined for triplet and npair")
        n = ee["n_points"] if method == "ee" else 0
        return HPHNTripletLoss(margin=hp.get("margin", 0.1), n_points=n, normalize=ee["normalize"],
                               pairs=hp.get("pairs", "adjacent"), collect_stats=True), None, False
    base, miner = build_loss(loss_name, hp)
    if method == "plain":
        return base, miner, False
    if method == "ee":
        return EmbeddingExpansionLoss(base, collect_stats=True, **ee), miner, False
    if loss_name not in ("triplet", "npair"):
        raise ValueError("HDML is defined for triplet and npair")
    from pml_ext.losses import HDMLLoss

    if loss_name == "triplet" and miner is None:
        miner = miners.TripletMarginMiner(margin=hp.get("margin", 0.1), type_of_triplets="semihard")
    hdml = HDMLLoss(base, embedding_size=embedding_size, feature_size=feature_size, num_classes=num_classes,
                    miner=miner, collect_stats=True, **hp.get("hdml", {}))
    return hdml, None, True


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def embed(trunk, head, source, batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    trunk.eval()
    head.eval()
    n = len(source.labels)
    chunks = [np.arange(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]
    out = [head(trunk(x.to(device))).cpu() for x, _ in source.batches(chunks, torch.Generator(), train=False)]
    trunk.train()
    head.train()
    return torch.cat(out)


def evaluate(trunk, head, source, recall_k=(1, 2, 4, 8), device: str = "cpu") -> Dict[str, float]:
    """NMI, F1 (k-means with as many clusters as classes) and Recall@K on L2-normalised embeddings."""
    from pml_ext.utils import AccuracyCalculator

    emb = torch.nn.functional.normalize(embed(trunk, head, source, device=device), dim=1)
    calc = AccuracyCalculator(include=("NMI", "F1") + tuple(f"recall_at_{k}" for k in recall_k),
                              recall_at_k=tuple(recall_k))
    res = calc.get_accuracy(emb, torch.as_tensor(source.labels), ref_includes_query=True)
    return {k: float(v) for k, v in res.items()}


# ----------------------------------------------------------------------------- training
def _rng_states():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_states(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def build_training(cfg: Dict[str, Any], method: str, loss_name: str, hp: Dict[str, Any], num_classes: int,
                   device: str = "cpu"):
    """(trunk, head, loss_fn, miner, is_hdml, optimizer) of one cell, seeded by the caller."""
    tcfg, mcfg = cfg["train"], cfg["model"]
    trunk, head, feature_size = build_model(mcfg["name"], mcfg["embedding_size"], mcfg.get("weights"),
                                           in_channels=mcfg.get("in_channels", 1),
                                           input_pool=mcfg.get("input_pool", 1))
    loss_fn, miner, is_hdml = build_method(method, loss_name, hp, feature_size, mcfg["embedding_size"],
                                           num_classes)
    trunk, head, loss_fn = trunk.to(device), head.to(device), loss_fn.to(device)
    metric_params = list(trunk.parameters()) + list(head.parameters())
    if is_hdml:  # three groups, one backward: HDMLLoss routes each term to its own group
        params = loss_fn.param_groups(metric_params, metric_lr=tcfg["lr"], **hp.get("hdml_lr", {}))
    else:
        params = [{"params": metric_params, "lr": tcfg["lr"]}]
    for group in params:
        group["weight_decay"] = tcfg.get("weight_decay", 0.0)
    return trunk, head, loss_fn, miner, is_hdml, torch.optim.Adam(params)


def train_step(trunk, head, loss_fn, miner, is_hdml: bool, optimizer, x: torch.Tensor, y: torch.Tensor
               ) -> torch.Tensor:
    """One optimisation step; returns the (detached-able) loss."""
    feats = trunk(x)
    if is_hdml:
        loss = loss_fn(feats, y, head)
    else:
        emb = head(feats)
        tuples = miner(emb, y) if miner is not None else None
        loss = loss_fn(emb, y, tuples)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def start_run(cfg: Dict[str, Any], loss_name: str, seed: int, result_path: str, hp: Optional[Dict[str, Any]]):
    """(finished result or None, the run's hyper-parameters: config defaults + ``hp``); seeds
    torch, NumPy and Python for a run that has to be trained."""
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f), hp
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return None, dict(cfg.get("defaults", {}).get(loss_name, {}), **(hp or {}))


def train_cell(cfg: Dict[str, Any], method: str, loss_name: str, seed: int, run_dir: str,
               hp: Optional[Dict[str, Any]] = None, split: str = "test", progress: bool = True,
               stop_after_epoch: Optional[int] = None) -> Dict[str, Any]:
    """Train and evaluate one cell; resumes from ``run_dir/checkpoint.pt``; returns the result."""
    result_path = os.path.join(run_dir, "result.json")
    done, hp = start_run(cfg, loss_name, seed, result_path, hp)
    if done is not None:
        return done
    tcfg = cfg["train"]
    if "threads" in tcfg:
        torch.set_num_threads(tcfg["threads"])
    device = tcfg.get("device", "cuda" if torch.cuda.is_available() else "cpu")
    train_src, eval_src = sources(cfg, split)
    classes, tr_y = np.unique(train_src.labels, return_inverse=True)
    train_src.labels = tr_y
    trunk, head, loss_fn, miner, is_hdml, optimizer = build_training(cfg, method, loss_name, hp, len(classes),
                                                                     device)
    per_class = hp.get("per_class", tcfg["per_class"])
    batch_size = tcfg["batch_size"]
    labels = torch.as_tensor(tr_y)
    aug_gen = torch.Generator().manual_seed(seed)

    state = {"epoch": 0, "log": [], "train_seconds": 0.0}
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        trunk.load_state_dict(ck["trunk"])
        head.load_state_dict(ck["head"])
        loss_fn.load_state_dict(ck["loss_fn"])
        optimizer.load_state_dict(ck["optimizer"])
        _set_rng_states(ck["rng"])
        aug_gen.set_state(ck["aug_rng"])
        state = ck["state"]

    record_keeper = _record_keeper(run_dir)
    epochs = tcfg["epochs"]
    bar = _progress(epochs * tcfg["iters_per_epoch"], state["epoch"] * tcfg["iters_per_epoch"], progress,
                    f"{method}/{loss_name}/s{seed}")
    while state["epoch"] < epochs:
        t0 = time.perf_counter()
        sums: Dict[str, float] = {}
        # A fresh sampler per epoch: PML's sampler shuffles its own state in place, which a
        # checkpoint would not capture; its randomness comes from the (restored) numpy RNG.
        sampler = samplers.MPerClassSampler(tr_y, m=per_class, batch_size=batch_size,
                                            length_before_new_iter=tcfg["iters_per_epoch"] * batch_size)
        order = np.asarray(list(iter(sampler)))
        batch_idx = [order[i * batch_size:(i + 1) * batch_size] for i in range(tcfg["iters_per_epoch"])]
        for it, (x, _) in enumerate(train_src.batches(batch_idx, aug_gen, train=True)):
            x, y = x.to(device), labels[torch.as_tensor(batch_idx[it])].to(device)
            loss = train_step(trunk, head, loss_fn, miner, is_hdml, optimizer, x, y)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for name, value in _stats(loss_fn).items():
                sums[name] = sums.get(name, 0.0) + value
            if record_keeper is not None:
                step = state["epoch"] * tcfg["iters_per_epoch"] + it
                record_keeper.update_records({"loss_fn": loss_fn, "miner": miner} if miner else {"loss_fn": loss_fn},
                                             step, recursive_types=[torch.nn.Module])
            bar.update(1)
        state["train_seconds"] += time.perf_counter() - t0
        state["log"].append({"epoch": state["epoch"] + 1, **{k: v / tcfg["iters_per_epoch"] for k, v in sums.items()}})
        state["epoch"] += 1
        if record_keeper is not None:
            record_keeper.save_records()
        atomic_torch_save({"trunk": trunk.state_dict(), "head": head.state_dict(), "loss_fn": loss_fn.state_dict(),
                           "optimizer": optimizer.state_dict(), "rng": _rng_states(), "aug_rng": aug_gen.get_state(),
                           "state": state}, ckpt_path)
        if stop_after_epoch is not None and state["epoch"] >= stop_after_epoch and state["epoch"] < epochs:
            bar.close()
            raise SystemExit(f"stopped after epoch {state['epoch']} as asked")
    bar.close()
    metrics = evaluate(trunk, head, eval_src, tuple(cfg.get("recall_k", (1, 2, 4, 8))), device)
    result = {
        "config": cfg["name"], "method": method, "loss": loss_name, "seed": seed, "split": split,
        "hyper_parameters": hp, "metrics": metrics, "train_seconds": state["train_seconds"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "log": state["log"], "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    atomic_write_json(result_path, result)
    return result


# per-epoch means in a cell's log: EE's selection ratio and HDML's terms
LOGGED_STATS = ("synthetic_selection_ratio", "J_m", "J_syn", "J_gen", "J_avg", "metric_weight", "hardness_decay")


def _stats(loss_fn) -> Dict[str, float]:
    """The :data:`LOGGED_STATS` that ``loss_fn`` (or, for names it lacks, its ``miner``) records.

    Both of PML's record lists are read: ``_record_these_stats`` (``is_stat=True``, EE/HPHN with
    ``collect_stats=True``) and ``_record_these`` (``is_stat=False``, where HDMLLoss keeps its
    terms). The loss's own value wins over its miner's: a wrapper's internal miner keeps stale
    zeros (the wrapper records the statistics). 0-d tensors are read as floats."""
    out: Dict[str, float] = {}
    miner = getattr(loss_fn, "miner", None)
    for obj in (loss_fn, miner):
        if obj is None:
            continue
        names = list(getattr(obj, "_record_these", [])) + list(getattr(obj, "_record_these_stats", []))
        for name in names:
            if name not in LOGGED_STATS or name in out:
                continue
            v = getattr(obj, name, None)
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
                out[name] = float(v)
    return out


def _record_keeper(run_dir: str):
    try:
        import record_keeper
    except ImportError:  # logging is optional; results are written regardless
        return None
    from pytorch_metric_learning.utils import common_functions as c_f

    return record_keeper.RecordKeeper(
        record_writer=record_keeper.RecordWriter(os.path.join(run_dir, "records")),
        attributes_to_search_for=c_f.list_of_recordable_attributes_list_names(),
    )


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, initial: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, leave=False)
