"""The output of the merge: :class:`MultiScaleFeatures`, packed features with lazy padded views."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import numpy as np
import torch

from . import _checks
from .plan import TilePlan

__all__ = ["MultiScaleFeatures"]


class MultiScaleFeatures:
    """Merged multi-scale features of a batch of images of different sizes.

    The features are stored packed (``tokens``: the valid cells of every image, image after image,
    in raster order); the padded view and its mask are built on first access.

    Attributes:
        tokens: ``[Σ h_i·w_i, C_total]`` packed features.
        sizes: ``(h_i, w_i)`` feature grid of every image.
        plans: the plan of every image.
        prefix: ``[B, P, C_total]`` averaged prefix tokens (CLS, registers), or ``None``.

    Examples:
        >>> feats = MultiScaleFeatures(torch.ones(6, 2), [(1, 2), (2, 2)])
        >>> feats.features.shape, feats.mask.sum().item()
        (torch.Size([2, 2, 2, 2]), 6)
        >>> tokens, cu_seqlens = feats.pack()
        >>> cu_seqlens.tolist()
        [0, 2, 6]
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        sizes: Sequence[tuple[int, int]],
        plans: Sequence[TilePlan] | None = None,
        prefix: torch.Tensor | None = None,
    ) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens)
            raise ValueError(f"tokens must be a [N, C] tensor, got {shape}")
        self.tokens = tokens
        self.sizes = _check_sizes(sizes)
        self.plans = list(plans) if plans is not None else []
        self.prefix = prefix
        if sum(h * w for h, w in self.sizes) != tokens.shape[0]:
            raise ValueError(
                f"tokens has {tokens.shape[0]} rows but sizes {self.sizes} need "
                f"{sum(h * w for h, w in self.sizes)}"
            )

    @classmethod
    def cat(cls, parts: Sequence[MultiScaleFeatures]) -> MultiScaleFeatures:
        """The images of several results, one after the other.

        Examples:
            >>> a = MultiScaleFeatures(torch.ones(2, 3), [(1, 2)])
            >>> MultiScaleFeatures.cat([a, a]).sizes
            [(1, 2), (1, 2)]
        """
        if not parts:
            raise ValueError("parts must not be empty")
        if len(parts) == 1:
            return parts[0]
        prefixes = [p.prefix for p in parts if p.prefix is not None]
        if prefixes and len(prefixes) != len(parts):
            has = [p.prefix is not None for p in parts]
            raise ValueError(
                f"parts mix results with and without prefix tokens (prefix present: {has}); "
                "all must have a prefix, or none"
            )
        channels = {p.channels for p in parts}
        if len(channels) > 1:
            raise ValueError(f"parts have different channel counts {sorted(channels)}")
        return cls(
            torch.cat([p.tokens for p in parts]),
            [size for p in parts for size in p.sizes],
            [plan for p in parts for plan in p.plans],
            torch.cat(prefixes) if len(prefixes) == len(parts) else None,
        )

    def __repr__(self) -> str:
        return (
            f"MultiScaleFeatures(batch={len(self.sizes)}, sizes={self.sizes}, "
            f"channels={self.tokens.shape[-1]}, dtype={self.tokens.dtype}, "
            f"prefix={None if self.prefix is None else tuple(self.prefix.shape)})"
        )

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def channels(self) -> int:
        """``C_total``: channels of all scales together."""
        return int(self.tokens.shape[-1])

    @property
    def grid_sizes(self) -> list[tuple[int, int]]:
        """Alias of :attr:`sizes`: the feature grid ``(h, w)`` of every image."""
        return self.sizes

    @cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """``int32 [B + 1]`` cumulative token counts, for variable-length attention."""
        counts = [0] + [h * w for h, w in self.sizes]
        return torch.tensor(np.cumsum(counts), dtype=torch.int32, device=self.tokens.device)

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [Σ h_i·w_i, C_total], cu_seqlens int32 [B + 1])``."""
        return self.tokens, self.cu_seqlens

    def unpad(self) -> list[torch.Tensor]:
        """One ``[h_i, w_i, C_total]`` view per image."""
        counts = [h * w for h, w in self.sizes]
        return [
            chunk.view(h, w, -1)
            for chunk, (h, w) in zip(self.tokens.split(counts), self.sizes, strict=True)
        ]

    def pooled(self, include_prefix: bool = False) -> torch.Tensor:
        """One vector per image: the mean over its valid cells, ``[B, C_total]``.

        The padded cells of :attr:`features` are not counted: image ``i``'s row equals
        ``unpad()[i].mean(dim=(0, 1))``. With ``include_prefix=True`` the ``P`` prefix tokens
        (:attr:`prefix`) count as ``P`` more cells: the mean runs over the ``h_i·w_i`` cells and
        the ``P`` prefix tokens together, each weighted equally. Summed in float32 (float64 stays
        float64), returned in the features' dtype; one scatter for the whole batch.

        Raises:
            ValueError: ``include_prefix=True`` but the features have no prefix tokens.

        Examples:
            >>> feats = MultiScaleFeatures(torch.arange(6.).view(6, 1), [(1, 2), (2, 2)])
            >>> feats.pooled().flatten().tolist()
            [0.5, 3.5]
            >>> with_cls = MultiScaleFeatures(feats.tokens, feats.sizes, prefix=torch.ones(2, 1, 1))
            >>> with_cls.pooled(include_prefix=True).flatten()  # (0 + 1 + 1) / 3, (2+3+4+5+1) / 5
            tensor([0.6667, 3.0000])
        """
        _checks.boolean("include_prefix", include_prefix)
        if include_prefix and self.prefix is None:
            raise ValueError("include_prefix=True, but these features have no prefix tokens")
        device = self.tokens.device
        compute = torch.float64 if self.tokens.dtype == torch.float64 else torch.float32
        counts = np.array([h * w for h, w in self.sizes], dtype=np.int64)
        segment = torch.from_numpy(np.repeat(np.arange(len(counts)), counts)).to(device)
        total = torch.zeros((len(counts), self.channels), dtype=compute, device=device)
        total = total.index_add(0, segment, self.tokens.to(compute))
        count = torch.from_numpy(counts).to(device, compute)
        if include_prefix and self.prefix is not None:
            total = total + self.prefix.to(compute).sum(dim=1)
            count = count + self.prefix.shape[1]
        return (total / count[:, None]).to(self.tokens.dtype)

    @cached_property
    def _padded_index(self) -> tuple[torch.Tensor, tuple[int, int, int]]:
        hmax = max(h for h, _ in self.sizes)
        wmax = max(w for _, w in self.sizes)
        index = np.concatenate(
            [
                (b * hmax * wmax + np.arange(h)[:, None] * wmax + np.arange(w)[None, :]).ravel()
                for b, (h, w) in enumerate(self.sizes)
            ]
        )
        shape = (len(self.sizes), hmax, wmax)
        return torch.from_numpy(index).to(self.tokens.device), shape

    @cached_property
    def features(self) -> torch.Tensor:
        """``[B, Hmax, Wmax, C_total]`` padded features, zero where :attr:`mask` is False."""
        if self.tokens.requires_grad and torch.is_grad_enabled():  # one op for autograd
            index, (b, hmax, wmax) = self._padded_index
            out = self.tokens.new_zeros(b * hmax * wmax, self.channels)
            return out.index_copy_(0, index, self.tokens).view(b, hmax, wmax, self.channels)
        # Each byte written once: every image's rows copied into its corner (a strided copy, no
        # index map), and only the padding zeroed.
        hmax = max((h for h, _ in self.sizes), default=0)
        wmax = max((w for _, w in self.sizes), default=0)
        out = self.tokens.new_empty((len(self.sizes), hmax, wmax, self.channels))
        for image, chunk, (h, w) in zip(out, self.unpad(), self.sizes, strict=True):
            image[:h, :w].copy_(chunk)
            image[h:].zero_()
            image[:h, w:].zero_()
        return out

    @cached_property
    def mask(self) -> torch.Tensor:
        """``[B, Hmax, Wmax]`` bool: True exactly on each image's ``h_i × w_i`` valid cells."""
        _, (b, hmax, wmax) = self._padded_index
        mask = np.zeros((b, hmax, wmax), dtype=bool)
        for i, (h, w) in enumerate(self.sizes):
            mask[i, :h, :w] = True
        return torch.from_numpy(mask).to(self.tokens.device)

    def to(self, *args: object, **kwargs: object) -> MultiScaleFeatures:
        """Move or cast the tensors (``Tensor.to`` arguments)."""
        prefix = None if self.prefix is None else self.prefix.to(*args, **kwargs)  # type: ignore[call-overload]
        return MultiScaleFeatures(
            self.tokens.to(*args, **kwargs),  # type: ignore[call-overload]
            self.sizes,
            self.plans,
            prefix,
        )


def _check_sizes(sizes: object) -> list[tuple[int, int]]:
    """``sizes`` as a list of ``(h, w)`` pairs of non-negative ints, or ``ValueError``."""
    if not isinstance(sizes, Sequence) or isinstance(sizes, str | bytes):
        raise TypeError(f"sizes must be a sequence of (h, w) pairs, got {sizes!r}")
    out = []
    for i, size in enumerate(sizes):
        ok = isinstance(size, Sequence) and len(size) == 2
        if not ok or not all(
            isinstance(v, int | np.integer) and not isinstance(v, bool) for v in size
        ):
            raise ValueError(f"sizes[{i}] must be a pair of ints (h, w), got {size!r}")
        if min(size) < 0:
            raise ValueError(f"sizes[{i}] must not be negative, got {tuple(size)!r}")
        out.append((int(size[0]), int(size[1])))
    return out
