"""The papers' regime on CPU: a pretrained trunk, long schedules, checkpoints chosen on validation.

    python -m benchmarks.regime table --config fontglyphs_pretrained --jobs 2   # frozen trunk, 2 workers
    python -m benchmarks.regime table --config fontglyphs_pretrained_finetune_100cls  # last stage trained
                                                                                # on a CUB-sized set
    python -m benchmarks.regime train --config fontglyphs_pretrained --method ee --loss ms --seed 0
    python -m benchmarks.regime report --config fontglyphs_pretrained
    python -m benchmarks.regime table --config my.json --features my_features.npz   # any encoder

Protocol ("A Metric Learning Reality Check"): the trunk's features (several augmented views per
image) are computed once and cached (benchmarks/pretrained.py); a quarter of the TRAIN classes is
held out for validation; every run trains past its best point, evaluates Recall@1 on a train
subset, the validation classes and the test classes every ``eval_every`` iterations, and reports
the test metrics of the checkpoint that is best on validation (never chosen on test). Tuning:
the same grid for a base loss and its EE / HDML versions, one seed, validation R@1. Then every
cell runs with 5 seeds; claims are paired per-seed differences with 95% confidence intervals.
A run is the unit of resumption: results are written atomically per run, and a killed table
continues with the runs that have no result yet.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from pytorch_metric_learning import samplers

from . import harness
from .pretrained import FeatureSet, load_efficientnet_lite, split_trunk
from .regime_data import curve_probes, feature_sets, splits
from .run import grid_points, hp_tag, load_config

CURVE_METRIC = "precision_at_1"  # = Recall@1
FINAL_METRICS = ("precision_at_1", "mean_average_precision_at_r", "recall_at_1", "recall_at_2", "recall_at_4",
                 "recall_at_8", "NMI", "F1")


# ----------------------------------------------------------------------------- models
class Identity(torch.nn.Module):
    def forward(self, x):
        return x


def build_head(kind: str, feature_size: int, embedding_size: int) -> torch.nn.Module:
    if kind == "linear":
        return torch.nn.Linear(feature_size, embedding_size)
    if kind == "mlp":
        return torch.nn.Sequential(torch.nn.Linear(feature_size, feature_size), torch.nn.ReLU(),
                                   torch.nn.Linear(feature_size, embedding_size))
    raise ValueError(f"head must be 'linear' or 'mlp', got {kind!r}")


def build_trunk(cfg: Dict[str, Any]) -> Tuple[torch.nn.Module, bool]:
    """(trunk over the cached inputs, trained?): Identity on pooled features, or the pretrained tail."""
    if cfg["mode"] == "frozen":
        return Identity(), False
    if cfg["mode"] != "finetune":
        raise ValueError(f"mode must be 'frozen' or 'finetune', got {cfg['mode']!r}")
    t = cfg["trunk"]
    _, tail = split_trunk(load_efficientnet_lite(t.get("name", "efficientnet-lite0"), t["image_size"]),
                          int(t.get("tail_blocks", 0)))
    return tail, True


def build_run(cfg: Dict[str, Any], fsets: Dict[str, FeatureSet], method: str, loss_name: str,
              hp: Dict[str, Any], num_classes: int):
    """(trunk, head, loss_fn, miner, is_hdml, optimizer) of one run; the trunk (the pretrained
    tail when fine-tuning) is its own parameter group with ``trunk_lr``."""
    tcfg = cfg["train"]
    trunk, trunk_trained = build_trunk(cfg)
    feature_size = fsets["pooled"].features.shape[-1] if cfg["mode"] == "frozen" else trunk.feature_size
    emb_size = cfg["model"]["embedding_size"]
    head = build_head(cfg["model"].get("head", "linear"), feature_size, emb_size)
    loss_fn, miner, is_hdml = harness.build_method(method, loss_name, hp, feature_size, emb_size, num_classes)
    head_params = list(head.parameters())
    if is_hdml:  # HDML routes each term to its own group; the trunk is a metric-side group
        groups = loss_fn.param_groups(head_params, metric_lr=tcfg["lr"], **hp.get("hdml_lr", {}))
    else:
        groups = [{"params": head_params, "lr": tcfg["lr"]}]
    if trunk_trained:
        groups.append({"params": list(trunk.parameters()), "lr": tcfg.get("trunk_lr", tcfg["lr"])})
    for g in groups:
        g["weight_decay"] = tcfg.get("weight_decay", 0.0)
    return trunk, head, loss_fn, miner, is_hdml, torch.optim.Adam(groups)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def embed(trunk, head, inputs: torch.Tensor, idx: np.ndarray, batch_size: int = 1024) -> torch.Tensor:
    """L2-normalised embeddings of view 0 of ``idx``."""
    trunk.eval()
    head.eval()
    out = []
    for s in range(0, len(idx), batch_size):
        x = inputs[torch.as_tensor(idx[s:s + batch_size]), 0].float()
        out.append(head(trunk(x)))
    trunk.train()
    head.train()
    return torch.nn.functional.normalize(torch.cat(out), dim=1)


def retrieval_metrics(emb: torch.Tensor, labels: np.ndarray, include=(CURVE_METRIC,)) -> Dict[str, float]:
    from pml_ext.utils import AccuracyCalculator

    ks = tuple(int(m.rsplit("_", 1)[1]) for m in include if m.startswith("recall_at_"))
    kwargs = {"recall_at_k": ks} if ks else {}
    k = 1 if tuple(include) == (CURVE_METRIC,) else "max_bin_count"  # MAP@R needs every same-class neighbour
    calc = AccuracyCalculator(include=tuple(include), k=k, **kwargs)
    res = calc.get_accuracy(emb, torch.as_tensor(labels), ref_includes_query=True)
    return {k: float(v) for k, v in res.items()}


# ----------------------------------------------------------------------------- one run
def train_run(cfg: Dict[str, Any], fsets: Dict[str, FeatureSet], method: str, loss_name: str, seed: int,
              run_dir: str, hp: Optional[Dict[str, Any]] = None, progress: bool = True) -> Dict[str, Any]:
    """Train one cell past its best point; report the validation-best checkpoint's test metrics."""
    result_path = os.path.join(run_dir, "result.json")
    done, hp = harness.start_run(cfg, loss_name, seed, result_path, hp)
    if done is not None:
        return done
    tcfg = cfg["train"]
    fs = fsets["maps" if cfg["mode"] == "finetune" else "pooled"]
    inputs = fs.features
    parts = splits(fs, cfg.get("val_seed", 0), tcfg.get("train_classes"))
    tr_idx = parts["train"]
    classes, tr_y = np.unique(fs.labels[tr_idx], return_inverse=True)
    trunk, head, loss_fn, miner, is_hdml, optimizer = build_run(cfg, fsets, method, loss_name, hp, len(classes))

    iters, every, bs = tcfg["iterations"], tcfg["eval_every"], tcfg["batch_size"]
    sampler = samplers.MPerClassSampler(tr_y, m=tcfg["per_class"], batch_size=bs, length_before_new_iter=iters * bs)
    order = np.asarray(list(iter(sampler)))[: iters * bs].reshape(iters, bs)
    views = fs.views
    view_gen = torch.Generator().manual_seed(seed)
    probes = curve_probes(fs, parts, cfg.get("val_seed", 0))
    train_y = torch.as_tensor(tr_y)  # 0..C-1 over the training classes (HDML's classifier)

    curve: List[Dict[str, float]] = []
    best = {"val": -1.0, "iteration": 0, "state": None}
    train_seconds, eval_seconds = 0.0, 0.0
    bar = harness._progress(iters, 0, progress, f"{method}/{loss_name}/s{seed}")

    def checkpoint(it: int):
        nonlocal eval_seconds
        t0 = time.perf_counter()
        point = {"iteration": it}
        for part, idx in probes.items():
            point[part] = retrieval_metrics(embed(trunk, head, inputs, idx), fs.labels[idx])[CURVE_METRIC]
        curve.append(point)
        if point["val"] > best["val"]:
            best.update(val=point["val"], iteration=it,
                        state=copy.deepcopy({"trunk": trunk.state_dict(), "head": head.state_dict()}))
        eval_seconds += time.perf_counter() - t0

    checkpoint(0)
    loss_log: List[float] = []
    step_log: List[float] = []
    stats_log: List[Dict[str, float]] = []  # harness._stats per iteration (EE ratio, HDML terms)
    for it in range(iters):
        t0 = time.perf_counter()
        idx = torch.as_tensor(tr_idx[order[it]])
        v = torch.randint(1, views, (bs,), generator=view_gen) if views > 1 else torch.zeros(bs, dtype=torch.long)
        x, y = inputs[idx, v].float(), train_y[torch.as_tensor(order[it])]
        loss = harness.train_step(trunk, head, loss_fn, miner, is_hdml, optimizer, x, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{method}/{loss_name} seed {seed}: loss is {float(loss)} at iteration {it + 1}")
        loss_log.append(float(loss.detach()))
        step_log.append(time.perf_counter() - t0)  # the step only: reading the statistics is not timed
        train_seconds += step_log[-1]
        stats_log.append(harness._stats(loss_fn))
        bar.update(1)
        if (it + 1) % every == 0 or it + 1 == iters:
            checkpoint(it + 1)
    bar.close()

    trunk.load_state_dict(best["state"]["trunk"])
    head.load_state_dict(best["state"]["head"])
    harness.atomic_torch_save(dict(best["state"], iteration=best["iteration"]), os.path.join(run_dir, "best.pt"))
    test = retrieval_metrics(embed(trunk, head, inputs, parts["test"]), fs.labels[parts["test"]], FINAL_METRICS)
    result = {
        "config": cfg["name"], "mode": cfg["mode"], "method": method, "loss": loss_name, "seed": seed,
        "hyper_parameters": hp, "metrics": test, "best_iteration": best["iteration"], "best_val": best["val"],
        "curve": curve, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "loss_per_eval": [float(np.mean(loss_log[i:i + every])) for i in range(0, len(loss_log), every)],
        "step_ms_per_eval": [1000 * float(np.mean(step_log[i:i + every])) for i in range(0, len(step_log), every)],
        "stats_per_eval": [_mean_stats(stats_log[i:i + every]) for i in range(0, len(stats_log), every)],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    harness.atomic_write_json(result_path, result)
    return result


def _mean_stats(rows: List[Dict[str, float]]) -> Dict[str, float]:
    """Per-name mean over the iterations that recorded the name (parallel to loss_per_eval)."""
    names = sorted({k for r in rows for k in r})
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in names}


# ----------------------------------------------------------------------------- tune + table
def run_path(root: str, cfg, method: str, loss: str, hp: Dict[str, Any], seed: int) -> str:
    return os.path.join(root, cfg["name"], f"{method}-{loss}", hp_tag(hp), f"seed{seed}")


def grid(cfg, loss: str) -> List[Dict[str, Any]]:
    return grid_points(cfg.get("tuning", {}).get(loss, {}))


def _tuning_runs(cfg) -> List[Tuple[str, str, Dict[str, Any], int]]:
    seed = cfg.get("tuning", {}).get("seed", cfg["seeds"][0])
    return [(method, loss, hp, seed) for method, loss in cfg["cells"] for hp in grid(cfg, loss)]


def run_many(cfg, fsets, root: str, runs, progress: bool = True, jobs: int = 1) -> List[Dict[str, Any]]:
    """Results of ``runs`` = [(method, loss, hp, seed)], in order. ``jobs`` > 1 trains them in that
    many worker processes of one thread each (2 single-thread processes give about twice the
    throughput of one 2-thread process for these small steps). Finished runs are read, not retrained."""
    todo = [i for i, (m, l, hp, s) in enumerate(runs)
            if not os.path.exists(os.path.join(run_path(root, cfg, m, l, hp, s), "result.json"))]
    if jobs <= 1 or len(todo) <= 1:
        out = []
        for m, l, hp, s in runs:
            out.append(train_run(cfg, fsets, m, l, s, run_path(root, cfg, m, l, hp, s), hp, progress))
            _print_done(m, l, hp, s, out[-1])
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: a forked child of a process that has run OpenMP can hang
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                             initializer=_worker_init, initargs=(cfg,)) as ex:
        futures = {ex.submit(_worker_run, root, *runs[i]): i for i in todo}
        trained: Dict[int, Dict[str, Any]] = {}
        try:
            for f in as_completed(futures):
                i = futures[f]
                trained[i] = f.result()  # re-raises a worker's exception here
                _print_done(*runs[i], trained[i])
        except BaseException:
            ex.shutdown(wait=False, cancel_futures=True)  # fail now, not after the queued runs
            raise
    # runs finished before this call are read from their result.json
    return [trained[i] if i in trained else train_run(cfg, fsets, m, l, s, run_path(root, cfg, m, l, hp, s), hp, False)
            for i, (m, l, hp, s) in enumerate(runs)]


def _print_done(method: str, loss: str, hp: Dict[str, Any], seed: int, r: Dict[str, Any]) -> None:
    print(f"  {method}-{loss} {hp_tag(hp)} seed {seed}: val R@1 {100 * r['best_val']:.2f} at it "
          f"{r['best_iteration']}, train {r['train_seconds']:.0f}s + eval {r['eval_seconds']:.0f}s", flush=True)


_WORKER: Dict[str, Any] = {}


def _worker_init(cfg) -> None:
    torch.set_num_threads(1)
    _WORKER.update(cfg=cfg, fsets=feature_sets(cfg, progress=False))


def _worker_run(root: str, method: str, loss: str, hp: Dict[str, Any], seed: int) -> Dict[str, Any]:
    cfg = _WORKER["cfg"]
    return train_run(cfg, _WORKER["fsets"], method, loss, seed, run_path(root, cfg, method, loss, hp, seed), hp,
                     progress=False)


def tune(cfg, fsets, root: str, progress: bool = True, jobs: int = 1) -> Dict[str, Dict[str, Any]]:
    """The grid of the base loss for every cell (same grid for plain / EE / HDML), seed
    ``tuning.seed``, chosen by the best validation R@1 over the run's checkpoints."""
    path = os.path.join(root, cfg["name"], "tuned.json")
    runs = _tuning_runs(cfg)
    scores: Dict[str, List[Tuple[float, Dict[str, Any]]]] = {}
    for (method, loss, hp, _), r in zip(runs, run_many(cfg, fsets, root, runs, progress, jobs)):
        scores.setdefault(f"{method}-{loss}", []).append((r["best_val"], hp))
        print(f"tune {method}-{loss} {hp_tag(hp)}: val R@1 {100 * r['best_val']:.2f} at it {r['best_iteration']}",
              flush=True)
    chosen = {k: max(v, key=lambda s: s[0])[1] for k, v in scores.items()}
    harness.atomic_write_json(path, chosen)
    return chosen


def table(cfg, fsets, root: str, progress: bool = True, jobs: int = 1) -> List[Dict[str, Any]]:
    chosen = tune(cfg, fsets, root, progress, jobs)
    runs = [(method, loss, chosen[f"{method}-{loss}"], seed) for seed in cfg["seeds"] for method, loss in cfg["cells"]]
    results = run_many(cfg, fsets, root, runs, progress, jobs)
    for (method, loss, _, seed), r in zip(runs, results):
        print(f"{method}-{loss} seed {seed}: test R@1 {100 * r['metrics']['precision_at_1']:.2f} "
              f"(best val at it {r['best_iteration']})", flush=True)
    return results


ABLATION = ([{"n_points": n} for n in (0, 1, 2, 4, 8)] + [{"n_points": 2, "normalize": False},
                                                         {"n_points": 2, "pairs": "adjacent"}])


def ablation(cfg, fsets, root: str, loss: str, seeds: List[int], progress: bool = True) -> str:
    """EE's n (0 = hard negative pair mining without synthetic points), normalisation and pair
    mode in this regime, on the tuned hyper-parameters of EE + ``loss``, against plain ``loss``."""
    from .regime_report import fmt, mean_ci, paired

    chosen = tune(cfg, fsets, root, progress)
    plain = [train_run(cfg, fsets, "plain", loss, s, run_path(root, cfg, "plain", loss, chosen[f"plain-{loss}"], s),
                       chosen[f"plain-{loss}"], progress) for s in seeds]
    lines = [f"EE + {loss} ablation ({cfg['name']}, seeds {seeds}; tuned {chosen[f'ee-{loss}']}); Δ = paired by seed "
             "against plain, mean ± 95% CI, percent", "",
             "| variant | P@1 | MAP@R | Δ P@1 | Δ MAP@R | best it |", "|---|---|---|---|---|---|",
             f"| plain | {fmt(*mean_ci([r['metrics']['precision_at_1'] for r in plain]))} | "
             f"{fmt(*mean_ci([r['metrics']['mean_average_precision_at_r'] for r in plain]))} | | | "
             f"{np.mean([r['best_iteration'] for r in plain]):.0f} |"]
    for variant in ABLATION:
        hp = dict(chosen[f"ee-{loss}"], **variant)
        rs = [train_run(cfg, fsets, "ee", loss, s, run_path(root, cfg, "ee", loss, hp, s), hp, progress) for s in seeds]
        name = ", ".join(f"{k}={v}" for k, v in variant.items())
        lines.append(f"| EE {name} | {fmt(*mean_ci([r['metrics']['precision_at_1'] for r in rs]))} | "
                     f"{fmt(*mean_ci([r['metrics']['mean_average_precision_at_r'] for r in rs]))} | "
                     f"{fmt(*mean_ci(paired(plain, rs, 'precision_at_1')))} | "
                     f"{fmt(*mean_ci(paired(plain, rs, 'mean_average_precision_at_r')))} | "
                     f"{np.mean([r['best_iteration'] for r in rs]):.0f} |")
    text = "\n".join(lines) + "\n"
    harness.atomic_write_bytes(os.path.join(root, cfg["name"], f"ablation-{loss}.md"), text.encode())
    print(text)
    return text


def features_alone(cfg, fsets, root: str) -> Dict[str, float]:
    """Test metrics of the pretrained pooled features themselves (view 0, no training): the
    floor every trained head is measured against. Cached in ``baseline.json``."""
    path = os.path.join(root, cfg["name"], "baseline.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    fs = fsets["pooled"]
    test = splits(fs, cfg.get("val_seed", 0))["test"]
    emb = torch.nn.functional.normalize(fs.features[torch.as_tensor(test), 0].float(), dim=1)
    out = retrieval_metrics(emb, fs.labels[test], FINAL_METRICS)
    harness.atomic_write_json(path, out)
    return out


def collect(cfg, root: str) -> List[Dict[str, Any]]:
    """Results of the tuned hyper-parameters of every cell and seed that has finished."""
    path = os.path.join(root, cfg["name"], "tuned.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        chosen = json.load(f)
    out = []
    for method, loss in cfg["cells"]:
        for seed in cfg["seeds"]:
            p = os.path.join(run_path(root, cfg, method, loss, chosen.get(f"{method}-{loss}", {}), seed), "result.json")
            if os.path.exists(p):
                with open(p) as f:
                    out.append(json.load(f))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    from . import regime_report

    ap = argparse.ArgumentParser(description="the pretrained-trunk regime (see the module docstring)")
    ap.add_argument("command", choices=("extract", "tune", "table", "train", "report", "ablation"))
    ap.add_argument("--config", required=True)
    ap.add_argument("--features", help="a feature file (benchmarks/pretrained.py format) instead of extraction")
    ap.add_argument("--data-root", help="folder of CUB/Cars/SOP/ImageFolder data")
    ap.add_argument("--method", choices=harness.METHODS)
    ap.add_argument("--loss", choices=harness.LOSSES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="ablation seeds")
    ap.add_argument("--root", default="runs")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=1,
                    help="train runs in this many single-thread worker processes (tune, table)")
    ap.add_argument("--cache-dir", help="where extracted trunk features are cached (default runs/cache)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    cfg = load_config(args.config)
    if args.cache_dir:
        cfg["cache_dir"] = args.cache_dir
    if args.features:
        cfg["data"] = {"name": "features", "path": args.features}
        cfg["mode"] = "frozen"
    if args.data_root:
        cfg["data"]["root"] = args.data_root
    threads = args.threads or cfg["train"].get("threads", torch.get_num_threads())
    progress = not args.no_progress
    if args.command == "report":
        path = os.path.join(args.root, cfg["name"], "baseline.json")
        base = json.load(open(path)) if os.path.exists(path) else None
        regime_report.write(cfg, collect(cfg, args.root), os.path.join(args.root, cfg["name"]), base)
        return 0
    t0 = time.perf_counter()
    torch.set_num_threads(max(threads, args.jobs))  # extraction runs before the workers: give it their cores
    fsets = feature_sets(cfg, progress)
    torch.set_num_threads(threads)
    print(f"features ready in {time.perf_counter() - t0:.0f}s: "
          + ", ".join(f"{k} {tuple(v.features.shape)}" for k, v in fsets.items()), flush=True)
    if args.command == "extract":
        return 0
    if args.command == "train":
        if not (args.method and args.loss):
            raise SystemExit("train needs --method and --loss")
        r = train_run(cfg, fsets, args.method, args.loss, args.seed,
                      run_path(args.root, cfg, args.method, args.loss, {}, args.seed), None, progress)
        print(json.dumps(r["metrics"], indent=1), "best iteration", r["best_iteration"])
        return 0
    if args.command == "ablation":
        if not args.loss:
            raise SystemExit("ablation needs --loss")
        ablation(cfg, fsets, args.root, args.loss, args.seeds, progress)
        return 0
    if args.command == "tune":
        print(json.dumps(tune(cfg, fsets, args.root, progress, args.jobs), indent=1))
        return 0
    table(cfg, fsets, args.root, progress, args.jobs)
    out = os.path.join(args.root, cfg["name"])
    regime_report.write(cfg, collect(cfg, args.root), out, features_alone(cfg, fsets, args.root))
    print(f"whole command: {(time.perf_counter() - t0) / 60:.1f} min; report in {out}/table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
