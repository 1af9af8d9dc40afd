"""timm backbones with dynamic_s2: a ViT with register tokens and a ResNet.

The timm adapter calls ``model.forward_features`` and reads from the model what it declares: the
prefix token count (``num_prefix_tokens``: class token plus registers) and the normalisation and
input size of ``pretrained_cfg``. A ViT gives ``[T, N, C]`` tokens, a ConvNet ``[T, C, h, w]``
maps; ``merge`` tells them apart by their rank.

Small random-weight models keep this offline and fast. With real weights use
``timm.create_model(NAME, pretrained=True)`` or ``dynamic_s2.load_backbone("timm:NAME")``, and leave
out ``scales`` to get ``(t, 2t, 3t)`` from the model's ``pretrained_cfg["input_size"]``.

Run: ``python examples/timm_backbone.py`` (needs timm; exits with a message when it is missing).
"""

from __future__ import annotations

import sys

import torch

import dynamic_s2

try:
    import timm
except ImportError:
    print("timm is not installed: pip install timm  (skipping the timm example)")
    sys.exit(0)


def main() -> None:
    torch.manual_seed(0)
    images = [torch.rand(3, 90, 160), torch.rand(3, 128, 128), torch.rand(3, 200, 70)]

    # A ViT with 4 register tokens, built for 64-px tiles of 16-px patches: 1 + 4 + 4x4 tokens.
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=64, reg_tokens=4, num_classes=0
    ).eval()
    backbone = dynamic_s2.as_backbone(vit)
    print(f"ViT: {backbone.name}, num_prefix_tokens={backbone.num_prefix_tokens}")
    with torch.no_grad():
        out = dynamic_s2.forward(vit, images, scales=(64, 128))
    print(
        f"  features {tuple(out.features.shape)}, prefix {tuple(out.prefix.shape)}, "
        f"grids {out.sizes}"
    )

    # A ConvNet: forward_features gives [T, 512, t/32, t/32] maps, no prefix tokens.
    resnet = timm.create_model("resnet18", pretrained=False).eval()
    with torch.no_grad():
        out = dynamic_s2.forward(resnet, images, scales=(128, 256))
    print(
        f"ResNet-18: features {tuple(out.features.shape)}, prefix {out.prefix}, grids {out.sizes}"
    )
    print(f"  mask counts {out.mask.sum(dim=(1, 2)).tolist()}")


if __name__ == "__main__":
    main()
