"""``albef-bal finetune``: retrieval fine-tuning (COCO / Flickr30K) on the DeepSpeed engine.

The model is ALBEF's retrieval model (``model.retrieval``): ITC with image-id positives and
an id queue, ITM whose hard negatives skip same-id pairs, momentum distillation, no MLM.
It starts from ``train.init_from`` (an export directory or an official ALBEF ``.pth``):

- the architecture (ViT/BERT sizes, embedding width) always comes from the checkpoint;
- the fine-tuning settings of ``model`` (image_res, queue_size, momentum, alpha, distill,
  loss_weights, unimodal, grad_checkpointing, mlm_probability) come from the config; position
  embeddings are resized when image_res differs (256 -> 384 for the paper's recipe); the
  unimodal heads of a checkpoint pretrained with them are reported unused unless the
  fine-tuning config turns the same losses on;
- ``data.tokenizer`` and ``data.add_sep`` follow the checkpoint (what it was trained
  with) unless the config files or ``--set`` name them.

After every epoch the validation split (``data.val_split``) is evaluated with the
two-stage retrieval of ``albef_bal.eval``; the epoch with the best mean recall (r_mean) is
exported to ``output_dir/best`` (with ``best.json``), and at the end the test split
(``data.test_split``), if set, is evaluated with that best model into ``output_dir/test``.
Balancing methods (``balance.method``) apply exactly as in pretraining.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Iterable

import torch

from .. import distributed as D
from ..config import Config, ConfigError, to_dict
from .pretrain import build_hooks, setup_logging
from .trainer import Trainer

log = logging.getLogger("albef_bal")
# model settings that belong to the fine-tuning recipe, not to the checkpoint's architecture
RECIPE_MODEL_KEYS = ("image_res", "queue_size", "momentum", "alpha", "mlm_probability", "distill", "loss_weights",
                     "unimodal", "grad_checkpointing")
FOLLOW_CHECKPOINT_DATA_KEYS = ("tokenizer", "add_sep")


def load_finetune_model(cfg: Config, explicit: Iterable[str] = ()):
    """``(retrieval ALBEF, resolved config)`` from ``train.init_from`` and the recipe in ``cfg``."""
    from ..checkpoints import load_pretrained
    src = cfg.train.init_from
    if not src:
        raise ConfigError("train.init_from is not set: name the weights to fine-tune (an export directory or an "
                          "official ALBEF .pth), e.g. `albef-bal finetune --checkpoint DIR ...`")
    if not os.path.exists(src):
        raise ConfigError(f"train.init_from={src!r}: no such file or directory")
    overrides = [f"model.{k}={json.dumps(to_dict(getattr(cfg.model, k)))}" for k in RECIPE_MODEL_KEYS]
    model = load_pretrained(src, overrides=overrides, retrieval=True, image_res=cfg.model.image_res)
    log.info("fine-tuning from %s: %s", src, str(model.load_report).replace("\n", "; "))
    resolved = copy.deepcopy(cfg)
    resolved.model = copy.deepcopy(model.config.model)
    explicit = set(explicit)
    for key in FOLLOW_CHECKPOINT_DATA_KEYS:
        if f"data.{key}" not in explicit:
            setattr(resolved.data, key, getattr(model.config.data, key))
    return model, resolved.validate()


class PairData:
    """The trainer's data source over the fine-tuning annotation JSON (``data.train_json``)."""

    def __init__(self, cfg: Config, tokenizer, rank: int, world_size: int):
        from ..data.finetune import load_pairs
        self.cfg, self.tokenizer, self.rank, self.world = cfg, tokenizer, rank, world_size
        if not cfg.data.train_json:
            raise ConfigError("data.train_json is not set: fine-tuning reads an ALBEF-format training annotation "
                              "JSON (e.g. coco_train.json / flickr30k_train.json)")
        pairs, _ = load_pairs(cfg.data.train_json, cfg.data.train_image_root, cfg.data.max_words)
        self.batches_per_epoch = len(pairs) // (world_size * cfg.train.micro_batch_size)

    def loader(self, epoch: int, skip_batches: int):
        from ..data import build_finetune_loader
        return build_finetune_loader(self.cfg, self.tokenizer, self.rank, self.world, epoch, skip_batches)


class ValidateAndKeepBest:
    """Epoch-end hook: validation retrieval, and the best epoch (by r_mean) exported."""

    def __init__(self, cfg: Config, tokenizer, output_dir: str):
        from ..data import load_retrieval_split
        self.cfg, self.tokenizer = cfg, tokenizer
        self.best_dir = os.path.join(output_dir, "best")
        self.val_dir = os.path.join(output_dir, "val")
        self.split = (load_retrieval_split(cfg.data.val_split, cfg.data.val_image_root, cfg.data.max_words)
                      if cfg.data.val_split else None)
        self.best = self._read_best()

    def _read_best(self) -> dict:
        path = os.path.join(self.best_dir, "best.json")
        if os.path.isfile(path):  # a resumed run keeps the best of its earlier epochs
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        return {}

    def evaluate(self, module, device, name: str) -> dict:
        from ..eval.report import evaluate_checkpoint
        report = evaluate_checkpoint(module, self.split, out_dir=os.path.join(self.val_dir, name), config=self.cfg,
                                     tokenizer=self.tokenizer, device=device)
        return report["metrics"]

    def __call__(self, trainer: Trainer, epoch: int) -> dict:
        if self.split is None:
            if D.is_main_process():
                from ..checkpoints import export_model
                export_model(trainer.module, self.cfg, self.best_dir)  # no validation: the latest is kept
            D.barrier()
            return {}
        m = self.evaluate(trainer.module, trainer.device, f"epoch_{epoch:03d}")
        improved = m["r_mean"] > self.best.get("metrics", {}).get("r_mean", -1.0)
        if improved:
            self.best = {"epoch": epoch, "step": trainer.state.step, "metrics": m}
            if D.is_main_process():
                from ..checkpoints import export_model
                export_model(trainer.module, self.cfg, self.best_dir)
                with open(os.path.join(self.best_dir, "best.json"), "w", encoding="utf-8") as f:
                    json.dump(self.best, f, indent=1)
        D.barrier()
        if D.is_main_process():
            log.info("epoch %d validation: TR@1 %.2f IR@1 %.2f r_mean %.2f%s", epoch, m["txt_r1"], m["img_r1"],
                     m["r_mean"], " (best so far, exported)" if improved else
                     f" (best {self.best['metrics']['r_mean']:.2f} at epoch {self.best['epoch']})")
        return {**{f"val/{k}": v for k, v in m.items()}, "val/best_r_mean": self.best["metrics"]["r_mean"]}


def finetune(cfg: Config, explicit: Iterable[str] = ()) -> dict:
    """Fine-tune for retrieval; returns the trainer's result plus ``start`` (validation
    metrics of the starting weights, when ``eval.at_start``), ``best`` and ``test``."""
    from ..engine.dist_env import fill_env_from_launcher
    from .ds_config import build_ds_config
    from .preflight import check_run_paths
    from .pretrain import prepare_text
    setup_logging()
    fill_env_from_launcher()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    check_run_paths(cfg)
    model, cfg = load_finetune_model(cfg, explicit)
    build_ds_config(cfg, world)  # refuse a bad batch/ZeRO set-up before reading data
    tokenizer = prepare_text(cfg)
    data = PairData(cfg, tokenizer, rank, world)
    hooks = build_hooks(cfg)
    keeper = ValidateAndKeepBest(cfg, tokenizer, cfg.train.output_dir)
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, model.train(), data, hooks, desc="finetune", epoch_end=keeper).setup()
    start = None
    if cfg.eval.at_start and keeper.split is not None and trainer.state.step == 0:
        start = keeper.evaluate(trainer.module, trainer.device, "start")
        trainer.metrics.log(0, {f"val_start/{k}": v for k, v in start.items()})
        if rank == 0:
            log.info("starting weights: TR@1 %.2f IR@1 %.2f r_mean %.2f", start["txt_r1"], start["img_r1"],
                     start["r_mean"])
    if rank == 0:
        log.info("fine-tuning on %d rank(s): global batch %d, %d steps (%d per epoch), %d px, output %s", world,
                 trainer.global_batch, trainer.total_steps, trainer.steps_per_epoch, cfg.model.image_res,
                 cfg.train.output_dir)
    result = trainer.run()
    result.update(start=start, best=keeper.best or None, test=None)
    if cfg.data.test_split and os.path.isfile(os.path.join(keeper.best_dir, "config.yaml")):
        from ..checkpoints import load_pretrained
        from ..data import load_retrieval_split
        from ..eval.report import evaluate_checkpoint
        best = load_pretrained(keeper.best_dir).to(trainer.device)
        split = load_retrieval_split(cfg.data.test_split, cfg.data.test_image_root, cfg.data.max_words)
        report = evaluate_checkpoint(best, split, out_dir=os.path.join(cfg.train.output_dir, "test"), config=cfg,
                                     tokenizer=tokenizer, device=trainer.device)
        result["test"] = report["metrics"]
        if rank == 0:
            log.info("test split with the best checkpoint: TR@1 %.2f IR@1 %.2f r_mean %.2f",
                     report["metrics"]["txt_r1"], report["metrics"]["img_r1"], report["metrics"]["r_mean"])
    if rank == 0:
        with open(os.path.join(cfg.train.output_dir, "finetune_summary.json"), "w", encoding="utf-8") as f:
            json.dump({k: result[k] for k in ("outcome", "step", "epoch", "start", "best", "test")}, f, indent=1)
    return result
