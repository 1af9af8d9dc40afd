"""Optional packages in tests: import them, or skip the test and say why.

``pytest.importorskip`` skips only on ``ImportError``. A broken install raises other errors: with a
torchvision built for another torch, ``import timm`` (which imports torchvision) raises
``RuntimeError``. :func:`need` skips on both, naming the package and quoting the error.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def need(module: str) -> ModuleType:
    """``module`` imported, or the calling test (or test module) skipped with the reason.

    Examples:
        >>> need("json").dumps([1])
        '[1]'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        reason = f"{module} is not installed ({type(exc).__name__}: {exc})"
    except RuntimeError as exc:  # installed but broken, e.g. torchvision built for another torch
        reason = f"{module} is installed but broken: importing it raised RuntimeError: {exc}"
    pytest.skip(reason, allow_module_level=True)
