"""The config tree: one structured schema that accepts every key of the user's DINOv3-style YAML.

Defaults follow DINOv3's ``ssl_default_config`` where the seed YAML sets a value; keys that
dino_bridge adds (marked NEW) default to the behaviour the seed config already has. Keys that the
reference code parsed but never read are accepted and documented here; whether a value can take
effect is checked in ``dino_bridge.config.features``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    META_ARCHITECTURE: str = "SSLMetaArch"  # SSLMetaArch | SSLResizeShuffle
    DEVICE: str = "auto"  # a preference: auto-detection may override it (logged)
    WEIGHTS: str = ""  # eval-only weights in the reference; must stay empty for training
    DTYPE: str = "float32"


@dataclass
class ComputePrecisionConfig:
    param_dtype: str = "bf16"  # fp32 | bf16 | fp16: compute dtype (master weights stay fp32)
    reduce_dtype: str = "fp32"  # gradient reduction dtype under FSDP2
    sharding_strategy: str = "SHARD_GRAD_OP"  # SHARD_GRAD_OP | FULL_SHARD | NO_SHARD
    parallel: str = "auto"  # NEW: auto | fsdp | dp (plain data parallel); auto = fsdp when world > 1


@dataclass
class DinoConfig:
    loss_weight: float = 1.0
    global_ignore_diagonal: bool = True
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_norm_last_layer: bool = False
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    koleo_cls_loss_weight: float = 0.1
    koleo_patch_loss_weight: float = 0.0
    koleo_cls_gate_enabled: bool = False
    koleo_patch_gate_enabled: bool = False
    koleo_cls_gate_threshold: float = 0.0
    koleo_patch_gate_threshold: float = 0.0
    koleo_gate_slope: float = 0.1  # NEW: the gate's sigmoid slope (hard-coded 0.1 in the reference)
    koleo_loss_distributed: bool = False
    koleo_topk: int = 1
    koleo_distributed_replicas: int = 0
    koleo_distributed_loss_group_size: int | None = None
    force_weight_norm: bool = False
    student_temp: float = 0.1  # NEW: student temperature of every cross-entropy term


@dataclass
class IbotConfig:
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])
    mask_random_circular_shift: bool = False
    force_masking_even_with_zero_weight: bool = False
    separate_head: bool = True
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_norm_last_layer: bool = False
    head_nlayers: int = 3
    head_hidden_dim: int = 2048


@dataclass
class GramConfig:
    use_loss: bool = False
    compute_stats: bool = False


@dataclass
class TrainConfig:
    batch_size_per_gpu: int = 64
    dataset_path: str | None = None  # the reference's dataset string; use data.<name> instead
    output_dir: str = ""  # set from --output-dir
    saveckp_freq: int | None = None  # legacy, never read by the reference: checkpointing.period wins
    seed: int = 0
    num_workers: int = 4
    OFFICIAL_EPOCH_LENGTH: int = 1250
    monitor_gradient_norm: bool = False
    chunk_schedule: list[Any] = field(default_factory=list)
    cache_dataset: bool = True
    use_teacher_head: bool = True
    learn_from_teacher_tokens: bool = False
    reshuffle_sampler_perm: bool = False
    centering: str = "sinkhorn_knopp"  # sinkhorn_knopp | centering (dtch.enabled overrides)
    checkpointing: bool = False  # activation checkpointing of the student blocks
    checkpointing_full: bool = False
    compile: bool = False
    cudagraphs: bool = False
    cell_augmentation: bool = False
    cell_augmentation_type: str = "hpa"
    sharded_eval_checkpoint: bool = False
    log_period: int = 10  # NEW: iterations between metrics.jsonl records
    # NEW: stop (with a checkpoint) once this many iterations are done; the schedules still span
    # optim.epochs, so a long recipe can be run in parts (or up to where a feature is needed).
    stop_at_iteration: int | None = None
    max_nonfinite_steps: int = 3  # NEW: consecutive skipped (non-finite) steps before training stops


@dataclass
class StudentConfig:
    arch: str = "vit_large"
    patch_size: int = 16
    drop_path_rate: float = 0.3
    layerscale: float | None = 1.0e-5
    patch_drop: float = 0.0
    pretrained_weights: str = ""
    ffn_layer: str = "mlp"
    ffn_ratio: float | None = None  # None: the preset's ratio
    embed_dim: int | None = None  # NEW: None: the preset's width (a multiple of 4 * num_heads, for RoPE)
    depth: int | None = None  # NEW: None: the preset's number of blocks
    num_heads: int | None = None  # NEW: None: the preset's number of attention heads
    resume_from_teacher_chkpt: str = ""
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    norm_layer: str = "layernorm"
    n_storage_tokens: int = 0
    untie_cls_and_patch_norms: bool = False
    untie_global_and_local_cls_norm: bool = False
    mask_k_bias: bool = False
    in_chans: int = 3
    pos_embed_type: str = "rope"
    pos_embed_rope_base: float | None = 100.0
    pos_embed_rope_min_period: float | None = None
    pos_embed_rope_max_period: float | None = None
    pos_embed_rope_normalize_coords: str = "separate"
    pos_embed_rope_shift_coords: float | None = None
    pos_embed_rope_jitter_coords: float | None = None
    pos_embed_rope_rescale_coords: float | None = None
    pos_embed_rope_dtype: str = "bf16"
    fp8_enabled: bool = False
    fp8_filter: str = "blocks"


@dataclass
class TeacherConfig:
    # v1 schedule keys of the reference, superseded by `schedules.*`: they must stay null.
    momentum_teacher: float | None = None
    final_momentum_teacher: float | None = None
    warmup_teacher_temp: float | None = None
    teacher_temp: float | None = None
    warmup_teacher_temp_epochs: int | None = None
    in_chans: int = 3


@dataclass
class DistillationConfig:
    enabled: bool = False
    full_cfg_path: str = ""
    checkpoint_path: str = ""


@dataclass
class MultiDistillationConfig:
    enabled: bool = False


@dataclass
class HrftConfig:
    enabled: bool = False
    checkpoint_path: str = ""


@dataclass
class OptimConfig:
    epochs: int = 100
    optimizer: str = "adamw"
    # v1 schedule keys, superseded by `schedules.*`: they must stay null.
    weight_decay: float | None = None
    weight_decay_end: float | None = None
    lr: float | None = None
    warmup_epochs: int | None = None
    min_lr: float | None = None
    schedule_trunc_extra: float | None = None
    freeze_last_layer_epochs: int | None = None
    clip_grad: float = 3.0
    scaling_rule: str = "sqrt_wrt_1024"  # sqrt_wrt_1024 | linear_wrt_256 | none
    patch_embed_lr_mult: float = 0.2
    dino_head_wd_multiplier: float = 1.0
    dino_head_lr_multiplier: float = 1.0
    layerwise_decay: float = 0.9
    multi_tensor_optim: bool = True
    dump_fsdp_weights_path: str = ""
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999


@dataclass
class CropsConfig:
    global_crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_crops_number: int = 8
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    global_crops_size: int = 224
    local_crops_size: int = 96
    localcrops_subset_of_globalcrops: bool = False
    share_color_jitter: bool = False
    horizontal_flips: bool = True
    rgb_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    rgb_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    use_resize_shuffle_augmentor: bool = False
    resize_shuffle_augmentor_switch: Any = None
    # NEW: reference (torchvision's uint8 ops, the golden-loss path) | fast (one float pass per view,
    # the same draws and output distribution, pixels differ by rounding; data/fast_ops.py)
    view_pipeline: str = "reference"
    # NEW: > 0 decodes JPEGs (txt_path, root, shards) at the smallest 1/2, 1/4, 1/8 scale whose
    # shorter side stays >= this many pixels (PIL draft); 0: full size. It changes pixels.
    jpeg_draft_min_side: int = 0


@dataclass
class CheckpointingConfig:
    period: int = 1250  # iterations between checkpoints
    max_to_keep: int = 3
    keep_every: int = 0  # also keep every checkpoint whose iteration is a multiple of this (0: none)
    save_student: bool = True  # also export the student backbone (safetensors) in each checkpoint


@dataclass
class ScheduleConfig:
    """Linear warm-up from ``start`` to ``peak`` over ``warmup_epochs``, then cosine to ``end``."""

    start: float = 0.0
    peak: float = 0.0
    end: float = 0.0
    warmup_epochs: float = 0.0
    cosine_epochs: float | None = None  # None: the rest of training
    freeze_last_layer_epochs: float = 0.0  # only read under schedules.lr


def _schedule(start: float, peak: float, end: float, warmup: float, freeze: float = 0.0):
    return field(default_factory=lambda: ScheduleConfig(start, peak, end, warmup, None, freeze))


@dataclass
class SchedulesConfig:
    lr: ScheduleConfig = _schedule(0.0, 1e-3, 1e-6, 10, 1)
    weight_decay: ScheduleConfig = _schedule(0.04, 0.04, 0.04, 0)
    teacher_temp: ScheduleConfig = _schedule(0.04, 0.07, 0.07, 30)
    momentum: ScheduleConfig = _schedule(0.992, 0.992, 1.0, 0)


@dataclass
class DataSourceConfig:
    """One named training dataset: exactly one of txt_path, root, demo, h5_list, wsi_index, shards."""

    txt_path: str | None = None  # a text file, one image path per line (relative to the file's folder)
    root: str | None = None  # NEW: an image folder, scanned recursively
    demo: str | None = None  # NEW: a built-in demo dataset, e.g. fashion-mnist
    h5_list: str | None = None  # NEW: a text file listing HDF5 files of uint8 tiles [N, H, W, 3] (extra [h5])
    h5_key: str = "patches"  # NEW: the dataset of the tiles in each HDF5 file
    wsi_index: str | None = None  # NEW: a .npy of (slide, x, y, level, size) rows (index-wsi; extra [wsi])
    shards: str | None = None  # NEW: WebDataset tars: brace pattern, txt list or folder (extra [shards])
    dataset_ratio: float = 1.0  # fraction of this dataset used (seeded subset)


@dataclass
class ResizeShuffleConfig:
    """The invariance streams (METHOD §4-5), used by ``MODEL.META_ARCHITECTURE: SSLResizeShuffle``
    with ``crops.use_resize_shuffle_augmentor: true``. Every weight factor is a number or a schedule
    {start, peak, end, zero_epochs, warmup_epochs, cosine_epochs}; a term's effective weight is the
    product of its factors, and the schedule value multiplies the loss."""

    resize_paste_loss_weight: Any = 0.0
    patch_shuffle_loss_weight: Any = 0.0
    patch_shuffle_patch_weight: Any = 1.0
    patch_shuffle_cls_weight: Any = 1.0
    patch_shuffle_patch_probability: float = 0.5  # images of a step with aligned patches
    patch_shuffle_patch_min_max: list[float] = field(default_factory=lambda: [0.05, 0.15])
    use_all_shift_mask: bool = True  # false: aligned positions are never student mask tokens
    bridge_patchshuffle_weight: Any = 0.0
    bridge_global_weight: Any = 0.0
    bridge_ibot_gate: float | None = 4.0  # NEW: bridge terms while the iBOT loss is below this (null: always)
    patch_size: int = 16  # must equal student.patch_size
    # NEW: the geometry of the views, as keys (the reference hard-coded these values)
    r_plain_probability: float = 0.3  # source r without photometric ops
    o_squash_probability: float = 0.5  # source o squashed to S×S (else short side + centre crop)
    resize_paste_crop_probability: float = 0.7
    resize_paste_crop_scale: list[float] = field(default_factory=lambda: [0.7, 1.0])
    resize_paste_ratio: list[float] = field(default_factory=lambda: [0.5, 0.9])  # paste side / S
    resize_paste_keep_aspect_probability: float = 0.3
    patch_roll_max_shift: int = 5  # in patches
    bridge_hidden_dim: int | None = None  # None: embed_dim // 2
    bridge_input_clamp: float = 10.0  # the bridge output is clamped to ± this before the head
    bridge_logit_clamp: float = 30.0  # and its logits to ± this


@dataclass
class DTCHConfig:
    enabled: bool = False
    patch_hist_cache: int = 40000
    cls_hist_cache: int = 40000
    temp_scale: float = 1.0
    exp_power: float | None = None  # None: equal to temp_scale
    balance_beta: float = 1.0
    boost_enabled: bool = True
    boost_alpha: float = 0.3
    boost_w_max: float = 50.0
    boost_divisor: float = 500.0
    boost_eps: float = 1e-6
    logit_clamp: float = 30.0
    warmup_history: bool = True


@dataclass
class EvaluationConfig:
    """NEW: online evaluation during training (off by default: the seed YAML has no such section).

    Every ``knn_period`` iterations the teacher backbone embeds two small labelled image sets
    and a weighted kNN (DINO protocol) reports top-1 / top-5 in metrics.jsonl (``knn/*``)."""

    knn_period: int = 0  # iterations between evaluations; 0: off
    knn_train: str | None = None  # an image folder (class = subfolder) or a demo spec (fashion-mnist:train)
    knn_val: str | None = None  # the same kinds (fashion-mnist:test); classes matched by name
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_limit_train: int | None = 5000  # a seeded subset of this many train images (null: all)
    knn_limit_val: int | None = 1000  # and of val images
    knn_batch_size: int = 64  # images per forward, per rank
    knn_num_workers: int = 0  # image-loading processes per rank


@dataclass
class Config:
    MODEL: ModelConfig = field(default_factory=ModelConfig)
    compute_precision: ComputePrecisionConfig = field(default_factory=ComputePrecisionConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    multidistillation: MultiDistillationConfig = field(default_factory=MultiDistillationConfig)
    hrft: HrftConfig = field(default_factory=HrftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    schedules: SchedulesConfig = field(default_factory=SchedulesConfig)
    data: dict[str, DataSourceConfig] = field(default_factory=dict)
    resize_shuffle_augmentor: ResizeShuffleConfig = field(default_factory=ResizeShuffleConfig)
    dtch: DTCHConfig = field(default_factory=DTCHConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
