"""The S2-Wrapper README's Hugging Face CLIP example, run with dynamic_s2.

Part 1 is the README's "Making it multi-scale" code with one changed import:
``dynamic_s2.s2wrapper.forward`` is a drop-in for ``s2wrapper.forward``.

Part 2 does the same job with ``dynamic_s2.forward`` on a batch of photos of different sizes and
aspect ratios, without resizing them to one square first.

A small CLIPVisionModel with random weights stands in for ``openai/clip-vit-base-patch32`` (same
224-px input and 32-px patches, so the same 1 + 7x7 tokens per image), so the script runs offline
in seconds. With the real model use
``CLIPVisionModel.from_pretrained("openai/clip-vit-base-patch32")``.

Run: ``python examples/hf_clip_s2.py`` (needs transformers and Pillow).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

import dynamic_s2
from dynamic_s2.extract import read_image
from dynamic_s2.s2wrapper import forward as multiscale_forward

IMAGES = Path(__file__).resolve().parent / "images"
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def clip_preprocess(image: torch.Tensor) -> torch.Tensor:
    """What CLIP's image processor does: shortest side to 224, centre crop 224, normalise."""
    h, w = image.shape[-2:]
    scale = 224 / min(h, w)
    resized = dynamic_s2.resize(image.float() / 255, (round(h * scale), round(w * scale)))
    top, left = (resized.shape[-2] - 224) // 2, (resized.shape[-1] - 224) // 2
    crop = resized[:, top : top + 224, left : left + 224]
    return ((crop - CLIP_MEAN) / CLIP_STD)[None]  # [1, 3, 224, 224]


def main() -> None:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        image_size=224,
        patch_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    model = CLIPVisionModel(config).eval()
    inputs = clip_preprocess(read_image(IMAGES / "coffee.jpg"))

    # ---- Part 1: the README, with `from dynamic_s2.s2wrapper import forward` -----------------
    def forward_features(inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs).last_hidden_state

    with torch.no_grad():
        single = forward_features(inputs)
        # scales=[1, 2]; the output has one [CLS] token, so num_prefix_token=1.
        outputs = multiscale_forward(forward_features, inputs, scales=[1, 2], num_prefix_token=1)
    print(f"single scale:          {tuple(single.shape)}")  # README: 1*50*768
    print(f"s2wrapper drop-in:     {tuple(outputs.shape)}")  # README: 1*50*1536

    # ---- The same with dynamic_s2.forward ------------------------------------------------------
    # Scales are pixel sizes here. output_scale=0 resamples to the first scale's 7x7 grid, as S2
    # does (dynamic_s2's default, -1, keeps the largest scale's grid, as NVILA does). The model is
    # passed as it is: the HF adapter takes last_hidden_state and knows CLIP has one prefix token.
    # The inputs are normalised already (by CLIP's processor): mean=0, std=1 says so (float images
    # are otherwise read as [0, 1] and normalised with the backbone's mean and std).
    with torch.no_grad():
        out = dynamic_s2.forward(
            model, inputs, scales=(224, 448), output_scale=0, mean=0.0, std=1.0
        )
    tokens = out.features.flatten(1, 2)  # [1, 49, 128]
    print(
        f"dynamic_s2.forward:    features {tuple(out.features.shape)}, "
        f"prefix {tuple(out.prefix.shape)}"
    )
    c = config.hidden_size
    same_first = torch.equal(tokens[..., :c], outputs[:, 1:, :c])
    same_cls = torch.equal(out.prefix[..., :c], outputs[:, :1, :c])
    diff = (tokens[..., c:] - outputs[:, 1:, c:]).abs().max().item()
    print(f"  scale 224 channels and CLS equal the drop-in's: {same_first and same_cls}")
    print(
        f"  scale 448 channels differ by at most {diff:.3f}: dynamic_s2 resizes with "
        "antialias=True, the original S2-Wrapper without"
    )

    # ---- Part 2: mixed sizes, no square crop ---------------------------------------------------
    # uint8 images are normalised with the backbone's own mean and std (CLIP's). Without scales,
    # forward uses (t, 2t, 3t) from config.image_size: (224, 448, 672).
    names = ["coffee.jpg", "grace_hopper.jpg", "rocket_panorama.jpg", "page.png"]
    images = [read_image(IMAGES / name) for name in names]
    with torch.no_grad():
        out = dynamic_s2.forward(model, images)
    print(f"\nmixed batch, scales {[sp.scale for sp in out.plans[0].scales]}:")
    print(
        f"  features {tuple(out.features.shape)}  mask {tuple(out.mask.shape)}  "
        f"prefix {tuple(out.prefix.shape)}"
    )
    for name, image, plan, size in zip(names, images, out.plans, out.sizes, strict=True):
        h, w = image.shape[-2:]
        print(
            f"  {name:20s} {h:4d}x{w:<4d} grids {list(plan.grids)}  {plan.num_tiles:2d} tiles"
            f"  -> {size[0]}x{size[1]} tokens"
        )
    tokens, cu_seqlens = out.pack()
    print(f"  packed: tokens {tuple(tokens.shape)}, cu_seqlens {cu_seqlens.tolist()}")


if __name__ == "__main__":
    main()
