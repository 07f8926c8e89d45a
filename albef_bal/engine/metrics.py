"""Metrics: JSON lines (one object per log step), TensorBoard events, optional Weights &
Biases, and a progress bar with loss, pairs/s and ETA. Only rank 0 writes."""
from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from typing import Optional

import torch

log = logging.getLogger("albef_bal")


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated (GPU) or peak resident set size (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _compact(v: float) -> float:
    """6 decimals; below 1e-3, 4 significant digits instead (relative update sizes are ~1e-4)."""
    return round(v, 6) if v == 0 or abs(v) >= 1e-3 else float(f"{v:.4g}")


class MetricsLogger:
    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "albef_bal", config: Optional[dict] = None,
                 filename: str = "metrics.jsonl"):
        self.enabled = enabled
        self.path = os.path.join(output_dir, filename)
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except Exception as e:  # tensorboard missing or broken: keep training
                log.warning("TensorBoard logging disabled: %s", e)
        if wandb:
            try:
                import wandb as wb
                self._wandb = wb.init(project=wandb_project, config=config, dir=output_dir, resume="allow")
            except Exception as e:
                log.warning("Weights & Biases logging disabled: %s", e)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: (_compact(v) if isinstance(v, float) else v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k.replace(".", "/"), v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Progress:
    """A tqdm bar on rank 0 (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            tty = sys.stderr.isatty()
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr,
                            mininterval=0.5 if tty else 30.0, unit="step", smoothing=0.1)

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
