"""The merge kernel (``dynamic_s2._resample``, issue 21): strided copies in every output layout.

The area merge must equal the independent per-image loop (``F.interpolate(mode="area")`` in
float32, ``tests/_core_reference.py``) bit for bit for every area factor the library's plans make
with ``fit="stretch"``, up and down, in every layout the kernel reads (contiguous tokens,
channel-major ``hidden_states`` with and without prefix tokens, maps) and writes (packed, padded,
``k × k`` tokens); and the runs it builds must be the broadcast views the design promises.
"""

from __future__ import annotations

import ast
import inspect

import torch
from _core_reference import ref_merge
from hypothesis import given, settings
from hypothesis import strategies as st

import dynamic_s2
from dynamic_s2 import _fused, merge, plan_tiles
from dynamic_s2._resample import Axis, axis_runs
from dynamic_s2.packing import pack_tokens_batch

SCALES = (16, 32, 48)


@st.composite
def stretch_cases(draw: st.DrawFn) -> dict:
    sizes = draw(
        st.lists(st.tuples(st.integers(8, 200), st.integers(8, 200)), min_size=1, max_size=3)
    )
    policy = draw(st.sampled_from(["aspect", "nvila"]))
    return {
        "plans": [plan_tiles(h, w, SCALES, policy=policy) for h, w in sizes],
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])),
        "layout": draw(st.sampled_from(["tokens", "channel-major", "maps"])),
        "prefix": draw(st.integers(0, 2)),
        "output_scale": draw(st.sampled_from([0, 1, -1])),
    }


def _features(case: dict, side: int = 4, channels: int = 3) -> tuple[torch.Tensor, int]:
    total = sum(p.num_tiles for p in case["plans"])
    gen = torch.Generator().manual_seed(0)
    prefix = 0 if case["layout"] == "maps" else case["prefix"]
    feats = torch.randn((total, prefix + side * side, channels), generator=gen).to(case["dtype"])
    if case["layout"] == "channel-major":
        feats = feats.transpose(1, 2).contiguous().transpose(1, 2)
    if case["layout"] == "maps":
        feats = feats.transpose(1, 2).reshape(total, channels, side, side)
    return feats, prefix


@settings(max_examples=40, deadline=None)
@given(stretch_cases())
def test_area_merge_is_bit_identical_to_the_reference_loop(case: dict) -> None:
    feats, prefix = _features(case)
    plans, out_scale = case["plans"], case["output_scale"]
    want, _ = ref_merge(feats, plans, num_prefix=prefix, output_scale=out_scale)
    out = merge(feats, plans, num_prefix_tokens=prefix, output_scale=out_scale)
    for got, ref in zip(out.unpad(), want, strict=True):
        assert torch.equal(got, ref)
    for b, ref in enumerate(want):
        h, w = ref.shape[:2]
        assert torch.equal(out.features[b, :h, :w], ref)
        assert not out.features[b][~out.mask[b]].any()
    packed = merge(feats, plans, num_prefix_tokens=prefix, output_scale=out_scale, pack=2)
    expected, _ = pack_tokens_batch([m.permute(2, 0, 1) for m in want], 2)
    assert torch.equal(packed.tokens, expected)


def test_channel_major_with_prefix_equals_contiguous() -> None:
    plans = [plan_tiles(60, 200, SCALES), plan_tiles(90, 40, SCALES, fit="pad")]
    total = sum(p.num_tiles for p in plans)
    feats = torch.randn(total, 2 + 16, 5)
    hf = feats.transpose(1, 2).contiguous().transpose(1, 2)
    for mode in ("area", "bilinear"):
        for pack in (None, 2):
            a = merge(feats, plans, num_prefix_tokens=2, resample=mode, pack=pack)
            b = merge(hf, plans, num_prefix_tokens=2, resample=mode, pack=pack)
            assert torch.equal(a.tokens, b.tokens)


def test_integer_factor_is_one_broadcast_run() -> None:
    tile = Axis(4, 100, 4)  # 4-cell tiles, row stride 4, tile stride 100
    runs = axis_runs(4, 12, "area", tile, Axis(1, 10, 10))  # 3x: every cell thrice
    assert len(runs) == 1
    (run,) = runs
    assert run.sizes == (3, 4) and run.src_strides == (0, 4) and run.dst_strides == (10, 30)
    # Three tiles stitched (identity): one run with a tile dimension.
    (ident,) = axis_runs(12, 12, "area", tile, Axis(1, 10, 10))
    assert ident.sizes == (3, 4) and ident.src_strides == (100, 4)


def test_fused_does_not_import_merge() -> None:
    tree = ast.parse(inspect.getsource(_fused))
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "merge" not in modules and "dynamic_s2.merge" not in modules
    assert "_resample" in modules
    assert dynamic_s2.merge is not None
