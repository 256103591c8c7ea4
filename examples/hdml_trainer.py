"""Train HDML with a PML trainer, a PML tester and PML's standard logging hooks.

What it shows
    ``pml_ext.trainers.HardnessAwareDeepMetricLearning`` used like PML's
    ``trainers.DeepAdversarialMetricLearning``, on the FontGlyphs subset shipped inside pml_ext
    (classes = fonts; 120 training fonts, 60 different test fonts):

    * models ``{"trunk", "embedder"}``: HDML's generator and softmax classifier are built by the
      trainer (pass ``models["generator"]`` / ``models["classifier"]`` for your own), each with
      its own Adam at the official learning rate (``trainer.optimizers``);
    * ``loss_funcs={"metric_loss": TripletMarginLoss}``, ``mining_funcs={"tuple_miner":
      semi-hard TripletMarginMiner}``, as in any PML trainer;
    * PML's ``HookContainer`` with record-keeper writes CSV files and a SQLite ``logs.db``:
      ``loss_histories`` holds J_metric, J_gen, J_cls, total_loss and J_m, J_syn, J_recon,
      J_soft, J_avg, J_gen_avg, metric_weight; ``hdml_HDMLLoss`` the same terms from the loss;
    * PML's ``GlobalEmbeddingSpaceTester`` evaluates the test fonts at the end of every epoch;
      the hooks save the models, optimisers and ``loss_funcs`` (HDML's running J_avg / J_gen)
      and the script resumes from them when run again with the same ``--out``.

How to run
    python examples/hdml_trainer.py              # 2 epochs x 150 iterations, about a minute on 1 CPU thread
    python examples/hdml_trainer.py --steps 3    # a smoke test: 1 epoch of 3 iterations

    record-keeper is needed (``pip install record-keeper``; tensorboard is not). Works from any
    directory if pml_ext is installed; from a source checkout it also runs without installing.
    Outputs in ``--out`` (default ``./example_outputs/hdml_trainer``): ``logs/`` (CSV + logs.db),
    ``models/`` (checkpoints) and ``hdml_trainer.json`` (the last test accuracies and losses).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Dict, Optional, Sequence

import numpy as np
import record_keeper
import torch
from pytorch_metric_learning import losses, miners, samplers, testers
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import logging_presets
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from torch import nn

try:
    import pml_ext  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pml_ext.data import FontGlyphs  # noqa: E402
from pml_ext.trainers import HardnessAwareDeepMetricLearning  # noqa: E402

SHOWN = ("J_m", "J_syn", "J_gen", "J_avg", "metric_weight")


def glyph_trunk(width: int = 32, features: int = 128) -> nn.Module:
    """A small CNN for 1x32x32 glyphs -> 128-d features (any backbone works)."""
    layers, cin = [], 1
    for cout in (width, 2 * width, 4 * width):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        cin = cout
    return nn.Sequential(*layers, nn.Conv2d(cin, features, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150, help="iterations per epoch (3 = smoke test, 1 epoch)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--embedding-size", type=int, default=64)
    ap.add_argument("--margin", type=float, default=0.1)
    # alpha sets the pull 1 - exp(-alpha / J_avg): the official 90 is for a SUMMED triplet loss,
    # PML's TripletMarginLoss is a MEAN (~0.05-0.3 here), hence 0.05 (README, HDML)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--block-size", type=int, default=32, help="J_avg / J_gen block average (official 64)")
    ap.add_argument("--lr", type=float, default=1e-3, help="trunk + embedder (from scratch; official 7e-5 is "
                                                           "for a pretrained GoogLeNet)")
    ap.add_argument("--log-freq", type=int, default=10, help="HookContainer: record every N iterations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join("example_outputs", "hdml_trainer"))
    args = ap.parse_args(argv)
    if args.steps <= 3:
        args.epochs = 1
    logging.getLogger("PML").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # MPerClassSampler draws from numpy's global RNG
    device = torch.device("cpu")

    train_set, test_set = FontGlyphs(split="train"), FontGlyphs(split="test")
    trunk = glyph_trunk()
    embedder = nn.Linear(128, args.embedding_size)  # a Linear: the trainer reads feature/embedding sizes from it
    optimizers = {"trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=args.lr),
                  "embedder_optimizer": torch.optim.Adam(embedder.parameters(), lr=args.lr)}
    # generator_optimizer / classifier_optimizer: Adam at the official 1e-2 / 1e-3, added by the trainer

    log_dir, model_dir = os.path.join(args.out, "logs"), os.path.join(args.out, "models")
    rk = record_keeper.RecordKeeper(record_writer=record_keeper.RecordWriter(log_dir),
                                    attributes_to_search_for=c_f.list_of_recordable_attributes_list_names())
    hooks = logging_presets.HookContainer(rk, primary_metric="precision_at_1", validation_split_name="val",
                                          log_freq=args.log_freq)
    tester = testers.GlobalEmbeddingSpaceTester(
        end_of_testing_hook=hooks.end_of_testing_hook, dataloader_num_workers=0, batch_size=256, data_device=device,
        accuracy_calculator=AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "NMI"),
                                               k="max_bin_count"))
    end_of_epoch_hook = hooks.end_of_epoch_hook(tester, {"val": test_set}, model_dir, test_interval=1)

    trainer = HardnessAwareDeepMetricLearning(
        models={"trunk": trunk, "embedder": embedder},
        optimizers=optimizers,
        batch_size=args.batch_size,
        loss_funcs={"metric_loss": losses.TripletMarginLoss(margin=args.margin)},
        mining_funcs={"tuple_miner": miners.TripletMarginMiner(margin=args.margin, type_of_triplets="semihard")},
        dataset=train_set,
        num_classes=train_set.num_classes,  # labels 0..119: HDML's softmax classifier
        alpha=args.alpha,
        hdml_options={"block_size": args.block_size},
        sampler=samplers.MPerClassSampler(train_set.labels, m=4, batch_size=args.batch_size,
                                          length_before_new_iter=len(train_set)),
        iterations_per_epoch=args.steps,
        dataloader_num_workers=0,
        data_device=device,
        end_of_iteration_hook=hooks.end_of_iteration_hook,
        end_of_epoch_hook=end_of_epoch_hook,
    )
    start_epoch = hooks.load_latest_saved_models(trainer, model_dir, device)  # 1 on a fresh --out
    print(f"HDML trainer: {len(train_set)} train images ({train_set.num_classes} fonts), {len(test_set)} test "
          f"images; optimisers {sorted(trainer.optimizers)}; epochs {start_epoch}..{args.epochs}")
    trainer.train(start_epoch, args.epochs)

    history = hooks.get_loss_history(SHOWN)
    accuracy = hooks.get_accuracy_history(tester, "val", return_all_metrics=True)
    last = {k: history[k][-1] for k in SHOWN} if history else {}
    metrics = {k: v[-1] for k, v in accuracy.items() if k.endswith("_level0")}
    print("last logged: " + "  ".join(f"{k}={v:.4g}" for k, v in last.items()))
    print("test fonts: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "hdml_trainer.json"), "w") as f:
        json.dump({"epochs": args.epochs, "steps": args.steps, "alpha": args.alpha, "metrics": metrics,
                   "last_losses": last}, f, indent=2)
    print(f"logs in {log_dir} (CSV + logs.db), checkpoints in {model_dir}")
    return metrics


if __name__ == "__main__":
    main()
