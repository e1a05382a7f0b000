"""The EMA teacher update: θ_teacher ← m·θ_teacher + (1 − m)·θ_student, as one foreach lerp.

Student and teacher have the same parameter names; under FSDP2 they are sharded the same way, so
the update runs on matching local shards with no communication.
"""

from __future__ import annotations

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    student_params = dict(student.named_parameters())
    teacher_local, student_local = [], []
    for name, t_param in teacher.named_parameters():
        if name not in student_params:
            raise KeyError(f"teacher parameter {name!r} has no student counterpart")
        teacher_local.append(_local(t_param.data))
        student_local.append(_local(student_params[name].data))
    if teacher_local:
        torch._foreach_lerp_(teacher_local, student_local, 1.0 - momentum)


@torch.no_grad()
def copy_student_to_teacher_(teacher: nn.Module, student: nn.Module) -> None:
    """Initialise the teacher as an exact copy of the student (parameters and buffers)."""
    source = dict(student.named_parameters()) | dict(student.named_buffers())
    for name, tensor in list(teacher.named_parameters()) + list(teacher.named_buffers()):
        _local(tensor.data).copy_(_local(source[name].data))
