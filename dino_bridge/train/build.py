"""Construction: small ``build_*`` functions that read the config and hand each part plain values.

This (with the loop and the CLI) is the only place that sees the config tree.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig
from torch import nn

from ..assign import DTCH, SinkhornKnopp, SoftmaxCentering
from ..config import ConfigError
from ..config.features import total_iterations
from ..data import (
    ConcatImageDataset,
    ImageFolderDataset,
    ImageListDataset,
    MultiCropAugmentation,
    MultiCropCollate,
    ShardedInfiniteSampler,
    SSLTrainDataset,
    SubsetDataset,
    build_demo_dataset,
    build_train_loader,
)
from ..distributed.parallelize import ParallelPlan
from ..models import DINOHead, build_vit
from .meta_arch import SSLLossSettings
from .optim import OptimSettings, build_optimizer, build_param_groups
from .schedules import ScheduleSpec, TrainingSchedules, build_training_schedules, lr_scale

logger = logging.getLogger("dino_bridge")


# ------------------------------------------------------------------------------------- models
def backbone_spec(cfg: DictConfig) -> dict:
    """Everything needed to rebuild the backbone (saved as backbone.json in each checkpoint)."""
    s = cfg.student
    kwargs = dict(
        img_size=int(cfg.crops.global_crops_size),
        patch_size=int(s.patch_size),
        in_chans=int(s.in_chans),
        qkv_bias=bool(s.qkv_bias),
        proj_bias=bool(s.proj_bias),
        ffn_bias=bool(s.ffn_bias),
        layerscale_init=s.layerscale,
        norm_layer=str(s.norm_layer),
        ffn_layer=str(s.ffn_layer),
        n_storage_tokens=int(s.n_storage_tokens),
        mask_k_bias=bool(s.mask_k_bias),
        untie_cls_and_patch_norms=bool(s.untie_cls_and_patch_norms),
        untie_global_and_local_cls_norm=bool(s.untie_global_and_local_cls_norm),
        pos_embed_rope_base=s.pos_embed_rope_base,
        pos_embed_rope_min_period=s.pos_embed_rope_min_period,
        pos_embed_rope_max_period=s.pos_embed_rope_max_period,
        pos_embed_rope_normalize_coords=str(s.pos_embed_rope_normalize_coords),
        pos_embed_rope_shift_coords=s.pos_embed_rope_shift_coords,
        pos_embed_rope_jitter_coords=s.pos_embed_rope_jitter_coords,
        pos_embed_rope_rescale_coords=s.pos_embed_rope_rescale_coords,
        pos_embed_rope_dtype=str(s.pos_embed_rope_dtype),
    )
    if s.ffn_ratio is not None:
        kwargs["ffn_ratio"] = float(s.ffn_ratio)
    return {
        "arch": str(s.arch),
        "kwargs": kwargs,
        "rgb_mean": list(cfg.crops.rgb_mean),
        "rgb_std": list(cfg.crops.rgb_std),
    }


def build_backbone(spec: dict, drop_path_rate: float = 0.0) -> nn.Module:
    return build_vit(spec["arch"], drop_path_rate=drop_path_rate, **spec["kwargs"])


def _head(cfg_head, in_dim: int) -> DINOHead:
    return DINOHead(
        in_dim,
        int(cfg_head.head_n_prototypes),
        nlayers=int(cfg_head.head_nlayers),
        hidden_dim=int(cfg_head.head_hidden_dim),
        bottleneck_dim=int(cfg_head.head_bottleneck_dim),
    )


def build_model_parts(cfg: DictConfig, *, student: bool) -> nn.ModuleDict:
    """Backbone and heads of the student (with drop path) or the teacher (without); no init."""
    spec = backbone_spec(cfg)
    backbone = build_backbone(spec, float(cfg.student.drop_path_rate) if student else 0.0)
    parts = {"backbone": backbone, "dino_head": _head(cfg.dino, backbone.embed_dim)}
    if cfg.ibot.separate_head:
        parts["ibot_head"] = _head(cfg.ibot, backbone.embed_dim)
    return nn.ModuleDict(parts)


def parallel_plan(cfg: DictConfig, world_size: int, device: torch.device) -> ParallelPlan:
    """FSDP2 when several processes run (unless NO_SHARD or parallel=dp), plain data parallel otherwise."""
    cp = cfg.compute_precision
    fsdp = world_size > 1 and cp.parallel != "dp" and cp.sharding_strategy != "NO_SHARD"
    if fsdp and device.type == "mps":
        logger.info("FSDP2 is not available on mps: plain data parallel")
        fsdp = False
    if cp.parallel == "fsdp" and world_size == 1:
        logger.info("compute_precision.parallel=fsdp with one process: nothing to shard, plain training")
    ac = "off" if not cfg.train.checkpointing else ("full" if cfg.train.checkpointing_full else "selective")
    return ParallelPlan(
        fsdp=fsdp,
        reshard_after_forward=cp.sharding_strategy == "FULL_SHARD",
        param_dtype=str(cp.param_dtype),
        reduce_dtype=str(cp.reduce_dtype),
        activation_checkpointing=ac,
        compile=bool(cfg.train.compile),
        cudagraphs=bool(cfg.train.cudagraphs),
    )


def init_model_parts_(parts: nn.ModuleDict, seed: int) -> None:
    """Explicit initialisation of every parameter and buffer; a pure function of ``seed``."""
    torch.manual_seed(seed)
    for module in parts.values():
        module.init_weights()


def count_parameters(parts: nn.ModuleDict) -> dict[str, int]:
    return {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}


# --------------------------------------------------------------------------- teacher targets
def assigner_kind(cfg: DictConfig) -> str:
    return "dtch" if cfg.dtch.enabled else str(cfg.train.centering)


def build_assigner(cfg: DictConfig, num_prototypes: int, history_size: int) -> nn.Module:
    kind = assigner_kind(cfg)
    if kind == "dtch":
        d = cfg.dtch
        return DTCH(
            num_prototypes,
            history_size,
            temp_scale=float(d.temp_scale),
            exp_power=None if d.exp_power is None else float(d.exp_power),
            balance_beta=float(d.balance_beta),
            boost_enabled=bool(d.boost_enabled),
            boost_alpha=float(d.boost_alpha),
            boost_w_max=float(d.boost_w_max),
            boost_divisor=float(d.boost_divisor),
            boost_eps=float(d.boost_eps),
            logit_clamp=float(d.logit_clamp),
        )
    if kind == "sinkhorn_knopp":
        return SinkhornKnopp(n_iterations=3)
    return SoftmaxCentering(num_prototypes, momentum=0.9)


def build_assigners(cfg: DictConfig) -> tuple[nn.Module, nn.Module]:
    dino = build_assigner(cfg, int(cfg.dino.head_n_prototypes), int(cfg.dtch.cls_hist_cache))
    ibot = build_assigner(cfg, int(cfg.ibot.head_n_prototypes), int(cfg.dtch.patch_hist_cache))
    return dino, ibot


def loss_settings(cfg: DictConfig) -> SSLLossSettings:
    d = cfg.dino
    return SSLLossSettings(
        n_global_crops=2,
        n_local_crops=int(cfg.crops.local_crops_number),
        dino_weight=float(d.loss_weight),
        ibot_weight=float(cfg.ibot.loss_weight),
        koleo_cls_weight=float(d.koleo_cls_loss_weight),
        koleo_patch_weight=float(d.koleo_patch_loss_weight),
        koleo_cls_gate=bool(d.koleo_cls_gate_enabled),
        koleo_patch_gate=bool(d.koleo_patch_gate_enabled),
        koleo_cls_gate_threshold=float(d.koleo_cls_gate_threshold),
        koleo_patch_gate_threshold=float(d.koleo_patch_gate_threshold),
        koleo_gate_slope=float(d.koleo_gate_slope),
        global_ignore_diagonal=bool(d.global_ignore_diagonal),
        student_temp=float(d.student_temp),
        apply_masks=float(cfg.ibot.loss_weight) > 0 or bool(cfg.ibot.force_masking_even_with_zero_weight),
    )


# ------------------------------------------------------------------------------ optimisation
def _spec(node, **extra) -> ScheduleSpec:
    return ScheduleSpec(
        start=float(node.start),
        peak=float(node.peak),
        end=float(node.end),
        warmup_epochs=float(node.warmup_epochs),
        cosine_epochs=None if node.cosine_epochs is None else float(node.cosine_epochs),
        **extra,
    )


def global_batch_size(cfg: DictConfig, world_size: int) -> int:
    return int(cfg.train.batch_size_per_gpu) * world_size


def build_schedules(cfg: DictConfig, world_size: int) -> TrainingSchedules:
    sch = cfg.schedules
    return build_training_schedules(
        lr=_spec(sch.lr),
        weight_decay=_spec(sch.weight_decay),
        momentum=_spec(sch.momentum),
        teacher_temp=_spec(sch.teacher_temp),
        freeze_last_layer_epochs=float(sch.lr.freeze_last_layer_epochs),
        epoch_length=int(cfg.train.OFFICIAL_EPOCH_LENGTH),
        total_iters=total_iterations(cfg),
        lr_multiplier=lr_scale(str(cfg.optim.scaling_rule), global_batch_size(cfg, world_size)),
    )


def build_student_optimizer(cfg: DictConfig, student: nn.ModuleDict, device: torch.device):
    o = cfg.optim
    settings = OptimSettings(
        layerwise_decay=float(o.layerwise_decay),
        patch_embed_lr_mult=float(o.patch_embed_lr_mult),
        dino_head_lr_multiplier=float(o.dino_head_lr_multiplier),
        dino_head_wd_multiplier=float(o.dino_head_wd_multiplier),
    )
    groups = build_param_groups(dict(student.items()), len(student["backbone"].blocks), settings)
    return build_optimizer(
        groups,
        betas=(float(o.adamw_beta1), float(o.adamw_beta2)),
        foreach=bool(o.multi_tensor_optim),
        fused=bool(o.multi_tensor_optim) and device.type == "cuda",
    )


# ---------------------------------------------------------------------------------------- data
def build_train_source(cfg: DictConfig):
    """The named datasets of ``data:``, each subset by its dataset_ratio, concatenated."""
    if len(cfg.data) == 0:
        raise ConfigError("no training data: add a dataset under 'data:' (txt_path, root or demo)")
    sources = []
    for name, src in cfg.data.items():
        try:
            if src.txt_path:
                ds = ImageListDataset(src.txt_path)
            elif src.root:
                ds = ImageFolderDataset(src.root)
            else:
                ds = build_demo_dataset(src.demo, "train")
        except (ValueError, OSError) as e:
            raise ConfigError(f"data.{name}: {e}") from None
        if float(src.dataset_ratio) < 1.0:
            ds = SubsetDataset(ds, float(src.dataset_ratio), seed=int(cfg.train.seed))
        logger.info("dataset %s: %d images", name, len(ds))
        sources.append(ds)
    return sources[0] if len(sources) == 1 else ConcatImageDataset(sources)


def build_augmentation(cfg: DictConfig) -> MultiCropAugmentation:
    c = cfg.crops
    return MultiCropAugmentation(
        global_crops_size=int(c.global_crops_size),
        local_crops_size=int(c.local_crops_size),
        local_crops_number=int(c.local_crops_number),
        global_crops_scale=tuple(c.global_crops_scale),
        local_crops_scale=tuple(c.local_crops_scale),
        horizontal_flips=bool(c.horizontal_flips),
        rgb_mean=tuple(c.rgb_mean),
        rgb_std=tuple(c.rgb_std),
        share_color_jitter=bool(c.share_color_jitter),
        localcrops_subset_of_globalcrops=bool(c.localcrops_subset_of_globalcrops),
    )


def build_loader(
    cfg: DictConfig, source, *, rank: int, world_size: int, start_position: int, pin_memory: bool
):
    seed = int(cfg.train.seed)
    dataset = SSLTrainDataset(source, build_augmentation(cfg), seed=seed, rank=rank)
    sampler = ShardedInfiniteSampler(
        len(source),
        rank=rank,
        world_size=world_size,
        seed=seed,
        reshuffle_each_pass=bool(cfg.train.reshuffle_sampler_perm),
        start=start_position,
    )
    collate = MultiCropCollate(
        patch_size=int(cfg.student.patch_size),
        mask_probability=float(cfg.ibot.mask_sample_probability),
        mask_ratio_min_max=tuple(cfg.ibot.mask_ratio_min_max),
        seed=seed,
        rank=rank,
        random_circular_shift=bool(cfg.ibot.mask_random_circular_shift),
    )
    return build_train_loader(
        dataset,
        batch_size=int(cfg.train.batch_size_per_gpu),
        num_workers=int(cfg.train.num_workers),
        sampler=sampler,
        collate=collate,
        pin_memory=pin_memory,
    )


def move_batch(batch: dict, device: torch.device) -> dict:
    """Tensors of ``batch`` on ``device``; other values unchanged."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
