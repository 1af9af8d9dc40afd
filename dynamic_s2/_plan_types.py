"""The plan objects: :class:`ScalePlan` and :class:`TilePlan`, and the checks of a plan given as
data (:meth:`TilePlan.from_dict`). :mod:`dynamic_s2.plan` makes them and re-exports them; every
later stage reads its sizes from them.

Examples:
    >>> sp = ScalePlan(896, (2, 2), 448, (896, 896))
    >>> sp.canvas_size, sp.num_tiles, TilePlan((900, 900), 448, (sp,)).num_tiles
    ((896, 896), 4, 4)
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from . import _checks
from ._nvila_policy import nvila_lower_grids

__all__ = [
    "FITS",
    "MAX_TILES",
    "MAX_TILE_SIZE",
    "POLICIES",
    "Fit",
    "HaloTiles",
    "Policy",
    "ScalePlan",
    "TilePlan",
]

Policy = Literal["aspect", "nvila", "single"]
Fit = Literal["stretch", "pad"]
HaloTiles = Literal["fixed", "enlarged"]

POLICIES: tuple[str, ...] = ("aspect", "nvila", "single")
FITS: tuple[str, ...] = ("stretch", "pad")

#: How a ``halo`` changes the tiles: ``"fixed"`` keeps the tile (the backbone's input) at
#: ``tile_size`` and shrinks the stride to ``tile_size − 2·halo`` (more tiles); ``"enlarged"``
#: keeps the stride (and the grids) at ``tile_size`` and cuts tiles of ``tile_size + 2·halo``.
HALO_TILES: tuple[str, ...] = ("fixed", "enlarged")

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
            Equals :attr:`canvas_size` under ``fit="stretch"`` (unless ``max_upscale`` made the
            scale fall back to padding, see :func:`plan_tiles`).
        halo: pixels of the neighbouring image every tile is cut with on each side (0: none).
            ``tile_size`` is then the stride between tiles; every tile is ``input_size`` wide.

    Examples:
        >>> from dynamic_s2 import plan_tiles
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
            >>> from dynamic_s2 import plan_tiles
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
            >>> from dynamic_s2 import plan_tiles
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
            >>> from dynamic_s2 import plan_tiles
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
        >>> from dynamic_s2 import plan_tiles
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
            >>> from dynamic_s2 import plan_tiles
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
        tile = _check_tile_size(data["tile_size"])
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
        if policy == "nvila" and tile != scales[0].scale:
            raise ValueError(
                f"tile_size must equal the first scale {scales[0].scale} in a policy='nvila' "
                f"plan (NVILA tiles at its first scale), got {tile!r}"
            )
        if policy == "nvila" and upscale is None:  # max_upscale departs from NVILA's rule
            _check_nvila_rule(scales)
        if halo and policy in ("nvila", "single"):
            raise ValueError(f"a policy={policy!r} plan has no halo, got halo={halo}")
        if policy == "single" and any(sp.grid != (1, 1) for sp in scales):
            raise ValueError(
                f"a policy='single' plan has one tile at every scale, got grids "
                f"{[sp.grid for sp in scales]}"
            )
        return cls(image_size, tile, tuple(scales), policy, fit, upscale, halo)


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


def _content_size(h: int, w: int, grid: tuple[int, int], t: int, fit: str) -> tuple[int, int]:
    ch, cw = grid[0] * t, grid[1] * t
    if fit == "stretch":
        return (ch, cw)
    # Largest aspect-preserving size inside the canvas; integer arithmetic keeps it symmetric.
    if w * ch >= h * cw:  # width-limited
        return (max(1, min(ch, (2 * h * cw + w) // (2 * w))), cw)
    return (ch, max(1, min(cw, (2 * w * ch + h) // (2 * h))))
