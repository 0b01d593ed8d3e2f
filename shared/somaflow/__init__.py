"""somaflow: calcium-imaging movies in, neurons out."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: names exported lazily (their modules load on first use, so ``import somaflow`` stays light)
_LAZY = {
    "deconvolve": "somaflow.oasis",
    "DeconvolutionParams": "somaflow.oasis",
    "DeconvolutionResult": "somaflow.oasis",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'somaflow' has no attribute {name!r}")
