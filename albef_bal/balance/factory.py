"""``balance.method`` -> the training hooks of that method (the one registry of the package:
the config chooses among alternatives here).

With ``holdout: train_shard`` (G-Blend, Re-learning) building the hooks also takes the
held-out shard out of ``data.train_shards`` (see :func:`common.hold_out_training_shard`), so
build them before the training data."""
from __future__ import annotations

from ..config import Config, ConfigError
from ..engine.hooks import TrainHooks
from .common import hold_out_training_shard


def build_balancer(cfg: Config) -> TrainHooks:
    """The :class:`~albef_bal.engine.hooks.TrainHooks` of ``cfg.balance.method``. Settings
    are checked here where possible; checks that need the engine happen in ``setup``."""
    method = cfg.balance.method
    if method == "none":
        return TrainHooks()
    if method == "ogm_ge":
        from .ogm import OGMGEHooks
        return OGMGEHooks()
    if method == "gblend":
        g = cfg.balance.gblend
        if g.mode == "offline" and g.weights is None and g.weights_file is None:
            raise ConfigError("balance.gblend.mode=offline needs balance.gblend.weights or "
                              "balance.gblend.weights_file (estimate one with `albef-bal gblend-estimate`)")
        from .gblend import GBlendHooks
        if g.mode == "online":
            hold_out_training_shard(cfg, g, "balance.gblend")
        return GBlendHooks()
    if method == "mmpareto":
        from .mmpareto import MMParetoHooks
        return MMParetoHooks()
    if method == "relearn":
        from .relearn import RelearnHooks
        hold_out_training_shard(cfg, cfg.balance.relearn, "balance.relearn")
        return RelearnHooks()
    if method == "weaken":
        from .weaken import WeakenHooks
        return WeakenHooks()
    raise ConfigError(f"balance.method={method!r}: expected one of none, ogm_ge, gblend, mmpareto, relearn, weaken")
