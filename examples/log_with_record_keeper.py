"""Log losses, mining statistics and EE's selection ratio with record-keeper, then plot them.

What it shows
    PML's usual logging tool, `record-keeper <https://github.com/KevinMusgrave/record-keeper>`_,
    on a PML loop with ``EmbeddingExpansionLoss(MultiSimilarityLoss(), collect_stats=True)`` and
    ``MultiSimilarityMiner(collect_stats=True)`` on the FontGlyphs subset shipped in pml_ext.

    * PML only records *statistics* (``_record_these_stats``: mined pair counts, EE's
      ``num_synthetic`` / ``num_class_pairs`` / ``synthetic_selection_ratio``) on objects built
      with ``collect_stats=True`` (or with ``pytorch_metric_learning.utils.common_functions
      .COLLECT_STATS = True``); without it they stay 0.
    * ``EmbeddingExpansionLoss`` records EE's statistics on itself, once (its internal EE miner
      is not a submodule): passing the loss is enough.
      ``synthetic_selection_ratio`` is the share of class pairs whose hardest negative pair
      involves a synthetic point (EE paper, Fig. 5).
    * the loss value itself is not an attribute of a PML loss: it is logged as a plain number
      in a dict, ``{"train": {"total_loss": loss.item()}}``.

    record-keeper appends one CSV per group to its folder (plus a SQLite ``logs.db``) at every
    ``save_records()``; at the end this script reads those CSV files back and plots the loss,
    the selection ratio and the miner's pair counts over the iterations.

How to run
    python examples/log_with_record_keeper.py             # 300 steps, ~35 s on one CPU thread
    python examples/log_with_record_keeper.py --steps 3   # a smoke test (seconds)

    Works from any directory if pml_ext is installed (``pip install -e .``); from a source
    checkout it also runs without installing. Outputs in ``--out`` (default
    ``./example_outputs``): ``record_keeper_logs/*.csv`` and ``record_keeper_curves.png``.
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import shutil
import sys
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import record_keeper  # noqa: E402
import torch  # noqa: E402
from pytorch_metric_learning import losses, miners, samplers  # noqa: E402
from pytorch_metric_learning.utils import common_functions as c_f  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

try:
    import pml_ext  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pml_ext.data import FontGlyphs  # noqa: E402
from pml_ext.losses import EmbeddingExpansionLoss  # noqa: E402


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


def read_records(folder: str) -> Dict[str, Dict[str, np.ndarray]]:
    """Every ``<group>.csv`` that record-keeper wrote: {group: {series: values}}, plus the
    ``"~iteration~"`` series. record-keeper appends a block per ``save_records()`` and repeats
    the header (first cell ``~iteration~``) only when the columns change."""
    out: Dict[str, Dict[str, np.ndarray]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.csv"))):
        columns: Dict[str, List[float]] = {}
        header: List[str] = []
        with open(path, newline="") as f:
            for row in csv.reader(f):
                if not row:
                    continue
                if row[0] == "~iteration~":
                    header = row
                    continue
                for name, value in zip(header, row):
                    columns.setdefault(name, []).append(float(value) if value not in ("", "None") else np.nan)
        out[os.path.splitext(os.path.basename(path))[0]] = {k: np.asarray(v) for k, v in columns.items()}
    return out


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_records(records: Dict[str, Dict[str, np.ndarray]], path: str, window: int = 20) -> List[str]:
    """Loss, EE selection ratio and mined pair counts over iterations; returns the plotted series."""
    panels = [
        ("loss (mean over the batch)", [("train", "total_loss")]),
        ("EE: share of class pairs whose hardest\nnegative pair has a synthetic point",
         [("loss_EmbeddingExpansionLoss", "synthetic_selection_ratio")]),
        ("MultiSimilarityMiner: mined pairs", [("miner_MultiSimilarityMiner", "num_pos_pairs"),
                                               ("miner_MultiSimilarityMiner", "num_neg_pairs")]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    plotted = []
    for ax, (title, series) in zip(axes, panels):
        for group, name in series:
            rec = records.get(group, {})
            if name not in rec:
                continue
            it, y = rec["~iteration~"], rec[name]
            line, = ax.plot(it, y, alpha=0.3, lw=1)
            if len(y) >= 2 * window:
                ax.plot(it[window - 1:], smooth(y, window), color=line.get_color(), lw=2,
                        label=f"{name} ({window}-step mean)")
            else:
                line.set_alpha(1.0)
                line.set_label(name)
            plotted.append(f"{group}/{name}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return plotted


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="training iterations (3 = smoke test)")
    ap.add_argument("--save-every", type=int, default=50, help="record_keeper.save_records() every N steps")
    ap.add_argument("--n-points", type=int, default=2, help="EE synthetic points per positive pair")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--m-per-class", type=int, default=4)
    ap.add_argument("--embedding-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="example_outputs", help="folder for the records and the PNG")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # MPerClassSampler draws from numpy's global RNG
    device = torch.device(args.device)

    train_set = FontGlyphs(split="train")
    trunk = Trunk().to(device)
    embedder = nn.Linear(trunk.out_features, args.embedding_size).to(device)
    loss_fn = EmbeddingExpansionLoss(losses.MultiSimilarityLoss(), n_points=args.n_points,
                                     collect_stats=True).to(device)
    miner = miners.MultiSimilarityMiner(epsilon=0.1, collect_stats=True)
    optimizer = torch.optim.Adam(list(trunk.parameters()) + list(embedder.parameters()), lr=args.lr)
    sampler = samplers.MPerClassSampler(train_set.labels, m=args.m_per_class, batch_size=args.batch_size,
                                        length_before_new_iter=args.steps * args.batch_size)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    folder = os.path.join(args.out, "record_keeper_logs")
    shutil.rmtree(folder, ignore_errors=True)  # record-keeper appends to existing CSV files
    keeper = record_keeper.RecordKeeper(
        record_writer=record_keeper.RecordWriter(folder),
        attributes_to_search_for=c_f.list_of_recordable_attributes_list_names(),
    )

    for step, (images, labels) in enumerate(loader):
        images, labels = images.to(device), labels.to(device)
        embeddings = embedder(trunk(images))
        loss = loss_fn(embeddings, labels, miner(embeddings, labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        keeper.update_records(
            {"loss": loss_fn, "miner": miner, "train": {"total_loss": loss.item()}},
            step, recursive_types=[torch.nn.Module],
        )
        if (step + 1) % args.save_every == 0 or step == args.steps - 1:
            keeper.save_records()  # appends to <folder>/<group>.csv and logs.db
            print(f"step {step:4d}  loss {loss.item():.4f}  "
                  f"synthetic_selection_ratio {loss_fn.synthetic_selection_ratio:.3f}  "
                  f"num_synthetic {loss_fn.num_synthetic}  mined pos/neg pairs "
                  f"{miner.num_pos_pairs}/{miner.num_neg_pairs}")

    records = read_records(folder)
    print("record-keeper wrote: " + ", ".join(
        f"{group}.csv [{', '.join(k for k in cols if k != '~iteration~')}]" for group, cols in records.items()))
    png = os.path.join(args.out, "record_keeper_curves.png")
    plotted = plot_records(records, png)
    print(f"plotted {', '.join(plotted)}")
    print(f"wrote {png}")
    return plotted


if __name__ == "__main__":
    main()
