"""Wall time of pml_ext's AccuracyCalculator vs PML's, on SOP-sized data.

Ours: recall_at_{1,10,100,1000} + NMI + F1.  PML: precision_at_1 + NMI.
Both run the same faiss k-NN (IndexFlatL2) and k-means (niter=20, seed 1234)
on the same clustered random embeddings (class centres on the unit sphere +
Gaussian noise, L2-normalised, float32).

PML's baseline uses k=1, the smallest k precision_at_1 needs (its default
k=None would ask faiss for all 60k neighbours of each of 60k queries,
~43 GB of results).  Ours uses its default k (= max recall K = 1000).

Each run prints the wall and CPU time and its split: k-NN, k-means, label
counting (PML's get_label_match_counts is a #classes x n comparison, ours
uses torch.unique) and the rest (metric computations, checks, NMI, F1).
The machine may be shared: use --repeats to take the min over runs.

    python benchmarks/bench_accuracy.py                 # 60000 x 512, 11316 classes
    python benchmarks/bench_accuracy.py --n 6000 --classes 1100 --dim 128
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils import accuracy_calculator as pml_ac
from pytorch_metric_learning.utils.accuracy_calculator import (
    AccuracyCalculator as PMLAccuracyCalculator,
)
from pytorch_metric_learning.utils.inference import FaissKMeans, FaissKNN

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
import pml_ext.utils.accuracy_calculator as ours_ac  # noqa: E402
from pml_ext.utils import AccuracyCalculator  # noqa: E402


def make_data(n: int, classes: int, dim: int, noise: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """~n/classes samples per class around random unit centres."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=g), dim=1)
    labels = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    x = centres[labels]
    x += noise / dim**0.5 * torch.randn(n, dim, generator=g)
    return F.normalize(x, dim=1).contiguous(), labels


class Timed:
    """Wrap a knn / kmeans callable and accumulate its wall time."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.seconds, self.calls = fn, 0.0, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        if len(args) > 1:
            self.calls.append(args[1])  # k for knn, n_clusters for kmeans
        return out


# label counting (PML: a #classes x n comparison; ours: torch.unique), timed
# by wrapping the module-level functions each get_accuracy calls
LABEL_COUNTS = {
    "PML": Timed(pml_ac.get_label_match_counts),
    "ours": Timed(ours_ac._label_match_counts),
}
pml_ac.get_label_match_counts = LABEL_COUNTS["PML"]
ours_ac._label_match_counts = LABEL_COUNTS["ours"]


def run(name: str, make_calc: Callable[..., Any], x: torch.Tensor, y: torch.Tensor) -> Tuple[float, Dict[str, Any]]:
    knn, kmeans = Timed(FaissKNN()), Timed(FaissKMeans(niter=20, gpu=False))
    labels = LABEL_COUNTS[name]
    labels.seconds = 0.0
    calc = make_calc(knn_func=knn, kmeans_func=kmeans)
    t0, c0 = time.perf_counter(), time.process_time()
    res = calc.get_accuracy(x, y)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    other = total - knn.seconds - kmeans.seconds - labels.seconds
    print(
        f"{name:>5}: wall {total:7.2f} s (cpu {cpu:7.2f} s) | k-NN (k={knn.calls[0]}) {knn.seconds:7.2f} s | "
        f"k-means ({kmeans.calls[0]} clusters) {kmeans.seconds:7.2f} s | "
        f"label counts {labels.seconds:6.2f} s | rest {other:6.2f} s",
        flush=True,
    )
    print("       " + ", ".join(f"{k}={v:.4f}" for k, v in res.items()), flush=True)
    return total, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60000)
    ap.add_argument("--classes", type=int, default=11316)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--noise", type=float, default=2.2, help="noise norm relative to the unit centre")
    ap.add_argument("--ks", type=str, default="1,10,100,1000", help="recall K list")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pml-first", action="store_true", help="time PML before ours")
    ap.add_argument("--repeats", type=int, default=1, help="runs per calculator (order alternates); min time is used")
    args = ap.parse_args()

    ks = tuple(int(k) for k in args.ks.split(","))
    x, y = make_data(args.n, args.classes, args.dim, args.noise, args.seed)
    print(
        f"data: {args.n} x {args.dim} float32, {len(torch.unique(y))} classes, "
        f"torch threads={torch.get_num_threads()}",
        flush=True,
    )
    cpu = torch.device("cpu")
    ours_metrics = tuple(f"recall_at_{k}" for k in ks) + ("NMI", "F1")

    def ours(**kw: Any) -> AccuracyCalculator:
        return AccuracyCalculator(include=ours_metrics, recall_at_k=ks, device=cpu, **kw)

    def pml(**kw: Any) -> PMLAccuracyCalculator:
        return PMLAccuracyCalculator(include=("precision_at_1", "NMI"), k=1, device=cpu, **kw)

    order = [("PML", pml), ("ours", ours)] if args.pml_first else [("ours", ours), ("PML", pml)]
    times: Dict[str, list] = {"ours": [], "PML": []}
    results: Dict[str, Dict[str, Any]] = {}
    for rep in range(args.repeats):
        for name, make in order if rep % 2 == 0 else order[::-1]:
            t, results[name] = run(name, make, x, y)
            times[name].append(t)

    best = {name: min(ts) for name, ts in times.items()}
    print(
        f"wall time (min of {args.repeats}): ours {best['ours']:.2f} s, PML {best['PML']:.2f} s, "
        f"ratio ours / PML = {best['ours'] / best['PML']:.3f}  (target <= 1.1)"
    )
    if 1 in ks:
        same = results["ours"]["recall_at_1"] == results["PML"]["precision_at_1"]
        print(f"recall_at_1 == PML precision_at_1: {same}")
    print(f"NMI identical (same clustering): {results['ours']['NMI'] == results['PML']['NMI']}")


if __name__ == "__main__":
    main()
