"""Balancing-method scenarios run in subprocesses (single process or torchrun) by
tests/test_balance_hooks.py. Each writes JSON (rank 0) for the test to check.

    python tests/balance_worker.py SCENARIO OUT_DIR [key=value ...]

To compare one rank with several on the same global batch, the model here freezes what
ALBEF itself moves every micro step (momentum encoders and queues: ``update=False``) and
draws MLM masks and hard negatives from a seed that depends on the batch alone; the data
source numbers micro batches globally, so 1 rank x 4 accumulation steps and 2 ranks x 2
accumulation steps see the same 4 micro batches in each optimizer step.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny import tiny_batch, tiny_config  # noqa: E402

from albef_bal import distributed as D  # noqa: E402
from albef_bal.balance import build_balancer  # noqa: E402
from albef_bal.balance.common import PairSet  # noqa: E402
from albef_bal.balance.gblend import GBlendHooks  # noqa: E402
from albef_bal.balance.relearn import RelearnHooks  # noqa: E402
from albef_bal.engine.grads import GradView  # noqa: E402
from albef_bal.engine.trainer import Trainer  # noqa: E402
from albef_bal.models import ALBEF  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIXES = ("ogm/", "gblend/", "mmpareto/", "relearn/", "weaken/")


class BatchSeededALBEF(ALBEF):
    """ALBEF whose loss is a pure function of (weights, batch): no momentum/queue updates,
    masks and negatives seeded by the batch content."""

    def forward(self, image, input_ids, attention_mask, alpha=0.0, idx=None, update=True, **kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(input_ids.sum()) * 31 + int(input_ids.shape[0]))
            return super().forward(image, input_ids, attention_mask, alpha=alpha, idx=idx, update=False, **kwargs)


class GlobalPairs:
    """Micro batch ``i`` of rank ``r`` in an epoch belongs to optimizer step ``i // A`` and is
    global micro batch ``(i // A) * W * A + (i % A) * W + r``: the same set of batches per
    optimizer step for any split of W * A."""

    def __init__(self, cfg, steps_per_epoch):
        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", 1))  # read before the process group exists
        self.accum = cfg.train.grad_accum
        self.batches_per_epoch = steps_per_epoch * self.accum

    def loader(self, epoch, skip_batches):
        rank = int(os.environ.get("RANK", 0))
        W, A = self.world, self.accum
        for i in range(skip_batches, self.batches_per_epoch):
            g = epoch * 100_000 + (i // A) * W * A + (i % A) * W + rank
            images, ids, mask = tiny_batch(self.cfg, self.cfg.train.micro_batch_size, 10, seed=1000 + g)
            yield {"image": images, "input_ids": ids, "attention_mask": mask}


def pairs(cfg, seed, n=16, labelled=True):
    images, ids, mask = tiny_batch(cfg, n, 10, seed=seed)
    labels = (torch.arange(n) % 4).tolist() if labelled else None
    return PairSet.from_batches([{"image": images, "input_ids": ids, "attention_mask": mask}], labels)


def make_cfg(out, method, *extra):
    # train.eps=1e-6: the attention key bias has a gradient that is zero in exact arithmetic
    # (softmax ignores a shift shared by all keys); in floats it is rounding noise that
    # depends on the reduction order, and AdamW with eps 1e-8 turns noise into full-size
    # steps. A larger eps keeps 1-rank and 2-rank runs comparable without hiding real gradients.
    return tiny_config("train.eps=1e-6", f"train.output_dir={out}", f"train.deepspeed_config={ROOT}/configs/deepspeed/zero1.json",
                       "train.micro_batch_size=4", "train.lr=1e-3", "train.warmup_steps=0", "train.log_every=1",
                       "train.tensorboard=false", "train.save_every=0", "train.alpha_warmup=false",
                       "model.queue_size=32", "model.text.dropout=0.0", f"balance.method={method}", *extra)


# variant -> (balance.method, its settings)
VARIANTS = {
    "none": ("none", []),
    "ogm_ge": ("ogm_ge", ["balance.ogm_ge.alpha=0.5"]),
    "ogm_ge_noge": ("ogm_ge", ["balance.ogm_ge.alpha=0.5", "balance.ogm_ge.ge=false"]),
    "ogm_ge_lr": ("ogm_ge", ["balance.ogm_ge.alpha=0.5", "balance.ogm_ge.mode=lr"]),
    # first-moment modulation with GE noise into the first moment only
    "ogm_moment": ("ogm_ge", ["balance.ogm_ge.alpha=0.5", "balance.ogm_ge.mode=moment",
                              "balance.ogm_ge.ge_into=moment"]),
    "ogm_moment_noge": ("ogm_ge", ["balance.ogm_ge.alpha=0.5", "balance.ogm_ge.mode=moment",
                                   "balance.ogm_ge.ge=false"]),
    # the bidirectional rule in the three modes
    "mlb_moment": ("ogm_ge", ["balance.ogm_ge.alpha=0.8", "balance.ogm_ge.rule=mlb", "balance.ogm_ge.mode=moment",
                              "balance.ogm_ge.ge=false"]),
    "mlb_grad": ("ogm_ge", ["balance.ogm_ge.alpha=0.8", "balance.ogm_ge.rule=mlb", "balance.ogm_ge.ge=false"]),
    "mlb_lr": ("ogm_ge", ["balance.ogm_ge.alpha=0.8", "balance.ogm_ge.rule=mlb", "balance.ogm_ge.mode=lr",
                          "balance.ogm_ge.ge=false"]),
    "gblend": ("gblend", ["balance.gblend.mode=online", "balance.gblend.window=2"]),
    # floor, no distillation and no queue in the measurements
    "gblend_fixes": ("gblend", ["balance.gblend.mode=online", "balance.gblend.window=2", "balance.gblend.floor=0.1",
                                "balance.gblend.measure_alpha=0", "balance.gblend.measure_queue=false"]),
    "mmpareto": ("mmpareto", []),
    "mmpareto_global": ("mmpareto", ["balance.mmpareto.rescale=global"]),
    "relearn": ("relearn", ["balance.relearn.every=1", "balance.relearn.max_times=2"]),
    "relearn_se": ("relearn", ["balance.relearn.every=1", "balance.relearn.max_times=2",
                               "balance.relearn.min_gap_se=1.0"]),
    # a steep strength curve so that the tiny model's small score gaps weaken something
    "weaken_patch_mask": ("weaken", ["balance.weaken.beta=40", "balance.weaken.stopwords=false"]),
    "weaken_blur_drop": ("weaken", ["balance.weaken.beta=40", "balance.weaken.stopwords=false",
                                    "balance.weaken.image=blur", "balance.weaken.text=drop"]),
    "weaken_down": ("weaken", ["balance.weaken.beta=40", "balance.weaken.stopwords=false",
                               "balance.weaken.image=downsample"]),
}


def hooks_for(cfg, variant):
    method = VARIANTS[variant][0]
    if method == "gblend":
        return GBlendHooks({"train": pairs(cfg, 7, labelled=False), "val": pairs(cfg, 8, labelled=False)})
    if method == "relearn":
        return RelearnHooks({"train": pairs(cfg, 7), "val": pairs(cfg, 8)})
    return build_balancer(cfg)


def variant_cfg(out, variant, *extra):
    method, settings = VARIANTS[variant]
    return make_cfg(out, method, *settings, *extra)


def run_variant(out, variant, zero, accum, steps_per_epoch=2, epochs=2):
    cfg = variant_cfg(out, variant, f"train.zero_stage={zero}", f"train.grad_accum={accum}", f"train.epochs={epochs}")
    torch.manual_seed(cfg.train.seed)
    model = BatchSeededALBEF(cfg.model)
    trainer = Trainer(cfg, model, GlobalPairs(cfg, steps_per_epoch), hooks_for(cfg, variant)).setup()
    trainer.run()
    return trainer


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------- scenarios
def equivalence(out, args):
    """Each of ``variants`` (comma-separated) with ZeRO ``zero`` and ``accum`` accumulation
    steps on however many ranks this process group has, one after another in this process
    (one launch for all: start-up dominates a run this small); rank 0 writes each variant's
    final online weights and diagnostics to ``out/<variant>/``."""
    zero, accum = int(args["zero"]), int(args["accum"])
    for variant in args["variants"].split(","):
        vout = os.path.join(out, variant)
        os.makedirs(vout, exist_ok=True)
        t = run_variant(vout, variant, zero, accum)
        if D.is_main_process():
            state = {n: p.detach().clone() for n, p in t.module.named_parameters() if p.requires_grad}
            torch.save(state, os.path.join(vout, "weights.pt"))
            diag = [{k: v for k, v in r.items() if k.startswith(PREFIXES) or k in (
                "score_v", "score_t", "rho_v", "loss", "grad_norm_vision", "grad_norm_text")}
                    | {"step": r["step"]} for r in rows(vout)]
            with open(os.path.join(vout, "diag.json"), "w") as f:
                json.dump(diag, f)


class Snapshot:
    """Wraps a method's hooks: records this rank's gradient shards before and after the
    method's before_step, the learning rates and first-moment gains it leaves for the step,
    and this rank's share of the optimizer's moments before and after the step (in the
    optimizer's own layout, through optimizer_slot)."""

    def __init__(self, inner):
        self.inner = inner
        self.records = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def setup(self, trainer):
        self.inner.setup(trainer)
        self.trainer = trainer

    def loss(self, out, ctx):
        return self.inner.loss(out, ctx)

    def _layout(self):
        """{name: (optimizer tensor, offset, length)} of this rank's share of each parameter
        (taken while the gradients exist: ZeRO 1/2 free them at the step)."""
        from albef_bal.engine.grads import optimizer_slot
        out = {}
        for n, p in self.trainer.module.named_parameters():
            view = GradView(p) if p.requires_grad else None
            slot, off = optimizer_slot(p, self.trainer.optimizer) if view is not None else (None, 0)
            if slot is not None and view.flat is not None:
                out[n] = (slot, off, view.flat.numel())
        return out

    def _moments(self):
        from albef_bal.engine.optim import find_gain_optimizer
        opt = find_gain_optimizer(self.trainer.optimizer, "test")
        out = {}
        for n, (slot, off, numel) in self._share.items():
            st = opt.state.get(slot, {})
            out[n] = {k: (st[k].reshape(-1).narrow(0, off, numel).clone() if k in st else torch.zeros(numel))
                      for k in ("exp_avg", "exp_avg_sq")}
        return out

    def before_step(self, ctx):
        names = {id(p): n for n, p in self.trainer.module.named_parameters()}
        params = [p for p in self.trainer.module.parameters() if p.requires_grad]
        before = {names[id(p)]: GradView(p).flat.clone() for p in params if GradView(p).flat is not None}
        uni = {}
        if hasattr(self.inner, "uni"):  # MMPareto's g_uni of the window (one process: no reduction)
            for b, buf in self.inner.uni.items():
                flat, off = buf / self.inner._micro, 0
                for n, p in self.trainer.module.branch_parameters()[b]:
                    uni[n] = flat[off:off + p.numel()].clone()
                    off += p.numel()
        self.inner.before_step(ctx)
        after = {names[id(p)]: GradView(p).flat.clone() for p in params if GradView(p).flat is not None}
        groups = self.trainer.optimizer.param_groups
        self._share = self._layout()
        self.records.append({"before": before, "after": after, "lrs": {g["name"]: g["lr"] for g in groups},
                             "m_gain": {g["name"]: g.get("m_gain", 1.0) for g in groups}, "uni": uni,
                             "k": dict(getattr(self.inner, "k", {})), "moments_before": self._moments()})

    def after_step(self, ctx):
        self.inner.after_step(ctx)
        self.records[-1]["moments_after"] = self._moments()


def grad_edit(out, args):
    """One process, one run per ``runs`` entry (``variant@zero``, comma-separated): the
    gradients each method leaves for the step against the unmodified ones of the same step,
    and the optimizer moments around the step (saved for the test to check)."""
    result = {}
    for token in args["runs"].split(","):
        variant, zero = token.split("@")
        vout = os.path.join(out, token.replace("@", "_zero"))
        cfg = variant_cfg(vout, variant, f"train.zero_stage={zero}", "train.grad_accum=2", "train.max_steps=3")
        torch.manual_seed(cfg.train.seed)
        hooks = Snapshot(build_balancer(cfg))
        t = Trainer(cfg, BatchSeededALBEF(cfg.model), GlobalPairs(cfg, 4), hooks).setup()
        t.run()
        branches = {b: [n for n, _ in named] for b, named in t.module.branch_parameters().items()}
        shapes = {n: list(p.shape) for n, p in t.module.named_parameters()}
        result[token] = {"records": hooks.records, "branches": branches, "shapes": shapes,
                         "betas": list(cfg.train.betas)}
    torch.save(result, os.path.join(out, "grads.pt"))


def relearn_unit(out, args):
    """Re-learning in one process: the schedule, the exact interpolation of the branches and
    their momentum copies, the untouched head, and pseudo-labels when there are no labels."""
    labelled = args.get("labelled", "1") == "1"
    zero = int(args.get("zero", 2))
    cfg = make_cfg(out, "relearn", f"train.zero_stage={zero}", "train.epochs=4", "balance.relearn.every=2",
                   "balance.relearn.max_times=1", "balance.relearn.num_clusters=3")
    torch.manual_seed(cfg.train.seed)
    hooks = RelearnHooks({"train": pairs(cfg, 7, labelled=labelled), "val": pairs(cfg, 8, labelled=labelled)})
    t = Trainer(cfg, BatchSeededALBEF(cfg.model), GlobalPairs(cfg, 2), hooks).setup()
    init = {n: p.detach().clone() for n, p in t.module.named_parameters()}
    seen = {}
    real = hooks.reinit

    def spy(branch, alpha):
        before = {n: p.detach().clone() for n, p in t.module.named_parameters()}
        real(branch, alpha)
        after = {n: p.detach().clone() for n, p in t.module.named_parameters()}
        from deepspeed.utils import safe_get_full_fp32_param
        master = {}
        for n, p in t.module.branch_parameters()[branch]:
            m = safe_get_full_fp32_param(p)
            master[n] = None if m is None else m.detach().clone()
        seen[branch] = {"alpha": alpha, "before": before, "after": after, "master": master}
    hooks.reinit = spy
    res = t.run()
    torch.save({"seen": seen, "init": init, "branches": {b: [n for n, _ in named] for b, named in
                                                         t.module.branch_parameters().items()},
                "history": hooks.history, "label_source": hooks.label_source, "done": hooks.done,
                "rows": [r for r in rows(out) if "relearn/count" in r], "step": res["step"],
                "labels": {k: np.asarray(v).tolist() for k, v in hooks.labels.items()}},
               os.path.join(out, "relearn.pt"))


class RecordingALBEF(BatchSeededALBEF):
    """Records the online inputs each forward received."""

    def forward(self, image, input_ids, attention_mask, alpha=0.0, idx=None, update=True, online=None, **kwargs):
        if update:  # a training forward (measurements pass update=False)
            self.received = getattr(self, "received", [])
            self.received.append(None if online is None else {k: v.clone() for k, v in online.items()})
        return super().forward(image, input_ids, attention_mask, alpha=alpha, idx=idx, update=update, online=online,
                               **kwargs)


def forward_point(out, args):
    """The hook point before the forward: called once per micro step with its context, on
    the device batch; what it returns is what the model trains on."""
    from albef_bal.engine.hooks import TrainHooks

    class Flip(TrainHooks):
        calls = []

        def before_forward(self, batch, ctx):
            self.calls.append([ctx.step, ctx.micro, ctx.boundary, sorted(batch)])
            if ctx.micro == 1:  # second micro step of each window: the online encoders see flipped images
                return {**batch, "online": {"image": batch["image"].flip(-1)}}
            return batch

    cfg = make_cfg(out, "none", "train.zero_stage=0", "train.grad_accum=2", "train.max_steps=2")
    torch.manual_seed(cfg.train.seed)
    model = RecordingALBEF(cfg.model)
    hooks = Flip()
    Trainer(cfg, model, GlobalPairs(cfg, 4), hooks).setup().run()
    online = [None if r is None else {k: v.shape for k, v in r.items()} for r in model.received]
    with open(os.path.join(out, "forward_point.json"), "w") as f:
        json.dump({"calls": hooks.calls, "online": [None if o is None else {k: list(v) for k, v in o.items()}
                                                    for o in online]}, f)


def weaken_inputs(out, args):
    """Weakening through the trainer: the online inputs the model received at every micro
    step, the strengths the hook decided, and the clean batches, for ``variants``."""
    result = {}
    for variant in args["variants"].split(","):
        vout = os.path.join(out, variant)
        cfg = variant_cfg(vout, variant, "train.zero_stage=0", "train.grad_accum=2", "train.max_steps=4")
        torch.manual_seed(cfg.train.seed)
        model = RecordingALBEF(cfg.model)
        hooks = build_balancer(cfg)
        strengths = []
        real = hooks.before_forward

        def spy(batch, ctx, real=real, hooks=hooks):
            strengths.append(dict(hooks.strength))
            return real(batch, ctx)
        hooks.before_forward = spy
        data = GlobalPairs(cfg, 8)
        Trainer(cfg, model, data, hooks).setup().run()
        clean = list(data.loader(0, 0))[:len(model.received)]
        result[variant] = {"online": model.received, "strengths": strengths, "clean": clean,
                           "patches": model.visual_encoder.pos_embed.shape[1] - 1}
    torch.save(result, os.path.join(out, "weaken.pt"))


def resume_exact(out, args):
    """For each of ``variants``: 6 optimizer steps in one go, and 3 steps + a checkpoint +
    a resumed run of the other 3 (the real ALBEF: momentum encoders, queues, masking RNG);
    rank 0 saves both final states."""
    from albef_bal.models import ALBEF
    zero = args.get("zero", "2")
    for variant in args["variants"].split(","):
        vout = os.path.join(out, variant)
        common = (f"train.zero_stage={zero}", "train.grad_accum=2", "train.max_steps=6", "train.epochs=3",
                  "train.alpha_warmup=true")
        states = {}
        for run, extra in (("full", ["train.save_every=0"]), ("cut", ["train.save_every=3"])):
            cfg = variant_cfg(os.path.join(vout, run), variant, *common, *extra)
            torch.manual_seed(cfg.train.seed)
            t = Trainer(cfg, ALBEF(cfg.model), GlobalPairs(cfg, 2), hooks_for(cfg, variant)).setup()
            t.run()
            states[run] = {k: v.detach().clone() for k, v in t.module.state_dict().items()}
        cfg = variant_cfg(os.path.join(vout, "resumed"), variant, *common, "train.save_every=0",
                          f"train.resume={os.path.join(vout, 'cut', 'checkpoints', 'step_00000003')}")
        torch.manual_seed(cfg.train.seed)
        t = Trainer(cfg, ALBEF(cfg.model), GlobalPairs(cfg, 2), hooks_for(cfg, variant)).setup()
        resumed_at = t.state.step
        t.run()
        states["resumed"] = {k: v.detach().clone() for k, v in t.module.state_dict().items()}
        if D.is_main_process():
            torch.save({"states": states, "resumed_at": resumed_at, "hooks_state": t.hooks.state_dict(),
                        "rows": rows(os.path.join(vout, "full"))}, os.path.join(vout, "resume.pt"))


if __name__ == "__main__":
    from workers import worker_main
    worker_main(globals())
