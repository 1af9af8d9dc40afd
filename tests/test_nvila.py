"""Tests of ``dynamic_s2.nvila`` against plain references of NVILA's pipeline.

The references (``tests/_nvila_reference.py``) are written from the facts of NVILA's pipeline and
share no code with the library: PIL resize-and-crop preprocessing, the per-image loop merge and the
2×2 packing by explicit slicing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _deps import need
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamic_s2 import nvila, plan_tiles

Image = need("PIL.Image")

from _nvila_reference import loop_merge, nvila_grid, pack_2x2, pil_preprocess  # noqa: E402

IMAGES = Path(__file__).resolve().parent.parent / "examples" / "images"
DEFAULT = (448, 896, 1344)
SMALL = (32, 64, 96)  # NVILA's geometry at 1/14 of the size, for fast tests

# Issue 2's worked examples: (W, H) -> (rows, cols) at the last scale, scales 448/896/1344, max 12.
WORKED = {
    (448, 448): (3, 3),
    (1000, 600): (3, 4),
    (1920, 1080): (3, 4),
    (1080, 1920): (5, 2),
    (1100, 400): (2, 5),
    (2000, 300): (1, 9),
    (2750, 1000): (2, 6),
    (275, 100): (2, 5),
}


def _photos() -> list[Path]:
    if not IMAGES.is_dir():
        pytest.skip(f"no example photos folder at {IMAGES}")
    found = sorted(p for p in IMAGES.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not found:
        pytest.skip(f"no example photos in {IMAGES}")
    return found


def _load(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.copy()


def _chw(image: Image.Image) -> torch.Tensor:
    """uint8 ``[3, H, W]`` tensor of a PIL image."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def _photo_at(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Real image content at an arbitrary size: a random crop of a photo, resized with PIL."""
    photos = _photos()
    src = _load(photos[int(rng.integers(len(photos)))])
    x0 = int(rng.integers(0, src.width // 3))
    y0 = int(rng.integers(0, src.height // 3))
    return src.crop((x0, y0, src.width, src.height)).resize((width, height))


def _random_case(seed: int) -> tuple[Image.Image, tuple[int, ...], int]:
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(16, 1600)), int(rng.integers(16, 1600))
    scales = SMALL if seed % 2 else DEFAULT
    max_tiles = int(rng.integers(9, 17))
    return _photo_at(rng, width, height), scales, max_tiles


# ----------------------------------------------------------------------------------- grids


@pytest.mark.parametrize(("size", "grid"), list(WORKED.items()))
def test_worked_grid_examples(size: tuple[int, int], grid: tuple[int, int]) -> None:
    width, height = size
    assert nvila_grid(width, height) == grid  # the reference reproduces the table
    plan = plan_tiles(height, width, DEFAULT, max_tiles=12, policy="nvila")
    assert plan.scales[-1].grid == grid
    assert nvila.num_tokens(plan) == nvila.num_tokens(grid) == 256 * grid[0] * grid[1]


@pytest.mark.parametrize("size", [(1000, 600), (1080, 1920), (2000, 300), (275, 100)])
def test_preprocess_reports_worked_grids(size: tuple[int, int]) -> None:
    width, height = size
    tiles, block = nvila.preprocess(np.zeros((height, width), dtype=np.uint8))
    assert block == WORKED[size]
    assert tiles.shape == (1 + 4 + block[0] * block[1], 3, 448, 448)
    assert tiles.dtype == torch.float32
    assert torch.all(tiles == -1.0)  # black, normalised with SigLIP's 0.5 / 0.5


@settings(max_examples=200)
@given(
    width=st.integers(1, 5000),
    height=st.integers(1, 5000),
    max_tiles=st.integers(9, 20),
)
def test_block_size_matches_reference_rule(width: int, height: int, max_tiles: int) -> None:
    plan = plan_tiles(height, width, DEFAULT, max_tiles=max_tiles, policy="nvila")
    assert plan.scales[-1].grid == nvila_grid(width, height, DEFAULT, max_tiles)


# ------------------------------------------------------------------------------ preprocess


@pytest.fixture(scope="module")
def photo_refs() -> list[tuple[str, Image.Image, torch.Tensor, tuple[int, int]]]:
    """Every example photo with its reference tiles at NVILA's scales (computed once)."""
    out = []
    for path in _photos():
        image = _load(path)
        ref, block = pil_preprocess(image)
        out.append((path.name, image, ref, block))
    return out


def test_pil_path_identical_on_photos(photo_refs) -> None:  # type: ignore[no-untyped-def]
    for name, image, ref, ref_block in photo_refs:
        tiles, block = nvila.preprocess(image)
        assert block == ref_block, name
        assert tiles.shape == ref.shape, name
        assert (tiles - ref).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("seed", range(4))
def test_pil_path_identical_on_random_sizes(seed: int) -> None:
    image, scales, max_tiles = _random_case(seed)
    tiles, block = nvila.preprocess(image, scales=scales, max_tiles=max_tiles)
    ref, ref_block = pil_preprocess(image, scales=scales, max_tiles=max_tiles)
    assert block == ref_block
    assert tiles.shape == ref.shape
    assert (tiles - ref).abs().max().item() <= 1e-5


def test_pil_path_custom_mean_std() -> None:
    image = _load(_photos()[0])
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tiles, _ = nvila.preprocess(image, scales=SMALL, mean=mean, std=std)
    ref, _ = pil_preprocess(image, scales=SMALL, mean=mean, std=std)
    assert (tiles - ref).abs().max().item() <= 1e-5


def test_tensor_path_close_to_pil_on_photos(photo_refs) -> None:  # type: ignore[no-untyped-def]
    for i, (name, image, ref, ref_block) in enumerate(photo_refs):
        fast_input = _chw(image) if i % 2 == 0 else np.array(image.convert("RGB"))
        tiles, block = nvila.preprocess(fast_input)
        assert block == ref_block, name
        assert tiles.shape == ref.shape and tiles.dtype == torch.float32, name
        assert (tiles - ref).abs().mean().item() <= 0.02, name


@pytest.mark.parametrize("seed", range(4))
def test_tensor_path_close_to_pil_on_random_sizes(seed: int) -> None:
    image, scales, max_tiles = _random_case(seed)
    ref, ref_block = pil_preprocess(image, scales=scales, max_tiles=max_tiles)
    tiles, block = nvila.preprocess(_chw(image), scales=scales, max_tiles=max_tiles)
    assert block == ref_block
    assert tiles.shape == ref.shape
    assert (tiles - ref).abs().mean().item() <= 0.02


def test_tensor_path_float_input_in_unit_range() -> None:
    image = _chw(_load(_photos()[0]))
    from_uint8, block = nvila.preprocess(image, scales=SMALL)
    from_float, block_f = nvila.preprocess(image.float() / 255.0, scales=SMALL)
    assert block == block_f
    # uint8 images are resized in uint8 (two separable passes, each rounded to integer levels and
    # clamped to [0, 255], as PIL does); float images are not. Away from clamped overshoot at sharp
    # edges they agree to a few levels. One level is 1 / (255 * std) in normalised units.
    level = 1 / (255 * 0.5)
    diff = (from_float - from_uint8).abs().flatten()
    assert diff.mean().item() <= level / 2
    assert torch.quantile(diff, 0.99).item() <= 5 * level


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "I;16", "CMYK"])
def test_pil_modes_converted_like_nvila(mode: str) -> None:
    image = _load(_photos()[0]).resize((120, 90))
    if mode == "I;16":
        converted = image.convert("L").convert("I;16")
    elif mode == "P":
        converted = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        converted = image.convert(mode)
    tiles, block = nvila.preprocess(converted, scales=SMALL)
    if mode == "I;16":  # the library's one 16-bit rule, round(v / 257), where NVILA clips
        scaled = np.rint(np.asarray(converted, dtype=np.float64) / 257.0).astype(np.uint8)
        converted = Image.fromarray(scaled).convert("RGB")
    ref, ref_block = pil_preprocess(converted, scales=SMALL)  # NVILA: image.convert("RGB")
    assert block == ref_block
    assert (tiles - ref).abs().max().item() <= 1e-5
    explicit, _ = nvila.preprocess(converted.convert("RGB"), scales=SMALL)
    assert torch.equal(tiles, explicit)


def test_tensor_and_numpy_channel_conversions() -> None:
    rgb = _chw(_load(_photos()[0]).resize((120, 90)))
    grey = rgb[:1]
    alpha = torch.full_like(grey, 7)
    expected_grey, block = nvila.preprocess(grey.expand(3, -1, -1).contiguous(), scales=SMALL)
    expected_rgb, _ = nvila.preprocess(rgb, scales=SMALL)
    cases = {
        "[1, H, W]": (grey, expected_grey),
        "[H, W]": (grey[0], expected_grey),
        "[2, H, W] grey + alpha": (torch.cat([grey, alpha]), expected_grey),
        "[4, H, W] RGBA": (torch.cat([rgb, alpha]), expected_rgb),
        "numpy [H, W]": (grey[0].numpy(), expected_grey),
        "numpy [H, W, 1]": (grey.permute(1, 2, 0).numpy(), expected_grey),
        "numpy [H, W, 4]": (torch.cat([rgb, alpha]).permute(1, 2, 0).numpy(), expected_rgb),
    }
    for name, (image, expected) in cases.items():
        tiles, got_block = nvila.preprocess(image, scales=SMALL)
        assert got_block == block, name
        assert torch.equal(tiles, expected), name


def test_grey_tensor_matches_grey_pil() -> None:
    grey = _load(_photos()[0]).resize((150, 100)).convert("L")
    ref, ref_block = pil_preprocess(grey, scales=SMALL)
    tiles, block = nvila.preprocess(torch.from_numpy(np.array(grey)), scales=SMALL)
    assert block == ref_block
    assert (tiles - ref).abs().mean().item() <= 0.02


def test_preprocess_batch_matches_per_image() -> None:
    rng = np.random.default_rng(7)
    pils = [
        _photo_at(rng, int(rng.integers(20, 400)), int(rng.integers(20, 400))) for _ in range(3)
    ]
    pils.append(pils[0].copy())  # two images of the same size share one resize in tile_images
    tensors = [_chw(im) for im in pils]
    tiles, blocks = nvila.preprocess_batch(tensors, scales=SMALL)
    singles = [nvila.preprocess(t, scales=SMALL) for t in tensors]
    assert blocks == [b for _, b in singles]
    torch.testing.assert_close(tiles, torch.cat([t for t, _ in singles]), atol=1e-6, rtol=0)

    mixed = [pils[0], tensors[1], np.array(pils[2]), pils[3]]
    tiles, blocks = nvila.preprocess_batch(mixed, scales=SMALL)
    singles = [nvila.preprocess(im, scales=SMALL) for im in mixed]
    assert blocks == [b for _, b in singles]
    torch.testing.assert_close(tiles, torch.cat([t for t, _ in singles]), atol=1e-6, rtol=0)
    offsets = np.cumsum([0] + [t.shape[0] for t, _ in singles])
    ref, _ = pil_preprocess(pils[0], scales=SMALL)
    assert torch.equal(tiles[: offsets[1]], ref)  # PIL images keep the exact PIL path in a batch


def test_preprocess_batch_tiles_tensors_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = nvila.prepare

    def counting(images, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(images))
        return real(images, **kwargs)

    monkeypatch.setattr(nvila, "prepare", counting)
    images = [torch.zeros(3, 50 + 10 * i, 80, dtype=torch.uint8) for i in range(5)]
    nvila.preprocess_batch(images, scales=SMALL)
    assert calls == [5]


# ----------------------------------------------------------------------------------- merge


def _tile_count(blocks: list[tuple[int, int]], scales: tuple[int, ...]) -> int:
    lower = sum((s // scales[0]) ** 2 for s in scales[:-1])
    return sum(lower + r * c for r, c in blocks)


@pytest.mark.parametrize("output_scale", [-1, 0, 1])
@pytest.mark.parametrize("layout", ["tokens", "maps"])
def test_merge_features_equals_loop(layout: str, output_scale: int) -> None:
    torch.manual_seed(0)
    blocks = [(3, 4), (1, 9), (2, 5), (3, 3), (4, 3)]
    n_tiles = _tile_count(blocks, DEFAULT)
    shape = (n_tiles, 6 * 6, 5) if layout == "tokens" else (n_tiles, 5, 6, 6)
    feats = torch.randn(shape)
    got = nvila.merge_features(feats, blocks, DEFAULT, output_scale=output_scale)
    ref = loop_merge(feats, blocks, DEFAULT, output_scale=output_scale)
    assert len(got) == len(ref) == len(blocks)
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert (g - r).abs().max().item() <= 1e-6


@settings(max_examples=25, deadline=None)
@given(
    blocks=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4),
    side=st.integers(1, 7),
    two_scales=st.booleans(),
)
def test_merge_features_equals_loop_property(
    blocks: list[tuple[int, int]], side: int, two_scales: bool
) -> None:
    scales = (16, 32) if two_scales else (16, 32, 48)
    feats = torch.randn(_tile_count(blocks, scales), side * side, 3)
    got = nvila.merge_features(feats, blocks, scales)
    ref = loop_merge(feats, blocks, scales)
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape
        assert (g - r).abs().max().item() <= 1e-6


def test_merge_features_half_precision_cast_back() -> None:
    torch.manual_seed(1)
    blocks = [(2, 5), (3, 4)]
    feats = torch.randn(_tile_count(blocks, DEFAULT), 16, 4).to(torch.bfloat16)
    got = nvila.merge_features(feats, blocks)
    ref = loop_merge(feats, blocks)
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, r, atol=1e-2, rtol=1e-2)


def test_merge_features_on_preprocessed_batch() -> None:
    images = [
        torch.zeros(3, 600, 1000, dtype=torch.uint8),
        torch.zeros(3, 100, 275, dtype=torch.uint8),
    ]
    tiles, blocks = nvila.preprocess_batch(images, scales=SMALL)
    # The tie rule compares the image area with the tile area, so 275 x 100 gets (2, 6) with
    # 32-pixel tiles where it gets (2, 5) with 448-pixel tiles.
    assert blocks == [(3, 4), (2, 6)] == [nvila_grid(1000, 600, SMALL), nvila_grid(275, 100, SMALL)]
    feats = torch.randn(tiles.shape[0], 4 * 4, 2)  # a stand-in backbone: 4 x 4 tokens per tile
    merged = nvila.merge_features(feats, blocks, SMALL)
    assert [tuple(m.shape) for m in merged] == [(6, 12, 16), (6, 8, 24)]


# --------------------------------------------------------------------------------- packing


def test_pack_tokens_order() -> None:
    fmap = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 4, 4)  # C=2
    tokens = nvila.pack_tokens(fmap)
    assert tokens.shape == (4, 8)
    # token 1 is the block at rows 0-1, cols 2-3: (r0 c2, r0 c3, r1 c2, r1 c3), C channels each
    expected = torch.stack([fmap[:, 0, 2], fmap[:, 0, 3], fmap[:, 1, 2], fmap[:, 1, 3]]).flatten()
    assert torch.equal(tokens[1], expected)
    assert torch.equal(tokens, pack_2x2(fmap))


def test_pack_tokens_odd_sizes_zero_padded() -> None:
    fmap = torch.randn(3, 5, 7) + 10.0
    tokens = nvila.pack_tokens(fmap)
    assert tokens.shape == (3 * 4, 12)
    assert torch.equal(tokens, pack_2x2(fmap))
    last = tokens.view(3, 4, 4, 3)[2, 3]  # bottom-right block: only (r0, c0) is real
    assert torch.equal(last[0], fmap[:, 4, 6])
    assert torch.all(last[1:] == 0)


@settings(max_examples=40, deadline=None)
@given(c=st.integers(1, 4), h=st.integers(1, 11), w=st.integers(1, 11))
def test_pack_tokens_equals_reference(c: int, h: int, w: int) -> None:
    fmap = torch.randn(c, h, w)
    tokens = nvila.pack_tokens(fmap)
    assert torch.equal(tokens, pack_2x2(fmap))
    assert tokens.shape[0] == -(-h // 2) * -(-w // 2)


def test_pack_tokens_factor_three_row_major() -> None:
    fmap = torch.arange(36.0).view(1, 6, 6)
    tokens = nvila.pack_tokens(fmap, factor=3)
    assert tokens.shape == (4, 9)
    assert tokens[0].tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14]
    assert nvila.pack_tokens(fmap, factor=1).shape == (36, 1)


def test_pack_tokens_batch_cu_seqlens() -> None:
    torch.manual_seed(2)
    maps = [torch.randn(4, 6, 8), torch.randn(4, 5, 3), torch.randn(4, 1, 1)]
    tokens, cu = nvila.pack_tokens_batch(maps)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 12, 18, 19]
    for b, fmap in enumerate(maps):
        assert torch.equal(tokens[cu[b] : cu[b + 1]], pack_2x2(fmap))


def test_pack_tokens_batch_on_merge_output_views() -> None:
    torch.manual_seed(3)
    blocks = [(3, 4), (2, 5)]
    feats = torch.randn(_tile_count(blocks, DEFAULT), 5 * 5, 3)  # odd 5 x 5 tokens per tile
    merged = nvila.merge_features(feats, blocks)
    tokens, cu = nvila.pack_tokens_batch(merged)
    ref = loop_merge(feats, blocks)
    for b, r in enumerate(ref):
        expected = pack_2x2(r)
        assert expected.shape[0] == nvila.num_tokens(blocks[b], tokens_per_tile_side=5)
        assert torch.allclose(tokens[cu[b] : cu[b + 1]], expected, atol=1e-6, rtol=0)
        assert torch.allclose(nvila.pack_tokens(merged[b]), expected, atol=1e-6, rtol=0)


@settings(max_examples=30, deadline=None)
@given(
    block=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    n=st.integers(1, 9),
    factor=st.integers(1, 3),
)
def test_num_tokens_agrees_with_packing(block: tuple[int, int], n: int, factor: int) -> None:
    rows, cols = block
    fmap = torch.zeros(1, rows * n, cols * n)
    packed = nvila.pack_tokens(fmap, factor=factor)
    assert packed.shape[0] == nvila.num_tokens(block, tokens_per_tile_side=n, factor=factor)


def test_end_to_end_token_count_on_photos() -> None:
    images = [_load(p) for p in _photos()[:3]]
    tiles, blocks = nvila.preprocess_batch(images, scales=SMALL)
    side = 3  # a stand-in backbone: 3 x 3 average-pooled cells per tile, 3 channels
    feats = torch.nn.functional.adaptive_avg_pool2d(tiles, side)
    merged = nvila.merge_features(feats, blocks, SMALL)
    tokens, cu = nvila.pack_tokens_batch(merged)
    counts = [nvila.num_tokens(b, tokens_per_tile_side=side) for b in blocks]
    assert np.diff(cu.numpy()).tolist() == counts
    assert tokens.shape == (sum(counts), 4 * 3 * 3)


# ---------------------------------------------------------------------------------- errors


def test_errors_name_the_argument() -> None:
    with pytest.raises(TypeError, match="images\\[0\\]"):
        nvila.preprocess("not an image")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        nvila.preprocess(torch.zeros(5, 10, 10, dtype=torch.uint8))
    with pytest.raises(TypeError, match="int64"):
        nvila.preprocess(torch.zeros(3, 10, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        nvila.preprocess(torch.zeros(3, 0, 10, dtype=torch.uint8))
    with pytest.raises(TypeError, match="mean"):
        nvila.preprocess(torch.zeros(3, 10, 10, dtype=torch.uint8), mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std"):
        nvila.preprocess(torch.zeros(3, 10, 10, dtype=torch.uint8), std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="max_tiles"):
        nvila.preprocess(torch.zeros(3, 10, 10, dtype=torch.uint8), max_tiles=4)
    with pytest.raises(TypeError, match="max_tiles"):
        nvila.preprocess(torch.zeros(3, 10, 10, dtype=torch.uint8), max_tiles=12.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale"):
        nvila.preprocess(torch.zeros(3, 10, 10, dtype=torch.uint8), scales=(448, 1000))
    with pytest.raises(ValueError, match="images"):
        nvila.preprocess_batch([])
    with pytest.raises(ValueError, match="need 17 tiles"):
        nvila.merge_features(torch.zeros(16, 4, 2), [(3, 4)])
    with pytest.raises(ValueError, match="square"):
        nvila.merge_features(torch.zeros(17, 5, 2), [(3, 4)])
    with pytest.raises(ValueError, match="output_scale"):
        nvila.merge_features(torch.zeros(17, 4, 2), [(3, 4)], output_scale=3)
    with pytest.raises(ValueError, match="block_sizes\\[0\\]"):
        nvila.merge_features(torch.zeros(17, 4, 2), [(0, 4)])
    with pytest.raises(TypeError, match="tile_features"):
        nvila.merge_features([[0.0]], [(3, 4)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="feature_map"):
        nvila.pack_tokens(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="factor"):
        nvila.pack_tokens(torch.zeros(1, 4, 4), factor=0)
    with pytest.raises(ValueError, match="feature_maps\\[1\\]"):
        nvila.pack_tokens_batch([torch.zeros(2, 4, 4), torch.zeros(3, 4, 4)])
    with pytest.raises(ValueError, match="tokens_per_tile_side"):
        nvila.num_tokens((3, 4), tokens_per_tile_side=0)
    with pytest.raises(TypeError, match="block_size"):
        nvila.num_tokens(3)  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensor_path_on_cuda_matches_cpu() -> None:
    images = [_chw(_load(p)) for p in _photos()[:3]]
    cpu_tiles, cpu_blocks = nvila.preprocess_batch(images)
    gpu_tiles, gpu_blocks = nvila.preprocess_batch([im.cuda() for im in images])
    assert gpu_tiles.is_cuda and gpu_blocks == cpu_blocks
    assert (gpu_tiles.cpu() - cpu_tiles).abs().mean().item() <= 1e-3
    merged = nvila.merge_features(torch.randn(gpu_tiles.shape[0], 16, 4, device="cuda"), gpu_blocks)
    tokens, cu = nvila.pack_tokens_batch(merged)
    assert tokens.is_cuda and cu.is_cuda
