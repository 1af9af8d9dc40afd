"""A mixed-size batch feeding an attention layer, packed and padded, with the same result.

Images of different sizes give feature grids of different sizes. An attention layer over each
image's tokens (a resampler, a Q-Former, the first layer of a projector) can take them two ways:

1. **packed**: ``out.pack()`` gives all valid tokens back to back and ``cu_seqlens``, the offsets
   of each image. Variable-length attention kernels take exactly this
   (``flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)``); here it is
   done per sequence, and as one call with a block-diagonal mask built from ``cu_seqlens``.
2. **padded**: ``out.features`` ``[B, Hmax, Wmax, C]`` with ``out.mask``, turned into an additive
   bias that is 0 on valid keys and ``torch.finfo(dtype).min`` on padding (never ``-inf``: a row
   with no valid key would give NaN), passed to ``scaled_dot_product_attention``.

Both give the same outputs on the valid tokens.

Run: ``python examples/mixed_batch_attention.py``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

import dynamic_s2

HEADS = 4


class SelfAttention(nn.Module):
    """Multi-head self-attention whose inputs are ``[..., L, C]`` with any leading dims."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[..., L, C]`` -> q, k, v of shape ``[..., heads, L, C / heads]``."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).movedim(-4, -2).unbind(-4)
        return q, k, v

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.split(x)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(y.transpose(-3, -2).flatten(-2))


def main() -> None:
    torch.manual_seed(0)
    # A toy backbone: 16-px patches of 64-px tiles -> [T, 32, 4, 4] maps.
    backbone = nn.Conv2d(3, 32, kernel_size=16, stride=16)
    sizes = [(50, 400), (128, 128), (90, 160), (200, 70)]
    images = [torch.rand(3, h, w) for h, w in sizes]
    with torch.no_grad():
        out = dynamic_s2.forward(backbone, images, scales=(64, 128))
    dim = out.channels
    print(f"feature grids {out.sizes}, padded {tuple(out.features.shape)}, channels {dim}")
    attention = SelfAttention(dim, HEADS).eval()

    # 1a. packed, one sequence at a time (cu_seqlens are offsets into the packed tokens).
    tokens, cu_seqlens = out.pack()
    bounds = cu_seqlens.tolist()
    with torch.no_grad():
        per_sequence = torch.cat(
            [attention(tokens[start:end]) for start, end in itertools.pairwise(bounds)]
        )
    print(f"packed tokens {tuple(tokens.shape)}, cu_seqlens {bounds}")

    # 1b. packed, one call: tokens attend only within their own image (block-diagonal mask).
    image_id = torch.repeat_interleave(
        torch.arange(len(bounds) - 1), cu_seqlens.diff().long()
    )  # [L]: which image each packed token belongs to
    block_diagonal = image_id[:, None] == image_id[None, :]  # bool [L, L], True = may attend
    with torch.no_grad():
        packed_one_call = attention(tokens, attn_mask=block_diagonal)

    # 2. padded: [B, Hmax*Wmax, C] and an additive key bias, finfo.min on padding keys.
    x = out.features.flatten(1, 2)
    valid = out.mask.flatten(1)  # [B, L]
    dtype = x.dtype
    bias = torch.zeros(valid.shape, dtype=dtype).masked_fill(~valid, torch.finfo(dtype).min)
    bias = bias[:, None, None, :]  # [B, 1 (heads), 1 (queries), L (keys)]
    with torch.no_grad():
        padded = attention(x, attn_mask=bias)
    print(
        f"padded input {tuple(x.shape)}, bias {tuple(bias.shape)}, "
        f"output finite everywhere: {bool(padded.isfinite().all())}"
    )

    # The valid rows of the padded output, in raster order, are the packed tokens' order.
    on_valid = padded[valid]
    err_padded = (on_valid - per_sequence).abs().max().item()
    err_block = (packed_one_call - per_sequence).abs().max().item()
    print(f"padded+bias vs packed per sequence:   max |diff| = {err_padded:.2e}")
    print(f"block-diagonal vs packed per sequence: max |diff| = {err_block:.2e}")
    same = torch.allclose(on_valid, per_sequence, atol=1e-5) and torch.allclose(
        packed_one_call, per_sequence, atol=1e-5
    )
    print(f"same outputs on the valid tokens: {same}")

    # Why finfo.min and not -inf: a softmax row whose keys are all masked (as in hand-written or
    # "eager" attention, scores + bias then softmax) is NaN with -inf and finite with finfo.min.
    for fill in (torch.finfo(dtype).min, float("-inf")):
        row = torch.softmax(torch.randn(4) + torch.full((4,), fill), dim=-1)
        print(f"softmax of a fully masked row, bias {fill:.3g}: {row.tolist()}")
    if not same:
        raise SystemExit("packed and padded attention disagree")


if __name__ == "__main__":
    main()
