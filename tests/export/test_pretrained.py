"""An HF DINOv3 directory as ``student.pretrained_weights``: training starts from its tensors."""

from __future__ import annotations

import pytest
import torch

from dino_bridge.config import ConfigError
from dino_bridge.distributed.device import Runtime
from dino_bridge.export import write_hf
from dino_bridge.train import build
from dino_bridge.train.loop import _initialise_from_pretrained, build_run
from tests.helpers import make_image_folder, tiny_config

pytest.importorskip("transformers")


def test_hf_weights_initialise_student_and_teacher(tmp_path):
    images = make_image_folder(tmp_path / "images", n=4)
    cfg = tiny_config(images, iterations=2)
    spec = build.backbone_spec(cfg)
    torch.manual_seed(3)
    source = build.build_backbone(spec)
    source.init_weights()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    write_hf(spec, source.state_dict(), tmp_path / "hf")
    cpu = Runtime(torch.device("cpu"), None, 0, 1, 0)
    cfg = tiny_config(images, iterations=2, extra=[f"student.pretrained_weights={tmp_path / 'hf'}"])
    run = build_run(cfg, cpu, tmp_path)
    _initialise_from_pretrained(run)
    expected = source.state_dict()
    D = source.embed_dim
    for part in (run.student, run.teacher):
        state = part["backbone"].state_dict()
        assert state.keys() == expected.keys()
        for key, value in state.items():
            if key.endswith("qkv.bias"):  # mask_k_bias: the inert K bias comes back as zeros
                assert torch.equal(value[D : 2 * D], torch.zeros(D))
                value, want = (
                    value[torch.arange(3 * D) // D != 1],
                    expected[key][torch.arange(3 * D) // D != 1],
                )
            elif key.startswith("local_cls_norm."):  # rebuilt as a copy of the global norm
                want = expected[key.replace("local_cls_norm.", "norm.")]
            else:
                want = expected[key]
            assert torch.equal(value, want), key
    # a configured backbone that differs is refused, naming the HF field
    wrong = tiny_config(
        images, extra=["student.n_storage_tokens=3", f"student.pretrained_weights={tmp_path / 'hf'}"]
    )
    with pytest.raises(ConfigError, match="num_register_tokens=2"):
        _initialise_from_pretrained(build_run(wrong, cpu, tmp_path / "w"))
