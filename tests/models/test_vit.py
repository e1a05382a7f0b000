"""The backbone: token layout, masking, crop-set lists, final norms, presets, errors."""

from __future__ import annotations

import pytest
import torch

from dino_bridge.models import ARCHS, DinoVisionTransformer, build_vit

D, P = 32, 8  # width, patch size


def _vit(seed=0, **kwargs):
    cfg = dict(embed_dim=D, depth=2, num_heads=2, patch_size=P, pos_embed_rope_dtype="fp32")
    cfg.update(kwargs)
    model = build_vit("vit_tiny", **cfg)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def _block0_input(model, *args, **kwargs):
    """The token list that enters the first block."""
    captured = {}

    def hook(module, args):
        captured["tokens"] = [t.detach().clone() for t in args[0]]

    handle = model.blocks[0].register_forward_pre_hook(hook)
    try:
        model.forward_features(*args, **kwargs)
    finally:
        handle.remove()
    return captured["tokens"]


def test_list_input_shapes_and_token_layout():
    model = _vit(n_storage_tokens=3)
    x = [torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 24)]
    masks = [torch.rand(4, 16) < 0.5, None]
    out = model.forward_features(x, masks=masks)
    assert isinstance(out, list) and len(out) == 2
    for o, (b, hw) in zip(out, [(4, 16), (6, 6)]):
        assert o["x_norm_clstoken"].shape == (b, D)
        assert o["x_storage_tokens"].shape == (b, 3, D)
        assert o["x_norm_patchtokens"].shape == (b, hw, D)
        assert o["x_prenorm"].shape == (b, 1 + 3 + hw, D)
    assert out[0]["masks"] is masks[0] and out[1]["masks"] is None
    # with one shared norm, the outputs are norm(x_prenorm) split as [CLS, storage, patches]
    normed = model.norm(out[1]["x_prenorm"])
    assert torch.allclose(out[1]["x_norm_clstoken"], normed[:, 0])
    assert torch.allclose(out[1]["x_storage_tokens"], normed[:, 1:4])
    assert torch.allclose(out[1]["x_norm_patchtokens"], normed[:, 4:])


def test_tensor_input_returns_one_dict_and_forward_returns_normed_cls():
    model = _vit().eval()
    x = torch.randn(2, 3, 16, 16)
    out = model.forward_features(x)
    assert isinstance(out, dict) and out["x_storage_tokens"].shape == (2, 0, D)
    assert torch.equal(model(x), out["x_norm_clstoken"])


def test_list_processing_equals_separate_calls():
    model = _vit(n_storage_tokens=1).eval()
    x1, x2 = torch.randn(2, 3, 16, 16), torch.randn(3, 3, 8, 24)
    joint = model.forward_features([x1, x2])
    for o, xi in zip(joint, (x1, x2)):
        assert torch.allclose(o["x_prenorm"], model.forward_features(xi)["x_prenorm"], atol=1e-5)


def test_first_block_input_is_cls_storage_then_patches():
    model = _vit(n_storage_tokens=2)
    x = torch.randn(2, 3, 16, 16)
    (tokens,) = _block0_input(model, [x])
    assert torch.allclose(tokens[:, 0], model.cls_token[0, 0].expand(2, D))
    assert torch.allclose(tokens[:, 1:3], model.storage_tokens[0].expand(2, 2, D))
    assert torch.allclose(tokens[:, 3:], model.patch_embed(x), atol=1e-6)


def test_mask_token_replaces_exactly_the_masked_patches():
    model = _vit(n_storage_tokens=1)
    with torch.no_grad():
        model.mask_token.fill_(7.0)
    x = torch.randn(2, 3, 16, 16)
    masks = torch.tensor([[True, False, False, True], [False, False, False, False]])
    (plain,) = _block0_input(model, [x])
    (masked,) = _block0_input(model, [x], masks=[masks])
    patches, plain_patches = masked[:, 2:], plain[:, 2:]
    assert torch.all(patches[masks] == 7.0)
    assert torch.equal(patches[~masks], plain_patches[~masks])
    assert torch.equal(masked[:, :2], plain[:, :2])  # prefix tokens are never masked


def test_mask_token_stays_in_the_graph_and_gets_gradient_only_from_masks():
    model = _vit()
    x = torch.randn(2, 3, 16, 16)
    model.forward_features([x], masks=[None])[0]["x_norm_clstoken"].sum().backward()
    assert model.mask_token.grad is not None and torch.all(model.mask_token.grad == 0)
    model.zero_grad()
    masks = torch.zeros(2, 4, dtype=torch.bool)
    masks[0, 1] = True
    model.forward_features(x, masks=masks)["x_norm_clstoken"].sum().backward()
    assert model.mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize("flags", [[False, True], [True, False]])
def test_local_cls_norm_only_for_flagged_crop_sets_in_training(flags):
    model = _vit(n_storage_tokens=2, untie_global_and_local_cls_norm=True)
    with torch.no_grad():
        model.local_cls_norm.weight.fill_(3.0)
        model.local_cls_norm.bias.fill_(-1.0)
    x = [torch.randn(2, 3, 16, 16), torch.randn(3, 3, 8, 8)]
    model.train()
    out = model.forward_features(x, local_crops=flags)
    for o, is_local in zip(out, flags):
        prefix = o["x_prenorm"][:, :3]
        norm = model.local_cls_norm if is_local else model.norm
        assert torch.allclose(o["x_norm_clstoken"], norm(prefix)[:, 0], atol=1e-6)
        assert torch.allclose(o["x_storage_tokens"], norm(prefix)[:, 1:], atol=1e-6)
        assert torch.allclose(o["x_norm_patchtokens"], model.norm(o["x_prenorm"][:, 3:]), atol=1e-6)
    model.eval()
    for o in model.forward_features(x, local_crops=flags):
        assert torch.allclose(o["x_norm_clstoken"], model.norm(o["x_prenorm"][:, 0]), atol=1e-6)


def test_untied_cls_norm_is_used_for_the_prefix():
    model = _vit(untie_cls_and_patch_norms=True, untie_global_and_local_cls_norm=True)
    with torch.no_grad():
        model.cls_norm.weight.fill_(2.0)
    x = torch.randn(2, 3, 16, 16)
    for mode in (model.train, model.eval):
        mode()
        o = model.forward_features(x, local_crops=False)
        assert torch.allclose(o["x_norm_clstoken"], model.cls_norm(o["x_prenorm"][:, 0]), atol=1e-6)
    model.train()
    o = model.forward_features(x, local_crops=True)  # local_cls_norm wins in training
    assert torch.allclose(o["x_norm_clstoken"], model.local_cls_norm(o["x_prenorm"][:, 0]), atol=1e-6)


def test_rope_augmentation_changes_outputs_only_in_training():
    model = _vit(pos_embed_rope_rescale_coords=2.0, layerscale_init=1.0)
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model.forward_features(x)["x_prenorm"]
    b = model.forward_features(x)["x_prenorm"]
    assert not torch.allclose(a, b)


def test_parameter_names_follow_dinov3():
    model = _vit(
        n_storage_tokens=4, mask_k_bias=True, ffn_layer="swiglu64", untie_cls_and_patch_norms=True,
        untie_global_and_local_cls_norm=True, depth=1,
    )  # fmt: skip
    expected = {
        "cls_token", "storage_tokens", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
        "rope_embed.periods", "norm.weight", "norm.bias", "cls_norm.weight", "cls_norm.bias",
        "local_cls_norm.weight", "local_cls_norm.bias",
        *(f"blocks.0.{n}" for n in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.qkv.bias_mask",
            "attn.proj.weight", "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias",
            "mlp.w1.weight", "mlp.w1.bias", "mlp.w2.weight", "mlp.w2.bias", "mlp.w3.weight",
            "mlp.w3.bias", "ls2.gamma",
        )),
    }  # fmt: skip
    assert set(model.state_dict()) == expected
    assert model.cls_token.shape == (1, 1, D) and model.mask_token.shape == (1, D)
    assert model.storage_tokens.shape == (1, 4, D)
    assert "storage_tokens" not in _vit().state_dict()


def test_presets():
    assert {k: (v["embed_dim"], v["depth"], v["num_heads"]) for k, v in ARCHS.items()} == {
        "vit_tiny": (192, 12, 3),
        "vit_small": (384, 12, 6),
        "vit_base": (768, 12, 12),
        "vit_large": (1024, 24, 16),
        "vit_so400m": (1152, 27, 18),
        "vit_huge2": (1280, 32, 20),
        "vit_giant2": (1536, 40, 24),
        "vit_7b": (4096, 40, 32),
    }
    with torch.device("meta"):
        so400m = build_vit("vit_so400m")
        assert so400m.blocks[0].mlp.fc1.out_features == 4304
        assert build_vit("vit_large", ffn_ratio=6.0).blocks[0].mlp.fc1.out_features == 6144
    with pytest.raises(ValueError, match="vit_large"):
        build_vit("vit_gigantic")


# Released DINOv3 hub models (reference §1.9): 4 storage tokens, mask_k_bias, layernormbf16.
@pytest.mark.parametrize(
    "arch, kwargs, millions",
    [
        ("vit_small", {}, 21.6),
        ("vit_small", dict(ffn_layer="swiglu", ffn_ratio=6), 28.7),
        ("vit_base", {}, 85.7),
        ("vit_large", {}, 303.2),
        ("vit_huge2", dict(ffn_layer="swiglu", ffn_ratio=6), 840.6),
        ("vit_7b", dict(ffn_layer="swiglu64", qkv_bias=False, untie_global_and_local_cls_norm=True), 6716.0),
    ],
)
def test_released_parameter_counts(arch, kwargs, millions):
    with torch.device("meta"):
        model = build_vit(arch, n_storage_tokens=4, mask_k_bias=True, norm_layer="layernormbf16", **kwargs)
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e6, 1) == millions
    if arch == "vit_large":
        assert count == 303_154_176


def test_user_errors_name_the_culprit():
    model = _vit()
    with pytest.raises(ValueError, match=r"30x32.*patch size 8"):
        model.forward_features(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="masks"):
        model.forward_features([torch.randn(1, 3, 16, 16)] * 2, masks=[None])
    with pytest.raises(ValueError, match="local_crops"):
        model.forward_features([torch.randn(1, 3, 16, 16)] * 2, local_crops=[True])
    with pytest.raises(ValueError, match=r"\[2, 4\]"):
        model.forward_features(torch.randn(2, 3, 16, 16), masks=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="4\\*num_heads"):
        DinoVisionTransformer(embed_dim=40, num_heads=4)
