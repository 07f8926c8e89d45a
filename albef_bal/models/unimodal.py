"""Unimodal feature-space losses per tower (``model.unimodal``): heads, losses, second views.

ALBEF's cross-modal objectives can let each tower's own feature space collapse onto what
the captions distinguish; a self-supervised loss per tower keeps the finer unimodal
structure (SLIP adds SimCLR to CLIP, TCL adds intra-modal contrast to ALBEF). Options:

- image ``simsiam`` (Chen and He, CVPR 2021): projector (two Linear-BN-ReLU layers, then a
  Linear and a BN without affine) and a bottleneck predictor (Linear-BN-ReLU, Linear);
  loss ``-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2``, in [-1, 1].
- image ``simclr`` as SLIP uses it: a 3-layer head (Linear-BN-ReLU x 2, Linear) and the
  2N-way InfoNCE of each view against the other view and both views' other samples,
  temperature 0.1.
- text ``mlm``: an MLM head (BERT's transform, decoder tied to the word embeddings) on the
  *text-only* layers' output of the masked caption that the forward already computes for
  the fused MLM: one extra head on about 15% of the tokens, no extra encoder pass.
- text ``simcse`` (Gao et al., EMNLP 2021, unsupervised): the caption twice through the
  text-only layers with different dropout masks (the first pass is the forward's own),
  CLS -> Linear + tanh, InfoNCE over cosine similarities, temperature 0.05.

Every head reads its tower's CLS token (or, for ``mlm``, its tokens) and nothing else, so
each loss's gradient reaches its own branch and its own head only.

The second image view is made on the fly from the normalised batch tensor (no change to
the data pipeline): per image, Gaussian noise, Gaussian blur and small brightness and
contrast changes with random strengths (``model.unimodal.augment``). No flip, crop or
colour change: on the synthetic corpus, whose captions name positions, sizes and colours,
the caption stays true for both views. The randomness comes from a generator seeded by
one draw from the training RNG, which checkpoints save and restore, so a resumed run
makes the same views.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import CLIP_MEAN, CLIP_STD
from ..distributed import concat_all_gather, get_rank, get_world_size


# ------------------------------------------------------------------------- heads
class SimSiamHead(nn.Module):
    """SimSiam's projector and predictor on a CLS feature of width ``width``."""

    def __init__(self, width: int, dim: int, pred_dim: int):
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
            nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
            nn.Linear(width, dim, bias=False), nn.BatchNorm1d(dim, affine=False))
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
            nn.Linear(pred_dim, dim))

    def loss(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        """Symmetrised negative cosine with the stop-gradient on the projections."""
        z1, z2 = self.projector(h1.float()), self.projector(h2.float())
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return -(F.cosine_similarity(p1, z2.detach(), dim=-1).mean()
                 + F.cosine_similarity(p2, z1.detach(), dim=-1).mean()) / 2


class SimCLRHead(nn.Module):
    """SLIP's image SSL head (``image_mlp``) and its SimCLR loss."""

    def __init__(self, width: int, mlp_dim: int, dim: int, temperature: float):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_dim), nn.BatchNorm1d(mlp_dim), nn.ReLU(inplace=True),
            nn.Linear(mlp_dim, mlp_dim), nn.BatchNorm1d(mlp_dim), nn.ReLU(inplace=True),
            nn.Linear(mlp_dim, dim))
        self.temperature = temperature

    def loss(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        return simclr_loss(F.normalize(self.mlp(h1.float()), dim=-1), F.normalize(self.mlp(h2.float()), dim=-1),
                           self.temperature)


class SimCSEHead(nn.Module):
    """SimCSE's training-time pooler on the CLS token: Linear + tanh (the ``cls`` pooler)."""

    def __init__(self, width: int, temperature: float):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.temperature = temperature

    def loss(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        return simcse_loss(torch.tanh(self.dense(h1.float())), torch.tanh(self.dense(h2.float())), self.temperature)


# ------------------------------------------------------------------------ losses
def gather_with_local_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(features of every rank concatenated in rank order, offset of this rank's rows). The
    other ranks' rows carry no gradient; this rank's rows are ``x`` itself (as SimCSE does)."""
    world = get_world_size()
    if world == 1:
        return x, 0
    rank = get_rank()
    parts = list(concat_all_gather(x.detach()).chunk(world))
    parts[rank] = x
    return torch.cat(parts), rank * x.shape[0]


def simclr_loss(q_a: torch.Tensor, q_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's 2N-way loss on L2-normalised views [B, D] (SLIP's ``SIMCLRLoss``): each
    sample of view a is classified against all of view b and the *other* samples of view
    a, and the other way round; negatives from every rank."""
    k_a, offset = gather_with_local_grad(q_a)
    k_b, _ = gather_with_local_grad(q_b)
    n = q_a.shape[0]
    labels = torch.arange(n, device=q_a.device) + offset
    self_mask = F.one_hot(labels, k_a.shape[0]).to(q_a.dtype) * 1e9
    logits_ab = q_a @ k_b.t() / temperature
    logits_ba = q_b @ k_a.t() / temperature
    logits_aa = q_a @ k_a.t() / temperature - self_mask
    logits_bb = q_b @ k_b.t() / temperature - self_mask
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), labels)
    return (loss_a + loss_b) / 2


def simcse_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Unsupervised SimCSE: row i of view 1 against every sample of view 2 (all ranks),
    cosine similarity / temperature, cross-entropy with the same sentence as the target."""
    k1, _ = gather_with_local_grad(z1)
    k2, _ = gather_with_local_grad(z2)
    # cosine similarity as a product of normalised rows: an N x N matrix, not N x N x D
    sim = F.normalize(k1, dim=-1, eps=1e-8) @ F.normalize(k2, dim=-1, eps=1e-8).t() / temperature
    labels = torch.arange(k1.shape[0], device=z1.device)
    return F.cross_entropy(sim, labels)


# ---------------------------------------------------------------------- the views
def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels [B, 2 radius + 1]; sigma 0 gives the identity."""
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    s = sigma.float().clamp_min(1e-6)[:, None]
    k = torch.exp(-0.5 * (x[None, :] / s) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def augment_view(images: torch.Tensor, aug, generator: torch.Generator) -> torch.Tensor:
    """A second view of CLIP-normalised images [B, 3, H, W]: each image gets its own blur
    sigma, noise std, brightness and contrast factors drawn from ``generator``. Works in
    [0, 1] pixel space and returns the normalised view."""
    B, C, H, W = images.shape
    dev = images.device
    mean = torch.tensor(CLIP_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=dev).view(1, 3, 1, 1)
    x = images.float() * std + mean

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(B, device=dev, generator=generator)

    if aug.blur > 0:
        sigma = uniform(0.0, aug.blur)
        radius = max(1, int(math.ceil(2.0 * aug.blur)))
        k = _gaussian_kernels(sigma, radius).repeat_interleave(C, dim=0)  # [B*C, K]
        y = F.pad(x.reshape(1, B * C, H, W), (radius, radius, radius, radius), mode="replicate")
        y = F.conv2d(y, k[:, None, None, :], groups=B * C)  # along width
        x = F.conv2d(y, k[:, None, :, None], groups=B * C).reshape(B, C, H, W)  # along height
    if aug.contrast > 0:
        c = uniform(1.0 - aug.contrast, 1.0 + aug.contrast).view(B, 1, 1, 1)
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - m) * c + m
    if aug.brightness > 0:
        x = x * uniform(1.0 - aug.brightness, 1.0 + aug.brightness).view(B, 1, 1, 1)
    if aug.noise > 0:
        sd = uniform(0.0, aug.noise).view(B, 1, 1, 1)
        x = x + sd * torch.randn(x.shape, device=dev, generator=generator)
    x = x.clamp(0.0, 1.0)
    return ((x - mean) / std).to(images.dtype)


def view_generator(device: torch.device) -> torch.Generator:
    """A generator for one batch's views, seeded by one draw from the training RNG (the
    global generator, which checkpoints save): resumed runs make the same views, and the
    training RNG moves by one draw only when an image loss is on."""
    seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    return torch.Generator(device=device).manual_seed(seed)


# ------------------------------------------------------------------------- build
def build_image_head(cfg, width: int) -> Optional[nn.Module]:
    """The head of ``model.unimodal.image`` on image CLS features of ``width`` (None when off)."""
    if cfg.image == "simsiam":
        return SimSiamHead(width, cfg.simsiam.dim, cfg.simsiam.pred_dim)
    if cfg.image == "simclr":
        return SimCLRHead(width, cfg.simclr.mlp_dim, cfg.simclr.dim, cfg.simclr.temperature)
    return None


def build_text_head(cfg, width: int, word_embeddings: nn.Embedding, eps: float, std: float) -> Optional[nn.Module]:
    """The head of ``model.unimodal.text`` (None when off); ``mlm`` ties its decoder to the
    text encoder's word embeddings, as BERT's and the fused MLM head do."""
    if cfg.text == "mlm":
        from .text import MLMHead
        return MLMHead(word_embeddings, eps, std)
    if cfg.text == "simcse":
        return SimCSEHead(width, cfg.simcse.temperature)
    return None
