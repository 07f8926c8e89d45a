"""Checks of a run's paths that take milliseconds, made before anything slow (imports of the
training stack, the model, the engine, the data stream), so that a typo fails at once with an
``albef-bal <command>: error:`` line naming the key and its value. Light imports only."""
from __future__ import annotations

import os

from ..config import Config, ConfigError


def check_run_paths(cfg: Config) -> None:
    """``train.output_dir`` usable, and ``train.resume`` (when a path) a directory."""
    from .rundir import check_output_dir
    check_output_dir(cfg.train.output_dir, "train.output_dir")
    resume = cfg.train.resume
    if resume not in (None, "auto") and not os.path.isdir(resume):
        raise ConfigError(f"train.resume: {resume} is not a directory; give 'auto' or a checkpoint directory "
                          f"(checkpoints/step_N under a run's output directory)")


def preflight_pretrain(cfg: Config) -> None:
    """:func:`check_run_paths`, and ``data.train_shards`` naming shards that exist (local ones)."""
    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards is empty: point it at WebDataset shards "
                          "(data_tools/make_synthetic.py or data_tools/json_to_wds.py make them)")
    from ..data.shards import ShardSpecError, check_local_shards
    try:
        check_local_shards(cfg.data.train_shards, "data.train_shards")
    except ShardSpecError as e:
        raise ConfigError(str(e)) from None
    check_run_paths(cfg)
