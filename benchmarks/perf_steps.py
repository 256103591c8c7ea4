"""Training-step cost of EE and HDML vs the plain PML step, side by side on FontGlyphs.

    python -m benchmarks.perf_steps                          # fontglyphs_cpu, every loss
    python -m benchmarks.perf_steps --losses triplet npair --repeats 30
    python -m benchmarks.perf_steps --losses triplet npair --hdml-caps 0 128 512   # HDML's tuple cap
    python -m benchmarks.perf_steps --sampler random          # shuffled batches instead of MPerClassSampler

``--hdml-caps`` adds one HDML method per value of ``max_synthetic_tuples`` (0 = no cap), built
from the same seed and interleaved with the others in the same run.

One process builds every method of a loss from the same seed (same initial weights) and runs
them in turn on the same batches (an MPerClassSampler batch, as in the benchmark), rotating the
order every repeat. A step is the whole optimisation step: CNN forward, head, miner, loss,
backward, Adam. The first --warmup batches train every model untimed (HDML's triplet cost
follows the number of mined triplets, which falls fast in the first steps). Reported: the
median and mean step time, and, measured after all timing, the median peak memory of a step
(CUDA: the allocator's peak; CPU: the growth of the process's peak RSS, benchmarks/memory.py),
each with its ratio to the plain step measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Dict, List, Optional

import numpy as np
import torch
from pytorch_metric_learning import samplers

from . import harness
from .memory import StepMemory, peak_bytes
from .perf_ee import sync
from .run import load_config

METHODS_OF = {
    "triplet": ["plain", "ee", "hdml"],
    "npair": ["plain", "ee", "hdml"],
    "ms": ["plain", "ee"],
    "lifted": ["plain", "ee"],
    "hphn": ["plain", "ee"],
}


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="fontglyphs_cpu")
    ap.add_argument("--losses", nargs="+", default=list(METHODS_OF), choices=list(METHODS_OF))
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=20, help="untimed training steps first")
    ap.add_argument("--memory-repeats", type=int, default=15, help="steps per method for the peak memory")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hp", default=None,
                    help='JSON merged into every method\'s hyper-parameters, e.g. \'{"hdml": {"alpha": 0.05, '
                         '"max_synthetic_tuples": 256}}\'')
    ap.add_argument("--hdml-caps", type=int, nargs="+", default=None,
                    help="also time HDML with these max_synthetic_tuples values (0 = no cap), side by side")
    ap.add_argument("--sampler", choices=["m_per_class", "random"], default="m_per_class",
                    help="m_per_class: the benchmark's MPerClassSampler batches; random: uniformly shuffled "
                         "batches, as a DataLoader with shuffle=True gives (unequal classes, a new label "
                         "pattern every step)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    tcfg = cfg["train"]
    train_src, _ = harness.sources(cfg, "test")
    _, tr_y = np.unique(train_src.labels, return_inverse=True)
    train_src.labels = tr_y
    num_classes = int(tr_y.max()) + 1
    composition = (f"{tcfg['batch_size'] // tcfg['per_class']} classes x {tcfg['per_class']}"
                   if args.sampler == "m_per_class" else "shuffled")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}; config "
          f"{cfg['name']}: batch {tcfg['batch_size']} = {composition}, model {cfg['model']['name']}, "
          f"embedding {cfg['model']['embedding_size']}; median of {args.repeats} steps; sampler {args.sampler}")
    print(f"{'loss':<9}{'method':<12}{'median ms':>9}{'/ plain':>9}{'mean ms':>10}{'/ plain':>9}"
          f"{'peak MB':>10}{'/ plain':>9}")
    results = {}
    for loss_name in args.losses:
        hp = dict(cfg.get("defaults", {}).get(loss_name, {}), **(json.loads(args.hp) if args.hp else {}))
        runners = {}
        for method in METHODS_OF[loss_name]:
            torch.manual_seed(0)
            runners[method] = harness.build_training(cfg, method, loss_name, hp, num_classes, args.device)
        if "hdml" in runners:
            for cap in args.hdml_caps or []:
                capped = dict(hp, hdml=dict(hp.get("hdml", {}), max_synthetic_tuples=cap or None))
                torch.manual_seed(0)
                runners[f"hdml{cap or '_nocap'}"] = harness.build_training(cfg, "hdml", loss_name, capped,
                                                                           num_classes, args.device)
        steps = args.repeats + args.warmup
        if args.sampler == "random":
            g = torch.Generator().manual_seed(0)
            order = torch.cat([torch.randperm(len(tr_y), generator=g)
                               for _ in range(-(-steps * tcfg["batch_size"] // len(tr_y)))]).numpy()
        else:
            sampler = samplers.MPerClassSampler(tr_y, m=tcfg["per_class"], batch_size=tcfg["batch_size"],
                                                length_before_new_iter=steps * tcfg["batch_size"])
            order = np.asarray(list(iter(sampler)))
        gen = torch.Generator().manual_seed(0)
        batches = []
        for r in range(args.repeats + args.warmup):
            idx = order[r * tcfg["batch_size"]:(r + 1) * tcfg["batch_size"]]
            x, y = next(train_src.batches([idx], gen, train=True))
            batches.append((x.to(args.device), torch.as_tensor(y).to(args.device)))
        methods = list(runners)
        times: Dict[str, list] = {m: [] for m in runners}
        for r, (x, y) in enumerate(batches):
            for method in methods[r % len(methods):] + methods[:r % len(methods)]:
                sync(args.device)
                t0 = time.perf_counter()
                harness.train_step(*runners[method], x, y)
                sync(args.device)
                if r >= args.warmup:
                    times[method].append(time.perf_counter() - t0)
        results[loss_name] = (methods, times, runners, batches[-args.memory_repeats:])
    # memory last: measuring it changes how the process allocates (benchmarks/memory.py)
    memory = None if args.device.startswith("cuda") else StepMemory()
    for loss_name, (methods, times, runners, batches) in results.items():
        peaks: Dict[str, list] = {m: [] for m in methods}
        for r, (x, y) in enumerate(batches):
            for method in methods[r % len(methods):] + methods[:r % len(methods)]:
                run = runners[method]
                peaks[method].append(peak_bytes(lambda: harness.train_step(*run, x, y), args.device, memory))
        t_plain = statistics.median(times["plain"])
        m_plain = statistics.median(peaks["plain"]) if None not in peaks["plain"] else None
        for method in methods:
            t = statistics.median(times[method])
            mean = statistics.fmean(times[method])
            mem = ""
            if m_plain:
                m = statistics.median(peaks[method])
                mem = f"{m / 2**20:>10.1f}{m / m_plain:>9.2f}"
            print(f"{loss_name:<9}{method:<12}{t * 1e3:>9.1f}{t / t_plain:>9.2f}"
                  f"{mean * 1e3:>10.1f}{mean / statistics.fmean(times['plain']):>9.2f}{mem}")


if __name__ == "__main__":
    main()
