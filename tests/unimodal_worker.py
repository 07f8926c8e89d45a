"""Unimodal-loss scenarios under torchrun / a single process (tests/test_unimodal.py).

    python tests/unimodal_worker.py SCENARIO OUT_DIR [key=value ...]
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from dist_worker import SignalAt, flat_state, make_cfg, max_diff, trainer, write  # noqa: E402


UNIMODAL = ("model.unimodal.image=simsiam", "model.unimodal.text=simcse", "model.unimodal.simsiam.dim=32",
            "model.unimodal.simsiam.pred_dim=8", "model.text.dropout=0.1")


def resume(out, args):
    """Image SimSiam + text SimCSE (random views and dropout) under ZeRO 2 with accumulation:
    8 uninterrupted steps == a run pre-empted after step 3, resumed, finished."""
    common = ("train.zero_stage=2", "train.grad_accum=2", "train.max_steps=8", "train.save_every=0", *UNIMODAL,
              "balance.score=unimodal", "balance.score_every=2")
    a = trainer(make_cfg(os.path.join(out, "a"), *common))
    a.run()
    full = flat_state(a.module)
    b = trainer(make_cfg(os.path.join(out, "b"), *common), hooks=SignalAt(3))
    first = b.run()
    c = trainer(make_cfg(os.path.join(out, "b"), *common, "train.resume=auto"))
    resumed_from = c.state.step
    second = c.run()
    rows = []
    if os.path.isfile(os.path.join(out, "a", "metrics.jsonl")):
        with open(os.path.join(out, "a", "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    rows = [r for r in rows if "loss" in r]
    with open(os.path.join(out, "b", "metrics.jsonl")) as f:
        resumed = {r["step"]: r for r in map(json.loads, f) if "loss" in r}  # the last row of each step
    write(out, "result.json", {
        "max_diff": max_diff(full, flat_state(c.module)), "first": first["outcome"], "first_step": first["step"],
        "resumed_from": resumed_from,
        "final_step": second["step"], "logged": sorted(k for k in rows[0] if k.startswith("loss_uni_")) if rows else [],
        "uni_image": [r["loss_uni_image"] for r in rows], "uni_text": [r["loss_uni_text"] for r in rows],
        "scores": [[r["step"], r["score_v"], r["score_t"]] for r in rows],
        "scores_resumed": [[s, r["score_v"], r["score_t"]] for s, r in sorted(resumed.items())]})


def mmpareto(out, args):
    """MMPareto with image SimSiam + text MLM on, once per ``balance.unimodal_loss`` (itc, ssl):
    the gradients before and after the method's step edit, and its g_uni (one process)."""
    import torch
    from balance_worker import BatchSeededALBEF, GlobalPairs, Snapshot
    from balance_worker import make_cfg as balance_cfg
    from albef_bal.balance import build_balancer
    from albef_bal.engine.trainer import Trainer
    for source in ("itc", "ssl"):
        d = os.path.join(out, source)
        cfg = balance_cfg(d, "mmpareto", "train.zero_stage=2", "train.grad_accum=2", "train.max_steps=2",
                          f"balance.unimodal_loss={source}", "model.unimodal.image=simsiam",
                          "model.unimodal.text=mlm", "model.unimodal.simsiam.dim=32",
                          "model.unimodal.simsiam.pred_dim=8", "model.loss_weights.uni_image=0.5",
                          "model.loss_weights.uni_text=2.0")
        torch.manual_seed(cfg.train.seed)
        hooks = Snapshot(build_balancer(cfg))
        t = Trainer(cfg, BatchSeededALBEF(cfg.model), GlobalPairs(cfg, 4), hooks).setup()
        t.run()
        branches = {b: [n for n, _ in named] for b, named in t.module.branch_parameters().items()}
        torch.save({"records": hooks.records, "branches": branches}, os.path.join(d, "grads.pt"))


if __name__ == "__main__":
    from workers import worker_main
    worker_main(globals())
