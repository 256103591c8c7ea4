#!/usr/bin/env python
"""Plain pytorch-metric-learning baseline on FontGlyphs (classes = fonts).

A small CNN trained from scratch with PML's ``TripletMarginLoss`` and a
``TripletMarginMiner`` (semi-hard), classes sampled with ``MPerClassSampler``,
on the FULL FontGlyphs train split; evaluated on the class-disjoint test split
with Recall@1/2/4/8 (cosine nearest neighbours, the query itself excluded).

It reports three rows: raw pixels (no network), the CNN at random init and
the trained CNN, to show that the task is neither trivial nor impossible.

    python benchmarks/fontglyphs_baseline.py               # ~4-5 min on 1 CPU thread
    python benchmarks/fontglyphs_baseline.py --epochs 1 --data pml_ext/data/fontglyphs_subset.npz

Result of the default run (full set: 267 train / 267 test fonts, 16,554 test
queries; torch 2.14.1 CPU, 1 thread, 180 s):

    | embedding          | R@1  | R@2  | R@4  | R@8  |
    | pixels             | 51.4 | 59.4 | 66.7 | 73.4 |
    | random init        | 51.0 | 58.3 | 65.2 | 72.4 |
    | trained (4 epochs) | 80.8 | 87.9 | 92.6 | 95.7 |
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pml_ext.data import FontGlyphs, full_dataset_path  # noqa: E402


class SmallCNN(nn.Module):
    """4 conv blocks (32-64-128-128 channels) on 32x32 glyphs -> L2-normalised embedding."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()

        def block(i: int, o: int, pool: bool) -> nn.Sequential:
            layers = [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(2))
            return nn.Sequential(*layers)

        self.features = nn.Sequential(block(1, 32, True), block(32, 64, True), block(64, 128, True),
                                      block(128, 128, False))
        self.head = nn.Linear(128, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        h = h.mean(dim=(2, 3))
        return F.normalize(self.head(h), dim=1)


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def recall_at_k(emb: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 2, 4, 8),
                chunk: int = 2048) -> Dict[int, float]:
    """Recall@K: share of queries whose K nearest neighbours (cosine, the query
    excluded) contain an item of the same class."""
    emb = F.normalize(emb.float(), dim=1)
    kmax = max(ks)
    hits = {k: 0 for k in ks}
    for s in range(0, len(emb), chunk):
        sim = emb[s:s + chunk] @ emb.T
        idx = torch.arange(s, min(s + chunk, len(emb)))
        sim[torch.arange(len(idx)), idx] = -float("inf")
        nn_idx = sim.topk(kmax, dim=1).indices
        match = labels[nn_idx] == labels[idx, None]
        for k in ks:
            hits[k] += int(match[:, :k].any(1).sum())
    return {k: hits[k] / len(emb) for k in ks}


def _fmt(name: str, r: Dict[int, float]) -> str:
    return f"| {name} | " + " | ".join(f"{100 * r[k]:.1f}" for k in sorted(r)) + " |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=full_dataset_path(), help="FontGlyphs .npz (default: the full set)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=0, help="also report test R@1 every N epochs (0: only at the end)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--m-per-class", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--margin", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    from pytorch_metric_learning import losses, miners, samplers

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    t0 = time.time()
    train = FontGlyphs("train", "font", path=args.data)
    test = FontGlyphs("test", "font", path=args.data)
    xtr = torch.from_numpy(train.images).float().div_(255).unsqueeze(1)
    ytr = torch.from_numpy(train.labels)
    xte = torch.from_numpy(test.images).float().div_(255).unsqueeze(1)
    yte = torch.from_numpy(test.labels)
    print(f"data: {args.data}\ntrain {len(train)} images / {train.num_classes} fonts, "
          f"test {len(test)} images / {test.num_classes} fonts", flush=True)

    results = {"pixels": recall_at_k(xte.flatten(1) - xte.flatten(1).mean(1, keepdim=True), yte)}
    model = SmallCNN(args.dim)
    results["random init"] = recall_at_k(embed(model, xte), yte)
    print(_fmt("random init", results["random init"]), flush=True)

    loss_fn = losses.TripletMarginLoss(margin=args.margin)
    miner = miners.TripletMarginMiner(margin=args.margin, type_of_triplets="semihard")
    sampler = samplers.MPerClassSampler(ytr, m=args.m_per_class, batch_size=args.batch_size,
                                        length_before_new_iter=len(ytr))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xtr, ytr), batch_size=args.batch_size,
                                         sampler=sampler, drop_last=True)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * len(loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    history = []
    for ep in range(args.epochs):
        model.train()
        tot, n_trip = 0.0, 0
        for xb, yb in loader:
            # light augmentation: shift by up to 2 pixels
            dx, dy = np.random.randint(-2, 3, size=2)
            xb = torch.roll(xb, shifts=(int(dy), int(dx)), dims=(2, 3))
            emb = model(xb)
            trip = miner(emb, yb)
            loss = loss_fn(emb, yb, trip)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item()
            n_trip += len(trip[0])
        rec = {"epoch": ep + 1, "loss": tot / len(loader)}
        msg = f"epoch {ep + 1}: loss {tot / len(loader):.4f}, mined triplets/batch {n_trip / len(loader):.0f}"
        if args.eval_every and (ep + 1) % args.eval_every == 0 and ep + 1 < args.epochs:
            rec["R@1"] = recall_at_k(embed(model, xte), yte)[1]
            msg += f", test R@1 {100 * rec['R@1']:.1f}"
        history.append(rec)
        print(f"{msg} ({time.time() - t0:.0f}s)", flush=True)
    results["trained"] = recall_at_k(embed(model, xte), yte)
    results["train (seen fonts)"] = recall_at_k(embed(model, xtr), ytr)

    print("\n| embedding | R@1 | R@2 | R@4 | R@8 |\n| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(_fmt(name, r))
    print(f"\n{args.epochs} epochs, {time.time() - t0:.0f}s on {args.threads} thread(s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": {k: {f"R@{kk}": v for kk, v in r.items()}
                                                       for k, r in results.items()},
                       "history": history, "seconds": time.time() - t0}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
