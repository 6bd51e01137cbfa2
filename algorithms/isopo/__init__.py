"""ISOPO: per-sequence reweighting of every nn.Linear's gradient inside one backward pass."""

from .batch import MicroBatch, draw_overlap_samples
from .config import NAMED_SETTINGS, IsopoConfig
from .engine import Isopo

__all__ = ["Isopo", "IsopoConfig", "MicroBatch", "NAMED_SETTINGS", "draw_overlap_samples"]
