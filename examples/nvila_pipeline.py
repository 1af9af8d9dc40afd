"""NVILA's Dynamic-S2 vision pipeline, end to end and offline.

preprocess -> SigLIP (penultimate layer) -> merge -> 2x2 token packing, on the photos in
``examples/images``. The SigLIP here is an HF ``SiglipVisionModel`` built from a tiny random config
(448-pixel input, patch 14, so 32 x 32 tokens per tile like SigLIP-so400m-448, but 32 channels and
2 layers instead of 1152 and 27): the shapes and token counts are NVILA's, the features are noise.
Nothing is downloaded.

Run: ``python examples/nvila_pipeline.py [--torch] [--max-batch-tiles N]``.
``--torch`` feeds uint8 tensors (the fast torch path) instead of PIL images (NVILA's exact path).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import SiglipVisionConfig, SiglipVisionModel

from dynamic_s2 import encode_tiles, nvila, plan_tiles

IMAGES = Path(__file__).resolve().parent / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", action="store_true", help="use the uint8 tensor path")
    parser.add_argument("--max-batch-tiles", type=int, default=32)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = SiglipVisionConfig(
        image_size=448,
        patch_size=14,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    model = SiglipVisionModel(config).eval()
    side = config.image_size // config.patch_size  # 32 tokens per tile side

    paths = sorted(p for p in IMAGES.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    images: list = []
    for p in paths:
        with Image.open(p) as im:
            rgb = im.convert("RGB")
        images.append(torch.from_numpy(np.array(rgb)).permute(2, 0, 1) if args.torch else rgb)

    # 1. Preprocess: all tiles of all images, lowest scale first per image, and the block sizes.
    tiles, blocks = nvila.preprocess_batch(images)  # [T, 3, 448, 448], [(rows, cols), ...]

    # 2. Encode: SigLIP's penultimate layer (hidden_states[-2]), in chunks of tiles.
    with torch.inference_mode():
        feats = encode_tiles(model, tiles, max_batch_tiles=args.max_batch_tiles, feature_layer=-2)
    # feats: [T, 32 * 32, 32]

    # 3. Merge: per image [3 * 32, 32 * rows, 32 * cols]; 4. pack 2 x 2 blocks into tokens.
    merged = nvila.merge_features(feats, blocks)
    tokens, cu_seqlens = nvila.pack_tokens_batch(merged)

    path_name = "torch uint8 path" if args.torch else "PIL path (identical to NVILA)"
    print(f"{len(images)} photos, {path_name}; {tiles.shape[0]} tiles {tuple(tiles.shape[1:])}")
    print(f"SigLIP features {tuple(feats.shape)}; packed tokens {tuple(tokens.shape)}\n")
    print("| image | H x W | grids per scale | tiles | merged map | tokens | num_tokens |")
    print("|---|---|---|---|---|---|---|")
    for b, (p, block) in enumerate(zip(paths, blocks, strict=True)):
        h, w = images[b].shape[1:] if args.torch else (images[b].height, images[b].width)
        plan = plan_tiles(int(h), int(w), nvila.DEFAULT_SCALES, max_tiles=12, policy="nvila")
        if plan.scales[-1].grid != block:
            raise SystemExit(f"{p.name}: block size {block} differs from the plan's {plan.grids}")
        count = int(cu_seqlens[b + 1] - cu_seqlens[b])
        expected = nvila.num_tokens(block, tokens_per_tile_side=side)
        if count != expected:
            raise SystemExit(f"{p.name}: packed {count} tokens, num_tokens says {expected}")
        grids = ", ".join(f"{r}x{c}" for r, c in plan.grids)
        print(
            f"| {p.name} | {h} x {w} | {grids} | {plan.num_tiles} | {tuple(merged[b].shape)} "
            f"| {count} | {expected} |"
        )
    print(
        "\nEach image's tokens go to the projector (LayerNorm + MLP in NVILA) and then into the "
        "LLM, followed by one newline embedding per image (added on the LLM side)."
    )


if __name__ == "__main__":
    main()
