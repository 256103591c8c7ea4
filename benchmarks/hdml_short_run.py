"""Short HDML run on real images: does J_avg fall and the pull strengthen, as the paper describes?

Trains a tiny CNN (backbone -> pooled features) + linear embedding head with
``HDMLLoss(TripletMarginLoss)`` (generator + softmax classifier, official β, λ, softmax_factor,
block average of 64) for a few hundred steps with ONE Adam optimiser over three parameter groups
(metric / generator / classifier lrs as in the official code's three optimisers, metric lr raised
for a from-scratch CNN), and logs per step to a CSV:

    step, J_m, J_syn, J_metric, J_avg (the value used at that step), exp(-alpha/J_avg),
    pull_strength = 1 - exp(-alpha/J_avg), mean_pull_coefficient (mean ||ẑ- - z|| / ||z- - z||),
    fraction_pullable, J_gen, J_recon, J_soft, J_cls, J_gen_avg (used), metric_weight
    = exp(-beta/J_gen_avg), syn_weight, seconds

Data: pml_ext/data/fontglyphs_subset.npz if present (``images`` uint8 [N, 32, 32]; classes =
``labels`` or ``font_labels``; its ``train_classes`` split), else scikit-learn's bundled
``load_digits`` (8x8, 10 classes, first half of the classes for training). Recall@1 on the
held-out classes is printed before and after training.

alpha: the official 90 is on the scale of the official triplet loss (a SUM over 40 triplets of
squared-distance hinge terms, margin 1). PML's TripletMarginLoss here is a mean over non-zero
triplets with margin 0.2 on normalised embeddings (values ~0.05-0.3), so the default alpha is
scaled down to that range (``--alpha``).

    python benchmarks/hdml_short_run.py                 # ~45 s CPU time on 1 thread (wall time more on a busy machine)
    python benchmarks/hdml_short_run.py --beta 0        # metric params see J_m only
    python benchmarks/hdml_short_run.py --no-generator  # hardness-aware negatives only
    python benchmarks/hdml_short_run.py --data digits --steps 320 --out /tmp/hdml.csv

Reference numbers (FontGlyphs subset, 120 train / 60 test fonts, batch 8x8, 1024 steps, seed 0,
1 thread, ~41-44 s CPU): J_avg 0.173 (block 2) -> 0.082 (block 16); exp(-alpha/J_avg) 0.75 -> 0.54; mean
pull coefficient 0.85 -> 0.71; J_gen 2.6e4 -> 1.9e4; metric weight exp(-beta/J_gen) 0.99 -> 0.60;
held-out Recall@1 0.622 -> 0.832 (beta = 0: 0.846; single seed, not a benchmark of accuracy).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import numpy as np
import torch
from pytorch_metric_learning import losses
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
from pml_ext.losses.hdml_loss import HDMLLoss  # noqa: E402

NPZ = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pml_ext", "data", "fontglyphs_subset.npz")


def load_data(source: str):
    """Returns (x [N,1,H,W] float, y [N] long, train-class mask [N] bool, description)."""
    if source in ("auto", "fontglyphs") and os.path.exists(NPZ):
        with np.load(NPZ) as z:
            keys = list(z.keys())
            label_key = "labels" if "labels" in keys else "font_labels" if "font_labels" in keys else None
            if "images" not in keys or label_key is None:
                raise SystemExit(f"{NPZ}: expected arrays 'images' and 'labels'/'font_labels', found {keys}")
            x = z["images"].astype(np.float32) / 255.0
            y = z[label_key].astype(np.int64)
            train_classes = z["train_classes"] if "train_classes" in keys else None
        name = f"fontglyphs_subset.npz images {x.shape}, classes = {label_key}"
    elif source == "fontglyphs":
        raise SystemExit(f"{NPZ} not found")
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.images / 16.0).astype(np.float32)
        y = d.target.astype(np.int64)
        train_classes = None
        name = f"sklearn load_digits {x.shape}"
    if train_classes is None:  # first half of the classes
        uniq = np.unique(y)
        train_classes = uniq[: len(uniq) // 2]
    is_train = np.isin(y, train_classes)
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y), torch.from_numpy(is_train), name


class TinyCNN(torch.nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(width, 2 * width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(2 * width, 2 * width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )
        self.out_features = 2 * width

    def forward(self, x):
        return self.net(x)


def class_balanced_batch(y_train, classes, per_class, gen):
    uniq = torch.unique(y_train)
    chosen = uniq[torch.randperm(len(uniq), generator=gen)[:classes]]
    idx = []
    for c in chosen:
        pool = torch.nonzero(y_train == c).squeeze(1)
        idx.append(pool[torch.randint(len(pool), (per_class,), generator=gen)])
    return torch.cat(idx)


@torch.no_grad()
def recall_at_1(backbone, head, x, y):
    backbone.eval()
    e = torch.nn.functional.normalize(head(backbone(x)), dim=1)
    backbone.train()
    d = torch.cdist(e, e)
    d.fill_diagonal_(float("inf"))
    return (y[d.argmin(1)] == y).float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["auto", "fontglyphs", "digits"], default="auto")
    ap.add_argument("--steps", type=int, default=1024, help="16 blocks of 64")
    ap.add_argument("--classes-per-batch", type=int, default=8)
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--triplets-per-anchor", type=int, default=2)
    ap.add_argument("--embedding-size", type=int, default=32)
    ap.add_argument("--margin", type=float, default=0.2)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--beta", type=float, default=1e4)
    ap.add_argument("--lambda", dest="lambda_", type=float, default=0.5)
    ap.add_argument("--softmax-factor", type=float, default=1e4)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--metric-lr", type=float, default=1e-3)
    ap.add_argument("--generator-lr", type=float, default=1e-2)
    ap.add_argument("--classifier-lr", type=float, default=1e-3)
    ap.add_argument("--no-generator", action="store_true", help="hardness-aware negatives only (no generator)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/hdml_short_run.csv")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x, y, tr, name = load_data(args.data)
    x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[~tr], y[~tr]
    _, y_tr = torch.unique(y_tr, return_inverse=True)  # classifier targets 0..n_train-1
    n_train, n_test = len(torch.unique(y_tr)), len(torch.unique(y_te))
    if len(x_te) > 4000:  # keep the evaluation cheap
        keep = torch.randperm(len(x_te), generator=gen)[:4000]
        x_te, y_te = x_te[keep], y_te[keep]
    cpb = min(args.classes_per_batch, n_train)
    print(f"data: {name}; train {n_train} classes / {len(x_tr)} images, "
          f"test {n_test} classes / {len(x_te)} images; batch {cpb}x{args.per_class}")

    backbone = TinyCNN()
    head = torch.nn.Linear(backbone.out_features, args.embedding_size)
    gen_kw = dict(use_generator=False) if args.no_generator else dict(
        embedding_size=args.embedding_size, feature_size=backbone.out_features, num_classes=n_train,
        beta=args.beta, lambda_=args.lambda_, softmax_factor=args.softmax_factor,
    )
    hdml = HDMLLoss(losses.TripletMarginLoss(margin=args.margin), alpha=args.alpha, block_size=args.block_size, **gen_kw)
    opt = torch.optim.Adam(hdml.param_groups(
        list(backbone.parameters()) + list(head.parameters()),
        metric_lr=args.metric_lr, generator_lr=args.generator_lr, classifier_lr=args.classifier_lr,
    ))
    r1_before = recall_at_1(backbone, head, x_te, y_te)

    cols = ["step", "J_m", "J_syn", "J_metric", "J_avg", "exp_neg_alpha_over_J_avg", "pull_strength",
            "mean_pull_coefficient", "fraction_pullable", "J_gen", "J_recon", "J_soft", "J_cls",
            "J_gen_avg", "metric_weight", "syn_weight", "seconds"]
    rows = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = class_balanced_batch(y_tr, cpb, args.per_class, gen)
        xb, yb = x_tr[idx], y_tr[idx]
        javg_used, jgen_used = hdml.J_avg_value, hdml.J_gen_avg_value
        triplets = lmu.get_random_triplet_indices(yb, t_per_anchor=args.triplets_per_anchor)
        opt.zero_grad()
        loss = hdml(backbone(xb), yb, head, indices_tuple=triplets)
        loss.backward()
        opt.step()
        rows.append({
            "step": step, "J_m": hdml.J_m, "J_syn": hdml.J_syn, "J_metric": hdml.J_metric,
            "J_avg": javg_used, "exp_neg_alpha_over_J_avg": hdml.hardness_decay,
            "pull_strength": hdml.pull_strength, "mean_pull_coefficient": hdml.mean_pull_coefficient,
            "fraction_pullable": hdml.fraction_pullable, "J_gen": hdml.J_gen, "J_recon": hdml.J_recon,
            "J_soft": hdml.J_soft, "J_cls": hdml.J_cls, "J_gen_avg": jgen_used,
            "metric_weight": hdml.metric_weight, "syn_weight": hdml.syn_weight,
            "seconds": time.perf_counter() - t0,
        })
    secs = time.perf_counter() - t0
    r1_after = recall_at_1(backbone, head, x_te, y_te)

    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)

    bs = args.block_size
    print(f"\n{args.steps} steps in {secs:.1f} s (1 thread); CSV: {args.out}")
    print(f"block means (each block of {bs} steps; J_avg / weights are the values used in that block)")
    hdr = ("steps", "J_m", "J_avg", "exp(-a/Javg)", "pull_coef", "J_gen", "J_gen_avg", "w=exp(-b/Jgen)", "J_syn", "J_cls")
    print(("{:>9} " + "{:>12} " * (len(hdr) - 1)).format(*hdr))
    for b0 in range(0, args.steps, bs):
        blk = rows[b0:b0 + bs]
        mean = lambda k: sum(r[k] for r in blk) / len(blk)  # noqa: E731
        print(("{:>9} " + "{:>12.4g} " * (len(hdr) - 1)).format(
            f"{b0}-{b0 + len(blk) - 1}", mean("J_m"), mean("J_avg"), mean("exp_neg_alpha_over_J_avg"),
            mean("mean_pull_coefficient"), mean("J_gen"), mean("J_gen_avg"), mean("metric_weight"),
            mean("J_syn"), mean("J_cls")))
    print(f"\nRecall@1 on held-out classes: before {r1_before:.3f}, after {r1_after:.3f}")
    if not all(math.isfinite(r["J_metric"]) for r in rows):
        raise SystemExit("non-finite loss encountered")


if __name__ == "__main__":
    main()
