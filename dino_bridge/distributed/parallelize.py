"""Distributed transforms, applied in one documented order to a model built on the ``meta`` device:

    activation checkpointing (student backbone blocks)
      → torch.compile (per block and per head, CUDA only)
      → fully_shard (per block, then the backbone, then each head)   [FSDP2 only]
      → to_empty(device) → init_weights()                             [the caller]

The teacher gets the same compile and sharding (no activation checkpointing: it never runs
backward), so every teacher shard matches the student shard of the same name and the EMA is a
foreach over local shards. Without FSDP2 (one process, or ``NO_SHARD``/``parallel: dp``) each rank
holds the whole model and ``data_parallel.average_gradients_`` averages gradients after backward.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger("dino_bridge")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ParallelPlan:
    """How to run the student and teacher (filled from the config by the trainer)."""

    fsdp: bool = False
    reshard_after_forward: bool = False  # SHARD_GRAD_OP: False; FULL_SHARD: True
    param_dtype: str = "fp32"
    reduce_dtype: str = "fp32"
    activation_checkpointing: str = "off"  # off | selective | full
    compile: bool = False
    cudagraphs: bool = False

    def describe(self) -> str:
        mode = f"FSDP2 (reshard_after_forward={self.reshard_after_forward})" if self.fsdp else "data parallel"
        return (
            f"{mode}, params {self.param_dtype}, reduce {self.reduce_dtype},"
            f" activation checkpointing {self.activation_checkpointing}, compile {self.compile}"
        )


def _selective_policy_ops() -> set:
    """Ops whose outputs are kept under selective activation checkpointing (the rest is recomputed)."""
    names = [
        ("aten", "mm"),
        ("aten", "addmm"),
        ("aten", "bmm"),
        ("aten", "_scaled_mm"),
        ("aten", "_scaled_dot_product_efficient_attention"),
        ("aten", "_scaled_dot_product_flash_attention"),
        ("aten", "_scaled_dot_product_flash_attention_for_cpu"),
        ("aten", "_scaled_dot_product_cudnn_attention"),
        ("_c10d_functional", "reduce_scatter_tensor"),
    ]
    ops = set()
    for namespace, name in names:
        packet = getattr(getattr(torch.ops, namespace), name, None)
        if packet is not None:
            ops.add(packet.default)
    return ops


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    save = _selective_policy_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(blocks: nn.ModuleList, mode: str) -> None:
    """Recompute each block's activations in backward (``full``), or all but matmul/attention
    outputs (``selective``). Parameter names are unchanged (the block's ``forward`` is wrapped)."""
    if mode == "off":
        return
    from torch.utils.checkpoint import checkpoint

    context_fn = _selective_context if mode == "selective" else None
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            extra = {"context_fn": context_fn} if context_fn is not None else {}
            return checkpoint(_inner, *args, use_reentrant=False, preserve_rng_state=True, **extra, **kwargs)

        block.forward = forward


def apply_compile(parts: nn.ModuleDict, cudagraphs: bool) -> None:
    """``torch.compile`` each backbone block and each head separately (shapes differ per crop set)."""
    options = (
        {"fullgraph": True, "dynamic": False, "options": {"triton.cudagraphs": True}} if cudagraphs else {}
    )
    for block in parts["backbone"].blocks:
        block.compile(**options)
    for name, module in parts.items():
        if name != "backbone":
            module.compile()


def apply_fsdp(parts: nn.ModuleDict, mesh, plan: ParallelPlan) -> None:
    """FSDP2: each block, then the backbone (root params: patch embed, tokens, norms), then each head."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    try:
        from torch.distributed.fsdp import register_fsdp_forward_method
    except ImportError:  # torch < 2.5
        from torch.distributed._composable.fsdp import register_fsdp_forward_method

    # forward_features returns slices of its output tensor (CLS, storage, patches); nothing downstream
    # modifies them in place, which is what FSDP2's warning about returned views is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[plan.param_dtype], reduce_dtype=DTYPES[plan.reduce_dtype])
    shard = functools.partial(fully_shard, mesh=mesh, mp_policy=mp)
    backbone = parts["backbone"]
    for block in backbone.blocks:
        shard(block, reshard_after_forward=plan.reshard_after_forward)
    shard(backbone, reshard_after_forward=plan.reshard_after_forward)
    # the trainer calls forward_features, not forward: it must unshard the root parameters too
    register_fsdp_forward_method(backbone, "forward_features")
    for name, module in parts.items():
        if name != "backbone":
            shard(module, reshard_after_forward=plan.reshard_after_forward)


def parallelize(
    parts: nn.ModuleDict, plan: ParallelPlan, device: torch.device, *, trains: bool, mesh=None
) -> None:
    """Apply the transforms of ``plan`` in the documented order (parts built on ``meta``)."""
    if trains:
        apply_activation_checkpointing(parts["backbone"].blocks, plan.activation_checkpointing)
    if plan.compile:
        if device.type == "cuda":
            apply_compile(parts, plan.cudagraphs)
        elif trains:
            logger.info("train.compile: skipped on %s (torch.compile is applied on CUDA only)", device.type)
    if plan.fsdp:
        if mesh is None:
            raise ValueError("FSDP2 needs a device mesh")
        # The teacher never runs backward, which is where FSDP2 reshards after a forward that kept
        # its parameters gathered: it must reshard right after its forward (and the EMA then sees
        # the same local shards as the student's).
        apply_fsdp(parts, mesh, plan if trains else dataclasses.replace(plan, reshard_after_forward=True))


def build_mesh(device: torch.device, world_size: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
