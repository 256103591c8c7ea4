"""Data sets shipped with pml_ext.

``FontGlyphs`` is a font-identification data set (classes = fonts, 62 glyph
images each) rendered from Debian font packages; the package embeds a small
subset (``fontglyphs_subset.npz``) and the repository holds the full set.
"""
from .font_glyphs import (
    CHARS,
    SPLITS,
    VIEWS,
    FontGlyphs,
    full_dataset_path,
    load_font_glyphs,
    subset_path,
)

__all__ = [
    "FontGlyphs",
    "load_font_glyphs",
    "subset_path",
    "full_dataset_path",
    "CHARS",
    "SPLITS",
    "VIEWS",
]
