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
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from . import _checks
from ._aspect import aspect_dp, aspect_tables
from ._checks import check_scales as check_scales
from ._nvila_policy import _nvila_candidates as _nvila_candidates
from ._nvila_policy import check_nvila_settings, nvila_grids, nvila_limited, nvila_lower_grids

__all__ = [
    "ASPECT_AREA_PRICE_DOWN",
    "ASPECT_AREA_PRICE_UP",
    "ASPECT_TILE_PRICE",
    "MAX_TILES",
    "MAX_TILE_SIZE",
    "Fit",
    "Policy",
    "ScalePlan",
    "TilePlan",
    "as_plans",
    "grid_aspect_error",
    "nvila_plan_for_block",
    "plan_tiles",
    "shared_tiles",
]

Policy = Literal["aspect", "nvila", "single"]
Fit = Literal["stretch", "pad"]

POLICIES: tuple[str, ...] = ("aspect", "nvila", "single")
FITS: tuple[str, ...] = ("stretch", "pad")

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

#: The most tiles of one scale: the largest ``max_tiles`` (per scale) and the largest grid
#: :meth:`TilePlan.from_dict` accepts. Blank or huge plans cost memory like real tiles; no use of
#: multi-scale tiling comes near (NVILA uses 12, three S2 scales 14 in all).
MAX_TILES = 1 << 16

#: The largest tile side, in pixels, that planning and :meth:`TilePlan.from_dict` accept. One
#: float32 RGB tile of this side is 768 MiB; backbones take 224 to 1024 px (NVILA 448).
MAX_TILE_SIZE = 1 << 13


def _pair(value: tuple[int, int]) -> tuple[int, int]:
    return (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class ScalePlan:
    """The plan of one scale: grid, canvas and where the resized image sits in it.

    Attributes:
        scale: the requested scale, in pixels (the side of the square whose area the resized image
            roughly has).
        grid: ``(rows, cols)`` of tiles.
        tile_size: side of one square tile, in pixels.
        content_size: ``(h, w)`` of the resized image inside the canvas, at its top-left corner.
            Equals :attr:`canvas_size` under ``fit="stretch"``.

    Examples:
        >>> sp = plan_tiles(600, 1000, (448, 896, 1344)).scales[-1]
        >>> sp.grid, sp.canvas_size, sp.num_tiles
        ((3, 5), (1344, 2240), 15)
        >>> sp.tile_offsets()[:3]
        ((0, 0), (0, 448), (0, 896))
    """

    scale: int
    grid: tuple[int, int]
    tile_size: int
    content_size: tuple[int, int]

    @property
    def canvas_size(self) -> tuple[int, int]:
        """``(rows * tile_size, cols * tile_size)``."""
        return (self.grid[0] * self.tile_size, self.grid[1] * self.tile_size)

    @property
    def num_tiles(self) -> int:
        """``rows * cols``."""
        return self.grid[0] * self.grid[1]

    @property
    def padded_fraction(self) -> float:
        """Fraction of the canvas that is padding (0.0 under ``fit="stretch"``)."""
        ch, cw = self.canvas_size
        return 1.0 - (self.content_size[0] * self.content_size[1]) / (ch * cw)

    def tile_offsets(self) -> tuple[tuple[int, int], ...]:
        """Top-left ``(y, x)`` pixel offset of every tile in the canvas, in row-major order."""
        t = self.tile_size
        rows, cols = self.grid
        return tuple((i * t, j * t) for i in range(rows) for j in range(cols))

    def feature_size(self, tokens_per_side: int) -> tuple[int, int]:
        """Valid ``(h, w)`` of the stitched feature map when each tile yields ``n × n`` features.

        The stitched map is ``(rows·n, cols·n)``; under ``fit="pad"`` only the cells that overlap
        the content are kept (``ceil(content · n / tile_size)`` per axis).

        Examples:
            >>> sp = plan_tiles(300, 1000, (448,), fit="pad").scales[0]
            >>> sp.grid, sp.content_size, sp.feature_size(32)
            ((1, 3), (403, 1344), (29, 96))
        """
        n = _checks.positive_int("tokens_per_side", tokens_per_side)
        t = self.tile_size
        return (
            -(-self.content_size[0] * n // t),
            -(-self.content_size[1] * n // t),
        )

    def transpose(self) -> ScalePlan:
        """The same plan for the transposed image (rows and cols swapped)."""
        return ScalePlan(
            self.scale,
            (self.grid[1], self.grid[0]),
            self.tile_size,
            (self.content_size[1], self.content_size[0]),
        )


@dataclass(frozen=True)
class TilePlan:
    """Everything later stages need to tile, encode and merge one image.

    Build it with :func:`plan_tiles`. It is frozen and hashable, and :meth:`to_dict` /
    :meth:`from_dict` round-trip through JSON.

    Attributes:
        image_size: ``(h, w)`` of the original image.
        tile_size: side of the square tiles, in pixels.
        scales: one :class:`ScalePlan` per scale, in ascending order.
        policy: the policy that chose the grids.
        fit: ``"stretch"`` or ``"pad"``.
        max_upscale: the ``max_upscale`` the plan was made under (``None``: no limit).

    Examples:
        >>> import json
        >>> plan = plan_tiles(480, 640, (224, 448, 672))
        >>> [sp.grid for sp in plan.scales], plan.num_tiles
        ([(1, 1), (2, 3), (3, 4)], 19)
        >>> TilePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
        True
    """

    image_size: tuple[int, int]
    tile_size: int
    scales: tuple[ScalePlan, ...]
    policy: str = "aspect"
    fit: str = "stretch"
    max_upscale: float | None = None

    @property
    def num_tiles(self) -> int:
        """Total number of tiles over all scales."""
        return sum(sp.num_tiles for sp in self.scales)

    @property
    def num_scales(self) -> int:
        """Number of scales."""
        return len(self.scales)

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        """``(rows, cols)`` of every scale."""
        return tuple(sp.grid for sp in self.scales)

    def feature_size(self, index: int, tokens_per_side: int) -> tuple[int, int]:
        """Valid feature ``(h, w)`` of scale ``index`` (negative indices allowed).

        Examples:
            >>> plan_tiles(480, 640, (224, 448)).feature_size(-1, 16)
            (32, 48)
        """
        return self.scales[self.scale_index(index)].feature_size(tokens_per_side)

    def scale_index(self, index: int, name: str = "scale index") -> int:
        """Normalise a (possibly negative) scale index, raising ``ValueError`` when out of range.

        ``name`` is the argument named in the error message.
        """
        n = len(self.scales)
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"{name} must be an int, got {index!r}")
        if not -n <= index < n:
            raise ValueError(f"{name}={index} is out of range for plans with {n} scales")
        return index % n

    def transpose(self) -> TilePlan:
        """The plan of the transposed image: every grid and size with rows and cols swapped."""
        return TilePlan(
            (self.image_size[1], self.image_size[0]),
            self.tile_size,
            tuple(sp.transpose() for sp in self.scales),
            self.policy,
            self.fit,
            self.max_upscale,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; :meth:`from_dict` rebuilds an equal plan.

        ``max_upscale`` is written only when the plan has one.
        """
        limit = {} if self.max_upscale is None else {"max_upscale": self.max_upscale}
        return {
            "image_size": list(self.image_size),
            "tile_size": self.tile_size,
            "policy": self.policy,
            "fit": self.fit,
            "scales": [
                {
                    "scale": sp.scale,
                    "grid": list(sp.grid),
                    "content_size": list(sp.content_size),
                }
                for sp in self.scales
            ],
            **limit,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TilePlan:
        """Rebuild a plan from :meth:`to_dict` output, validating every field.

        Raises:
            TypeError: ``data`` is not a mapping or a field has the wrong type.
            ValueError: a field is missing or inconsistent.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"TilePlan.from_dict expects a mapping, got {type(data).__name__}")
        missing = {"image_size", "tile_size", "scales"} - set(data)
        if missing:
            raise ValueError(
                f"TilePlan.from_dict: missing keys {sorted(missing)} in {dict(data)!r}"
            )
        image_size = _checks.int_pair("image_size", data["image_size"])
        tile = _check_tile_size(data["tile_size"])
        policy = data.get("policy", "aspect")
        fit = data.get("fit", "stretch")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
        raw_scales = data["scales"]
        if not isinstance(raw_scales, Sequence) or isinstance(raw_scales, str) or not raw_scales:
            raise ValueError(f"scales must be a non-empty list of dicts, got {raw_scales!r}")
        scales = []
        for i, entry in enumerate(raw_scales):
            if not isinstance(entry, Mapping):
                raise TypeError(f"scales[{i}] must be a dict, got {entry!r}")
            if {"scale", "grid", "content_size"} - set(entry):
                raise ValueError(f"scales[{i}] needs scale, grid and content_size, got {entry!r}")
            sp = ScalePlan(
                _checks.positive_int(f"scales[{i}].scale", entry["scale"]),
                _checks.int_pair(f"scales[{i}].grid", entry["grid"]),
                tile,
                _checks.int_pair(f"scales[{i}].content_size", entry["content_size"]),
            )
            if sp.num_tiles > MAX_TILES:
                raise ValueError(
                    f"scales[{i}].grid {sp.grid} has {sp.num_tiles} tiles, more than MAX_TILES = "
                    f"{MAX_TILES}"
                )
            ch, cw = sp.canvas_size
            if sp.content_size[0] > ch or sp.content_size[1] > cw:
                raise ValueError(
                    f"scales[{i}].content_size {sp.content_size} exceeds the canvas {(ch, cw)}"
                )
            if fit == "stretch" and sp.content_size != (ch, cw):
                raise ValueError(
                    f"scales[{i}].content_size {sp.content_size} must equal the canvas {(ch, cw)} "
                    "under fit='stretch'"
                )
            if sp.scale < tile:
                raise ValueError(f"scales[{i}].scale {sp.scale} is below tile_size {tile}")
            scales.append(sp)
        if any(a.scale >= b.scale for a, b in itertools.pairwise(scales)):
            raise ValueError(
                f"scales must be strictly increasing, got {[sp.scale for sp in scales]}"
            )
        upscale = _checks.optional(_checks.positive_number, "max_upscale", data.get("max_upscale"))
        if policy == "nvila" and tile != scales[0].scale:
            raise ValueError(
                f"tile_size must equal the first scale {scales[0].scale} in a policy='nvila' "
                f"plan (NVILA tiles at its first scale), got {tile!r}"
            )
        if policy == "nvila" and upscale is None:  # max_upscale departs from NVILA's rule
            _check_nvila_rule(scales)
        if policy == "single" and any(sp.grid != (1, 1) for sp in scales):
            raise ValueError(
                f"a policy='single' plan has one tile at every scale, got grids "
                f"{[sp.grid for sp in scales]}"
            )
        return cls(image_size, tile, tuple(scales), policy, fit, upscale)


# ----------------------------------------------------------------------------------- validation


def _check_nvila_rule(scales: Sequence[ScalePlan]) -> None:
    """``ValueError`` unless a ``policy="nvila"`` plan follows NVILA's rule: scales multiples of
    the first, every scale but the last a ``k × k`` grid with ``k = s // s_0``."""
    sc = tuple(sp.scale for sp in scales)
    if any(s % sc[0] for s in sc):
        raise ValueError(
            f"a policy='nvila' plan needs scales that are multiples of the first, got {list(sc)}"
        )
    lower = [sp.grid for sp in scales[:-1]]
    if lower != nvila_lower_grids(sc):
        raise ValueError(
            f"a policy='nvila' plan has the grids {nvila_lower_grids(sc)} below its last scale "
            f"(k x k, k = scale // {sc[0]}), got {lower}"
        )


def _check_tile_size(value: Any) -> int:
    """A tile side: a positive int of at most :data:`MAX_TILE_SIZE` pixels."""
    tile = _checks.positive_int("tile_size", value)
    if tile > MAX_TILE_SIZE:
        raise ValueError(
            f"tile_size must be at most MAX_TILE_SIZE = {MAX_TILE_SIZE} pixels, got {tile!r}"
        )
    return tile


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
    ):
        return _plan_cached(height, width, scales, tile_size, max_tiles, policy, fit, max_upscale)
    return _plan_uncached(height, width, scales, tile_size, max_tiles, policy, fit, max_upscale)


def _plan_uncached(
    height: Any,
    width: Any,
    scales: Any,
    tile_size: Any,
    max_tiles: Any,
    policy: Any,
    fit: Any,
    max_upscale: Any = None,
    tile_price: float | None = None,
) -> TilePlan:
    h = _checks.positive_int("height", height)
    w = _checks.positive_int("width", width)
    sc, t, caps = check_settings(scales, tile_size, max_tiles, policy, fit)
    upscale = _checks.optional(_checks.positive_number, "max_upscale", max_upscale)
    price = ASPECT_TILE_PRICE if tile_price is None else tile_price
    if policy == "single":
        return _make_plan(h, w, sc, t, [(1, 1)] * len(sc), policy, fit, upscale)
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
    return _make_plan(h, w, sc, t, grids, policy, fit, upscale)


def _make_plan(
    h: int,
    w: int,
    sc: tuple[int, ...],
    t: int,
    grids: Sequence[tuple[int, int]],
    policy: str,
    fit: str,
    upscale: float | None,
) -> TilePlan:
    return TilePlan(
        (h, w),
        t,
        tuple(
            ScalePlan(s, g, t, _content_size(h, w, g, t, fit))
            for s, g in zip(sc, grids, strict=True)
        ),
        policy,
        fit,
        upscale,
    )


def _upscale_limit(h: int, w: int, t: int, upscale: float) -> tuple[int, int]:
    """The most ``(rows, cols)`` that keep every scale within ``upscale`` × the image's size."""
    return (max(1, math.floor(upscale * h / t)), max(1, math.floor(upscale * w / t)))


_plan_cached = lru_cache(maxsize=65536)(_plan_uncached)


def _content_size(h: int, w: int, grid: tuple[int, int], t: int, fit: str) -> tuple[int, int]:
    ch, cw = grid[0] * t, grid[1] * t
    if fit == "stretch":
        return (ch, cw)
    # Largest aspect-preserving size inside the canvas; integer arithmetic keeps it symmetric.
    if w * ch >= h * cw:  # width-limited
        return (max(1, min(ch, (2 * h * cw + w) // (2 * w))), cw)
    return (ch, max(1, min(cw, (2 * w * ch + h) // (2 * h))))


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
