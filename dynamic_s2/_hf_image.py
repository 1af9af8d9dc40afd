"""The transformers image processor of dynamic_s2: :class:`DynamicS2ImageProcessor`.

Re-exported by :mod:`dynamic_s2.hf`, which documents the integration as a whole.

Examples:
    >>> p = DynamicS2ImageProcessor(scales=(32, 64), tokens_per_tile=16, pack=2)
    >>> p.num_image_tokens(p.plan_batch([(48, 64), (64, 64)]))
    [24, 16]
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import fields
from typing import Any, ClassVar, TypedDict

import numpy as np
import torch

from . import _checks
from . import nvila as _nvila
from ._images import is_pil, one_dtype, to_chw_tensor
from ._optional import require
from .api import prepare
from .options import S2Options, stage_fields
from .packing import num_image_tokens
from .plan import TilePlan

transformers = require("transformers", "hf")
_BaseImageProcessor: Any = transformers.BaseImageProcessor
_PretrainedConfig: Any = transformers.PretrainedConfig

__all__ = [
    "MULTI_IMAGE_MODES",
    "OPTION_NAMES",
    "DynamicS2Config",
    "DynamicS2ImageProcessor",
]

#: S2Options fields whose transformers name differs.
_HF_NAMES = {"mean": "image_mean", "std": "image_std"}
#: Processor option -> S2Options field: every plan and tile option of the pipeline, and the merge
#: options that decide how many tokens an image becomes (``pack``, ``output_scale``).
OPTION_NAMES: dict[str, str] = {
    _HF_NAMES.get(name, name): name
    for name in [*stage_fields("plan", "tile"), "pack", "output_scale"]
}
#: How the images of a prompt with several images (and video frames) are tiled: ``"dynamic"``,
#: Dynamic-S2 like any image; ``"single"``, one tile at every scale (``policy="single"``), NVILA's
#: rule.
MULTI_IMAGE_MODES: tuple[str, ...] = ("dynamic", "single")
#: Options of the processor that are not pipeline options.
_OWN_OPTIONS = ("tokens_per_tile", "multi_image")
#: Keys transformers writes into a saved config besides the options.
_SERVICE_KEYS = ("image_processor_type", "processor_class", "feature_extractor_type")

#: The processor's keyword arguments, for transformers (``from_pretrained(..., **overrides)``).
DynamicS2ImagesKwargs = TypedDict(  # type: ignore[misc]
    "DynamicS2ImagesKwargs", dict.fromkeys([*OPTION_NAMES, *_OWN_OPTIONS], Any), total=False
)


@contextmanager
def _hf_names() -> Iterator[None]:
    """Re-raise S2Options' errors about ``mean`` / ``std`` under the processor's names."""
    try:
        yield
    except (TypeError, ValueError) as err:
        message = str(err)
        for name, hf_name in _HF_NAMES.items():
            if message.startswith(f"{name} "):
                raise type(err)(hf_name + message[len(name) :]) from None
        raise


def _is_image(obj: Any) -> bool:
    return is_pil(obj) or isinstance(obj, np.ndarray | torch.Tensor)


def image_groups(images: Any) -> list[list[Any]]:
    """Images as groups, one per prompt (sample): an image, a flat list (one image per group),
    a ``[B, C, H, W]`` tensor, or a list of lists (transformers' per-sample nesting).

    Examples:
        >>> x = torch.zeros(3, 4, 4)
        >>> [len(g) for g in image_groups([[x, x], [x]])], [len(g) for g in image_groups([x, x])]
        ([2, 1], [1, 1])
    """
    if _is_image(images):
        if isinstance(images, np.ndarray | torch.Tensor) and images.ndim == 4:
            return [[img] for img in images]  # a [B, C, H, W] tensor or a [B, H, W, C] array
        return [[images]]
    if not _checks.is_sequence(images):
        raise TypeError(
            "images must be an image (PIL, numpy [H, W, C], tensor [C, H, W]), a list of them or "
            f"a list of lists (one per prompt), got {type(images).__name__}"
        )
    if len(images) == 0:
        raise ValueError("images is empty: give at least one image")
    groups = [list(item) if _checks.is_sequence(item) else [item] for item in images]
    for i, group in enumerate(groups):
        for j, img in enumerate(group):
            if not _is_image(img):
                raise TypeError(f"images[{i}][{j}] must be an image, got {type(img).__name__}")
    return groups


class DynamicS2ImageProcessor(_BaseImageProcessor):
    """A transformers image processor that plans and tiles images for Dynamic-S2.

    ``processor(images)`` plans every image through the options' one planning entry point
    (:meth:`~dynamic_s2.options.S2Options.plan`, the whole batch at once under ``tile_budget``)
    and cuts all tiles of all images in one :func:`dynamic_s2.prepare` call. It returns a
    ``BatchFeature`` with

    * ``pixel_values``: ``[T, 3, t, t]`` float32, every tile of every image in the library's order
      (image-major, scale ascending, row-major);
    * ``num_patches``: int64 ``[B]``, the tiles of each image;
    * ``image_sizes``: int64 ``[B, 2]``, each image's ``(height, width)``;
    * ``plans``: each image's :class:`~dynamic_s2.plan.TilePlan` as a JSON-safe dict
      (:meth:`~dynamic_s2.plan.TilePlan.to_dict`);
    * ``num_image_tokens``: int64 ``[B]``, the rows the model side makes for each image
      (:func:`~dynamic_s2.packing.num_image_tokens` of its plan), when ``tokens_per_tile`` is set.

    :func:`dynamic_s2.run` and :class:`dynamic_s2.DynamicS2` take that ``BatchFeature`` as it is
    (after ``.to(device)``), give exactly what :func:`dynamic_s2.forward` gives on the same images
    with the same options, and check the rows they make against ``num_image_tokens``.

    Images may be PIL images (converted to RGB), numpy ``[H, W, C]`` arrays or ``[C, H, W]``
    tensors, uint8, uint16 or float (taken as float32), one image, a list, or a list of lists
    (one list per prompt); grey is replicated and alpha dropped. The normalisation is the
    library's one rule (see :func:`dynamic_s2.tiling.tile_images`): uint8 images are divided by
    255, float images are read as ``[0, 1]``, 16-bit ones scaled to 8 bits, then
    ``(x - image_mean) / image_std``.

    Args:
        **kwargs: the options: every plan and tile field of :class:`~dynamic_s2.options.S2Options`
            (``scales``, ``tile_size``, ``max_tiles``, ``tile_budget``, ``policy``, ``fit``,
            ``max_upscale``, ``uint8_resize``, ...; ``mean`` and ``std`` as ``image_mean`` and
            ``image_std``), the merge's ``pack`` and ``output_scale``, and
            ``tokens_per_tile`` (the backbone's spatial tokens per tile, e.g. 1024 for
            SigLIP-448/14) and ``multi_image`` (``"dynamic"`` or ``"single"``: how the images of
            a prompt with several images are tiled, see :data:`MULTI_IMAGE_MODES`). The
            defaults are the class attributes. They are validated here; unknown names raise
            ``TypeError``.

    Examples:
        >>> import numpy as np
        >>> processor = DynamicS2ImageProcessor(scales=(32, 64), policy="nvila", max_tiles=6)
        >>> out = processor(np.zeros((40, 100, 3), np.uint8))
        >>> out["num_patches"].tolist(), out["plans"][0]["scales"][1]["grid"]
        ([7], [2, 3])
        >>> processor.get_number_of_image_patches(40, 100)
        7
        >>> DynamicS2ImageProcessor(tile_sise=32)
        Traceback (most recent call last):
            ...
        TypeError: DynamicS2ImageProcessor() got unknown options ['tile_sise']; known: [...]
    """

    model_input_names: ClassVar[list[str]] = [
        "pixel_values", "num_patches", "image_sizes", "plans", "num_image_tokens",
    ]  # fmt: skip
    valid_kwargs = DynamicS2ImagesKwargs

    # Defaults; every other option defaults to its S2Options default (set below the class).
    scales: tuple[int, ...] | None = (448, 896, 1344)
    image_mean: float | tuple[float, ...] | None = _nvila.SIGLIP_MEAN
    image_std: float | tuple[float, ...] | None = _nvila.SIGLIP_STD
    tokens_per_tile: int | None = None
    multi_image: str = "dynamic"

    def __init__(self, **kwargs: Any) -> None:
        service = {k: kwargs.pop(k) for k in (*_SERVICE_KEYS, "auto_map") if k in kwargs}
        opts, own = self._settings(kwargs, where=f"{type(self).__name__}()")
        super().__init__(**{k: v for k, v in service.items() if k == "auto_map"})
        for name, field in OPTION_NAMES.items():
            setattr(self, name, getattr(opts, field))
        for name, value in own.items():
            setattr(self, name, value)

    @classmethod
    def nvila(cls, **overrides: Any) -> DynamicS2ImageProcessor:
        """NVILA's preprocessing: scales 448/896/1344, ``policy="nvila"``, 12 tiles, SigLIP stats,
        1024 tokens per tile packed 2 × 2, and NVILA's rule for prompts with several images
        (``multi_image="single"``: one tile per image, as NVILA does for them and for video).

        ``uint8_resize=True`` is the resize path of :func:`dynamic_s2.nvila.preprocess_batch` for
        tensor and numpy images, so ``pixel_values`` equal its tiles bit for bit on such images.
        (For PIL images ``nvila.preprocess_batch`` resizes with PIL and the two differ by rounding
        only; this processor converts PIL images to tensors and resizes those.)

        Args:
            **overrides: any option, e.g. ``scales=(384, 768, 1152)``.

        Examples:
            >>> p = DynamicS2ImageProcessor.nvila()
            >>> p.scales, p.policy, p.max_tiles, p.get_number_of_image_patches(1080, 1920)
            ((448, 896, 1344), 'nvila', 12, 17)
            >>> p.get_number_of_image_tokens(1080, 1920), p.get_number_of_image_tokens(
            ...     1080, 1920, single=True)
            (3072, 256)
        """
        settings: dict[str, Any] = {
            "scales": _nvila.DEFAULT_SCALES,
            "max_tiles": _nvila.DEFAULT_MAX_TILES,
            "policy": "nvila",
            "image_mean": _nvila.SIGLIP_MEAN,
            "image_std": _nvila.SIGLIP_STD,
            "uint8_resize": True,
            "pack": 2,
            "tokens_per_tile": 1024,
            "multi_image": "single",
        }
        return cls(**{**settings, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """transformers' dict of the processor, with every option, even those left at defaults.

        Examples:
            >>> DynamicS2ImageProcessor(scales=(32, 64)).to_dict()["tile_size"] is None
            True
        """
        out: dict[str, Any] = super().to_dict()
        out.update({name: getattr(self, name) for name in (*OPTION_NAMES, *_OWN_OPTIONS)})
        return out

    def _settings(
        self, overrides: Mapping[str, Any], where: str
    ) -> tuple[S2Options, dict[str, Any]]:
        """The processor's pipeline options and its own options with ``overrides``, validated."""
        unknown = sorted(set(overrides) - set(OPTION_NAMES) - set(_OWN_OPTIONS))
        if unknown:
            known = sorted([*OPTION_NAMES, *_OWN_OPTIONS])
            raise TypeError(f"{where} got unknown options {unknown}; known: {known}")
        values = {f: overrides.get(n, getattr(self, n)) for n, f in OPTION_NAMES.items()}
        with _hf_names():
            opts = S2Options(**values)
            for name in _HF_NAMES:
                _checks.stats(name, getattr(opts, name), 3)  # images are RGB
        if opts.scales is None:
            raise ValueError(f"{where}: scales must be given, e.g. scales=(448, 896, 1344)")
        own = {n: overrides.get(n, getattr(self, n)) for n in _OWN_OPTIONS}
        tokens = _checks.optional(_checks.positive_int, "tokens_per_tile", own["tokens_per_tile"])
        if tokens is not None and math.isqrt(tokens) ** 2 != tokens:
            raise ValueError(
                f"tokens_per_tile must be a square number (n × n spatial tokens per tile, no "
                f"prefix tokens), got {tokens!r}"
            )
        own["tokens_per_tile"] = tokens
        own["multi_image"] = _checks.one_of("multi_image", own["multi_image"], MULTI_IMAGE_MODES)
        return opts, own

    def options(self, **overrides: Any) -> S2Options:
        """The processor's settings as an :class:`~dynamic_s2.options.S2Options`.

        Pass these to :func:`dynamic_s2.forward` (or :class:`dynamic_s2.DynamicS2`) to get what
        ``run(model, processor(images))`` gives; ``overrides`` are processor options.

        Examples:
            >>> DynamicS2ImageProcessor(scales=(32, 64)).options().mean
            (0.5, 0.5, 0.5)
        """
        return self._settings(overrides, where="options()")[0]

    def preprocess(
        self,
        images: Any,
        return_tensors: str | None = "pt",
        *,
        single: Sequence[bool] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Plan and tile ``images`` (see the class docstring).

        Args:
            images: one image, a list of images (of any sizes), a list of lists (one per prompt:
                with ``multi_image="single"`` the images of a prompt with several get one tile
                each), or a ``[B, C, H, W]`` tensor.
            return_tensors: ``"pt"`` (or ``None``): the tensors are torch tensors either way.
            single: per image (flattened), ``True`` for one tile at every scale; overrides the
                ``multi_image`` rule (:class:`DynamicS2Processor` passes it from the prompts).
            **kwargs: options for this call only, e.g. ``max_tiles=4``.

        Returns:
            A ``transformers.BatchFeature`` with ``pixel_values``, ``num_patches``,
            ``image_sizes``, ``plans`` and, with ``tokens_per_tile``, ``num_image_tokens``.
        """
        if return_tensors not in (None, "pt"):
            raise ValueError(
                f"return_tensors must be 'pt' or None (pixel_values are torch tensors), got "
                f"{return_tensors!r}"
            )
        opts, own = self._settings(kwargs, where="preprocess()")
        groups = image_groups(images)
        flat = [img for group in groups for img in group]
        if single is None and own["multi_image"] == "single":
            single = [len(group) > 1 for group in groups for _ in group]
        items = one_dtype([to_chw_tensor(img, f"images[{i}]") for i, img in enumerate(flat)])
        if items[0].is_floating_point() and items[0].dtype != torch.float32:
            items = [x.to(torch.float32) for x in items]  # pixel_values are float32
        batch = prepare(items, options=opts, single=single)
        data = {
            "pixel_values": batch.tiles,
            "num_patches": torch.tensor(batch.tile_counts, dtype=torch.int64),
            "image_sizes": torch.tensor([p.image_size for p in batch.plans], dtype=torch.int64),
            "plans": [p.to_dict() for p in batch.plans],
        }
        if own["tokens_per_tile"] is not None:
            counts = self._token_counts(batch.plans, opts, own["tokens_per_tile"])
            data["num_image_tokens"] = torch.tensor(counts, dtype=torch.int64)
        return transformers.BatchFeature(data=data)

    def __call__(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> Any:
        """:meth:`preprocess`."""
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)

    # ------------------------------------------------------------------------------ counts

    @staticmethod
    def _token_counts(
        plans: Sequence[TilePlan], opts: S2Options, tokens_per_tile: int
    ) -> list[int]:
        """The one image-token count: :func:`~dynamic_s2.packing.num_image_tokens` per plan."""
        side = math.isqrt(tokens_per_tile)
        return [
            num_image_tokens(p, side, pack=opts.pack, output_scale=opts.output_scale) for p in plans
        ]

    def _given(self, images_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
        """The options among ``images_kwargs`` (transformers passes its whole dict)."""
        if images_kwargs is not None and not isinstance(images_kwargs, Mapping):
            raise TypeError(f"images_kwargs must be a dict or None, got {images_kwargs!r}")
        known = {*OPTION_NAMES, *_OWN_OPTIONS}
        return {k: v for k, v in (images_kwargs or {}).items() if k in known}

    def plan_batch(
        self,
        sizes: Sequence[tuple[int, int]],
        single: Sequence[bool] | None = None,
        images_kwargs: Mapping[str, Any] | None = None,
    ) -> list[TilePlan]:
        """The plans :meth:`preprocess` makes for a batch of images of ``sizes`` ``(h, w)``,
        without the images: the same call, so the same plans (under ``tile_budget`` too).

        Examples:
            >>> from dynamic_s2 import plan_batch
            >>> p = DynamicS2ImageProcessor(scales=(32, 64), tile_budget=6)
            >>> sizes = [(48, 64), (64, 48)]
            >>> p.plan_batch(sizes) == plan_batch(sizes, (32, 64), tile_budget=6)
            True
        """
        opts, _ = self._settings(self._given(images_kwargs), where="images_kwargs")
        pairs = [_checks.int_pair(f"sizes[{i}]", hw) for i, hw in enumerate(sizes)]
        return opts.plan(pairs, single)

    def plan(
        self,
        height: int,
        width: int,
        images_kwargs: Mapping[str, Any] | None = None,
        *,
        single: bool = False,
    ) -> TilePlan:
        """The plan of a ``height × width`` image on its own, without an image.

        ``images_kwargs`` overrides options; keys that are not options of this processor are
        ignored (transformers processors pass their whole ``images_kwargs``). Under a
        ``tile_budget`` an image's plan depends on the rest of its batch: this raises
        ``ValueError``; ask :meth:`plan_batch` with the batch's sizes instead.

        Examples:
            >>> DynamicS2ImageProcessor(scales=(32, 64)).plan(48, 64).grids
            ((1, 1), (2, 3))
        """
        given = self._given(images_kwargs)
        opts, _ = self._settings(given, where="images_kwargs")
        if opts.tile_budget is not None:
            raise ValueError(
                f"tile_budget={opts.tile_budget}: an image's plan (and its tile and token counts) "
                "depends on the whole batch; ask plan_batch(sizes) or num_image_tokens(plans) "
                "with the batch's sizes, or _get_num_multimodal_tokens(image_sizes)"
            )
        h = _checks.positive_int("height", height)
        w = _checks.positive_int("width", width)
        return opts.plan([(h, w)], [_checks.boolean("single", single)])[0]

    def get_number_of_image_patches(
        self, height: int, width: int, images_kwargs: Mapping[str, Any] | None = None
    ) -> int:
        """Tiles (``num_patches``) of a ``height × width`` image, without an image.

        Raises ``ValueError`` under a ``tile_budget`` (see :meth:`plan`).

        Examples:
            >>> DynamicS2ImageProcessor(scales=(32, 64)).get_number_of_image_patches(48, 64)
            7
        """
        return self.plan(height, width, images_kwargs).num_tiles

    def num_image_tokens(
        self,
        plans: Sequence[TilePlan],
        *,
        tokens_per_tile: int | None = None,
        images_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """The rows the model side makes for each plan: the count of every placeholder.

        ``tokens_per_tile`` defaults to the processor's; ``pack`` and ``output_scale`` come from
        the options (``images_kwargs`` overrides them).

        Examples:
            >>> p = DynamicS2ImageProcessor.nvila()
            >>> p.num_image_tokens(p.plan_batch([(1080, 1920), (500, 500)], [False, True]))
            [3072, 256]
        """
        given = self._given(images_kwargs)
        if tokens_per_tile is not None:
            given["tokens_per_tile"] = tokens_per_tile
        opts, own = self._settings(given, where="num_image_tokens()")
        if own["tokens_per_tile"] is None:
            raise ValueError(
                "tokens_per_tile is not set: give the backbone's spatial tokens per tile (e.g. "
                "1024 for SigLIP-448/14), to the processor or to this call"
            )
        return self._token_counts(plans, opts, own["tokens_per_tile"])

    def get_number_of_image_tokens(
        self,
        height: int,
        width: int,
        tokens_per_tile: int | None = None,
        factor: int | None = None,
        *,
        output_scale: int | None = None,
        images_kwargs: Mapping[str, Any] | None = None,
        single: bool = False,
    ) -> int:
        """Rows the model side makes for a ``height × width`` image on its own.

        The merged map of the output scale (:meth:`~dynamic_s2.plan.ScalePlan.feature_size`),
        packed by ``factor × factor`` blocks (:func:`~dynamic_s2.packing.num_image_tokens`):
        exactly the rows ``run(..., pack=factor)`` makes. Prefix tokens and the LLM's own
        tokens are not counted. Raises ``ValueError`` under a ``tile_budget`` (see :meth:`plan`).

        Args:
            height: image height in pixels.
            width: image width in pixels.
            tokens_per_tile: spatial tokens per tile (a square; default: the processor's).
            factor: the packing block side (default: the processor's ``pack``; 1: no packing).
            output_scale: the merge's output scale (default: the processor's).
            images_kwargs: option overrides, as for :meth:`plan`.
            single: count the image as one of a multi-image prompt's (one tile per scale).

        Examples:
            >>> p = DynamicS2ImageProcessor.nvila()
            >>> p.get_number_of_image_tokens(1080, 1920, tokens_per_tile=1024, factor=2)
            3072
        """
        given = self._given(images_kwargs)
        if factor is not None:
            given["pack"] = None if _checks.positive_int("factor", factor) == 1 else factor
        if output_scale is not None:
            given["output_scale"] = output_scale
        plan = self.plan(height, width, given, single=single)
        return self.num_image_tokens([plan], tokens_per_tile=tokens_per_tile, images_kwargs=given)[
            0
        ]


# Options without a processor default above take S2Options' (e.g. a new planner field).
for _field in fields(S2Options):
    _name = _HF_NAMES.get(_field.name, _field.name)
    if _name in OPTION_NAMES and _name not in DynamicS2ImageProcessor.__dict__:
        setattr(DynamicS2ImageProcessor, _name, _field.default)


class DynamicS2Config(_PretrainedConfig):
    """A placeholder transformers config that :func:`register_auto_class` registers the processor
    under, when no model config class is given.

    Examples:
        >>> DynamicS2Config().model_type
        'dynamic_s2'
    """

    model_type = "dynamic_s2"
