"""``--dry-run``: build everything on the meta device and report what a run would be, as one JSON line."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from ..config.features import end_iteration, superseded_notes
from ..distributed.device import detect_device_type, launch_env
from . import build
from .schedules import lr_scale


def dry_run_report(cfg: DictConfig) -> dict:
    _, world_size, _ = launch_env()
    with torch.device("meta"):
        student = build.build_model_parts(cfg, student=True)
        teacher = build.build_model_parts(cfg, student=False)
    backbone = student["backbone"]
    global_batch = build.global_batch_size(cfg, world_size)
    scale = lr_scale(str(cfg.optim.scaling_rule), global_batch)
    device_type, note = detect_device_type(str(cfg.MODEL.DEVICE))
    problems = build.config_problems(cfg)
    param_counts = {f"student.{k}": v for k, v in build.count_parameters(student).items()}
    param_counts.update({f"teacher.{k}": v for k, v in build.count_parameters(teacher).items()})
    return {
        "arch": str(cfg.student.arch),
        "embed_dim": backbone.embed_dim,
        "depth": len(backbone.blocks),
        "num_heads": backbone.num_heads,
        "n_storage_tokens": int(cfg.student.n_storage_tokens),
        "ffn_layer": str(cfg.student.ffn_layer),
        "patch_size": int(cfg.student.patch_size),
        "parameters": param_counts,
        "parameters_trained": sum(v for k, v in param_counts.items() if k.startswith("student.")),
        "world_size": world_size,
        "global_batch_size": global_batch,
        "lr_peak_scaled": float(cfg.schedules.lr.peak) * scale,
        "lr_end_scaled": float(cfg.schedules.lr.end) * scale,
        "total_iterations": build.total_iterations(cfg),
        "iterations_this_run": end_iteration(cfg),
        "teacher_targets": build.assigner_kind(cfg),
        "device": device_type,
        "device_note": note,
        "problems": [str(p) for p in problems],
        "notes": superseded_notes(cfg),
    }
