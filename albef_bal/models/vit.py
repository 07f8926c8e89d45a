"""Vision Transformer with timm's parameter names.

Pre-LN blocks, qkv bias, LayerNorm eps 1e-6, a CLS token and a final norm, as in ALBEF's
ViT-B/16. Names match ``timm.models.vision_transformer.VisionTransformer`` (``cls_token``,
``pos_embed``, ``patch_embed.proj``, ``blocks.N.attn.qkv`` ...), so timm, DeiT and ALBEF
checkpoints load without renaming. Written here rather than imported because timm imports
torchvision at import time.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, P, D]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, width * 3)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at rate 0 and in eval mode)."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT returning all tokens after the final norm: [B, 1 + (image_res/patch)^2, width]."""

    def __init__(self, image_res: int = 256, patch_size: int = 16, width: int = 768, depth: int = 12,
                 heads: int = 12, mlp_ratio: float = 4.0, drop_path: float = 0.0, init_std: float = 0.02):
        super().__init__()
        self.image_res = image_res
        self.num_features = width
        self.patch_embed = PatchEmbed(patch_size, width)
        num_patches = (image_res // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, width))
        rates = [x.item() for x in torch.linspace(0, drop_path, depth)]
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.grad_checkpointing = False
        self._init_weights(init_std)

    def _init_weights(self, std: float) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=std)
        nn.init.trunc_normal_(self.cls_token, std=std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, images: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """All tokens after the final norm. ``keep`` [B, K] (patch indices, 0-based, without
        the CLS token) runs the blocks on the CLS token and those K patches of each image only
        (patch-token dropout as in FLIP: position embeddings are added first, so every kept
        token keeps its place); the result is then [B, 1 + K, width]."""
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        pos = self.pos_embed
        if pos.shape[1] != x.shape[1]:  # inputs at another resolution than the weights
            pos = resize_pos_embed(pos, x.shape[1] - 1)
        x = x + pos
        if keep is not None:
            patches = torch.gather(x[:, 1:], 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :1], patches], dim=1)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)

    forward = forward_features

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


def resize_pos_embed(pos_embed: torch.Tensor, num_patches: int, num_extra: int = 1) -> torch.Tensor:
    """Bicubically resize ViT position embeddings [1, extra + G*G, D] to ``num_patches`` grid
    positions, keeping the CLS (extra) tokens, as ALBEF does when the resolution changes."""
    extra, grid = pos_embed[:, :num_extra], pos_embed[:, num_extra:]
    old = int(math.isqrt(grid.shape[1]))
    new = int(math.isqrt(num_patches))
    if old * old != grid.shape[1] or new * new != num_patches:
        raise ValueError(f"position embeddings must form a square grid: {grid.shape[1]} -> {num_patches}")
    if old == new:
        return pos_embed
    d = grid.shape[-1]
    grid = grid.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, d).to(pos_embed.dtype)
    return torch.cat([extra, grid], dim=1)


def build_vision_encoder(image_res: int, vision) -> nn.Module:
    """The image encoder named by ``model.vision`` (a :class:`VisionConfig`).

    Both kinds expose ``forward_features(images) -> tokens [B, N, D]`` and ``num_features``;
    a timm model keeps timm's own parameter names, like the built-in ViT.
    """
    if vision.backbone == "vit":
        return VisionTransformer(image_res, vision.patch_size, vision.width, vision.depth, vision.heads,
                                 vision.mlp_ratio, vision.drop_path, vision.init_std)
    try:
        import timm
    except Exception as e:  # timm imports torchvision, which may be missing
        raise ImportError(
            f"model.vision.backbone='{vision.backbone}' needs timm (and torchvision): pip install '.[timm]' "
            f"({type(e).__name__}: {e}). The default backbone 'vit' needs neither.") from e
    model = timm.create_model(vision.backbone, pretrained=False, num_classes=0, img_size=image_res,
                              drop_path_rate=vision.drop_path)
    if model.num_features != vision.width:
        raise ValueError(f"timm backbone '{vision.backbone}' has width {model.num_features}, but "
                         f"model.vision.width is {vision.width}; set them equal")
    return model
