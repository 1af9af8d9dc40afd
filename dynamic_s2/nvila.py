"""NVILA-style MLLM preprocessing, feature merge and token packing.

NVILA (NVlabs/VILA) feeds SigLIP the same image at 448, 896 and 1344 pixels: the two lower scales
are stretched to 1×1 and 2×2 squares of 448-pixel tiles, the last scale to an aspect-matched grid
``rows × cols`` (NVILA's ``block_size``). The features of each scale are stitched, resampled to the
last scale's map with ``F.interpolate(mode="area")`` and concatenated on channels; every 2×2 block
of the merged map then becomes one LLM token of ``4C`` channels.

This module reproduces that pipeline on top of the library's stages:

* :func:`preprocess` / :func:`preprocess_batch`: a PIL image goes through PIL exactly as in NVILA
  (identical tiles); a uint8 tensor or numpy array takes a fast torch path
  (:func:`dynamic_s2.tiling.tile_images`) that also runs on GPU. Both read their grids from
  :func:`dynamic_s2.plan_tiles` with ``policy="nvila"``.
* :func:`merge_features`: NVILA's merge, for all images in one call of the library's merge stage
  (:func:`dynamic_s2.merge`).
* :func:`pack_tokens` / :func:`pack_tokens_batch`: the 2×2 token packing of NVILA's projector.
* :func:`num_tokens`: the token count of an image, to reserve prompt placeholders ahead of time.

NVILA appends one newline embedding after each image's tokens; that is a token of the language
model and is left to the LLM side.

Examples:
    >>> import torch
    >>> from dynamic_s2 import nvila
    >>> image = torch.randint(0, 256, (3, 60, 100), dtype=torch.uint8)
    >>> tiles, block = nvila.preprocess(image, scales=(32, 64, 96))
    >>> tiles.shape, block
    (torch.Size([17, 3, 32, 32]), (3, 4))
    >>> feats = torch.randn(17, 16, 8)           # a backbone's 4 × 4 tokens of 8 channels per tile
    >>> merged = nvila.merge_features(feats, [block], scales=(32, 64, 96))
    >>> merged[0].shape                          # 3 scales × 8 channels, (3·4) × (4·4) cells
    torch.Size([24, 12, 16])
    >>> nvila.pack_tokens(merged[0]).shape
    torch.Size([48, 96])
    >>> nvila.num_tokens(block, tokens_per_tile_side=4)
    48
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, TypeAlias, TypeGuard

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from .merge import merge
from .plan import TilePlan, check_scales, nvila_plan_for_block, plan_tiles
from .tiling import cut_grid, tile_images

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

__all__ = [
    "DEFAULT_MAX_TILES",
    "DEFAULT_SCALES",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "merge_features",
    "num_tokens",
    "pack_tokens",
    "pack_tokens_batch",
    "preprocess",
    "preprocess_batch",
]

#: NVILA's released scales (SigLIP-so400m-448).
DEFAULT_SCALES: tuple[int, int, int] = (448, 896, 1344)
#: NVILA's ``max_tiles`` (the most tiles at the last scale).
DEFAULT_MAX_TILES: int = 12
#: SigLIP's normalisation: ``(x / 255 - 0.5) / 0.5``.
SIGLIP_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
SIGLIP_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

ImageInput: TypeAlias = "torch.Tensor | np.ndarray | PILImage.Image"
BlockSize: TypeAlias = tuple[int, int]


# ------------------------------------------------------------------------------------ helpers


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_pil(obj: object) -> TypeGuard[PILImage.Image]:
    # A PIL image can only exist if PIL is already imported, so nothing is imported here.
    module = sys.modules.get("PIL.Image")
    return module is not None and isinstance(obj, module.Image)


def _require_pil() -> Any:
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - Pillow is installed with the test extras
        raise ImportError(
            "dynamic_s2.nvila needs Pillow for PIL images: pip install pillow "
            "(or pass a uint8 tensor / numpy array to use the torch path)"
        ) from err
    return Image


def _check_stats(name: str, value: Any) -> tuple[float, float, float]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) != 3:
        raise TypeError(
            f"{name} must be a sequence of 3 numbers (one per RGB channel), got {value!r}"
        )
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
        raise TypeError(f"{name} must be a sequence of 3 numbers, got {value!r}")
    out = (float(value[0]), float(value[1]), float(value[2]))
    if name == "std" and any(v == 0.0 or not math.isfinite(v) for v in out):
        raise ValueError(f"std must be finite and non-zero, got {value!r}")
    return out


def _to_rgb_chw(image: object, name: str) -> torch.Tensor:
    """A ``[3, H, W]`` tensor view of a tensor (channels first) or numpy array (channels last)."""
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
            f"{name} must be a PIL image, a [3, H, W] tensor or an [H, W, 3] numpy array, "
            f"got {type(image).__name__}"
        )
    if chw.shape[1] == 0 or chw.shape[2] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(chw.shape)}")
    channels = chw.shape[0]
    if channels in (1, 2):  # greyscale (+ alpha): replicate the grey channel, as PIL's convert
        return chw[:1].expand(3, -1, -1)
    return chw[:3]  # RGB, or RGBA with its alpha dropped, as PIL's convert("RGB")


def _nvila_plan(height: int, width: int, scales: Sequence[int], max_tiles: int) -> TilePlan:
    if not _is_int(max_tiles):
        raise TypeError(f"max_tiles must be an int (NVILA's max_num), got {max_tiles!r}")
    return plan_tiles(height, width, scales, max_tiles=max_tiles, policy="nvila")


def _normalize_(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """In place: ``(x - mean) / std`` per channel of ``[T, 3, t, t]`` float32 tiles in [0, 1]."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)


def _preprocess_pil(
    image: PILImage.Image,
    scales: Sequence[int],
    max_tiles: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[torch.Tensor, TilePlan]:
    _require_pil()
    if image.mode != "RGB":
        image = image.convert("RGB")  # NVILA converts every image this way
    plan = _nvila_plan(image.height, image.width, scales, max_tiles)
    t = plan.tile_size
    tiles = torch.empty((plan.num_tiles, 3, t, t), dtype=torch.float32)
    start = 0
    for sp in plan.scales:
        canvas_h, canvas_w = sp.canvas_size
        resized = image.resize((canvas_w, canvas_h))  # PIL's default filter: bicubic for RGB
        canvas = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1)
        tiles[start : start + sp.num_tiles].copy_(cut_grid(canvas[None], sp.grid)[0])
        start += sp.num_tiles
    # In place, in NVILA's order: x / 255, then (x - mean) / std.
    return _normalize_(tiles.div_(255.0), mean, std), plan


def _tile_tensors(
    images: list[torch.Tensor],
    plans: list[TilePlan],
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """One :func:`tile_images` call for all tensor images, normalised as ``(x - mean) / std``."""
    if all(img.dtype == torch.uint8 for img in images):
        # uint8 resize: torch's integer kernel on the CPU, close to PIL's and several times faster
        return tile_images(images, plans, mean=mean, std=std, uint8_resize=True).tiles
    # Float images are in [0, 1]; tile_images uses float input as it is, so normalise afterwards
    # (bicubic resampling is linear with weights summing to one, so the order does not matter).
    floats = [img.float().div(255.0) if img.dtype == torch.uint8 else img.float() for img in images]
    return _normalize_(tile_images(floats, plans).tiles, mean, std)


# ---------------------------------------------------------------------------------- preprocess


def preprocess(
    image: ImageInput,
    scales: Sequence[int] = DEFAULT_SCALES,
    max_tiles: int = DEFAULT_MAX_TILES,
    mean: Sequence[float] = SIGLIP_MEAN,
    std: Sequence[float] = SIGLIP_STD,
) -> tuple[torch.Tensor, BlockSize]:
    """NVILA's Dynamic-S2 preprocessing of one image.

    Every scale but the last is the whole image stretched to a ``k × k`` square of tiles
    (``k = scale // scales[0]``); the last is stretched to NVILA's aspect-matched grid
    ``rows × cols``. Tiles come lowest scale first, row-major within a scale, each normalised as
    ``(x / 255 - mean) / std``. Grids come from ``plan_tiles(h, w, scales, max_tiles=max_tiles,
    policy="nvila")``.

    Args:
        image: a PIL image (any mode; converted to RGB as NVILA does), a ``[3, H, W]`` tensor or an
            ``[H, W, 3]`` numpy array (uint8, or float in ``[0, 1]``). Tensors and arrays may also
            have 1 (grey), 2 (grey + alpha) or 4 (RGBA) channels, or no channel axis (grey); grey
            is replicated and alpha dropped, as PIL's ``convert("RGB")`` does. A numpy array that
            may be channels-first (``[1 or 3, H > 4, W <= 4]``) raises ``ValueError``. A PIL
            image is used in its stored orientation, as NVILA does (it never reads EXIF); pass
            ``PIL.ImageOps.exif_transpose(image)`` to honour EXIF, as
            :func:`dynamic_s2.extract.read_image` (and ``dynamic-s2 extract``) always do.
        scales: pixel sizes, each a multiple of the first (the tile size).
        max_tiles: the most tiles at the last scale (NVILA's ``max_num``).
        mean: per-channel normalisation mean (SigLIP's ``0.5`` by default).
        std: per-channel normalisation std (SigLIP's ``0.5`` by default).

    Returns:
        ``(tiles, block_size)``: ``tiles`` is ``[1 + 4 + rows·cols, 3, t, t]`` float32 for the
        default scales; ``block_size`` is ``(rows, cols)`` of the last scale.

    PIL input goes through PIL's ``resize`` and is identical to NVILA's tiles. Tensor and numpy
    input takes the torch path (:func:`dynamic_s2.tiling.tile_images`: bicubic with antialiasing;
    uint8 images are resized in uint8, as PIL does), on the tensor's device; it uses the same grids
    and differs from PIL by rounding and filter details only (mean absolute difference well under
    0.02).

    Raises:
        TypeError: an unsupported image type or dtype, or bad ``mean`` / ``std``.
        ValueError: a malformed image shape, bad scales or ``max_tiles``.

    Examples:
        >>> import torch
        >>> tiles, block = preprocess(torch.zeros(3, 600, 1000, dtype=torch.uint8))
        >>> tiles.shape, tiles.dtype, block
        (torch.Size([17, 3, 448, 448]), torch.float32, (3, 4))
        >>> float(tiles.min()), float(tiles.max())
        (-1.0, -1.0)
    """
    tiles, blocks = preprocess_batch([image], scales, max_tiles, mean, std)
    return tiles, blocks[0]


def preprocess_batch(
    images: Sequence[ImageInput],
    scales: Sequence[int] = DEFAULT_SCALES,
    max_tiles: int = DEFAULT_MAX_TILES,
    mean: Sequence[float] = SIGLIP_MEAN,
    std: Sequence[float] = SIGLIP_STD,
) -> tuple[torch.Tensor, list[BlockSize]]:
    """:func:`preprocess` for a list of images: all tiles concatenated, plus every block size.

    This is what a DataLoader ``collate_fn`` returns: tiles in image order (each image's tiles as
    :func:`preprocess` gives them) and the ``(rows, cols)`` list that :func:`merge_features` needs.
    Tensor and numpy images are tiled by one :func:`dynamic_s2.tiling.tile_images` call for the
    whole batch; PIL images go through PIL one by one (that is what PIL can do).

    Args:
        images: a non-empty sequence of images, each as :func:`preprocess` accepts.
        scales: as in :func:`preprocess`.
        max_tiles: as in :func:`preprocess`.
        mean: as in :func:`preprocess`.
        std: as in :func:`preprocess`.

    Returns:
        ``(tiles [sum of tiles, 3, t, t] float32, [(rows, cols), ...])``.

    Examples:
        >>> import numpy as np, torch
        >>> images = [torch.zeros(3, 60, 100, dtype=torch.uint8), np.zeros((100, 20), np.uint8)]
        >>> tiles, blocks = preprocess_batch(images, scales=(32, 64, 96))
        >>> tiles.shape, blocks
        (torch.Size([31, 3, 32, 32]), [(3, 4), (9, 1)])
    """
    if isinstance(images, str | bytes) or not isinstance(images, Sequence):
        raise TypeError(f"images must be a sequence of images, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images must not be empty")
    mean = _check_stats("mean", mean)
    std = _check_stats("std", std)

    parts: dict[int, torch.Tensor] = {}  # PIL images, tiled one by one
    plans: list[TilePlan] = []
    tensor_ids: list[int] = []
    tensor_images: list[torch.Tensor] = []
    for i, image in enumerate(images):
        if _is_pil(image):
            parts[i], plan = _preprocess_pil(image, scales, max_tiles, mean, std)
        else:
            chw = _to_rgb_chw(image, f"images[{i}]")
            plan = _nvila_plan(int(chw.shape[1]), int(chw.shape[2]), scales, max_tiles)
            tensor_ids.append(i)
            tensor_images.append(chw)
        plans.append(plan)
    blocks = [plan.scales[-1].grid for plan in plans]

    device = torch.device("cpu")
    if tensor_ids:
        tensor_plans = [plans[i] for i in tensor_ids]
        tiles = _tile_tensors(tensor_images, tensor_plans, mean, std)
        if not parts:
            return tiles, blocks
        device = tiles.device
        chunks = tiles.split([plan.num_tiles for plan in tensor_plans])
        parts.update(zip(tensor_ids, chunks, strict=True))
    return torch.cat([parts[i].to(device) for i in range(len(images))]), blocks


# --------------------------------------------------------------------------------------- merge


def _check_nvila_scales(scales: Any) -> tuple[int, ...]:
    out = check_scales(scales)
    if any(s % out[0] for s in out):
        raise ValueError(f"scales must be multiples of the first (NVILA), got {out!r}")
    return out


def _check_block_size(name: str, value: Any) -> BlockSize:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name} must be a (rows, cols) pair of positive ints, got {value!r}")
    if not all(_is_int(v) and v > 0 for v in value):
        raise ValueError(f"{name} must be a (rows, cols) pair of positive ints, got {value!r}")
    return (int(value[0]), int(value[1]))


def merge_features(
    tile_features: torch.Tensor,
    block_sizes: Sequence[BlockSize],
    scales: Sequence[int] = DEFAULT_SCALES,
    output_scale: int = -1,
) -> list[torch.Tensor]:
    """NVILA's merge: per image, stitch every scale, area-resample to one scale, concat channels.

    For each image, the ``k × k`` tiles of each lower scale and the ``rows × cols`` tiles of the
    last are stitched into maps; every map is resampled to the map of ``scales[output_scale]`` with
    ``F.interpolate(mode="area")`` in float32 (cast back), and the maps are concatenated on
    channels, lowest scale first. This is one batched call of the library's merge stage
    (:func:`dynamic_s2.merge`, whose area resampling equals ``F.interpolate(mode="area")``), not a
    loop over images.

    Args:
        tile_features: ``[T, N, C]`` tokens with ``N`` a square number (no prefix/CLS token; SigLIP
            has none) or ``[T, C, h, h]`` maps, tiles in :func:`preprocess_batch` order.
        block_sizes: one ``(rows, cols)`` per image, as :func:`preprocess_batch` returns them.
        scales: the scales the tiles were made with.
        output_scale: index of the scale whose map size the output takes (NVILA: ``-1``).

    Returns:
        One ``[C·S, H, W]`` tensor per image, in the input dtype, with ``(H, W)`` the output
        scale's map (``(32·rows, 32·cols)`` for SigLIP-448 at the last scale). The tensors are
        views into one buffer in channels-last memory; :func:`pack_tokens` reads them directly.

    Raises:
        TypeError: ``tile_features`` is not a tensor; a malformed block size.
        ValueError: a wrong rank, a non-square token count, bad scales or ``output_scale``, or a
            tile count that does not match the block sizes.

    Examples:
        >>> import torch
        >>> feats = torch.randn(1 + 4 + 6, 4, 2, 2)    # one image, block (2, 3), 2 × 2 maps
        >>> out = merge_features(feats, [(2, 3)], scales=(32, 64, 96))
        >>> len(out), out[0].shape
        (1, torch.Size([12, 4, 6]))
        >>> merge_features(feats, [(2, 3)], scales=(32, 64, 96), output_scale=0)[0].shape
        torch.Size([12, 2, 2])
    """
    if not isinstance(tile_features, torch.Tensor):
        raise TypeError(f"tile_features must be a tensor, got {type(tile_features).__name__}")
    if tile_features.dim() == 3:
        n = tile_features.shape[1]
        if math.isqrt(n) ** 2 != n:
            raise ValueError(
                f"tile_features: [T, N, C] tokens need a square N (no prefix/CLS token), got N={n}"
            )
    elif tile_features.dim() != 4:
        raise ValueError(
            "tile_features must be [T, N, C] tokens or [T, C, h, w] maps, got shape "
            f"{tuple(tile_features.shape)}"
        )
    sc = _check_nvila_scales(scales)
    if isinstance(block_sizes, str | bytes) or not isinstance(block_sizes, Sequence):
        raise TypeError(f"block_sizes must be a sequence of (rows, cols), got {block_sizes!r}")
    if len(block_sizes) == 0:
        raise ValueError("block_sizes must not be empty")
    if not _is_int(output_scale):
        raise TypeError(f"output_scale must be an int, got {output_scale!r}")
    if not -len(sc) <= output_scale < len(sc):
        raise ValueError(f"output_scale {output_scale} is out of range for {len(sc)} scales")
    out_index = int(output_scale) % len(sc)

    plans = [
        nvila_plan_for_block(_check_block_size(f"block_sizes[{b}]", bs), sc)
        for b, bs in enumerate(block_sizes)
    ]
    expected = sum(p.num_tiles for p in plans)
    if expected != tile_features.shape[0]:
        raise ValueError(
            f"block_sizes {list(block_sizes)!r} with scales {sc} need {expected} tiles, "
            f"tile_features has {tile_features.shape[0]}"
        )
    merged = merge(tile_features, plans, output_scale=out_index, num_prefix_tokens=0)
    return [m.permute(2, 0, 1) for m in merged.unpad()]


# ----------------------------------------------------------------------------------- packing


def _check_factor(factor: Any) -> int:
    if not _is_int(factor):
        raise TypeError(f"factor must be a positive int, got {factor!r}")
    if factor <= 0:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    return int(factor)


def _check_map(name: str, feature_map: Any) -> torch.Tensor:
    if not isinstance(feature_map, torch.Tensor):
        raise TypeError(f"{name} must be a [C, H, W] tensor, got {type(feature_map).__name__}")
    if feature_map.dim() != 3:
        raise ValueError(f"{name} must be a [C, H, W] tensor, got shape {tuple(feature_map.shape)}")
    return feature_map


def _pad_tiles(fmap: torch.Tensor, side: int, f: int) -> torch.Tensor:
    """NVILA's per-tile rule: cut ``[C, R·n, Q·n]`` into ``n × n`` tiles (``n = side``), pad each
    at the bottom and right to a multiple of ``f``, and put them back together."""
    c, h, w = fmap.shape
    if not _is_int(side) or side <= 0 or h % side or w % side:
        raise ValueError(
            f"tokens_per_tile_side must be a positive int dividing the map's {h}x{w} cells, "
            f"got {side!r}"
        )
    padded = -(-side // f) * f
    if padded == side:
        return fmap
    rows, cols = h // side, w // side
    out = fmap.new_zeros((c, rows, padded, cols, padded))
    out[:, :, :side, :, :side] = fmap.view(c, rows, side, cols, side)
    return out.view(c, rows * padded, cols * padded)


def pack_tokens(
    feature_map: torch.Tensor, factor: int = 2, *, tokens_per_tile_side: int | None = None
) -> torch.Tensor:
    """Pack every ``factor × factor`` block of a ``[C, H, W]`` map into one token, as NVILA does.

    The map is zero-padded at the bottom and right to multiples of ``factor`` (as NVILA's
    ``DownSampleBlock``), then every block becomes one token of ``factor² · C`` channels, ordered
    row-major inside the block: for ``factor=2``, ``(row0 col0, row0 col1, row1 col0, row1 col1)``,
    ``C`` channels each. Tokens run in raster order over the whole map.

    NVILA itself cuts the merged map back into its tiles and packs each tile on its own: with an
    odd number of cells per tile side (27 for SigLIP-384 checkpoints), every tile is padded
    (27 → 28) before packing. Pass ``tokens_per_tile_side`` for that rule (and
    ``num_tokens(..., per_tile=True)`` for its count); for an even side the two rules agree.

    Args:
        feature_map: ``[C, H, W]``, e.g. one output of :func:`merge_features`.
        factor: block side (NVILA: 2).
        tokens_per_tile_side: cells per tile side, to pad every tile as NVILA does.

    Returns:
        ``[ceil(H / factor) · ceil(W / factor), factor² · C]`` (per tile: ``rows · cols ·
        ceil(n / factor)²`` tokens), same dtype and device.

    Examples:
        >>> import torch
        >>> x = torch.arange(12.0).view(1, 3, 4)      # C=1, H=3, W=4
        >>> pack_tokens(x)
        tensor([[ 0.,  1.,  4.,  5.],
                [ 2.,  3.,  6.,  7.],
                [ 8.,  9.,  0.,  0.],
                [10., 11.,  0.,  0.]])
    """
    fmap = _check_map("feature_map", feature_map)
    f = _check_factor(factor)
    if tokens_per_tile_side is not None:
        fmap = _pad_tiles(fmap, tokens_per_tile_side, f)
    pad_h, pad_w = -fmap.shape[1] % f, -fmap.shape[2] % f
    if pad_h or pad_w:
        fmap = F.pad(fmap, (0, pad_w, 0, pad_h))
    return rearrange(fmap, "c (h i) (w j) -> (h w) (i j c)", i=f, j=f)


@lru_cache(maxsize=1024)
def _pack_index(h: int, w: int, f: int) -> np.ndarray:
    """Row of the flattened ``[h·w, C]`` map feeding each token slot, ``-1`` for zero padding."""
    hp, wp = -(-h // f) * f, -(-w // f) * f
    y = np.arange(hp)[:, None]
    x = np.arange(wp)[None, :]
    src = np.where((y < h) & (x < w), y * w + x, -1)  # [hp, wp]
    idx = src.reshape(hp // f, f, wp // f, f).transpose(0, 2, 1, 3).reshape(-1)
    idx.setflags(write=False)
    return idx


def pack_tokens_batch(
    feature_maps: Sequence[torch.Tensor],
    factor: int = 2,
    *,
    tokens_per_tile_side: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pack_tokens` for a list of maps: packed tokens plus ``cu_seqlens``.

    One gather over all maps (index maps built on the host and cached per size), no loop of
    tensor ops per image. The layout is what varlen attention kernels expect.

    Args:
        feature_maps: non-empty list of ``[C, H_b, W_b]`` maps with the same ``C``, dtype and
            device, e.g. the output of :func:`merge_features`.
        factor: block side (NVILA: 2).
        tokens_per_tile_side: pad every tile as NVILA does (see :func:`pack_tokens`).

    Returns:
        ``(tokens [sum_b n_b, factor² · C], cu_seqlens int32 [B + 1])``, where image ``b``'s
        tokens are ``tokens[cu_seqlens[b]:cu_seqlens[b + 1]]`` and equal ``pack_tokens(maps[b])``.

    Examples:
        >>> import torch
        >>> tokens, cu = pack_tokens_batch([torch.randn(8, 4, 6), torch.randn(8, 3, 3)])
        >>> tokens.shape, cu.tolist()
        (torch.Size([10, 32]), [0, 6, 10])
    """
    if isinstance(feature_maps, torch.Tensor) or not isinstance(feature_maps, Sequence):
        raise TypeError(
            f"feature_maps must be a list of [C, H, W] tensors, got {type(feature_maps).__name__}"
        )
    if len(feature_maps) == 0:
        raise ValueError("feature_maps must not be empty")
    f = _check_factor(factor)
    maps = [_check_map(f"feature_maps[{b}]", m) for b, m in enumerate(feature_maps)]
    if tokens_per_tile_side is not None:
        maps = [_pad_tiles(m, tokens_per_tile_side, f) for m in maps]
    first = maps[0]
    c = first.shape[0]
    for b, m in enumerate(maps):
        if m.shape[0] != c or m.dtype != first.dtype or m.device != first.device:
            raise ValueError(
                f"feature_maps[{b}] has {m.shape[0]} channels, {m.dtype} on {m.device}; "
                f"feature_maps[0] has {c} channels, {first.dtype} on {first.device}"
            )

    sizes = [(int(m.shape[1]), int(m.shape[2])) for m in maps]
    total = sum(h * w for h, w in sizes)
    index_parts = []
    counts = [0]
    offset = 0
    for h, w in sizes:
        local = _pack_index(h, w, f)
        index_parts.append(np.where(local >= 0, local + offset, total))  # total: the zero row
        offset += h * w
        counts.append(counts[-1] + len(local) // (f * f))
    index = torch.from_numpy(np.concatenate(index_parts)).to(first.device)

    rows = [m.permute(1, 2, 0).reshape(-1, c) for m in maps]  # views for channels-last maps
    rows.append(first.new_zeros(1, c))
    flat = torch.cat(rows)
    tokens = flat.index_select(0, index).view(-1, f * f * c)
    cu_seqlens = torch.tensor(counts, dtype=torch.int32, device=first.device)
    return tokens, cu_seqlens


def num_tokens(
    block_size: BlockSize | TilePlan,
    *,
    tokens_per_tile_side: int = 32,
    factor: int = 2,
    output_scale: int = -1,
    per_tile: bool = False,
) -> int:
    """The number of LLM tokens :func:`pack_tokens` makes for an image, without running a model.

    ``ceil(rows·n / factor) · ceil(cols·n / factor)`` with ``n = tokens_per_tile_side`` (32 for
    SigLIP-448 with patch 14) and ``(rows, cols)`` the grid of the merge's output scale: NVILA's
    block size for the default ``output_scale=-1``. NVILA's newline embedding (one more token per
    image) is not counted.

    Args:
        block_size: ``(rows, cols)``, or a :class:`~dynamic_s2.TilePlan` from
            ``plan_tiles(..., policy="nvila")`` (then ``output_scale`` picks its scale).
        tokens_per_tile_side: feature cells per tile side.
        factor: the packing block side.
        output_scale: with a plan, the index of the output scale.
        per_tile: count NVILA's per-tile rule, ``rows · cols · ceil(n / factor)²``: what
            ``pack_tokens(..., tokens_per_tile_side=n)`` makes and what NVILA makes (2352 for a
            3 × 4 block of 27 × 27 tiles, against 2214 for the whole-map rule).

    Examples:
        >>> num_tokens((3, 4))                         # a 1000 × 600 image: 17 tiles
        3072
        >>> from dynamic_s2 import plan_tiles
        >>> num_tokens(plan_tiles(1080, 1920, (448, 896, 1344), policy="nvila"))
        3072
        >>> num_tokens((1, 1), tokens_per_tile_side=27)   # SigLIP-384: 27 × 27 -> 14 × 14
        196
        >>> num_tokens((3, 4), tokens_per_tile_side=27, per_tile=True)   # NVILA's count
        2352
    """
    n = tokens_per_tile_side
    if not _is_int(n) or n <= 0:
        raise ValueError(f"tokens_per_tile_side must be a positive int, got {n!r}")
    f = _check_factor(factor)
    if isinstance(block_size, TilePlan):
        rows, cols = block_size.scales[block_size.scale_index(output_scale, "output_scale")].grid
    else:
        rows, cols = _check_block_size("block_size", block_size)
    if not isinstance(per_tile, bool):
        raise TypeError(f"per_tile must be a bool, got {per_tile!r}")
    if per_tile:
        return rows * cols * (-(-n // f)) ** 2
    return -(-rows * n // f) * -(-cols * n // f)
