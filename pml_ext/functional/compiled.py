"""Whether EE's compiled CPU kernels run (numba, a dependency of pml_ext).

Two per-batch costs of EE on CPU are mostly the fixed cost of many small operations rather than
arithmetic: the hard negative pair search and, for a new label pattern, the pattern's layout. With
numba installed both run as compiled loops (:mod:`~pml_ext.functional.embedding_expansion_rows_kernel`,
:mod:`~pml_ext.functional.embedding_expansion_layouts_kernel`), and so do the dense Triplet loss's
triplet lists (:mod:`~pml_ext.functional.embedding_expansion_triplets_kernel`) and the dense N-pair
loss's gather and cross-entropy (:mod:`~pml_ext.functional.embedding_expansion_npairs_kernel`) and the
normalised Gram matrix's [B, B] steps (:mod:`~pml_ext.functional.primitives_kernel`), with the same
results (tested); without it, on GPU and in half precision, the tensor (and NumPy) code runs.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Optional

import torch

__all__ = ["compiled_available", "compiled_for"]

# "auto": the compiled kernels where numba is installed; "off": never (tests, benchmarks)
_COMPILED = "auto"
_NUMBA: Optional[bool] = None  # whether numba imports, found out once


def compiled_available() -> bool:
    """Whether the compiled CPU kernels can run (numba installed and importable, not switched off).
    A numba that is installed but fails to import (e.g. built for another NumPy) is reported once
    with a warning, and the tensor code runs."""
    global _NUMBA
    if _COMPILED != "auto":
        return False
    if _NUMBA is None:
        _NUMBA = False
        if importlib.util.find_spec("numba") is not None:
            try:
                import numba  # noqa: F401  (~0.3 s, once)

                _NUMBA = True
            except Exception as error:  # any failure to import means: no kernels, not a broken loss
                warnings.warn(f"numba is installed but does not import ({error!r}); EE's compiled CPU kernels "
                              "are off and the tensor code runs", RuntimeWarning, stacklevel=2)
    return _NUMBA


def compiled_for(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the compiled kernels run for tensors of ``device`` and ``dtype``: CPU, a dtype NumPy
    has (float32 / float64), and :func:`compiled_available`."""
    return device.type == "cpu" and dtype in (torch.float32, torch.float64) and compiled_available()
