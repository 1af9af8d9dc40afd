"""halo, canvas and max_upscale's fallback to padding (issue 19)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dynamic_s2
from dynamic_s2 import S2Options, TilePlan, plan_tiles
from dynamic_s2.backbones import Backbone
from dynamic_s2.budget import plan_batch
from dynamic_s2.plan import MAX_CAPPED_STRETCH
from dynamic_s2.seams import drop_halo, encode_canvases
from dynamic_s2.tiling import resize, tile_images

sizes = st.tuples(st.integers(1, 700), st.integers(1, 700))


def _patchify(channels: int = 6, patch: int = 8) -> torch.nn.Module:
    """A per-cell backbone: every output cell sees only its own 8×8 pixels."""
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, channels, kernel_size=patch, stride=patch).eval()


def _convnet() -> torch.nn.Module:
    """A small fully convolutional net whose cells see across tile seams (stride 8)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 5, 8, stride=8),
        torch.nn.Conv2d(5, 5, 3, padding=1),
    ).eval()


def _without_halo(plan: TilePlan) -> TilePlan:
    """The same grids and canvases with no halo."""
    scales = tuple(dataclasses.replace(sp, halo=0) for sp in plan.scales)
    return dataclasses.replace(plan, halo=0, scales=scales)


# ------------------------------------------------------------------------------------- plans


@settings(max_examples=60, deadline=None)
@given(
    hw=sizes,
    halo=st.sampled_from([0, 8, 16, 24]),
    mode=st.sampled_from(["fixed", "enlarged"]),
    fit=st.sampled_from(["stretch", "pad"]),
)
def test_halo_plans_round_trip_and_keep_their_geometry(
    hw: tuple[int, int], halo: int, mode: str, fit: str
) -> None:
    plan = plan_tiles(*hw, (64, 128), halo=halo, halo_tiles=mode, fit=fit)  # type: ignore[arg-type]
    assert TilePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert plan.halo == halo and all(sp.halo == halo for sp in plan.scales)
    if mode == "fixed":  # the tile the backbone sees stays 64, the stride shrinks
        assert plan.input_size == 64 and plan.tile_size == 64 - 2 * halo
    else:  # same grids as without a halo, larger tiles
        assert plan.tile_size == 64 and plan.input_size == 64 + 2 * halo
        assert plan.grids == plan_tiles(*hw, (64, 128), fit=fit).grids  # type: ignore[arg-type]


def test_fixed_halo_keeps_the_scale_and_costs_tiles() -> None:
    plain = plan_tiles(480, 640, (224, 448, 672))
    haloed = plan_tiles(480, 640, (224, 448, 672), halo=64)
    assert haloed.tile_size == 96 and haloed.input_size == 224
    assert haloed.num_tiles > 2 * plain.num_tiles
    # priced by the area it covers, a small tile keeps each canvas near its scale's area
    for sp in haloed.scales:
        ratio = sp.canvas_size[0] * sp.canvas_size[1] / sp.scale**2
        assert 0.5 < ratio < 2.5, sp
    a, b = plain.scales[-1].canvas_size, haloed.scales[-1].canvas_size
    assert 0.6 < (b[0] * b[1]) / (a[0] * a[1]) < 1.6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"halo": 112}, "leaves no interior"),
        ({"halo": -8}, "halo"),
        ({"halo": 8, "policy": "nvila"}, "policy='nvila'"),
        ({"halo": 8, "halo_tiles": "bigger"}, "halo_tiles"),
    ],
)
def test_bad_halos_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_tiles(480, 640, (224, 448), **kwargs)
    with pytest.raises(ValueError, match=match):
        S2Options(scales=(224, 448), **kwargs)


def test_halo_off_the_cell_boundaries_is_refused() -> None:
    with pytest.raises(ValueError, match=r"halo=4 px is not on the backbone's cell boundaries"):
        dynamic_s2.forward(_patchify(), [torch.rand(3, 40, 60)], scales=(32,), halo=4)


def test_plan_batch_counts_and_prices_halo_tiles() -> None:
    sizes_ = [(480, 640), (300, 1200), (64, 64)]
    alone = [plan_tiles(h, w, (224, 448), halo=32) for h, w in sizes_]
    assert plan_batch(sizes_, (224, 448), tile_budget=10_000, halo=32) == alone
    total = sum(p.num_tiles for p in alone)
    tight = plan_batch(sizes_, (224, 448), tile_budget=total - 5, halo=32)
    assert sum(p.num_tiles for p in tight) <= total - 5
    assert all(p.halo == 32 and p.input_size == 224 for p in tight)


# ---------------------------------------------------------------------------------- max_upscale


@settings(max_examples=200, deadline=None)
@given(hw=sizes, upscale=st.sampled_from([1.0, 1.5, 2.0, 3.0]))
def test_no_capped_plan_stretches_beyond_the_bound(hw: tuple[int, int], upscale: float) -> None:
    h, w = hw
    plan = plan_tiles(h, w, (224, 448, 672), max_upscale=upscale)
    assert TilePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    for sp in plan.scales:
        ch, cw = sp.content_size
        error = abs(math.log(cw / ch) - math.log(w / h))
        rounding = 0.5 / min(ch, cw) + 0.5 / min(h, w)  # a half pixel on the short sides
        assert error <= MAX_CAPPED_STRETCH + rounding or min(ch, cw) == 1, (hw, sp)


def test_the_tiny_elongated_image_is_padded_not_stretched() -> None:
    plan = plan_tiles(160, 40, (224, 448, 672), max_upscale=2.0)
    assert plan.grids == ((1, 1),) * 3
    assert {sp.content_size for sp in plan.scales} == {(224, 56)}


# ---------------------------------------------------------------------------------------- tiles


@settings(max_examples=30, deadline=None)
@given(
    hw=st.tuples(st.integers(8, 120), st.integers(8, 120)), fit=st.sampled_from(["stretch", "pad"])
)
def test_halo_tiles_are_the_canvas_windows(hw: tuple[int, int], fit: str) -> None:
    image = torch.rand(3, *hw)
    plan = plan_tiles(*hw, (32, 64), halo=8, fit=fit)  # type: ignore[arg-type]
    tiles = tile_images([image], [plan]).tiles
    flat = tile_images([image], [_without_halo(plan)]).tiles  # the canvas, cut at the stride
    assert tiles.shape[-1] == plan.input_size == 32
    assert torch.equal(tiles[:, :, 8:24, 8:24], flat)
    start = 0
    for sp in plan.scales:  # every tile is its window of the canvas padded by the halo
        canvas = torch.zeros(3, sp.canvas_size[0] + 16, sp.canvas_size[1] + 16)
        canvas[:, 8 : 8 + sp.content_size[0], 8 : 8 + sp.content_size[1]] = resize(
            image, sp.content_size
        )
        for k, (y, x) in enumerate(sp.tile_offsets()):
            assert torch.equal(tiles[start + k], canvas[:, y : y + 32, x : x + 32])
        start += sp.num_tiles


# ------------------------------------------------------------------------------------ halo runs


@pytest.mark.parametrize("fit", ["stretch", "pad"])
def test_a_per_cell_backbone_gives_the_same_features_with_any_halo(fit: str) -> None:
    """Cells that see only their own pixels cannot tell a halo: the enlarged-tile halo has the
    same grids, so forward(halo=…) equals forward() exactly; fixed tiles equal the plain
    pipeline on the same (stride-sized) grids."""
    images = [torch.rand(3, 50, 90), torch.rand(3, 120, 40)]
    conv = _patchify()
    plain = dynamic_s2.forward(conv, images, scales=(32, 64), fit=fit)
    enlarged = dynamic_s2.forward(conv, images, scales=(32, 64), fit=fit, halo=16,
                                  halo_tiles="enlarged")  # fmt: skip
    torch.testing.assert_close(enlarged.features, plain.features, rtol=0, atol=1e-6)
    fixed = dynamic_s2.forward(conv, images, scales=(32, 64), fit=fit, halo=8)
    same_grids = dynamic_s2.forward(conv, images, plans=[_without_halo(p) for p in fixed.plans])
    torch.testing.assert_close(fixed.features, same_grids.features, rtol=0, atol=1e-6)


def test_halo_through_prepare_run_dynamics2_and_chunks() -> None:
    images = [torch.rand(3, 50, 90), torch.rand(3, 120, 40)]
    conv = _convnet()
    want = dynamic_s2.forward(conv, images, scales=(32, 64), halo=8)
    batch = dynamic_s2.prepare(images, scales=(32, 64), halo=8)
    assert batch.tiles.shape[-1] == 32 and all(p.halo == 8 for p in batch.plans)
    for got in (
        dynamic_s2.run(conv, batch),
        dynamic_s2.run(conv, batch, max_batch_tiles=5),
        dynamic_s2.forward(conv, images, scales=(32, 64), halo=8, max_batch_tiles=3),
        dynamic_s2.DynamicS2(conv, scales=(32, 64), halo=8)(images),
        dynamic_s2.DynamicS2(conv, scales=(32, 64), halo=8)(batch),
    ):
        torch.testing.assert_close(got.features, want.features)
    with pytest.raises(ValueError, match="halo=0 disagrees with plans"):
        dynamic_s2.forward(conv, images, scales=(32, 64), halo=0, plans=batch.plans)


def test_token_backbones_keep_their_prefix_through_the_halo() -> None:
    conv = _patchify(channels=4)

    def vit(x: torch.Tensor) -> torch.Tensor:  # a CLS token (the mean) + the patch tokens
        tokens = conv(x).flatten(2).transpose(1, 2)
        return torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)

    images = [torch.rand(3, 40, 70)]
    out = dynamic_s2.forward(Backbone(vit, num_prefix_tokens=1), images, scales=(32,), halo=8,
                             halo_tiles="enlarged")  # fmt: skip
    maps = dynamic_s2.forward(conv, images, scales=(32,))
    torch.testing.assert_close(out.features, maps.features, rtol=0, atol=1e-6)
    assert out.prefix is not None and out.prefix.shape[-1] == 4
    feats = torch.rand(out.plans[0].num_tiles, 1 + 36, 4)  # 48-px tiles of 6×6 tokens
    kept, count = drop_halo(feats, out.plans, None)
    assert count == 1 and kept.shape == (feats.shape[0], 1 + 16, 4)
    assert torch.equal(kept[:, 0], feats[:, 0])


# ---------------------------------------------------------------------------------------- canvas


@pytest.mark.parametrize("fit", ["stretch", "pad"])
def test_canvas_equals_the_backbone_on_the_resized_canvas(fit: str) -> None:
    net = Backbone(_convnet(), maps=True)
    images = [torch.rand(3, 50, 90), torch.rand(3, 120, 40), torch.rand(3, 50, 90)]
    out = dynamic_s2.forward(net, images, scales=(32, 64), fit=fit, canvas=True)
    for image, batched in zip(images, out.unpad(), strict=True):
        one = dynamic_s2.forward(net, [image], scales=(32, 64), fit=fit, canvas=True)
        plan, got = one.plans[0], one.unpad()[0]
        torch.testing.assert_close(batched, got)  # batching canvases of one size changes nothing
        sp = plan.scales[-1]
        canvas = torch.zeros(1, 3, *sp.canvas_size)
        canvas[0, :, : sp.content_size[0], : sp.content_size[1]] = resize(image, sp.content_size)
        want = net(canvas)[0].permute(1, 2, 0)
        h, w = sp.feature_size(4)
        c = want.shape[-1]
        assert torch.equal(got[..., c:], want[:h, :w])
    chunked = dynamic_s2.forward(net, images, scales=(32, 64), fit=fit, canvas=True,
                                 max_batch_tiles=4)  # fmt: skip
    torch.testing.assert_close(chunked.features, out.features)
    batch = dynamic_s2.prepare(images, scales=(32, 64), fit=fit)
    torch.testing.assert_close(dynamic_s2.run(net, batch, canvas=True).features, out.features)
    layer = dynamic_s2.DynamicS2(net, scales=(32, 64), fit=fit, canvas=True)
    torch.testing.assert_close(layer(images).features, out.features)


def test_canvas_differs_from_tiles_only_by_the_seams() -> None:
    net = Backbone(_convnet(), maps=True)
    images = [torch.rand(3, 64, 32)]  # one 32-px tile at scale 32: no seam there
    tiles = dynamic_s2.forward(net, images, scales=(32, 64))
    whole = dynamic_s2.forward(net, images, scales=(32, 64), canvas=True)
    c = tiles.channels // 2
    assert not torch.allclose(tiles.features[..., c:], whole.features[..., c:])


def test_canvas_is_refused_where_it_cannot_be() -> None:
    images = [torch.rand(3, 40, 60)]
    net = _convnet()  # a plain conv stack is known to return maps; an opaque callable is not
    with pytest.raises(ValueError, match="canvas=True needs a backbone"):
        dynamic_s2.forward(lambda x: net(x), images, scales=(32,), canvas=True)
    with pytest.raises(ValueError, match="canvas=True needs"):
        dynamic_s2.forward(Backbone(lambda x: x.flatten(2).transpose(1, 2), maps=True), images,
                           scales=(32,), canvas=True)  # fmt: skip
    with pytest.raises(ValueError, match="give one or the other"):
        S2Options(scales=(32,), canvas=True, halo=8)
    batch = dynamic_s2.prepare(images, scales=(32,), halo=8)
    with pytest.raises(ValueError, match="prepare the batch with halo=0"):
        dynamic_s2.run(Backbone(_convnet(), maps=True), batch, canvas=True)
    odd = Backbone(torch.nn.Conv2d(3, 4, 3, stride=3), maps=True)  # 32 px is no whole cell
    with pytest.raises(ValueError, match="whole number of cells"):
        encode_canvases(odd, tile_images(images, [plan_tiles(40, 60, (32,))]).tiles,
                        [plan_tiles(40, 60, (32,))])  # fmt: skip


# ------------------------------------------------------------------------------ the front ends


def test_the_hf_processor_takes_halo() -> None:
    pytest.importorskip("transformers")
    from dynamic_s2.hf import DynamicS2ImageProcessor

    processor = DynamicS2ImageProcessor(scales=(32, 64), halo=8, image_mean=0.5, image_std=0.5)
    image = (torch.rand(3, 50, 90) * 255).to(torch.uint8)
    features = processor([image])
    assert features["pixel_values"].shape[-1] == 32
    plan = TilePlan.from_dict(features["plans"][0])
    assert plan.halo == 8 and plan.tile_size == 16
    out = dynamic_s2.run(_patchify(), features)
    assert out.plans[0] == plan


def test_cli_flags_and_extract_take_halo_and_canvas(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    from PIL import Image

    from dynamic_s2.cli import main
    from dynamic_s2.store import open_features

    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray((torch.rand(40, 70, 3) * 255).to(torch.uint8).numpy()).save(root / "a.png")
    common = ["extract", str(root), "--backbone", "efficientnet-lite0", "--scales", "224,448"]
    common += ["--no-progress", "--workers", "0"]
    assert main([*common, "--out", str(tmp_path / "halo"), "--halo", "32"]) == 0
    assert main([*common, "--out", str(tmp_path / "canvas"), "--canvas"]) == 0
    halo = open_features(tmp_path / "halo")
    item = halo[next(iter(halo.keys))]
    assert item.plan.halo == 32 and item.plan.input_size == 224
    config = json.loads((tmp_path / "halo" / "extract.json").read_text())
    assert json.dumps(config).count('"halo": 32') == 1
    canvas = json.loads((tmp_path / "canvas" / "extract.json").read_text())
    assert json.dumps(canvas).count('"canvas": true') == 1
