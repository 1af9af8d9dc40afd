"""Hugging Face transformers integration: :class:`DynamicS2ImageProcessor`.

The processor is the CPU half of the chain (:func:`dynamic_s2.prepare`: plan + tile) in the shape
transformers expects: a ``BaseImageProcessor`` whose call returns a ``BatchFeature``, with
``save_pretrained`` / ``from_pretrained``, ``to_dict`` / ``to_json_string`` and
``AutoImageProcessor`` after :func:`register_auto_class`. Its output goes straight into
:func:`dynamic_s2.run` or a :class:`dynamic_s2.DynamicS2` layer, with no glue.

Its options are the plan and tile fields of :class:`~dynamic_s2.options.S2Options` (``scales``,
``tile_size``, ``max_tiles``, ``policy``, ``fit``, ``uint8_resize``, ...), with ``mean`` and ``std``
under transformers' names ``image_mean`` and ``image_std``; a field added to ``S2Options`` for those
stages becomes a processor option by itself.

Examples:
    >>> import torch
    >>> processor = DynamicS2ImageProcessor(scales=(32, 64), tile_size=32)
    >>> out = processor([torch.zeros(3, 48, 64, dtype=torch.uint8)])
    >>> out["pixel_values"].shape, out["num_patches"].tolist(), out["image_sizes"].tolist()
    (torch.Size([7, 3, 32, 32]), [7], [[48, 64]])
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields
from typing import Any, ClassVar, TypedDict

import numpy as np
import torch

from . import _checks
from . import nvila as _nvila
from ._images import is_pil, to_chw_tensor
from ._optional import require
from .api import prepare
from .options import S2Options, stage_fields
from .packing import packed_size
from .plan import TilePlan

transformers = require("transformers", "hf")
_BaseImageProcessor: Any = transformers.BaseImageProcessor
_PretrainedConfig: Any = transformers.PretrainedConfig

__all__ = ["OPTION_NAMES", "DynamicS2Config", "DynamicS2ImageProcessor", "register_auto_class"]

#: S2Options fields whose transformers name differs.
_HF_NAMES = {"mean": "image_mean", "std": "image_std"}
#: Processor option -> S2Options field: every plan and tile option of the pipeline.
OPTION_NAMES: dict[str, str] = {
    _HF_NAMES.get(name, name): name for name in stage_fields("plan", "tile")
}
#: Keys transformers writes into a saved config besides the options.
_SERVICE_KEYS = ("image_processor_type", "processor_class", "feature_extractor_type")

#: The processor's keyword arguments, for transformers (``from_pretrained(..., **overrides)``).
DynamicS2ImagesKwargs = TypedDict(  # type: ignore[misc]
    "DynamicS2ImagesKwargs", dict.fromkeys(OPTION_NAMES, Any), total=False
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


def _image_list(images: Any) -> list[Any]:
    """One image or a batch of them, as a list."""
    if is_pil(images):
        return [images]
    if isinstance(images, np.ndarray | torch.Tensor):
        if images.ndim == 4:  # a [B, C, H, W] tensor or a [B, H, W, C] array
            return list(images)
        return [images]
    if not isinstance(images, list | tuple):
        raise TypeError(
            "images must be an image (PIL, numpy [H, W, C], tensor [C, H, W]) or a list of them, "
            f"got {type(images).__name__}"
        )
    if len(images) == 0:
        raise ValueError("images is empty: give at least one image")
    return list(images)


def _normalised_floats(items: list[torch.Tensor], opts: S2Options) -> list[torch.Tensor]:
    """Float images in ``[0, 1]`` (uint8 ones divided by 255), normalised with mean and std."""
    mean = torch.as_tensor(0.0 if opts.mean is None else opts.mean).reshape(-1, 1, 1)
    std = torch.as_tensor(1.0 if opts.std is None else opts.std).reshape(-1, 1, 1)
    out = []
    for x in items:
        x = x.to(torch.float32).div(255.0) if x.dtype == torch.uint8 else x.to(torch.float32)
        out.append((x - mean.to(x.device)) / std.to(x.device))
    return out


class DynamicS2ImageProcessor(_BaseImageProcessor):
    """A transformers image processor that plans and tiles images for Dynamic-S2.

    ``processor(images)`` plans every image (:func:`~dynamic_s2.plan.plan_tiles`) and cuts all
    tiles of all images in one :func:`dynamic_s2.prepare` call (batched torch resizes, no PIL
    resize per tile). It returns a ``BatchFeature`` with

    * ``pixel_values``: ``[T, 3, t, t]`` float32, every tile of every image in the library's order
      (image-major, scale ascending, row-major);
    * ``num_patches``: int64 ``[B]``, the tiles of each image;
    * ``image_sizes``: int64 ``[B, 2]``, each image's ``(height, width)``;
    * ``plans``: each image's :class:`~dynamic_s2.plan.TilePlan` as a JSON-safe dict
      (:meth:`~dynamic_s2.plan.TilePlan.to_dict`).

    :func:`dynamic_s2.run` and :class:`dynamic_s2.DynamicS2` take that ``BatchFeature`` as it is
    (after ``.to(device)``) and give exactly what :func:`dynamic_s2.forward` gives on the same
    images with the same options.

    Images may be PIL images (converted to RGB), numpy ``[H, W, C]`` arrays or ``[C, H, W]``
    tensors, uint8 or float; grey is replicated and alpha dropped. uint8 images are divided by 255
    and normalised with ``image_mean`` / ``image_std``, as in :func:`dynamic_s2.prepare`. Float
    images are taken to be in ``[0, 1]`` and normalised the same way (before resizing, which is
    linear, so padding stays 0 after normalisation, as for uint8).

    Args:
        **kwargs: the options, every plan and tile field of
            :class:`~dynamic_s2.options.S2Options` (``scales``, ``tile_size``, ``max_tiles``,
            ``policy``, ``fit``, ``uint8_resize``, ...), with ``image_mean`` and ``image_std`` for
            its ``mean`` and ``std``; the defaults are the class attributes. They are validated
            here, by ``S2Options``; unknown names raise ``TypeError``.

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

    model_input_names: ClassVar[list[str]] = ["pixel_values", "num_patches", "image_sizes", "plans"]
    valid_kwargs = DynamicS2ImagesKwargs

    # Defaults; every other option defaults to its S2Options default (set below the class).
    scales: tuple[int, ...] | None = (448, 896, 1344)
    image_mean: float | tuple[float, ...] | None = _nvila.SIGLIP_MEAN
    image_std: float | tuple[float, ...] | None = _nvila.SIGLIP_STD

    def __init__(self, **kwargs: Any) -> None:
        service = {k: kwargs.pop(k) for k in (*_SERVICE_KEYS, "auto_map") if k in kwargs}
        opts = self._options(kwargs, where=f"{type(self).__name__}()")
        super().__init__(**{k: v for k, v in service.items() if k == "auto_map"})
        for name, field in OPTION_NAMES.items():
            setattr(self, name, getattr(opts, field))

    @classmethod
    def nvila(cls, **overrides: Any) -> DynamicS2ImageProcessor:
        """NVILA's preprocessing: scales 448/896/1344, ``policy="nvila"``, 12 tiles, SigLIP stats.

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
        """
        settings: dict[str, Any] = {
            "scales": _nvila.DEFAULT_SCALES,
            "max_tiles": _nvila.DEFAULT_MAX_TILES,
            "policy": "nvila",
            "image_mean": _nvila.SIGLIP_MEAN,
            "image_std": _nvila.SIGLIP_STD,
            "uint8_resize": True,
        }
        return cls(**{**settings, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """transformers' dict of the processor, with every option, even those left at defaults.

        Examples:
            >>> DynamicS2ImageProcessor(scales=(32, 64)).to_dict()["tile_size"] is None
            True
        """
        out: dict[str, Any] = super().to_dict()
        out.update({name: getattr(self, name) for name in OPTION_NAMES})
        return out

    def _options(self, overrides: Mapping[str, Any], where: str) -> S2Options:
        """The processor's options with ``overrides`` (processor names), validated."""
        unknown = sorted(set(overrides) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"{where} got unknown options {unknown}; known: {sorted(OPTION_NAMES)}")
        values = {f: overrides.get(n, getattr(self, n)) for n, f in OPTION_NAMES.items()}
        with _hf_names():
            opts = S2Options(**values)
            for name in _HF_NAMES:
                _checks.stats(name, getattr(opts, name), 3)  # images are RGB
        if opts.scales is None:
            raise ValueError(f"{where}: scales must be given, e.g. scales=(448, 896, 1344)")
        return opts

    def options(self, **overrides: Any) -> S2Options:
        """The processor's settings as an :class:`~dynamic_s2.options.S2Options`.

        Pass these to :func:`dynamic_s2.forward` to get what ``run(model, processor(images))``
        gives; ``overrides`` are processor options.

        Examples:
            >>> DynamicS2ImageProcessor(scales=(32, 64)).options().mean
            (0.5, 0.5, 0.5)
        """
        return self._options(overrides, where="options()")

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> Any:
        """Plan and tile ``images``: one image or a list (see the class docstring).

        Args:
            images: a PIL image, numpy ``[H, W, C]`` array or ``[C, H, W]`` tensor, or a list of
                them (of any sizes), or a ``[B, C, H, W]`` tensor.
            return_tensors: ``"pt"`` (or ``None``): the tensors are torch tensors either way.
            **kwargs: options for this call only, e.g. ``max_tiles=4``.

        Returns:
            A ``transformers.BatchFeature`` with ``pixel_values``, ``num_patches``,
            ``image_sizes`` and ``plans``.
        """
        if return_tensors not in (None, "pt"):
            raise ValueError(
                f"return_tensors must be 'pt' or None (pixel_values are torch tensors), got "
                f"{return_tensors!r}"
            )
        opts = self._options(kwargs, where="preprocess()")
        items = [to_chw_tensor(img, f"images[{i}]") for i, img in enumerate(_image_list(images))]
        if all(x.dtype == torch.uint8 for x in items):
            batch = prepare(items, options=opts)
        else:
            floats = _normalised_floats(items, opts)
            batch = prepare(floats, options=opts.replace(mean=None, std=None))
        data = {
            "pixel_values": batch.tiles,
            "num_patches": torch.tensor(batch.tile_counts, dtype=torch.int64),
            "image_sizes": torch.tensor([p.image_size for p in batch.plans], dtype=torch.int64),
            "plans": [p.to_dict() for p in batch.plans],
        }
        return transformers.BatchFeature(data=data)

    def __call__(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> Any:
        """:meth:`preprocess`."""
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)

    def plan(
        self, height: int, width: int, images_kwargs: Mapping[str, Any] | None = None
    ) -> TilePlan:
        """The plan of a ``height × width`` image, without an image.

        ``images_kwargs`` overrides options; keys that are not options of this processor are
        ignored (transformers processors pass their whole ``images_kwargs``).

        Examples:
            >>> DynamicS2ImageProcessor(scales=(32, 64)).plan(48, 64).grids
            ((1, 1), (2, 3))
        """
        _checks.positive_int("height", height)
        _checks.positive_int("width", width)
        if images_kwargs is not None and not isinstance(images_kwargs, Mapping):
            raise TypeError(f"images_kwargs must be a dict or None, got {images_kwargs!r}")
        given = {k: v for k, v in (images_kwargs or {}).items() if k in OPTION_NAMES}
        opts = self._options(given, where="images_kwargs")
        return opts.replace(tile_budget=None).plan([(int(height), int(width))])[0]

    def get_number_of_image_patches(
        self, height: int, width: int, images_kwargs: Mapping[str, Any] | None = None
    ) -> int:
        """Tiles (``num_patches``) of a ``height × width`` image, without an image.

        Examples:
            >>> DynamicS2ImageProcessor(scales=(32, 64)).get_number_of_image_patches(48, 64)
            7
        """
        return self.plan(height, width, images_kwargs).num_tiles

    def get_number_of_image_tokens(
        self,
        height: int,
        width: int,
        tokens_per_tile: int,
        factor: int = 1,
        *,
        output_scale: int = -1,
        images_kwargs: Mapping[str, Any] | None = None,
    ) -> int:
        """Visual tokens of a ``height × width`` image after the merge and ``factor`` packing.

        The merged map of an image is the output scale's valid feature grid ``(h, w)``
        (:meth:`~dynamic_s2.plan.ScalePlan.output_size`: halo cells dropped), exactly the size
        :func:`dynamic_s2.run` gives; packing every ``factor × factor`` block into one token (as
        :func:`dynamic_s2.nvila.pack_tokens`, zero-padding the edges) leaves
        ``ceil(h / factor) · ceil(w / factor)`` tokens. Prefix tokens and the LLM's own tokens
        (NVILA's newline) are not counted.

        Args:
            height: image height in pixels.
            width: image width in pixels.
            tokens_per_tile: spatial tokens the backbone makes per tile, without prefix tokens:
                a square, ``(tile_size / patch_size)²`` (1024 for SigLIP-448/14).
            factor: the packing block side (NVILA: 2; 1: no packing).
            output_scale: the merge's ``output_scale`` (index of the scale of the output grid).
            images_kwargs: option overrides, as for :meth:`plan`.

        Examples:
            >>> p = DynamicS2ImageProcessor.nvila()
            >>> p.get_number_of_image_tokens(1080, 1920, tokens_per_tile=1024, factor=2)
            3072
        """
        n = math.isqrt(_checks.positive_int("tokens_per_tile", tokens_per_tile))
        if n * n != tokens_per_tile:
            raise ValueError(
                f"tokens_per_tile must be a square number (n × n tokens per tile), got "
                f"{tokens_per_tile!r}"
            )
        f = _checks.positive_int("factor", factor)
        plan = self.plan(height, width, images_kwargs)
        grid = plan.scales[plan.scale_index(output_scale, "output_scale")].output_size(n)
        th, tw = packed_size(grid, f)
        return th * tw


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


def register_auto_class(config_class: type | None = None, *, exist_ok: bool = True) -> None:
    """Make ``AutoImageProcessor.from_pretrained(folder)`` load :class:`DynamicS2ImageProcessor`.

    Registers the processor with ``transformers.AutoImageProcessor.register`` under
    ``config_class`` (your VLM's config class; default :class:`DynamicS2Config`), for every
    backend. A saved processor's ``preprocessor_config.json`` names its class
    (``"image_processor_type": "DynamicS2ImageProcessor"``), which is how ``AutoImageProcessor``
    finds it once registered. Call it once per process, before loading.

    Examples:
        >>> import tempfile
        >>> from transformers import AutoImageProcessor
        >>> register_auto_class()
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = DynamicS2ImageProcessor(scales=(32, 64)).save_pretrained(folder)
        ...     AutoImageProcessor.from_pretrained(folder).scales
        (32, 64)
    """
    classes = {"pil": DynamicS2ImageProcessor, "torchvision": DynamicS2ImageProcessor}
    transformers.AutoImageProcessor.register(
        config_class or DynamicS2Config, image_processor_classes=classes, exist_ok=exist_ok
    )
