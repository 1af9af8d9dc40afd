"""The fused merge-and-pack (``nvila.merge_and_pack``, ``merge(..., pack=k)``) against VILA's path.

The reference below is written in this file from VILA's published algorithm (NVlabs/VILA,
``llava/model/llava_arch.py`` ``merge_features_for_dynamic_s2`` with ``merge_chessboard``, and
``DownSampleBlock`` of ``llava/model/multimodal_projector/base_projector.py``), sharing no code
with the library: per image, every scale's ``[n, C, h, w]`` tile maps are stitched by ``torch.cat``
(chessboard merge), area-interpolated in float32 to the last scale's map and concatenated on
channels; then the ``[1, H, W, C]`` map is zero-padded to even sizes by concatenation, and pairs of
columns, then of rows, are folded into channels by ``view`` / ``permute`` as ``DownSampleBlock``
does.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamic_s2 import merge, nvila, plan_tiles
from dynamic_s2.plan import nvila_plan_for_block

SCALES = (32, 64, 96)
#: Every last-scale grid NVILA can choose with its defaults: rows·cols in [9, 12].
NVILA_GRIDS = [(r, c) for r in range(1, 13) for c in range(1, 13) if 9 <= r * c <= 12]


# ----------------------------------------------------------------- VILA's path, written afresh


def vila_merge_chessboard(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[rows·cols, C, h, w]`` -> ``[1, C, rows·h, cols·w]`` by concatenation, row-major tiles."""
    strips = [torch.cat(list(x[r * cols : (r + 1) * cols]), dim=-1) for r in range(rows)]
    return torch.cat(strips, dim=-2)[None]


def vila_merge(features: torch.Tensor, blocks: list[tuple[int, int]]) -> list[torch.Tensor]:
    """``merge_features_for_dynamic_s2``: ``[T, N, C]`` tokens -> one ``[C·S, H, W]`` per image."""
    side = math.isqrt(features.shape[1])
    maps = features.transpose(1, 2).reshape(features.shape[0], -1, side, side)
    out, start = [], 0
    for rows, cols in blocks:
        grids = [(s // SCALES[0],) * 2 for s in SCALES[:-1]] + [(rows, cols)]
        stitched = []
        for r, c in grids:
            stitched.append(vila_merge_chessboard(maps[start : start + r * c], r, c))
            start += r * c
        size = stitched[-1].shape[-2:]
        resized = [
            F.interpolate(m.to(torch.float32), size=size, mode="area").to(m.dtype) for m in stitched
        ]
        out.append(torch.cat(resized, dim=1)[0])
    return out


def vila_downsample(x: torch.Tensor) -> torch.Tensor:
    """``DownSampleBlock`` on ``[1, A, B, C]``: zero-pad to even, fold 2×2 -> ``[A/2·B/2, 4C]``."""
    n, a, b, c = x.shape
    if a % 2:
        x = torch.cat([x, x.new_zeros(n, 1, b, c)], dim=1)
        a += 1
    if b % 2:
        x = torch.cat([x, x.new_zeros(n, a, 1, c)], dim=2)
        b += 1
    x = x.contiguous().view(n, a, b // 2, c * 2).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, b // 2, a // 2, c * 4).permute(0, 2, 1, 3).contiguous()
    return x.reshape(-1, c * 4)


def vila_tokens(features: torch.Tensor, blocks: list[tuple[int, int]]) -> torch.Tensor:
    merged = vila_merge(features, blocks)
    return torch.cat([vila_downsample(m.permute(1, 2, 0)[None]) for m in merged])


def nvila_plans(blocks: list[tuple[int, int]]) -> list:
    return [nvila_plan_for_block(b, SCALES) for b in blocks]


def random_features(plans: list, side: int, channels: int, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(p.num_tiles for p in plans)
    return torch.randn(total, side * side, channels, generator=gen, dtype=torch.float64).to(dtype)


# -------------------------------------------------------------------------------- equalities


@pytest.mark.parametrize("side", [4, 3, 5])
def test_every_nvila_grid_equals_vila(side: int) -> None:
    blocks = [*NVILA_GRIDS, (1, 1), (2, 3)]
    plans = nvila_plans(blocks)
    feats = random_features(plans, side, 6)
    tokens, cu = nvila.merge_and_pack(feats, plans)
    expected = vila_tokens(feats, blocks)
    assert tokens.shape == expected.shape
    torch.testing.assert_close(tokens, expected, atol=1e-6, rtol=0)
    counts = [nvila.num_tokens(b, tokens_per_tile_side=side) for b in blocks]
    assert cu.tolist() == [sum(counts[:i]) for i in range(len(counts) + 1)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_computed_in_float32(dtype: torch.dtype) -> None:
    blocks = [(3, 4), (1, 9), (2, 5), (3, 3)]
    plans = nvila_plans(blocks)
    feats = random_features(plans, 3, 8, dtype)
    tokens, _ = nvila.merge_and_pack(feats, plans)
    assert tokens.dtype == dtype
    exact = nvila.merge_and_pack(feats.double(), plans)[0]
    # Each value is its float64 sum rounded once to the half type: within half an ulp of it.
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((tokens.double() - exact).abs() <= ulp).all()
    torch.testing.assert_close(tokens, vila_tokens(feats, blocks), atol=0, rtol=2 * ulp.max())


def test_channel_major_input_equals_contiguous() -> None:
    blocks = [(3, 4), (2, 6), (1, 9)]
    plans = nvila_plans(blocks)
    feats = random_features(plans, 4, 8)
    hf = feats.transpose(1, 2).contiguous().transpose(1, 2)  # HF layout: strides (N·C, 1, N)
    assert hf.stride() == (16 * 8, 1, 16)
    assert torch.equal(nvila.merge_and_pack(hf, plans)[0], nvila.merge_and_pack(feats, plans)[0])
    maps = feats.transpose(1, 2).reshape(-1, 8, 4, 4)  # ConvNet maps [T, C, h, w]
    assert torch.equal(nvila.merge_and_pack(maps, plans)[0], vila_tokens(feats, blocks))


def test_out_buffer_is_filled_and_reused() -> None:
    blocks = [(3, 4), (2, 5)]
    plans = nvila_plans(blocks)
    fresh, _ = nvila.merge_and_pack(random_features(plans, 3, 4), plans)
    out = torch.full_like(fresh, float("nan"))
    for seed in (1, 2):
        feats = random_features(plans, 3, 4, seed=seed)
        tokens, _ = nvila.merge_and_pack(feats, plans, out=out)
        assert tokens.data_ptr() == out.data_ptr()
        assert torch.equal(out, vila_tokens(feats, blocks))


@pytest.mark.parametrize(
    "out, error",
    [
        (torch.zeros(3, 3), ValueError),
        (torch.zeros(30, 96, dtype=torch.float64), ValueError),
        (torch.zeros(96, 30).t(), ValueError),
        ("buffer", TypeError),
    ],
)
def test_bad_out_is_rejected_untouched(out: object, error: type) -> None:
    plans = nvila_plans([(2, 5)])
    feats = random_features(plans, 2, 4)
    before = out.clone() if isinstance(out, torch.Tensor) else None
    with pytest.raises(error, match="out"):
        nvila.merge_and_pack(feats, plans, out=out)
    if before is not None:
        assert torch.equal(out, before)


def test_bad_arguments() -> None:
    plans = nvila_plans([(2, 5)])
    feats = random_features(plans, 2, 4)
    with pytest.raises(ValueError, match="factor"):
        nvila.merge_and_pack(feats, plans, factor=0)
    with pytest.raises(ValueError, match="tile_features"):
        nvila.merge_and_pack(feats[1:], plans)
    with pytest.raises(TypeError, match="plans"):
        nvila.merge_and_pack(feats, [(2, 5)])
    with pytest.raises(ValueError, match="autograd"):
        nvila.merge_and_pack(feats.requires_grad_(), plans, out=torch.empty(15, 48))


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_gradients_equal_the_unfused_path(factor: int) -> None:
    blocks = [(3, 4), (1, 9), (2, 5)]
    plans = nvila_plans(blocks)
    base = random_features(plans, 3, 4, torch.float64)
    fused_in = base.clone().requires_grad_()
    plain_in = base.clone().requires_grad_()
    tokens, _ = nvila.merge_and_pack(fused_in, plans, factor=factor)
    merged = nvila.merge_features(plain_in, blocks, scales=SCALES)
    plain, _ = nvila.pack_tokens_batch(merged, factor=factor)
    torch.testing.assert_close(tokens, plain, atol=1e-12, rtol=0)
    upstream = torch.randn_like(tokens)
    (tokens * upstream).sum().backward()
    (plain * upstream).sum().backward()
    torch.testing.assert_close(fused_in.grad, plain_in.grad, atol=1e-12, rtol=0)


def test_gradcheck_channel_major() -> None:
    plans = nvila_plans([(2, 5)])
    base = random_features(plans, 2, 3, torch.float64)
    hf = base.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: nvila.merge_and_pack(x, plans)[0], (hf,))


# ------------------------------------------------------------------- generic path: merge(pack=)


def ref_pack(feature_map: torch.Tensor, k: int) -> torch.Tensor:
    """``[h, w, C]`` -> ``[⌈h/k⌉·⌈w/k⌉, k²·C]``: zero-pad, then blocks by explicit loops."""
    h, w, c = feature_map.shape
    hp, wp = -(-h // k) * k, -(-w // k) * k
    padded = feature_map.new_zeros(hp, wp, c)
    padded[:h, :w] = feature_map
    tokens = []
    for ty in range(hp // k):
        for tx in range(wp // k):
            cells = [padded[ty * k + i, tx * k + j] for i in range(k) for j in range(k)]
            tokens.append(torch.cat(cells))
    return torch.stack(tokens)


@settings(max_examples=25)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 200), st.integers(1, 200)), min_size=1, max_size=3),
    scales=st.sampled_from([(16, 40), (16, 24, 56), (16, 32, 48)]),
    fit=st.sampled_from(["stretch", "pad"]),
    resample=st.sampled_from(["area", "bilinear"]),
    k=st.integers(1, 3),
    output_scale=st.sampled_from([0, -1]),
    channel_major=st.booleans(),
)
def test_merge_pack_equals_merge_then_pack(
    sizes, scales, fit, resample, k, output_scale, channel_major
) -> None:
    plans = [plan_tiles(h, w, scales, fit=fit) for h, w in sizes]
    total = sum(p.num_tiles for p in plans)
    feats = torch.randn(total, 1 + 9, 5, dtype=torch.float64)  # CLS + 3 × 3 tokens
    if channel_major:
        feats = feats.transpose(1, 2).contiguous().transpose(1, 2)
    kwargs = {"output_scale": output_scale, "resample": resample}
    plain = merge(feats, plans, **kwargs)
    packed = merge(feats, plans, pack=k, **kwargs)
    assert packed.sizes == [(-(-h // k), -(-w // k)) for h, w in plain.sizes]
    for got, want in zip(packed.unpad(), plain.unpad(), strict=True):
        torch.testing.assert_close(got.flatten(0, 1), ref_pack(want, k), atol=1e-12, rtol=0)
    torch.testing.assert_close(packed.prefix, plain.prefix)
    # The padded view of packed tokens is built lazily and agrees with unpad().
    for b, got in enumerate(packed.unpad()):
        h, w = packed.sizes[b]
        assert torch.equal(packed.features[b, :h, :w], got)
        assert int(packed.mask[b].sum()) == h * w


def test_merge_pack_names_the_argument() -> None:
    plans = [plan_tiles(40, 60, (16, 32))]
    feats = torch.randn(plans[0].num_tiles, 9, 2)
    with pytest.raises(ValueError, match="pack"):
        merge(feats, plans, pack=0)
    with pytest.raises(TypeError, match="pack"):
        merge(feats, plans, pack=2.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu() -> None:  # pragma: no cover - runs only where CUDA is
    blocks = [(3, 4), (1, 9), (2, 5)]
    plans = nvila_plans(blocks)
    feats = random_features(plans, 4, 8)
    cpu, cu_cpu = nvila.merge_and_pack(feats, plans)
    for x in (feats.cuda(), feats.cuda().transpose(1, 2).contiguous().transpose(1, 2)):
        gpu, cu_gpu = nvila.merge_and_pack(x, plans)
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-6, rtol=0)
        assert cu_gpu.tolist() == cu_cpu.tolist()
    half, _ = nvila.merge_and_pack(feats.cuda().bfloat16(), plans)
    torch.testing.assert_close(half.float().cpu(), cpu, atol=0.05, rtol=0.02)
