"""Which requested features can take effect in this run.

A feature that dino_bridge does not implement is accepted while it is disabled and rejected with a
clear message when it is enabled. ``--dry-run`` lists the problems instead of failing on them.
Checks that need the loss-term schedules (a stream weight that is non-zero somewhere) live with
the streams, in ``train/build.py::check_streams``.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig


@dataclass(frozen=True)
class FeatureProblem:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


def total_iterations(cfg: DictConfig) -> int:
    """Iterations the schedules span: optim.epochs × train.OFFICIAL_EPOCH_LENGTH."""
    return int(cfg.optim.epochs) * int(cfg.train.OFFICIAL_EPOCH_LENGTH)


def end_iteration(cfg: DictConfig) -> int:
    """Where this run stops: the end of the schedules, or train.stop_at_iteration if earlier."""
    stop = cfg.train.stop_at_iteration
    total = total_iterations(cfg)
    return total if stop is None else min(total, int(stop))


_SUPERSEDED = {
    "optim.lr": "schedules.lr.peak",
    "optim.min_lr": "schedules.lr.end",
    "optim.warmup_epochs": "schedules.lr.warmup_epochs",
    "optim.weight_decay": "schedules.weight_decay.start/peak",
    "optim.weight_decay_end": "schedules.weight_decay.end",
    "optim.freeze_last_layer_epochs": "schedules.lr.freeze_last_layer_epochs",
    "optim.schedule_trunc_extra": "schedules.*.cosine_epochs",
    "teacher.momentum_teacher": "schedules.momentum.start/peak",
    "teacher.final_momentum_teacher": "schedules.momentum.end",
    "teacher.teacher_temp": "schedules.teacher_temp.peak/end",
    "teacher.warmup_teacher_temp": "schedules.teacher_temp.start",
    "teacher.warmup_teacher_temp_epochs": "schedules.teacher_temp.warmup_epochs",
    "train.dataset_path": "data.<name>.txt_path / root / demo",
}


def _select(cfg: DictConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def find_problems(cfg: DictConfig) -> list[FeatureProblem]:
    """Everything in ``cfg`` that would take effect in this run but cannot."""
    problems: list[FeatureProblem] = []

    def unsupported(key: str, message: str) -> None:
        problems.append(FeatureProblem(key, message))

    flags = {
        "distillation.enabled": "distillation from a separate teacher is not supported",
        "multidistillation.enabled": "multi-student distillation is not supported",
        "hrft.enabled": "high-resolution fine-tuning (hrft) is not supported",
        "gram.use_loss": "Gram anchoring is not supported",
        "gram.compute_stats": "Gram statistics are not supported",
        "student.fp8_enabled": "fp8 matmuls are not supported",
        "dino.koleo_loss_distributed": "the all-gather KoLeo variant is not supported (KoLeo is per rank)",
        "dino.force_weight_norm": "weight-normalised prototypes are not supported (DINOv3 uses none)",
        "dino.head_norm_last_layer": "weight-normalised prototypes are not supported (DINOv3 uses none)",
        "ibot.head_norm_last_layer": "weight-normalised prototypes are not supported (DINOv3 uses none)",
        "train.cell_augmentation": "cell augmentation is not supported",
        "train.learn_from_teacher_tokens": "learning from teacher tokens is not supported",
    }
    for key, message in flags.items():
        if _select(cfg, key):
            unsupported(key, message)
    if not cfg.train.use_teacher_head:
        unsupported("train.use_teacher_head", "targets always come from the teacher heads; must be true")
    if cfg.dino.koleo_topk != 1:
        unsupported("dino.koleo_topk", "only the nearest neighbour (1) is supported")
    if cfg.student.patch_drop > 0:
        unsupported("student.patch_drop", "patch dropping is not supported; set 0.0")
    if cfg.student.pos_embed_type != "rope":
        unsupported("student.pos_embed_type", "only 'rope' position embeddings exist in DINOv3")
    if list(cfg.train.chunk_schedule):
        unsupported("train.chunk_schedule", "chunk schedules are not supported; leave it []")
    if cfg.optim.optimizer != "adamw":
        unsupported("optim.optimizer", f"{cfg.optim.optimizer!r} is not supported; only adamw")
    if cfg.optim.dump_fsdp_weights_path:
        unsupported("optim.dump_fsdp_weights_path", "not supported; checkpoints export safetensors")
    if cfg.MODEL.WEIGHTS:
        unsupported(
            "MODEL.WEIGHTS", "eval-only weights; to initialise training use student.pretrained_weights"
        )
    if cfg.MODEL.DTYPE not in ("float32", "fp32"):
        unsupported("MODEL.DTYPE", "parameters are kept in float32; use compute_precision.param_dtype")
    if cfg.teacher.in_chans != cfg.student.in_chans:
        unsupported("teacher.in_chans", "must equal student.in_chans")
    for key, replacement in _SUPERSEDED.items():
        if _select(cfg, key) is not None:
            unsupported(key, f"superseded by {replacement}; leave it null")
    if not cfg.ibot.separate_head and cfg.ibot.head_n_prototypes != cfg.dino.head_n_prototypes:
        unsupported(
            "ibot.separate_head", "a shared head needs ibot.head_n_prototypes == dino.head_n_prototypes"
        )

    if cfg.crops.resize_shuffle_augmentor_switch is not None:
        unsupported(
            "crops.resize_shuffle_augmentor_switch",
            "custom augmentor switches are not supported (the views are chosen by the stream weights);"
            " leave it null",
        )
    rs = cfg.resize_shuffle_augmentor
    if cfg.MODEL.META_ARCHITECTURE == "SSLResizeShuffle" and rs.patch_size != cfg.student.patch_size:
        unsupported(
            "resize_shuffle_augmentor.patch_size",
            f"is {rs.patch_size} but student.patch_size is {cfg.student.patch_size}; the views roll and"
            " paste whole patches, so they must be equal",
        )
    return problems


def superseded_notes(cfg: DictConfig) -> list[str]:
    """Accepted legacy or execution-only settings worth one log line each."""
    notes = []
    if cfg.train.saveckp_freq is not None:
        notes.append(
            "train.saveckp_freq is a legacy key (never read by the reference): checkpointing.period wins"
        )
    if cfg.dtch.enabled and cfg.train.centering != "sinkhorn_knopp":
        notes.append(f"dtch.enabled overrides train.centering={cfg.train.centering!r}")
    return notes
