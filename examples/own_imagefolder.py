"""Train, evaluate, save and query an embedding model on your own ImageFolder data set.

What it shows
    * your images as ``ROOT/<class name>/<image>`` (torchvision's ImageFolder layout), split into
      training and test CLASSES (class-disjoint, seeded; as in the CUB / Cars / SOP benchmarks:
      the test classes are never seen in training);
    * a PML loop (trunk + embedder, ``MultiSimilarityMiner``, ``MPerClassSampler``) with
      ``EmbeddingExpansionLoss(MultiSimilarityLoss())`` (``--plain`` for the MS loss alone);
    * evaluation on the test classes with Recall@K / NMI / F1 (pml_ext's AccuracyCalculator);
    * the model saved as ``state_dict`` + a small json of settings, and loaded back;
    * a retrieval demo with the reloaded model: a PNG with query images (blue frame) and their
      nearest test neighbours, framed green (same class) or red (other class).

    With no ``--root`` it first writes a few dozen fonts of the FontGlyphs subset shipped inside
    pml_ext as an ImageFolder into a temporary directory (one folder per font, one PNG per
    glyph), so it runs as is. The data loading is a tiny local equivalent of
    ``benchmarks.datasets.ImageFolderSplit``, so this file only needs pml_ext, PML, torchvision.

How to run
    python examples/own_imagefolder.py                              # embedded fonts, ~35 s on one CPU thread
    python examples/own_imagefolder.py --steps 3                    # a smoke test (seconds)
    python examples/own_imagefolder.py --root /data/my_images --image-size 128 --steps 2000

    Works from any directory if pml_ext is installed (``pip install -e .``); from a source
    checkout it also runs without installing. Outputs in ``--out`` (default
    ``./example_outputs``): ``own_imagefolder_model.pt``, ``own_imagefolder_settings.json``,
    ``own_imagefolder_retrieval.png``. For photos, a pretrained backbone (e.g. a torchvision
    ResNet with its ``fc`` replaced by ``nn.Identity()``) as ``trunk`` will do far better than the
    small CNN trained from scratch here.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pytorch_metric_learning import losses, miners, samplers
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

try:
    import pml_ext  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pml_ext.data import CHARS, FontGlyphs
from pml_ext.losses import EmbeddingExpansionLoss
from pml_ext.utils import AccuracyCalculator

GREEN, RED, BLUE, WHITE = (0, 170, 0), (220, 0, 0), (40, 110, 220), (255, 255, 255)


# ------------------------------------------------------------------------------------ data
def export_font_glyphs(root: str, num_fonts: int = 40, seed: int = 0) -> str:
    """Write ``num_fonts`` fonts of the embedded FontGlyphs subset as ``root/<font>/<glyph>.png``."""
    ds = FontGlyphs(split="all")
    fonts = np.random.RandomState(seed).choice(ds.num_classes, size=min(num_fonts, ds.num_classes), replace=False)
    for font in sorted(fonts):
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", ds.class_names[font]).strip("_")
        folder = os.path.join(root, f"{font:03d}_{name}")
        os.makedirs(folder, exist_ok=True)
        for i in np.nonzero(ds.labels == font)[0]:
            char = int(ds.char_ids[i])  # numbered: "A" and "a" must not collide on case-insensitive disks
            Image.fromarray(ds.images[i]).save(os.path.join(folder, f"{char:02d}_{CHARS[char]}.png"))
    return root


class ImageFolderSplit(Dataset):
    """``root/<class>/<image>`` restricted to some classes; labels remapped to ``0..C-1``."""

    def __init__(self, root: str, class_names: Sequence[str], transform: Callable[[Image.Image], Any]) -> None:
        self.class_names = list(class_names)
        self.transform = transform
        self.samples: List[Tuple[str, int]] = []
        for label, name in enumerate(self.class_names):
            folder = os.path.join(root, name)
            for dirpath, dirnames, filenames in os.walk(folder):
                dirnames.sort()  # deterministic order
                for fn in sorted(filenames):
                    if fn.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, fn), label))
        if not self.samples:
            raise FileNotFoundError(f"no images under {root} for classes {self.class_names[:5]}...")
        self.labels = np.array([label for _, label in self.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, i: int) -> Image.Image:
        return default_loader(self.samples[i][0])  # RGB PIL image

    def __getitem__(self, i: int) -> Tuple[Any, int]:
        return self.transform(self.load_image(i)), self.samples[i][1]


def class_disjoint_split(root: str, test_fraction: float = 0.5, seed: int = 0) -> Tuple[List[str], List[str]]:
    """Shuffle the class folders with ``seed``; ``test_fraction`` of them become test classes."""
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if len(classes) < 4:
        raise ValueError(f"{root}: need at least 4 class sub-folders (2 train, 2 test), found {len(classes)}")
    random.Random(seed).shuffle(classes)
    n_test = min(max(2, round(len(classes) * test_fraction)), len(classes) - 2)
    return sorted(classes[n_test:]), sorted(classes[:n_test])


def image_transforms(size: int, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    # no flips: they change the meaning of glyphs; add the augmentations that suit your data
    steps: List[Any] = [transforms.Resize((size, size))]
    if train:
        steps.append(transforms.RandomCrop(size, padding=max(1, size // 16)))  # small random shifts
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    return transforms.Compose(steps)


# ------------------------------------------------------------------------------------ model
class EmbeddingNet(nn.Module):
    """trunk (small CNN, any image size) + embedder (linear); one module, one state_dict."""

    def __init__(self, embedding_size: int = 64, width: int = 32, feature_size: int = 128) -> None:
        super().__init__()

        def block(cin: int, cout: int, pool: bool = True) -> list:
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            return layers + [nn.MaxPool2d(2)] if pool else layers

        self.trunk = nn.Sequential(
            *block(3, width), *block(width, 2 * width), *block(2 * width, 4 * width),
            *block(4 * width, feature_size, pool=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.embedder = nn.Linear(feature_size, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedder(self.trunk(x))


def save_model(model: EmbeddingNet, settings: Dict[str, Any], out: str) -> Tuple[str, str]:
    model_path = os.path.join(out, "own_imagefolder_model.pt")
    settings_path = os.path.join(out, "own_imagefolder_settings.json")
    torch.save(model.state_dict(), model_path)
    with open(settings_path, "w") as f:
        json.dump(settings, f, indent=2)
    return model_path, settings_path


def load_model(model_path: str, settings_path: str) -> Tuple[EmbeddingNet, Dict[str, Any]]:
    with open(settings_path) as f:
        settings = json.load(f)
    model = EmbeddingNet(**settings["model"])
    model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    return model.eval(), settings


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def embed(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised embeddings of a whole data set (so Euclidean k-NN = cosine k-NN)."""
    was_training = model.training
    model.eval()
    out = [model(x.to(device)).cpu() for x, _ in DataLoader(dataset, batch_size=batch_size)]
    model.train(was_training)
    return nn.functional.normalize(torch.cat(out), dim=1)


def evaluate(emb: torch.Tensor, labels: torch.Tensor, recall_k: Sequence[int]) -> Dict[str, float]:
    calc = AccuracyCalculator(include=("NMI", "F1") + tuple(f"recall_at_{k}" for k in recall_k),
                              recall_at_k=recall_k)
    res = calc.get_accuracy(emb, labels, emb, labels, ref_includes_query=True)
    return {k: float(v) for k, v in res.items()}


def retrieval_png(dataset: ImageFolderSplit, emb: torch.Tensor, path: str, num_queries: int = 6, k: int = 5,
                  seed: int = 0, thumb: int = 64) -> List[Tuple[int, List[int]]]:
    """Save a grid: each row a query (blue frame) and its k nearest neighbours (the query itself
    excluded), framed green if they share its class, red if not. Returns (query, neighbours)."""
    labels = torch.as_tensor(dataset.labels)
    rng = np.random.RandomState(seed)
    classes = rng.permutation(int(labels.max()) + 1)[:num_queries]  # queries from distinct classes
    queries = [int(rng.choice(np.nonzero(dataset.labels == c)[0])) for c in classes]
    sim = emb[queries] @ emb.T
    sim[torch.arange(len(queries)), torch.tensor(queries)] = -float("inf")
    k = min(k, len(dataset) - 1)
    neighbours = sim.topk(k, dim=1).indices.tolist()

    frame, gap, header = 4, 16, 22
    cell = thumb + 2 * frame
    width = cell * (k + 1) + gap + frame
    canvas = Image.new("RGB", (width, header + cell * len(queries) + frame), WHITE)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((frame, 4), "query", fill=BLUE, font=font)
    draw.text((cell + gap, 4), f"top-{k} neighbours: green = same class, red = other", fill=(0, 0, 0), font=font)

    def paste(i: int, x: int, y: int, color: Tuple[int, int, int]) -> None:
        draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=color)
        canvas.paste(dataset.load_image(i).resize((thumb, thumb)), (x + frame, y + frame))

    for row, (q, nbrs) in enumerate(zip(queries, neighbours)):
        y = header + row * cell
        paste(q, 0, y, BLUE)
        for col, n in enumerate(nbrs):
            paste(n, cell * (col + 1) + gap, y, GREEN if labels[n] == labels[q] else RED)
    canvas.save(path)
    return list(zip(queries, neighbours))


# ------------------------------------------------------------------------------------ main
def run(args: argparse.Namespace, root: str) -> Dict[str, float]:
    device = torch.device(args.device)
    train_classes, test_classes = class_disjoint_split(root, args.test_fraction, args.seed)
    train_set = ImageFolderSplit(root, train_classes, image_transforms(args.image_size, train=True))
    test_set = ImageFolderSplit(root, test_classes, image_transforms(args.image_size, train=False))
    print(f"{root}: train {len(train_classes)} classes / {len(train_set)} images, "
          f"test {len(test_classes)} classes / {len(test_set)} images (class-disjoint, seed {args.seed})")

    model = EmbeddingNet(args.embedding_size).to(device)
    loss_fn = losses.MultiSimilarityLoss()
    if not args.plain:
        loss_fn = EmbeddingExpansionLoss(loss_fn)
    loss_fn = loss_fn.to(device)
    miner = miners.MultiSimilarityMiner(epsilon=0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    m = args.m_per_class
    batch_size = min(args.batch_size, m * len(train_classes)) // m * m  # MPerClassSampler's constraints
    sampler = samplers.MPerClassSampler(train_set.labels, m=m, batch_size=batch_size,
                                        length_before_new_iter=args.steps * batch_size)
    loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True,
                        num_workers=args.workers)

    t0 = time.perf_counter()
    for step, (images, labels) in enumerate(loader):
        images, labels = images.to(device), labels.to(device)
        embeddings = model(images)
        loss = loss_fn(embeddings, labels, miner(embeddings, labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    train_seconds = time.perf_counter() - t0

    emb = embed(model, test_set, device)
    metrics = evaluate(emb, torch.as_tensor(test_set.labels), args.recall_k)
    print("test classes: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    settings = {
        "model": {"embedding_size": args.embedding_size},
        "image_size": args.image_size,
        "normalize": {"mean": [0.5] * 3, "std": [0.5] * 3},
        "loss": type(loss_fn).__name__ + ("" if args.plain else "(MultiSimilarityLoss)"),
        "steps": args.steps, "batch_size": batch_size, "m_per_class": m, "lr": args.lr, "seed": args.seed,
        "root": None if args.root is None else os.path.abspath(args.root),
        "train_classes": train_classes, "test_classes": test_classes,
        "test_metrics": metrics, "train_seconds": train_seconds,
    }
    model_path, settings_path = save_model(model.cpu(), settings, args.out)
    print(f"saved {model_path} and {settings_path}")

    # retrieval demo with the model loaded back from disk
    reloaded, settings = load_model(model_path, settings_path)
    emb = embed(reloaded, test_set, torch.device("cpu"))
    png = os.path.join(args.out, "own_imagefolder_retrieval.png")
    results = retrieval_png(test_set, emb, png, args.demo_queries, args.demo_k, args.seed)
    for q, nbrs in results:
        same = sum(test_set.labels[n] == test_set.labels[q] for n in nbrs)
        print(f"query {os.path.relpath(test_set.samples[q][0], root)}: {same}/{len(nbrs)} neighbours of its class")
    print(f"wrote {png}")
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=None, help="ImageFolder root (class sub-folders); default: embedded fonts")
    ap.add_argument("--num-fonts", type=int, default=40, help="fonts exported when no --root is given")
    ap.add_argument("--test-fraction", type=float, default=0.5, help="share of CLASSES held out for testing")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300, help="training iterations (3 = smoke test)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--m-per-class", type=int, default=4)
    ap.add_argument("--embedding-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--plain", action="store_true", help="MultiSimilarityLoss without Embedding Expansion")
    ap.add_argument("--recall-k", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--demo-queries", type=int, default=6)
    ap.add_argument("--demo-k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="example_outputs", help="folder for the model, settings and PNG")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # MPerClassSampler draws from numpy's global RNG
    os.makedirs(args.out, exist_ok=True)
    if args.root is not None:
        return run(args, args.root)
    with tempfile.TemporaryDirectory(prefix="fontglyphs_imagefolder_") as tmp:
        print(f"no --root: writing {args.num_fonts} fonts of the embedded FontGlyphs subset to {tmp}")
        return run(args, export_font_glyphs(tmp, args.num_fonts, args.seed))


if __name__ == "__main__":
    main()
