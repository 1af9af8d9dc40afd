"""The transformers text + image processor of dynamic_s2: :class:`DynamicS2Processor`.

Re-exported by :mod:`dynamic_s2.hf`, which documents the integration as a whole. Every image
placeholder of a prompt becomes exactly as many image tokens as the model side makes for that
image in this batch: the count is read off the very plans that tile the batch
(:meth:`~dynamic_s2.hf.DynamicS2ImageProcessor.num_image_tokens`), and the batch carries it
(``num_image_tokens``) so that :func:`dynamic_s2.run` checks it against the rows it makes.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import _checks
from ._hf_image import (
    _OWN_OPTIONS,
    OPTION_NAMES,
    DynamicS2ImageProcessor,
    image_groups,
    transformers,
)
from ._splice import check_placeholders

__all__ = ["DynamicS2Processor"]

_ProcessorMixin: Any = transformers.ProcessorMixin


def _videos(videos: Any) -> list[list[Any]]:
    """Videos as lists of frames: each a list of images or a ``[F, C, H, W]`` tensor /
    ``[F, H, W, C]`` array."""
    if isinstance(videos, np.ndarray | torch.Tensor) and videos.ndim == 4:
        videos = [videos]
    if not _checks.is_sequence(videos):
        raise TypeError(f"videos must be a list of videos (lists of frames), got {videos!r}")
    out = []
    for i, video in enumerate(videos):
        frames = (
            list(video) if _checks.is_sequence(video) or getattr(video, "ndim", 0) == 4 else None
        )
        if not frames:
            raise ValueError(f"videos[{i}] must be a non-empty list of frames, got {video!r}")
        out.append(frames)
    return out


class DynamicS2Processor(_ProcessorMixin):
    """Images and text for a VLM in one call: tiles for the vision side, prompts whose image
    placeholders are expanded to the batch's true token counts.

    ``processor(text=..., images=..., videos=..., return_tensors="pt")`` tiles every image with
    :class:`~dynamic_s2.hf.DynamicS2ImageProcessor` (one :func:`dynamic_s2.prepare` call for the
    batch, under ``tile_budget`` planned as a whole) and replaces each ``image_token`` in the text
    by ``image_start_token + image_token × n + image_end_token``, ``n`` being the rows the model
    side makes for that image: its plan's merged map packed by ``pack``
    (:func:`~dynamic_s2.packing.num_image_tokens`). Images match placeholders in order across
    the batch (or give one list of images per prompt). A ``video_token`` takes the frames of the
    next video, each frame expanded like an image. With ``multi_image="single"`` (NVILA's rule,
    :meth:`~dynamic_s2.hf.DynamicS2ImageProcessor.nvila`) the images of a prompt with several
    images, and every video frame, get one tile at every scale.

    It returns a ``BatchFeature`` with the tokenizer's ``input_ids`` and ``attention_mask`` and
    the image processor's ``pixel_values``, ``num_patches``, ``image_sizes``, ``plans`` and
    ``num_image_tokens``, images and frames in placeholder order. :func:`dynamic_s2.run` and
    :class:`dynamic_s2.DynamicS2` take it as it is; :func:`~dynamic_s2.hf.splice_image_embeddings`
    puts their rows at the placeholders.

    Args:
        image_processor: a :class:`~dynamic_s2.hf.DynamicS2ImageProcessor` with
            ``tokens_per_tile`` set (the backbone's spatial tokens per tile).
        tokenizer: any transformers tokenizer. ``image_token`` is added to it as a special token
            when it lacks it (then resize the LLM's embeddings to ``len(tokenizer)``).
        chat_template: a Jinja chat template; default: the tokenizer's.
        image_token: the image placeholder (default ``"<image>"``).
        video_token: the video placeholder (default ``"<video>"``).
        image_start_token: text put before each image's tokens (e.g. ``"<img>"``), or ``None``.
        image_end_token: text put after each image's tokens (e.g. a newline), or ``None``.

    Examples:
        >>> import torch
        >>> from dynamic_s2.hf import DynamicS2ImageProcessor
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from transformers import PreTrainedTokenizerFast
        >>> vocab = {"[PAD]": 0, "[UNK]": 1, "look": 2, "at": 3, "this": 4}
        >>> raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        >>> raw.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> tok = PreTrainedTokenizerFast(
        ...     tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]")
        >>> images = DynamicS2ImageProcessor(scales=(32, 64), tokens_per_tile=16, pack=2)
        >>> processor = DynamicS2Processor(images, tok)
        >>> out = processor(text=["look at <image>", "this"], images=[torch.zeros(3, 32, 64)],
        ...                 padding=True)
        >>> out["num_image_tokens"].tolist()      # a 4 × 8 grid of 2 × 2-packed tokens
        [32]
        >>> (out["input_ids"] == processor.image_token_id).sum(1).tolist()
        [32, 0]
    """

    # transformers 5 reads the sub-processors off __init__'s parameters (image_processor, tokenizer)

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        image_start_token: str | None = None,
        image_end_token: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(image_processor, DynamicS2ImageProcessor):
            raise TypeError(
                "image_processor must be a DynamicS2ImageProcessor, got "
                f"{type(image_processor).__name__}"
            )
        if tokenizer is None or not callable(getattr(tokenizer, "convert_tokens_to_ids", None)):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {tokenizer!r}")
        for name, value in (("image_token", image_token), ("video_token", video_token)):
            if not isinstance(value, str) or not value:
                raise TypeError(f"{name} must be a non-empty str, got {value!r}")
        if image_token == video_token:
            raise ValueError(f"image_token and video_token must differ, got {image_token!r} twice")
        for name, text in (
            ("image_start_token", image_start_token),
            ("image_end_token", image_end_token),
        ):
            if text is not None and not isinstance(text, str):
                raise TypeError(f"{name} must be a str or None, got {text!r}")
        if tokenizer.convert_tokens_to_ids(image_token) in (None, tokenizer.unk_token_id):
            tokenizer.add_tokens([image_token], special_tokens=True)
        self.image_token = image_token
        self.video_token = video_token
        self.image_start_token = image_start_token
        self.image_end_token = image_end_token
        self.image_token_id: int = int(tokenizer.convert_tokens_to_ids(image_token))
        template = (
            chat_template
            if chat_template is not None
            else getattr(tokenizer, "chat_template", None)
        )
        super().__init__(image_processor, tokenizer, chat_template=template, **kwargs)

    # ------------------------------------------------------------------------------ the call

    def __call__(  # type: ignore[override]
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        videos: Any = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> Any:
        """Tile the images and frames, expand the placeholders, tokenise.

        Args:
            text: a prompt or a list of prompts, with ``image_token`` / ``video_token``
                placeholders.
            images: the images of the placeholders, in order across the batch: a flat list, or
                one list per prompt.
            videos: the videos of the placeholders, each a list of frames (or a
                ``[F, C, H, W]`` tensor).
            return_tensors: ``"pt"`` (default) or ``None`` for the tokenizer's lists.
            **kwargs: image processor options for this call (``max_tiles``, ``tile_budget``,
                ...) and tokenizer arguments (``padding``, ``truncation``, ``max_length``, ...).

        Raises:
            ValueError: placeholders and images (or videos) disagree in number, or the tokenised
                prompt lost image tokens (truncation).
        """
        image_kwargs = {
            k: kwargs.pop(k) for k in list(kwargs) if k in {*OPTION_NAMES, *_OWN_OPTIONS}
        }
        if text is None:
            if images is None:
                raise ValueError("give text, images or both")
            return self.image_processor(images, return_tensors="pt", **image_kwargs)
        prompts = [text] if isinstance(text, str) else list(text)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"text must be a str or a non-empty list of str, got {text!r}")
        visuals, single, owners, frames = self._visuals(prompts, images, videos, image_kwargs)
        data: dict[str, Any] = {}
        counts: list[int] = []
        if visuals:
            data = dict(
                self.image_processor(visuals, return_tensors="pt", single=single, **image_kwargs)
            )
            if "num_image_tokens" not in data:
                raise ValueError(
                    "the image processor's tokens_per_tile is not set: the processor needs it to "
                    "expand placeholders (e.g. 1024 for SigLIP-448/14)"
                )
            counts = [int(n) for n in data["num_image_tokens"]]
        expanded = self._expand(prompts, counts, frames)
        encoded = self.tokenizer(expanded, return_tensors=return_tensors, **kwargs)
        check_placeholders(encoded["input_ids"], self.image_token_id, counts, owners)
        return transformers.BatchFeature(data={**encoded, **data})

    def _visuals(
        self, prompts: list[str], images: Any, videos: Any, image_kwargs: dict[str, Any]
    ) -> tuple[list[Any], list[bool], list[int], list[int]]:
        """Images and frames in placeholder order, whether each gets one tile, the prompt each
        belongs to, and the frames of every video placeholder."""
        _, own = self.image_processor._settings(image_kwargs, where="DynamicS2Processor()")
        one_tile = own["multi_image"] == "single"
        pattern = re.compile(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})")
        marks = [[m for m in pattern.findall(p)] for p in prompts]
        image_marks = [m.count(self.image_token) for m in marks]
        queues = self._image_queues(images, image_marks)
        video_list = [] if videos is None else _videos(videos)
        wanted = sum(m.count(self.video_token) for m in marks)
        if wanted != len(video_list):
            raise ValueError(
                f"the prompts hold {wanted} {self.video_token} placeholders but {len(video_list)} "
                "videos were given"
            )
        visuals: list[Any] = []
        single: list[bool] = []
        owners: list[int] = []
        next_video = iter(video_list)
        for i, prompt_marks in enumerate(marks):
            for mark in prompt_marks:
                frames = [queues[i].pop(0)] if mark == self.image_token else next(next_video)
                video = mark == self.video_token
                visuals.extend(frames)
                single.extend([one_tile and (video or image_marks[i] > 1)] * len(frames))
                owners.extend([i] * len(frames))
        return visuals, single, owners, [len(v) for v in video_list]

    def _image_queues(self, images: Any, image_marks: list[int]) -> list[list[Any]]:
        """The images of every prompt, checked against its placeholders."""
        total = sum(image_marks)
        if images is None:
            if total:
                raise ValueError(
                    f"the prompts hold {total} {self.image_token} placeholders but no images "
                    "were given"
                )
            return [[] for _ in image_marks]
        groups = image_groups(images)
        nested = _checks.is_sequence(images) and any(_checks.is_sequence(g) for g in images)
        if nested:
            if [len(g) for g in groups] != image_marks:
                raise ValueError(
                    f"the prompts hold {image_marks} {self.image_token} placeholders but the "
                    f"images per prompt are {[len(g) for g in groups]}"
                )
            return [list(g) for g in groups]
        flat = [img for g in groups for img in g]
        if len(flat) != total:
            raise ValueError(
                f"the prompts hold {total} {self.image_token} placeholders but {len(flat)} images "
                "were given"
            )
        ends = np.cumsum([0, *image_marks])
        return [flat[a:b] for a, b in itertools.pairwise(ends)]

    def _expand(self, prompts: list[str], counts: list[int], frames: list[int]) -> list[str]:
        """Every placeholder replaced by its images' token runs, in order."""
        run = iter(counts)
        start, end = self.image_start_token or "", self.image_end_token or ""

        def image(n: int) -> str:
            return start + self.image_token * n + end

        pattern = re.compile(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})")
        video_frames = iter(frames)
        out = []
        for prompt in prompts:
            pieces = pattern.split(prompt)
            for k in range(1, len(pieces), 2):
                runs = 1 if pieces[k] == self.image_token else next(video_frames)
                pieces[k] = "".join(image(next(run)) for _ in range(runs))
            out.append("".join(pieces))
        return out

    # ------------------------------------------------------------------------------ counts

    def _get_num_multimodal_tokens(
        self, image_sizes: Sequence[Sequence[int]] | None = None, **kwargs: Any
    ) -> Any:
        """Image tokens and tiles of images of ``image_sizes`` ``(h, w)``, as transformers and
        vLLM ask: the plans of those sizes as one batch (so under ``tile_budget`` the budget
        binds them together, as in a call with those images), then the one count.

        ``single`` (one bool per image) counts images of multi-image prompts; other keyword
        arguments override image processor options. The counts are image-token rows; the start
        and end tokens, when set, are text around them.

        Examples:
            >>> from dynamic_s2.hf import DynamicS2ImageProcessor
            >>> from transformers import PreTrainedTokenizerFast
            >>> from tokenizers import Tokenizer, models
            >>> tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
            ...     {"[UNK]": 0}, unk_token="[UNK]")), unk_token="[UNK]")
            >>> p = DynamicS2Processor(DynamicS2ImageProcessor.nvila(), tok)
            >>> p._get_num_multimodal_tokens([(1080, 1920)]).num_image_tokens
            [3072]
        """
        data: dict[str, Any] = {}
        if image_sizes is not None:
            single = kwargs.pop("single", None)
            given = {k: v for k, v in kwargs.items() if k in {*OPTION_NAMES, *_OWN_OPTIONS}}
            plans = self.image_processor.plan_batch(image_sizes, single, images_kwargs=given)
            data["num_image_tokens"] = self.image_processor.num_image_tokens(
                plans, images_kwargs=given
            )
            data["num_image_patches"] = [p.num_tiles for p in plans]
        return transformers.processing_utils.MultiModalData(**data)

    @property
    def model_input_names(self) -> list[str]:
        """The tokenizer's and the image processor's output names."""
        names = [*self.tokenizer.model_input_names, *self.image_processor.model_input_names]
        return list(dict.fromkeys(names))
