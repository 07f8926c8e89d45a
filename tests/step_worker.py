"""Scenarios of the training-step tests that need DeepSpeed ranks (tests/test_step_syncs.py).

    python tests/step_worker.py SCENARIO OUT_DIR
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny import RandomPairs, tiny_config  # noqa: E402

from albef_bal import distributed as D  # noqa: E402
from albef_bal.engine.trainer import Trainer  # noqa: E402
from albef_bal.models import ALBEF  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def temperature(out, args):
    """ZeRO 2 keeps the temperature's fp32 master copy in one rank's partition: the clamp
    must reach it there (and touch nothing elsewhere), or the next step undoes it."""
    cfg = tiny_config(f"train.output_dir={out}", f"train.deepspeed_config={ROOT}/configs/deepspeed/zero2.json",
                      "train.micro_batch_size=4", "train.tensorboard=false", "model.queue_size=32",
                      "train.max_steps=1", "train.save_every=0")
    torch.manual_seed(0)
    tr = Trainer(cfg, ALBEF(cfg.model), RandomPairs(cfg, 8)).setup()
    temp = tr.module.temp
    mapping = getattr(temp, "_hp_mapping", None)
    with torch.no_grad():
        temp.fill_(0.9)
        if mapping is not None:
            mapping.get_hp_fragment().fill_(0.9)
    tr._clamp_temperature()
    from deepspeed.utils import safe_get_full_fp32_param
    master = float(safe_get_full_fp32_param(temp))  # collective: every rank's fragment
    param = float(temp)
    tr.run()
    with open(os.path.join(out, f"temperature_rank{D.get_rank()}.json"), "w") as f:
        json.dump({"param": param, "master": master, "holds_fragment": mapping is not None,
                   "after_step": float(tr.module.temp)}, f)


if __name__ == "__main__":
    from workers import worker_main
    worker_main(globals())
