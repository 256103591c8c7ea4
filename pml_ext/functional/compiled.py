"""Whether EE's compiled CPU kernels run (numba, ``pip install pml_ext[fast]``).

Two per-batch costs of EE on CPU are mostly the fixed cost of many small operations rather than
arithmetic: the hard negative pair search and, for a new label pattern, the pattern's layout. With
numba installed both run as compiled loops (:mod:`~pml_ext.functional.embedding_expansion_rows_kernel`,
:mod:`~pml_ext.functional.embedding_expansion_layouts_kernel`) with the same results (tested);
without it, on GPU and in half precision, the tensor (and NumPy) code runs.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

__all__ = ["compiled_available"]

# "auto": the compiled kernels where numba is installed; "off": never (tests, benchmarks)
_COMPILED = "auto"
_NUMBA: Optional[bool] = None  # whether numba is installed, looked up once


def compiled_available() -> bool:
    """Whether the compiled CPU kernels can run (numba installed, not switched off)."""
    global _NUMBA
    if _NUMBA is None:
        _NUMBA = importlib.util.find_spec("numba") is not None
    return _COMPILED == "auto" and _NUMBA
