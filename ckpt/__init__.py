"""psrt checkpoints: config, layout, manifest, writer and reader, retention, lock.

This package imports nothing of psrt's other packages.
"""

from ckpt.config import CheckpointConfig

__all__ = ["CheckpointConfig"]
