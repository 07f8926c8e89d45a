"""BERT text encoder whose upper layers fuse image tokens through cross-attention.

Layers ``[0, fusion_layer)`` read text only; layers ``[fusion_layer, layers)`` add a
cross-attention block (queries from text, keys/values from image tokens, post-LN) after
self-attention and before the feed-forward block, as in ALBEF. Parameter names follow HF
``BertModel`` (``embeddings.*``, ``encoder.layer.N.attention.self.query`` ...,
``encoder.layer.N.crossattention.*``) so bert-base-uncased weights load directly. Written
here rather than taken from transformers, whose BERT refuses cross-attention outside decoder
mode and whose internals change between releases.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class _DropScale(torch.autograd.Function):
    """``x`` with the positions of ``drop`` zeroed and the rest scaled by ``scale``; saves
    only the boolean mask for the backward (a quarter of a float mask's memory)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, drop: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return x.masked_fill(drop, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        drop, = ctx.saved_tensors
        return grad.masked_fill(drop, 0).mul_(ctx.scale), None, None


def drop_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Boolean mask of ``shape``, each entry True with probability round(p * 2^16) / 2^16
    (p = 0.1: 0.1000061), independently. Four entries per 64-bit draw of the generator (one
    16-bit lane each), against one draw per entry for ``torch.rand`` and a slower bernoulli
    for ``F.dropout``: on the CPU about 4x cheaper than either (bench/NOTES.md section 7)."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    threshold = min(round(p * 65536), 65535) - 32768
    return (words.view(torch.int16)[:n] < threshold).view(shape)


def _fast_cpu_path(fast: bool, x: torch.Tensor) -> bool:
    """Whether the fast masks apply: asked for, a CPU tensor, and not inside code being
    compiled (``train.compile``: inductor generates its own masks)."""
    return fast and x.device.type == "cpu" and not torch.compiler.is_compiling()


def dropout(x: torch.Tensor, p: float, training: bool, fast: bool) -> torch.Tensor:
    """Inverted dropout. With ``fast`` on a CPU tensor the mask comes from :func:`drop_mask`:
    the distribution of ``F.dropout`` (to 2^-17 in p), not the same masks for a seed.
    GPU tensors always take ``F.dropout``, whose fused kernel is already cheap there, and so
    does code being compiled (``train.compile``: inductor generates its own masks)."""
    if not training or p == 0.0:
        return x
    if _fast_cpu_path(fast, x):
        return _DropScale.apply(x, drop_mask(x.shape, p, x.device), 1.0 / (1.0 - p))
    return F.dropout(x, p, True)


class Dropout(nn.Module):
    """``nn.Dropout`` with the ``fast`` CPU mask of :func:`dropout` (no parameters, so the
    state dict is that of ``nn.Dropout``)."""

    def __init__(self, p: float, fast: bool = False):
        super().__init__()
        self.p, self.fast = p, fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.fast)

    def extra_repr(self) -> str:
        return f"p={self.p}, fast={self.fast}"


def attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: Optional[torch.Tensor], p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) with dropout, then times v: what SDPA computes when
    it has dropout, which on the CPU sends it down its unfused math path (two scalings, a
    float copy of the mask, an all-masked-row check and a bernoulli mask per call). Here:
    one scaling of q, the boolean mask as a large negative bias, :func:`dropout`'s fast mask.
    A query row with every key masked (never the case for text, whose [CLS] is always a
    token) would attend uniformly instead of returning zeros."""
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
        scores = scores + bias.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    probs = dropout(scores.softmax(-1), p, True, True)
    return probs @ v


class BertEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, width: int, max_position: int, type_vocab_size: int,
                 eps: float, dropout: float, pad_token_id: int = 0, fast_dropout: bool = False):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, width, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_position, width)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dropout = Dropout(dropout, fast_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        if L > self.position_embeddings.num_embeddings:
            raise ValueError(f"text of {L} tokens exceeds max_position={self.position_embeddings.num_embeddings}")
        # every token has type 0, so the type embedding is one broadcast row
        x = (self.word_embeddings(input_ids) + self.position_embeddings.weight[:L]
             + self.token_type_embeddings.weight[0])
        return self.dropout(self.LayerNorm(x))


class Packed:
    """The real tokens of a padded [B, L] batch as the rows of one [N, C] tensor
    (``model.text.pack``): the layers' per-token work runs on N = the number of real tokens
    rows instead of B x L, and attention sees them laid out as [B, L, C] again, with zeros at
    the padded positions (which attention masks out as keys)."""

    def __init__(self, mask: torch.Tensor):
        self.B, self.L = mask.shape
        self.index = mask.reshape(-1).nonzero().squeeze(1)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, C] -> [N, C]."""
        return x.reshape(self.B * self.L, x.shape[-1]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C] -> [B, L, C], zeros at the padded positions."""
        out = x.new_zeros(self.B * self.L, x.shape[-1])
        return out.index_copy(0, self.index, x).view(self.B, self.L, x.shape[-1])


class BertSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float, kv_width: Optional[int] = None,
                 fast_dropout: bool = False):
        super().__init__()
        kv_width = kv_width or width
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)
        self.dropout = dropout
        self.fast_dropout = fast_dropout

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor],
                context: Optional[torch.Tensor] = None,
                context_index: Optional[torch.Tensor] = None,
                packed: Optional[Packed] = None) -> torch.Tensor:
        """Self-attention, or with ``context`` cross-attention to it. ``context_index`` [B]
        (optional) says which context row each query row attends to: the keys and values
        are projected once per distinct context and gathered, which is what makes ALBEF's
        fusion pass cheap (its 4B sequences attend to only B distinct images). With
        ``packed``, ``x`` (and the result) are the packed real tokens [N, C]."""
        # projections of x (packed or not) come out laid out as [B, L, C] for attention
        layout = packed.unpack if packed is not None else (lambda t: t)
        q_in = layout(self.query(x))
        if context is None:
            k_in, v_in = layout(self.key(x)), layout(self.value(x))
        else:
            k_in, v_in = self.key(context), self.value(context)
        B, L, C = q_in.shape
        h, d = self.heads, C // self.heads
        q = q_in.view(B, L, h, d).transpose(1, 2)
        k = k_in.view(k_in.shape[0], k_in.shape[1], h, d).transpose(1, 2)
        v = v_in.view(v_in.shape[0], v_in.shape[1], h, d).transpose(1, 2)
        if context_index is not None:
            # index_select, not k[index]: its backward is an index_add, several times faster on
            # CPU than the accumulating index_put behind advanced indexing
            k, v = k.index_select(0, context_index), v.index_select(0, context_index)
            if mask is not None and mask.shape[0] != 1:
                mask = mask.index_select(0, context_index)
        p = self.dropout if self.training else 0.0
        if p > 0.0 and _fast_cpu_path(self.fast_dropout, q):
            out = attention_with_dropout(q, k, v, mask, p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.transpose(1, 2).reshape(B, L, C)
        return out if packed is None else packed.pack(out)


class BertSelfOutput(nn.Module):
    """Projection, dropout, residual and post-LN (also the FFN output block: ``BertOutput``)."""

    def __init__(self, in_width: int, width: int, eps: float, dropout: float, fast_dropout: bool = False):
        super().__init__()
        self.dense = nn.Linear(in_width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dropout = Dropout(dropout, fast_dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, width: int, heads: int, eps: float, dropout: float, kv_width: Optional[int] = None,
                 fast_dropout: bool = False):
        super().__init__()
        self.self = BertSelfAttention(width, heads, dropout, kv_width, fast_dropout)
        self.output = BertSelfOutput(width, width, eps, dropout, fast_dropout)

    def forward(self, x, mask, context=None, context_index=None, packed=None):
        return self.output(self.self(x, mask, context, context_index, packed), x)


class BertIntermediate(nn.Module):
    def __init__(self, width: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(width, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, width: int, heads: int, intermediate: int, eps: float, dropout: float,
                 cross_width: Optional[int] = None, fast_dropout: bool = False):
        super().__init__()
        self.attention = BertAttention(width, heads, eps, dropout, fast_dropout=fast_dropout)
        self.has_cross = cross_width is not None
        if self.has_cross:
            self.crossattention = BertAttention(width, heads, eps, dropout, kv_width=cross_width,
                                                fast_dropout=fast_dropout)
        self.intermediate = BertIntermediate(width, intermediate)
        self.output = BertSelfOutput(intermediate, width, eps, dropout, fast_dropout)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor],
                image: Optional[torch.Tensor] = None, image_mask: Optional[torch.Tensor] = None,
                image_index: Optional[torch.Tensor] = None, packed: Optional[Packed] = None):
        x = self.attention(x, mask, packed=packed)
        if self.has_cross:
            x = self.crossattention(x, image_mask, image, image_index, packed)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, layers: list[BertLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


def attention_mask_4d(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[B, L] with 1 = token, 0 = padding  ->  boolean [B, 1, 1, L] for SDPA (True = attend)."""
    if mask is None:
        return None
    return mask.bool()[:, None, None, :]


class TextEncoder(nn.Module):
    """BERT with text-only lower layers and cross-attention upper layers (``model.text``)."""

    def __init__(self, text, encoder_width: int):
        super().__init__()
        self.config = text
        self.fusion_layer = text.fusion_layer
        self.embeddings = BertEmbeddings(text.vocab_size, text.width, text.max_position, text.type_vocab_size,
                                         text.layer_norm_eps, text.dropout, text.pad_token_id,
                                         text.fast_dropout)
        self.encoder = BertEncoder([
            BertLayer(text.width, text.heads, text.intermediate, text.layer_norm_eps, text.dropout,
                      cross_width=encoder_width if i >= text.fusion_layer else None,
                      fast_dropout=text.fast_dropout)
            for i in range(text.layers)])
        self.grad_checkpointing = False
        self._init_weights(text.init_std)

    def _init_weights(self, std: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _run(self, layers, x, mask, image=None, image_mask=None, image_index=None):
        packed = None
        if self.config.pack and mask is not None and len(layers):
            packed = Packed(mask[:, 0, 0, :])
            x = packed.pack(x)
        for layer in layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, image, image_mask, image_index, packed, use_reentrant=False)
            else:
                x = layer(x, mask, image, image_mask, image_index, packed)
        return x if packed is None else packed.unpack(x)

    def forward_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Embeddings + text-only layers -> text tokens [B, L, width]."""
        x = self.embeddings(input_ids)
        return self._run(self.encoder.layer[:self.fusion_layer], x, attention_mask_4d(attention_mask))

    def forward_fusion(self, text_tokens: torch.Tensor, attention_mask: Optional[torch.Tensor],
                       image_tokens: torch.Tensor, image_mask: Optional[torch.Tensor] = None,
                       image_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fusion layers on text tokens with cross-attention to image tokens -> [B, L, width].

        Without ``image_index`` text row i attends to image row i. With ``image_index`` [B]
        (long) it attends to ``image_tokens[image_index[i]]`` (and ``image_mask`` is indexed
        alike): the same result as passing the gathered images, but each distinct image's
        keys and values are projected once."""
        return self._run(self.encoder.layer[self.fusion_layer:], text_tokens, attention_mask_4d(attention_mask),
                         image_tokens, attention_mask_4d(image_mask), image_index)

    def forward(self, input_ids, attention_mask=None, image_tokens=None, image_mask=None):
        """All layers ("full" mode); without image tokens only the text-only layers exist."""
        x = self.forward_text(input_ids, attention_mask)
        if image_tokens is None:
            if self.fusion_layer < len(self.encoder.layer):
                raise ValueError("the fusion layers need image_tokens")
            return x
        return self.forward_fusion(x, attention_mask, image_tokens, image_mask)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


class MLMTransform(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class MLMHead(nn.Module):
    """BERT's ``cls.predictions``: transform, then a decoder tied to the word embeddings.

    The decoder matrix is the embedding module's weight itself, held by reference and not
    registered here: the tie holds by construction, state dicts store the matrix once, and
    an optimizer sees it once."""

    def __init__(self, word_embeddings: nn.Embedding, eps: float, std: float = 0.02):
        super().__init__()
        vocab_size, width = word_embeddings.weight.shape
        self.transform = MLMTransform(width, eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self._tied = [word_embeddings]  # a list, so that nn.Module does not register it
        nn.init.normal_(self.transform.dense.weight, std=std)
        nn.init.zeros_(self.transform.dense.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return TiedDecoder.apply(self.transform(hidden), self._tied[0].weight, self.bias)


class TiedDecoder(torch.autograd.Function):
    """``x @ W.T + b`` for the decoder tied to the word embeddings, with a weight gradient that
    autograd can sum in place.

    The tied matrix gets two dense [vocab, width] gradients, one from this product and one
    from the embedding lookup. ``F.linear``'s weight gradient reaches autograd in a form it
    will not add into, so every step allocated a third vocab-sized buffer for the sum (about
    6% of a bench-small CPU step, bench/NOTES.md). Here the weight gradient is a fresh
    contiguous matmul output, which autograd accumulates the lookup's gradient into.
    Under autocast the forward runs in the autocast dtype as ``F.linear`` would, and the
    backward computes in the gradient's dtype and returns each input's own dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = bias.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(grad.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b
