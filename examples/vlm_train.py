"""Train a tiny NVILA-style vision-language model for a few steps, offline, on a CPU.

The seam between the vision side and the prompt is one object, ``DynamicS2Processor``:

1. it is the ``collate_fn`` of a 2-worker ``DataLoader`` over image + text records with 0, 1 and
   3 images each. It tiles every image (one ``prepare`` call per batch, a ``tile_budget`` over
   the whole batch) and expands each ``<image>`` of the chat-templated prompt into exactly as
   many image tokens as the vision side will make for that image *in this batch*; NVILA's rule
   applies (a record with several images gets one tile per image at every scale);
2. ``DynamicS2`` around a SigLIP vision tower (penultimate layer, ``feature_layer=-2``) with the
   processor's own options takes the batch as it is, merges every image's scales and packs 2×2
   blocks (``pack=2``), checking its rows against the counts the batch declares;
3. an MLP projector maps the packed tokens to the LM's width and ``splice_image_embeddings``
   puts them at the placeholders (checking the count again); a Qwen2 LM trains on the answers
   under bf16 autocast, then ``generate`` writes from a prompt alone.

The tokenizer is built offline with the ``tokenizers`` library, the SigLIP and the LM are tiny
and randomly initialised, and NVILA's scales (448, 896, 1344) are scaled down to (64, 128, 192),
so the text is noise; the shapes, counts and data flow are the real ones. With released weights,
use ``DynamicS2ImageProcessor.nvila()``, ``SiglipVisionModel.from_pretrained(...)`` and the
LLM's own tokenizer.

Run: ``python examples/vlm_train.py`` (needs transformers, tokenizers and Pillow).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from dynamic_s2 import DynamicS2
from dynamic_s2.hf import DynamicS2ImageProcessor, DynamicS2Processor, splice_image_embeddings

IMAGES = Path(__file__).resolve().parent / "images"
SCALES = (64, 128, 192)  # NVILA's 448/896/1344, divided by 7
PATCH = 16  # 64-px tiles -> 4 × 4 tokens per tile
TILE_BUDGET = 30  # tiles per batch: binds on the batch of two large photos
WORDS = [
    "user",
    "assistant",
    ":",
    "a",
    "photo",
    "of",
    "the",
    "same",
    "two",
    "three",
    "images",
    "describe",
    "compare",
]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small vocabulary, built offline."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    tok.chat_template = TEMPLATE
    return tok


class Records(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Image + text records with 0, 1 and 3 images, as a VLM dataset holds them."""

    def __init__(self, folder: Path) -> None:
        paths = sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png"))
        self.records = [
            ([], "describe the photo", "a photo"),
            ([paths[0]], "describe the photo", "a photo of a photo"),
            (paths[1:4], "compare the three images", "the same three images"),
            ([paths[4]], "describe the photo", "a photo"),
            ([paths[5]], "describe the photo", "the photo"),
            ([paths[6]], "describe the photo", "a photo"),
        ]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        paths, question, answer = self.records[i]
        images = [Image.open(p).convert("RGB") for p in paths]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        return {
            "images": images,
            "messages": [
                {"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
        }


def collate(records: list[dict[str, Any]], processor: DynamicS2Processor) -> Any:
    """The DataLoader's collate: chat template, then the processor over the whole batch."""
    text = [processor.apply_chat_template(r["messages"], tokenize=False) for r in records]
    images = [r["images"] for r in records]  # one list per prompt
    if not any(images):
        return processor(text=text, padding=True)
    return processor(text=text, images=images, padding=True, tile_budget=TILE_BUDGET)


class TinyVLM(nn.Module):
    """Vision tower (Dynamic-S2, packed 2×2) + MLP projector + causal LM."""

    def __init__(self, processor: DynamicS2Processor) -> None:
        super().__init__()
        vision = SiglipVisionModel(
            SiglipVisionConfig(
                image_size=SCALES[0], patch_size=PATCH, hidden_size=32, intermediate_size=64,
                num_hidden_layers=3, num_attention_heads=2,
            )
        )  # fmt: skip
        # the processor's own options (scales, policy, pack, ...) plus NVILA's feature layer
        options = processor.image_processor.options()
        self.vision = DynamicS2(vision, options=options, feature_layer=-2)
        merged = len(SCALES) * vision.config.hidden_size * options.pack**2  # packed channels
        self.lm = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=len(processor.tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048, pad_token_id=processor.tokenizer.pad_token_id,
                eos_token_id=processor.tokenizer.eos_token_id,
            )
        )  # fmt: skip
        width = self.lm.config.hidden_size
        self.projector = nn.Sequential(nn.Linear(merged, width), nn.GELU(), nn.Linear(width, width))
        self.image_token_id = processor.image_token_id

    def embed(self, batch: Any) -> torch.Tensor:
        """Token embeddings with every image placeholder replaced by its image's embeddings."""
        embeds = self.lm.get_input_embeddings()(batch["input_ids"])
        if "pixel_values" not in batch:
            return embeds
        tokens, _ = self.vision(batch).pack()  # rows checked against num_image_tokens
        image_embeds = self.projector(tokens)
        return splice_image_embeddings(
            embeds, batch["input_ids"], image_embeds, self.image_token_id
        )


def main() -> None:
    torch.manual_seed(0)
    image_processor = DynamicS2ImageProcessor.nvila(
        scales=SCALES, tokens_per_tile=(64 // PATCH) ** 2
    )
    processor = DynamicS2Processor(image_processor, build_tokenizer())
    loader = torch.utils.data.DataLoader(
        Records(IMAGES),
        batch_size=2,
        num_workers=2,
        collate_fn=functools.partial(collate, processor=processor),
    )
    model = TinyVLM(processor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    bound = reached = False
    for step, batch in enumerate(loader):
        tiles = int(batch["num_patches"].sum()) if "num_patches" in batch else 0
        counts = batch["num_image_tokens"].tolist() if "num_image_tokens" in batch else []
        if counts:  # the same images planned without the budget, for comparison
            sizes = [tuple(hw) for hw in batch["image_sizes"].tolist()]
            single = [p["policy"] == "single" for p in batch["plans"]]
            free = sum(p.num_tiles for p in image_processor.plan_batch(sizes, single))
            bound |= free > tiles
        print(f"batch {step}: {tiles} tiles, image tokens per image {counts}")
        labels = batch["input_ids"].masked_fill(
            (batch["input_ids"] == processor.image_token_id) | (batch["attention_mask"] == 0), -100
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.lm(
                inputs_embeds=model.embed(batch),
                attention_mask=batch["attention_mask"],
                labels=labels,
            )
        optimizer.zero_grad()
        out.loss.backward()
        grad = next(model.vision.backbone.parameters()).grad
        reached |= grad is not None and bool(grad.abs().sum() > 0)
        print(f"  loss {out.loss.item():.3f}")
        optimizer.step()

    model.eval()
    record = Records(IMAGES)[2]
    prompt = processor.apply_chat_template(record["messages"][:1], add_generation_prompt=True)
    batch = processor(text=[prompt], images=[record["images"]])
    with torch.no_grad():
        generated = model.lm.generate(
            inputs_embeds=model.embed(batch),
            attention_mask=batch["attention_mask"],
            max_new_tokens=4,
            do_sample=False,
        )
    print(f"generate: {processor.tokenizer.decode(generated[0])!r}")
    print(f"the tile budget bound a batch: {bound}")
    print(f"gradients reach the vision tower: {reached}")
    if not (bound and reached):
        raise SystemExit(1)
    # every batch got here: DynamicS2 checked its rows against num_image_tokens and
    # splice_image_embeddings checked them against the placeholders, raising on any mismatch
    print("placeholder counts equal to the model's rows (checked each batch): True")


if __name__ == "__main__":
    main()
