"""A NVILA-style vision-language model, end to end, offline, in a few seconds on a CPU.

The pieces, as a Hugging Face VLM wires them:

1. ``DynamicS2ImageProcessor.nvila(...)`` is the ``collate_fn`` of a 2-worker ``DataLoader`` over
   the example photos: it plans and tiles every image and returns a ``BatchFeature``;
2. ``DynamicS2`` around a SigLIP vision tower (penultimate layer, ``feature_layer=-2``) takes
   that ``BatchFeature`` as it is and merges each image's scales;
3. NVILA's 2×2 packing (``nvila.pack_tokens_batch``) and a 2-layer MLP projector turn each image's
   merged map into LLM embeddings: this is the VLM's ``get_image_features``;
4. a causal LM (Qwen2) whose prompt holds, per image, exactly the number of image placeholder
   tokens that the processor counts (``get_number_of_image_tokens``) before any model runs.

It runs one training step (a forward with labels, the loss, backward) and one ``generate`` call.
The SigLIP and the LM are tiny and randomly initialised, and NVILA's scales (448, 896, 1344) are
scaled down to (64, 128, 192) with 64-pixel tiles, so the text is noise; the shapes, counts and
data flow are the real ones. With released weights, use ``DynamicS2ImageProcessor.nvila()`` and
``SiglipVisionModel.from_pretrained(...)``.

Run: ``python examples/vlm_end_to_end.py`` (needs transformers and Pillow).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from dynamic_s2 import DynamicS2, nvila
from dynamic_s2.hf import DynamicS2ImageProcessor

IMAGES = Path(__file__).resolve().parent / "images"
SCALES = (64, 128, 192)  # NVILA's 448/896/1344, divided by 7
PATCH = 16  # 64-px tiles -> 4 × 4 tokens per tile
TOKENS_PER_TILE = (SCALES[0] // PATCH) ** 2
PACK = 2  # NVILA's 2 × 2 token packing
PAD, BOS, IMAGE_TOKEN, VOCAB = 0, 1, 127, 128


class Photos(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """The example photos, as PIL images (the processor does everything else)."""

    def __init__(self, folder: Path) -> None:
        self.paths = sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png"))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Image.Image:
        return Image.open(self.paths[i]).convert("RGB")


class TinyVLM(nn.Module):
    """Vision tower (Dynamic-S2) + 2×2 packing + MLP projector + causal LM."""

    def __init__(self, processor: DynamicS2ImageProcessor) -> None:
        super().__init__()
        vision = SiglipVisionModel(
            SiglipVisionConfig(
                image_size=SCALES[0],
                patch_size=PATCH,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=2,
            )
        )
        # the processor's plan and tile options, plus the encode option NVILA uses
        self.vision = DynamicS2(vision, options=processor.options(), feature_layer=-2)
        merged = len(SCALES) * vision.config.hidden_size * PACK * PACK  # channels after packing
        self.lm = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=VOCAB,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=1024,
                pad_token_id=PAD,
                bos_token_id=BOS,
                eos_token_id=2,
            )
        )
        width = self.lm.config.hidden_size
        self.projector = nn.Sequential(nn.Linear(merged, width), nn.GELU(), nn.Linear(width, width))

    def get_image_features(self, image_inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings [Σ n_i, width], cu_seqlens [B + 1])``: image ``i``'s LLM embeddings."""
        features = self.vision(image_inputs)  # the BatchFeature, as the processor made it
        maps = [m.permute(2, 0, 1) for m in features.unpad()]  # [C, h_i, w_i]
        tokens, cu_seqlens = nvila.pack_tokens_batch(maps, factor=PACK)
        return self.projector(tokens), cu_seqlens

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image placeholders replaced by ``image_embeds``, in order."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        slots = (input_ids == IMAGE_TOKEN)[..., None]
        if int(slots.sum()) != image_embeds.shape[0]:
            raise ValueError(
                f"the prompt has {int(slots.sum())} image placeholders, the images give "
                f"{image_embeds.shape[0]} embeddings"
            )
        return embeds.masked_scatter(slots, image_embeds.to(embeds.dtype))


def prompts(
    processor: DynamicS2ImageProcessor, batch: Any, captions: bool = True
) -> tuple[torch.Tensor, ...]:
    """Left-padded ``input_ids``, ``attention_mask`` and ``labels`` for a batch of images.

    Each prompt is ``BOS, <image> × n_i`` and then (with ``captions``) a caption; ``n_i`` comes
    from the processor alone, before any model runs.
    """
    rows = []
    for i, (h, w) in enumerate(batch["image_sizes"].tolist()):
        n = processor.get_number_of_image_tokens(h, w, TOKENS_PER_TILE, PACK)
        caption = [3 + (b % 100) for b in f"photo {i}".encode()] if captions else []
        rows.append(([BOS] + [IMAGE_TOKEN] * n, caption))
    longest = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), longest), PAD)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)  # only the caption is learned
    for r, (prompt, caption) in enumerate(rows):
        n = len(prompt) + len(caption)
        ids[r, longest - n :] = torch.tensor(prompt + caption)
        mask[r, longest - n :] = 1
        labels[r, longest - len(caption) :] = torch.tensor(caption)
    return ids, mask, labels


def main() -> None:
    torch.manual_seed(0)
    processor = DynamicS2ImageProcessor.nvila(scales=SCALES)
    loader = torch.utils.data.DataLoader(
        Photos(IMAGES), batch_size=4, num_workers=2, collate_fn=processor
    )
    model = TinyVLM(processor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    agree = reached = True
    for step, batch in enumerate(loader):
        sizes = batch["image_sizes"].tolist()
        counted = [
            processor.get_number_of_image_tokens(h, w, TOKENS_PER_TILE, PACK) for h, w in sizes
        ]
        image_embeds, cu_seqlens = model.get_image_features(batch)
        made = torch.diff(cu_seqlens).tolist()
        agree &= counted == made
        print(f"batch {step}: {len(sizes)} images, {batch['pixel_values'].shape[0]} tiles")
        print(f"  image tokens counted by the processor: {counted}")
        print(f"  image tokens the model made:           {made}")

        ids, mask, labels = prompts(processor, batch)
        out = model.lm(
            inputs_embeds=model.embed(ids, image_embeds),
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            labels=labels,
        )
        optimizer.zero_grad()
        out.loss.backward()
        tower = next(model.vision.backbone.parameters()).grad
        reached &= tower is not None and bool(tower.abs().sum() > 0)
        print(f"  loss {out.loss.item():.3f}")
        optimizer.step()

    model.eval()
    with torch.no_grad():  # captions for the last batch, from its prompts alone
        ids, mask, _ = prompts(processor, batch, captions=False)
        generated = model.lm.generate(
            inputs_embeds=model.embed(ids, model.get_image_features(batch)[0]),
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=PAD,
        )
    print(f"generate: {list(generated.shape)} (images, new tokens) for the last batch")
    print(f"processor token counts equal the model's: {agree}")
    print(f"gradients reach the vision tower: {reached}")
    if not (agree and reached):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
