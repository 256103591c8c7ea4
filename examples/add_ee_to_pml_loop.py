"""Add Embedding Expansion (EE) to a plain pytorch-metric-learning training loop.

What it shows
    A standard PML loop -- trunk + embedder, ``MultiSimilarityLoss`` + ``MultiSimilarityMiner``,
    ``MPerClassSampler`` -- on the FontGlyphs subset shipped inside pml_ext (classes = fonts,
    62 glyph images of 32x32 per font; 120 training fonts, 60 *different* test fonts).
    The EE version differs by ONE line, the loss construction (see ``build_loss``)::

        loss_fn = losses.MultiSimilarityLoss()                          # plain
        loss_fn = EmbeddingExpansionLoss(losses.MultiSimilarityLoss())  # --ee

    Everything else (miner, sampler, optimiser, loop, evaluation) is untouched. At the end the
    test fonts are embedded and Recall@K / NMI / F1 are computed with pml_ext's
    ``AccuracyCalculator`` (a PML AccuracyCalculator with the papers' Recall@K and F1).

How to run
    python examples/add_ee_to_pml_loop.py              # plain MS loss
    python examples/add_ee_to_pml_loop.py --ee         # the same loop with EE
    python examples/add_ee_to_pml_loop.py --steps 3    # a smoke test (seconds)

    Works from any directory if pml_ext is installed (``pip install -e .``); from a source
    checkout it also runs without installing. Metrics are printed and written to
    ``<--out>/add_ee_to_pml_loop_{plain,ee}.json`` (default ``./example_outputs``).
    The default 400 steps take ~35 s on one CPU thread. Output of the defaults (seed 0, torch
    2.14.1 CPU) -- one seed of a short run on a small subset, an illustration, not a benchmark
    (``python -m benchmarks.run table`` is the comparison)::

        plain: recall_at_1=0.9379  NMI=0.8842  F1=0.7371
        --ee:  recall_at_1=0.9290  NMI=0.8635  F1=0.6866
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, Optional, Sequence

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
from pml_ext.losses import EmbeddingExpansionLoss
from pml_ext.utils import AccuracyCalculator


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


# ------------------------------------------------------------------------------------ loss
def build_loss(use_ee: bool) -> nn.Module:
    if use_ee:
        return EmbeddingExpansionLoss(losses.MultiSimilarityLoss())  # <- the one-line change
    return losses.MultiSimilarityLoss()


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
    emb = torch.nn.functional.normalize(embed(trunk, embedder, dataset, device), dim=1)  # cosine
    labels = torch.as_tensor(dataset.labels)
    calc = AccuracyCalculator(include=("NMI", "F1") + tuple(f"recall_at_{k}" for k in recall_k),
                              recall_at_k=recall_k)
    res = calc.get_accuracy(emb, labels, emb, labels, ref_includes_query=True)
    return {k: float(v) for k, v in res.items()}


# ------------------------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ee", action="store_true", help="wrap the loss in EmbeddingExpansionLoss")
    ap.add_argument("--steps", type=int, default=400, help="training iterations (3 = smoke test)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--m-per-class", type=int, default=4, help="images per font in a batch")
    ap.add_argument("--embedding-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="example_outputs", help="folder for the metrics json")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # MPerClassSampler draws from numpy's global RNG
    device = torch.device(args.device)

    train_set = FontGlyphs(split="train")  # float tensors [1, 32, 32] in [0, 1]
    test_set = FontGlyphs(split="test")  # fonts disjoint from the training fonts

    trunk = Trunk().to(device)
    embedder = nn.Linear(trunk.out_features, args.embedding_size).to(device)
    loss_fn = build_loss(args.ee).to(device)
    miner = miners.MultiSimilarityMiner(epsilon=0.1)
    optimizer = torch.optim.Adam(list(trunk.parameters()) + list(embedder.parameters()), lr=args.lr)
    sampler = samplers.MPerClassSampler(train_set.labels, m=args.m_per_class, batch_size=args.batch_size,
                                        length_before_new_iter=args.steps * args.batch_size)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    name = "ee" if args.ee else "plain"
    print(f"{name}: {type(loss_fn).__name__}, {len(train_set)} train images ({train_set.num_classes} fonts), "
          f"{len(test_set)} test images ({test_set.num_classes} fonts), {args.steps} steps")
    t0 = time.perf_counter()
    for step, (images, labels) in enumerate(loader):
        images, labels = images.to(device), labels.to(device)
        embeddings = embedder(trunk(images))
        indices_tuple = miner(embeddings, labels)
        loss = loss_fn(embeddings, labels, indices_tuple)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    train_seconds = time.perf_counter() - t0

    metrics = evaluate(trunk, embedder, test_set, device)
    print(f"test fonts ({name}, {train_seconds:.0f} s training): "
          + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"add_ee_to_pml_loop_{name}.json")
    with open(path, "w") as f:
        json.dump({"method": name, "steps": args.steps, "seed": args.seed, "metrics": metrics,
                   "train_seconds": train_seconds}, f, indent=2)
    print(f"wrote {path}")
    return metrics


if __name__ == "__main__":
    main()
