"""get_intermediate_layers: the DINOv2/DINOv3 probe API (which blocks, norms, reshape, errors)."""

from __future__ import annotations

import pytest
import torch

from dino_bridge.models import build_vit

D, P = 32, 8  # width, patch size


def _vit(depth=3, seed=0, **kwargs):
    model = build_vit(
        "vit_tiny", embed_dim=D, depth=depth, num_heads=2, patch_size=P, pos_embed_rope_dtype="fp32", **kwargs
    )
    torch.manual_seed(seed)
    model.init_weights()
    return model.eval()


def _block_outputs(model, x):
    """Every block's raw output [B, N, D], by hooks on a forward_features call."""
    outputs = []
    hook = lambda module, args, out: outputs.append(out[0].detach())  # noqa: E731
    handles = [block.register_forward_hook(hook) for block in model.blocks]
    try:
        model.forward_features(x)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


@pytest.mark.parametrize("untied", [False, True])
def test_the_last_block_with_norm_is_forward_features(untied):
    model = _vit(n_storage_tokens=2, untie_cls_and_patch_norms=untied)
    if untied:  # a cls_norm that differs from norm, so using the wrong one shows
        torch.nn.init.normal_(model.cls_norm.weight)
    x = torch.randn(3, 3, 16, 24)
    ref = model.forward_features(x)
    ((patches, cls),) = model.get_intermediate_layers(x, return_class_token=True)
    assert patches.shape == (3, 6, D) and cls.shape == (3, D)  # storage tokens excluded
    torch.testing.assert_close(patches, ref["x_norm_patchtokens"])
    torch.testing.assert_close(cls, ref["x_norm_clstoken"])
    (alone,) = model.get_intermediate_layers(x)
    torch.testing.assert_close(alone, ref["x_norm_patchtokens"])


def test_blocks_by_count_and_by_index_without_norm_are_the_raw_block_outputs():
    model = _vit(depth=4, n_storage_tokens=1)
    x = torch.randn(2, 3, 16, 16)
    raw = _block_outputs(model, x)
    last_two = model.get_intermediate_layers(x, n=2, norm=False, return_class_token=True)
    assert len(last_two) == 2
    for (patches, cls), expected in zip(last_two, raw[2:]):
        torch.testing.assert_close(patches, expected[:, 2:])  # [CLS, storage, patches]
        torch.testing.assert_close(cls, expected[:, 0])
    picked = model.get_intermediate_layers(x, n=[2, 0], norm=False)  # returned in block order
    torch.testing.assert_close(picked[0], raw[0][:, 2:])
    torch.testing.assert_close(picked[1], raw[2][:, 2:])
    normed = model.get_intermediate_layers(x, n=(1,))
    torch.testing.assert_close(normed[0], model.norm(raw[1])[:, 2:])


def test_reshape_gives_channels_first_patch_grids():
    model = _vit()
    x = torch.randn(2, 3, 16, 32)  # h = 2, w = 4
    flat = model.get_intermediate_layers(x, n=2)
    grids = model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
    for tokens, (grid, cls) in zip(flat, grids):
        assert grid.shape == (2, D, 2, 4) and cls.shape == (2, D)
        # patch (row i, column j) is token i*w + j
        torch.testing.assert_close(grid[:, :, 1, 3], tokens[:, 1 * 4 + 3])
        torch.testing.assert_close(grid.flatten(2).transpose(1, 2), tokens)


def test_gradients_flow_when_the_caller_wants_them():
    model = _vit()
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    model.get_intermediate_layers(x)[0].sum().backward()
    assert x.grad is not None and model.blocks[-1].mlp.fc2.weight.grad is not None


@pytest.mark.parametrize(
    ("n", "message"),
    [
        (0, r"n=0 blocks requested but the backbone has 3"),
        (4, r"n=4 blocks requested but the backbone has 3"),
        ([0, 3], r"block indices \[3\] are not in \[0, 2\]"),
        ([-1], r"block indices \[-1\] are not in \[0, 2\]"),
        ([1, 1], r"repeat a block"),
        ([], r"empty sequence"),
        (1.5, r"n must be an int or a sequence"),
        (True, r"n must be an int or a sequence"),
    ],
)
def test_bad_block_choices_are_named(n, message):
    with pytest.raises(ValueError, match=message):
        _vit().get_intermediate_layers(torch.randn(1, 3, 8, 8), n=n)


def test_a_list_of_crop_sets_and_a_bad_image_size_are_refused():
    model = _vit()
    with pytest.raises(ValueError, match="one image batch"):
        model.get_intermediate_layers([torch.randn(1, 3, 8, 8)])
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model.get_intermediate_layers(torch.randn(1, 3, 12, 8))
