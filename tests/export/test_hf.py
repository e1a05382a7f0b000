"""Export to Hugging Face DINOv3 and back: equal outputs, exact tensors, refusals by field name."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dino_bridge import hub
from dino_bridge.export import hf_adapter, write_hf, write_torch
from dino_bridge.models import build_vit
from tests.helpers import REPO

transformers = pytest.importorskip("transformers")

SEED_LIKE = dict(
    img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, ffn_ratio=4.0, ffn_layer="swiglu64",
    norm_layer="layernormbf16", n_storage_tokens=2, untie_global_and_local_cls_norm=True, mask_k_bias=True,
    layerscale_init=0.5, pos_embed_rope_rescale_coords=2.0, pos_embed_rope_dtype="fp32",
)  # fmt: skip


def random_backbone(**overrides):
    spec = {"arch": "vit_small", "kwargs": {**SEED_LIKE, **overrides}, "rgb_mean": [0.5, 0.4, 0.3],
            "rgb_std": [0.2, 0.25, 0.3]}  # fmt: skip
    torch.manual_seed(0)
    model = build_vit(spec["arch"], **spec["kwargs"])
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "token" in name else 0.1))
    return spec, model.eval()


def ours_tokens(model, x):
    out = model.forward_features(x)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_storage_tokens"], out["x_norm_patchtokens"]], 1)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(
            ffn_layer="mlp",
            mask_k_bias=False,
            n_storage_tokens=0,
            norm_layer="layernorm",
            untie_global_and_local_cls_norm=False,
        ),
    ],
)
def test_hf_export_matches_and_round_trips_exactly(tmp_path, overrides):
    spec, model = random_backbone(**overrides)
    count = write_hf(spec, model.state_dict(), tmp_path / "hf")
    fields = {f.name for f in __import__("dataclasses").fields(transformers.DINOv3ViTConfig)}
    written = json.loads((tmp_path / "hf/config.json").read_text())
    assert set(written) - {"architectures", "model_type", "dtype"} <= fields  # every name is HF's
    hf_model, info = transformers.DINOv3ViTModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert count == len(hf_model.state_dict())
    torch.manual_seed(1)
    for size in ((32, 32), (48, 24)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            diff = (hf_model(pixel_values=x).last_hidden_state - ours_tokens(model, x)).abs().max().item()
        print(f"fp32 RoPE {size}: max abs diff {diff:.2e}")
        assert diff < 1e-4
    # HF's own save, imported back: every tensor HF holds comes back exactly
    hf_model.save_pretrained(tmp_path / "resaved")
    back = hub.load_backbone(tmp_path / "resaved")
    _, again = hf_adapter.to_hf(back.spec, back.state_dict())
    held = hf_model.state_dict()
    for key, value in held.items():
        assert torch.equal(again[hf_adapter._hf_key(key)], value), key
    ours = model.state_dict()
    for key, value in back.state_dict().items():
        if key.startswith("local_cls_norm."):
            continue
        if key.endswith("qkv.bias") and spec["kwargs"]["mask_k_bias"]:
            assert torch.equal(value[32:64], torch.zeros(32))
            continue
        assert torch.equal(value.float(), ours[key].float()), key


def test_bf16_rope_deviation_is_small(tmp_path):
    spec, model = random_backbone(pos_embed_rope_dtype="bf16")
    write_hf(spec, model.state_dict(), tmp_path / "hf")
    hf_model = transformers.DINOv3ViTModel.from_pretrained(tmp_path / "hf")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (hf_model(pixel_values=x).last_hidden_state - ours_tokens(model, x)).abs().max().item()
    print(f"bf16 RoPE: max abs diff {diff:.2e}")
    assert 0 < diff < 0.1


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(norm_layer="rmsnorm"), "norm_layer"),
        (dict(untie_cls_and_patch_norms=True), "untie_cls_and_patch_norms"),
        (
            dict(pos_embed_rope_base=None, pos_embed_rope_min_period=0.5, pos_embed_rope_max_period=50.0),
            "pos_embed_rope_min_period",
        ),
        (dict(pos_embed_rope_normalize_coords="max"), "pos_embed_rope_normalize_coords"),
    ],
)
def test_a_config_hf_cannot_express_is_refused_by_name(tmp_path, overrides, field):
    spec, model = random_backbone(**overrides)
    with pytest.raises(ValueError, match=field):
        write_hf(spec, model.state_dict(), tmp_path / "hf")


def test_torch_export_round_trips_through_hub(tmp_path):
    spec, model = random_backbone()
    write_torch(spec, model.state_dict(), tmp_path / "t")
    back = hub.load_backbone(tmp_path / "t")
    x = torch.randn(2, 3, 32, 32)
    a, b = model.forward_features(x), back.forward_features(x)
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_storage_tokens"):
        assert torch.equal(a[key], b[key]), key


def _checkpoint(tmp_path, spec, model):
    from dino_bridge.train.checkpoint import save_checkpoint

    parts = torch.nn.ModuleDict({"backbone": model})
    opt = torch.optim.SGD(parts.parameters(), lr=0.1)
    return save_checkpoint(tmp_path / "ckpt", 1, student=parts, teacher=parts, optimizer=opt,
                           trainer_state={}, backbone_spec=spec)  # fmt: skip


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dino_bridge.cli", "export", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_export_command(tmp_path, capsys):
    from dino_bridge.cli import main

    spec, model = random_backbone()
    ckpt = _checkpoint(tmp_path, spec, model)
    out = _cli("--checkpoint", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr
    assert "45 tensors mapped" in out.stdout and "local-crop CLS norm" in out.stderr
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--format", "hf", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    spec, model = random_backbone(norm_layer="rmsnorm")
    bad = _checkpoint(tmp_path / "bad", spec, model)
    assert main(["export", "--checkpoint", str(bad), "--format", "hf", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "norm_layer" in err and len(err.strip().splitlines()) == 1


def test_the_processor_config_loads_and_matches_our_eval_transform_on_square_images(tmp_path):
    import numpy as np

    from dino_bridge.eval import eval_transform_for
    from tests.helpers import synthetic_image

    spec, model = random_backbone()
    write_hf(spec, model.state_dict(), tmp_path / "hf")
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    image = synthetic_image(np.random.default_rng(0), 60)
    theirs = processor(image, return_tensors="pt")["pixel_values"][0]
    ours = eval_transform_for(spec)(image)
    assert theirs.shape == ours.shape == (3, 32, 32)
    # HF resizes floats, we resize uint8 (rounding, clamped overshoot): close, not equal
    assert (theirs - ours).abs().max() < 0.15
