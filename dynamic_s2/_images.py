"""Image inputs -> tensors: files and folders, PIL images, numpy arrays and torch tensors.

One home for turning what users hand us into images: :func:`find_images` lists image files,
:func:`read_image` decodes one (Pillow, EXIF orientation, RGB), :func:`to_chw_tensor` converts an
in-memory image. ``dynamic_s2.extract`` re-exports the first two.

Examples:
    >>> import numpy as np
    >>> to_chw_tensor(np.zeros((20, 30, 4), np.uint8), "image").shape  # RGBA: alpha dropped
    torch.Size([3, 20, 30])
"""

from __future__ import annotations

import os
import stat
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
import torch

from ._optional import require

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

__all__ = [
    "IMAGE_SUFFIXES",
    "find_images",
    "is_pil",
    "one_dtype",
    "pil_rgb",
    "read_image",
    "to_chw_tensor",
]

#: File suffixes (lower case) that :func:`find_images` treats as images.
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)


def is_pil(obj: object) -> TypeGuard[PILImage.Image]:
    """True for a PIL image (without importing PIL: a PIL image exists only if PIL is loaded).

    Examples:
        >>> is_pil(torch.zeros(3, 4, 4))
        False
    """
    module = sys.modules.get("PIL.Image")
    return module is not None and isinstance(obj, module.Image)


def _pil_to_hwc(image: Any) -> np.ndarray:
    if image.mode.startswith("I;16") or image.mode == "I":
        return _rgb_array(image)  # 16-bit: scaled, as read_image does
    if image.mode != "RGB":
        image = image.convert("RGB")  # greyscale replicated, alpha dropped, palettes expanded
    return np.asarray(image, dtype=np.uint8)


def pil_rgb(image: Any) -> Any:
    """A PIL image in RGB mode, as ``image.convert("RGB")`` but with 16-bit greyscale scaled to
    8 bits (``round(v / 257)``) instead of clipped: the library's one 16-bit rule.

    Examples:
        >>> from PIL import Image
        >>> pil_rgb(Image.new("I;16", (2, 1), 65535)).getpixel((0, 0))
        (255, 255, 255)
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        return require("PIL.Image", "demo").fromarray(_rgb_array(image))
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_8bit(values: np.ndarray) -> np.ndarray:
    """16-bit values as 8-bit ones, ``round(v / 257)``: the one 16-bit rule of the library."""
    return np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)


def to_chw_tensor(image: object, name: str = "image") -> torch.Tensor:
    """One image as an RGB ``[3, H, W]`` tensor, uint8 or floating point, values untouched.

    * a PIL image: converted to RGB (as ``image.convert("RGB")``), then uint8;
    * a numpy array: ``[H, W]`` or ``[H, W, C]`` (channels last), uint8, uint16 or float;
    * a torch tensor: ``[H, W]`` or ``[C, H, W]`` (channels first), uint8, uint16 or float, on its
      device.

    16-bit images (PIL modes ``I;16*`` and ``I``, uint16 arrays and tensors) become uint8 as
    ``round(v / 257)``, the rule of :func:`read_image`, so a 16-bit image reads the same
    everywhere. Float images are returned as they are: the library reads them as ``[0, 1]``.

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
        if image.shape[0] in (1, 3) and image.shape[1] > 4 and image.shape[2] <= 4:
            # [3, 60, 4]: a 3 x 60 RGBA image, or a channels-first 60 x 4 RGB one? Refuse to guess.
            raise ValueError(
                f"{name}: a numpy image of shape {image.shape} may be channels-first [C, H, W]; "
                "numpy images are read channels-last [H, W, C]: pass np.moveaxis(image, 0, -1) "
                "or a torch tensor [C, H, W]"
            )
        if image.dtype == np.uint16:
            image = _to_8bit(image)
        if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
            raise TypeError(
                f"{name}: a numpy image must be uint8, uint16 or float, got {image.dtype}"
            )
        with warnings.catch_warnings():
            # np.asarray(pil_image) is read-only; the tensor is only ever read, never written.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        chw = image[None] if image.dim() == 2 else image
        if chw.dim() == 3 and chw.shape[0] > 4 and chw.shape[2] in (1, 2, 3, 4):
            raise ValueError(
                f"{name}: a tensor image must be channels-first [C, H, W]; shape "
                f"{tuple(image.shape)} looks channels-last [H, W, C]: pass image.permute(2, 0, 1)"
            )
        if chw.dim() != 3 or chw.shape[0] not in (1, 2, 3, 4):
            raise ValueError(
                f"{name}: a tensor image must be [H, W] or [C, H, W] with C in 1..4, "
                f"got shape {tuple(image.shape)}"
            )
        if chw.shape[0] in (1, 2, 4) and chw.shape[2] in (3, 4) and chw.shape[1] > 4:
            # [4, 60, 3]: a 60 x 3 RGBA image, or a channels-last 4 x 60 RGB one? Refuse to guess
            # (RGB tensors, the common case, are read channels-first).
            raise ValueError(
                f"{name}: a tensor image of shape {tuple(image.shape)} may be channels-last "
                "[H, W, C]; tensors are read channels-first [C, H, W]: pass "
                "image.permute(2, 0, 1), or a numpy [H, W, C] array"
            )
        if chw.dtype == torch.uint16:
            chw = torch.from_numpy(_to_8bit(chw.cpu().numpy())).to(chw.device)
        if chw.dtype != torch.uint8 and not chw.dtype.is_floating_point:
            raise TypeError(
                f"{name}: a tensor image must be uint8, uint16 or float, got {chw.dtype}"
            )
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


def find_images(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """List the image files named by ``inputs``: files, and folders searched recursively.

    Folders contribute every regular file whose suffix is in :data:`IMAGE_SUFFIXES`
    (case-insensitive); hidden files and folders (names starting with ``.``) and anything that is
    not a regular file (a FIFO, a socket, a device) are skipped. Symbolic links are followed, but
    every folder is searched once (a link loop ends) and every file is listed once (under its
    first path in sorted order). A file named explicitly is kept whatever its suffix or kind
    (:func:`read_image` reports a non-regular one). Paths are made absolute, de-duplicated and
    sorted, so the list (and the split across ranks) is the same on every run.

    Args:
        inputs: one path or a sequence of paths.

    Returns:
        Sorted absolute paths.

    Raises:
        FileNotFoundError: an input does not exist.
        TypeError: ``inputs`` is not a path or a sequence of paths.

    Examples:
        >>> import tempfile, pathlib
        >>> from dynamic_s2.extract import find_images
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for name in ("b.PNG", "a/c.jpg", "a/notes.txt"):
        ...     (root / name).parent.mkdir(parents=True, exist_ok=True)
        ...     _ = (root / name).write_bytes(b"")
        >>> [p.relative_to(root).as_posix() for p in find_images(root)]
        ['a/c.jpg', 'b.PNG']
    """
    if isinstance(inputs, (str, os.PathLike)):
        items: list[Any] = [inputs]
    elif isinstance(inputs, Sequence):
        items = list(inputs)
    else:
        raise TypeError(
            f"inputs: expected a path or a sequence of paths, got {type(inputs).__name__}"
        )
    found: set[Path] = set()
    searched: set[tuple[int, int]] = set()  # (device, inode) of every folder searched
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"inputs: expected paths, got an item of type {type(item).__name__}")
        path = Path(item).expanduser().absolute()
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
                st = os.stat(dirpath)
                if (st.st_dev, st.st_ino) in searched:  # a link loop, or a folder seen before
                    dirnames[:] = []
                    continue
                searched.add((st.st_dev, st.st_ino))
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in filenames:
                    file = Path(dirpath) / name
                    wanted = not name.startswith(".") and file.suffix.lower() in IMAGE_SUFFIXES
                    if wanted and file.is_file():  # regular files (after links) only
                        found.add(file)
        elif path.exists():
            found.add(path)
        else:
            raise FileNotFoundError(f"inputs: {os.fspath(item)!r} does not exist")
    unique: dict[str, Path] = {}  # the real file -> its first path in sorted order
    for p in sorted(found, key=lambda p: p.as_posix()):
        unique.setdefault(os.path.realpath(p), p)
    return sorted(unique.values(), key=lambda p: p.as_posix())


def read_image(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> torch.Tensor:
    """Read an image file as a uint8 ``[3, H, W]`` tensor, the way :func:`extract` does.

    Pillow opens the file, applies its EXIF orientation and converts it to RGB (greyscale, CMYK,
    palette and alpha images become three channels). 16-bit greyscale (Pillow modes ``I;16*``,
    and ``I`` holding values up to 65535) is scaled to 8 bits (``round(v / 257)``), not clipped.

    Args:
        path: the image file; it must be a regular file (a FIFO or a device is refused, never
            opened).
        max_pixels: refuse images of more than this many pixels, checked from the file's header
            before anything is decoded.

    Raises:
        ValueError: ``path`` is not a regular file, or the image has more than ``max_pixels``.

    Examples:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> from dynamic_s2.extract import read_image
        >>> path = os.path.join(tempfile.mkdtemp(), "grey.png")
        >>> Image.new("L", (5, 3), 128).save(path)
        >>> read_image(path).shape
        torch.Size([3, 3, 5])
    """
    pil_image = require("PIL.Image", "demo")
    image_ops = require("PIL.ImageOps", "demo")
    if not stat.S_ISREG(os.stat(path).st_mode):  # opening a FIFO would block for ever
        raise ValueError(f"path: {os.fspath(path)!r} is not a regular file")
    with pil_image.open(path) as opened:
        width, height = opened.size  # from the header: nothing is decoded yet
        if max_pixels is not None and width * height > max_pixels:
            raise ValueError(
                f"max_pixels: {os.fspath(path)!r} is {height}x{width} = {width * height} pixels, "
                f"more than max_pixels={max_pixels}"
            )
        image = image_ops.exif_transpose(opened)
        if image is None:  # older Pillow with in_place semantics
            image = opened
        array = _rgb_array(image)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _rgb_array(image: Any) -> Any:
    """``[H, W, 3]`` uint8 numpy array of a PIL image; 16-bit greyscale scaled, not clipped."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            return np.array(image.convert("RGB"), dtype=np.uint8, copy=True)  # not 16-bit data
        grey = _to_8bit(values)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    return np.array(image.convert("RGB"), dtype=np.uint8, copy=True)


def one_dtype(items: list[torch.Tensor]) -> list[torch.Tensor]:
    """Images of one dtype: a mix of uint8 and float becomes float32 in ``[0, 1]`` (uint8 / 255),
    the library's one reading of pixel values; images of one dtype are returned as they are.

    Examples:
        >>> mixed = [torch.full((3, 2, 2), 255, dtype=torch.uint8), torch.zeros(3, 2, 2)]
        >>> [float(x.max()) for x in one_dtype(mixed)]
        [1.0, 0.0]
    """
    if len({x.dtype for x in items}) <= 1:
        return items
    return [x.to(torch.float32).div(255.0) if x.dtype == torch.uint8 else x.float() for x in items]
