"""Issue 7, section 1: hypothesis fuzzing of the public API.

Every call draws sizes (1..2000, extreme aspect ratios), scales (sometimes invalid), policies and
fits (sometimes unknown), backbone layouts (``[T, N, C]`` with 0–2 prefix tokens, ``[T, C, h, w]``),
dtypes (float32, float64, bfloat16, uint8) and chunk sizes (sometimes ≤ 0). Each call either works
and satisfies the invariants (the plans, mask counts ``h_i·w_i``, zero padding, finite values,
batched == alone within the dtype's tolerance) or raises ``ValueError``/``TypeError``. An input that
is known to be invalid must raise; one that is known to be valid must work; no other exception type
is ever acceptable.

The backbone is a tiny callable (average pooling to ``n × n`` cells and a fixed linear projection),
so the file runs in seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st

from dynamic_s2 import TilePlan, encode_tiles, forward, merge, plan_tiles

TILE = 16
POLICIES = ("aspect", "nvila")
FITS = ("stretch", "pad")
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 2e-3,
}


def _projection(channels: int, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    weight = torch.linspace(-1.0, 1.0, channels * dim, dtype=torch.float64).view(channels, dim)
    return (weight + 0.25 * torch.arange(dim, dtype=torch.float64)).to(dtype=dtype, device=device)


class Tiny:
    """``[T, C, t, t] -> [T, P + n², dim]`` tokens or ``[T, dim, n, n]`` maps; prefix = mean + k."""

    def __init__(self, n: int, dim: int, prefix: int, maps: bool) -> None:
        self.n, self.dim, self.prefix, self.maps = n, dim, prefix, maps
        self.calls: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        pooled = F.adaptive_avg_pool2d(x, self.n)
        cells = torch.einsum(
            "tchw,cd->thwd", pooled, _projection(x.shape[1], self.dim, x.dtype, x.device)
        )
        if self.maps:
            return cells.permute(0, 3, 1, 2)
        tokens = cells.flatten(1, 2)
        if not self.prefix:
            return tokens
        offsets = torch.arange(1, self.prefix + 1, dtype=x.dtype, device=x.device)
        return torch.cat([tokens.mean(dim=1, keepdim=True) + offsets[None, :, None], tokens], 1)


def _raises_only_value_or_type_error(call: Callable[[], Any]) -> tuple[Any, Exception | None]:
    """``(result, None)``, or ``(None, error)`` for ValueError/TypeError; anything else fails."""
    try:
        return call(), None
    except (ValueError, TypeError) as err:
        assert str(err), f"{type(err).__name__} without a message"
        return None, err
    except Exception as err:  # the bug being hunted: any other exception type
        pytest.fail(f"raised {type(err).__name__} (not ValueError/TypeError): {err!r}")


def _check_outcome(valid: bool, error: Exception | None, what: str) -> bool:
    """True when the call succeeded and its result should be checked."""
    event(f"{what}: {'works' if error is None else type(error).__name__}")
    if valid and error is not None:
        pytest.fail(f"valid input rejected ({what}): {type(error).__name__}: {error}")
    if not valid and error is None:
        pytest.fail(f"invalid input accepted ({what})")
    return error is None


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


@st.composite
def image_sizes(draw: st.DrawFn, max_area: int | None = None) -> tuple[int, int]:
    """Any size in 1..2000, often extreme: tiny, very wide, very tall.

    ``max_area`` narrows the width of a large draw (not its height), so that the image tests stay
    fast while both sides still reach 2000.
    """
    kind = draw(st.sampled_from(["any", "wide", "tall", "tiny", "edge"]))
    if kind == "any":
        h, w = draw(st.integers(1, 2000)), draw(st.integers(1, 2000))
    elif kind == "tiny":
        h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    elif kind == "edge":
        edges = st.sampled_from([1, 2, 15, 16, 17, 1999, 2000])
        h, w = draw(edges), draw(edges)
    else:
        short, long = draw(st.integers(1, 8)), draw(st.integers(300, 2000))
        h, w = (short, long) if kind == "wide" else (long, short)
    if max_area is not None and h * w > max_area:
        w = max(1, max_area // h)
    return h, w


VALID_SCALES = st.lists(st.sampled_from([16, 32, 48, 64]), min_size=1, max_size=3, unique=True).map(
    lambda s: tuple(sorted(s))
)
# Never a float tuple equal to an int one ((16.0, 32.0) == (16, 32)): the plan cache must not
# decide the outcome here (the cache's own test is in test_validation.py).
INVALID_SCALES = st.sampled_from(
    [(1, 2), (0.5, 1.0), (), (32, 16), (32, 32), (8, 16), (0,), (-16, 32), "32", None, (16, "32")]
)


@dataclass(frozen=True)
class Knob:
    """An argument's valid and invalid values."""

    valid: st.SearchStrategy[Any]
    invalid: st.SearchStrategy[Any]


def _values(*values: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from(values)


SCALES = Knob(VALID_SCALES, INVALID_SCALES)
POLICY = Knob(_values(*POLICIES), _values("square", "", "NVILA", None))
FIT = Knob(_values(*FITS), _values("crop", "", "STRETCH", None))
RESAMPLE = Knob(_values("area", "bilinear"), _values("nearest", "bicubic", ""))
MAX_BATCH_TILES = Knob(_values(None, 1, 2, 3, 5, 8, 1000), _values(0, -1, -8, 2.5, True))
MAX_TILES = Knob(_values(None, 1, 2, 4, 9, 12, 30), _values(0, -1, 2.5, "4"))
PAD_TO_MULTIPLE = Knob(_values(None, 1, 2, 3, 4, 7), _values(0, -2, 1.5))
TILE_SIZE = Knob(st.one_of(st.none(), st.integers(8, 64)), _values(0, -16, 16.5, "16"))
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.uint8])


def draw_arguments(
    data: st.DataObject, knobs: dict[str, Knob]
) -> tuple[dict[str, Any], str | None]:
    """Valid values for every knob, except (about half of the time) one that gets an invalid one."""
    broken = data.draw(st.one_of(st.none(), st.sampled_from(sorted(knobs))), label="broken")
    values = {
        name: data.draw(knob.invalid if name == broken else knob.valid, label=name)
        for name, knob in knobs.items()
    }
    return values, broken


@dataclass(frozen=True)
class Layout:
    n: int
    prefix: int
    maps: bool
    declared: int | None  # num_prefix_tokens passed to the call (None: inferred)


@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    n = draw(st.sampled_from([1, 2, 4]))
    if draw(st.booleans()):
        return Layout(n, 0, True, draw(st.sampled_from([None, 0])))
    prefix = draw(st.integers(0, 2))
    return Layout(n, prefix, False, draw(st.sampled_from([None, prefix])))


def _refused_split(lay: Layout) -> bool:
    """Token outputs are only read without ``num_prefix_tokens`` when the split is unambiguous:
    ``N - ⌊√N⌋²`` prefix tokens, at most one grid row (3 tokens: 2 + 1×1 is refused)."""
    tokens = lay.prefix + lay.n * lay.n
    side = math.isqrt(tokens)
    return lay.declared is None and not lay.maps and tokens - side * side > side


LAYOUT = Knob(
    layouts(),
    st.builds(Layout, st.sampled_from([1, 2]), st.integers(0, 2), st.booleans(), st.just(-1)),
)


def _plan_is_valid(scales: Any, tile_size: int | None, max_tiles: Any, policy: str) -> bool:
    """Validity of a plan_tiles call whose scales, max_tiles and policy are each valid."""
    if policy != "nvila":
        return True
    base = scales[0]
    if tile_size is not None and tile_size != base:  # NVILA tiles at its first scale
        return False
    if any(s % base for s in scales):
        return False
    return (scales[-1] // base) ** 2 <= (12 if max_tiles is None else max_tiles)


def _images(sizes: list[tuple[int, int]], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        if dtype == torch.uint8:
            out.append(torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8))
        else:
            out.append(torch.rand(3, h, w, generator=generator).mul_(2).sub_(1).to(dtype))
    return out


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------
# forward: the whole pipeline
# ---------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(image_sizes(max_area=500_000), min_size=1, max_size=3),
    dtype=DTYPES,
    as_tensor=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_forward_fuzz(
    sizes: list[tuple[int, int]],
    dtype: torch.dtype,
    as_tensor: bool,
    seed: int,
    data: st.DataObject,
) -> None:
    knobs = {
        "scales": SCALES,
        "policy": POLICY,
        "fit": FIT,
        "layout": LAYOUT,
        "max_batch_tiles": MAX_BATCH_TILES,
        "max_tiles": MAX_TILES,
        "resample": RESAMPLE,
        "output_scale": Knob(st.just("in range"), st.just("out of range")),
    }
    args, broken = draw_arguments(data, knobs)
    sc, pol, ft, lay, mt = (args[k] for k in ("scales", "policy", "fit", "layout", "max_tiles"))
    tile_size = data.draw(st.sampled_from([None, TILE]), label="tile_size")
    num_scales = len(sc) if broken != "scales" else 1
    if broken == "output_scale":
        output_scale = data.draw(st.sampled_from([num_scales, -num_scales - 1, 7]))
    else:
        output_scale = data.draw(st.integers(-num_scales, num_scales - 1), label="output_scale")
    valid = broken is None and _plan_is_valid(sc, tile_size, mt, pol)
    valid = valid and not _refused_split(lay)

    if as_tensor:  # one [B, C, H, W] batch: every image gets the first size
        sizes = [sizes[0]] * len(sizes)
    images = _images(sizes, dtype, seed)
    batch: Any = torch.stack(images) if as_tensor else images
    model = Tiny(lay.n, 3, lay.prefix, lay.maps)
    kwargs = dict(
        tile_size=tile_size,
        max_tiles=mt,
        policy=pol,
        fit=ft,
        output_scale=output_scale,
        resample=args["resample"],
        num_prefix_tokens=lay.declared,
        max_batch_tiles=args["max_batch_tiles"],
    )
    out, error = _raises_only_value_or_type_error(lambda: forward(model, batch, sc, **kwargs))
    reason = broken or ("nothing (nvila rejects these scales)" if not valid else "nothing")
    if not _check_outcome(valid, error, f"forward, {reason} broken"):
        return
    if args["max_batch_tiles"] is not None:
        assert max(model.calls) <= args["max_batch_tiles"]

    # The plans are plan_tiles' plans; the feature grid of every image is the plan's.
    plans = [
        plan_tiles(h, w, sc, tile_size=tile_size, max_tiles=mt, policy=pol, fit=ft)
        for h, w in sizes
    ]
    assert list(out.plans) == plans
    expected_sizes = [p.feature_size(output_scale, lay.n) for p in plans]
    assert out.sizes == expected_sizes
    counts = out.mask.sum(dim=(1, 2)).tolist()
    assert counts == [h * w for h, w in expected_sizes]
    for i, (h, w) in enumerate(expected_sizes):
        assert out.mask[i, :h, :w].all()
    assert (out.features[~out.mask] == 0).all()
    out_dtype = torch.float32 if dtype == torch.uint8 else dtype
    assert out.tokens.dtype == out_dtype
    assert out.channels == 3 * len(sc)
    assert torch.isfinite(out.tokens.float()).all()
    if lay.prefix:
        assert out.prefix is not None and out.prefix.shape == (len(sizes), lay.prefix, out.channels)
        assert torch.isfinite(out.prefix.float()).all()
    else:
        assert out.prefix is None

    # Batched == alone (and chunked == unchunked).
    kwargs["max_batch_tiles"] = None
    for i, image in enumerate(images):
        alone = forward(Tiny(lay.n, 3, lay.prefix, lay.maps), [image], sc, **kwargs)
        assert alone.sizes == [expected_sizes[i]]
        _close(out.unpad()[i], alone.unpad()[0], out_dtype)
        if lay.prefix:
            _close(out.prefix[i], alone.prefix[0], out_dtype)


# ---------------------------------------------------------------------------------------------
# plan_tiles and TilePlan.from_dict
# ---------------------------------------------------------------------------------------------


WIDE_SCALES = st.lists(st.integers(16, 1024), min_size=1, max_size=4, unique=True).map(
    lambda s: tuple(sorted(s))
)


@settings(max_examples=300, deadline=None)
@given(size=image_sizes(), data=st.data())
def test_plan_tiles_fuzz(size: tuple[int, int], data: st.DataObject) -> None:
    knobs = {
        "scales": Knob(st.one_of(VALID_SCALES, WIDE_SCALES), INVALID_SCALES),
        "tile_size": TILE_SIZE,
        "max_tiles": MAX_TILES,
        "policy": POLICY,
        "fit": FIT,
    }
    args, broken = draw_arguments(data, knobs)
    sc, tile_size, mt, pol, ft = (args[k] for k in knobs)
    valid = broken is None
    if valid and tile_size is not None and sc[0] < tile_size:
        valid = False
    if valid:
        valid = _plan_is_valid(sc, tile_size, mt, pol)
    h, w = size
    plan, error = _raises_only_value_or_type_error(
        lambda: plan_tiles(h, w, sc, tile_size=tile_size, max_tiles=mt, policy=pol, fit=ft)
    )
    reason = broken or ("nothing (a plan rule rejects it)" if not valid else "nothing")
    if not _check_outcome(valid, error, f"plan_tiles, {reason} broken"):
        return

    t = sc[0] if tile_size is None else tile_size
    assert plan.image_size == (h, w) and plan.tile_size == t
    assert tuple(sp.scale for sp in plan.scales) == sc
    assert plan.num_tiles == sum(sp.grid[0] * sp.grid[1] for sp in plan.scales)
    for sp in plan.scales:
        assert sp.grid[0] >= 1 and sp.grid[1] >= 1 and sp.tile_size == t
        ch, cw = sp.canvas_size
        assert 1 <= sp.content_size[0] <= ch and 1 <= sp.content_size[1] <= cw
        if ft == "stretch":
            assert sp.content_size == sp.canvas_size
        else:  # pad: one side fills the canvas, the aspect ratio is kept to within a pixel
            assert sp.content_size[0] == ch or sp.content_size[1] == cw
            ratio_error = abs(sp.content_size[1] * h - sp.content_size[0] * w)
            assert ratio_error <= max(h, w), (sp, size)
    tiles = [sp.num_tiles for sp in plan.scales]
    if pol == "aspect":
        assert tiles == sorted(tiles)  # tile counts never decrease
        if isinstance(mt, int):
            assert tiles[-1] <= mt
    else:
        assert tiles[-1] <= (12 if mt is None else mt)
    data = json.loads(json.dumps(plan.to_dict()))
    assert TilePlan.from_dict(data) == plan


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(-2, 40), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(
    size=image_sizes(),
    scales=VALID_SCALES,
    fit=st.sampled_from(FITS),
    path=st.sampled_from(
        [
            ("image_size",),
            ("tile_size",),
            ("policy",),
            ("fit",),
            ("scales",),
            ("scales", 0),
            ("scales", 0, "scale"),
            ("scales", 0, "grid"),
            ("scales", 0, "content_size"),
            ("scales", -1, "grid"),
            ("scales", -1, "content_size"),
            ("image_size", 0),
            ("scales", 0, "grid", 1),
            ("scales", -1, "content_size", 0),
        ]
    ),
    junk=JUNK,
    delete=st.booleans(),
)
def test_from_dict_fuzz(
    size: tuple[int, int],
    scales: tuple[int, ...],
    fit: str,
    path: tuple[Any, ...],
    junk: Any,
    delete: bool,
) -> None:
    """A plan dict with one field replaced by junk (or deleted) round-trips or raises cleanly."""
    plan = plan_tiles(*size, scales, fit=fit)  # type: ignore[arg-type]
    data = plan.to_dict()
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    if delete and isinstance(path[-1], str):
        del node[path[-1]]
    else:
        node[path[-1]] = junk
    rebuilt, _ = _raises_only_value_or_type_error(lambda: TilePlan.from_dict(data))
    if rebuilt is None:
        return
    # Accepted: a consistent plan that round-trips.
    assert TilePlan.from_dict(json.loads(json.dumps(rebuilt.to_dict()))) == rebuilt
    for sp in rebuilt.scales:
        assert sp.scale >= rebuilt.tile_size
        assert sp.content_size[0] <= sp.canvas_size[0]
        assert sp.content_size[1] <= sp.canvas_size[1]
        if rebuilt.fit == "stretch":
            assert sp.content_size == sp.canvas_size


# ---------------------------------------------------------------------------------------------
# encode_tiles: chunking
# ---------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(num_tiles=st.integers(1, 20), maps=st.booleans(), data=st.data())
def test_encode_tiles_fuzz(num_tiles: int, maps: bool, data: st.DataObject) -> None:
    args, broken = draw_arguments(
        data, {"max_batch_tiles": MAX_BATCH_TILES, "pad_to_multiple": PAD_TO_MULTIPLE}
    )
    mbt, ptm = args["max_batch_tiles"], args["pad_to_multiple"]
    tiles = torch.rand(num_tiles, 3, 8, 8, generator=torch.Generator().manual_seed(num_tiles))
    model = Tiny(2, 5, 1, maps)
    out, error = _raises_only_value_or_type_error(
        lambda: encode_tiles(model, tiles, max_batch_tiles=mbt, pad_to_multiple=ptm)
    )
    valid = broken is None
    if error is not None and valid and mbt is not None and ptm is not None and ptm > mbt:
        return  # no chunk can be a multiple of pad_to_multiple and at most max_batch_tiles
    if not _check_outcome(valid, error, "encode_tiles"):
        return
    if mbt is not None:
        assert max(model.calls) <= mbt, (model.calls, mbt, ptm)
    if ptm is not None:
        assert all(c % ptm == 0 for c in model.calls), (model.calls, ptm)
    expected = Tiny(2, 5, 1, maps)(tiles)
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------------------------------------
# merge: batched == per image
# ---------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
# Undeclared prefix counts are drawn on purpose; the guesses they give may warn (the warning itself
# is asserted in test_merge.py and test_reliability_api.py).
@pytest.mark.filterwarnings("ignore::dynamic_s2.merge.PrefixGuessWarning")
@given(
    sizes=st.lists(image_sizes(), min_size=1, max_size=4),
    scales=VALID_SCALES,
    policy=st.sampled_from(POLICIES),
    fit=st.sampled_from(FITS),
    n=st.sampled_from([1, 2, 3, 4]),
    prefix=st.integers(0, 2),
    maps=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_merge_fuzz(
    sizes: list[tuple[int, int]],
    scales: tuple[int, ...],
    policy: str,
    fit: str,
    n: int,
    prefix: int,
    maps: bool,
    dtype: torch.dtype,
    seed: int,
    data: st.DataObject,
) -> None:
    if policy == "nvila" and not _plan_is_valid(scales, None, None, policy):
        policy = "aspect"
    tile = scales[0] if policy == "nvila" else TILE  # NVILA tiles at its first scale
    plans = [
        plan_tiles(h, w, scales, tile_size=tile, policy=policy, fit=fit)  # type: ignore[arg-type]
        for h, w in sizes
    ]
    counts = [p.num_tiles for p in plans]
    s = len(scales)
    knobs = {
        "resample": RESAMPLE,
        "output_scale": Knob(st.integers(-s, s - 1), st.sampled_from([s, -s - 1, 9])),
        "tile_count": Knob(st.just(0), st.sampled_from([-1, 1, 5])),
        "num_prefix_tokens": Knob(st.just("as made"), st.just(-1)),
    }
    args, broken = draw_arguments(data, knobs)
    rs, output_scale = args["resample"], args["output_scale"]
    prefix = 0 if maps else prefix
    declared = args["num_prefix_tokens"]
    if declared == "as made":
        declared = data.draw(st.sampled_from([None, 0 if maps else prefix]), label="declared")
    generator = torch.Generator().manual_seed(seed)
    total = sum(counts) + args["tile_count"]
    shape = (total, 3, n, n) if maps else (total, prefix + n * n, 3)
    feats = torch.randn(shape, generator=generator).to(dtype)
    out, error = _raises_only_value_or_type_error(
        lambda: merge(
            feats, plans, output_scale=output_scale, resample=rs, num_prefix_tokens=declared
        )
    )
    if not _check_outcome(broken is None, error, f"merge, {broken or 'nothing'} broken"):
        return
    expected_sizes = [p.feature_size(output_scale, n) for p in plans]
    assert out.sizes == expected_sizes
    assert out.mask.sum(dim=(1, 2)).tolist() == [h * w for h, w in expected_sizes]
    assert (out.features[~out.mask] == 0).all()
    assert torch.isfinite(out.tokens.float()).all()
    assert out.tokens.dtype == dtype and out.channels == 3 * len(scales)
    # Area and bilinear resampling are convex combinations: the output stays within the input.
    bound = feats.float().abs().max() * (1 + 1e-2)
    assert out.tokens.float().abs().max() <= bound
    for i, part in enumerate(feats.split(counts)):
        alone = merge(
            part, [plans[i]], output_scale=output_scale, resample=rs, num_prefix_tokens=declared
        )
        _close(out.unpad()[i], alone.unpad()[0], dtype)
        if prefix:
            _close(out.prefix[i], alone.prefix[0], dtype)
