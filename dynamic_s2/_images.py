"""Image inputs -> tensors: one converter for PIL images, numpy arrays and torch tensors.

Examples:
    >>> import numpy as np
    >>> to_chw_tensor(np.zeros((20, 30, 4), np.uint8), "image").shape  # RGBA: alpha dropped
    torch.Size([3, 20, 30])
"""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

__all__ = ["is_pil", "to_chw_tensor"]


def is_pil(obj: object) -> TypeGuard[PILImage.Image]:
    """True for a PIL image (without importing PIL: a PIL image exists only if PIL is loaded).

    Examples:
        >>> is_pil(torch.zeros(3, 4, 4))
        False
    """
    module = sys.modules.get("PIL.Image")
    return module is not None and isinstance(obj, module.Image)


def _pil_to_hwc(image: Any) -> np.ndarray:
    if image.mode != "RGB":
        image = image.convert("RGB")  # greyscale replicated, alpha dropped, palettes expanded
    return np.asarray(image, dtype=np.uint8)


def to_chw_tensor(image: object, name: str = "image") -> torch.Tensor:
    """One image as an RGB ``[3, H, W]`` tensor, uint8 or floating point, values untouched.

    * a PIL image: converted to RGB (as ``image.convert("RGB")``), then uint8;
    * a numpy array: ``[H, W]`` or ``[H, W, C]`` (channels last), uint8 or float;
    * a torch tensor: ``[H, W]`` or ``[C, H, W]`` (channels first), uint8 or float, on its device.

    ``C`` may be 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA): grey is replicated and alpha
    dropped, as PIL's ``convert("RGB")`` does. The result may be a view of the input (numpy arrays
    are shared, not copied, when they are contiguous); it is only ever read.

    Args:
        image: the image.
        name: how error messages name the argument, e.g. ``"images[3]"``.

    Raises:
        TypeError: an unsupported type or dtype.
        ValueError: an unsupported shape or an empty image.

    Examples:
        >>> to_chw_tensor(torch.zeros(1, 5, 7, dtype=torch.uint8)).shape  # grey -> RGB
        torch.Size([3, 5, 7])
        >>> to_chw_tensor(torch.zeros(5, 3, 7), "images[0]")
        Traceback (most recent call last):
            ...
        ValueError: images[0]: a tensor image must be [H, W] or [C, H, W] with C in 1..4, ...
    """
    if is_pil(image):
        image = _pil_to_hwc(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
            raise ValueError(
                f"{name}: a numpy image must be [H, W] or [H, W, C] with C in 1..4, "
                f"got shape {image.shape}"
            )
        if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
            raise TypeError(f"{name}: a numpy image must be uint8 or float, got {image.dtype}")
        with warnings.catch_warnings():
            # np.asarray(pil_image) is read-only; the tensor is only ever read, never written.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        chw = image[None] if image.dim() == 2 else image
        if chw.dim() != 3 or chw.shape[0] not in (1, 2, 3, 4):
            raise ValueError(
                f"{name}: a tensor image must be [H, W] or [C, H, W] with C in 1..4, "
                f"got shape {tuple(image.shape)}"
            )
        if chw.dtype != torch.uint8 and not chw.dtype.is_floating_point:
            raise TypeError(f"{name}: a tensor image must be uint8 or float, got {chw.dtype}")
    else:
        raise TypeError(
            f"{name} must be a PIL image, a [C, H, W] tensor or an [H, W, C] numpy array, "
            f"got {type(image).__name__}"
        )
    if chw.shape[1] == 0 or chw.shape[2] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(chw.shape)}")
    if chw.shape[0] in (1, 2):  # greyscale (+ alpha): replicate the grey channel
        return chw[:1].expand(3, -1, -1)
    return chw[:3]  # RGB, or RGBA with its alpha dropped
