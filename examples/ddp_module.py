"""``DynamicS2`` inside a model, trained with DistributedDataParallel.

A small vision-language-style module: a SigLIP vision tower wrapped in ``DynamicS2`` (multi-scale,
any aspect ratio), a projector that maps the merged features to the language model's width, and a
toy head standing in for the language model. One training step shows that gradients reach the
backbone through tiling, merging and packing.

``DynamicS2`` registers the backbone as a submodule, so the outer model is an ordinary
``nn.Module``: ``.to()``, ``state_dict()``, DDP and FSDP see the backbone's parameters. Every rank
may get images of different sizes (so a different number of tiles): DDP only synchronises
gradients, which have the same shapes everywhere.

Run single-process:                ``python examples/ddp_module.py``
or on 2 CPU processes with gloo:   ``torchrun --nproc_per_node 2 examples/ddp_module.py``
(the process group is set up only when torchrun's RANK and WORLD_SIZE are set).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from dynamic_s2 import DynamicS2

LLM_DIM = 48
VOCAB = 10


class TinyVLM(nn.Module):
    """Images of any sizes -> visual tokens in the LLM's width -> (toy) next-token logits."""

    def __init__(self, vision_tower: nn.Module, scales: tuple[int, ...]) -> None:
        super().__init__()
        # max_batch_tiles bounds the backbone's batch; the options are those of dynamic_s2.forward.
        self.vision = DynamicS2(vision_tower, scales=scales, max_batch_tiles=16)
        channels = vision_tower.config.hidden_size * len(scales)  # scales concatenated
        self.projector = nn.Sequential(
            nn.LayerNorm(channels),
            nn.Linear(channels, LLM_DIM),
            nn.GELU(),
            nn.Linear(LLM_DIM, LLM_DIM),
        )
        self.lm_head = nn.Linear(LLM_DIM, VOCAB)  # stands in for the language model

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        out = self.vision(images)
        tokens, cu_seqlens = out.pack()  # [sum h_i*w_i, C_total], int32 [B + 1]
        visual = self.projector(tokens)  # the visual tokens an LLM would read
        # Toy language model: mean of each image's visual tokens -> logits.
        counts = cu_seqlens.diff()
        image_id = torch.repeat_interleave(torch.arange(len(counts)), counts.long())
        pooled = visual.new_zeros(len(counts), LLM_DIM).index_add(0, image_id, visual)
        return self.lm_head(pooled / counts[:, None])


def main() -> None:
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    config = SiglipVisionConfig(
        image_size=64,
        patch_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vision_use_head=False,  # no pooling head: every parameter gets a gradient (DDP needs it)
    )
    model = TinyVLM(SiglipVisionModel(config), scales=(64, 128))
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)  # CPU + gloo: no device_ids
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    # Each rank gets its own images, of different sizes; uint8 images are normalised with
    # SigLIP's mean and std by the adapter.
    gen = torch.Generator().manual_seed(100 + rank)
    sizes = [(90, 160), (200, 70), (128, 128)][: 2 + rank % 2]
    images = [torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in sizes]
    labels = torch.randint(0, VOCAB, (len(images),), generator=gen)

    module = model.module if distributed else model
    backbone = module.vision.backbone
    before = backbone.embeddings.patch_embedding.weight.detach().clone()

    model.train()
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    grad = backbone.embeddings.patch_embedding.weight.grad
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    moved = (backbone.embeddings.patch_embedding.weight - before).abs().max().item()

    print(
        f"rank {rank}/{world}: {len(images)} images, {module.vision.adapter.name}, "
        f"loss {loss.item():.4f}"
    )
    print(
        f"rank {rank}: backbone patch-embedding grad norm {grad.norm().item():.3e}, "
        f"parameters without grad: {len(no_grad)}, moved by {moved:.2e}"
    )
    if distributed:
        # After the step every rank holds the same weights: DDP averaged the gradients.
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
        gathered = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(gathered, checksum)
        if rank == 0:
            same = all(torch.equal(g, gathered[0]) for g in gathered)
            print(f"parameters identical on all {world} ranks after the step: {same}")
        # Drop DDP before the process group: DDP's reducer holds the group, and a gloo group
        # freed by the reducer's destructor can deadlock at exit (the group's own destructor,
        # run by destroy_process_group, releases the GIL while it joins its threads).
        del model
        dist.destroy_process_group()
    if grad is None or grad.norm() == 0 or no_grad:
        raise SystemExit("gradients did not reach the backbone")
    print(f"rank {rank}: gradients reach the backbone")


if __name__ == "__main__":
    main()
