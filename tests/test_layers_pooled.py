"""Several backbone layers at once (``feature_layer`` as a sequence), one pooled vector per image.

Multi-layer features are checked against the model's own ``hidden_states`` (HF) or
``forward_intermediates`` (timm: a stand-in with timm's interface here, the real thing where timm
is installed); ``pooled()`` against the mean of ``unpad()`` and of the padded features under the
mask.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _deps import need
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dynamic_s2 import MultiScaleFeatures, S2Options, as_backbone, forward, merge, plan_tiles

SCALES = (32, 64)


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 40, 70, generator=g), torch.rand(3, 64, 30, generator=g)]


# --------------------------------------------------------------------------- feature_layer


def test_options_take_one_layer_or_several() -> None:
    assert S2Options(feature_layer=-2).feature_layer == -2
    assert S2Options(feature_layer=[-4, -1]).feature_layer == (-4, -1)
    with pytest.raises(ValueError, match="feature_layer"):
        S2Options(feature_layer=[])
    with pytest.raises(ValueError, match="feature_layer"):
        S2Options(feature_layer=[-1, 1.5])
    with pytest.raises(TypeError, match="feature_layer"):
        S2Options(feature_layer="-2")
    with pytest.raises(TypeError, match="feature_layer"):
        S2Options(feature_layer=True)
    assert S2Options(feature_layer=(-2, -1)).to_config()["feature_layer"] == [-2, -1]


def _siglip() -> nn.Module:
    transformers = need("transformers")
    config = transformers.SiglipVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
    )
    torch.manual_seed(0)
    return transformers.SiglipVisionModel(config).eval()


@pytest.mark.parametrize("layers", [(-2, -1), (1, -4, 2), (-2,)])
def test_hf_layers_are_hidden_states_concatenated_in_order(layers: tuple[int, ...]) -> None:
    model = _siglip()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states
        got = as_backbone(model, feature_layer=layers)(x)
    torch.testing.assert_close(got, torch.cat([hidden[i] for i in layers], dim=-1))


def test_channel_layout_is_scale_major_then_layer() -> None:
    """forward's channels: for each scale ascending, each layer in the order given."""
    model = _siglip()
    with torch.no_grad():
        both = forward(model, _images(), SCALES, feature_layer=[-1, -3])
        last = forward(model, _images(), SCALES, feature_layer=-1)
        first = forward(model, _images(), SCALES, feature_layer=-3)
    c = 16
    parts = []
    for s in range(len(SCALES)):
        parts += [last.tokens[:, s * c : (s + 1) * c], first.tokens[:, s * c : (s + 1) * c]]
    torch.testing.assert_close(both.tokens, torch.cat(parts, dim=1))
    assert both.channels == len(SCALES) * 2 * c


class _TimmLike(nn.Module):
    """timm's interface: forward_features (tokens with a CLS) and forward_intermediates (maps)."""

    num_prefix_tokens = 1

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Conv2d(3 if i == 0 else 4, 4, 1) for i in range(3)])
        self.patch = nn.AvgPool2d(8)

    def _maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, y = [], self.patch(x)
        for block in self.blocks:
            y = block(y)
            out.append(y)
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        y = self._maps(x)[-1].flatten(2).transpose(1, 2)
        return torch.cat([y.mean(1, keepdim=True), y], dim=1)

    def forward_intermediates(
        self, x: torch.Tensor, indices: Any = None, intermediates_only: bool = False
    ) -> list[torch.Tensor]:
        maps = self._maps(x)
        return [maps[i] for i in indices]


def test_timm_interface_layers_from_forward_intermediates() -> None:
    model = _TimmLike()
    x = torch.rand(2, 3, 32, 32)
    backbone = as_backbone(model, feature_layer=(0, -1))
    maps = model._maps(x)
    torch.testing.assert_close(backbone(x), torch.cat([maps[0], maps[-1]], dim=1))
    assert backbone.num_prefix_tokens is None  # maps: timm drops the prefix tokens
    out = forward(model, _images(), SCALES, feature_layer=[0, -1])
    assert out.channels == 2 * 2 * 4 and out.prefix is None
    assert as_backbone(model).num_prefix_tokens == 1  # without feature_layer: unchanged


def test_timm_layers_of_different_sizes_are_refused() -> None:
    model = _TimmLike()
    model.forward_intermediates = lambda x, indices, intermediates_only: [  # type: ignore[method-assign]
        torch.zeros(1, 4, 4, 4),
        torch.zeros(1, 4, 2, 2),
    ]
    with pytest.raises(ValueError, match="feature_layer"):
        as_backbone(model, feature_layer=(0, 1))(torch.zeros(1, 3, 32, 32))


@pytest.mark.timm_torchvision
def test_real_timm_vit_layers() -> None:
    timm = need("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0
    ).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        got = as_backbone(model, feature_layer=(-2, -1))(x)
        maps = model.forward_intermediates(x, indices=[-2, -1], intermediates_only=True)
        out = forward(model, _images(), SCALES, feature_layer=(-2, -1))
    torch.testing.assert_close(got, torch.cat(maps, dim=1))
    assert out.channels == 2 * 2 * model.embed_dim


def test_feature_layer_still_refused_for_plain_callables() -> None:
    with pytest.raises(ValueError, match="feature_layer"):
        as_backbone(lambda x: x, feature_layer=(-2, -1))


# -------------------------------------------------------------------------------- pooled()


def _merged(prefix: int, dtype: torch.dtype = torch.float32) -> MultiScaleFeatures:
    plans = [plan_tiles(40, 70, SCALES), plan_tiles(64, 30, SCALES), plan_tiles(32, 32, SCALES)]
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(sum(p.num_tiles for p in plans), prefix + 16, 5, generator=g)
    return merge(feats.to(dtype), plans, num_prefix_tokens=prefix)


@settings(max_examples=20)
@given(prefix=st.integers(0, 2), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_pooled_is_the_mean_of_each_unpadded_map(prefix: int, dtype: torch.dtype) -> None:
    out = _merged(prefix, dtype)
    pooled = out.pooled()
    assert pooled.shape == (len(out), out.channels) and pooled.dtype == dtype
    expected = torch.stack([m.mean(dim=(0, 1)) for m in out.unpad()])
    torch.testing.assert_close(pooled, expected)
    # the same as the masked mean of the padded view
    mask = out.mask[..., None].to(dtype)
    masked = (out.features * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2))
    torch.testing.assert_close(pooled, masked)


def test_pooled_with_prefix_counts_each_prefix_token_as_a_cell() -> None:
    out = _merged(prefix=2)
    assert out.prefix is not None
    expected = torch.stack(
        [
            torch.cat([m.reshape(-1, out.channels), out.prefix[i]]).mean(dim=0)
            for i, m in enumerate(out.unpad())
        ]
    )
    torch.testing.assert_close(out.pooled(include_prefix=True), expected)
    with pytest.raises(ValueError, match="include_prefix"):
        _merged(prefix=0).pooled(include_prefix=True)
    with pytest.raises(TypeError, match="include_prefix"):
        out.pooled(include_prefix=1)  # type: ignore[arg-type]


def test_pooled_half_precision_and_gradients() -> None:
    out = _merged(prefix=0)
    half = MultiScaleFeatures(out.tokens.half(), out.sizes, out.plans).pooled()
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), out.pooled(), atol=2e-3, rtol=2e-3)
    tokens = out.tokens.clone().requires_grad_(True)
    MultiScaleFeatures(tokens, out.sizes, out.plans).pooled().sum().backward()
    assert tokens.grad is not None
    counts = torch.tensor([h * w for h, w in out.sizes]).repeat_interleave(
        torch.tensor([h * w for h, w in out.sizes])
    )
    torch.testing.assert_close(tokens.grad, (1.0 / counts)[:, None].expand_as(tokens).float())
