"""Plain, independent references for the core pipeline (tile → encode → merge), and tiny backbones.

Used by ``test_tiling.py``, ``test_merge.py``, ``test_forward.py`` and ``test_backbones.py``.
Written from the documented behaviour in issue 3 and ``shared/DESIGN.md``, deliberately slow
(explicit loops over images, scales and tiles) and sharing no code with ``dynamic_s2``. Plans are
inputs here: the references read their grids and content sizes and do every other step themselves.

- :func:`ref_tiles`: uint8 → ``/255`` → ``(x - mean) / std``; bicubic resize (antialias,
  ``align_corners=False``) in float32 to the content size, cast back; placed top-left in a canvas
  filled with ``pad_value``; cut row-major; scales ascending.
- :func:`ref_merge`: per image and scale, stitch the tiles with ``torch.cat``, crop to
  ``ceil(content · n / t)``, resample with ``F.interpolate`` (``area`` or ``bilinear``,
  ``align_corners=False``) in float32 (float64 stays float64), cast back, concatenate the scales
  on channels; prefix tokens averaged over the image's tiles per scale.
- :func:`nvila_merge`: NVILA's ``merge_features_for_dynamic_s2`` (k×k lower scales, rows×cols last
  scale, area to the chosen scale's map, lowest scale first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ceil_div(a: int, b: int) -> int:
    q, r = divmod(a, b)
    return q + (1 if r else 0)


def assert_within_one_ulp(got: torch.Tensor, want: torch.Tensor) -> None:
    """Every element of ``got`` equals ``want`` or one of its neighbours in ``want``'s dtype.

    For half-precision results that both sides compute in float32 and round once: anything
    computed in the half type itself accumulates several roundings and fails this.
    """
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    up = torch.nextafter(want, torch.full_like(want, float("inf")))
    down = torch.nextafter(want, torch.full_like(want, float("-inf")))
    ok = (got == want) | (got == up) | (got == down)
    if not bool(ok.all()):
        diff = (got.double() - want.double()).abs().max().item()
        raise AssertionError(
            f"{int((~ok).sum())} of {ok.numel()} elements are more than one {want.dtype} ulp "
            f"apart (largest difference {diff:.3g})"
        )


# ---------------------------------------------------------------------------------------- tiling


def ref_tiles(
    image: torch.Tensor,
    plan: Any,
    *,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    pad_value: float = 0.0,
    uint8_resize: bool = False,
) -> torch.Tensor:
    """All tiles of one ``[C, H, W]`` image, scales ascending, tiles row-major: ``[n, C, t, t]``.

    ``uint8_resize``: resize uint8 images with torch's uint8 kernel, then normalise.
    """
    channels = image.shape[0]

    def normalise(x: torch.Tensor) -> torch.Tensor:
        # the library's one rule: uint8 / 255, float read as [0, 1]; then (x - mean) / std
        x = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
        if mean is not None:
            m = [float(mean)] * channels if isinstance(mean, int | float) else list(mean)
            x = x - torch.tensor(m, dtype=torch.float32).view(-1, 1, 1)
        if std is not None:
            s = [float(std)] * channels if isinstance(std, int | float) else list(std)
            x = x / torch.tensor(s, dtype=torch.float32).view(-1, 1, 1)
        return x

    integer = image.dtype == torch.uint8 and uint8_resize
    if image.dtype == torch.uint8:
        x = image if integer else normalise(image)
        out_dtype = torch.float32
    else:
        x = normalise(image)
        out_dtype = image.dtype
    t = plan.tile_size
    tiles = []
    for sp in plan.scales:
        rows, cols = sp.grid
        ch, cw = sp.content_size
        resized = F.interpolate(
            x[None] if integer else x[None].to(torch.float32),
            size=(ch, cw),
            mode="bicubic",
            align_corners=False,
            antialias=True,
        )[0]
        resized = normalise(resized) if integer else resized.to(out_dtype)
        canvas = torch.full(
            (channels, rows * t, cols * t), pad_value, dtype=out_dtype, device=image.device
        )
        canvas[:, :ch, :cw] = resized
        for r in range(rows):
            for c in range(cols):
                tiles.append(canvas[:, r * t : (r + 1) * t, c * t : (c + 1) * t])
    return torch.stack(tiles)


# ---------------------------------------------------------------------------------------- merging


def tile_maps(features: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``[n, N, C]`` tokens (``num_prefix`` first) or ``[n, C, h, w]`` maps → (prefix, maps)."""
    if features.dim() == 4:
        return None, features
    n, count, channels = features.shape
    side = round((count - num_prefix) ** 0.5)
    if side * side != count - num_prefix:
        raise ValueError(f"{count} tokens - {num_prefix} prefix is not a square")
    grid = features[:, num_prefix:].reshape(n, side, side, channels).permute(0, 3, 1, 2)
    prefix = features[:, :num_prefix] if num_prefix else None
    return prefix, grid


def stitch(maps: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[rows*cols, C, h, w]`` row-major tiles → ``[C, rows*h, cols*w]`` with explicit loops."""
    lines = []
    for r in range(rows):
        lines.append(torch.cat([maps[r * cols + c] for c in range(cols)], dim=-1))
    return torch.cat(lines, dim=-2)


def resample(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """``[C, h, w]`` → ``[C, *size]``: ``F.interpolate`` in float32 (float64 kept), cast back."""
    work = x[None].to(_compute_dtype(x.dtype))
    if mode == "area":
        out = F.interpolate(work, size=size, mode="area")
    elif mode == "bilinear":
        out = F.interpolate(work, size=size, mode="bilinear", align_corners=False)
    else:
        raise ValueError(mode)
    return out[0].to(x.dtype)


def ref_merge(
    features: torch.Tensor,
    plans: Sequence[Any],
    *,
    num_prefix: int = 0,
    output_scale: int = -1,
    mode: str = "area",
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per-image loop: (list of ``[h_i, w_i, S·C]``, list of ``[P, S·C]`` prefixes or None)."""
    prefix_all, maps_all = tile_maps(features, num_prefix)
    side = maps_all.shape[-1]
    maps_out: list[torch.Tensor] = []
    prefix_out: list[torch.Tensor] = []
    start = 0
    for plan in plans:
        t = plan.tile_size
        per_scale = []
        prefixes = []
        for sp in plan.scales:
            rows, cols = sp.grid
            n = rows * cols
            full = stitch(maps_all[start : start + n], rows, cols)
            h = _ceil_div(sp.content_size[0] * side, t)
            w = _ceil_div(sp.content_size[1] * side, t)
            per_scale.append(full[:, :h, :w])
            if prefix_all is not None:
                p = prefix_all[start : start + n]
                prefixes.append(p.to(_compute_dtype(p.dtype)).mean(dim=0).to(p.dtype))
            start += n
        size = tuple(per_scale[output_scale].shape[-2:])
        merged = torch.cat([resample(m, size, mode) for m in per_scale], dim=0)
        maps_out.append(merged.permute(1, 2, 0))
        if prefix_all is not None:
            prefix_out.append(torch.cat(prefixes, dim=-1))
    if start != features.shape[0]:
        raise ValueError(f"the plans use {start} tiles, the features have {features.shape[0]}")
    return maps_out, (prefix_out if prefix_all is not None else None)


def nvila_merge(
    features: torch.Tensor,
    block_sizes: Sequence[tuple[int, int]],
    scales: Sequence[int],
    output_scale: int = -1,
) -> list[torch.Tensor]:
    """NVILA's ``merge_features_for_dynamic_s2``: per image ``[S·C, H, W]`` (channels first).

    ``features``: ``[T, N, C]`` (a square token grid, no prefix) or ``[T, C, h, w]``;
    ``block_sizes``: the last scale's ``(rows, cols)`` of every image.
    """
    if features.dim() == 3:
        side = round(features.shape[1] ** 0.5)
        features = features.reshape(features.shape[0], side, side, -1).permute(0, 3, 1, 2)
    out = []
    count = 0
    for rows, cols in block_sizes:
        maps = []
        for scale in scales[:-1]:
            k = scale // scales[0]
            maps.append(stitch(features[count : count + k * k], k, k))
            count += k * k
        maps.append(stitch(features[count : count + rows * cols], rows, cols))
        count += rows * cols
        size = maps[output_scale].shape[-2:]
        out.append(
            torch.cat(
                [
                    F.interpolate(m[None].to(torch.float32), size=size, mode="area")[0].to(m.dtype)
                    for m in maps
                ],
                dim=0,
            )
        )
    if count != features.shape[0]:
        raise ValueError(f"used {count} of {features.shape[0]} tiles")
    return out


# ---------------------------------------------------------------------------------------- forward


def ref_forward(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: Sequence[torch.Tensor],
    plans: Sequence[Any],
    *,
    num_prefix: int = 0,
    output_scale: int = -1,
    mode: str = "area",
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """One image at a time: reference tiles, the model on that image's tiles, reference merge."""
    maps, prefixes = [], []
    for image, plan in zip(images, plans, strict=True):
        feats = model(ref_tiles(image, plan, mean=mean, std=std))
        m, p = ref_merge(feats, [plan], num_prefix=num_prefix, output_scale=output_scale, mode=mode)
        maps.append(m[0])
        if p is not None:
            prefixes.append(p[0])
    return maps, (prefixes or None)


# ---------------------------------------------------------------------------------------- models


class TinyViT(nn.Module):
    """Patch embedding + a per-token MLP: ``[n, 3, t, t] → [n, P + (t/patch)², dim]`` tokens.

    The prefix tokens depend on the tile's content (mean and max of the patch tokens through their
    own projections), so averaging them over the wrong tiles shows. Every tile is processed
    independently of the others in its batch. ``maps=True`` returns ``[n, dim, t/patch, t/patch]``.
    """

    def __init__(self, dim: int = 5, patch: int = 4, num_prefix: int = 1, maps: bool = False):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.mlp = nn.Linear(dim, dim)
        self.heads = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_prefix))
        self.maps = maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.embed(x)
        tokens = fmap.flatten(2).transpose(1, 2)
        tokens = tokens + torch.tanh(self.mlp(tokens))
        if self.maps:
            side = fmap.shape[-1]
            return tokens.transpose(1, 2).unflatten(2, (side, side))
        pooled = [tokens.mean(dim=1), tokens.amax(dim=1)]
        prefix = [head(pooled[k % 2])[:, None] for k, head in enumerate(self.heads)]
        return torch.cat([*prefix, tokens], dim=1)


class Recorder:
    """Wraps a callable and records the batch size (and a copy of the input) of every call."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn
        self.calls: list[int] = []
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(x.shape[0]))
        self.inputs.append(x.detach().clone())
        return self.fn(x)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs: Any) -> TinyViT:
    torch.manual_seed(seed)
    return TinyViT(**kwargs).to(dtype).eval()


def random_images(
    sizes: Sequence[tuple[int, int]],
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    channels: int = 3,
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return [
            torch.randint(0, 256, (channels, h, w), generator=g, dtype=torch.uint8)
            for h, w in sizes
        ]
    return [torch.rand(channels, h, w, generator=g).to(dtype) for h, w in sizes]
