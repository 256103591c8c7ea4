#!/usr/bin/env python
"""Build the IconThemes data set from 13 Debian (bookworm) icon-theme packages.

IconThemes is a class-disjoint retrieval set shaped like Stanford Online
Products: a class is one icon *concept* (``edit-copy``, ``folder-music``,
``audio-x-generic``, ...) and its images are the drawings of that concept by
different icon themes (designers), one per theme, as 64x64 RGB uint8.

Pipeline (deterministic: sorted walks, fixed theme order, fixed seed)::

    .deb --dpkg-deb -x--> theme trees --index.theme--> (theme, name) candidates
        --> one file per (theme, name): the size nearest to 64 px
        --> union-find of names: symlinks / identical files inside a theme
        --> render (rsvg-convert at 64 px, or the bitmap resampled to 64 px),
            composite on white --> union-find also on identical renders
        --> one image per theme and concept, drop exact / near-exact repeats
            inside a concept, keep concepts drawn by >= --min-themes themes
        --> seeded class-disjoint split --> iconthemes.npz, LICENSES.md,
            build_report.md, contact sheet

Typical use::

    mkdir -p /tmp/ic/debs && cd /tmp/ic/debs && apt-get download \\
        papirus-icon-theme breeze-icon-theme oxygen-icon-theme tango-icon-theme \\
        elementary-xfce-icon-theme numix-icon-theme moka-icon-theme faba-icon-theme \\
        adwaita-icon-theme gnome-icon-theme mate-icon-theme paper-icon-theme \\
        yaru-theme-icon librsvg2-bin
    python benchmarks/build_iconthemes.py --debs-dir /tmp/ic/debs --work-dir /tmp/ic/work

``librsvg2-bin`` is only unpacked for its ``rsvg-convert`` (it links against the
system's ``librsvg2-2``); pass ``--rsvg-convert`` to use another binary.  The
renderer, its library versions, Pillow and numpy are stored in the metadata.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.build_fontglyphs import _md_escape, unpack_debs  # noqa: E402

# package -> the one theme directory (flavour) used from it, in the fixed theme order.
THEMES: Dict[str, str] = {
    "adwaita-icon-theme": "Adwaita",
    "breeze-icon-theme": "breeze",
    "elementary-xfce-icon-theme": "elementary-xfce",
    "faba-icon-theme": "Faba",
    "gnome-icon-theme": "gnome",
    "mate-icon-theme": "mate",
    "moka-icon-theme": "Moka",
    "numix-icon-theme": "Numix",
    "oxygen-icon-theme": "oxygen",
    "paper-icon-theme": "Paper",
    "papirus-icon-theme": "Papirus",
    "tango-icon-theme": "Tango",
    "yaru-theme-icon": "Yaru",
}
TOOL_PACKAGES = ("librsvg2-bin",)
# Packages whose debian/copyright has no DEP-5 header (read by hand).
FALLBACK_LICENSES = {
    "adwaita-icon-theme": "`*`: CC-BY-SA-3.0 or LGPL-3 (the file has DEP-5-like paragraphs without the Format header;"
                          " further paragraphs list CC-BY-SA-3.0-US or LGPL-3, CC-BY-SA-4.0 and others for some files)",
}
SIZE = 64
BACKGROUND = (255, 255, 255)
EXTS = (".png", ".svg", ".svgz")
# Name variants that are not separate drawings of a concept.
VARIANT_SUFFIXES = ("-symbolic", "-symbolic-rtl", "-rtl", "-ltr", "-dark", "-light")
# Sprite sheets (process-working) are not icons; panel icons are monochrome tray variants drawn
# for dark panels (white on transparent), like symbolic icons.
# Matched against the directory's Context and its path components.
SKIP_DIRS = ("symbolic", "animations", "panel")
CONTEXTS = {
    "actions": "actions", "applications": "apps", "apps": "apps", "categories": "categories",
    "devices": "devices", "emblems": "emblems", "emotes": "emotes", "mimetypes": "mimetypes",
    "places": "places", "status": "status", "notifications": "status", "panel": "panel",
    "international": "intl", "intl": "intl", "stock": "stock",
}


# ----------------------------------------------------------------------------
# Union-find
# ----------------------------------------------------------------------------


class UnionFind:
    """Union-find over hashable keys; the root of a set is its smallest key (deterministic)."""

    def __init__(self) -> None:
        self.parent: Dict[str, str] = {}

    def add(self, x: str) -> None:
        self.parent.setdefault(x, x)

    def find(self, x: str) -> str:
        self.add(x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo

    def union_all(self, items: Iterable[str]) -> None:
        items = list(items)
        for x in items[1:]:
            self.union(items[0], x)

    def groups(self) -> Dict[str, List[str]]:
        out: Dict[str, List[str]] = collections.defaultdict(list)
        for x in sorted(self.parent):
            out[self.find(x)].append(x)
        return dict(out)


# ----------------------------------------------------------------------------
# Themes
# ----------------------------------------------------------------------------


def parse_index_theme(text: str) -> Dict[str, Dict[str, str]]:
    """Sections of a freedesktop ``index.theme`` as {section: {key: value}}."""
    sections: Dict[str, Dict[str, str]] = {}
    cur: Optional[Dict[str, str]] = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            cur = sections.setdefault(line[1:-1], {})
        elif cur is not None and "=" in line:
            k, v = line.split("=", 1)
            cur[k.strip()] = v.strip()
    return sections


@dataclass(frozen=True)
class IconDir:
    path: str  # relative to the theme root
    size: int
    kind: str  # Fixed / Scalable / Threshold
    min_size: int
    max_size: int
    scale: int
    context: str  # normalised category, "" if unknown

    @property
    def effective_size(self) -> int:
        """The size this directory draws at when asked for SIZE px (freedesktop lookup rules)."""
        if self.kind == "Scalable":
            return min(max(SIZE, self.min_size), self.max_size)
        return self.size


def theme_dirs(index: Dict[str, Dict[str, str]]) -> List[IconDir]:
    """The icon directories an ``index.theme`` declares (Directories + ScaledDirectories)."""
    head = index.get("Icon Theme", {})
    names = [d for key in ("Directories", "ScaledDirectories") for d in head.get(key, "").split(",") if d.strip()]
    out, seen = [], set()
    for d in names:
        d = d.strip()
        if d in seen or d not in index:
            continue
        seen.add(d)
        s = index[d]
        size = int(s.get("Size", "0"))
        ctx = s.get("Context", "").strip().lower()
        out.append(IconDir(d, size, s.get("Type", "Threshold"), int(s.get("MinSize", size)),
                           int(s.get("MaxSize", size)), int(s.get("Scale", "1")), CONTEXTS.get(ctx, "")))
    return out


def dir_rank(d: IconDir) -> Tuple[float, int, int]:
    """Sort key: nearest to SIZE (log scale), then larger (downscaling), then designed sizes."""
    eff = max(d.effective_size, 1)
    return (abs(math.log2(eff / SIZE)), 0 if eff >= SIZE else 1, 1 if d.kind == "Scalable" else 0)


def variant_of(name: str) -> Optional[str]:
    """The variant suffix that excludes an icon name (``-symbolic``, ``-rtl`` ...), or None."""
    for suf in VARIANT_SUFFIXES:
        if name.endswith(suf):
            return suf
    return None


@dataclass
class IconFile:
    theme: str
    name: str
    relpath: str  # relative to the theme root
    path: str  # absolute, symlinks resolved
    ext: str
    dir: IconDir
    link: bool
    sha: str = ""  # of the resolved file's bytes

    @property
    def key(self) -> str:
        return f"{self.theme}/{self.name}"


def _sha(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def scan_theme(theme: str, root: str, skipped: collections.Counter) -> List[IconFile]:
    """Every usable icon file of one theme, in sorted order; counts skipped files in ``skipped``."""
    with open(os.path.join(root, "index.theme"), encoding="utf-8", errors="replace") as fh:
        dirs = theme_dirs(parse_index_theme(fh.read()))
    files: List[IconFile] = []
    for d in sorted(dirs, key=lambda d: d.path):
        full = os.path.join(root, d.path)
        if not os.path.isdir(full):
            continue
        for fn in sorted(os.listdir(full)):
            p = os.path.join(full, fn)
            stem, ext = os.path.splitext(fn)
            if os.path.isdir(p):
                continue
            if ext.lower() not in EXTS:
                skipped[(theme, f"format {ext.lower() or '(none)'}")] += 1
                continue
            if stem.endswith(".symbolic"):  # foo.symbolic.png: rendered symbolic icons
                skipped[(theme, "variant -symbolic")] += 1
                continue
            if d.scale != 1:
                skipped[(theme, "scaled directory (@2x)")] += 1
                continue
            hit = [k for k in SKIP_DIRS if k == d.context or k in d.path.split("/")]
            if hit:
                skipped[(theme, f"{hit[0]} directory")] += 1
                continue
            v = variant_of(stem)
            if v:
                skipped[(theme, f"variant {v}")] += 1
                continue
            real = os.path.realpath(p)
            if not os.path.isfile(real):
                skipped[(theme, "dangling symlink")] += 1
                continue
            files.append(IconFile(theme, stem, os.path.relpath(p, root), real, ext.lower(), d, os.path.islink(p)))
    shas: Dict[str, str] = {}
    for f in files:
        if f.path not in shas:
            shas[f.path] = _sha(f.path)
        f.sha = shas[f.path]
    return files


def best_files(files: Sequence[IconFile]) -> Dict[str, IconFile]:
    """One file per (theme, name): the one whose directory is nearest to SIZE px."""
    by_key: Dict[str, List[IconFile]] = collections.defaultdict(list)
    for f in files:
        by_key[f.key].append(f)
    return {k: min(v, key=lambda f: (dir_rank(f.dir), f.relpath)) for k, v in sorted(by_key.items())}


def shared_files(files: Sequence[IconFile]) -> Dict[Tuple[str, str], List[str]]:
    """(theme, file sha) -> sorted names, for files (any size; symlinks resolved, or
    byte-identical copies) that one theme uses for two or more names."""
    groups: Dict[Tuple[str, str], set] = collections.defaultdict(set)
    for f in files:
        groups[(f.theme, f.sha)].add(f.name)
    return {k: sorted(v) for k, v in sorted(groups.items()) if len(v) > 1}


def alias_unions(files: Sequence[IconFile], groups: Dict[Tuple[str, str], List[str]], uf: UnionFind,
                 min_themes: int, min_frac: float) -> Tuple[int, int]:
    """Union two names when they share a file in >= ``min_themes`` themes and in >= ``min_frac`` of
    the themes that have both names (consistent aliases).  Returns (pairs sharing a file, pairs merged)."""
    has: Dict[str, set] = collections.defaultdict(set)
    for f in files:
        uf.add(f.name)
        has[f.name].add(f.theme)
    shared: Dict[Tuple[str, str], set] = collections.defaultdict(set)
    for (theme, _), names in groups.items():
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                shared[(a, b)].add(theme)
    merged = 0
    for (a, b), themes in sorted(shared.items()):
        if len(themes) >= min_themes and len(themes) >= min_frac * len(has[a] & has[b]):
            uf.union(a, b)
            merged += 1
    return len(shared), merged


def conflicts(files: Sequence[IconFile], groups: Dict[Tuple[str, str], List[str]], uf: UnionFind
              ) -> Dict[Tuple[str, str], str]:
    """(theme, name) entries to drop: a file a theme uses for names of two or more concepts.

    The names of the concept that owns the file (the concept of the file's own name, the target of
    the symlinks) keep it; every other name of the group loses that theme's drawing.  Returns
    {(theme, name): reason}.
    """
    path_of = {(f.theme, f.sha): f.path for f in files}
    out: Dict[Tuple[str, str], str] = {}
    for (theme, sha), names in groups.items():
        concepts = {uf.find(n) for n in names}
        if len(concepts) < 2:
            continue
        owner = os.path.splitext(os.path.basename(path_of[(theme, sha)]))[0]
        owner_c = uf.find(owner) if owner in names else None
        for n in names:
            if uf.find(n) != owner_c:
                out.setdefault((theme, n), f"shares {os.path.basename(path_of[(theme, sha)])} with "
                                           f"{len(concepts) - 1} other concept(s)")
    return out


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------


def composite(rgba: np.ndarray, background: Tuple[int, int, int] = BACKGROUND) -> np.ndarray:
    """Straight-alpha RGBA uint8 [H,W,4] over an opaque background -> RGB uint8 [H,W,3]."""
    a = rgba[..., 3:4].astype(np.float64) / 255.0
    out = rgba[..., :3].astype(np.float64) * a + np.asarray(background, np.float64) * (1.0 - a)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def fit(rgb: np.ndarray, size: int = SIZE, background: Tuple[int, int, int] = BACKGROUND) -> np.ndarray:
    """Resize (Lanczos, keeping the aspect ratio) so the longer side is ``size``; centre on ``size`` x ``size``."""
    from PIL import Image

    h, w = rgb.shape[:2]
    if (h, w) != (size, size):
        s = size / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        rgb = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.Resampling.LANCZOS))
    if rgb.shape[:2] == (size, size):
        return rgb
    out = np.empty((size, size, 3), np.uint8)
    out[:] = background
    y, x = (size - rgb.shape[0]) // 2, (size - rgb.shape[1]) // 2
    out[y:y + rgb.shape[0], x:x + rgb.shape[1]] = rgb
    return out


def _rgba(im) -> np.ndarray:
    if im.mode != "RGBA":
        im = im.convert("RGBA")
    return np.asarray(im)


def render(f: IconFile, rsvg: str) -> np.ndarray:
    """RGB uint8 [SIZE,SIZE,3]: SVG rendered at SIZE px by rsvg-convert, bitmaps composited then resampled."""
    from PIL import Image

    if f.ext == ".png":
        with Image.open(f.path) as im:
            im.load()
            return fit(composite(_rgba(im)))
    png = subprocess.run([rsvg, "-w", str(SIZE), "-h", str(SIZE), "-a", "-f", "png", f.path],
                         check=True, capture_output=True).stdout
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        return fit(composite(_rgba(im)))


def pixel_hash(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


def mad(a: np.ndarray, b: np.ndarray, block: int = 4) -> float:
    """Mean absolute difference (0-255) of two uint8 [S,S,3] images after ``block`` x ``block`` box
    averaging, over the cells where either image is drawn.

    The box average hides resampling differences (one theme copied another's 48 px bitmap, the other
    ships the 256 px one); averaging over drawn cells only keeps a small icon on a large empty
    background from looking like a near copy of any other small icon."""
    s = a.shape[0] // block
    pa = a.astype(np.float64).reshape(s, block, s, block, 3).mean((1, 3))
    pb = b.astype(np.float64).reshape(s, block, s, block, 3).mean((1, 3))
    bg = np.asarray(BACKGROUND, np.float64)
    fg = (np.abs(pa - bg) > 8).any(-1) | (np.abs(pb - bg) > 8).any(-1)
    if not fg.any():
        return 0.0
    return float(np.abs(pa - pb)[fg].mean())


def is_faint(img: np.ndarray, min_frac: float = 0.02, level: int = 48) -> bool:
    """True when fewer than ``min_frac`` of the pixels differ from the background by more than
    ``level``: blank or near-invisible renders (white icons meant for dark panels)."""
    strong = (np.abs(img.astype(np.int16) - np.asarray(BACKGROUND, np.int16)) > level).any(-1)
    return bool(strong.mean() < min_frac)


# ----------------------------------------------------------------------------
# Concepts
# ----------------------------------------------------------------------------


@dataclass
class Concept:
    root: str
    names: List[str]  # every name of the component (sorted)
    name: str = ""  # display name: the member drawn by most themes
    category: str = ""
    images: Optional[Dict[str, IconFile]] = None  # theme -> chosen file


def build_concepts(best: Dict[str, IconFile], uf: UnionFind) -> List[Concept]:
    """Group the (theme, name) files by concept and choose one file per theme.

    Per theme the file of the concept's member name drawn by most themes is taken (ties: shorter
    name, then alphabetical), so that the images of a concept show the same name where possible.
    """
    n_themes = collections.Counter(f.name for f in best.values())
    rank = lambda n: (-n_themes[n], len(n), n)  # noqa: E731
    members: Dict[str, List[IconFile]] = collections.defaultdict(list)
    for f in best.values():
        members[uf.find(f.name)].append(f)
    out = []
    for root in sorted(members):
        fs = members[root]
        names = sorted({f.name for f in fs})
        per_theme: Dict[str, IconFile] = {}
        for f in sorted(fs, key=lambda f: rank(f.name)):
            per_theme.setdefault(f.theme, f)
        ctx = collections.Counter(f.dir.context for f in per_theme.values() if f.dir.context)
        cat = min(ctx, key=lambda c: (-ctx[c], c)) if ctx else "unknown"
        out.append(Concept(root, names, min(names, key=rank), cat, per_theme))
    return out


def near_duplicate(imgs: np.ndarray, thr: float) -> List[int]:
    """Indices (in order) to keep: an image is dropped if it is identical to, or within mean absolute
    difference ``thr`` (0-255) of, an earlier kept image."""
    keep: List[int] = []
    for i in range(len(imgs)):
        if all(mad(imgs[i], imgs[j]) > thr for j in keep):
            keep.append(i)
    return keep


def fork_pairs(per_concept: Iterable[Sequence[Tuple[int, np.ndarray]]], close: float, min_frac: float
               ) -> Tuple[Dict[Tuple[int, int], Tuple[int, int]], set]:
    """Theme pairs that copy each other: ({(a, b): (concepts both draw, of them within ``close``)},
    {(a, b) with a share of close pairs >= ``min_frac``}).  Distance: :func:`mad` with 8x8 blocks."""
    stats: Dict[Tuple[int, int], List[int]] = collections.defaultdict(lambda: [0, 0])
    for items in per_concept:
        items = sorted(items, key=lambda ti: ti[0])
        for i, (ta, a) in enumerate(items):
            for tb, b in items[i + 1:]:
                st = stats[(ta, tb)]
                st[0] += 1
                st[1] += mad(a, b, block=8) <= close
    out = {k: (v[0], v[1]) for k, v in sorted(stats.items())}
    return out, {k for k, (n, c) in out.items() if n and c / n >= min_frac}


def fork_copies(themes: Sequence[int], imgs: np.ndarray, forks: set, thr: float) -> List[int]:
    """Indices (theme order) to keep: an image is dropped if an earlier kept image of a theme it
    forms a fork pair with is within ``thr`` (:func:`mad`, 8x8 blocks)."""
    keep: List[int] = []
    for i in range(len(imgs)):
        if all((themes[j], themes[i]) not in forks or mad(imgs[i], imgs[j], block=8) > thr for j in keep):
            keep.append(i)
    return keep


def split_classes(n: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded class-disjoint halves of ``range(n)`` (train gets the extra class when n is odd)."""
    perm = np.random.RandomState(seed).permutation(n)
    n_test = n // 2
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# ----------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------


def contact_sheet(path: str, images: np.ndarray, labels: np.ndarray, names: Sequence[str], themes: np.ndarray,
                  n_concepts: int, seed: int) -> None:
    """Random concepts (rows) x their images (one per theme, in theme order), with the concept name."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    ncls = len(names)
    pick = np.sort(rng.choice(ncls, size=min(n_concepts, ncls), replace=False))
    cell, lab, nth = SIZE + 2, 200, len(THEMES)
    sheet = Image.new("RGB", (lab + cell * nth, cell * len(pick) + 16), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for k, t in enumerate(THEMES.values()):
        d.text((lab + k * cell + 2, 2), t[:10], fill=(0, 0, 0))
    for r, c in enumerate(pick):
        y = 16 + r * cell
        d.text((2, y + cell // 2 - 6), names[c][:32], fill=(0, 0, 0))
        for i in np.nonzero(labels == c)[0]:
            sheet.paste(Image.fromarray(images[i]), (lab + int(themes[i]) * cell + 1, y + 1))
        d.line([(0, y), (sheet.width, y)], fill=(200, 200, 200))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path, optimize=True)


def _tool_version(cmd: Sequence[str]) -> str:
    try:
        return subprocess.run(list(cmd), check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions(rsvg: str) -> Dict[str, str]:
    import PIL

    dpkg = lambda p: _tool_version(["dpkg-query", "-W", "-f=${Version}", p])  # noqa: E731
    return {"rsvg-convert": _tool_version([rsvg, "--version"]), "librsvg2-2": dpkg("librsvg2-2"),
            "libcairo2": dpkg("libcairo2"), "pillow": PIL.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0]}


def _license_lines(pkg) -> List[str]:
    """One line per (files, licence) paragraph of a package's machine-readable debian/copyright."""
    if not pkg.dep5:
        return [FALLBACK_LICENSES.get(pkg.name, "not machine-readable: see `usr/share/doc/%s/copyright`" % pkg.name)]
    seen, out = set(), []
    for globs, lic in pkg.licenses:
        if any(g.startswith("debian/") for g in globs):
            continue
        key = (" ".join(globs[:4]) + (" ..." if len(globs) > 4 else ""), lic)
        if key not in seen:
            seen.add(key)
            out.append(f"`{_md_escape(key[0])}`: {_md_escape(lic)}")
    return out or ["(no paragraphs)"]


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--debs-dir", required=True, help="directory with the 13 theme .deb files (+ librsvg2-bin)")
    ap.add_argument("--work-dir", default="/tmp/iconthemes-work", help="scratch dir for unpacking (outside the repo)")
    ap.add_argument("--out", default=os.path.join(ROOT, "data/iconthemes/iconthemes.npz"))
    ap.add_argument("--contact-sheet", default=os.path.join(ROOT, "docs/iconthemes_contact_sheet.png"))
    ap.add_argument("--rsvg-convert", default=None,
                    help="rsvg-convert binary (default: from librsvg2-bin in --debs-dir)")
    ap.add_argument("--min-themes", type=int, default=5, help="keep concepts drawn by at least this many themes")
    ap.add_argument("--alias-min-themes", type=int, default=2)
    ap.add_argument("--alias-min-frac", type=float, default=2 / 3)
    ap.add_argument("--near-mad", type=float, default=10.0,
                    help="near-exact duplicate: mean |diff| <= this (0-255) on 16x16 box averages, drawn cells")
    ap.add_argument("--fork-close", type=float, default=15.0, help="copy distance for the fork-pair statistic")
    ap.add_argument("--fork-min-frac", type=float, default=0.3, help="share of copies that makes a fork pair")
    ap.add_argument("--fork-mad", type=float, default=25.0, help="drop distance inside a fork pair (8x8 blocks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sheet-concepts", type=int, default=40)
    args = ap.parse_args(argv)
    t0 = time.time()
    out_dir = os.path.dirname(os.path.abspath(args.out))

    pkgs = unpack_debs(args.debs_dir, args.work_dir, tuple(THEMES) + TOOL_PACKAGES)
    rsvg = args.rsvg_convert or os.path.join(pkgs["librsvg2-bin"].root, "usr/bin/rsvg-convert")
    if not os.path.exists(rsvg) and shutil.which(rsvg) is None:
        raise SystemExit(f"rsvg-convert not found: {rsvg}")
    vers = versions(rsvg)
    print(f"renderer: {vers['rsvg-convert']} (librsvg2-2 {vers['librsvg2-2']})", flush=True)

    # 1. scan
    skipped: collections.Counter = collections.Counter()
    files: List[IconFile] = []
    scan_counts = {}
    for pkg, theme in THEMES.items():
        fs = scan_theme(theme, os.path.join(pkgs[pkg].root, "usr/share/icons", theme), skipped)
        scan_counts[theme] = (len(fs), len({f.name for f in fs}))
        files += fs
    print(f"scanned {len(files)} files, {len({f.name for f in files})} names ({time.time() - t0:.0f}s)", flush=True)

    # 2. concepts: consistent aliases merged, remaining shared files dropped
    groups = shared_files(files)
    uf = UnionFind()
    n_pairs, n_merged = alias_unions(files, groups, uf, args.alias_min_themes, args.alias_min_frac)
    dropped = conflicts(files, groups, uf)
    best = best_files([f for f in files if (f.theme, f.name) not in dropped])
    concepts = [c for c in build_concepts(best, uf) if len(c.images) >= args.min_themes]
    print(f"{n_merged} alias pairs merged of {n_pairs} sharing a file; {len(dropped)} (theme, name) dropped "
          f"as conflicts; {len(concepts)} concepts with >= {args.min_themes} themes before rendering", flush=True)

    # 3. render one image per (theme, concept)
    th_names = list(THEMES.values())
    theme_ids = {t: i for i, t in enumerate(th_names)}
    cache: Dict[str, np.ndarray] = {}
    rendered: List[Tuple[int, int, IconFile, np.ndarray]] = []  # concept index, theme id, file, image
    blank = 0
    for ci, c in enumerate(concepts):
        for theme in sorted(c.images, key=theme_ids.get):
            f = c.images[theme]
            if f.sha not in cache:
                cache[f.sha] = render(f, rsvg)
            img = cache[f.sha]
            if is_faint(img):
                blank += 1
                continue
            rendered.append((ci, theme_ids[theme], f, img))
        if (ci + 1) % 100 == 0:
            print(f"  rendered {ci + 1}/{len(concepts)} concepts ({time.time() - t0:.0f}s)", flush=True)

    # 4. identical renders in two concepts: the drawing is ambiguous -> dropped from all of them
    by_hash: Dict[str, set] = collections.defaultdict(set)
    for ci, _, _, img in rendered:
        by_hash[pixel_hash(img)].add(ci)
    ambiguous = {h for h, cs in by_hash.items() if len(cs) > 1}
    n_ambiguous = sum(1 for *_, img in rendered if pixel_hash(img) in ambiguous)
    rendered = [r for r in rendered if pixel_hash(r[3]) not in ambiguous]

    # 5. per concept: drop exact / near-exact repeats (theme order), then the theme threshold
    per_c: Dict[int, List[Tuple[int, int, IconFile, np.ndarray]]] = collections.defaultdict(list)
    for r in rendered:
        per_c[r[0]].append(r)
    pair_stats, forks = fork_pairs(([(r[1], r[3]) for r in rs] for rs in per_c.values()), args.fork_close,
                                   args.fork_min_frac)
    n_exact = n_near = n_fork = n_few = 0
    kept: List[Tuple[Concept, List[Tuple[int, int, IconFile, np.ndarray]]]] = []
    for ci in sorted(per_c):
        rs = per_c[ci]
        imgs = np.stack([r[3] for r in rs])
        hashes = [pixel_hash(im) for im in imgs]
        keep = near_duplicate(imgs, args.near_mad)
        n_dup = len(rs) - len(keep)
        n_ex = len(hashes) - len(set(hashes))
        n_exact += n_ex
        n_near += n_dup - n_ex
        rs = [rs[i] for i in keep]
        keep = fork_copies([r[1] for r in rs], np.stack([r[3] for r in rs]), forks, args.fork_mad)
        n_fork += len(rs) - len(keep)
        rs = [rs[i] for i in keep]
        if len(rs) < args.min_themes:
            n_few += 1
            continue
        kept.append((concepts[ci], rs))
    # concepts sorted by display name; ids 0..C-1
    kept.sort(key=lambda kv: kv[0].name)
    images = np.stack([r[3] for _, rs in kept for r in rs])
    labels = np.concatenate([np.full(len(rs), k, np.int32) for k, (_, rs) in enumerate(kept)])
    themes = np.asarray([r[1] for _, rs in kept for r in rs], np.int32)
    files_used = [r[2] for _, rs in kept for r in rs]
    names = [c.name for c, _ in kept]
    train_classes, test_classes = split_classes(len(kept), args.seed)
    meta = {"versions": vers, "fork_pairs": sorted([th_names[a], th_names[b]] for a, b in forks),
            "seed": args.seed, "size": SIZE, "background": list(BACKGROUND),
            "min_themes": args.min_themes, "near_mad": args.near_mad, "alias_min_themes": args.alias_min_themes,
            "alias_min_frac": args.alias_min_frac,
            "fork_close": args.fork_close, "fork_min_frac": args.fork_min_frac, "fork_mad": args.fork_mad,
            "packages": {p: pkgs[p].version for p in list(THEMES) + list(TOOL_PACKAGES)},
            "themes": THEMES, "renderer": "rsvg-convert -w 64 -h 64 -a (SVG); Pillow LANCZOS (bitmaps)"}
    os.makedirs(out_dir, exist_ok=True)
    np.savez_compressed(
        args.out, images=images, labels=labels, themes=themes,
        theme_names=np.asarray(list(THEMES.values())), theme_packages=np.asarray(list(THEMES)),
        concept_names=np.asarray(names), concept_categories=np.asarray([c.category for c, _ in kept]),
        concept_aliases=np.asarray([" ".join(c.names) for c, _ in kept]),
        image_names=np.asarray([f.name for f in files_used]),
        image_files=np.asarray([f.relpath for f in files_used]),
        train_classes=train_classes.astype(np.int32), test_classes=test_classes.astype(np.int32),
        metadata=np.asarray(json.dumps(meta, sort_keys=True)),
    )
    digest = hashlib.sha256(images.tobytes() + labels.tobytes() + themes.tobytes()).hexdigest()
    print(f"{len(kept)} concepts, {len(images)} images -> {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB); "
          f"arrays sha256 {digest} ({time.time() - t0:.0f}s)", flush=True)
    contact_sheet(args.contact_sheet, images, labels, names, themes, args.sheet_concepts, args.seed)
    write_licenses(os.path.join(out_dir, "LICENSES.md"), pkgs, themes)
    stats = {"seconds": time.time() - t0, "scan_counts": scan_counts, "skipped": skipped, "n_pairs": n_pairs,
             "n_merged": n_merged, "n_dropped": len(dropped), "n_before": len(concepts), "n_rendered": len(rendered)
             + n_ambiguous, "blank": blank, "n_ambiguous": n_ambiguous, "n_exact": n_exact, "n_near": n_near,
             "n_fork": n_fork, "pair_stats": pair_stats, "forks": forks,
             "n_few": n_few, "digest": digest, "size_mb": os.path.getsize(args.out) / 1e6}
    print(f"fork pairs: {sorted((th_names[a], th_names[b]) for a, b in forks)}; fork copies dropped: {n_fork}")
    write_report(os.path.join(out_dir, "build_report.md"), args, meta, stats, kept, labels, themes, files_used,
                 train_classes, test_classes)
    return 0


def write_licenses(path: str, pkgs, themes: np.ndarray) -> None:
    counts = np.bincount(themes, minlength=len(THEMES))
    lines = ["# IconThemes: themes and licences", "",
             "Every image of IconThemes is a render of one icon file of a Debian (bookworm) icon-theme package.",
             "The licences below are the paragraphs of each package's machine-readable `debian/copyright`",
             "(`Files` globs: licence); the full texts are in `usr/share/doc/<package>/copyright` of each",
             "package and in `/usr/share/common-licenses` on Debian.  The renders are distributed under the",
             "terms of the files they were rendered from (several themes are GPL or CC-BY-SA: keep the",
             "attribution and share-alike terms when redistributing the data set).", "",
             "| theme | package | version | images |", "| --- | --- | --- | --- |"]
    for k, (pkg, theme) in enumerate(THEMES.items()):
        lines.append(f"| {theme} | {pkg} | {pkgs[pkg].version} | {counts[k]} |")
    for pkg, theme in THEMES.items():
        lines += ["", f"## {theme} ({pkg} {pkgs[pkg].version})", ""]
        lines += [f"- {ln}" for ln in _license_lines(pkgs[pkg])]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def write_report(path: str, args, meta, stats, kept, labels, themes, files_used, train_classes, test_classes) -> None:
    per_c = np.bincount(labels)
    th_names = th = list(THEMES.values())
    rep = ["# IconThemes build report", "",
           f"Built by `benchmarks/build_iconthemes.py` in {stats['seconds']:.0f} s.", "",
           "## Summary", "",
           f"- **{len(kept)} concepts, {len(labels)} images** of {SIZE}x{SIZE} RGB (uint8), "
           f"{len(train_classes)} train / {len(test_classes)} test concepts (seed {args.seed}), "
           f"{int(np.isin(labels, train_classes).sum())} / {int(np.isin(labels, test_classes).sum())} images",
           f"- images per concept: min {per_c.min()}, median {np.median(per_c):g}, max {per_c.max()}",
           f"- `{os.path.relpath(args.out, ROOT)}`: {stats['size_mb']:.2f} MB; "
           f"sha256 of images+labels+themes bytes: `{stats['digest']}`",
           f"- renderer: {meta['versions']['rsvg-convert']} (librsvg2-2 {meta['versions']['librsvg2-2']}, libcairo2 "
           f"{meta['versions']['libcairo2']}), Pillow {meta['versions']['pillow']}, numpy {meta['versions']['numpy']}",
           f"- background: RGB {tuple(BACKGROUND)} (transparency composited on it, straight alpha)", "",
           "## Rules (in order) and counts", "",
           "1. **One flavour per theme**: " + ", ".join(f"{p} -> `{t}`" for p, t in THEMES.items()) + ".  Only the",
           "   directories its `index.theme` declares are read; `@2x` (Scale > 1), `symbolic`, `animations` and",
           "   `panel` (white tray icons for dark panels) directories are skipped, and so are names ending in "
           + ", ".join(f"`{s}`" for s in VARIANT_SUFFIXES)
           + " and `*.symbolic.png` (variants of a name, not other drawings).  Formats: PNG, SVG, SVGZ.",
           "2. **One file per (theme, name)**: the directory nearest to 64 px (|log2(size/64)|; a scalable",
           "   directory counts as 64 px when 64 is inside [MinSize, MaxSize]); ties: the larger size, then a",
           "   fixed-size directory, then the path.",
           "3. **Aliases merged (union-find)**: two names are one concept when one theme has them as the same file",
           f"   (symlink, resolved) or byte-identical files, at any size, in >= {args.alias_min_themes} themes"
           " and in >= "
           f"{args.alias_min_frac:.0%} of the themes that have both names.  {stats['n_pairs']} name pairs share a file "
           f"somewhere; {stats['n_merged']} pairs merged.",
           "   The literal rule (merge on a single shared file) was measured first: generic fall-back files",
           "   (e.g. Numix's `application-archive.svg` for 91 names) chain unrelated names into one component",
           "   of 4,761 names (edit-copy, folder-music, input-keyboard, ... together), so it is not used.",
           "4. **Shared files that stay ambiguous are dropped**: where a theme still uses one file for names of",
           f"   two concepts, only the concept of the file's own name (the symlink target) keeps it: "
           f"{stats['n_dropped']} (theme, name) entries dropped.  So no file is an image of two concepts.",
           "5. **One image per (theme, concept)**: the file of the member name drawn by most themes.",
           "6. **Render** at 64 px: SVG/SVGZ with rsvg-convert `-w 64 -h 64 -a`; bitmaps composited on the",
           "   background at their own size and resized with Pillow LANCZOS (longer side 64, centred).",
           f"   Concepts drawn by >= {args.min_themes} themes before rendering: {stats['n_before']}; images rendered: "
           f"{stats['n_rendered']}; blank or faint renders dropped (fewer than 2% of the pixels differ from the "
           f"background by > 48): {stats['blank']}.",
           f"7. **Identical renders in two concepts** are ambiguous drawings: dropped from all of them: "
           f"{stats['n_ambiguous']} images.",
           f"8. **Repeats inside a concept** (themes copying each other), in theme order: exact pixel repeats "
           f"dropped: {stats['n_exact']}; near-exact (mean |difference| <= {args.near_mad}/255 between 4x4 box "
           "averages (16x16), over the "
           f"cells drawn in either image): {stats['n_near']}.  The threshold was chosen by eye from pairs of",
           "   one concept: below ~8 nearly all pairs are copies (gnome/mate/Adwaita forks, elementary-xfce/Faba);",
           "   between 8 and 15 copies and distinct but similar drawings (generic text pages) mix; copies with",
           "   larger differences (other colours, other source sizes) are caught by rule 9 only inside fork pairs.",
           f"9. **Forks**: a theme pair is a fork pair when >= {args.fork_min_frac:.0%} of the concepts both draw are",
           f"   within {args.fork_close} of each other (the distance of rule 8 with 8x8 blocks, i.e. an 8x8 grid);"
           " inside a",
           f"   fork pair a later theme's image within {args.fork_mad} of an earlier one is dropped (copies"
           " re-exported at",
           "   another size or re-tinted).  Fork pairs: " + ", ".join(
               f"{th[a]}/{th[b]} ({stats['pair_stats'][(a, b)][1]} of {stats['pair_stats'][(a, b)][0]})"
               for a, b in sorted(stats["forks"])) + f"; images dropped: {stats['n_fork']}.",
           "   Most similar other pairs (copies / concepts both draw): " + ", ".join(
               f"{th[a]}/{th[b]} {c}/{n}" for (a, b), (n, c) in sorted(
                   ((k, v) for k, v in stats["pair_stats"].items() if k not in stats["forks"]),
                   key=lambda kv: -kv[1][1] / max(kv[1][0], 1))[:4]) + ".",
           f"10. **Concepts with < {args.min_themes} images left** dropped: {stats['n_few']}.",
           f"11. **Split**: the concepts (sorted by name) are permuted with numpy RandomState({args.seed}); "
           "half go to test.", "",
           "## Per theme", "", "| theme | package | version | files scanned | names | images kept |",
           "| --- | --- | --- | --- | --- | --- |"]
    tc = np.bincount(themes, minlength=len(th_names))
    for k, (pkg, th) in enumerate(THEMES.items()):
        nf, nn = stats["scan_counts"][th]
        rep.append(f"| {th} | {pkg} | {meta['packages'][pkg]} | {nf} | {nn} | {tc[k]} |")
    rep += ["", "## Skipped while scanning", "", "| theme | reason | files |", "| --- | --- | --- |"]
    for (th, reason), n in sorted(stats["skipped"].items()):
        rep.append(f"| {th} | {reason} | {n} |")
    cats = collections.Counter(c.category for c, _ in kept)
    cat_imgs = collections.Counter()
    for c, rs in kept:
        cat_imgs[c.category] += len(rs)
    rep += ["", "## Per category (majority `Context` of the concept's directories)", "",
            "| category | concepts | images |", "| --- | --- | --- |"]
    for cat in sorted(cats, key=lambda c: (-cats[c], c)):
        rep.append(f"| {cat} | {cats[cat]} | {cat_imgs[cat]} |")
    kinds = collections.Counter(
        "svg" if f.ext != ".png" else ("png 64" if f.dir.size == SIZE else f"png {f.dir.size} (resampled)")
        for f in files_used)
    rep += ["", "## Image sources", "", "| source | images |", "| --- | --- |"]
    for k in sorted(kinds, key=lambda k: (-kinds[k], k)):
        rep.append(f"| {k} | {kinds[k]} |")
    hist = collections.Counter(per_c.tolist())
    rep += ["", "## Images per concept", "", "| images | concepts |", "| --- | --- |"]
    for n in sorted(hist):
        rep.append(f"| {n} | {hist[n]} |")
    split = {int(c): "train" for c in train_classes}
    split.update({int(c): "test" for c in test_classes})
    rep += ["", "## Concepts", "", "| id | concept | split | category | images | themes | names merged |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for k, (c, rs) in enumerate(kept):
        al = " ".join(n for n in c.names if n != c.name)
        al = al[:120] + (" ..." if len(al) > 120 else "")
        rep.append(f"| {k} | {c.name} | {split[k]} | {c.category} | {len(rs)} | "
                   f"{' '.join(th_names[r[1]] for r in rs)} | {_md_escape(al)} |")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(rep) + "\n")


if __name__ == "__main__":
    sys.exit(main())
