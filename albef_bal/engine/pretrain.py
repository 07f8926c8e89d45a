"""``albef-bal pretrain``: ALBEF pretraining on WebDataset shards with DeepSpeed."""
from __future__ import annotations

import logging
import os
import warnings

import torch

from ..config import Config
from .ds_config import build_ds_config
from .preflight import preflight_pretrain
from .trainer import Trainer

log = logging.getLogger("albef_bal")


def setup_logging() -> None:
    """INFO on rank 0, warnings only on the other ranks, each line tagged with its rank."""
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # raised by DeepSpeed's own collectives on every rank; nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


class ShardData:
    """The trainer's data source over the pretraining shard stream of one rank."""

    def __init__(self, cfg: Config, tokenizer, rank: int, world_size: int):
        from ..data import pretrain_batches_per_epoch
        self.cfg, self.tokenizer, self.rank, self.world = cfg, tokenizer, rank, world_size
        self.batches_per_epoch = pretrain_batches_per_epoch(cfg, world_size)

    def loader(self, epoch: int, skip_batches: int):
        from ..data import build_pretrain_loader
        return build_pretrain_loader(self.cfg, self.tokenizer, self.rank, self.world, epoch, skip_batches)


def prepare_text(cfg: Config):
    """The tokenizer named by ``data.tokenizer``, with its special ids written into the model
    config (and its vocabulary checked against ``model.text.vocab_size``)."""
    from ..data import build_tokenizer, sync_text_config
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    sync_text_config(cfg, tokenizer)
    return tokenizer


def build_hooks(cfg: Config):
    """The balancing method named by ``balance.method`` (its training hooks)."""
    from ..balance import build_balancer
    return build_balancer(cfg)


def pretrain(cfg: Config) -> dict:
    from ..models.albef import build_model
    from .dist_env import fill_env_from_launcher
    setup_logging()
    fill_env_from_launcher()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    preflight_pretrain(cfg)
    build_ds_config(cfg, world)  # refuse a bad batch/ZeRO set-up before building anything
    tokenizer = prepare_text(cfg)
    hooks = build_hooks(cfg)  # first: a method may hold a shard out of the training data
    data = ShardData(cfg, tokenizer, rank, world)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg.model)
    trainer = Trainer(cfg, model, data, hooks, desc="pretrain").setup()
    if rank == 0:
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("pretraining %.1fM trainable parameters on %d rank(s): global batch %d, %d steps "
                 "(%d per epoch), output %s", n / 1e6, world, trainer.global_batch, trainer.total_steps,
                 trainer.steps_per_epoch, cfg.train.output_dir)
    return trainer.run()
