"""The DeepSpeed configuration: a JSON file for ZeRO and communication knobs, completed
from the YAML ``train`` section, which owns batch sizes, precision and clipping.

Everything that can be checked before the model is built is checked here, with errors
naming the key: batch arithmetic, queue divisibility, ZeRO stage, contradictions between
the JSON and the YAML.
"""
from __future__ import annotations

import copy
import json
import os

from ..config import Config, ConfigError

_AUTOCAST_DTYPE = {"bf16": "bfloat16", "fp16": "float16"}


def read_ds_json(path: str) -> dict:
    """The DeepSpeed JSON at ``path``, or a shipped one (``configs/deepspeed/zero2.json``,
    ``deepspeed/zero2.json``) when no such file exists here."""
    from ..config import resolve_config_path
    path = resolve_config_path(path, "train.deepspeed_config: file")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"train.deepspeed_config: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"train.deepspeed_config: {path} must hold a JSON object")
    return data


def build_ds_config(cfg: Config, world_size: int) -> dict:
    """The dict handed to ``deepspeed.initialize`` for this run and world size."""
    t = cfg.train
    path = t.deepspeed_config
    ds = copy.deepcopy(read_ds_json(path))

    micro, accum = t.micro_batch_size, t.grad_accum
    global_batch = micro * accum * world_size
    if t.global_batch_size is not None and t.global_batch_size != global_batch:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) != train.micro_batch_size ({micro}) x "
            f"train.grad_accum ({accum}) x world size ({world_size}) = {global_batch}; change one of them")
    for key, ours, source in (("train_micro_batch_size_per_gpu", micro, "train.micro_batch_size"),
                              ("gradient_accumulation_steps", accum, "train.grad_accum"),
                              ("train_batch_size", global_batch, "the global batch")):
        if key in ds and ds[key] != "auto" and ds[key] != ours:
            raise ConfigError(f"{path}: '{key}': {ds[key]} contradicts {source} ({ours}); "
                              f"remove it from the JSON (or set \"auto\") and size batches in the YAML")
        ds[key] = ours

    q, gm = cfg.model.queue_size, micro * world_size
    if q % gm:
        raise ConfigError(f"model.queue_size ({q}) must be a multiple of the global micro batch "
                          f"(train.micro_batch_size {micro} x world size {world_size} = {gm}): the queue is "
                          f"filled with every rank's momentum features at each micro step")

    zero = ds.setdefault("zero_optimization", {})
    if t.zero_stage is not None:
        zero["stage"] = t.zero_stage
    stage = int(zero.get("stage", 0))
    if stage == 3:
        raise ConfigError(
            "ZeRO stage 3 is not supported: ALBEF updates its momentum encoders from the full online "
            "weights every micro step and ties the MLM decoder to the word embeddings, which stage 3 "
            "partitions away. Use stage 2 (configs/deepspeed/zero2.json), or zero2_offload.json to keep "
            "optimizer state in CPU memory (set train.zero_stage or train.deepspeed_config)")
    if stage not in (0, 1, 2):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1 or 2, got {stage}")

    for section in ("fp16", "bf16", "amp"):
        if ds.get(section, {}).get("enabled", False):
            raise ConfigError(
                f"{path}: '{section}' is enabled; precision comes from train.precision, which keeps fp32 "
                f"weights (the momentum EMA and queues need them) and autocasts the forward")
        ds.pop(section, None)
    if t.precision in _AUTOCAST_DTYPE:
        ds["torch_autocast"] = {"enabled": True, "dtype": _AUTOCAST_DTYPE[t.precision]}
        if t.precision == "fp16" and stage > 0:
            raise ConfigError("train.precision=fp16 needs train.zero_stage=0: DeepSpeed applies loss scaling "
                              "to autocast fp16 only without ZeRO. Use bf16 with ZeRO (no loss scaling needed)")
    else:
        ds.pop("torch_autocast", None)

    clip = ds.get("gradient_clipping", 0.0)
    if clip and t.grad_clip and clip != t.grad_clip:
        raise ConfigError(f"{path}: gradient_clipping={clip} contradicts train.grad_clip={t.grad_clip}")
    ds["gradient_clipping"] = t.grad_clip or clip
    # a torch AdamW is passed in: DeepSpeed must accept it under ZeRO (it is exact for ZeRO 1/2)
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", None)
    return ds
