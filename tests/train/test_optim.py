import pytest
import torch

from dino_bridge.models import DINOHead, build_vit
from dino_bridge.train.optim import OptimSettings, apply_schedules, build_optimizer, build_param_groups


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    backbone = build_vit("vit_tiny", img_size=16, patch_size=4, n_storage_tokens=2, layerscale_init=1e-5)
    backbone.init_weights()
    dino, ibot = (
        DINOHead(192, 32, hidden_dim=16, bottleneck_dim=8),
        DINOHead(192, 32, hidden_dim=16, bottleneck_dim=8),
    )
    return {"backbone": backbone, "dino_head": dino, "ibot_head": ibot}


SETTINGS = OptimSettings(
    layerwise_decay=0.9, patch_embed_lr_mult=0.2, dino_head_lr_multiplier=0.8, dino_head_wd_multiplier=0.5
)


def _group_of(groups, name):
    (group,) = [g for g in groups if name in g["names"]]
    return group


def test_every_multiplier_is_visible_in_the_optimizer_groups(parts):
    groups = build_param_groups(parts, num_blocks=12, settings=SETTINGS)
    optimizer = build_optimizer(groups, betas=(0.9, 0.99), foreach=True)
    og = optimizer.param_groups
    # layer-wise decay: block i gets 0.9^(12 - i); tokens and patch embed 0.9^13 (× 0.2 for the patch embed)
    assert _group_of(og, "backbone.blocks.11.attn.qkv.weight")["lr_multiplier"] == pytest.approx(0.9)
    assert _group_of(og, "backbone.blocks.0.mlp.fc1.weight")["lr_multiplier"] == pytest.approx(0.9**12)
    assert _group_of(og, "backbone.cls_token")["lr_multiplier"] == pytest.approx(0.9**13)
    assert _group_of(og, "backbone.patch_embed.proj.weight")["lr_multiplier"] == pytest.approx(0.9**13 * 0.2)
    assert _group_of(og, "backbone.norm.weight")["lr_multiplier"] == pytest.approx(1.0)
    # the DINO head multipliers are applied (the reference's were dead), the iBOT head's are not
    assert _group_of(og, "dino_head.mlp.0.weight")["lr_multiplier"] == pytest.approx(0.8)
    assert _group_of(og, "dino_head.mlp.0.weight")["wd_multiplier"] == pytest.approx(0.5)
    assert _group_of(og, "ibot_head.mlp.0.weight")["lr_multiplier"] == pytest.approx(1.0)
    assert _group_of(og, "ibot_head.mlp.0.weight")["wd_multiplier"] == pytest.approx(1.0)
    # no weight decay on norms, biases, LayerScale gammas and tokens
    for name in (
        "backbone.blocks.3.norm1.weight",
        "backbone.blocks.3.attn.qkv.bias",
        "backbone.blocks.3.ls1.gamma",
        "backbone.cls_token",
        "backbone.storage_tokens",
        "backbone.mask_token",
        "dino_head.mlp.0.bias",
    ):
        assert _group_of(og, name)["wd_multiplier"] == 0.0, name
    assert _group_of(og, "backbone.blocks.3.attn.qkv.weight")["wd_multiplier"] == 1.0
    # prototypes are the last layer (frozen by the last-layer lr schedule)
    assert _group_of(og, "dino_head.last_layer.weight")["is_last_layer"]
    assert _group_of(og, "ibot_head.last_layer.weight")["is_last_layer"]
    assert not _group_of(og, "dino_head.mlp.0.weight")["is_last_layer"]
    n_params = sum(p.numel() for m in parts.values() for p in m.parameters())
    assert sum(p.numel() for g in og for p in g["params"]) == n_params


def test_apply_schedules_sets_lr_and_wd_per_group(parts):
    optimizer = build_optimizer(build_param_groups(parts, 12, SETTINGS), betas=(0.9, 0.99), foreach=False)
    apply_schedules(optimizer, lr=1e-3, last_layer_lr=0.0, wd=0.04)
    for group in optimizer.param_groups:
        expected_lr = 0.0 if group["is_last_layer"] else 1e-3 * group["lr_multiplier"]
        assert group["lr"] == pytest.approx(expected_lr)
        assert group["weight_decay"] == pytest.approx(0.04 * group["wd_multiplier"])


def test_frozen_last_layer_does_not_move(parts):
    head = DINOHead(8, 4, nlayers=1, bottleneck_dim=4)
    torch.manual_seed(1)
    head.init_weights()
    optimizer = build_optimizer(
        build_param_groups({"dino_head": head}, 0, SETTINGS), betas=(0.9, 0.99), foreach=True
    )
    before = head.last_layer.weight.detach().clone()
    mlp_before = head.mlp.weight.detach().clone()
    apply_schedules(optimizer, lr=0.1, last_layer_lr=0.0, wd=0.04)
    head(torch.randn(5, 8)).square().sum().backward()
    optimizer.step()
    torch.testing.assert_close(head.last_layer.weight, before, rtol=0, atol=0)
    assert not torch.equal(head.mlp.weight, mlp_before)  # the rest of the head does learn
