"""The padded-batch executor: run a backbone over all tiles in memory-bounded chunks.

All tiles of all images and scales go through the backbone together, ``max_batch_tiles`` at a time,
so memory is bounded by one chunk, not by the batch. ``pad_to_multiple`` pads the last chunk with
blank tiles (their outputs are dropped), so a compiled or CUDA-graphed backbone sees few shapes.
It is at most :data:`MAX_PAD_TO_MULTIPLE`, and it is not applied while the backbone module is in
training mode: blank tiles would enter the batch statistics of BatchNorm layers and change the
results (in eval mode they cannot).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import _checks
from .backbones import Backbone, as_backbone

__all__ = ["MAX_PAD_TO_MULTIPLE", "encode_tiles"]

#: The largest ``pad_to_multiple``: blank tiles cost memory like real ones.
MAX_PAD_TO_MULTIPLE = 4096


def check_chunking(
    max_batch_tiles: object, pad_to_multiple: object
) -> tuple[int | None, int | None]:
    """Validate ``max_batch_tiles`` and ``pad_to_multiple``; return ``(chunk, multiple)``.

    ``chunk`` is ``max_batch_tiles`` rounded down to a multiple of ``pad_to_multiple``.
    """
    chunk = _checks.optional(_checks.positive_int, "max_batch_tiles", max_batch_tiles)
    multiple = _checks.optional(_checks.positive_int, "pad_to_multiple", pad_to_multiple)
    if multiple is not None and multiple > MAX_PAD_TO_MULTIPLE:
        raise ValueError(
            f"pad_to_multiple must be at most {MAX_PAD_TO_MULTIPLE} (blank tiles cost memory like "
            f"real ones), got {multiple!r}"
        )
    if chunk is not None and multiple is not None and multiple > chunk:
        raise ValueError(
            f"pad_to_multiple={multiple} exceeds max_batch_tiles={chunk}: padded chunks would "
            "break the memory bound"
        )
    if chunk is not None and multiple is not None:
        chunk -= chunk % multiple  # every chunk a multiple, so only the last needs padding
    return chunk, multiple


def check_chunk_shape(first: tuple[int, ...] | None, result: torch.Tensor) -> tuple[int, ...]:
    """The per-tile output shape of the first chunk; ``ValueError`` when a later chunk's differs
    (``first`` is ``None`` for the first chunk)."""
    shape = tuple(result.shape[1:])
    if first is not None and shape != first:
        raise ValueError(
            f"the backbone returned shape {tuple(result.shape)} for a later chunk, but {first} "
            "per tile before: its output shape must not depend on the chunk"
        )
    return shape


def _check_output(out: object, expected: int, chunk_shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            "the backbone (model) must return a tensor (or an HF output with last_hidden_state), "
            f"got {type(out).__name__}; wrap it, e.g. lambda x: model(x).last_hidden_state"
        )
    if out.dim() not in (3, 4):
        raise ValueError(
            f"the backbone (model) returned shape {tuple(out.shape)} for tiles {chunk_shape}: "
            "expected [T, N, C] tokens or [T, C, h, w] maps"
        )
    if out.shape[0] != expected:
        raise ValueError(
            f"the backbone (model) returned {out.shape[0]} outputs for a chunk of {expected} tiles "
            f"(shape {tuple(out.shape)}): its first dim must be the batch"
        )
    return out


def encode_tiles(
    model: Callable[[torch.Tensor], object] | Backbone,
    tiles: torch.Tensor,
    *,
    max_batch_tiles: int | None = None,
    pad_to_multiple: int | None = None,
    feature_layer: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Run ``model`` over ``[T, C, t, t]`` tiles in chunks of at most ``max_batch_tiles``.

    Args:
        model: a backbone: any callable mapping ``[n, C, t, t]`` to ``[n, N, C']`` tokens or
            ``[n, C', h, w]`` maps, an HF vision model, a timm or torchvision model, or a
            :class:`~dynamic_s2.backbones.Backbone` (see :func:`~dynamic_s2.backbones.as_backbone`).
        tiles: ``[T, C, t, t]``.
        max_batch_tiles: the most tiles per backbone call; ``None`` runs all at once.
        pad_to_multiple: pad the last chunk with zero tiles up to a multiple of this (at most
            ``max_batch_tiles`` and :data:`MAX_PAD_TO_MULTIPLE`) and drop their outputs; not
            done while the backbone module is training (BatchNorm would count the blank tiles).
        feature_layer: for HF models, take ``hidden_states[feature_layer]`` instead of the last
            hidden state (NVILA uses -2); several indices concatenate those layers on channels
            (see :func:`~dynamic_s2.backbones.as_backbone`, which also covers timm).

    Works under ``torch.no_grad``, ``inference_mode``, autocast, and with gradients.

    Returns:
        The backbone's outputs for all tiles, concatenated: ``[T, N, C']`` or ``[T, C', h, w]``.

    Examples:
        >>> calls = []
        >>> def model(x):
        ...     calls.append(x.shape[0])
        ...     return x.mean(dim=1, keepdim=True)  # [n, 1, t, t] "maps"
        >>> encode_tiles(model, torch.rand(10, 3, 8, 8), max_batch_tiles=4).shape
        torch.Size([10, 1, 8, 8])
        >>> calls
        [4, 4, 2]
    """
    backbone = as_backbone(model, feature_layer=feature_layer)
    chunk, multiple = check_chunking(max_batch_tiles, pad_to_multiple)
    if not isinstance(tiles, torch.Tensor):
        raise TypeError(f"tiles must be a torch.Tensor, got {type(tiles).__name__}")
    if tiles.dim() != 4 or tiles.shape[0] == 0:
        raise ValueError(f"tiles must be a non-empty [T, C, t, t] tensor, got {tuple(tiles.shape)}")
    return _encode(backbone, tiles, chunk, multiple)


def _call(backbone: Backbone, tiles: torch.Tensor) -> object:
    """``backbone(tiles)``; a failure on tiles of another side than the backbone declares is
    reported as the tile size it is (the backbone's own message is chained)."""
    try:
        return backbone(tiles)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError) as exc:
        size, side = backbone.input_size, tiles.shape[-1]
        if size is None or side == size:
            raise
        raise ValueError(
            f"tile_size: the backbone ({backbone.name}) failed on {side}-px tiles and declares "
            f"an input size of {size} px: use tile_size={size} (or scales from {size}), or a "
            f"backbone that takes {side}-px tiles. The backbone said: {exc}"
        ) from exc


def _encode(
    backbone: Backbone, tiles: torch.Tensor, chunk: int | None, multiple: int | None
) -> torch.Tensor:
    """:func:`encode_tiles` on checked arguments (the chain calls this directly)."""
    total = tiles.shape[0]
    chunk = total if chunk is None else min(chunk, total)
    if backbone.module is not None and backbone.module.training:
        multiple = None  # blank tiles would change train-mode BatchNorm statistics

    out: torch.Tensor | None = None
    pieces: list[torch.Tensor] = []
    for start in range(0, total, chunk):
        part = tiles[start : start + chunk]
        n = part.shape[0]
        if multiple is not None and n % multiple:
            blank = part.new_zeros((multiple - n % multiple, *part.shape[1:]))
            part = torch.cat([part, blank])
        result = _check_output(_call(backbone, part), part.shape[0], tuple(part.shape))[:n]
        if chunk >= total:
            return result
        if result.requires_grad:
            check_chunk_shape(tuple(pieces[0].shape[1:]) if pieces else None, result)
            pieces.append(result)
            continue
        if out is None:  # preallocate once: peak memory is the output plus one chunk
            out = result.new_empty((total, *result.shape[1:]))
        check_chunk_shape(tuple(out.shape[1:]), result)
        out[start : start + n] = result
    if pieces:
        return torch.cat(pieces)
    if out is None:  # pragma: no cover - total > 0 always yields a chunk
        raise ValueError("no tiles were encoded")
    return out
