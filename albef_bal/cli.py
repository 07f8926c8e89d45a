"""The ``albef-bal`` command (also ``python -m albef_bal``).

Argument parsing only lives here, so ``--help`` is instant; each subcommand imports what it
needs when it runs. To add a subcommand, write ``add_<name>(subparsers)`` that registers its
arguments and sets ``func`` to a ``run`` function, and list it in ``SUBCOMMANDS``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", "-c", action="append", default=[], required=required, metavar="YAML",
                   help="config file (repeatable; later files override earlier ones)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one setting, e.g. --set model.text.heads=4 (repeatable; values are YAML)")


# ---------------------------------------------------------------------- convert
def add_convert(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert an official ALBEF checkpoint to model.safetensors + config.yaml",
        description="Convert an official ALBEF checkpoint (ALBEF.pth, ALBEF_4M.pth, mscoco.pth, flickr30k.pth) "
                    "into OUT_DIR/model.safetensors and the resolved OUT_DIR/config.yaml. Architecture sizes "
                    "are read from the tensor shapes; the rest comes from --config/--set.")
    p.add_argument("kind", choices=["albef"], help="checkpoint family")
    p.add_argument("src", help="input checkpoint (.pth or .safetensors)")
    p.add_argument("out_dir", help="output directory")
    add_config_args(p)
    p.set_defaults(func=run_convert)


def run_convert(args) -> int:
    from .checkpoints import convert_albef
    from .config import load_config
    cfg = load_config(args.config or None, args.overrides, validate=False)
    cfg, report = convert_albef(args.src, args.out_dir, cfg)
    m = cfg.model
    kind = "retrieval" if m.retrieval else "pretraining"
    print(f"{args.src}: {kind} checkpoint, image {m.image_res}px, ViT width {m.vision.width} depth "
          f"{m.vision.depth}, BERT width {m.text.width} layers {m.text.layers} (fusion from "
          f"{m.text.fusion_layer}), embed {m.embed_dim}, queue {m.queue_size}")
    print(report)
    print(f"wrote {args.out_dir}/model.safetensors and {args.out_dir}/config.yaml")
    return 0


# --------------------------------------------------------------------- pretrain
def add_run_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, required=True)
    p.add_argument("--output-dir", help="shortcut for --set train.output_dir=DIR")
    p.add_argument("--resume", help="'auto' (newest complete checkpoint in the output directory) or a "
                                    "checkpoint directory; shortcut for --set train.resume=...")


def load_run_config(args):
    from .config import load_config
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    return load_config(args.config, overrides)


def add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="pretrain ALBEF on WebDataset shards with DeepSpeed",
        description="Pretrain ALBEF (ITC + ITM + MLM with momentum distillation) with DeepSpeed. Start it "
                    "directly (one process), or under deepspeed / torchrun / accelerate launch / srun; see "
                    "launch/README.md for several nodes.")
    add_run_args(p)
    p.set_defaults(func=run_pretrain)


def run_pretrain(args) -> int:
    from .engine.pretrain import pretrain
    result = pretrain(load_run_config(args))
    return 0 if result["outcome"] in ("finished", "preempted") else 1


# ------------------------------------------------------------------ demo, study
def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="synthetic corpus -> pretraining on CPU -> zero-shot retrieval, in minutes",
        description="Write the synthetic coloured-shapes corpus, pretrain a small ALBEF from scratch through "
                    "the DeepSpeed engine (two CPU ranks on two cores), evaluate zero-shot retrieval on the "
                    "held-out split and print the table beside the chance level.")
    p.add_argument("--output-dir", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--data-dir", default="data/synthetic", help="corpus directory, reused when complete")
    p.add_argument("--ranks", type=int, help="CPU processes (default: 2 on a machine with 2 or more cores)")
    add_config_args(p)
    p.set_defaults(func=run_demo_cmd)


def run_demo_cmd(args) -> int:
    from .demo import run_demo
    if len(args.config) > 1:
        raise SystemExit("albef-bal demo: error: give at most one --config")
    run_demo(args.output_dir, args.data_dir, args.config[0] if args.config else None, args.overrides, args.ranks)
    return 0


def add_study(sub) -> None:
    from .study import METHODS
    p = sub.add_parser(
        "study", help="imbalance study: every balancing method on a corpus with one modality made harder",
        description="Pretrain the baseline and each balancing method with the same budget and seeds on a "
                    "synthetic corpus made imbalanced on purpose, then report zero-shot retrieval and "
                    "per-encoder linear probes (mean and spread over seeds) as Markdown, JSON and a plot.")
    p.add_argument("--output-dir", default="runs/study")
    p.add_argument("--data-dir", help="corpus directory (default data/synthetic-PRESET)")
    p.add_argument("--preset", default="vision-mild", help="imbalance preset of the training split "
                                                           "(data_tools/make_synthetic.py --help lists them)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--ranks", type=int, help="CPU processes per run (default as the demo)")
    add_config_args(p)
    p.set_defaults(func=run_study_cmd)


def run_study_cmd(args) -> int:
    from .study import run_study
    if len(args.config) > 1:
        raise SystemExit("albef-bal study: error: give at most one --config")
    run_study(args.output_dir, args.data_dir, args.preset, [m.strip() for m in args.methods.split(",") if m.strip()],
              [int(s) for s in args.seeds.split(",")], args.config[0] if args.config else None, args.overrides,
              args.ranks)
    return 0


# --------------------------------------------------------------------- evaluate
def add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="image-text retrieval: ITC top-k, then ITM re-ranking; R@1/5/10 both ways",
        description="Evaluate retrieval of a checkpoint (an export directory, or an official ALBEF .pth) on a "
                    "retrieval split. Runs in one process, or on several ranks under torchrun / deepspeed / srun "
                    "(rank 0 writes the report).")
    p.add_argument("--checkpoint", required=True, help="export directory (model.safetensors + config.yaml) or .pth")
    p.add_argument("--split", required=True, help="retrieval split: annotation JSON (ALBEF format) or shards")
    p.add_argument("--image-root", help="directory the JSON's image paths are relative to (default: its directory)")
    p.add_argument("--k", type=int, help="candidates re-ranked by ITM per query (eval.k_test; 0 = ITC only)")
    p.add_argument("--score", choices=["itm", "itm+sim"], help="re-ranking score (eval.score)")
    p.add_argument("--batch-size", type=int, help="images/captions per encoder call (eval.batch_size)")
    p.add_argument("--out", help="write metrics.json, metrics.md and per-query ranks here")
    p.add_argument("--save-topk", type=int, help="also write the N best items per query (needs --out)")
    add_config_args(p)
    p.set_defaults(func=run_evaluate)


def run_evaluate(args) -> int:
    import logging
    from .eval.report import evaluate_checkpoint, markdown_table
    from .engine.pretrain import setup_logging
    setup_logging()
    logging.getLogger("albef_bal.eval").setLevel(logging.getLogger("albef_bal").getEffectiveLevel())
    if len(args.config) > 1:
        from .config import ConfigError
        raise ConfigError("evaluate takes at most one --config (settings for an official .pth; an export "
                          "directory brings its own config.yaml)")
    report = evaluate_checkpoint(args.checkpoint, args.split, out_dir=args.out, k_test=args.k,
                                 batch_size=args.batch_size, overrides=args.overrides, score=args.score,
                                 save_topk=args.save_topk, image_root=args.image_root,
                                 config_file=args.config[0] if args.config else None)
    from .distributed import get_rank
    if get_rank() == 0:
        print(markdown_table(report))
        t = report["timings"]
        print(f"{report['world_size']} rank(s): encoding {t['encode_s']:.1f}s, top-k {t['topk_s']:.1f}s, "
              f"re-ranking {report['pairs_fused']} pairs {t['rerank_s']:.1f}s")
        if args.out:
            print(f"report written to {args.out}/")
    return 0


# --------------------------------------------------------------------- finetune
def add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a checkpoint for image-text retrieval (COCO / Flickr30K) with DeepSpeed",
        description="Retrieval fine-tuning (ITC with image-id positives, ITM, distillation) from an export "
                    "directory or an official ALBEF .pth, with validation retrieval after every epoch; the best "
                    "epoch (mean recall) is exported to OUTPUT_DIR/best. Presets: configs/retrieval/coco.yaml, "
                    "configs/retrieval/flickr.yaml.")
    add_run_args(p)
    p.add_argument("--checkpoint", help="weights to start from; shortcut for --set train.init_from=...")
    p.set_defaults(func=run_finetune)


def run_finetune(args) -> int:
    from .config import apply_overrides, merge, read_yaml
    from .engine.finetune import finetune
    if args.checkpoint:
        args.overrides = list(args.overrides) + [f"train.init_from={args.checkpoint}"]
    raw: dict = {}
    for path in args.config:
        raw = merge(raw, read_yaml(path))
    raw = apply_overrides(raw, args.overrides)
    explicit = {f"{section}.{key}" for section, values in raw.items() if isinstance(values, dict) for key in values}
    result = finetune(load_run_config(args), explicit)
    return 0 if result["outcome"] in ("finished", "preempted") else 1


# ----------------------------------------------------------------- plot-balance
def add_plot_balance(sub) -> None:
    p = sub.add_parser(
        "plot-balance", help="draw the loss, learning-rate and modality-balance plots of a run",
        description="Read RUN_DIR/metrics.jsonl and write PNG plots into RUN_DIR/plots/: losses, learning "
                    "rate, branch scores s_v/s_t, their ratio, per-branch gradient norms, and the balancing "
                    "method's coefficients, weights, cosines, purities and alphas where logged.")
    p.add_argument("run_dir", help="a training output directory (train.output_dir)")
    p.set_defaults(func=run_plot_balance)


def run_plot_balance(args) -> int:
    from .plots import plot_run
    for path in plot_run(args.run_dir):
        print(path)
    return 0


# -------------------------------------------------------------- gblend-estimate
def add_gblend_estimate(sub) -> None:
    p = sub.add_parser(
        "gblend-estimate", help="estimate offline Gradient-Blending weights with a short training run",
        description="Train one G-Blend window (balance.gblend.window optimizer steps) with the starting "
                    "weights (balance.gblend.weights, default equal), measure the train and held-out losses "
                    "(balance.gblend.train_split / val_split) before and after it, and write the weights as "
                    "JSON for balance.gblend.weights_file. Takes the same --config/--set as pretrain.")
    add_run_args(p)
    p.add_argument("--out", help="where to write the weights JSON (default OUTPUT_DIR/gblend_weights.json)")
    p.set_defaults(func=run_gblend_estimate)


def run_gblend_estimate(args) -> int:
    import os
    import shutil
    from .engine.pretrain import pretrain
    from .balance.gblend import WEIGHTS_FILE
    args.overrides = list(args.overrides) + ["balance.method=gblend", "balance.gblend.mode=online",
                                             "balance.gblend.weights_file=null"]
    cfg = load_run_config(args)
    cfg.train.max_steps = cfg.balance.gblend.window
    cfg.train.save_every = 0
    cfg.validate()
    result = pretrain(cfg)
    written = os.path.join(cfg.train.output_dir, WEIGHTS_FILE)
    if int(os.environ.get("RANK", 0)) == 0:
        if not os.path.isfile(written):
            print(f"albef-bal gblend-estimate: error: no estimate written to {written}", file=sys.stderr)
            return 1
        if args.out and os.path.abspath(args.out) != os.path.abspath(written):
            shutil.copyfile(written, args.out)
            written = args.out
        with open(written, encoding="utf-8") as f:
            import json
            weights = json.load(f)["weights"]
        print(f"G-Blend weights [vision i2t, text t2i, multimodal]: {[round(w, 4) for w in weights]}")
        print(f"wrote {written}; use it with --set balance.gblend.weights_file={written}")
    return 0 if result["outcome"] == "finished" else 1


# -------------------------------------------------------------------- meta-init
def add_meta_init(sub) -> None:
    p = sub.add_parser(
        "meta-init", help="meta-learn a balanced initialisation of both encoders (Reptile / first-order MAML)",
        description="Run a first-order meta-learning outer loop (meta_init.algorithm: reptile or fomaml) over short "
                    "ALBEF runs on small class-balanced tasks drawn from the corpus (meta_init.balance_by), and write "
                    "the encoders as OUT/vision.safetensors and OUT/text/ for model.init_vision and model.init_text. "
                    "Takes the same --config/--set as pretrain; settings in the meta_init section.")
    add_config_args(p, required=True)
    p.add_argument("--out", help="output directory; shortcut for --set meta_init.output_dir=DIR")
    p.add_argument("--ranks", type=int, default=1,
                   help="ranks of the pretraining runs it is compared with (compute accounting only; default 1)")
    p.set_defaults(func=run_meta_init)


def run_meta_init(args) -> int:
    from .config import load_config
    from .engine.pretrain import setup_logging
    from .meta_init import meta_init
    setup_logging()
    overrides = list(args.overrides) + ([f"meta_init.output_dir={args.out}"] if args.out else [])
    report = meta_init(load_config(args.config, overrides), world_size=args.ranks)
    c = report["compute"]
    print(f"meta-init ({report['algorithm']}): {c['outer_steps']} outer x {c['tasks_per_step']} task(s) x "
          f"{c['inner_steps']} inner steps x {c['inner_batch']} pairs = {c['pairs']} pairs = "
          f"{c['pretrain_step_equivalents']:g} pretraining steps of {c['pretrain_global_batch']} pairs")
    print("start a run from it with: " + " ".join(f"--set {u}" for u in report["use"]))
    return 0


SUBCOMMANDS = [add_convert, add_pretrain, add_evaluate, add_finetune, add_demo, add_study, add_plot_balance,
               add_gblend_estimate, add_meta_init]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="albef-bal",
        description="ALBEF vision-language pretraining with DeepSpeed, WebDataset and modality balancing.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"albef-bal {__version__}")
    # the deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK is
    # read from the environment instead
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .checkpoints import CheckpointError
    from .config import ConfigError
    from .distributed import shutdown
    try:
        return int(args.func(args) or 0)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"albef-bal {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__name__ in ("TokenizerError", "SplitError", "DataPipelineError", "NonFiniteLossError"):
            print(f"albef-bal {args.command}: error: {e}", file=sys.stderr)
            return 2 if type(e).__name__ != "NonFiniteLossError" else 3
        raise
    finally:
        shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
