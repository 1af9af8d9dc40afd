"""``forward`` and ``DynamicS2``: batched equals alone, chunking, gradients, dtypes (issue 3).

Every image's result in a batch of mixed sizes (1 px to panoramas) must equal the result of
running it alone, and the reference pipeline in ``tests/_core_reference.py`` (one image at a time:
resize-and-cut, the backbone, a per-image merge loop). Backbone calls are recorded to check
chunking; gradients are compared with autograd through the reference.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from _core_reference import Recorder, make_model, random_images, ref_forward
from _deps import need
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import dynamic_s2
from dynamic_s2 import DynamicS2, MultiScaleFeatures, forward, plan_tiles

TOL32 = {"atol": 1e-5, "rtol": 1e-5}
TOL_REF = {"atol": 1e-4, "rtol": 1e-4}  # tiles agree to 1e-4 with the documented resize

SCALE_SETS: list[tuple[tuple[int, ...], tuple[str, ...]]] = [
    ((16,), ("aspect", "nvila")),
    ((16, 32), ("aspect", "nvila")),
    ((16, 32, 48), ("aspect", "nvila")),
    ((16, 40), ("aspect",)),
]

image_sizes = st.one_of(
    st.tuples(st.integers(1, 90), st.integers(1, 90)),
    st.just((1, 1)),
    st.tuples(st.integers(1, 10), st.integers(120, 320)),  # panoramas
    st.tuples(st.integers(120, 320), st.integers(1, 10)),
)


@st.composite
def forward_options(draw: st.DrawFn) -> dict[str, Any]:
    scales, policies = draw(st.sampled_from(SCALE_SETS))
    return {
        "scales": scales,
        "policy": draw(st.sampled_from(policies)),
        "fit": draw(st.sampled_from(["stretch", "pad"])),
        "output_scale": draw(st.integers(-len(scales), len(scales) - 1)),
        "resample": draw(st.sampled_from(["area", "bilinear"])),
    }


def assert_same(a: MultiScaleFeatures, b: MultiScaleFeatures, tol: dict[str, float]) -> None:
    assert a.sizes == b.sizes
    assert a.tokens.dtype == b.tokens.dtype
    for x, y in zip(a.unpad(), b.unpad(), strict=True):
        torch.testing.assert_close(x, y, **tol)
    assert (a.prefix is None) == (b.prefix is None)
    if a.prefix is not None:
        torch.testing.assert_close(a.prefix, b.prefix, **tol)


def assert_matches_reference(
    out: MultiScaleFeatures,
    maps: list[torch.Tensor],
    prefix: list[torch.Tensor] | None,
    tol: dict[str, float],
) -> None:
    assert out.sizes == [tuple(m.shape[:2]) for m in maps]
    for got, want in zip(out.unpad(), maps, strict=True):
        torch.testing.assert_close(got, want, **tol)
    if prefix is None:
        assert out.prefix is None
    else:
        assert out.prefix is not None
        torch.testing.assert_close(out.prefix, torch.stack(prefix), **tol)


def plans_for(images: list[torch.Tensor], options: dict[str, Any]) -> list[dynamic_s2.TilePlan]:
    return [
        plan_tiles(
            img.shape[-2],
            img.shape[-1],
            options["scales"],
            policy=options["policy"],
            fit=options["fit"],
        )
        for img in images
    ]


# ---------------------------------------------------------------------------------------------
# Batched equals alone, and equals the reference
# ---------------------------------------------------------------------------------------------


@given(
    sizes=st.lists(image_sizes, min_size=1, max_size=5),
    options=forward_options(),
    layout=st.sampled_from(["tokens", "maps"]),
    prefix=st.integers(0, 2),
    uint8=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_batched_equals_alone(
    sizes: list[tuple[int, int]],
    options: dict[str, Any],
    layout: str,
    prefix: int,
    uint8: bool,
    seed: int,
) -> None:
    num_prefix = prefix if layout == "tokens" else 0
    model = make_model(num_prefix=num_prefix, maps=layout == "maps")
    images = random_images(sizes, dtype=torch.uint8 if uint8 else torch.float32, seed=seed)
    norm = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.3, 0.25)}
    with torch.no_grad():
        batched = forward(model, images, **options, **norm)
        assert batched.tokens.dtype == torch.float32
        assert len(batched) == len(images)
        for b, image in enumerate(images):
            alone = forward(model, [image], **options, **norm)
            assert alone.sizes == [batched.sizes[b]]
            torch.testing.assert_close(batched.unpad()[b], alone.unpad()[0], **TOL32)
            if num_prefix:
                torch.testing.assert_close(batched.prefix[b], alone.prefix[0], **TOL32)
            else:
                assert batched.prefix is None and alone.prefix is None
        maps, pre = ref_forward(
            model,
            images,
            plans_for(images, options),
            num_prefix=num_prefix,
            output_scale=options["output_scale"],
            mode=options["resample"],
            **norm,  # one normalisation rule for uint8 and float images
        )
    assert_matches_reference(batched, maps, pre, TOL_REF)


@given(
    batch=st.integers(1, 3),
    size=image_sizes,
    options=forward_options(),
    channels_last=st.booleans(),
)
def test_tensor_batch_equals_list(
    batch: int, size: tuple[int, int], options: dict[str, Any], channels_last: bool
) -> None:
    model = make_model(num_prefix=1)
    images = random_images([size] * batch, seed=3)
    stacked = torch.stack(images)
    if channels_last:
        stacked = stacked.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_same(forward(model, stacked, **options), forward(model, images, **options), TOL32)


def test_non_contiguous_and_channels_last_inputs() -> None:
    model = make_model(num_prefix=2)
    base = random_images([(70, 90)], seed=5)[0]
    views = [base[:, 3:40, 5:85], base[:, ::2, ::3], base.transpose(1, 2)]
    with torch.no_grad():
        got = forward(model, views, scales=(16, 32, 48), fit="pad")
        want = forward(model, [v.contiguous() for v in views], scales=(16, 32, 48), fit="pad")
        assert_same(got, want, TOL32)
        batch = torch.stack(random_images([(30, 44)] * 2, seed=6))
        last = batch.contiguous(memory_format=torch.channels_last)
        assert not last.is_contiguous()
        assert_same(
            forward(model, last, scales=(16, 32)), forward(model, batch, scales=(16, 32)), TOL32
        )


# ---------------------------------------------------------------------------------------------
# Chunking
# ---------------------------------------------------------------------------------------------


@given(
    sizes=st.lists(image_sizes, min_size=1, max_size=4),
    options=forward_options(),
    max_batch_tiles=st.integers(1, 40),
    pad_to_multiple=st.one_of(st.none(), st.integers(1, 8)),
    grad=st.booleans(),
)
def test_chunking_changes_nothing(
    sizes: list[tuple[int, int]],
    options: dict[str, Any],
    max_batch_tiles: int,
    pad_to_multiple: int | None,
    grad: bool,
) -> None:
    if pad_to_multiple is not None:
        pad_to_multiple = min(pad_to_multiple, max_batch_tiles)
    model = make_model(num_prefix=1)
    images = random_images(sizes, seed=2)
    total = sum(p.num_tiles for p in plans_for(images, options))
    with torch.set_grad_enabled(grad):
        whole = Recorder(model)
        reference = forward(whole, images, **options)
        assert whole.calls == [total]
        chunked = Recorder(model)
        out = forward(
            chunked,
            images,
            **options,
            max_batch_tiles=max_batch_tiles,
            pad_to_multiple=pad_to_multiple,
        )
    assert max(chunked.calls) <= max_batch_tiles
    if pad_to_multiple is None:
        assert sum(chunked.calls) == total
    else:
        assert all(n % pad_to_multiple == 0 for n in chunked.calls)
        assert total <= sum(chunked.calls) < total + pad_to_multiple
    # the backbone saw every tile once, in order, then only blank (zero) padding tiles
    seen = torch.cat(chunked.inputs)
    torch.testing.assert_close(seen[:total], torch.cat(whole.inputs), atol=0, rtol=0)
    assert bool((seen[total:] == 0).all())
    assert out.tokens.requires_grad == grad
    assert_same(out, reference, TOL32)


def test_pad_to_multiple_above_max_batch_tiles_is_refused() -> None:
    """Both bounds cannot hold at once: refused up front, never a call above max_batch_tiles."""
    model = Recorder(make_model(maps=True))
    images = random_images([(40, 60)], seed=0)
    with pytest.raises(ValueError, match="pad_to_multiple"):
        forward(model, images, scales=(16, 32), max_batch_tiles=3, pad_to_multiple=4)
    with pytest.raises(ValueError, match="pad_to_multiple"):
        DynamicS2(model, scales=(16, 32), max_batch_tiles=3, pad_to_multiple=4)
    assert model.calls == []


def test_chunk_argument_errors() -> None:
    model = make_model()
    images = random_images([(20, 20)])
    for bad in (0, -2):
        with pytest.raises(ValueError, match="max_batch_tiles"):
            forward(model, images, scales=(16,), max_batch_tiles=bad)
        with pytest.raises(ValueError, match="pad_to_multiple"):
            forward(model, images, scales=(16,), pad_to_multiple=bad)
    with pytest.raises(TypeError, match="max_batch_tiles"):
        forward(model, images, scales=(16,), max_batch_tiles=2.0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_batch_tiles", [None, 5])
@pytest.mark.parametrize(("layout", "fit"), [("tokens", "pad"), ("maps", "stretch")])
def test_gradients_equal_reference(max_batch_tiles: int | None, layout: str, fit: str) -> None:
    """Gradients w.r.t. the backbone parameters and the input images equal the reference's."""
    model = make_model(num_prefix=2 if layout == "tokens" else 0, maps=layout == "maps")
    model.train()
    sizes = [(20, 45), (33, 17), (7, 70)]
    images = [img.requires_grad_(True) for img in random_images(sizes, seed=9)]
    scales = (16, 32, 48)
    out = forward(model, images, scales, fit=fit, max_batch_tiles=max_batch_tiles, output_scale=1)
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(out.tokens.shape, generator=g)
    loss = (out.tokens * weights).sum()
    if out.prefix is not None:
        prefix_weights = torch.randn(out.prefix.shape, generator=g)
        loss = loss + (out.prefix * prefix_weights).sum()
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, [*images, *params])

    plans = [plan_tiles(h, w, scales, fit=fit) for h, w in sizes]
    maps, prefix = ref_forward(
        model, images, plans, num_prefix=2 if layout == "tokens" else 0, output_scale=1
    )
    ref_loss = (torch.cat([m.reshape(-1, m.shape[-1]) for m in maps]) * weights).sum()
    if prefix is not None:
        ref_loss = ref_loss + (torch.stack(prefix) * prefix_weights).sum()
    ref_grads = torch.autograd.grad(ref_loss, [*images, *params])
    for got, want in zip(grads, ref_grads, strict=True):
        assert got is not None and got.abs().sum() > 0
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_uint8_images_take_no_gradient_but_the_backbone_does() -> None:
    model = make_model(num_prefix=1)
    images = random_images([(20, 30), (40, 9)], dtype=torch.uint8)
    out = forward(model, images, scales=(16, 32), mean=0.5, std=0.5)
    (out.tokens.square().mean() + out.prefix.square().mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# dtypes and grad modes
# ---------------------------------------------------------------------------------------------


def test_float64_follows_input_and_matches_reference() -> None:
    model = make_model(num_prefix=1, dtype=torch.float64)
    sizes = [(25, 61), (1, 1), (8, 150)]
    images = random_images(sizes, dtype=torch.float64, seed=4)
    options = {"scales": (16, 32, 48), "policy": "aspect", "fit": "pad"}
    with torch.no_grad():
        out = forward(model, images, **options)
        maps, prefix = ref_forward(model, images, plans_for(images, options), num_prefix=1)
    assert out.tokens.dtype == torch.float64
    assert out.prefix is not None and out.prefix.dtype == torch.float64
    # tiles are resized in float32 by both: only float32 rounding of the resize differs
    assert_matches_reference(out, maps, prefix, {"atol": 1e-6, "rtol": 1e-6})


@pytest.mark.parametrize("layout", ["tokens", "maps"])
def test_bfloat16_follows_input(layout: str) -> None:
    model = make_model(num_prefix=1 if layout == "tokens" else 0, maps=layout == "maps")
    sizes = [(25, 61), (40, 40), (8, 150)]
    images = random_images(sizes, dtype=torch.bfloat16, seed=4)
    options = {"scales": (16, 32, 48), "policy": "aspect", "fit": "stretch"}
    with torch.no_grad():
        out = forward(model.to(torch.bfloat16), images, **options)
        # the same images and weights in float32: bf16 rounding is the only difference
        out32 = forward(model.float(), [img.float() for img in images], **options)
    assert out.tokens.dtype == torch.bfloat16
    if out.prefix is not None:
        assert out.prefix.dtype == torch.bfloat16
    assert out.sizes == out32.sizes
    for x, y in zip(out.unpad(), out32.unpad(), strict=True):
        torch.testing.assert_close(x.float(), y, atol=0.1, rtol=0.05)


def test_grad_modes_and_autocast() -> None:
    model = make_model(num_prefix=1)
    images = random_images([(30, 50), (50, 12)], seed=8)
    kwargs = {"scales": (16, 32), "fit": "pad"}
    with torch.no_grad():
        expected = forward(model, images, **kwargs)
    assert not expected.tokens.requires_grad
    with torch.inference_mode():
        inference = forward(model, images, **kwargs)
        features, mask = inference.features, inference.mask  # padded views work in this mode
    assert features.shape[:3] == mask.shape
    assert_same(inference, expected, TOL32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = forward(model, images, **kwargs)
    assert auto.tokens.dtype == torch.bfloat16  # the backbone ran in bf16
    assert auto.sizes == expected.sizes
    for x, y in zip(auto.unpad(), expected.unpad(), strict=True):
        torch.testing.assert_close(x.float(), y, atol=0.1, rtol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert forward(model, images, **kwargs).sizes == expected.sizes


# ---------------------------------------------------------------------------------------------
# Scales, plans and their errors
# ---------------------------------------------------------------------------------------------


def tiny_hf_vit(image_size: int = 32) -> nn.Module:
    transformers = need("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    return transformers.ViTModel(config, add_pooling_layer=False).eval()


def test_default_scales_from_hf_config() -> None:
    model = tiny_hf_vit(image_size=32)
    images = random_images([(40, 70), (90, 30)], seed=1)
    with torch.no_grad():
        out = forward(model, images)
        explicit = forward(model, images, scales=(32, 64, 96), tile_size=32)
        layer = DynamicS2(model)
        from_module = layer(images)
    for p in out.plans:
        assert tuple(sp.scale for sp in p.scales) == (32, 64, 96)
        assert p.tile_size == 32
    assert_same(out, explicit, TOL32)
    assert_same(from_module, explicit, TOL32)
    assert out.prefix is not None and out.prefix.shape == (2, 1, 3 * 16)


def test_no_known_size_is_a_value_error() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True)

    images = random_images([(20, 20)])
    with pytest.raises(ValueError, match="scales"):
        forward(fn, images)
    with pytest.raises(ValueError, match="scales"):
        DynamicS2(make_model())


def test_plans_path() -> None:
    model = make_model(num_prefix=1)
    images = random_images([(30, 50), (64, 20), (5, 90)], seed=7)
    plans = [plan_tiles(*img.shape[1:], (16, 32, 48), policy="nvila") for img in images]
    with torch.no_grad():
        via_scales = forward(model, images, (16, 32, 48), policy="nvila")
        via_plans = forward(model, images, plans=plans)
        agreeing = forward(model, images, (16, 32, 48), plans=plans)
        via_layer = DynamicS2(model, scales=(16, 32, 48))(images, plans=plans)
    assert_same(via_plans, via_scales, TOL32)
    assert_same(agreeing, via_scales, TOL32)
    assert_same(via_layer, via_scales, TOL32)
    assert via_plans.plans == plans

    with pytest.raises(ValueError, match="plans"):
        forward(model, images, plans=plans[:2])
    with pytest.raises(ValueError, match="plans"):
        forward(model, images[:2], plans=plans)
    with pytest.raises(ValueError, match=r"\(30, 50\)|\(64, 20\)"):
        forward(model, images, plans=[plans[1], plans[0], plans[2]])  # wrong image sizes
    with pytest.raises(ValueError, match="scales"):
        forward(model, images, (16, 32), plans=plans)
    with pytest.raises(ValueError, match="scales"):
        forward(model, images, (16, 32, 64), plans=plans)
    with pytest.raises(ValueError, match="scales"):  # the module's scales must agree too
        DynamicS2(model, scales=(16, 32))(images, plans=plans)
    with pytest.raises(ValueError, match="tile_size"):
        forward(model, images, plans=plans, tile_size=32)


def test_forward_argument_errors() -> None:
    model = make_model()
    images = random_images([(20, 20)])
    with pytest.raises(TypeError):
        forward(42, images, (16,))
    with pytest.raises(ValueError):
        forward(model, [], (16,))
    with pytest.raises(ValueError, match="resample"):
        forward(model, images, (16,), resample="cubic")
    with pytest.raises(ValueError):
        forward(model, images, (16, 32), output_scale=2)
    with pytest.raises(ValueError, match="policy"):
        forward(model, images, (16,), policy="square")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# DynamicS2
# ---------------------------------------------------------------------------------------------


def test_module_equals_forward_and_registers_parameters() -> None:
    model = make_model(num_prefix=1)
    options = {"fit": "pad", "output_scale": 0, "max_batch_tiles": 7}
    layer = DynamicS2(model, scales=(16, 32, 48), **options)
    assert isinstance(layer, nn.Module)
    assert {id(p) for p in layer.parameters()} == {id(p) for p in model.parameters()}
    assert set(layer.state_dict()) == {f"backbone.{k}" for k in model.state_dict()}
    images = random_images([(30, 50), (1, 1), (6, 200)], seed=3)
    with torch.no_grad():
        assert_same(layer(images), forward(model, images, (16, 32, 48), **options), TOL32)
    images = [img.requires_grad_(True) for img in images]
    out = layer(images)
    (out.tokens.square().sum() + out.prefix.square().sum()).backward()
    for p in layer.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    for img in images:
        assert img.grad is not None and img.grad.abs().sum() > 0

    layer = layer.to(torch.float64)  # .to() reaches the backbone
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with torch.no_grad():
        assert layer([img.detach().double() for img in images]).tokens.dtype == torch.float64


def test_module_option_errors() -> None:
    with pytest.raises(TypeError):
        DynamicS2(make_model(), scales=(16,), not_an_option=1)
    with pytest.raises(TypeError):
        DynamicS2(make_model(), scales=(16,), plans=[])
    with pytest.raises(TypeError):
        DynamicS2(42, scales=(16,))


_INDUCTOR = os.environ.get("DYNAMIC_S2_TEST_INDUCTOR") == "1"


def recording_backend(name: str, graphs: list[Any]) -> Any:
    """A ``torch.compile`` backend that records every captured graph, then hands it to ``name``."""
    inner = torch._dynamo.lookup_backend(name)

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        graphs.append(gm)
        return inner(gm, example_inputs)

    return backend


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",
        pytest.param(
            "inductor",
            marks=pytest.mark.skipif(
                not _INDUCTOR,
                reason="inductor compiles C++ (about 45 s on this 2-core machine); run with "
                "DYNAMIC_S2_TEST_INDUCTOR=1. aot_eager covers dynamo tracing and AOT autograd.",
            ),
        ),
    ],
)
def test_module_with_compiled_backbone(backend: str) -> None:
    model = make_model(num_prefix=1)
    layer = DynamicS2(model, scales=(16, 32), max_batch_tiles=8, pad_to_multiple=8)
    images = random_images([(20, 50), (40, 40), (9, 100)], seed=1)
    with torch.no_grad():
        eager = layer(images)
    graphs: list[Any] = []
    layer.backbone = torch.compile(layer.backbone, backend=recording_backend(backend, graphs))
    with torch.no_grad():
        compiled = layer(images)
    assert graphs, "the compiled backbone was never called"
    assert_same(compiled, eager, TOL32)
    images = [img.requires_grad_(True) for img in images]
    layer(images).tokens.sum().backward()
    assert all(img.grad is not None and img.grad.abs().sum() > 0 for img in images)
    assert all(p.grad is not None for p in model.parameters())


def test_module_from_backbone_keeps_its_declarations_when_compiled() -> None:
    """Swapping in the compiled module keeps what a Backbone declared, and calls the new module."""
    model = make_model(num_prefix=9)  # 9 + 4x4 = 25 tokens: the declared count matters
    declared = dynamic_s2.Backbone(
        model, input_size=16, num_prefix_tokens=9, mean=0.5, std=0.25, module=model
    )
    layer = DynamicS2(declared, scales=(16, 32))
    images = random_images([(20, 50), (40, 40)], dtype=torch.uint8, seed=1)
    with torch.no_grad():
        eager = layer(images)
        graphs: list[Any] = []
        layer.backbone = torch.compile(layer.backbone, backend=recording_backend("eager", graphs))
        compiled = layer(images)
    assert graphs, "the compiled backbone was never called"
    assert_same(compiled, eager, TOL32)
