"""Training scenarios of the diagnostics tests, run under torchrun (see tests/workers.py).

    python tests/diag_worker.py SCENARIO OUT_DIR key=value...
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny import RandomPairs, tiny_config  # noqa: E402

from albef_bal.engine.hooks import TrainHooks  # noqa: E402
from albef_bal.engine.trainer import Trainer  # noqa: E402
from albef_bal.models import ALBEF  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FreezeVision(TrainHooks):
    """Learning rate 0 for the vision branch at every step (AdamW then leaves it exactly as it is)."""

    def before_step(self, ctx):
        for g in self.trainer.optimizer.param_groups:
            if g.get("name", "").startswith("vision/"):
                g["lr"] = 0.0


def frozen_vision(out, args):
    """Two ranks, ZeRO 2: vision frozen, diagnostics every 3 steps on the held-out split."""
    from albef_bal.data import build_tokenizer, sync_text_config
    cfg = tiny_config(f"train.output_dir={out}/run", f"train.deepspeed_config={ROOT}/configs/deepspeed/zero2.json",
                      "train.micro_batch_size=4", "train.lr=1e-3", "train.warmup_steps=0", "train.log_every=1",
                      "train.max_steps=6", "train.save_every=0", "train.tensorboard=false", "model.queue_size=32",
                      f"data.tokenizer={args['vocab']}", f"data.val_split={args['val']}", "data.max_len=30",
                      "diagnose.every=3", "diagnose.samples=16", "diagnose.folds=2", "diagnose.bootstrap=50")
    sync_text_config(cfg, build_tokenizer(cfg.data.tokenizer))
    torch.manual_seed(cfg.train.seed)
    Trainer(cfg, ALBEF(cfg.model), RandomPairs(cfg, 8), FreezeVision()).setup().run()


if __name__ == "__main__":
    from workers import worker_main
    worker_main(globals())
