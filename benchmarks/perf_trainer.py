"""Step time of the HDML trainer vs PML's plain MetricLossOnly, side by side on FontGlyphs.

    python -m benchmarks.perf_trainer                       # triplet + semi-hard miner, default cap
    python -m benchmarks.perf_trainer --caps 0 128 --repeats 30

Both trainers are PML trainers built from the same seed (same trunk and embedder weights) on
the same in-memory dataset and the same MPerClassSampler batches (``fontglyphs_cpu``: batch 128 =
32 fonts x 4, glyph CNN, 128-d), with ``TripletMarginLoss`` and PML's semi-hard
``TripletMarginMiner`` (HDML: the same loss and miner as ``loss_funcs["metric_loss"]`` and
``mining_funcs["tuple_miner"]``). A step is ``trainer.forward_and_backward()``: batch fetch,
trunk, embedder, miner, loss, backward, every optimiser (Adam). The trainers take turns step by
step, the order rotating every repeat, after --warmup untimed steps each.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import List, Optional

import numpy as np
import torch
from pytorch_metric_learning import losses, miners, samplers, trainers

from pml_ext.trainers import HardnessAwareDeepMetricLearning

from . import harness
from .models import build_model
from .run import load_config


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="fontglyphs_cpu")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--caps", type=int, nargs="*", default=[],
                    help="also time the HDML trainer with these max_synthetic_tuples (0 = no cap)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    tcfg, mcfg = cfg["train"], cfg["model"]
    train_src, _ = harness.sources(cfg, "test")
    _, labels = np.unique(train_src.labels, return_inverse=True)
    dataset = torch.utils.data.TensorDataset(train_src.images, torch.as_tensor(labels))
    margin = cfg.get("defaults", {}).get("triplet", {}).get("margin", 0.1)
    alpha = cfg.get("defaults", {}).get("triplet", {}).get("hdml", {}).get("alpha", 0.05)
    steps = args.warmup + args.repeats

    np.random.seed(0)  # MPerClassSampler draws from numpy's global RNG; one order, used by every trainer
    order = list(iter(samplers.MPerClassSampler(labels, m=tcfg["per_class"], batch_size=tcfg["batch_size"],
                                                length_before_new_iter=steps * tcfg["batch_size"])))

    def common():
        return dict(batch_size=tcfg["batch_size"], dataset=dataset, sampler=order, dataloader_num_workers=0,
                    data_device=torch.device("cpu"),
                    loss_funcs={"metric_loss": losses.TripletMarginLoss(margin=margin)},
                    mining_funcs={"tuple_miner": miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard")})

    def models(seed=0):
        torch.manual_seed(seed)
        return build_model(mcfg["name"], mcfg["embedding_size"], mcfg.get("weights"))

    built = {}
    trunk, head, fsize = models()
    opts = {k: torch.optim.Adam(m.parameters(), lr=tcfg["lr"]) for k, m in (("trunk", trunk), ("embedder", head))}
    built["plain"] = trainers.MetricLossOnly(models={"trunk": trunk, "embedder": head},
                                             optimizers={f"{k}_optimizer": o for k, o in opts.items()},
                                             **common())
    for cap in [None] + list(args.caps):
        trunk, head, fsize = models()
        opts = {f"{k}_optimizer": torch.optim.Adam(m.parameters(), lr=tcfg["lr"])
                for k, m in (("trunk", trunk), ("embedder", head))}
        kw = {} if cap is None else {"max_synthetic_tuples": cap or None}
        name = "hdml" if cap is None else f"hdml_cap{cap or '_none'}"
        built[name] = HardnessAwareDeepMetricLearning(
            models={"trunk": trunk, "embedder": head}, optimizers=opts, feature_size=fsize,
            embedding_size=mcfg["embedding_size"], num_classes=int(labels.max()) + 1, alpha=alpha, **kw,
            **common())
    for t in built.values():
        t.initialize_dataloader()
        t.epoch, t.iteration = 1, 0
        t.set_to_train()
    names = list(built)
    times = {n: [] for n in names}
    for r in range(steps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            built[n].forward_and_backward()
            if r >= args.warmup:
                times[n].append(time.perf_counter() - t0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; config {cfg['name']}: batch "
          f"{tcfg['batch_size']}, TripletMarginLoss + semi-hard TripletMarginMiner; median of {args.repeats} steps "
          f"after {args.warmup} warm-up steps")
    print(f"{'trainer':<16}{'median ms':>10}{'/ plain':>9}{'mean ms':>10}{'/ plain':>9}{'synthetic':>11}")
    base_med, base_mean = statistics.median(times["plain"]), statistics.fmean(times["plain"])
    for n in names:
        med, mean = statistics.median(times[n]), statistics.fmean(times[n])
        hd = built[n].loss_funcs.get("hdml")
        syn = f"{hd.num_synthetic_tuples:>11}" if hd is not None else f"{'':>11}"
        label = "MetricLossOnly" if n == "plain" else n
        print(f"{label:<16}{med * 1e3:>10.1f}{med / base_med:>9.2f}{mean * 1e3:>10.1f}{mean / base_mean:>9.2f}{syn}")


if __name__ == "__main__":
    main()
