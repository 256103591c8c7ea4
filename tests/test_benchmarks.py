"""The benchmark harness: resumable runs, atomic results, tables, and the paper protocol smoke test."""
import copy
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks import harness, report
from benchmarks.run import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_quick(epochs=2, iters=3):
    cfg = copy.deepcopy(load_config("quick"))
    cfg["train"].update(epochs=epochs, iters_per_epoch=iters, batch_size=32)
    cfg["model"]["embedding_size"] = 16
    return cfg


def test_killed_run_resumes_to_the_same_result(tmp_path):
    cfg = tiny_quick()
    full = harness.train_cell(cfg, "ee", "ms", 0, str(tmp_path / "full"), progress=False)
    with pytest.raises(SystemExit):
        harness.train_cell(cfg, "ee", "ms", 0, str(tmp_path / "killed"), progress=False, stop_after_epoch=1)
    assert not (tmp_path / "killed" / "result.json").exists()
    assert (tmp_path / "killed" / "checkpoint.pt").exists()
    resumed = harness.train_cell(cfg, "ee", "ms", 0, str(tmp_path / "killed"), progress=False)
    assert resumed["metrics"] == full["metrics"]
    assert [e["loss"] for e in resumed["log"]] == [e["loss"] for e in full["log"]]


def test_real_kill_of_a_child_process_then_resume(tmp_path):
    """SIGKILL a training process mid-run; the checkpoint survives and the run completes."""
    cfg = tiny_quick(epochs=3, iters=4)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "benchmarks.run", "train", "--config", str(cfg_path), "--method", "plain",
           "--loss", "triplet", "--runs", str(tmp_path / "runs"), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    ckpt = None
    for _ in range(600):
        found = [os.path.join(d, "checkpoint.pt") for d, _, f in os.walk(tmp_path / "runs") if "checkpoint.pt" in f]
        if found:
            ckpt = found[0]
            break
        if proc.poll() is not None:
            break
        import time
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert ckpt is not None
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.load(open(os.path.join(os.path.dirname(ckpt), "result.json")))
    assert len(result["log"]) == 3 and 0 <= result["metrics"]["recall_at_1"] <= 1


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    harness.atomic_write_json(str(target), {"a": 1})

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(RuntimeError):
        harness.atomic_write_json(str(target), {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_every_cell_of_the_table_trains(tmp_path):
    cfg = tiny_quick(epochs=1, iters=2)
    results = []
    for method, loss in cfg["cells"]:
        r = harness.train_cell(cfg, method, loss, 0, str(tmp_path / f"{method}-{loss}"), progress=False)
        assert set(r["metrics"]) >= {"NMI", "F1", "recall_at_1", "recall_at_8"}
        assert all(np.isfinite(v) for v in r["metrics"].values())
        results.append(r)
    table = report.build_table(cfg, results)
    assert "EE + MS" in table and "EE improves MS" in table and "HDML improves N-pair" in table


def test_validation_split_never_touches_test_classes():
    cfg = load_config("quick")
    tr_x, tr_y, va_x, va_y = harness.load_arrays(cfg, "val")
    from pml_ext.data import load_font_glyphs

    all_train_x, _ = load_font_glyphs(None, "train")
    assert len(tr_x) + len(va_x) == len(all_train_x)
    assert not set(np.unique(tr_y)) & set(np.unique(va_y))


def test_report_verdicts():
    assert report.verdict(0.05, 0.01) == "holds"
    assert report.verdict(-0.05, 0.01) == "contradicted"
    assert report.verdict(0.01, 0.01).startswith("unclear")
    m, se = report.mean_se([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6) and se == pytest.approx(0.1 / np.sqrt(3))


def _tiny_cub(root, n_classes=4, per_class=3):
    from PIL import Image

    base = root / "CUB_200_2011"
    (base / "images").mkdir(parents=True)
    lines, labels = [], []
    i = 0
    rng = np.random.RandomState(0)
    for c in list(range(1, n_classes // 2 + 1)) + list(range(101, 101 + n_classes // 2)):
        d = base / "images" / f"{c:03d}.bird"
        d.mkdir()
        for k in range(per_class):
            i += 1
            Image.fromarray(rng.randint(0, 255, (40, 50, 3), dtype=np.uint8)).save(d / f"{k}.jpg")
            lines.append(f"{i} {c:03d}.bird/{k}.jpg")
            labels.append(f"{i} {c}")
    (base / "images.txt").write_text("\n".join(lines) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return root


def test_paper_protocol_smoke_on_tiny_cub(tmp_path):
    """GoogLeNet + CUB layout end to end (2 iterations, no weights): the GPU protocol's code path."""
    root = _tiny_cub(tmp_path / "cub")
    cfg = copy.deepcopy(load_config("cub_paper"))
    cfg["data"]["root"] = str(root)
    cfg["train"].update(epochs=1, iters_per_epoch=2, batch_size=4, per_class=2, workers=0)
    torch.manual_seed(0)
    r = harness.train_cell(cfg, "ee", "hphn", 0, str(tmp_path / "run"), progress=False)
    assert 0 <= r["metrics"]["recall_at_1"] <= 1
    with pytest.raises(SystemExit, match="--data-root"):
        cfg2 = copy.deepcopy(load_config("cub_paper"))
        harness.train_cell(cfg2, "plain", "ms", 0, str(tmp_path / "run2"), progress=False)


def _run_module(*args):
    out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_perf_ee_prints_side_by_side_ratios():
    out = _run_module("benchmarks.perf_ee", "--batch", "16", "--dim", "8", "--repeats", "1", "--device", "cpu",
                      "--compositions", "32x4", "zipf60")
    timing = out.split("peak memory")[0]
    rows = [line.split() for line in timing.splitlines() if line.split()[1:2] in (["TripletMarginLoss"], ["NPairsLoss"])]
    assert [r[0] for r in rows] == ["32x4", "32x4", "zipf60", "zipf60"]
    for row in rows:  # composition, loss, plain ms, EE ms, EE/plain, ...: ratios consistent with the times
        plain, ee, ratio = map(float, row[2:5])
        assert ratio == pytest.approx(ee / plain, rel=0.05, abs=0.01)  # printed with 2 decimals


def test_perf_ee_times_the_searches():
    out = _run_module("benchmarks.perf_ee", "--paths", "--batch", "16", "--dim", "8", "--repeats", "1",
                      "--device", "cpu", "--compositions", "random40")
    rows = [line.split() for line in out.splitlines() if line.startswith("random40")]
    assert len(rows) == 4 and all(r[-1] in ("blocked", "groups", "rows") for r in rows)
    numba = importlib.util.find_spec("numba") is not None
    for row in rows:  # composition, n, pairs, M, three entry counts, four times (compiled: nan without numba), choice
        assert len(row) == 12 and all(float(t) > 0 for t in row[7:10])
        assert float(row[10]) > 0 if numba else row[10] == "nan"


def test_search_crossover_times_both_searches_on_patterns_in_the_range():
    out = _run_module("benchmarks.perf_search_crossover", "--composition", "random40", "--entries", "0", "100000000",
                      "--patterns", "2", "--batch", "24", "--dim", "8")
    assert "random40 n=2: 2 patterns" in out and "rows faster on" in out


def test_perf_steps_runs_every_method_and_reports_memory():
    out = _run_module("benchmarks.perf_steps", "--config", "quick", "--losses", "triplet", "--repeats", "2",
                      "--warmup", "0", "--memory-repeats", "1", "--device", "cpu")
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("triplet ")}
    assert set(rows) == {"plain", "ee", "hdml"}
    assert float(rows["plain"][3]) == 1.0  # plain / plain
    if os.path.exists("/proc/self/clear_refs"):
        assert all(len(r) == 8 and float(r[6]) >= 0 for r in rows.values())  # peak MB measured


def test_perf_steps_random_sampler_runs_on_shuffled_batches():
    out = _run_module("benchmarks.perf_steps", "--config", "quick", "--losses", "npair", "--repeats", "2",
                      "--warmup", "0", "--memory-repeats", "1", "--device", "cpu", "--sampler", "random")
    assert "sampler random" in out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("npair ")}
    assert set(rows) == {"plain", "ee", "hdml"} and float(rows["plain"][3]) == 1.0


HDML_LOGGED = ("J_m", "J_syn", "J_gen", "J_avg", "metric_weight", "hardness_decay")


def test_stats_reads_hdml_terms_after_a_forward():
    """HDMLLoss records its terms with is_stat=False (``_record_these``); _stats reads them."""
    hdml, miner, is_hdml = harness.build_method("hdml", "triplet", {"hdml": {"alpha": 0.05}}, 12, 6, 4)
    assert is_hdml and miner is None
    x, y = torch.randn(16, 12), torch.arange(4).repeat_interleave(4)
    hdml(x, y, torch.nn.Linear(12, 6))
    got = harness._stats(hdml)
    assert set(got) == set(HDML_LOGGED)
    assert all(type(v) is float and np.isfinite(v) for v in got.values())
    for name in HDML_LOGGED:
        assert got[name] == pytest.approx(float(getattr(hdml, name)), rel=1e-12)
    assert got["J_gen"] > 0 and 0 < got["metric_weight"] <= 1 and 0 < got["hardness_decay"] <= 1


@pytest.mark.parametrize("name", ["fontglyphs_pretrained", "fontglyphs_pretrained_finetune",
                                  "fontglyphs_pretrained_finetune_100cls", "iconthemes_pretrained"])
def test_pretrained_configs_run_npair_hdml_uncapped_as_their_stored_results(name):
    """The JSON null reaches HDMLLoss as None (N-pair uncapped, as the stored results were made);
    HDML-Triplet keeps its cap of 128."""
    defaults = load_config(name)["defaults"]
    npair, _, _ = harness.build_method("hdml", "npair", defaults["npair"], 12, 6, 32)
    triplet, _, _ = harness.build_method("hdml", "triplet", defaults["triplet"], 12, 6, 32)
    assert npair.tuple_mode == "npair" and npair.max_synthetic_tuples is None
    assert triplet.max_synthetic_tuples == 128
    x, y = torch.randn(128, 12), torch.arange(32).repeat(4)  # the regime's batch: 32 classes x 4
    npair(x, y, torch.nn.Linear(12, 6))
    assert npair.num_synthetic_tuples == 32 * 31


def test_stats_prefers_the_wrappers_record_over_its_miners():
    """EE records on the wrapper; a given miner with collect_stats keeps its stale zero."""
    from pytorch_metric_learning import losses as pml_losses

    from pml_ext.losses import EmbeddingExpansionLoss
    from pml_ext.miners import EmbeddingExpansionMiner

    loss = EmbeddingExpansionLoss(pml_losses.TripletMarginLoss(), miner=EmbeddingExpansionMiner(collect_stats=True),
                                  collect_stats=True)
    g = torch.Generator().manual_seed(0)
    loss(torch.randn(16, 6, generator=g), torch.arange(4).repeat_interleave(4))
    assert loss.miner.synthetic_selection_ratio == 0 < loss.synthetic_selection_ratio
    assert harness._stats(loss) == {"synthetic_selection_ratio": pytest.approx(loss.synthetic_selection_ratio)}


def test_hdml_and_ee_cells_log_their_statistics_per_epoch(tmp_path):
    cfg = tiny_quick(epochs=2, iters=2)
    hdml = harness.train_cell(cfg, "hdml", "triplet", 0, str(tmp_path / "hdml"), progress=False)
    assert [e["epoch"] for e in hdml["log"]] == [1, 2]
    for entry in hdml["log"]:
        assert set(HDML_LOGGED) <= set(entry), entry
        assert all(np.isfinite(entry[k]) for k in HDML_LOGGED)
        assert entry["J_gen"] > 0 and 0 < entry["metric_weight"] <= 1 and 0 < entry["hardness_decay"] <= 1
    ee = harness.train_cell(cfg, "ee", "ms", 0, str(tmp_path / "ee"), progress=False)
    assert all(0 <= e["synthetic_selection_ratio"] <= 1 for e in ee["log"])
    plain = harness.train_cell(cfg, "plain", "ms", 0, str(tmp_path / "plain"), progress=False)
    assert all(set(e) == {"epoch", "loss"} for e in plain["log"])
