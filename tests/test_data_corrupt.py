"""Bad input is skipped and counted, never fatal: a hand-made corrupt shard yields exactly
its good samples, with the right count per reason."""
import io
import logging
import os
import tarfile

import pytest
from PIL import Image

from albef_bal.data.shards import expand_urls, open_shard, read_shard
from albef_bal.data.skips import SKIP_REASONS, SkipCounter
from albef_bal.data.tario import CorruptTar, TruncatedTar, iter_samples, iter_tar_members
from albef_bal.data.webdataset import build_eval_loader, build_pretrain_loader


def _image(fmt: str, colour=(200, 30, 30), size=(24, 20), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(buf, fmt)
    return buf.getvalue()


def _tar(path, members) -> None:
    """A tar written with Python's tarfile (not the project's writer)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


GOOD_KEYS = {"good_jpg", "good_png_json", "good_webp", "good_gray", "good_list"}


@pytest.fixture
def corrupt_shards(tmp_path):
    jpg = _image("JPEG")
    bad = tmp_path / "bad.tar"
    _tar(bad, [
        ("good_jpg.jpg", jpg), ("good_jpg.txt", b"A red square."),
        ("garbage.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg at all" * 3), ("garbage.txt", b"caption"),
        ("cut.jpg", jpg[: len(jpg) // 2]), ("cut.txt", b"half an image"),
        ("empty.jpg", jpg), ("empty.txt", b"  ?!.  "),
        ("latin1.jpg", jpg), ("latin1.txt", "café".encode("latin-1")),
        ("nocaption.jpg", jpg),
        ("good_png_json.png", _image("PNG")), ("good_png_json.json", b'{"caption": "From JSON", "image_id": 7}'),
        ("badjson.jpg", jpg), ("badjson.json", b"{not json"),
        ("good_webp.webp", _image("WEBP")), ("good_webp.txt", b"webp image"),
        ("noimage.txt", b"a caption without an image"),
        ("good_gray.png", _image("PNG", mode="L")), ("good_gray.txt", b"grey"),
        ("good_list.jpg", jpg), ("good_list.json", b'{"captions": ["first", "second"]}'),
    ])
    # a second shard cut inside its third sample's image
    full = tmp_path / "full.tar"
    _tar(full, [("t1.jpg", jpg), ("t1.txt", b"one"), ("t2.jpg", jpg), ("t2.txt", b"two"),
                ("t3.jpg", jpg), ("t3.txt", b"three")])
    data = full.read_bytes()
    cut_at = data.index(b"t3.jpg") + 512 + 100  # header of t3.jpg, then 100 bytes of its data
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[:cut_at])
    os.remove(full)
    return {"bad": str(bad), "truncated": str(truncated), "missing": str(tmp_path / "missing.tar"),
            "expected_counts": {"bad_image": 2, "empty_caption": 1, "bad_utf8": 1, "missing_caption": 1,
                                "bad_json": 1, "missing_image": 1, "truncated_tar": 1, "shard_open_failed": 1},
            "good": GOOD_KEYS | {"t1", "t2"}}


def test_eval_stream_yields_exactly_the_good_samples(corrupt_shards, data_config, caplog):
    c = corrupt_shards
    cfg = data_config(batch=4)
    from albef_bal.data import build_tokenizer
    tok = build_tokenizer(cfg)
    caplog.set_level(logging.WARNING, logger="albef_bal.data")
    loader = build_eval_loader(cfg, tok, [c["bad"], c["truncated"], c["missing"]], rank=0, world_size=1)
    keys, per_batch = [], []
    for batch in loader:
        keys += batch["keys"]
        per_batch.append(batch["skipped"])
        assert batch["image"].shape[1:] == (3, 32, 32)
    assert sorted(keys) == sorted(c["good"])  # each good sample once, nothing else
    expected = dict.fromkeys(SKIP_REASONS, 0) | c["expected_counts"]
    assert loader.skipped == expected
    summed = {r: sum(s[r] for s in per_batch) for r in SKIP_REASONS}
    assert summed == expected  # the per-batch deltas add up to the totals
    logged = caplog.text
    for reason in c["expected_counts"]:
        assert f"skipped ({reason})" in logged
    assert "latin1" in logged and c["truncated"] in logged


def test_pretrain_stream_survives_corrupt_shards(corrupt_shards, data_config):
    c = corrupt_shards
    cfg = data_config(batch=4, train_shards=[c["bad"], c["truncated"], c["missing"]], samples_per_epoch=24,
                      shuffle_buffer=4)
    from albef_bal.data import build_tokenizer
    loader = build_pretrain_loader(cfg, build_tokenizer(cfg), rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    assert all(set(b["keys"]) <= c["good"] for b in batches)
    assert loader.skipped["bad_image"] >= 2 and loader.skipped["bad_utf8"] >= 1
    # a batch whose json gave an image id carries idx only when all of its samples have one
    assert all("idx" not in b or b["idx"].tolist() == [7] * 4 for b in batches)


def test_tar_reader_detects_truncation_and_garbage(tmp_path, corrupt_shards):
    data = open(corrupt_shards["truncated"], "rb").read()
    with pytest.raises(TruncatedTar):
        list(iter_tar_members(io.BytesIO(data)))
    # cut exactly at a member boundary: tarfile's stream mode would end silently here
    full = tmp_path / "f.tar"
    _tar(full, [("a.txt", b"x" * 10), ("b.txt", b"y" * 10)])
    raw = full.read_bytes()
    boundary = 3 * 512  # header + data block of a.txt, header of b.txt
    with pytest.raises(TruncatedTar):
        list(iter_tar_members(io.BytesIO(raw[:boundary])))
    with pytest.raises(TruncatedTar):
        list(iter_tar_members(io.BytesIO(raw[:2 * 512])))
    got = []
    with pytest.raises(TruncatedTar):
        for s in iter_samples(io.BytesIO(raw[:2 * 512]), "u"):
            got.append(s)
    assert got == []  # the sample in progress is dropped with the truncation
    assert [n for n, _ in iter_tar_members(io.BytesIO(raw))] == ["a.txt", "b.txt"]
    with pytest.raises(CorruptTar):
        list(iter_tar_members(io.BytesIO(b"\x01" * 1024)))


def test_tar_reader_long_names_and_grouping(tmp_path):
    long_dir = "d" * 120
    path = tmp_path / "long.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((f"{long_dir}/k1.jpg", b"1"), (f"{long_dir}/k1.txt", b"t"), ("k2.seg.png", b"2"),
                           ("k2.TXT", b"u"), ("__meta__", b"m")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(iter_samples(open(path, "rb"), "url"))
    assert [s["__key__"] for s in samples] == [f"{long_dir}/k1", "k2"]
    assert samples[0]["jpg"] == b"1" and samples[1]["seg.png"] == b"2" and samples[1]["txt"] == b"u"


def test_open_retries_then_reports(tmp_path, caplog, corrupt_shards):
    counter = SkipCounter()
    caplog.set_level(logging.INFO, logger="albef_bal.data")
    assert list(read_shard(str(tmp_path / "nope.tar"), counter, retries=2, delay=0.0)) == []
    assert counter.total["shard_open_failed"] == 1
    assert caplog.text.count("opening shard") == 3  # first try + 2 retries
    # pipe: URLs stream from a command; a failing command counts as an open failure
    counter = SkipCounter()
    keys = [s["__key__"] for s in read_shard(f"pipe:cat {corrupt_shards['bad']}", counter, retries=0)]
    assert "good_jpg" in keys and counter.total["shard_open_failed"] == 0
    list(read_shard(f"pipe:cat {tmp_path / 'nope.tar'} 2>/dev/null", counter, retries=1, delay=0.0))
    assert counter.total["shard_open_failed"] == 1
    with pytest.raises(OSError, match="after 1 attempts"):
        open_shard(str(tmp_path / "nope.tar"), retries=0)


def test_expand_urls_patterns(tmp_path, corrupt_shards):
    assert expand_urls("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_urls(["a.tar", "b/{1..2}.tar"]) == ["a.tar", "b/1.tar", "b/2.tar"]
    assert expand_urls(os.path.dirname(corrupt_shards["bad"])) == sorted([corrupt_shards["bad"],
                                                                          corrupt_shards["truncated"]])
    assert expand_urls("pipe:aws s3 cp s3://b/{0..1}.tar -") == ["pipe:aws s3 cp s3://b/0.tar -",
                                                                 "pipe:aws s3 cp s3://b/1.tar -"]
    from albef_bal.data.shards import ShardSpecError
    with pytest.raises(ShardSpecError, match="data.train_shards"):
        expand_urls("")
