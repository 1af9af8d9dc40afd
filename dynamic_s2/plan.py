"""Tiling plans: which tile grid every scale of an image gets.

A :class:`TilePlan` is decided once, here, from the image size and the requested scales. Every
later stage (tiling, encoding, merging, NVILA preprocessing) reads its sizes from the plan and
never redoes the arithmetic. Planning is pure Python and cached, so it is cheap enough to run in
data-loader workers or on every call.

Two policies:

* ``"aspect"`` (default): at every scale a grid shaped like the image, all scales chosen together
  so that every scale has more tiles than the one below (see :func:`plan_tiles`).
* ``"nvila"``: NVILA's Dynamic-S2 rule, reproduced exactly: square k×k grids at every scale but the
  last, an aspect-matched grid from a fixed candidate list at the last.

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
    "HALO_TILES",
    "MAX_CAPPED_STRETCH",
    "MAX_TILES",
    "Fit",
    "HaloTiles",
    "Policy",
    "ScalePlan",
    "TilePlan",
    "grid_aspect_error",
    "nvila_plan_for_block",
    "plan_tiles",
]

Policy = Literal["aspect", "nvila"]
Fit = Literal["stretch", "pad"]
HaloTiles = Literal["fixed", "enlarged"]

POLICIES: tuple[str, ...] = ("aspect", "nvila")
FITS: tuple[str, ...] = ("stretch", "pad")

#: How a ``halo`` changes the tiles: ``"fixed"`` keeps the tile (the backbone's input) at
#: ``tile_size`` and shrinks the stride to ``tile_size − 2·halo`` (more tiles); ``"enlarged"``
#: keeps the stride (and the grids) at ``tile_size`` and cuts tiles of ``tile_size + 2·halo``.
HALO_TILES: tuple[str, ...] = ("fixed", "enlarged")

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

#: The most tiles of one scale: the largest ``max_tiles`` (per scale) and the largest grid
#: :meth:`TilePlan.from_dict` accepts. Blank or huge plans cost memory like real tiles; no use of
#: multi-scale tiling comes near (NVILA uses 12, three S2 scales 14 in all).
MAX_TILES = 1 << 16


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
            Equals :attr:`canvas_size` under ``fit="stretch"`` (unless ``max_upscale`` made the
            scale fall back to padding, see :func:`plan_tiles`).
        halo: pixels of the neighbouring image every tile is cut with on each side (0: none).
            ``tile_size`` is then the stride between tiles; every tile is ``input_size`` wide.

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
    halo: int = 0

    @property
    def input_size(self) -> int:
        """Side of every cut tile, what the backbone sees: ``tile_size + 2·halo``."""
        return self.tile_size + 2 * self.halo

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
        """Top-left ``(y, x)`` pixel offset of every tile's interior in the canvas, row-major.

        A tile is cut from ``halo`` pixels above and left of its offset, ``input_size`` wide.
        """
        t = self.tile_size
        rows, cols = self.grid
        return tuple((i * t, j * t) for i in range(rows) for j in range(cols))

    def feature_size(self, tokens_per_side: int) -> tuple[int, int]:
        """Valid ``(h, w)`` of the stitched feature map when each tile yields ``n × n`` features.

        The stitched map is ``(rows·n, cols·n)``; under ``fit="pad"`` only the cells that overlap
        the content are kept (``ceil(content · n / tile_size)`` per axis). With a halo, ``n`` is
        the side of a tile's interior features (see :meth:`interior`).

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

    def output_size(self, tokens_per_side: int) -> tuple[int, int]:
        """Valid ``(h, w)`` of the stitched map when the backbone makes ``n × n`` cells per cut
        tile: :meth:`feature_size` of the interior cells (the halo's are dropped).

        Examples:
            >>> sp = plan_tiles(224, 224, (224,), halo=64).scales[0]
            >>> sp.grid, sp.output_size(7)
            ((3, 3), (9, 9))
        """
        return self.feature_size(self.interior(tokens_per_side)[1])

    def interior(self, tokens_per_side: int) -> tuple[int, int]:
        """``(halo cells, interior side)`` of a tile whose backbone output is ``n × n`` cells.

        The one place where a halo in pixels becomes cells: a cell is ``input_size / n`` pixels,
        and the halo and the stride must both be whole cells (the backbone's patch or stride).

        Raises:
            ValueError: the halo or the stride does not fall on the backbone's cell boundaries.

        Examples:
            >>> sp = plan_tiles(224, 224, (224,), halo=64).scales[0]
            >>> sp.tile_size, sp.input_size, sp.interior(7)   # a stride-32 ConvNet: 7×7 cells
            (96, 224, (2, 3))
            >>> sp.interior(16)
            Traceback (most recent call last):
                ...
            ValueError: halo=64 px is not on the backbone's cell boundaries: ...
        """
        n = _checks.positive_int("tokens_per_side", tokens_per_side)
        if self.halo == 0:
            return 0, n
        cell, rest = divmod(self.input_size, n)
        if rest or self.halo % cell or self.tile_size % cell:
            raise ValueError(
                f"halo={self.halo} px is not on the backbone's cell boundaries: its {n}×{n} "
                f"outputs per {self.input_size}-px tile make cells of {self.input_size / n:g} px; "
                "the halo and the stride (tile_size - 2·halo, or tile_size when enlarged) must be "
                "multiples of the cell (the backbone's patch size or stride)"
            )
        return self.halo // cell, self.tile_size // cell

    def transpose(self) -> ScalePlan:
        """The same plan for the transposed image (rows and cols swapped)."""
        return ScalePlan(
            self.scale,
            (self.grid[1], self.grid[0]),
            self.tile_size,
            (self.content_size[1], self.content_size[0]),
            self.halo,
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
        halo: pixels of their neighbours the tiles are cut with (see :class:`ScalePlan`);
            ``tile_size`` is then the stride and :attr:`input_size` the side of every tile.

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
    halo: int = 0

    @property
    def input_size(self) -> int:
        """Side of every cut tile, what the backbone sees: ``tile_size + 2·halo``."""
        return self.tile_size + 2 * self.halo

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
            self.halo,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; :meth:`from_dict` rebuilds an equal plan.

        ``max_upscale`` and ``halo`` are written only when the plan has them.
        """
        limit = {} if self.max_upscale is None else {"max_upscale": self.max_upscale}
        if self.halo:
            limit["halo"] = self.halo
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
        tile = _checks.positive_int("tile_size", data["tile_size"])
        halo = _checks.non_negative_int("halo", data.get("halo", 0))
        upscale = _checks.optional(_checks.positive_number, "max_upscale", data.get("max_upscale"))
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
                halo,
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
            fallback = upscale is not None and sp.content_size == _content_size(
                *image_size, sp.grid, tile, "pad"
            )  # max_upscale's fallback to padding
            if fit == "stretch" and sp.content_size != (ch, cw) and not fallback:
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
        if policy == "nvila" and upscale is None:  # max_upscale departs from NVILA's rule
            _check_nvila_rule(scales)
        if halo and policy == "nvila":
            raise ValueError(f"a policy='nvila' plan has no halo (NVILA's tiles), got halo={halo}")
        return cls(image_size, tile, tuple(scales), policy, fit, upscale, halo)


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


def check_settings(
    scales: Any, tile_size: Any, max_tiles: Any, policy: Any, fit: Any
) -> tuple[tuple[int, ...], int, tuple[int, ...] | int | None]:
    """Validate the planning settings of :func:`plan_tiles`; return ``(scales, tile, caps)``.

    Examples:
        >>> check_settings((448, 896), None, 6, "aspect", "pad")
        ((448, 896), 448, 6)
    """
    sc = check_scales(scales)
    t = sc[0] if tile_size is None else _checks.positive_int("tile_size", tile_size)
    if sc[0] < t:
        raise ValueError(f"every scale must be >= tile_size {t}, got scales {sc!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    caps = _checks.max_tiles(max_tiles, len(sc), MAX_TILES)
    if policy == "nvila":
        check_nvila_settings(sc, caps)
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
        policy: ``"aspect"`` (aspect-matched grid at every scale) or ``"nvila"`` (NVILA's rule).
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
