"""`albef-bal embed` and `albef-bal search`: an index of a gallery, written resumably and
searched by text or image, refused with a clear message when the checkpoint does not fit."""
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest

import albef_bal.gallery as G
from albef_bal.cli import main
from tiny import export_tiny


@pytest.fixture
def folder(colour_images, tmp_path):
    """The colour gallery in a folder tree, with one caption file, a corrupt image and a non-image."""
    root = tmp_path / "gallery"
    for i, (path, caption) in enumerate(colour_images):
        sub = root / ("warm" if i % 2 else "cool")
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, sub / os.path.basename(path))
        (sub / os.path.basename(path).replace(".png", ".txt")).write_text(caption + "\n")
    (root / "cool" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "notes.md").write_text("not an image")
    return str(root)


def search_json(capsys, *args) -> list[dict]:
    capsys.readouterr()
    assert main(["search", *args, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_embed_a_folder_and_find_the_planted_matches(colour_trained, folder, tmp_path, capsys):
    out = str(tmp_path / "index")
    assert main(["embed", "--checkpoint", colour_trained, "--images", folder, "--out", out, "--captions"]) == 0
    said = capsys.readouterr().out
    assert "8 image(s), 8 caption(s)" in said and "1 unreadable item(s) skipped" in said
    manifest = json.load(open(os.path.join(out, "index.json")))
    assert manifest["count"] == 8 and manifest["skipped"] == 1 and manifest["identity"]["embed_dim"] == 16
    assert not os.path.exists(os.path.join(out, ".partial"))
    skipped = [json.loads(x) for x in open(os.path.join(out, "skipped.jsonl"))]
    assert skipped == [{"id": "cool/corrupt.jpg", "path": os.path.join(folder, "cool", "corrupt.jpg"),
                        "reason": "bad_image", "detail": skipped[0]["detail"]}]
    items = [json.loads(x) for x in open(os.path.join(out, "items.jsonl"))]
    assert [i["n"] for i in items] == list(range(8)) and len({i["id"] for i in items}) == 8
    assert np.load(os.path.join(out, "features.npy")).shape == (8, 16)

    for colour in ("red", "blue", "black"):
        hits = search_json(capsys, "--index", out, "--text", f"a {colour} square", "--top", "3")
        assert [h["rank"] for h in hits] == [1, 2, 3]
        assert hits[0]["id"].endswith(f"/{colour}.png") and hits[0]["path"].endswith(f"{colour}.png")
        assert hits[0]["score"] == hits[0]["itc"] and hits[0]["query"] == f"a {colour} square"
        reranked = search_json(capsys, "--index", out, "--text", f"a {colour} square", "--rerank", "5")
        assert len(reranked) == 5 and reranked[0]["id"].endswith(f"/{colour}.png") and "itm" in reranked[0]
        by_image = search_json(capsys, "--index", out, "--image", os.path.join(folder, "cool", f"{colour}.png")
                               if os.path.exists(os.path.join(folder, "cool", f"{colour}.png"))
                               else os.path.join(folder, "warm", f"{colour}.png"), "--top", "2")
        assert by_image[0]["id"].endswith(f"/{colour}.png") and by_image[0]["itc"] == pytest.approx(1, abs=1e-5)
        captions = search_json(capsys, "--index", out, "--captions", "--image", hits[0]["path"], "--rerank", "8",
                               "--top", "1")
        assert captions[0]["caption"] == f"a {colour} square" and captions[0]["id"] == hits[0]["id"]

    capsys.readouterr()
    assert main(["search", "--index", out, "--text", "a red square", "--rerank", "3"]) == 0
    table = capsys.readouterr().out
    assert "re-ranked by ITM" in table and "/red.png" in table.splitlines()[2]
    assert main(["search", "--index", out, "--image", hits[0]["path"], "--rerank", "3"]) == 2
    assert "re-ranking scores image-text pairs" in capsys.readouterr().err
    assert main(["search", "--index", out, "--text", "a red square", "--rerank", "3", "--top", "4"]) == 2
    assert "--top 4 is more than the 3 re-ranked candidates" in capsys.readouterr().err


def test_embed_resumes_after_an_interruption(colour_trained, folder, tmp_path, monkeypatch, capsys):
    whole = str(tmp_path / "whole")
    args = ["--checkpoint", colour_trained, "--images", folder, "--chunk-size", "3"]
    assert main(["embed", *args, "--out", whole]) == 0

    saved = []
    real_save = G._save_chunk

    def save_then_stop(path, *a):
        if len(saved) == 2:
            raise KeyboardInterrupt  # as if the job were killed while embedding the third chunk
        real_save(path, *a)
        saved.append(os.path.basename(path))
    monkeypatch.setattr(G, "_save_chunk", save_then_stop)
    cut = str(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        main(["embed", *args, "--out", cut])
    assert sorted(os.listdir(os.path.join(cut, ".partial"))) == ["chunk_000000.npz", "chunk_000001.npz", "plan.json"]
    with pytest.raises(G.GalleryIndexError, match="unfinished index"):
        G.GalleryIndex.open(cut)

    saved.clear()
    monkeypatch.setattr(G, "_save_chunk", lambda path, *a: (real_save(path, *a), saved.append(os.path.basename(path))))
    capsys.readouterr()
    assert main(["embed", *args, "--out", cut]) == 0
    assert saved == ["chunk_000002.npz"] and "resuming, 2 of 3 chunk(s) done before" in capsys.readouterr().out
    for name in ("items.jsonl", "skipped.jsonl"):
        assert open(os.path.join(cut, name)).read() == open(os.path.join(whole, name)).read()
    np.testing.assert_array_equal(np.load(os.path.join(cut, "features.npy")), np.load(os.path.join(whole, "features.npy")))
    assert G.GalleryIndex.open(cut).manifest["count"] == 8

    # a finished index is left alone by the same command, and refuses another source or model
    saved.clear()
    assert main(["embed", *args, "--out", cut]) == 0 and saved == []
    assert "nothing to do" in capsys.readouterr().out
    assert main(["embed", *args[:3], os.path.join(folder, "warm"), "--out", cut]) == 2
    assert "another checkpoint or source" in capsys.readouterr().err


def test_a_changed_checkpoint_cannot_finish_an_unfinished_index(colour_trained, data_corpus, folder, tmp_path,
                                                               monkeypatch, capsys):
    def stop(path, *a):
        raise KeyboardInterrupt
    monkeypatch.setattr(G, "_save_chunk", stop)
    out = str(tmp_path / "index")
    with pytest.raises(KeyboardInterrupt):
        main(["embed", "--checkpoint", colour_trained, "--images", folder, "--out", out])
    other = export_tiny(str(tmp_path / "other"), data_corpus["vocab"])
    assert main(["embed", "--checkpoint", other, "--images", folder, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "unfinished index made from another checkpoint" in err and "fingerprint" in err and "--overwrite" in err


def test_embed_a_split_json_into_an_hnsw_index(colour_trained, colour_images, tmp_path, capsys):
    """An annotation JSON (ids from image_id, one image missing on disk) into an approximate index."""
    root = os.path.dirname(colour_images[0][0])
    entries = [{"image": os.path.basename(p), "caption": [c, c.replace("square", "patch")], "image_id": 100 + i}
               for i, (p, c) in enumerate(colour_images)]
    entries.append({"image": "gone.png", "caption": "a grey square", "image_id": 999})
    split = tmp_path / "split.json"
    split.write_text(json.dumps(entries))
    out = str(tmp_path / "index")
    assert main(["embed", "--checkpoint", colour_trained, "--images", str(split), "--image-root", root,
                 "--out", out, "--captions", "--index-type", "hnsw", "--hnsw-m", "8"]) == 0
    index = G.GalleryIndex.open(out)
    assert index.manifest["faiss"] == {"type": "hnsw", "hnsw_m": 8}
    assert index.manifest["count"] == 8 and index.manifest["texts"] == 16
    skipped = [json.loads(x) for x in open(os.path.join(out, "skipped.jsonl"))]
    assert [(s["id"], s["reason"]) for s in skipped] == [(999, "missing_image")]
    for i, colour in enumerate(("red", "green", "blue")):
        hits = search_json(capsys, "--index", out, "--text", f"a {colour} square", "--rerank", "4")
        assert hits[0]["id"] == 100 + i and hits[0]["path"] == os.path.join(root, f"{colour}.png")


def _shard_with_bad_samples(path):
    with tarfile.open(path, "w") as tar:
        for name, data in (("bad.jpg", b"\xff\xd8 garbage"), ("bad.txt", b"a red square"),
                           ("noimage.txt", b"a blue square")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_embed_shards_lists_bad_samples_and_reranks_from_the_shards(colour_trained, data_corpus, tmp_path, capsys):
    bad = str(tmp_path / "bad.tar")
    _shard_with_bad_samples(bad)
    out = str(tmp_path / "index")
    spec = f"{data_corpus['urls'][0]}"
    assert main(["embed", "--checkpoint", colour_trained, "--images", spec, "--out", out, "--captions"]) == 0
    index = G.GalleryIndex.open(out)
    assert index.manifest["count"] == 32 and index.manifest["texts"] >= 32
    assert index.items[0]["shard"] == os.path.abspath(spec) and "key" in index.items[0]
    # shards and their bad samples together: a brace pattern over both
    both = str(tmp_path / "both")
    shutil.copy(spec, tmp_path / "00000.tar")
    shutil.copy(bad, tmp_path / "00001.tar")
    assert main(["embed", "--checkpoint", colour_trained, "--images", str(tmp_path / "{00000..00001}.tar"),
                 "--out", both]) == 0
    skipped = [json.loads(x) for x in open(os.path.join(both, "skipped.jsonl"))]
    assert sorted((s["key"], s["reason"]) for s in skipped) == [("bad", "bad_image"), ("noimage", "missing_image")]
    assert G.GalleryIndex.open(both).manifest["count"] == 32
    hits = search_json(capsys, "--index", both, "--text", index.texts()[0]["text"], "--rerank", "4")
    assert len(hits) == 4 and all(h["shard"].endswith("00000.tar") and "itm" in h for h in hits)


def test_mismatched_index_and_checkpoint_are_refused_naming_both(colour_trained, data_corpus, folder, tmp_path,
                                                                 capsys):
    out = str(tmp_path / "index")
    assert main(["embed", "--checkpoint", colour_trained, "--images", folder, "--out", out]) == 0
    other = export_tiny(str(tmp_path / "other"), data_corpus["vocab"])  # same sizes, other weights
    capsys.readouterr()
    assert main(["search", "--index", out, "--checkpoint", other, "--text", "a red square"]) == 2
    err = capsys.readouterr().err
    assert out in err and colour_trained in err and other in err and "fingerprint" in err
    narrow = export_tiny(str(tmp_path / "narrow"), data_corpus["vocab"], "model.embed_dim=8")
    assert main(["search", "--index", out, "--checkpoint", narrow, "--text", "a red square"]) == 2
    err = capsys.readouterr().err
    assert "16-d features" in err and "8-d features" in err and out in err and narrow in err
    sharper = export_tiny(str(tmp_path / "sharper"), data_corpus["vocab"], "model.image_res=48")
    assert main(["search", "--index", out, "--checkpoint", sharper, "--text", "a red square"]) == 2
    assert "image_res 32 vs 48" in capsys.readouterr().err
    os.remove(os.path.join(out, "image.faiss"))
    assert main(["search", "--index", out, "--text", "a red square"]) == 2
    assert "image.faiss is missing" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path), "--text", "x"]) == 2
    assert "not an index directory" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_embed_the_same_index_as_one(colour_trained, folder, tmp_path):
    """`albef-bal embed` under torchrun with two gloo ranks (each embeds every other chunk)."""
    from workers import torchrun_module
    args = ["--checkpoint", colour_trained, "--images", folder, "--chunk-size", "2", "--captions"]
    two = str(tmp_path / "two")
    res = torchrun_module(["embed", *args, "--out", two])
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count("8 image(s), 8 caption(s)") == 1  # rank 0 reports
    one = str(tmp_path / "one")
    assert main(["embed", *args, "--out", one]) == 0
    for name in ("items.jsonl", "skipped.jsonl", "texts.jsonl"):
        assert open(os.path.join(two, name)).read() == open(os.path.join(one, name)).read()
    for name in ("features.npy", "text_features.npy"):
        np.testing.assert_allclose(np.load(os.path.join(two, name)), np.load(os.path.join(one, name)), atol=1e-6)
