"""Image embeddings into a language model's input: :func:`splice_image_embeddings`.

The model-side end of the placeholder contract of :class:`dynamic_s2.hf.DynamicS2Processor`:
every image token of ``input_ids`` takes the next row of the image embeddings, in order across
the batch, and every count is checked first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["check_placeholders", "splice_image_embeddings"]


def check_placeholders(
    input_ids: object, image_token_id: int, counts: Sequence[int], owners: Sequence[int]
) -> None:
    """``ValueError`` unless every prompt of ``input_ids`` holds as many ``image_token_id`` as
    the image counts of the images it owns (``owners[i]`` is image ``i``'s prompt).

    Examples:
        >>> check_placeholders([[5, 9, 9], [5]], 9, [2], [0])
        >>> check_placeholders([[5, 9], [5]], 9, [2], [0])
        Traceback (most recent call last):
            ...
        ValueError: prompt 0 holds 1 image tokens after tokenising, but its images make 2: ...
    """
    wanted: dict[int, int] = {}
    for count, owner in zip(counts, owners, strict=True):
        wanted[owner] = wanted.get(owner, 0) + int(count)
    rows: list[list[int]] = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids  # type: ignore[assignment]
    for i, ids in enumerate(rows):
        held = sum(1 for t in ids if t == image_token_id)
        if held != wanted.get(i, 0):
            raise ValueError(
                f"prompt {i} holds {held} image tokens after tokenising, but its images make "
                f"{wanted.get(i, 0)}: was it truncated (max_length), or does the tokenizer split "
                "the image token?"
            )


def splice_image_embeddings(
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    image_embeds: torch.Tensor,
    image_token_id: int,
) -> torch.Tensor:
    """``inputs_embeds`` with its image-token positions replaced by ``image_embeds``, in order.

    Image tokens are taken in row-major order over ``input_ids`` (prompt after prompt), which is
    the order :class:`~dynamic_s2.hf.DynamicS2Processor` lays images out in, and the order of
    the rows of ``run(...).pack()`` (projected to the LLM's width). Differentiable in both
    embeddings; returns a new tensor.

    Args:
        inputs_embeds: ``[B, L, D]``, the LLM's token embeddings.
        input_ids: ``[B, L]``.
        image_embeds: ``[N, D]``, one row per image token.
        image_token_id: the id of the image placeholder token.

    Raises:
        ValueError: shapes disagree, or the number of image tokens is not ``N``.

    Examples:
        >>> ids = torch.tensor([[1, 7, 7, 2], [7, 3, 0, 0]])
        >>> out = splice_image_embeddings(torch.zeros(2, 4, 2), ids, torch.ones(3, 2), 7)
        >>> out[..., 0].tolist()
        [[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    """
    for name, value in (
        ("inputs_embeds", inputs_embeds),
        ("input_ids", input_ids),
        ("image_embeds", image_embeds),
    ):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if inputs_embeds.dim() != 3 or tuple(input_ids.shape) != tuple(inputs_embeds.shape[:2]):
        raise ValueError(
            f"inputs_embeds must be [B, L, D] and input_ids [B, L], got "
            f"{tuple(inputs_embeds.shape)} and {tuple(input_ids.shape)}"
        )
    if image_embeds.dim() != 2 or image_embeds.shape[1] != inputs_embeds.shape[2]:
        raise ValueError(
            f"image_embeds must be [N, {inputs_embeds.shape[2]}] (the LLM's width), got "
            f"{tuple(image_embeds.shape)}"
        )
    mask = input_ids == image_token_id
    held = int(mask.sum())
    if held != image_embeds.shape[0]:
        raise ValueError(
            f"input_ids hold {held} image tokens (id {image_token_id}) but image_embeds has "
            f"{image_embeds.shape[0]} rows: the processor and the vision side disagree"
        )
    out = inputs_embeds.clone()
    out[mask] = image_embeds.to(inputs_embeds.dtype)
    return out
