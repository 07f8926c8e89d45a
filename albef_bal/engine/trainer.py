"""The training loop shared by pretraining and retrieval fine-tuning, on DeepSpeed.

One :class:`Trainer` owns the engine, the schedule, checkpoints, logging and the
pre-emption / non-finite-loss policies. What differs between pretraining and fine-tuning
(the model, the data, per-epoch evaluation) comes in as arguments.

Counting: a *micro step* is one forward/backward of ``train.micro_batch_size`` pairs per
rank; an *optimizer step* ("step") ends every ``train.grad_accum`` micro steps. The
schedule, logging and checkpoints count optimizer steps; the momentum encoders and queues
move every micro step (inside the model's forward), as in ALBEF.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional, Protocol

import torch
import torch.distributed as dist

from .. import distributed as D
from ..config import Config, save_config, to_dict
from ..losses import alpha_schedule
from .checkpoint import CheckpointManager, seed_host_rngs
from .dist_env import init_distributed, launcher_pid
from .ds_config import build_ds_config
from .grads import branch_grad_norms, grad_views
from .hooks import StepContext, TrainHooks
from .metrics import MetricsLogger, Progress, peak_memory_mb
from .optim import build_optimizer, build_scheduler, param_groups
from .rundir import RunDirLock
from .stopping import StopRequests
from .updates import UpdateTracker

log = logging.getLogger("albef_bal")


class DataSource(Protocol):
    """What the trainer needs from the data layer."""

    batches_per_epoch: int  # micro batches per rank per epoch

    def loader(self, epoch: int, skip_batches: int) -> Iterable[dict]:
        """Micro batches of ``epoch`` for this rank, from micro batch ``skip_batches`` on; the
        order must be a pure function of (seed, epoch, rank, world size)."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro batches of this epoch consumed (per rank)
    samples: int = 0  # pairs seen, all ranks
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    data_skipped: dict = None  # corrupt samples skipped by the data layer, per reason

    def __post_init__(self):
        self.data_skipped = dict(self.data_skipped or {})


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: Config, model: torch.nn.Module, data: DataSource,
                 hooks: Optional[TrainHooks] = None, desc: str = "train",
                 epoch_end: Optional[Callable[["Trainer", int], dict]] = None):
        self.cfg = cfg
        self.model = model
        self.data = data
        self.hooks = hooks or TrainHooks()
        self.desc = desc
        self.epoch_end_fn = epoch_end
        self.state = TrainState()
        self.stop: Optional[StopRequests] = None
        self.lock: Optional[RunDirLock] = None
        self._window_bad = False
        self._window_finite: Optional[torch.Tensor] = None  # all of this window's losses finite (this rank)
        self._saved_step: Optional[int] = None
        self._stop_error: Optional[str] = None
        self._skips_since_log: dict = {}

    # ------------------------------------------------------------------ set-up
    def setup(self) -> "Trainer":
        cfg, t = self.cfg, self.cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        # first: a stop signal during the (long) set-up is kept and honoured at the first step
        self.stop = StopRequests(int(os.environ.get("RANK", 0)), launcher_pid()).install()
        self.device = init_distributed()
        self.rank, self.world = D.get_rank(), D.get_world_size()
        self.stop.rank = self.rank
        # one job per run directory, decided before anything is written into it
        self.lock = RunDirLock(t.output_dir).acquire()
        try:
            self._setup(cfg, t)
        except BaseException:
            self.lock.release()
            raise
        return self

    def _setup(self, cfg: Config, t) -> None:
        import deepspeed
        ds_config = build_ds_config(cfg, self.world)
        self.ckpt = CheckpointManager(t.output_dir, t.keep_last)
        if self.rank == 0:
            for name in self.ckpt.remove_leftovers():
                log.info("removed %s, a partial checkpoint of an earlier run", name)
        # verified (and damaged ones named) before the engine is built
        resume = self.ckpt.resolve(t.resume, fallback=t.resume_fallback, trusted=t.trust_checkpoint,
                                   world_size=self.world)
        self.steps_per_epoch = self.data.batches_per_epoch // t.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"an epoch holds {self.data.batches_per_epoch} micro batches per rank, fewer than "
                             f"train.grad_accum ({t.grad_accum}); raise data.samples_per_epoch")
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.global_batch = t.micro_batch_size * t.grad_accum * self.world

        from ..models.albef import prepare_for_training
        prepare_for_training(self.model, t)  # torch.compile when train.compile is set
        optimizer = build_optimizer(param_groups(self.model, t.weight_decay), t, self.device)
        scheduler = build_scheduler(optimizer, self.total_steps, t)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False)
        self.module = self.engine.module
        # seeded per rank after the (identical) model construction: masking, hard negatives
        # and dropout differ across ranks as their data does
        torch.manual_seed(t.seed * 1000 + self.rank)
        seed_host_rngs(t.seed * 1000 + self.rank)
        self.branches = {k: [p for _, p in v] for k, v in self.module.branch_parameters().items()}

        self.metrics = MetricsLogger(t.output_dir, self.rank == 0, t.tensorboard, t.wandb, t.wandb_project,
                                     to_dict(cfg))
        if self.rank == 0:
            save_config(cfg, os.path.join(t.output_dir, "config.yaml"))
        self.hooks.setup(self)
        from ..balance.scores import build_branch_score
        self.scorer = build_branch_score(cfg)
        if resume:
            trainer_state = self.ckpt.load(self.engine, resume, trusted=t.trust_checkpoint)
            hooks_state = trainer_state.pop("hooks", None)
            self.scorer.load_state_dict(trainer_state.pop("branch_score", None))
            self.state = TrainState(**trainer_state)
            self.hooks.load_state_dict(hooks_state)
            if self.rank == 0:
                log.info("resumed from %s at step %d (epoch %d, batch %d)", resume, self.state.step,
                         self.state.epoch, self.state.batch_in_epoch)
            self._saved_step = self.state.step
        self.scorer.setup(self)
        # learning speed per branch (rank 0 alone: every rank holds the full weights under ZeRO 0-2)
        self.updates = UpdateTracker(self.branches) if self.rank == 0 and cfg.diagnose.update_ratio else None
        self.diagnostics = None
        if cfg.diagnose.every and self.rank == 0:
            from ..eval.diagnostics import TrainingDiagnostics
            with torch.random.fork_rng(devices=[]):  # keep the training RNG (and exact resumes) as they are
                self.diagnostics = TrainingDiagnostics(cfg).setup(self.device)

    # --------------------------------------------------------------- the loop
    def run(self) -> dict:
        st, t = self.state, self.cfg.train
        progress = Progress(self.total_steps, st.step, self.rank == 0, self.desc)
        self._window = {}
        self._last_log = (time.time(), st.step)
        outcome = "finished"
        try:
            while st.step < self.total_steps and outcome == "finished":
                micro_per_epoch = self.steps_per_epoch * t.grad_accum
                # the loader must not draw from the training RNG (DataLoader seeds its workers
                # from the global generator unless given one): keep resumed runs exact
                with torch.random.fork_rng(devices=[]):
                    batches = iter(self.data.loader(st.epoch, st.batch_in_epoch))
                for batch in batches:
                    if st.batch_in_epoch >= micro_per_epoch:
                        break
                    stepped = self._micro_step(batch)
                    st.batch_in_epoch += 1
                    if self._stop_error:
                        raise NonFiniteLossError(self._stop_error)
                    if not stepped:
                        continue
                    progress.update(1, **self._postfix)
                    if self._preempt_agreed:
                        outcome = "preempted"
                        break
                    if st.step >= self.total_steps:
                        break
                    if t.save_every and st.step % t.save_every == 0:
                        self.save()
                if outcome != "finished":
                    break
                if st.batch_in_epoch >= micro_per_epoch or st.step < self.total_steps:
                    self._end_epoch()
        except NonFiniteLossError:
            try:
                self.save()
            finally:
                progress.close()
                self._release()
            raise
        except BaseException:
            self._release()
            raise
        progress.close()
        try:
            self.save()
            if outcome == "finished" and self.rank == 0:
                from ..checkpoints import export_model
                export_model(self.module, self.cfg, os.path.join(t.output_dir, "export"))
            D.barrier()
        finally:
            self._release()
        if outcome == "preempted" and self.rank == 0:
            log.warning("stopped at step %d (%s); resume with --resume auto", st.step,
                        self.stop.reason or "another rank asked to stop")
        return {"outcome": outcome, **asdict(st)}

    def _release(self) -> None:
        """Close the metrics log and let go of the run directory (every way a run ends)."""
        self.metrics.close()
        if self.lock is not None:
            self.lock.release()

    def _end_epoch(self) -> None:
        st = self.state
        self.hooks.on_epoch_end(st.epoch)
        if self.epoch_end_fn is not None:
            results = self.epoch_end_fn(self, st.epoch) or {}
            if results:
                self.metrics.log(st.step, {"epoch": st.epoch, **results})
        st.epoch += 1
        st.batch_in_epoch = 0

    def _micro_step(self, batch: dict) -> bool:
        """One forward/backward; at the window's end also the optimizer step. Returns
        whether an optimizer step was taken."""
        st, t = self.state, self.cfg.train
        micro = st.batch_in_epoch % t.grad_accum
        boundary = self.engine.is_gradient_accumulation_boundary()
        step_in_epoch = st.batch_in_epoch // t.grad_accum
        alpha = (alpha_schedule(self.cfg.model.alpha, step_in_epoch, self.steps_per_epoch, st.epoch)
                 if t.alpha_warmup else self.cfg.model.alpha)
        ctx = StepContext(step=st.step, epoch=st.epoch, micro=micro, grad_accum=t.grad_accum, alpha=alpha,
                          boundary=boundary, log=boundary and (st.step + 1) % t.log_every == 0)
        for reason, n in (batch.pop("skipped", None) or {}).items():
            self._skips_since_log[reason] = self._skips_since_log.get(reason, 0) + int(n)
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        batch = self.hooks.before_forward(batch, ctx)
        # inputs for the online encoders only (data-side balancing); passed only when present
        online = {"online": batch["online"]} if batch.get("online") else {}

        out = self.engine(batch["image"], batch["input_ids"], batch["attention_mask"], alpha=alpha,
                          idx=batch.get("idx"), **online)
        self.scorer.apply(out)  # score_v / score_t as balance.score defines them
        loss = self.hooks.loss(out, ctx)
        # a non-finite loss is back-propagated like any other (no read-back here): the window's
        # gradient is zeroed before the step if any micro step on any rank was non-finite
        finite = torch.isfinite(loss.detach()).reshape(())
        self._window_finite = finite if self._window_finite is None else self._window_finite & finite
        self._accumulate(out, loss, finite)
        self.engine.backward(loss)
        # the queue write the forward left in flight (models/albef.py): complete within the step
        # (on every rank: DeepSpeed's checkpoint reads the model's state on rank 0 only)
        flush_queues = getattr(self.module, "flush_queues", None)
        if flush_queues is not None:
            flush_queues()

        if not boundary:
            self.engine.step()
            return False
        # one small all-reduce agrees on both policies across ranks: a non-finite loss
        # anywhere skips the window everywhere; a signal anywhere stops everyone together. It
        # comes after the gradient's own reduction, where the ranks are already in step, so
        # that no rank waits for the other between its forward and backward
        flags = torch.stack([(~self._window_finite).float(),
                             torch.tensor(float(self.stop.requested()), device=loss.device)])
        self._window_finite = None
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, preempt = (bool(x) for x in flags.tolist())
        if nonfinite:
            self._window_bad = True
            for view in grad_views(p for p in self.module.parameters() if p.requires_grad):
                if view.flat is not None:
                    view.flat.zero_()
        grad_norms = branch_grad_norms(self.branches) if ctx.log else {}
        self.hooks.before_step(ctx)
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        skipped = self._window_bad
        if skipped:
            # keep the parameters where they are: AdamW with lr 0 changes nothing (the
            # scheduler resets the learning rates at the step)
            for g in self.optimizer.param_groups:
                g["lr"] = 0.0
        self.engine.step()
        self._clamp_temperature()
        self.hooks.after_step(ctx)
        st.step += 1
        self.scorer.after_step(st.step)
        st.samples += self.global_batch
        self._preempt_agreed = preempt
        self._window_bad = False
        if skipped:
            st.nonfinite_total += 1
            st.nonfinite_in_row += 1
            log.warning("step %d: non-finite loss; update skipped (%d in a row, %d in total)", st.step,
                        st.nonfinite_in_row, st.nonfinite_total)
            if st.nonfinite_in_row >= t.max_nonfinite:
                # raised by the loop once this batch is counted, after this step's metrics row
                self._stop_error = (
                    f"{st.nonfinite_in_row} consecutive non-finite losses (train.max_nonfinite={t.max_nonfinite});"
                    f" stopped with a checkpoint in {self.ckpt.root}. Lower train.lr or check the data")
        else:
            st.nonfinite_in_row = 0
        if ctx.log or self._stop_error:
            self._log(ctx, grad_norms, lrs)
        if self.cfg.diagnose.every and st.step % self.cfg.diagnose.every == 0:
            self._diagnose()
        return True

    def _diagnose(self) -> None:
        """The held-out diagnostics (``diagnose.every``) on rank 0; the other ranks wait at a
        barrier, so that every rank enters the next step together. Only the model's feature
        API runs (no collective inside, momentum encoders and queues untouched). Its time is
        left out of the logged throughput."""
        t0 = time.time()
        if self.diagnostics is not None:
            row = self.diagnostics.run(self.module)
            self.metrics.log(self.state.step, row)
            log.info("step %d diagnostics: %s", self.state.step,
                     ", ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if not k.endswith(("_lo", "_hi"))))
        D.barrier()
        self._last_log = (self._last_log[0] + time.time() - t0, self._last_log[1])

    _preempt_agreed = False
    _postfix: dict = {}

    @property
    def window_skipped(self) -> bool:
        """Whether the current accumulation window had a non-finite loss (on any rank): its
        gradient is zero and its update will be skipped. Known from the accumulation
        boundary on (hooks' ``before_step``), where the ranks agree on it."""
        return self._window_bad

    def _sync_skips(self) -> None:
        """Fold every rank's data-skip counts since the last call into the global totals
        (collective; at log steps and checkpoints)."""
        from ..data.skips import SKIP_REASONS
        reasons = list(SKIP_REASONS) + ["other"]
        local = dict(self._skips_since_log)
        local["other"] = sum(n for r, n in local.items() if r not in SKIP_REASONS)
        counts = torch.tensor([local.get(r, 0) for r in reasons], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(counts)
        for r, n in zip(reasons, counts.tolist()):
            if n:
                self.state.data_skipped[r] = self.state.data_skipped.get(r, 0) + int(n)
        self._skips_since_log = {}

    def _accumulate(self, out, loss, finite: torch.Tensor) -> None:
        """Running sums of the step's scalars as tensors (no device sync until a log step); a
        micro step with a non-finite loss counts for nothing."""
        values = {"loss": loss.detach(), "loss_itc": out.loss_itc, "loss_i2t": out.loss_i2t,
                  "loss_t2i": out.loss_t2i, "loss_itm": out.loss_itm, "score_v": out.score_v,
                  "score_t": out.score_t}
        for k in ("loss_mlm", "loss_uni_image", "loss_uni_text"):
            if getattr(out, k, None) is not None:
                values[k] = getattr(out, k)
        values.update(out.metrics)
        weight = finite.float()
        for k, v in values.items():
            v = torch.where(finite, v.detach().float().reshape(()), 0.0)
            s, n = self._window.get(k, (0.0, 0.0))
            self._window[k] = (s + v, n + weight)

    def _log(self, ctx: StepContext, grad_norms: dict, lrs: dict) -> None:
        st = self.state
        keys = sorted(self._window)
        row = {}
        if keys:
            # each rank's window mean, then their mean over the ranks that have one (a rank
            # whose every micro step was non-finite has none)
            counts = torch.stack([self._window[k][1] for k in keys])
            rank_means = torch.stack([self._window[k][0] for k in keys]) / counts.clamp(min=1)
            both = torch.cat([rank_means, (counts > 0).to(counts.dtype)])
            if self.world > 1:
                dist.all_reduce(both)
            total, ranks = both.split(len(keys))
            means = total / ranks.clamp(min=1)
            row = {k: m for k, m, r in zip(keys, means.tolist(), ranks.tolist()) if r > 0}
        self._window = {}
        now = time.time()
        elapsed = now - self._last_log[0]
        steps = st.step - self._last_log[1]
        self._last_log = (now, st.step)
        if "score_v" in row and row.get("score_t", 0) > 0:
            row["rho_v"] = row["score_v"] / row["score_t"]
        row.update({f"grad_norm_{k}": v for k, v in grad_norms.items()})
        if self.updates is not None:
            row.update(self.updates.ratios())
        row.update(self.hooks.metrics())
        row.update(epoch=st.epoch, lr=next(iter(lrs.values())), alpha=ctx.alpha,
                   pairs_per_s=self.global_batch * steps / max(elapsed, 1e-9),
                   step_time_s=elapsed / max(steps, 1), samples=st.samples,
                   peak_mem_mb=peak_memory_mb(self.device), nonfinite_total=st.nonfinite_total)
        if len(set(lrs.values())) > 1:
            row.update({f"lr/{k}": v for k, v in lrs.items()})
        self._sync_skips()
        row.update({f"data_skipped/{k}": v for k, v in st.data_skipped.items() if v})
        self.metrics.log(st.step, row)
        self._postfix = {"loss": f"{row.get('loss', float('nan')):.3f}", "pairs/s": f"{row['pairs_per_s']:.1f}"}

    @torch.no_grad()
    def _clamp_temperature(self) -> None:
        """ALBEF clamps the temperature parameter to [0.001, 0.5]; with ZeRO the optimizer's
        fp32 master copy is clamped too, or the next step would undo it. A clamp is
        elementwise, so each rank clamps the fragment of the master copy it holds (none, or
        the whole one-element tensor): no collective, no read-back, every step."""
        temp = self.module.temp
        temp.clamp_(0.001, 0.5)
        mapping = getattr(temp, "_hp_mapping", None)  # ZeRO 1/2: this rank's master fragment
        if mapping is not None:
            mapping.get_hp_fragment().clamp_(0.001, 0.5)

    # ------------------------------------------------------------ checkpoints
    def save(self) -> str:
        self._sync_skips()
        if self._saved_step == self.state.step:  # nothing new since the last save (or the resume)
            return os.path.join(self.ckpt.root, f"step_{self.state.step:08d}")
        st = asdict(self.state)
        st["hooks"] = self.hooks.state_dict()
        st["branch_score"] = self.scorer.state_dict()
        path = self.ckpt.save(self.engine, self.state.step, st)
        self._saved_step = self.state.step
        if self.rank == 0:
            log.info("checkpoint: %s", path)
        return path
