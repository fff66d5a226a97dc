"""DRAW (Gregor et al. 2015) in PyTorch, with fused Triton attention kernels.

The configs import without torch (so `draw --help` is fast); the model loads on first use.
"""

from draw.config import DEFAULT_PRESET, PRESETS, DRAWConfig, TrainConfig, get_preset

__version__ = "0.2.0"

_MODEL_NAMES = ("DRAW", "DRAWOutput", "Generation", "importance_weighted_bound")

__all__ = ["DEFAULT_PRESET", "PRESETS", "DRAWConfig", "TrainConfig", "get_preset", "__version__", *_MODEL_NAMES]


def __getattr__(name):
    if name in _MODEL_NAMES:
        from draw import model

        return getattr(model, name)
    raise AttributeError(f"module 'draw' has no attribute {name!r}")
