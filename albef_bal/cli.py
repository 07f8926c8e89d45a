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
    from .engine.preflight import preflight_pretrain
    cfg = load_run_config(args)
    preflight_pretrain(cfg)  # before the training stack is even imported
    from .engine.pretrain import pretrain
    result = pretrain(cfg)
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
    from .study import DEFAULT_PRESET, METHODS
    p = sub.add_parser(
        "study", help="imbalance study: balancing methods against a balanced reference and an imbalanced baseline",
        description="Pretrain a balanced reference, an imbalanced baseline and each balancing method with the same "
                    "budget and paired seeds on the synthetic corpus (one modality made less informative on "
                    "purpose), measure ITC-only retrieval on the clean test split and the imbalance diagnostics, "
                    "and report paired differences with 95%% intervals, Holm-corrected verdicts and the minimum "
                    "detectable effect (study.md, study.json, study.png). Resumable: finished runs are reused.")
    p.add_argument("--output-dir", default="runs/study")
    p.add_argument("--data-root", default="data",
                   help="corpora go to DATA_ROOT/synthetic (balanced) and DATA_ROOT/synthetic-PRESET")
    p.add_argument("--preset", default=DEFAULT_PRESET,
                   help="information preset of the imbalanced corpus: vision-{mild,medium,strong} or "
                        "text-{mild,medium,strong} (default %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated method specs: a name in configs/balance/, DIR/NAME for configs/DIR/NAME.yaml, "
                        "or a .yaml path (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, at least 2 (default %(default)s)")
    p.add_argument("--max-minutes", type=float, default=90.0,
                   help="skip the remaining methods when they no longer fit (seeds go before methods; 0 = no limit; "
                        "default %(default)s)")
    p.add_argument("--no-gate", action="store_true",
                   help="run the methods even when the imbalanced baseline is not below the balanced one")
    p.add_argument("--no-diagnose", action="store_true", help="skip the per-run imbalance diagnostics")
    p.add_argument("--ranks", type=int, help="CPU processes per run (default as the demo)")
    add_config_args(p)
    p.set_defaults(func=run_study_cmd)


def _seeds_and_config(command: str, args) -> tuple[list[int], Optional[str]]:
    """``--seeds`` as integers and the single optional ``--config`` of a multi-run command."""
    if len(args.config) > 1:
        raise SystemExit(f"albef-bal {command}: error: give at most one --config")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"albef-bal {command}: error: --seeds must be comma-separated integers, got {args.seeds!r}")
    return seeds, (args.config[0] if args.config else None)


def run_study_cmd(args) -> int:
    from .study import run_study
    seeds, config = _seeds_and_config("study", args)
    run_study(args.output_dir, args.data_root, args.preset, [m.strip() for m in args.methods.split(",") if m.strip()],
              seeds, config, args.overrides, args.ranks,
              max_minutes=args.max_minutes or None, gate=not args.no_gate, diagnose=not args.no_diagnose)
    return 0


def add_validate_score(sub) -> None:
    p = sub.add_parser(
        "validate-score", help="does a branch score tell the branches apart? (balanced / vision- / text-degraded)",
        description="Pretrain the demo model on the balanced corpus and on corpora with vision or text made less "
                    "informative, seeds paired, logging the branch score of balance.score; pass when the vision "
                    "score is below the text score in every seed with vision degraded, above it with text "
                    "degraded, and equal within the seed spread on the balanced corpus. Writes "
                    "score_validation.json/.md/.png; finished runs are reused.")
    p.add_argument("--output-dir", default="runs/score_validation")
    p.add_argument("--data-root", default="data")
    p.add_argument("--score", default="uniformity", help="balance.score to validate (default %(default)s)")
    p.add_argument("--grade", default="medium", help="mild, medium or strong presets (default %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default %(default)s)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run (default %(default)s)")
    p.add_argument("--ranks", type=int, help="CPU processes per run (default as the demo)")
    p.add_argument("--from-checkpoints", action="store_true",
                   help="read the held-out score from each run's saved checkpoints (and its rebuilt initialisation) "
                        "instead of the metrics log; runs trained with any balance.score can be judged")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="with --from-checkpoints: train.save_every of the runs it trains (default %(default)s)")
    add_config_args(p)
    p.set_defaults(func=run_validate_score)


def run_validate_score(args) -> int:
    from .score_validation import validate_score
    seeds, config = _seeds_and_config("validate-score", args)
    result = validate_score(args.output_dir, args.data_root, args.score, args.grade, seeds, args.steps,
                            config, args.overrides, args.ranks,
                            from_checkpoints=args.from_checkpoints, checkpoint_every=args.checkpoint_every)
    return 0 if result["passed"] else 1


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


# ---------------------------------------------------------------- embed, search
def add_embed(sub) -> None:
    p = sub.add_parser(
        "embed", help="embed a gallery of images (folder, split JSON or shards) into a searchable index",
        description="Encode every image of a folder, an annotation JSON (ALBEF format) or WebDataset shards with "
                    "a checkpoint's ITC image encoder (and, with --captions, every caption) and write OUT: "
                    "features.npy, items.jsonl (ids and paths), a faiss index and index.json. Unreadable images "
                    "are skipped and listed in skipped.jsonl. An interrupted run resumes where it stopped; under "
                    "torchrun / deepspeed / srun every rank embeds its share.")
    p.add_argument("--checkpoint", required=True, help="export directory (model.safetensors + config.yaml) or .pth")
    p.add_argument("--images", required=True, metavar="DIR|SHARDS|SPLIT.json",
                   help="a folder of images (searched recursively), shards (path, brace pattern or folder of .tar) "
                        "or a retrieval split JSON")
    p.add_argument("--out", required=True, metavar="INDEX_DIR", help="index directory to write")
    p.add_argument("--image-root", help="directory the JSON's image paths are relative to (default: its directory)")
    p.add_argument("--captions", action="store_true",
                   help="also embed the captions (JSON and shards: theirs; a folder: NAME.txt beside NAME.jpg)")
    p.add_argument("--index-type", choices=["flat", "hnsw"], default="flat",
                   help="faiss index: exact inner product (flat, default) or approximate HNSW for large galleries")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node (default 32)")
    p.add_argument("--batch-size", type=int, help="images per encoder call (default eval.batch_size)")
    p.add_argument("--workers", type=int, help="image decoding processes (default eval.num_workers)")
    p.add_argument("--chunk-size", type=int, default=1024,
                   help="images per resumable chunk of a folder or JSON (shards: one chunk per shard)")
    p.add_argument("--overwrite", action="store_true", help="replace an index (finished or not) in OUT")
    p.add_argument("--tokenizer", help="tokenizer for the captions, when the checkpoint's cannot be found")
    add_config_args(p)
    p.set_defaults(func=run_embed)


def run_embed(args) -> int:
    from .distributed import get_rank
    from .gallery import embed_gallery
    if len(args.config) > 1:
        raise SystemExit("albef-bal embed: error: give at most one --config")
    m = embed_gallery(args.checkpoint, args.images, args.out, image_root=args.image_root, captions=args.captions,
                      index_type=args.index_type, hnsw_m=args.hnsw_m, batch_size=args.batch_size,
                      workers=args.workers, chunk_size=args.chunk_size, overwrite=args.overwrite,
                      config=args.config[0] if args.config else None, overrides=args.overrides,
                      tokenizer=args.tokenizer)
    if get_rank() == 0:
        print(f"{args.out}: {m['count']} image(s)" + (f", {m['texts']} caption(s)" if m["captions"] else "")
              + f", {m['identity']['embed_dim']}-d features, faiss {m['faiss']['type']} index"
              + (f"; {m['skipped']} unreadable item(s) skipped, listed in {args.out}/skipped.jsonl"
                 if m["skipped"] else "; no unreadable image"))
    return 0


def add_search(sub) -> None:
    p = sub.add_parser(
        "search", help="search an index written by embed, by text or by image",
        description="Rank the gallery of INDEX_DIR for a text (or an image) query by ITC similarity, optionally "
                    "re-ranking the top K by the ITM head as evaluate does. Prints a table, or with --json one "
                    "JSON object per hit: rank, id, score, itc (similarity), itm (match probability, when "
                    "re-ranked), path (or shard and key), query.")
    p.add_argument("--index", required=True, metavar="INDEX_DIR", help="directory written by albef-bal embed")
    p.add_argument("--text", action="append", default=[], help="a text query (repeatable)")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image query (repeatable)")
    p.add_argument("--checkpoint", help="the model (default: the checkpoint recorded in the index)")
    p.add_argument("--top", "-k", type=int, help="hits per query (default 10, at most --rerank)")
    p.add_argument("--rerank", type=int, default=0, metavar="K",
                   help="re-rank the ITC top K by ITM (text query vs images, or image query vs --captions)")
    p.add_argument("--captions", action="store_true",
                   help="search the index's captions instead of its images (an index built with --captions)")
    p.add_argument("--json", action="store_true", help="one JSON object per hit instead of a table")
    p.add_argument("--tokenizer", help="tokenizer, when the checkpoint's cannot be found")
    add_config_args(p)
    p.set_defaults(func=run_search)


def run_search(args) -> int:
    import json
    import os
    from .gallery import GalleryIndex
    from .inference import load_for_inference
    def usage(msg: str) -> int:
        print(f"albef-bal search: error: {msg}", file=sys.stderr)
        return 2
    if not args.text and not args.image:
        return usage("give a query: --text TEXT or --image PATH")
    top = args.top if args.top is not None else (min(10, args.rerank) if args.rerank else 10)
    if top < 1 or args.rerank < 0:
        return usage("--top must be >= 1 and --rerank >= 0")
    if args.rerank and top > args.rerank:
        return usage(f"--top {top} is more than the {args.rerank} re-ranked candidates (--rerank)")
    if args.rerank and (args.image if not args.captions else args.text):
        return usage("ITM re-ranking scores image-text pairs: use --rerank with --text against the images, or "
                     "with --image against the captions (--captions)")
    index = GalleryIndex.open(args.index)
    checkpoint = args.checkpoint or index.identity.get("checkpoint")
    if not args.checkpoint and not os.path.exists(checkpoint):
        raise FileNotFoundError(f"the index's checkpoint {checkpoint} is not there any more: pass --checkpoint")
    model = load_for_inference(checkpoint, config=args.config[0] if args.config else None,
                               overrides=args.overrides, tokenizer=args.tokenizer)
    index.check_model(model)  # before any query is encoded
    target = "captions" if args.captions else "images"
    queries = [("text", t) for t in args.text] + [("image", i) for i in args.image]
    for kind, q in queries:
        hits = index.search(model, k=top, rerank=args.rerank, target=target, **{kind: q})
        if args.json:
            for h in hits:
                print(json.dumps({**h, "query": q, "query_type": kind}, ensure_ascii=False))
            continue
        print(f"{kind} query: {q!r} ({target}, {'ITC top ' + str(args.rerank) + ' re-ranked by ITM' if args.rerank else 'ITC similarity'})")
        print(f"{'rank':>4}  {'score':>8}  {'itc':>7}  {'itm':>6}  id / where")
        for h in hits:
            where = h.get("path") or f"{h['shard']}:{h['key']}"
            extra = f"  \"{h['caption']}\"" if "caption" in h else ""
            itm = f"{h['itm']:6.3f}" if "itm" in h else f"{'':>6}"
            print(f"{h['rank']:>4}  {h['score']:8.4f}  {h['itc']:7.4f}  {itm}  {h['id']}  ({where}){extra}")
        print()
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
    from .engine.preflight import check_run_paths
    if args.checkpoint:
        args.overrides = list(args.overrides) + [f"train.init_from={args.checkpoint}"]
    raw: dict = {}
    for path in args.config:
        raw = merge(raw, read_yaml(path))
    raw = apply_overrides(raw, args.overrides)
    explicit = {f"{section}.{key}" for section, values in raw.items() if isinstance(values, dict) for key in values}
    cfg = load_run_config(args)
    check_run_paths(cfg)  # before the training stack is even imported
    from .engine.finetune import finetune
    result = finetune(cfg, explicit)
    return 0 if result["outcome"] in ("finished", "preempted") else 1


# --------------------------------------------------------------------- diagnose
def add_diagnose(sub) -> None:
    p = sub.add_parser(
        "diagnose", help="imbalance diagnostics: probe gain per encoder over its initialisation, fusion reliance "
                         "on each modality, modality gap",
        description="Measure on a held-out retrieval split what each encoder learned (linear probes on frozen "
                    "features, cross-fitted inside the split, balanced accuracy, as the gain over the same seed's "
                    "initialisation with 95% paired-bootstrap intervals), how much the fusion layers use the image "
                    "and the caption (Shapley reliance from MLM and ITM accuracy), and the modality gap, alignment "
                    "and uniformity of the ITC features. Writes OUT/diagnose.json.")
    p.add_argument("checkpoint", help="export directory (model.safetensors + config.yaml) or a run directory "
                                      "(its export/ is used); the config's train.seed rebuilds the initialisation")
    p.add_argument("--split", required=True, help="retrieval split whose images carry integer probe targets "
                                                  "(attributes.probe), e.g. data/synthetic/test.json")
    p.add_argument("--reference", metavar="CHECKPOINT", help="a run on the balanced corpus: adds the relative gain "
                                                             "(run - init) / (reference - init)")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write diagnose.json")
    p.add_argument("--image-root", help="directory the split JSON's image paths are relative to")
    p.add_argument("--features", choices=["pooled", "cls", "itc"], default="pooled",
                   help="probe features: the mean of each encoder's output tokens (default), its CLS token, or the "
                        "L2-normalised ITC projection")
    p.add_argument("--compare-features", action="store_true",
                   help="also probe the other two feature kinds (probe_gain_by_features in the JSON)")
    p.add_argument("--folds", type=int, default=5, help="cross-fitting folds (default 5)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds and resamples (default 0)")
    p.add_argument("--caption", type=int, default=0, help="which caption of each image (default the first)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default 64)")
    p.add_argument("--no-reliance", action="store_true", help="skip the fusion reliance (the slowest part)")
    p.set_defaults(func=run_diagnose)


def run_diagnose(args) -> int:
    import torch
    from .engine.pretrain import setup_logging
    from .eval.diagnostics import DiagnoseSettings, diagnose_checkpoint, summary_lines
    setup_logging()
    settings = DiagnoseSettings(features=args.features, folds=args.folds, bootstrap=args.bootstrap, seed=args.seed,
                                caption=args.caption, batch_size=args.batch_size, reliance=not args.no_reliance)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    result = diagnose_checkpoint(args.checkpoint, args.split, args.reference, args.out, args.image_root, settings,
                                 args.compare_features, show_progress=True, device=device)
    print("\n".join(summary_lines(result)))
    print(f"written to {args.out}/diagnose.json ({result['seconds']:.0f} s)")
    return 0


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


SUBCOMMANDS = [add_convert, add_pretrain, add_evaluate, add_finetune, add_embed, add_search, add_demo, add_study,
               add_diagnose, add_validate_score, add_plot_balance, add_gblend_estimate, add_meta_init]


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
        if type(e).__name__ in ("TokenizerError", "SplitError", "DataPipelineError", "NonFiniteLossError",
                                "GalleryIndexError", "IndexMismatchError", "ImageReadError", "ShardSpecError"):
            print(f"albef-bal {args.command}: error: {e}", file=sys.stderr)
            return 2 if type(e).__name__ != "NonFiniteLossError" else 3
        raise
    finally:
        shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
