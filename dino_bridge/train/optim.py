"""AdamW parameter groups: layer-wise lr decay, per-part multipliers, no decay on norms/biases/tokens.

Every group carries ``lr_multiplier``, ``wd_multiplier`` and ``is_last_layer``; each step the loop
sets ``lr = schedule_lr · lr_multiplier`` (``last_layer_lr`` for last-layer groups, which is 0
while the prototypes are frozen) and ``weight_decay = schedule_wd · wd_multiplier``. Parameter
names are taken relative to the student's parts (``backbone``, ``dino_head``, ``ibot_head``), and
the part name decides which multipliers apply, so ``dino_head_lr_multiplier`` really reaches the
DINO head (in the reference it never matched anything).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

TOKEN_NAMES = ("cls_token", "storage_tokens", "mask_token", "pos_embed")


@dataclass(frozen=True)
class OptimSettings:
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    dino_head_lr_multiplier: float = 1.0
    dino_head_wd_multiplier: float = 1.0


def backbone_layer_id(name: str, num_blocks: int) -> int:
    """0 for the patch embedding and tokens, i+1 for block i, num_blocks+1 for everything after."""
    if name.startswith("patch_embed") or name.split(".")[0] in TOKEN_NAMES:
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_blocks + 1


def no_weight_decay(name: str) -> bool:
    """Biases, norm weights, LayerScale gammas and learned tokens are not decayed."""
    leaf = name.split(".")[-1]
    return leaf == "bias" or "norm" in name or leaf == "gamma" or name.split(".")[0] in TOKEN_NAMES


def param_multipliers(part: str, name: str, num_blocks: int, s: OptimSettings):
    """(lr_multiplier, wd_multiplier, is_last_layer) of one parameter of ``part``."""
    lr_mult, wd_mult = 1.0, 0.0 if no_weight_decay(name) else 1.0
    if part == "backbone":
        lr_mult = s.layerwise_decay ** (num_blocks + 1 - backbone_layer_id(name, num_blocks))
        if name.startswith("patch_embed"):
            lr_mult *= s.patch_embed_lr_mult
    elif part == "dino_head":
        lr_mult *= s.dino_head_lr_multiplier
        wd_mult *= s.dino_head_wd_multiplier
    return lr_mult, wd_mult, "last_layer" in name


def build_param_groups(parts: dict[str, nn.Module], num_blocks: int, settings: OptimSettings) -> list[dict]:
    """Groups of parameters sharing (lr_multiplier, wd_multiplier, is_last_layer)."""
    fused: dict[tuple, dict] = defaultdict(lambda: {"params": [], "names": []})
    seen: set[int] = set()
    for part, module in parts.items():
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue  # a shared head (ibot.separate_head=false) appears once
            seen.add(id(param))
            key = param_multipliers(part, name, num_blocks, settings)
            fused[key]["params"].append(param)
            fused[key]["names"].append(f"{part}.{name}")
    groups = []
    for (lr_mult, wd_mult, is_last), group in sorted(fused.items(), key=lambda kv: kv[0]):
        groups.append({**group, "lr_multiplier": lr_mult, "wd_multiplier": wd_mult, "is_last_layer": is_last})
    return groups


def build_optimizer(
    groups: list[dict], *, betas: tuple[float, float], foreach: bool, fused: bool = False
) -> torch.optim.AdamW:
    # lr and weight_decay are set every step from the schedules (apply_schedules).
    kwargs = {"fused": True} if fused else {"foreach": foreach}
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, betas=betas, **kwargs)


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, last_layer_lr: float, wd: float) -> None:
    for group in optimizer.param_groups:
        base = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]
