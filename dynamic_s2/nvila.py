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

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch

from . import _checks
from ._fused import cu_seqlens, pack_maps
from ._images import is_pil, one_dtype, pil_rgb, to_chw_tensor
from ._optional import require
from .api import prepare
from .merge import check_plan_list, merge, split_prefix
from .packing import num_image_tokens, pack_tokens, pack_tokens_batch, packed_size
from .plan import TilePlan, as_plans, check_scales, nvila_plan_for_block, plan_tiles
from .tiling import TileBatch, tile_pil

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

__all__ = [
    "DEFAULT_MAX_TILES",
    "DEFAULT_SCALES",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "NvilaTiles",
    "merge_and_pack",
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


def _check_stats(name: str, value: Any) -> tuple[float, float, float]:
    out = _checks.stats(name, value)
    if not isinstance(out, tuple) or len(out) != 3:
        raise TypeError(
            f"{name} must be a sequence of 3 numbers (one per RGB channel), got {value!r}"
        )
    return (out[0], out[1], out[2])


def _planner(
    scales: Sequence[int], max_tiles: int, max_upscale: float | None
) -> Callable[[int, int], TilePlan]:
    """NVILA's planner for these settings, as a function of the image size."""
    if not _checks.is_int(max_tiles):
        raise TypeError(f"max_tiles must be an int (NVILA's max_num), got {max_tiles!r}")
    return functools.partial(
        plan_tiles, scales=scales, max_tiles=max_tiles, policy="nvila", max_upscale=max_upscale
    )


def _normalize_(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """In place: ``(x - mean) / std`` per channel of ``[T, 3, t, t]`` float32 tiles in [0, 1]."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)


def _preprocess_pil(
    image: PILImage.Image,
    plan_for: Callable[[int, int], TilePlan],
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[torch.Tensor, TilePlan]:
    require("PIL.Image", "demo")
    image = pil_rgb(image)  # NVILA converts every image to RGB; 16-bit scaled, not clipped
    plan = plan_for(image.height, image.width)
    tiles = tile_pil(image, plan).to(torch.float32)
    # In place, in NVILA's order: x / 255, then (x - mean) / std.
    return _normalize_(tiles.div_(255.0), mean, std), plan


def _tile_tensors(
    images: list[torch.Tensor],
    plans: list[TilePlan],
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """One :func:`dynamic_s2.prepare` call for all tensor images, normalised as NVILA does."""
    images = one_dtype(images)  # a mix of uint8 and float: float32 in [0, 1]
    # The library's one rule: uint8 / 255, float as [0, 1], then (x - mean) / std. uint8 resize
    # is torch's integer kernel on the CPU, close to PIL's and several times faster.
    return prepare(images, plans=plans, mean=mean, std=std, uint8_resize=True).tiles


@dataclass(frozen=True)
class NvilaTiles(TileBatch):
    """NVILA tiles with the plan of every image: a :class:`~dynamic_s2.tiling.TileBatch`.

    It unpacks as ``(tiles, block_sizes)`` (or ``(tiles, block_size)`` when :func:`preprocess`
    made it for one image), as these functions returned before, and :func:`dynamic_s2.run` and
    :func:`merge_features` take it as it is.

    Examples:
        >>> out = preprocess_batch([torch.zeros(3, 60, 100, dtype=torch.uint8)], (32, 64, 96))
        >>> out.block_sizes, out.plans[0].grids
        ([(3, 4)], ((1, 1), (2, 2), (3, 4)))
        >>> tiles, blocks = out
    """

    single: bool = False

    @property
    def block_sizes(self) -> list[BlockSize]:
        """``(rows, cols)`` of the last scale of every image (NVILA's ``block_size``)."""
        return [plan.scales[-1].grid for plan in self.plans]

    def __iter__(self) -> Iterator[Any]:
        yield self.tiles
        yield self.block_sizes[0] if self.single else self.block_sizes

    def __getitem__(self, index: int) -> Any:
        """``(tiles, block_size[s])[index]``, as the tuple these functions returned before."""
        return tuple(self)[index]

    def __len__(self) -> int:
        return 2


# ---------------------------------------------------------------------------------- preprocess


def preprocess(
    image: ImageInput,
    scales: Sequence[int] = DEFAULT_SCALES,
    max_tiles: int = DEFAULT_MAX_TILES,
    mean: Sequence[float] = SIGLIP_MEAN,
    std: Sequence[float] = SIGLIP_STD,
    max_upscale: float | None = None,
) -> NvilaTiles:
    """NVILA's Dynamic-S2 preprocessing of one image.

    Every scale but the last is the whole image stretched to a ``k × k`` square of tiles
    (``k = scale // scales[0]``); the last is stretched to NVILA's aspect-matched grid
    ``rows × cols``. Tiles come lowest scale first, row-major within a scale, each normalised as
    ``(x / 255 - mean) / std``. Grids come from ``plan_tiles(h, w, scales, max_tiles=max_tiles,
    policy="nvila")``.

    Args:
        image: a PIL image (any mode; converted to RGB as NVILA does, except that 16-bit modes are
            scaled to 8 bits, ``round(v / 257)``, where NVILA clips), a ``[3, H, W]`` tensor or an
            ``[H, W, 3]`` numpy array (uint8, or float in ``[0, 1]``). Tensors and arrays may also
            have 1 (grey), 2 (grey + alpha) or 4 (RGBA) channels, or no channel axis (grey); grey
            is replicated and alpha dropped, as PIL's ``convert("RGB")`` does. A numpy array that
            may be channels-first (``[1 or 3, H > 4, W <= 4]``) raises ``ValueError``. A PIL
            image is used in its stored orientation, as NVILA does (it never reads EXIF); pass
            ``PIL.ImageOps.exif_transpose(image)`` to honour EXIF, as
            :func:`dynamic_s2.extract.read_image` (and ``dynamic-s2 extract``) always do.
        scales: pixel sizes, each a multiple of the first (the tile size).
        max_tiles: the most tiles at the last scale (NVILA's ``max_num``).
        max_upscale: not NVILA's: no scale enlarges the image more than this factor along a
            side (see :func:`dynamic_s2.plan_tiles`); small images then get fewer tiles than
            NVILA gives them. ``None`` (the default) is NVILA's rule exactly.
        mean: per-channel normalisation mean (SigLIP's ``0.5`` by default).
        std: per-channel normalisation std (SigLIP's ``0.5`` by default).

    Returns:
        :class:`NvilaTiles`, which unpacks as ``(tiles, block_size)``: ``tiles`` is
        ``[1 + 4 + rows·cols, 3, t, t]`` float32 for the default scales; ``block_size`` is
        ``(rows, cols)`` of the last scale; ``.plans`` holds the image's plan.

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
    batch = preprocess_batch([image], scales, max_tiles, mean, std, max_upscale)
    return NvilaTiles(batch.tiles, batch.plans, single=True)


def preprocess_batch(
    images: Sequence[ImageInput],
    scales: Sequence[int] = DEFAULT_SCALES,
    max_tiles: int = DEFAULT_MAX_TILES,
    mean: Sequence[float] = SIGLIP_MEAN,
    std: Sequence[float] = SIGLIP_STD,
    max_upscale: float | None = None,
    single: Sequence[bool] | None = None,
) -> NvilaTiles:
    """:func:`preprocess` for a list of images: all tiles concatenated, with every plan.

    This is what a DataLoader ``collate_fn`` returns: tiles in image order (each image's tiles as
    :func:`preprocess` gives them) and the ``(rows, cols)`` list that :func:`merge_features` needs.
    Tensor and numpy images are tiled by one :func:`dynamic_s2.tiling.tile_images` call for the
    whole batch; PIL images go through PIL one by one (that is what PIL can do).

    Args:
        images: a non-empty sequence of images, each as :func:`preprocess` accepts.
        scales: as in :func:`preprocess`.
        max_tiles: as in :func:`preprocess`.
        max_upscale: as in :func:`preprocess`.
        mean: as in :func:`preprocess`.
        std: as in :func:`preprocess`.
        single: per image, ``True`` for NVILA's mode for prompts with several images and for
            video frames: the image resized to one tile (``policy="single"``), used at every
            scale; its features are computed once by :func:`dynamic_s2.run` and repeated per
            scale by the merge, as NVILA does (256 tokens at its settings).

    Returns:
        :class:`NvilaTiles`, which unpacks as ``(tiles [sum of tiles, 3, t, t] float32,
        [(rows, cols), ...])``; ``.plans`` holds every image's plan.

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
    dynamic = _planner(scales, max_tiles, max_upscale)
    one_tile = functools.partial(plan_tiles, scales=_check_nvila_scales(scales), policy="single")
    flags = [False] * len(images) if single is None else list(single)
    if len(flags) != len(images) or not all(isinstance(f, bool) for f in flags):
        raise ValueError(f"single must hold one bool per image ({len(images)}), got {single!r}")

    parts: dict[int, torch.Tensor] = {}  # PIL images, tiled one by one
    plans: list[TilePlan] = []
    tensor_ids: list[int] = []
    tensor_images: list[torch.Tensor] = []
    for i, image in enumerate(images):
        if is_pil(image):
            plan_for = one_tile if flags[i] else dynamic
            parts[i], plan = _preprocess_pil(image, plan_for, mean, std)
        else:
            chw = to_chw_tensor(image, f"images[{i}]")
            plan = (one_tile if flags[i] else dynamic)(int(chw.shape[1]), int(chw.shape[2]))
            tensor_ids.append(i)
            tensor_images.append(chw)
        plans.append(plan)
    device = torch.device("cpu")
    if tensor_ids:
        tensor_plans = [plans[i] for i in tensor_ids]
        tiles = _tile_tensors(tensor_images, tensor_plans, mean, std)
        if not parts:
            return NvilaTiles(tiles, tuple(plans))
        device = tiles.device
        chunks = tiles.split([plan.num_tiles for plan in tensor_plans])
        parts.update(zip(tensor_ids, chunks, strict=True))
    tiles = torch.cat([parts[i].to(device) for i in range(len(images))])
    return NvilaTiles(tiles, tuple(plans))


# --------------------------------------------------------------------------------------- merge


def _check_nvila_scales(scales: Any) -> tuple[int, ...]:
    out = check_scales(scales)
    if any(s % out[0] for s in out):
        raise ValueError(f"scales must be multiples of the first (NVILA), got {out!r}")
    return out


def _merge_plans(blocks: Any, scales: tuple[int, ...]) -> list[TilePlan]:
    """The plans of :func:`merge_features`: given (a batch or plans) or rebuilt from blocks."""
    blocks = _plans_of(blocks)
    if not _checks.is_sequence(blocks):
        raise TypeError(f"block_sizes must be a sequence of (rows, cols), got {blocks!r}")
    if len(blocks) == 0:
        raise ValueError("block_sizes must not be empty")
    if all(isinstance(b, TilePlan) for b in blocks):
        for i, p in enumerate(blocks):
            if tuple(sp.scale for sp in p.scales) != scales:
                raise ValueError(
                    f"block_sizes[{i}] is a plan for scales {tuple(sp.scale for sp in p.scales)}, "
                    f"but scales={scales!r}"
                )
        return list(blocks)
    return [
        nvila_plan_for_block(_checks.int_pair(f"block_sizes[{b}]", bs), scales)
        for b, bs in enumerate(blocks)
    ]


def merge_features(
    tile_features: torch.Tensor,
    block_sizes: Sequence[BlockSize] | Sequence[TilePlan] | TileBatch,
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
        block_sizes: the plans of the images: the :class:`NvilaTiles` of :func:`preprocess_batch`
            (or its ``.plans``), or one NVILA ``(rows, cols)`` block size per image.
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
    plans = _merge_plans(block_sizes, sc)
    out_index = _checks.index("output_scale", output_scale, len(sc))
    expected = sum(p.num_tiles for p in plans)
    if expected != tile_features.shape[0]:
        raise ValueError(
            f"block_sizes {[p.scales[-1].grid for p in plans]!r} with scales {sc} need "
            f"{expected} tiles, "
            f"tile_features has {tile_features.shape[0]}"
        )
    merged = merge(tile_features, plans, output_scale=out_index, num_prefix_tokens=0)
    return [m.permute(2, 0, 1) for m in merged.unpad()]


# ----------------------------------------------------------------------------------- packing


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
    if not _checks.is_int(n) or n <= 0:
        raise ValueError(f"tokens_per_tile_side must be a positive int, got {n!r}")
    f = _checks.positive_int("factor", factor)
    per_tile = _checks.boolean("per_tile", per_tile)
    if isinstance(block_size, TilePlan) and not per_tile:  # the library's one count
        return num_image_tokens(block_size, n, pack=f, output_scale=output_scale)
    if isinstance(block_size, TilePlan):
        rows, cols = block_size.scales[block_size.scale_index(output_scale, "output_scale")].grid
    else:
        rows, cols = _checks.int_pair("block_size", block_size)
    if per_tile:
        th, tw = packed_size((n, n), f)
        return rows * cols * th * tw
    th, tw = packed_size((rows * n, cols * n), f)
    return th * tw


def _plans_of(plans: Any) -> Any:
    """The plans of a batch (a :class:`~dynamic_s2.tiling.TileBatch` or the processors'
    ``BatchFeature``), or plans given as :class:`TilePlan` s or their dicts."""
    if isinstance(plans, TileBatch):
        return plans.plans
    if isinstance(plans, Mapping) and "plans" in plans:  # a BatchFeature of dynamic_s2.hf
        plans = plans["plans"]
    if _checks.is_sequence(plans) and any(isinstance(p, Mapping) for p in plans):
        return as_plans(plans)
    return plans


def merge_and_pack(
    tile_features: torch.Tensor,
    plans: Sequence[TilePlan] | Sequence[Mapping[str, Any]] | TileBatch | Mapping[str, Any],
    *,
    factor: int = 2,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_features` then :func:`pack_tokens_batch`, fused: one pass, each token once.

    Args:
        tile_features: ``[T, N, C]`` tokens (``N`` square, no prefix) or ``[T, C, h, h]`` maps,
            any strides (HF's channel-major ``hidden_states`` too), tiles in plan order.
        plans: the plan of every image (``policy="nvila"``, or ``"single"`` for NVILA's
            multi-image mode): :class:`~dynamic_s2.TilePlan` s, their dicts, a prepared batch
            or the ``BatchFeature`` of the HF processors, as they are.
        factor: the packing block side (NVILA: 2).
        out: a contiguous ``[Σ tokens, factor²·S·C]`` buffer to write into (e.g. reused across
            steps); not with autograd.

    Returns:
        ``(tokens, cu_seqlens int32 [B + 1])``, equal to ``pack_tokens_batch(merge_features(...))``;
        half precision is summed in float32. Gradients flow to ``tile_features``.

    Examples:
        >>> from dynamic_s2 import plan_tiles
        >>> plans = [plan_tiles(60, 100, (32, 64, 96), policy="nvila")]
        >>> tokens, cu = merge_and_pack(torch.randn(17, 16, 8), plans)
        >>> tokens.shape, cu.tolist()
        (torch.Size([48, 96]), [0, 48])
    """
    plan_list = check_plan_list(_plans_of(plans))
    total = sum(p.num_tiles for p in plan_list)
    if not isinstance(tile_features, torch.Tensor) or tile_features.shape[0] != total:
        got = getattr(tile_features, "shape", type(tile_features).__name__)
        raise ValueError(f"tile_features must be a tensor of {total} tiles (the plans'), got {got}")
    _, maps = split_prefix(tile_features, 0)
    if maps.shape[1] != maps.shape[2]:
        raise ValueError(
            f"tile_features must hold square [T, C, h, h] maps or a square number of tokens "
            f"(square tiles give square maps), got shape {tuple(tile_features.shape)}"
        )
    tokens, sizes = pack_maps(maps, plan_list, -1, _checks.positive_int("factor", factor), out=out)
    return tokens, cu_seqlens(sizes, tokens.device)
