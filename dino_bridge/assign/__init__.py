"""Teacher-target strategies behind one interface: ``probs = assigner(logits, teacher_temp)``.

- ``SoftmaxCentering``: softmax around an EMA centre (DINO).
- ``SinkhornKnopp``: 3 Sinkhorn-Knopp iterations balanced over all ranks (DINOv2/v3).
- ``DTCH``: dual-temperature cumulative-history balancing (this project; METHOD §3).
"""

from .base import TeacherAssigner
from .centering import SoftmaxCentering, centered_softmax, ema_center
from .dtch import DTCH
from .sinkhorn import SinkhornKnopp, sinkhorn_knopp

__all__ = [
    "DTCH",
    "SinkhornKnopp",
    "SoftmaxCentering",
    "TeacherAssigner",
    "centered_softmax",
    "ema_center",
    "sinkhorn_knopp",
]
