#!/usr/bin/env python
"""GPU readiness in one command: correctness, host syncs, speed and memory, evaluation and
data throughput, written to one JSON and one Markdown report.

    python bench/gpu_check.py [--out DIR] [--budget 480] [--only SECTION[,SECTION...]]
    python bench/gpu_check.py --smoke --out DIR        # the same code paths, tiny, on CPU

Sections, in order (each time-boxed; a failure or a timeout is recorded and the next
section runs; the report is rewritten after every section, so a killed run keeps what it
measured):

- ``env``: versions, the device, and its measured dense matmul rate (bf16 on GPU).
- ``correctness``: albef-base under bf16 autocast agrees with fp32 on the first steps' losses
  (same seed, weights and batch, dropout off; tolerances in ``TOL``) and stays finite for
  20 steps; the fused AdamW step and the momentum update on the device equal their CPU
  results on a tiny model; retrieval of a tiny model gives the same metrics on the device
  and on the CPU.
- ``syncs``: device-to-host synchronisations in one steady training step that is not a
  log step (``torch.cuda.set_sync_debug_mode``), with the code location of each, for the
  plain engine and the DeepSpeed ZeRO 2 engine; on every device also the Python-level host
  reads (``.item()``, ``float()``, ``bool()``, ``.tolist()`` ... of a tensor) in the step.
- ``speed``: pairs/s, analytic TFLOP/s, MFU and peak memory of albef-base bf16 at micro
  batch 64 with the plain engine, DeepSpeed ZeRO 1 and ZeRO 2 (one process), and with
  activation checkpointing at micro batch 128.
- ``balance``: every balancing method runs 10 bf16 steps (finite losses and weights), and
  its step time relative to ``none`` at micro batch 64.
- ``eval``: a COCO-5K-sized gallery (5,000 images, 25,000 captions) at 384 px with k = 256
  re-ranking: seconds of each stage (stage 2 is extrapolated from the pairs done if the
  section's time runs out; the report says so).
- ``data``: decode + augment + tokenise samples/s of one DataLoader worker and of one
  worker per core.
- ``compile``: albef-base bf16 at micro batch 64 with ``train.compile`` (last: compiling is
  the slowest and least essential part).

``--budget`` (seconds, default 480) bounds the whole run: a section starts only if the
time left covers the minimum of the sections after it. ``--smoke`` runs every section at
tiny sizes on the CPU in well under a minute (``train.compile`` with dynamo's eager
backend); the test suite runs it that way.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
if ROOT not in sys.path:
    sys.path.append(ROOT)
import train_step as TS  # noqa: E402

# agreement of bf16 autocast with fp32 on the first steps, per loss: |bf16 - fp32| <= rel * |fp32| + abs.
# bf16 keeps 8 mantissa bits (relative rounding 0.4%); the losses sum thousands of rounded
# products, and ITM's hard negatives are sampled from similarities that bf16 perturbs
TOL = {"loss_itc": (0.02, 0.02), "loss_mlm": (0.02, 0.02), "loss_itm": (0.05, 0.02)}
STEP_KEYS = ("loss_itc", "loss_i2t", "loss_t2i", "loss_itm", "loss_mlm")
SECTIONS = ("env", "correctness", "syncs", "speed", "balance", "eval", "data", "compile")
# (cap seconds, minimum seconds worth starting) per section on a GPU
BUDGET = {"env": (20, 5), "correctness": (90, 30), "syncs": (45, 15), "speed": (120, 40), "balance": (80, 30),
          "eval": (150, 40), "data": (45, 15), "compile": (150, 40)}
GOALS = {"pairs_per_s_b64": 800.0, "peak_gb_b64": 40.0, "host_syncs": 0, "eval_s": 180.0,
         "overhead_ogm_ge": 1.05, "overhead_gblend": 1.05, "overhead_mmpareto": 1.60}
METHODS = ("ogm_ge", "gblend", "mmpareto", "relearn")


class SectionTimeout(Exception):
    pass


# ------------------------------------------------------------------------------ set-up
class Check:
    """What every section needs: the device, the sizes, the deadline, a scratch directory."""

    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        self.cuda = self.device.type == "cuda"
        self.tmp = tempfile.mkdtemp(prefix="albef_gpu_check_")
        self.deadline = math.inf  # of the running section
        self._corpus = None
        # sizes: the paper's model on a GPU; the tiny model in smoke mode
        self.size = "tiny" if self.smoke else "albef-base"
        self.precision = "bf16"
        self.batch = 4 if self.smoke else 64
        self.batch_small = 4 if self.smoke else 32  # correctness and sync checks
        self.batch_ckpt = 8 if self.smoke else 128
        self.steps = 2 if self.smoke else 8  # timed steps per speed configuration
        self.warmup = 1 if self.smoke else 3
        self.finite_steps = 5 if self.smoke else 20  # bf16 steps that must stay finite

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def config(self, size: str, batch: int, precision: str, balance: str = "none", zero=None, sets=()):
        ns = argparse.Namespace(zero=zero, threads=0, set=list(sets))
        out = tempfile.mkdtemp(dir=self.tmp)
        return TS.make_config(ns, size, batch, precision, balance, out)

    def trainer(self, cfg, zero=None, seed: int = 0):
        """A trainer on a fixed batch whose ``_record`` lists every step's losses."""
        batch = TS.make_batch(cfg, cfg.train.micro_batch_size, cfg.data.max_len, seed=seed)
        tr = TS.build_trainer(cfg, batch, zero, self.device)
        tr._bench_iter = iter(tr.data.loader(0, 0))
        tr._window = {}
        tr._last_log = (time.time(), 0)
        tr._record = []
        loss = tr.hooks.loss

        def recorded(out, ctx):
            tr._record.append(_losses(out))
            return loss(out, ctx)
        tr.hooks.loss = recorded
        return tr

    def corpus(self) -> str:
        """A small synthetic corpus (held-out splits for Re-learning and G-Blend subsets, the
        retrieval comparison and the data section), written once."""
        if self._corpus is None:
            from albef_bal.data.synthetic import SyntheticConfig
            from albef_bal.data.synthetic_corpus import write_corpus
            out = os.path.join(self.tmp, "corpus")
            n = 16 if self.smoke else 64
            write_corpus(out, SyntheticConfig(seed=0, image_size=32 if self.smoke else 64, max_objects=2),
                         train=64 if self.smoke else 256, val=n, test=n, shard_size=32 if self.smoke else 128,
                         progress=False)
            self._corpus = out
        return self._corpus

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def _losses(out) -> dict:
    """The step's losses as detached tensors: read back only after the step (no sync in it)."""
    return {k: getattr(out, k).detach().float().reshape(()) for k in STEP_KEYS if getattr(out, k) is not None}


def floats(record: list[dict]) -> list[dict]:
    return [{k: float(v) for k, v in r.items()} for r in record]


def run_steps(tr, n: int) -> list[float]:
    """``n`` trainer steps; their times (device-synchronised)."""
    return [TS.timed_step(tr, tr.device) for _ in range(n)]


def all_finite(tr) -> bool:
    """Every recorded loss and every weight finite."""
    return all(math.isfinite(v) for r in floats(tr._record) for v in r.values()) and params_finite(tr.module)


def params_finite(module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def peak_mem_mb(check) -> float:
    return TS.peak_mb(check.device)


# ------------------------------------------------------------------------------ sections
def section_env(check, res):
    import deepspeed
    res.update(python=platform.python_version(), torch=torch.__version__, deepspeed=deepspeed.__version__,
               device=TS.device_name(check.device), smoke=check.smoke, cpu_count=os.cpu_count())
    if check.cuda:
        p = torch.cuda.get_device_properties(check.device)
        res.update(cuda=torch.version.cuda, capability=f"{p.major}.{p.minor}", memory_gb=round(p.total_memory / 2**30, 1),
                   bf16_supported=torch.cuda.is_bf16_supported())
    n, dtype, reps = (8192, torch.bfloat16, 20) if check.cuda else (256, torch.float32, 5)
    a = torch.randn(n, n, device=check.device, dtype=dtype)
    b = torch.randn(n, n, device=check.device, dtype=dtype)
    a @ b
    check.sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    check.sync()
    res["matmul_tflops"] = round(2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12, 2)
    res["matmul"] = f"{n}x{n} {str(dtype).replace('torch.', '')}"
    peak = TS.peak_flops(check.device, "bf16")
    if peak:
        res["datasheet_bf16_tflops"] = peak / 1e12
        res["matmul_fraction_of_datasheet"] = round(res["matmul_tflops"] * 1e12 / peak, 3)


def _compare_bf16_fp32(check, res):
    steps, records = 3, {}
    for precision in ("fp32", "bf16"):
        # dropout off: the attention kernels differ between precisions and so would their
        # dropout masks; MLM masks and hard negatives come from the same seed in both
        cfg = check.config(check.size, check.batch_small, precision, sets=["model.text.dropout=0.0"])
        if check.cuda:  # a true fp32 reference: no TF32 in matmuls or convolutions
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        tr = check.trainer(cfg)  # same seed: same weights and batch in both precisions
        torch.manual_seed(1)
        run_steps(tr, steps)
        records[precision] = floats(tr._record)
        if precision == "fp32":
            del tr
            check.free()
    rows, ok = [], True
    for i, (a, b) in enumerate(zip(records["fp32"], records["bf16"])):
        for k, (rel, ab) in TOL.items():
            if k not in a:
                continue
            diff = abs(b[k] - a[k])
            passed = diff <= rel * abs(a[k]) + ab
            ok &= passed
            rows.append({"step": i + 1, "loss": k, "fp32": round(a[k], 5), "bf16": round(b[k], 5),
                         "abs_diff": round(diff, 5), "ok": passed})
    res["bf16_vs_fp32"] = {"ok": ok, "tolerance": {k: f"|diff| <= {r} * |fp32| + {a}" for k, (r, a) in TOL.items()},
                           "batch": check.batch_small, "rows": rows}
    run_steps(tr, check.finite_steps - steps)  # 20 bf16 steps in all (5 in smoke): all finite
    finite = all_finite(tr)
    res["bf16_steps_finite"] = {"ok": finite, "steps": len(tr._record),
                                   "last_losses": {k: round(v, 4) for k, v in floats(tr._record[-1:])[0].items()}}
    del tr
    check.free()
    return ok and finite


def _compare_optimizer(check, res):
    """The fused AdamW step and the momentum update, on the device and on the CPU, from the
    same weights and gradients: the largest relative difference of any weight."""
    from albef_bal.engine.optim import build_optimizer, param_groups
    from albef_bal.models.albef import build_model
    cfg = check.config("tiny", 4, "fp32")
    torch.manual_seed(0)
    ref = build_model(cfg.model)
    models = {"cpu": ref, "device": build_model(cfg.model).to(check.device)}
    models["device"].load_state_dict(ref.state_dict())
    opts = {k: build_optimizer(param_groups(m, cfg.train.weight_decay), cfg.train, next(m.parameters()).device)
            for k, m in models.items()}
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in ref.parameters() if p.requires_grad]
        for m in models.values():
            for p, gr in zip([p for p in m.parameters() if p.requires_grad], grads):
                p.grad = gr.to(p.device)
        for k, m in models.items():
            opts[k].step()
            m.momentum_update()
    ok, worst_abs, worst_name = True, 0.0, None
    for (name, a), b in zip(ref.state_dict().items(), models["device"].state_dict().values()):
        if a.is_floating_point():
            d = (a - b.cpu()).abs()
            ok &= bool((d <= 1e-6 + 1e-4 * a.abs()).all())
            if float(d.max()) > worst_abs:
                worst_abs, worst_name = float(d.max()), name
    fused = {k: bool(o.defaults.get("fused")) for k, o in opts.items()}
    res["adamw_momentum_device_vs_cpu"] = {"ok": ok, "max_abs_diff": worst_abs, "where": worst_name, "fused": fused,
                                           "steps": 3, "tolerance": "|device - cpu| <= 1e-6 + 1e-4 |cpu| everywhere"}
    return ok


def _compare_retrieval(check, res):
    from albef_bal.data import build_tokenizer, load_retrieval_split
    from albef_bal.eval.retrieval import evaluate_retrieval
    from albef_bal.models.albef import build_model
    corpus = check.corpus()
    cfg = check.config("tiny", 4, "fp32", sets=[f"data.tokenizer={corpus}/vocab.txt"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    split = load_retrieval_split(os.path.join(corpus, "test.json"))
    tok = build_tokenizer(os.path.join(corpus, "vocab.txt"))
    out = {}
    for name, dev in (("cpu", torch.device("cpu")), ("device", check.device)):
        model.to(dev)
        r = evaluate_retrieval(model, split, tok, k=8, max_len=cfg.data.max_len, precision="fp32", device=dev,
                               keep_matrices=False)
        out[name] = r.metrics
    worst = max(abs(out["cpu"][k] - out["device"][k]) for k in out["cpu"])
    one_query = 100.0 / len(split)  # a tie broken the other way moves one query
    ok = worst <= one_query + 1e-6
    res["retrieval_device_vs_cpu"] = {"ok": ok, "images": len(split), "k": 8, "max_abs_diff": round(worst, 4),
                                      "tolerance": f"<= one query ({one_query:.2f} points)",
                                      "cpu": out["cpu"], "device": out["device"]}
    return ok


def section_correctness(check, res):
    results = {}
    for name, fn in (("bf16", _compare_bf16_fp32), ("optim", _compare_optimizer), ("retrieval", _compare_retrieval)):
        try:
            results[name] = fn(check, res)
        except SectionTimeout:
            raise
        except Exception as e:  # one failed check must not hide the others
            res[f"{name}_error"] = f"{type(e).__name__}: {e}"
            res[f"{name}_traceback"] = traceback.format_exc()[-3000:]
            results[name] = False
    res["ok"] = all(results.values())


class HostReads:
    """Counts Python-level reads of tensor values by the host (``.item()``, ``.tolist()``,
    ``bool()``, ``int()``, ``float()``, use as an index) made from the project's code, with
    their locations. On a GPU each is a synchronisation; on any device it is the list of
    places to look at."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self):
        self.sites: dict[str, int] = {}
        self._saved = {}

    def __enter__(self):
        for m in self.METHODS:
            orig = getattr(torch.Tensor, m)
            self._saved[m] = orig

            def wrapper(t, *a, _orig=orig, _m=m, **k):
                stack = traceback.extract_stack()[:-1]
                site = _project_site(stack)
                if site is not None:  # in the step (the project's code is on the stack)
                    inner = _innermost_site(stack)
                    key = f"{_m}: {inner}" + ("" if inner.split(" ")[0] == site.split(" ")[0] else f" | {site}")
                    self.sites[key] = self.sites.get(key, 0) + 1
                return _orig(t, *a, **k)
            setattr(torch.Tensor, m, wrapper)
        return self

    def __exit__(self, *exc):
        for m, orig in self._saved.items():
            setattr(torch.Tensor, m, orig)

    @property
    def count(self) -> int:
        return sum(self.sites.values())


def _project_site(stack):
    """``path:line function`` of the innermost frame in albef_bal/ (None if not called from it)."""
    for f in reversed(stack):
        if f"{os.sep}albef_bal{os.sep}" in f.filename:
            return f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} {f.name}"
    return None


def _innermost_site(stack):
    """The innermost frame outside torch's own Python files and this script."""
    for f in reversed(stack):
        if f"{os.sep}torch{os.sep}" in f.filename or f.filename == __file__ or "warnings" in f.filename:
            continue
        parts = f.filename.split(os.sep)
        for anchor in ("albef_bal", "deepspeed"):
            if anchor in parts:
                return f"{os.sep.join(parts[parts.index(anchor):])}:{f.lineno} {f.name}"
        return f"{f.filename}:{f.lineno} {f.name}"
    return "?"


@contextlib.contextmanager
def cuda_sync_log(sites: dict):
    """Record every synchronising CUDA call (``set_sync_debug_mode("warn")``) with its location."""
    if not torch.cuda.is_available():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                stack = traceback.extract_stack()[:-1]
                key = f"{_innermost_site(stack)} | {_project_site(stack) or '-'}"
                sites[key] = sites.get(key, 0) + 1
            else:
                shown(message, category, filename, lineno, file, line)
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = shown


def section_syncs(check, res):
    for name, zero in (("plain", None), ("zero2", 2)):
        if check.left() < 10 and name != "plain":
            res[name] = {"skipped": "out of time"}
            continue
        cfg = check.config(check.size, check.batch_small, check.precision, zero=zero)
        tr = check.trainer(cfg, zero=zero)
        run_steps(tr, 3)  # warm-up: allocator, lazy initialisation, first-step branches
        check.sync()
        cuda_sites: dict = {}
        batch = next(tr._bench_iter)
        with HostReads() as reads, cuda_sync_log(cuda_sites):
            tr._micro_step(batch)  # log_every is 10^9: a steady step that is not a log step
        check.sync()  # outside the log: waiting for the step's kernels is the check's, not the step's
        tr.state.batch_in_epoch += 1
        row = {"engine": "deepspeed ZeRO 2" if zero else "plain", "batch": check.batch_small,
               "python_host_reads": reads.count, "python_host_read_sites": reads.sites}
        if check.cuda:
            row["cuda_syncs"] = sum(cuda_sites.values())
            row["cuda_sync_sites"] = cuda_sites
        res[name] = row
        del tr
        check.free()
    res["goal_cuda_syncs"] = GOALS["host_syncs"]


def _speed_row(check, tr, cfg, batch, times, label):
    med = statistics.median(times)
    fl = TS.train_flops_per_pair(cfg, cfg.data.max_len)["flops_per_pair"]
    row = {"config": label, "batch": batch, "pairs_per_s": round(batch / med, 2), "median_step_s": round(med, 4),
           "peak_mem_mb": round(peak_mem_mb(check), 1), "flops_per_pair_g": round(fl / 1e9, 2),
           "achieved_tflops": round(fl * batch / med / 1e12, 3)}
    pf = TS.peak_flops(check.device, check.precision)
    if pf:
        row["mfu"] = round(fl * batch / med / pf, 4)
    return row


def _timed_config(check, label, batch, zero=None, sets=(), balance="none"):
    cfg = check.config(check.size, batch, check.precision, balance=balance, zero=zero, sets=sets)
    check.free()
    TS.reset_peak(check.device)
    tr = check.trainer(cfg, zero=zero)
    run_steps(tr, check.warmup)
    times = []
    while len(times) < check.steps and (check.left() > 5 or not times):
        times += run_steps(tr, 1)
    row = _speed_row(check, tr, cfg, batch, times, label)
    row["finite"] = all_finite(tr)
    row["steps"] = len(tr._record)
    del tr
    check.free()
    return row


def section_speed(check, res):
    rows = res.setdefault("rows", [])
    plan = [("plain", check.batch, None, ()), ("zero1", check.batch, 1, ()), ("zero2", check.batch, 2, ()),
            ("plain + activation checkpointing", check.batch_ckpt, None, ("model.grad_checkpointing=true",))]
    for label, batch, zero, sets in plan:
        if check.left() < 8:
            rows.append({"config": label, "skipped": "out of time"})
            continue
        try:
            rows.append(_timed_config(check, label, batch, zero, sets))
        except SectionTimeout:
            raise
        except Exception as e:
            rows.append({"config": label, "batch": batch, "error": f"{type(e).__name__}: {e}"})
            check.free()


def _balance_sets(check) -> dict:
    corpus = check.corpus()
    n = 8 if check.smoke else 32
    return {
        "ogm_ge": [],
        "gblend": ["balance.gblend.weights=[0.5,1.0,1.5]"],
        "mmpareto": [],
        "relearn": [f"balance.relearn.train_split={corpus}/val.json", f"balance.relearn.val_split={corpus}/test.json",
                    f"data.tokenizer={corpus}/vocab.txt", f"balance.relearn.samples={n}",
                    "balance.relearn.num_clusters=4", "balance.relearn.kmeans_redo=1"],
    }


def section_balance(check, res):
    rows = res.setdefault("rows", [])
    sets = _balance_sets(check)
    steps_each = 10
    base = None
    for method in ("none",) + METHODS:
        if check.left() < 8:
            rows.append({"method": method, "skipped": "out of time"})
            continue
        try:
            cfg = check.config(check.size, check.batch, check.precision, balance=method, sets=sets.get(method, []))
            check.free()
            tr = check.trainer(cfg)
            times = run_steps(tr, steps_each)
            extra = {}
            if method == "relearn":  # one diagnosis and re-initialisation, on the device
                t = time.perf_counter()
                tr.hooks.on_epoch_end(1)
                extra["diagnosis_s"] = round(time.perf_counter() - t, 3)
                extra["reinit_alpha"] = {b: round(v["alpha"], 4) for b, v in tr.hooks.history[-1].items()
                                         if isinstance(v, dict)}
            med = statistics.median(times[3:] or times)
            finite = all_finite(tr)
            row = {"method": method, "batch": check.batch, "steps": steps_each, "finite": finite,
                   "median_step_s": round(med, 4), **extra}
            if method == "none":
                base = med
            if base:
                row["step_time_vs_none"] = round(med / base, 3)
            rows.append(row)
            del tr
            check.free()
        except SectionTimeout:
            raise
        except Exception as e:
            rows.append({"method": method, "error": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc()[-2000:]})
            check.free()
    res["ok"] = all(r.get("finite") for r in rows if "skipped" not in r)


def section_eval(check, res):
    """ALBEF's two-stage retrieval over random images and captions of a COCO-5K-sized gallery
    (decoding is the data section's business), with the same functions as ``albef-bal evaluate``."""
    from albef_bal.eval.retrieval import _autocast, autocast_dtype, itm_scores
    from albef_bal.eval.topk import topk_inner_product
    from albef_bal.models.albef import ALBEF
    n_img, per, k, res_px = (24, 5, 8, 48) if check.smoke else (5000, 5, 256, 384)
    cfg = check.config(check.size, 4, check.precision, sets=[f"model.image_res={res_px}"])
    e, t = cfg.eval, cfg.model.text
    T = n_img * per
    L = 30 if not check.smoke else cfg.data.max_len
    res.update(images=n_img, captions=T, k=k, image_res=res_px, text_len=L, rerank_batch=e.rerank_batch,
               image_chunk=e.image_chunk)
    dev = check.device
    amp = autocast_dtype("auto" if check.cuda else "fp32", dev)
    torch.manual_seed(0)
    model = ALBEF(cfg.model).to(dev).eval()
    g = torch.Generator(device=dev).manual_seed(0)
    check.sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        img_tok, img_feat = [], []
        for a in range(0, n_img, e.batch_size):
            x = torch.randn(min(e.batch_size, n_img - a), 3, res_px, res_px, generator=g, device=dev)
            with _autocast(dev, amp):
                tok = model.encode_image(x)
                img_feat.append(model.image_feat(tok).float())
            img_tok.append(tok.to(amp or torch.float32))
        img_tok, img_feat = torch.cat(img_tok), torch.cat(img_feat)
        ids = torch.randint(5, t.vocab_size, (T, L), generator=g, device=dev)
        ids[:, 0] = t.cls_token_id
        mask = torch.ones_like(ids)
        txt_tok, txt_feat = [], []
        for a in range(0, T, e.batch_size):
            with _autocast(dev, amp):
                tok = model.encode_text(ids[a:a + e.batch_size], mask[a:a + e.batch_size])
                txt_feat.append(model.text_feat(tok).float())
            txt_tok.append(tok.to(amp or torch.float32))
        txt_tok, txt_feat = torch.cat(txt_tok), torch.cat(txt_feat)
        check.sync()
        t1 = time.perf_counter()
        backend = "torch" if check.cuda else "auto"
        _, cand_i2t = topk_inner_product(img_feat, txt_feat, min(k, T), backend)
        _, cand_t2i = topk_inner_product(txt_feat, img_feat, min(k, n_img), backend)
        check.sync()
        t2 = time.perf_counter()
        res.update(encode_s=round(t1 - t0, 2), topk_s=round(t2 - t1, 2))
        cand_i2t, cand_t2i = cand_i2t.cpu(), cand_t2i.cpu()
        codes = torch.cat([(torch.arange(n_img)[:, None] * T + cand_i2t).flatten(),
                           (cand_t2i * T + torch.arange(T)[:, None]).flatten()]).unique()
        res["pairs"] = len(codes)
        # stage 2 in slices of whole images, so that a deadline leaves a measured rate
        img_of = codes // T
        bounds = torch.searchsorted(img_of, torch.arange(0, n_img + 1, max(1, n_img // 20)))
        done, t3 = 0, time.perf_counter()
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist() + [len(codes)]):
            if b <= done:
                continue
            itm_scores(model, codes[done:b], T, torch.arange(n_img), img_tok, txt_tok, mask, dev, amp,
                       e.rerank_batch, e.image_chunk)
            done = b
            check.sync()
            if check.left() < 10 and done < len(codes):
                break
        dt = time.perf_counter() - t3
    res.update(rerank_pairs_done=done, rerank_s=round(dt, 2), rerank_pairs_per_s=round(done / max(dt, 1e-9), 1),
               rerank_extrapolated=done < len(codes))
    rerank_total = dt * len(codes) / max(done, 1)
    res["rerank_s_full"] = round(rerank_total, 2)
    res["total_s"] = round(t2 - t0 + rerank_total, 2)
    res["goal_s"] = GOALS["eval_s"]
    del model, img_tok, txt_tok
    check.free()


def section_data(check, res):
    import data_throughput as DT
    from albef_bal.data import build_tokenizer
    corpus = check.corpus()
    tok_path = DT._bert_vocab() or os.path.join(corpus, "vocab.txt")
    tok = build_tokenizer(tok_path)
    px = 64 if check.smoke else 256
    samples = 64 if check.smoke else 512
    # shards at the model's resolution with photo-like JPEG cost
    src = os.path.join(check.tmp, "data_shards")
    os.makedirs(src, exist_ok=True)
    pattern = DT._make_shards(src, samples, px)
    cores = os.cpu_count() or 1
    res.update(image_res=px, samples=samples, cores=cores, tokenizer=os.path.basename(os.path.dirname(tok_path)))
    for label, workers in (("one_worker", 1), ("all_cores", cores)):
        if check.left() < 5:
            res[label] = {"skipped": "out of time"}
            continue
        args = argparse.Namespace(res=px, no_rand_aug=False, workers=workers, batch_size=16 if check.smoke else 64)
        cfg = DT._config(args, pattern, tok_path)
        rate = DT._stream_rate(cfg, tok, samples)
        res[label] = {"workers": workers, "samples_per_s": round(rate, 1),
                      "samples_per_s_per_worker": round(rate / workers, 1)}


def section_compile(check, res):
    patch = contextlib.nullcontext()
    if check.smoke:  # dynamo's tracing without code generation: the same path in seconds
        orig = torch.nn.Module.compile

        def eager(self, *a, **k):
            k.setdefault("backend", "eager")
            return orig(self, *a, **k)
        patch = _patched(torch.nn.Module, "compile", eager)
    with patch:
        t = time.perf_counter()
        row = _timed_config(check, "plain + train.compile", check.batch, sets=("train.compile=true",))
    row["wall_s_with_compilation"] = round(time.perf_counter() - t, 1)
    res["rows"] = [row]


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


FUNCS = {"env": section_env, "correctness": section_correctness, "syncs": section_syncs, "speed": section_speed,
         "balance": section_balance, "eval": section_eval, "data": section_data, "compile": section_compile}


# ------------------------------------------------------------------------------ report
def goals(report) -> list[dict]:
    s = report["sections"]
    out = []

    def add(goal, value, ok):
        out.append({"goal": goal, "measured": value, "met": ok})
    speed = {r.get("config"): r for r in s.get("speed", {}).get("results", {}).get("rows", []) if "pairs_per_s" in r}
    if "plain" in speed:
        r = speed["plain"]
        add(f">= {GOALS['pairs_per_s_b64']:.0f} pairs/s, bf16, micro batch 64 (plain engine)", r["pairs_per_s"],
            r["pairs_per_s"] >= GOALS["pairs_per_s_b64"])
        add(f"<= {GOALS['peak_gb_b64']:.0f} GB peak at micro batch 64", round(r["peak_mem_mb"] / 1024, 2),
            r["peak_mem_mb"] / 1024 <= GOALS["peak_gb_b64"])
    syncs = s.get("syncs", {}).get("results", {})
    if "plain" in syncs and "cuda_syncs" in syncs["plain"]:
        add("0 host syncs in a steady non-log step (plain engine)", syncs["plain"]["cuda_syncs"],
            syncs["plain"]["cuda_syncs"] == 0)
    ev = s.get("eval", {}).get("results", {})
    if "total_s" in ev:
        add(f"COCO-5K retrieval, k = 256, in <= {GOALS['eval_s']:.0f} s", ev["total_s"], ev["total_s"] <= GOALS["eval_s"])
    for r in s.get("balance", {}).get("results", {}).get("rows", []):
        key = f"overhead_{r.get('method')}"
        if key in GOALS and "step_time_vs_none" in r:
            add(f"{r['method']} step time <= {GOALS[key]:.2f} x none", r["step_time_vs_none"],
                r["step_time_vs_none"] <= GOALS[key])
    return out


def _md_table(rows: list[dict], keys: list[str]) -> list[str]:
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return []
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    return lines + [""]


def markdown(report) -> str:
    m, s = report["meta"], report["sections"]
    env = s.get("env", {}).get("results", {})
    lines = [f"# GPU check{' (smoke, CPU)' if m['smoke'] else ''}", "",
             f"{m['started']} · {env.get('device', '?')} · torch {env.get('torch', '?')} · "
             f"deepspeed {env.get('deepspeed', '?')} · wall {m.get('wall_s', '?')} s of a {m['budget_s']} s budget", "",
             f"Command: `{m['command']}`", "", "## Sections", ""]
    lines += _md_table([{"section": k, "status": v["status"], "seconds": v.get("seconds", "")} for k, v in s.items()],
                       ["section", "status", "seconds"])
    if report.get("goals"):
        lines += ["## Goals", ""] + _md_table(report["goals"], ["goal", "measured", "met"])
    if env:
        lines += ["## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()] + [""]
    c = s.get("correctness", {}).get("results", {})
    if c:
        lines += ["## Correctness", ""]
        bf = c.get("bf16_vs_fp32")
        if bf:
            lines += [f"bf16 autocast vs fp32, same seed, weights and batch ({bf['batch']} pairs): "
                      f"**{'pass' if bf['ok'] else 'FAIL'}** ({'; '.join(f'{k}: {v}' for k, v in bf['tolerance'].items())})", ""]
            lines += _md_table(bf["rows"], ["step", "loss", "fp32", "bf16", "abs_diff", "ok"])
        for key in ("bf16_steps_finite", "adamw_momentum_device_vs_cpu", "retrieval_device_vs_cpu"):
            if key in c:
                v = dict(c[key])
                lines.append(f"- {key}: **{'pass' if v.pop('ok') else 'FAIL'}** {json.dumps(v)}")
        lines += [f"- {k}: {v}" for k, v in c.items() if k.endswith("_error")] + [""]
    sy = s.get("syncs", {}).get("results", {})
    if sy:
        lines += ["## Host synchronisations in a steady non-log step", ""]
        for name in ("plain", "zero2"):
            r = sy.get(name)
            if not r or "engine" not in r:
                continue
            lines.append(f"**{r['engine']}**: CUDA syncs {r.get('cuda_syncs', 'n/a (no CUDA)')}, "
                         f"Python host reads {r['python_host_reads']}")
            for site, n in {**r.get("cuda_sync_sites", {}), **r.get("python_host_read_sites", {})}.items():
                lines.append(f"- {n} x `{site}`")
            lines.append("")
    for name, keys in (("speed", ["config", "batch", "pairs_per_s", "median_step_s", "achieved_tflops", "mfu",
                                  "peak_mem_mb", "finite", "skipped", "error"]),
                       ("balance", ["method", "batch", "steps", "finite", "median_step_s", "step_time_vs_none",
                                    "diagnosis_s", "skipped", "error"]),
                       ("compile", ["config", "batch", "pairs_per_s", "median_step_s", "mfu", "peak_mem_mb",
                                    "wall_s_with_compilation"])):
        rows = s.get(name, {}).get("results", {}).get("rows")
        if rows:
            lines += [f"## {name.capitalize()}", ""] + _md_table(rows, keys)
    for name in ("eval", "data"):
        r = s.get(name, {}).get("results")
        if r:
            lines += [f"## {name.capitalize()}", "", "```", json.dumps(r, indent=1), "```", ""]
    failed = {k: v for k, v in s.items() if v["status"] not in ("ok",)}
    if failed:
        lines += ["## Failures and timeouts", ""]
        for k, v in failed.items():
            lines += [f"### {k}: {v['status']}", "", "```", v.get("error", ""), v.get("traceback", ""), "```", ""]
    return "\n".join(lines) + "\n"


def save(report, out: str) -> None:
    report["goals"] = goals(report)
    for name, text in (("gpu_check.json", json.dumps(report, indent=1, default=str)), ("gpu_check.md", markdown(report))):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


def _alarm(signum, frame):
    raise SectionTimeout("section time limit reached")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".", help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 480; smoke 240)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: every code path in seconds")
    p.add_argument("--only", default=None, help="comma-separated sections to run (default: all)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    budget = args.budget or (240.0 if args.smoke else 480.0)
    only = SECTIONS if not args.only else tuple(x for x in SECTIONS if x in args.only.split(","))
    if args.only and set(args.only.split(",")) - set(SECTIONS):
        p.error(f"--only: unknown section(s) {sorted(set(args.only.split(',')) - set(SECTIONS))}; choose from {SECTIONS}")
    check = Check(args)
    if not check.cuda and not args.smoke:
        print("gpu_check: no CUDA device; running the smoke sizes on the CPU (as --smoke)", file=sys.stderr)
        args.smoke = True
        check = Check(args)
    if check.cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    else:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    report = {"meta": {"command": " ".join(["python", "bench/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "smoke": check.smoke, "budget_s": budget,
                       "device": str(check.device)},
              "sections": {}}
    start = time.monotonic()
    end = start + budget
    signal.signal(signal.SIGALRM, _alarm)
    for i, name in enumerate(only):
        cap, floor = BUDGET[name]
        if check.smoke:
            cap, floor = cap, 1
        later = sum(1 if check.smoke else BUDGET[n][1] for n in only[i + 1:])
        now = time.monotonic()
        room = end - now - later
        entry = {"status": "skipped", "results": {}}
        report["sections"][name] = entry
        if room < floor:
            entry["error"] = f"not started: {end - now:.0f} s left, {floor + later} s needed for it and the rest"
            save(report, args.out)
            continue
        check.deadline = now + min(cap, room)
        print(f"gpu_check: {name} (up to {min(cap, room):.0f} s)", file=sys.stderr, flush=True)
        signal.setitimer(signal.ITIMER_REAL, max(1.0, check.deadline - now + 5.0))
        try:
            FUNCS[name](check, entry["results"])
            entry["status"] = "ok" if entry["results"].get("ok", True) else "failed"
        except SectionTimeout:
            entry["status"] = "timeout"
            entry["error"] = f"stopped at its time limit ({min(cap, room):.0f} s); results so far kept"
        except Exception as e:
            entry["status"] = "error"
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc()[-4000:]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        entry["seconds"] = round(time.monotonic() - now, 1)
        check.free()
        report["meta"]["wall_s"] = round(time.monotonic() - start, 1)
        save(report, args.out)
        print(f"gpu_check: {name}: {entry['status']} in {entry['seconds']} s", file=sys.stderr, flush=True)
    report["meta"]["wall_s"] = round(time.monotonic() - start, 1)
    save(report, args.out)
    bad = [k for k, v in report["sections"].items() if v["status"] != "ok"]
    print(f"gpu_check: wrote {os.path.join(args.out, 'gpu_check.md')} and gpu_check.json"
          + (f"; not ok: {', '.join(bad)}" if bad else "; every section ok"), file=sys.stderr)
    from albef_bal import distributed as D
    D.shutdown()
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
