"""Pictures of tiling plans and feature maps.

Two kinds of picture help when tuning multi-scale tiling:

- :func:`draw_plan` shows an image at every scale of a :class:`~dynamic_s2.plan.TilePlan`, with
  the tile grid drawn over it and the padding shaded when ``fit="pad"``;
- :func:`draw_features` shows the first three principal components of a feature map as RGB
  (:func:`pca_rgb`), once per scale and once for the merged multi-scale map.

Matplotlib, Pillow and NumPy are imported only when a function needs them. They come with the
``demo`` extra: ``pip install "dynamic_s2[demo]"``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import _checks
from ._images import to_chw_tensor
from ._optional import require
from .plan import TilePlan

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["draw_features", "draw_plan", "pca_rgb"]

# Longest side, in pixels, of the image shown in one panel of a plan picture. The grid itself is
# drawn in canvas coordinates, so this only limits the work of resizing very large scales.
_PANEL_PIXELS = 768
# Percentiles used to normalise each principal component to [0, 255]; robust to a few outliers.
_PCA_PERCENTILES = (1.0, 99.0)
# Rows used to fit the principal components of a large map (all rows are projected).
_PCA_MAX_FIT_ROWS = 4096
# How the padding of a fit="pad" canvas is shaded in plan pictures.
_PAD_STYLE: dict[str, Any] = {
    "facecolor": "0.55",
    "edgecolor": "0.35",
    "hatch": "//",
    "alpha": 0.75,
    "linewidth": 0,
}


def _to_uint8_hwc(image: Any, name: str = "image") -> np.ndarray:
    """A PIL image, NumPy array or torch tensor as a uint8 ``[H, W, 3]`` NumPy array.

    Float images are taken to be in ``[0, 1]``.
    """
    chw = to_chw_tensor(image, name).detach().cpu()
    if chw.is_floating_point():
        chw = (chw.float().clamp(0, 1) * 255).round()
    return np.ascontiguousarray(chw.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def _check_plan(plan: object) -> TilePlan:
    if not isinstance(plan, TilePlan):
        raise TypeError(f"plan: expected a TilePlan, got {type(plan).__name__}")
    return plan


def _save(fig: Figure, path: str | os.PathLike[str] | None, dpi: int) -> None:
    if path is None:
        return
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path or None, got {type(path).__name__}")
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")


def draw_plan(
    image: Any,
    plan: TilePlan,
    path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
    dpi: int = 100,
) -> Figure:
    """Draw an image at every scale of ``plan`` with the tile grid over it, side by side.

    Each panel shows the canvas of one scale (``rows * tile`` by ``cols * tile`` pixels) with the
    image resized into its content box, the tile boundaries in yellow and, when the plan uses
    ``fit="pad"``, the padding shaded in grey. Panel widths are proportional to the canvas widths,
    so larger scales look larger. The panel titles give the scale, the grid and the tile count.

    Args:
        image: the image the plan was made for: a PIL image, a NumPy array ``[H, W]`` or
            ``[H, W, 3]`` (uint8, or float in ``[0, 1]``) or a torch tensor ``[C, H, W]``.
            Its size must equal ``plan.image_size`` (``ValueError`` otherwise: a plan made
            for another size would be drawn over the wrong picture).
        plan: the plan to draw, from :func:`dynamic_s2.plan_tiles`.
        path: where to save the picture (format from the suffix, e.g. ``.png``), or ``None``
            to only return the figure.
        title: a title over all panels; by default the image size and total tile count.
        dpi: resolution used when saving.

    Returns:
        The Matplotlib figure (not attached to pyplot; it needs no display).

    Examples:
        >>> import numpy as np, dynamic_s2
        >>> from dynamic_s2.viz import draw_plan
        >>> image = np.zeros((300, 500, 3), dtype=np.uint8)
        >>> plan = dynamic_s2.plan_tiles(300, 500, (224, 448), fit="pad")
        >>> fig = draw_plan(image, plan)
        >>> len(fig.axes) == len(plan.scales)
        True
    """
    plan = _check_plan(plan)
    _checks.positive_int("dpi", dpi)
    pil_image = require("PIL.Image", "demo")
    figure_module = require("matplotlib.figure", "demo")
    patches = require("matplotlib.patches", "demo")

    array = _to_uint8_hwc(image)
    if tuple(array.shape[:2]) != plan.image_size:
        raise ValueError(
            f"image is {array.shape[0]}x{array.shape[1]} (HxW) but plan was made for an image of "
            f"{plan.image_size[0]}x{plan.image_size[1]}: plan the image itself, e.g. "
            "plan_tiles(h, w, scales)"
        )
    source = pil_image.fromarray(array)
    widths = [sp.canvas_size[1] for sp in plan.scales]
    heights = [sp.canvas_size[0] for sp in plan.scales]
    # Figure size: panels side by side at a common pixel scale, at most 4 inches tall and
    # 20 inches wide in all.
    inch_per_px = min(4.0 / max(heights), 20.0 / sum(widths))
    fig_w = max(3.0, sum(widths) * inch_per_px + 0.3 * len(widths))
    fig_h = max(heights) * inch_per_px + 0.9
    fig = figure_module.Figure(figsize=(fig_w, fig_h), layout="constrained")
    axes = fig.subplots(1, len(plan.scales), width_ratios=widths, squeeze=False)[0]
    for ax, sp in zip(axes, plan.scales, strict=True):
        rows, cols = sp.grid
        canvas_h, canvas_w = sp.canvas_size
        content_h, content_w = sp.content_size
        tile = sp.tile_size
        # Render the canvas at a bounded resolution; coordinates below stay in canvas pixels.
        shrink = min(1.0, _PANEL_PIXELS / max(canvas_h, canvas_w))
        view_h = max(1, round(canvas_h * shrink))
        view_w = max(1, round(canvas_w * shrink))
        view_ch = max(1, round(content_h * shrink))
        view_cw = max(1, round(content_w * shrink))
        canvas = np.full((view_h, view_w, 3), 255, dtype=np.uint8)
        resized = source.resize((view_cw, view_ch), pil_image.Resampling.BICUBIC)
        canvas[: min(view_ch, view_h), : min(view_cw, view_w)] = np.asarray(resized)[
            :view_h, :view_w
        ]
        ax.imshow(canvas, extent=(0, canvas_w, canvas_h, 0), interpolation="antialiased")
        if content_w < canvas_w:  # padding on the right
            ax.add_patch(
                patches.Rectangle((content_w, 0), canvas_w - content_w, canvas_h, **_PAD_STYLE)
            )
        if content_h < canvas_h:  # padding below
            ax.add_patch(
                patches.Rectangle(
                    (0, content_h), min(content_w, canvas_w), canvas_h - content_h, **_PAD_STYLE
                )
            )
        line_width = 1.5
        for r in range(rows + 1):
            ax.axhline(r * tile, color="yellow", linewidth=line_width)
        for c in range(cols + 1):
            ax.axvline(c * tile, color="yellow", linewidth=line_width)
        ax.set_xlim(0, canvas_w)
        ax.set_ylim(canvas_h, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        noun = "tile" if sp.num_tiles == 1 else "tiles"
        ax.set_title(
            f"{sp.scale} px: {rows}×{cols} grid, {sp.num_tiles} {noun}\n"
            f"canvas {canvas_h}×{canvas_w}",
            fontsize=9,
        )
    if title is None:
        h, w = plan.image_size
        title = (
            f"image {h}×{w} (h×w), policy={plan.policy}, fit={plan.fit}, "
            f"tile {plan.tile_size} px, {plan.num_tiles} tiles in all"
        )
    fig.suptitle(title, fontsize=10)
    _save(fig, path, dpi)
    return fig


def _top_components(x: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` leading right singular vectors of ``x`` ``[N, C]``, as rows ``[k, C]``.

    Small matrices get an exact SVD. Larger ones (a merged map has thousands of channels) use a
    randomized range finder with a fixed seed and a few power iterations, orthonormalised through
    the eigen-decomposition of a tiny Gram matrix: only products with ``x`` and ``(k+8)²``
    eigen-problems, far cheaper than a full SVD (and than LAPACK QR on a busy multi-threaded BLAS),
    and accurate to well below a colour level for 3 components.
    """
    n, c = x.shape
    if min(n, c) <= 64:
        return np.linalg.svd(x, full_matrices=False)[2][:k]

    def orthonormal(y: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh(y.T @ y)
        w = np.maximum(w, max(float(w.max()), 1e-300) * 1e-12)
        return y @ (v / np.sqrt(w))

    rng = np.random.default_rng(0)
    q = orthonormal(x @ rng.standard_normal((c, k + 8)))  # [N, k + 8]
    for _ in range(4):
        q = orthonormal(x @ (x.T @ q))
    b = q.T @ x  # [k + 8, C]: x projected on its dominant subspace
    w, u = np.linalg.eigh(b @ b.T)
    order = np.argsort(w)[::-1][:k]
    return (u[:, order].T @ b) / np.sqrt(np.maximum(w[order], 1e-300))[:, None]


def pca_rgb(features: Any) -> np.ndarray:
    """The first three principal components of a feature map, as an RGB picture.

    The cells of ``features`` are centred, projected on their three main principal components
    (computed in float64), and each component is normalised robustly to ``[0, 255]``: values
    below its 1st and above its 99th percentile are clipped. The sign of each component is fixed
    so that its largest loading is positive, which makes the colours reproducible. Maps with
    fewer than three channels or cells fill the missing components with mid-grey.

    Args:
        features: ``[h, w, C]`` features, a torch tensor (any dtype or device) or NumPy array.

    Returns:
        A uint8 NumPy array ``[h, w, 3]``.

    Examples:
        >>> import torch
        >>> from dynamic_s2.viz import pca_rgb
        >>> rgb = pca_rgb(torch.randn(6, 8, 16))
        >>> rgb.shape, rgb.dtype.name
        ((6, 8, 3), 'uint8')
    """
    if hasattr(features, "detach") and hasattr(features, "cpu"):
        array = features.detach().cpu().float().numpy()
    elif isinstance(features, np.ndarray):
        array = features
    else:
        raise TypeError(
            f"features: expected a torch tensor or NumPy array [h, w, C], "
            f"got {type(features).__name__}"
        )
    if array.ndim != 3:
        raise ValueError(f"features: expected shape [h, w, C], got shape {tuple(array.shape)}")
    h, w, c = array.shape
    if h == 0 or w == 0 or c == 0:
        raise ValueError(f"features: expected a non-empty map, got shape {tuple(array.shape)}")
    x = array.reshape(h * w, c).astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError("features: the map contains NaN or infinite values")
    x = x - x.mean(axis=0, keepdims=True)
    out = np.full((h * w, 3), 127.5)
    k = min(3, c, h * w)
    if k > 0:
        fit = x
        if fit.shape[0] > _PCA_MAX_FIT_ROWS:  # an even subsample of the cells fits the components
            step = fit.shape[0] / _PCA_MAX_FIT_ROWS
            fit = fit[(np.arange(_PCA_MAX_FIT_ROWS) * step).astype(np.int64)]
        components = _top_components(fit, k)  # [k, C]
        largest = np.argmax(np.abs(components), axis=1)
        signs = np.sign(components[np.arange(k), largest])
        signs[signs == 0] = 1.0
        projected = (x @ components.T) * signs  # [N, k]
        low, high = np.percentile(projected, _PCA_PERCENTILES, axis=0)
        span = high - low
        flat = span <= 1e-12 * max(1.0, float(np.abs(projected).max()))
        span = np.where(flat, 1.0, span)
        scaled = np.clip((projected - low) / span, 0.0, 1.0) * 255.0
        scaled[:, flat] = 127.5
        out[:, :k] = scaled
    return np.round(out).astype(np.uint8).reshape(h, w, 3)


def draw_features(
    features: Any,
    path: str | os.PathLike[str] | None = None,
    *,
    scales: TilePlan | Sequence[int] | None = None,
    image: Any = None,
    title: str | None = None,
    dpi: int = 100,
) -> Figure:
    """Draw PCA pictures of a merged multi-scale feature map: one per scale and one merged.

    A merged map (one entry of ``MultiScaleFeatures.unpad()``) has its scales concatenated along
    channels, ``C_total = S * C``. This splits the channels into ``S`` chunks of ``C``, draws
    :func:`pca_rgb` of each chunk (the features of one scale, resampled to the common grid) and
    of the whole map, and optionally the image itself first.

    Args:
        features: ``[h, w, C_total]`` features, a torch tensor or NumPy array.
        path: where to save the picture, or ``None`` to only return the figure.
        scales: the plan the features came from, or the list of scales (used for the count and
            the panel titles). ``None`` treats the map as a single scale and draws it once.
        image: the input image (PIL, NumPy ``[H, W, 3]`` or tensor ``[C, H, W]``), drawn first.
        title: a title over all panels.
        dpi: resolution used when saving.

    Returns:
        The Matplotlib figure (not attached to pyplot).

    Examples:
        >>> import torch
        >>> from dynamic_s2.viz import draw_features
        >>> fig = draw_features(torch.randn(7, 10, 24), scales=(224, 448, 672))
        >>> [ax.get_title() for ax in fig.axes]
        ['224 px', '448 px', '672 px', 'merged (3 scales)']
    """
    _checks.positive_int("dpi", dpi)
    if isinstance(scales, TilePlan):
        scale_list = [sp.scale for sp in scales.scales]
    elif scales is None:
        scale_list = []
    elif isinstance(scales, Sequence) and not isinstance(scales, (str, bytes)):
        scale_list = list(scales)
        if not scale_list or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in scale_list
        ):
            raise ValueError(
                f"scales: expected a TilePlan or a non-empty sequence of positive ints, "
                f"got {scales!r}"
            )
    else:
        raise TypeError(
            f"scales: expected a TilePlan, a sequence of ints or None, got {type(scales).__name__}"
        )
    shape = tuple(getattr(features, "shape", ()))
    if len(shape) != 3:
        raise ValueError(f"features: expected shape [h, w, C_total], got shape {shape}")
    num_scales = len(scale_list)
    c_total = int(shape[2])
    if num_scales > 1 and c_total % num_scales:
        raise ValueError(
            f"features: {c_total} channels cannot be split into {num_scales} scales "
            f"(scales={scale_list})"
        )
    figure_module = require("matplotlib.figure", "demo")

    panels: list[tuple[str, Any]] = []
    if image is not None:
        panels.append(("image", _to_uint8_hwc(image)))
    if num_scales > 1:
        c = c_total // num_scales
        for i, s in enumerate(scale_list):
            panels.append((f"{s} px", pca_rgb(features[:, :, i * c : (i + 1) * c])))
        panels.append((f"merged ({num_scales} scales)", pca_rgb(features)))
    else:
        label = f"{scale_list[0]} px" if scale_list else "features"
        panels.append((label, pca_rgb(features)))

    h, w = int(shape[0]), int(shape[1])
    aspect = min(6.0, max(1 / 6.0, w / h))
    # Panels in a row, or in a column for wide maps; the longer panel side is 3.2 inches.
    panel_w, panel_h = (3.2, 3.2 / aspect) if aspect >= 1 else (3.2 * aspect, 3.2)
    n = len(panels)
    rows, cols = (n, 1) if aspect >= 2 else (1, n)
    fig = figure_module.Figure(
        figsize=(panel_w * cols + 0.3, (panel_h + 0.35) * rows + 0.5), layout="constrained"
    )
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (label, picture) in zip(axes, panels, strict=True):
        ax.imshow(picture, interpolation="nearest" if label != "image" else "antialiased")
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title is None:
        title = f"first 3 principal components as RGB, feature grid {h}×{w}, {c_total} channels"
    fig.suptitle(title, fontsize=10)
    _save(fig, path, dpi)
    return fig
