"""``tile_images`` and ``collate`` against the documented resize-and-cut (issue 3).

The reference (``tests/_core_reference.py``) resizes one image at a time with ``F.interpolate``
(bicubic, antialias, ``align_corners=False``, float32), places it top-left in a ``pad_value`` canvas
and cuts it with explicit loops. The library groups images by size and cuts with one rearrange;
the two must agree to 1e-4 for every fit, policy, dtype and list of sizes hypothesis draws.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _core_reference import assert_within_one_ulp, random_images, ref_tiles
from hypothesis import given
from hypothesis import strategies as st

import dynamic_s2
from dynamic_s2 import TileBatch, TilePlan, collate, plan_tiles, tile_images

TOL = {"atol": 1e-4, "rtol": 1e-4}

# (scales, policies that accept them); tile size = scales[0] = 16.
SCALE_SETS: list[tuple[tuple[int, ...], tuple[str, ...]]] = [
    ((16,), ("aspect", "nvila")),
    ((16, 32), ("aspect", "nvila")),
    ((16, 32, 48), ("aspect", "nvila")),
    ((16, 40), ("aspect",)),
    ((16, 24, 56), ("aspect",)),
]

image_sizes = st.one_of(
    st.tuples(st.integers(1, 100), st.integers(1, 100)),
    st.tuples(st.integers(1, 12), st.integers(150, 400)),  # panoramas
    st.tuples(st.integers(150, 400), st.integers(1, 12)),  # tall strips
)


@st.composite
def plan_options(draw: st.DrawFn) -> dict[str, Any]:
    scales, policies = draw(st.sampled_from(SCALE_SETS))
    return {
        "scales": scales,
        "policy": draw(st.sampled_from(policies)),
        "fit": draw(st.sampled_from(["stretch", "pad"])),
    }


def make_plans(sizes: list[tuple[int, int]], options: dict[str, Any]) -> list[TilePlan]:
    return [plan_tiles(h, w, **options) for h, w in sizes]


def reference_batch(images: list[torch.Tensor], plans: list[TilePlan], **kw: Any) -> torch.Tensor:
    return torch.cat([ref_tiles(img, p, **kw) for img, p in zip(images, plans, strict=True)])


# ---------------------------------------------------------------------------------------------
# The documented resize-and-cut
# ---------------------------------------------------------------------------------------------


@given(
    sizes=st.lists(image_sizes, min_size=1, max_size=4),
    options=plan_options(),
    dtype=st.sampled_from([torch.uint8, torch.float32, torch.float64]),
    normalise=st.sampled_from(["none", "scalar", "per-channel"]),
    pad_value=st.sampled_from([0.0, -1.5, 0.25]),
    duplicate=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_tiles_equal_reference(
    sizes: list[tuple[int, int]],
    options: dict[str, Any],
    dtype: torch.dtype,
    normalise: str,
    pad_value: float,
    duplicate: bool,
    seed: int,
) -> None:
    if duplicate:  # equal sizes are grouped by the library: make sure groups appear
        sizes = [*sizes, sizes[0]]
    images = random_images(sizes, dtype=dtype, seed=seed)
    plans = make_plans(sizes, options)
    norm: dict[str, Any] = {
        "none": {},
        "scalar": {"mean": 0.5, "std": 0.25},
        "per-channel": {"mean": (0.48, 0.45, 0.40), "std": (0.27, 0.26, 0.28)},
    }[normalise]
    batch = tile_images(images, plans, pad_value=pad_value, **norm)
    # one rule: uint8 / 255 or float in [0, 1], then mean and std
    ref = reference_batch(images, plans, pad_value=pad_value, **norm)
    t = plans[0].tile_size
    assert isinstance(batch, TileBatch)
    assert batch.tiles.shape == (sum(p.num_tiles for p in plans), 3, t, t)
    assert batch.tiles.dtype == (torch.float32 if dtype == torch.uint8 else dtype)
    assert list(batch.plans) == plans
    torch.testing.assert_close(batch.tiles, ref, **TOL)


@given(
    sizes=st.lists(image_sizes, min_size=1, max_size=3),
    options=plan_options(),
    pad_value=st.sampled_from([0.0, -1.5]),
    seed=st.integers(0, 2**16),
)
def test_uint8_resize_equals_integer_kernel_then_normalise(
    sizes: list[tuple[int, int]], options: dict[str, Any], pad_value: float, seed: int
) -> None:
    """``uint8_resize=True``: torch's uint8 bicubic kernel, then ``/255`` and normalisation."""
    images = random_images(sizes, dtype=torch.uint8, seed=seed)
    plans = make_plans(sizes, options)
    norm = {"mean": (0.48, 0.45, 0.40), "std": (0.27, 0.26, 0.28)}
    fast = tile_images(images, plans, pad_value=pad_value, uint8_resize=True, **norm).tiles
    ref = reference_batch(images, plans, pad_value=pad_value, uint8_resize=True, **norm)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, **TOL)


@pytest.mark.parametrize("fit", ["stretch", "pad"])
def test_pad_region_is_exactly_pad_value(fit: str) -> None:
    """Outside the content box every pixel is ``pad_value``; inside, none is (for fit='pad')."""
    images = random_images([(10, 70), (70, 9), (33, 33)], dtype=torch.uint8, seed=3)
    plans = [plan_tiles(*img.shape[1:], (16, 32, 48), fit=fit) for img in images]
    pad = -7.0  # unreachable by normalised uint8 data
    tiles = tile_images(images, plans, mean=0.5, std=0.5, pad_value=pad).tiles
    k = 0
    for p in plans:
        for sp in p.scales:
            rows, cols = sp.grid
            t = sp.tile_size
            canvas = torch.empty(3, rows * t, cols * t)
            for r in range(rows):
                for c in range(cols):
                    canvas[:, r * t : (r + 1) * t, c * t : (c + 1) * t] = tiles[k]
                    k += 1
            ch, cw = sp.content_size
            inside = torch.zeros(canvas.shape[1:], dtype=torch.bool)
            inside[:ch, :cw] = True
            assert (canvas[:, ~inside] == pad).all()
            assert (canvas[:, inside] != pad).all()
            if fit == "stretch":
                assert inside.all()
    assert k == tiles.shape[0]


def test_tile_order_is_exact_when_no_resize_is_needed() -> None:
    """Content size == image size: tiles are exact crops, in the documented order."""
    a = torch.arange(3 * 32 * 48, dtype=torch.float32).view(3, 32, 48)
    b = -torch.arange(3 * 16 * 32, dtype=torch.float32).view(3, 16, 32)

    def plan(h: int, w: int, grids: list[tuple[int, int]]) -> TilePlan:
        return TilePlan.from_dict(
            {
                "image_size": [h, w],
                "tile_size": 16,
                "scales": [
                    {"scale": 16 * (i + 1), "grid": list(g), "content_size": [16 * g[0], 16 * g[1]]}
                    for i, g in enumerate(grids)
                ],
            }
        )

    # a: scale 0 has content 16x16 (a resize), scale 1 is the image itself cut 2x3.
    pa = plan(32, 48, [(1, 1), (2, 3)])
    pb = plan(16, 32, [(1, 2)])
    tiles = tile_images([a, b], [pa, pb]).tiles
    assert tiles.shape[0] == 1 + 6 + 2
    expected_a = [
        a[:, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] for r in range(2) for c in range(3)
    ]
    expected_b = [b[:, :, c * 16 : (c + 1) * 16] for c in range(2)]
    for got, want in zip(tiles[1:7], expected_a, strict=True):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    for got, want in zip(tiles[7:], expected_b, strict=True):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_follows_input_dtype(dtype: torch.dtype) -> None:
    images = random_images([(20, 70), (45, 30)], dtype=dtype, seed=1)
    plans = [plan_tiles(*img.shape[1:], (16, 32), fit="pad") for img in images]
    tiles = tile_images(images, plans).tiles
    assert tiles.dtype == dtype
    ref = reference_batch(images, plans)
    assert ref.dtype == dtype
    # resize in float32, cast back: at most one rounding step of the half type apart
    assert_within_one_ulp(tiles, ref)


def test_uint8_without_stats_is_in_unit_range() -> None:
    image = torch.tensor([0, 255], dtype=torch.uint8).repeat_interleave(8).view(1, 1, 16)
    image = image.expand(3, 16, 16).contiguous()
    tiles = tile_images([image], [plan_tiles(16, 16, (16,))]).tiles
    assert tiles.dtype == torch.float32
    torch.testing.assert_close(tiles[0], image.float() / 255.0)


@given(
    size=st.tuples(st.integers(2, 60), st.integers(2, 60)),
    options=plan_options(),
    seed=st.integers(0, 2**16),
)
def test_float_images_follow_the_uint8_rule(
    size: tuple[int, int], options: dict[str, Any], seed: int
) -> None:
    """One normalisation rule: a float image ``u / 255`` tiles as the uint8 image ``u`` does."""
    (image,) = random_images([size], dtype=torch.uint8, seed=seed)
    plans = make_plans([size], options)
    norm = {"mean": (0.48, 0.45, 0.40), "std": (0.27, 0.26, 0.28)}
    from_uint8 = tile_images([image], plans, **norm).tiles
    from_float = tile_images([image.float() / 255.0], plans, **norm).tiles
    torch.testing.assert_close(from_float, from_uint8, atol=2e-5, rtol=1e-5)


def test_float_images_outside_zero_one_are_refused_unless_stats_are_identity() -> None:
    plans = [plan_tiles(24, 40, (16, 32))]
    image = random_images([(24, 40)], dtype=torch.uint8, seed=2)[0].float()  # 0..255 floats
    with pytest.raises(ValueError, match=r"float image with values in \[0, 25"):
        tile_images([image], plans, mean=0.5, std=0.5)
    normalised = (image / 255.0 - 0.5) / 0.5  # in [-1, 1]: already normalised
    with pytest.raises(ValueError, match=r"mean=0\.0, std=1\.0"):
        tile_images([normalised], plans, mean=0.5, std=0.5)
    plain = tile_images([normalised], plans).tiles  # no stats: used as they are
    identity = tile_images([normalised], plans, mean=0.0, std=1.0).tiles
    torch.testing.assert_close(identity, plain, atol=0, rtol=0)
    assert float(plain.min()) < -0.5  # not normalised a second time


# ---------------------------------------------------------------------------------------------
# Input forms
# ---------------------------------------------------------------------------------------------


@given(
    batch=st.integers(1, 3),
    size=st.tuples(st.integers(1, 80), st.integers(1, 80)),
    options=plan_options(),
    channels_last=st.booleans(),
    uint8=st.booleans(),
)
def test_batched_tensor_equals_list(
    batch: int, size: tuple[int, int], options: dict[str, Any], channels_last: bool, uint8: bool
) -> None:
    images = random_images([size] * batch, dtype=torch.uint8 if uint8 else torch.float32, seed=5)
    stacked = torch.stack(images)
    if channels_last:
        stacked = stacked.contiguous(memory_format=torch.channels_last)
    plans = make_plans([size] * batch, options)
    from_list = tile_images(images, plans, mean=0.5, std=0.5)
    from_tensor = tile_images(stacked, plans, mean=0.5, std=0.5)
    torch.testing.assert_close(from_tensor.tiles, from_list.tiles, atol=1e-6, rtol=1e-6)
    assert list(from_tensor.plans) == list(from_list.plans)


def test_non_contiguous_images() -> None:
    base = random_images([(60, 90)], seed=4)[0]
    views = [base[:, 5:40, 3:80], base[:, ::2, ::3], base.transpose(1, 2)]
    plans = [plan_tiles(*v.shape[1:], (16, 32, 48), fit="pad") for v in views]
    got = tile_images(views, plans).tiles
    ref = reference_batch([v.contiguous() for v in views], plans)
    torch.testing.assert_close(got, ref, **TOL)


def test_single_plan_for_single_image() -> None:
    image = random_images([(30, 50)])[0]
    plan = plan_tiles(30, 50, (16, 32))
    torch.testing.assert_close(
        tile_images([image], plan).tiles, tile_images([image], [plan]).tiles, atol=0, rtol=0
    )


# ---------------------------------------------------------------------------------------------
# collate and DataLoader
# ---------------------------------------------------------------------------------------------


@given(
    sizes=st.lists(image_sizes, min_size=2, max_size=5),
    options=plan_options(),
    cut=st.integers(1, 4),
)
def test_collate_concatenates(
    sizes: list[tuple[int, int]], options: dict[str, Any], cut: int
) -> None:
    cut = min(cut, len(sizes) - 1)
    images = random_images(sizes, dtype=torch.uint8, seed=7)
    plans = make_plans(sizes, options)
    whole = tile_images(images, plans, mean=0.5, std=0.25)
    parts = [
        tile_images(images[:cut], plans[:cut], mean=0.5, std=0.25),
        tile_images(images[cut:], plans[cut:], mean=0.5, std=0.25),
    ]
    joined = collate(parts)
    assert isinstance(joined, TileBatch)
    assert list(joined.plans) == plans
    torch.testing.assert_close(joined.tiles, whole.tiles, atol=1e-6, rtol=1e-6)


def test_collate_errors() -> None:
    with pytest.raises(ValueError):
        collate([])
    with pytest.raises(TypeError):
        collate([torch.zeros(1, 3, 16, 16)])  # type: ignore[list-item]


def test_collate_refuses_mismatched_batches() -> None:
    image = random_images([(20, 20)])[0]
    small = tile_images([image], [plan_tiles(20, 20, (16,))])
    with pytest.raises(ValueError, match="tile size"):
        collate([small, tile_images([image], [plan_tiles(20, 20, (32,))])])
    with pytest.raises(ValueError, match="float64"):
        collate([small, tile_images([image.double()], [plan_tiles(20, 20, (16,))])])
    with pytest.raises(ValueError, match="channels"):
        collate([small, tile_images([image[:1]], [plan_tiles(20, 20, (16,))])])


class TileDataset(torch.utils.data.Dataset):
    """One image per item, tiled in the worker (as a user's data pipeline would)."""

    def __init__(self, images: list[torch.Tensor], scales: tuple[int, ...]):
        self.images = images
        self.scales = scales

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> TileBatch:
        image = self.images[index]
        plan = plan_tiles(image.shape[1], image.shape[2], self.scales, fit="pad")
        return tile_images([image], [plan], mean=(0.48, 0.45, 0.4), std=(0.27, 0.26, 0.28))


def test_dataloader_workers_give_the_direct_tiles() -> None:
    sizes = [(40, 60), (17, 90), (64, 64), (5, 200), (90, 30), (40, 60), (1, 1)]
    images = random_images(sizes, dtype=torch.uint8, seed=11)
    scales = (16, 32, 48)
    loader = torch.utils.data.DataLoader(
        TileDataset(images, scales),
        batch_size=3,
        num_workers=2,
        collate_fn=dynamic_s2.collate,
        timeout=120,
    )
    batches = list(loader)
    assert [len(b.plans) for b in batches] == [3, 3, 1]
    got = collate(batches)
    plans = [plan_tiles(h, w, scales, fit="pad") for h, w in sizes]
    direct = tile_images(images, plans, mean=(0.48, 0.45, 0.4), std=(0.27, 0.26, 0.28))
    assert list(got.plans) == plans
    torch.testing.assert_close(got.tiles, direct.tiles, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Device and dtype rules, errors
# ---------------------------------------------------------------------------------------------


def _devices() -> list[str]:
    devices = ["meta"]  # shape and device propagation without data, on any machine
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16])
def test_output_on_input_device(device: str, dtype: torch.dtype) -> None:
    sizes = [(30, 50), (30, 50), (12, 80)]
    images = [img.to(device) for img in random_images(sizes, dtype=dtype, seed=1)]
    plans = [plan_tiles(h, w, (16, 32), fit="pad") for h, w in sizes]
    batch = tile_images(images, plans, mean=0.5, std=0.5)
    assert batch.tiles.device.type == device
    assert batch.tiles.dtype == (torch.float32 if dtype == torch.uint8 else dtype)
    assert batch.tiles.shape == (sum(p.num_tiles for p in plans), 3, 16, 16)
    if device != "meta":
        ref = reference_batch([img.cpu() for img in images], plans, mean=0.5, std=0.5)
        torch.testing.assert_close(batch.tiles.cpu().float(), ref.float(), atol=1e-2, rtol=1e-2)


def test_errors_name_the_problem() -> None:
    image = random_images([(20, 30)])[0]
    with pytest.raises(ValueError, match="plans"):
        tile_images([image], [plan_tiles(30, 20, (16,))])  # plan for the transposed size
    with pytest.raises(ValueError, match="plans"):
        tile_images([image, image], [plan_tiles(20, 30, (16,))] * 3)
    with pytest.raises(TypeError, match="uint8 or floating"):
        tile_images([image.to(torch.int32)], [plan_tiles(20, 30, (16,))])
    with pytest.raises(ValueError, match="channels"):
        tile_images([image, image[:1]], [plan_tiles(20, 30, (16,))] * 2)
    with pytest.raises(ValueError):
        tile_images(image, [plan_tiles(20, 30, (16,))])  # a single [C, H, W] tensor
    with pytest.raises(ValueError, match="std"):
        tile_images([image.to(torch.uint8)], [plan_tiles(20, 30, (16,))], mean=0.5, std=0.0)
