"""Training: the meta-architecture, schedules, optimiser groups, the loop and checkpoints.

Run it with ``python -m dino_bridge.train --config-file F --output-dir D [key=value ...]``.
"""
