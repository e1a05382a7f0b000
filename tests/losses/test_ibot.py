"""iBOT masked-patch loss against a per-image loop oracle."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dino_bridge.losses import ibot_cross_entropy


def per_image_oracle(student, teacher, masks, student_temp):
    """Mean CE of the masked tokens of each image, summed over images, / all images (float64).

    masks: [n_images, P] bool; the student/teacher rows are the masked tokens in image order.
    """
    total, row = 0.0, 0
    for image_mask in masks:
        n_masked = int(image_mask.sum())
        if n_masked == 0:
            continue
        ce = [
            -(teacher[row + i].double() * F.log_softmax(student[row + i].double() / student_temp, -1)).sum()
            for i in range(n_masked)
        ]
        total += torch.stack(ce).mean().item()
        row += n_masked
    return total / masks.shape[0]


def masked_setup(seed=0, n_prototypes=9):
    gen = torch.Generator().manual_seed(seed)
    # 6 images of 8 patches: 3 masked (with 1, 3 and 5 tokens), 3 unmasked.
    masks = torch.zeros(6, 8, dtype=torch.bool)
    masks[0, :1] = True
    masks[2, 2:5] = True
    masks[5, 1:6] = True
    per_image = masks.sum(1, keepdim=True).expand_as(masks)
    weights = (1.0 / per_image.clamp_min(1).float())[masks]  # [M]
    n_masked = int(masks.sum())
    student = torch.randn(n_masked, n_prototypes, generator=gen)
    teacher = torch.softmax(torch.randn(n_masked, n_prototypes, generator=gen) * 2, dim=-1)
    return masks, weights, student, teacher


def test_matches_oracle_and_counts_unmasked_images():
    masks, weights, student, teacher = masked_setup()
    expected = per_image_oracle(student, teacher, masks, 0.1)
    loss = ibot_cross_entropy(student, teacher, weights, n_images=masks.shape[0])
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Only 3 of the 6 images are masked: dividing by the masked ones would double it.
    only_masked = ibot_cross_entropy(student, teacher, weights, n_images=3)
    assert only_masked.item() == pytest.approx(2 * loss.item(), rel=1e-6)


def test_uniform_gives_masked_fraction_times_log_k():
    masks, weights, student, _ = masked_setup(n_prototypes=13)
    teacher = torch.full_like(student, 1.0 / 13)
    loss = ibot_cross_entropy(torch.zeros_like(student), teacher, weights, n_images=6)
    assert loss.item() == pytest.approx(0.5 * math.log(13), rel=1e-6)


def test_no_masked_tokens_is_zero_and_backward_works():
    student = torch.zeros(0, 5, requires_grad=True)
    loss = ibot_cross_entropy(student, torch.zeros(0, 5), torch.zeros(0), n_images=4)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert student.grad is not None and student.grad.shape == (0, 5)


def test_errors():
    with pytest.raises(ValueError, match="masks_weight"):
        ibot_cross_entropy(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(2), n_images=1)
    with pytest.raises(ValueError, match="n_images"):
        ibot_cross_entropy(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3), n_images=0)
