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
from ..config.features import FeatureProblem, find_problems, total_iterations
from ..data import (
    ConcatImageDataset,
    MultiCropAugmentation,
    MultiCropCollate,
    ShardedInfiniteSampler,
    SSLTrainDataset,
    SubsetDataset,
    build_train_loader,
    num_masked_patches_per_image,
)
from ..data.invariance import InvarianceSettings, InvarianceViews
from ..distributed.device import cpu_has_fast_bf16
from ..distributed.parallelize import ParallelPlan
from ..models import DINOHead, build_vit
from ..models.bridge import InversePatchEmbed
from .online_eval import knn_set_problems
from .optim import OptimSettings, build_optimizer, build_param_groups
from .schedules import ScheduleSpec, TrainingSchedules, build_training_schedules, loss_weight_factor, lr_scale
from .sources import SOURCE_KEYS, open_source
from .streams import BridgeStream, CoreSettings, CoreStream, PatchRollStream, ResizePasteStream, Stream

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
    for key in ("embed_dim", "depth", "num_heads"):
        if s[key] is not None:
            kwargs[key] = int(s[key])
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


def patch_grid(cfg: DictConfig) -> tuple[int, int]:
    """R×C patch grid of a global crop."""
    size, patch = int(cfg.crops.global_crops_size), int(cfg.student.patch_size)
    return size // patch, size // patch


def build_model_parts(cfg: DictConfig, *, student: bool) -> nn.ModuleDict:
    """Backbone and heads of the student (with drop path) or the teacher (without); no init.

    The student also gets the ``bridge`` when a bridge term can be on anywhere in training (it is
    a student part only: no teacher copy, no EMA)."""
    spec = backbone_spec(cfg)
    backbone = build_backbone(spec, float(cfg.student.drop_path_rate) if student else 0.0)
    parts = {"backbone": backbone, "dino_head": _head(cfg.dino, backbone.embed_dim)}
    if cfg.ibot.separate_head:
        parts["ibot_head"] = _head(cfg.ibot, backbone.embed_dim)
    if student and bridge_exists(cfg):
        hidden = cfg.resize_shuffle_augmentor.bridge_hidden_dim
        parts["bridge"] = InversePatchEmbed(
            backbone.embed_dim, patch_grid(cfg), None if hidden is None else int(hidden)
        )
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
    if device.type == "cpu" and cp.param_dtype == "bf16" and not cpu_has_fast_bf16():
        logger.warning(
            "compute_precision.param_dtype=bf16 on a CPU without native bf16 (no AVX-512/AMX): bf16 "
            "matmuls are emulated here, 75-125x slower than fp32; set compute_precision.param_dtype=fp32"
        )
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


# ------------------------------------------------------------------------------- streams
def core_settings(cfg: DictConfig) -> CoreSettings:
    d = cfg.dino
    return CoreSettings(
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


def invariance_streams(cfg: DictConfig) -> list[Stream]:
    """Crop-Resize, PatchRoll and the bridge, with their weight factors over the whole run."""
    rs = cfg.resize_shuffle_augmentor
    epoch, total = int(cfg.train.OFFICIAL_EPOCH_LENGTH), total_iterations(cfg)

    def factor(key: str):
        return loss_weight_factor(rs[key], epoch, total)

    temp = float(cfg.dino.student_temp)
    return [
        ResizePasteStream(factor("resize_paste_loss_weight"), student_temp=temp),
        PatchRollStream(
            factor("patch_shuffle_loss_weight"),
            factor("patch_shuffle_cls_weight"),
            factor("patch_shuffle_patch_weight"),
            patch_size=int(cfg.student.patch_size),
            grid_size=patch_grid(cfg),
            student_temp=temp,
        ),
        BridgeStream(
            factor("bridge_global_weight"),
            factor("bridge_patchshuffle_weight"),
            ibot_gate=None if rs.bridge_ibot_gate is None else float(rs.bridge_ibot_gate),
            input_clamp=float(rs.bridge_input_clamp),
            logit_clamp=float(rs.bridge_logit_clamp),
            student_temp=temp,
        ),
    ]


def build_streams(cfg: DictConfig) -> list[Stream]:
    """The core stream, plus the invariance streams under ``SSLResizeShuffle``."""
    streams: list[Stream] = [CoreStream(core_settings(cfg))]
    if cfg.MODEL.META_ARCHITECTURE == "SSLResizeShuffle":
        streams += invariance_streams(cfg)
    return streams


def bridge_exists(cfg: DictConfig) -> bool:
    """A bridge term's weight can be > 0 somewhere in [0, total iterations)."""
    if cfg.MODEL.META_ARCHITECTURE != "SSLResizeShuffle":
        return False
    total = total_iterations(cfg)
    bridge = next(s for s in invariance_streams(cfg) if isinstance(s, BridgeStream))
    return any(term.first_active(0, total) is not None for term in bridge.terms)


_STREAM_KEYS = {
    "aug/resize_paste_cls_loss": ("resize_paste_loss_weight",),
    "aug/patchshuffle_cls_loss": ("patch_shuffle_loss_weight", "patch_shuffle_cls_weight"),
    "aug/patchshuffle_patch_loss": ("patch_shuffle_loss_weight", "patch_shuffle_patch_weight"),
    "aug/bridge_global_loss": ("bridge_global_weight",),
    "aug/bridge_patchshuffle_loss": ("bridge_patchshuffle_weight",),
}


def check_streams(cfg: DictConfig) -> list[FeatureProblem]:
    """Config interactions of the invariance streams that need their weight schedules."""
    total = total_iterations(cfg)
    active = {}
    for stream in invariance_streams(cfg):
        for term in stream.terms:
            first = term.first_active(0, total)
            if first is not None:
                active[term.name] = first
    if not active:
        return []
    keys = ", ".join(sorted({f"resize_shuffle_augmentor.{k}" for name in active for k in _STREAM_KEYS[name]}))
    first = min(active.values())
    problems = []
    if cfg.MODEL.META_ARCHITECTURE != "SSLResizeShuffle":
        problems.append(
            FeatureProblem(
                "MODEL.META_ARCHITECTURE",
                f"is {cfg.MODEL.META_ARCHITECTURE!r}, which has no invariance streams, but {keys} give a"
                f" non-zero weight from iteration {first}; use SSLResizeShuffle or set those weights to 0",
            )
        )
        return problems
    if not cfg.crops.use_resize_shuffle_augmentor:
        problems.append(
            FeatureProblem(
                "crops.use_resize_shuffle_augmentor",
                f"is false, but {keys} give a non-zero weight from iteration {first}: the streams need"
                " their views; set it to true or those weights to 0",
            )
        )
    bridge = {"aug/bridge_global_loss", "aug/bridge_patchshuffle_loss"} & active.keys()
    rs = cfg.resize_shuffle_augmentor
    if bridge and rs.bridge_ibot_gate is not None and float(cfg.ibot.loss_weight) <= 0:
        problems.append(
            FeatureProblem(
                "resize_shuffle_augmentor.bridge_ibot_gate",
                f"is {rs.bridge_ibot_gate} but ibot.loss_weight is {cfg.ibot.loss_weight}: the gate reads the"
                " iBOT loss; set the gate to null or give iBOT a weight",
            )
        )
    if "aug/patchshuffle_patch_loss" in active:
        grid = patch_grid(cfg)
        counts = num_masked_patches_per_image(
            int(cfg.train.batch_size_per_gpu),
            grid[0] * grid[1],
            min(1.0, max(0.0, float(rs.patch_shuffle_patch_probability))),
            tuple(rs.patch_shuffle_patch_min_max),
        )
        if sum(counts) == 0:
            problems.append(
                FeatureProblem(
                    "resize_shuffle_augmentor.patch_shuffle_patch_probability",
                    f"with patch_shuffle_patch_min_max={list(rs.patch_shuffle_patch_min_max)},"
                    f" train.batch_size_per_gpu={cfg.train.batch_size_per_gpu} and a {grid[0]}×{grid[1]}"
                    " patch grid, no patch is aligned in a step, so aug/patchshuffle_patch_loss would be"
                    " empty; use a larger batch, larger global crops or larger ratios",
                )
            )
    return problems


def config_problems(cfg: DictConfig) -> list[FeatureProblem]:
    """Everything that stops this config from running, found before anything is built."""
    return find_problems(cfg) + check_streams(cfg) + knn_set_problems(cfg)


def check_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` listing every problem of ``config_problems``."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("this config cannot run:\n  - " + "\n  - ".join(map(str, problems)))


# --------------------------------------------------------------------------- teacher targets
def assigner_kind(cfg: DictConfig) -> str:
    return "dtch" if cfg.dtch.enabled else str(cfg.train.centering)


def build_assigner(cfg: DictConfig, num_prototypes: int, history_size: int, name: str = "dtch") -> nn.Module:
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
            name=name,
        )
    if kind == "sinkhorn_knopp":
        return SinkhornKnopp(n_iterations=3)
    return SoftmaxCentering(num_prototypes, momentum=0.9)


def build_assigners(cfg: DictConfig, streams: list[Stream]) -> dict[str, nn.Module]:
    """One assigner per target kind the streams declare: the CLS kinds balance the DINO head's
    prototypes over the ``cls_hist_cache`` window, the patch kinds the iBOT head's over
    ``patch_hist_cache``."""
    sizes = {
        "cls": (int(cfg.dino.head_n_prototypes), int(cfg.dtch.cls_hist_cache)),
        "patch": (int(cfg.ibot.head_n_prototypes), int(cfg.dtch.patch_hist_cache)),
    }
    return {
        spec.name: build_assigner(cfg, *sizes[spec.window], name=spec.name)
        for stream in streams
        for spec in stream.targets
    }


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
        raise ConfigError(f"no training data: add a dataset under 'data:' ({', '.join(SOURCE_KEYS)})")
    sources = []
    for name, src in cfg.data.items():
        try:
            ds = open_source(
                name,
                src,
                index_dir=cfg.train.output_dir or None,
                jpeg_draft_min_side=int(cfg.crops.jpeg_draft_min_side),
            )
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
        view_pipeline=str(c.view_pipeline),
    )


def build_invariance_views(cfg: DictConfig) -> InvarianceViews:
    c, rs = cfg.crops, cfg.resize_shuffle_augmentor
    return InvarianceViews(
        InvarianceSettings(
            size=int(c.global_crops_size),
            patch_size=int(cfg.student.patch_size),
            rgb_mean=tuple(c.rgb_mean),
            rgb_std=tuple(c.rgb_std),
            r_plain_probability=float(rs.r_plain_probability),
            o_squash_probability=float(rs.o_squash_probability),
            crop_probability=float(rs.resize_paste_crop_probability),
            crop_scale=tuple(rs.resize_paste_crop_scale),
            paste_ratio=tuple(rs.resize_paste_ratio),
            keep_aspect_probability=float(rs.resize_paste_keep_aspect_probability),
            max_roll=int(rs.patch_roll_max_shift),
            view_pipeline=str(c.view_pipeline),
        )
    )


def build_loader(
    cfg: DictConfig,
    source,
    *,
    rank: int,
    world_size: int,
    start_position: int,
    pin_memory: bool,
    invariance_kinds: frozenset[str] = frozenset(),
):
    """The training loader from ``start_position``; ``invariance_kinds`` ({}, {raw} or {raw,
    resizepaste}) says which invariance views it builds (only what the steps need)."""
    seed = int(cfg.train.seed)
    dataset = SSLTrainDataset(
        source,
        build_augmentation(cfg),
        seed=seed,
        rank=rank,
        invariance=build_invariance_views(cfg) if invariance_kinds else None,
        invariance_kinds=invariance_kinds,
    )
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
        align_probability=min(
            1.0, max(0.0, float(cfg.resize_shuffle_augmentor.patch_shuffle_patch_probability))
        ),
        align_ratio_min_max=tuple(cfg.resize_shuffle_augmentor.patch_shuffle_patch_min_max),
        use_all_shift_mask=bool(cfg.resize_shuffle_augmentor.use_all_shift_mask),
    )
    return build_train_loader(
        dataset,
        batch_size=int(cfg.train.batch_size_per_gpu),
        num_workers=int(cfg.train.num_workers),
        sampler=sampler,
        collate=collate,
        pin_memory=pin_memory,
    )


def move_batch(batch, device: torch.device):
    """Every tensor of ``batch`` (nested dicts and named tuples included) on ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_batch(v, device) for v in batch))
    return batch
