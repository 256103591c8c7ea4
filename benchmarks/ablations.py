"""The EE paper's ablations as commands, each writing a markdown table and a plot.

    python -m benchmarks.ablations n-points  --config fontglyphs_cpu --loss ms   # n in 0,1,2,4,8,16
    python -m benchmarks.ablations normalize --config fontglyphs_cpu --loss ms   # L2 norm on/off
    python -m benchmarks.ablations pairs     --config fontglyphs_cpu --loss ms   # all vs adjacent
    python -m benchmarks.ablations per-class --config fontglyphs_cpu --loss ms --values 2 8
    python -m benchmarks.ablations selection-ratio --config fontglyphs_cpu --loss ms
    python -m benchmarks.ablations heatmap   --config fontglyphs_cpu --loss ms

Runs go through the same harness (resumable, atomic results) under runs/<config>/test/.
"""
from __future__ import annotations

import argparse
import csv
import os
from types import SimpleNamespace
from typing import Any, Dict, List

import numpy as np
import torch

from . import harness, report
from .run import config_from_args, run_dir, run_one, tuned_hp


def _args(ns) -> SimpleNamespace:
    return SimpleNamespace(config=ns.config, runs=ns.runs, no_progress=ns.no_progress, data_root=ns.data_root,
                           weights=None)


def _sweep(ns, key: str, values: List[Any]) -> Dict[Any, List[Dict[str, Any]]]:
    cfg = config_from_args(ns)
    base_hp = tuned_hp(ns.runs, cfg, "ee", ns.loss)
    out = {}
    for v in values:
        hp = dict(base_hp, **{key: v})
        out[v] = [run_one(_args(ns), cfg, "ee", ns.loss, seed, hp, "test") for seed in ns.seeds]
    return out


def _plot(path: str, xs, ys, errs, xlabel: str, ylabel: str, title: str, baseline=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(range(len(xs)), ys, yerr=errs, marker="o", capsize=3, label="EE")
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", label="plain loss")
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


def _sweep_report(ns, key: str, values, title: str):
    cfg = config_from_args(ns)
    res = _sweep(ns, key, values)
    plain = [run_one(_args(ns), cfg, "plain", ns.loss, s, tuned_hp(ns.runs, cfg, "plain", ns.loss), "test")
             for s in ns.seeds]
    pm, pse = report.mean_se([r["metrics"]["recall_at_1"] for r in plain])
    lines = [f"### {title} ({cfg['name']}, {report.NAMES[ns.loss]}, seeds {ns.seeds})", "",
             f"| {key} | R@1 | NMI | train s |", "|---|---|---|---|",
             f"| plain | {report.fmt(pm, pse)} | {report.fmt(*report.mean_se([r['metrics']['NMI'] for r in plain]))} | "
             f"{report.fmt(*report.mean_se([r['train_seconds'] for r in plain]), scale=1)} |"]
    ys, errs = [], []
    for v, rs in res.items():
        m, se = report.mean_se([r["metrics"]["recall_at_1"] for r in rs])
        ys.append(m * 100)
        errs.append(0 if np.isnan(se) else se * 100)
        lines.append(f"| {v} | {report.fmt(m, se)} | {report.fmt(*report.mean_se([r['metrics']['NMI'] for r in rs]))} | "
                     f"{report.fmt(*report.mean_se([r['train_seconds'] for r in rs]), scale=1)} |")
    out = os.path.join(ns.runs, cfg["name"], "ablations", f"{key}-{ns.loss}")
    harness.atomic_write_bytes(out + ".md", ("\n".join(lines) + "\n").encode())
    _plot(out + ".png", list(res), ys, errs, key, "R@1 (%)", title, baseline=pm * 100)
    print("\n".join(lines))
    print(f"wrote {out}.md and {out}.png")


def cmd_per_class(ns):
    """Batch composition: samples per class (the batch size stays), for the base loss and EE alike."""
    cfg = config_from_args(ns)
    lines = [f"### Batch composition ({cfg['name']}, {report.NAMES[ns.loss]}, seeds {ns.seeds})", "",
             "| per class | plain R@1 | EE R@1 | Δ |", "|---|---|---|---|"]
    for m in ns.values:
        r = {method: [run_one(_args(ns), cfg, method, ns.loss, seed,
                              dict(tuned_hp(ns.runs, cfg, method, ns.loss), per_class=m), "test")
                      for seed in ns.seeds] for method in ("plain", "ee")}
        pm, ps = report.mean_se([x["metrics"]["recall_at_1"] for x in r["plain"]])
        em, es = report.mean_se([x["metrics"]["recall_at_1"] for x in r["ee"]])
        lines.append(f"| {m} | {report.fmt(pm, ps)} | {report.fmt(em, es)} | {(em - pm) * 100:+.1f} |")
    out = os.path.join(ns.runs, cfg["name"], "ablations", f"per-class-{ns.loss}.md")
    harness.atomic_write_bytes(out, ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


def cmd_selection_ratio(ns):
    """Fraction of class pairs whose hardest negative pair involves a synthetic point, per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = config_from_args(ns)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for seed in ns.seeds:
        hp = tuned_hp(ns.runs, cfg, "ee", ns.loss)
        run_one(_args(ns), cfg, "ee", ns.loss, seed, hp, "test")
        folder = os.path.join(run_dir(ns.runs, cfg, "test", "ee", ns.loss, hp, seed), "records")
        files = [f for f in os.listdir(folder) if f.startswith("loss_fn_") and f.endswith(".csv")]
        with open(os.path.join(folder, files[0])) as f:
            rows = list(csv.DictReader(f))
        it = [float(r.get("iteration", i)) for i, r in enumerate(rows) if r.get("synthetic_selection_ratio")]
        ratio = [float(r["synthetic_selection_ratio"]) for r in rows if r.get("synthetic_selection_ratio")]
        ax.plot(it, ratio, lw=0.8, label=f"seed {seed}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("selection ratio of synthetic points")
    ax.set_ylim(0, 1)
    ax.set_title(f"EE + {report.NAMES[ns.loss]} ({cfg['name']})")
    ax.legend()
    fig.tight_layout()
    out = os.path.join(ns.runs, cfg["name"], "ablations", f"selection-ratio-{ns.loss}.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def cmd_heatmap(ns):
    """Hardest negative distance between test classes: originals only vs the expanded sets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pytorch_metric_learning.distances import LpDistance

    import pml_ext.functional as F
    from .models import build_model

    cfg = config_from_args(ns)
    hp = tuned_hp(ns.runs, cfg, "ee", ns.loss)
    run_one(_args(ns), cfg, "ee", ns.loss, ns.seeds[0], hp, "test")
    ck = torch.load(os.path.join(run_dir(ns.runs, cfg, "test", "ee", ns.loss, hp, ns.seeds[0]), "checkpoint.pt"),
                    map_location="cpu", weights_only=False)
    trunk, head, _ = build_model(cfg["model"]["name"], cfg["model"]["embedding_size"])
    trunk.load_state_dict(ck["trunk"])
    head.load_state_dict(ck["head"])
    _, eval_src = harness.sources(cfg, "test")
    labels = np.asarray(eval_src.labels)
    classes = np.unique(labels)[: ns.classes]
    idx = np.concatenate([np.nonzero(labels == c)[0][:4] for c in classes])
    emb = harness.embed(trunk, head, eval_src.subset(idx))
    y = torch.as_tensor(labels[idx])
    dist = LpDistance()
    uniq, cls = F.class_indices(y)
    mats = {}
    for n in (0, 2, 8):
        ex = F.expand(y, n, "all", emb.dtype)
        hp_ = F.hardest_negative_pairs(emb, ex, cls, len(uniq), dist)
        h = hp_.hardest.detach().numpy().copy()
        np.fill_diagonal(h, np.nan)
        mats[n] = h
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    vmin, vmax = np.nanmin(mats[8]), np.nanmax(mats[0])
    for ax, (n, h) in zip(axes, mats.items()):
        im = ax.imshow(h, vmin=vmin, vmax=vmax, cmap="viridis")
        ax.set_title(f"n = {n}: mean {np.nanmean(h):.3f}")
        ax.set_xlabel("class")
        ax.set_ylabel("class")
    fig.colorbar(im, ax=axes, shrink=0.8, label="hardest negative distance")
    out = os.path.join(ns.runs, cfg["name"], "ablations", f"heatmap-{ns.loss}.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}; mean hardest negative distance: " + ", ".join(f"n={n}: {np.nanmean(h):.4f}" for n, h in mats.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("n-points", "normalize", "pairs", "per-class", "selection-ratio", "heatmap"))
    ap.add_argument("--config", default="fontglyphs_cpu")
    ap.add_argument("--loss", default="ms", choices=harness.LOSSES)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--values", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16])
    ap.add_argument("--classes", type=int, default=24, help="heatmap: number of test classes shown")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--no-progress", action="store_true")
    ns = ap.parse_args(argv)
    if ns.what == "n-points":
        _sweep_report(ns, "n_points", ns.values, "EE: number of synthetic points n")
    elif ns.what == "normalize":
        _sweep_report(ns, "normalize", [True, False], "EE: L2 normalisation of synthetic points")
    elif ns.what == "pairs":
        _sweep_report(ns, "pairs", ["all", "adjacent"], "EE: which same-class pairs are expanded")
    elif ns.what == "per-class":
        cmd_per_class(ns)
    elif ns.what == "selection-ratio":
        cmd_selection_ratio(ns)
    else:
        cmd_heatmap(ns)


if __name__ == "__main__":
    main()
