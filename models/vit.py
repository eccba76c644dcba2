"""ViT image encoder of ALBEF (ViT-B/16, Dosovitskiy et al. 2021), built on timm.

The parameter names of timm's ``VisionTransformer`` are those of the released ALBEF checkpoints
(``visual_encoder.blocks.3.attn.qkv.weight`` ...). LayerNorm eps is 1e-6, GELU the exact form,
attention goes through timm's fused ``scaled_dot_product_attention`` path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class ImageEncoder(VisionTransformer):
    """timm ViT returning all tokens: (B, 3, R, R) -> (B, 1 + (R/P)^2, D), [CLS] first, after the final norm."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return self.forward_features(x)


def build_vit(
    image_res: int, patch_size: int = 16, width: int = 768, depth: int = 12, heads: int = 12,
    mlp_ratio: float = 4.0, grad_ckpt: bool = False,
) -> ImageEncoder:
    """The ALBEF image encoder (ViT-B/16 with the defaults)."""
    if image_res % patch_size:
        raise ValueError(f"image_res {image_res} is not a multiple of the ViT patch size {patch_size}")
    vit = ImageEncoder(
        img_size=image_res, patch_size=patch_size, embed_dim=width, depth=depth, num_heads=heads,
        mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=0, global_pool="",
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    vit.set_grad_checkpointing(grad_ckpt)
    return vit


def vit_sizes(config: dict) -> dict[str, int]:
    """``build_vit`` keyword arguments from a task config (``image_res``, ``vision_width``, ``vit``: {patch_size,
    depth, heads}); absent keys take the ViT-B/16 values."""
    vit = config.get("vit") or {}
    return {"image_res": config["image_res"], "patch_size": vit.get("patch_size", 16),
            "width": config.get("vision_width", 768), "depth": vit.get("depth", 12), "heads": vit.get("heads", 12)}


@contextmanager
def saved_attention(vit: VisionTransformer, block: int) -> Iterator[list[Tensor]]:
    """Keep the attention probabilities of ViT block ``block`` (for Grad-CAM, official ``register_blk``).

    Inside the context the block computes attention explicitly (timm's non-fused path, the same math) and
    each forward appends its post-dropout probabilities (B, nh, N, N) to the yielded list, the tensor whose
    gradient the official code keeps. Gradient checkpointing is paused (a recomputed forward would record
    again). On exit the fused SDPA path and checkpointing are restored.

    Raises:
        IndexError: ``block`` is not one of the encoder's blocks.
    """
    if not 0 <= block < len(vit.blocks):
        raise IndexError(f"ViT block {block} does not exist (the encoder has {len(vit.blocks)} blocks)")
    attn = vit.blocks[block].attn
    recorded: list[Tensor] = []
    fused, ckpt = attn.fused_attn, vit.grad_checkpointing
    # timm's explicit path applies attn_drop to the softmax probabilities; its output is what multiplies V
    hook = attn.attn_drop.register_forward_hook(lambda _module, _inputs, probs: recorded.append(probs))
    attn.fused_attn, vit.grad_checkpointing = False, False
    try:
        yield recorded
    finally:
        hook.remove()
        attn.fused_attn, vit.grad_checkpointing = fused, ckpt


def interpolate_pos_embed(pos_embed: Tensor, num_patches: int, num_extra_tokens: int = 1) -> Tensor:
    """Resize a (1, extra + G*G, D) position embedding to ``num_patches`` grid tokens, bicubic.

    Used when a checkpoint trained at one resolution (e.g. 256 px: 16x16 grid) is loaded into a model
    at another (384 px: 24x24). Extra tokens ([CLS]) are kept as they are.
    """
    old_grid = int(round((pos_embed.size(1) - num_extra_tokens) ** 0.5))
    new_grid = int(round(num_patches**0.5))
    if old_grid == new_grid:
        return pos_embed
    extra, grid = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    dim = pos_embed.size(-1)
    grid = grid.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # (1, D, G, G)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)  # (1, G'*G', D)
    logger.info("position embedding interpolated from %dx%d to %dx%d", old_grid, old_grid, new_grid, new_grid)
    return torch.cat([extra, grid], dim=1)
