"""Using a trained model: one call returns the model, its image preprocessing and its tokenizer.

    from albef_bal import load_for_inference
    m = load_for_inference("runs/demo/export")            # or a converted / official ALBEF checkpoint
    img = m.encode_images(["a.jpg", "b.png"])              # numpy [2, D], L2-normalised ITC features
    txt = m.encode_texts(["a red circle left of a blue square"])
    sim = img @ txt.T                                      # cosine similarities
    p = m.itm(["a.jpg"], ["a red circle"])                 # ITM match probability per aligned pair
    hits = m.rank_images("a red circle", ["a.jpg", "b.png"], k=2, rerank=2)

Everything here follows the evaluation path exactly: images are read as ``albef-bal evaluate``
reads them (the checkpoint's resolution, the evaluation transform: a bicubic resize to R x R,
CLIP normalisation), captions are cleaned as the training captions were and tokenised with the
checkpoint's ``data.max_len`` and ``data.add_sep``, and ranking uses the evaluation code (ITC
top-k, then ITM re-ranking of the candidates with the score rule of ``eval.score``).
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

class ImageReadError(ValueError):
    """An image path that cannot be read or decoded; the message names the file."""


# ------------------------------------------------------------------------ preprocess
class ImagePreprocess:
    """The checkpoint's image input: ``preprocess(item) -> float tensor [3, R, R]``.

    ``item`` is a file path or a PIL image. A path is decoded as the evaluation decodes it
    (large JPEGs at a reduced scale that keeps at least R pixels, see
    :func:`albef_bal.data.transforms.decode_image`); a PIL image is used as given. Then the
    evaluation transform: a bicubic resize to R x R and CLIP's normalisation."""

    def __init__(self, image_res: int):
        from .data.transforms import EvalTransform
        self.image_res = image_res
        self.transform = EvalTransform(image_res)

    def load(self, item: Any):
        """A path or PIL image -> an RGB PIL image (the decode step only)."""
        from PIL import Image
        from .data.skips import SkipSample
        from .data.transforms import decode_image
        if isinstance(item, Image.Image):
            return item if item.mode == "RGB" else item.convert("RGB")
        if isinstance(item, (str, os.PathLike)):
            try:
                with open(item, "rb") as f:
                    data = f.read()
                return decode_image(data, self.transform.decode_min_side)
            except (OSError, SkipSample) as e:
                raise ImageReadError(f"{os.fspath(item)}: cannot read the image ({e})") from None
        raise TypeError(f"expected an image path or a PIL image, got {type(item).__name__}")

    def array(self, item: Any) -> np.ndarray:
        """uint8 [R, R, 3] after the resize, before normalisation."""
        return self.transform(self.load(item))

    def __call__(self, item: Any) -> torch.Tensor:
        from .data.transforms import to_normalized_tensor
        return to_normalized_tensor([self.array(item)])[0]

    def batch(self, items: Sequence[Any]) -> torch.Tensor:
        """float [B, 3, R, R] for a list of paths / PIL images."""
        from .data.transforms import to_normalized_tensor
        return to_normalized_tensor([self.array(i) for i in items])

    def __repr__(self) -> str:
        return f"ImagePreprocess(image_res={self.image_res}, eval transform, CLIP normalisation)"


# ------------------------------------------------------------------------- tokenizer
class TextTokenizer:
    """The checkpoint's text input: ``tokenizer(texts) -> (input_ids, attention_mask)``, both
    LongTensor [B, L]. Captions are cleaned as in training (ALBEF's rules: lower case, no
    punctuation, at most ``max_words`` words), then tokenised with the checkpoint's maximum
    length and ``add_sep`` (``[CLS] text [SEP]``, or ``[CLS] text`` for ALBEF's own checkpoints)."""

    def __init__(self, base, max_len: int, add_sep: bool, max_words: int):
        self.base = base  # the wordpiece CaptionTokenizer
        self.max_len, self.add_sep, self.max_words = max_len, add_sep, max_words

    @property
    def source(self) -> str:
        return self.base.source

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    def clean(self, text: str) -> str:
        from .data.captions import clean_caption
        return clean_caption(text, self.max_words)

    def __call__(self, texts: Union[str, Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        return self.base.encode([self.clean(t) for t in texts], self.max_len, self.add_sep)

    def __repr__(self) -> str:
        return (f"TextTokenizer({self.base.source!r}, vocab {self.vocab_size}, max_len={self.max_len}, "
                f"add_sep={self.add_sep})")


# ------------------------------------------------------------------------------ model
def _progress(total: int, unit: str, show: Optional[bool], desc: str):
    from tqdm.auto import tqdm
    # show=None: a bar only on an interactive terminal (tqdm's own rule), never in logs
    return tqdm(total=total, unit=unit, desc=desc, disable=(None if show is None else not show), leave=False)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the weights that produce the ITC features (the projections, the CLS
    token and the position embeddings of both encoders): it tells two checkpoints apart,
    and is the same for an export and for the official checkpoint it was converted from."""
    h = hashlib.sha256()
    state = model.state_dict()
    names = [k for k in sorted(state) if k.startswith(("vision_proj.", "text_proj.")) or k in (
        "visual_encoder.cls_token", "visual_encoder.pos_embed", "visual_encoder.patch_embed.proj.weight",
        "text_encoder.embeddings.position_embeddings.weight")]
    for k in names:
        t = state[k].detach().float().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


class InferenceModel:
    """An ALBEF model ready for use: see :func:`load_for_inference`.

    Attributes: ``model`` (the :class:`~albef_bal.models.ALBEF`, eval mode), ``config`` (its
    resolved :class:`~albef_bal.config.Config`), ``device``, ``preprocess``
    (:class:`ImagePreprocess`), ``tokenizer`` (:class:`TextTokenizer`), ``embed_dim``,
    ``image_res``, ``source`` (the checkpoint path), ``fingerprint``."""

    def __init__(self, model, tokenizer: TextTokenizer, device: torch.device, source: str):
        from .eval.retrieval import autocast_dtype
        self.model = model
        self.config = model.config
        self.device = device
        self.source = source
        self.tokenizer = tokenizer
        self.preprocess = ImagePreprocess(model.cfg.image_res)
        self.embed_dim = model.cfg.embed_dim
        self.image_res = model.cfg.image_res
        self.amp = autocast_dtype(self.config.eval.precision, device)
        self._fingerprint: Optional[str] = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    def identity(self) -> dict:
        """What an index records to recognise the checkpoint that made its features."""
        return {"checkpoint": os.path.abspath(self.source) if os.path.exists(self.source) else self.source,
                "fingerprint": self.fingerprint, "embed_dim": self.embed_dim, "image_res": self.image_res,
                "max_len": self.tokenizer.max_len, "add_sep": self.tokenizer.add_sep}

    def __repr__(self) -> str:
        return (f"InferenceModel({self.source!r}, {self.image_res} px, {self.embed_dim}-d features, "
                f"device {self.device}, {self.tokenizer})")

    # ----------------------------------------------------------------- inputs
    def _autocast(self):
        from .eval.retrieval import _autocast
        return _autocast(self.device, self.amp)

    def _image_batches(self, items, batch_size: int) -> Iterable[torch.Tensor]:
        """float [b, 3, R, R] batches from a tensor batch, or from paths / PIL images."""
        if isinstance(items, torch.Tensor):
            x = items[None] if items.ndim == 3 else items
            r = self.image_res
            if x.ndim != 4 or tuple(x.shape[1:]) != (3, r, r):
                raise ValueError(f"a pre-processed image batch must be [B, 3, {r}, {r}] (this checkpoint's "
                                 f"resolution), got {list(items.shape)}; use model.preprocess(image)")
            for a in range(0, len(x), batch_size):
                yield x[a:a + batch_size]
            return
        for a in range(0, len(items), batch_size):
            chunk = items[a:a + batch_size]
            if all(isinstance(c, torch.Tensor) for c in chunk):
                yield torch.stack(list(chunk))
            else:
                yield self.preprocess.batch(chunk)

    @staticmethod
    def _as_list(items) -> Any:
        from PIL import Image
        if isinstance(items, (str, os.PathLike, Image.Image)):
            return [items]
        if isinstance(items, torch.Tensor):
            return items
        return list(items)

    # ---------------------------------------------------------------- features
    @torch.no_grad()
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, 1 + P, Dv] of a pre-processed batch, on the model's device."""
        with self._autocast():
            return self.model.encode_image(images.to(self.device))

    @torch.no_grad()
    def encode_images(self, items, batch_size: int = 64, progress: Optional[bool] = None) -> np.ndarray:
        """L2-normalised ITC image features, numpy float32 [N, embed_dim].

        ``items``: image paths, PIL images (one or a list), or a pre-processed tensor batch
        [B, 3, R, R] (``preprocess``'s output). An unreadable path raises
        :class:`ImageReadError` naming it (``albef-bal embed`` skips and lists such images)."""
        items = self._as_list(items)
        out = []
        with _progress(len(items), "img", progress, "images") as bar:
            for x in self._image_batches(items, batch_size):
                with self._autocast():
                    out.append(self.model.image_feat(self.model.encode_image(x.to(self.device))).float().cpu())
                bar.update(len(x))
        return torch.cat(out).numpy() if out else np.zeros((0, self.embed_dim), dtype=np.float32)

    @torch.no_grad()
    def text_tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text tokens [B, L, Dt], attention mask [B, L])`` on the model's device."""
        ids, mask = self.tokenizer(texts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with self._autocast():
            return self.model.encode_text(ids, mask), mask

    @torch.no_grad()
    def encode_texts(self, texts: Union[str, Sequence[str]], batch_size: int = 256,
                     progress: Optional[bool] = None) -> np.ndarray:
        """L2-normalised ITC text features, numpy float32 [N, embed_dim]."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        with _progress(len(texts), "text", progress, "texts") as bar:
            for a in range(0, len(texts), batch_size):
                tok, _ = self.text_tokens(texts[a:a + batch_size])
                with self._autocast():
                    out.append(self.model.text_feat(tok).float().cpu())
                bar.update(len(texts[a:a + batch_size]))
        return torch.cat(out).numpy() if out else np.zeros((0, self.embed_dim), dtype=np.float32)

    # ---------------------------------------------------------------------- ITM
    @torch.no_grad()
    def _itm_logits(self, image_tokens: torch.Tensor, texts: Sequence[str], image_of_text: torch.Tensor
                    ) -> torch.Tensor:
        """ITM logits [T, 2] of (image ``image_of_text[t]``, text t), through the evaluation's
        re-ranking code (``albef_bal.eval.retrieval.itm_scores``)."""
        from .eval.retrieval import itm_scores
        e = self.config.eval
        tok, mask = self.text_tokens(texts)
        n_img, n_txt = len(image_tokens), len(texts)
        codes = image_of_text.long() * n_txt + torch.arange(n_txt)
        order = codes.argsort()
        logits = itm_scores(self.model, codes[order], n_txt, torch.arange(n_img), image_tokens.cpu(), tok, mask,
                            self.device, self.amp, e.rerank_batch, e.image_chunk, both_logits=True)
        out = torch.empty_like(logits)
        out[order] = logits
        return out

    @torch.no_grad()
    def itm(self, images, texts: Union[str, Sequence[str]], batch_size: int = 64,
            progress: Optional[bool] = None) -> np.ndarray:
        """ITM match probability of each aligned pair (``images[i]``, ``texts[i]``), numpy [N]."""
        images = self._as_list(images)
        texts = [texts] if isinstance(texts, str) else list(texts)
        if len(images) != len(texts):
            raise ValueError(f"itm scores aligned pairs: got {len(images)} image(s) and {len(texts)} text(s)")
        out = []
        with _progress(len(texts), "pair", progress, "pairs") as bar:
            for a, x in zip(range(0, len(texts), batch_size), self._image_batches(images, batch_size)):
                t = texts[a:a + batch_size]
                logits = self._itm_logits(self.image_tokens(x), t, torch.arange(len(t)))
                out.append(logits.softmax(-1)[:, 1])
                bar.update(len(t))
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)

    # ------------------------------------------------------------------ ranking
    def rank(self, query: torch.Tensor, gallery: Union[np.ndarray, Callable], k: int, rerank: int,
             fuse: Callable[[torch.Tensor], torch.Tensor]) -> list[dict]:
        """Top ``k`` of one query feature [D] by ITC similarity, then optional re-ranking.

        ``gallery``: features [G, D] (searched with the evaluation's top-k: faiss
        IndexFlatIP on CPU, torch on GPU), or a function ``(query [1, D], depth) -> (scores
        [1, depth], indices [1, depth])`` such as a stored faiss index. With ``rerank`` > 0
        the ITC top ``rerank`` are re-scored by ``fuse(candidates) -> ITM logits [K, 2]`` and
        ordered by the evaluation's score rule (``eval.score``: the match logit, or logit +
        similarity). Returns ``[{"rank", "index", "score", "itc"(, "itm")}]``, best first."""
        from .eval.topk import topk_inner_product
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if rerank < 0:
            raise ValueError(f"rerank must be >= 0, got {rerank}")
        if rerank and k > rerank:
            raise ValueError(f"k={k} is more than the {rerank} re-ranked candidates: with re-ranking, ask for "
                             f"at most k={rerank} results (or re-rank more)")
        if callable(gallery):
            itc, cand = gallery(query[None].float(), rerank or k)
        else:
            feats = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32))
            if len(feats) == 0:
                return []
            itc, cand = topk_inner_product(query[None].float(), feats, min(rerank or k, len(feats)))
        keep = cand[0] >= 0  # an approximate index may return fewer hits than asked
        itc, cand = itc[0][keep].float(), cand[0][keep].long()
        hits = [{"index": int(i), "score": float(s), "itc": float(s)} for i, s in zip(cand, itc)]
        if rerank:
            logits = fuse(cand)
            score = logits[:, 1] + (itc if self.config.eval.score == "itm+sim" else 0)
            for h, s, p in zip(hits, score.tolist(), logits.softmax(-1)[:, 1].tolist()):
                h["score"], h["itm"] = s, p
            hits.sort(key=lambda h: -h["score"])  # stable: ties keep the ITC order
        return [{"rank": r, **h} for r, h in enumerate(hits[:k], 1)]

    def rank_images(self, text: str, images, k: int = 10, rerank: int = 0,
                    image_features: Optional[Union[np.ndarray, Callable]] = None, batch_size: int = 64) -> list[dict]:
        """The gallery ``images`` ranked for the query ``text``: a list of ``{"rank", "index",
        "score", "itc"}`` (``"itm"``: match probability, when re-ranked), best first.

        ITC similarity picks the top ``k`` (``rerank`` = 0) or the top ``rerank`` candidates,
        which the ITM head then re-scores as in ``albef-bal evaluate`` (``score`` is then the
        ITM match logit, or logit + similarity under ``eval.score: itm+sim``).
        ``image_features`` (from :meth:`encode_images`, or a search function as :meth:`rank`
        takes) skips encoding the gallery again; ``images`` may then be any sequence whose
        items are read only for re-ranking."""
        feats = image_features if image_features is not None else self.encode_images(images, batch_size)
        q = torch.from_numpy(self.encode_texts([text]))[0]

        def fuse(cand: torch.Tensor) -> torch.Tensor:
            pixels = list(self._image_batches(_take(images, cand.tolist()), batch_size))
            tokens = torch.cat([self.image_tokens(x).cpu() for x in pixels])
            return self._itm_logits(tokens, [text] * len(cand), torch.arange(len(cand)))
        return self.rank(q, feats, k, rerank, fuse)

    def rank_texts(self, image, texts: Sequence[str], k: int = 10, rerank: int = 0,
                   text_features: Optional[Union[np.ndarray, Callable]] = None, batch_size: int = 256) -> list[dict]:
        """The captions ``texts`` ranked for the query ``image`` (a path, PIL image or
        pre-processed tensor); the same result format and rules as :meth:`rank_images`
        (``text_features``: from :meth:`encode_texts`, or a search function)."""
        texts = list(texts)
        feats = text_features if text_features is not None else self.encode_texts(texts, batch_size)
        x = next(iter(self._image_batches(self._as_list(image), 1)))
        tokens = self.image_tokens(x).cpu()
        with torch.no_grad(), self._autocast():
            q = self.model.image_feat(tokens.to(self.device)).float().cpu()[0]

        def fuse(cand: torch.Tensor) -> torch.Tensor:
            return self._itm_logits(tokens, [texts[i] for i in cand.tolist()], torch.zeros(len(cand), dtype=torch.long))
        return self.rank(q, feats, k, rerank, fuse)


def _take(items, indices: list[int]) -> list:
    """``items[i]`` for each index; a gallery that reads its images lazily may offer
    ``fetch(indices)`` to read them together (e.g. several from one shard)."""
    if hasattr(items, "fetch"):
        return items.fetch(indices)
    if isinstance(items, torch.Tensor):
        return list(items[indices])
    return [items[i] for i in indices]


# ------------------------------------------------------------------------------ loader
def resolve_tokenizer(path: str, cfg, tokenizer: Optional[str] = None):
    """The checkpoint's wordpiece tokenizer: ``tokenizer`` when given; else the copy an export
    carries in ``tokenizer/``; else ``data.tokenizer`` of its config (a path relative to the
    working directory or to the checkpoint, or a Hub name in the local cache)."""
    from .checkpoints import TOKENIZER_DIR
    from .data import TokenizerError, build_tokenizer
    if tokenizer is not None:
        return build_tokenizer(tokenizer)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    bundled = os.path.join(folder, TOKENIZER_DIR)
    if os.path.isdir(path) and os.path.isdir(bundled):
        return build_tokenizer(bundled)
    spec = cfg.data.tokenizer
    beside = os.path.join(folder, spec)
    if spec and not os.path.isabs(spec) and not os.path.exists(spec) and os.path.exists(beside):
        return build_tokenizer(beside)
    try:
        return build_tokenizer(spec)
    except TokenizerError as e:
        raise TokenizerError(f"{path}: the checkpoint's tokenizer cannot be loaded ({e}). Pass "
                             f"tokenizer=... (or --set data.tokenizer=...) with a vocab.txt or tokenizer "
                             f"directory, e.g. bert-base-uncased's for ALBEF checkpoints") from None


def load_for_inference(path: str, device: Optional[Union[str, torch.device]] = None, *,
                       config: Optional[str] = None, overrides: Sequence[str] = (),
                       tokenizer: Optional[str] = None, image_res: Optional[int] = None) -> InferenceModel:
    """Everything inference needs, from one checkpoint.

    ``path``: an export directory (``model.safetensors`` + ``config.yaml``, as written by
    pretraining, fine-tuning, ``albef-bal convert`` and the demo), or an official ALBEF
    ``.pth`` (sizes read from the tensor shapes; ``config``/``overrides`` for the rest, e.g.
    ``data.tokenizer``). ``device``: "cpu", "cuda", "cuda:1", ...; default: the GPU when there
    is one. ``tokenizer`` overrides the checkpoint's; ``image_res`` evaluates at another
    resolution (position embeddings are resized).

    Returns an :class:`InferenceModel` with the model in eval mode on ``device``, its
    ``preprocess`` (the checkpoint's resolution and evaluation transform) and ``tokenizer``
    (its maximum length and ``add_sep``), and ``encode_images``, ``encode_texts``, ``itm``,
    ``rank_images``, ``rank_texts``."""
    from .checkpoints import load_pretrained
    from .config import ConfigError
    path = os.fspath(path)
    model = load_pretrained(path, config=config, overrides=overrides, image_res=image_res)
    cfg = model.config
    tok = resolve_tokenizer(path, cfg, tokenizer)
    if tok.vocab_size > cfg.model.text.vocab_size:
        raise ConfigError(f"{path}: the tokenizer {tok.source!r} has {tok.vocab_size} tokens, more than the "
                          f"model's {cfg.model.text.vocab_size} (model.text.vocab_size): it is not this "
                          f"checkpoint's tokenizer")
    dev = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev).eval()
    return InferenceModel(model, TextTokenizer(tok, cfg.data.max_len, cfg.data.add_sep, cfg.data.max_words),
                          dev, path)
