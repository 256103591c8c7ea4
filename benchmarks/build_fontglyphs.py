#!/usr/bin/env python
"""Build the FontGlyphs dataset from Debian font packages.

FontGlyphs is a font-identification data set: every class is one typeface
(one font file after de-duplication) and every class has exactly 62 images,
the glyphs ``0-9A-Za-z`` rendered to 32x32 uint8.  A second view uses the
62 characters as classes.

Pipeline (deterministic: sorted file order, fixed seed)::

    .deb files --dpkg-deb -x--> font files --fontTools--> cmap / outline check
        --Pillow/FreeType--> 62 glyph renders --> quality filters
        --> near-duplicate merge (pixels + outlines) --> seeded class split
        --> fontglyphs.npz, subset npz, LICENSES.md, build_report.md, contact sheet

Typical use (the .deb files are fetched with ``apt-get download``)::

    mkdir -p /work/scratch/debs && cd /work/scratch/debs && apt-get download \\
        fonts-aenigma fonts-urw-base35 fonts-texgyre fonts-freefont-ttf \\
        fonts-lmodern fonts-cmu fonts-dustin fonts-bwht fonts-croscore \\
        fonts-liberation2 fonts-roboto-unhinted fonts-sil-gentiumplus \\
        fonts-noto-core fonts-dejavu-core fonts-dejavu-extra
    python benchmarks/build_fontglyphs.py --debs-dir /work/scratch/debs \\
        --work-dir /work/scratch/fontglyphs-work

Rendering pins: glyphs are rendered with Pillow's BASIC layout engine
(FreeType only, no raqm shaping), at one pixel size per font (``--render-px``
per em), anchored on the baseline (``anchor="ls"``).  The Pillow, FreeType and
fontTools versions are stored in the metadata so that a rebuild can be
compared; a different FreeType can change anti-aliasing by a grey level or so.
"""
from __future__ import annotations

import argparse
import collections
import fnmatch
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PACKAGES = (
    "fonts-aenigma",
    "fonts-urw-base35",
    "fonts-texgyre",
    "fonts-freefont-ttf",
    "fonts-lmodern",
    "fonts-cmu",
    "fonts-dustin",
    "fonts-bwht",
    "fonts-croscore",
    "fonts-liberation2",
    "fonts-roboto-unhinted",
    "fonts-sil-gentiumplus",
    "fonts-noto-core",
    "fonts-dejavu-core",
    "fonts-dejavu-extra",
)
SFNT_EXT = (".ttf", ".otf", ".ttc")
# Other font formats found in the packages. They are alternative packagings of
# faces the same package ships as OpenType/TrueType; the build checks that and
# skips them (see ``discover_fonts``).
ALT_EXT = (".t1", ".pfb", ".pfa", ".woff", ".woff2")

# Licences for packages whose debian/copyright is not machine-readable (DEP-5).
# Taken from reading those files by hand.
FALLBACK_LICENSES = {
    "fonts-dustin": "GPL-2 (debian/copyright: 'GNU General Public License', text in common-licenses/GPL-2)",
    "fonts-lmodern": "GUST-Font-License (debian/copyright, README-Latin-Modern)",
}

# Short notes on the licence identifiers used in the packages' debian/copyright.
LICENSE_NOTES = {
    "madduck-special-license": "Brian Kent's written permission (quoted in debian/copyright of fonts-aenigma):"
    " redistribution, derived fonts and modified fonts are allowed, with attribution to him.",
    "AGPL-3 with Font exception": "GNU AGPL v3 with a font exception (embedding in documents does not make"
    " the documents AGPL).",
    "GPL-3+ with Special Font Exception": "GNU GPL v3 or later with the GNU FreeFont font exception.",
    "GPL-2": "GNU GPL v2.",
    "GUST-Font-License": "GUST Font License (LaTeX Project Public License with a font-specific clause).",
    "OFL-1.1": "SIL Open Font License 1.1.",
    "SIL-1.1": "SIL Open Font License 1.1.",
    "SIL-OFL-1.1": "SIL Open Font License 1.1.",
    "OFL-1.1-RFN": "SIL Open Font License 1.1 with Reserved Font Names.",
    "Apache-2.0": "Apache License 2.0.",
    "bitstream-vera": "Bitstream Vera font licence (permissive; DejaVu changes are public domain).",
}

IMG = 32  # output side
MARGIN_PX = 1  # blank margin (output pixels) around the union box


# ----------------------------------------------------------------------------
# Packages
# ----------------------------------------------------------------------------


@dataclass
class Package:
    name: str
    version: str
    deb: str
    root: str  # unpacked tree
    licenses: List[Tuple[List[str], str]] = field(default_factory=list)  # DEP-5 (globs, licence)
    dep5: bool = False

    def license_for(self, relpath: str) -> str:
        """Licence of one installed file per the package's debian/copyright."""
        if not self.dep5:
            return FALLBACK_LICENSES.get(self.name, "unknown (see debian/copyright)")
        parts = relpath.split("/")
        tails = ["/".join(parts[i:]) for i in range(len(parts))]
        found = None
        for globs, lic in self.licenses:  # DEP-5: the last matching paragraph wins
            if any(g.startswith("debian/") for g in globs):
                continue
            for g in globs:
                if g == "*" or any(fnmatch.fnmatchcase(t, g) for t in tails):
                    found = lic
                    break
        return found or "unknown (see debian/copyright)"


def _parse_dep5(text: str) -> Tuple[bool, List[Tuple[List[str], str]]]:
    if not text.lstrip().lower().startswith("format:"):
        return False, []
    out = []
    for para in re.split(r"\n\s*\n", text):
        files: List[str] = []
        lic = None
        cur = None
        for line in para.splitlines():
            m = re.match(r"^([A-Za-z-]+):\s*(.*)$", line)
            if m:
                cur = m.group(1).lower()
                if cur == "files":
                    files.extend(m.group(2).split())
                elif cur == "license":
                    lic = m.group(2).strip()
            elif line[:1] in (" ", "\t") and cur == "files":
                files.extend(line.split())
        if files and lic:
            out.append((files, lic))
    return True, out


def unpack_debs(debs_dir: str, work_dir: str, packages: Sequence[str] = PACKAGES) -> Dict[str, Package]:
    """Unpack the wanted .deb files (``packages``) with ``dpkg-deb -x``; return package info."""
    debs = sorted(f for f in os.listdir(debs_dir) if f.endswith(".deb"))
    pkgs: Dict[str, Package] = {}
    for deb in debs:
        path = os.path.join(debs_dir, deb)
        name = subprocess.check_output(["dpkg-deb", "-f", path, "Package"], text=True).strip()
        if name not in packages:
            continue
        version = subprocess.check_output(["dpkg-deb", "-f", path, "Version"], text=True).strip()
        if name in pkgs:
            raise SystemExit(f"two .deb files for {name} in {debs_dir}")
        root = os.path.join(work_dir, "unpack", name)
        if not os.path.isdir(root):
            os.makedirs(root)
            subprocess.check_call(["dpkg-deb", "-x", path, root])
        pkg = Package(name, version, deb, root)
        cp = os.path.join(root, "usr/share/doc", name, "copyright")
        if os.path.exists(cp):
            with open(cp, encoding="utf-8", errors="replace") as fh:
                pkg.dep5, pkg.licenses = _parse_dep5(fh.read())
        pkgs[name] = pkg
    missing = [p for p in packages if p not in pkgs]
    if missing:
        raise SystemExit(
            f"missing .deb files in {debs_dir} for: {', '.join(missing)} "
            "(fetch them with `apt-get download <package>`)"
        )
    return pkgs


# ----------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------


@dataclass
class Candidate:
    package: str
    relpath: str  # path inside the package tree
    path: str  # absolute path
    name: str = ""  # full font name (name id 4)
    upm: int = 1000
    variable: bool = False
    copyright: str = ""

    @property
    def key(self) -> str:
        return f"{self.package}:{self.relpath}"


def _t1_fontname(path: str) -> Optional[str]:
    with open(path, "rb") as fh:
        head = fh.read(4096)
    m = re.search(rb"/FontName\s*/([^\s/]+)", head)
    return m.group(1).decode("latin-1") if m else None


def discover_fonts(pkgs: Dict[str, Package]) -> Tuple[List[Candidate], List[Tuple[str, str, str]]]:
    """Walk the unpacked trees in sorted order.

    Returns the OpenType/TrueType candidates and a list of (key, reason, detail)
    for files that are skipped before rendering (symlinks, alternate formats).
    Symlinks: a link whose resolved target is a regular font file inside the same
    tree is skipped because the target itself is scanned (recorded as
    ``symlink``); a dangling link or one leaving the tree is recorded as
    ``symlink-outside``.  Alternate formats (Type 1, WOFF) are skipped only if
    the package also ships an OpenType/TrueType file with the same PostScript
    name or file stem (``alternate-format``); otherwise ``unsupported-format``.
    """
    from fontTools.ttLib import TTFont

    cands: List[Candidate] = []
    skipped: List[Tuple[str, str, str]] = []
    for pname in sorted(pkgs):
        pkg = pkgs[pname]
        files = []
        for dp, dns, fns in os.walk(pkg.root):
            dns.sort()
            for f in sorted(fns):
                files.append(os.path.join(dp, f))
        files.sort()
        fontfiles = [f for f in files if f.lower().endswith(SFNT_EXT + ALT_EXT)]
        ps_names = set()
        stems = set()
        for f in fontfiles:
            if f.lower().endswith(SFNT_EXT) and not os.path.islink(f):
                stems.add(os.path.splitext(os.path.basename(f))[0].lower())
                try:
                    t = TTFont(f, lazy=True, fontNumber=0)
                    ps = t["name"].getDebugName(6)
                    if ps:
                        ps_names.add(ps)
                    t.close()
                except Exception:
                    pass
        for f in fontfiles:
            rel = os.path.relpath(f, pkg.root)
            key = f"{pname}:{rel}"
            if os.path.islink(f):
                target = os.path.realpath(f)
                inside = target.startswith(os.path.realpath(pkg.root) + os.sep)
                if inside and os.path.isfile(target):
                    skipped.append((key, "symlink", f"-> {os.path.relpath(target, pkg.root)} (scanned once)"))
                else:
                    skipped.append((key, "symlink-outside", f"-> {os.readlink(f)}"))
                continue
            low = f.lower()
            if low.endswith(ALT_EXT):
                stem = os.path.splitext(os.path.basename(f))[0]
                ps = _t1_fontname(f) if low.endswith((".t1", ".pfb", ".pfa")) else None
                if (ps and ps in ps_names) or stem.lower() in stems or stem in ps_names:
                    skipped.append((key, "alternate-format", f"same face shipped as OpenType ({ps or stem})"))
                else:
                    skipped.append((key, "unsupported-format", "no OpenType twin in the package"))
                continue
            if low.endswith(".ttc"):
                from fontTools.ttLib import TTCollection

                coll = TTCollection(f, lazy=True)
                n = len(coll.fonts)
                coll.close()
                for i in range(n):  # each face of a collection is a candidate
                    cands.append(Candidate(pname, f"{rel}#{i}", f"{f}#{i}"))
                continue
            cands.append(Candidate(pname, rel, f))
    return cands, skipped


# ----------------------------------------------------------------------------
# fontTools inspection: cmap, symbol encoding, variable fonts, outlines
# ----------------------------------------------------------------------------

N_SIG = 9  # per glyph: xmin ymin xmax ymax advance area meanx meany ncontours


def _open(c: Candidate):
    from fontTools.ttLib import TTFont

    path, _, idx = c.path.partition("#")
    return TTFont(path, fontNumber=int(idx or 0), lazy=True)


def inspect_font(c: Candidate) -> Tuple[Optional[str], str, Optional[np.ndarray]]:
    """Check the cmap and compute the outline signature.

    Returns (reject_reason or None, detail, signature[62, N_SIG] or None).
    The signature uses font units divided by units-per-em, so hinting, the
    rasteriser and the em size do not affect it.
    """
    from fontTools.pens.boundsPen import BoundsPen
    from fontTools.pens.recordingPen import RecordingPen
    from fontTools.pens.statisticsPen import StatisticsPen

    try:
        t = _open(c)
        names = t["name"]
        c.name = names.getDebugName(4) or names.getDebugName(1) or os.path.basename(c.relpath)
        c.copyright = (names.getDebugName(0) or "").strip().replace("\n", " ")
        c.upm = int(t["head"].unitsPerEm)
        c.variable = "fvar" in t
        cmap_tables = t["cmap"].tables
        best = t.getBestCmap() or {}
    except Exception as e:  # unreadable font
        return "unreadable", f"{type(e).__name__}: {e}", None
    if any(st.platformID == 3 and st.platEncID == 0 for st in cmap_tables) and not any(
        st.platformID == 3 and st.platEncID in (1, 10) for st in cmap_tables
    ):
        return "symbol-font", "Microsoft symbol cmap (3,0) only", None
    missing = [ch for ch in CHARS if ord(ch) not in best]
    if missing:
        return "missing-glyphs", f"{len(missing)} of 62 missing from cmap: {''.join(missing[:20])}", None
    # Glyph names: a Latin code point mapped to a glyph with a meaningful name
    # that is not that character's (e.g. 'A' -> 'Alpha', '0' -> 'a105') marks a
    # symbol/dingbat font that reuses Latin code points.
    from fontTools import agl

    named, wrong = 0, []
    for ch in CHARS:
        g = best[ord(ch)]
        if re.match(r"^(glyph|g|cid|index|gid|uni[0-9A-Fa-f]{4,}|u[0-9A-Fa-f]{4,6})?\d*$", g):
            continue  # generic name, says nothing
        named += 1
        base = g.split(".")[0].split("_")[0]
        if base != agl.UV2AGL.get(ord(ch)):
            wrong.append(f"{ch}->{g}")
    if named >= 31 and len(wrong) > named // 2:
        return "symbol-font", f"glyph names are not the characters: {', '.join(wrong[:6])}", None
    gs = t.getGlyphSet()  # default instance for variable fonts
    hmtx = t["hmtx"].metrics
    upm = float(c.upm)
    sig = np.zeros((len(CHARS), N_SIG), np.float64)
    for i, ch in enumerate(CHARS):
        gname = best[ord(ch)]
        g = gs[gname]
        bp = BoundsPen(gs)
        g.draw(bp)
        sp = StatisticsPen(glyphset=gs)
        rp = RecordingPen()
        try:
            g.draw(sp)
            area, mx, my = sp.area, sp.meanX, sp.meanY
        except Exception:
            area, mx, my = 0.0, 0.0, 0.0
        g.draw(rp)
        ncont = sum(1 for op, _ in rp.value if op in ("closePath", "endPath"))
        b = bp.bounds or (0, 0, 0, 0)
        adv = hmtx.get(gname, (0, 0))[0]
        sig[i] = [b[0] / upm, b[1] / upm, b[2] / upm, b[3] / upm, adv / upm,
                  abs(area) / upm / upm, mx / upm, my / upm, ncont]
    t.close()
    return None, "", sig


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------


def render_font(c: Candidate, render_px: int, ink_threshold: int = 8, size: int = IMG):
    """Render the 62 glyphs of one font.

    All glyphs use one pixel size (``render_px`` per em) and are drawn with the
    pen on the baseline, so capitals, lower case, ascenders and descenders keep
    their relative sizes and vertical positions.  The crop is the union of the
    62 ink boxes in baseline coordinates (height: highest top to lowest bottom;
    width: the widest glyph); every glyph keeps its vertical position and is
    centred horizontally; the box is padded to a square with a 1-pixel (output)
    margin and resized with a box filter to ``size`` x ``size`` (32 for the data set; larger
    for the pretrained-trunk protocol, see ``rerender``).

    Returns (images uint8 [62,size,size], info dict) or raises ValueError with a
    reject reason.
    """
    from PIL import Image, ImageDraw, ImageFont

    path, _, idx = c.path.partition("#")
    font = ImageFont.truetype(path, render_px, index=int(idx or 0), layout_engine=ImageFont.Layout.BASIC)
    glyphs = []
    for ch in CHARS:
        l, t, r, b = font.getbbox(ch, anchor="ls")
        pad = render_px // 4
        w, h = max(1, r - l) + 2 * pad, max(1, b - t) + 2 * pad
        im = Image.new("L", (w, h), 0)
        ox, oy = pad - l, pad - t  # pen origin (baseline) inside the canvas
        ImageDraw.Draw(im).text((ox, oy), ch, font=font, fill=255, anchor="ls")
        a = np.asarray(im)
        ys, xs = np.nonzero(a >= ink_threshold)
        if len(ys) == 0:
            raise ValueError(f"blank-render:{ch}")
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        # clipped at the canvas edge? (bbox from FreeType too small) -> rerender bigger
        if y0 == 0 or x0 == 0 or y1 == h or x1 == w:
            big = Image.new("L", (w + 4 * render_px, h + 4 * render_px), 0)
            ox, oy = ox + 2 * render_px, oy + 2 * render_px
            ImageDraw.Draw(big).text((ox, oy), ch, font=font, fill=255, anchor="ls")
            a = np.asarray(big)
            ys, xs = np.nonzero(a >= ink_threshold)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        crop = a[y0:y1, x0:x1]
        glyphs.append((crop, y0 - oy, y1 - oy))  # vertical extent relative to baseline
    top = min(g[1] for g in glyphs)
    bottom = max(g[2] for g in glyphs)
    width = max(g[0].shape[1] for g in glyphs)
    height = bottom - top
    side = max(width, height)
    margin = max(1, round(MARGIN_PX * size / IMG))
    inner = size - 2 * margin
    full = int(np.ceil(side * size / inner))
    off_y = (full - height) // 2
    out = np.zeros((len(CHARS), size, size), np.uint8)
    for i, (crop, gt, gb) in enumerate(glyphs):
        canvas = np.zeros((full, full), np.uint8)
        y = off_y + (gt - top)
        x = (full - crop.shape[1]) // 2
        canvas[y:y + crop.shape[0], x:x + crop.shape[1]] = crop
        out[i] = np.asarray(Image.fromarray(canvas).resize((size, size), Image.Resampling.BOX))
    info = {"union_h_em": height / render_px, "union_w_em": width / render_px}
    return out, info


# ----------------------------------------------------------------------------
# Quality filters on the renders
# ----------------------------------------------------------------------------

# Fonts rejected after looking at every candidate's renders (contact sheets of
# all 763 fonts with a full cmap were reviewed by eye).  The automatic rules
# below catch some of them too; this list catches the rest.  Keys are file
# names inside fonts-aenigma (the only package where such fonts occur).
REVIEWED_REJECTS: Dict[str, Tuple[str, str]] = {
    "18holes.ttf": ("boxed-or-inverse", "letters inside circles"),
    "3dlet.ttf": ("boxed-or-inverse", "letters on the faces of 3D cubes"),
    "binaryt.ttf": ("boxed-or-inverse", "character in a box above a binary-code strip"),
    "binaryx.ttf": ("boxed-or-inverse", "character in a box above a binary-code strip"),
    "circulat.ttf": ("boxed-or-inverse", "white letters in black discs"),
    "dblayer1.ttf": ("boxed-or-inverse", "layer font: letters in discs"),
    "dblayer2.ttf": ("boxed-or-inverse", "layer font: letters in discs"),
    "dblayer3.ttf": ("boxed-or-inverse", "layer font: partial discs"),
    "dblayer4.ttf": ("boxed-or-inverse", "layer font: partial discs"),
    "dblbogey.ttf": ("boxed-or-inverse", "letters inside double circles"),
    "encapsul.ttf": ("boxed-or-inverse", "letters inside capsules"),
    "graze.ttf": ("boxed-or-inverse", "letters on diagonal tiles"),
    "grudge.ttf": ("boxed-or-inverse", "lower case are white letters on black boxes"),
    "grudge2.ttf": ("boxed-or-inverse", "lower case are white letters on black boxes"),
    "hearts.ttf": ("boxed-or-inverse", "letters inside hearts"),
    "mima4x4o.ttf": ("boxed-or-inverse", "white letters cut out of black squares"),
    "nucleus.ttf": ("boxed-or-inverse", "concentric circles around the letter"),
    "pindown.ttf": ("boxed-or-inverse", "letters on a dotted pin-board box"),
    "pindownp.ttf": ("boxed-or-inverse", "letters on a dotted pin-board box"),
    "qbicle1.ttf": ("boxed-or-inverse", "letters on isometric cubes"),
    "qbicle2.ttf": ("boxed-or-inverse", "letters on isometric cubes"),
    "qbicle3.ttf": ("boxed-or-inverse", "letters on isometric cubes"),
    "qbicle4.ttf": ("boxed-or-inverse", "letters on isometric cubes"),
    "spheroid.ttf": ("boxed-or-inverse", "letters inside circles"),
    "tearful.ttf": ("boxed-or-inverse", "letters inside tear drops"),
    "underwhe.ttf": ("boxed-or-inverse", "lower case are white letters on black boxes"),
    "underwho.ttf": ("boxed-or-inverse", "lower case are letters in boxes"),
    "xmaslght.ttf": ("boxed-or-inverse", "letters inside light bulbs"),
    "zoidal.ttf": ("boxed-or-inverse", "letters inside trapezoids"),
    "zurklezo.ttf": ("boxed-or-inverse", "letters inside circles"),
    "zurklezs.ttf": ("boxed-or-inverse", "white letters in black discs"),
    "90stars.ttf": ("symbol-font", "stars, not letters"),
    "bin01st.ttf": ("symbol-font", "binary-code strips, not letters"),
    "binx01s.ttf": ("symbol-font", "binary-code strips, not letters"),
    "bitbttf.ttf": ("symbol-font", "fragments of a larger picture, not letters"),
    "entlayrb.ttf": ("symbol-font", "layer font: stripes only, no letterform"),
    "fauxsnow.ttf": ("symbol-font", "snowflakes"),
    "hdmaker.ttf": ("symbol-font", "face parts (dingbats)"),
    "lineding.ttf": ("symbol-font", "ornaments (dingbats)"),
    "skullcap.ttf": ("symbol-font", "lower case are skulls"),
    "snailets.ttf": ("symbol-font", "upper case are snail pictures"),
    "symmetry.ttf": ("symbol-font", "ornamental tiles"),
    "codelife.ttf": ("degenerate", "glyphs scattered at unrelated heights"),
}


def glyph_features(imgs: np.ndarray) -> Dict[str, float]:
    """Features used by the automatic boxed / degenerate filters.

    - ``silhouette_iou``: median IoU between each glyph's filled silhouette
      (ink > 0.3 with holes filled) and the median silhouette.  Glyphs drawn
      inside a common frame (circle, box, bulb) all have the same silhouette.
    - ``height_ratio``: median glyph ink height / output box height.  Tiny when
      glyphs are scattered vertically or one glyph is huge.
    - ``unique_glyphs``: number of distinct glyph images.
    """
    from scipy import ndimage

    ink = imgs.astype(np.float32) / 255.0
    sil = np.stack([ndimage.binary_fill_holes(g > 0.3) for g in ink]).reshape(len(ink), -1)
    med = np.median(sil, axis=0) > 0.5
    iou = (sil & med).sum(1) / np.maximum((sil | med).sum(1), 1)
    heights = []
    for g in ink:
        ys = np.nonzero(g.max(1) > 0.3)[0]
        heights.append(ys.max() - ys.min() + 1 if len(ys) else 0)
    flat = imgs.reshape(len(imgs), -1)
    uniq = len({hashlib.sha1(r.tobytes()).hexdigest() for r in flat})
    return {
        "silhouette_iou": float(np.median(iou)),
        "height_ratio": float(np.median(heights)) / (IMG - 2 * MARGIN_PX),
        "unique_glyphs": uniq,
        "mean_ink": float(ink.mean()),
    }


def auto_reject(f: Dict[str, float]) -> Optional[Tuple[str, str]]:
    """Automatic render-based rejection: (reason, detail) or None."""
    if f["silhouette_iou"] >= 0.99:
        return "boxed-or-inverse", f"all glyphs share one filled silhouette (IoU {f['silhouette_iou']:.3f})"
    if f["height_ratio"] < 0.35:
        return "degenerate", f"median glyph only {f['height_ratio']:.0%} of the union box height"
    if f["unique_glyphs"] < 30:
        return "degenerate", f"only {f['unique_glyphs']} distinct glyph images"
    return None


# ----------------------------------------------------------------------------
# Near-duplicates
# ----------------------------------------------------------------------------


def pixel_mad_pairs(imgs: np.ndarray, thr: float) -> Dict[Tuple[int, int], float]:
    """All pairs (i<j) of fonts with mean absolute pixel difference <= thr (0-255)."""
    import torch

    n = len(imgs)
    x = torch.from_numpy(imgs.reshape(n, -1).astype(np.float32) / 255.0)
    d = x.shape[1]
    sq = (x * x).sum(1)
    out: Dict[Tuple[int, int], float] = {}
    t = thr / 255.0
    for s in range(0, n, 256):
        g = sq[s:s + 256, None] + sq[None] - 2 * x[s:s + 256] @ x.T
        # mean squared diff <= MAD (pixels in [0,1]) -> exact check on survivors
        ii, jj = torch.nonzero(g / d <= t + 1e-6, as_tuple=True)
        for a, b in zip((ii + s).tolist(), jj.tolist()):
            if a < b:
                mad = float((x[a] - x[b]).abs().mean()) * 255.0
                if mad <= thr:
                    out[(a, b)] = mad
    return out


def outline_match_pairs(sigs: np.ndarray, tol: float, area_tol: float, min_frac: float) -> Dict[Tuple[int, int], float]:
    """Pairs whose outlines mostly match: fraction of the 62 glyphs whose bounds,
    advance and centroid agree within ``tol`` em, whose filled area agrees within
    ``area_tol`` (relative) and whose contour counts are equal is >= min_frac."""
    n = len(sigs)
    out: Dict[Tuple[int, int], float] = {}
    geo = sigs[:, :, [0, 1, 2, 3, 4, 6, 7]]
    area = sigs[:, :, 5]
    nc = sigs[:, :, 8]
    for i in range(n - 1):
        dg = np.abs(geo[i + 1:] - geo[i][None]).max(-1)
        da = np.abs(area[i + 1:] - area[i][None]) / np.maximum(1e-6, np.maximum(area[i + 1:], area[i][None]))
        ok = (dg <= tol) & (da <= area_tol) & (nc[i + 1:] == nc[i][None])
        frac = ok.mean(1)
        for j in np.nonzero(frac >= min_frac)[0]:
            out[(i, i + 1 + int(j))] = float(frac[j])
    return out


# ----------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------


def save_npz(path: str, images, font_labels, char_labels, font_names, font_files, font_packages,
             train_classes, test_classes, metadata: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(
        path,
        images=images.astype(np.uint8),
        font_labels=font_labels.astype(np.int32),
        char_labels=char_labels.astype(np.int32),
        font_names=np.asarray(font_names, dtype=str),
        font_files=np.asarray(font_files, dtype=str),
        font_packages=np.asarray(font_packages, dtype=str),
        train_classes=np.asarray(train_classes, np.int32),
        test_classes=np.asarray(test_classes, np.int32),
        chars=np.asarray(CHARS),
        metadata=np.asarray(json.dumps(metadata, sort_keys=True)),
    )


def contact_sheet(path: str, images: np.ndarray, names: Sequence[str], n_fonts: int, seed: int,
                  chars: str = "0123AGQRagjpqyz", label_font: Optional[str] = None) -> None:
    """Random fonts (rows) x a fixed set of glyphs (columns), with font names."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(label_font, 12) if label_font else ImageFont.load_default()

    rng = np.random.default_rng(seed)
    nf = len(images) // len(CHARS)
    pick = np.sort(rng.choice(nf, size=min(n_fonts, nf), replace=False))
    cols = [CHARS.index(ch) for ch in chars]
    cell, lab = 34, 230
    sheet = Image.new("L", (lab + cell * len(cols), cell * len(pick)), 255)
    d = ImageDraw.Draw(sheet)
    for r, f in enumerate(pick):
        d.text((2, r * cell + 10), names[f][:36], fill=0, font=font)
        for k, ci in enumerate(cols):
            g = 255 - images[f * len(CHARS) + ci]
            sheet.paste(Image.fromarray(g), (lab + k * cell + 1, r * cell + 1))
        d.line([(lab, r * cell), (sheet.width, r * cell)], fill=200)
    for k in range(len(cols) + 1):
        d.line([(lab + k * cell, 0), (lab + k * cell, sheet.height)], fill=200)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path, optimize=True)


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(here)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--debs-dir", required=True, help="directory with the 15 .deb files (apt-get download)")
    ap.add_argument("--work-dir", default="/tmp/fontglyphs-work", help="scratch dir for unpacking (outside the repo)")
    ap.add_argument("--out", default=os.path.join(repo, "data/fontglyphs/fontglyphs.npz"))
    ap.add_argument("--subset-out", default=os.path.join(repo, "pml_ext/data/fontglyphs_subset.npz"))
    ap.add_argument("--report", default=None, help="default: build_report.md next to --out")
    ap.add_argument("--licenses", default=None, help="default: LICENSES.md next to --out")
    ap.add_argument("--contact-sheet", default=os.path.join(repo, "docs/fontglyphs_contact_sheet.png"))
    ap.add_argument("--render-px", type=int, default=128, help="pixels per em for every font")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mad-threshold", type=float, default=8.0, help="near-duplicate pixel MAD, 0-255 scale")
    ap.add_argument("--outline-tol", type=float, default=0.012, help="outline geometry tolerance (em)")
    ap.add_argument("--outline-area-tol", type=float, default=0.03, help="relative area tolerance")
    ap.add_argument("--outline-min-frac", type=float, default=0.75, help="fraction of matching glyphs to merge")
    ap.add_argument("--subset-train", type=int, default=120)
    ap.add_argument("--subset-test", type=int, default=60)
    ap.add_argument("--sheet-fonts", type=int, default=40)
    ap.add_argument("--limit", type=int, default=0, help="debug: only the first N candidates")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # the build is light; leave the other core alone
    import fontTools
    import PIL
    from PIL import features

    t0 = time.time()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    report_path = args.report or os.path.join(out_dir, "build_report.md")
    lic_path = args.licenses or os.path.join(out_dir, "LICENSES.md")

    pkgs = unpack_debs(args.debs_dir, args.work_dir)
    cands, skipped = discover_fonts(pkgs)
    if args.limit:
        cands = cands[: args.limit]
    print(f"{len(cands)} OpenType/TrueType files, {len(skipped)} other font files skipped", flush=True)

    rejected: List[Tuple[str, str, str, str]] = []  # key, name, reason, detail
    for key, reason, detail in skipped:
        rejected.append((key, "", reason, detail))
    ok: List[Candidate] = []
    sigs, renders, feats, infos = [], [], [], []
    n_variable = 0
    for k, c in enumerate(cands):
        reason, detail, sig = inspect_font(c)
        if reason is None:
            try:
                imgs, info = render_font(c, args.render_px)
            except ValueError as e:
                reason, _, ch = str(e).partition(":")
                detail = f"glyph {ch!r} renders blank"
            except Exception as e:  # FreeType cannot load it
                reason, detail = "unreadable", f"{type(e).__name__}: {e}"
        if reason is not None:
            rejected.append((c.key, c.name, reason, detail))
            continue
        f = glyph_features(imgs)
        auto = auto_reject(f)
        reviewed = REVIEWED_REJECTS.get(os.path.basename(c.relpath)) if c.package == "fonts-aenigma" else None
        if auto is not None:
            rejected.append((c.key, c.name, auto[0], auto[1]))
            continue
        if reviewed is not None:
            rejected.append((c.key, c.name, reviewed[0], reviewed[1] + " (reviewed by eye)"))
            continue
        if c.variable:
            n_variable += 1
            c.name += " (variable font, default instance)"
        ok.append(c)
        sigs.append(sig)
        renders.append(imgs)
        feats.append(f)
        infos.append(info)
        if (k + 1) % 100 == 0:
            print(f"  {k + 1}/{len(cands)} inspected, {len(ok)} pass so far ({time.time() - t0:.0f}s)", flush=True)
    unused = sorted(set(REVIEWED_REJECTS) - {os.path.basename(k.split(":", 1)[1]) for k, *_ in rejected})
    if unused and not args.limit:
        print(f"note: reviewed rejects not matched by any rendered font: {unused}", flush=True)
    renders_a = np.stack(renders)  # [F,62,32,32]
    sigs_a = np.stack(sigs)
    print(f"{len(ok)} fonts pass the filters ({time.time() - t0:.0f}s)", flush=True)

    # Exact duplicates, then near-duplicates (pixels OR outlines).  Greedy in
    # sorted (package, path) order: a font joins the first kept font it
    # duplicates, otherwise it is kept.  No chains: every two kept fonts differ.
    flat = renders_a.reshape(len(ok), -1)
    hashes = [hashlib.sha1(flat[i].tobytes()).hexdigest() for i in range(len(ok))]
    pix = pixel_mad_pairs(renders_a, args.mad_threshold)
    outl = outline_match_pairs(sigs_a, args.outline_tol, args.outline_area_tol, args.outline_min_frac)
    dup_of: Dict[int, List[int]] = collections.defaultdict(list)
    for a, b in list(pix) + list(outl):
        dup_of[a].append(b)
        dup_of[b].append(a)
    reps: List[int] = []
    rep_set = set()
    merged_rows = []
    n_exact = 0
    for i in range(len(ok)):
        hits = sorted(r for r in set(dup_of[i]) if r in rep_set)
        exact_hits = [r for r in rep_set if hashes[r] == hashes[i]]
        if exact_hits:
            r = min(exact_hits)
            kind, why = "exact-duplicate", "identical renders"
            n_exact += 1
        elif hits:
            r = min(hits, key=lambda r: (pix.get((min(r, i), max(r, i)), 1e9), r))
            ev = []
            if (min(r, i), max(r, i)) in pix:
                ev.append(f"MAD {pix[(min(r, i), max(r, i))]:.1f}/255")
            if (min(r, i), max(r, i)) in outl:
                ev.append(f"outlines {outl[(min(r, i), max(r, i))]:.0%} of glyphs match")
            kind, why = "near-duplicate", "; ".join(ev)
        else:
            reps.append(i)
            rep_set.add(i)
            continue
        merged_rows.append((ok[r].name, ok[r].key, ok[i].name, ok[i].key, kind, why))
    keep = reps
    print(f"{len(keep)} fonts after merging {len(ok) - len(keep)} duplicates ({time.time() - t0:.0f}s)", flush=True)
    fonts = [ok[i] for i in keep]
    imgs = renders_a[keep]

    # Seeded, class-disjoint split into halves.
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(fonts))
    n_train = len(fonts) // 2
    train_classes = np.sort(perm[:n_train])
    test_classes = np.sort(perm[n_train:])

    nf = len(fonts)
    images = imgs.reshape(nf * len(CHARS), IMG, IMG)
    font_labels = np.repeat(np.arange(nf), len(CHARS))
    char_labels = np.tile(np.arange(len(CHARS)), nf)
    meta = {
        "name": "FontGlyphs",
        "chars": CHARS,
        "image_size": IMG,
        "render_px_per_em": args.render_px,
        "layout_engine": "BASIC",
        "seed": args.seed,
        "split": "class-disjoint, seeded permutation of fonts, first half train",
        "mad_threshold_255": args.mad_threshold,
        "outline_tol_em": args.outline_tol,
        "outline_area_tol": args.outline_area_tol,
        "outline_min_frac": args.outline_min_frac,
        "versions": {
            "pillow": PIL.__version__,
            "freetype": features.version("freetype2"),
            "fonttools": fontTools.version,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        },
        "packages": {p.name: p.version for p in pkgs.values()},
        "n_fonts": nf,
        "n_train_fonts": int(len(train_classes)),
        "n_test_fonts": int(len(test_classes)),
    }
    names = [f.name for f in fonts]
    files = [f.relpath for f in fonts]
    packs = [f.package for f in fonts]
    save_npz(args.out, images, font_labels, char_labels, names, files, packs, train_classes, test_classes, meta)

    # Subset: deterministic choice of fonts from each half, relabelled 0..K-1.
    srng = np.random.default_rng(args.seed + 1)
    sub_tr = np.sort(srng.choice(train_classes, size=min(args.subset_train, len(train_classes)), replace=False))
    sub_te = np.sort(srng.choice(test_classes, size=min(args.subset_test, len(test_classes)), replace=False))
    sub_fonts = np.concatenate([sub_tr, sub_te])
    order = np.argsort(sub_fonts)
    sub_fonts = sub_fonts[order]
    new_id = {int(f): i for i, f in enumerate(sub_fonts)}
    s_imgs = imgs[sub_fonts].reshape(-1, IMG, IMG)
    s_meta = dict(meta, subset_of="data/fontglyphs/fontglyphs.npz", subset_seed=args.seed + 1,
                  n_fonts=len(sub_fonts), n_train_fonts=len(sub_tr), n_test_fonts=len(sub_te))
    save_npz(args.subset_out, s_imgs, np.repeat(np.arange(len(sub_fonts)), len(CHARS)),
             np.tile(np.arange(len(CHARS)), len(sub_fonts)), [names[i] for i in sub_fonts],
             [files[i] for i in sub_fonts], [packs[i] for i in sub_fonts],
             [new_id[int(f)] for f in sub_tr], [new_id[int(f)] for f in sub_te], s_meta)

    label_font = os.path.join(pkgs["fonts-dejavu-core"].root, "usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    contact_sheet(args.contact_sheet, images, names, args.sheet_fonts, args.seed,
                  label_font=label_font if os.path.exists(label_font) else None)

    # LICENSES.md
    lines = [
        "# FontGlyphs: fonts and licences",
        "",
        "Every class of FontGlyphs is rendered from one font file of a Debian package (bookworm).",
        "The glyph images are renders of those fonts; the licence column is the licence that the",
        "package's `debian/copyright` gives for that file (for packages without a machine-readable",
        "copyright file it was read by hand), and the last column is the font's own copyright",
        "string (name id 0).",
        "",
        "## Packages",
        "",
        "| package | version | .deb |",
        "| --- | --- | --- |",
    ]
    for p in sorted(pkgs.values(), key=lambda p: p.name):
        lines.append(f"| {p.name} | {p.version} | {p.deb} |")
    used = sorted({pkgs[f.package].license_for(f.relpath) for f in fonts})
    lines += ["", "## Licence identifiers", ""]
    for lic in used:
        note = next((v for k, v in sorted(LICENSE_NOTES.items(), key=lambda kv: -len(kv[0])) if lic.startswith(k)), "see the package's debian/copyright")
        lines.append(f"- `{lic}`: {note}")
    lines += ["", "The full licence texts are in each package's `usr/share/doc/<package>/copyright` and in",
              "`/usr/share/common-licenses` on Debian.  The derived images (FontGlyphs) are distributed under",
              "the same terms as the fonts they were rendered from.",
              ]
    lines += ["", "## Fonts", "",
              "| class | font | file | package | version | licence | font copyright |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for i, f in enumerate(fonts):
        p = pkgs[f.package]
        cp = _md_escape(f.copyright[:160] + ("..." if len(f.copyright) > 160 else ""))
        lines.append(f"| {i} | {_md_escape(f.name)} | {os.path.basename(f.relpath)} | {p.name} | {p.version} | "
                     f"{_md_escape(p.license_for(f.relpath))} | {cp} |")
    with open(lic_path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")

    # build_report.md
    by_reason: Dict[str, List[Tuple[str, str, str]]] = collections.defaultdict(list)
    for key, name, reason, detail in rejected:
        by_reason[reason].append((key, name, detail))
    size = lambda p: os.path.getsize(p)  # noqa: E731
    rep = [
        "# FontGlyphs build report",
        "",
        f"Built by `benchmarks/build_fontglyphs.py` in {time.time() - t0:.0f} s.",
        "",
        "## Summary",
        "",
        f"- font files considered (OpenType/TrueType): {len(cands)}; other font files: {len(skipped)}",
        f"- passed the filters: {len(ok)}; variable fonts among them: {n_variable} (default instance rendered)",
        f"- duplicates merged: {len(ok) - len(keep)} ({n_exact} exact, {len(ok) - len(keep) - n_exact} near)",
        f"- **fonts kept (classes): {nf}** = {len(train_classes)} train + {len(test_classes)} test, "
        f"{len(images)} images of 32x32",
        f"- subset: {len(sub_tr)} train + {len(sub_te)} test fonts, {len(s_imgs)} images",
        f"- `{os.path.relpath(args.out, repo)}`: {size(args.out) / 1e6:.2f} MB; "
        f"`{os.path.relpath(args.subset_out, repo)}`: {size(args.subset_out) / 1e6:.2f} MB",
        f"- versions: Pillow {meta['versions']['pillow']}, FreeType {meta['versions']['freetype']}, "
        f"fontTools {meta['versions']['fonttools']}, numpy {np.__version__}",
        "",
        "| reason | count |",
        "| --- | --- |",
    ]
    for r in sorted(by_reason):
        rep.append(f"| {r} | {len(by_reason[r])} |")
    rep.append(f"| merged duplicate | {len(merged_rows)} |")
    rep += ["", "## Rules", "",
            "- `missing-glyphs`: the best cmap lacks one of `0-9A-Za-z`.",
            "- `symbol-font`: Microsoft symbol cmap only; or glyph names show other characters on the Latin"
            " code points (e.g. `A -> Alpha`, `0 -> a105`); or, by eye, pictures/dingbats instead of letters.",
            "- `boxed-or-inverse`: keycaps, frames, white-on-black: automatically when all glyphs share one"
            " filled silhouette (median IoU >= 0.99), otherwise by eye (REVIEWED_REJECTS in the build script,"
            " from contact sheets of every candidate).",
            "- `blank-render`: a glyph renders no ink.  `degenerate`: fewer than 30 distinct glyph images, or the"
            " median glyph is < 35% of the union box height (glyphs scattered vertically), or by eye.",
            "- `symlink`, `alternate-format`: the same file or face is scanned once as OpenType/TrueType.",
            f"- duplicates: identical renders, or pixel MAD <= {args.mad_threshold}/255 over all 62 glyphs, or"
            f" outlines matching for >= {args.outline_min_frac:.0%} of the glyphs (bounds, advance, centroid within"
            f" {args.outline_tol} em, area within {args.outline_area_tol:.0%}, same contour count; font units /"
            " units-per-em).  Greedy in sorted (package, path) order: a font is merged into the first kept font it"
            " duplicates, so no two kept fonts are duplicates of each other (no transitive chains).",
            "", "## Rejected fonts", ""]
    for r in sorted(by_reason):
        rep += [f"### {r} ({len(by_reason[r])})", "", "| file | name | detail |", "| --- | --- | --- |"]
        for key, name, detail in sorted(by_reason[r]):
            rep.append(f"| {key} | {_md_escape(name)} | {_md_escape(detail)} |")
        rep.append("")
    rep += [f"## Merged duplicates ({len(merged_rows)})", "",
            "| kept | kept file | merged | merged file | kind | evidence |", "| --- | --- | --- | --- | --- | --- |"]
    for row in merged_rows:
        rep.append("| " + " | ".join(_md_escape(v) for v in row) + " |")
    rep += ["", "## Kept fonts per package", "", "| package | version | kept |", "| --- | --- | --- |"]
    cnt = collections.Counter(f.package for f in fonts)
    for p in sorted(pkgs):
        rep.append(f"| {p} | {pkgs[p].version} | {cnt.get(p, 0)} |")
    with open(report_path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(rep) + "\n")
    print(f"done: {nf} fonts -> {args.out} ({size(args.out) / 1e6:.2f} MB), subset {args.subset_out} "
          f"({size(args.subset_out) / 1e6:.2f} MB) in {time.time() - t0:.0f}s")
    return 0


def rerender(argv: Optional[Sequence[str]] = None) -> int:
    """Render the fonts of a built FontGlyphs file again at another image size.

    Same fonts, labels, split and order as the built file (no filtering or de-duplication is
    redone); every font's 32 x 32 render is first compared with the built file's images, so a
    different font package or FreeType is an error rather than a silently different data set.
    Used for the pretrained-trunk protocol, whose input is larger than 32 x 32.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(here)
    ap = argparse.ArgumentParser(description=rerender.__doc__.split("\n")[0])
    ap.add_argument("--debs-dir", required=True)
    ap.add_argument("--work-dir", default="/tmp/fontglyphs-work")
    ap.add_argument("--built", default=os.path.join(repo, "data/fontglyphs/fontglyphs.npz"))
    ap.add_argument("--image-size", type=int, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import PIL
    from PIL import features

    built = np.load(args.built)
    meta = json.loads(str(built["metadata"]))
    pkgs = unpack_debs(args.debs_dir, args.work_dir)
    for name, version in meta["packages"].items():
        if pkgs[name].version != version:
            raise SystemExit(f"{name} is {pkgs[name].version}, the built file used {version}")
    size, render_px = args.image_size, meta["render_px_per_em"]
    big_px = max(render_px, 2 * size)  # at least 2 rendered pixels per output pixel
    files, packs = built["font_files"], built["font_packages"]
    images = np.zeros((len(files), len(CHARS), size, size), np.uint8)
    t0 = time.time()
    for f, (relpath, package) in enumerate(zip(files, packs)):
        c = Candidate(str(package), str(relpath), os.path.join(pkgs[str(package)].root, str(relpath)))
        small, _ = render_font(c, render_px)
        expected = built["images"][built["font_labels"] == f]
        if not np.array_equal(small, expected):
            diff = np.abs(small.astype(int) - expected).max()
            raise SystemExit(f"{package}:{relpath} renders differently from the built file (max |diff| {diff}); "
                             "another package version or FreeType build?")
        images[f], _ = render_font(c, big_px, size=size)
        if f % 50 == 0:
            print(f"{f}/{len(files)} fonts, {time.time() - t0:.0f}s", flush=True)
    meta.update(image_size=size, render_px_per_em=big_px, rerendered_from=os.path.basename(args.built),
                rerender_versions={"pillow": PIL.__version__, "freetype": features.version("freetype2")})
    save_npz(args.out, images.reshape(-1, size, size), built["font_labels"], built["char_labels"],
             built["font_names"], files, packs, built["train_classes"], built["test_classes"], meta)
    print(f"{args.out}: {os.path.getsize(args.out) / 1e6:.1f} MB in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "rerender":
        sys.exit(rerender(sys.argv[2:]))
    sys.exit(main())
