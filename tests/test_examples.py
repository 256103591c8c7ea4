"""The scripts in examples/ run as they are (reduced mode, --steps 3) and write what they promise."""
import csv
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("NMI", "F1", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8")


def run_example(name, out, *args):
    cmd = [sys.executable, os.path.join("examples", name), "--steps", "3", "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def printed_metrics(stdout):
    found = dict(re.findall(r"(\w+)=([0-9.]+)", stdout))
    assert set(METRICS) <= set(found), stdout
    values = {k: float(found[k]) for k in METRICS}
    assert all(0.0 <= v <= 1.0 for v in values.values()), values
    return values


def check_metrics_json(path):
    with open(path) as f:
        metrics = json.load(f)["metrics"]
    assert set(METRICS) <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in METRICS)


def test_add_ee_to_pml_loop(tmp_path):
    # --ee only: the plain run is the same script minus one line (and costs another ~6 s)
    out = run_example("add_ee_to_pml_loop.py", tmp_path, "--ee")
    assert "EmbeddingExpansionLoss" in out
    printed_metrics(out)
    check_metrics_json(tmp_path / "add_ee_to_pml_loop_ee.json")


def test_hdml_pml_loop(tmp_path):
    out = run_example("hdml_pml_loop.py", tmp_path, "--log-every", "1")
    for term in ("J_m", "J_avg", "metric_weight"):
        assert term in out
    printed_metrics(out)
    with open(tmp_path / "hdml_pml_loop_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert all(0.0 < float(r["metric_weight"]) <= 1.0 and float(r["J_m"]) >= 0.0 for r in rows)
    check_metrics_json(tmp_path / "hdml_pml_loop.json")


def _check_saved_model(out_dir, image_size):
    import torch
    from PIL import Image

    settings = json.loads((out_dir / "own_imagefolder_settings.json").read_text())
    assert set(METRICS) <= set(settings["test_metrics"])
    assert not set(settings["train_classes"]) & set(settings["test_classes"])  # class-disjoint
    state = torch.load(out_dir / "own_imagefolder_model.pt", map_location="cpu", weights_only=True)
    assert state["embedder.weight"].shape[0] == settings["model"]["embedding_size"]
    assert settings["image_size"] == image_size
    with Image.open(out_dir / "own_imagefolder_retrieval.png") as im:
        assert im.width > 100 and im.height > 100
    return settings


def test_own_imagefolder_default_runs_on_embedded_fonts(tmp_path):
    out = run_example("own_imagefolder.py", tmp_path, "--num-fonts", "12")
    assert "no --root" in out
    printed_metrics(out)
    settings = _check_saved_model(tmp_path, 32)
    assert len(settings["train_classes"]) == len(settings["test_classes"]) == 6


def test_own_imagefolder_with_root(tmp_path):
    """A user's own folder: RGB JPEGs of another size, a few classes."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "my_images"
    rng = np.random.RandomState(0)
    for c in range(6):
        (root / f"class_{c}").mkdir(parents=True)
        base = rng.randint(0, 256, size=3)
        for i in range(5):
            pixels = np.clip(base + rng.randint(-30, 30, size=(40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"img_{i}.jpg")
    out_dir = tmp_path / "out"
    out = run_example("own_imagefolder.py", out_dir, "--root", str(root), "--image-size", "24", "--demo-queries", "3")
    assert "no --root" not in out
    printed_metrics(out)
    settings = _check_saved_model(out_dir, 24)
    assert len(settings["train_classes"]) == len(settings["test_classes"]) == 3


def test_log_with_record_keeper(tmp_path):
    out = run_example("log_with_record_keeper.py", tmp_path)
    logs = tmp_path / "record_keeper_logs"
    with open(logs / "loss_EmbeddingExpansionLoss.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert all(0.0 <= float(r["synthetic_selection_ratio"]) <= 1.0 and int(r["num_synthetic"]) > 0 for r in rows)
    with open(logs / "train.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert (logs / "miner_MultiSimilarityMiner.csv").exists()
    assert "synthetic_selection_ratio" in out and "total_loss" in out
    assert (tmp_path / "record_keeper_curves.png").stat().st_size > 10_000
