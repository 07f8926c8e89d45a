"""``albef-bal meta-init``: a meta-learned, balanced initialisation of both encoders.

If re-initialising part of a branch during training helps the lagging modality
(Diagnosing & Re-learning), a starting point learned for balance may help from step 0.
This command learns one with a first-order meta-learning outer loop over short ALBEF runs
on small balanced tasks (``meta_init`` section of the config):

    for each outer step s (eps annealed linearly from meta_step to meta_step_final):
        theta_0 = current weights
        for each of tasks_per_step tasks:
            draw a task: ``shots`` pairs of each of the classes of ``balance_by`` (all of
            them, or ``classes_per_task`` drawn at random) from a pool of the corpus
            momentum encoders := theta_0, queues := their initial contents
            inner_steps ALBEF steps (ITC + ITM + MLM, and the unimodal losses when on, with
            model.loss_weights) on batches of inner_batch pairs of the task, AdamW
        reptile:  theta_0 += eps * mean over tasks of (theta_task - theta_0)
        fomaml:   theta_0 += eps * mean over tasks of (the task's last inner update)

The Reptile authors' settings kept: the inner optimizer is Adam(W) with beta1 = 0 whose
moments persist across tasks and outer steps (only the weights are meta-learned), the
outer step size anneals linearly (their ``--meta-step`` -> ``--meta-step-final``), and
first-order MAML uses the last inner step's update as the task's direction (their FOML).

It writes, into ``meta_init.output_dir``:

- ``vision.safetensors``: the image encoder (timm names), for ``model.init_vision``;
- ``text/``: the text encoder and its MLM head as an HF BERT directory (``config.json`` +
  ``model.safetensors``; the fusion layers' cross-attention included), for
  ``model.init_text``;
- ``meta_init.json``: the settings, the compute spent (pairs and pretraining-step
  equivalents) and the outer-loop history; ``metrics.jsonl``: one row per outer step;
  ``config.yaml``: the resolved config.

A pretraining run started with both ``init_*`` set begins at these weights (momentum
copies too), and Re-learning's "initial weights" are then these. The projections, the ITM
head, the temperature and the unimodal heads are meta-learned along but not written: the
``init_*`` keys load encoders only.

Runs in one process (one GPU, or the CPU); the tasks are tiny and the inner runs short.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import replace
import numpy as np
import torch

from .config import Config, ConfigError, save_config, to_dict

log = logging.getLogger("albef_bal")
VISION_FILE = "vision.safetensors"
TEXT_DIR = "text"
REPORT_FILE = "meta_init.json"


# ----------------------------------------------------------------------- tasks
class BalancedTasks:
    """Class-balanced tasks over a labelled pool: each task holds ``shots`` pairs of each of
    its classes. Draws come from ``rng`` (a ``random.Random``), so a seed fixes them all."""

    def __init__(self, labels: np.ndarray, shots: int, classes_per_task: int, rng: random.Random):
        self.by_class = {int(c): np.flatnonzero(labels == c).tolist() for c in np.unique(labels)}
        self.classes = sorted(self.by_class)
        if len(self.classes) < 2:
            raise ConfigError(f"meta_init.balance_by: the pool has {len(self.classes)} class(es); balanced tasks "
                              "need at least 2")
        self.ways = classes_per_task or len(self.classes)
        if self.ways > len(self.classes):
            raise ConfigError(f"meta_init.classes_per_task={classes_per_task} but the pool has only "
                              f"{len(self.classes)} classes")
        small = {c: len(v) for c, v in self.by_class.items() if len(v) < shots}
        if small:
            raise ConfigError(f"meta_init.shots={shots}, but some classes have fewer pairs in the pool: {small}; "
                              "raise meta_init.pool or lower meta_init.shots")
        self.shots = shots
        self.rng = rng

    @property
    def size(self) -> int:
        return self.ways * self.shots

    def sample(self) -> list[int]:
        classes = self.rng.sample(self.classes, self.ways)
        return [i for c in classes for i in self.rng.sample(self.by_class[c], self.shots)]

    def batches(self, task: list[int], batch: int, steps: int) -> list[list[int]]:
        """``steps`` batches of ``batch`` pairs, passing over the shuffled task again and
        again (as the Reptile authors' mini-batches do)."""
        out: list[list[int]] = []
        cur: list[int] = []
        order = list(task)
        while len(out) < steps:
            self.rng.shuffle(order)
            for i in order:
                cur.append(i)
                if len(cur) == batch:
                    out.append(cur)
                    cur = []
                    if len(out) == steps:
                        break
        return out


# --------------------------------------------------------------------- writing
def write_vision(model, path: str) -> str:
    """The image encoder's weights under its own (timm) names, for ``model.init_vision``."""
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu() for k, v in model.visual_encoder.state_dict().items()}
    save_file(state, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)
    return path


def write_text(model, cfg: Config, out_dir: str) -> str:
    """The text encoder (and its MLM head) as an HF BERT directory, for ``model.init_text``:
    ``bert.*`` and ``cls.predictions.*`` keys and a ``config.json`` with ALBEF's
    ``fusion_layer``. The decoder is tied to the word embeddings and not stored twice."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    t = cfg.model.text
    state = {f"bert.{k}": v.detach().contiguous().cpu() for k, v in model.text_encoder.state_dict().items()}
    if model.mlm_head is not None:
        state.update({f"cls.predictions.{k}": v.detach().contiguous().cpu()
                      for k, v in model.mlm_head.state_dict().items()})
    path = os.path.join(out_dir, "model.safetensors")
    save_file(state, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)
    hf = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": t.vocab_size,
          "hidden_size": t.width, "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
          "intermediate_size": t.intermediate, "hidden_act": "gelu", "max_position_embeddings": t.max_position,
          "type_vocab_size": t.type_vocab_size, "layer_norm_eps": t.layer_norm_eps, "pad_token_id": t.pad_token_id,
          "hidden_dropout_prob": t.dropout, "attention_probs_dropout_prob": t.dropout,
          "initializer_range": t.init_std, "fusion_layer": t.fusion_layer, "add_cross_attention": True}
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=1)
    return out_dir


# ------------------------------------------------------------------------ loop
def compute_accounting(cfg: Config, world_size: int = 1) -> dict:
    """Pairs the outer loop trains on and what that is in pretraining optimizer steps of the
    config's global batch (``train.global_batch_size``, else micro batch x accumulation x
    ``world_size``): the budget to take off the run that starts from the result."""
    m, t = cfg.meta_init, cfg.train
    inner_batch = m.inner_batch or t.micro_batch_size
    pairs = m.outer_steps * m.tasks_per_step * m.inner_steps * inner_batch
    global_batch = t.global_batch_size or t.micro_batch_size * t.grad_accum * world_size
    return {"outer_steps": m.outer_steps, "tasks_per_step": m.tasks_per_step, "inner_steps": m.inner_steps,
            "inner_batch": inner_batch, "inner_steps_total": m.outer_steps * m.tasks_per_step * m.inner_steps,
            "pairs": pairs, "pretrain_global_batch": global_batch, "pretrain_step_equivalents": pairs / global_batch}


def _check(cfg: Config) -> None:
    m = cfg.meta_init
    if cfg.model.retrieval:
        raise ConfigError("meta-init learns a pretraining initialisation: model.retrieval must be false")
    batch = m.inner_batch or cfg.train.micro_batch_size
    if cfg.model.queue_size % batch:
        raise ConfigError(f"meta_init.inner_batch ({batch}) must divide model.queue_size ({cfg.model.queue_size})")
    if not (m.split or cfg.data.train_shards):
        raise ConfigError("meta_init.split is not set and neither is data.train_shards: name the corpus tasks are "
                          "drawn from")


def meta_init(cfg: Config, world_size: int = 1) -> dict:
    """Run the outer loop of ``cfg.meta_init``; write the weights and the report. Returns the
    report (also ``output_dir/meta_init.json``). ``world_size`` only enters the compute
    accounting (the ranks of the pretraining runs it is compared with)."""
    from .balance.common import load_pairs
    from .engine.metrics import MetricsLogger
    from .engine.optim import build_optimizer, param_groups
    from .engine.pretrain import prepare_text
    from .models.albef import build_model

    _check(cfg)
    m, t = cfg.meta_init, cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    prepare_text(cfg)  # the tokenizer's special ids into model.text
    split = m.split or cfg.data.train_shards
    pool = load_pairs(cfg, split, m.image_root, m.pool, "meta_init.split", label=m.balance_by)
    if pool.labels is None:
        raise ConfigError(f"meta_init.balance_by={m.balance_by!r}: not every sample of {split} has an integer "
                          f"'{m.balance_by}' label (the synthetic corpus has cls and the probe targets, e.g. "
                          "anchor_colour, anchor_shape, num_objects, anchor_relation)")
    batch_size = m.inner_batch or t.micro_batch_size
    rng = random.Random(t.seed)
    tasks = BalancedTasks(pool.labels, m.shots, m.classes_per_task, rng)
    if tasks.size < batch_size:
        raise ConfigError(f"a task holds {tasks.size} pairs ({tasks.ways} classes x meta_init.shots={m.shots}), "
                          f"fewer than one inner batch ({batch_size})")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device).train()
    torch.manual_seed(t.seed * 1000)  # the inner runs' masks, negatives, dropout and views
    inner = replace(t, lr=m.inner_lr or t.lr, betas=list(m.inner_betas))
    optimizer = build_optimizer(param_groups(model, t.weight_decay), inner, device)
    params = [p for p in model.parameters() if p.requires_grad]
    queues = {k: v.detach().clone() for k, v in model.named_buffers() if k in ("image_queue", "text_queue",
                                                                               "queue_ptr")}
    w = cfg.model.loss_weights
    weights = dict(itc=w.itc, itm=w.itm, mlm=w.mlm, uni_image=w.uni_image, uni_text=w.uni_text)
    os.makedirs(m.output_dir, exist_ok=True)
    metrics = MetricsLogger(m.output_dir, True, tensorboard=False)
    accounting = compute_accounting(cfg, world_size)
    log.info("meta-init (%s): %d outer steps x %d task(s) x %d inner steps of %d pairs = %d pairs, %.1f pretraining "
             "steps of %d pairs; tasks of %d classes x %d shots balanced by %s", m.algorithm, m.outer_steps,
             m.tasks_per_step, m.inner_steps, batch_size, accounting["pairs"],
             accounting["pretrain_step_equivalents"], accounting["pretrain_global_batch"], tasks.ways, m.shots,
             m.balance_by)

    history, skipped = [], 0
    t0 = time.time()
    for outer in range(m.outer_steps):
        eps = m.meta_step + (m.meta_step_final - m.meta_step) * outer / m.outer_steps
        start = [p.detach().clone() for p in params]
        direction = [torch.zeros_like(p) for p in params]
        first_losses, last_losses, used = [], [], 0
        for _ in range(m.tasks_per_step):
            task = tasks.sample()
            with torch.no_grad():
                model.copy_params()  # a short ALBEF run from these weights: momentum := online
                for name, value in queues.items():
                    model.get_buffer(name).copy_(value)
            losses, before, finite = [], None, True
            for k, idx in enumerate(tasks.batches(task, batch_size, m.inner_steps)):
                if k == m.inner_steps - 1 and m.algorithm == "fomaml":
                    before = [p.detach().clone() for p in params]
                sel = torch.as_tensor(idx)
                out = model(pool.images[sel].to(device), pool.input_ids[sel].to(device),
                            pool.attention_mask[sel].to(device), alpha=m.alpha)
                loss = out.total(**weights)
                if not torch.isfinite(loss):
                    finite = False
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                model.clamp_temperature_()
                losses.append(float(loss.detach()))
            with torch.no_grad():
                if finite:
                    ref = before if before is not None else start
                    for d, p, r in zip(direction, params, ref):
                        d.add_(p - r)
                    used += 1
                    first_losses.append(losses[0])
                    last_losses.append(losses[-1])
                else:
                    skipped += 1
                for p, s in zip(params, start):
                    p.copy_(s)
        if not used:
            raise FloatingPointError(f"meta-init outer step {outer + 1}: every task's inner run had a non-finite loss; "
                                     "lower meta_init.inner_lr")
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(d, alpha=eps / used)
        row = {"outer_step": outer + 1, "eps": eps, "inner_loss_first": float(np.mean(first_losses)),
               "inner_loss_last": float(np.mean(last_losses)), "tasks": used, "time_s": time.time() - t0}
        history.append(row)
        metrics.log(outer + 1, row)
        if (outer + 1) % max(1, m.outer_steps // 10) == 0 or outer + 1 == m.outer_steps:
            log.info("outer step %d/%d: eps %.3f, inner loss %.3f -> %.3f", outer + 1, m.outer_steps, eps,
                     row["inner_loss_first"], row["inner_loss_last"])
    metrics.close()
    with torch.no_grad():
        model.copy_params()
    vision = write_vision(model, os.path.join(m.output_dir, VISION_FILE))
    text = write_text(model, cfg, os.path.join(m.output_dir, TEXT_DIR))
    save_config(cfg, os.path.join(m.output_dir, "config.yaml"))
    report = {"algorithm": m.algorithm, "settings": to_dict(m), "compute": accounting,
              "tasks": {"balance_by": m.balance_by, "classes": tasks.classes, "ways": tasks.ways, "shots": m.shots,
                        "pool": len(pool)},
              "skipped_tasks": skipped, "seconds": time.time() - t0, "vision": vision, "text": text,
              "use": [f"model.init_vision={vision}", f"model.init_text={text}"], "history": history}
    with open(os.path.join(m.output_dir, REPORT_FILE), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return report


__all__ = ["BalancedTasks", "compute_accounting", "meta_init", "write_text", "write_vision"]
