"""Where EE's row search stops paying against the grouped one: the cost model's threshold.

    python -m benchmarks.perf_search_crossover --composition zipf60 --n-points 2 --entries 800000 1200000

Draws label patterns of a composition (benchmarks.perf_ee's) until it has ``--patterns`` whose row
search has a number of stage-1 entries (R·M) in the given range, then times MS + miner (forward +
backward, one thread, the calling thread's CPU time) with each search forced, the two in random
order on each pattern and the layout rebuilt every call, as a new label pattern does. Prints the
median times and on how many patterns the row search was faster. The row search runs with tensor
operations (its numba kernel switched off): ``pml_ext.functional.embedding_expansion_rows._ROWS_MAX_ENTRIES``,
the threshold of that search, cites what this measured. (The compiled search's threshold comes from
``python -m benchmarks.perf_ee --paths``.)
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from pytorch_metric_learning import losses, miners

from pml_ext import functional as F
from pml_ext.functional import embedding_expansion as ee_functional
from pml_ext.losses import EmbeddingExpansionLoss

from .perf_ee import COMPOSITIONS

SEARCHES = ("rows", "groups")


def patterns_in_range(composition: str, n_points: int, lo: int, hi: int, count: int, batch: int, seed: int):
    """``count`` label patterns whose row search has lo < R·M <= hi entries, and their entry counts."""
    g = torch.Generator().manual_seed(seed)
    found = []
    for _ in range(200 * count):
        y = COMPOSITIONS[composition](batch, g, None)
        entries = F.row_entries(F.batch_layout(y, n_points, "all", torch.float32))
        if lo < entries <= hi:
            found.append((y, entries))
            if len(found) == count:
                return found
    raise SystemExit(f"found {len(found)} of {count} {composition} patterns with {lo} < R·M <= {hi}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--composition", default="zipf60", choices=list(COMPOSITIONS))
    ap.add_argument("--n-points", type=int, default=2)
    ap.add_argument("--entries", type=int, nargs=2, default=[800_000, 2_000_000], metavar=("LO", "HI"))
    ap.add_argument("--patterns", type=int, default=40)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(0)
    found = patterns_in_range(args.composition, args.n_points, *args.entries, args.patterns, args.batch, args.seed)
    x = torch.randn(args.batch, args.dim, generator=torch.Generator().manual_seed(args.seed))
    loss = EmbeddingExpansionLoss(losses.MultiSimilarityLoss(), n_points=args.n_points)
    miner = miners.MultiSimilarityMiner()
    times = {s: [] for s in SEARCHES}
    from pml_ext.functional import compiled as compiled_switch

    compiled, compiled_switch._COMPILED = compiled_switch._COMPILED, "off"
    try:
        for y, _ in found:
            for search in rng.sample(SEARCHES, len(SEARCHES)):
                ee_functional._SEARCH = search
                ee_functional._LAYOUT_CACHE.clear()
                e = x.detach().requires_grad_(True)
                tuples = miner(e, y)
                t0 = time.thread_time()
                loss(e, y, tuples).backward()
                times[search].append(time.thread_time() - t0)
    finally:
        ee_functional._SEARCH, compiled_switch._COMPILED = "auto", compiled
    entries = [e for _, e in found]
    faster = sum(r < g for r, g in zip(times["rows"], times["groups"]))
    print(f"{args.composition} n={args.n_points}: {len(found)} patterns, R·M {min(entries)}-{max(entries)}; MS + miner "
          f"median ms: rows {statistics.median(times['rows']) * 1e3:.2f}, grouped "
          f"{statistics.median(times['groups']) * 1e3:.2f}; rows faster on {faster} of {len(found)}")


if __name__ == "__main__":
    main()
