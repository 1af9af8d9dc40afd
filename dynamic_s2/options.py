"""The one options object of the pipeline: :class:`S2Options`.

Every option of :func:`dynamic_s2.forward` is a field of :class:`S2Options`, validated once, at
construction, with the stages' own checks. The field list is the only list of option names:
``forward``'s and ``prepare``/``run``'s keywords, ``DynamicS2(**options)``, ``extract(**options)``,
the ``dynamic-s2`` flags and the extraction folder's ``extract.json`` all derive from it. Each
field's metadata says which stage reads it (``plan``, ``tile``, ``encode`` or ``merge``), how the
command line parses it and whether it changes the features (and so belongs in ``extract.json``).

Examples:
    >>> opts = S2Options(scales=(448, 896), max_batch_tiles=16)
    >>> opts.scales, opts.policy, opts.max_batch_tiles
    ((448, 896), 'aspect', 16)
    >>> sorted(stage_fields("encode"))
    ['canvas', 'feature_layer', 'max_batch_tiles', 'pad_to_multiple']
    >>> S2Options(policy="square")
    Traceback (most recent call last):
        ...
    ValueError: policy must be one of ('aspect', 'nvila', 'single'), got 'square'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from . import _checks
from .backbones import Backbone, check_feature_layer, input_channels
from .budget import plan_batch
from .encode import check_chunking
from .merge import RESAMPLE_MODES
from .plan import (
    FITS,
    HALO_TILES,
    POLICIES,
    Fit,
    HaloTiles,
    Policy,
    TilePlan,
    check_halo,
    check_scales,
    check_settings,
    plan_tiles,
)

__all__ = [
    "BATCH_OPTIONS",
    "STAGES",
    "S2Options",
    "default_scales",
    "make_options",
    "stage_fields",
]

#: The pipeline stages, in order; every option belongs to one.
STAGES = ("plan", "tile", "encode", "merge")

#: Options that plan a batch as a whole: front ends that plan every image on its own (extraction)
#: refuse them, and the ``dynamic-s2 extract`` command does not offer them.
BATCH_OPTIONS = ("tile_budget",)


def _int_list(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"expected comma-separated integers such as 448,896,1344, got {text!r}"
        ) from None
    if not values:
        raise ValueError(f"expected comma-separated integers, got {text!r}")
    return values


def _float_list(text: str) -> float | tuple[float, ...]:
    try:
        values = tuple(float(p) for p in text.replace(" ", ",").split(",") if p.strip())
    except ValueError:
        raise ValueError(
            f"expected comma-separated numbers such as 0.5,0.5,0.5, got {text!r}"
        ) from None
    if not values:
        raise ValueError(f"expected comma-separated numbers, got {text!r}")
    return values[0] if len(values) == 1 else values


def _one_or_many(text: str) -> int | tuple[int, ...]:
    values = _int_list(text)
    return values[0] if len(values) == 1 else values


def _option(
    default: Any,
    stage: str,
    help: str,
    *,
    parse: Callable[[str], Any] | None = int,
    metavar: str | None = "N",
    choices: tuple[str, ...] | None = None,
    config: bool = True,
) -> Any:
    """A dataclass field with the metadata the CLI and the extraction config read."""
    meta = {
        "stage": stage,
        "help": help,
        "parse": parse,
        "metavar": metavar,
        "choices": choices,
        "config": config,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class S2Options:
    """Every option of the pipeline, validated once.

    ``None`` means "the default": for ``scales``, ``tile_size``, ``mean``, ``std`` and
    ``num_prefix_tokens`` that default comes from the backbone (see :meth:`resolve`).

    Attributes:
        scales: pixel sizes, strictly increasing, e.g. ``(448, 896, 1344)``; default ``(t, 2t,
            3t)`` from the backbone's input size ``t``.
        tile_size: tile side; default ``scales[0]`` (the backbone's size with default scales).
        max_tiles: tile budget per image, see :func:`~dynamic_s2.plan.plan_tiles`.
        max_upscale: the most any scale may enlarge the image along a side, see
            :func:`~dynamic_s2.plan.plan_tiles`.
        tile_budget: the most tiles of a whole batch: the batch is planned together by
            :func:`~dynamic_s2.budget.plan_batch` (in :func:`~dynamic_s2.prepare`, so a
            DataLoader ``collate_fn`` plans each batch as a whole).
        policy: ``"aspect"`` or ``"nvila"``.
        fit: ``"stretch"`` or ``"pad"``.
        halo: pixels of their neighbours every tile is cut with, on each side; the halo's
            features are dropped before stitching (see :func:`~dynamic_s2.plan.plan_tiles`).
        halo_tiles: ``"fixed"`` (tiles stay ``tile_size``, the stride shrinks: more tiles) or
            ``"enlarged"`` (same grids, tiles of ``tile_size + 2·halo``).
        mean: normalisation mean, on the ``[0, 1]`` scale (uint8 images are divided by 255, float
            images read as ``[0, 1]``), one number or one per channel.
        std: normalisation std, likewise.
        uint8_resize: resize uint8 images in uint8 (see :func:`~dynamic_s2.tiling.tile_images`).
        feature_layer: HF models: ``hidden_states[feature_layer]`` instead of the last layer; a
            sequence of indices concatenates those layers on channels, in the order given (timm
            models: ``forward_intermediates``).
        max_batch_tiles: the most tiles per backbone call.
        pad_to_multiple: pad the last chunk to a multiple of this many tiles.
        output_scale: the scale whose grid all scales are resampled to (-1: the largest).
        resample: ``"area"`` or ``"bilinear"``.
        num_prefix_tokens: prefix tokens of token outputs; default from the backbone, else
            inferred.
        canvas: run the backbone once over each scale's whole canvas instead of tile by tile
            (map backbones only, :attr:`~dynamic_s2.backbones.Backbone.maps`): no seams, equal to
            calling the backbone on the resized canvas (see :mod:`dynamic_s2.seams`).
        pack: pack every ``k × k`` block of the merged map into one token of ``k²·C_total``
            channels, in the same pass as the merge (NVILA's projector input; see
            :func:`~dynamic_s2.merge.merge`).

    Examples:
        >>> S2Options(scales=[224, 448], mean=0.5).scales
        (224, 448)
        >>> S2Options(scales=(224, 448)).replace(policy="nvila").policy
        'nvila'
    """

    scales: tuple[int, ...] | None = _option(
        None, "plan", "pixel scales, ascending (default: t,2t,3t from the backbone)",
        parse=_int_list, metavar="S1,S2,...",
    )  # fmt: skip
    tile_size: int | None = _option(
        None, "plan", "tile side in pixels (default: the first scale, or the backbone's size)"
    )
    max_tiles: int | tuple[int, ...] | None = _option(
        None, "plan", "tile budget: one int for the largest scale, or one per scale",
        parse=_one_or_many, metavar="N[,N...]",
    )  # fmt: skip
    max_upscale: float | None = _option(
        None, "plan", "no scale enlarges the image more than this factor per side (e.g. 2.0)",
        parse=float, metavar="F",
    )  # fmt: skip
    tile_budget: int | None = _option(
        None, "plan", "most tiles for a whole batch, planned together (see plan_batch)"
    )
    policy: Policy = _option("aspect", "plan", "grid policy", parse=None, choices=POLICIES)
    fit: Fit = _option(
        "stretch", "plan", "stretch the image to the canvas, or keep its aspect ratio and pad",
        parse=None, choices=FITS,
    )  # fmt: skip
    halo: int = _option(
        0, "plan", "pixels of the neighbouring image every tile sees on each side; their "
        "features are dropped (a multiple of the backbone's patch or stride)", metavar="PX",
    )  # fmt: skip
    halo_tiles: HaloTiles = _option(
        "fixed", "plan", "with a halo: keep tiles at tile_size and shrink the stride (fixed), or "
        "keep the grid and cut tiles of tile_size + 2*halo (enlarged)",
        parse=None, choices=HALO_TILES,
    )  # fmt: skip
    mean: tuple[float, ...] | None = _option(
        None, "tile", "normalisation mean on the [0, 1] scale (default: the backbone's)",
        parse=_float_list, metavar="M[,M,M]",
    )  # fmt: skip
    std: tuple[float, ...] | None = _option(
        None, "tile", "normalisation std on the [0, 1] scale (default: the backbone's)",
        parse=_float_list, metavar="S[,S,S]",
    )  # fmt: skip
    uint8_resize: bool = _option(
        False, "tile", "resize uint8 images in uint8 (faster, rounds before normalising)",
        parse=None, metavar=None,
    )  # fmt: skip
    feature_layer: int | tuple[int, ...] | None = _option(
        None, "encode", "use hidden_states[N] instead of the last layer (NVILA: -2); several "
        "layers N,M,... are concatenated on channels", parse=_one_or_many, metavar="N[,N...]",
    )  # fmt: skip
    max_batch_tiles: int | None = _option(
        None, "encode", "most tiles per backbone call (default: all at once)", config=False
    )
    pad_to_multiple: int | None = _option(
        None, "encode", "pad the last chunk to a multiple of N tiles", config=False
    )
    canvas: bool = _option(
        False, "encode", "one backbone pass over each scale's whole canvas, no tiles (map "
        "backbones: ConvNets)", parse=None, metavar=None,
    )  # fmt: skip
    output_scale: int = _option(
        -1, "merge", "index of the scale whose grid the output takes (-1: the largest)"
    )
    resample: str = _option(
        "area", "merge", "resampling of the scales to the output grid", parse=None,
        choices=RESAMPLE_MODES,
    )  # fmt: skip
    num_prefix_tokens: int | None = _option(
        None, "merge", "prefix tokens (CLS, registers) of the backbone's token output"
    )
    pack: int | None = _option(
        None, "merge", "pack every k x k block of the merged map into one token (NVILA: 2)",
        metavar="K",
    )  # fmt: skip

    def __post_init__(self) -> None:
        for f in fields(self):
            checked = _CHECKS.get(f.name, _keep)(f.name, getattr(self, f.name))
            object.__setattr__(self, f.name, checked)
        if self.scales is not None:
            _, tile, _ = check_settings(
                self.scales, self.tile_size, self.max_tiles, self.policy, self.fit
            )
            check_halo(tile, self.halo, self.halo_tiles, self.policy)
            _checks.index("output_scale", self.output_scale, len(self.scales))
        elif self.tile_size is not None:
            check_halo(self.tile_size, self.halo, self.halo_tiles, self.policy)
        if self.canvas and self.halo:
            raise ValueError(
                f"canvas=True runs whole canvases, which have no seams to hide: halo={self.halo} "
                "has nothing to do; give one or the other"
            )
        check_chunking(self.max_batch_tiles, self.pad_to_multiple)

    def replace(self, **changes: Any) -> S2Options:
        """A copy with ``changes`` applied (and validated).

        Examples:
            >>> S2Options().replace(fit="pad").fit
            'pad'
        """
        _check_names(changes, type(self), "S2Options.replace")
        return dataclasses.replace(self, **changes)

    def resolve(self, backbone: Backbone, *, planning: bool = True) -> S2Options:
        """Fill the backbone-derived defaults: scales, tile size, mean/std, prefix count.

        This is the one place where those defaults are decided. ``planning=False`` fills only
        what encoding and merging read (the prefix count). Scales stay ``None`` when the backbone
        declares no input size (plans given by the caller need none).

        Examples:
            >>> bb = Backbone(lambda x: x, input_size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
            >>> opts = S2Options().resolve(bb)
            >>> opts.scales, opts.tile_size, opts.mean
            ((224, 448, 672), 224, (0.5, 0.5, 0.5))
        """
        changes: dict[str, Any] = {}
        if planning and self.scales is None and backbone.input_size is not None:
            changes["scales"] = default_scales(backbone)
            if self.tile_size is None:
                changes["tile_size"] = backbone.input_size
        for name in ("mean", "std", "num_prefix_tokens") if planning else ("num_prefix_tokens",):
            if getattr(self, name) is None and getattr(backbone, name) is not None:
                changes[name] = getattr(backbone, name)
        resolved = dataclasses.replace(self, **changes) if changes else self
        _check_declarations(backbone, resolved)
        return resolved

    def plan(
        self, sizes: Sequence[tuple[int, int]], single: Sequence[bool] | None = None
    ) -> list[TilePlan]:
        """The plans of images of ``sizes`` ``(h, w)``: each on its own, or, with
        ``tile_budget``, the batch as a whole (:func:`~dynamic_s2.budget.plan_batch`).

        This is the one planning entry point of the chain: :func:`~dynamic_s2.prepare`, the HF
        processors and every count they answer (tiles, tokens, placeholders) plan through it.

        Args:
            sizes: ``(h, w)`` of every image.
            single: per image, ``True`` to give it one tile at every scale
                (``policy="single"``: NVILA's mode for prompts with several images and for video
                frames) whatever the policy. Under ``tile_budget`` those tiles are counted
                first and the other images share what is left.

        Examples:
            >>> [p.grids for p in S2Options(scales=(32, 64)).plan([(32, 64)])]
            [((1, 2), (2, 4))]
            >>> [p.policy for p in S2Options(scales=(32, 64)).plan([(32, 64)] * 2, [True, False])]
            ['single', 'aspect']
        """
        if self.scales is None:
            raise ValueError(
                "scales must be given (or a backbone that declares its input size), got None: "
                "pass scales=, e.g. scales=(448, 896, 1344)"
            )
        settings = self.stage("plan")
        scales, budget = settings.pop("scales"), settings.pop("tile_budget")
        flags = _single_flags(single, len(sizes))
        one = {
            i: plan_tiles(
                *sizes[i], scales, tile_size=self.tile_size, policy="single", fit=self.fit
            )
            for i, flag in enumerate(flags)
            if flag
        }
        rest = [i for i, flag in enumerate(flags) if not flag]
        rest_sizes = [sizes[i] for i in rest]
        if budget is not None and rest:
            left = budget - sum(p.num_tiles for p in one.values())
            if left < len(rest) * len(scales):
                raise ValueError(
                    f"tile_budget={budget} leaves {left} tiles for the {len(rest)} Dynamic-S2 "
                    f"images after the {len(one)} one-tile images, below one tile per scale each"
                )
            planned = plan_batch(rest_sizes, scales, tile_budget=left, **settings)
        else:
            planned = [plan_tiles(h, w, scales, **settings) for h, w in rest_sizes]
        one.update(zip(rest, planned, strict=True))
        if budget is not None and sum(p.num_tiles for p in one.values()) > budget:
            raise ValueError(
                f"tile_budget={budget} is below the {len(one)} one-tile images' "
                f"{sum(p.num_tiles for p in one.values())} tiles"
            )
        return [one[i] for i in range(len(sizes))]

    def stage(self, *stages: str) -> dict[str, Any]:
        """The options read by ``stages``, as keyword arguments.

        Examples:
            >>> S2Options(scales=(32,)).stage("merge")
            {'output_scale': -1, 'resample': 'area', 'num_prefix_tokens': None, 'pack': None}
        """
        return {
            f.name: getattr(self, f.name) for f in fields(self) if f.metadata["stage"] in stages
        }

    def to_config(self) -> dict[str, Any]:
        """The JSON-safe settings that change the features (what ``extract.json`` records).

        Examples:
            >>> S2Options(scales=(32, 64)).to_config()["scales"]
            [32, 64]
        """
        return {
            f.name: _json_safe(getattr(self, f.name)) for f in fields(self) if f.metadata["config"]
        }


def _check_declarations(backbone: Backbone, opts: S2Options) -> None:
    """The options that depend on the backbone, checked before any image: ``mean`` and ``std``
    against each other and the model's channels, ``num_prefix_tokens`` against a map backbone."""
    lengths = {len(v) for v in (opts.mean, opts.std) if isinstance(v, tuple)}
    channels = input_channels(backbone)
    if len(lengths) > 1 or (channels is not None and lengths and lengths != {channels}):
        expected = f"{channels} values each (the model's channels)" if channels else "one length"
        raise ValueError(f"mean and std need {expected}, got mean={opts.mean!r}, std={opts.std!r}")
    if opts.canvas and not backbone.maps:
        raise ValueError(
            f"canvas=True needs a backbone that takes any input size and returns feature maps "
            f"(Backbone.maps, e.g. a ConvNet trunk), but {backbone.name!r} does not declare maps: "
            "use tiles (canvas=False), or wrap a fully convolutional callable as "
            "Backbone(fn, maps=True)"
        )
    if opts.num_prefix_tokens and backbone.maps:
        raise ValueError(
            f"num_prefix_tokens={opts.num_prefix_tokens} but backbone {backbone.name!r} returns "
            "feature maps, which have no prefix tokens"
        )


def _keep(name: str, value: Any) -> Any:
    return value


def _single_flags(single: Any, count: int) -> list[bool]:
    """``single`` as one bool per image (all ``False`` when ``None``)."""
    if single is None:
        return [False] * count
    if not _checks.is_sequence(single) or len(single) != count:
        raise ValueError(f"single must hold one bool per image ({count}), got {single!r}")
    return [_checks.boolean(f"single[{i}]", v) for i, v in enumerate(single)]


def _check_int(name: str, value: Any) -> int:
    if not _checks.is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def _check_max_tiles_shape(name: str, value: Any) -> int | tuple[int, ...] | None:
    if _checks.is_sequence(value):
        return tuple(_checks.positive_int(name, v) for v in value)
    return _checks.optional(_checks.positive_int, name, value)


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "scales": lambda name, v: None if v is None else check_scales(v),
    "tile_size": lambda name, v: _checks.optional(_checks.positive_int, name, v),
    "max_tiles": _check_max_tiles_shape,
    "max_upscale": lambda name, v: _checks.optional(_checks.positive_number, name, v),
    "tile_budget": lambda name, v: _checks.optional(_checks.positive_int, name, v),
    "policy": lambda name, v: _checks.one_of(name, v, POLICIES),
    "fit": lambda name, v: _checks.one_of(name, v, FITS),
    "halo": lambda name, v: _checks.non_negative_int(name, v),
    "halo_tiles": lambda name, v: _checks.one_of(name, v, HALO_TILES),
    "canvas": _checks.boolean,
    "mean": _checks.stats,
    "std": _checks.stats,
    "uint8_resize": _checks.boolean,
    "feature_layer": lambda name, v: check_feature_layer(v, name),
    "output_scale": _check_int,
    "resample": lambda name, v: _checks.one_of(name, v, RESAMPLE_MODES),
    "num_prefix_tokens": lambda name, v: _checks.optional(_checks.non_negative_int, name, v),
    "pack": lambda name, v: _checks.optional(_checks.positive_int, name, v),
}


def _json_safe(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def stage_fields(*stages: str, cls: type[S2Options] | None = None) -> list[str]:
    """Names of the options read by ``stages`` (all stages when none is named).

    Examples:
        >>> stage_fields("plan")[:7]
        ['scales', 'tile_size', 'max_tiles', 'max_upscale', 'tile_budget', 'policy', 'fit']
        >>> stage_fields("plan")[7:]
        ['halo', 'halo_tiles']
    """
    chosen = stages or STAGES
    return [f.name for f in fields(cls or S2Options) if f.metadata["stage"] in chosen]


def _check_names(given: Iterable[str], cls: type[S2Options], where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(f"{where} got unknown options {unknown}; known: {sorted(known)}")


def make_options(
    options: S2Options | None,
    kwargs: Mapping[str, Any],
    *,
    where: str,
    stages: tuple[str, ...] = STAGES,
) -> S2Options:
    """``options`` (or the defaults) with ``kwargs`` applied; only options of ``stages`` allowed.

    Examples:
        >>> make_options(None, {"scales": (32, 64)}, where="prepare").scales
        (32, 64)
        >>> make_options(None, {"policy": "nvila"}, where="run()", stages=("encode", "merge"))
        Traceback (most recent call last):
            ...
        TypeError: run() got policy, which is a plan option: give it to prepare() ...
    """
    if options is not None and not isinstance(options, S2Options):
        raise TypeError(f"options must be an S2Options or None, got {type(options).__name__}")
    base = S2Options() if options is None else options  # S2Options looked up now, not at import
    _check_names(kwargs, type(base), where)
    for name in kwargs:
        stage = next(f.metadata["stage"] for f in fields(base) if f.name == name)
        if stage not in stages:
            raise TypeError(
                f"{where} got {name}, which is a {stage} option: give it to prepare() (or "
                "forward()), which plans and tiles"
            )
    return dataclasses.replace(base, **kwargs) if kwargs else base


def default_scales(backbone: Backbone) -> tuple[int, int, int]:
    """``(t, 2t, 3t)`` from the backbone's declared input size ``t`` (the S2 and NVILA standard).

    Raises:
        ValueError: the backbone declares no input size.

    Examples:
        >>> default_scales(Backbone(lambda x: x, input_size=224))
        (224, 448, 672)
    """
    t = backbone.input_size
    if t is None:
        raise ValueError(
            f"scales were not given and the backbone ({backbone.name}) declares no input size "
            "(HF config.image_size or timm pretrained_cfg['input_size']): pass scales=, e.g. "
            "scales=(448, 896, 1344)"
        )
    return (t, 2 * t, 3 * t)
