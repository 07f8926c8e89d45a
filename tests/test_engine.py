import json
import math
import os

import pytest
import torch

from albef_bal.config import ConfigError
from albef_bal.engine.ds_config import build_ds_config
from albef_bal.engine.optim import lr_at, param_groups
from albef_bal.models import ALBEF
from tiny import tiny_config
import workers

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "dist_worker.py")
ZERO1 = os.path.join(ROOT, "configs", "deepspeed", "zero1.json")


def cfg_with(*overrides):
    return tiny_config(f"train.deepspeed_config={ZERO1}", "model.queue_size=32", *overrides)


# ------------------------------------------------------------- start-up checks
def test_batch_sizes_are_derived_and_written_into_deepspeed_config():
    ds = build_ds_config(cfg_with("train.micro_batch_size=4", "train.grad_accum=2", "train.global_batch_size=16"), 2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 2, 16)
    assert ds["zero_optimization"]["stage"] == 1 and ds["zero_allow_untested_optimizer"]
    assert "torch_autocast" not in ds


@pytest.mark.parametrize("overrides, world, pattern", [
    (["train.micro_batch_size=4", "train.global_batch_size=24"], 2,
     r"train\.global_batch_size \(24\) != train\.micro_batch_size \(4\) x train\.grad_accum \(1\) x world size \(2\) = 8"),
    (["train.micro_batch_size=3"], 2, r"model\.queue_size \(32\) must be a multiple of the global micro batch"),
    (["train.micro_batch_size=4", "train.zero_stage=3"], 1, r"ZeRO stage 3 is not supported: ALBEF"),
    (["train.micro_batch_size=4", "train.precision=fp16", "train.zero_stage=2"], 1, r"fp16 needs train\.zero_stage=0"),
])
def test_bad_engine_configs_are_refused_before_any_work(overrides, world, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_ds_config(cfg_with(*overrides), world)


def test_deepspeed_json_contradicting_the_yaml_is_named(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    cfg = tiny_config(f"train.deepspeed_config={p}", "model.queue_size=32", "train.micro_batch_size=4")
    with pytest.raises(ConfigError, match=r"ds\.json: 'train_micro_batch_size_per_gpu': 8 contradicts train\.micro_batch_size \(4\)"):
        build_ds_config(cfg, 1)
    p.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match=r"'bf16' is enabled; precision comes from train\.precision"):
        build_ds_config(cfg, 1)
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_ds_config(cfg, 1)
    with pytest.raises(ConfigError, match="file not found"):
        build_ds_config(tiny_config("train.deepspeed_config=/nope.json", "model.queue_size=32"), 1)


def test_bf16_autocasts_with_fp32_weights():
    ds = build_ds_config(cfg_with("train.micro_batch_size=4", "train.precision=bf16", "train.zero_stage=2"), 1)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in ds and "fp16" not in ds


def test_schedule_warms_up_then_follows_the_cosine():
    t = tiny_config("train.lr=1e-4", "train.min_lr=1e-5", "train.warmup_lr=1e-5", "train.warmup_steps=100").train
    assert lr_at(0, 1100, t) == pytest.approx(1e-5)
    assert lr_at(50, 1100, t) == pytest.approx(5.5e-5)
    assert lr_at(100, 1100, t) == pytest.approx(1e-4)
    assert lr_at(600, 1100, t) == pytest.approx(1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(1100, 1100, t) == pytest.approx(1e-5)
    assert lr_at(5000, 1100, t) == pytest.approx(1e-5)


def test_param_groups_skip_decay_on_biases_and_1d_and_split_by_branch():
    model = ALBEF(tiny_config().model)
    groups = {g["name"]: g for g in param_groups(model, 0.02)}
    assert set(groups) == {f"{b}/{k}" for b in ("vision", "text", "shared") for k in ("decay", "no_decay")}
    named = {id(p): n for n, p in model.named_parameters()}
    for name, g in groups.items():
        for p in g["params"]:
            no_decay = p.ndim <= 1 or named[id(p)].endswith(".bias")
            assert no_decay == name.endswith("no_decay"), named[id(p)]
        assert g["weight_decay"] == (0.0 if name.endswith("no_decay") else 0.02)
    assert id(model.temp) in {id(p) for p in groups["shared/no_decay"]["params"]}
    assert sum(len(g["params"]) for g in groups.values()) == sum(p.requires_grad for p in model.parameters())


# -------------------------------------------- DeepSpeed runs (subprocesses)
def run_worker(scenario, out, nproc=2, *args):
    return workers.run_worker(WORKER, scenario, out, nproc, args)


@pytest.mark.slow
def test_two_ranks_train_under_zero_0_1_2_with_accumulation(tmp_path):
    run_worker("stages", tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    for stage in ("0", "1", "2"):
        r = result[stage]
        assert r["outcome"] == "finished" and r["step"] == 8
        assert r["losses"][-1] < r["losses"][0] - 0.5, r["losses"]  # a repeated batch is being learned
    # fp32 ZeRO partitions the optimizer, it does not change the arithmetic
    assert result["0"]["losses"] == pytest.approx(result["2"]["losses"], rel=1e-5)


@pytest.mark.slow
def test_queues_hold_features_of_every_rank(tmp_path):
    run_worker("queue", tmp_path)
    for rank in (0, 1):
        r = json.loads((tmp_path / f"queue_rank{rank}.json").read_text())
        assert r == {"deferred": True, "state_dict_complete": True, "queue_matches_all_ranks": True,
                     "my_slot": True, "ptr": 8, "world": 2}


@pytest.mark.slow
def test_deferred_queue_write_trains_exactly_like_an_immediate_one(tmp_path):
    run_worker("queue_write_timing", tmp_path)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r == {"max_diff": 0.0, "queues_moved": {"deferred": True, "immediate": True}}, r


@pytest.mark.slow
def test_preempted_and_resumed_run_equals_uninterrupted_run(tmp_path):
    run_worker("resume", tmp_path)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["first"] == "preempted" and r["resumed_from"] == r["first_step"] < 8 and r["final_step"] == 8
    assert r["max_diff"] < 1e-6  # every weight, momentum copy and queue entry


@pytest.mark.slow
def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path):
    run_worker("interrupted_save", tmp_path, 1)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["crashed"] and r["latest"] == "step_00000003"
    assert ".tmp-step_00000006" in r["leftovers"]  # the half-written save is ignored...
    assert not any(n.startswith(".tmp-") for n in r["after_restart"])  # ...and removed by the next start
    assert r["resumed_step"] == 3 and r["max_diff"] == 0.0


@pytest.mark.slow
def test_nonfinite_loss_skips_the_update_and_stops_after_too_many(tmp_path):
    run_worker("nonfinite", tmp_path, 1)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["unchanged"] and r["skipped"] == 1 and r["final_step"] == 5 and r["losses_finite"]
    assert "3 consecutive non-finite losses" in r["stopped"]
    assert r["stop_ckpt"] == "step_00000005"
    # the stop checkpoint counts the last batch, and the last metrics row the last skipped step
    s = r["stop_state"]
    assert (s["step"], s["batch_in_epoch"], s["nonfinite_total"], s["nonfinite_in_row"]) == (5, 5, 3, 3)
    assert (r["last_row"]["step"], r["last_row"]["nonfinite_total"]) == (5, 3)


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_skips_the_window_on_every_rank(tmp_path):
    run_worker("nonfinite_one_rank", tmp_path, 2)
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["unchanged"] and r["skipped"] == 1 and r["final_step"] == 4 and r["ranks_equal"], r
        # the skipped window reaches the step as zeros, its finite micro step included; the
        # windows around it carry a gradient
        assert r["at_step"]["2"] == {"skipped": True, "grad_abs_max": 0.0}, r["at_step"]
        assert not r["at_step"]["1"]["skipped"] and r["at_step"]["1"]["grad_abs_max"] > 0
        assert not r["at_step"]["3"]["skipped"] and r["at_step"]["3"]["grad_abs_max"] > 0
    losses = json.loads((tmp_path / "rank0.json").read_text())["losses"]
    assert len(losses) == 4 and all(x == x for x in losses)  # the finite micro steps are logged


@pytest.mark.slow
def test_deepspeed_builds_its_cpu_op_with_the_environments_own_ninja(tmp_path, monkeypatch):
    """DeepSpeed JIT-builds a CPU communication op with the first ``ninja`` on PATH; two ninja
    versions (the environment's, installed with deepspeed, and a system one) reject each
    other's build records, so a PATH that changed between runs rebuilt it every time. The
    start-up uses the ninja next to the interpreter whatever PATH says, and leaves PATH as it was."""
    import subprocess
    import sys

    other = tmp_path / "other_bin"
    other.mkdir()
    (other / "ninja").write_text("#!/bin/sh\necho 'the ninja of another installation ran' >&2\nexit 1\n")
    (other / "ninja").chmod(0o755)
    path = str(other) + os.pathsep + os.environ.get("PATH", "")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    start = ("import os; from albef_bal.engine.dist_env import init_distributed; init_distributed(); "
             "print(os.environ['PATH'])")
    res = subprocess.run([sys.executable, "-c", start], cwd=tmp_path, env=dict(env, PATH=path), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "another installation" not in res.stderr
    assert res.stdout.strip().splitlines()[-1] == path
    # an interpreter without ninja beside it (an installed wheel whose environment reaches its
    # dependencies through a .pth line) finds pip's ninja through the ninja package's files
    from albef_bal.engine.dist_env import _installed_ninja_dir
    monkeypatch.setattr(sys, "executable", str(tmp_path / "elsewhere" / "python"))
    found = _installed_ninja_dir()
    assert found and os.access(os.path.join(found, "ninja"), os.X_OK) and found != str(other)
