"""Tiling plans: which tile grid every scale of an image gets.

A :class:`TilePlan` is decided once, here, from the image size and the requested scales. Every
later stage (tiling, encoding, merging, NVILA preprocessing) reads its sizes from the plan and
never redoes the arithmetic. Planning is pure Python and cached, so it is cheap enough to run in
data-loader workers or on every call.

Three policies:

* ``"aspect"`` (default): at every scale a grid shaped like the image, all scales chosen together
  so that every scale has more tiles than the one below (see :func:`plan_tiles`).
* ``"nvila"``: NVILA's Dynamic-S2 rule, reproduced exactly: square k×k grids at every scale but the
  last, an aspect-matched grid from a fixed candidate list at the last.
* ``"single"``: one tile at every scale, the whole image resized to the tile: NVILA's mode for
  prompts with several images and for video frames. Its scales render identical tiles, which
  :func:`dynamic_s2.run` encodes once (see :func:`shared_tiles`).

Two fits:

* ``"stretch"``: the image is resized to the full canvas (rows·t × cols·t), slightly changing its
  aspect ratio.
* ``"pad"``: the image keeps its aspect ratio, is resized to the largest size that fits the canvas
  and sits at the top-left; the rest is padding that later stages mask out.

A ``halo`` (pixels) makes tiles overlap: every tile is cut with ``halo`` pixels of its neighbours
on each side, and the features of those halo cells are dropped before stitching (see
:mod:`dynamic_s2.seams`). The plan's ``tile_size`` is then the *stride* (the interior each tile
contributes) and :attr:`TilePlan.input_size` the side of the cut tile, ``tile_size + 2·halo``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from . import _checks
from ._aspect import aspect_dp, aspect_tables
from ._checks import check_scales as check_scales
from ._nvila_policy import _nvila_candidates as _nvila_candidates
from ._nvila_policy import check_nvila_settings, nvila_grids, nvila_limited, nvila_lower_grids
from ._plan_types import (
    FITS,
    HALO_TILES,
    MAX_TILE_SIZE,
    MAX_TILES,
    POLICIES,
    Fit,
    HaloTiles,
    Policy,
    ScalePlan,
    TilePlan,
    _check_tile_size,
    _content_size,
)

__all__ = [
    "ASPECT_AREA_PRICE_DOWN",
    "ASPECT_AREA_PRICE_UP",
    "ASPECT_TILE_PRICE",
    "HALO_TILES",
    "MAX_CAPPED_STRETCH",
    "MAX_TILES",
    "MAX_TILE_SIZE",
    "Fit",
    "HaloTiles",
    "Policy",
    "ScalePlan",
    "TilePlan",
    "as_plans",
    "grid_aspect_error",
    "nvila_plan_for_block",
    "plan_tiles",
    "shared_tiles",
]

#: Under ``fit="stretch"`` with ``max_upscale``, a scale whose capped grid has an aspect error
#: (:func:`grid_aspect_error`) above this is padded instead of stretched (see :func:`plan_tiles`).
MAX_CAPPED_STRETCH: float = 0.15

#: Price, under the ``"aspect"`` policy, of a grid whose tile count ``n`` exceeds the scale's target
#: ``k²``: ``ASPECT_AREA_PRICE_UP · log(n / k²)``, in the units of the misfit (log aspect error).
#: Tuned with the other two prices on the mix in ``benchmarks/tiling_quality.py``.
ASPECT_AREA_PRICE_UP: float = 0.06

#: Price of a grid with fewer tiles than ``k²`` (lost resolution): ``ASPECT_AREA_PRICE_DOWN ·
#: log(k² / n)``.
ASPECT_AREA_PRICE_DOWN: float = 0.35

#: Price of every tile, at every scale, in the units of the misfit: a tile is worth adding when it
#: lowers the misfit by more than this. :func:`dynamic_s2.plan_batch` raises it to meet a budget.
ASPECT_TILE_PRICE: float = 0.02

#: Default tile cap of the ``"aspect"`` policy, as a multiple of the scale's target tile count k².
ASPECT_DEFAULT_CAP: float = 3.0

# ----------------------------------------------------------------------------------- validation


def check_settings(
    scales: Any, tile_size: Any, max_tiles: Any, policy: Any, fit: Any
) -> tuple[tuple[int, ...], int, tuple[int, ...] | int | None]:
    """Validate the planning settings of :func:`plan_tiles`; return ``(scales, tile, caps)``.

    Examples:
        >>> check_settings((448, 896), None, 6, "aspect", "pad")
        ((448, 896), 448, 6)
    """
    sc = check_scales(scales)
    t = _check_tile_size(sc[0] if tile_size is None else tile_size)
    if sc[0] < t:
        raise ValueError(f"every scale must be >= tile_size {t}, got scales {sc!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    caps = _checks.max_tiles(max_tiles, len(sc), MAX_TILES)
    if policy == "nvila":
        check_nvila_settings(sc, caps, t)
    return sc, t, caps


def tile_price_factor(stride: int, halo: int, halo_tiles: str) -> float:
    """What a tile's price is multiplied by: the share of its pixels that is interior,
    ``(stride / (stride + 2·halo))²``, for ``"fixed"`` tiles, else 1.

    Fixed-size halo tiles cover less of the image each; pricing them by the area they cover keeps
    the plan at the scale's resolution (more, smaller tiles) instead of shrinking the canvas.

    Examples:
        >>> tile_price_factor(96, 64, "fixed"), tile_price_factor(224, 64, "enlarged")
        (0.18367346938775508, 1.0)
    """
    return (stride / (stride + 2 * halo)) ** 2 if halo_tiles == "fixed" else 1.0


def check_halo(tile: int, halo: Any, halo_tiles: Any, policy: str) -> tuple[int, int]:
    """Validate ``halo`` and ``halo_tiles`` for tiles of ``tile`` px; return ``(stride, halo)``.

    The stride is the plan's ``tile_size``: ``tile - 2·halo`` for ``"fixed"`` tiles, ``tile``
    for ``"enlarged"`` ones.

    Examples:
        >>> check_halo(224, 64, "fixed", "aspect"), check_halo(224, 64, "enlarged", "aspect")
        ((96, 64), (224, 64))
        >>> check_halo(224, 112, "fixed", "aspect")
        Traceback (most recent call last):
            ...
        ValueError: halo=112 leaves no interior in a 224-px tile: ...
    """
    h = _checks.non_negative_int("halo", halo)
    mode = _checks.one_of("halo_tiles", halo_tiles, HALO_TILES)
    if h and policy == "nvila":
        raise ValueError(
            f"halo={h} is not available under policy='nvila', which reproduces NVILA's tiles: "
            "use policy='aspect'"
        )
    if mode == "enlarged":
        return tile, h
    if 2 * h >= tile:
        raise ValueError(
            f"halo={h} leaves no interior in a {tile}-px tile: with halo_tiles='fixed' the stride "
            f"is tile_size - 2·halo, so halo must be below {(tile + 1) // 2}"
        )
    return tile - 2 * h, h


# --------------------------------------------------------------------------------------- public


def plan_tiles(
    height: int,
    width: int,
    scales: Sequence[int],
    *,
    tile_size: int | None = None,
    max_tiles: int | Sequence[int] | None = None,
    policy: Policy = "aspect",
    fit: Fit = "stretch",
    max_upscale: float | None = None,
    halo: int = 0,
    halo_tiles: HaloTiles = "fixed",
) -> TilePlan:
    """Choose a tile grid for every scale of an image of size ``height × width``.

    Args:
        height: image height in pixels.
        width: image width in pixels.
        scales: strictly increasing pixel sizes, e.g. ``(448, 896, 1344)``. A scale is the side of
            the square whose area the resized image should roughly have at that level.
        tile_size: side of the square tiles; defaults to ``scales[0]``. Every scale must be at
            least this.
        max_tiles: tile budget. ``None``: the policy's default. An int caps the largest scale and
            the others in proportion to their area (at least one tile). A sequence gives one cap
            per scale. Under ``policy="nvila"`` it is NVILA's ``max_num`` (default 12).
        policy: ``"aspect"`` (aspect-matched grid at every scale), ``"nvila"`` (NVILA's rule) or
            ``"single"`` (one tile at every scale: NVILA's multi-image and video mode;
            ``max_tiles`` and ``max_upscale`` have nothing to cap).
        fit: ``"stretch"`` (resize to fill the canvas) or ``"pad"`` (keep the aspect ratio, pad
            bottom and right).
        max_upscale: ``None`` (no limit) or the largest factor by which any scale may enlarge
            the image along either side: every scale has ``rows ≤ max(1, ⌊max_upscale·h / t⌋)``
            and ``cols ≤ max(1, ⌊max_upscale·w / t⌋)``. A plan already inside the limit is kept;
            otherwise the policy's rule runs again on the grids inside the limit with, at every
            scale, at most as many tiles as the unlimited plan, so small images get fewer tiles.
            Under ``fit="stretch"``, a scale of a limited plan whose grid has an aspect error
            (:func:`grid_aspect_error`) above :data:`MAX_CAPPED_STRETCH` keeps the image's aspect
            and pads instead of stretching: no limited plan stretches the image by more than
            that (a 160×40 image on one tile is padded, not stretched 4:1).
        halo: pixels of the neighbouring image cut into every tile on each side (default 0);
            their features are dropped before stitching, so every output cell comes from a tile
            in which it is interior. At the canvas border the halo is padding (the pad value).
            Under ``policy="aspect"`` only.
        halo_tiles: ``"fixed"`` (default): tiles stay ``tile_size`` (a ViT at its native size)
            and the stride shrinks to ``tile_size − 2·halo``, so the grids have more tiles;
            ``"enlarged"``: the stride stays ``tile_size`` (same grids) and tiles are cut at
            ``tile_size + 2·halo`` (backbones that take any input size). The plan's
            ``tile_size`` is the stride either way, :attr:`TilePlan.input_size` the tile.
            Fixed tiles are priced by the area they cover (:func:`tile_price_factor`), so the
            canvases keep the scale's size.

    The ``"aspect"`` policy chooses the grids of all scales together. With ``k = s / tile_size``
    the target of scale ``s`` is ``k²`` tiles, and a grid of ``n = rows·cols`` tiles costs

    * its misfit: ``|log(grid aspect / image aspect)|`` (stretch) or the padded fraction of the
      canvas (pad);
    * plus an area price: :data:`ASPECT_AREA_PRICE_UP` ``· log(n / k²)`` above the target,
      :data:`ASPECT_AREA_PRICE_DOWN` ``· log(k² / n)`` below it;
    * plus :data:`ASPECT_TILE_PRICE` ``· n``.

    A dynamic programme over the scales returns the plan of least total cost among those with at
    most ``cap`` tiles per scale (the budget, default ``⌊3k²⌋``) whose tile counts strictly
    increase from scale to scale. A scale may repeat the previous count only when no allowed grid
    has more tiles (a cap stops it); counts never decrease. Ties go to fewer tiles; among grids of
    one count, to the better fit, then the squarer grid, then fewer rows.

    Returns:
        The :class:`TilePlan`.

    Raises:
        TypeError: a size, scale or budget of the wrong type.
        ValueError: non-positive sizes, bad scales, unknown policy or fit, bad ``max_tiles``, a
            ``max_upscale`` that is not a finite number above 0.

    Examples:
        >>> plan = plan_tiles(1080, 1920, (448, 896, 1344))
        >>> [sp.grid for sp in plan.scales]
        [(1, 2), (2, 3), (2, 4)]
        >>> [sp.grid for sp in plan_tiles(1080, 1920, (448, 896, 1344), policy="nvila").scales]
        [(1, 1), (2, 2), (3, 4)]
        >>> plan_tiles(64, 64, (448, 896, 1344), max_upscale=2.0).grids
        ((1, 1), (1, 1), (1, 1))
        >>> [sp.content_size for sp in plan_tiles(160, 40, (224, 448), max_upscale=2.0).scales]
        [(224, 56), (224, 56)]
        >>> p = plan_tiles(480, 640, (224, 448), halo=32)
        >>> p.tile_size, p.input_size, p.grids
        (160, 224, ((2, 2), (3, 4)))
        >>> plan_tiles(1080, 1920, (1, 2))
        Traceback (most recent call last):
            ...
        ValueError: scales are pixel sizes ...
    """
    if isinstance(scales, list):
        scales = tuple(scales)
    if isinstance(max_tiles, list):
        max_tiles = tuple(max_tiles)
    # The cache treats 448, 448.0, True and np.int64(448) as one key, so only exact ints may use
    # it; anything else is validated (and usually rejected) on the uncached path.
    if (
        type(height) is int
        and type(width) is int
        and type(scales) is tuple
        and all(type(s) is int for s in scales)
        and (tile_size is None or type(tile_size) is int)
        and (
            max_tiles is None
            or type(max_tiles) is int
            or (type(max_tiles) is tuple and all(type(m) is int for m in max_tiles))
        )
        and type(policy) is str
        and type(fit) is str
        and (max_upscale is None or type(max_upscale) in (int, float))
        and type(halo) is int
        and type(halo_tiles) is str
    ):
        return _plan_cached(
            height, width, scales, tile_size, max_tiles, policy, fit, max_upscale, halo, halo_tiles
        )
    return _plan_uncached(
        height, width, scales, tile_size, max_tiles, policy, fit, max_upscale, halo, halo_tiles
    )


def _plan_uncached(
    height: Any,
    width: Any,
    scales: Any,
    tile_size: Any,
    max_tiles: Any,
    policy: Any,
    fit: Any,
    max_upscale: Any = None,
    halo: Any = 0,
    halo_tiles: Any = "fixed",
    tile_price: float | None = None,
) -> TilePlan:
    h = _checks.positive_int("height", height)
    w = _checks.positive_int("width", width)
    sc, tile, caps = check_settings(scales, tile_size, max_tiles, policy, fit)
    t, halo_px = check_halo(tile, halo, halo_tiles, policy)
    upscale = _checks.optional(_checks.positive_number, "max_upscale", max_upscale)
    price = ASPECT_TILE_PRICE if tile_price is None else tile_price
    if policy == "single":
        return _make_plan(h, w, sc, t, [(1, 1)] * len(sc), policy, fit, upscale, halo_px)
    price *= tile_price_factor(t, halo_px, halo_tiles)
    if policy == "nvila":
        grids = nvila_grids(h, w, sc, t, caps)
    else:
        prices = _prices(price)
        tables = aspect_tables(h, w, sc, t, _scale_caps(sc, t, caps), fit, None, prices)
        grids = aspect_dp(tables, prices)
    if upscale is not None:
        limit = _upscale_limit(h, w, t, upscale)
        if any(r > limit[0] or c > limit[1] for r, c in grids):
            bound = [r * c for r, c in grids]
            if policy == "nvila":
                grids = nvila_limited(h, w, sc, t, caps, limit, bound[-1])
            else:
                scale_caps = _scale_caps(sc, t, caps)
                capped = [min(a, b) for a, b in zip(scale_caps, bound, strict=True)]
                prices = _prices(price)
                grids = aspect_dp(aspect_tables(h, w, sc, t, capped, fit, limit, prices), prices)
    return _make_plan(h, w, sc, t, grids, policy, fit, upscale, halo_px)


def _make_plan(
    h: int,
    w: int,
    sc: tuple[int, ...],
    t: int,
    grids: Sequence[tuple[int, int]],
    policy: str,
    fit: str,
    upscale: float | None,
    halo: int = 0,
) -> TilePlan:
    return TilePlan(
        (h, w),
        t,
        tuple(
            ScalePlan(s, g, t, _content_size(h, w, g, t, _scale_fit(h, w, g, fit, upscale)), halo)
            for s, g in zip(sc, grids, strict=True)
        ),
        policy,
        fit,
        upscale,
        halo,
    )


def _scale_fit(h: int, w: int, grid: tuple[int, int], fit: str, upscale: float | None) -> str:
    """The fit of one scale: ``fit``, except that a ``max_upscale`` plan pads a scale whose grid
    would stretch the image by more than :data:`MAX_CAPPED_STRETCH`."""
    if (
        upscale is not None
        and fit == "stretch"
        and grid_aspect_error(h, w, grid) > MAX_CAPPED_STRETCH
    ):
        return "pad"
    return fit


def _upscale_limit(h: int, w: int, t: int, upscale: float) -> tuple[int, int]:
    """The most ``(rows, cols)`` that keep every scale within ``upscale`` × the image's size."""
    return (max(1, math.floor(upscale * h / t)), max(1, math.floor(upscale * w / t)))


_plan_cached = lru_cache(maxsize=65536)(_plan_uncached)


def grid_aspect_error(height: int, width: int, grid: tuple[int, int]) -> float:
    """``|log(grid aspect / image aspect)|``: 0 for a perfect fit, symmetric under transposition.

    Examples:
        >>> grid_aspect_error(600, 800, (3, 4))
        0.0
        >>> grid_aspect_error(600, 800, (1, 1)) == grid_aspect_error(800, 600, (1, 1))
        True
    """
    return abs(math.log(grid[1] * height) - math.log(grid[0] * width))


def _scale_caps(sc: tuple[int, ...], t: int, caps: tuple[int, ...] | int | None) -> list[int]:
    if caps is None:
        return [max(1, math.floor(ASPECT_DEFAULT_CAP * (s / t) ** 2)) for s in sc]
    if isinstance(caps, int):
        return [max(1, math.floor(caps * (s / sc[-1]) ** 2)) for s in sc]
    return list(caps)


def _prices(tile_price: float) -> tuple[float, float, float]:
    """The area prices as set now (benchmarks change them) and a tile price."""
    return (ASPECT_AREA_PRICE_UP, ASPECT_AREA_PRICE_DOWN, tile_price)


def nvila_plan_for_block(block_size: tuple[int, int], scales: Sequence[int]) -> TilePlan:
    """The ``policy="nvila"`` plan whose last scale has the grid ``block_size`` (rows, cols).

    NVILA's merge knows an image's block size, not its size: this rebuilds the plan from it. The
    image size is taken as the last scale's canvas (the stretched image the tiles were cut from).

    Examples:
        >>> [sp.grid for sp in nvila_plan_for_block((3, 4), (448, 896, 1344)).scales]
        [(1, 1), (2, 2), (3, 4)]
    """
    sc = check_scales(scales)
    if any(s % sc[0] for s in sc):
        raise ValueError(f"scales must be multiples of the first (NVILA), got {sc!r}")
    grids = [*nvila_lower_grids(sc), _checks.int_pair("block_size", block_size)]
    t = sc[0]
    canvas = (grids[-1][0] * t, grids[-1][1] * t)
    return TilePlan(
        canvas,
        t,
        tuple(
            ScalePlan(s, g, t, _content_size(*canvas, g, t, "stretch"))
            for s, g in zip(sc, grids, strict=True)
        ),
        "nvila",
        "stretch",
    )


def shared_tiles(plan: TilePlan) -> tuple[int, ...]:
    """For every tile of ``plan``, the index of the first tile that is identical to it.

    Two scales with the same grid and content size render the same tiles (the image is resized to
    the same size and cut the same way), so their tiles are computed once by the tiler and encoded
    once by :func:`dynamic_s2.run`: a ``policy="single"`` plan has one distinct tile, a plan
    capped by ``max_upscale`` may have repeated scales. A tile that is the first of its kind maps
    to itself.

    Examples:
        >>> shared_tiles(plan_tiles(300, 500, (32, 64, 96), policy="single"))
        (0, 0, 0)
        >>> shared_tiles(plan_tiles(30, 30, (32, 64), max_upscale=1.0))
        (0, 0)
        >>> shared_tiles(plan_tiles(64, 64, (32, 64)))
        (0, 1, 2, 3, 4)
    """
    first: dict[tuple[tuple[int, int], tuple[int, int]], int] = {}
    out: list[int] = []
    start = 0
    for sp in plan.scales:
        origin = first.setdefault((sp.grid, sp.content_size), start)
        out.extend(range(origin, origin + sp.num_tiles))
        start += sp.num_tiles
    return tuple(out)


def as_plans(plans: Any, name: str = "plans") -> tuple[TilePlan, ...]:
    """Plans given as :class:`TilePlan` s or their :meth:`~TilePlan.to_dict` dicts (what
    :class:`~dynamic_s2.hf.DynamicS2ImageProcessor` returns), as a tuple of :class:`TilePlan`.

    Raises:
        TypeError: ``plans`` is not a sequence of plans or dicts.
        ValueError: ``plans`` is empty, or a dict is not a valid plan.

    Examples:
        >>> plan = plan_tiles(60, 80, (32, 64))
        >>> as_plans([plan.to_dict(), plan]) == (plan, plan)
        True
    """
    if isinstance(plans, TilePlan | Mapping):
        plans = [plans]
    if not isinstance(plans, Sequence) or isinstance(plans, str | bytes):
        raise TypeError(f"{name} must be a sequence of TilePlans (or their dicts), got {plans!r}")
    if len(plans) == 0:
        raise ValueError(f"{name} must not be empty: give one plan per image")
    out = []
    for i, p in enumerate(plans):
        if isinstance(p, Mapping):
            p = TilePlan.from_dict(p)
        if not isinstance(p, TilePlan):
            raise TypeError(f"{name}[{i}] must be a TilePlan or its dict, got {type(p).__name__}")
        out.append(p)
    return tuple(out)
