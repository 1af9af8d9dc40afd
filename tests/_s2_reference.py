"""A plain, independent reference of S2-Wrapper's ``forward``, used by ``test_s2wrapper.py``.

Written from the documented facts of bfshi/scaling_on_scales (``s2wrapper/core.py`` and
``s2wrapper/utils.py`` on ``master`` and on the never-merged ``dev_any_shape`` branch) as restated
in issue 4, deliberately slow and simple, and sharing no code with ``dynamic_s2``: the only tools
used are ``torch`` indexing, ``torch.cat`` / ``torch.stack`` and ``F.interpolate``. Every tile is
cut, every model batch is assembled and every feature tile is put back with an explicit loop.

Master semantics (square input, ``split_mode`` not given):

- sizes are ``img_sizes`` or ``int(H * scale)``; ``max_split_size`` defaults to ``H``;
- per size ``n = ceil(size / max_split_size)``; the image is resized with bicubic interpolation
  (``align_corners=False``, no antialias) in float32 and cast back, then cut into ``n × n`` tiles
  of side ``size / n``;
- tile ``(i, j)`` of image ``b`` goes to position ``(i * n + j) * B + b`` of the model batch;
- one model call per scale, or calls on consecutive chunks of ``B`` tiles with ``split_forward``;
- ``"bnc"``: the first ``num_prefix_token`` tokens are prefix tokens, the rest a square grid;
- the per-scale maps are stitched, area-resampled (float32, cast back) to the stitched size of
  scale ``resize_output_to_idx`` and concatenated on channels; prefix tokens are averaged over each
  image's tiles, concatenated over scales on channels and put in front.

Any-shape semantics (non-square input, ``(h, w)`` sizes, or ``split_mode`` given):

- sizes are ``(int(H * s), int(W * s))``; the grid is ``ceil(h / mss) × ceil(w / mss)`` and every
  tile is ``mss × mss``;
- ``"resize"``: a second bicubic resize to the padded size, and the stitched features are used as
  they are; ``"pad"``: zero padding at the bottom and right, and the stitched features are cropped
  to ``ceil(size / padded * feature_size)`` per axis (the original's float arithmetic).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor], torch.Tensor]


def _bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize, computed in float32 and cast back, as the original does."""
    out = F.interpolate(x.to(torch.float32), size=size, mode="bicubic", align_corners=False)
    return out.to(x.dtype)


def _area(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area resize of one ``[C, h, w]`` map, computed in float32 and cast back."""
    out = F.interpolate(x[None].to(torch.float32), size=size, mode="area")
    return out[0].to(x.dtype)


def _run_model(model: Model, tiles: list[torch.Tensor], batch: int, split: bool) -> torch.Tensor:
    """Call ``model`` on the stacked tiles, once or on consecutive chunks of ``batch`` tiles."""
    stacked = torch.stack(tiles)
    if not split:
        return model(stacked)
    outs = []
    start = 0
    while start < stacked.shape[0]:
        outs.append(model(stacked[start : start + batch]))
        start += batch
    return torch.cat(outs)


def reference_forward(
    model: Model,
    images: torch.Tensor,
    scales: Sequence[float] | None = None,
    img_sizes: Sequence[int] | Sequence[tuple[int, int]] | None = None,
    max_split_size: int | None = None,
    resize_output_to_idx: int = 0,
    num_prefix_token: int = 0,
    output_shape: str = "bnc",
    split_forward: bool = False,
    split_mode: str | None = None,
) -> torch.Tensor:
    """S2-Wrapper's ``forward`` (master, or dev_any_shape when it applies), as plain loops."""
    batch, _, height, width = images.shape
    any_shape = (
        height != width
        or split_mode is not None
        or (img_sizes is not None and isinstance(img_sizes[0], tuple))
    )
    mode = split_mode or "resize"
    mss = max_split_size or height

    # Per scale: the target size, the grid (rows, cols) and the tile side (th, tw).
    targets: list[tuple[int, int]] = []
    if img_sizes is not None:
        for s in img_sizes:
            targets.append(s if isinstance(s, tuple) else (s, s))
    else:
        assert scales is not None
        for sc in scales:
            if any_shape:
                targets.append((int(height * sc), int(width * sc)))
            else:
                targets.append((int(height * sc), int(height * sc)))

    per_scale_maps: list[list[torch.Tensor]] = []  # [scale][image] stitched [C, h, w]
    per_scale_prefix: list[list[torch.Tensor]] = []  # [scale][image] mean prefix [P, C]
    for th_tw in targets:
        h, w = th_tw
        if any_shape:
            rows, cols = math.ceil(h / mss), math.ceil(w / mss)
            tile_h = tile_w = mss
            resized = _bicubic(images, (h, w))
            padded = (rows * mss, cols * mss)
            if mode == "resize":
                canvas = _bicubic(resized, padded)
            else:
                canvas = torch.zeros(
                    (batch, images.shape[1], *padded), dtype=resized.dtype, device=resized.device
                )
                canvas[:, :, :h, :w] = resized
        else:
            rows = cols = math.ceil(h / mss)
            assert h % rows == 0
            tile_h = tile_w = h // rows
            canvas = _bicubic(images, (h, w))
            padded = (h, w)

        # Position-major, batch-minor: tile (i, j) of image b at (i * cols + j) * batch + b.
        tiles: list[torch.Tensor] = []
        for i in range(rows):
            for j in range(cols):
                for b in range(batch):
                    ys, xs = i * tile_h, j * tile_w
                    tiles.append(canvas[b, :, ys : ys + tile_h, xs : xs + tile_w])
        out = _run_model(model, tiles, batch, split_forward)

        # Per tile: a [C, gh, gw] map and, for tokens, a [P, C] prefix.
        tile_maps: list[torch.Tensor] = []
        tile_prefix: list[torch.Tensor] = []
        for t in range(out.shape[0]):
            if output_shape == "bnc":
                tokens = out[t]
                tile_prefix.append(tokens[:num_prefix_token])
                grid_tokens = tokens[num_prefix_token:]
                side = math.isqrt(grid_tokens.shape[0])
                assert side * side == grid_tokens.shape[0]
                fmap = torch.empty(
                    (grid_tokens.shape[1], side, side), dtype=out.dtype, device=out.device
                )
                for r in range(side):
                    for c in range(side):
                        fmap[:, r, c] = grid_tokens[r * side + c]
                tile_maps.append(fmap)
            else:
                tile_maps.append(out[t])

        gh, gw = tile_maps[0].shape[1:]
        stitched_per_image: list[torch.Tensor] = []
        prefix_per_image: list[torch.Tensor] = []
        for b in range(batch):
            full = torch.empty(
                (tile_maps[0].shape[0], rows * gh, cols * gw), dtype=out.dtype, device=out.device
            )
            own_prefix = []
            for i in range(rows):
                for j in range(cols):
                    index = (i * cols + j) * batch + b
                    full[:, i * gh : (i + 1) * gh, j * gw : (j + 1) * gw] = tile_maps[index]
                    if output_shape == "bnc":
                        own_prefix.append(tile_prefix[index])
            if any_shape and mode == "pad":
                keep_h = math.ceil(h / padded[0] * full.shape[1])
                keep_w = math.ceil(w / padded[1] * full.shape[2])
                full = full[:, :keep_h, :keep_w]
            stitched_per_image.append(full)
            if output_shape == "bnc":
                prefix_per_image.append(torch.stack(own_prefix).mean(dim=0))
        per_scale_maps.append(stitched_per_image)
        per_scale_prefix.append(prefix_per_image)

    out_size = tuple(per_scale_maps[resize_output_to_idx][0].shape[1:])
    results = []
    for b in range(batch):
        resampled = [_area(per_scale_maps[s][b], out_size) for s in range(len(targets))]
        merged = torch.cat(resampled, dim=0)  # [S*C, H, W]
        if output_shape == "bchw":
            results.append(merged)
            continue
        tokens = merged.permute(1, 2, 0).reshape(-1, merged.shape[0])  # raster order
        if num_prefix_token > 0:
            prefix = torch.cat([per_scale_prefix[s][b] for s in range(len(targets))], dim=-1)
            tokens = torch.cat([prefix, tokens], dim=0)
        results.append(tokens)
    return torch.stack(results)
