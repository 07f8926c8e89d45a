"""Training checkpoints: DeepSpeed checkpoint directories, written atomically.

Layout under ``<output_dir>/checkpoints``::

    step_00001000/          a complete checkpoint (DeepSpeed files, per-rank RNG states,
                            trainer_state.json)
    .tmp-step_00002000/     a save in progress (or one that was interrupted: ignored)

A save writes into ``.tmp-step_N`` and is renamed to ``step_N`` only after every rank has
finished, so an interrupted save never replaces the last good checkpoint. ``latest()``
returns the newest complete one (what ``--resume auto`` loads). Only the last ``keep_last``
complete checkpoints are kept. Everything needed for an exact resume is in it: model
(momentum encoders, queues and pointer included), optimizer, scheduler, trainer counters
and data position, and each rank's RNG states.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch

from .. import distributed as D

_COMPLETE = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


class CheckpointManager:
    def __init__(self, output_dir: str, keep_last: int = 3):
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep_last = keep_last

    # ------------------------------------------------------------- discovery
    def complete(self) -> list[tuple[int, str]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not os.path.isdir(self.root):
            return []
        found = []
        for name in os.listdir(self.root):
            m = _COMPLETE.match(name)
            path = os.path.join(self.root, name)
            if m and os.path.isfile(os.path.join(path, STATE_FILE)):
                found.append((int(m.group(1)), path))
        return sorted(found)

    def latest(self) -> Optional[str]:
        done = self.complete()
        return done[-1][1] if done else None

    def resolve(self, spec: Optional[str]) -> Optional[str]:
        """``None`` -> no resume; ``"auto"`` -> newest complete checkpoint (or None);
        a path -> that checkpoint directory (which must be complete)."""
        if spec is None:
            return None
        if spec == "auto":
            return self.latest()
        path = spec.rstrip("/")
        if not os.path.isfile(os.path.join(path, STATE_FILE)):
            raise FileNotFoundError(f"train.resume: {spec} is not a complete checkpoint directory "
                                    f"(no {STATE_FILE}); complete ones are named step_N under {self.root}")
        return path

    # ------------------------------------------------------------------ save
    def save(self, engine, step: int, trainer_state: dict) -> str:
        """Collective: every rank calls it. Returns the final checkpoint path."""
        name = f"step_{step:08d}"
        tmp_name = f".tmp-{name}"
        tmp = os.path.join(self.root, tmp_name)
        if D.is_main_process():
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        D.barrier()
        engine.save_checkpoint(self.root, tag=tmp_name, client_state={"trainer": trainer_state},
                               save_latest=False)
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{D.get_rank()}.pt"))
        D.barrier()
        final = os.path.join(self.root, name)
        if D.is_main_process():
            self._commit(tmp, final, trainer_state)
            self._prune()
        D.barrier()
        return final

    def _commit(self, tmp: str, final: str, trainer_state: dict) -> None:
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(trainer_state, f, indent=1)
        if os.path.exists(final):  # the same step saved again (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)

    def _prune(self) -> None:
        done = self.complete()
        for _, path in done[:-self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
        for name in os.listdir(self.root):  # leftovers of interrupted saves
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, engine, path: str) -> dict:
        """Collective: restore engine state and this rank's RNG; return the trainer state."""
        root, tag = os.path.split(path.rstrip("/"))
        load_path, client = engine.load_checkpoint(root, tag=tag, load_module_strict=True,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
        rng_file = os.path.join(path, f"rng_rank{D.get_rank()}.pt")
        if os.path.isfile(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=True))
        return client["trainer"]
