"""The DINO / iBOT projection head (DINOv3 form: no weight norm on the prototypes).

Shapes: N rows (CLS tokens or patch tokens), D backbone width, D_hid hidden width,
D_b bottleneck width, K prototypes.

    z = normalize(mlp(x))          # [N, D_b], unit L2 norm
    logits = last_layer(z)         # [N, K], bias-free Linear

``forward(x, frozen=True)`` computes the same logits with the head's parameters detached: the
gradient reaches ``x`` but not the head (the bridge trains through the student head this way). No
``requires_grad`` is toggled, so it is correct under FSDP2 (the detached tensors are the gathered
parameters of this call) and under ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dino_bridge.models.init import init_linear

__all__ = ["DINOHead"]


def _build_mlp(nlayers: int, in_dim: int, hidden_dim: int, bottleneck_dim: int) -> nn.Module:
    """nlayers Linears in → hidden → … → bottleneck with exact GELU between (none after the last).

    ``nlayers == 1`` is a bare Linear (state-dict key ``mlp.weight``, as in DINOv3).
    """
    if nlayers < 1:
        raise ValueError(f"DINOHead needs nlayers >= 1, got {nlayers}")
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ):
        super().__init__()
        self.mlp = _build_mlp(nlayers, in_dim, hidden_dim, bottleneck_dim)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)

    def init_weights(self) -> None:
        """Truncated normal 0.02 on every Linear weight, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_linear(module)

    def forward_mlp(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """[N, D] → L2-normalised bottleneck [N, D_b] (eps 1e-6 in fp16, else 1e-12)."""
        z = _frozen_forward(self.mlp, x) if frozen else self.mlp(x)
        eps = 1e-6 if z.dtype == torch.float16 else 1e-12
        return F.normalize(z, p=2, dim=-1, eps=eps)

    def forward_prototypes(self, z: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """[N, D_b] → logits [N, K]."""
        return _frozen_forward(self.last_layer, z) if frozen else self.last_layer(z)

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """[N, D] → logits [N, K]; ``frozen``: no gradient into the head's parameters."""
        return self.forward_prototypes(self.forward_mlp(x, frozen), frozen)


def _frozen_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a Linear or a Sequential of Linears and GELUs, with detached parameters."""
    if isinstance(module, nn.Linear):
        bias = None if module.bias is None else module.bias.detach()
        return F.linear(x, module.weight.detach(), bias)
    if isinstance(module, nn.Sequential):
        for layer in module:
            x = _frozen_forward(layer, x)
        return x
    if isinstance(module, nn.GELU):
        return module(x)
    raise TypeError(f"no frozen forward for {type(module).__name__}")
