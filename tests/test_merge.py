"""``merge`` against an independent per-image loop, and NVILA's merge semantics (issue 3).

The reference (``tests/_core_reference.py``) stitches every image's tiles with ``torch.cat``, crops
to ``ceil(content · n / t)``, resamples each scale with ``F.interpolate`` in float32 and
concatenates the scales. The library's merge is a set of fused gathers computed from the plans;
hypothesis draws plans, token layouts, output scales, resampling modes and memory layouts and the
two must agree. The padded view, the mask and the packed output are checked against each other.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from _core_reference import assert_within_one_ulp, nvila_merge, ref_merge
from hypothesis import given
from hypothesis import strategies as st

from dynamic_s2 import MultiScaleFeatures, TilePlan, merge, plan_tiles
from dynamic_s2.merge import PrefixGuessWarning

SCALE_SETS: list[tuple[tuple[int, ...], tuple[str, ...]]] = [
    ((16,), ("aspect", "nvila")),
    ((16, 32), ("aspect", "nvila")),
    ((16, 32, 48), ("aspect", "nvila")),
    ((16, 40), ("aspect",)),
    ((16, 24, 56), ("aspect",)),
]

image_sizes = st.one_of(
    st.tuples(st.integers(1, 120), st.integers(1, 120)),
    st.tuples(st.integers(1, 12), st.integers(150, 300)),
    st.tuples(st.integers(150, 300), st.integers(1, 12)),
)


def merge_checking_guess(feats: torch.Tensor, plans: list[TilePlan], **kwargs: Any) -> Any:
    """``merge``, asserting that it warns with :class:`PrefixGuessWarning` exactly when the prefix
    count is guessed (tokens, no ``num_prefix_tokens``) as more than one grid row, ``N - ⌊√N⌋²
    > ⌊√N⌋``."""
    n = feats.shape[1]
    guessed = feats.dim() == 3 and kwargs.get("num_prefix_tokens") is None
    if guessed and n - math.isqrt(n) ** 2 > math.isqrt(n):
        with pytest.warns(PrefixGuessWarning, match=f"{n} tokens"):
            return merge(feats, plans, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrefixGuessWarning)
        return merge(feats, plans, **kwargs)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    if dtype == torch.float64:
        return {"atol": 1e-10, "rtol": 1e-10}
    if dtype == torch.float32:
        return {"atol": 1e-5, "rtol": 1e-5}
    return {"atol": 1e-2, "rtol": 1e-2}


@st.composite
def merge_cases(draw: st.DrawFn) -> dict[str, Any]:
    scales, policies = draw(st.sampled_from(SCALE_SETS))
    policy = draw(st.sampled_from(policies))
    fit = draw(st.sampled_from(["stretch", "pad"]))
    sizes = draw(st.lists(image_sizes, min_size=1, max_size=4))
    plans = [plan_tiles(h, w, scales, policy=policy, fit=fit) for h, w in sizes]
    layout = draw(st.sampled_from(["tokens", "maps"]))
    return {
        "plans": plans,
        "layout": layout,
        "side": draw(st.integers(1, 4)),
        "channels": draw(st.integers(1, 3)),
        "prefix": draw(st.integers(0, 2)) if layout == "tokens" else 0,
        "explicit_prefix": draw(st.booleans()),
        "output_scale": draw(st.integers(-len(scales), len(scales) - 1)),
        "mode": draw(st.sampled_from(["area", "bilinear"])),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "memory": draw(st.sampled_from(["contiguous", "strided", "channels_last"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def make_features(case: dict[str, Any]) -> torch.Tensor:
    """Positive random tile features in the requested layout and memory format."""
    total = sum(p.num_tiles for p in case["plans"])
    side, channels = case["side"], case["channels"]
    g = torch.Generator().manual_seed(case["seed"])
    if case["layout"] == "tokens":
        x = torch.rand(total, case["prefix"] + side * side, channels, generator=g) + 0.5
        if case["memory"] != "contiguous":  # same values, channels not innermost-contiguous
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        x = torch.rand(total, channels, side, side, generator=g) + 0.5
        if case["memory"] == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif case["memory"] == "strided":
            x = torch.rand(total, channels, side, 2 * side, generator=g)[..., ::2] + 0.5
    return x.to(case["dtype"])


def check_outputs(
    out: MultiScaleFeatures,
    ref_maps: list[torch.Tensor],
    ref_prefix: list[torch.Tensor] | None,
    tol: dict[str, float],
) -> None:
    """Unpad, padded view, mask, pack and prefix against the reference and each other."""
    batch = len(ref_maps)
    channels = ref_maps[0].shape[-1]
    sizes = [tuple(m.shape[:2]) for m in ref_maps]
    assert out.sizes == sizes
    unpadded = out.unpad()
    assert len(unpadded) == batch
    for got, want in zip(unpadded, ref_maps, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tol)

    hmax = max(h for h, _ in sizes)
    wmax = max(w for _, w in sizes)
    assert out.features.shape == (batch, hmax, wmax, channels)
    assert out.mask.shape == (batch, hmax, wmax)
    assert out.mask.dtype == torch.bool
    for b, (h, w) in enumerate(sizes):
        assert int(out.mask[b].sum()) == h * w
        assert bool(out.mask[b, :h, :w].all())
        torch.testing.assert_close(out.features[b, :h, :w], unpadded[b], atol=0, rtol=0)
    assert bool((out.features[~out.mask] == 0).all())

    tokens, cu = out.pack()
    assert cu.dtype == torch.int32
    assert cu.shape == (batch + 1,)
    assert cu.tolist() == [0, *itertools_accumulate([h * w for h, w in sizes])]
    assert tokens.shape == (cu[-1].item(), channels)
    for b in range(batch):
        torch.testing.assert_close(
            tokens[cu[b] : cu[b + 1]], unpadded[b].reshape(-1, channels), atol=0, rtol=0
        )
    torch.testing.assert_close(tokens, out.features[out.mask], atol=0, rtol=0)

    if ref_prefix is None:
        assert out.prefix is None
    else:
        assert out.prefix is not None
        torch.testing.assert_close(out.prefix, torch.stack(ref_prefix), **tol)


def itertools_accumulate(values: list[int]) -> list[int]:
    total, out = 0, []
    for v in values:
        total += v
        out.append(total)
    return out


# ---------------------------------------------------------------------------------------------
# Equivalence with the per-image loop
# ---------------------------------------------------------------------------------------------


@given(merge_cases())
def test_merge_equals_per_image_loop(case: dict[str, Any]) -> None:
    feats = make_features(case)
    kwargs: dict[str, Any] = {"output_scale": case["output_scale"], "resample": case["mode"]}
    if case["explicit_prefix"]:
        kwargs["num_prefix_tokens"] = case["prefix"] if case["layout"] == "tokens" else None
    out = merge_checking_guess(feats, case["plans"], **kwargs)
    ref_maps, ref_prefix = ref_merge(
        feats,
        case["plans"],
        num_prefix=case["prefix"],
        output_scale=case["output_scale"],
        mode=case["mode"],
    )
    # the valid grid is the output scale's ceil(content · n / t), independently of the resampling
    for plan, m in zip(case["plans"], ref_maps, strict=True):
        sp = plan.scales[case["output_scale"]]
        n, t = case["side"], plan.tile_size
        expect = (math.ceil(sp.content_size[0] * n / t), math.ceil(sp.content_size[1] * n / t))
        assert tuple(m.shape) == (*expect, plan.num_scales * case["channels"])
    check_outputs(out, ref_maps, ref_prefix, tolerance(case["dtype"]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["area", "bilinear"])
def test_half_precision_merge(dtype: torch.dtype, mode: str) -> None:
    """Half inputs are resampled in float32 and cast back: output dtype follows the input."""
    plans = [plan_tiles(h, w, (16, 32, 48), fit="pad") for h, w in [(30, 70), (64, 20), (5, 5)]]
    total = sum(p.num_tiles for p in plans)
    feats = (torch.rand(total, 2 + 9, 4, generator=torch.Generator().manual_seed(0)) + 0.5).to(
        dtype
    )
    out = merge(feats, plans, resample=mode, output_scale=1)
    ref_maps, ref_prefix = ref_merge(feats, plans, num_prefix=2, output_scale=1, mode=mode)
    assert out.tokens.dtype == dtype
    assert out.prefix is not None and out.prefix.dtype == dtype
    check_outputs(out, ref_maps, ref_prefix, tolerance(dtype))
    # computed in float32 and rounded once, as the reference: at most one ulp apart
    for got, want in zip(out.unpad(), ref_maps, strict=True):
        assert_within_one_ulp(got, want)
    assert_within_one_ulp(out.prefix, torch.stack(ref_prefix))


@given(case=merge_cases())
def test_merge_gradients_equal_reference(case: dict[str, Any]) -> None:
    feats = make_features(case).detach().requires_grad_(True)
    kwargs = {"output_scale": case["output_scale"], "resample": case["mode"]}
    out = merge_checking_guess(feats, case["plans"], **kwargs)
    ref_maps, ref_prefix = ref_merge(
        feats,
        case["plans"],
        num_prefix=case["prefix"],
        output_scale=case["output_scale"],
        mode=case["mode"],
    )
    g = torch.Generator().manual_seed(1)
    weights = torch.rand(out.tokens.shape, generator=g, dtype=out.tokens.dtype)
    loss = (out.tokens * weights).sum()
    ref_tokens = torch.cat([m.reshape(-1, m.shape[-1]) for m in ref_maps])
    ref_loss = (ref_tokens * weights).sum()
    if ref_prefix is not None:
        assert out.prefix is not None
        pw = torch.rand(out.prefix.shape, generator=g, dtype=out.prefix.dtype)
        loss = loss + (out.prefix * pw).sum()
        ref_loss = ref_loss + (torch.stack(ref_prefix) * pw).sum()
    (grad,) = torch.autograd.grad(loss, feats)
    (ref_grad,) = torch.autograd.grad(ref_loss, feats)
    torch.testing.assert_close(grad, ref_grad, **tolerance(case["dtype"]))


# ---------------------------------------------------------------------------------------------
# Layout inference and its errors
# ---------------------------------------------------------------------------------------------


@given(side=st.integers(1, 6), prefix=st.integers(0, 12), channels=st.integers(1, 3))
def test_prefix_count_is_inferred_as_n_minus_isqrt_squared(
    side: int, prefix: int, channels: int
) -> None:
    plans = [plan_tiles(20, 45, (16, 32))]
    n_tokens = side * side + prefix
    feats = torch.rand(plans[0].num_tiles, n_tokens, channels)
    inferred = n_tokens - math.isqrt(n_tokens) ** 2
    out = merge_checking_guess(feats, plans)
    ref_maps, ref_prefix = ref_merge(feats, plans, num_prefix=inferred)
    check_outputs(out, ref_maps, ref_prefix, tolerance(torch.float32))
    if prefix <= 2 * side:  # then the inference recovers the true count
        assert inferred == prefix
        assert (out.prefix is None) == (prefix == 0)
    # an explicit count is always obeyed
    explicit = merge(feats, plans, num_prefix_tokens=prefix)
    ref_maps, ref_prefix = ref_merge(feats, plans, num_prefix=prefix)
    check_outputs(explicit, ref_maps, ref_prefix, tolerance(torch.float32))


@pytest.mark.parametrize(
    ("n_tokens", "num_prefix"),
    [(18, 1), (17, 2), (10, 0), (5, 5), (5, 7), (3, 4)],
)
def test_non_square_token_count_is_a_value_error(n_tokens: int, num_prefix: int) -> None:
    plans = [plan_tiles(20, 45, (16, 32))]
    feats = torch.rand(plans[0].num_tiles, n_tokens, 4)
    with pytest.raises(ValueError, match="square"):
        merge(feats, plans, num_prefix_tokens=num_prefix)


def test_other_merge_errors() -> None:
    plans = [plan_tiles(20, 45, (16, 32)), plan_tiles(45, 20, (16, 32))]
    total = sum(p.num_tiles for p in plans)
    with pytest.raises(ValueError, match="tile"):
        merge(torch.rand(total + 1, 16, 4), plans)  # wrong number of tiles
    with pytest.raises(ValueError, match="square"):
        merge(torch.rand(total, 4, 2, 3), plans)  # non-square maps
    with pytest.raises(ValueError, match="square"):
        merge(torch.rand(total, 0, 4), plans)  # no tokens at all
    with pytest.raises(ValueError, match="prefix"):
        merge(torch.rand(total, 4, 3, 3), plans, num_prefix_tokens=1)  # maps have no prefix
    with pytest.raises(ValueError, match="resample"):
        merge(torch.rand(total, 16, 4), plans, resample="nearest")
    with pytest.raises(ValueError):
        merge(torch.rand(total, 16, 4), plans, output_scale=2)
    with pytest.raises(ValueError):
        merge(torch.rand(total, 16, 4), [])
    with pytest.raises(TypeError):
        merge(torch.rand(total, 16, 4).numpy(), plans)  # type: ignore[arg-type]
    mixed = [plan_tiles(20, 45, (16, 32)), plan_tiles(20, 45, (16,))]
    with pytest.raises(ValueError, match="scales"):
        merge(torch.rand(sum(p.num_tiles for p in mixed), 16, 4), mixed)


# ---------------------------------------------------------------------------------------------
# NVILA semantics
# ---------------------------------------------------------------------------------------------


@given(
    sizes=st.lists(image_sizes, min_size=1, max_size=4),
    scales=st.sampled_from([(16, 32, 48), (16, 32), (16, 48)]),
    layout=st.sampled_from(["tokens", "maps"]),
    side=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    output_scale=st.sampled_from([-1, 0]),
    seed=st.integers(0, 2**16),
)
def test_nvila_policy_matches_nvila_merge(
    sizes: list[tuple[int, int]],
    scales: tuple[int, ...],
    layout: str,
    side: int,
    dtype: torch.dtype,
    output_scale: int,
    seed: int,
) -> None:
    plans = [plan_tiles(h, w, scales, policy="nvila") for h, w in sizes]
    for p in plans:  # NVILA: k x k grids below the last scale, the full canvas everywhere
        for s, sp in zip(scales[:-1], p.scales[:-1], strict=True):
            assert sp.grid == (s // scales[0], s // scales[0])
        for sp in p.scales:
            assert sp.content_size == sp.canvas_size
    total = sum(p.num_tiles for p in plans)
    g = torch.Generator().manual_seed(seed)
    if layout == "tokens":  # SigLIP-like: no prefix
        feats = torch.randn(total, side * side, 3, generator=g).to(dtype)
    else:
        feats = torch.randn(total, 3, side, side, generator=g).to(dtype)
    out = merge(feats, plans, output_scale=output_scale)
    expected = nvila_merge(feats, [p.scales[-1].grid for p in plans], scales, output_scale)
    assert out.prefix is None
    for got, want in zip(out.unpad(), expected, strict=True):
        assert got.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got, want.permute(1, 2, 0), **tolerance(dtype))
        else:  # NVILA resamples in float32 and casts back once
            assert_within_one_ulp(got, want.permute(1, 2, 0))


def test_nvila_known_layout() -> None:
    """A 1080p frame under NVILA: 1×1, 2×2 and a 3×4 last scale, all resized to its 48×64 map."""
    plan = plan_tiles(1080, 1920, (448, 896, 1344), policy="nvila")
    assert [sp.grid for sp in plan.scales][:2] == [(1, 1), (2, 2)]
    rows, cols = plan.scales[-1].grid
    n = 16  # tokens per side per tile
    feats = torch.randn(plan.num_tiles, n * n, 2)
    out = merge(feats, [plan])
    assert out.sizes == [(rows * n, cols * n)]
    (want,) = nvila_merge(feats, [(rows, cols)], (448, 896, 1344))
    torch.testing.assert_close(out.unpad()[0], want.permute(1, 2, 0), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# MultiScaleFeatures
# ---------------------------------------------------------------------------------------------


@given(
    sizes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=5),
    channels=st.integers(1, 4),
)
def test_multiscale_features_views(sizes: list[tuple[int, int]], channels: int) -> None:
    counts = [h * w for h, w in sizes]
    tokens = torch.rand(sum(counts), channels) + 1.0
    out = MultiScaleFeatures(tokens, sizes)
    maps = list(tokens.split(counts))
    check_outputs(
        out,
        [m.view(h, w, channels) for m, (h, w) in zip(maps, sizes, strict=True)],
        None,
        tolerance(torch.float32),
    )
    with pytest.raises(ValueError):
        MultiScaleFeatures(torch.rand(sum(counts) + 1, channels), sizes)


def test_plans_are_kept() -> None:
    plans: list[TilePlan] = [plan_tiles(20, 45, (16, 32)), plan_tiles(45, 20, (16, 32))]
    total = sum(p.num_tiles for p in plans)
    out = merge(torch.rand(total, 17, 4), plans)
    assert list(out.plans) == plans
    assert len(out) == 2
    assert out.channels == 8
