"""``balance.method`` -> the training hooks of that method."""
from __future__ import annotations

from ..config import Config, ConfigError
from ..engine.hooks import TrainHooks


def build_balancer(cfg: Config) -> TrainHooks:
    method = cfg.balance.method
    if method == "none":
        return TrainHooks()
    raise ConfigError(f"balance.method={method!r} has no training hooks in this build")
