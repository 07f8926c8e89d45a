"""data_tools: json_to_wds (sharding, resume), check_shards (exit status, reasons),
shard_stats (distributions)."""
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from albef_bal.data.shards import read_shard
from albef_bal.data.skips import SkipCounter


@pytest.fixture
def annotations(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    entries = []
    for i in range(9):
        Image.new("RGB", (20 + i, 16), (10 * i, 50, 90)).save(root / "sub" / f"{i}.jpg", quality=90)
        for c in range(2):  # train layout: one entry per caption
            entries.append({"image": f"sub/{i}.jpg", "caption": f"Image {i}, caption {c}.", "image_id": i})
    entries.append({"image": "sub/missing.jpg", "caption": "gone", "image_id": 99})
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(entries))
    return str(path), str(root)


def _samples(out):
    urls = sorted(os.path.join(out, n) for n in os.listdir(out) if n.endswith(".tar"))
    return [s for u in urls for s in read_shard(u, SkipCounter())], urls


def test_json_to_wds_by_count_group_and_resume(annotations, tmp_path, data_tool, capsys):
    ann, root = annotations
    tool = data_tool("json_to_wds")
    out = str(tmp_path / "shards")
    assert tool.main([ann, root, out, "--shard-size", "4", "--workers", "2"]) == 1  # one image is missing
    assert "sub/missing.jpg" in capsys.readouterr().err
    samples, urls = _samples(out)
    assert len(urls) == 5 and len(samples) == 18  # 19 entries, 4 per shard; the missing one left out
    first = samples[0]
    assert first["txt"] == b"Image 0, caption 0." and json.loads(first["json"])["image_id"] == 0
    assert first["jpg"] == open(os.path.join(root, "sub", "0.jpg"), "rb").read()  # bytes unchanged
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["samples"] == 18 and manifest["missing_images"] == 1 and manifest["shards"] == 5

    # resume: a lost shard is rewritten identically, the others are kept
    before = {u: open(u, "rb").read() for u in urls}
    os.remove(urls[2])
    mtime = os.path.getmtime(urls[0])
    assert tool.main([ann, root, out, "--shard-size", "4", "--workers", "1"]) == 1
    assert "resuming: 4 of 5" in capsys.readouterr().out
    assert {u: open(u, "rb").read() for u in urls} == before
    assert os.path.getmtime(urls[0]) == mtime
    # a different plan into the same folder is refused unless --overwrite
    assert tool.main([ann, root, out, "--shard-size", "3"]) == 2
    grouped = str(tmp_path / "grouped")
    assert tool.main([ann, root, grouped, "--group-by-image", "--shard-mb", "0.002", "--workers", "1"]) == 1
    samples, urls = _samples(grouped)
    assert len(samples) == 9 and len(urls) > 1  # size-based sharding: ~2 KB per shard
    assert json.loads(samples[3]["json"])["captions"] == ["Image 3, caption 0.", "Image 3, caption 1."]


def test_check_shards_reports_bad_samples(tmp_path, data_corpus, data_tool, capsys):
    tool = data_tool("check_shards")
    assert tool.main([data_corpus["urls"][0], "--workers", "1"]) == 0
    assert "32 samples, 32 good" in capsys.readouterr().out

    bad = tmp_path / "bad.tar"
    good_jpg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(good_jpg, "JPEG")
    with tarfile.open(bad, "w") as tar:
        for name, data in (("a.jpg", good_jpg.getvalue()), ("a.txt", b"ok"), ("b.jpg", b"junk"), ("b.txt", b"x"),
                           ("c.jpg", good_jpg.getvalue()), ("c.txt", b"\xff\xfe")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert tool.main([str(bad), data_corpus["urls"][0], str(tmp_path / "missing.tar"), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert f"{bad}: 3 samples, 1 good, bad: bad_image=1, bad_utf8=1" in out
    assert f"{bad} b: bad_image" in out and f"{bad} c: bad_utf8" in out
    assert "shard_open_failed" in out
    assert "total: 3 shards, 35 samples, 33 good" in out

    assert tool.main([str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["good"] == 1 and report["skipped"]["bad_image"] == 1
    assert {b["key"] for b in report["bad"]} == {"b", "c"}


def test_shard_stats(data_corpus, data_tool, capsys):
    assert data_tool("shard_stats").main([data_corpus["shards"], "--json", "--workers", "2"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["shards"] == 6 and stats["samples"] == stats["samples_total"] == 192
    assert stats["image_width"]["min"] == stats["image_width"]["max"] == 32
    words = stats["caption_words"]
    assert 7 <= words["min"] <= words["p50"] <= words["max"] <= 23  # one to three objects
    assert sum(stats["caption_words_histogram"].values()) == 192
    assert stats["image_formats"] == {"jpg": 192}
    assert data_tool("check_shards").main([data_corpus["urls"][1], "--stats"]) == 0
    assert "caption_words" in capsys.readouterr().out
