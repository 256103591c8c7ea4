"""Tables across runs: mean ± standard error over seeds, and the per-cell verdict on the claims."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import defaultdict
from typing import Any, Dict, List, Tuple

def metrics_of(cfg) -> Tuple[str, ...]:
    return ("NMI", "F1") + tuple(f"recall_at_{k}" for k in cfg.get("recall_k", (1, 2, 4, 8)))
NAMES = {"triplet": "Triplet", "hphn": "Triplet (HPHN)", "npair": "N-pair", "lifted": "Lifted", "ms": "MS"}


def collect(folder: str) -> List[Dict[str, Any]]:
    out = []
    for root, _, files in os.walk(folder):
        if "result.json" in files:
            with open(os.path.join(root, "result.json")) as f:
                out.append(json.load(f))
    return out


def mean_se(values: List[float]) -> Tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n == 1:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def group(results) -> Dict[Tuple[str, str], List[Dict[str, Any]]]:
    g = defaultdict(list)
    for r in results:
        g[(r["method"], r["loss"])].append(r)
    return g


def fmt(m: float, se: float, scale: float = 100.0) -> str:
    if math.isnan(m):
        return "—"
    if math.isnan(se):
        return f"{m * scale:.1f}"
    return f"{m * scale:.1f} ± {se * scale:.1f}"


def verdict(diff: float, se: float) -> str:
    """'holds' / 'contradicted' when the difference is beyond 2 standard errors, else 'unclear'."""
    if math.isnan(se):
        return "unclear (1 seed)"
    if diff > 2 * se:
        return "holds"
    if diff < -2 * se:
        return "contradicted"
    return "unclear (within 2 s.e.)"


def build_table(cfg: Dict[str, Any], results: List[Dict[str, Any]]) -> str:
    g = group(results)
    lines = [f"### {cfg['name']}: {cfg.get('description', '')}", "",
             "Mean ± standard error over seeds (n = seeds per cell), test classes. Percent.", "",
             "| Method | n | NMI | F1 | " + " | ".join(f"R@{k}" for k in cfg.get("recall_k", (1, 2, 4, 8)))
             + " | train s | peak RSS MB |", "|---" * (len(metrics_of(cfg)) + 4) + "|"]
    for method, loss in cfg["cells"]:
        rs = g.get((method, loss), [])
        label = {"plain": "", "ee": "EE + ", "hdml": "HDML + "}[method] + NAMES[loss]
        cols = [fmt(*mean_se([r["metrics"].get(k, float("nan")) for r in rs])) for k in metrics_of(cfg)]
        t = fmt(*mean_se([r["train_seconds"] for r in rs]), scale=1.0)
        mem = fmt(*mean_se([r["peak_rss_mb"] for r in rs]), scale=1.0)
        lines.append(f"| {label} | {len(rs)} | " + " | ".join(cols) + f" | {t} | {mem} |")
    lines += ["", "Claims (R@1 of the method minus R@1 of its base loss, percent points, ± s.e. of the "
              "difference; 'holds' = more than 2 s.e. above zero):", "",
              "| Claim | Δ R@1 | Δ NMI | verdict |", "|---|---|---|---|"]
    for method, loss in cfg["cells"]:
        if method == "plain" or ("plain", loss) not in g or (method, loss) not in g:
            continue
        row = []
        for key in ("recall_at_1", "NMI"):
            m1, s1 = mean_se([r["metrics"][key] for r in g[(method, loss)]])
            m0, s0 = mean_se([r["metrics"][key] for r in g[("plain", loss)]])
            row.append((m1 - m0, math.sqrt(s1 ** 2 + s0 ** 2) if not (math.isnan(s1) or math.isnan(s0)) else float("nan")))
        label = f"{'EE' if method == 'ee' else 'HDML'} improves {NAMES[loss]}"
        lines.append(f"| {label} | {fmt(*row[0])} | {fmt(*row[1])} | {verdict(*row[0])} |")
    published = cfg.get("published")
    if published:
        lines += ["", f"Published ({published.get('source', '')}):", ""] + [f"- {k}: {v}" for k, v in published.items() if k != "source"]
    return "\n".join(lines) + "\n"


def write_reports(cfg, results, table: str, out_dir: str) -> None:
    from .harness import atomic_write_bytes

    atomic_write_bytes(os.path.join(out_dir, "table.md"), table.encode())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "loss", "seed", *metrics_of(cfg), "train_seconds", "peak_rss_mb", "hyper_parameters"])
    for r in sorted(results, key=lambda r: (r["method"], r["loss"], r["seed"])):
        w.writerow([r["method"], r["loss"], r["seed"], *[r["metrics"].get(k) for k in metrics_of(cfg)],
                    r["train_seconds"], r["peak_rss_mb"], json.dumps(r["hyper_parameters"], sort_keys=True)])
    atomic_write_bytes(os.path.join(out_dir, "results.csv"), buf.getvalue().encode())
