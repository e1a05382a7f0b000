"""Init helpers: full-tensor CPU draws, dtype/meta behaviour, and DTensor shards (2 gloo ranks)."""

from __future__ import annotations

import math

import pytest
import torch

from dino_bridge.models import build_vit
from dino_bridge.models.init import constant_, copy_, normal_, trunc_normal_, uniform_, zeros_
from tests.distributed_utils import spawn


def _tiny_vit(**kwargs):
    cfg = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, n_storage_tokens=2, mask_k_bias=True)
    cfg.update(kwargs)
    return build_vit("vit_tiny", **cfg)


def test_trunc_normal_is_the_nn_init_draw_with_absolute_bounds():
    torch.manual_seed(0)
    t = trunc_normal_(torch.empty(4000), std=0.02)
    torch.manual_seed(0)
    ref = torch.nn.init.trunc_normal_(torch.empty(4000), std=0.02, a=-2.0, b=2.0)
    assert torch.equal(t, ref)
    assert abs(t.std().item() - 0.02) < 2e-3


def test_draw_is_fp32_then_cast_so_dtype_does_not_change_values():
    for fn in (lambda t: trunc_normal_(t), lambda t: normal_(t, std=0.5), lambda t: uniform_(t, -1, 1)):
        torch.manual_seed(3)
        bf = fn(torch.empty(64, 8, dtype=torch.bfloat16))
        torch.manual_seed(3)
        f32 = fn(torch.empty(64, 8))
        assert torch.equal(bf, f32.to(torch.bfloat16))


def test_meta_tensor_is_a_noop_but_consumes_the_same_random_numbers():
    torch.manual_seed(0)
    trunc_normal_(torch.empty(10, 10, device="meta"))
    after_meta = torch.rand(3)
    torch.manual_seed(0)
    trunc_normal_(torch.empty(10, 10))
    assert torch.equal(torch.rand(3), after_meta)


def test_constant_zeros_copy_and_no_grad():
    p = torch.nn.Parameter(torch.empty(2, 3))
    constant_(p, 1.5)
    assert torch.all(p == 1.5) and p.grad_fn is None
    zeros_(p)
    assert torch.all(p == 0)
    copy_(p, torch.tensor([1.0, 2.0, 3.0]))  # broadcast to the full shape
    assert torch.equal(p.detach(), torch.tensor([[1.0, 2.0, 3.0]] * 2))


def _meta_nan_init(model_fn, seed):
    with torch.device("meta"):
        model = model_fn()
    model.to_empty(device="cpu")
    for t in [*model.parameters(), *model.buffers()]:
        t.detach().fill_(math.nan)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def test_meta_build_then_init_defines_every_tensor_and_is_seed_deterministic():
    kwargs = dict(untie_cls_and_patch_norms=True, untie_global_and_local_cls_norm=True, ffn_layer="swiglu")
    a = _meta_nan_init(lambda: _tiny_vit(**kwargs), seed=0)
    for name, t in a.state_dict().items():
        assert torch.isfinite(t).all(), name
    b = _meta_nan_init(lambda: _tiny_vit(**kwargs), seed=0)
    c = _tiny_vit(**kwargs)  # built directly on the CPU
    torch.manual_seed(0)
    c.init_weights()
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
        assert torch.equal(t, c.state_dict()[name]), name
    # a few values that are fixed by the init rules
    sd = a.state_dict()
    assert torch.all(sd["mask_token"] == 0)
    assert torch.all(sd["blocks.0.ls1.gamma"] == 1e-5)
    assert torch.all(sd["blocks.1.attn.qkv.bias"] == 0)
    assert torch.equal(sd["blocks.0.attn.qkv.bias_mask"], torch.tensor([1.0] * 32 + [0.0] * 32 + [1.0] * 32))
    assert torch.all(sd["local_cls_norm.weight"] == 1) and torch.all(sd["cls_norm.bias"] == 0)
    bound = math.sqrt(1 / (3 * 8 * 8))
    assert sd["patch_embed.proj.weight"].abs().max() <= bound
    d = _meta_nan_init(lambda: _tiny_vit(**kwargs), seed=1)
    assert not torch.equal(d.cls_token, a.cls_token)


# ---------------------------------------------------------------------------------------------
# DTensor / FSDP2: the shard of a rank equals the matching slice of the single-process init.


def _dtensor_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    # 1. single tensors, uneven shapes, several placements
    for placements in ([Shard(0)], [Shard(1)], [Replicate()]):
        for fn in (lambda t: trunc_normal_(t), lambda t: uniform_(t, -1, 1), lambda t: normal_(t, std=2.0)):
            torch.manual_seed(7)
            full = fn(torch.empty(7, 5))
            dt = distribute_tensor(torch.zeros(7, 5), mesh, placements)
            torch.manual_seed(7)
            fn(dt)
            # torch.chunk semantics, as FSDP2 and distribute_tensor use
            dim = placements[0].dim if isinstance(placements[0], Shard) else None
            expected = full if dim is None else full.chunk(world_size, dim=dim)[rank]
            assert torch.equal(dt.to_local(), expected), (placements, rank)
            assert torch.equal(dt.full_tensor(), full)

    # 2. a whole model: meta → fully_shard (blocks, then root) → to_empty → NaN → init_weights
    with torch.device("meta"):
        model = _tiny_vit()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.to_local().detach().fill_(math.nan)
    torch.manual_seed(0)
    model.init_weights()
    reference = _tiny_vit()
    torch.manual_seed(0)
    reference.init_weights()
    ref_params = dict(reference.named_parameters())
    n_checked = 0
    for name, p in model.named_parameters():
        assert torch.equal(p.full_tensor(), ref_params[name]), name
        n_checked += 1
    return n_checked


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_dtensor_init_equals_the_slice_of_the_unsharded_init():
    counts = spawn(_dtensor_worker, 2, timeout=120)
    assert counts[0] == counts[1] == len(list(_tiny_vit().parameters()))
