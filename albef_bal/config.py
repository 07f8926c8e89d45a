"""Typed configuration: a dataclass schema, YAML files, dotted overrides, validation.

A config is built in three layers, later ones winning:

1. the defaults below (the paper's settings for ALBEF-base),
2. one or more YAML files (a file may name others in ``_base_`` to inherit from),
3. ``--set section.key=value`` overrides from the command line (values parsed as YAML).

Everything is checked before any computation starts: unknown keys (with a suggestion),
wrong types and impossible combinations raise :class:`ConfigError` naming the dotted key.

Each section is a plain dataclass. To add a setting, add a typed field with a default and,
if it constrains other fields, a check in that section's ``validate``.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and file, where known)."""


# --------------------------------------------------------------------------- schema
@dataclass
class VisionConfig:
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    # "vit": the built-in ViT (timm parameter names, no timm needed). Any other value is
    # a timm model name (e.g. "vit_base_patch16_224"); that needs `pip install .[timm]`.
    backbone: str = "vit"
    drop_path: float = 0.0
    init_std: float = 0.02

    def validate(self, key: str) -> None:
        _positive(self, key, "patch_size", "width", "depth", "heads", "mlp_ratio")
        if self.width % self.heads:
            raise ConfigError(f"{key}.width ({self.width}) must be divisible by {key}.heads ({self.heads})")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"{key}.drop_path must be in [0, 1), got {self.drop_path}")


@dataclass
class TextConfig:
    vocab_size: int = 30522
    width: int = 768
    layers: int = 12
    # layers [0, fusion_layer) read text only; [fusion_layer, layers) add cross-attention
    fusion_layer: int = 6
    heads: int = 12
    intermediate: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    # on the CPU, draw training dropout masks from 16-bit lanes of the generator's 64-bit words
    # and run training attention without SDPA's math path (same distribution, about 4x cheaper
    # masks; bench/NOTES.md section 7);
    # false keeps torch's bernoulli masks and SDPA, bit-identical to releases before the switch.
    # No effect on GPUs (torch's fused dropout) or without dropout (evaluation).
    fast_dropout: bool = True
    # run the text layers' per-token work (linear layers, GELU, dropout, LayerNorm) on the real
    # tokens only, packed into one [tokens, width] tensor, and lay them out as [batch, length]
    # only for attention: padded positions cost nothing. The same function of the real tokens;
    # dropout masks are drawn over the packed tensor, so with dropout they are other draws than
    # with false. Outputs at padded positions are 0 (garbage that nothing reads otherwise)
    pack: bool = False
    init_std: float = 0.02
    # special token ids (BERT wordpiece defaults); set from the tokenizer when it differs
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103

    def validate(self, key: str) -> None:
        _positive(self, key, "vocab_size", "width", "layers", "heads", "intermediate", "max_position")
        if self.width % self.heads:
            raise ConfigError(f"{key}.width ({self.width}) must be divisible by {key}.heads ({self.heads})")
        if not 0 <= self.fusion_layer <= self.layers:
            raise ConfigError(
                f"{key}.fusion_layer must be in [0, {key}.layers={self.layers}], got {self.fusion_layer}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{key}.dropout must be in [0, 1), got {self.dropout}")

    def check_token_ids(self, key: str = "model.text") -> None:
        """Special ids inside the vocabulary. Checked when the model is built, after the
        tokenizer has written its ids (``sync_text_config``), not at config load."""
        for name in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id"):
            v = getattr(self, name)
            if not 0 <= v < self.vocab_size:
                raise ConfigError(f"{key}.{name}={v} is outside the vocabulary (vocab_size={self.vocab_size}); "
                                  f"set data.tokenizer (its ids are copied in) or {key}.{name}")


@dataclass
class LossWeights:
    itc: float = 1.0
    itm: float = 1.0
    mlm: float = 1.0
    # unimodal feature-space losses (model.unimodal); used only when that loss is on
    uni_image: float = 1.0
    uni_text: float = 1.0


@dataclass
class ViewAugmentConfig:
    """The second image view of ``model.unimodal.image``: tensor ops on the normalised batch,
    each image with its own random strengths. Nothing here moves, crops, flips or recolours
    an object, so a caption that names positions, sizes and colours stays true."""
    noise: float = 0.04  # Gaussian pixel noise std, drawn uniformly in [0, noise] (share of the 0-1 range)
    blur: float = 0.6  # Gaussian blur sigma in pixels, drawn uniformly in [0, blur]
    brightness: float = 0.1  # pixel values x factor in [1 - b, 1 + b]
    contrast: float = 0.1  # distance from the image mean x factor in [1 - c, 1 + c]

    def validate(self, key: str) -> None:
        for name in ("noise", "blur", "brightness", "contrast"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("brightness", "contrast"):
            if getattr(self, name) >= 1:
                raise ConfigError(f"{key}.{name} must be < 1 (a factor in [1 - x, 1 + x]), got {getattr(self, name)}")
        if self.noise == self.blur == self.brightness == self.contrast == 0:
            raise ConfigError(f"{key}: every augmentation strength is 0, so the two views would be identical")


@dataclass
class SimSiamConfig:
    dim: int = 2048  # projector output (SimSiam: 2048)
    pred_dim: int = 512  # predictor bottleneck (SimSiam: 512)


@dataclass
class SimCLRConfig:
    mlp_dim: int = 4096  # hidden width of the 3-layer head (SLIP: 4096)
    dim: int = 256  # output width (SLIP: 256)
    temperature: float = 0.1  # SLIP: 0.1


@dataclass
class SimCSEConfig:
    temperature: float = 0.05  # SimCSE: 0.05


@dataclass
class UnimodalConfig:
    """Feature-space losses per tower (albef_bal/models/unimodal.py). ``none`` adds nothing:
    no parameters, no work, the same outputs as without this section."""
    image: Literal["none", "simsiam", "simclr"] = "none"
    text: Literal["none", "mlm", "simcse"] = "none"
    # "clean+aug": the first view is the training image itself, whose features the ITC pass
    # already computed (one extra image pass); "aug+aug": two augmented views (two passes)
    views: Literal["clean+aug", "aug+aug"] = "clean+aug"
    augment: ViewAugmentConfig = field(default_factory=ViewAugmentConfig)
    simsiam: SimSiamConfig = field(default_factory=SimSiamConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    simcse: SimCSEConfig = field(default_factory=SimCSEConfig)

    @property
    def enabled(self) -> bool:
        return self.image != "none" or self.text != "none"

    def validate(self, key: str) -> None:
        if self.image != "none":
            self.augment.validate(f"{key}.augment")
        _positive(self.simsiam, f"{key}.simsiam", "dim", "pred_dim")
        _positive(self.simclr, f"{key}.simclr", "mlp_dim", "dim", "temperature")
        _positive(self.simcse, f"{key}.simcse", "temperature")


@dataclass
class ModelConfig:
    image_res: int = 256
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256
    queue_size: int = 65536
    momentum: float = 0.995
    temp: float = 0.07
    alpha: float = 0.4
    mlm_probability: float = 0.15
    # momentum distillation of ITC and MLM targets (alpha > 0); False = one-hot targets
    distill: bool = True
    # retrieval fine-tuning model: image-id positives, id queue, no MLM
    retrieval: bool = False
    loss_weights: LossWeights = field(default_factory=LossWeights)
    unimodal: UnimodalConfig = field(default_factory=UnimodalConfig)
    # recompute ViT/BERT layer activations in backward (saves memory, costs ~30% time)
    grad_checkpointing: bool = False
    # optional initial weights: an HF BERT directory for the text encoder, a timm/DeiT
    # state dict (.pth/.safetensors) for the image encoder
    init_text: Optional[str] = None
    init_vision: Optional[str] = None

    def validate(self, key: str) -> None:
        self.vision.validate(f"{key}.vision")
        self.text.validate(f"{key}.text")
        _positive(self, key, "image_res", "embed_dim", "queue_size", "temp")
        if self.image_res % self.vision.patch_size:
            raise ConfigError(f"{key}.image_res ({self.image_res}) must be a multiple of "
                              f"{key}.vision.patch_size ({self.vision.patch_size})")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"{key}.momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"{key}.alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"{key}.mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if not 0.001 <= self.temp <= 0.5:
            raise ConfigError(f"{key}.temp must be in the clamp range [0.001, 0.5], got {self.temp}")
        if self.text.fusion_layer == self.text.layers:
            raise ConfigError(f"{key}.text.fusion_layer equals {key}.text.layers ({self.text.layers}): "
                              "ALBEF needs at least one fusion (cross-attention) layer")
        self.unimodal.validate(f"{key}.unimodal")
        if self.unimodal.text == "mlm" and self.retrieval:
            raise ConfigError(f"{key}.unimodal.text=mlm needs the masked captions of pretraining; the retrieval "
                              f"model ({key}.retrieval=true) has no MLM: use simcse or none")
        if self.unimodal.text == "simcse" and self.text.dropout == 0:
            raise ConfigError(f"{key}.unimodal.text=simcse takes its two views from dropout, but "
                              f"{key}.text.dropout is 0: the views would be identical")


@dataclass
class DataConfig:
    # pretraining shards: a path, brace pattern ("shards/{00000..00099}.tar"), "pipe:" URL,
    # a directory of .tar files, or a list of them
    train_shards: Union[str, list[str]] = ""
    # fine-tuning: an ALBEF-format annotation JSON (one entry per caption, with image_id)
    # and the directory its "image" paths are relative to (default: the JSON's directory)
    train_json: Optional[str] = None
    train_image_root: Optional[str] = None
    # a retrieval split for validation/evaluation: annotation JSON (+ image_root) or shards
    val_split: Optional[str] = None
    val_image_root: Optional[str] = None
    test_split: Optional[str] = None
    test_image_root: Optional[str] = None
    # tokenizer: a directory with vocab.txt (HF layout) or a vocab.txt file
    tokenizer: str = "bert-base-uncased"
    max_len: int = 25
    max_words: int = 30
    # BERT adds [SEP] after the text; ALBEF's own tokenizer does not (set False to match it)
    add_sep: bool = True
    num_workers: int = 4
    shuffle_buffer: int = 2000
    # pretraining epoch length in samples (all ranks together); the shard stream is endless
    samples_per_epoch: int = 0
    # augmentation: RandomResizedCrop(scale=(crop_scale_min, 1)), flip, RandAugment(n, m)
    rand_aug: bool = True
    rand_aug_n: int = 2
    rand_aug_m: int = 7
    crop_scale_min: float = 0.2
    finetune_crop_scale_min: float = 0.5
    # turn off for data whose captions name left and right (e.g. the synthetic corpus)
    hflip: bool = True
    # a shard that cannot be opened is retried this often, waiting delay, 2 x delay, ...
    shard_retries: int = 3
    shard_retry_delay: float = 1.0

    def validate(self, key: str) -> None:
        _positive(self, key, "max_len", "max_words")
        if self.max_len < 2 + int(self.add_sep):
            raise ConfigError(f"{key}.max_len ({self.max_len}) leaves no room for text after [CLS]"
                              f"{' and [SEP]' if self.add_sep else ''}")
        for name in ("num_workers", "shuffle_buffer", "samples_per_epoch", "rand_aug_n", "shard_retries"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.rand_aug_m <= 10:
            raise ConfigError(f"{key}.rand_aug_m is a magnitude on a 0-10 scale, got {self.rand_aug_m}")
        for name in ("crop_scale_min", "finetune_crop_scale_min"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"{key}.{name} must be in (0, 1], got {getattr(self, name)}")
        if self.shard_retry_delay < 0:
            raise ConfigError(f"{key}.shard_retry_delay must be >= 0, got {self.shard_retry_delay}")
        if self.train_image_root is not None and self.train_json is None:
            raise ConfigError(f"{key}.train_image_root is set but {key}.train_json is not")
        for split in ("val", "test"):
            if getattr(self, f"{split}_image_root") is not None and getattr(self, f"{split}_split") is None:
                raise ConfigError(f"{key}.{split}_image_root is set but {key}.{split}_split is not")


@dataclass
class TrainConfig:
    output_dir: str = "runs/pretrain"
    seed: int = 42
    epochs: int = 30
    # 0: epochs x steps per epoch; otherwise stop after this many optimizer steps
    max_steps: int = 0
    # per rank, per micro step; the global batch is micro x grad_accum x world size
    micro_batch_size: int = 64
    grad_accum: int = 1
    # optional: checked against micro_batch_size x grad_accum x world size at start-up
    global_batch_size: Optional[int] = None
    # DeepSpeed JSON (ZeRO knobs, communication); batch sizes, precision and clipping come
    # from this section and must not contradict the JSON
    deepspeed_config: str = "configs/deepspeed/zero1.json"
    # overrides the JSON's zero_optimization.stage
    zero_stage: Optional[int] = None
    # fp32 weights always; bf16/fp16 autocast the forward (DeepSpeed's torch_autocast)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_lr: float = 1e-5
    warmup_steps: int = 2000
    weight_decay: float = 0.02
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 0.0  # 0 = off (ALBEF does not clip)
    # distillation weight ramps from 0 over the first epoch (ALBEF); False = constant alpha
    alpha_warmup: bool = True
    save_every: int = 1000  # optimizer steps between checkpoints (0 = only at the end)
    keep_last: int = 3
    log_every: int = 10
    max_nonfinite: int = 10  # consecutive non-finite losses before stopping with a checkpoint
    # "auto" = newest complete checkpoint in output_dir (fresh start when none); or a path
    resume: Optional[str] = None
    # --resume auto when the newest checkpoint is damaged (a file missing, truncated or holding
    # unsafe objects): true = name it and resume from the newest intact one; false = refuse
    resume_fallback: bool = True
    # true: load resumed checkpoints with DeepSpeed's full unpickler, which runs code a file
    # may contain; only for checkpoints you made yourself and that the safe check refuses
    trust_checkpoint: bool = False
    # retrieval fine-tuning starts from these weights: an export directory (model.safetensors
    # + config.yaml) or an official ALBEF .pth (converted on the fly)
    init_from: Optional[str] = None
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "albef_bal"
    threads: int = 0  # torch CPU threads per rank (0 = torch's default)
    compile: bool = False  # torch.compile the encoders' layers (optional speed-up; never required)

    def validate(self, key: str) -> None:
        _positive(self, key, "epochs", "micro_batch_size", "grad_accum", "lr", "keep_last", "log_every",
                  "max_nonfinite")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{key}.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.max_steps < 0 or self.save_every < 0 or self.warmup_steps < 0 or self.threads < 0:
            raise ConfigError(f"{key}.max_steps, save_every, warmup_steps and threads must be >= 0")
        if not 0 < self.min_lr <= self.lr or not 0 < self.warmup_lr:
            raise ConfigError(f"{key}: need 0 < min_lr <= lr and warmup_lr > 0 "
                              f"(min_lr={self.min_lr}, lr={self.lr}, warmup_lr={self.warmup_lr})")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{key}.betas must be two numbers in [0, 1), got {self.betas}")
        if self.global_batch_size is not None and self.global_batch_size % (self.micro_batch_size * self.grad_accum):
            raise ConfigError(f"{key}.global_batch_size ({self.global_batch_size}) is not a multiple of "
                              f"micro_batch_size x grad_accum ({self.micro_batch_size} x {self.grad_accum})")
        if self.resume not in (None, "auto") and not self.resume:
            raise ConfigError(f"{key}.resume must be 'auto', a checkpoint path, or null")


@dataclass
class OGMGEConfig:
    """OGM-GE (Peng et al., CVPR 2022); see albef_bal/balance/ogm.py."""
    alpha: float = 0.8  # k = 1 - tanh(alpha * rho) for the dominant branch (authors' CREMA-D run: 0.8)
    # "grad": scale the dominant branch's gradient by k (faithful); "lr": scale its learning
    # rate by k for that step (adaptation for Adam-family optimizers); "moment": scale only
    # the gradient entering AdamW's first moment (GainAdamW's m_gain; new here)
    mode: Literal["grad", "lr", "moment"] = "grad"
    # "ogm": k = 1 - tanh(alpha * rho) for the leader only (Peng et al.); "mlb": both
    # branches, k = 1 + tanh(alpha * (s_other / s_self - 1)) (Kontras et al., BMVC 2024)
    rule: Literal["ogm", "mlb"] = "ogm"
    start_epoch: int = 0  # modulate in epochs start_epoch..end_epoch, both inclusive (0-based)
    end_epoch: int = 50
    ge: bool = True  # add the generalisation-enhancement noise
    # where GE noise goes: "grad" (the authors': both Adam moments see it) or "moment" (the
    # gradient entering the first moment only)
    ge_into: Literal["grad", "moment"] = "grad"

    def validate(self, key: str) -> None:
        if self.alpha < 0:
            raise ConfigError(f"{key}.alpha must be >= 0, got {self.alpha}")
        if self.start_epoch < 0 or self.end_epoch < self.start_epoch:
            raise ConfigError(f"{key}: need 0 <= start_epoch <= end_epoch, got start_epoch={self.start_epoch}, "
                              f"end_epoch={self.end_epoch}")


@dataclass
class GBlendConfig:
    """Gradient Blending (Wang et al., CVPR 2020); see albef_bal/balance/gblend.py.
    Weights order: [vision ITC half (i2t), text ITC half (t2i), multimodal (ITM + MLM)]."""
    # "offline": fixed weights (weights or weights_file); "online": re-estimated every window
    mode: Literal["offline", "online"] = "offline"
    weights: Optional[list[float]] = None
    weights_file: Optional[str] = None  # JSON written by `albef-bal gblend-estimate`
    # rescale weights so that they sum to 3 (equal weights = ALBEF's unweighted loss)
    sum_to_count: bool = True
    window: int = 1000  # optimizer steps between two loss measurements (online / estimate)
    # equal-size subsets for the train / held-out loss measurements (retrieval splits:
    # annotation JSON or shards); val_split defaults to data.val_split
    train_split: Optional[str] = None
    train_image_root: Optional[str] = None
    val_split: Optional[str] = None
    val_image_root: Optional[str] = None
    samples: int = 256  # pairs per subset
    eps: float = 1e-8  # floor of O_k^2
    # where the held-out subset comes from: "val_split" (above); "train_shard": a training
    # shard that training then never reads (val_split if it names one, else the last shard
    # of data.train_shards), so both subsets share the training distribution
    holdout: Literal["val_split", "train_shard"] = "val_split"
    # each weight (normalised to sum 1) is raised to at least `floor`, the others scaled
    # down in proportion (0 = off); `uniform_mix` blends with equal weights:
    # w <- (1 - mix) w + mix / 3 (0 = off). Either keeps a loss that stopped improving trainable
    floor: float = 0.0
    uniform_mix: float = 0.0
    # the loss measurements: distillation weight (null = model.alpha, as in training; 0 = none)
    # and whether ITC also scores against the queue (false: the batch's momentum features
    # only, so the measurement does not move with the queue's contents)
    measure_alpha: Optional[float] = None
    measure_queue: bool = True

    def validate(self, key: str) -> None:
        _positive(self, key, "window", "samples", "eps")
        if not 0.0 <= self.floor < 1.0 / 3.0:
            raise ConfigError(f"{key}.floor must be in [0, 1/3) (three weights summing to 1), got {self.floor}")
        if not 0.0 <= self.uniform_mix <= 1.0:
            raise ConfigError(f"{key}.uniform_mix must be in [0, 1], got {self.uniform_mix}")
        if self.measure_alpha is not None and not 0.0 <= self.measure_alpha <= 1.0:
            raise ConfigError(f"{key}.measure_alpha must be in [0, 1] or null, got {self.measure_alpha}")
        if self.weights is not None:
            if len(self.weights) != 3 or any(w < 0 for w in self.weights) or not sum(self.weights) > 0:
                raise ConfigError(f"{key}.weights must be 3 non-negative numbers with a positive sum "
                                  f"[vision, text, multimodal], got {self.weights}")
            if self.weights_file is not None:
                raise ConfigError(f"{key}.weights and {key}.weights_file are both set; keep one")


@dataclass
class MMParetoConfig:
    """MMPareto (Wei and Hu, ICML 2024); see albef_bal/balance/mmpareto.py."""
    gamma: float = 1.5
    # "tensor": the magnitude rescale per parameter tensor (the authors' code); "global":
    # one factor per branch (keeps the no-conflict guarantee for the final gradient)
    rescale: Literal["tensor", "global"] = "tensor"
    # "authors": the authors' two-vector solver; "clip": the literal clip to [0.001, 0.999]
    c_rule: Literal["authors", "clip"] = "authors"

    def validate(self, key: str) -> None:
        _positive(self, key, "gamma")


@dataclass
class RelearnConfig:
    """Diagnosing and Re-learning (Wei et al., ECCV 2024); see albef_bal/balance/relearn.py."""
    lam: float = 3.0  # alpha = tanh(lam * |P_train - P_val|)
    every: int = 1  # diagnose at the end of epochs every, 2*every, ... (0-based epochs > 0)
    max_times: int = 3
    # diagnostic subsets (retrieval splits: annotation JSON or shards); labels come from
    # their `cls` field when every sample has one, else from k-means pseudo-labels of the
    # initial (reference) encoders; val_split defaults to data.val_split
    train_split: Optional[str] = None
    train_image_root: Optional[str] = None
    val_split: Optional[str] = None
    val_image_root: Optional[str] = None
    samples: int = 512  # pairs per subset
    num_clusters: int = 10  # k of the pseudo-labels (labelled data: the number of classes)
    kmeans_iters: int = 25
    kmeans_redo: int = 5
    seed: int = 0
    # where the held-out subset comes from, as balance.gblend.holdout
    holdout: Literal["val_split", "train_shard"] = "val_split"
    # re-learn a branch only when |P_train - P_val| exceeds this many standard errors of the
    # gap (binomial: sqrt(P_t (1 - P_t) / N_t + P_v (1 - P_v) / N_v)); 0 = always (the authors')
    min_gap_se: float = 0.0

    def validate(self, key: str) -> None:
        _positive(self, key, "every", "samples", "num_clusters", "kmeans_iters", "kmeans_redo")
        if self.lam < 0 or self.max_times < 0 or self.min_gap_se < 0:
            raise ConfigError(f"{key}.lam, {key}.max_times and {key}.min_gap_se must be >= 0")


@dataclass
class WeakenConfig:
    """Weakening the leading modality's input (new here); see albef_bal/balance/weaken.py."""
    # images: "patch_drop" (FLIP-style patch-token dropout), "blur" or "downsample"
    image: Literal["patch_drop", "blur", "downsample"] = "patch_drop"
    # captions: "mask" (content words -> [MASK]) or "drop" (content words hidden from attention)
    text: Literal["mask", "drop"] = "mask"
    # strength of the leader = max_strength * tanh(beta * max(0, s_lead / s_lag - 1 - margin)):
    # the share of patches dropped / of content words weakened, or of blur_sigma / of the
    # resolution removed
    max_strength: float = 0.5
    beta: float = 2.0
    margin: float = 0.0
    blur_sigma: float = 2.0  # pixels at the model's resolution, at strength 1
    # content words exclude English function words (read from data.tokenizer's vocabulary);
    # false: every non-special token
    stopwords: bool = True
    # ablation control: fixed strengths [vision, text] at every step, whatever the scores
    # (the same input weakening without the balancing decision); null = from the scores
    constant: Optional[list[float]] = None

    def validate(self, key: str) -> None:
        if not 0.0 < self.max_strength <= 1.0:
            raise ConfigError(f"{key}.max_strength must be in (0, 1], got {self.max_strength}")
        if self.constant is not None and (len(self.constant) != 2 or not all(0.0 <= x <= 1.0 for x in self.constant)):
            raise ConfigError(f"{key}.constant must be two strengths in [0, 1] [vision, text], got {self.constant}")
        _positive(self, key, "beta", "blur_sigma")
        if self.margin < 0:
            raise ConfigError(f"{key}.margin must be >= 0, got {self.margin}")


@dataclass
class BalanceConfig:
    method: Literal["none", "ogm_ge", "gblend", "mmpareto", "relearn", "weaken"] = "none"
    # the branch score that the metrics log and the score-reading methods use
    # (albef_bal/balance/scores.py): "itc" = the ITC halves' positive probability (blind to
    # which modality is degraded); "uniformity" = held-out uniformity of each encoder's ITC
    # features, validated on corpora made imbalanced on purpose; "unimodal" = how far each
    # branch's own unimodal loss (model.unimodal) has fallen toward its floor since the first
    # step (needs both unimodal losses on; fails the validation: docs/study.md)
    score: Literal["itc", "uniformity", "unimodal"] = "itc"
    # optimizer steps between two held-out measurements (uniformity); the running-mean window
    # of the unimodal losses (unimodal)
    score_every: int = 10
    score_split: Optional[str] = None  # held-out retrieval split; null = data.val_split
    score_samples: int = 256  # held-out pairs (first images of the split, first caption each)
    ogm_ge: OGMGEConfig = field(default_factory=OGMGEConfig)
    gblend: GBlendConfig = field(default_factory=GBlendConfig)
    mmpareto: MMParetoConfig = field(default_factory=MMParetoConfig)
    relearn: RelearnConfig = field(default_factory=RelearnConfig)
    # the unimodal loss of each branch for MMPareto and G-Blend: "itc" = its ITC half (the
    # ALBEF adaptation); "ssl" = its feature-space loss of model.unimodal (a true unimodal
    # loss, as in the methods' papers; needs model.unimodal.image and .text on)
    unimodal_loss: Literal["itc", "ssl"] = "itc"
    weaken: WeakenConfig = field(default_factory=WeakenConfig)

    def validate(self, key: str) -> None:
        for name in ("ogm_ge", "gblend", "mmpareto", "relearn", "weaken"):
            getattr(self, name).validate(f"{key}.{name}")
        _positive(self, key, "score_every")
        if self.score_samples < 2:
            raise ConfigError(f"{key}.score_samples must be >= 2, got {self.score_samples}")


@dataclass
class MetaInitConfig:
    """``albef-bal meta-init``: a first-order meta-learned initialisation (albef_bal/meta_init.py).
    Every outer step trains copies of the model for ``inner_steps`` ALBEF steps on each of
    ``tasks_per_step`` small class-balanced tasks and moves the weights toward the result."""
    # "reptile" (Nichol et al. 2018): theta += eps * mean(theta_task - theta);
    # "fomaml": theta += eps * mean(last inner update of each task) (first-order MAML as the
    # Reptile authors code it)
    algorithm: Literal["reptile", "fomaml"] = "reptile"
    outer_steps: int = 100
    tasks_per_step: int = 1  # Reptile's meta batch
    inner_steps: int = 8
    inner_batch: int = 0  # pairs per inner step; 0 = train.micro_batch_size
    inner_lr: Optional[float] = None  # None = train.lr
    inner_betas: list[float] = field(default_factory=lambda: [0.0, 0.999])  # the Reptile authors' Adam: beta1 = 0
    meta_step: float = 1.0  # eps, annealed linearly to meta_step_final over the outer steps
    meta_step_final: float = 0.0
    # where tasks come from (a retrieval split: annotation JSON or shards; default data.train_shards)
    split: Optional[str] = None
    image_root: Optional[str] = None
    pool: int = 2000  # pairs read from the split (its first ones)
    # the label a task is balanced over: cls, or an attribute / probe target of the synthetic
    # corpus (its probe targets: anchor_colour, anchor_shape, num_objects, anchor_relation, ...)
    balance_by: str = "cls"
    shots: int = 8  # pairs per class in a task
    classes_per_task: int = 0  # classes drawn per task; 0 = all
    alpha: float = 0.0  # distillation weight in the inner runs (ALBEF starts its ramp at 0)
    output_dir: str = "runs/meta_init"

    def validate(self, key: str) -> None:
        _positive(self, key, "outer_steps", "tasks_per_step", "inner_steps", "pool", "shots", "meta_step")
        if self.inner_batch < 0 or self.classes_per_task < 0:
            raise ConfigError(f"{key}.inner_batch and {key}.classes_per_task must be >= 0")
        if self.inner_lr is not None and self.inner_lr <= 0:
            raise ConfigError(f"{key}.inner_lr must be > 0 (or null for train.lr), got {self.inner_lr}")
        if len(self.inner_betas) != 2 or not all(0 <= b < 1 for b in self.inner_betas):
            raise ConfigError(f"{key}.inner_betas must be two numbers in [0, 1), got {self.inner_betas}")
        if not 0 <= self.meta_step_final <= self.meta_step <= 1:
            raise ConfigError(f"{key}: need 0 <= meta_step_final <= meta_step <= 1, got "
                              f"{self.meta_step_final} and {self.meta_step}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"{key}.alpha must be in [0, 1], got {self.alpha}")


@dataclass
class EvalConfig:
    """Retrieval evaluation (albef_bal/eval/retrieval.py): ITC top-k, then ITM re-ranking."""
    # candidates re-ranked by ITM per query (ALBEF: 256 COCO, 128 Flickr30K); 0 = ITC only
    k_test: int = 256
    # "itm": the ITM match logit (ALBEF); "itm+sim": logit + ITC similarity (LAVIS)
    score: Literal["itm", "itm+sim"] = "itm"
    batch_size: int = 64  # images / captions per encoder call
    rerank_batch: int = 256  # candidate pairs per fusion call
    image_chunk: int = 64  # images whose tokens sit on the device at once during re-ranking
    # top-k search: "auto" = torch on GPU, faiss on CPU; faiss_index "hnsw" is approximate
    topk_backend: Literal["auto", "torch", "faiss"] = "auto"
    faiss_index: Literal["flat", "hnsw"] = "flat"
    # "auto": bf16 (fp16 where bf16 is missing) autocast on GPUs, fp32 on CPU
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    num_workers: int = 4  # image-decoding workers per rank
    save_topk: int = 0  # write the top N retrieved items per query (0 = off)
    # fine-tuning: also evaluate the starting weights on data.val_split before step 1
    at_start: bool = False

    def validate(self, key: str) -> None:
        if self.k_test < 0:
            raise ConfigError(f"{key}.k_test must be >= 0, got {self.k_test}")
        _positive(self, key, "batch_size", "rerank_batch", "image_chunk")
        if self.num_workers < 0 or self.save_topk < 0:
            raise ConfigError(f"{key}.num_workers and {key}.save_topk must be >= 0")


@dataclass
class DiagnoseConfig:
    """Imbalance diagnostics during training (albef_bal/eval/diagnostics.py; docs: Diagnostics).
    The learning speed per branch (``update_ratio_<branch>``) is logged at every log step."""
    every: int = 0  # optimizer steps between two diagnoses on rank 0 (0 = off)
    # held-out retrieval split (annotation JSON or shards); default data.val_split
    split: Optional[str] = None
    image_root: Optional[str] = None
    samples: int = 256  # the split's first N images
    probes: bool = True  # probe gains over the initialisation (when the split has probe targets)
    # probe features: mean of the encoder's output tokens (docs/study.md: why), its CLS token,
    # or the L2-normalised ITC projection
    features: Literal["pooled", "cls", "itc"] = "pooled"
    folds: int = 5
    bootstrap: int = 200  # resamples of the logged 95% intervals
    # ||theta_now - theta_last_log|| / ||theta_last_log|| per branch at log steps (rank 0 keeps
    # one fp32 copy of the trainable weights)
    update_ratio: bool = True

    def validate(self, key: str) -> None:
        if self.every < 0:
            raise ConfigError(f"{key}.every must be >= 0 (0 = off), got {self.every}")
        if self.folds < 2:
            raise ConfigError(f"{key}.folds must be >= 2, got {self.folds}")
        if self.samples < max(4, self.folds):
            raise ConfigError(f"{key}.samples must be >= 4 and >= {key}.folds, got {self.samples}")
        _positive(self, key, "bootstrap")
        if self.image_root is not None and self.split is None:
            raise ConfigError(f"{key}.image_root is set but {key}.split is not")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)
    meta_init: MetaInitConfig = field(default_factory=MetaInitConfig)

    def validate(self) -> "Config":
        """Check every section and the combinations across them; return self."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        if self.data.max_len > self.model.text.max_position:
            raise ConfigError(f"data.max_len ({self.data.max_len}) exceeds model.text.max_position "
                              f"({self.model.text.max_position})")
        if self.diagnose.every and not (self.diagnose.split or self.data.val_split):
            raise ConfigError("diagnose.every is set but neither diagnose.split nor data.val_split names a held-out "
                              "split to diagnose on")
        if self.balance.unimodal_loss == "ssl":
            if self.balance.method not in ("mmpareto", "gblend"):
                raise ConfigError(f"balance.unimodal_loss=ssl is read by balance.method mmpareto and gblend only, "
                                  f"not {self.balance.method!r}; leave it at itc")
            self.need_both_unimodal_losses("balance.unimodal_loss=ssl takes each branch's unimodal loss from "
                                           "model.unimodal")
        if self.balance.score == "unimodal":
            self.need_both_unimodal_losses("balance.score=unimodal reads each branch's own unimodal loss")
        if 0 < self.data.samples_per_epoch < self.train.micro_batch_size:
            raise ConfigError(f"data.samples_per_epoch ({self.data.samples_per_epoch}) is smaller than one "
                              f"micro batch (train.micro_batch_size={self.train.micro_batch_size})")
        return self

    def need_both_unimodal_losses(self, why: str) -> None:
        """Refuse, saying ``why``, unless model.unimodal has an image and a text loss on."""
        u = self.model.unimodal
        if "none" in (u.image, u.text):
            raise ConfigError(f"{why}: set model.unimodal.image (now {u.image!r}) and model.unimodal.text "
                              f"(now {u.text!r})")


def _positive(obj: Any, key: str, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is None or v <= 0:
            raise ConfigError(f"{key}.{name} must be > 0, got {v}")


# ------------------------------------------------------------------ dict <-> dataclass
def to_dict(cfg: Any) -> Any:
    """Plain dicts/lists (YAML-safe) from a config or any section of it."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def from_dict(cls: type, data: Any, key: str = "", source: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, strictly: unknown keys and wrong types raise."""
    where = f" (in {source})" if source else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'} must be a mapping, got {type(data).__name__}{where}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        full = f"{key}.{k}" if key else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"; did you mean '{(key + '.') if key else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{full}'{where}{hint}")
        kwargs[k] = _coerce(hints[k], v, full, source)
    return cls(**kwargs)


def _coerce(tp: Any, v: Any, key: str, source: str) -> Any:
    where = f" (in {source})" if source else ""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, v, key, source)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, v, key, source)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {v!r}{where}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if v not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {v!r}{where}")
        return v
    if origin in (list, tuple):
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {v!r}{where}")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(inner, x, f"{key}[{i}]", source) for i, x in enumerate(v)]
    if origin is dict:
        if not isinstance(v, dict):
            raise ConfigError(f"{key}: expected a mapping, got {v!r}{where}")
        _, inner = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(inner, x, f"{key}.{k}", source) for k, x in v.items()}
    if tp is Any:
        return v
    if tp is bool:
        if isinstance(v, bool):
            return v
    elif tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    elif tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(v)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(v, str):
            return v
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {v!r} ({type(v).__name__}){where}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + str(list(typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp))


# ------------------------------------------------------------------ shipped configs
def shipped_configs_dir() -> str:
    """The directory of the config presets that ship with the package.

    An installed wheel holds them as ``albef_bal/configs/`` (read through
    ``importlib.resources``); a source checkout or an editable install reads the top-level
    ``configs/`` beside the package, the one copy that users read and edit."""
    import importlib.resources
    packaged = importlib.resources.files("albef_bal") / "configs"
    if packaged.is_dir():
        return os.fspath(packaged)  # a plain directory for any installed (non-zipped) package
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def shipped_config_names() -> list[str]:
    """Names of the shipped presets, e.g. ``demo/tiny`` or ``deepspeed/zero2.json``."""
    root = shipped_configs_dir()
    names = []
    for folder, _, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/")
            if f.endswith(".yaml"):
                names.append(rel[:-len(".yaml")])
            elif f.endswith(".json"):
                names.append(rel)
    return sorted(names)


def resolve_config_path(spec: str, what: str = "config file") -> str:
    """A config file from a path or a shipped preset name.

    An existing path wins. Otherwise ``spec`` names a shipped preset: ``demo/tiny``,
    ``demo/tiny.yaml`` or ``configs/demo/tiny.yaml`` (so that the paths the presets and the
    docs use also work from an installed package, in any working directory)."""
    spec = os.fspath(spec)
    if os.path.isfile(spec):
        return spec
    name = spec.replace(os.sep, "/")
    name = name[len("configs/"):] if name.startswith("configs/") else name
    if not os.path.isabs(spec) and ".." not in name.split("/"):
        root = shipped_configs_dir()
        for candidate in (name, name + ".yaml"):
            path = os.path.join(root, *candidate.split("/"))
            if os.path.isfile(path):
                return path
    names = shipped_config_names()
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else \
        f"; the shipped ones are {', '.join(names)}" if names else ""
    raise ConfigError(f"{what} not found: {spec} is neither a file nor a shipped config name{hint}")


# ------------------------------------------------------------------------ loading
def read_yaml(path: str) -> dict:
    """Read a YAML config file (a path or a shipped preset name such as ``demo/tiny``),
    resolving ``_base_`` inheritance (paths relative to the file)."""
    path = resolve_config_path(path)
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    bases = data.pop("_base_", None)
    if bases is None:
        return data
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        merged = merge(merged, read_yaml(base_path))
    return merge(merged, data)


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge; ``over`` wins; lists are replaced, not concatenated."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.text.heads=4"`` -> (["model", "text", "heads"], 4); the value is YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{text}': bad key '{key}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for p in path[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[path[-1]] = value
    return out


def load_config(paths: Union[str, typing.Sequence[str], None] = None,
                overrides: typing.Iterable[str] = (), validate: bool = True) -> Config:
    """Defaults <- YAML file(s) <- ``--set`` overrides, then validated."""
    if isinstance(paths, str):
        paths = [paths]
    data: dict = {}
    source = ", ".join(paths or []) or "defaults"
    for p in paths or []:
        data = merge(data, read_yaml(p))
    overrides = list(overrides)
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + --set overrides"
    cfg = from_dict(Config, data, source=source)
    return cfg.validate() if validate else cfg


def config_from_dict(data: dict, source: str = "") -> Config:
    return from_dict(Config, data, source=source).validate()


def save_config(cfg: Config, path: str) -> None:
    """Write the fully resolved config (every key) as YAML."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
