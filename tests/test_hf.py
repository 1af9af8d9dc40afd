"""dynamic_s2.hf: the transformers image processor.

Its output is checked against the library's own chain (``forward`` and ``prepare`` on the same
images), its counts against what a model actually produces (a stand-in backbone run over the
processor's output, then NVILA packing), and its NVILA preset against ``nvila.preprocess_batch``.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _deps import need
from hypothesis import given, settings
from hypothesis import strategies as st

import dynamic_s2
from dynamic_s2 import Backbone, DynamicS2, S2Options, TileBatch, forward, nvila, plan_tiles, run
from dynamic_s2.options import stage_fields

transformers = need("transformers")
PIL_Image = need("PIL.Image")

from dynamic_s2.hf import (  # noqa: E402
    OPTION_NAMES,
    DynamicS2ImageProcessor,
    register_auto_class,
)

SCALES = (32, 64, 96)


def _uint8(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def _images() -> list[torch.Tensor]:
    return [_uint8(60, 100, 1), _uint8(90, 30, 2), _uint8(32, 32, 3)]


def _siglip(hidden: int = 16) -> torch.nn.Module:
    config = transformers.SiglipVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=2,
    )
    torch.manual_seed(0)
    return transformers.SiglipVisionModel(config).eval()


def _assert_same(a: dynamic_s2.MultiScaleFeatures, b: dynamic_s2.MultiScaleFeatures) -> None:
    assert a.sizes == b.sizes
    assert a.plans == b.plans
    assert torch.equal(a.tokens, b.tokens)
    assert (a.prefix is None) == (b.prefix is None)
    if a.prefix is not None:
        assert torch.equal(a.prefix, b.prefix)


# ------------------------------------------------------------------------------ the output


def test_options_are_the_plan_and_tile_fields_of_s2options() -> None:
    wanted = [*stage_fields("plan", "tile"), "pack", "output_scale"]  # + what decides the tokens
    assert sorted(OPTION_NAMES.values()) == sorted(wanted)
    assert OPTION_NAMES["image_mean"] == "mean" and OPTION_NAMES["image_std"] == "std"
    defaults = {f.name: f.default for f in fields(S2Options)}
    for name, field in OPTION_NAMES.items():  # every option has a class default
        if name not in ("scales", "image_mean", "image_std"):
            assert getattr(DynamicS2ImageProcessor, name) == defaults[field]


def test_output_is_prepare_of_the_same_images() -> None:
    processor = DynamicS2ImageProcessor(scales=SCALES, fit="pad", max_tiles=5)
    out = processor(_images(), return_tensors="pt")
    assert isinstance(out, transformers.BatchFeature)
    batch = dynamic_s2.prepare(_images(), options=processor.options())
    assert torch.equal(out["pixel_values"], batch.tiles)
    assert out["pixel_values"].shape[1:] == (3, 32, 32)
    assert out["num_patches"].dtype == torch.int64
    assert out["num_patches"].tolist() == list(batch.tile_counts)
    assert out["image_sizes"].tolist() == [[60, 100], [90, 30], [32, 32]]
    assert [dynamic_s2.TilePlan.from_dict(p) for p in out["plans"]] == list(batch.plans)
    json.dumps(out["plans"])  # JSON-safe


def test_every_input_type_gives_the_same_tiles() -> None:
    processor = DynamicS2ImageProcessor(scales=SCALES)
    image = _uint8(45, 70, 4)
    hwc = image.permute(1, 2, 0).numpy()
    pil = PIL_Image.fromarray(hwc)
    reference = processor(image)["pixel_values"]
    for other in (hwc, pil, [image], [pil], image[None]):
        assert torch.equal(processor(other)["pixel_values"], reference)
    # float images in [0, 1]: normalised like uint8 ones (before the resize, which is linear)
    floats = processor(image.float() / 255)["pixel_values"]
    torch.testing.assert_close(floats, reference, atol=1e-4, rtol=0)
    # grey and RGBA: replicated / alpha dropped, as PIL's convert("RGB")
    grey = PIL_Image.fromarray(hwc[:, :, 0])
    assert torch.equal(processor(grey)["pixel_values"], processor(image[:1])["pixel_values"])
    rgba = np.concatenate([hwc, np.full_like(hwc[:, :, :1], 7)], axis=2)
    assert torch.equal(processor(rgba)["pixel_values"], reference)


def test_float_images_pad_with_normalised_zero_like_uint8() -> None:
    processor = DynamicS2ImageProcessor(scales=SCALES, fit="pad")
    image = _uint8(20, 90, 5)
    a = processor(image)["pixel_values"]
    b = processor(image.double() / 255)["pixel_values"]
    assert b.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_call_time_options_override() -> None:
    processor = DynamicS2ImageProcessor(scales=SCALES)
    out = processor(_images(), max_tiles=10, policy="nvila")
    batch = dynamic_s2.prepare(_images(), options=processor.options(max_tiles=10, policy="nvila"))
    assert torch.equal(out["pixel_values"], batch.tiles)
    assert processor.max_tiles is None  # the processor itself is unchanged


# --------------------------------------------------------------- feeding the model, no glue


@pytest.mark.parametrize("fit", ["stretch", "pad"])
def test_run_and_layer_take_the_batch_feature_and_equal_forward(fit: str) -> None:
    model = _siglip()
    processor = DynamicS2ImageProcessor(scales=SCALES, fit=fit, max_tiles=6)
    images = _images()
    out = processor(images)
    with torch.no_grad():
        expected = forward(model, images, options=processor.options(), feature_layer=-2)
        _assert_same(run(model, out, feature_layer=-2), expected)
        layer = DynamicS2(model, options=processor.options(), feature_layer=-2)
        _assert_same(layer(out), expected)
        _assert_same(layer(out.to("cpu")), layer(images))
        _assert_same(layer(TileBatch.from_features(out)), expected)


def test_batch_feature_checks() -> None:
    out = DynamicS2ImageProcessor(scales=SCALES)(_images())
    with pytest.raises(ValueError, match="plans"):
        TileBatch.from_features({"pixel_values": out["pixel_values"]})
    bad = dict(out)
    bad["num_patches"] = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="num_patches"):
        run(torch.nn.Conv2d(3, 4, 8, stride=8), bad)


# ------------------------------------------------------------------ saving, loading, pickling


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    processor = DynamicS2ImageProcessor(
        scales=SCALES, tile_size=32, max_tiles=(1, 4, 6), fit="pad", image_mean=0.25,
        image_std=[0.5, 0.6, 0.7], uint8_resize=True,
    )  # fmt: skip
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "DynamicS2ImageProcessor"
    assert set(OPTION_NAMES) <= set(saved)
    loaded = DynamicS2ImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert json.loads(loaded.to_json_string()) == json.loads(processor.to_json_string())
    assert torch.equal(loaded(_images())["pixel_values"], processor(_images())["pixel_values"])
    # from_pretrained(..., **overrides), as transformers does it
    assert DynamicS2ImageProcessor.from_pretrained(tmp_path, max_tiles=3).max_tiles == 3


def test_none_options_survive_the_round_trip(tmp_path: Path) -> None:
    processor = DynamicS2ImageProcessor(scales=SCALES, image_mean=None, image_std=None)
    processor.save_pretrained(tmp_path)
    loaded = DynamicS2ImageProcessor.from_pretrained(tmp_path)
    assert loaded.image_mean is None and loaded.image_std is None
    assert torch.equal(loaded(_images())["pixel_values"], processor(_images())["pixel_values"])


def test_auto_image_processor_after_registration(tmp_path: Path) -> None:
    register_auto_class()
    register_auto_class()  # idempotent
    processor = DynamicS2ImageProcessor.nvila(scales=SCALES)
    processor.save_pretrained(tmp_path)
    loaded = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is DynamicS2ImageProcessor
    assert loaded.to_dict() == processor.to_dict()


def test_pickles_with_its_output() -> None:
    processor = DynamicS2ImageProcessor.nvila(scales=SCALES, fit="pad")
    again = pickle.loads(pickle.dumps(processor))
    assert again.to_dict() == processor.to_dict()
    out = processor(_images())
    back = pickle.loads(pickle.dumps(out))
    assert torch.equal(back["pixel_values"], out["pixel_values"])
    assert back["plans"] == out["plans"]


class _Photos(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, images: list[Any]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Any:
        return self.images[i]


def test_dataloader_with_two_workers(photos: dict[str, Path]) -> None:
    images = [np.asarray(PIL_Image.open(p).convert("RGB")) for p in photos.values()]
    tensors = [torch.from_numpy(a.copy()).permute(2, 0, 1) for a in images]
    processor = DynamicS2ImageProcessor.nvila(scales=SCALES, tokens_per_tile=16)
    loader = torch.utils.data.DataLoader(
        _Photos(images),
        batch_size=3,
        num_workers=2,
        collate_fn=processor,
    )
    model = torch.nn.Conv2d(3, 4, 8, stride=8)  # 32-px tiles -> 4 x 4 maps: 16 per tile
    seen = 0
    for batch in loader:
        part = images[seen : seen + len(batch["num_patches"])]
        assert torch.equal(batch["pixel_values"], processor(part)["pixel_values"])
        expected = forward(model, tensors[seen : seen + len(part)], options=processor.options())
        made = run(model, batch, options=processor.options())  # pack=2, as the counts say
        _assert_same(made, expected)
        assert [h * w for h, w in made.sizes] == batch["num_image_tokens"].tolist()
        with pytest.raises(ValueError, match="declares num_image_tokens"):
            run(model, batch)  # unpacked rows disagree with the declared counts
        seen += len(part)
    assert seen == len(images)


# ------------------------------------------------------------------------------- counting

_SETTINGS = st.fixed_dictionaries(
    {
        "tile": st.sampled_from([16, 24, 32]),
        "factors": st.lists(st.integers(1, 4), min_size=1, max_size=3, unique=True).map(sorted),
        "policy": st.sampled_from(["aspect", "nvila"]),
        "fit": st.sampled_from(["stretch", "pad"]),
        "max_tiles": st.none() | st.integers(1, 12),
        "side": st.sampled_from([2, 3, 4]),  # tokens per tile side
        "prefix": st.integers(0, 2),
        "pack": st.integers(1, 3),
        "output_scale": st.integers(-1, 0),
    }
)
_SIZES = st.lists(st.tuples(st.integers(1, 120), st.integers(1, 120)), min_size=10, max_size=30)


def _stand_in(side: int, prefix: int) -> Backbone:
    """A backbone that gives ``prefix + side²`` one-channel tokens per tile, cheaply."""
    return Backbone(lambda x: x[:, :1, :1, :1].flatten(1)[:, None].expand(-1, prefix + side**2, 1))


@settings(max_examples=200)  # about 3000 sizes under the CI profile
@given(cfg=_SETTINGS, sizes=_SIZES)
def test_patch_and_token_counts_equal_the_model_side(
    cfg: dict[str, Any], sizes: list[tuple[int, int]]
) -> None:
    """Thousands of sizes in all: the counts equal the model's actual output."""
    factors = cfg["factors"]
    if cfg["policy"] == "nvila":  # scales multiples of the first, enough tiles for the last
        factors = sorted({1, *factors})
        cfg["max_tiles"] = max(cfg["max_tiles"] or 12, factors[-1] ** 2)
    scales = tuple(cfg["tile"] * k for k in factors)
    processor = DynamicS2ImageProcessor(
        scales=scales, policy=cfg["policy"], fit=cfg["fit"], max_tiles=cfg["max_tiles"]
    )
    images = [torch.zeros(3, h, w, dtype=torch.uint8) for h, w in sizes]
    out = processor(images)
    side, prefix, f = cfg["side"], cfg["prefix"], cfg["pack"]
    merged = run(
        _stand_in(side, prefix), out, num_prefix_tokens=prefix, output_scale=cfg["output_scale"]
    )
    _, cu = nvila.pack_tokens_batch([m.permute(2, 0, 1) for m in merged.unpad()], factor=f)
    model_tokens = torch.diff(cu).tolist()
    for i, (h, w) in enumerate(sizes):
        assert processor.get_number_of_image_patches(h, w) == out["num_patches"][i]
        count = processor.get_number_of_image_tokens(
            h, w, side * side, f, output_scale=cfg["output_scale"]
        )
        assert count == model_tokens[i]


@settings(max_examples=300)
@given(
    h=st.integers(1, 4000),
    w=st.integers(1, 4000),
    max_tiles=st.integers(9, 24),
    images_kwargs=st.sampled_from([None, {}, {"return_tensors": "pt", "do_resize": True}]),
)
def test_nvila_counts_equal_nvila_num_tokens(
    h: int, w: int, max_tiles: int, images_kwargs: dict[str, Any] | None
) -> None:
    processor = DynamicS2ImageProcessor.nvila()
    plan = plan_tiles(h, w, nvila.DEFAULT_SCALES, max_tiles=max_tiles, policy="nvila")
    kwargs = {**(images_kwargs or {}), "max_tiles": max_tiles}
    assert processor.get_number_of_image_patches(h, w, kwargs) == plan.num_tiles
    tokens = processor.get_number_of_image_tokens(h, w, 1024, 2, images_kwargs=kwargs)
    assert tokens == nvila.num_tokens(plan, tokens_per_tile_side=32, factor=2)


# ------------------------------------------------------------------------------ NVILA preset


def test_nvila_preset_equals_nvila_preprocess(photos: dict[str, Path]) -> None:
    scales = (64, 128, 192)
    processor = DynamicS2ImageProcessor.nvila(scales=scales)
    pil = [PIL_Image.open(p) for p in photos.values()]
    arrays = [np.asarray(img.convert("RGB")) for img in pil]
    tensors = [torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrays]
    for images in (arrays, tensors):  # the same (torch, uint8) resize path: bit-equal
        expected, blocks = nvila.preprocess_batch(images, scales=scales)
        out = processor(images)
        assert torch.equal(out["pixel_values"], expected)
        assert [tuple(p["scales"][-1]["grid"]) for p in out["plans"]] == blocks
    # one image, as nvila.preprocess
    one, _ = nvila.preprocess(tensors[0], scales=scales)
    assert torch.equal(processor(tensors[0])["pixel_values"], one)
    # PIL: nvila resizes with PIL, the processor with torch; the same grids, rounding differs
    expected, _ = nvila.preprocess_batch(pil, scales=scales)
    got = processor(pil)["pixel_values"]
    assert got.shape == expected.shape
    assert (got - expected).abs().mean() < 0.02
    # float images in [0, 1]: nvila normalises after the resize, the processor before
    floats = [t.float() / 255 for t in tensors[:2]]
    torch.testing.assert_close(
        processor(floats)["pixel_values"], nvila.preprocess_batch(floats, scales=scales)[0],
        atol=1e-4, rtol=0,
    )  # fmt: skip


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("make", "error", "names"),
    [
        (lambda: DynamicS2ImageProcessor(tile_sise=3), TypeError, "tile_sise"),
        (lambda: DynamicS2ImageProcessor(scales=None), ValueError, "scales"),
        (lambda: DynamicS2ImageProcessor(scales=(32, 16)), ValueError, "scales"),
        (lambda: DynamicS2ImageProcessor(policy="square"), ValueError, "policy"),
        (lambda: DynamicS2ImageProcessor(image_std=0.0), ValueError, "image_std"),
        (lambda: DynamicS2ImageProcessor(image_mean="a"), TypeError, "image_mean"),
        (lambda: DynamicS2ImageProcessor(image_mean=(0.5, 0.5)), ValueError, "image_mean"),
        (lambda: DynamicS2ImageProcessor(uint8_resize=1), TypeError, "uint8_resize"),
        (lambda: DynamicS2ImageProcessor(max_tiles=0), ValueError, "max_tiles"),
        (lambda: DynamicS2ImageProcessor(policy="nvila", max_tiles=4), ValueError, "max_tiles"),
    ],
)
def test_constructor_validates(make: Any, error: type[Exception], names: str) -> None:
    with pytest.raises(error, match=names):
        make()


def test_calls_validate() -> None:
    p = DynamicS2ImageProcessor(scales=SCALES)
    img = _uint8(40, 40)
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: p(img, return_tensors="np"), ValueError, "return_tensors"),
        (lambda: p([]), ValueError, "images"),
        (lambda: p("photo.jpg"), TypeError, "images"),
        (lambda: p([img, "x"]), TypeError, r"images\[1\]"),
        (lambda: p(torch.zeros(3, 0, 4)), ValueError, r"images\[0\]"),
        (lambda: p(img, tile_sise=4), TypeError, "tile_sise"),
        (lambda: p(img, fit="crop"), ValueError, "fit"),
        (lambda: p.get_number_of_image_patches(0, 4), ValueError, "height"),
        (lambda: p.get_number_of_image_patches(4, 2.5), TypeError, "width"),
        (lambda: p.get_number_of_image_patches(4, 4, [1]), TypeError, "images_kwargs"),
        (lambda: p.get_number_of_image_tokens(4, 4, 15), ValueError, "tokens_per_tile"),
        (lambda: p.get_number_of_image_tokens(4, 4, 16, 0), ValueError, "factor"),
        (lambda: p.get_number_of_image_tokens(4, 4, 16, output_scale=3), ValueError, "output"),
    ]
    for make, error, names in cases:
        with pytest.raises(error, match=names):
            make()
