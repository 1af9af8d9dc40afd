"""Issue 7, section 1: every bad input gets a clear error; odd-but-valid input works.

The bad-input catalog (:data:`CASES`) is one parametrized test. Every case is a call, the exception
type it must raise (``ValueError`` or ``TypeError``, never anything else) and a regex the message
must match: the name of the offending argument and the value that was received, in any order.

The second half runs odd-but-valid inputs (1×1 images, 2×3000 panoramas, non-contiguous and
channels_last tensors, float64 and bfloat16, a single scale, register tokens, a batch of one)
through the public API and checks that the output is correct and finite.

``dynamic_s2.s2wrapper`` and ``dynamic_s2.nvila`` cases are included when those modules import.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _deps import need

import dynamic_s2
from dynamic_s2 import (
    Backbone,
    DynamicS2,
    TileBatch,
    TilePlan,
    as_backbone,
    collate,
    encode_tiles,
    forward,
    merge,
    plan_tiles,
    tile_images,
)


def _optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:  # pragma: no cover - the modules exist in this repository
        return None


s2wrapper = _optional("dynamic_s2.s2wrapper")
nvila = _optional("dynamic_s2.nvila")


# ---------------------------------------------------------------------------------------------
# A tiny backbone: average-pool every tile to n × n cells, then a fixed linear projection
# ---------------------------------------------------------------------------------------------


def _projection(channels: int, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    weight = torch.linspace(-1.0, 1.0, channels * dim, dtype=torch.float64).view(channels, dim)
    return (weight + 0.25 * torch.arange(dim, dtype=torch.float64)).to(dtype=dtype, device=device)


class Tiny:
    """``[T, C, t, t] -> [T, P + n², dim]`` tokens, or ``[T, dim, n, n]`` maps.

    Prefix token ``k`` is the tile's mean feature plus ``1000 · (k + 1)``: a prefix that leaked into
    the spatial features would show as a huge value.
    """

    def __init__(self, n: int = 2, dim: int = 4, prefix: int = 0, maps: bool = False) -> None:
        self.n, self.dim, self.prefix, self.maps = n, dim, prefix, maps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, self.n)
        weight = _projection(x.shape[1], self.dim, x.dtype, x.device)
        cells = torch.einsum("tchw,cd->thwd", pooled, weight)
        if self.maps:
            return cells.permute(0, 3, 1, 2)
        tokens = cells.flatten(1, 2)
        if not self.prefix:
            return tokens
        offsets = 1000.0 * torch.arange(1, self.prefix + 1, dtype=x.dtype, device=x.device)
        prefix = tokens.mean(dim=1, keepdim=True) + offsets[None, :, None]
        return torch.cat([prefix, tokens], dim=1)


TOK = Tiny()
MAPS = Tiny(maps=True)
SCALES = (32, 64)
IMAGES = [torch.rand(3, 40, 60), torch.rand(3, 50, 30)]
PLANS = [plan_tiles(40, 60, SCALES), plan_tiles(50, 30, SCALES)]
T_TOTAL = sum(p.num_tiles for p in PLANS)
FEATS = torch.randn(T_TOTAL, 4, 8)  # 2 × 2 tokens of 8 channels per tile
BATCH = tile_images(IMAGES, PLANS)
UINT8 = [torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)]
GOOD_DICT = PLANS[0].to_dict()


def _dict(**changes: Any) -> dict[str, Any]:
    """A deep copy of a valid plan dict with top-level changes (``None`` deletes the key)."""
    data = json.loads(json.dumps(GOOD_DICT))
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    return data


def _scale_entry(**changes: Any) -> dict[str, Any]:
    data = _dict()
    entry = data["scales"][0]
    for key, value in changes.items():
        if value is None:
            del entry[key]
        else:
            entry[key] = value
    return data


def names(*parts: str) -> str:
    """A regex matching a message that contains every part (regexes), in any order."""
    return "(?s)" + "".join(f"(?=.*{p})" for p in parts)


def lit(value: Any) -> str:
    """The regex of ``repr(value)``."""
    return re.escape(repr(value))


@dataclass(frozen=True)
class Case:
    category: str
    name: str
    call: Callable[[], object]
    error: type[Exception]
    pattern: str

    @property
    def id(self) -> str:
        return f"{self.category}:{self.name}"


CASES: list[Case] = []


def case(
    category: str, name: str, error: type[Exception], pattern: str, call: Callable[[], object]
) -> None:
    CASES.append(Case(category, name, call, error, pattern))


def _layer(**options: Any) -> DynamicS2:
    return DynamicS2(TOK, scales=SCALES, **options)


# ---- empty input ----------------------------------------------------------------------------
case("empty", "tile_images-list", ValueError, names("images", "empty"), lambda: tile_images([], []))
case(
    "empty",
    "tile_images-batch0",
    ValueError,
    names("images", "empty"),
    lambda: tile_images(torch.rand(0, 3, 8, 8), []),
)
case(
    "empty", "forward-list", ValueError, names("images", "empty"), lambda: forward(TOK, [], SCALES)
)
case(
    "empty",
    "forward-batch0",
    ValueError,
    names("images", "empty"),
    lambda: forward(TOK, torch.rand(0, 3, 8, 8), SCALES),
)
case("empty", "DynamicS2-call", ValueError, names("images", "empty"), lambda: _layer()([]))
case("empty", "collate", ValueError, names("empty"), lambda: collate([]))
case(
    "empty",
    "encode_tiles-no-tiles",
    ValueError,
    names("tiles", r"\(0, 3, 8, 8\)"),
    lambda: encode_tiles(TOK, torch.rand(0, 3, 8, 8)),
)
case("empty", "merge-no-plans", ValueError, names("plans", r"\[\]"), lambda: merge(FEATS, []))
case(
    "empty", "plan_tiles-scales", ValueError, names("scales", "empty"), lambda: plan_tiles(8, 8, ())
)

# ---- wrong rank ------------------------------------------------------------------------------
case(
    "rank",
    "tile_images-2d-tensor",
    ValueError,
    names("images", r"\(40, 60\)"),
    lambda: tile_images(torch.rand(40, 60), PLANS[0]),
)
case(
    "rank",
    "tile_images-3d-tensor",
    ValueError,
    names("images", r"\(3, 40, 60\)"),
    lambda: tile_images(torch.rand(3, 40, 60), PLANS[0]),
)
case(
    "rank",
    "tile_images-5d-tensor",
    ValueError,
    names("images", r"\(1, 1, 3, 40, 60\)"),
    lambda: tile_images(torch.rand(1, 1, 3, 40, 60), PLANS[0]),
)
case(
    "rank",
    "tile_images-2d-item",
    ValueError,
    names(r"images\[0\]", r"\(40, 60\)"),
    lambda: tile_images([torch.rand(40, 60)], PLANS[0]),
)
case(
    "rank",
    "tile_images-4d-item",
    ValueError,
    names(r"images\[1\]", r"\(1, 3, 50, 30\)"),
    lambda: tile_images([IMAGES[0], torch.rand(1, 3, 50, 30)], PLANS),
)
case(
    "rank",
    "forward-2d",
    ValueError,
    names("images", r"\(40, 60\)"),
    lambda: forward(TOK, torch.rand(40, 60), SCALES),
)
case(
    "rank",
    "forward-5d",
    ValueError,
    names("images", r"\(2, 1, 3, 40, 60\)"),
    lambda: forward(TOK, torch.rand(2, 1, 3, 40, 60), SCALES),
)
case(
    "rank",
    "DynamicS2-5d",
    ValueError,
    names("images", r"\(2, 1, 3, 40, 60\)"),
    lambda: _layer()(torch.rand(2, 1, 3, 40, 60)),
)
case(
    "rank",
    "encode_tiles-3d",
    ValueError,
    names("tiles", r"\(3, 8, 8\)"),
    lambda: encode_tiles(TOK, torch.rand(3, 8, 8)),
)
case(
    "rank",
    "encode_tiles-5d",
    ValueError,
    names("tiles", r"\(1, 2, 3, 8, 8\)"),
    lambda: encode_tiles(TOK, torch.rand(1, 2, 3, 8, 8)),
)
case(
    "rank",
    "merge-2d-features",
    ValueError,
    names("tile_features", rf"\({T_TOTAL}, 8\)"),
    lambda: merge(torch.randn(T_TOTAL, 8), PLANS),
)
case(
    "rank",
    "merge-5d-features",
    ValueError,
    names("tile_features", rf"\({T_TOTAL}, 8, 2, 2, 1\)"),
    lambda: merge(torch.randn(T_TOTAL, 8, 2, 2, 1), PLANS),
)

# ---- mixed channel counts --------------------------------------------------------------------
case(
    "channels",
    "tile_images",
    ValueError,
    names(r"images\[1\]", "channels", r"\b1\b"),
    lambda: tile_images([IMAGES[0], torch.rand(1, 50, 30)], PLANS),
)
case(
    "channels",
    "forward",
    ValueError,
    names(r"images\[1\]", "channels", r"\b4\b"),
    lambda: forward(TOK, [IMAGES[0], torch.rand(4, 50, 30)], SCALES),
)

# ---- zero-sized images -----------------------------------------------------------------------
case(
    "zero-size",
    "tile_images-height",
    ValueError,
    names(r"images\[0\]", r"\(3, 0, 8\)"),
    lambda: tile_images([torch.rand(3, 0, 8)], PLANS[0]),
)
case(
    "zero-size",
    "tile_images-width",
    ValueError,
    names(r"images\[1\]", r"\(3, 8, 0\)"),
    lambda: tile_images([IMAGES[0], torch.rand(3, 8, 0)], PLANS),
)
case(
    "zero-size",
    "tile_images-channels",
    ValueError,
    names(r"images\[0\]", r"\(0, 8, 8\)"),
    lambda: tile_images([torch.rand(0, 8, 8)], PLANS[0]),
)
case(
    "zero-size",
    "forward-batch-tensor",
    ValueError,
    names(r"images\[0\]", r"\(3, 0, 0\)"),
    lambda: forward(TOK, torch.rand(2, 3, 0, 0), SCALES),
)
case(
    "zero-size",
    "plan_tiles-height",
    ValueError,
    names("height", r"\b0\b"),
    lambda: plan_tiles(0, 8, SCALES),
)
case(
    "zero-size",
    "plan_tiles-width",
    ValueError,
    names("width", "-5"),
    lambda: plan_tiles(8, -5, SCALES),
)

# ---- non-tensor items ------------------------------------------------------------------------
case(
    "non-tensor",
    "tile_images-ndarray-item",
    TypeError,
    names(r"images\[0\]", "ndarray"),
    lambda: tile_images([np.zeros((3, 40, 60), np.float32)], PLANS[0]),
)
case(
    "non-tensor",
    "tile_images-int",
    TypeError,
    names("images", "int"),
    lambda: tile_images(42, PLANS[0]),  # type: ignore[arg-type]
)
case(
    "non-tensor",
    "tile_images-str",
    TypeError,
    names("images", "str"),
    lambda: tile_images("cat.jpg", PLANS[0]),  # type: ignore[arg-type]
)
case(
    "non-tensor",
    "forward-list-item",
    TypeError,
    names(r"images\[1\]", "list"),
    lambda: forward(TOK, [IMAGES[0], [[0.0]]], SCALES),  # type: ignore[list-item]
)
case(
    "non-tensor",
    "encode_tiles-list",
    TypeError,
    names("tiles", "list"),
    lambda: encode_tiles(TOK, [torch.rand(3, 8, 8)]),  # type: ignore[arg-type]
)
case(
    "non-tensor",
    "merge-list",
    TypeError,
    names("tile_features", "list"),
    lambda: merge([FEATS], PLANS),  # type: ignore[arg-type]
)
case(
    "non-tensor",
    "merge-plans-dict-item",
    TypeError,
    names(r"plans\[0\]", "dict"),
    lambda: merge(FEATS, [GOOD_DICT]),  # type: ignore[list-item]
)
case(
    "non-tensor",
    "merge-plans-None",
    TypeError,
    names("plans", "None"),
    lambda: merge(FEATS, None),  # type: ignore[arg-type]
)
case(
    "non-tensor",
    "tile_images-plans-None",
    TypeError,
    names("plans", "NoneType"),
    lambda: tile_images(IMAGES, None),  # type: ignore[arg-type]
)
case(
    "non-tensor",
    "tile_images-plans-dict-item",
    TypeError,
    names(r"plans\[1\]", "dict"),
    lambda: tile_images(IMAGES, [PLANS[0], GOOD_DICT]),  # type: ignore[list-item]
)

# ---- different devices or dtypes within one call ---------------------------------------------
case(
    "device-dtype",
    "tile_images-device",
    ValueError,
    names(r"images\[1\]", "meta"),
    lambda: tile_images([IMAGES[0], torch.rand(3, 50, 30, device="meta")], PLANS),
)
case(
    "device-dtype",
    "forward-device",
    ValueError,
    names(r"images\[1\]", "meta"),
    lambda: forward(TOK, [IMAGES[0], torch.rand(3, 50, 30, device="meta")], SCALES),
)
if torch.cuda.is_available():  # a real second device, where there is one
    case(
        "device-dtype",
        "tile_images-cuda",
        ValueError,
        names(r"images\[1\]", "cuda"),
        lambda: tile_images([IMAGES[0], IMAGES[1].cuda()], PLANS),
    )
    case(
        "device-dtype",
        "forward-cuda",
        ValueError,
        names(r"images\[1\]", "cuda"),
        lambda: forward(TOK, [IMAGES[0], IMAGES[1].cuda()], SCALES),
    )
case(
    "device-dtype",
    "tile_images-dtype",
    ValueError,
    names(r"images\[1\]", "float64"),
    lambda: tile_images([IMAGES[0], IMAGES[1].double()], PLANS),
)
case(
    "device-dtype",
    "forward-dtype",
    ValueError,
    names(r"images\[1\]", "uint8"),
    lambda: forward(TOK, [IMAGES[0], torch.zeros(3, 50, 30, dtype=torch.uint8)], SCALES),
)
case(
    "device-dtype",
    "tile_images-int32",
    TypeError,
    names("images", "int32"),
    lambda: tile_images([torch.zeros(3, 40, 60, dtype=torch.int32)], PLANS[0]),
)
case(
    "device-dtype",
    "tile_images-bool",
    TypeError,
    names("images", "bool"),
    lambda: tile_images([torch.zeros(3, 40, 60, dtype=torch.bool)], PLANS[0]),
)

# ---- scales given as factors -----------------------------------------------------------------
for _scales in [(1, 2), (0.5, 1.0), (1,), (1.0, 2.0, 3.0)]:
    case(
        "factor-scales",
        f"plan_tiles-{_scales}",
        ValueError,
        names("scales", lit(_scales)),
        lambda s=_scales: plan_tiles(40, 60, s),
    )
case(
    "factor-scales",
    "forward-(1, 2)",
    ValueError,
    names("scales", lit((1, 2))),
    lambda: forward(TOK, IMAGES, (1, 2)),
)
case(
    "factor-scales",
    "forward-(0.5, 1.0)",
    ValueError,
    names("scales", lit((0.5, 1.0))),
    lambda: forward(TOK, IMAGES, (0.5, 1.0)),
)
case(
    "factor-scales",
    "DynamicS2-init-(1, 2)",
    ValueError,
    names("scales", lit((1, 2))),
    lambda: DynamicS2(TOK, scales=(1, 2)),
)
case(
    "factor-scales",
    "DynamicS2-init-(0.5, 1.0)",
    ValueError,
    names("scales", lit((0.5, 1.0))),
    lambda: DynamicS2(TOK, scales=(0.5, 1.0)),
)
# other malformed scales
case(
    "scales",
    "plan_tiles-decreasing",
    ValueError,
    names("scales", lit((64, 32))),
    lambda: plan_tiles(8, 8, (64, 32)),
)
case(
    "scales",
    "plan_tiles-duplicate",
    ValueError,
    names("scales", lit((32, 32))),
    lambda: plan_tiles(8, 8, (32, 32)),
)
case(
    "scales", "plan_tiles-str", TypeError, names("scales", "'448'"), lambda: plan_tiles(8, 8, "448")
)  # type: ignore[arg-type]
case(
    "scales", "plan_tiles-None", TypeError, names("scales", "None"), lambda: plan_tiles(8, 8, None)
)  # type: ignore[arg-type]
case(
    "scales",
    "plan_tiles-str-item",
    TypeError,
    names("scales", "'64'"),
    lambda: plan_tiles(8, 8, (32, "64")),
)  # type: ignore[arg-type]
case(
    "scales",
    "plan_tiles-below-tile_size",
    ValueError,
    names("tile_size", r"\b48\b", lit((32, 64))),
    lambda: plan_tiles(8, 8, (32, 64), tile_size=48),
)
case(
    "scales",
    "plan_tiles-nvila-not-multiples",
    ValueError,
    names("scale", lit((32, 48))),
    lambda: plan_tiles(8, 8, (32, 48), policy="nvila"),
)
case(
    "scales",
    "forward-no-input-size",
    ValueError,
    names("scales", "input size"),
    lambda: forward(TOK, IMAGES),
)
case(
    "scales",
    "DynamicS2-no-input-size",
    ValueError,
    names("scales", "input size"),
    lambda: DynamicS2(TOK),
)
# The LRU cache must not let a value that fails validation through because an equal value of
# another type (8 == 8.0 == np.int64(8), 1 == True, (16,) == (16.0,)) was planned before.
case(
    "cache",
    "plan_tiles-float-height-after-int",
    TypeError,
    names("height", r"8\.0"),
    lambda: (plan_tiles(8, 8, (32,)), plan_tiles(8.0, 8, (32,))),  # type: ignore[arg-type]
)
case(
    "cache",
    "plan_tiles-bool-height-after-int",
    TypeError,
    names("height", "True"),
    lambda: (plan_tiles(1, 1, (32,)), plan_tiles(True, 1, (32,))),
)
case(
    "cache",
    "plan_tiles-float-scale-after-int",
    ValueError,
    names("scales", lit((32.0,))),
    lambda: (plan_tiles(8, 8, (32,)), plan_tiles(8, 8, (32.0,))),  # type: ignore[arg-type]
)

# ---- plans that don't match the images -------------------------------------------------------
case(
    "plan-mismatch",
    "tile_images-count",
    ValueError,
    names("plans", r"\b1\b", r"\b2\b"),
    lambda: tile_images(IMAGES, [PLANS[0]]),
)
case(
    "plan-mismatch",
    "tile_images-single-plan-two-images",
    ValueError,
    names("plans", r"\b1\b", r"\b2\b"),
    lambda: tile_images(IMAGES, PLANS[0]),
)
case(
    "plan-mismatch",
    "tile_images-size",
    ValueError,
    names(r"plans\[1\]", r"\(40, 60\)", r"\(50, 30\)"),
    lambda: tile_images(IMAGES, [PLANS[0], PLANS[0]]),
)
case(
    "plan-mismatch",
    "tile_images-swapped-hw",
    ValueError,
    names(r"plans\[0\]", r"\(60, 40\)", r"\(40, 60\)"),
    lambda: tile_images([IMAGES[0]], [PLANS[0].transpose()]),
)
case(
    "plan-mismatch",
    "tile_images-tile-sizes",
    ValueError,
    names("tile_size", r"\[32, 64\]"),
    lambda: tile_images(IMAGES, [PLANS[0], plan_tiles(50, 30, (64,))]),
)
case(
    "plan-mismatch",
    "forward-count",
    ValueError,
    names("plans", r"\b3\b", r"\b2\b"),
    lambda: forward(TOK, IMAGES, plans=[*PLANS, PLANS[0]]),
)
case(
    "plan-mismatch",
    "forward-size",
    ValueError,
    names(r"plans\[0\]", r"\(50, 30\)", r"\(40, 60\)"),
    lambda: forward(TOK, IMAGES, plans=PLANS[::-1]),
)
case(
    "plan-mismatch",
    "DynamicS2-call-size",
    ValueError,
    names(r"plans\[0\]", r"\(50, 30\)", r"\(40, 60\)"),
    lambda: _layer()(IMAGES, plans=PLANS[::-1]),
)
case(
    "plan-mismatch",
    "merge-number-of-scales",
    ValueError,
    names("plans", "scales", r"\[1, 2\]"),
    lambda: merge(torch.randn(PLANS[0].num_tiles + 1, 4, 8), [PLANS[0], plan_tiles(8, 8, (32,))]),
)

# ---- scales and plans both given and disagreeing ---------------------------------------------
case(
    "scales-plans",
    "forward",
    ValueError,
    names("scales", lit((32, 96)), r"plans\[0\]", lit((32, 64))),
    lambda: forward(TOK, IMAGES, (32, 96), plans=PLANS),
)
case(
    "scales-plans",
    "forward-tile_size",
    ValueError,
    names("tile_size", r"\b16\b", "plans", r"\b32\b"),
    lambda: forward(TOK, IMAGES, plans=PLANS, tile_size=16),
)
case(
    "scales-plans",
    "DynamicS2-call",
    ValueError,
    names("scales", lit((32, 64)), "plans", lit((32,))),
    lambda: _layer()(IMAGES, plans=[plan_tiles(40, 60, (32,)), plan_tiles(50, 30, (32,))]),
)
case(
    "scales-plans",
    "DynamicS2-init-plans-option",
    TypeError,
    names("plans"),
    lambda: DynamicS2(TOK, scales=SCALES, plans=PLANS),
)

# ---- non-positive max_batch_tiles ------------------------------------------------------------
for _mbt in (0, -1):
    case(
        "max-batch-tiles",
        f"encode_tiles-{_mbt}",
        ValueError,
        names("max_batch_tiles", rf"{_mbt}\b"),
        lambda m=_mbt: encode_tiles(TOK, BATCH.tiles, max_batch_tiles=m),
    )
    case(
        "max-batch-tiles",
        f"forward-{_mbt}",
        ValueError,
        names("max_batch_tiles", rf"{_mbt}\b"),
        lambda m=_mbt: forward(TOK, IMAGES, SCALES, max_batch_tiles=m),
    )
    case(
        "max-batch-tiles",
        f"DynamicS2-init-{_mbt}",
        ValueError,
        names("max_batch_tiles", rf"{_mbt}\b"),
        lambda m=_mbt: _layer(max_batch_tiles=m),
    )
case(
    "max-batch-tiles",
    "encode_tiles-float",
    TypeError,
    names("max_batch_tiles", r"2\.5"),
    lambda: encode_tiles(TOK, BATCH.tiles, max_batch_tiles=2.5),  # type: ignore[arg-type]
)
case(
    "max-batch-tiles",
    "encode_tiles-bool",
    TypeError,
    names("max_batch_tiles", "True"),
    lambda: encode_tiles(TOK, BATCH.tiles, max_batch_tiles=True),
)

# ---- output_scale out of range ---------------------------------------------------------------
for _os in (2, -3):
    case(
        "output-scale",
        f"merge-{_os}",
        ValueError,
        names("output_scale", rf"{_os}\b"),
        lambda o=_os: merge(FEATS, PLANS, output_scale=o),
    )
    case(
        "output-scale",
        f"forward-{_os}",
        ValueError,
        names("output_scale", rf"{_os}\b"),
        lambda o=_os: forward(TOK, IMAGES, SCALES, output_scale=o),
    )
    case(
        "output-scale",
        f"DynamicS2-init-{_os}",
        ValueError,
        names("output_scale", rf"{_os}\b"),
        lambda o=_os: _layer(output_scale=o),
    )
case(
    "output-scale",
    "merge-str",
    TypeError,
    names("output_scale", "'0'"),
    lambda: merge(FEATS, PLANS, output_scale="0"),  # type: ignore[arg-type]
)
case(
    "output-scale",
    "merge-float",
    TypeError,
    names("output_scale", r"1\.0"),
    lambda: merge(FEATS, PLANS, output_scale=1.0),  # type: ignore[arg-type]
)

# ---- unknown resample, policy or fit ---------------------------------------------------------
case(
    "resample",
    "merge",
    ValueError,
    names("resample", "'nearest'"),
    lambda: merge(FEATS, PLANS, resample="nearest"),
)
case(
    "resample",
    "forward",
    ValueError,
    names("resample", "'bicubic'"),
    lambda: forward(TOK, IMAGES, SCALES, resample="bicubic"),
)
case(
    "resample",
    "DynamicS2-init",
    ValueError,
    names("resample", "'cubic'"),
    lambda: _layer(resample="cubic"),
)
case(
    "policy",
    "plan_tiles",
    ValueError,
    names("policy", "'square'"),
    lambda: plan_tiles(8, 8, SCALES, policy="square"),
)  # type: ignore[arg-type]
case(
    "policy",
    "plan_tiles-case",
    ValueError,
    names("policy", "'NVILA'"),
    lambda: plan_tiles(8, 8, SCALES, policy="NVILA"),
)  # type: ignore[arg-type]
case(
    "policy",
    "forward",
    ValueError,
    names("policy", "'grid'"),
    lambda: forward(TOK, IMAGES, SCALES, policy="grid"),
)  # type: ignore[arg-type]
case(
    "policy", "DynamicS2-init", ValueError, names("policy", "'grid'"), lambda: _layer(policy="grid")
)
case(
    "fit",
    "plan_tiles",
    ValueError,
    names("fit", "'crop'"),
    lambda: plan_tiles(8, 8, SCALES, fit="crop"),
)  # type: ignore[arg-type]
case(
    "fit",
    "plan_tiles-None",
    ValueError,
    names("fit", "None"),
    lambda: plan_tiles(8, 8, SCALES, fit=None),
)  # type: ignore[arg-type]
case(
    "fit",
    "forward",
    ValueError,
    names("fit", "'contain'"),
    lambda: forward(TOK, IMAGES, SCALES, fit="contain"),
)  # type: ignore[arg-type]
case("fit", "DynamicS2-init", ValueError, names("fit", "'contain'"), lambda: _layer(fit="contain"))

# ---- negative prefix count -------------------------------------------------------------------
case(
    "prefix",
    "merge",
    ValueError,
    names("num_prefix_tokens", "-1"),
    lambda: merge(FEATS, PLANS, num_prefix_tokens=-1),
)
case(
    "prefix",
    "forward",
    ValueError,
    names("num_prefix_tokens", "-2"),
    lambda: forward(TOK, IMAGES, SCALES, num_prefix_tokens=-2),
)
case(
    "prefix",
    "as_backbone",
    ValueError,
    names("num_prefix_tokens", "-1"),
    lambda: as_backbone(TOK, num_prefix_tokens=-1),
)
case(
    "prefix",
    "DynamicS2-init",
    ValueError,
    names("num_prefix_tokens", "-1"),
    lambda: _layer(num_prefix_tokens=-1),
)
case(
    "prefix",
    "merge-float",
    TypeError,
    names("num_prefix_tokens", r"1\.5"),
    lambda: merge(FEATS, PLANS, num_prefix_tokens=1.5),  # type: ignore[arg-type]
)
case(
    "prefix",
    "as_backbone-float",
    TypeError,
    names("num_prefix_tokens", r"1\.5"),
    lambda: as_backbone(TOK, num_prefix_tokens=1.5),  # type: ignore[arg-type]
)
case(
    "prefix",
    "merge-all-tokens",
    ValueError,
    names("num_prefix_tokens", r"\b4\b"),
    lambda: merge(FEATS, PLANS, num_prefix_tokens=4),
)
case(
    "prefix",
    "merge-prefix-on-maps",
    ValueError,
    names("num_prefix_tokens", r"\b1\b", "4-D"),
    lambda: merge(torch.randn(T_TOTAL, 8, 2, 2), PLANS, num_prefix_tokens=1),
)

# ---- a model that is not callable ------------------------------------------------------------
case("model-not-callable", "as_backbone", TypeError, names("model", "int"), lambda: as_backbone(42))
case(
    "model-not-callable",
    "encode_tiles",
    TypeError,
    names("model", "str"),
    lambda: encode_tiles("vit", BATCH.tiles),  # type: ignore[arg-type]
)
case(
    "model-not-callable",
    "forward",
    TypeError,
    names("model", "NoneType"),
    lambda: forward(None, IMAGES, SCALES),
)
case(
    "model-not-callable",
    "DynamicS2",
    TypeError,
    names("model", "dict"),
    lambda: DynamicS2({}, scales=SCALES),
)
case(
    "model-not-callable",
    "as_backbone-feature_layer-non-hf",
    ValueError,
    names("feature_layer", "-2"),
    lambda: as_backbone(TOK, feature_layer=-2),
)
case(
    "model-not-callable",
    "forward-feature_layer-non-hf",
    ValueError,
    names("feature_layer", "-2"),
    lambda: forward(TOK, IMAGES, SCALES, feature_layer=-2),
)


# ---- a model output of the wrong rank, batch size or token count -----------------------------
def _rank2(x: torch.Tensor) -> torch.Tensor:
    return TOK(x).mean(dim=1)


def _rank5(x: torch.Tensor) -> torch.Tensor:
    return MAPS(x)[:, None]


def _double_batch(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([TOK(x), TOK(x)])


def _tuple_out(x: torch.Tensor) -> tuple[torch.Tensor]:
    return (TOK(x),)


def _fifteen_tokens(x: torch.Tensor) -> torch.Tensor:
    return Tiny(n=4)(x)[:, :15]


def _non_square_maps(x: torch.Tensor) -> torch.Tensor:
    return MAPS(x)[:, :, :, :1]


def _zero_channels(x: torch.Tensor) -> torch.Tensor:
    return TOK(x)[:, :, :0]


case(
    "model-output",
    "encode_tiles-rank2",
    ValueError,
    names("backbone", r"\(\d+, 4\)"),
    lambda: encode_tiles(_rank2, BATCH.tiles),
)
case(
    "model-output",
    "encode_tiles-rank5",
    ValueError,
    names("backbone", r"\(\d+, 1, 4, 2, 2\)"),
    lambda: encode_tiles(_rank5, BATCH.tiles),
)
case(
    "model-output",
    "encode_tiles-batch",
    ValueError,
    names("backbone", rf"\b{2 * T_TOTAL}\b", rf"\b{T_TOTAL}\b"),
    lambda: encode_tiles(_double_batch, BATCH.tiles),
)
case(
    "model-output",
    "encode_tiles-batch-chunked",
    ValueError,
    names("backbone", r"\b6\b", r"\b3\b"),
    lambda: encode_tiles(_double_batch, BATCH.tiles, max_batch_tiles=3),
)
case(
    "model-output",
    "encode_tiles-tuple",
    TypeError,
    names("backbone", "tuple"),
    lambda: encode_tiles(_tuple_out, BATCH.tiles),
)
case(
    "model-output",
    "forward-rank2",
    ValueError,
    names("backbone", r"\(\d+, 4\)"),
    lambda: forward(_rank2, IMAGES, SCALES),
)
case(
    "model-output",
    "forward-batch",
    ValueError,
    names("backbone", r"outputs", r"tiles"),
    lambda: forward(_double_batch, IMAGES, SCALES, max_batch_tiles=4),
)
case(
    "model-output",
    "forward-non-square-tokens",
    ValueError,
    names(r"\b15\b", "tokens", "square"),
    lambda: forward(_fifteen_tokens, IMAGES, SCALES, num_prefix_tokens=0),
)
case(
    "model-output",
    "forward-non-square-tokens-declared-prefix",
    ValueError,
    names(r"\b15\b", "tokens", "num_prefix_tokens=1"),
    lambda: forward(Backbone(_fifteen_tokens, num_prefix_tokens=1), IMAGES, SCALES),
)
case(
    "model-output",
    "DynamicS2-rank5",
    ValueError,
    names("backbone", r"\(\d+, 1, 4, 2, 2\)"),
    lambda: DynamicS2(_rank5, scales=SCALES)(IMAGES),
)
case(
    "model-output",
    "forward-non-square-maps",
    ValueError,
    names(r"2x1", "square"),
    lambda: forward(_non_square_maps, IMAGES, SCALES),
)
case(
    "model-output",
    "forward-zero-channels",
    ValueError,
    names(r"\(\d+, 4, 0\)|0 channels"),
    lambda: forward(_zero_channels, IMAGES, SCALES),
)

# ---- tile features whose count doesn't match the plans ---------------------------------------
case(
    "tile-features",
    "merge-one-too-many",
    ValueError,
    names("tile_features", rf"\b{T_TOTAL}\b", rf"\({T_TOTAL + 1}, 4, 8\)"),
    lambda: merge(torch.randn(T_TOTAL + 1, 4, 8), PLANS),
)
case(
    "tile-features",
    "merge-one-image-missing",
    ValueError,
    names("tile_features", rf"\b{T_TOTAL}\b", rf"\({PLANS[0].num_tiles}, 4, 8\)"),
    lambda: merge(torch.randn(PLANS[0].num_tiles, 4, 8), PLANS),
)
case(
    "tile-features",
    "merge-maps-count",
    ValueError,
    names("tile_features", rf"\b{T_TOTAL}\b", rf"\({T_TOTAL - 1}, 8, 2, 2\)"),
    lambda: merge(torch.randn(T_TOTAL - 1, 8, 2, 2), PLANS),
)
case(
    "tile-features",
    "merge-non-square-tokens",
    ValueError,
    names(r"\b5\b", "tokens", "num_prefix_tokens=0"),
    lambda: merge(torch.randn(T_TOTAL, 5, 8), PLANS, num_prefix_tokens=0),
)
case(
    "tile-features",
    "merge-zero-channels",
    ValueError,
    names("tile_features", rf"\({T_TOTAL}, 4, 0\)"),
    lambda: merge(torch.randn(T_TOTAL, 4, 0), PLANS),
)
case(
    "tile-features",
    "merge-zero-tokens",
    ValueError,
    names(r"\b0 tokens"),
    lambda: merge(torch.randn(T_TOTAL, 0, 8), PLANS),
)

# ---- malformed TilePlan.from_dict ------------------------------------------------------------
_FROM_DICT: list[tuple[str, Any, type[Exception], str]] = [
    ("not-a-mapping", [1, 2], TypeError, names("mapping", "list")),
    ("None", None, TypeError, names("mapping", "NoneType")),
    ("missing-scales", _dict(scales=None), ValueError, names("missing", "scales")),
    ("missing-image_size", _dict(image_size=None), ValueError, names("missing", "image_size")),
    ("image_size-zero", _dict(image_size=[0, 60]), ValueError, names("image_size", r"\b0\b")),
    (
        "image_size-three",
        _dict(image_size=[1, 2, 3]),
        TypeError,
        names("image_size", r"\[1, 2, 3\]"),
    ),
    ("image_size-str", _dict(image_size="40x60"), TypeError, names("image_size", "'40x60'")),
    ("image_size-float", _dict(image_size=[40.0, 60]), TypeError, names("image_size", r"40\.0")),
    ("tile_size-str", _dict(tile_size="32"), TypeError, names("tile_size", "'32'")),
    ("tile_size-negative", _dict(tile_size=-32), ValueError, names("tile_size", "-32")),
    ("tile_size-bool", _dict(tile_size=True), TypeError, names("tile_size", "True")),
    ("policy", _dict(policy="square"), ValueError, names("policy", "'square'")),
    ("policy-list", _dict(policy=["aspect"]), ValueError, names("policy", r"\['aspect'\]")),
    ("fit", _dict(fit="crop"), ValueError, names("fit", "'crop'")),
    ("scales-empty", _dict(scales=[]), ValueError, names("scales", r"\[\]")),
    ("scales-int", _dict(scales=5), ValueError, names("scales", r"\b5\b")),
    ("scales-entry-list", _dict(scales=[[32, [1, 1]]]), TypeError, names(r"scales\[0\]", r"\[32")),
    (
        "scales-entry-missing-grid",
        _scale_entry(grid=None),
        ValueError,
        names(r"scales\[0\]", "grid"),
    ),
    (
        "scales-scale-zero",
        _scale_entry(scale=0),
        ValueError,
        names(r"scales\[0\]\.scale", r"\b0\b"),
    ),
    (
        "scales-grid-zero",
        _scale_entry(grid=[0, 2]),
        ValueError,
        names(r"scales\[0\]\.grid", r"\b0\b"),
    ),
    (
        "scales-grid-three",
        _scale_entry(grid=[1, 1, 1]),
        TypeError,
        names(r"scales\[0\]\.grid", r"\[1, 1, 1\]"),
    ),
    (
        "scales-content-exceeds-canvas",
        _scale_entry(content_size=[33, 64]),
        ValueError,
        names(r"scales\[0\]\.content_size", r"\(33, 64\)"),
    ),
    (
        "scales-not-increasing",
        _dict(scales=[GOOD_DICT["scales"][1], GOOD_DICT["scales"][0]]),
        ValueError,
        names("scales", "increasing", r"\[64, 32\]"),
    ),
    (
        "scales-below-tile_size",
        _scale_entry(scale=16),
        ValueError,
        names(r"scales\[0\]\.scale", r"\b16\b", "tile_size"),
    ),
    (
        "stretch-with-padding",
        _scale_entry(content_size=[32, 20]),
        ValueError,
        names(r"scales\[0\]\.content_size", r"\(32, 20\)", "stretch"),
    ),
]
for _name, _data, _error, _pattern in _FROM_DICT:
    case("from-dict", _name, _error, _pattern, lambda d=_data: TilePlan.from_dict(d))

# ---- bad max_tiles ---------------------------------------------------------------------------
case(
    "max-tiles",
    "zero",
    ValueError,
    names("max_tiles", r"\b0\b"),
    lambda: plan_tiles(8, 8, SCALES, max_tiles=0),
)
case(
    "max-tiles",
    "negative",
    ValueError,
    names("max_tiles", "-3"),
    lambda: plan_tiles(8, 8, SCALES, max_tiles=-3),
)
case(
    "max-tiles",
    "float",
    TypeError,
    names("max_tiles", r"2\.5"),
    lambda: plan_tiles(8, 8, SCALES, max_tiles=2.5),
)  # type: ignore[arg-type]
case(
    "max-tiles",
    "str",
    TypeError,
    names("max_tiles", "'4'"),
    lambda: plan_tiles(8, 8, SCALES, max_tiles="4"),
)  # type: ignore[arg-type]
case(
    "max-tiles",
    "bool",
    TypeError,
    names("max_tiles", "True"),
    lambda: plan_tiles(8, 8, SCALES, max_tiles=True),
)
case(
    "max-tiles",
    "wrong-length",
    ValueError,
    names("max_tiles", lit((4,))),
    lambda: plan_tiles(8, 8, SCALES, max_tiles=(4,)),
)
case(
    "max-tiles",
    "decreasing",
    ValueError,
    names("max_tiles", lit((8, 4))),
    lambda: plan_tiles(8, 8, SCALES, max_tiles=(8, 4)),
)
case(
    "max-tiles",
    "zero-entry",
    ValueError,
    names("max_tiles", r"\b0\b"),
    lambda: plan_tiles(8, 8, SCALES, max_tiles=(0, 4)),
)
case(
    "max-tiles",
    "nvila-per-scale",
    ValueError,
    names("max_tiles", lit((1, 4))),
    lambda: plan_tiles(8, 8, SCALES, max_tiles=(1, 4), policy="nvila"),
)
case(
    "max-tiles",
    "nvila-below-minimum",
    ValueError,
    names("max_tiles", r"\b2\b"),
    lambda: plan_tiles(8, 8, SCALES, max_tiles=2, policy="nvila"),
)
case(
    "max-tiles",
    "forward",
    ValueError,
    names("max_tiles", r"\b0\b"),
    lambda: forward(TOK, IMAGES, SCALES, max_tiles=0),
)
case(
    "max-tiles",
    "DynamicS2-init",
    ValueError,
    names("max_tiles", r"\b0\b"),
    lambda: _layer(max_tiles=0),
)
# other bad plan_tiles arguments
case(
    "plan-args",
    "height-float",
    TypeError,
    names("height", r"10\.5"),
    lambda: plan_tiles(10.5, 8, SCALES),
)  # type: ignore[arg-type]
case("plan-args", "width-str", TypeError, names("width", "'8'"), lambda: plan_tiles(8, "8", SCALES))  # type: ignore[arg-type]
case(
    "plan-args",
    "tile_size-zero",
    ValueError,
    names("tile_size", r"\b0\b"),
    lambda: plan_tiles(8, 8, SCALES, tile_size=0),
)
case(
    "plan-args",
    "tile_size-float",
    TypeError,
    names("tile_size", r"32\.0"),
    lambda: plan_tiles(8, 8, SCALES, tile_size=32.0),  # type: ignore[arg-type]
)

# ---- bad pad_to_multiple ---------------------------------------------------------------------
for _ptm in (0, -4):
    case(
        "pad-to-multiple",
        f"encode_tiles-{_ptm}",
        ValueError,
        names("pad_to_multiple", rf"{_ptm}\b"),
        lambda p=_ptm: encode_tiles(TOK, BATCH.tiles, pad_to_multiple=p),
    )
case(
    "pad-to-multiple",
    "encode_tiles-float",
    TypeError,
    names("pad_to_multiple", r"2\.0"),
    lambda: encode_tiles(TOK, BATCH.tiles, pad_to_multiple=2.0),  # type: ignore[arg-type]
)
case(
    "pad-to-multiple",
    "encode_tiles-above-max_batch_tiles",
    ValueError,
    names("pad_to_multiple", r"\b4\b", "max_batch_tiles", r"\b2\b"),
    lambda: encode_tiles(TOK, BATCH.tiles, max_batch_tiles=2, pad_to_multiple=4),
)
case(
    "pad-to-multiple",
    "forward",
    ValueError,
    names("pad_to_multiple", r"\b0\b"),
    lambda: forward(TOK, IMAGES, SCALES, pad_to_multiple=0),
)
case(
    "pad-to-multiple",
    "DynamicS2-init",
    ValueError,
    names("pad_to_multiple", "-1"),
    lambda: _layer(pad_to_multiple=-1),
)

# ---- bad mean / std --------------------------------------------------------------------------
case(
    "mean-std",
    "tile_images-mean-length",
    ValueError,
    names("mean", lit((0.5, 0.5))),
    lambda: tile_images(UINT8, PLANS[0], mean=(0.5, 0.5)),
)
case(
    "mean-std",
    "tile_images-std-length",
    ValueError,
    names("std", lit((0.5, 0.5, 0.5, 0.5))),
    lambda: tile_images(UINT8, PLANS[0], std=(0.5, 0.5, 0.5, 0.5)),
)
case(
    "mean-std",
    "tile_images-std-zero",
    ValueError,
    names("std", lit((0.5, 0.0, 0.5))),
    lambda: tile_images(UINT8, PLANS[0], std=(0.5, 0.0, 0.5)),
)
case(
    "mean-std",
    "tile_images-mean-str",
    TypeError,
    names("mean", "'abc'"),
    lambda: tile_images(UINT8, PLANS[0], mean="abc"),  # type: ignore[arg-type]
)
case(
    "mean-std",
    "tile_images-mean-None-item",
    TypeError,
    names("mean", "None"),
    lambda: tile_images(UINT8, PLANS[0], mean=(0.5, None, 0.5)),  # type: ignore[arg-type]
)
case(
    "mean-std",
    "forward-mean-length",
    ValueError,
    names("mean", lit((0.5, 0.5))),
    lambda: forward(TOK, UINT8, SCALES, mean=(0.5, 0.5)),
)
case(
    "mean-std",
    "forward-backbone-std-length",
    ValueError,
    names("std", lit((0.5,) * 4)),
    lambda: forward(Backbone(TOK, std=(0.5,) * 4), UINT8, SCALES),
)
case(
    "mean-std",
    "tile_images-pad_value-str",
    TypeError,
    names("pad_value", "'x'"),
    lambda: tile_images(
        [torch.rand(3, 20, 300)],
        plan_tiles(20, 300, (32,), fit="pad"),
        pad_value="x",  # type: ignore[arg-type]
    ),
)

# ---- non-TileBatch in collate ----------------------------------------------------------------
case("collate", "str-item", TypeError, names(r"batches\[1\]", "str"), lambda: collate([BATCH, "x"]))  # type: ignore[list-item]
case(
    "collate",
    "tensor-item",
    TypeError,
    names(r"batches\[0\]", "Tensor"),
    lambda: collate([BATCH.tiles]),
)  # type: ignore[list-item]
case("collate", "int", TypeError, names("batches", "int"), lambda: collate(42))  # type: ignore[arg-type]
case(
    "collate",
    "tile-sizes-differ",
    ValueError,
    names(r"batches\[1\]", r"\b16\b", r"\b32\b"),
    lambda: collate([BATCH, tile_images([IMAGES[0]], plan_tiles(40, 60, (16, 32)))]),
)
case(
    "collate",
    "channels-differ",
    ValueError,
    names(r"batches\[1\]", "channels|shape"),
    lambda: collate([BATCH, tile_images([torch.rand(1, 40, 60)], PLANS[0])]),
)
case(
    "collate",
    "devices-differ",
    ValueError,
    names(r"batches\[1\]", "meta"),
    lambda: collate([BATCH, BATCH.to("meta")]),
)

# ---- DynamicS2 options -----------------------------------------------------------------------
case(
    "options",
    "DynamicS2-unknown",
    TypeError,
    names("max_tile\\b|unknown", "max_tile"),
    lambda: _layer(max_tile=4),
)


# ---- dynamic_s2.s2wrapper.forward ------------------------------------------------------------
if s2wrapper is not None:
    S2_X = torch.rand(2, 3, 16, 16)

    def _s2(*args: Any, **kwargs: Any) -> Callable[[], object]:
        model = kwargs.pop("model", TOK)
        x = kwargs.pop("x", S2_X)
        return lambda: s2wrapper.forward(model, x, *args, **kwargs)

    _S2: list[tuple[str, str, type[Exception], str, Callable[[], object]]] = [
        (
            "non-tensor",
            "s2-input-ndarray",
            TypeError,
            names("input", "ndarray"),
            _s2([1], x=np.zeros((1, 3, 16, 16))),
        ),
        (
            "rank",
            "s2-input-3d",
            ValueError,
            names("input", r"\(3, 16, 16\)"),
            _s2([1], x=torch.rand(3, 16, 16)),
        ),
        (
            "rank",
            "s2-input-5d",
            ValueError,
            names("input", r"\(1, 2, 3, 16, 16\)"),
            _s2([1], x=torch.rand(1, 2, 3, 16, 16)),
        ),
        (
            "empty",
            "s2-batch0",
            ValueError,
            names("input", r"\(0, 3, 16, 16\)"),
            _s2([1], x=torch.rand(0, 3, 16, 16)),
        ),
        (
            "zero-size",
            "s2-hw0",
            ValueError,
            names("input", r"\(1, 3, 0, 0\)|0x0 input"),
            _s2([1], x=torch.rand(1, 3, 0, 0)),
        ),
        (
            "zero-size",
            "s2-channels0",
            ValueError,
            names("input", r"\(1, 0, 16, 16\)"),
            _s2([1], x=torch.rand(1, 0, 16, 16)),
        ),
        (
            "device-dtype",
            "s2-int-input",
            TypeError,
            names("input", "int32"),
            _s2([1], x=torch.zeros(1, 3, 16, 16, dtype=torch.int32)),
        ),
        ("empty", "s2-scales-empty", ValueError, names("scales", r"\[\]"), _s2([])),
        ("scales", "s2-scales-none", ValueError, names("scales", "img_sizes"), _s2(None)),
        ("scales", "s2-scales-str", TypeError, names("scales", "'12'"), _s2("12")),
        ("scales", "s2-scales-zero", ValueError, names("scales", r"\[0\]"), _s2([0])),
        ("scales", "s2-scales-nan", ValueError, names("scales", "nan"), _s2([float("nan")])),
        ("scales", "s2-scales-inf", ValueError, names("scales", "inf"), _s2([1, float("inf")])),
        (
            "scales",
            "s2-img_sizes-zero",
            ValueError,
            names("img_sizes", r"\b0\b"),
            _s2(img_sizes=[16, 0]),
        ),
        (
            "scales",
            "s2-img_sizes-indivisible",
            ValueError,
            names("img_sizes", r"\[25\]"),
            _s2(img_sizes=[25]),
        ),
        (
            "max-batch-tiles",
            "s2-max_split_size-negative",  # 0 means the default, as in the original
            ValueError,
            names("max_split_size", r"-1\b"),
            _s2([1], max_split_size=-1),
        ),
        (
            "scales",
            "s2-non-square-without-mss",
            ValueError,
            names("max_split_size", "None"),
            _s2([1], x=torch.rand(1, 3, 16, 24)),
        ),
        (
            "output-scale",
            "s2-resize_output_to_idx",
            ValueError,
            names("resize_output_to_idx", r"\b2\b"),
            _s2([1, 2], resize_output_to_idx=2),
        ),
        (
            "prefix",
            "s2-num_prefix_token",
            ValueError,
            names("num_prefix_token", "-1"),
            _s2([1], num_prefix_token=-1),
        ),
        (
            "prefix",
            "s2-prefix-with-bchw",
            ValueError,
            names("num_prefix_token", r"\b1\b"),
            _s2([1], output_shape="bchw", num_prefix_token=1),
        ),
        (
            "fit",
            "s2-output_shape",
            ValueError,
            names("output_shape", "'nbc'"),
            _s2([1], output_shape="nbc"),
        ),
        (
            "fit",
            "s2-split_mode",
            ValueError,
            names("split_mode", "'crop'"),
            _s2([1], split_mode="crop"),
        ),
        (
            "model-not-callable",
            "s2-model-int",
            TypeError,
            names("model", "int"),
            _s2([1], model=42),
        ),
        (
            "model-output",
            "s2-rank",
            ValueError,
            names("model", r"\(\d+, 4\)"),
            _s2([1], model=_rank2),
        ),
        (
            "model-output",
            "s2-batch",
            ValueError,
            names("model", r"\(4, 4, 4\)"),
            _s2([1], model=_double_batch),
        ),
        (
            "model-output",
            "s2-tuple",
            TypeError,
            names("model", "tuple"),
            _s2([1], model=_tuple_out),
        ),
        (
            "model-output",
            "s2-non-square",
            ValueError,
            names(r"\b15\b", "tokens", "square"),
            _s2([1], model=_fifteen_tokens),
        ),
        (
            "model-output",
            "s2-bchw-rank",
            ValueError,
            names("model", "output_shape='bchw'"),
            _s2([1], output_shape="bchw"),
        ),
    ]
    for _cat, _name, _error, _pattern, _call in _S2:
        case(_cat, _name, _error, _pattern, _call)


# ---- dynamic_s2.nvila ------------------------------------------------------------------------
if nvila is not None:
    NV_SCALES = (32, 64, 96)
    NV_U8 = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    NV_FEATS = torch.randn(1 + 4 + 6, 4, 8)  # block (2, 3)

    _NV: list[tuple[str, str, type[Exception], str, Callable[[], object]]] = [
        (
            "empty",
            "nvila-preprocess_batch-empty",
            ValueError,
            names("images", "empty"),
            lambda: nvila.preprocess_batch([], NV_SCALES),
        ),
        (
            "non-tensor",
            "nvila-preprocess-int",
            TypeError,
            names("image", "int"),
            lambda: nvila.preprocess(42, NV_SCALES),
        ),
        (
            "non-tensor",
            "nvila-preprocess_batch-str",
            TypeError,
            names("images", "str"),
            lambda: nvila.preprocess_batch("a.jpg", NV_SCALES),
        ),
        (
            "rank",
            "nvila-preprocess-4d",
            ValueError,
            names("image", r"\(1, 3, 40, 60\)"),
            lambda: nvila.preprocess(NV_U8[None], NV_SCALES),
        ),
        (
            "channels",
            "nvila-preprocess-5-channels",
            ValueError,
            names("image", r"\(5, 8, 8\)"),
            lambda: nvila.preprocess(torch.zeros(5, 8, 8, dtype=torch.uint8), NV_SCALES),
        ),
        (
            "zero-size",
            "nvila-preprocess-zero",
            ValueError,
            names("image", r"\(3, 0, 4\)"),
            lambda: nvila.preprocess(torch.zeros(3, 0, 4, dtype=torch.uint8), NV_SCALES),
        ),
        (
            "device-dtype",
            "nvila-preprocess-int32",
            TypeError,
            names("image", "int32"),
            lambda: nvila.preprocess(torch.zeros(3, 8, 8, dtype=torch.int32), NV_SCALES),
        ),
        (
            "device-dtype",
            "nvila-preprocess_batch-device",
            ValueError,
            names(r"images\[1\]", "meta"),
            lambda: nvila.preprocess_batch([NV_U8, NV_U8.to("meta")], NV_SCALES),
        ),
        (
            "factor-scales",
            "nvila-preprocess-(1, 2)",
            ValueError,
            names("scales", lit((1, 2))),
            lambda: nvila.preprocess(NV_U8, (1, 2)),
        ),
        (
            "factor-scales",
            "nvila-merge_features-(1, 2)",
            ValueError,
            names("scales", lit((1, 2))),
            lambda: nvila.merge_features(torch.randn(2, 4, 8), [(1, 1)], scales=(1, 2)),
        ),
        (
            "scales",
            "nvila-preprocess-not-multiples",
            ValueError,
            names("scale", lit((32, 48))),
            lambda: nvila.preprocess(NV_U8, (32, 48)),
        ),
        (
            "max-tiles",
            "nvila-preprocess-zero",
            ValueError,
            names("max_tiles", r"\b0\b"),
            lambda: nvila.preprocess(NV_U8, NV_SCALES, max_tiles=0),
        ),
        (
            "max-tiles",
            "nvila-preprocess-float",
            TypeError,
            names("max_tiles", r"2\.5"),
            lambda: nvila.preprocess(NV_U8, NV_SCALES, max_tiles=2.5),
        ),
        (
            "mean-std",
            "nvila-preprocess-mean-length",
            TypeError,
            names("mean", lit((0.5, 0.5))),
            lambda: nvila.preprocess(NV_U8, NV_SCALES, mean=(0.5, 0.5)),
        ),
        (
            "mean-std",
            "nvila-preprocess-std-zero",
            ValueError,
            names("std", lit((0.5, 0.0, 0.5))),
            lambda: nvila.preprocess(NV_U8, NV_SCALES, std=(0.5, 0.0, 0.5)),
        ),
        (
            "non-tensor",
            "nvila-merge_features-list",
            TypeError,
            names("tile_features", "list"),
            lambda: nvila.merge_features([NV_FEATS], [(2, 3)], NV_SCALES),
        ),
        (
            "rank",
            "nvila-merge_features-2d",
            ValueError,
            names("tile_features", r"\(11, 8\)"),
            lambda: nvila.merge_features(torch.randn(11, 8), [(2, 3)], NV_SCALES),
        ),
        (
            "model-output",
            "nvila-merge_features-non-square",
            ValueError,
            names("tile_features", "N=5"),
            lambda: nvila.merge_features(torch.randn(11, 5, 8), [(2, 3)], NV_SCALES),
        ),
        (
            "tile-features",
            "nvila-merge_features-count",
            ValueError,
            names("tile_features", r"\b11\b", r"\b12\b"),
            lambda: nvila.merge_features(torch.randn(12, 4, 8), [(2, 3)], NV_SCALES),
        ),
        (
            "tile-features",
            "nvila-merge_features-zero-channels",
            ValueError,
            names("tile_features", r"\(11, 4, 0\)|0 channels"),
            lambda: nvila.merge_features(torch.randn(11, 4, 0), [(2, 3)], NV_SCALES),
        ),
        (
            "empty",
            "nvila-merge_features-no-blocks",
            ValueError,
            names("block_sizes", "empty"),
            lambda: nvila.merge_features(NV_FEATS, [], NV_SCALES),
        ),
        (
            "plan-mismatch",
            "nvila-merge_features-block-zero",
            ValueError,
            names(r"block_sizes\[0\]", r"\(0, 3\)"),
            lambda: nvila.merge_features(NV_FEATS, [(0, 3)], NV_SCALES),
        ),
        (
            "plan-mismatch",
            "nvila-merge_features-block-str",
            TypeError,
            names("block_sizes", "'23'"),
            lambda: nvila.merge_features(NV_FEATS, "23", NV_SCALES),
        ),
        (
            "output-scale",
            "nvila-merge_features",
            ValueError,
            names("output_scale", r"\b3\b"),
            lambda: nvila.merge_features(NV_FEATS, [(2, 3)], NV_SCALES, output_scale=3),
        ),
        (
            "output-scale",
            "nvila-num_tokens-plan",
            ValueError,
            names("output_scale", r"\b5\b"),
            lambda: nvila.num_tokens(plan_tiles(40, 60, NV_SCALES, policy="nvila"), output_scale=5),
        ),
        (
            "rank",
            "nvila-pack_tokens-2d",
            ValueError,
            names("feature_map", r"\(4, 4\)"),
            lambda: nvila.pack_tokens(torch.randn(4, 4)),
        ),
        (
            "non-tensor",
            "nvila-pack_tokens-ndarray",
            TypeError,
            names("feature_map", "ndarray"),
            lambda: nvila.pack_tokens(np.zeros((2, 4, 4))),
        ),
        (
            "pad-to-multiple",
            "nvila-pack_tokens-factor-zero",
            ValueError,
            names("factor", r"\b0\b"),
            lambda: nvila.pack_tokens(torch.randn(2, 4, 4), factor=0),
        ),
        (
            "pad-to-multiple",
            "nvila-pack_tokens-factor-float",
            TypeError,
            names("factor", r"1\.5"),
            lambda: nvila.pack_tokens(torch.randn(2, 4, 4), factor=1.5),
        ),
        (
            "empty",
            "nvila-pack_tokens_batch-empty",
            ValueError,
            names("feature_maps", "empty"),
            lambda: nvila.pack_tokens_batch([]),
        ),
        (
            "channels",
            "nvila-pack_tokens_batch-channels",
            ValueError,
            names(r"feature_maps\[1\]", r"\b3 channels"),
            lambda: nvila.pack_tokens_batch([torch.randn(2, 4, 4), torch.randn(3, 4, 4)]),
        ),
        (
            "device-dtype",
            "nvila-pack_tokens_batch-dtype",
            ValueError,
            names(r"feature_maps\[1\]", "float64"),
            lambda: nvila.pack_tokens_batch([torch.randn(2, 4, 4), torch.randn(2, 4, 4).double()]),
        ),
        (
            "non-tensor",
            "nvila-pack_tokens_batch-tensor",
            TypeError,
            names("feature_maps", "Tensor"),
            lambda: nvila.pack_tokens_batch(torch.randn(2, 2, 4, 4)),
        ),
        (
            "plan-mismatch",
            "nvila-num_tokens-block",
            ValueError,
            names("block_size", r"\(0, 1\)"),
            lambda: nvila.num_tokens((0, 1)),
        ),
        (
            "plan-args",
            "nvila-num_tokens-tokens_per_tile_side",
            ValueError,
            names("tokens_per_tile_side", r"\b0\b"),
            lambda: nvila.num_tokens((1, 1), tokens_per_tile_side=0),
        ),
    ]
    for _cat, _name, _error, _pattern, _call in _NV:
        case(_cat, _name, _error, _pattern, _call)


# ---- issue 11: options that were ignored, unbounded work, unclear errors ---------------------


def _hf_vit() -> Any:
    transformers = importlib.import_module("transformers")
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32,
    )  # fmt: skip
    return transformers.ViTModel(config, add_pooling_layer=False)


def _huge_grid_plan() -> Any:
    data = _dict()
    data["scales"][0].update(grid=[100_000, 100_000], content_size=[3_200_000, 3_200_000])
    data["fit"] = "pad"
    return TilePlan.from_dict(data)


def _nvila_rule_broken() -> Any:
    data = plan_tiles(40, 60, (32, 64), policy="nvila").to_dict()
    data["scales"][0].update(grid=[1, 2], content_size=[32, 64])
    return TilePlan.from_dict(data)


_WITH_PREFIX = dynamic_s2.MultiScaleFeatures(torch.ones(2, 3), [(1, 2)], prefix=torch.ones(1, 1, 3))
_WITHOUT_PREFIX = dynamic_s2.MultiScaleFeatures(torch.ones(2, 3), [(1, 2)])
_ISSUE_11: list[tuple[str, str, type[Exception], str, Callable[[], object]]] = [
    (
        "feature-layer",
        "as_backbone-out-of-range",
        ValueError,
        names("feature_layer", r"\b5\b"),
        lambda: as_backbone(_hf_vit(), feature_layer=5),
    ),
    (
        "feature-layer",
        "forward-non-hf-backbone",
        ValueError,
        names("feature_layer=-2", "Backbone"),
        lambda: forward(Backbone(TOK), IMAGES, SCALES, feature_layer=-2),
    ),
    (
        "feature-layer",
        "DynamicS2-out-of-range",
        ValueError,
        names("feature_layer", r"-9\b"),
        lambda: DynamicS2(_hf_vit(), SCALES, feature_layer=-9),
    ),
    (
        "scales-plans",
        "forward-plans-policy",
        ValueError,
        names("policy='nvila'", r"plans\[0\]"),
        lambda: forward(TOK, IMAGES, plans=PLANS, policy="nvila"),
    ),
    (
        "scales-plans",
        "forward-plans-fit",
        ValueError,
        names("fit='pad'", r"plans\[0\]"),
        lambda: forward(TOK, IMAGES, plans=PLANS, fit="pad"),
    ),
    (
        "scales-plans",
        "forward-plans-max_tiles",
        ValueError,
        names("max_tiles=1", r"plans\[0\]"),
        lambda: forward(TOK, IMAGES, plans=PLANS, max_tiles=1),
    ),
    (
        "mean-std",
        "DynamicS2-mean-std-lengths",
        ValueError,
        names("mean", "std", r"\(0\.5, 0\.5\)"),
        lambda: DynamicS2(TOK, SCALES, mean=(0.5, 0.5), std=(0.5, 0.5, 0.5)),
    ),
    (
        "prefix",
        "DynamicS2-prefix-with-maps",
        ValueError,
        names("num_prefix_tokens=2", "maps"),
        lambda: DynamicS2(Backbone(MAPS, maps=True), SCALES, num_prefix_tokens=2),
    ),
    (
        "max-tiles",
        "plan_tiles-above-MAX_TILES",
        ValueError,
        names("max_tiles", str(dynamic_s2.plan.MAX_TILES + 1)),
        lambda: plan_tiles(40, 60, SCALES, max_tiles=dynamic_s2.plan.MAX_TILES + 1, policy="nvila"),
    ),
    ("from-dict", "from_dict-huge-grid", ValueError, names(r"grid", "MAX_TILES"), _huge_grid_plan),
    (
        "from-dict",
        "from_dict-nvila-rule",
        ValueError,
        names("policy='nvila'", r"\(1, 2\)"),
        _nvila_rule_broken,
    ),
    (
        "pad-to-multiple",
        "forward-pad_to_multiple-huge",
        ValueError,
        names("pad_to_multiple", "1000000000"),
        lambda: forward(TOK, IMAGES, SCALES, pad_to_multiple=10**9),
    ),
    (
        "resize",
        "resize-zero",
        ValueError,
        names("size", r"\(0, 5\)"),
        lambda: dynamic_s2.tiling.resize(torch.rand(3, 8, 8), (0, 5)),
    ),
    (
        "resize",
        "resize-scalar",
        TypeError,
        names("size", r"\b5\b"),
        lambda: dynamic_s2.tiling.resize(torch.rand(3, 8, 8), 5),
    ),  # type: ignore[arg-type]
    (
        "tile-features",
        "MultiScaleFeatures-negative",
        ValueError,
        names(r"sizes\[0\]", "-1"),
        lambda: dynamic_s2.MultiScaleFeatures(torch.zeros(0, 2), [(-1, 2)]),
    ),
    (
        "tile-features",
        "cat-mixed-prefix",
        ValueError,
        names("prefix", r"\[True, False\]"),
        lambda: dynamic_s2.MultiScaleFeatures.cat([_WITH_PREFIX, _WITHOUT_PREFIX]),
    ),
    (
        "model-output",
        "s2wrapper-channels-per-scale",
        ValueError,
        names(r"maps\[1\]", "channels"),
        lambda: s2wrapper.forward(  # type: ignore[union-attr]
            _alternating_channels(), torch.rand(1, 3, 16, 16), [1, 2], output_shape="bchw"
        ),
    ),
    (
        "backbone-spec",
        "load_backbone-missing",
        ValueError,
        names("spec", "hf:/missing"),
        lambda: dynamic_s2.load_backbone("hf:/missing"),
    ),
]
if nvila is not None:
    _ISSUE_11.append(
        (
            "channels",
            "nvila-channels-first-numpy",
            ValueError,
            names(r"\(3, 60, 4\)", "channels"),
            lambda: nvila.preprocess(np.zeros((3, 60, 4), np.uint8), (32, 64)),
        )
    )


def _alternating_channels() -> Callable[[torch.Tensor], torch.Tensor]:
    calls = iter(range(1000))

    def model(x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 2)[:, : 2 + next(calls) % 2]

    return model


for _cat, _name, _error, _pattern, _call in _ISSUE_11:
    case(_cat, _name, _error, _pattern, _call)


# ---- issue 20: checks made at construction, ambiguous splits refused, clear errors -----------


def _nvila_plan_with_tile(tile: int) -> Any:
    """A policy='nvila' plan dict whose tile side is ``tile`` (canvases made consistent)."""
    data = plan_tiles(40, 60, (32, 64), policy="nvila").to_dict()
    data["tile_size"] = tile
    for entry in data["scales"]:
        entry["content_size"] = [g * tile for g in entry["grid"]]
    return TilePlan.from_dict(data)


def _tokens(count: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.zeros(x.shape[0], count, 4)


def _store() -> Any:
    return importlib.import_module("dynamic_s2.store")


def _a_file() -> str:
    handle, path = tempfile.mkstemp(suffix=".txt")
    os.close(handle)
    return path


def _parquet_folder_without_config() -> None:
    """A Parquet extraction folder whose extract.json is gone, asked to resume."""
    pq = importlib.import_module("pyarrow.parquet")
    pa = importlib.import_module("pyarrow")
    from dynamic_s2 import parquet

    out = Path(tempfile.mkdtemp())
    (out / parquet.PARQUET_DIR).mkdir()
    table = pa.Table.from_pylist([parquet.error_row("/x.png", 1, 1, 0, "E", "m")], parquet.schema())
    pq.write_table(table, out / parquet.PARQUET_DIR / "0.parquet")
    _store().check_config(out, {"scales": [32, 64]})


def _draw_other_size() -> object:
    viz = importlib.import_module("dynamic_s2.viz")
    return viz.draw_plan(torch.rand(3, 40, 60), plan_tiles(50, 30, SCALES))


def _pil() -> object:
    return importlib.import_module("PIL.Image").new("RGB", (60, 40))


_ISSUE_20: list[tuple[str, str, type[Exception], str, Callable[[], object]]] = [
    ("backbone", "Backbone-fn-None", TypeError, names("fn", "None"), lambda: Backbone(None)),  # type: ignore[arg-type]
    (
        "backbone",
        "Backbone-input-size-0",
        ValueError,
        names("input_size", "0"),
        lambda: Backbone(TOK, input_size=0),
    ),
    (
        "backbone",
        "Backbone-mean-str",
        TypeError,
        names("mean", "'rgb'"),
        lambda: Backbone(TOK, mean="rgb"),  # type: ignore[arg-type]
    ),
    (
        "from-dict",
        "tile-size-huge",
        ValueError,
        names("tile_size", "1000000000", "MAX_TILE_SIZE"),
        lambda: TilePlan.from_dict(
            _dict(
                tile_size=10**9,
                scales=[{"scale": 10**9, "grid": [1, 1], "content_size": [10**9, 10**9]}],
            )
        ),
    ),
    (
        "from-dict",
        "nvila-tile-not-first-scale",
        ValueError,
        names("tile_size", "16", "nvila"),
        lambda: _nvila_plan_with_tile(16),
    ),
    (
        "policy",
        "plan_tiles-nvila-tile-size",
        ValueError,
        names("tile_size", "16", "nvila"),
        lambda: plan_tiles(40, 60, (32, 64), tile_size=16, policy="nvila"),
    ),
    (
        "policy",
        "S2Options-nvila-tile-size",
        ValueError,
        names("tile_size", "16", "nvila"),
        lambda: dynamic_s2.S2Options(scales=(32, 64), tile_size=16, policy="nvila"),
    ),
    (
        "plan-args",
        "plan_tiles-tile-size-huge",
        ValueError,
        names("tile_size", "100000", "MAX_TILE_SIZE"),
        lambda: plan_tiles(8, 8, (100_000,)),
    ),
    (
        "mean-std",
        "DynamicS2-mean-length-conv",
        ValueError,
        names("mean", lit((0.5, 0.5)), "3"),
        lambda: DynamicS2(torch.nn.Conv2d(3, 4, 8, stride=8), scales=SCALES, mean=(0.5, 0.5)),
    ),
    (
        "prefix",
        "DynamicS2-prefix-conv",
        ValueError,
        names("num_prefix_tokens", "1", "maps"),
        lambda: DynamicS2(torch.nn.Conv2d(3, 4, 8, stride=8), scales=SCALES, num_prefix_tokens=1),
    ),
    (
        "prefix",
        "forward-15-tokens",
        ValueError,
        names("num_prefix_tokens", "None", "15 tokens"),
        lambda: forward(_tokens(15), IMAGES, SCALES),
    ),
    (
        "prefix",
        "forward-3-tokens",
        ValueError,
        names("num_prefix_tokens", "None", "3 tokens"),
        lambda: forward(_tokens(3), IMAGES, SCALES),
    ),
    (
        "plan-mismatch",
        "draw_plan-other-size",
        ValueError,
        names("image", "plan", "40x60", "50x30"),
        _draw_other_size,
    ),
    (
        "model-output",
        "forward-tile-size-backbone-cannot-take",
        ValueError,
        names("tile_size", "48", "32"),
        lambda: forward(_hf_vit(), [torch.rand(3, 40, 60)], (48,)),
    ),
    (
        "channels",
        "forward-channels-last",
        ValueError,
        names(r"images\[0\]", r"\(40, 60, 3\)", "permute"),
        lambda: forward(TOK, [torch.rand(40, 60, 3)], SCALES),
    ),
    (
        "channels",
        "forward-channels-last-batch",
        ValueError,
        names(r"images\[0\]", r"\(40, 60, 3\)", "permute"),
        lambda: forward(TOK, torch.rand(2, 40, 60, 3), SCALES),
    ),
    (
        "non-tensor",
        "forward-PIL-item",
        TypeError,
        names(r"images\[0\]", "Image", "read_image"),
        lambda: forward(TOK, [_pil()], SCALES),
    ),
    (
        "non-tensor",
        "forward-PIL",
        TypeError,
        names("images", "Image", "read_image"),
        lambda: forward(TOK, _pil(), SCALES),  # type: ignore[arg-type]
    ),
    (
        "store",
        "open_features-a-file",
        ValueError,
        names("out_dir", r"\.txt"),
        lambda: _store().open_features(_a_file()),
    ),
    (
        "store",
        "open_features-verify-str",
        TypeError,
        names("verify", "'yes'"),
        lambda: _store().open_features(tempfile.mkdtemp(), verify="yes"),  # type: ignore[arg-type]
    ),
    (
        "store",
        "parquet-folder-without-extract-json",
        ValueError,
        names("out_dir", "extract.json", "overwrite"),
        _parquet_folder_without_config,
    ),
]
if nvila is not None:
    _ISSUE_20.append(
        (
            "tile-features",
            "merge_and_pack-non-square-maps",
            ValueError,
            names("tile_features", r"\(2, 4, 2, 3\)"),
            lambda: nvila.merge_and_pack(
                torch.rand(2, 4, 2, 3), [plan_tiles(32, 64, (32,), policy="nvila")]
            ),
        )
    )

for _cat, _name, _error, _pattern, _call in _ISSUE_20:
    case(_cat, _name, _error, _pattern, _call)


# ---------------------------------------------------------------------------------------------
# The catalog
# ---------------------------------------------------------------------------------------------

#: The kinds of bad input that issue 7 lists; every one needs at least one case.
REQUIRED_CATEGORIES = {
    "empty",
    "rank",
    "channels",
    "zero-size",
    "non-tensor",
    "device-dtype",
    "factor-scales",
    "plan-mismatch",
    "scales-plans",
    "max-batch-tiles",
    "output-scale",
    "resample",
    "policy",
    "fit",
    "prefix",
    "model-not-callable",
    "model-output",
    "tile-features",
    "from-dict",
    "max-tiles",
    "pad-to-multiple",
    "mean-std",
    "collate",
    # issue 20
    "backbone",
    "store",
}


def test_catalog_covers_every_category() -> None:
    covered = {c.category for c in CASES}
    assert covered >= REQUIRED_CATEGORIES, sorted(REQUIRED_CATEGORIES - covered)
    assert len({c.id for c in CASES}) == len(CASES), "duplicate case ids"


@pytest.mark.parametrize("bad", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input_raises_a_clear_error(bad: Case) -> None:
    try:
        bad.call()
    except (ValueError, TypeError) as err:
        assert isinstance(err, bad.error), (
            f"raised {type(err).__name__} instead of {bad.error.__name__}: {err}"
        )
        assert re.search(bad.pattern, str(err)), (
            f"the message does not name the argument and value ({bad.pattern!r}): {err}"
        )
    except Exception as err:
        pytest.fail(f"raised {type(err).__name__} (not ValueError/TypeError): {err}")
    else:
        pytest.fail(f"no error; expected {bad.error.__name__} matching {bad.pattern!r}")


# ---------------------------------------------------------------------------------------------
# Odd-but-valid input: works and gives finite output
# ---------------------------------------------------------------------------------------------


def _check_output(out: dynamic_s2.MultiScaleFeatures, tokens_per_side: int = 2) -> None:
    """Finite features, zero padding, and masks that match the plans."""
    assert torch.isfinite(out.tokens.float()).all()
    if out.prefix is not None:
        assert torch.isfinite(out.prefix.float()).all()
    for i, plan in enumerate(out.plans):
        expected = plan.feature_size(-1, tokens_per_side)
        assert out.sizes[i] == expected
        assert int(out.mask[i].sum()) == expected[0] * expected[1]
        assert out.mask[i, : expected[0], : expected[1]].all()
    assert (out.features[~out.mask] == 0).all()


@pytest.mark.parametrize("fit", ["stretch", "pad"])
@pytest.mark.parametrize("policy", ["aspect", "nvila"])
def test_one_pixel_and_panoramas(policy: str, fit: str) -> None:
    images = [torch.rand(3, 1, 1), torch.rand(3, 2, 3000), torch.rand(3, 3000, 2)]
    out = forward(TOK, images, scales=(32, 64), policy=policy, fit=fit)  # type: ignore[arg-type]
    _check_output(out)
    for i, img in enumerate(images):  # and the same alone
        alone = forward(TOK, [img], scales=(32, 64), policy=policy, fit=fit)  # type: ignore[arg-type]
        torch.testing.assert_close(alone.unpad()[0], out.unpad()[i])


def test_one_pixel_and_panorama_plans() -> None:
    for h, w in [(1, 1), (2, 3000), (3000, 2), (1, 20000)]:
        for fit in ("stretch", "pad"):
            plan = plan_tiles(h, w, (448, 896, 1344), fit=fit)  # type: ignore[arg-type]
            for sp in plan.scales:
                assert 1 <= sp.content_size[0] <= sp.canvas_size[0]
                assert 1 <= sp.content_size[1] <= sp.canvas_size[1]
            assert TilePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


@pytest.mark.skipif(nvila is None, reason="dynamic_s2.nvila is not available")
def test_nvila_one_pixel_and_panorama() -> None:
    for h, w in [(1, 1), (2, 3000)]:
        tiles, block = nvila.preprocess(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
        assert torch.isfinite(tiles).all()
        assert tiles.shape[0] == 1 + 4 + block[0] * block[1]


def test_non_contiguous_and_channels_last() -> None:
    base = torch.rand(2, 3, 40, 60)
    expected = forward(TOK, base, SCALES)
    transposed = base.transpose(-1, -2).contiguous().transpose(-1, -2)
    sliced = torch.rand(2, 6, 80, 60)[:, ::2, ::2]
    sliced.copy_(base)
    channels_last = base.to(memory_format=torch.channels_last)
    assert not transposed.is_contiguous() and not sliced.is_contiguous()
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    for variant in (transposed, sliced, channels_last, list(channels_last.unbind(0))):
        out = forward(TOK, variant, SCALES)
        _check_output(out)
        torch.testing.assert_close(out.features, expected.features, atol=1e-5, rtol=1e-5)


def test_non_contiguous_tile_features() -> None:
    feats = torch.randn(8, T_TOTAL, 4).transpose(0, 1)  # [T, C, N] memory, [T, N, C] view
    out = merge(feats, PLANS, num_prefix_tokens=4)  # 8 tokens: 4 prefix tokens and a 2×2 grid
    expected = merge(feats.contiguous(), PLANS, num_prefix_tokens=4)
    torch.testing.assert_close(out.tokens, expected.tokens)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-10), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)]
)
def test_float64_and_half_precision(dtype: torch.dtype, tol: float) -> None:
    images = [img.to(dtype) for img in IMAGES]
    out = forward(TOK, images, SCALES)
    _check_output(out)
    assert out.tokens.dtype == dtype
    reference = forward(TOK, [img.double() for img in images], SCALES)
    torch.testing.assert_close(out.tokens.double(), reference.tokens, atol=tol, rtol=tol)


def test_uint8_images_are_normalised() -> None:
    out = forward(TOK, UINT8, SCALES, mean=0.5, std=0.5)
    _check_output(out)
    assert out.tokens.dtype == torch.float32
    manual = forward(TOK, [(UINT8[0].float() / 255 - 0.5) / 0.5], SCALES)
    torch.testing.assert_close(out.tokens, manual.tokens, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scales", [(32,), 32, [64]])
def test_single_scale(scales: Any) -> None:
    size = scales if isinstance(scales, int) else scales[0]
    plan = plan_tiles(40, 60, scales)
    assert plan.num_scales == 1 and plan.tile_size == size
    out = forward(TOK, IMAGES, scales)
    _check_output(out)
    assert out.channels == 4
    layer_out = DynamicS2(TOK, scales=scales)(IMAGES)
    torch.testing.assert_close(layer_out.tokens, out.tokens)


def test_backbone_with_register_tokens_callable() -> None:
    model = Tiny(prefix=5)  # CLS + 4 registers, each offset by 1000·(k+1)
    out = forward(Backbone(model, num_prefix_tokens=5), IMAGES, SCALES)
    _check_output(out)
    assert out.prefix is not None and out.prefix.shape == (2, 5, 8)
    assert out.tokens.abs().max() < 100  # no prefix token leaked into the spatial features
    plain = forward(TOK, IMAGES, SCALES)
    torch.testing.assert_close(out.tokens, plain.tokens)
    # The prefix of each image is the mean over its tiles: the offsets survive exactly.
    offsets = 1000.0 * torch.arange(1, 6)
    mean_of_grid = out.prefix - offsets[None, :, None]
    assert mean_of_grid.abs().max() < 100


def test_backbone_with_register_tokens_hf() -> None:
    transformers = need("transformers")
    config = transformers.Dinov2WithRegistersConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_register_tokens=4,
    )
    torch.manual_seed(0)
    model = transformers.Dinov2WithRegistersModel(config).eval()
    assert as_backbone(model).num_prefix_tokens == 5
    with torch.no_grad():
        out = forward(model, IMAGES)  # default scales (32, 64, 96) from the config
        layer_out = DynamicS2(model)(IMAGES)
    _check_output(out, tokens_per_side=4)
    assert out.prefix is not None and out.prefix.shape == (2, 5, 3 * 16)
    assert out.channels == 3 * 16
    torch.testing.assert_close(layer_out.tokens, out.tokens)


def test_batch_of_one() -> None:
    image = IMAGES[0]
    from_list = forward(TOK, [image], SCALES)
    from_tensor = forward(TOK, image[None], SCALES)
    from_plan = forward(TOK, [image], plans=PLANS[0])
    from_layer = DynamicS2(TOK, scales=SCALES)(image[None])
    _check_output(from_list)
    assert from_list.features.shape[0] == 1
    for other in (from_tensor, from_plan, from_layer):
        torch.testing.assert_close(other.tokens, from_list.tokens)
    batch = tile_images(image[None], PLANS[0])
    assert isinstance(batch, TileBatch) and batch.tiles.shape[0] == PLANS[0].num_tiles
    assert collate([batch]).tiles.shape == batch.tiles.shape


def test_maps_backbone_and_chunking() -> None:
    out = forward(MAPS, IMAGES, SCALES, max_batch_tiles=1, pad_to_multiple=1)
    _check_output(out)
    torch.testing.assert_close(out.tokens, forward(TOK, IMAGES, SCALES).tokens)
