"""The distributed transforms: gradient averaging (FSDP2 and plain data parallel) against one process
on the concatenated batch, and activation checkpointing against no checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dino_bridge.distributed.parallelize import ParallelPlan, apply_activation_checkpointing, parallelize
from dino_bridge.models import DINOHead, build_vit
from tests.distributed_utils import spawn


def _parts() -> nn.ModuleDict:
    backbone = build_vit("vit_tiny", img_size=16, patch_size=4, n_storage_tokens=1, drop_path_rate=0.0)
    return nn.ModuleDict({"backbone": backbone, "dino_head": DINOHead(192, 16, hidden_dim=32, bottleneck_dim=8)})


def _init(parts: nn.ModuleDict) -> None:
    torch.manual_seed(0)
    for module in parts.values():
        module.init_weights()


def _loss(parts: nn.ModuleDict, images: torch.Tensor) -> torch.Tensor:
    out = parts["backbone"].forward_features(images)
    return parts["dino_head"](out["x_norm_clstoken"]).square().mean() + out["x_norm_patchtokens"].mean()


def _images() -> torch.Tensor:
    return torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _reference_grads() -> dict[str, torch.Tensor]:
    parts = _parts()
    _init(parts)
    _loss(parts, _images()).backward()
    return {n: p.grad.clone() for n, p in parts.named_parameters() if p.grad is not None}


def _grads_on_rank(rank, world, fsdp: bool):
    from dino_bridge.distributed.data_parallel import average_gradients_
    from dino_bridge.distributed.parallelize import build_mesh

    with torch.device("meta"):
        parts = _parts()
    if fsdp:
        parallelize(parts, ParallelPlan(fsdp=True), torch.device("cpu"), trains=True, mesh=build_mesh(torch.device("cpu"), world))
    parts.to_empty(device="cpu")
    _init(parts)
    _loss(parts, _images().chunk(world)[rank]).backward()  # each rank: the mean over its half
    if not fsdp:
        average_gradients_(list(parts.parameters()))
    grads = {}
    for name, param in parts.named_parameters():
        if param.grad is not None:
            grad = param.grad
            grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return grads


@pytest.mark.parametrize("fsdp", [True, False], ids=["fsdp2", "data_parallel"])
def test_two_ranks_average_gradients_like_one_process(fsdp):
    """Guards against a reduction that sums instead of averaging (seen with gloo in some torch versions)."""
    expected = _reference_grads()
    per_rank = spawn(_grads_on_rank, 2, fsdp)
    for grads in per_rank:
        assert grads.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(grads[name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_changes_nothing_but_memory(mode):
    reference = _reference_grads()
    parts = _parts()
    _init(parts)
    apply_activation_checkpointing(parts["backbone"].blocks, mode)
    assert [n for n, _ in parts.named_parameters()] == [n for n, _ in _parts().named_parameters()]
    _loss(parts, _images()).backward()
    for name, param in parts.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(param.grad, reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_replays_drop_path_draws():
    """Recomputation must reuse the forward's random subsets (the RNG state is preserved)."""
    def grads(checkpointed: bool):
        torch.manual_seed(0)
        block_model = build_vit("vit_tiny", img_size=16, patch_size=4, drop_path_rate=0.5)
        block_model.init_weights()
        if checkpointed:
            apply_activation_checkpointing(block_model.blocks, "full")
        block_model.train()
        torch.manual_seed(3)
        block_model.forward_features(_images())["x_norm_clstoken"].sum().backward()
        return {n: p.grad for n, p in block_model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_compile_is_skipped_off_cuda(caplog):
    parts = _parts()
    with caplog.at_level("INFO", logger="dino_bridge"):
        parallelize(parts, ParallelPlan(compile=True), torch.device("cpu"), trains=True)
    assert "skipped on cpu" in caplog.text
    assert not any(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl for b in parts["backbone"].blocks)
