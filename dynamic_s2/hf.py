"""Hugging Face transformers integration: processors for images and for text + images.

* :class:`DynamicS2ImageProcessor`: the CPU half of the chain (:func:`dynamic_s2.prepare`: plan
  + tile) in the shape transformers expects: a ``BaseImageProcessor`` whose call returns a
  ``BatchFeature``, with ``save_pretrained`` / ``from_pretrained`` and ``AutoImageProcessor``
  after :func:`register_auto_class`. Its options are the plan and tile fields of
  :class:`~dynamic_s2.options.S2Options` (``mean`` and ``std`` as ``image_mean`` and
  ``image_std``), the merge's ``pack`` and ``output_scale``, ``tokens_per_tile`` and
  ``multi_image``; a field added to ``S2Options`` for those stages becomes an option by itself.
* :class:`DynamicS2Processor`: a ``ProcessorMixin`` over the image processor and any tokenizer,
  whose image placeholders are expanded to the batch's true token counts.
* :func:`splice_image_embeddings`: the model side of the placeholders.

Every count (tiles, tokens, placeholders) is read off the plans that tile the batch, and the
batch carries its counts (``num_image_tokens``), which :func:`dynamic_s2.run` and
:class:`dynamic_s2.DynamicS2` check against the rows they make.

Examples:
    >>> import torch
    >>> processor = DynamicS2ImageProcessor(scales=(32, 64), tile_size=32)
    >>> out = processor([torch.zeros(3, 48, 64, dtype=torch.uint8)])
    >>> out["pixel_values"].shape, out["num_patches"].tolist(), out["image_sizes"].tolist()
    (torch.Size([7, 3, 32, 32]), [7], [[48, 64]])
"""

from __future__ import annotations

from ._hf_image import (
    MULTI_IMAGE_MODES,
    OPTION_NAMES,
    DynamicS2Config,
    DynamicS2ImageProcessor,
    image_groups,
    transformers,
)
from ._hf_text import DynamicS2Processor
from ._splice import splice_image_embeddings

__all__ = [
    "MULTI_IMAGE_MODES",
    "OPTION_NAMES",
    "DynamicS2Config",
    "DynamicS2ImageProcessor",
    "DynamicS2Processor",
    "image_groups",
    "register_auto_class",
    "splice_image_embeddings",
]


def register_auto_class(config_class: type | None = None, *, exist_ok: bool = True) -> None:
    """Make ``AutoImageProcessor`` and ``AutoProcessor`` load this module's processors.

    Registers :class:`DynamicS2ImageProcessor` with ``transformers.AutoImageProcessor`` and
    :class:`DynamicS2Processor` with ``transformers.AutoProcessor``, under ``config_class`` (your
    VLM's config class; default :class:`DynamicS2Config`). A saved processor names its class in
    its config files, which is how the auto classes find it once registered. Call it once per
    process, before loading.

    Examples:
        >>> import tempfile
        >>> from transformers import AutoImageProcessor
        >>> register_auto_class()
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = DynamicS2ImageProcessor(scales=(32, 64)).save_pretrained(folder)
        ...     AutoImageProcessor.from_pretrained(folder).scales
        (32, 64)
    """
    config = config_class or DynamicS2Config
    classes = {"pil": DynamicS2ImageProcessor, "torchvision": DynamicS2ImageProcessor}
    transformers.AutoImageProcessor.register(
        config, image_processor_classes=classes, exist_ok=exist_ok
    )
    transformers.AutoProcessor.register(config, DynamicS2Processor, exist_ok=exist_ok)
