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
import numbers
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .merge import TileLayout, mean_prefix, split_prefix, stitch_resample
from .tiling import cut_grid, resize

__all__ = ["forward"]

OutputShape = Literal["bnc", "bchw"]
SplitMode = Literal["resize", "pad"]

_OUTPUT_SHAPES: tuple[str, ...] = ("bnc", "bchw")
_SPLIT_MODES: tuple[str, ...] = ("resize", "pad")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _target_sizes(
    height: int,
    width: int,
    scales: Sequence[float] | None,
    img_sizes: Sequence[int] | Sequence[tuple[int, int]] | None,
    any_shape: bool,
) -> tuple[list[tuple[int, int]], str]:
    """The ``(h, w)`` of every scale, and the name of the argument it came from."""
    if scales is not None and isinstance(img_sizes, Sequence) and len(img_sizes) == 0:
        img_sizes = None  # the original's `img_sizes or ...`: an empty list means "use scales"
    if img_sizes is not None:
        if isinstance(img_sizes, (str, bytes)) or not isinstance(img_sizes, Sequence):
            raise TypeError(f"img_sizes must be a sequence of sizes, got {img_sizes!r}")
        if len(img_sizes) == 0:
            raise ValueError(f"img_sizes must not be empty, got {img_sizes!r}")
        square = [isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in img_sizes]
        pairs = [isinstance(s, tuple) for s in img_sizes]
        if not (all(square) or all(pairs)):
            raise TypeError(
                "img_sizes must be all ints (square sizes) or all (height, width) tuples, got "
                f"{img_sizes!r}"
            )
        sizes: list[tuple[int, int]] = []
        for s in img_sizes:
            if isinstance(s, tuple):
                if len(s) != 2 or not all(_is_int(v) for v in s):
                    raise ValueError(
                        f"img_sizes must hold ints or (height, width) pairs of ints, got {s!r} "
                        f"in {img_sizes!r}"
                    )
                size = (int(s[0]), int(s[1]))
            else:
                size = (int(s), int(s))
            if min(size) <= 0:
                raise ValueError(f"img_sizes must be positive, got {s!r} in {img_sizes!r}")
            sizes.append(size)
        return sizes, "img_sizes"

    if scales is None:
        raise ValueError("give either scales or img_sizes; both are None")
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence):
        raise TypeError(f"scales must be a sequence of numbers, got {scales!r}")
    if len(scales) == 0:
        raise ValueError(f"scales must not be empty, got {scales!r}")
    sizes = []
    for scale in scales:
        if not _is_real(scale):
            raise TypeError(f"scales must hold numbers, got {scale!r} in {scales!r}")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scales must be positive finite numbers, got {scale!r} in {scales!r}")
        size = (int(height * scale), int((width if any_shape else height) * scale))
        if min(size) <= 0:
            raise ValueError(
                f"scales gives a size <= 0: scale {scale!r} of a {height}x{width} input is "
                f"{size[0]}x{size[1]} (scales={scales!r})"
            )
        sizes.append(size)
    return sizes, "scales"


def _call_model(
    model: Callable[[torch.Tensor], torch.Tensor],
    tiles: torch.Tensor,
    chunk: int | None,
    output_shape: str,
    num_prefix_token: int,
) -> torch.Tensor:
    """``model(tiles)``, or ``model`` on consecutive chunks of ``chunk`` tiles, concatenated."""
    batches = [tiles] if chunk is None else list(tiles.split(chunk))
    outs: list[torch.Tensor] = []
    for batch in batches:
        out = model(batch)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model must return a tensor, got {type(out).__name__}")
        expected = 3 if output_shape == "bnc" else 4
        if out.dim() != expected or out.shape[0] != batch.shape[0]:
            raise ValueError(
                f"with output_shape={output_shape!r} the model must return a {expected}-D tensor "
                f"with one row per tile ({batch.shape[0]}), got shape {tuple(out.shape)}"
            )
        if output_shape == "bnc":
            grid_tokens = out.shape[1] - num_prefix_token
            if grid_tokens <= 0 or math.isqrt(grid_tokens) ** 2 != grid_tokens:
                raise ValueError(
                    f"the model returned {out.shape[1]} tokens per tile; with "
                    f"num_prefix_token={num_prefix_token!r} the remaining {grid_tokens} must form "
                    "a square grid"
                )
        if outs and out.shape[1:] != outs[0].shape[1:]:
            raise ValueError(
                f"the model returned shape {tuple(out.shape)} for a later chunk of tiles, but "
                f"{tuple(outs[0].shape)} before: its output shape must not depend on the chunk"
            )
        outs.append(out)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


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
    # ---- validation --------------------------------------------------------------------------
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
    if output_shape not in _OUTPUT_SHAPES:
        raise ValueError(f"output_shape must be 'bnc' or 'bchw', got {output_shape!r}")
    if not _is_int(num_prefix_token) or num_prefix_token < 0:
        raise ValueError(f"num_prefix_token must be an int >= 0, got {num_prefix_token!r}")
    if output_shape == "bchw" and num_prefix_token != 0:
        raise ValueError(
            f"num_prefix_token must be 0 with output_shape='bchw' (feature maps have no prefix "
            f"tokens), got {num_prefix_token!r}"
        )
    if split_mode is not None and split_mode not in _SPLIT_MODES:
        raise ValueError(f"split_mode must be None, 'resize' or 'pad', got {split_mode!r}")
    if max_split_size is not None and (not _is_int(max_split_size) or max_split_size < 0):
        raise ValueError(f"max_split_size must be a positive int or None, got {max_split_size!r}")
    if max_split_size == 0:  # the original's `max_split_size or H`: 0 means the default
        max_split_size = None

    batch, _, height, width = input.shape
    any_shape = (
        height != width
        or split_mode is not None
        or (
            isinstance(img_sizes, Sequence)
            and len(img_sizes) > 0
            and any(isinstance(s, tuple) for s in img_sizes)
        )
    )
    if any_shape and height != width and max_split_size is None:
        raise ValueError(
            f"max_split_size is required for a non-square input ({height}x{width}), got None"
        )
    mss = int(max_split_size) if max_split_size is not None else height
    sizes, source = _target_sizes(height, width, scales, img_sizes, any_shape)
    num_scales = len(sizes)
    if not _is_int(resize_output_to_idx) or not -num_scales <= resize_output_to_idx < num_scales:
        raise ValueError(
            f"resize_output_to_idx must index one of the {num_scales} scales, "
            f"got {resize_output_to_idx!r}"
        )
    mode = split_mode or "resize"

    # ---- per scale: grid (rows, cols) and the canvas that is cut into it ---------------------
    grids: list[tuple[int, int]] = []
    for h, w in sizes:
        if any_shape:
            grids.append((math.ceil(h / mss), math.ceil(w / mss)))
        else:
            n = math.ceil(h / mss)
            if h % n != 0:
                given = scales if source == "scales" else img_sizes
                raise ValueError(
                    f"{source}={given!r} gives size {h}, which does not split into {n}x{n} equal "
                    f"tiles (n = ceil({h} / max_split_size={mss})); master semantics need sizes "
                    "divisible by their split"
                )
            grids.append((n, n))

    chunk = batch if split_forward else None
    maps: list[torch.Tensor] = []
    prefixes: list[torch.Tensor] = []
    layouts_per_scale: list[list[TileLayout]] = []
    for (h, w), (rows, cols) in zip(sizes, grids, strict=True):
        canvas = resize(input, (h, w), antialias=False)
        if any_shape:
            padded = (rows * mss, cols * mss)
            if mode == "resize":
                canvas = resize(canvas, padded, antialias=False)
            else:
                canvas = F.pad(canvas, (0, padded[1] - w, 0, padded[0] - h))
        # cut_grid gives [B, rows*cols, C, th, tw]; the original feeds position-major, batch-minor.
        tiles = cut_grid(canvas, (rows, cols)).transpose(0, 1).flatten(0, 1)

        out = _call_model(model, tiles, chunk, output_shape, num_prefix_token)
        prefix, fmap = split_prefix(out, num_prefix_token if output_shape == "bnc" else None)
        maps.append(fmap)
        if prefix is not None and prefix.shape[1] > 0:
            prefixes.append(prefix)

        cells = (rows * fmap.shape[1], cols * fmap.shape[2])
        if any_shape and mode == "pad":
            # dev_any_shape's float arithmetic, kept for identical output sizes.
            valid = (math.ceil(h / padded[0] * cells[0]), math.ceil(w / padded[1] * cells[1]))
        else:
            valid = cells
        positions = np.arange(rows * cols, dtype=np.int64).reshape(rows, cols) * batch
        layouts_per_scale.append(
            [TileLayout(tile_ids=positions + b, valid=valid) for b in range(batch)]
        )

    layouts = [[layouts_per_scale[s][b] for s in range(num_scales)] for b in range(batch)]
    out_h, out_w = layouts_per_scale[resize_output_to_idx][0].valid
    rows_out = stitch_resample(maps, layouts, [(out_h, out_w)] * batch, resample="area")
    if output_shape == "bchw":
        return rows_out.reshape(batch, out_h, out_w, -1).permute(0, 3, 1, 2).contiguous()
    tokens = rows_out.reshape(batch, out_h * out_w, -1)
    if num_prefix_token > 0:
        tokens = torch.cat([mean_prefix(prefixes, layouts), tokens], dim=1)
    return tokens
