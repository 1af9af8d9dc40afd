"""Issue 11, classes 1 and 4-8: options are applied or refused, backbone outputs are checked,
work is bounded, errors are clear, and the smaller silent ones and parity details are fixed."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _deps import need
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamic_s2 import (
    Backbone,
    DynamicS2,
    MultiScaleFeatures,
    TilePlan,
    as_backbone,
    encode_tiles,
    forward,
    merge,
    nvila,
    plan_tiles,
    s2wrapper,
    tile_images,
    tiling,
)
from dynamic_s2.backbones import load_backbone
from dynamic_s2.merge import PrefixGuessWarning
from dynamic_s2.plan import MAX_TILES, _nvila_candidates

transformers = need("transformers")

SCALES = (32, 64)
IMAGES = [torch.rand(3, 40, 56), torch.rand(3, 64, 30)]


def _vit(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
    )
    return transformers.ViTModel(config, add_pooling_layer=False).eval()


# ---- class 1: options silently ignored --------------------------------------------------------


def test_feature_layer_is_applied_to_an_hf_backbone() -> None:
    vit = _vit()
    bb = as_backbone(vit)  # what load_backbone("hf:...") returns
    tiles = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = vit(pixel_values=tiles, output_hidden_states=True).hidden_states[-2]
        assert torch.equal(encode_tiles(bb, tiles, feature_layer=-2), expected)
        last = forward(bb, IMAGES, SCALES)
        layered = forward(bb, IMAGES, SCALES, feature_layer=-2)
        direct = forward(vit, IMAGES, SCALES, feature_layer=-2)
        module = DynamicS2(bb, scales=SCALES, feature_layer=-2)(IMAGES)
    assert torch.equal(layered.tokens, direct.tokens)
    assert torch.equal(module.tokens, direct.tokens)
    assert not torch.allclose(layered.tokens, last.tokens)


def test_feature_layer_with_a_non_hf_backbone_is_refused() -> None:
    bb = Backbone(lambda x: x.flatten(2).transpose(1, 2), input_size=8)
    with pytest.raises(ValueError, match=r"feature_layer=-2.*Backbone"):
        forward(bb, IMAGES, SCALES, feature_layer=-2)


@pytest.mark.parametrize("layer", [3, -4, 100])
def test_feature_layer_out_of_range_is_a_value_error(layer: int) -> None:
    vit = _vit(layers=2)  # hidden_states has 3 entries: -3..2
    for call in (
        lambda: as_backbone(vit, feature_layer=layer),
        lambda: DynamicS2(vit, scales=SCALES, feature_layer=layer),
        lambda: as_backbone(as_backbone(vit), feature_layer=layer),
    ):
        with pytest.raises(ValueError, match=rf"feature_layer.*\[-3, 2\].*{layer}"):
            call()
    as_backbone(vit, feature_layer=-3)  # the embeddings: in range


def test_forward_refuses_options_that_disagree_with_plans() -> None:
    plans = [plan_tiles(*img.shape[-2:], SCALES) for img in IMAGES]
    model = torch.nn.Conv2d(3, 4, 8, stride=8)
    with pytest.raises(ValueError, match=r"policy='nvila'.*plans\[0\]"):
        forward(model, IMAGES, plans=plans, policy="nvila")
    with pytest.raises(ValueError, match=r"fit='pad'.*plans\[0\]"):
        forward(model, IMAGES, plans=plans, fit="pad")
    with pytest.raises(ValueError, match=r"max_tiles=1.*plans\[0\]"):
        forward(model, IMAGES, plans=plans, max_tiles=1)
    agreeing = plans[0].scales[-1].num_tiles, plans[1].scales[-1].num_tiles
    same = [plan_tiles(*img.shape[-2:], SCALES, max_tiles=max(agreeing)) for img in IMAGES]
    if same == plans:  # a cap the plans respect is accepted
        forward(model, IMAGES, plans=plans, max_tiles=max(agreeing))


def test_dynamic_s2_checks_its_options_when_built() -> None:
    tok = Backbone(lambda x: x.flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match=r"mean and std.*\(0\.5, 0\.5\)"):
        DynamicS2(tok, scales=SCALES, mean=(0.5, 0.5), std=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"mean and std need 3 values"):
        DynamicS2(_vit(), scales=SCALES, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std must be finite and non-zero"):
        DynamicS2(tok, scales=SCALES, std=(1.0, 0.0, 1.0))

    class Trunk(torch.nn.Module):
        def extract_features(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :, ::8, ::8]

    with pytest.raises(ValueError, match=r"num_prefix_tokens=1.*feature maps"):
        DynamicS2(Trunk(), scales=SCALES, num_prefix_tokens=1)


# ---- class 4: unchecked backbone output --------------------------------------------------------


class Changing:
    """Returns ``[n, C, 2, 2]`` maps whose C changes from call to call."""

    def __init__(self, channels: list[int]) -> None:
        self.channels = itertools.cycle(channels)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = next(self.channels)
        return (
            torch.nn.functional.adaptive_avg_pool2d(x, 2).mean(1, keepdim=True).repeat(1, c, 1, 1)
        )


def test_s2wrapper_refuses_channels_that_differ_between_scales() -> None:
    with pytest.raises(ValueError, match=r"maps\[1\] has 5 channels.*maps\[0\] has 3"):
        s2wrapper.forward(Changing([3, 5]), torch.rand(1, 3, 16, 16), [1, 2], output_shape="bchw")


def test_output_shape_changing_between_chunks_is_a_value_error() -> None:
    tiles = torch.rand(6, 3, 8, 8)
    with pytest.raises(ValueError, match="later chunk"):
        encode_tiles(Changing([3, 4]), tiles, max_batch_tiles=2)
    with pytest.raises(ValueError, match="later chunk"):
        forward(Changing([3, 4]), IMAGES, SCALES, max_batch_tiles=2)
    with pytest.raises(ValueError, match="later chunk"):
        s2wrapper.forward(
            Changing([3, 4]), torch.rand(2, 3, 16, 16), [2], output_shape="bchw", split_forward=True
        )


def test_an_implausible_prefix_guess_warns() -> None:
    """``merge`` on tile features alone still guesses with a warning; a backbone's output in the
    chain is never guessed: ``forward`` refuses (issue 20, see test_validation's catalog)."""
    plans = [plan_tiles(32, 32, (32,))]
    with pytest.warns(PrefixGuessWarning, match="15 tokens.*6 prefix tokens.*3x3"):
        merge(torch.rand(1, 15, 4), plans)
    with pytest.raises(ValueError, match=r"num_prefix_tokens.*15 tokens.*got None"):
        forward(lambda x: torch.rand(x.shape[0], 15, 4), IMAGES, SCALES)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge(torch.rand(1, 17, 4), plans)  # CLS + 4x4: plausible, no word
        merge(torch.rand(1, 15, 4), plans, num_prefix_tokens=6)  # declared


# ---- class 5: unbounded work from small inputs ---------------------------------------------------


def _cubic_candidates(lo: int, hi: int) -> tuple[tuple[int, int], ...]:
    """NVILA's own construction (three loops into a set, sorted by area), as a reference."""
    ratios = set()
    for n in range(lo, hi + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if lo <= i * j <= hi:
                    ratios.add((i, j))
    return tuple(sorted(ratios, key=lambda r: r[0] * r[1]))


@settings(max_examples=60)
@given(lo=st.sampled_from([1, 4, 9, 16]), extra=st.integers(0, 60))
def test_nvila_candidates_keep_nvila_order(lo: int, extra: int) -> None:
    assert _nvila_candidates(lo, lo + extra) == _cubic_candidates(lo, lo + extra)


def test_huge_max_tiles_is_refused_and_large_ones_are_fast() -> None:
    with pytest.raises(ValueError, match=rf"max_tiles.*{MAX_TILES}.*{MAX_TILES + 1}"):
        plan_tiles(1000, 600, (448, 896, 1344), max_tiles=MAX_TILES + 1, policy="nvila")
    plan = plan_tiles(1000, 600, (448, 896, 1344), max_tiles=4000, policy="nvila")
    assert plan.scales[-1].num_tiles <= 4000


def test_from_dict_bounds_grids_and_checks_nvilas_rule() -> None:
    data = plan_tiles(600, 1000, (448, 896), policy="nvila").to_dict()
    huge = {**data, "scales": [dict(data["scales"][0]), dict(data["scales"][1])]}
    huge["scales"][1].update(grid=[100_000, 100_000], content_size=[100_000 * 448] * 2)
    with pytest.raises(ValueError, match=r"scales\[1\].grid.*MAX_TILES"):
        TilePlan.from_dict(huge)
    broken = {**data, "scales": [dict(data["scales"][0]), dict(data["scales"][1])]}
    broken["scales"][0].update(grid=[1, 2], content_size=[448, 896])
    with pytest.raises(ValueError, match=r"policy='nvila'.*\[\(1, 1\)\].*\[\(1, 2\)\]"):
        TilePlan.from_dict(broken)
    assert TilePlan.from_dict(data) == plan_tiles(600, 1000, (448, 896), policy="nvila")


def test_pad_to_multiple_is_bounded() -> None:
    with pytest.raises(ValueError, match=r"pad_to_multiple.*1000000000"):
        forward(torch.nn.Conv2d(3, 4, 8, stride=8), IMAGES, SCALES, pad_to_multiple=10**9)


@settings(max_examples=25, deadline=None)
@given(
    size=st.tuples(st.integers(1, 70), st.integers(1, 70)),
    band=st.integers(1, 9),
    fit=st.sampled_from(["stretch", "pad"]),
    count=st.integers(1, 2),
)
def test_banded_widening_equals_widening_the_whole_image(
    size: tuple[int, int], band: int, fit: str, count: int
) -> None:
    gen = torch.Generator().manual_seed(size[0] * 100 + size[1])
    images = [torch.randint(0, 256, (3, *size), generator=gen, dtype=torch.uint8)] * count
    plans = [plan_tiles(*size, (16, 32, 48), fit=fit)] * count  # type: ignore[arg-type]
    norm = {"mean": (0.4, 0.5, 0.6), "std": (0.2, 0.3, 0.25)}
    before = tiling._BAND
    try:
        tiling._BAND = None
        whole = tile_images(images, plans, **norm).tiles
        tiling._BAND = band
        banded = tile_images(images, plans, **norm).tiles
    finally:
        tiling._BAND = before
    assert torch.equal(whole, banded)


# ---- class 6: unclear errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "error"),
    [((0, 5), ValueError), ((-2, 5), ValueError), (5, TypeError), ((4.5, 5), TypeError)],
)
def test_resize_checks_its_size(size: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"size must be a pair of positive ints"):
        tiling.resize(torch.rand(3, 8, 8), size)  # type: ignore[arg-type]


def test_load_backbone_names_a_spec_that_cannot_load() -> None:
    with pytest.raises(ValueError, match=r"spec: cannot load 'hf:/missing'"):
        load_backbone("hf:/missing")


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from dynamic_s2.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {"PYTHONPATH": ":".join(sys.path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_reports_a_missing_model_and_an_unwritable_folder_cleanly(tmp_path: Path) -> None:
    Image = need("PIL.Image")
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    done = _cli("extract", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"),
                "--backbone", "hf:/missing", "--scales", "224", "--no-progress")  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "hf:/missing" in done.stderr
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done = _cli("extract", str(tmp_path / "a.png"), "--out", str(blocker / "sub"),
                "--scales", "224", "--no-progress", "--workers", "0")  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "error" in done.stderr


@pytest.mark.parametrize("sizes", [[(-1, 2)], [(2, -3)], [(1,)], ["ab"]])
def test_multiscale_features_checks_sizes(sizes: list) -> None:
    with pytest.raises((ValueError, TypeError), match=r"sizes\[0\]"):
        MultiScaleFeatures(torch.zeros(0, 2), sizes)


# ---- class 7: smaller silent ones --------------------------------------------------------------


def test_pad_to_multiple_leaves_train_mode_batchnorm_alone() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 4, stride=4), torch.nn.BatchNorm2d(4))
    model.train()
    tiles = torch.rand(6, 3, 8, 8)
    plain = encode_tiles(model, tiles, max_batch_tiles=4)
    padded = encode_tiles(model, tiles, max_batch_tiles=4, pad_to_multiple=4)
    torch.testing.assert_close(padded, plain, rtol=0, atol=0)
    model.eval()  # in eval mode the blanks cannot change anything, and are used
    torch.testing.assert_close(
        encode_tiles(model, tiles, max_batch_tiles=4, pad_to_multiple=4),
        encode_tiles(model, tiles, max_batch_tiles=4),
    )


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
def test_integer_features_are_resampled_in_float(dtype: torch.dtype) -> None:
    plans = [plan_tiles(40, 56, (16, 32)), plan_tiles(30, 30, (16, 32))]
    total = sum(p.num_tiles for p in plans)
    feats = torch.randint(-50, 50, (total, 3, 3, 3)).to(dtype)
    out = merge(feats, plans, output_scale=0)  # downsampling averages: fractions appear
    assert out.tokens.is_floating_point()
    wide = torch.float32 if dtype == torch.int16 else torch.float64
    assert out.tokens.dtype == wide
    torch.testing.assert_close(out.tokens, merge(feats.to(wide), plans, output_scale=0).tokens)


def test_cat_refuses_a_mix_of_parts_with_and_without_prefix() -> None:
    with_prefix = MultiScaleFeatures(torch.ones(2, 3), [(1, 2)], prefix=torch.ones(1, 1, 3))
    without = MultiScaleFeatures(torch.ones(2, 3), [(1, 2)])
    with pytest.raises(ValueError, match=r"prefix.*\[True, False\]"):
        MultiScaleFeatures.cat([with_prefix, without])
    assert MultiScaleFeatures.cat([with_prefix, with_prefix]).prefix.shape == (2, 1, 3)


def test_nvila_refuses_a_numpy_array_that_may_be_channels_first() -> None:
    with pytest.raises(ValueError, match=r"\(3, 60, 4\).*channels-first"):
        nvila.preprocess(np.zeros((3, 60, 4), np.uint8), scales=(32, 64), max_tiles=12)
    tiles, _ = nvila.preprocess(np.zeros((60, 4, 3), np.uint8), scales=(32, 64), max_tiles=12)
    assert tiles.shape[1:] == (3, 32, 32)


def test_exif_orientation_nvila_keeps_stored_extract_honours(tmp_path: Path) -> None:
    Image = need("PIL.Image")
    ImageOps = need("PIL.ImageOps")
    from dynamic_s2.extract import read_image

    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: stored 40 x 120 (h x w), shown 120 x 40
    Image.new("RGB", (120, 40), "red").save(tmp_path / "r.jpg", exif=exif)
    with Image.open(tmp_path / "r.jpg") as im:
        _, stored = nvila.preprocess(im, scales=(32, 64), max_tiles=12)
        _, shown = nvila.preprocess(ImageOps.exif_transpose(im), scales=(32, 64), max_tiles=12)
    h, w = read_image(tmp_path / "r.jpg").shape[1:]
    assert (h, w) == (120, 40)
    assert stored == plan_tiles(40, 120, (32, 64), policy="nvila").scales[-1].grid
    assert shown == plan_tiles(h, w, (32, 64), policy="nvila").scales[-1].grid


# ---- class 8: parity details -------------------------------------------------------------------


def _nvila_pack_per_tile(fmap: torch.Tensor, rows: int, cols: int, n: int) -> torch.Tensor:
    """NVILA's order of work, written out: cut the map into tiles, pad each odd side with a zero
    row/column, pack 2x2 cells into one token, and lay the packed tiles out again, raster order."""
    c = fmap.shape[0]
    m = (n + 1) // 2
    grid = torch.zeros(rows * m, cols * m, 4 * c, dtype=fmap.dtype)
    for i in range(rows):
        for j in range(cols):
            tile = torch.zeros(c, 2 * m, 2 * m, dtype=fmap.dtype)
            tile[:, :n, :n] = fmap[:, i * n : (i + 1) * n, j * n : (j + 1) * n]
            for y in range(m):
                for x in range(m):
                    cells = [tile[:, 2 * y + a, 2 * x + b] for a in (0, 1) for b in (0, 1)]
                    grid[i * m + y, j * m + x] = torch.cat(cells)
    return grid.reshape(-1, 4 * c)


@settings(max_examples=20, deadline=None)
@given(block=st.tuples(st.integers(1, 3), st.integers(1, 4)), n=st.integers(1, 7))
def test_per_tile_packing_matches_nvila(block: tuple[int, int], n: int) -> None:
    rows, cols = block
    fmap = torch.randn(2, rows * n, cols * n)
    packed = nvila.pack_tokens(fmap, tokens_per_tile_side=n)
    torch.testing.assert_close(packed, _nvila_pack_per_tile(fmap, rows, cols, n), rtol=0, atol=0)
    assert packed.shape[0] == nvila.num_tokens(block, tokens_per_tile_side=n, per_tile=True)
    tokens, cu = nvila.pack_tokens_batch([fmap, fmap], tokens_per_tile_side=n)
    assert torch.equal(tokens[: cu[1]], packed)


def test_siglip_384_block_gives_nvilas_2352_tokens() -> None:
    assert nvila.num_tokens((3, 4), tokens_per_tile_side=27, per_tile=True) == 2352
    assert nvila.pack_tokens(torch.zeros(1, 81, 108), tokens_per_tile_side=27).shape[0] == 2352
    assert nvila.num_tokens((3, 4), tokens_per_tile_side=27) == 2214  # the whole-map rule


def test_s2wrapper_accepts_the_originals_empty_img_sizes_and_zero_split() -> None:
    def model(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(2).transpose(1, 2)

    x = torch.rand(2, 3, 16, 16)
    ref = s2wrapper.forward(model, x, scales=[1, 2])
    assert torch.equal(s2wrapper.forward(model, x, scales=[1, 2], img_sizes=[]), ref)
    assert torch.equal(s2wrapper.forward(model, x, scales=[1, 2], max_split_size=0), ref)
    with pytest.raises(TypeError, match="floating-point"):
        s2wrapper.forward(model, (x * 255).to(torch.uint8), scales=[1, 2])  # documented refusal
