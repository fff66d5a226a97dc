"""Atomic checkpoints that carry the model's config, so a checkpoint alone rebuilds the model."""

import os
import pathlib
import tempfile

import torch

from draw.config import DRAWConfig
from draw.model import DRAW

FORMAT = "draw-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not a DRAW checkpoint."""


def atomic_save(obj, path) -> pathlib.Path:
    """torch.save to a temporary file beside `path`, then rename: `path` is never half-written."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path, model: DRAW, **state) -> pathlib.Path:
    """Save the model, its config and any extra training state (optimizer, step, RNG states, ...)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": model.config.to_dict(),
        "model": model.state_dict(),
        **state,
    }
    return atomic_save(payload, path)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read and check a checkpoint; raise CheckpointError with the reason when it is not usable."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, foreign pickle...
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a DRAW checkpoint (no '{FORMAT}' marker)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')}, expected {VERSION}")
    payload["path"] = str(path)
    return payload


def model_from_checkpoint(payload: dict, **config_overrides) -> DRAW:
    """Rebuild the model from a loaded checkpoint's config and weights."""
    try:
        config = DRAWConfig.from_dict({**payload["model_config"], **config_overrides})
        model = DRAW(config)
        model.load_state_dict(payload["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{payload.get('path', 'checkpoint')} does not hold a DRAW model of its config: {e}") from e
    return model
