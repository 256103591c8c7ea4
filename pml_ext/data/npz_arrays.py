"""Reading a data set's ``.npz`` file once: every array, checked for the required names, cached
by path and modification time (one file at a time per cache)."""
from __future__ import annotations

import os
from typing import Any, Dict, Sequence, Tuple

import numpy as np

__all__ = ["read_npz_arrays"]


def read_npz_arrays(path: str, name: str, required: Sequence[str],
                    cache: Dict[Tuple[str, float], Dict[str, Any]]) -> Dict[str, Any]:
    """Every array of the existing file ``path``; ``name`` (e.g. "FontGlyphs") names the data set
    in the errors: an unreadable file or a missing required array is a ValueError."""
    key = (os.path.abspath(path), os.path.getmtime(path))
    if key not in cache:
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except Exception as e:  # not an npz / truncated
            raise ValueError(f"{name}: cannot read {path}: {type(e).__name__}: {e}") from e
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"{name}: {path} is not a {name} file (missing arrays: {', '.join(missing)})")
        cache.clear()  # keep at most one file in memory
        cache[key] = data
    return cache[key]
