"""DINOHead: MLP → L2 normalisation → bias-free prototypes, no weight norm."""

from __future__ import annotations

import pytest
import torch

from dino_bridge.models import DINOHead


def _head(**kwargs):
    head = DINOHead(16, 50, **{"hidden_dim": 32, "bottleneck_dim": 8, **kwargs})
    torch.manual_seed(0)
    head.init_weights()
    return head


def test_shapes_and_normalised_bottleneck():
    head = _head()
    x = torch.randn(5, 16)
    z = head.forward_mlp(x)
    assert z.shape == (5, 8)
    assert torch.allclose(z.norm(dim=-1), torch.ones(5))
    logits = head(x)
    assert logits.shape == (5, 50)
    assert torch.allclose(logits, z @ head.last_layer.weight.T)
    assert torch.allclose(head.forward_prototypes(z), logits)


def test_structure_and_init():
    head = _head()
    assert set(head.state_dict()) == {
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
        "last_layer.weight",
    }  # fmt: skip
    assert isinstance(head.mlp[1], torch.nn.GELU) and head.mlp[1].approximate == "none"
    assert all(torch.all(b == 0) for n, b in head.named_parameters() if n.endswith("bias"))
    assert abs(head.last_layer.weight.std().item() - 0.02) < 5e-3
    assert not torch.nn.utils.parametrize.is_parametrized(head.last_layer)  # no weight norm
    single = _head(nlayers=1)
    assert isinstance(single.mlp, torch.nn.Linear) and single.mlp.out_features == 8
    assert len([m for m in _head(nlayers=4).mlp if isinstance(m, torch.nn.Linear)]) == 4
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(16, 50, nlayers=0)


def test_zero_bottleneck_gives_no_nan():
    head = _head(nlayers=1)
    with torch.no_grad():
        head.mlp.weight.zero_()
    assert torch.isfinite(head(torch.randn(3, 16))).all()
    assert torch.isfinite(head.half()(torch.randn(3, 16).half())).all()
