"""The original S2-Wrapper's sizing rule, as a pure function beside the planner.

:mod:`dynamic_s2.plan` sizes Dynamic-S2 tiles; the drop-in :mod:`dynamic_s2.s2wrapper` needs the
original's own rule instead (relative scale factors, ``max_split_size`` tiles, master and any-shape
semantics). Both are host arithmetic on sizes only: no tensors.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import _checks

__all__ = ["S2Sizes", "s2_sizes"]


@dataclass(frozen=True)
class S2Sizes:
    """The size and tile grid of every scale of an S2-Wrapper call.

    Attributes:
        sizes: ``(h, w)`` the input is resized to at each scale.
        grids: ``(rows, cols)`` of tiles at each scale.
        tile: tile side (``max_split_size``, default the input height).
        any_shape: the any-shape semantics (tiles of exactly ``tile`` pixels).
    """

    sizes: tuple[tuple[int, int], ...]
    grids: tuple[tuple[int, int], ...]
    tile: int
    any_shape: bool


def _given_sizes(img_sizes: Any) -> list[tuple[int, int]]:
    if not _checks.is_sequence(img_sizes):
        raise TypeError(f"img_sizes must be a sequence of sizes, got {img_sizes!r}")
    square = [_checks.is_int(s) for s in img_sizes]
    pairs = [isinstance(s, tuple) for s in img_sizes]
    if not (all(square) or all(pairs)):
        raise TypeError(
            "img_sizes must be all ints (square sizes) or all (height, width) tuples, got "
            f"{img_sizes!r}"
        )
    sizes = []
    for s in img_sizes:
        pair = s if isinstance(s, tuple) else (s, s)
        if len(pair) != 2 or not all(_checks.is_int(v) for v in pair):
            raise ValueError(
                f"img_sizes must hold ints or (height, width) pairs of ints, got {s!r} in "
                f"{img_sizes!r}"
            )
        if min(pair) <= 0:
            raise ValueError(f"img_sizes must be positive, got {s!r} in {img_sizes!r}")
        sizes.append((int(pair[0]), int(pair[1])))
    return sizes


def _scaled_sizes(height: int, width: int, scales: Any, any_shape: bool) -> list[tuple[int, int]]:
    if scales is None:
        raise ValueError("give either scales or img_sizes; both are None")
    if not _checks.is_sequence(scales):
        raise TypeError(f"scales must be a sequence of numbers, got {scales!r}")
    if len(scales) == 0:
        raise ValueError(f"scales must not be empty, got {scales!r}")
    sizes = []
    for scale in scales:
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
            raise TypeError(f"scales must hold numbers, got {scale!r} in {scales!r}")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scales must be positive finite numbers, got {scale!r} in {scales!r}")
        factor = float(scale)
        size = (int(height * factor), int((width if any_shape else height) * factor))
        if min(size) <= 0:
            raise ValueError(
                f"scales gives a size <= 0: scale {scale!r} of a {height}x{width} input is "
                f"{size[0]}x{size[1]} (scales={scales!r})"
            )
        sizes.append(size)
    return sizes


def s2_sizes(
    height: int,
    width: int,
    scales: Sequence[float] | None,
    img_sizes: Sequence[int] | Sequence[tuple[int, int]] | None,
    max_split_size: int | None,
    split_mode: str | None,
) -> S2Sizes:
    """Sizes and tile grids of every scale under the original S2-Wrapper's rule.

    Master semantics (a square input, square sizes, no ``split_mode``): scale ``i`` is a square of
    side ``img_sizes[i]`` (or ``int(H · scales[i])``), cut into ``n × n`` equal tiles with
    ``n = ceil(size / max_split_size)``, which must divide the size. Any-shape semantics (anything
    else): ``ceil(h / mss) × ceil(w / mss)`` tiles of exactly ``mss`` pixels.

    Raises:
        TypeError, ValueError: bad scales, sizes or ``max_split_size``, naming the argument.

    Examples:
        >>> s2_sizes(224, 224, [1, 2], None, None, None).grids
        ((1, 1), (2, 2))
        >>> s2_sizes(224, 336, [1, 2], None, 224, None).grids
        ((1, 2), (2, 3))
    """
    if max_split_size == 0 and _checks.is_int(max_split_size):
        max_split_size = None  # the original's `max_split_size or H`: 0 means the default
    _checks.optional(_checks.positive_int, "max_split_size", max_split_size)
    if scales is not None and img_sizes is not None and len(img_sizes) == 0:
        img_sizes = None  # the original's `img_sizes or ...`: an empty list means "use scales"
    any_shape = (
        height != width
        or split_mode is not None
        or (
            img_sizes is not None
            and _checks.is_sequence(img_sizes)
            and any(isinstance(s, tuple) for s in img_sizes)
        )
    )
    if any_shape and height != width and max_split_size is None:
        raise ValueError(
            f"max_split_size is required for a non-square input ({height}x{width}), got None"
        )
    mss = height if max_split_size is None else int(max_split_size)
    given: Any = img_sizes if img_sizes is not None else scales
    source = "img_sizes" if img_sizes is not None else "scales"
    if img_sizes is not None:
        if _checks.is_sequence(img_sizes) and len(img_sizes) == 0:
            raise ValueError(f"img_sizes must not be empty, got {img_sizes!r}")
        sizes = _given_sizes(img_sizes)
    else:
        sizes = _scaled_sizes(height, width, scales, any_shape)
    grids = []
    for h, w in sizes:
        if any_shape:
            grids.append((math.ceil(h / mss), math.ceil(w / mss)))
            continue
        n = math.ceil(h / mss)
        if h % n != 0:
            raise ValueError(
                f"{source}={given!r} gives size {h}, which does not split into {n}x{n} equal "
                f"tiles (n = ceil({h} / max_split_size={mss})); master semantics need sizes "
                "divisible by their split"
            )
        grids.append((n, n))
    return S2Sizes(tuple(sizes), tuple(grids), mss, any_shape)
