"""The VLM seam: text + image processor, token counts from the batch's own plans, NVILA's
multi-image mode, and one normalisation rule.

The central property: for random batches (sizes, budgets, policies, fits, packing factors,
``max_upscale``, output scales, prompts of 0 to 4 images, both multi-image modes) every image's
placeholder run in ``input_ids`` is exactly as long as the rows the model side makes for it. The
model side is a real run of :func:`dynamic_s2.run`, so the counts are compared with what a model
produces, not with a second count.
"""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dynamic_s2
from dynamic_s2 import DynamicS2, forward, nvila, plan_tiles, run

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
PIL_Image = pytest.importorskip("PIL.Image")

from dynamic_s2._images import read_image, to_chw_tensor  # noqa: E402
from dynamic_s2.hf import (  # noqa: E402
    DynamicS2ImageProcessor,
    DynamicS2Processor,
    register_auto_class,
    splice_image_embeddings,
)
from dynamic_s2.plan import TilePlan  # noqa: E402

START, END = "<img>", "</img>"


def tokenizer() -> Any:
    """A word-level tokenizer built offline (nothing downloaded)."""
    words = ["[PAD]", "[UNK]", "describe", "compare", "these", "the", "video", "a", "b", "c"]
    raw = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    )
    raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]"
    )


def pooled_backbone(tile: int, side: int) -> Any:
    """A stand-in backbone: ``side × side`` tokens per tile (average pooling), 3 channels."""

    def model(x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, side).flatten(2).transpose(1, 2)

    return dynamic_s2.Backbone(model, input_size=tile, num_prefix_tokens=0)


def runs(ids: list[int], start: int, end: int, image: int) -> list[int]:
    """Lengths of the image-token runs between ``start`` and ``end`` tokens, in order."""
    out, count, inside = [], 0, False
    for t in ids:
        if t == start:
            inside, count = True, 0
        elif t == end:
            out.append(count)
            inside = False
        elif inside:
            assert t == image
            count += 1
    return out


_BATCH = st.fixed_dictionaries(
    {
        "tile": st.sampled_from([16, 24, 32]),
        "factors": st.sampled_from([(1, 2), (1, 2, 3), (1, 3), (2, 4), (1,)]),
        "policy": st.sampled_from(["aspect", "nvila"]),
        "fit": st.sampled_from(["stretch", "pad"]),
        "side": st.sampled_from([2, 3, 4]),
        "pack": st.sampled_from([None, 1, 2, 3]),
        "max_upscale": st.sampled_from([None, 0.5, 1.0, 2.5]),
        "budget": st.booleans(),
        "multi_image": st.sampled_from(["dynamic", "single"]),
        "output_scale": st.integers(-3, 2),
        "seed": st.integers(0, 2**31 - 1),
    }
)


@settings(max_examples=60)
@given(cfg=_BATCH)
def test_placeholders_equal_the_rows_the_model_side_makes(cfg: dict[str, Any]) -> None:
    """Thousands of random batches (40 per example): placeholder run == rows, image by image."""
    t = cfg["tile"]
    if cfg["policy"] == "nvila" and cfg["fit"] == "pad":
        cfg["fit"] = "stretch"
    scales = tuple(t * f for f in cfg["factors"])
    if cfg["policy"] == "nvila" and scales[0] != t:
        scales = (t, *scales)
    output_scale = cfg["output_scale"] % len(scales)
    image_processor = DynamicS2ImageProcessor(
        scales=scales,
        tile_size=t,
        policy=cfg["policy"],
        fit=cfg["fit"],
        max_upscale=cfg["max_upscale"],
        max_tiles=(scales[-1] // t) ** 2 + 2 if cfg["policy"] == "nvila" else None,
        image_mean=0.5,
        image_std=0.5,
        pack=cfg["pack"],
        output_scale=output_scale,
        tokens_per_tile=cfg["side"] ** 2,
        multi_image=cfg["multi_image"],
    )
    tok = tokenizer()
    tok.add_tokens([START, END], special_tokens=True)
    processor = DynamicS2Processor(
        image_processor, tok, image_start_token=START, image_end_token=END
    )
    ids = processor.tokenizer.convert_tokens_to_ids([START, END])
    backbone = pooled_backbone(t, cfg["side"])
    rng = np.random.default_rng(cfg["seed"])
    for _ in range(40):
        per_prompt = rng.integers(0, 4, size=rng.integers(1, 4)).tolist()
        if sum(per_prompt) == 0:
            per_prompt[0] = 1
        images = [
            torch.randint(0, 256, (3, *rng.integers(1, 4 * t, size=2).tolist()), dtype=torch.uint8)
            for _ in range(sum(per_prompt))
        ]
        text = [" ".join(["describe"] + ["<image>"] * n) for n in per_prompt]
        kwargs: dict[str, Any] = {}
        if cfg["budget"]:  # binding or not, drawn: from one tile per scale each to plenty
            kwargs["tile_budget"] = int(rng.integers(len(images) * len(scales), 60))
        try:
            batch = processor(text=text, images=images, padding=True, **kwargs)
        except ValueError as err:  # a budget below what one-tile images need: refused, clearly
            assert "tile_budget" in str(err)
            continue
        made = run(backbone, batch, pack=cfg["pack"], output_scale=output_scale)
        rows = [h * w for h, w in made.sizes]
        placeholders = [
            n
            for row in batch["input_ids"].tolist()
            for n in runs(row, *ids, processor.image_token_id)
        ]
        assert placeholders == rows == batch["num_image_tokens"].tolist()
        assert made.tokens.shape[0] == int((batch["input_ids"] == processor.image_token_id).sum())
        if "tile_budget" in kwargs:
            assert int(batch["num_patches"].sum()) <= kwargs["tile_budget"]
        if cfg["multi_image"] == "single":  # NVILA's rule: several images -> one tile each
            flags = [n > 1 for n in per_prompt for _ in range(n)]
            for plan, flag in zip(batch["plans"], flags, strict=True):
                assert (plan["policy"] == "single") == flag


def test_count_questions_come_from_the_batch_plans() -> None:
    """Per-image questions refuse under a budget; batch questions answer what the batch does."""
    processor = DynamicS2ImageProcessor(scales=(64, 128, 192), tile_budget=30, tokens_per_tile=16)
    images = [torch.zeros(3, h, w, dtype=torch.uint8) for h, w in [(300, 500), (700, 200)] * 2]
    batch = processor(images)
    with pytest.raises(ValueError, match="tile_budget=30: an image's plan"):
        processor.get_number_of_image_tokens(300, 500)
    with pytest.raises(ValueError, match="tile_budget=30"):
        processor.get_number_of_image_patches(300, 500)
    sizes = [tuple(s) for s in batch["image_sizes"].tolist()]
    plans = processor.plan_batch(sizes)
    assert [p.to_dict() for p in plans] == batch["plans"]
    assert processor.num_image_tokens(plans) == batch["num_image_tokens"].tolist()
    full = DynamicS2Processor(processor, tokenizer())._get_num_multimodal_tokens(sizes)
    assert full.num_image_tokens == batch["num_image_tokens"].tolist()
    assert full.num_image_patches == batch["num_patches"].tolist()
    unbudgeted = DynamicS2ImageProcessor(scales=(64, 128, 192), tokens_per_tile=16)
    alone = [unbudgeted.get_number_of_image_tokens(h, w) for h, w in sizes]
    assert alone != full.num_image_tokens  # the budget binds here: per-image answers would lie


def test_mismatched_placeholders_and_images_name_both_counts() -> None:
    processor = DynamicS2Processor(
        DynamicS2ImageProcessor(scales=(32,), tokens_per_tile=4), tokenizer()
    )
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="hold 2 <image> placeholders but 1 images"):
        processor(text="compare <image> <image>", images=[image])
    with pytest.raises(
        ValueError,
        match=r"hold \[1, 1\] <image> placeholders but the images per prompt are \[2, 0\]",
    ):
        processor(text=["a <image>", "b <image>"], images=[[image, image], []])
    with pytest.raises(ValueError, match="truncated"):
        processor(text="describe <image>", images=[image], truncation=True, max_length=2)


# ------------------------------------------------------------------- the model side in one call


def test_options_that_disagree_with_a_prepared_batch_raise() -> None:
    model = torch.nn.Conv2d(3, 4, 8, stride=8)
    images = [torch.rand(3, 40, 60)]
    batch = dynamic_s2.prepare(images, scales=(16, 32), fit="pad")
    with pytest.raises(ValueError, match=r"scales=\(16, 64\) disagrees with plans\[0\]"):
        DynamicS2(model, scales=(16, 64))(batch)
    with pytest.raises(ValueError, match="fit='stretch' disagrees"):
        DynamicS2(model, scales=(16, 32), fit="stretch")(batch)
    with pytest.raises(ValueError, match="policy='nvila' disagrees"):
        DynamicS2(model, scales=(16, 32), policy="nvila")(batch)
    with pytest.raises(ValueError, match="tile_budget=3 disagrees with the batch"):
        DynamicS2(model, scales=(16, 32), tile_budget=3)(batch)
    bad = dynamic_s2.TileBatch(F.interpolate(batch.tiles, size=24), batch.plans)
    with pytest.raises(ValueError, match=r"batch tiles are \(24, 24\) pixels but its plans"):
        run(model, bad)
    same = DynamicS2(model, scales=(16, 32), fit="pad")(batch)  # agreeing options run
    torch.testing.assert_close(
        same.tokens, forward(model, images, scales=(16, 32), fit="pad").tokens
    )


def test_processor_output_reaches_every_model_side_entry_point_as_it_is() -> None:
    siglip = transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(
            image_size=16, patch_size=4, hidden_size=8, intermediate_size=16,
            num_hidden_layers=2, num_attention_heads=2,
        )
    ).eval()  # fmt: skip
    image_processor = DynamicS2ImageProcessor.nvila(scales=(16, 32, 48), tokens_per_tile=16)
    processor = DynamicS2Processor(image_processor, tokenizer())
    images = [torch.randint(0, 256, (3, 50, 90), dtype=torch.uint8) for _ in range(3)]
    batch = processor(
        text=["describe <image>", "compare <image> <image>"], images=images, padding=True
    )
    layer = DynamicS2(siglip, options=image_processor.options())
    with torch.no_grad():
        out = layer(batch)
        tokens, cu = out.pack()
        feats = dynamic_s2.encode_tiles(siglip, batch["pixel_values"])
        fused, fused_cu = nvila.merge_and_pack(feats, batch["plans"])  # dicts, as they are
        fused_b, _ = nvila.merge_and_pack(feats, batch)  # or the whole BatchFeature
    assert torch.equal(cu, fused_cu) and torch.equal(fused, fused_b)
    torch.testing.assert_close(tokens, fused, atol=1e-5, rtol=1e-5)
    assert torch.diff(cu).tolist() == batch["num_image_tokens"].tolist()
    embeds = torch.zeros(*batch["input_ids"].shape, tokens.shape[1])
    spliced = splice_image_embeddings(embeds, batch["input_ids"], tokens, processor.image_token_id)
    where = batch["input_ids"] == processor.image_token_id
    assert torch.equal(spliced[where], tokens) and not spliced[~where].any()
    with pytest.raises(ValueError, match="image_embeds has 3 rows"):
        splice_image_embeddings(embeds, batch["input_ids"], tokens[:3], processor.image_token_id)


# ---------------------------------------------------------------- NVILA's multi-image mode


def vila_multi_image_reference(tile_features: torch.Tensor, num_scales: int) -> list[torch.Tensor]:
    """An independent re-implementation of the ``block_size is None`` branch of NVILA's
    ``merge_features_for_dynamic_s2``: each image's one tile, its ``[n², C]`` features laid out
    as an ``n × n`` map, repeated once per scale along channels; then NVILA's 2 × 2 packing."""
    out = []
    for feats in tile_features:  # one tile per image
        n = int(feats.shape[0] ** 0.5)
        fmap = feats.t().reshape(-1, n, n)
        merged = torch.cat([fmap] * num_scales, dim=0)
        c, h, w = merged.shape
        x = torch.zeros(c, h + h % 2, w + w % 2, dtype=merged.dtype)
        x[:, :h, :w] = merged
        blocks = [x[:, i::2, j::2] for i in (0, 1) for j in (0, 1)]
        out.append(torch.cat(blocks, dim=0).flatten(1).t())
    return out


def test_nvila_multi_image_mode_equals_vila_and_encodes_each_image_once() -> None:
    calls: list[int] = []
    torch.manual_seed(0)
    weight = torch.randn(6, 3, 4, 4)

    def patchify(x: torch.Tensor) -> torch.Tensor:  # 16-px tiles -> 4 x 4 tokens of 6 channels
        calls.append(x.shape[0])
        return F.conv2d(x, weight, stride=4).flatten(2).transpose(1, 2)

    scales = (16, 32, 48)
    backbone = dynamic_s2.Backbone(patchify, input_size=16, num_prefix_tokens=0)
    image_processor = DynamicS2ImageProcessor.nvila(scales=scales, tokens_per_tile=16)
    processor = DynamicS2Processor(image_processor, tokenizer())
    images = [
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
        for h, w in [(40, 70), (90, 30), (33, 33)]
    ]
    batch = processor(text=["compare <image> <image> <image>"], images=images)
    assert [p["policy"] for p in batch["plans"]] == ["single"] * 3
    assert batch["num_image_tokens"].tolist() == [4, 4, 4]  # NVILA: 256 at 448 px; here 16 / 4
    calls.clear()
    with torch.no_grad():
        tokens, cu = run(backbone, batch, pack=2).pack()
    assert sum(calls) == 3  # each image's tile encoded once, not once per scale
    # VILA's own input for these images: each resized to one tile, as SigLIP's processor does
    tiles = nvila.preprocess_batch(images, scales, single=[True] * 3).tiles[::3]
    with torch.no_grad():
        want = vila_multi_image_reference(patchify(tiles), len(scales))
    assert torch.equal(batch["pixel_values"][::3], tiles)
    for got, ref in zip(torch.split(tokens, torch.diff(cu).tolist()), want, strict=True):
        torch.testing.assert_close(got, ref, atol=0, rtol=0)
    one = processor(text=["describe <image>"], images=images[:1])  # one image: Dynamic-S2
    assert one["plans"][0]["policy"] == "nvila"
    dynamic = processor(text=["compare <image> <image>"], images=images[:2], multi_image="dynamic")
    assert [p["policy"] for p in dynamic["plans"]] == ["nvila", "nvila"]


def test_video_frames_get_one_tile_each_and_expand_in_place() -> None:
    image_processor = DynamicS2ImageProcessor.nvila(scales=(16, 32, 48), tokens_per_tile=16)
    processor = DynamicS2Processor(image_processor, tokenizer())
    video = torch.randint(0, 256, (5, 3, 30, 40), dtype=torch.uint8)
    image = torch.randint(0, 256, (3, 60, 20), dtype=torch.uint8)
    batch = processor(text=["the video <video> describe <image>"], videos=[video], images=[image])
    assert [p["policy"] for p in batch["plans"]] == ["single"] * 5 + ["nvila"]
    counts = batch["num_image_tokens"].tolist()
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == sum(counts)
    with pytest.raises(ValueError, match="1 <video> placeholders but 0 videos"):
        processor(text=["the video <video>"])


# ------------------------------------------------------------------- one normalisation rule


@given(
    uint8=st.booleans(),
    sizes=st.lists(st.tuples(st.integers(4, 70), st.integers(4, 70)), min_size=1, max_size=3),
)
@settings(max_examples=20)
def test_processor_and_forward_agree_bit_for_bit(uint8: bool, sizes: list[tuple[int, int]]) -> None:
    g = torch.Generator().manual_seed(len(sizes))
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    if not uint8:
        images = [x.float() / 255.0 for x in images]
    processor = DynamicS2ImageProcessor(scales=(16, 32), image_mean=(0.4, 0.5, 0.6), image_std=0.3)
    model = torch.nn.Conv2d(3, 2, 4, stride=4)
    with torch.no_grad():
        made = run(model, processor(images))
        direct = forward(model, images, options=processor.options())
    assert torch.equal(made.tokens, direct.tokens)
    tiles = dynamic_s2.prepare(images, options=processor.options()).tiles
    assert torch.equal(processor(images)["pixel_values"], tiles)


def test_sixteen_bit_images_read_the_same_everywhere(tmp_path: Any) -> None:
    ramp = (np.arange(40 * 30, dtype=np.uint32).reshape(40, 30) * 54).astype(np.uint16)
    path = tmp_path / "ramp16.png"
    PIL_Image.fromarray(ramp).save(path)
    opened = PIL_Image.open(path)
    assert opened.mode.startswith("I")
    read = read_image(path)
    from_pil = to_chw_tensor(opened)
    from_array = to_chw_tensor(ramp)
    want = torch.from_numpy(np.rint(ramp / 257.0).astype(np.uint8))
    for got in (read, from_pil, from_array):
        assert torch.equal(got[0], want) and torch.equal(got[1], want)
    assert int((want == 255).sum()) < want.numel() // 100  # scaled, not clipped
    processor = DynamicS2ImageProcessor(scales=(16,))
    assert torch.equal(processor(opened)["pixel_values"], processor(read)["pixel_values"])
    tiles, _ = nvila.preprocess(opened, scales=(16, 32))
    same, _ = nvila.preprocess(read, scales=(16, 32))
    torch.testing.assert_close(tiles, same, atol=0.02, rtol=0)  # PIL vs torch resize only


def test_ambiguous_and_out_of_range_images_are_refused() -> None:
    with pytest.raises(ValueError, match="may be channels-last"):
        nvila.preprocess(torch.zeros(4, 60, 3, dtype=torch.uint8), scales=(16, 32))
    with pytest.raises(ValueError, match="float image with values in"):
        nvila.preprocess(torch.full((3, 20, 20), 200.0), scales=(16, 32))
    with pytest.raises(ValueError, match="looks channels-last"):
        DynamicS2ImageProcessor(scales=(16,))(torch.zeros(30, 40, 3))


# ------------------------------------------------------------------ saving, loading, templates


def test_save_load_auto_processor_and_chat_template() -> None:
    register_auto_class()
    tok = tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}"
        "{% endfor %}\n{% endfor %}"
    )
    image_processor = DynamicS2ImageProcessor.nvila(scales=(16, 32, 48), tokens_per_tile=16)
    processor = DynamicS2Processor(image_processor, tok, image_end_token="c")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}
    ]
    prompt = processor.apply_chat_template(messages, tokenize=False)
    assert prompt.count("<image>") == 1
    image = torch.randint(0, 256, (3, 50, 80), dtype=torch.uint8)
    before = processor(text=prompt, images=[image])
    with tempfile.TemporaryDirectory() as folder:
        processor.save_pretrained(folder)
        loaded = transformers.AutoProcessor.from_pretrained(folder)
    assert isinstance(loaded, DynamicS2Processor)
    assert loaded.image_processor.to_dict() == image_processor.to_dict()
    assert loaded.image_end_token == "c" and loaded.image_token_id == processor.image_token_id
    after = loaded(text=prompt, images=[image])
    assert torch.equal(after["input_ids"], before["input_ids"])
    assert torch.equal(after["pixel_values"], before["pixel_values"])


def test_plans_as_dicts_are_accepted_where_plans_are() -> None:
    plans = [
        plan_tiles(60, 100, (32, 64, 96), policy="nvila"),
        plan_tiles(50, 50, (32, 64, 96), policy="single"),
    ]
    feats = torch.randn(sum(p.num_tiles for p in plans), 16, 4)
    a, cu_a = nvila.merge_and_pack(feats, plans)
    b, cu_b = nvila.merge_and_pack(feats, [p.to_dict() for p in plans])
    assert torch.equal(a, b) and torch.equal(cu_a, cu_b)
    assert dynamic_s2.plan.as_plans([p.to_dict() for p in plans]) == tuple(plans)
    with pytest.raises(TypeError, match=r"plans\[0\] must be a TilePlan or its dict"):
        dynamic_s2.plan.as_plans([3])
    assert isinstance(plans[1], TilePlan) and plans[1].grids == ((1, 1),) * 3
