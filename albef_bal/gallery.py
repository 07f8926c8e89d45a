"""An image gallery embedded once and searched many times: ``albef-bal embed`` / ``search``.

``embed`` reads every image of a folder, a retrieval split (annotation JSON) or WebDataset
shards, encodes it with a checkpoint's ITC image encoder (and, with ``captions``, every
caption with the text encoder) and writes an index directory:

    index.json          the manifest: source, checkpoint identity, counts, files; written last,
                        so a directory without it is an unfinished index
    features.npy        float32 [N, D] L2-normalised image features, in item order
    items.jsonl         one line per item: {"n", "id", "path"} or {"n", "id", "shard", "key"}
    image.faiss         a faiss inner-product index over features.npy (flat, or HNSW)
    skipped.jsonl       unreadable images, skipped and listed with the reason
    text_features.npy, texts.jsonl, text.faiss    with captions: the same for the captions

Large galleries: the items are cut into chunks (a fixed number of files, or one shard each);
a finished chunk is saved under ``.partial/`` atomically, so an interrupted run resumes where it
stopped, and under a launcher (torchrun, deepspeed, srun) rank r embeds chunks r, r + W, ...
Rank 0 joins the chunks at the end; every final file is written to a temporary name and
renamed, the manifest last.

``search`` loads the manifest, checks that the checkpoint matches the one recorded there
(feature size, resolution, a fingerprint of the weights), and ranks the gallery for text or
image queries with the evaluation's ITC top-k and, optionally, ITM re-ranking.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

log = logging.getLogger("albef_bal.gallery")

FORMAT = "albef_bal.index/1"
MANIFEST = "index.json"
PARTIAL = ".partial"
PLAN = "plan.json"
FILE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
INDEX_TYPES = ("flat", "hnsw")


class GalleryIndexError(RuntimeError):
    """An index directory that cannot be used as asked; the message names it."""


class IndexMismatchError(GalleryIndexError):
    """An index and a checkpoint that do not belong together; the message names both."""


# ------------------------------------------------------------------------- sources
def describe_source(spec: str, image_root: Optional[str] = None) -> dict:
    """``{"kind": "dir" | "json" | "shards", "spec": ...}`` for ``--images``."""
    if spec.endswith(".json"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"--images: no such annotation file: {spec}")
        return {"kind": "json", "spec": os.path.abspath(spec),
                "image_root": os.path.abspath(image_root) if image_root else None}
    if os.path.isdir(spec):
        has_images = any(f.lower().endswith(FILE_EXTENSIONS) for _, _, files in os.walk(spec) for f in files)
        has_tars = any(f.endswith((".tar", ".tar.gz")) for f in os.listdir(spec))
        if has_images or not has_tars:
            if not has_images:
                raise FileNotFoundError(f"--images: {spec} holds no image files ({', '.join(FILE_EXTENSIONS)}) "
                                        "and no .tar shards")
            return {"kind": "dir", "spec": os.path.abspath(spec)}
    from .data.shards import expand_urls
    urls = expand_urls(spec, "--images")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.exists(u)]
    if missing and len(missing) == len(urls):
        raise FileNotFoundError(f"--images: {spec} is not a folder, an annotation .json or existing shards "
                                f"(first missing: {missing[0]})")
    return {"kind": "shards", "spec": spec, "urls": [os.path.abspath(u) if u in local else u for u in urls]}


def list_file_items(source: dict, captions: bool) -> list[dict]:
    """The items of a folder or annotation JSON, in a fixed order: ``{"id", "path"[, "captions"]}``.
    A folder's image ``a/b.jpg`` has the id ``a/b.jpg``; its captions (with ``captions``)
    come from ``a/b.txt`` beside it, one per line."""
    items: list[dict] = []
    if source["kind"] == "dir":
        root = source["spec"]
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                if f.startswith(".") or not f.lower().endswith(FILE_EXTENSIONS):
                    continue
                path = os.path.join(folder, f)
                item = {"id": os.path.relpath(path, root).replace(os.sep, "/"), "path": path}
                if captions:
                    side = os.path.splitext(path)[0] + ".txt"
                    item["captions"] = _read_lines(side) if os.path.isfile(side) else []
                items.append(item)
        return items
    from .data import load_retrieval_split
    split = load_retrieval_split(source["spec"], source.get("image_root"))
    for i, path in enumerate(split.images):
        item = {"id": split.image_ids[i], "path": path}
        if captions:
            item["captions"] = [split.texts[t] for t in split.img2txt[i]]
        items.append(item)
    return items


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        log.warning("captions %s: %s; the image is embedded without them", path, e)
        return []


def _jsonable(x: Any) -> Any:
    return x if isinstance(x, (str, int, float, bool)) or x is None else str(x)


# ------------------------------------------------------------------- reading images
class _FileChunk(torch.utils.data.Dataset):
    """(position, uint8 array or None, why) of each item of a chunk, decoded in workers."""

    def __init__(self, items: Sequence[dict], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int):
        from .data.skips import SkipSample
        from .data.transforms import decode_image
        path = self.items[j]["path"]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return j, None, "missing_image", f"{type(e).__name__}: {e.strerror or e}"
        try:
            return j, self.transform(decode_image(data, self.transform.decode_min_side)), None, ""
        except SkipSample as e:
            return j, None, e.reason, e.detail


def _decoded_files(items: Sequence[dict], transform, batch_size: int, workers: int):
    loader = torch.utils.data.DataLoader(_FileChunk(items, transform), batch_size=batch_size,
                                         num_workers=workers, collate_fn=list)
    for batch in loader:
        yield from batch


def _decoded_shard(url: str, transform, captions: bool, max_words: int, skipped: list[dict]):
    """(item, uint8 array) of every readable image of one shard; the rest into ``skipped``."""
    from .data.captions import clean_caption
    from .data.samples import caption_candidates, image_member, parse_json
    from .data.shards import read_shard
    from .data.skips import SkipCounter, SkipSample
    from .data.transforms import decode_image
    counter = SkipCounter(f"[embed {url}]", keep=1 << 30)
    for raw in read_shard(url, counter):
        item = {"id": raw["__key__"], "shard": url, "key": raw["__key__"]}
        try:
            meta = None
            try:
                meta = parse_json(raw)
            except SkipSample:
                pass  # a bad .json member costs the captions and id, not the image
            if meta and "image_id" in meta:
                item["id"] = _jsonable(meta["image_id"])
            if captions:
                try:
                    texts = caption_candidates(raw, meta)
                except SkipSample:
                    texts = []
                item["captions"] = [c for c in (clean_caption(t, max_words) for t in texts) if c]
            _, data = image_member(raw)
            array = transform(decode_image(data, transform.decode_min_side))
        except SkipSample as e:
            skipped.append({**{k: v for k, v in item.items() if k != "captions"}, "reason": e.reason,
                            "detail": e.detail})
            continue
        yield item, array
    for reason, _, key, detail in counter.events:  # truncated or unopenable shards
        skipped.append({"shard": url, **({"key": key} if key else {}), "reason": reason, "detail": detail})


# ---------------------------------------------------------------------- embedding
def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path: str, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array, dtype=np.float32))
    _atomic_write(path, write)


def _save_lines(path: str, rows: Sequence[dict]) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    _atomic_write(path, write)


def _save_json(path: str, obj: dict) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
    _atomic_write(path, write)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise GalleryIndexError(f"{path}: cannot be read ({e})") from None


def _chunk_path(out: str, c: int) -> str:
    return os.path.join(out, PARTIAL, f"chunk_{c:06d}.npz")


def _save_chunk(path: str, image_features: np.ndarray, text_features: np.ndarray, meta: dict) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:  # np.savez adds ".npz" to a bare name, not to a file object
            np.savez(f, image_features=image_features.astype(np.float32),
                     text_features=text_features.astype(np.float32), meta=np.array(json.dumps(meta)))
    _atomic_write(path, write)


def _load_chunk(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
    with np.load(path, allow_pickle=False) as z:
        return z["image_features"], z["text_features"], json.loads(str(z["meta"]))


def _same(a: dict, b: dict, keys: Sequence[str]) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


_IDENTITY_KEYS = ("fingerprint", "embed_dim", "image_res", "max_len", "add_sep")


def _check_plan(plan: dict, want: dict, out: str) -> None:
    diffs = _same(plan["identity"], want["identity"], _IDENTITY_KEYS)
    diffs += _same(plan, want, ("source", "captions", "chunk_size", "num_chunks"))
    if diffs:
        raise GalleryIndexError(f"{out} holds an unfinished index made from another checkpoint or source "
                          f"({'; '.join(diffs)}): rerun with the same arguments to finish it, or pass "
                          f"--overwrite to start again")


def embed_gallery(checkpoint: str, images: str, out: str, *, image_root: Optional[str] = None,
                  captions: bool = False, index_type: str = "flat", hnsw_m: int = 32,
                  batch_size: Optional[int] = None, workers: Optional[int] = None, chunk_size: int = 1024,
                  overwrite: bool = False, config: Optional[str] = None, overrides: Sequence[str] = (),
                  tokenizer: Optional[str] = None, progress: Optional[bool] = None) -> dict:
    """Embed the gallery ``images`` (folder, annotation JSON or shards) into the index
    directory ``out``; see the module docstring. Collective under a launcher: every rank
    calls it. Returns the manifest (on every rank)."""
    import torch.distributed as dist
    from . import distributed as D
    from .data.transforms import EvalTransform, to_normalized_tensor
    from .eval.report import init_eval_distributed
    from .inference import _progress, load_for_inference
    if index_type not in INDEX_TYPES:
        raise ValueError(f"--index-type must be one of {list(INDEX_TYPES)}, got {index_type!r}")
    if chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1, got {chunk_size}")
    t0 = time.time()
    device = init_eval_distributed()
    rank, world = D.get_rank(), D.get_world_size()
    source = describe_source(images, image_root)
    model = load_for_inference(checkpoint, device, config=config, overrides=overrides, tokenizer=tokenizer)
    batch_size = batch_size or model.config.eval.batch_size
    workers = min(model.config.eval.num_workers, os.cpu_count() or 1) if workers is None else workers
    file_items = list_file_items(source, captions) if source["kind"] != "shards" else None
    num_chunks = len(source["urls"]) if file_items is None else max(1, -(-len(file_items) // chunk_size))
    if file_items is not None:  # a folder that changed between two runs must not be resumed
        import hashlib
        listing = json.dumps([[_jsonable(i["id"]), i["path"]] for i in file_items]).encode()
        source = {**source, "items": len(file_items), "digest": hashlib.sha256(listing).hexdigest()[:16]}
    want = {"format": FORMAT, "source": source, "identity": model.identity(), "captions": captions,
            "chunk_size": chunk_size if file_items is not None else None, "num_chunks": num_chunks}

    # ---- rank 0 decides: a finished index, a resumable one, or a fresh start
    status: list[Any] = [None]
    if rank == 0:
        try:
            status[0] = _prepare_out(out, want, overwrite)
        except Exception as e:  # every rank raises the same error below
            status[0] = ("error", f"{type(e).__name__}", str(e))
    if world > 1:
        dist.broadcast_object_list(status, 0)
    if isinstance(status[0], tuple):
        _, kind, msg = status[0]
        raise (IndexMismatchError if kind == "IndexMismatchError" else GalleryIndexError)(msg)
    if status[0] == "complete":
        if rank == 0:
            print(f"{out}: the index is complete for this checkpoint and source; nothing to do "
                  f"(--overwrite rebuilds it)")
        return _read_json(os.path.join(out, MANIFEST))

    # ---- this rank's chunks
    mine = [c for c in range(num_chunks) if c % world == rank and not os.path.isfile(_chunk_path(out, c))]
    done_before = sum(1 for c in range(num_chunks) if os.path.isfile(_chunk_path(out, c)))
    if rank == 0 and done_before:
        print(f"{out}: resuming, {done_before} of {num_chunks} chunk(s) done before")
    transform = EvalTransform(model.image_res)
    total = sum(len(file_items[c * chunk_size:(c + 1) * chunk_size]) for c in mine) if file_items is not None \
        else None
    unit = "img"
    with _progress(total, unit, progress if rank == 0 else False, f"embedding on rank {rank}" if world > 1
                   else "embedding") as bar:
        for c in mine:
            items, arrays, skipped = [], [], []
            if file_items is not None:
                chunk = file_items[c * chunk_size:(c + 1) * chunk_size]
                for j, array, reason, detail in _decoded_files(chunk, transform, batch_size, workers):
                    if array is None:
                        skipped.append({"id": _jsonable(chunk[j]["id"]), "path": chunk[j]["path"],
                                        "reason": reason, "detail": detail})
                    else:
                        items.append({**chunk[j], "id": _jsonable(chunk[j]["id"])})
                        arrays.append(array)
                    bar.update(1)
            else:
                for item, array in _decoded_shard(source["urls"][c], transform, captions,
                                                  model.config.data.max_words, skipped):
                    items.append(item)
                    arrays.append(array)
                    bar.update(1)
            feats = [model.encode_images(to_normalized_tensor(arrays[a:a + batch_size]), batch_size, False)
                     for a in range(0, len(arrays), batch_size)]
            image_features = np.concatenate(feats) if feats else np.zeros((0, model.embed_dim), np.float32)
            texts = [{"item": j, "text": t} for j, it in enumerate(items) for t in it.pop("captions", [])]
            text_features = model.encode_texts([t["text"] for t in texts], progress=False) if texts else \
                np.zeros((0, model.embed_dim), np.float32)
            _save_chunk(_chunk_path(out, c), image_features, text_features,
                        {"items": items, "skipped": skipped, "texts": texts})
    if world > 1:
        dist.barrier()
    manifest: list[Any] = [None]
    if rank == 0:
        manifest[0] = _assemble(out, want, index_type, hnsw_m, time.time() - t0)
    if world > 1:
        dist.broadcast_object_list(manifest, 0)
    return manifest[0]


def _prepare_out(out: str, want: dict, overwrite: bool) -> str:
    """"complete", "resume" or "fresh"; refuses to mix checkpoints or sources."""
    manifest_path = os.path.join(out, MANIFEST)
    plan_path = os.path.join(out, PARTIAL, PLAN)
    if overwrite:
        for name in (MANIFEST, PARTIAL):  # the manifest first: the index is unfinished from now on
            p = os.path.join(out, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    elif os.path.isfile(manifest_path):
        have = _read_json(manifest_path)
        diffs = _same(have.get("identity", {}), want["identity"], _IDENTITY_KEYS)
        diffs += _same(have, want, ("source", "captions"))
        if diffs:
            raise GalleryIndexError(f"{out} already holds an index made from another checkpoint or source "
                              f"({'; '.join(diffs)}); pass --overwrite to replace it, or choose another --out")
        return "complete"
    elif os.path.exists(out) and os.listdir(out) and not os.path.isfile(plan_path):
        raise GalleryIndexError(f"{out} exists and is not an index directory; choose another --out")
    if os.path.isfile(plan_path):
        _check_plan(_read_json(plan_path), want, out)
        return "resume"
    os.makedirs(os.path.join(out, PARTIAL), exist_ok=True)
    _save_json(plan_path, want)
    return "fresh"


def _build_faiss(features: np.ndarray, index_type: str, hnsw_m: int):
    import faiss
    d = features.shape[1]
    if index_type == "flat":
        ix = faiss.IndexFlatIP(d)
    else:
        ix = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    if len(features):
        ix.add(np.ascontiguousarray(features, dtype=np.float32))
    return ix


def _write_faiss(path: str, ix) -> None:
    import faiss
    _atomic_write(path, lambda tmp: faiss.write_index(ix, tmp))


def _assemble(out: str, want: dict, index_type: str, hnsw_m: int, seconds: float) -> dict:
    """Join the chunks into the final files (manifest last) and remove ``.partial``."""
    items, skipped, texts, img_feats, txt_feats = [], [], [], [], []
    for c in range(want["num_chunks"]):
        path = _chunk_path(out, c)
        if not os.path.isfile(path):
            raise GalleryIndexError(f"{out}: chunk {c} is missing after embedding; rerun the same command to finish")
        f_img, f_txt, meta = _load_chunk(path)
        base = len(items)
        for it in meta["items"]:
            items.append({"n": len(items), **it})
        texts += [{"item": base + t["item"], "id": meta["items"][t["item"]]["id"], "text": t["text"]}
                  for t in meta["texts"]]
        skipped += meta["skipped"]
        img_feats.append(f_img)
        txt_feats.append(f_txt)
    d = want["identity"]["embed_dim"]
    features = np.concatenate(img_feats) if img_feats else np.zeros((0, d), np.float32)
    _save_npy(os.path.join(out, "features.npy"), features)
    _save_lines(os.path.join(out, "items.jsonl"), items)
    _save_lines(os.path.join(out, "skipped.jsonl"), skipped)
    _write_faiss(os.path.join(out, "image.faiss"), _build_faiss(features, index_type, hnsw_m))
    files = ["features.npy", "items.jsonl", "skipped.jsonl", "image.faiss"]
    if want["captions"]:
        text_features = np.concatenate(txt_feats) if txt_feats else np.zeros((0, d), np.float32)
        _save_npy(os.path.join(out, "text_features.npy"), text_features)
        _save_lines(os.path.join(out, "texts.jsonl"), texts)
        _write_faiss(os.path.join(out, "text.faiss"), _build_faiss(text_features, index_type, hnsw_m))
        files += ["text_features.npy", "texts.jsonl", "text.faiss"]
    manifest = {**{k: want[k] for k in ("format", "source", "identity", "captions")},
                "count": len(items), "texts": len(texts), "skipped": len(skipped),
                "faiss": {"type": index_type, **({"hnsw_m": hnsw_m} if index_type == "hnsw" else {})},
                "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(seconds, 1)}
    _save_json(os.path.join(out, MANIFEST), manifest)
    shutil.rmtree(os.path.join(out, PARTIAL), ignore_errors=True)
    return manifest


# ------------------------------------------------------------------------ searching
class _LazyItems:
    """Gallery items read only when re-ranking needs them (``fetch``): files by path, shard
    samples by reading their shard once for all the keys asked of it."""

    def __init__(self, items: list[dict], res: int):
        self.items, self.res = items, res

    def __len__(self) -> int:
        return len(self.items)

    def fetch(self, indices: Sequence[int]) -> list:
        from .data.shards import read_shard
        from .data.skips import SkipCounter
        from .data.samples import image_member
        from .data.transforms import decode_image
        out: list[Any] = [None] * len(indices)
        by_shard: dict[str, dict[str, list[int]]] = {}
        for pos, i in enumerate(indices):
            it = self.items[i]
            if "path" in it:
                out[pos] = it["path"]
            else:
                by_shard.setdefault(it["shard"], {}).setdefault(it["key"], []).append(pos)
        for url, keys in by_shard.items():
            for raw in read_shard(url, SkipCounter(f"[search {url}]")):
                if raw["__key__"] in keys:
                    img = decode_image(image_member(raw)[1], self.res)
                    for pos in keys.pop(raw["__key__"]):
                        out[pos] = img
                if not keys:
                    break
            if keys:
                raise GalleryIndexError(f"{url}: sample(s) {sorted(keys)[:3]} of the index are no longer readable")
        return out


@dataclass
class GalleryIndex:
    """An index directory written by :func:`embed_gallery`."""
    path: str
    manifest: dict
    items: list[dict]

    @classmethod
    def open(cls, path: str) -> "GalleryIndex":
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest_path):
            why = "an unfinished index (rerun the same albef-bal embed command to finish it)" \
                if os.path.isdir(os.path.join(path, PARTIAL)) else "not an index directory"
            raise GalleryIndexError(f"{path}: no {MANIFEST}: {why}")
        manifest = _read_json(manifest_path)
        if manifest.get("format") != FORMAT:
            raise GalleryIndexError(f"{path}: format {manifest.get('format')!r}, this version reads {FORMAT!r}")
        for name in manifest.get("files", []):
            if not os.path.isfile(os.path.join(path, name)):
                raise GalleryIndexError(f"{path}: {name} is missing; rebuild the index with albef-bal embed --overwrite")
        with open(os.path.join(path, "items.jsonl"), encoding="utf-8") as f:
            items = [json.loads(line) for line in f]
        if len(items) != manifest["count"]:
            raise GalleryIndexError(f"{path}: items.jsonl has {len(items)} lines, the manifest says {manifest['count']}")
        return cls(path, manifest, items)

    @property
    def identity(self) -> dict:
        return self.manifest["identity"]

    def texts(self) -> list[dict]:
        if not self.manifest.get("captions"):
            raise GalleryIndexError(f"{self.path} holds no caption features: build it with albef-bal embed --captions")
        with open(os.path.join(self.path, "texts.jsonl"), encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def searcher(self, which: str = "image"):
        """``(queries [Q, D], k) -> (scores [Q, k], indices [Q, k])`` over the stored faiss index."""
        import faiss
        ix = faiss.read_index(os.path.join(self.path, f"{which}.faiss"))
        d = self.identity["embed_dim"]
        if ix.d != d:
            raise GalleryIndexError(f"{self.path}: {which}.faiss has {ix.d}-d vectors, the manifest says {d}")
        if hasattr(ix, "hnsw"):
            ix.hnsw.efSearch = max(ix.hnsw.efSearch, 64)

        def search(queries: torch.Tensor, k: int):
            k = min(k, ix.ntotal)
            if k < 1:
                return torch.zeros(len(queries), 0), torch.zeros(len(queries), 0, dtype=torch.long)
            if hasattr(ix, "hnsw"):
                ix.hnsw.efSearch = max(ix.hnsw.efSearch, 2 * k)
            s, i = ix.search(np.ascontiguousarray(queries.float().numpy()), k)
            return torch.from_numpy(s), torch.from_numpy(i).long()
        return search

    def check_model(self, model) -> None:
        """Refuse a checkpoint whose features are not comparable with the index's."""
        have, got = self.identity, model.identity()
        built = f"index {self.path} was built with checkpoint {have.get('checkpoint')}"
        if have.get("embed_dim") != got["embed_dim"]:
            raise IndexMismatchError(
                f"{built} ({have.get('embed_dim')}-d features), but checkpoint {got['checkpoint']} gives "
                f"{got['embed_dim']}-d features: they cannot be compared. Search with the index's checkpoint "
                f"(--checkpoint {have.get('checkpoint')}) or rebuild the index with albef-bal embed")
        diffs = [f"{k} {have.get(k)} vs {got[k]}" for k in _IDENTITY_KEYS if have.get(k) != got[k]]
        if diffs:
            raise IndexMismatchError(
                f"{built} (weights fingerprint {have.get('fingerprint')}, {have.get('image_res')} px), but checkpoint "
                f"{got['checkpoint']} differs ({'; '.join(diffs)}): its features are not comparable with the "
                f"index's. Search with --checkpoint {have.get('checkpoint')}, or rebuild the index with "
                f"albef-bal embed --checkpoint {got['checkpoint']} --overwrite")

    def _item_hit(self, h: dict) -> dict:
        it = self.items[h["index"]]
        where = {"path": it["path"]} if "path" in it else {"shard": it["shard"], "key": it["key"]}
        return {"rank": h["rank"], "id": it["id"], "score": h["score"], "itc": h["itc"],
                **({"itm": h["itm"]} if "itm" in h else {}), **where}

    def search(self, model, *, text: Optional[str] = None, image: Any = None, k: int = 10, rerank: int = 0,
               target: str = "images") -> list[dict]:
        """Hits ``{"rank", "id", "score", "itc"[, "itm"], "path" | "shard"+"key"[, "caption"]}``
        for one query: ``text`` or ``image`` (a path or PIL image), against the gallery's
        ``images`` or, for an index built with captions, its ``captions``. Re-ranking by ITM
        (``rerank`` candidates) pairs a text query with images or an image query with captions."""
        if (text is None) == (image is None):
            raise ValueError("give one query: text or image")
        if target not in ("images", "captions"):
            raise ValueError(f"target must be 'images' or 'captions', got {target!r}")
        cross = (text is not None) == (target == "images")
        if rerank and not cross:
            raise ValueError("ITM re-ranking scores image-text pairs: use it for a text query against images or "
                             "an image query against captions")
        self.check_model(model)
        if target == "images":
            if text is not None:
                hits = model.rank_images(text, _LazyItems(self.items, model.image_res), k, rerank,
                                         image_features=self.searcher("image"))
            else:
                q = torch.from_numpy(model.encode_images([image], progress=False))[0]
                hits = model.rank(q, self.searcher("image"), k, 0, None)
            return [self._item_hit(h) for h in hits]
        texts = self.texts()
        if image is not None:
            hits = model.rank_texts(image, [t["text"] for t in texts], k, rerank, text_features=self.searcher("text"))
        else:
            q = torch.from_numpy(model.encode_texts([text], progress=False))[0]
            hits = model.rank(q, self.searcher("text"), k, 0, None)
        out = []
        for h in hits:
            t = texts[h["index"]]
            hit = self._item_hit({**h, "index": t["item"]})
            out.append({**hit, "caption": t["text"], "text_index": h["index"]})
        return out
