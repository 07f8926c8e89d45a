#!/usr/bin/env python
"""Training-step throughput: pairs per second and peak memory of one full ALBEF step.

    python bench/train_step.py --size bench-small|albef-base [--batch N[,N...]]
        [--precision fp32|bf16|fp16[,...]] [--zero N] [--balance METHOD|PRESET.yaml[,...]]
        [--unimodal IMAGE:TEXT[,IMAGE:TEXT...]] [--threads N] [--warmup 3] [--steps 10] [--interleave]
        [--set KEY=VALUE ...]

A step is what the trainer does per optimizer step with ``grad_accum=1``: the model's
forward (ITC + ITM + MLM with the momentum update and the queue), the balancing hooks'
loss, backward, ``before_step``, the optimizer and scheduler step, the temperature clamp,
``after_step``. The step code is the trainer's own (``Trainer._micro_step``), so a balancing
method is driven exactly as in training:

- without ``--zero``: the trainer around a plain PyTorch engine (autocast forward, backward,
  AdamW step); no DeepSpeed, no process group;
- with ``--zero N``: the real ``deepspeed.initialize`` engine at ZeRO stage N, in this one
  process (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT are set if missing).

Each configuration (the product of the comma-separated lists) prints one JSON object: the
median step time over ``--steps`` timed steps after ``--warmup`` steps, pairs per second,
peak memory (GPU: ``torch.cuda.max_memory_allocated`` during the timed steps; CPU: the
process's peak resident set size, reset before each configuration), analytic training FLOPs
per pair and, on a known GPU, the model FLOPs utilisation. ``--balance`` always measures
``none`` as well and reports each method's step time relative to it; ``--unimodal`` (pairs
``image:text`` of ``model.unimodal``, e.g. ``simsiam:none,none:mlm``) likewise always
measures ``none:none``; every method runs with every pair the config accepts, and a method
written ``mmpareto:ssl`` or ``gblend:ssl`` sets ``balance.unimodal_loss=ssl``. ``--interleave``
builds every configuration first and alternates them step by step, so that a machine whose
load changes affects all of them alike (use it for A/B ratios on a shared machine; the
peak memory then includes every configuration's state).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)  # after PYTHONPATH: another checkout on PYTHONPATH is benched instead

# text of 30 tokens everywhere (the bench length; ALBEF pretrains at 25, fine-tunes at 30)
SIZES = {
    "bench-small": dict(batch=16, overrides=[
        "model.image_res=128", "model.vision.patch_size=16", "model.vision.width=256", "model.vision.depth=4",
        "model.vision.heads=4", "model.text.width=256", "model.text.layers=6", "model.text.fusion_layer=3",
        "model.text.heads=4", "model.text.intermediate=1024", "model.text.vocab_size=30522",
        "model.embed_dim=128", "model.queue_size=4096", "data.max_len=30"]),
    # the paper's model: ViT-B/16 at 256 px, BERT-base with fusion from layer 6, queue 65,536
    "albef-base": dict(batch=64, overrides=["model.image_res=256", "model.queue_size=65536", "data.max_len=30"]),
    # a model small enough for seconds-long CPU checks of every code path (gpu_check.py --smoke)
    "tiny": dict(batch=8, config=os.path.join(ROOT, "configs", "demo", "tiny.yaml"), overrides=[
        "model.image_res=32", "model.vision.patch_size=8", "model.vision.width=32", "model.vision.depth=2",
        "model.vision.heads=2", "model.text.width=32", "model.text.layers=2", "model.text.fusion_layer=1",
        "model.text.heads=2", "model.text.intermediate=64", "model.embed_dim=16", "model.queue_size=64",
        "model.text.pad_token_id=0", "model.text.cls_token_id=2", "model.text.sep_token_id=3",
        "model.text.mask_token_id=4", "data.max_len=12"]),
    # the demo's (and the imbalance study's) model and recipe, one rank's micro batch; special
    # token ids of the corpus vocabulary ([PAD] [UNK] [CLS] [SEP] [MASK] first)
    "demo": dict(batch=16, config=os.path.join(ROOT, "configs", "demo", "tiny.yaml"), overrides=[
        "model.text.pad_token_id=0", "model.text.cls_token_id=2", "model.text.sep_token_id=3",
        "model.text.mask_token_id=4", "data.max_len=30"]),
}

# dense peak FLOP/s per GPU by precision, for MFU (bf16/fp16 tensor cores; fp32 = TF32 tensor cores)
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
}


# ------------------------------------------------------------------------------ FLOPs
def train_flops_per_pair(cfg, text_len: int) -> dict:
    """Analytic FLOPs (2 per multiply-add) of one pair's training step, matmuls and attention
    only. Online passes cost 3x their forward (forward + backward for inputs and weights),
    momentum passes 1x. Counts what this implementation runs: online and momentum text
    passes over [text ; masked text] (2 sequences), one online fusion pass over 4 sequences
    (ITM positive, two negatives, MLM) whose cross-attention keys/values are projected once
    per image, one momentum fusion pass (MLM distillation), MLM heads on the masked
    positions only. Elementwise work (norms, softmax, dropout, optimizer) is not counted."""
    m, v, t = cfg.model, cfg.model.vision, cfg.model.text
    n_img = 1 + (m.image_res // v.patch_size) ** 2
    dv, dt, L = v.width, t.width, text_len

    patch = 2 * (n_img - 1) * 3 * v.patch_size ** 2 * dv
    vit_layer = 2 * n_img * (4 * dv * dv + 2 * int(dv * v.mlp_ratio) * dv) + 4 * n_img * n_img * dv
    vit = patch + v.depth * vit_layer
    self_layer = 2 * L * (4 * dt * dt + 2 * t.intermediate * dt) + 4 * L * L * dt
    text_only = t.fusion_layer * self_layer
    # cross-attention: queries/output per text sequence; keys/values once per distinct image
    cross = 2 * L * 2 * dt * dt + 4 * L * n_img * dt
    cross_kv = 2 * 2 * n_img * dv * dt
    n_fusion = t.layers - t.fusion_layer
    fusion = n_fusion * (self_layer + cross)
    masked = m.mlm_probability * max(L - 2, 1)  # expected masked tokens (no CLS/SEP)
    mlm_head = masked * (2 * dt * dt + 2 * dt * t.vocab_size)
    itc = 2 * m.embed_dim * (m.queue_size)  # per row and matrix; B << Q
    online = vit + 2 * text_only + 4 * fusion + n_fusion * cross_kv + mlm_head + 2 * itc
    momentum = vit + 2 * text_only + 1 * fusion + n_fusion * cross_kv + mlm_head + 2 * itc
    return {"flops_per_pair": 3 * online + momentum, "fwd_flops_online": online, "fwd_flops_momentum": momentum}


# ------------------------------------------------------------------------------ batches
def make_batch(cfg, batch: int, length: int, seed: int = 0) -> dict:
    """Random images and tokenised captions: [CLS] words [SEP] [PAD]..., lengths 12..length
    with the longest at ``length`` (the data layer pads to the longest caption)."""
    g = torch.Generator().manual_seed(seed)
    t = cfg.model.text
    res = cfg.model.image_res
    specials = {t.pad_token_id, t.cls_token_id, t.sep_token_id, t.mask_token_id}
    low = max(specials) + 1 if max(specials) < 200 else 1000
    ids = torch.randint(low, t.vocab_size, (batch, length), generator=g)
    lengths = torch.randint(min(12, length), length + 1, (batch,), generator=g)
    lengths[0] = length
    pos = torch.arange(length)[None, :]
    mask = (pos < lengths[:, None]).long()
    ids[:, 0] = t.cls_token_id
    ids[torch.arange(batch), lengths - 1] = t.sep_token_id
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, t.pad_token_id))
    return {"image": torch.randn(batch, 3, res, res, generator=g), "input_ids": ids, "attention_mask": mask}


class FixedBatches:
    """The trainer's data source: the same batch forever (data loading is benched apart)."""

    def __init__(self, batch: dict):
        self.batch = batch
        self.batches_per_epoch = 10 ** 9

    def loader(self, epoch: int, skip_batches: int):
        while True:
            yield dict(self.batch)


# ------------------------------------------------------------------------------ engines
class TorchEngine:
    """The slice of DeepSpeed's engine API that ``Trainer._micro_step`` uses, in plain
    PyTorch: autocast forward (fp16 with a gradient scaler), backward, optimizer and
    scheduler step."""

    def __init__(self, model, optimizer, scheduler, precision: str, device: torch.device):
        self.module = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def __call__(self, *args, **kwargs):
        ctx = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()
        with ctx:
            return self.module(*args, **kwargs)

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return True

    def step(self):
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


class _NoMetrics:
    def log(self, *a, **k):
        pass

    def close(self):
        pass


def build_trainer(cfg, batch: dict, zero, device: torch.device, pkg: str = "albef_bal"):
    """A trainer ready for ``_micro_step``: the real ``setup()`` (DeepSpeed) with ``zero``,
    otherwise the same object around :class:`TorchEngine`. ``pkg`` names the package to
    take the code from (bench/ab_step.py loads a second copy under another name)."""
    from importlib import import_module
    build_balancer = import_module(f"{pkg}.balance").build_balancer
    optim = import_module(f"{pkg}.engine.optim")
    build_optimizer, build_scheduler, param_groups = optim.build_optimizer, optim.build_scheduler, optim.param_groups
    Trainer = import_module(f"{pkg}.engine.trainer").Trainer
    albef = import_module(f"{pkg}.models.albef")
    build_model = albef.build_model
    prepare_for_training = getattr(albef, "prepare_for_training", lambda m, t: m)

    hooks = build_balancer(cfg)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    data = FixedBatches(batch)
    trainer = Trainer(cfg, model, data, hooks, desc="bench")
    if zero is not None:
        fill_env_from_launcher = import_module(f"{pkg}.engine.dist_env").fill_env_from_launcher
        fill_env_from_launcher()
        trainer.setup()
        return trainer
    t = cfg.train
    model = prepare_for_training(model.to(device), t)
    trainer.model = model
    trainer.device = device
    trainer.rank, trainer.world = 0, 1
    trainer.steps_per_epoch = data.batches_per_epoch
    trainer.total_steps = 10 ** 9
    trainer.global_batch = t.micro_batch_size
    optimizer = build_optimizer(param_groups(model, t.weight_decay), t, device)
    scheduler = build_scheduler(optimizer, trainer.total_steps, t)
    trainer.engine = TorchEngine(model, optimizer, scheduler, t.precision, device)
    trainer.optimizer, trainer.scheduler, trainer.module = optimizer, scheduler, model
    trainer.branches = {k: [p for _, p in v] for k, v in model.branch_parameters().items()}
    trainer.metrics = _NoMetrics()
    trainer.hooks.setup(trainer)
    _setup_step_state(trainer, cfg, pkg)
    return trainer


def _setup_step_state(trainer, cfg, pkg: str) -> None:
    """What ``Trainer.setup()`` adds around the engine and a step reads: the stop requests,
    the branch score, no update tracking or diagnostics (where the package has them: an older
    copy loaded by bench/ab_step.py may not)."""
    from importlib import import_module
    try:
        trainer.stop = import_module(f"{pkg}.engine.stopping").StopRequests(0)
    except ImportError:
        pass
    try:
        trainer.scorer = import_module(f"{pkg}.balance.scores").build_branch_score(cfg)
    except ImportError:
        pass
    else:
        trainer.scorer.setup(trainer)
    trainer.updates = trainer.diagnostics = None


# ------------------------------------------------------------------------------ measuring
def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the VmHWM (peak RSS) of this process
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed_step(trainer, device: torch.device) -> float:
    batch = next(trainer._bench_iter)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    trainer._micro_step(batch)
    trainer.state.batch_in_epoch += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_flops(device: torch.device, precision: str):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_FLOPS.items():
        if key in name:
            return table[precision]
    return None


def make_config(args, size: str, batch: int, precision: str, balance: str, out_dir: str,
                pkg: str = "albef_bal", extra: tuple = ()):
    from importlib import import_module
    load_config = import_module(f"{pkg}.config").load_config
    # a balancing method by name, or a preset YAML (e.g. configs/balance/ogm_moment.yaml)
    preset = balance if balance.endswith((".yaml", ".yml")) else None
    overrides = list(SIZES[size]["overrides"]) + ([] if preset else [f"balance.method={balance}"]) + [
        f"train.micro_batch_size={batch}", f"train.precision={precision}",
        f"train.output_dir={out_dir}", "train.tensorboard=false", "train.log_every=1000000000",
        "train.save_every=0", "train.warmup_steps=10", "train.alpha_warmup=false",
        f"train.deepspeed_config={ROOT}/configs/deepspeed/zero0.json"]
    if args.zero is not None:
        overrides.append(f"train.zero_stage={args.zero}")
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    base = SIZES[size].get("config")
    configs = ([base] if isinstance(base, str) else list(base or [])) + ([preset] if preset else [])
    return load_config(configs or None, overrides + list(extra) + list(args.set))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="bench-small")
    p.add_argument("--batch", default=None, help="micro batch per step; comma-separated for several")
    p.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16; comma-separated for several")
    p.add_argument("--zero", type=int, default=None, help="run the DeepSpeed engine at this ZeRO stage")
    p.add_argument("--balance", default="none",
                   help="balancing method(s) or preset YAML(s) (configs/balance/*.yaml); 'none' is always measured too")
    p.add_argument("--unimodal", default="none:none",
                   help="unimodal losses as image:text pairs (model.unimodal), e.g. simsiam:none,none:mlm; "
                        "'none:none' is always measured too")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 2 on CPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--interleave", action="store_true", help="alternate the configurations step by step")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override, e.g. --set train.compile=true (repeatable)")
    args = p.parse_args(argv)

    from albef_bal.balance import build_balancer
    from albef_bal.config import ConfigError

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.threads:
        args.threads = 2
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in (args.batch or str(SIZES[args.size]["batch"])).split(",")]
    precisions = args.precision.split(",")
    methods = [m for m in args.balance.split(",") if m]
    if "none" in methods:
        methods.remove("none")
    methods = ["none"] + methods
    if args.zero is not None and device.type == "cpu" and "fp16" in precisions:
        p.error("fp16 autocast on CPU is not supported by DeepSpeed's engine; use bf16")

    out_root = tempfile.mkdtemp(prefix="albef_bench_")
    unimodal = [u for u in args.unimodal.split(",") if u]
    if any(u.count(":") != 1 for u in unimodal):
        p.error("--unimodal takes image:text pairs, e.g. simsiam:none,none:mlm")
    unimodal = ["none:none"] + [u for u in unimodal if u != "none:none"]
    # every method with every unimodal pair, except what the config refuses (a method named
    # "mmpareto:ssl" sets balance.unimodal_loss=ssl, which needs both unimodal losses on)
    combos = list(itertools.product(batches, precisions, methods, unimodal))
    runs = []
    for i, (batch, precision, method, uni) in enumerate(combos):
        out_dir = os.path.join(out_root, str(i))
        image, text = uni.split(":")
        name, _, source = method.partition(":")
        extra = [f"model.unimodal.image={image}", f"model.unimodal.text={text}"]
        if source:
            extra.append(f"balance.unimodal_loss={source}")
        try:
            cfg = make_config(args, args.size, batch, precision, name, out_dir, extra=extra)
            build_balancer(cfg)  # an unknown method, or one without hooks here, fails before any timing
        except ConfigError as e:
            if "unimodal" in str(e) and (method != "none" or uni != "none:none"):
                continue  # a combination the config refuses (e.g. ssl without both unimodal losses)
            p.error(f"--balance {method}: {e}" if "balance" in str(e) else str(e))
        data = make_batch(cfg, batch, cfg.data.max_len)
        runs.append(dict(cfg=cfg, batch=batch, precision=precision, balance=method, unimodal=uni, data=data,
                         times=[]))

    def start(run):
        tr = build_trainer(run["cfg"], run["data"], args.zero, device)
        tr._bench_iter = iter(tr.data.loader(0, 0))
        tr._window = {}  # what Trainer.run sets before its loop
        tr._last_log = (time.time(), 0)
        for _ in range(args.warmup):
            timed_step(tr, device)
        return tr

    def finish(run, tr, peak):
        times = run["times"]
        med = statistics.median(times)
        cfg = run["cfg"]
        fl = train_flops_per_pair(cfg, cfg.data.max_len)
        row = {"size": args.size, "batch": run["batch"], "precision": run["precision"],
               "balance": run["balance"], "unimodal": run["unimodal"], "zero": args.zero, "engine": "deepspeed" if args.zero is not None else "torch",
               "device": device_name(device), "threads": torch.get_num_threads() if device.type == "cpu" else None,
               "pairs_per_s": round(run["batch"] / med, 2), "median_step_s": round(med, 4),
               "min_step_s": round(min(times), 4), "steps": len(times), "peak_mem_mb": round(peak, 1),
               "flops_per_pair_g": round(fl["flops_per_pair"] / 1e9, 2),
               "achieved_tflops": round(fl["flops_per_pair"] * run["batch"] / med / 1e12, 3)}
        pf = peak_flops(device, run["precision"])
        if pf:
            row["mfu"] = round(fl["flops_per_pair"] * run["batch"] / med / pf, 4)
        if args.set:
            row["overrides"] = list(args.set)
        run["row"] = row

    if args.interleave:
        reset_peak(device)
        trainers = [start(r) for r in runs]
        for _ in range(args.steps):
            for r, tr in zip(runs, trainers):
                r["times"].append(timed_step(tr, device))
        peak = peak_mb(device)
        for r, tr in zip(runs, trainers):
            finish(r, tr, peak)
    else:
        for r in runs:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            reset_peak(device)
            tr = start(r)
            r["times"] = [timed_step(tr, device) for _ in range(args.steps)]
            finish(r, tr, peak_mb(device))
            del tr

    base = {(r["batch"], r["precision"]): r["row"]["median_step_s"] for r in runs
            if r["balance"] == "none" and r["unimodal"] == "none:none"}
    for r in runs:
        row = r["row"]
        if len(methods) > 1 or len(unimodal) > 1:
            row["step_time_vs_none"] = round(row["median_step_s"] / base[(r["batch"], r["precision"])], 3)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
