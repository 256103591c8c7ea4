"""Hardness-Aware Deep Metric Learning (HDML) in a pytorch-metric-learning training loop.

What it shows
    ``HDMLLoss`` wrapped around PML's ``TripletMarginLoss`` (semi-hard triplets from PML's
    ``TripletMarginMiner``) in a PML-style loop (trunk + embedder, ``MPerClassSampler``) on the
    FontGlyphs subset shipped inside pml_ext (classes = fonts; 120 training fonts, 60 different
    test fonts). Two things differ from a plain PML loop:

    * the loss gets the trunk's *features* and the *embedder*
      (``loss = hdml(features, labels, embedder)``), because HDML's generator maps embeddings
      back to feature space and re-embeds them with the same embedder;
    * ONE Adam optimiser over ``hdml.param_groups(...)``: trunk + embedder at the metric lr,
      HDML's generator and softmax classifier at their own lrs (the official code's three
      optimisers). One ``backward()`` routes dJ_metric to the trunk/embedder, dJ_gen to the
      generator and dJ_cls to the classifier.

    Every ``--log-every`` steps it prints J_m (metric loss on the real batch), J_syn (on the
    synthetic hard tuples), J_avg (running average that sets the pull strength
    1 - exp(-alpha/J_avg)), J_gen and the metric weight w = exp(-beta/J_gen_avg) of
    J_metric = w*J_m + (1-w)*J_syn. J_avg and J_gen_avg are block averages over 64 steps (as in
    the official code) and start at 1e6 (no pull, w ~ 1), so they only move after step 64.
    At the end the test fonts are evaluated (Recall@K / NMI / F1, pml_ext's AccuracyCalculator).

How to run
    python examples/hdml_pml_loop.py                 # 384 steps (six 64-step blocks), ~40 s on one CPU thread
    python examples/hdml_pml_loop.py --steps 3       # a smoke test (seconds)

    Works from any directory if pml_ext is installed (``pip install -e .``); from a source
    checkout it also runs without installing. Writes ``<--out>/hdml_pml_loop_log.csv`` (the
    logged steps) and ``<--out>/hdml_pml_loop.json`` (metrics); default ``./example_outputs``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from pytorch_metric_learning import losses, miners, samplers
from torch import nn
from torch.utils.data import DataLoader

try:
    import pml_ext  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pml_ext.data import FontGlyphs
from pml_ext.losses import HDMLLoss
from pml_ext.utils import AccuracyCalculator

LOGGED = ("J_m", "J_syn", "J_avg", "J_gen", "metric_weight")


# ------------------------------------------------------------------------------------ model
class Trunk(nn.Module):
    """A small CNN for 1x32x32 glyphs -> 128-d features (any small backbone works)."""

    def __init__(self, width: int = 32, out_features: int = 128) -> None:
        super().__init__()

        def block(cin: int, cout: int, pool: bool = True) -> list:
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            return layers + [nn.MaxPool2d(2)] if pool else layers

        self.net = nn.Sequential(
            *block(1, width), *block(width, 2 * width), *block(2 * width, 4 * width),
            *block(4 * width, out_features, pool=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def embed(trunk: nn.Module, embedder: nn.Module, dataset: FontGlyphs, device: torch.device,
          batch_size: int = 512) -> torch.Tensor:
    trunk.eval()
    embedder.eval()
    out = [embedder(trunk(x.to(device))).cpu() for x, _ in DataLoader(dataset, batch_size=batch_size)]
    trunk.train()
    embedder.train()
    return torch.cat(out)


def evaluate(trunk: nn.Module, embedder: nn.Module, dataset: FontGlyphs, device: torch.device,
             recall_k: Sequence[int] = (1, 2, 4, 8)) -> Dict[str, float]:
    """Recall@K, NMI and F1 on the test fonts: every test image queries all the others."""
    emb = torch.nn.functional.normalize(embed(trunk, embedder, dataset, device), dim=1)
    labels = torch.as_tensor(dataset.labels)
    calc = AccuracyCalculator(include=("NMI", "F1") + tuple(f"recall_at_{k}" for k in recall_k),
                              recall_at_k=recall_k)
    res = calc.get_accuracy(emb, labels, emb, labels, ref_includes_query=True)
    return {k: float(v) for k, v in res.items()}


# ------------------------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=384, help="training iterations (3 = smoke test)")
    ap.add_argument("--log-every", type=int, default=32, help="print the HDML terms every N steps")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--m-per-class", type=int, default=4)
    ap.add_argument("--embedding-size", type=int, default=64)
    ap.add_argument("--margin", type=float, default=0.1)
    # HDML's alpha sets the pull strength 1 - exp(-alpha / J_avg). The official value 90 is scaled
    # for the official triplet loss, a SUM over the batch's triplets; PML's TripletMarginLoss is a
    # MEAN (values ~0.05-0.3 here), so alpha must be scaled down to that range: 0.05.
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--beta", type=float, default=1e4, help="official value (J_gen is ~1e4)")
    ap.add_argument("--metric-lr", type=float, default=1e-3, help="trunk + embedder (from scratch)")
    ap.add_argument("--generator-lr", type=float, default=1e-2, help="official value")
    ap.add_argument("--classifier-lr", type=float, default=1e-3, help="official value")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="example_outputs", help="folder for the log csv and metrics json")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # MPerClassSampler draws from numpy's global RNG
    device = torch.device(args.device)

    train_set = FontGlyphs(split="train")  # labels 0..119: the targets of HDML's softmax classifier
    test_set = FontGlyphs(split="test")

    trunk = Trunk().to(device)
    embedder = nn.Linear(trunk.out_features, args.embedding_size).to(device)
    hdml = HDMLLoss(
        losses.TripletMarginLoss(margin=args.margin),
        embedding_size=args.embedding_size,
        feature_size=trunk.out_features,
        num_classes=train_set.num_classes,
        miner=miners.TripletMarginMiner(margin=args.margin, type_of_triplets="semihard"),
        alpha=args.alpha,  # 0.05, not the official 90: see the --alpha comment above
        beta=args.beta,
    ).to(device)
    optimizer = torch.optim.Adam(hdml.param_groups(
        list(trunk.parameters()) + list(embedder.parameters()),
        metric_lr=args.metric_lr, generator_lr=args.generator_lr, classifier_lr=args.classifier_lr,
    ))
    sampler = samplers.MPerClassSampler(train_set.labels, m=args.m_per_class, batch_size=args.batch_size,
                                        length_before_new_iter=args.steps * args.batch_size)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    print(f"HDML + TripletMarginLoss: {len(train_set)} train images ({train_set.num_classes} fonts), "
          f"{len(test_set)} test images ({test_set.num_classes} fonts), {args.steps} steps")
    print(("{:>6}" + "{:>14}" * len(LOGGED)).format("step", *LOGGED))
    log: List[Dict[str, float]] = []
    t0 = time.perf_counter()
    for step, (images, labels) in enumerate(loader):
        images, labels = images.to(device), labels.to(device)
        features = trunk(images)
        loss = hdml(features, labels, embedder)  # value J_metric; its backward also trains G and the classifier
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            row = {"step": step, **{k: float(getattr(hdml, k)) for k in LOGGED}}
            log.append(row)
            print(("{:>6}" + "{:>14.4g}" * len(LOGGED)).format(step, *(row[k] for k in LOGGED)))
    train_seconds = time.perf_counter() - t0

    metrics = evaluate(trunk, embedder, test_set, device)
    print(f"test fonts (HDML, {train_seconds:.0f} s training): "
          + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "hdml_pml_loop_log.csv")
    with open(log_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", *LOGGED])
        writer.writeheader()
        writer.writerows(log)
    json_path = os.path.join(args.out, "hdml_pml_loop.json")
    with open(json_path, "w") as f:
        json.dump({"steps": args.steps, "seed": args.seed, "alpha": args.alpha, "beta": args.beta,
                   "metrics": metrics, "train_seconds": train_seconds}, f, indent=2)
    print(f"wrote {log_path} and {json_path}")
    return metrics


if __name__ == "__main__":
    main()
