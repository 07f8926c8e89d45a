"""Weights in and out: official ALBEF ``.pth``, HF BERT directories, timm/DeiT ViT state
dicts, and this project's exports (``model.safetensors`` + ``config.yaml``).

Nothing here unpickles arbitrary objects: ``.pth``/``.bin`` files are read with
``torch.load(weights_only=True)`` and a file that needs more is refused with an
explanation. Every load returns a :class:`LoadReport` of what was missing, unexpected,
resized or skipped, so a silent partial load cannot happen.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .config import Config, ConfigError, ModelConfig, TextConfig, load_config, save_config, to_dict
from .models.vit import resize_pos_embed

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message says why."""


# ------------------------------------------------------------------------ reading
def safe_torch_load(path: str) -> object:
    """``torch.load`` that never runs pickled code (tensors, containers and numbers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        if "weights_only" not in str(e) and not isinstance(e, pickle.UnpicklingError):
            raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({e})") from e
        raise CheckpointError(
            f"{path}: refusing to unpickle it. The file holds Python objects beyond tensors and plain "
            f"containers, and loading those can run arbitrary code ({type(e).__name__}: "
            f"{str(e).splitlines()[0]}). If you trust the file, re-save only its weights in a trusted "
            f"environment:\n  python -c \"import torch; c = torch.load('{path}', weights_only=False); "
            f"torch.save({{'model': c.get('model', c)}}, 'weights_only.pth')\"\n"
            f"and pass weights_only.pth instead.") from e


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors``/``.pth``/``.bin`` file (or of an HF/our directory),
    unwrapping the usual containers (``model``, ``state_dict``, ``module``)."""
    if os.path.isdir(path):
        for name in (MODEL_FILE, "pytorch_model.bin", "model.pth"):
            if os.path.isfile(os.path.join(path, name)):
                return read_state_dict(os.path.join(path, name))
        raise CheckpointError(f"{path}: no {MODEL_FILE}, pytorch_model.bin or model.pth in this directory")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    obj = safe_torch_load(path)
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), or a dict with one under "
                              f"'model'/'state_dict'/'module'")
    return dict(obj)


# ------------------------------------------------------------------------ reports
@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    ignored: list[str] = field(default_factory=list)  # known-unused (tied copies, pooler, ...)
    resized: list[str] = field(default_factory=list)  # position embeddings interpolated
    skipped: list[str] = field(default_factory=list)  # shape mismatch that cannot be adapted
    # in the model, not in the checkpoint, and new by design: the unimodal heads
    # (model.unimodal), which no official checkpoint has; they keep their initialisation
    new: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        for name in ("missing", "new", "unexpected", "skipped", "resized", "ignored"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"{name} ({len(keys)}): {_summarise(keys)}")
        return "\n".join(lines)


def _summarise(keys: Sequence[str], limit: int = 12) -> str:
    """Group layer-indexed keys (``encoder.layer.3.x`` -> ``encoder.layer.*.x``) to keep reports short."""
    groups: dict[str, int] = {}
    for k in keys:
        g = re.sub(r"\.\d+\.", ".*.", k)
        groups[g] = groups.get(g, 0) + 1
    items = [f"{g} (x{n})" if n > 1 else g for g, n in groups.items()]
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# heads of the unimodal losses (model.unimodal): absent from official checkpoints by design
NEW_HEAD_PREFIXES = ("uni_image_head.", "uni_text_head.")


def load_into(module: nn.Module, state: dict[str, torch.Tensor], ignored: Iterable[str] = ()) -> LoadReport:
    """Copy matching tensors into ``module``; resize ViT position embeddings whose grid
    differs; report the rest. Never raises on a mismatch: the report says what happened.
    Unimodal heads that the checkpoint lacks are reported as ``new``; heads that the
    checkpoint has and the model lacks (their loss is off here) as ``unexpected``."""
    report = LoadReport(ignored=list(ignored))
    own = module.state_dict()
    with torch.no_grad():
        for key, target in own.items():
            if key not in state:
                (report.new if key.startswith(NEW_HEAD_PREFIXES) else report.missing).append(key)
                continue
            value = state[key]
            if value.shape != target.shape:
                if key.endswith("pos_embed") and value.ndim == 3 and value.shape[-1] == target.shape[-1]:
                    value = resize_pos_embed(value, target.shape[1] - 1)  # CLS kept, grid resized
                    report.resized.append(key)
                elif value.numel() == target.numel() and key.endswith("temp"):
                    value = value.reshape(target.shape)  # ALBEF stores a 0-dim temperature
                else:
                    report.skipped.append(f"{key} {tuple(value.shape)} vs model {tuple(target.shape)}")
                    continue
            target.copy_(value.to(target.dtype))
            report.loaded.append(key)
    report.unexpected = sorted(set(state) - set(own))
    return report


# -------------------------------------------------------------- official ALBEF
# keys of official checkpoints that have no counterpart here by design
_IGNORED = re.compile(r"(^|\.)position_ids$|(^|\.)pooler\.|cls\.predictions\.decoder\.|cls\.seq_relationship")


def albef_to_ours(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """Rename an official ALBEF state dict to this project's names.

    Pretraining layout: ``text_encoder.bert.*`` / ``text_encoder.cls.predictions.*``;
    retrieval layout: ``text_encoder.*`` without ``bert.`` and no MLM head. Returns
    (renamed state, ignored keys, layout)."""
    layout = "pretrain" if any(".bert." in k for k in state) else "retrieval"
    out, ignored = {}, []
    for key, value in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if _IGNORED.search(k):
            ignored.append(key)
            continue
        k = re.sub(r"^(text_encoder(_m)?)\.bert\.", r"\1.", k)
        k = re.sub(r"^text_encoder(_m)?\.cls\.predictions\.", lambda m: f"mlm_head{m.group(1) or ''}.", k)
        if k == "temp" and value.ndim == 0:
            value = value.reshape(1)
        out[k] = value
    return out, ignored, layout


def _max_index(state: dict, pattern: str) -> int:
    idx = [int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m]
    return max(idx) + 1 if idx else 0


def infer_model_config(state: dict[str, torch.Tensor], base: Optional[ModelConfig] = None,
                       layout: Optional[str] = None) -> ModelConfig:
    """Architecture sizes from tensor shapes (renamed to our keys); the rest from ``base``.

    Head counts and special-token ids cannot be read off shapes: they come from ``base``
    (heads only while they divide the checkpoint's width, else width / 64, the BERT/ViT
    convention)."""
    cfg = copy.deepcopy(base) if base is not None else ModelConfig()
    v, t = cfg.vision, cfg.text

    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"checkpoint has no '{key}'; is it an ALBEF model checkpoint?")
        return state[key]

    width = need("visual_encoder.cls_token").shape[-1]
    patch = need("visual_encoder.patch_embed.proj.weight").shape[-1]
    if width % v.heads:
        v.heads = max(1, width // 64)
    v.width, v.patch_size = width, patch
    v.depth = _max_index(state, r"visual_encoder\.blocks\.(\d+)\.")
    v.mlp_ratio = need("visual_encoder.blocks.0.mlp.fc1.weight").shape[0] / width
    grid = int(round((need("visual_encoder.pos_embed").shape[1] - 1) ** 0.5))
    cfg.image_res = grid * patch

    vocab, twidth = need("text_encoder.embeddings.word_embeddings.weight").shape
    if twidth % t.heads:
        t.heads = max(1, twidth // 64)
    t.vocab_size, t.width = vocab, twidth
    t.layers = _max_index(state, r"text_encoder\.encoder\.layer\.(\d+)\.")
    cross = [int(m.group(1)) for k in state
             for m in [re.match(r"text_encoder\.encoder\.layer\.(\d+)\.crossattention\.", k)] if m]
    t.fusion_layer = min(cross) if cross else t.layers
    t.intermediate = need("text_encoder.encoder.layer.0.intermediate.dense.weight").shape[0]
    t.max_position = need("text_encoder.embeddings.position_embeddings.weight").shape[0]
    t.type_vocab_size = need("text_encoder.embeddings.token_type_embeddings.weight").shape[0]

    cfg.embed_dim = need("vision_proj.weight").shape[0]
    if "image_queue" in state:
        cfg.queue_size = state["image_queue"].shape[1]
    if layout is not None:
        cfg.retrieval = layout == "retrieval"
    return cfg


def convert_albef(src: str, out_dir: str, config: Optional[Config] = None) -> tuple[Config, LoadReport]:
    """Official ALBEF ``.pth`` -> ``out_dir/model.safetensors`` + ``out_dir/config.yaml``."""
    raw = read_state_dict(src)
    state, ignored, layout = albef_to_ours(raw)
    cfg = copy.deepcopy(config) if config is not None else Config()
    cfg.model = infer_model_config(state, cfg.model, layout)
    # ALBEF's tokenizer emits "[CLS] text" with no trailing [SEP]; match what it was trained on
    cfg.data.add_sep = False
    cfg.validate()
    from .models.albef import ALBEF
    model = ALBEF(cfg.model)
    report = load_into(model, state, ignored)
    _finish_load(model, report)
    export_model(model, cfg, out_dir)
    return cfg, report


_QUEUES = ("image_queue", "text_queue", "queue_ptr", "idx_queue")


def _is_momentum(key: str) -> bool:
    return key.split(".")[0].endswith("_m")


def _finish_load(model: nn.Module, report: LoadReport) -> None:
    """Momentum copies missing from a checkpoint start from the (loaded) online weights."""
    if any(_is_momentum(k) for k in report.missing):
        model.copy_params()
    if any(k.split(" ")[0] in _QUEUES for k in report.skipped):  # queue of another size: start empty
        model.queue_ptr.zero_()


# ------------------------------------------------------------------ HF BERT
def text_config_from_hf(path: str, base: Optional[TextConfig] = None) -> TextConfig:
    """A :class:`TextConfig` from an HF BERT ``config.json`` (directory or file)."""
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json (expected an HF BERT checkpoint directory)")
    with open(cfg_path, encoding="utf-8") as f:
        hf = json.load(f)
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{cfg_path}: hidden_act '{act}' is not supported (the text encoder uses exact GELU)")
    t = copy.deepcopy(base) if base is not None else TextConfig()
    t.vocab_size = hf["vocab_size"]
    t.width = hf["hidden_size"]
    t.layers = hf["num_hidden_layers"]
    t.heads = hf["num_attention_heads"]
    t.intermediate = hf["intermediate_size"]
    t.max_position = hf["max_position_embeddings"]
    t.type_vocab_size = hf.get("type_vocab_size", 2)
    t.layer_norm_eps = hf.get("layer_norm_eps", 1e-12)
    t.pad_token_id = hf.get("pad_token_id", 0) or 0
    if "fusion_layer" in hf:
        t.fusion_layer = hf["fusion_layer"]
    t.fusion_layer = min(t.fusion_layer, t.layers)
    return t


def hf_bert_state(path: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Split an HF BERT checkpoint into (text encoder state, MLM head state, ignored keys)."""
    state = None
    for name in ("model.safetensors", "pytorch_model.bin"):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            state = read_state_dict(p)
            break
    if state is None:
        raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin")
    text, head, ignored = {}, {}, []
    for key, value in state.items():
        k = key[len("bert."):] if key.startswith("bert.") else key
        if _IGNORED.search(k) or k.startswith("pooler."):
            ignored.append(key)
        elif k.startswith("cls.predictions."):
            head[k[len("cls.predictions."):]] = value
        elif k.startswith(("embeddings.", "encoder.")):
            text[k] = value
        else:
            ignored.append(key)
    return text, head, ignored


def check_text_fits(t: TextConfig, path: str) -> None:
    """Refuse an HF checkpoint whose sizes differ from ``model.text``, naming each key."""
    hf = text_config_from_hf(path)
    diffs = [f"model.text.{k}={getattr(t, k)} but {path} has {getattr(hf, k)}"
             for k in ("vocab_size", "width", "heads", "intermediate", "max_position")
             if getattr(t, k) != getattr(hf, k)]
    if t.layers > hf.layers:
        diffs.append(f"model.text.layers={t.layers} but {path} has only {hf.layers}")
    if diffs:
        raise ConfigError("the text checkpoint does not fit the configured text encoder:\n  " + "\n  ".join(diffs))


def load_hf_bert(model: nn.Module, path: str) -> LoadReport:
    """HF BERT weights into ``model.text_encoder`` (and ``model.mlm_head`` when present).

    Cross-attention blocks are new in ALBEF and stay at their initialisation (reported
    missing). Momentum copies are refreshed from the loaded weights."""
    text, head, ignored = hf_bert_state(path)
    report = load_into(model.text_encoder, text, ignored)
    if getattr(model, "mlm_head", None) is not None and head:
        h = load_into(model.mlm_head, head)
        report.loaded += [f"mlm_head.{k}" for k in h.loaded]
        report.missing += [f"mlm_head.{k}" for k in h.missing]
        report.unexpected += [f"cls.predictions.{k}" for k in h.unexpected]
    if hasattr(model, "copy_params"):
        model.copy_params()
    return report


def load_vision_weights(model: nn.Module, path: str) -> LoadReport:
    """A timm/DeiT/ALBEF ViT state dict into ``model.visual_encoder`` (position embeddings
    resized; classifier heads ignored; ``visual_encoder.`` prefixes accepted)."""
    state = read_state_dict(path)
    if any(k.startswith("visual_encoder.") for k in state):
        state = {k[len("visual_encoder."):]: v for k, v in state.items() if k.startswith("visual_encoder.")}
    ignored = [k for k in state if k.startswith(("head", "fc_norm", "dist_token", "pre_logits"))]
    state = {k: v for k, v in state.items() if k not in ignored}
    if "dist_token" in ignored and "pos_embed" in state:  # DeiT-distilled: drop the distillation position
        pe = state["pos_embed"]
        state["pos_embed"] = torch.cat([pe[:, :1], pe[:, 2:]], dim=1)
    report = load_into(model.visual_encoder, state, ignored)
    if hasattr(model, "copy_params"):
        model.copy_params()
    return report


# -------------------------------------------------------------- export / load
def export_model(model: nn.Module, cfg: Config, out_dir: str) -> str:
    """Write ``model.safetensors`` (every weight, momentum copies and queues included) and
    the resolved ``config.yaml``; files appear atomically."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path = os.path.join(out_dir, MODEL_FILE)
    tmp = path + ".tmp"
    save_file(state, tmp, metadata={"format": "pt", "albef_bal": "1"})
    os.replace(tmp, path)
    tmp_cfg = os.path.join(out_dir, CONFIG_FILE + ".tmp")
    save_config(cfg, tmp_cfg)
    os.replace(tmp_cfg, os.path.join(out_dir, CONFIG_FILE))
    bundle_tokenizer(cfg.data.tokenizer, out_dir)
    return path


TOKENIZER_DIR = "tokenizer"
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def bundle_tokenizer(spec: str, out_dir: str) -> Optional[str]:
    """Copy a local tokenizer (a vocab.txt or tokenizer.json file, or a tokenizer directory)
    into ``out_dir/tokenizer/``, so that the export works wherever it is moved: the config's
    ``data.tokenizer`` is often a path relative to the training run's working directory.
    A Hub name is left alone (it resolves through the Hugging Face cache). Returns the copy."""
    import shutil
    if not spec:
        return None
    if os.path.isfile(spec):
        folder = os.path.dirname(os.path.abspath(spec))
        main = "tokenizer.json" if spec.endswith(".json") else "vocab.txt"
        files = {main: os.path.abspath(spec)}
        side = os.path.join(folder, "tokenizer_config.json")  # its lower-casing flag
        if main == "vocab.txt" and os.path.isfile(side):
            files["tokenizer_config.json"] = side
    elif os.path.isdir(spec):
        files = {n: os.path.join(spec, n) for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(spec, n))}
    else:
        return None
    if not files:
        return None
    dest = os.path.join(out_dir, TOKENIZER_DIR)
    if os.path.abspath(dest) == os.path.abspath(os.path.dirname(next(iter(files.values())))):
        return dest  # the config already points at this export's copy
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, src in files.items():
        shutil.copyfile(src, os.path.join(tmp, name))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def load_pretrained(path: str, config: Optional[str] = None, overrides: Sequence[str] = (),
                    retrieval: Optional[bool] = None, image_res: Optional[int] = None,
                    strict: bool = True, verbose: bool = False):
    """A ready ALBEF model (eval mode) from an exported directory or an official ``.pth``.

    - directory: ``config.yaml`` + ``model.safetensors`` as written by ``export_model``;
    - ``.pth``/``.safetensors`` file: official ALBEF layout; sizes are inferred from the
      tensor shapes, the rest from ``config`` (YAML) and ``overrides``.
    ``retrieval`` switches model kind (pretraining weights into a retrieval model or back),
    ``image_res`` changes resolution (position embeddings are resized). With ``strict``,
    online weights missing from the checkpoint raise :class:`CheckpointError`.
    """
    from .models.albef import ALBEF
    cfg_path = os.path.join(path, CONFIG_FILE) if os.path.isdir(path) else None
    if cfg_path is not None and os.path.isfile(cfg_path):
        cfg = load_config([cfg_path] + ([config] if config else []), overrides)
        state = read_state_dict(path)
        ignored: list[str] = []
    else:
        cfg = load_config(config, overrides) if (config or overrides) else Config()
        state, ignored, layout = albef_to_ours(read_state_dict(path))
        cfg.model = infer_model_config(state, cfg.model, layout)
        cfg.data.add_sep = False
    if retrieval is not None:
        cfg.model.retrieval = retrieval
        if retrieval and cfg.model.unimodal.text == "mlm":
            # a retrieval model masks no captions: the unimodal MLM head is reported unused
            cfg.model.unimodal.text = "none"
    if image_res is not None:
        cfg.model.image_res = image_res
    cfg.validate()
    model = ALBEF(cfg.model)
    if cfg.model.retrieval:  # pretraining MLM heads have no place in a retrieval model
        mlm = [k for k in state if k.startswith(("mlm_head.", "mlm_head_m."))]
        ignored += mlm
        state = {k: v for k, v in state.items() if k not in mlm}
    report = load_into(model, state, ignored)
    if strict:
        online_missing = [k for k in report.missing if not _is_momentum(k) and k not in _QUEUES]
        bad_shapes = [k for k in report.skipped if k.split(" ")[0] not in _QUEUES]
        if online_missing or bad_shapes:
            raise CheckpointError(f"{path} does not fit the model:\n{report}")
    _finish_load(model, report)
    if verbose:
        print(report)
    model.config = cfg  # the resolved config travels with the model
    model.load_report = report
    return model.eval()
