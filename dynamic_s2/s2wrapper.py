"""A drop-in replacement for S2-Wrapper's ``s2wrapper.forward``.

Code written against the original S2-Wrapper (bfshi/scaling_on_scales) switches with one import::

    from dynamic_s2.s2wrapper import forward as multiscale_forward

and gets the same numbers. Two behaviours are reproduced:

* **master** (square input, ``split_mode`` not given): every scale is a square image of side
  ``img_sizes[i]`` (or ``int(H * scales[i])``), cut into ``n × n`` tiles with
  ``n = ceil(size / max_split_size)``; a tile may be smaller than ``max_split_size``.
* **any shape** (non-square input, ``(h, w)`` sizes, or ``split_mode`` given), the behaviour of the
  original's never-merged ``dev_any_shape`` branch: every scale is cut into
  ``ceil(h / mss) × ceil(w / mss)`` tiles of exactly ``mss × mss`` pixels, after a second resize
  (``split_mode="resize"``) or zero padding at the bottom and right (``split_mode="pad"``, whose
  stitched features are then cropped back). Unlike the original branch, ``scales=`` works here.

Tiles reach the model in the original's order, position-major and batch-minor (tile ``(i, j)`` of
image ``b`` at index ``(i · cols + j) · B + b``), one call per scale, or calls on chunks of ``B``
tiles with ``split_forward=True``, so that batch-dependent layers (BatchNorm in training mode) see
exactly what they saw before.

This module is a thin layer: resizing and cutting come from :mod:`dynamic_s2.tiling`, prefix
handling, stitching, resampling and prefix averaging from :mod:`dynamic_s2.merge`. For mixed-size
batches, aspect-matched grids at every scale, masks or chunked memory, use
:func:`dynamic_s2.forward`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from . import _checks
from .backbones import Backbone
from .encode import encode_tiles
from .merge import TileLayout, mean_prefix, split_prefix, stitch_resample
from .sizing import S2Sizes, s2_sizes
from .tiling import cut_grid, resize

__all__ = ["forward"]

OutputShape = Literal["bnc", "bchw"]
SplitMode = Literal["resize", "pad"]

_OUTPUT_SHAPES: tuple[str, ...] = ("bnc", "bchw")
_SPLIT_MODES: tuple[str, ...] = ("resize", "pad")


def _check_output(out: torch.Tensor, tiles: int, output_shape: str, num_prefix: int) -> None:
    """The model's output must be what ``output_shape`` and ``num_prefix_token`` declare."""
    expected = 3 if output_shape == "bnc" else 4
    if out.dim() != expected or out.shape[0] != tiles:
        raise ValueError(
            f"with output_shape={output_shape!r} the model must return a {expected}-D tensor "
            f"with one row per tile ({tiles}), got shape {tuple(out.shape)}"
        )
    if output_shape == "bnc":
        grid_tokens = out.shape[1] - num_prefix
        if grid_tokens <= 0 or math.isqrt(grid_tokens) ** 2 != grid_tokens:
            raise ValueError(
                f"the model returned {out.shape[1]} tokens per tile; with "
                f"num_prefix_token={num_prefix!r} the remaining {grid_tokens} must form "
                "a square grid"
            )


def _check_call(
    model: object, input: object, num_prefix_token: object, output_shape: object, split_mode: object
) -> None:
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"input must be [B, C, H, W], got shape {tuple(input.shape)}")
    if input.numel() == 0:
        raise ValueError(f"input must not be empty, got shape {tuple(input.shape)}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {input.dtype}")
    _checks.one_of("output_shape", output_shape, _OUTPUT_SHAPES)
    if not _checks.is_int(num_prefix_token) or num_prefix_token < 0:  # type: ignore[operator]
        raise ValueError(f"num_prefix_token must be an int >= 0, got {num_prefix_token!r}")
    if output_shape == "bchw" and num_prefix_token != 0:
        raise ValueError(
            f"num_prefix_token must be 0 with output_shape='bchw' (feature maps have no prefix "
            f"tokens), got {num_prefix_token!r}"
        )
    if split_mode is not None and split_mode not in _SPLIT_MODES:
        raise ValueError(f"split_mode must be None, 'resize' or 'pad', got {split_mode!r}")


def forward(
    model: Callable[[torch.Tensor], torch.Tensor],
    input: torch.Tensor,
    scales: Sequence[float] | None = None,
    img_sizes: Sequence[int] | Sequence[tuple[int, int]] | None = None,
    max_split_size: int | None = None,
    resize_output_to_idx: int = 0,
    num_prefix_token: int = 0,
    output_shape: OutputShape = "bnc",
    split_forward: bool = False,
    split_mode: SplitMode | None = None,
) -> torch.Tensor:
    """Multi-scale features of ``input`` through ``model``, exactly as S2-Wrapper computes them.

    Args:
        model: a callable taking a ``[T, C, h, w]`` batch of tiles and returning ``[T, N, D]``
            tokens (``output_shape="bnc"``) or ``[T, D, h', w']`` maps (``"bchw"``).
        input: images, ``[B, C, H, W]``. Master semantics need ``H == W``.
        scales: scale factors relative to the input; the size of scale ``s`` is ``int(H * s)``
            (and ``int(W * s)`` under any-shape semantics).
        img_sizes: alternatively, the size of every scale: ints (square) or ``(h, w)`` tuples.
            An empty list beside ``scales`` means ``scales``, as in the original.
        max_split_size: the largest tile side. Defaults to ``H`` (also for ``0``, as in the
            original); required for a non-square input.
        resize_output_to_idx: the scale whose feature map size the output takes (negative indices
            count from the end).
        num_prefix_token: prefix tokens (CLS, registers) at the front of every tile's tokens. They
            are averaged over each image's tiles per scale and put in front of the output tokens.
        output_shape: ``"bnc"`` (token sequences with a square grid after the prefix) or
            ``"bchw"`` (feature maps); the output has the same layout.
        split_forward: call the model on chunks of ``B`` tiles instead of once per scale.
        split_mode: ``None`` for master semantics on square inputs. ``"resize"`` or ``"pad"``
            selects any-shape semantics and how a scale is brought to a multiple of
            ``max_split_size`` (a non-square input or ``(h, w)`` sizes use ``"resize"`` when
            ``None``).

    Returns:
        ``[B, P + H' · W', S · D]`` for ``"bnc"`` or ``[B, S · D, H', W']`` for ``"bchw"``, where
        ``H' × W'`` is the stitched feature map of scale ``resize_output_to_idx`` and ``S`` the
        number of scales, concatenated on channels in the order given. The dtype is the model's.

    Raises:
        TypeError: ``input`` is not a tensor, ``scales`` or ``img_sizes`` hold values of the wrong
            type, or the model does not return a tensor.
        ValueError: any other invalid argument, a size that master semantics cannot split evenly,
            or a model output of the wrong shape.

    Examples:
        >>> import torch
        >>> from dynamic_s2.s2wrapper import forward as multiscale_forward
        >>> patchify = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4)
        >>> def model(x):  # [T, 3, 16, 16] -> [T, 16, 8] tokens, like a tiny ViT
        ...     return patchify(x).flatten(2).transpose(1, 2)
        >>> x = torch.rand(2, 3, 16, 16)
        >>> multiscale_forward(model, x, scales=[1, 2]).shape
        torch.Size([2, 16, 16])
        >>> multiscale_forward(model, torch.rand(2, 3, 16, 24), scales=[1, 2],
        ...                    max_split_size=16).shape  # any shape: 1 x 2 tiles at scale 1
        torch.Size([2, 32, 16])
    """
    _check_call(model, input, num_prefix_token, output_shape, split_mode)
    batch, _, height, width = input.shape
    sizing = s2_sizes(height, width, scales, img_sizes, max_split_size, split_mode)
    num_scales = len(sizing.sizes)
    out_index = _checks.index("resize_output_to_idx", resize_output_to_idx, num_scales)
    backbone = Backbone(model)  # called as it is: S2-Wrapper models take tiles, nothing else
    maps: list[torch.Tensor] = []
    prefixes: list[torch.Tensor] = []
    layouts_per_scale: list[list[TileLayout]] = []
    for size, grid in zip(sizing.sizes, sizing.grids, strict=True):
        tiles, padded = _scale_tiles(input, size, grid, sizing, split_mode or "resize")
        out = encode_tiles(backbone, tiles, max_batch_tiles=batch if split_forward else None)
        _check_output(out, tiles.shape[0], output_shape, num_prefix_token)
        prefix, fmap = split_prefix(out, num_prefix_token if output_shape == "bnc" else None)
        maps.append(fmap)
        if prefix is not None and prefix.shape[1] > 0:
            prefixes.append(prefix)
        cells = (grid[0] * fmap.shape[1], grid[1] * fmap.shape[2])
        if padded is not None:  # dev_any_shape's float arithmetic, kept for identical sizes
            valid = (
                math.ceil(size[0] / padded[0] * cells[0]),
                math.ceil(size[1] / padded[1] * cells[1]),
            )
        else:
            valid = cells
        positions = np.arange(grid[0] * grid[1], dtype=np.int64).reshape(grid) * batch
        layouts_per_scale.append([TileLayout(positions + b, valid) for b in range(batch)])

    layouts = [[layouts_per_scale[s][b] for s in range(num_scales)] for b in range(batch)]
    out_h, out_w = layouts_per_scale[out_index][0].valid
    rows_out = stitch_resample(maps, layouts, [(out_h, out_w)] * batch, resample="area")
    if output_shape == "bchw":
        return rows_out.reshape(batch, out_h, out_w, -1).permute(0, 3, 1, 2).contiguous()
    tokens = rows_out.reshape(batch, out_h * out_w, -1)
    if num_prefix_token > 0:
        tokens = torch.cat([mean_prefix(prefixes, layouts), tokens], dim=1)
    return tokens


def _scale_tiles(
    input: torch.Tensor,
    size: tuple[int, int],
    grid: tuple[int, int],
    sizing: S2Sizes,
    mode: str,
) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """The tiles of one scale in the original's order, and the padded canvas size (pad mode)."""
    canvas = resize(input, size, antialias=False)
    padded = None
    if sizing.any_shape:
        full = (grid[0] * sizing.tile, grid[1] * sizing.tile)
        if mode == "resize":
            canvas = resize(canvas, full, antialias=False)
        else:
            canvas = F.pad(canvas, (0, full[1] - size[1], 0, full[0] - size[0]))
            padded = full
    # cut_grid gives [B, rows*cols, C, th, tw]; the original feeds position-major, batch-minor.
    return cut_grid(canvas, grid).transpose(0, 1).flatten(0, 1), padded
