"""python -m benchmarks.run: train, tune and tabulate the EE / HDML comparison.

    python -m benchmarks.run table --config quick             # a few minutes, embedded data
    python -m benchmarks.run table --config fontglyphs_cpu    # the CPU protocol, 3 seeds
    python -m benchmarks.run tune  --config fontglyphs_cpu    # grid on a validation split of TRAIN classes
    python -m benchmarks.run train --config fontglyphs_cpu --method ee --loss ms --seed 0
    python -m benchmarks.run report --config fontglyphs_cpu

Every run writes runs/<config>/<split>/<method>-<loss>/<tag>/seed<k>/result.json atomically
and checkpoints after every epoch; re-running a command resumes and skips finished runs.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from typing import Any, Dict, List

from . import harness, report

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


def load_config(name_or_path: str) -> Dict[str, Any]:
    path = name_or_path if os.path.exists(name_or_path) else os.path.join(CONFIG_DIR, f"{name_or_path}.json")
    if not os.path.exists(path):
        known = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))
        raise SystemExit(f"config {name_or_path!r} not found; known configs: {', '.join(known)}")
    with open(path) as f:
        cfg = json.load(f)
    cfg.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return cfg


def config_from_args(args) -> Dict[str, Any]:
    cfg = load_config(args.config)
    if getattr(args, "data_root", None):
        cfg["data"]["root"] = args.data_root
    if getattr(args, "weights", None):
        cfg["model"]["weights"] = args.weights
    return cfg


def hp_tag(hp: Dict[str, Any]) -> str:
    return "default" if not hp else "_".join(f"{k}={hp[k]}" for k in sorted(hp))


def grid_points(grid: Dict[str, List[Any]]) -> List[Dict[str, Any]]:
    """Every combination of a tuning grid {name: [values]} ([{}] for an empty grid)."""
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def run_dir(root: str, cfg, split: str, method: str, loss: str, hp: Dict[str, Any], seed: int) -> str:
    return os.path.join(root, cfg["name"], split, f"{method}-{loss}", hp_tag(hp), f"seed{seed}")


def tuned_hp(root: str, cfg, method: str, loss: str) -> Dict[str, Any]:
    path = os.path.join(root, cfg["name"], "tuned.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f).get(f"{method}-{loss}", {})
    return {}


def run_one(args, cfg, method, loss, seed, hp, split) -> Dict[str, Any]:
    """Run one training in a child process (clean peak-memory figure, crash isolation)."""
    out = run_dir(args.runs, cfg, split, method, loss, hp, seed)
    result = os.path.join(out, "result.json")
    if not os.path.exists(result):
        cmd = [sys.executable, "-m", "benchmarks.run", "train", "--config", args.config, "--method", method,
               "--loss", loss, "--seed", str(seed), "--split", split, "--runs", args.runs,
               "--hp", json.dumps(hp)]
        if args.no_progress:
            cmd.append("--no-progress")
        for flag, value in (("--data-root", args.data_root), ("--weights", args.weights)):
            if value:
                cmd += [flag, value]
        subprocess.run(cmd, check=True)
    with open(result) as f:
        return json.load(f)


def cmd_train(args):
    cfg = config_from_args(args)
    hp = json.loads(args.hp) if args.hp else tuned_hp(args.runs, cfg, args.method, args.loss)
    out = run_dir(args.runs, cfg, args.split, args.method, args.loss, hp, args.seed)
    res = harness.train_cell(cfg, args.method, args.loss, args.seed, out, hp=hp, split=args.split,
                             progress=not args.no_progress, stop_after_epoch=args.stop_after_epoch)
    m = res["metrics"]
    print(f"{args.method}/{args.loss} seed {args.seed}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(m.items())))


def cells(cfg) -> List[List[str]]:
    return [list(c) for c in cfg["cells"]]


def cmd_table(args):
    cfg = config_from_args(args)
    results = []
    for method, loss in cells(cfg):
        hp = tuned_hp(args.runs, cfg, method, loss)
        for seed in cfg["seeds"]:
            results.append(run_one(args, cfg, method, loss, seed, hp, "test"))
    table = report.build_table(cfg, results)
    out_dir = os.path.join(args.runs, cfg["name"])
    report.write_reports(cfg, results, table, out_dir)
    print(table)


def cmd_tune(args):
    """Same grid, same budget for the base loss and its EE/HDML version; validation classes only."""
    cfg = config_from_args(args)
    grid_cfg = cfg.get("tuning", {})
    chosen = {}
    for method, loss in cells(cfg):
        points = grid_points(grid_cfg.get(loss, {}))
        if points == [{}]:  # nothing to choose: the defaults, without spending runs
            chosen[f"{method}-{loss}"] = {}
            continue
        best = None
        for hp in points:
            res = run_one(args, cfg, method, loss, grid_cfg.get("seed", 0), hp, "val")
            score = res["metrics"][grid_cfg.get("metric", "recall_at_1")]
            print(f"tune {method}/{loss} {hp_tag(hp)}: {score:.4f}")
            if best is None or score > best[0]:
                best = (score, hp)
        chosen[f"{method}-{loss}"] = best[1]
    harness.atomic_write_json(os.path.join(args.runs, cfg["name"], "tuned.json"), chosen)
    print(json.dumps(chosen, indent=2))


def cmd_report(args):
    cfg = config_from_args(args)
    results = report.collect(os.path.join(args.runs, cfg["name"], "test"))
    table = report.build_table(cfg, results)
    report.write_reports(cfg, results, table, os.path.join(args.runs, cfg["name"]))
    print(table)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("train", "table", "tune", "report"):
        p = sub.add_parser(name)
        p.add_argument("--config", default="quick")
        p.add_argument("--runs", default="runs", help="results folder (default ./runs)")
        p.add_argument("--no-progress", action="store_true")
        p.add_argument("--data-root", default=None, help="dataset directory (CUB/Cars/SOP/ImageFolder configs)")
        p.add_argument("--weights", default=None, help="local ImageNet GoogLeNet state_dict (never downloaded)")
        if name == "train":
            p.add_argument("--method", required=True, choices=harness.METHODS)
            p.add_argument("--loss", required=True, choices=harness.LOSSES)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--split", default="test", choices=("test", "val"))
            p.add_argument("--hp", default=None, help="JSON hyper-parameters (default: tuned.json or config)")
            p.add_argument("--stop-after-epoch", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    {"train": cmd_train, "table": cmd_table, "tune": cmd_tune, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
