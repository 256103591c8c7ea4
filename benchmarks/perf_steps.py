"""Training-step cost of EE and HDML vs the plain PML step, side by side on FontGlyphs.

    python -m benchmarks.perf_steps                          # fontglyphs_cpu, every loss
    python -m benchmarks.perf_steps --losses triplet npair --repeats 30

One process builds every method of a loss from the same seed (same initial weights) and runs
them in turn on the same batches (an MPerClassSampler batch, as in the benchmark), rotating the
order every repeat. A step is the whole optimisation step: CNN forward, head, miner, loss,
backward, Adam. Reported: the median step time and the median peak memory of a step (the
growth of the process's peak RSS over the RSS before the step, with the peak reset through
/proc/self/clear_refs and freed memory returned with malloc_trim first; Linux only, otherwise
omitted), each with its ratio to the plain step measured in the same run.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import statistics
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from pytorch_metric_learning import samplers

from . import harness
from .run import load_config

METHODS_OF = {
    "triplet": ["plain", "ee", "hdml"],
    "npair": ["plain", "ee", "hdml"],
    "ms": ["plain", "ee"],
    "lifted": ["plain", "ee"],
    "hphn": ["plain", "ee"],
}


class StepMemory:
    """Peak RSS growth of one call, in bytes (None where /proc/self/clear_refs is unavailable)."""

    def __init__(self):
        libc_name = ctypes.util.find_library("c")
        self._libc = ctypes.CDLL(libc_name) if libc_name else None
        self.available = self._reset_peak()

    def _reset_peak(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            return True
        except OSError:
            return False

    @staticmethod
    def _status_kb(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def measure(self, fn) -> Tuple[float, Optional[int]]:
        """(seconds of fn alone, peak RSS growth in bytes or None)."""
        if self.available:
            if self._libc is not None and hasattr(self._libc, "malloc_trim"):
                self._libc.malloc_trim(0)
            self._reset_peak()
            before = self._status_kb("VmRSS")
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        return seconds, (self._status_kb("VmHWM") - before) * 1024 if self.available else None


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="fontglyphs_cpu")
    ap.add_argument("--losses", nargs="+", default=list(METHODS_OF), choices=list(METHODS_OF))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    tcfg = cfg["train"]
    train_src, _ = harness.sources(cfg, "test")
    _, tr_y = np.unique(train_src.labels, return_inverse=True)
    train_src.labels = tr_y
    num_classes = int(tr_y.max()) + 1
    memory = StepMemory()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}; config "
          f"{cfg['name']}: batch {tcfg['batch_size']} = {tcfg['batch_size'] // tcfg['per_class']} classes x "
          f"{tcfg['per_class']}, model {cfg['model']['name']}, embedding {cfg['model']['embedding_size']}; "
          f"median of {args.repeats} steps")
    print(f"{'loss':<9}{'method':<8}{'step ms':>9}{'/ plain':>9}{'peak MB':>10}{'/ plain':>9}")
    for loss_name in args.losses:
        hp = dict(cfg.get("defaults", {}).get(loss_name, {}))
        runners = {}
        for method in METHODS_OF[loss_name]:
            torch.manual_seed(0)
            runners[method] = harness.build_training(cfg, method, loss_name, hp, num_classes, args.device)
        sampler = samplers.MPerClassSampler(tr_y, m=tcfg["per_class"], batch_size=tcfg["batch_size"],
                                            length_before_new_iter=(args.repeats + args.warmup) * tcfg["batch_size"])
        order = np.asarray(list(iter(sampler)))
        gen = torch.Generator().manual_seed(0)
        times: Dict[str, list] = {m: [] for m in runners}
        peaks: Dict[str, list] = {m: [] for m in runners}
        methods = list(runners)
        for r in range(args.repeats + args.warmup):
            idx = order[r * tcfg["batch_size"]:(r + 1) * tcfg["batch_size"]]
            x, y = next(train_src.batches([idx], gen, train=True))
            x, y = x.to(args.device), torch.as_tensor(y).to(args.device)
            for method in methods[r % len(methods):] + methods[:r % len(methods)]:
                run = runners[method]

                def step():
                    harness.train_step(*run, x, y)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()

                seconds, peak = memory.measure(step)
                if r >= args.warmup:
                    times[method].append(seconds)
                    peaks[method].append(peak)
        t_plain = statistics.median(times["plain"])
        m_plain = statistics.median(peaks["plain"]) if memory.available else None
        for method in methods:
            t = statistics.median(times[method])
            mem = ""
            if memory.available:
                m = statistics.median(peaks[method])
                mem = f"{m / 2**20:>10.1f}{m / m_plain:>9.2f}" if m_plain else f"{m / 2**20:>10.1f}{'-':>9}"
            print(f"{loss_name:<9}{method:<8}{t * 1e3:>9.1f}{t / t_plain:>9.2f}{mem}")


if __name__ == "__main__":
    main()
