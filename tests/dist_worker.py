"""Scenarios run under torchrun / the deepspeed launcher / a single process by the engine
tests. Each writes a JSON result (rank 0, or one file per rank) for the test to check.

    python tests/dist_worker.py SCENARIO OUT_DIR [key=value ...]
"""
from __future__ import annotations

import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny import RandomPairs, tiny_config  # noqa: E402

from albef_bal import distributed as D  # noqa: E402
from albef_bal.engine.hooks import TrainHooks  # noqa: E402
from albef_bal.engine.trainer import NonFiniteLossError, Trainer  # noqa: E402
from albef_bal.models import ALBEF  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_cfg(out, *extra):
    return tiny_config(f"train.output_dir={out}", f"train.deepspeed_config={ROOT}/configs/deepspeed/zero1.json",
                       "train.micro_batch_size=4", "train.lr=1e-3", "train.warmup_steps=2", "train.log_every=1",
                       "train.tensorboard=false", "model.queue_size=32", "model.text.dropout=0.0", *extra)


def trainer(cfg, data=None, hooks=None):
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    return Trainer(cfg, ALBEF(cfg.model), data or RandomPairs(cfg, 8), hooks).setup()


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line]


def flat_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def max_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def write(out, name, obj):
    if D.is_main_process():
        with open(os.path.join(out, name), "w") as f:
            json.dump(obj, f)


# ---------------------------------------------------------------- scenarios
def stages(out, args):
    """A repeated batch, ZeRO 0/1/2 with grad accumulation 2: the loss must go down."""
    result = {}
    for stage in (0, 1, 2):
        d = os.path.join(out, f"zero{stage}")
        cfg = make_cfg(d, f"train.zero_stage={stage}", "train.grad_accum=2", "train.max_steps=8",
                       "train.save_every=0", "train.alpha_warmup=false")
        res = trainer(cfg, RandomPairs(cfg, 16, repeat=True)).run()
        if D.is_main_process():
            result[stage] = {"losses": losses(d), "outcome": res["outcome"], "step": res["step"]}
    write(out, "result.json", result)


def queue(out, args):
    """Each rank enqueues its own momentum features; every rank's queue holds all of them."""
    from albef_bal.engine.dist_env import init_distributed
    init_distributed()
    cfg = make_cfg(out)
    torch.manual_seed(0)
    model = ALBEF(cfg.model)
    batch = RandomPairs(cfg).batch(0, 0)
    before = model.image_queue.clone()
    with torch.no_grad():
        model(batch["image"], batch["input_ids"], batch["attention_mask"])
        mine = torch.nn.functional.normalize(model.vision_proj_m(model.visual_encoder_m(batch["image"])[:, 0]), dim=-1)
    # with two ranks the write waits for the next use of the queues (or an explicit flush)
    deferred = torch.equal(model.image_queue, before) and int(model.queue_ptr) == 0
    in_state_dict = model.state_dict()["image_queue"].clone()  # state_dict completes it
    everyone = D.concat_all_gather(mine)
    B, n = len(mine), len(everyone)
    rank = D.get_rank()
    res = {"deferred": deferred, "state_dict_complete": torch.equal(in_state_dict, model.image_queue),
           "queue_matches_all_ranks": torch.allclose(model.image_queue[:, :n].T, everyone, atol=1e-6),
           "my_slot": torch.allclose(model.image_queue[:, rank * B:(rank + 1) * B].T, mine, atol=1e-6),
           "ptr": int(model.queue_ptr), "world": D.get_world_size()}
    with open(os.path.join(out, f"queue_rank{rank}.json"), "w") as f:
        json.dump(res, f)


def queue_write_timing(out, args):
    """Two ranks: training with the queue write completed after the backward (the default)
    equals training with it completed inside the forward, to the bit."""
    states, queues_moved = {}, {}
    for mode in ("deferred", "immediate"):
        cfg = make_cfg(os.path.join(out, mode), "train.max_steps=6", "train.save_every=0", "model.queue_size=16")
        t = trainer(cfg)
        start = t.module.image_queue.clone()
        if mode == "immediate":
            model, enqueue = t.module, t.module.dequeue_and_enqueue

            def enqueue_now(*a, **k):
                enqueue(*a, **k)
                model.flush_queues()
            model.dequeue_and_enqueue = enqueue_now
        t.run()
        states[mode] = flat_state(t.module)
        queues_moved[mode] = not torch.equal(states[mode]["image_queue"], start)
    write(out, "result.json", {"max_diff": max_diff(states["deferred"], states["immediate"]),
                               "queues_moved": queues_moved})


class SignalAt(TrainHooks):
    """Simulate a cluster pre-emption: rank 0 gets SIGUSR1 after optimizer step ``at``."""

    def __init__(self, at):
        self.at = at

    def after_step(self, ctx):
        if ctx.step + 1 == self.at and D.is_main_process():
            os.kill(os.getpid(), signal.SIGUSR1)


def resume(out, args):
    """2N uninterrupted steps == N steps, pre-emption, resume, the rest (fp32, fixed seeds)."""
    stage = int(args.get("stage", 2))
    common = (f"train.zero_stage={stage}", "train.grad_accum=2", "train.max_steps=8", "train.save_every=0")
    a = trainer(make_cfg(os.path.join(out, "a"), *common))
    a.run()
    full = flat_state(a.module)
    b = trainer(make_cfg(os.path.join(out, "b"), *common), hooks=SignalAt(3))
    first = b.run()
    c = trainer(make_cfg(os.path.join(out, "b"), *common, "train.resume=auto"))
    resumed_from = c.state.step
    second = c.run()
    write(out, "result.json", {"max_diff": max_diff(full, flat_state(c.module)), "first": first["outcome"],
                               "first_step": first["step"], "resumed_from": resumed_from,
                               "final_step": second["step"], "world": D.get_world_size(),
                               "b_losses": losses(os.path.join(out, "b"))})


def interrupted_save(out, args):
    """A save that dies before its commit leaves the previous checkpoint as the latest."""
    from albef_bal.engine.checkpoint import CheckpointManager
    cfg = make_cfg(out, "train.max_steps=6", "train.save_every=3", "train.zero_stage=2")
    t = trainer(cfg)
    saved = {}
    real_save = t.save

    def save_and_remember():
        saved[t.state.step] = flat_state(t.module)
        return real_save()
    t.save = save_and_remember
    original = CheckpointManager._commit

    def crash(self, tmp, final, *rest):
        if final.endswith("step_00000006"):
            raise KeyboardInterrupt("killed during the save")
        return original(self, tmp, final, *rest)
    CheckpointManager._commit = crash
    try:
        t.run()
        crashed = False
    except KeyboardInterrupt:
        crashed = True
    CheckpointManager._commit = original
    latest = t.ckpt.latest()
    leftovers = sorted(os.listdir(t.ckpt.root))
    again = trainer(make_cfg(out, "train.max_steps=6", "train.save_every=3", "train.zero_stage=2",
                             "train.resume=auto"))
    write(out, "result.json", {"crashed": crashed, "latest": os.path.basename(latest or ""),
                               "leftovers": leftovers, "after_restart": sorted(os.listdir(t.ckpt.root)),
                               "resumed_step": again.state.step,
                               "max_diff": max_diff(saved[3], flat_state(again.module))})


class NaNAt(TrainHooks):
    """Return a NaN loss at the given optimizer steps (on one rank and micro step only, when
    given); record whether the skipped window's gradient reached the step as zeros and whether
    the parameters moved."""

    def __init__(self, steps, rank=None, micro=None):
        self.steps = set(steps)
        self.rank, self.micro = rank, micro
        self.before = {}
        self.at_step = {}

    def before_forward(self, batch, ctx):
        if ctx.step in self.steps and ctx.micro == 0:  # every rank: the trained weights before the window
            self.before[ctx.step] = {n: p.detach().clone() for n, p in self.trainer.module.named_parameters()
                                     if p.requires_grad}
        return batch

    def loss(self, out, ctx):
        loss = super().loss(out, ctx)
        hit = (ctx.step in self.steps and (self.rank is None or D.get_rank() == self.rank)
               and (self.micro is None or ctx.micro == self.micro))
        return loss * float("nan") if hit else loss

    def before_step(self, ctx):
        from albef_bal.engine.grads import grad_views
        flats = [v.flat for v in grad_views(p for p in self.trainer.module.parameters() if p.requires_grad)
                 if v.flat is not None and v.flat.numel()]
        self.at_step[ctx.step] = {"skipped": self.trainer.window_skipped,
                                  "grad_abs_max": max(float(f.abs().max()) for f in flats)}

    def after_step(self, ctx):
        if ctx.step in self.before:
            now = dict(self.trainer.module.named_parameters())
            self.unchanged = all(torch.equal(now[n], v) for n, v in self.before[ctx.step].items())


def nonfinite(out, args):
    """A NaN loss skips its update; too many in a row stop the run with a checkpoint."""
    cfg = make_cfg(os.path.join(out, "one"), "train.max_steps=5", "train.save_every=0", "train.zero_stage=2")
    hooks = NaNAt([2])
    t = trainer(cfg, hooks=hooks)
    res = t.run()
    cfg2 = make_cfg(os.path.join(out, "many"), "train.max_steps=10", "train.save_every=0", "train.max_nonfinite=3")
    t2 = trainer(cfg2, hooks=NaNAt(range(2, 10)))
    try:
        t2.run()
        stopped = None
    except NonFiniteLossError as e:
        stopped = str(e)
    with open(os.path.join(t2.ckpt.latest(), "trainer_state.json")) as f:
        stop_state = json.load(f)
    with open(os.path.join(cfg2.train.output_dir, "metrics.jsonl")) as f:
        last_row = [json.loads(line) for line in f][-1]
    write(out, "result.json", {"unchanged": hooks.unchanged, "skipped": res["nonfinite_total"],
                               "final_step": res["step"], "losses_finite": all(x == x for x in losses(cfg.train.output_dir)),
                               "stopped": stopped, "stop_ckpt": os.path.basename(t2.ckpt.latest() or ""),
                               "stop_state": stop_state, "last_row": last_row})


def nonfinite_one_rank(out, args):
    """Two ranks, ZeRO 2, two micro steps per window: a NaN loss on rank 1's first micro step
    alone skips the window on both ranks, with the whole window's gradient zeroed."""
    cfg = make_cfg(out, "train.max_steps=4", "train.save_every=0", "train.zero_stage=2", "train.grad_accum=2")
    hooks = NaNAt([2], rank=1, micro=0)
    t = trainer(cfg, hooks=hooks)
    res = t.run()
    params = torch.cat([p.detach().reshape(-1) for p in t.module.parameters()])
    gathered = [torch.empty_like(params) for _ in range(D.get_world_size())]
    torch.distributed.all_gather(gathered, params)
    with open(os.path.join(out, f"rank{D.get_rank()}.json"), "w") as f:
        json.dump({"unchanged": hooks.unchanged, "skipped": res["nonfinite_total"], "final_step": res["step"],
                   "at_step": {str(k): v for k, v in hooks.at_step.items()},
                   "ranks_equal": all(torch.equal(g, gathered[0]) for g in gathered),
                   "losses": losses(cfg.train.output_dir) if D.is_main_process() else None}, f)


if __name__ == "__main__":
    from workers import worker_main
    worker_main(globals())
