"""Streams of loss terms: the core (DINO + iBOT + KoLeo) and the invariance streams (Crop-Resize,
PatchRoll, the Patch-to-CLS bridge). See ``base.py`` for what a stream declares."""

from .base import StepContext, Stream, ibot_head
from .bridge import BridgeStream
from .core import CoreSettings, CoreStream
from .patch_roll import PatchRollStream
from .resize_paste import ResizePasteStream

__all__ = [
    "BridgeStream",
    "CoreSettings",
    "CoreStream",
    "PatchRollStream",
    "ResizePasteStream",
    "StepContext",
    "Stream",
    "ibot_head",
]
