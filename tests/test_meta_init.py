"""albef-bal meta-init: balanced tasks, the Reptile / first-order MAML outer update, and
weights that model.init_vision / model.init_text load and a pretraining run starts from."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from albef_bal.config import ConfigError
from albef_bal.meta_init import BalancedTasks, compute_accounting, meta_init
from albef_bal.models.albef import build_model
from tiny import tiny_config

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


def test_tasks_are_balanced_and_batches_cycle_over_them():
    labels = np.array([0] * 10 + [1] * 7 + [2] * 12)
    tasks = BalancedTasks(labels, shots=3, classes_per_task=2, rng=random.Random(0))
    for _ in range(20):
        task = tasks.sample()
        counts = np.bincount(labels[task], minlength=3)
        assert sorted(counts.tolist()) == [0, 3, 3] and len(set(task)) == 6
    batches = tasks.batches(task, 4, 5)
    assert [len(b) for b in batches] == [4] * 5 and set(sum(batches, [])) == set(task)
    with pytest.raises(ConfigError, match=r"meta_init\.shots=8.*\{1: 7\}"):
        BalancedTasks(labels, shots=8, classes_per_task=0, rng=random.Random(0))
    with pytest.raises(ConfigError, match=r"meta_init\.classes_per_task=4 but the pool has only 3"):
        BalancedTasks(labels, shots=2, classes_per_task=4, rng=random.Random(0))


def test_compute_accounting():
    cfg = tiny_config("meta_init.outer_steps=50", "meta_init.tasks_per_step=2", "meta_init.inner_steps=8",
                      "train.micro_batch_size=16")
    c = compute_accounting(cfg, world_size=2)
    assert c["pairs"] == 50 * 2 * 8 * 16 and c["inner_steps_total"] == 800
    assert c["pretrain_global_batch"] == 32 and c["pretrain_step_equivalents"] == 400


def _cfg(corpus, out, *extra):
    return tiny_config(f"data.train_shards={corpus['shards']}", f"data.tokenizer={corpus['vocab']}",
                       "train.micro_batch_size=8", "model.queue_size=32", "meta_init.pool=64", "meta_init.shots=2",
                       "meta_init.inner_steps=2", "meta_init.outer_steps=1", f"meta_init.output_dir={out}", *extra)


def _encoders(out):
    vision = load_file(os.path.join(out, "vision.safetensors"))
    text = load_file(os.path.join(out, "text", "model.safetensors"))
    return vision, text


def test_outer_step_interpolates_toward_the_task_weights(data_corpus, tmp_path):
    """Same seed, same task and inner run: eps = 0.5 lands exactly halfway between the initial
    weights and those of eps = 1; with one inner step first-order MAML equals Reptile."""
    full = meta_init(_cfg(data_corpus, str(tmp_path / "full")))
    half = meta_init(_cfg(data_corpus, str(tmp_path / "half"), "meta_init.meta_step=0.5",
                          "meta_init.meta_step_final=0.5"))
    assert full["compute"]["pairs"] == 16 and len(full["history"]) == 1
    cfg = _cfg(data_corpus, str(tmp_path / "x"))
    from albef_bal.engine.pretrain import prepare_text
    prepare_text(cfg)
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg.model).visual_encoder.state_dict()
    v_full, _ = _encoders(tmp_path / "full")
    v_half, _ = _encoders(tmp_path / "half")
    moved = 0
    for k, v0 in init.items():
        torch.testing.assert_close(v_half[k], (v0 + v_full[k]) / 2, rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(v0, v_full[k]))
    assert moved > len(init) // 2  # the inner run trained the encoder
    rep = meta_init(_cfg(data_corpus, str(tmp_path / "rep1"), "meta_init.inner_steps=1"))
    fo = meta_init(_cfg(data_corpus, str(tmp_path / "fo1"), "meta_init.inner_steps=1",
                        "meta_init.algorithm=fomaml"))
    assert rep["algorithm"] == "reptile" and fo["algorithm"] == "fomaml"
    for a, b in zip(_encoders(tmp_path / "rep1"), _encoders(tmp_path / "fo1")):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_written_weights_are_what_init_vision_and_init_text_load(data_corpus, tmp_path):
    out = str(tmp_path / "mi")
    report = meta_init(_cfg(data_corpus, out, "meta_init.outer_steps=2", "meta_init.balance_by=anchor_colour",
                            "model.unimodal.image=simsiam", "model.unimodal.simsiam.dim=16",
                            "model.unimodal.simsiam.pred_dim=4"))
    assert report["tasks"]["balance_by"] == "anchor_colour" and len(report["tasks"]["classes"]) > 2
    vision, text = _encoders(out)
    cfg = _cfg(data_corpus, str(tmp_path / "unused"), *report["use"])
    from albef_bal.engine.pretrain import prepare_text
    prepare_text(cfg)
    torch.manual_seed(123)  # another seed: what is loaded must not depend on it
    model = build_model(cfg.model)
    for k, v in model.visual_encoder.state_dict().items():
        assert torch.equal(v, vision[k]), k
    for k, v in model.text_encoder.state_dict().items():
        assert torch.equal(v, text[f"bert.{k}"]), k
    for k, v in model.mlm_head.state_dict().items():
        assert torch.equal(v, text[f"cls.predictions.{k}"]), k
    # the momentum copies start there too
    for a, b in zip(model.visual_encoder.parameters(), model.visual_encoder_m.parameters()):
        assert torch.equal(a, b)
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["outer_step"] for r in rows] == [1, 2] and rows[0]["eps"] == 1.0 and rows[1]["eps"] == 0.5


def test_labels_that_are_missing_are_named(data_corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"meta_init\.balance_by='colour_of_sky'"):
        meta_init(_cfg(data_corpus, str(tmp_path / "x"), "meta_init.balance_by=colour_of_sky"))
    with pytest.raises(ConfigError, match=r"meta_init\.inner_batch \(12\) must divide model\.queue_size \(32\)"):
        meta_init(_cfg(data_corpus, str(tmp_path / "x"), "meta_init.inner_batch=12"))


@pytest.mark.slow
def test_cli_meta_init_then_a_pretraining_run_starts_from_it(data_corpus, tmp_path):
    """Through the real CLI and data path: meta-init, then pretraining (DeepSpeed) from its
    weights; after one step at a negligible learning rate the exported encoders are still
    the meta-learned ones (an AdamW step moves each weight by about the learning rate)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    sets = [f"data.train_shards={data_corpus['shards']}", f"data.tokenizer={data_corpus['vocab']}",
            "data.samples_per_epoch=64", "data.num_workers=0", "data.val_split=null", "data.test_split=null",
            "model.image_res=32", "model.vision.depth=1", "model.text.layers=2", "model.text.fusion_layer=1",
            "model.queue_size=32", "train.micro_batch_size=8", "train.threads=1", "train.tensorboard=false"]
    mi = tmp_path / "mi"
    cmd = [sys.executable, "-m", "albef_bal", "meta-init", "-c", "configs/demo/tiny.yaml", "--out", str(mi),
           "--ranks", "2", *[x for s in sets + ["meta_init.outer_steps=2", "meta_init.inner_steps=2",
                                                "meta_init.pool=64", "meta_init.shots=2"] for x in ("--set", s)]]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "= 32 pairs = 2 pretraining steps of 16 pairs" in res.stdout
    uses = json.loads((mi / "meta_init.json").read_text())["use"]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "albef_bal", "pretrain", "-c", "configs/demo/tiny.yaml",
           *[x for s in sets + uses + [f"train.output_dir={run}", "train.max_steps=1", "train.lr=1e-12",
                                       "train.min_lr=1e-12", "train.warmup_lr=1e-12", "train.save_every=0"]
             for x in ("--set", s)]]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"image encoder from {mi}/vision.safetensors" in res.stderr
    exported = load_file(str(run / "export" / "model.safetensors"))
    vision, text = _encoders(mi)
    for k, v in vision.items():
        torch.testing.assert_close(exported[f"visual_encoder.{k}"], v, rtol=0, atol=1e-9)
    for k, v in text.items():
        if k.startswith("bert."):
            torch.testing.assert_close(exported["text_encoder." + k[len("bert."):]], v, rtol=0, atol=1e-9)
