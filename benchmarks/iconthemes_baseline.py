#!/usr/bin/env python
"""Trivial baselines on the IconThemes test concepts: how far does no learning get?

Rows: raw pixels (64x64 RGB, and box-averaged to 16x16 / 8x8; each image centred by its mean,
cosine nearest neighbours), and the glyph CNN of the CPU protocol (3 input channels) at random
initialisation.  Recall@K on the class-disjoint test split, the query itself excluded; R@1 per
category and per theme of the query for the best pixel row.  Trained rows come from the harness:
``python -m benchmarks.run train --config iconthemes_cpu --method plain --loss triplet``.

    python benchmarks/iconthemes_baseline.py [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.datasets import ICONTHEMES_PATH, IconThemes  # noqa: E402
from benchmarks.fontglyphs_baseline import _fmt, recall_at_k  # noqa: E402


def pixels(x: torch.Tensor, block: int) -> torch.Tensor:
    """[N,3,64,64] -> box-averaged, flattened, each vector centred by its mean."""
    if block > 1:
        x = torch.nn.functional.avg_pool2d(x, block)
    f = x.flatten(1)
    return f - f.mean(1, keepdim=True)


def per_group_r1(emb: torch.Tensor, labels: torch.Tensor, groups: np.ndarray) -> dict:
    emb = torch.nn.functional.normalize(emb.float(), dim=1)
    sim = emb @ emb.T
    sim.fill_diagonal_(-float("inf"))
    hit = (labels[sim.argmax(1)] == labels).numpy()
    out = collections.defaultdict(list)
    for g, h in zip(groups, hit):
        out[str(g)].append(h)
    return {g: (float(np.mean(v)), len(v)) for g, v in sorted(out.items())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=ICONTHEMES_PATH)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    test = IconThemes("test", path=args.data)
    x = torch.from_numpy(test.images).permute(0, 3, 1, 2).float().div_(255)
    y = torch.from_numpy(test.labels)
    print(f"{os.path.relpath(args.data, ROOT)}: test {len(test)} images / {test.num_classes} concepts")
    res = {}
    for block, name in ((1, "pixels 64x64"), (4, "pixels 16x16"), (8, "pixels 8x8")):
        res[name] = recall_at_k(pixels(x, block), y)
    from benchmarks.models import GlyphConvNet

    net = GlyphConvNet(in_channels=3).eval()
    with torch.no_grad():
        res["glyph CNN, random init"] = recall_at_k(torch.cat([net(x[i:i + 512]) for i in range(0, len(x), 512)]), y)
    print("\n| embedding | R@1 | R@2 | R@4 | R@8 |\n| --- | --- | --- | --- | --- |")
    for name, r in res.items():
        print(_fmt(name, r))
    best = max(res, key=lambda k: res[k][1])
    with np.load(args.data, allow_pickle=False) as z:
        cats = z["concept_categories"][test.concept_ids]
    by_cat = per_group_r1(pixels(x, 4 if best == "pixels 16x16" else 1), y, cats)
    by_theme = per_group_r1(pixels(x, 4 if best == "pixels 16x16" else 1), y,
                            np.asarray(test.theme_names)[test.theme_ids])
    print(f"\nR@1 of '{best}' by category and by theme of the query:")
    for title, d in (("category", by_cat), ("theme", by_theme)):
        print(f"\n| {title} | queries | R@1 |\n| --- | --- | --- |")
        for g, (r1, n) in d.items():
            print(f"| {g} | {n} | {100 * r1:.1f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": {k: {f"R@{kk}": v for kk, v in r.items()} for k, r in res.items()},
                       "by_category": by_cat, "by_theme": by_theme}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
