"""Side-by-side cost of Embedding Expansion vs the plain PML loss on the same batch.

    python -m benchmarks.perf_ee                      # B=128 (32 classes x 4), d=512, n=2
    python -m benchmarks.perf_ee --scaling            # time/memory over B and n

Every ratio is measured in one run, alternating our call and PML's on the same batch. As in
training, every repeat relabels the batch with fresh class ids (same label pattern: 4 per
class, the way PML's MPerClassSampler builds batches), so EE's per-pattern layout cache is hit
as it is in training; the "EE cold" column rebuilds the layout on every call (what a sampler
that changes the label pattern every batch would cost).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional

import torch
from pytorch_metric_learning import losses, miners, reducers

from pml_ext.functional import embedding_expansion as ee_functional
from pml_ext.losses import EmbeddingExpansionLoss, HPHNTripletLoss

from .memory import StepMemory, peak_bytes

LOSSES = {
    "TripletMarginLoss": lambda: losses.TripletMarginLoss(),
    "MultiSimilarityLoss": lambda: losses.MultiSimilarityLoss(),
    "LiftedStructureLoss": lambda: losses.LiftedStructureLoss(),
    "NPairsLoss": lambda: losses.NPairsLoss(),
    "ContrastiveLoss": lambda: losses.ContrastiveLoss(),
}


def batch(b: int, per_class: int, d: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g).to(device)
    y = torch.arange(b // per_class).repeat_interleave(per_class).to(device)
    return x, y


def step(fn, x, y):
    x = x.detach().requires_grad_(True)
    fn(x, y).backward()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def relabel(y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The same label pattern with fresh class ids, as the next training batch would have."""
    ids = torch.randperm(10_000, generator=generator)[: int(y.max()) + 1].to(y.device)
    return ids[y]


def cold(f):
    """f with EE's layout cache emptied before every call."""
    def call(e, l):
        ee_functional._LAYOUT_CACHE.clear()
        return f(e, l)
    return call


def time_interleaved(fns, x, y, repeats: int, device: str):
    """Median seconds of each function, interleaved on the same relabelled batches."""
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        for f in fns:
            step(f, x, y)
    times = [[] for _ in fns]
    for _ in range(repeats):
        yr = relabel(y, g)
        for f, acc in zip(fns, times):
            sync(device)
            t0 = time.perf_counter()
            step(f, x, yr)
            sync(device)
            acc.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def time_pair(fa, fb, x, y, repeats: int, device: str):
    return tuple(time_interleaved([fa, fb], x, y, repeats, device))


def peak_memory(f, x, y, device: str, memory: Optional[StepMemory]) -> Optional[int]:
    """Bytes of one forward+backward: the CUDA allocator's peak on GPU; on CPU the growth of the
    process's peak RSS (benchmarks/memory.py)."""
    return peak_bytes(lambda: step(f, x, y), device, memory)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--n-points", type=int, default=2)
    ap.add_argument("--pairs", default="all")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scaling", action="store_true", help="table over B in 64..512 and n in 0..8")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    if args.scaling:
        return scaling(args)
    x, y = batch(args.batch, args.per_class, args.dim, args.device)
    print(f"B={args.batch} ({args.batch // args.per_class} classes x {args.per_class}), d={args.dim}, "
          f"n={args.n_points}, pairs={args.pairs}; forward+backward, median of {args.repeats}")
    print(f"{'loss':<24}{'plain ms':>10}{'EE ms':>10}{'EE/plain':>10}{'EE cold ms':>12}{'cold/plain':>12}")
    for name, make in LOSSES.items():
        plain = make()
        ee = EmbeddingExpansionLoss(make(), n_points=args.n_points, pairs=args.pairs)
        if name == "MultiSimilarityLoss":  # the usual pairing: MS loss with its miner
            ms_miner = miners.MultiSimilarityMiner()
            fp = lambda e, l, p=plain, m=ms_miner: p(e, l, m(e, l))  # noqa: E731
            fe = lambda e, l, q=ee, m=ms_miner: q(e, l, m(e, l))  # noqa: E731
        else:
            fp, fe = plain, ee
        tp, te, tc = time_interleaved([fp, fe, cold(fe)], x, y, args.repeats, args.device)
        print(f"{name:<24}{tp * 1e3:>10.2f}{te * 1e3:>10.2f}{te / tp:>10.2f}{tc * 1e3:>12.2f}{tc / tp:>12.2f}")
    bh_miner = miners.BatchHardMiner()
    bh_loss = losses.TripletMarginLoss(margin=1e-5, reducer=reducers.MeanReducer())
    hphn = HPHNTripletLoss(n_points=args.n_points, pairs="adjacent")
    tp, te = time_pair(lambda e, l: bh_loss(e, l, bh_miner(e, l)), hphn, x, y, args.repeats, args.device)
    print(f"{'HPHN vs BatchHard+Trip':<24}{tp * 1e3:>10.2f}{te * 1e3:>10.2f}{te / tp:>10.2f}")


def scaling(args):
    """Time over B and n first, then (it changes how the process allocates) peak memory."""
    rows = []
    for name in ["MultiSimilarityLoss", "NPairsLoss"]:
        for b in (64, 128, 256, 512):
            x, y = batch(b, args.per_class, args.dim, args.device)
            for n in (0, 1, 2, 4, 8):
                plain = LOSSES[name]()
                ee = EmbeddingExpansionLoss(LOSSES[name](), n_points=n, pairs=args.pairs)
                tp, te = time_pair(plain, ee, x, y, max(3, args.repeats // 3), args.device)
                rows.append((name, b, n, plain, ee, x, y, tp, te))
    memory = None if args.device.startswith("cuda") else StepMemory()
    print(f"{'loss':<20}{'B':>5}{'n':>4}{'plain ms':>10}{'EE ms':>10}{'ratio':>7}"
          f"{'plain peak MB':>15}{'EE peak MB':>12}{'ratio':>7}")
    for name, b, n, plain, ee, x, y, tp, te in rows:
        mp = statistics.median(peak_memory(plain, x, y, args.device, memory) or 0 for _ in range(3))
        me = statistics.median(peak_memory(ee, x, y, args.device, memory) or 0 for _ in range(3))
        mem = f"{mp / 2**20:>15.2f}{me / 2**20:>12.2f}{me / mp if mp else float('nan'):>7.2f}"
        print(f"{name:<20}{b:>5}{n:>4}{tp * 1e3:>10.2f}{te * 1e3:>10.2f}{te / tp:>7.2f}{mem}")


if __name__ == "__main__":
    main()
