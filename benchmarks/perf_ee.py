"""Side-by-side cost of Embedding Expansion vs the plain PML loss on the same batch.

    python -m benchmarks.perf_ee                      # every batch composition, B=128, d=512, n=2
    python -m benchmarks.perf_ee --compositions 32x4 zipf60
    python -m benchmarks.perf_ee --scaling            # time/memory over B and n (32 classes x 4 ...)
    python -m benchmarks.perf_ee --paths              # EE's searches side by side, and the choice
    python -m benchmarks.perf_ee --compiled off       # the row search with tensor operations (no numba kernel)

Every ratio is measured in one run, alternating our call and PML's on the same batch (order
rotated every repeat). Batch compositions (B = 128):

- ``32x4``, ``16x8``, ``64x2``: balanced, as PML's MPerClassSampler builds them; every repeat
  relabels the batch with fresh class ids (same label pattern), so EE's per-pattern layout cache
  is hit as it is in training. The "EE cold" column rebuilds the layout on every call.
- ``32x4-shuffled``: a balanced batch in a new random order every repeat (a new label pattern).
- ``random40``, ``random100``: labels drawn uniformly from 40 / 100 classes every repeat.
- ``zipf60``: labels drawn from a Zipf law over 60 classes (p ∝ 1/rank) every repeat, as a
  random batch from a long-tailed data set gives.

The last four draw a fresh label pattern every repeat: the layout is built on every call.
Peak memory (after all timing, benchmarks/memory.py) is the median of 7 calls on one batch of
each composition, plain and EE alternated (RSS growth varies by a few hundred kB from call to
call). For the fresh compositions EE's layout cache is emptied before each measured call, outside
the measurement, so the call pays for building and keeping its layout. (Until 2026-12-02 it was
emptied inside the measured call: freeing the previous layout offset the new one's memory, which
understated EE's peak on fresh patterns, most for Triplet and Contrastive, whose per-pattern tuple
lists were kept then.)
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


def _balanced(per_class: int):
    def labels(b: int, g: torch.Generator, previous: Optional[torch.Tensor]) -> torch.Tensor:
        return relabel(torch.arange(b // per_class).repeat_interleave(per_class), g)
    return labels


def _shuffled(per_class: int):
    def labels(b: int, g: torch.Generator, previous: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.arange(b // per_class).repeat_interleave(per_class)[torch.randperm(b, generator=g)]
    return labels


def _uniform(classes: int):
    def labels(b: int, g: torch.Generator, previous: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.randint(0, classes, (b,), generator=g)
    return labels


def _zipf(classes: int):
    def labels(b: int, g: torch.Generator, previous: Optional[torch.Tensor]) -> torch.Tensor:
        p = 1 / torch.arange(1, classes + 1, dtype=torch.float64)
        return torch.multinomial(p, b, replacement=True, generator=g)
    return labels


# name -> labels(b, generator, previous labels or None): the next batch's labels
COMPOSITIONS = {
    "32x4": _balanced(4),
    "16x8": _balanced(8),
    "64x2": _balanced(2),
    "32x4-shuffled": _shuffled(4),
    "random40": _uniform(40),
    "random100": _uniform(100),
    "zipf60": _zipf(60),
}


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


CLOCK = time.perf_counter  # --clock cpu: time.thread_time (single-threaded runs on a shared machine)


def time_interleaved(fns, x, y, repeats: int, device: str, labels=None):
    """Median seconds of each function, interleaved (order rotated) on the same batches; the
    labels of every repeat come from ``labels(b, generator, previous)`` (default: ``y``
    relabelled with fresh class ids)."""
    g = torch.Generator().manual_seed(1)
    if labels is None:
        labels = lambda b, gen, prev: relabel(y if prev is None else prev, gen)  # noqa: E731
    for _ in range(2):
        for f in fns:
            step(f, x, y)
    times = [[] for _ in fns]
    yr = None
    for r in range(repeats):
        yr = labels(x.shape[0], g, yr).to(y.device)
        turn = list(range(len(fns)))
        for i in turn[r % len(fns):] + turn[:r % len(fns)]:
            sync(device)
            t0 = CLOCK()
            step(fns[i], x, yr)
            sync(device)
            times[i].append(CLOCK() - t0)
    return [statistics.median(t) for t in times]


def time_pair(fa, fb, x, y, repeats: int, device: str):
    return tuple(time_interleaved([fa, fb], x, y, repeats, device))


def peak_memory(f, x, y, device: str, memory: Optional[StepMemory], fresh: bool = False) -> Optional[int]:
    """Bytes of one forward+backward: the CUDA allocator's peak on GPU; on CPU the growth of the
    process's peak RSS (benchmarks/memory.py). ``fresh``: EE's layout cache is emptied first,
    outside the measurement, so that the call builds its layout and what the cache frees does not
    offset what the call allocates (and keeps)."""
    if fresh:
        ee_functional._LAYOUT_CACHE.clear()
    return peak_bytes(lambda: step(f, x, y), device, memory)


def median_peaks(fp, fe, x, y, device: str, memory: Optional[StepMemory], fresh: bool = False):
    """Median peak memory of the plain and the EE call, measured alternately MEMORY_REPEATS times."""
    peaks = [(peak_memory(fp, x, y, device, memory) or 0, peak_memory(fe, x, y, device, memory, fresh) or 0)
             for _ in range(MEMORY_REPEATS)]
    return tuple(statistics.median(v) for v in zip(*peaks))


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
    ap.add_argument("--paths", action="store_true",
                    help="time the three EE searches (blocked, grouped, rows; forward + backward) per composition and "
                         "n/pairs, with the cost model's choice")
    ap.add_argument("--compositions", nargs="+", choices=list(COMPOSITIONS), help="default: all")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--compiled", choices=["auto", "off"], default="auto",
                    help="off: EE's row search with tensor operations even where its numba kernel can run")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: the calling thread's CPU time, with one thread (robust to other processes "
                         "on a shared CPU machine; not for CUDA)")
    args = ap.parse_args(argv)
    global CLOCK
    if args.clock == "cpu":
        if args.device.startswith("cuda"):
            ap.error("--clock cpu measures CPU time; use the wall clock on CUDA")
        args.threads = 1
        CLOCK = time.thread_time
    if args.threads:
        torch.set_num_threads(args.threads)
    from pml_ext.functional import compiled as compiled_switch

    compiled_switch._COMPILED = args.compiled
    kernel = "compiled (numba)" if compiled_switch.compiled_available() else "tensor operations"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"clock {args.clock}, row search: {kernel}")
    if args.scaling:
        return scaling(args)
    if args.paths:
        return search_paths(args)
    names = args.compositions or list(COMPOSITIONS)
    x, _ = batch(args.batch, args.per_class, args.dim, args.device)
    print(f"B={args.batch}, d={args.dim}, n={args.n_points}, pairs={args.pairs}; forward+backward, median of "
          f"{args.repeats} interleaved repeats; 'fresh' = a new label pattern every repeat")
    print(f"{'composition':<15}{'loss':<24}{'plain ms':>10}{'EE ms':>10}{'EE/plain':>10}{'EE cold ms':>12}"
          f"{'cold/plain':>12}")
    cells = []
    for comp in names:
        labels = COMPOSITIONS[comp]
        y = labels(args.batch, torch.Generator().manual_seed(0), None).to(args.device)
        fresh = comp not in BALANCED
        for name, fp, fe in _callables(args):
            fns = [fp, fe] if fresh else [fp, fe, cold(fe)]
            t = time_interleaved(fns, x, y, args.repeats, args.device, labels)
            tp, te = t[0], t[1]
            cold_cols = f"{'(fresh)':>12}{'':>12}" if fresh else f"{t[2] * 1e3:>12.2f}{t[2] / tp:>12.2f}"
            print(f"{comp:<15}{name:<24}{tp * 1e3:>10.2f}{te * 1e3:>10.2f}{te / tp:>10.2f}{cold_cols}", flush=True)
            cells.append((comp, name, fp, fe, y, fresh))
    # memory last: measuring it changes how the process allocates (benchmarks/memory.py)
    memory = None if args.device.startswith("cuda") else StepMemory()
    print(f"\npeak memory of one call, median of {MEMORY_REPEATS} (MB)")
    print(f"{'composition':<15}{'loss':<24}{'plain MB':>10}{'EE MB':>10}{'EE/plain':>10}")
    for comp, name, fp, fe, y, fresh in cells:
        mp, me = median_peaks(fp, fe, x, y, args.device, memory, fresh)
        print(f"{comp:<15}{name:<24}{mp / 2**20:>10.2f}{me / 2**20:>10.2f}"
              f"{me / mp if mp else float('nan'):>10.2f}", flush=True)


BALANCED = ("32x4", "16x8", "64x2")
MEMORY_REPEATS = 7


def _callables(args):
    """(name, plain call, EE call) for every loss, then HPHN vs BatchHard + Triplet."""
    for name, make in LOSSES.items():
        plain = make()
        ee = EmbeddingExpansionLoss(make(), n_points=args.n_points, pairs=args.pairs)
        if name == "MultiSimilarityLoss":  # the usual pairing: MS loss with its miner
            ms_miner = miners.MultiSimilarityMiner()
            yield (name + "+miner", lambda e, l, p=plain, m=ms_miner: p(e, l, m(e, l)),
                   lambda e, l, q=ee, m=ms_miner: q(e, l, m(e, l)))
        else:
            yield name, plain, ee
    bh_miner = miners.BatchHardMiner()
    bh_loss = losses.TripletMarginLoss(margin=1e-5, reducer=reducers.MeanReducer())
    yield ("HPHN vs BatchHard+Trip", lambda e, l: bh_loss(e, l, bh_miner(e, l)),
           HPHNTripletLoss(n_points=args.n_points, pairs="adjacent"))


def search_paths(args):
    """EE's searches side by side per composition (the search alone: Gram matrix, search,
    selected values, backward; LpDistance): blocked, grouped, rows with tensor operations, rows by
    the compiled kernel (where numba is installed); and which one the cost model picks. For the
    compositions that draw a new label pattern every step, every call also builds the search's
    per-pattern structures, as training pays them there."""
    from pytorch_metric_learning import distances

    from pml_ext.functional import compiled as compiled_switch
    from pml_ext.functional import embedding_expansion_groups as groups
    from pml_ext.functional import embedding_expansion_rows as rows

    dist = distances.LpDistance()
    x, _ = batch(args.batch, args.per_class, args.dim, args.device)
    print(f"{'composition':<15}{'n':>3} {'pairs':<9}{'M':>6}{'blocked entries':>16}{'grouped entries':>16}"
          f"{'row entries':>12}{'blocked ms':>11}{'grouped ms':>11}{'rows ms':>9}{'compiled ms':>12}  choice")

    def search(layout, fresh):
        def call(e, l):
            lay = ee_functional.BatchLayout(layout.classes, layout.num_classes, layout.expanded) if fresh else layout
            return ee_functional.hardest_negative_pairs_in_layout(e, lay, dist, True).hardest.sum()
        return call

    for comp in args.compositions or list(COMPOSITIONS):
        y = COMPOSITIONS[comp](args.batch, torch.Generator().manual_seed(0), None).to(args.device)
        for n, pairs in ((2, "all"), (2, "adjacent"), (4, "all"), (8, "all")):
            layout = ee_functional.batch_layout(y, n, pairs)
            sizes = layout.class_sizes
            c, kk, k = layout.num_classes, int(sizes.max()), int(torch.bincount(layout.classes).max())
            blocked_entries = (c * kk) * (c * kk + c * k)
            times = []
            mode, compiled = compiled_switch._COMPILED, compiled_switch.compiled_available()
            for path in ("blocked", "groups", "rows", "rows-compiled"):
                if (path == "blocked" and blocked_entries > 3e8) or (path == "rows-compiled" and not compiled):
                    times.append(float("nan"))  # minutes per call; no numba
                    continue
                ee_functional._SEARCH = "rows" if path == "rows-compiled" else path
                compiled_switch._COMPILED = "auto" if path == "rows-compiled" else "off"
                try:
                    times.append(time_interleaved([search(layout, comp not in BALANCED)], x, y,
                                                  max(3, args.repeats // 2), args.device)[0])
                finally:
                    ee_functional._SEARCH = "auto"
                    compiled_switch._COMPILED = mode
            choice = ee_functional.search_path(layout)
            print(f"{comp:<15}{n:>3} {pairs:<9}{int(sizes.sum()):>6}{blocked_entries:>16}"
                  f"{groups.class_groups(layout).entries():>16}{rows.row_entries(layout):>12}"
                  f"{times[0] * 1e3:>11.2f}{times[1] * 1e3:>11.2f}{times[2] * 1e3:>9.2f}{times[3] * 1e3:>12.2f}"
                  f"  {choice}", flush=True)


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
        mp, me = median_peaks(plain, ee, x, y, args.device, memory)
        mem = f"{mp / 2**20:>15.2f}{me / 2**20:>12.2f}{me / mp if mp else float('nan'):>7.2f}"
        print(f"{name:<20}{b:>5}{n:>4}{tp * 1e3:>10.2f}{te * 1e3:>10.2f}{te / tp:>7.2f}{mem}")


if __name__ == "__main__":
    main()
