"""Pictures of tiling plans for the docs' "Tiling plans" page.

Each figure shows one image planned with several policies and fits. A row is one plan; its scales
are drawn side by side at their true relative size (one tile is one square of the grid): the image
resized into the canvas as the tiler would (stretched to the canvas, or aspect-preserved at the
top-left with the padding hatched), and the tile grid over it.

- ``docs/img/plan_landscape.png``: a 3:2 landscape photo (``examples/images/coffee.jpg``);
- ``docs/img/plan_receipt.png``: a tall 1:3.6 receipt, drawn here (there is no real receipt among
  the example images);
- ``docs/img/plan_panorama_pad.png``: a 4:1 panorama (``examples/images/rocket_panorama.jpg``)
  under ``fit="pad"``;
- ``docs/img/plan_batch_budgets.png``: one batch of four images planned by ``plan_batch`` at
  three tile budgets (all the tiles the per-image plans want, then about 70% and 40% of them).

Run from the repository root (needs matplotlib and Pillow)::

    python benchmarks/draw_plan_figures.py

The drawing is done here with matplotlib directly, independently of ``dynamic_s2.viz``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dynamic_s2 import plan_batch  # noqa: E402
from dynamic_s2.budget import plan_cost  # noqa: E402
from dynamic_s2.plan import TilePlan, plan_tiles  # noqa: E402

SCALES = (448, 896, 1344)
OUT = ROOT / "docs" / "img"
GAP = 320  # canvas pixels between two scales of a row
BATCH_GAP = 640  # wider in the batch figure, whose small canvases carry the same labels
DOWNSAMPLE = 4  # the resized image is drawn at 1/4 of its canvas resolution (enough for a figure)


def log_aspect_error(h: int, w: int, grid: tuple[int, int]) -> float:
    rows, cols = grid
    return abs(math.log((cols * h) / (rows * w)))


def draw_row(
    ax: plt.Axes,
    image: Image.Image,
    plan: TilePlan,
    title: str,
    height: int | None = None,
    gap: int = GAP,
) -> None:
    """One plan: every scale's canvas, side by side, with the image and the tile grid."""
    t = plan.tile_size
    x0 = 0
    heights = []
    for sp in plan.scales:
        ch, cw = sp.canvas_size
        hc, wc = sp.content_size
        heights.append(ch)
        # canvas background: padding, hatched
        ax.add_patch(
            Rectangle((x0, 0), cw, ch, facecolor="0.92", edgecolor="0.5", hatch="///", lw=0.0)
        )
        small = image.resize(
            (max(1, wc // DOWNSAMPLE), max(1, hc // DOWNSAMPLE)), Image.Resampling.BICUBIC
        )
        ax.imshow(
            np.asarray(small), extent=(x0, x0 + wc, hc, 0), interpolation="bilinear", zorder=2
        )
        rows, cols = sp.grid
        for r in range(rows + 1):
            ax.plot([x0, x0 + cw], [r * t, r * t], color="tab:red", lw=1.0, zorder=3)
        for c in range(cols + 1):
            ax.plot([x0 + c * t, x0 + c * t], [0, ch], color="tab:red", lw=1.0, zorder=3)
        h, w = plan.image_size
        err = log_aspect_error(h, w, sp.grid)
        label = f"{sp.scale} px: {rows}×{cols} = {sp.num_tiles}"
        label += (
            f"\nerror {err:.2f}" if plan.fit == "stretch" else f"\npadded {sp.padded_fraction:.0%}"
        )
        ax.text(x0 + cw / 2, ch + 70, label, ha="center", va="top", fontsize=7.5)
        x0 += cw + gap
    ax.set_xlim(-40, x0 - gap + 40)
    ax.set_ylim(max(heights) + 420 if height is None else height + 420, -40)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=9, loc="left")


def figure(
    image: Image.Image,
    rows: Sequence[tuple[str, str]],
    path: Path,
    suptitle: str,
    width: float,
    side_by_side: bool = False,
) -> None:
    """One row per plan, or (``side_by_side``, for tall images) one column per plan."""
    h, w = image.height, image.width
    plans = [plan_tiles(h, w, SCALES, policy=p, fit=f) for p, f in rows]  # type: ignore[arg-type]
    canvas_h = [max(sp.canvas_size[0] for sp in plan.scales) + 460 for plan in plans]
    canvas_w = [sum(sp.canvas_size[1] + GAP for sp in plan.scales) for plan in plans]
    if side_by_side:
        scale = width / sum(canvas_w)
        fig, axes = plt.subplots(
            1,
            len(plans),
            figsize=(width, max(canvas_h) * scale + 1.0),
            gridspec_kw={"width_ratios": canvas_w},
            dpi=110,
        )
    else:
        scale = width / max(canvas_w)
        fig, axes = plt.subplots(
            len(plans),
            1,
            figsize=(width, sum(canvas_h) * scale + 0.6),
            gridspec_kw={"height_ratios": canvas_h},
            dpi=110,
        )
    sep = "\n" if side_by_side else " "
    for ax, plan, (policy, fit) in zip(np.atleast_1d(axes), plans, rows, strict=True):
        errs = [log_aspect_error(h, w, sp.grid) for sp in plan.scales]
        what = (
            f"mean |log aspect error| {sum(errs) / len(errs):.3f}"
            if fit == "stretch"
            else f"mean padded {sum(sp.padded_fraction for sp in plan.scales) / len(errs):.0%}"
        )
        title = f'policy="{policy}", fit="{fit}":{sep}{plan.num_tiles} tiles, {what}'
        draw_row(ax, image, plan, title, max(canvas_h) - 460 if side_by_side else None)
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97 if not side_by_side else 0.95))
    save(fig, path)


def save(fig: plt.Figure, path: Path) -> None:
    """Save and close ``fig``, then requantise the PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    # A 256-colour palette keeps the photo panels readable at a fraction of the file size.
    with Image.open(path) as drawn:
        small = drawn.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    print(f"wrote {path.relative_to(ROOT)}")


def batch_figure(images: Sequence[tuple[str, Image.Image]], path: Path, width: float) -> None:
    """One row per budget, one column per image: ``plan_batch``'s plans of one batch."""
    sizes = [(img.height, img.width) for _, img in images]
    total = sum(plan_tiles(h, w, SCALES).num_tiles for h, w in sizes)
    budgets = [total, round(0.7 * total), round(0.4 * total)]
    rows = [plan_batch(sizes, SCALES, tile_budget=b) for b in budgets]
    col_w = [
        max(sum(p[i].scales[j].canvas_size[1] + BATCH_GAP for j in range(3)) for p in rows)
        for i in range(len(images))
    ]
    row_h = max(max(sp.canvas_size[0] for sp in p.scales) for plans in rows for p in plans) + 460
    scale = width / sum(col_w)
    fig, axes = plt.subplots(
        len(budgets),
        len(images),
        figsize=(width, len(budgets) * row_h * scale + 1.2),
        gridspec_kw={"width_ratios": col_w},
        dpi=110,
        squeeze=False,
    )
    for r, (budget, plans) in enumerate(zip(budgets, rows, strict=True)):
        used = sum(p.num_tiles for p in plans)
        for c, ((name, img), plan) in enumerate(zip(images, plans, strict=True)):
            title = f"{name}: {plan.num_tiles} tiles, cost {plan_cost(plan):.2f}"
            if c == 0:
                title = f"tile_budget={budget} (uses {used})\n" + title
            draw_row(axes[r][c], img, plan, title, row_h - 460, BATCH_GAP)
    fig.suptitle(
        f"One batch of {len(images)} images planned by plan_batch at three budgets, "
        "scales 448/896/1344",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    save(fig, path)


def receipt(width: int = 560, height: int = 2000) -> Image.Image:
    """A plain till receipt, 1:3.6, drawn with Pillow's default font."""
    img = Image.new("RGB", (width, height), (250, 249, 244))
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=34)
        big = ImageFont.load_default(size=52)
    except TypeError:  # Pillow < 10.1: one fixed size
        font = big = ImageFont.load_default()
    y = 60
    draw.text((width // 2, y), "CORNER CAFE", fill=(20, 20, 20), font=big, anchor="mt")
    y += 110
    for line in ("12 Harbour Road", "Tel 0123 456 789", "25/11/2026   08:42"):
        draw.text((width // 2, y), line, fill=(60, 60, 60), font=font, anchor="mt")
        y += 52
    y += 40
    items = [
        ("Flat white", 3.40),
        ("Espresso", 2.20),
        ("Croissant", 2.80),
        ("Pain au choc.", 3.10),
        ("Orange juice", 3.90),
        ("Granola bowl", 6.50),
        ("Banana bread", 3.20),
        ("Tea (pot)", 2.90),
        ("Muffin", 2.60),
        ("Sparkling water", 1.90),
        ("Bagel, salmon", 7.40),
        ("Extra shot", 0.60),
        ("Oat milk", 0.40),
        ("Cookie", 1.80),
    ]
    for name, price in items:
        draw.text((40, y), name, fill=(20, 20, 20), font=font)
        draw.text((width - 40, y), f"{price:.2f}", fill=(20, 20, 20), font=font, anchor="ra")
        y += 62
    y += 20
    draw.line((40, y, width - 40, y), fill=(40, 40, 40), width=3)
    y += 30
    total = sum(p for _, p in items)
    draw.text((40, y), "TOTAL", fill=(0, 0, 0), font=big)
    draw.text((width - 40, y), f"{total:.2f}", fill=(0, 0, 0), font=big, anchor="ra")
    y += 110
    for line in ("CARD  **** 4242", "Thank you!", "See you soon"):
        draw.text((width // 2, y), line, fill=(60, 60, 60), font=font, anchor="mt")
        y += 60
    # a barcode
    rng = np.random.default_rng(7)
    x = 80
    while x < width - 80:
        bar = int(rng.integers(2, 9))
        draw.rectangle((x, y + 20, x + bar, y + 150), fill=(20, 20, 20))
        x += bar + int(rng.integers(3, 9))
    return img


def main() -> None:
    images = ROOT / "examples" / "images"
    photo = Image.open(images / "coffee.jpg").convert("RGB")
    figure(
        photo,
        [("nvila", "stretch"), ("aspect", "stretch"), ("aspect", "pad")],
        OUT / "plan_landscape.png",
        f"A 3:2 landscape photo ({photo.width}×{photo.height}), scales 448/896/1344",
        width=9.0,
    )
    slip = receipt()
    figure(
        slip,
        [("nvila", "stretch"), ("aspect", "stretch"), ("aspect", "pad")],
        OUT / "plan_receipt.png",
        f"A 1:3.6 receipt ({slip.width}×{slip.height}), scales 448/896/1344",
        width=11.0,
        side_by_side=True,
    )
    pano = Image.open(images / "rocket_panorama.jpg").convert("RGB")
    figure(
        pano,
        [("nvila", "pad"), ("aspect", "pad")],
        OUT / "plan_panorama_pad.png",
        f'A 4:1 panorama ({pano.width}×{pano.height}), fit="pad", scales 448/896/1344',
        width=9.0,
    )
    page = Image.open(images / "page.png").convert("RGB")
    batch_figure(
        [("photo", photo), ("receipt", slip), ("panorama", pano), ("page", page)],
        OUT / "plan_batch_budgets.png",
        width=14.0,
    )


if __name__ == "__main__":
    main()
