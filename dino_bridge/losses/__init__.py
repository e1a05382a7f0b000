"""Loss terms as pure functions: DINO CLS, iBOT masked patches, KoLeo."""

from dino_bridge.losses.dino import STUDENT_TEMP, dino_cross_entropy, dino_loss_weights
from dino_bridge.losses.ibot import ibot_cross_entropy
from dino_bridge.losses.koleo import koleo_loss, koleo_loss_chunked, koleo_per_row, reduce_koleo

__all__ = [
    "STUDENT_TEMP",
    "dino_cross_entropy",
    "dino_loss_weights",
    "ibot_cross_entropy",
    "koleo_loss",
    "koleo_loss_chunked",
    "koleo_per_row",
    "reduce_koleo",
]
