"""DRAW (Gregor et al. 2015) in PyTorch, with fused Triton attention kernels."""

from draw.config import DEFAULT_PRESET, PRESETS, DRAWConfig, TrainConfig, get_preset
from draw.model import DRAW, DRAWOutput, Generation, importance_weighted_bound

__all__ = [
    "DEFAULT_PRESET",
    "DRAW",
    "DRAWConfig",
    "DRAWOutput",
    "Generation",
    "PRESETS",
    "TrainConfig",
    "get_preset",
    "importance_weighted_bound",
]
