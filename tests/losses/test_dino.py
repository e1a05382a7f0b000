"""DINO CLS loss: analytic values, a brute-force loop oracle, and the term-count weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dino_bridge.losses import dino_cross_entropy, dino_loss_weights


def loop_oracle(student, teacher, student_temp, ignore_diagonal):
    """The definition, one (s, t, b) term at a time, in float64."""
    total, n_terms = 0.0, 0
    for s in range(student.shape[0]):
        for t in range(teacher.shape[0]):
            if ignore_diagonal and s == t:
                continue
            for b in range(student.shape[1]):
                log_p = F.log_softmax(student[s, b].double() / student_temp, dim=-1)
                total += -(teacher[t, b].double() * log_p).sum().item()
                n_terms += 1
    return total / n_terms, n_terms


def test_uniform_teacher_and_student_gives_log_k():
    n_prototypes = 37
    student = torch.zeros(3, 4, n_prototypes)
    teacher = torch.full((2, 4, n_prototypes), 1.0 / n_prototypes)
    for ignore_diagonal in (False, True):
        loss = dino_cross_entropy(student, teacher, ignore_diagonal=ignore_diagonal)
        assert loss.item() == pytest.approx(math.log(n_prototypes), rel=1e-6)


@pytest.mark.parametrize("ignore_diagonal", [False, True])
@pytest.mark.parametrize("n_student,n_teacher", [(3, 2), (2, 3), (2, 2)])
def test_matches_loop_oracle(n_student, n_teacher, ignore_diagonal):
    gen = torch.Generator().manual_seed(0)
    batch, n_prototypes = 5, 11
    student = torch.randn(n_student, batch, n_prototypes, generator=gen)
    teacher = torch.softmax(torch.randn(n_teacher, batch, n_prototypes, generator=gen) * 3, dim=-1)
    expected, n_terms = loop_oracle(student, teacher, 0.1, ignore_diagonal)
    diagonal = min(n_student, n_teacher) if ignore_diagonal else 0
    assert n_terms == batch * n_student * n_teacher - batch * diagonal
    loss = dino_cross_entropy(student, teacher, student_temp=0.1, ignore_diagonal=ignore_diagonal)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_student_temperature_and_bf16_inputs():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(2, 3, 7, generator=gen)
    teacher = torch.softmax(torch.randn(2, 3, 7, generator=gen), dim=-1)
    expected, _ = loop_oracle(student, teacher, 0.5, False)
    assert dino_cross_entropy(student, teacher, student_temp=0.5).item() == pytest.approx(expected, rel=1e-5)
    low = dino_cross_entropy(student.bfloat16(), teacher.bfloat16())
    assert low.dtype == torch.float32


def test_gradient_matches_oracle_gradient():
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    teacher = torch.softmax(torch.randn(2, 4, 6, generator=gen, dtype=torch.float64), dim=-1)
    a = student.clone().requires_grad_(True)
    dino_cross_entropy(a, teacher, ignore_diagonal=True).backward()
    b = student.clone().requires_grad_(True)
    terms = [
        -(teacher[t] * F.log_softmax(b[s] / 0.1, dim=-1)).sum(-1)
        for s in range(3)
        for t in range(2)
        if s != t
    ]
    torch.stack(terms).mean().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_loss_weights():
    local_scale, global_scale = dino_loss_weights(2, 8, True)
    assert local_scale == pytest.approx(16 / 18) and global_scale == pytest.approx(2 / 18)
    assert dino_loss_weights(2, 8, False) == pytest.approx((16 / 20, 4 / 20))
    assert dino_loss_weights(2, 0, True) == (0.0, 1.0)


def test_errors():
    with pytest.raises(ValueError, match="disagree"):
        dino_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="no \\(student, teacher\\) pairs"):
        dino_cross_entropy(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4), ignore_diagonal=True)
    with pytest.raises(ValueError):
        dino_loss_weights(1, 0, True)
