"""Images + plans → tiles: resize every image to each scale's content size and cut it into tiles.

The tile order is fixed: image-major, then scale ascending, then tiles in row-major order (NVILA's
order). All sizes come from the :class:`~dynamic_s2.plan.TilePlan`; nothing here recomputes them.
Work is grouped by (image size, content size), so equal-sized images are resized in one call and no
Python code runs per tile.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from . import _checks
from .plan import TilePlan

__all__ = ["TileBatch", "collate", "cut_grid", "resize", "tile_images", "tile_pil"]


def _check_size(size: object) -> tuple[int, int]:
    """``size`` as ``(h, w)`` of positive ints, or a ``TypeError`` / ``ValueError`` naming it."""
    return _checks.int_pair("size", size)


def resize(images: torch.Tensor, size: tuple[int, int], *, antialias: bool = True) -> torch.Tensor:
    """Bicubic resize of ``[..., C, H, W]`` images to ``size = (h, w)``.

    ``align_corners=False``. Float images are resized in float32 and cast back to their dtype.
    uint8 images on the CPU with ``antialias=True`` use torch's integer kernel (the way PIL
    resizes: faster, and the result is rounded to integers); elsewhere uint8 is resized in float32,
    rounded and clamped. ``antialias=True`` is the library's default; ``antialias=False`` is what
    the original S2-Wrapper used. An unchanged size returns the input as it is. Runs on the
    images' device.

    Examples:
        >>> x = torch.rand(2, 3, 40, 60)
        >>> resize(x, (20, 30)).shape
        torch.Size([2, 3, 20, 30])
        >>> resize(x, (40, 60)) is x
        True
        >>> resize(torch.zeros(3, 40, 60, dtype=torch.uint8), (20, 30)).dtype
        torch.uint8
    """
    size = _check_size(size)
    if not isinstance(images, torch.Tensor) or images.dim() < 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a [..., C, H, W] tensor, got {shape}")
    if tuple(images.shape[-2:]) == size:
        return images
    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    native = images.dtype == torch.uint8 and images.device.type == "cpu" and antialias
    if native:
        # channels_last is the layout torch's uint8 antialias kernel is fast in
        flat = flat.contiguous(memory_format=torch.channels_last)
    out = F.interpolate(
        flat if native else flat.float(),
        size=size,
        mode="bicubic",
        align_corners=False,
        antialias=antialias,
    )
    if images.dtype == torch.uint8 and not native:
        out = out.round_().clamp_(0, 255)
    out = out.to(images.dtype)
    return out.reshape(*lead, *out.shape[-3:]) if len(lead) != 1 else out


#: Rows (or columns) of a uint8 image widened to float32 at a time on the CPU, see
#: :func:`_resize_widened`; ``None`` widens the whole image at once (the former path, kept for
#: ``benchmarks/memory.py``).
_BAND = 256


def _resize_widened(
    src: torch.Tensor, size: tuple[int, int], widen: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``resize(widen(src), size)`` for uint8 ``src`` on the CPU, bit for bit, without ever holding
    a full-size float copy of ``src``.

    Torch's CPU antialiased bicubic is separable and resizes the width first: each row of the
    width pass depends on one input row only, so rows are widened and resized in bands, and the
    height pass runs on the (narrow) result. With the width unchanged, the height pass depends on
    one column only, so columns go in bands instead. ``widen`` is elementwise.
    """
    h, w = src.shape[-2:]
    if _BAND is None or src.device.type != "cpu" or (h, w) == size:
        return resize(widen(src), size)
    oh, ow = size
    if ow != w:
        wide = torch.empty((*src.shape[:-1], ow), dtype=torch.float32)
        for a, b in _bands(h, _BAND):
            band = widen(src[..., a:b, :])
            wide[..., a:b, :] = resize(band, (band.shape[-2], ow))
        return resize(wide, size)
    out = torch.empty((*src.shape[:-2], oh, w), dtype=torch.float32)
    for a, b in _bands(w, _BAND):
        band = widen(src[..., a:b])
        out[..., a:b] = resize(band, (oh, band.shape[-1]))
    return out


def _bands(n: int, band: int) -> list[tuple[int, int]]:
    """``[start, stop)`` bands of ``band`` (at least 2) lines covering ``n``: none one line wide,
    since torch's antialiased resize of a one-pixel-wide strip is not the strip of the whole."""
    band = max(band, 2)
    edges = [*range(0, n, band), n]
    if len(edges) > 2 and edges[-1] - edges[-2] < 2:
        del edges[-2]  # a last band of one line joins the one before
    return list(itertools.pairwise(edges))


def cut_grid(canvas: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Cut ``[B, C, R·th, Q·tw]`` canvases into ``[B, R·Q, C, th, tw]`` tiles, row-major.

    Examples:
        >>> canvas = torch.arange(16.).reshape(1, 1, 4, 4)
        >>> cut_grid(canvas, (2, 2))[0, 1, 0]
        tensor([[2., 3.],
                [6., 7.]])
    """
    rows, cols = grid
    return rearrange(canvas, "b c (r h) (q w) -> b (r q) c h w", r=rows, q=cols)


@dataclass(frozen=True)
class TileBatch:
    """All tiles of a batch of images, with their plans.

    Attributes:
        tiles: ``[T, C, t, t]``, image-major, then scale ascending, then row-major tiles.
        plans: one :class:`~dynamic_s2.plan.TilePlan` per image.

    Examples:
        >>> from dynamic_s2 import plan_tiles
        >>> batch = tile_images([torch.rand(3, 60, 80)], [plan_tiles(60, 80, (32, 64))])
        >>> batch.tiles.shape, batch.tile_counts
        (torch.Size([7, 3, 32, 32]), (7,))
    """

    tiles: torch.Tensor
    plans: tuple[TilePlan, ...]

    @property
    def tile_counts(self) -> tuple[int, ...]:
        """Number of tiles of each image."""
        return tuple(p.num_tiles for p in self.plans)

    def to(self, *args: object, **kwargs: object) -> TileBatch:
        """Move the tiles (``Tensor.to`` arguments); the plans stay as they are."""
        return TileBatch(self.tiles.to(*args, **kwargs), self.plans)  # type: ignore[call-overload]

    def pin_memory(self) -> TileBatch:
        """Pinned-memory copy of the tiles, for a DataLoader with ``pin_memory=True``."""
        return TileBatch(self.tiles.pin_memory(), self.plans)

    @classmethod
    def from_features(cls, features: Mapping[str, Any]) -> TileBatch:
        """The batch held by a mapping with ``pixel_values`` and ``plans`` (a ``BatchFeature``).

        This is what :class:`~dynamic_s2.hf.DynamicS2ImageProcessor` returns: ``pixel_values``
        ``[T, C, t, t]``, ``plans`` as :meth:`~dynamic_s2.plan.TilePlan.to_dict` dicts (or
        plans), and optionally ``num_patches``, the tiles of each image, checked against them.

        Raises:
            ValueError: a key is missing, or ``num_patches`` disagrees with the plans.

        Examples:
            >>> from dynamic_s2 import plan_tiles
            >>> plan = plan_tiles(60, 80, (32, 64))
            >>> features = {"pixel_values": torch.rand(7, 3, 32, 32), "plans": [plan.to_dict()]}
            >>> TileBatch.from_features(features).tile_counts
            (7,)
        """
        missing = [key for key in ("pixel_values", "plans") if key not in features]
        if missing:
            raise ValueError(
                f"features must hold pixel_values and plans (as DynamicS2ImageProcessor "
                f"returns them), missing {missing} in keys {sorted(features)}"
            )
        plans = tuple(
            p if isinstance(p, TilePlan) else TilePlan.from_dict(p) for p in features["plans"]
        )
        batch = cls(features["pixel_values"], plans)
        counts = features.get("num_patches")
        if counts is not None and [int(n) for n in counts] != list(batch.tile_counts):
            raise ValueError(
                f"features: num_patches {[int(n) for n in counts]} disagree with the plans' "
                f"tile counts {list(batch.tile_counts)}"
            )
        return batch


def collate(batches: Sequence[TileBatch]) -> TileBatch:
    """Concatenate several :class:`TileBatch` es, e.g. as a DataLoader ``collate_fn``.

    Examples:
        >>> from dynamic_s2 import plan_tiles
        >>> one = tile_images([torch.rand(3, 32, 32)], [plan_tiles(32, 32, (32,))])
        >>> collate([one, one]).tiles.shape
        torch.Size([2, 3, 32, 32])
    """
    if isinstance(batches, TileBatch):
        return batches
    if not isinstance(batches, Sequence) or isinstance(batches, str | bytes):
        raise TypeError(f"batches must be a sequence of TileBatch, got {type(batches).__name__}")
    if len(batches) == 0:
        raise ValueError("batches is empty: collate needs at least one TileBatch")
    first = batches[0]
    for i, b in enumerate(batches):
        if not isinstance(b, TileBatch):
            raise TypeError(f"batches[{i}] must be a TileBatch, got {type(b).__name__}")
        if b.tiles.shape[1:] != first.tiles.shape[1:]:
            raise ValueError(
                f"batches[{i}] has tiles of shape {tuple(b.tiles.shape[1:])}, batches[0] "
                f"{tuple(first.tiles.shape[1:])}: all must share channels and tile size"
            )
        if b.tiles.device != first.tiles.device or b.tiles.dtype != first.tiles.dtype:
            raise ValueError(
                f"batches[{i}] is {b.tiles.dtype} on {b.tiles.device}, batches[0] is "
                f"{first.tiles.dtype} on {first.tiles.device}: all must match"
            )
    plans = tuple(p for b in batches for p in b.plans)
    return TileBatch(torch.cat([b.tiles for b in batches]), plans)


#: What to do with an image that is not a tensor (a PIL image, a NumPy array, a path).
_NOT_A_TENSOR = (
    "; read files with dynamic_s2.extract.read_image(path), convert a PIL image with "
    "torchvision.transforms.functional.pil_to_tensor(img) and a [H, W, C] array with "
    "torch.from_numpy(a).permute(2, 0, 1), or use the HF processor "
    "(dynamic_s2.hf.DynamicS2ImageProcessor), which takes PIL images"
)


def _looks_channels_last(shape: Sequence[int]) -> bool:
    """``[H, W, C]``: a last dim of 1, 3 or 4 channels behind a first dim too large for channels."""
    return len(shape) == 3 and shape[-1] in (1, 3, 4) and shape[0] > 4


def _channels_last_hint(shape: Sequence[int]) -> str:
    if not _looks_channels_last(shape):
        return ""
    return "; it looks channels-last [H, W, C]: pass image.permute(2, 0, 1) ([C, H, W])"


def _as_image_list(images: object) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() == 4:
            return list(images.unbind(0))
        if images.dim() == 3:
            raise ValueError(
                f"images: a single tensor must be a [B, C, H, W] batch, got shape "
                f"{tuple(images.shape)}; wrap one [C, H, W] image in a list"
                + _channels_last_hint(images.shape)
            )
        raise ValueError(
            f"images must be a [B, C, H, W] tensor or a list of [C, H, W] tensors, got a "
            f"{images.dim()}-D tensor of shape {tuple(images.shape)}"
        )
    if not isinstance(images, Sequence) or isinstance(images, str | bytes):
        raise TypeError(
            f"images must be a [B, C, H, W] tensor or a list of [C, H, W] tensors, got "
            f"{type(images).__name__}" + _NOT_A_TENSOR
        )
    return list(images)


def check_images(images: object) -> list[torch.Tensor]:
    """Validate images (list of ``[C, H, W]`` or one ``[B, C, H, W]``) and return them as a list."""
    items = _as_image_list(images)
    if not items:
        raise ValueError("images is empty: give at least one image")
    first = items[0]
    for i, img in enumerate(items):
        if not isinstance(img, torch.Tensor):
            raise TypeError(
                f"images[{i}] must be a [C, H, W] torch.Tensor, got {type(img).__name__}"
                + _NOT_A_TENSOR
            )
        if img.dim() != 3:
            raise ValueError(
                f"images[{i}] must be [C, H, W], got shape {tuple(img.shape)} ({img.dim()}-D)"
            )
        if _looks_channels_last(img.shape):
            raise ValueError(
                f"images[{i}] must be [C, H, W], got shape {tuple(img.shape)}"
                + _channels_last_hint(img.shape)
            )
        if img.shape[1] == 0 or img.shape[2] == 0 or img.shape[0] == 0:
            raise ValueError(f"images[{i}] is empty: shape {tuple(img.shape)}")
        if img.shape[0] != first.shape[0]:
            raise ValueError(
                f"images must all have the same number of channels: images[0] has "
                f"{first.shape[0]}, images[{i}] has {img.shape[0]}"
            )
        if img.device != first.device:
            raise ValueError(
                f"images must all be on one device: images[0] is on {first.device}, "
                f"images[{i}] on {img.device}"
            )
        if img.dtype != first.dtype:
            raise ValueError(
                f"images must all have one dtype: images[0] is {first.dtype}, "
                f"images[{i}] is {img.dtype}"
            )
        if img.dtype != torch.uint8 and not img.is_floating_point():
            raise TypeError(f"images must be uint8 or floating point, got {img.dtype}")
    return items


def check_plans(plans: object, images: Sequence[torch.Tensor]) -> tuple[TilePlan, ...]:
    """Validate one plan per image, each made for that image's size."""
    if isinstance(plans, TilePlan):
        plans = [plans] * len(images) if len(images) == 1 else [plans]
    if not isinstance(plans, Sequence) or isinstance(plans, str | bytes):
        raise TypeError(
            f"plans must be a TilePlan or a sequence of them, got {type(plans).__name__}"
        )
    if len(plans) != len(images):
        raise ValueError(f"got {len(plans)} plans for {len(images)} images: give one per image")
    for i, (p, img) in enumerate(zip(plans, images, strict=True)):
        if not isinstance(p, TilePlan):
            raise TypeError(f"plans[{i}] must be a TilePlan, got {type(p).__name__}")
        if p.image_size != (img.shape[-2], img.shape[-1]):
            raise ValueError(
                f"plans[{i}] was made for an image of size {p.image_size}, but images[{i}] is "
                f"{(img.shape[-2], img.shape[-1])} (h, w)"
            )
    for name in ("tile_size", "halo"):
        values = {getattr(p, name) for p in plans}
        if len(values) > 1:
            raise ValueError(f"plans must share one {name}, got {sorted(values)}")
    return tuple(plans)


def _normalise_floats(
    items: Sequence[torch.Tensor], scale: torch.Tensor, shift: torch.Tensor
) -> Sequence[torch.Tensor]:
    """Float images in ``[0, 1]`` normalised with the uint8 affine ``(scale, shift)`` (times 255),
    in float32 (resizing computes in float32 too; the tiles keep the input dtype), before the
    resize. Unchanged, and not range-checked, when the normalisation is the identity."""
    if bool((scale.cpu() == 1.0 / 255.0).all() and (shift.cpu() == 0.0).all()):
        return items
    _check_float_range(items)
    scale, shift = scale.to(items[0].device) * 255.0, shift.to(items[0].device)
    return [torch.addcmul(shift, img.to(torch.float32), scale) for img in items]


def _affine(
    mean: Sequence[float] | float | None,
    std: Sequence[float] | float | None,
    channels: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with ``x / 255`` then ``(x - mean) / std`` written as ``x * a + b``: the
    normalisation of uint8 images (float images, already in ``[0, 1]``, use ``255 · a``)."""
    stats = []
    for name, value, default in (("mean", mean, 0.0), ("std", std, 1.0)):
        checked = _checks.stats(name, value, channels)
        vals = checked if isinstance(checked, tuple) else (default if checked is None else checked,)
        stats.append(torch.tensor(vals, dtype=torch.float32).expand(channels).reshape(-1, 1, 1))
    m, s = stats
    return 1.0 / (255.0 * s), -m / s


#: Values a float image may take: ``[0, 1]`` with room for the overshoot of a bicubic resize.
FLOAT_RANGE: tuple[float, float] = (-0.25, 1.25)


def _check_float_range(items: Sequence[torch.Tensor]) -> None:
    """``ValueError`` for a float CPU image outside :data:`FLOAT_RANGE` (0..255 values, or
    values normalised already), which normalising again would silently spoil. GPU images are not
    read (that would wait for the device)."""
    for i, img in enumerate(items):
        if img.is_floating_point() and img.device.type == "cpu" and img.numel():
            low, high = (float(v) for v in torch.aminmax(img))
            if low < FLOAT_RANGE[0] or high > FLOAT_RANGE[1]:
                raise ValueError(
                    f"images[{i}] is a float image with values in [{low:.3g}, {high:.3g}]; float "
                    "images are read as [0, 1] and normalised with mean and std (as uint8 ones "
                    "after / 255): pass uint8, or divide by 255, or, for images normalised "
                    "already, mean=0.0, std=1.0"
                )


def tile_images(
    images: torch.Tensor | Sequence[torch.Tensor],
    plans: TilePlan | Sequence[TilePlan],
    *,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    pad_value: float = 0.0,
    uint8_resize: bool = False,
) -> TileBatch:
    """Resize each image to every scale of its plan and cut it into tiles.

    Args:
        images: a list of ``[C, H, W]`` tensors of any sizes, or a ``[B, C, H, W]`` tensor.
            One rule for every entry point of the library: uint8 images are divided by 255, float
            images are taken to be in ``[0, 1]`` already, and both are then normalised with
            ``mean`` and ``std`` (``(x - mean) / std``) when those are given. Float CPU images
            outside ``[-0.25, 1.25]`` raise ``ValueError`` unless ``mean`` and ``std`` are
            left out (or 0 and 1): that is how images normalised already are passed.
        plans: one :class:`~dynamic_s2.plan.TilePlan` per image (made for that image's size).
        mean: per-channel mean, on the ``[0, 1]`` scale.
        std: per-channel standard deviation, on the ``[0, 1]`` scale.
        pad_value: value of the canvas outside the content (``fit="pad"``), after normalisation.
        uint8_resize: resize uint8 images in uint8 and normalise afterwards (see :func:`resize`:
            on the CPU this is torch's integer kernel, which resizes the way PIL does and is
            several times faster, at the price of rounding to integers before normalising).

    Each image is resized to the content size of every scale (bicubic, antialias, align_corners
    False, computed in float32 and cast back), placed at the top-left of the canvas and cut into
    tiles. With a ``halo`` in the plans, the canvas is padded by ``halo`` pixels of ``pad_value``
    on every side and tiles of ``plan.input_size`` are cut every ``plan.tile_size`` pixels, so
    neighbouring tiles overlap by ``2·halo``. Output dtype: float32 for uint8 input, the input
    dtype otherwise; on the input device. Float images are normalised before the resize (which is
    linear), so the padding of ``fit="pad"`` is ``pad_value`` after normalisation, as for uint8.
    On the CPU a uint8 image is never widened to float32 whole: it is normalised and resized in
    bands of rows (or columns), with results identical to widening it whole.

    Returns:
        A :class:`TileBatch` with tiles ordered image-major, scale ascending, row-major.

    Examples:
        >>> from dynamic_s2 import plan_tiles
        >>> imgs = [torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)]
        >>> batch = tile_images(imgs, [plan_tiles(60, 80, (32, 64))], mean=0.5, std=0.5)
        >>> batch.tiles.shape, batch.tiles.dtype
        (torch.Size([7, 3, 32, 32]), torch.float32)
    """
    items = check_images(images)
    plan_list = check_plans(plans, items)
    scale, shift = _affine(mean, std, items[0].shape[0])
    if isinstance(pad_value, bool) or not isinstance(pad_value, int | float):
        raise TypeError(f"pad_value must be a number, got {pad_value!r}")
    return _tile(items, plan_list, scale, shift, float(pad_value), bool(uint8_resize))


def _tile(
    items: Sequence[torch.Tensor],
    plan_list: tuple[TilePlan, ...],
    scale: torch.Tensor,
    shift: torch.Tensor,
    pad_value: float,
    uint8_resize: bool,
) -> TileBatch:
    """:func:`tile_images` on checked arguments (the chain calls this directly)."""
    channels = items[0].shape[0]
    uint8 = items[0].dtype == torch.uint8
    widen_first = uint8 and not uint8_resize  # normalised before the resize (in float32)
    out_dtype = torch.float32 if uint8 else items[0].dtype
    device = items[0].device
    t, halo = plan_list[0].tile_size, plan_list[0].halo
    side = t + 2 * halo  # the cut tile: the plan's input_size
    if not uint8:  # read off the host tensors, before they move
        items = _normalise_floats(items, scale, shift)
    scale, shift = scale.to(device), shift.to(device)

    def normalise(x: torch.Tensor) -> torch.Tensor:  # uint8 -> normalised float32, one pass
        return torch.addcmul(shift, x.to(torch.float32), scale)

    # Host arithmetic: the first tile index of every (image, scale), and groups of equal work:
    # images of one size are stacked once, then resized together per (content size, grid).
    starts: list[list[int]] = []
    offset = 0
    for p in plan_list:
        starts.append(
            [offset + sum(sp.num_tiles for sp in p.scales[:i]) for i in range(len(p.scales))]
        )
        offset += p.num_tiles
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for b, p in enumerate(plan_list):
        by_size[p.image_size].append(b)

    tiles = torch.empty((offset, channels, side, side), dtype=out_dtype, device=device)
    for members in by_size.values():
        stack = (
            items[members[0]][None]
            if len(members) == 1
            else torch.stack([items[b] for b in members])
        )
        if widen_first and device.type != "cpu":  # resize is linear: normalising first is
            stack = normalise(stack)  # equivalent; on the CPU it is done in bands, per resize
        elif uint8 and uint8_resize and device.type == "cpu":  # the layout torch's uint8
            stack = stack.contiguous(memory_format=torch.channels_last)  # kernel wants, once
        work: dict[tuple[tuple[int, int], tuple[int, int]], list[tuple[int, int]]]
        work = defaultdict(list)
        for row, b in enumerate(members):
            for si, sp in enumerate(plan_list[b].scales):
                work[(sp.content_size, sp.grid)].append((row, starts[b][si]))
        for (content, grid), jobs in work.items():
            rows = [row for row, _ in jobs]
            src = stack if rows == list(range(stack.shape[0])) else stack[rows]
            if widen_first and device.type == "cpu":
                resized = _resize_widened(src, content, normalise)
            else:
                resized = resize(src, content)
            ch, cw = grid[0] * t, grid[1] * t
            if content != (ch, cw) or halo:
                if resized.dtype == torch.uint8:
                    resized = normalise(resized)
                right, bottom = cw - content[1] + halo, ch - content[0] + halo
                resized = F.pad(resized, (halo, right, halo, bottom), value=pad_value)
            # [G, C, R*t, Q*t] -> [G, R, Q, C, t, t] as a view (with a halo: overlapping windows
            # of side t + 2*halo every t pixels); one pass writes (and, for uint8, normalises) it
            # into the tiles.
            g = resized.shape[0]
            if halo:
                cut = resized.unfold(2, side, t).unfold(3, side, t).permute(0, 2, 3, 1, 4, 5)
            else:
                cut = resized.view(g, channels, grid[0], t, grid[1], t).permute(0, 2, 4, 1, 3, 5)
            n = grid[0] * grid[1]
            if g == 1:
                dst_view = tiles[jobs[0][1] : jobs[0][1] + n].view(1, *grid, channels, side, side)
                if resized.dtype == torch.uint8:
                    dst_view.copy_(cut).mul_(scale).add_(shift)  # faster than a strided addcmul
                else:
                    dst_view.copy_(cut)
                continue
            values = normalise(cut) if resized.dtype == torch.uint8 else cut
            dst = torch.tensor([start for _, start in jobs], device=device)
            dst = (dst[:, None] + torch.arange(n, device=device)).reshape(-1)
            tiles.index_copy_(0, dst, values.reshape(-1, channels, side, side).to(out_dtype))
    return TileBatch(tiles, plan_list)


def tile_pil(image: Any, plan: TilePlan) -> torch.Tensor:
    """The PIL kernel: resize a PIL image to every scale of ``plan`` with PIL and cut it into tiles.

    Each scale is resized with ``Image.resize`` to the scale's content size (PIL's default filter,
    bicubic for RGB, as NVILA does), placed at the top-left of a zero canvas and cut row-major.
    The image must be RGB. Output: ``[plan.num_tiles, 3, t, t]`` uint8 on the CPU; normalising is
    the caller's.

    Examples:
        >>> from PIL import Image
        >>> from dynamic_s2 import plan_tiles
        >>> tile_pil(Image.new("RGB", (80, 60)), plan_tiles(60, 80, (32, 64))).shape
        torch.Size([7, 3, 32, 32])
    """
    t, halo = plan.tile_size, plan.halo
    tiles = torch.zeros((plan.num_tiles, 3, plan.input_size, plan.input_size), dtype=torch.uint8)
    start = 0
    for sp in plan.scales:
        content_h, content_w = sp.content_size
        resized = np.asarray(image.resize((content_w, content_h)), dtype=np.uint8)
        ch, cw = sp.canvas_size
        canvas = torch.zeros((1, 3, ch + 2 * halo, cw + 2 * halo), dtype=torch.uint8)
        canvas[0, :, halo : halo + content_h, halo : halo + content_w] = torch.from_numpy(
            resized.copy()
        ).permute(2, 0, 1)
        cut = canvas.unfold(2, sp.input_size, t).unfold(3, sp.input_size, t)[0]
        tiles[start : start + sp.num_tiles] = cut.permute(1, 2, 0, 3, 4).flatten(0, 1)
        start += sp.num_tiles
    return tiles
