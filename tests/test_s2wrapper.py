"""``dynamic_s2.s2wrapper.forward`` against an independent reference of S2-Wrapper (issue 4).

The reference (``tests/_s2_reference.py``) is a plain loop over tiles written from the documented
facts of bfshi/scaling_on_scales; it shares no code with the library. The tests compare the two over
hypothesis-drawn calls, reproduce the seed README's examples, run a Hugging Face CLIP vision model
built from a tiny config, check with a BatchNorm model in training mode that the backbone sees the
same batches in the same order, and check every argument error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _deps import need
from _s2_reference import reference_forward
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from dynamic_s2.s2wrapper import forward as multiscale_forward

TOL = {"atol": 1e-5, "rtol": 1e-5}


# ---------------------------------------------------------------------------------------------
# Tiny backbones
# ---------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """A ViT-like patch embedding: ``[T, C, s, s] -> [T, P + (s // patch)**2, dim]`` tokens.

    Prefix tokens depend on the tile's content (a mean and a max over the patch tokens, each through
    its own projection), so averaging them over the wrong tiles would show.
    """

    def __init__(self, dim: int = 6, patch: int = 2, num_prefix: int = 0, maps: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.heads = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_prefix))
        self.maps = maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.conv(x)
        if self.maps:
            return fmap
        tokens = fmap.flatten(2).transpose(1, 2)
        pooled = [tokens.mean(dim=1), tokens.amax(dim=1)]
        prefix = [head(pooled[k % 2])[:, None] for k, head in enumerate(self.heads)]
        return torch.cat([*prefix, tokens], dim=1)


class PooledEmbed(nn.Module):
    """A cheap stand-in for a big ViT: average-pool each patch, then a linear layer to ``dim``."""

    def __init__(self, dim: int, patch: int, cls_token: bool = False):
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(3, dim)
        self.cls = nn.Linear(3, dim) if cls_token else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(F.avg_pool2d(x, self.patch).flatten(2).transpose(1, 2))
        if self.cls is None:
            return tokens
        return torch.cat([self.cls(x.mean(dim=(2, 3)))[:, None], tokens], dim=1)


def _make_model(dtype: torch.dtype, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    return PatchEmbed(**kwargs).to(dtype).eval()


def _images(batch: int, height: int, width: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator).to(dtype)


def _both(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, **kwargs: Any):
    """The library's and the reference's outputs for the same call."""
    with torch.no_grad():
        return multiscale_forward(model, x, **kwargs), reference_forward(model, x, **kwargs)


# ---------------------------------------------------------------------------------------------
# Hypothesis: master semantics
# ---------------------------------------------------------------------------------------------


@st.composite
def master_calls(draw: st.DrawFn) -> dict[str, Any]:
    """Square-input calls that master accepts (sizes divisible by their split)."""
    patch = draw(st.sampled_from([1, 2]))
    side = draw(st.integers(2, 14))
    n_scales = draw(st.integers(1, 3))
    kwargs: dict[str, Any] = {}
    if draw(st.booleans()):
        # img_sizes: choose max_split_size, then per scale a split n and a tile side t with
        # ceil(n * t / mss) == n, i.e. (n - 1) * mss < n * t <= n * mss.
        mss = draw(st.integers(max(patch, 2), 12))
        sizes = []
        for _ in range(n_scales):
            n = draw(st.integers(1, 3))
            low = max(patch, (n - 1) * mss // n + 1)
            sizes.append(n * draw(st.integers(low, mss)))
        kwargs["img_sizes"] = sizes
        if mss != side or draw(st.booleans()):
            kwargs["max_split_size"] = mss
        else:
            kwargs["max_split_size"] = None
    else:
        scales = draw(
            st.lists(
                st.sampled_from([0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3]),
                min_size=n_scales,
                max_size=n_scales,
            )
        )
        mss = draw(st.sampled_from([None, side, max(patch, side // 2), side + 1]))
        effective = mss or side
        for s in scales:
            size = int(side * s)
            assume(size > 0)
            n = math.ceil(size / effective)
            assume(size % n == 0 and size // n >= patch)
        kwargs["scales"] = scales
        kwargs["max_split_size"] = mss
    return _finish_case(draw, kwargs, n_scales, side, side, patch)


def _finish_case(
    draw: st.DrawFn, kwargs: dict[str, Any], n_scales: int, height: int, width: int, patch: int
) -> dict[str, Any]:
    """The arguments both semantics share: output layout, prefix, split_forward, batch, dtype."""
    output_shape = draw(st.sampled_from(["bnc", "bchw"]))
    kwargs.update(
        resize_output_to_idx=draw(st.integers(-n_scales, n_scales - 1)),
        num_prefix_token=draw(st.integers(0, 2)) if output_shape == "bnc" else 0,
        output_shape=output_shape,
        split_forward=draw(st.booleans()),
    )
    return {
        "batch": draw(st.integers(1, 3)),
        "height": height,
        "width": width,
        "patch": patch,
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "kwargs": kwargs,
    }


def _check_against_reference(case: dict[str, Any]) -> None:
    kwargs = case["kwargs"]
    model = _make_model(
        case["dtype"],
        patch=case["patch"],
        num_prefix=kwargs["num_prefix_token"],
        maps=kwargs["output_shape"] == "bchw",
    )
    x = _images(case["batch"], case["height"], case["width"], case["dtype"])
    ours, ref = _both(model, x, **kwargs)
    assert ours.shape == ref.shape
    assert ours.dtype == ref.dtype == case["dtype"]
    torch.testing.assert_close(ours, ref, **TOL)


@given(master_calls())
def test_master_matches_reference(case: dict[str, Any]) -> None:
    _check_against_reference(case)


# ---------------------------------------------------------------------------------------------
# Hypothesis: any-shape semantics
# ---------------------------------------------------------------------------------------------


@st.composite
def any_shape_calls(draw: st.DrawFn) -> dict[str, Any]:
    """Calls that follow dev_any_shape: non-square input, (h, w) sizes, or split_mode given."""
    patch = draw(st.sampled_from([1, 2]))
    height = draw(st.integers(2, 14))
    width = draw(st.integers(2, 14))
    mss = draw(st.integers(max(2, patch), 8))
    n_scales = draw(st.integers(1, 3))
    split_mode = draw(st.sampled_from([None, "resize", "pad"]))
    kwargs: dict[str, Any] = {"max_split_size": mss, "split_mode": split_mode}
    how = draw(st.sampled_from(["scales", "tuples", "ints"]))
    if how == "scales":
        scales = draw(
            st.lists(
                st.sampled_from([0.5, 0.75, 1, 1.5, 2, 2.5]), min_size=n_scales, max_size=n_scales
            )
        )
        for s in scales:
            assume(int(height * s) > 0 and int(width * s) > 0)
        kwargs["scales"] = scales
        assume(height != width or split_mode is not None)
    elif how == "tuples":
        kwargs["img_sizes"] = [
            (draw(st.integers(1, 24)), draw(st.integers(1, 24))) for _ in range(n_scales)
        ]
    else:
        kwargs["img_sizes"] = [draw(st.integers(1, 24)) for _ in range(n_scales)]
        assume(height != width or split_mode is not None)
    return _finish_case(draw, kwargs, n_scales, height, width, patch)


@given(any_shape_calls())
def test_any_shape_matches_reference(case: dict[str, Any]) -> None:
    _check_against_reference(case)


# ---------------------------------------------------------------------------------------------
# Hand-picked cases
# ---------------------------------------------------------------------------------------------


def test_master_tiles_can_be_smaller_than_max_split_size() -> None:
    # 20 px at max_split_size 12: a 2 x 2 grid of 10 px tiles (master never pads or re-resizes).
    seen: list[tuple[int, ...]] = []
    model = _make_model(torch.float32, patch=2, num_prefix=1)

    def recording(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return model(x)

    x = _images(2, 12, 12, torch.float32)
    ours, ref = _both(recording, x, img_sizes=[12, 20], max_split_size=12, num_prefix_token=1)
    assert seen[:2] == [(2, 3, 12, 12), (8, 3, 10, 10)]
    assert ours.shape == (2, 1 + 36, 12)
    torch.testing.assert_close(ours, ref, **TOL)


def test_bchw_output_layout() -> None:
    model = _make_model(torch.float32, patch=2, maps=True)
    x = _images(2, 8, 8, torch.float32)
    ours, ref = _both(model, x, scales=[1, 2], output_shape="bchw")
    assert ours.shape == (2, 12, 4, 4)
    assert ours.is_contiguous()
    torch.testing.assert_close(ours, ref, **TOL)


def test_convnet_with_one_cell_per_tile() -> None:
    # A ConvNet that reduces every tile to a 1 x 1 map ([T, D, 1, 1]).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 4, stride=4), nn.AdaptiveAvgPool2d(1)).eval()
    x = _images(2, 8, 8, torch.float32)
    ours, ref = _both(model, x, scales=[1, 2], output_shape="bchw")
    assert ours.shape == (2, 10, 1, 1)
    torch.testing.assert_close(ours, ref, **TOL)


def test_gradients_match_reference() -> None:
    model = _make_model(torch.float64, patch=2, num_prefix=1)
    x = _images(2, 8, 8, torch.float64)
    grads = []
    for fn in (multiscale_forward, reference_forward):
        leaf = x.clone().requires_grad_(True)
        out = fn(model, leaf, scales=[1, 1.5, 2], max_split_size=8, num_prefix_token=1)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], **TOL)


def test_square_input_with_split_mode_follows_any_shape() -> None:
    # 20 px at max_split_size 12: any-shape resizes to 24 and cuts 12 px tiles, master cuts 10 px.
    model = _make_model(torch.float32, patch=2)
    x = _images(1, 12, 12, torch.float32)
    any_shape, ref = _both(model, x, img_sizes=[12, 20], max_split_size=12, split_mode="resize")
    master = multiscale_forward(model, x, img_sizes=[12, 20], max_split_size=12)
    torch.testing.assert_close(any_shape, ref, **TOL)
    assert any_shape.shape == master.shape == (1, 36, 12)
    assert not torch.allclose(any_shape, master)


def test_any_shape_scales_path_works() -> None:
    # dev_any_shape crashed here with "TypeError: 'NoneType' object is not iterable".
    model = _make_model(torch.float32, patch=2, num_prefix=1)
    x = _images(2, 12, 8, torch.float32)
    ours, ref = _both(model, x, scales=[1, 2], max_split_size=8, num_prefix_token=1)
    # scale 1: 12 x 8 -> grid 2 x 1 of 8 px tiles (resized to 16 x 8) -> 8 x 4 feature cells.
    assert ours.shape == (2, 1 + 8 * 4, 12)
    torch.testing.assert_close(ours, ref, **TOL)


def test_any_shape_pad_crops_features() -> None:
    model = _make_model(torch.float32, patch=2, maps=True)
    x = _images(1, 12, 8, torch.float32)
    ours, ref = _both(
        model, x, scales=[1, 2], max_split_size=8, split_mode="pad", output_shape="bchw"
    )
    # scale 1: 12 x 8 padded to 16 x 8, 8 x 4 cells stitched, cropped to ceil(12/16*8) x 4 = 6 x 4.
    assert ours.shape == (1, 12, 6, 4)
    torch.testing.assert_close(ours, ref, **TOL)


def test_any_shape_pad_crop_uses_the_original_float_arithmetic() -> None:
    # dev_any_shape computes math.ceil(size / padded * cells) in floats: 29 / 35 * 35 is
    # 29.000000000000004, so the crop keeps 30 of 35 cells where exact arithmetic gives 29.
    model = _make_model(torch.float32, patch=1, maps=True)
    x = _images(1, 10, 12, torch.float32)
    ours, ref = _both(
        model, x, img_sizes=[(29, 29)], max_split_size=7, split_mode="pad", output_shape="bchw"
    )
    assert ours.shape == ref.shape == (1, 6, 30, 30)
    torch.testing.assert_close(ours, ref, **TOL)


def test_import_is_a_one_line_change() -> None:
    import dynamic_s2.s2wrapper

    assert dynamic_s2.s2wrapper.forward is multiscale_forward


# ---------------------------------------------------------------------------------------------
# The model sees the same batches, in the same order (BatchNorm in training mode)
# ---------------------------------------------------------------------------------------------


class Recorder(nn.Module):
    """Wraps a model and keeps a copy of every batch it is called with."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.batches: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.detach().clone())
        return self.model(x)


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 2, stride=2), nn.BatchNorm2d(4), nn.ReLU())
    return net.train()


@pytest.mark.parametrize("split_forward", [False, True])
@pytest.mark.parametrize(
    ("height", "width", "kwargs"),
    [
        (8, 8, {"scales": [1, 2, 3]}),
        (8, 8, {"img_sizes": [8, 12, 21], "max_split_size": 7}),
        (12, 8, {"scales": [1, 2], "max_split_size": 8}),
        (8, 8, {"img_sizes": [(8, 12), (16, 20)], "max_split_size": 8, "split_mode": "pad"}),
    ],
)
def test_batchnorm_sees_the_same_batches(
    height: int, width: int, kwargs: dict[str, Any], split_forward: bool
) -> None:
    x = _images(3, height, width, torch.float32)
    ours_model, ref_model = Recorder(_bn_model()), Recorder(_bn_model())
    ours = multiscale_forward(
        ours_model, x, output_shape="bchw", split_forward=split_forward, **kwargs
    )
    ref = reference_forward(
        ref_model, x, output_shape="bchw", split_forward=split_forward, **kwargs
    )
    assert len(ours_model.batches) == len(ref_model.batches)
    if split_forward:
        assert all(b.shape[0] == 3 for b in ours_model.batches)
    for seen, expected in zip(ours_model.batches, ref_model.batches, strict=True):
        assert seen.shape == expected.shape
        torch.testing.assert_close(seen, expected, atol=0, rtol=0)
    torch.testing.assert_close(ours, ref, **TOL)
    # The running statistics were updated by the same batches.
    bn_ours, bn_ref = ours_model.model[1], ref_model.model[1]
    torch.testing.assert_close(bn_ours.running_mean, bn_ref.running_mean, **TOL)
    torch.testing.assert_close(bn_ours.running_var, bn_ref.running_var, **TOL)


# ---------------------------------------------------------------------------------------------
# The seed README's examples
# ---------------------------------------------------------------------------------------------


def test_readme_vit_b16_scales_1_2() -> None:
    model = PooledEmbed(dim=768, patch=16).eval()
    x = _images(32, 224, 224, torch.float32)
    with torch.no_grad():
        out = multiscale_forward(model, x, scales=[1, 2])
    assert out.shape == (32, 196, 1536)


def test_readme_448_input_scales_or_img_sizes() -> None:
    model = PooledEmbed(dim=768, patch=16).eval()
    x = _images(32, 448, 448, torch.float32)
    with torch.no_grad():
        by_scales = multiscale_forward(model, x, scales=[0.5, 1], max_split_size=224)
        by_sizes = multiscale_forward(model, x, img_sizes=[224, 448], max_split_size=224)
    assert by_scales.shape == by_sizes.shape == (32, 196, 1536)
    torch.testing.assert_close(by_scales, by_sizes, atol=0, rtol=0)
    # Spot-check against the reference on a few images (the reference is slow by design).
    with torch.no_grad():
        ref = reference_forward(model, x[:2], img_sizes=[224, 448], max_split_size=224)
        ours = multiscale_forward(model, x[:2], img_sizes=[224, 448], max_split_size=224)
    torch.testing.assert_close(ours, ref, **TOL)


def test_readme_clip_b32_with_cls_token() -> None:
    model = PooledEmbed(dim=768, patch=32, cls_token=True).eval()
    x = _images(1, 224, 224, torch.float32)
    ours, ref = _both(model, x, scales=[1, 2], num_prefix_token=1)
    assert ours.shape == (1, 50, 1536)
    torch.testing.assert_close(ours, ref, **TOL)


def test_llava_s2_tower() -> None:
    # LLaVA's CLIPVisionTowerS2: a 1008 px image, img_sizes [336, 672, 1008], 336 px splits, and a
    # feature function that already drops the CLS token (24 x 24 = 576 patch tokens per tile).
    channels = 8
    model = PooledEmbed(dim=channels, patch=14).eval()
    x = _images(2, 1008, 1008, torch.float32)
    ours, ref = _both(model, x, img_sizes=[336, 672, 1008], max_split_size=336)
    assert ours.shape == (2, 576, 3 * channels)
    torch.testing.assert_close(ours, ref, **TOL)


def test_hf_clip_vision_model_forward_features() -> None:
    transformers = need("transformers")
    config = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
    )
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(config).eval()

    def forward_features(inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs).last_hidden_state

    x = _images(2, 16, 16, torch.float32)
    ours, ref = _both(forward_features, x, scales=[1, 2], num_prefix_token=1)
    # 1 CLS token + 4 x 4 patch tokens, 2 scales x 32 channels.
    assert ours.shape == (2, 17, 64)
    torch.testing.assert_close(ours, ref, **TOL)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def _identity_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


@pytest.mark.parametrize(
    ("shape", "kwargs", "error", "match"),
    [
        ((3, 8, 8), {"scales": [1]}, ValueError, r"input.*\(3, 8, 8\)"),
        ((1, 3, 8, 8), {}, ValueError, r"scales.*img_sizes"),
        ((1, 3, 8, 8), {"scales": [1], "output_shape": "nchw"}, ValueError, r"output_shape.*nchw"),
        (
            (1, 3, 8, 8),
            {"scales": [1], "output_shape": "bchw", "num_prefix_token": 1},
            ValueError,
            r"num_prefix_token.*1",
        ),
        ((1, 3, 8, 8), {"scales": [1], "split_mode": "crop"}, ValueError, r"split_mode.*crop"),
        ((1, 3, 8, 8), {"scales": [0.1]}, ValueError, r"scales.*0\.1"),
        ((1, 3, 8, 8), {"img_sizes": [8, 0]}, ValueError, r"img_sizes.*0"),
        ((1, 3, 8, 8), {"img_sizes": [(8, -2)]}, ValueError, r"img_sizes.*-2"),
        ((1, 3, 8, 8), {"img_sizes": [10], "max_split_size": 4}, ValueError, r"img_sizes.*10"),
        ((1, 3, 8, 8), {"scales": [1.25], "max_split_size": 4}, ValueError, r"scales.*10"),
        ((1, 3, 12, 8), {"scales": [1]}, ValueError, r"max_split_size.*None"),
        ((1, 3, 8, 8), {"scales": [1], "max_split_size": -1}, ValueError, r"max_split_size.*-1"),
        ((1, 3, 8, 8), {"scales": [1], "resize_output_to_idx": 1}, ValueError, r"resize_output"),
        ((1, 3, 8, 8), {"scales": [1], "num_prefix_token": -1}, ValueError, r"num_prefix_token"),
        ((1, 3, 8, 8), {"scales": []}, ValueError, r"scales"),
        ((1, 3, 8, 8), {"img_sizes": [8, (8, 8)]}, TypeError, r"img_sizes"),
        ((1, 3, 8, 8), {"img_sizes": [8.0]}, TypeError, r"img_sizes.*8\.0"),
        ((1, 3, 8, 8), {"scales": ["1"]}, TypeError, r"scales"),
        ((1, 3, 8, 8), {"img_sizes": [(8, 8, 8)]}, ValueError, r"img_sizes"),
    ],
)
def test_argument_errors(
    shape: tuple[int, ...], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    x = torch.zeros(shape)
    with pytest.raises(error, match=match):
        multiscale_forward(_identity_tokens, x, **kwargs)


def test_input_must_be_a_tensor() -> None:
    with pytest.raises(TypeError, match="input"):
        multiscale_forward(_identity_tokens, [[1.0]], scales=[1])  # type: ignore[arg-type]


def test_model_output_errors() -> None:
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(TypeError, match="model"):
        multiscale_forward(lambda t: {"out": t}, x, scales=[1])  # type: ignore[arg-type,return-value]
    # 15 tokens without prefix tokens do not form a square grid.
    with pytest.raises(ValueError, match="15"):
        multiscale_forward(lambda t: torch.zeros(t.shape[0], 15, 2), x, scales=[1])
    with pytest.raises(ValueError, match="bnc"):
        multiscale_forward(lambda t: t, x, scales=[1])
