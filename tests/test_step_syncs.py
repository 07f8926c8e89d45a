"""The training step without device-to-host reads: the rewritten pieces compute what they
computed before, the step reads back only what its policies need, and bench/gpu_check.py
(the prepared GPU check) runs every code path at tiny sizes on the CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from albef_bal.engine.grads import GradView, UnsupportedDeepSpeedError, local_grad
from albef_bal.losses import sample_hard_negatives
from albef_bal.models import ALBEF
from tiny import tiny_batch, tiny_config
import workers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check  # noqa: E402
import train_step as TS  # noqa: E402


def test_hard_negatives_are_the_draws_of_torch_multinomial():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        sim = torch.randn(12, 12, generator=g) * 4
        exclude = torch.eye(12, dtype=torch.bool)
        exclude[0, 3] = exclude[5, :] = True  # a row with nothing allowed
        exclude[5, 5] = True
        w = F.softmax(sim, dim=1).masked_fill(exclude, 0.0)
        allowed = (~exclude).float()
        w = torch.where((w.sum(1) <= 0)[:, None], allowed, w)
        w = torch.where((allowed.sum(1) > 0)[:, None], w, torch.ones_like(w))
        state = g.get_state()
        expected = torch.multinomial(w, 1, generator=g).squeeze(1)
        after_expected = torch.rand(3, generator=g)
        g.set_state(state)
        got, valid = sample_hard_negatives(sim, exclude, generator=g)
        assert torch.equal(got, expected)
        assert torch.equal(torch.rand(3, generator=g), after_expected)  # the same random numbers used
        assert not valid[5] and valid[0]


def _slice_reference(queue, ptr, feats, ok):
    ref = queue.clone()
    n = feats.shape[0]
    ref[:, ptr:ptr + n] = torch.where(ok[None, :], feats.T, queue[:, ptr:ptr + n])
    return ref


def test_queue_update_on_the_device_equals_slice_assignment():
    model = ALBEF(tiny_config("model.queue_size=16", "model.retrieval=true").model)
    torch.manual_seed(0)
    for step in range(5):
        img, txt = F.normalize(torch.randn(4, 16), dim=1), F.normalize(torch.randn(4, 16), dim=1)
        if step == 2:
            img[1, 3] = float("nan")  # a non-finite feature keeps the old entry of its pair
        ok = torch.isfinite(img).all(1) & torch.isfinite(txt).all(1)
        ptr = int(model.queue_ptr)
        expected = (_slice_reference(model.image_queue, ptr, img, ok), _slice_reference(model.text_queue, ptr, txt, ok))
        idx = torch.arange(4) + 10 * step
        model.dequeue_and_enqueue(img, txt, idx)
        assert torch.equal(model.image_queue, expected[0]) and torch.equal(model.text_queue, expected[1])
        assert model.idx_queue[0, ptr:ptr + 4].tolist() == idx.tolist()
        assert int(model.queue_ptr) == (ptr + 4) % 16


def test_batch_without_negatives_gives_itm_nothing_to_learn():
    model = ALBEF(tiny_config("model.queue_size=8").model)
    images, ids, mask = tiny_batch(tiny_config(), batch=1)
    out = model(images, ids, mask)
    out.loss_itm.backward()
    assert out.loss_itm.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.itm_head.parameters())


def test_model_forward_and_backward_read_nothing_back():
    """The queue pointer, the ITM no-negative case and the hard negatives stay on the device;
    the masked-token positions are found with one nonzero (not a Python-level read)."""
    model = ALBEF(tiny_config().model)
    images, ids, mask = tiny_batch(tiny_config(), batch=4)
    with gpu_check.HostReads() as reads:
        out = model(images, ids, mask, alpha=0.4)
        out.total().backward()
    assert reads.count == 0, reads.sites


def test_a_steady_trainer_step_reads_back_only_its_policy_flags(tmp_path):
    cfg = TS.make_config(TS.argparse.Namespace(zero=None, threads=0, set=[]), "tiny", 4, "fp32", "none", str(tmp_path))
    tr = TS.build_trainer(cfg, TS.make_batch(cfg, 4, cfg.data.max_len), None, torch.device("cpu"))
    tr._window = {}
    batches = iter(tr.data.loader(0, 0))
    tr._micro_step(next(batches))
    with gpu_check.HostReads() as reads:
        tr._micro_step(next(batches))  # log_every is 10^9: not a log step
    # the non-finite / pre-emption flags every rank agrees on at the accumulation boundary
    assert reads.count == 1 and all("engine/trainer.py" in s for s in reads.sites), reads.sites


def test_gradient_view_refuses_a_zero_gradient_deepspeed_did_not_release():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    assert GradView(p).full and local_grad(p)[1]  # ZeRO 0: p.grad is the whole gradient
    p._hp_mapping = None  # what ZeRO 1/2 attach to every parameter they partition
    with pytest.raises(UnsupportedDeepSpeedError, match=r"keeps p\.grad .*deepspeed==0\.19\.8"):
        GradView(p)
    with pytest.raises(UnsupportedDeepSpeedError):
        local_grad(p)
    p.grad = None
    assert GradView(p).flat is None  # released, and no fragment on this rank


@pytest.mark.slow
def test_temperature_and_its_zero2_master_copy_are_clamped_on_two_ranks(tmp_path):
    workers.run_worker(os.path.join(HERE, "step_worker.py"), "temperature", tmp_path, 2, [])
    for rank in (0, 1):
        r = json.loads((tmp_path / f"temperature_rank{rank}.json").read_text())
        assert r["param"] == pytest.approx(0.5) and r["master"] == pytest.approx(0.5), r
        assert r["after_step"] <= 0.5, r


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section_and_writes_both_reports(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["sections"]) == list(gpu_check.SECTIONS)
    assert all(s["status"] == "ok" for s in report["sections"].values()), report["sections"]
    s = {k: v["results"] for k, v in report["sections"].items()}
    assert s["correctness"]["bf16_vs_fp32"]["ok"] and s["correctness"]["bf16_steps_finite"]["steps"] == 5
    assert s["correctness"]["adamw_momentum_device_vs_cpu"]["fused"] == {"cpu": True, "device": True}
    assert s["syncs"]["plain"]["python_host_reads"] == 1 and s["syncs"]["zero2"]["engine"] == "deepspeed ZeRO 2"
    assert [r["config"] for r in s["speed"]["rows"]] == ["plain", "zero1", "zero2", "plain + activation checkpointing"]
    assert all(r["finite"] and r["pairs_per_s"] > 0 for r in s["speed"]["rows"])
    assert [r["method"] for r in s["balance"]["rows"]] == ["none", "ogm_ge", "gblend", "mmpareto", "relearn"]
    assert s["eval"]["pairs"] == s["eval"]["rerank_pairs_done"] > 0 and not s["eval"]["rerank_extrapolated"]
    assert s["data"]["one_worker"]["samples_per_s"] > 0 and s["compile"]["rows"][0]["finite"]
    md = (tmp_path / "gpu_check.md").read_text()
    for title in ("## Correctness", "## Host synchronisations", "## Speed", "## Balance", "## Eval", "## Data"):
        assert title in md
