"""Tables and curves of the pretrained-trunk regime: means with 95% confidence intervals over
seeds, the claims from paired per-seed differences, and train / validation / test Recall@1
against iterations (one PNG per loss)."""
from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict
from typing import Any, Dict, List, Tuple

from .harness import atomic_write_bytes
from .report import NAMES, fmt, mean_se

COLUMNS = (("P@1", "precision_at_1"), ("MAP@R", "mean_average_precision_at_r"), ("R@1", "recall_at_1"),
           ("R@2", "recall_at_2"), ("R@4", "recall_at_4"), ("R@8", "recall_at_8"), ("NMI", "NMI"), ("F1", "F1"))
PREFIX = {"plain": "", "ee": "EE + ", "hdml": "HDML + "}
# two-sided 95% Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: List[float]) -> Tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t; nan for one value)."""
    m, se = mean_se(values)
    return m, (se if math.isnan(se) else T95.get(len(values) - 1, 1.96) * se)


def paired(a: List[Dict[str, Any]], b: List[Dict[str, Any]], key: str) -> List[float]:
    """Per-seed differences b - a on the seeds both have."""
    sa = {r["seed"]: r["metrics"][key] for r in a}
    return [r["metrics"][key] - sa[r["seed"]] for r in b if r["seed"] in sa]


def verdict(m: float, ci: float) -> str:
    if math.isnan(ci):
        return "one seed"
    if m == 0 and ci == 0:
        return "no difference (same checkpoint)"
    if m - ci > 0:
        return "holds (CI > 0)"
    if m + ci < 0:
        return "contradicted (CI < 0)"
    return "paper's direction, CI includes 0" if m > 0 else "against, CI includes 0"


def build_table(cfg, results, baseline=None) -> Tuple[str, List[Dict[str, Any]]]:
    g = defaultdict(list)
    for r in results:
        g[(r["method"], r["loss"])].append(r)
    lines = ["| Method | n | " + " | ".join(c for c, _ in COLUMNS) + " | best it | train s |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|---|"]
    if baseline:
        lines.append("| pretrained features, no training | 1 | " + " | ".join(fmt(baseline[k], float("nan"))
                                                                        for _, k in COLUMNS) + " | 0 | 0 |")
    for method, loss in cfg["cells"]:
        rs = g.get((method, loss), [])
        if not rs:
            continue
        cells = [fmt(*mean_ci([r["metrics"][k] for r in rs])) for _, k in COLUMNS]
        it = mean_ci([float(r["best_iteration"]) for r in rs])
        sec = mean_ci([r["train_seconds"] for r in rs])
        lines.append(f"| {PREFIX[method]}{NAMES[loss]} | {len(rs)} | " + " | ".join(cells)
                     + f" | {it[0]:.0f} | {sec[0]:.0f} |")
    claims = ["", "Claims: method minus its base loss, paired by seed (mean ± 95% CI, percent points):", "",
              "| Claim | n | Δ P@1 | Δ MAP@R | Δ NMI | verdict (P@1) |", "|---|---|---|---|---|---|"]
    rows = []
    for method, loss in cfg["cells"]:
        if method == "plain" or (method, loss) not in g or ("plain", loss) not in g:
            continue
        d = {k: paired(g[("plain", loss)], g[(method, loss)], k)
             for k in ("precision_at_1", "mean_average_precision_at_r", "NMI")}
        p1 = mean_ci(d["precision_at_1"])
        name = f"{PREFIX[method].strip(' +')} improves {NAMES[loss]}"
        claims.append(f"| {name} | {len(d['precision_at_1'])} | {fmt(*p1)} | "
                      f"{fmt(*mean_ci(d['mean_average_precision_at_r']))} | {fmt(*mean_ci(d['NMI']))} | "
                      f"{verdict(*p1)} |")
        rows.append({"claim": name, "n": len(d["precision_at_1"]), "delta_p1": p1[0], "ci_p1": p1[1],
                     "direction": "paper" if p1[0] > 0 else ("none" if p1[0] == 0 else "against")})
    agree = sum(r["direction"] == "paper" for r in rows)
    claims += ["", f"{agree} of {len(rows)} claims move in the paper's direction (mean Δ P@1 > 0); "
               f"{sum(r['delta_p1'] - r['ci_p1'] > 0 for r in rows if not math.isnan(r['ci_p1']))} "
               "with the 95% CI above 0."]
    return "\n".join(lines + claims) + "\n", rows


def plot_curves(cfg, results, out_dir: str) -> List[str]:
    """One PNG per loss: train / val / test R@1 against iterations, mean over seeds, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_loss = defaultdict(lambda: defaultdict(list))
    for r in results:
        by_loss[r["loss"]][r["method"]].append(r)
    written = []
    colours = {"plain": "tab:blue", "ee": "tab:orange", "hdml": "tab:green"}
    for loss, methods in by_loss.items():
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharex=True)
        for ax, part in zip(axes, ("train", "val", "test")):
            for method, rs in sorted(methods.items()):
                its = [p["iteration"] for p in rs[0]["curve"]]
                ys = [sum(r["curve"][i][part] for r in rs) / len(rs) for i in range(len(its))]
                ax.plot(its, [100 * y for y in ys], color=colours[method], label=f"{PREFIX[method]}{NAMES[loss]}")
                if part != "train":
                    best = sum(r["best_iteration"] for r in rs) / len(rs)
                    ax.axvline(best, color=colours[method], ls=":", lw=1)
            ax.set_title(f"{part} R@1 ({'train classes' if part == 'train' else part + ' classes'})")
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("R@1 (%)")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{cfg['name']}: {NAMES[loss]} (mean over seeds; dotted = validation-best iteration)")
        fig.tight_layout()
        path = os.path.join(out_dir, f"curves-{loss}.png")
        buf = io.BytesIO()
        fig.savefig(buf, dpi=90)
        plt.close(fig)
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)
    return written


def write(cfg, results, out_dir: str, baseline=None) -> str:
    """table.md, results.csv and the curves under ``out_dir``; returns the table."""
    table, _ = build_table(cfg, results, baseline)
    atomic_write_bytes(os.path.join(out_dir, "table.md"), table.encode())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "loss", "seed", "best_iteration", "train_seconds"] + [k for _, k in COLUMNS]
               + ["hyper_parameters"])
    for r in results:
        w.writerow([r["method"], r["loss"], r["seed"], r["best_iteration"], f"{r['train_seconds']:.1f}"]
                   + [f"{r['metrics'][k]:.6f}" for _, k in COLUMNS] + [r["hyper_parameters"]])
    atomic_write_bytes(os.path.join(out_dir, "results.csv"), buf.getvalue().encode())
    if results:
        plot_curves(cfg, results, out_dir)
    print(table)
    return table
