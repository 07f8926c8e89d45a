"""The resampled pretraining stream: batch layout, deterministic order, exact resume."""
import pytest
import torch

from albef_bal.config import ConfigError
from albef_bal.data import build_pretrain_loader, build_tokenizer
from albef_bal.data.skips import SKIP_REASONS
from albef_bal.data.webdataset import worker_schedule


def _run(cfg, rank=0, world_size=1, epoch=0, skip_batches=0):
    loader = build_pretrain_loader(cfg, build_tokenizer(cfg), rank, world_size, epoch, skip_batches)
    return loader, list(loader)


def _same(a, b) -> bool:
    return (a["keys"] == b["keys"] and torch.equal(a["image"], b["image"])
            and torch.equal(a["input_ids"], b["input_ids"]))


def test_batch_layout(data_config, data_corpus):
    cfg = data_config(batch=8, samples_per_epoch=40)
    loader, batches = _run(cfg)
    assert len(loader) == len(batches) == 5  # 40 samples // (8 x 1 rank)
    b = batches[0]
    assert b["image"].shape == (8, 3, 32, 32) and b["image"].dtype == torch.float32
    # CLIP-normalised: the grey backgrounds land near zero, nothing like raw [0, 1] pixels
    assert b["image"].min() < -1.0 and b["image"].max() > 1.0 and abs(float(b["image"].mean())) < 1.0
    L = b["input_ids"].shape[1]
    assert b["input_ids"].dtype == torch.long and b["attention_mask"].shape == (8, L) and L <= cfg.data.max_len
    assert (b["input_ids"][:, 0] == cfg.model.text.cls_token_id).all()
    lengths = b["attention_mask"].sum(1)
    assert lengths.max() == L  # padded to the longest caption of the batch
    rows = torch.arange(8)
    assert (b["input_ids"][rows, lengths - 1] == cfg.model.text.sep_token_id).all()
    assert b["idx"].dtype == torch.long and b["idx"].tolist() == [int(k) for k in b["keys"]]
    assert set(b["skipped"]) == set(SKIP_REASONS) and not any(b["skipped"].values())
    assert all(0 <= int(k) < data_corpus["train"] for k in b["keys"])

    _, no_sep = _run(data_config(batch=8, samples_per_epoch=8, add_sep=False))
    assert not (no_sep[0]["input_ids"] == cfg.model.text.sep_token_id).any()


def test_order_is_a_function_of_seed_epoch_rank(data_config):
    cfg = data_config(seed=5, batch=4, samples_per_epoch=24)
    _, a = _run(cfg)
    _, b = _run(cfg)
    assert all(_same(x, y) for x, y in zip(a, b)) and len(a) == len(b) == 6
    keys = lambda batches: [k for x in batches for k in x["keys"]]  # noqa: E731
    _, other_seed = _run(data_config(seed=6, batch=4, samples_per_epoch=24))
    _, other_epoch = _run(cfg, epoch=1)
    _, other_rank = _run(cfg, rank=1, world_size=2)
    assert keys(a) != keys(other_seed)
    assert keys(a) != keys(other_epoch)
    assert keys(a)[:12] != keys(other_rank)
    # augmentation is seeded too: same keys never get the identical pixels by accident
    assert not torch.equal(a[0]["image"], other_epoch[0]["image"])


def test_workers_are_deterministic_and_distinct(data_config):
    cfg = data_config(seed=1, batch=4, samples_per_epoch=32, num_workers=2)
    _, a = _run(cfg)
    _, b = _run(cfg)
    assert len(a) == 8 and all(_same(x, y) for x, y in zip(a, b))
    # the two workers draw their own shard streams
    w0 = [k for x in a[0::2] for k in x["keys"]]
    w1 = [k for x in a[1::2] for k in x["keys"]]
    assert w0 != w1


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_skips_exactly(data_config, corrupt_free_and_bad_shards, workers):
    """skip_batches=n continues bit-identically, also when bad samples were skipped before n."""
    cfg = data_config(seed=4, batch=4, samples_per_epoch=40, num_workers=workers,
                      train_shards=corrupt_free_and_bad_shards)
    full_loader, full = _run(cfg)
    assert sum(full_loader.skipped.values()) > 0  # the shards do contain bad samples
    for n in (3, 7):
        loader, resumed = _run(cfg, skip_batches=n)
        assert len(loader) == len(resumed) == 10 - n
        assert all(_same(x, y) for x, y in zip(full[n:], resumed))
        # the skips before batch n belong to the batches a checkpoint already counted
        assert [x["skipped"] for x in full[n:]] == [y["skipped"] for y in resumed]
    loader, rest = _run(cfg, skip_batches=10)
    assert len(loader) == 0 and rest == []


@pytest.fixture
def corrupt_free_and_bad_shards(data_corpus, tmp_path):
    """A good corpus shard and one whose every third sample has a broken image."""
    from albef_bal.data.shards import read_shard
    from albef_bal.data.skips import SkipCounter
    from albef_bal.data.tario import ShardWriter
    path = str(tmp_path / "mixed.tar")
    with ShardWriter(path) as w:
        for n, raw in enumerate(read_shard(data_corpus["urls"][2], SkipCounter())):
            members = {k: v for k, v in raw.items() if not k.startswith("__")}
            if n % 3 == 0:
                members["jpg"] = members["jpg"][:40]
            w.write(raw["__key__"], members)
    return [path, data_corpus["urls"][0]]


def test_worker_schedule_rotation():
    # 10 batches over 3 workers: logical worker l owns batches l, l+3, ...
    assert worker_schedule(10, 3, 0) == [(0, 0, 4), (1, 0, 3), (2, 0, 3)]
    # resuming at batch 4: process 0 must produce batch 4, owned by logical worker 1
    sched = worker_schedule(10, 3, 4)
    assert sched == [(1, 1, 2), (2, 1, 2), (0, 2, 2)]
    assert sum(n for _, _, n in sched) == 6
    assert worker_schedule(5, 0, 2) == [(0, 2, 3)]


def test_config_errors(data_config):
    cfg = data_config(samples_per_epoch=0)
    tok = build_tokenizer(cfg)
    with pytest.raises(ConfigError, match="data.samples_per_epoch"):
        build_pretrain_loader(cfg, tok, 0, 1)
    cfg = data_config(samples_per_epoch=8)
    with pytest.raises(ConfigError, match="data.samples_per_epoch.*2 ranks"):
        build_pretrain_loader(cfg, tok, 0, 2)
    cfg = data_config(train_shards="")
    with pytest.raises(ConfigError, match="data.train_shards"):
        build_pretrain_loader(cfg, tok, 0, 1)


def test_data_config_validation(data_config):
    for field, value, message in (("rand_aug_m", 11, "rand_aug_m"), ("crop_scale_min", 0.0, "crop_scale_min"),
                                  ("shuffle_buffer", -1, "shuffle_buffer"), ("max_len", 2, "max_len"),
                                  ("train_image_root", "/x", "train_json")):
        cfg = data_config()
        setattr(cfg.data, field, value)
        with pytest.raises(ConfigError, match=message):
            cfg.validate()
    cfg = data_config()
    cfg.data.samples_per_epoch = 4
    with pytest.raises(ConfigError, match="micro_batch_size"):
        cfg.validate()


def test_pipe_urls_stream_the_same_data(data_config, data_corpus):
    local = data_config(seed=3, batch=4, samples_per_epoch=16)
    piped = data_config(seed=3, batch=4, samples_per_epoch=16,
                        train_shards=f"pipe:cat {data_corpus['dir']}/train/{{00000..00005}}.tar")
    _, a = _run(local)
    _, b = _run(piped)
    assert len(a) == len(b) == 4 and all(_same(x, y) for x, y in zip(a, b))


def test_iter_starts_the_loader_without_drawing_from_the_global_rng(data_config):
    """``iter(loader)`` creates the DataLoader's iterator (workers, base seed) at once, and
    its seed comes from a generator of its own: the training RNG is left as it was."""
    import os

    import psutil
    cfg = data_config(seed=2, batch=4, samples_per_epoch=16, num_workers=1)
    loader = build_pretrain_loader(cfg, build_tokenizer(cfg), 0, 1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    children = len(psutil.Process(os.getpid()).children())
    batches = iter(loader)
    assert len(psutil.Process(os.getpid()).children()) == children + 1  # the worker started here
    assert torch.equal(torch.get_rng_state(), before)
    assert len(list(batches)) == 4
    assert torch.equal(torch.get_rng_state(), before)


def test_data_workers_outlive_stop_signals(data_config):
    """SIGTERM and SIGUSR1 sent to a data worker (as schedulers send them to every process)
    do not kill it: the batches keep coming and the rank decides when to stop."""
    import os
    import signal

    import psutil
    cfg = data_config(seed=2, batch=4, samples_per_epoch=32, num_workers=1)
    batches = iter(build_pretrain_loader(cfg, build_tokenizer(cfg), 0, 1))
    first = next(batches)
    workers = psutil.Process(os.getpid()).children()
    assert workers
    for w in workers:
        w.send_signal(signal.SIGTERM)
        w.send_signal(signal.SIGUSR1)
    rest = list(batches)
    assert len(rest) == 7 and first["image"].shape[0] == 4


def test_a_process_that_ends_with_live_workers_exits(data_config, tmp_path):
    """Workers ignore SIGTERM, so multiprocessing's exit hook cannot terminate them: a
    process that ends (say, with an error) while a loader's workers are alive must still
    exit, its workers stopped in order."""
    import pickle
    import subprocess
    import sys
    cfg = data_config(seed=2, batch=4, samples_per_epoch=32, num_workers=2)
    (tmp_path / "cfg.pkl").write_bytes(pickle.dumps(cfg))
    code = ("import pickle; from albef_bal.data import build_pretrain_loader, build_tokenizer; "
            f"cfg = pickle.load(open({str(tmp_path / 'cfg.pkl')!r}, 'rb')); "
            "batches = iter(build_pretrain_loader(cfg, build_tokenizer(cfg), 0, 1)); next(batches); "
            "raise SystemExit(3)")
    res = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True, text=True)
    assert res.returncode == 3, res.stderr[-2000:]
