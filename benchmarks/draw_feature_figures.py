"""Feature-map pictures for the docs' "Forward and merge" page.

Runs the pretrained EfficientNet-Lite0 (``dynamic_s2.load_backbone("efficientnet-lite0")``, offline)
through ``dynamic_s2.forward`` on two example photos at scales (224, 448, 672) and draws, with
``dynamic_s2.viz.draw_features``, the first three principal components of each scale's features
(resampled to the common grid) and of the merged map as RGB:

- ``docs/img/features_rocket.png``: a 3:2 landscape photo (``examples/images/rocket.jpg``);
- ``docs/img/features_panorama.png``: a 4:1 panorama (``examples/images/rocket_panorama.jpg``).

Run from the repository root (needs the ``demo`` extra)::

    python benchmarks/draw_feature_figures.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dynamic_s2  # noqa: E402
from dynamic_s2.extract import read_image  # noqa: E402
from dynamic_s2.viz import draw_features  # noqa: E402

SCALES = (224, 448, 672)
OUT = ROOT / "docs" / "img"
FIGURES = {"rocket.jpg": "features_rocket.png", "rocket_panorama.jpg": "features_panorama.png"}


def main() -> None:
    backbone = dynamic_s2.load_backbone("efficientnet-lite0")
    names = list(FIGURES)
    images = [read_image(ROOT / "examples" / "images" / name) for name in names]
    with torch.inference_mode():
        out = dynamic_s2.forward(backbone, images, scales=SCALES, max_batch_tiles=16)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, image, plan, features in zip(names, images, out.plans, out.unpad(), strict=True):
        path = OUT / FIGURES[name]
        grids = ", ".join(f"{r}×{c}" for r, c in plan.grids)
        title = (
            f"{name} ({image.shape[1]}×{image.shape[2]}): EfficientNet-Lite0, grids {grids}, "
            f"merged {features.shape[0]}×{features.shape[1]}×{features.shape[2]}"
        )
        draw_features(features, path, scales=plan, image=image, title=title)
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
