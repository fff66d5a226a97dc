"""Checkpoints: written atomically, verified when read, and carrying the configs that rebuild the model.

A checkpoint is torch.save's zip archive of a dict with a format marker, the model's kind ("draw" or
"classifier", absent in older files: "draw") and config (`DRAWConfig` or `ClassifierConfig`), its weights and, for a training run, the optimizer, step, RNG states, `TrainConfig` and the running
loss sums, and with `--ema` the moving average of the weights ("average", draw/average.py), which
`model_from_checkpoint` loads unless asked for the trained weights. `load_checkpoint` checks every record's CRC-32 before unpickling (torch.load does not),
so a flipped bit anywhere in the file is refused, not silently loaded.
"""

import io
import pathlib
import zipfile

import torch

from draw.atomic import atomic_write
from draw.average import averaged_weights, check_names_and_shapes
from draw.config import MODEL_KINDS, model_kind

FORMAT = "draw-checkpoint"
VERSION = 2  # 1: run settings under "settings" and the attention backend in the model config
TRAINING_KEYS = ("optimizer", "step", "rng", "train_config")
WEIGHTS = ("average", "trained")  # which weights model_from_checkpoint loads (`draw eval --weights`)


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, or not a usable DRAW checkpoint."""


def non_finite_count(state_dict: dict) -> int:
    return sum(int((~torch.isfinite(t)).sum()) for t in state_dict.values() if torch.is_tensor(t) and t.is_floating_point())


def finite_weights(path, model) -> dict:
    """The model's state dict; CheckpointError when a weight is not finite (`path` names the refused file)."""
    weights = model.state_dict()
    bad = non_finite_count(weights)
    if bad:
        raise CheckpointError(f"not saving {path}: {bad} model weights are not finite")
    return weights


def save_checkpoint(path, model, **state) -> pathlib.Path:
    """Save the model, its config and any training state; refuse (CheckpointError) non-finite weights,
    so a diverged run never replaces a good checkpoint."""
    weights = finite_weights(path, model)
    payload = {"format": FORMAT, "version": VERSION, "model_kind": model_kind(model.config),
               "model_config": model.config.to_dict(), "model": weights, **state}
    serialised = io.BytesIO()  # in memory first: torch's writer turns a failed write (a full disk) into a RuntimeError
    torch.save(payload, serialised)
    return atomic_write(path, lambda f: f.write(serialised.getbuffer()))


def _verify_archive(path: pathlib.Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every record and checks its CRC-32
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is damaged or not a checkpoint (truncated or corrupt?): {e}") from None
    if bad is not None:
        raise CheckpointError(f"{path} is damaged: record {bad} fails its CRC-32 check")


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read and check a checkpoint (a file, or a run directory holding checkpoint.pt).

    Raises CheckpointError, with the file and the reason in one line, for a missing, damaged or
    foreign file.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    _verify_archive(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a foreign pickle, an unsupported type...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint: {reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a DRAW checkpoint (no '{FORMAT}' marker)")
    if payload.get("version") == 1:
        _upgrade_version_1(payload)
    elif payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')}; this draw reads versions 1 and {VERSION}")
    if "model_config" not in payload or "model" not in payload:
        raise CheckpointError(f"{path} holds no model")
    for key, (fits, what) in _LAYOUT.items():
        if key in payload and not fits(payload[key]):
            raise CheckpointError(f"{path} is malformed: its {key!r} is not {what}")
    payload["path"] = str(path)
    return payload


def _named_tensors(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in value.items())


def _count(value, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _bytes(value) -> bool:  # an RNG state
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8


# What each entry of a payload must be (where present), checked on load so that a file that passes its
# CRC-32 checks but was written by something else is refused in one line, not by a traceback later.
_LAYOUT = {
    "model": (_named_tensors, "a dict of named tensors"),
    "model_config": (lambda v: isinstance(v, dict), "a dict"),
    "train_config": (lambda v: isinstance(v, dict), "a dict"),
    "step": (_count, "an integer >= 0"),
    "world_size": (lambda v: _count(v, 1), "an integer >= 1"),
    "step_mode": (lambda v: v is None or isinstance(v, str), "a step mode's name"),
    "optimizer": (lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                  and isinstance(v.get("param_groups"), list) and all(isinstance(g, dict) for g in v["param_groups"]),
                  "an optimizer's state (a dict of 'state' and 'param_groups')"),
    "rng": (lambda v: isinstance(v, dict) and _bytes(v.get("torch")) and all(_bytes(v[k]) for k in ("data", "cuda") if k in v),
            "random number generator states (byte tensors under 'torch', 'data' and 'cuda')"),
    "running": (lambda v: isinstance(v, dict) and isinstance(v.get("sums"), torch.Tensor) and v["sums"].dim() == 1
                and _count(v.get("count")), "running loss sums (a tensor of sums and a count)"),
    "data": (lambda v: isinstance(v, dict) and isinstance(v.get("sizes"), list) and isinstance(v.get("test_sha256"), str)
             and isinstance(v.get("source"), str), "the data's identity (split sizes, a test digest and a source)"),
    "average": (lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("decay"), (int, float))
                                        and _count(v.get("updates")) and _named_tensors(v.get("sums"))),
                "a weight average (decay, updates and a dict of named sums)"),
}


def _upgrade_version_1(payload: dict) -> None:
    """Version 1 kept the run settings under "settings" (with `total_steps` and `compile`)."""
    settings = payload.pop("settings", None)
    if settings is not None:
        settings = dict(settings)
        settings["steps"] = settings.pop("total_steps", None)
        settings.pop("compile", None)
        payload["train_config"] = settings
    payload["version"] = VERSION


def check_training_state(payload: dict) -> None:
    """Refuse, in one line, a checkpoint that cannot continue a run (weights only, or partial)."""
    missing = [key for key in TRAINING_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"{payload['path']} holds no training state to resume (missing: {', '.join(missing)})")


def config_from_checkpoint(payload: dict):
    """The model config a loaded checkpoint holds (DRAWConfig or ClassifierConfig)."""
    where = payload.get("path", "checkpoint")
    kind = payload.get("model_kind", "draw")
    if kind not in MODEL_KINDS:
        raise CheckpointError(f"{where} holds a model of unknown kind {kind!r} (known: {', '.join(MODEL_KINDS)})")
    try:
        return MODEL_KINDS[kind].from_dict(payload["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: its model config is not usable: {e}") from None


def build_model(config, backend: str = "auto"):
    """The model of a config: DRAW for a DRAWConfig, the classifier for a ClassifierConfig."""
    if model_kind(config) == "classifier":
        from draw.classifier import DRAM

        return DRAM(config, backend=backend)
    from draw.model import DRAW

    return DRAW(config, backend=backend)


def uses_average(payload: dict, weights: str = "average") -> bool:
    """Whether model_from_checkpoint(payload, weights) loads the moving average of the weights: asked for, and
    kept by the run (--ema) over at least one step."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    average = payload.get("average")
    if weights != "average" or average is None:
        return False
    if not isinstance(average, dict) or not {"decay", "updates", "sums"} <= set(average):
        raise CheckpointError(f"{payload.get('path', 'checkpoint')}: its weight average is damaged (no decay, updates or sums)")
    return int(average["updates"]) > 0


def model_from_checkpoint(payload: dict, weights: str = "average"):
    """Rebuild the model from a loaded checkpoint's config and weights; refuse non-finite weights. weights
    "average": the run's moving average of the weights where it kept one (see uses_average), else the
    trained weights; "trained": the trained weights always."""
    where = payload.get("path", "checkpoint")
    config = config_from_checkpoint(payload)
    model = build_model(config)
    state = payload["model"]
    if uses_average(payload, weights):
        averaged = averaged_weights(payload["average"])
        try:  # every parameter averaged and nothing else: never a model part averaged, part trained
            check_names_and_shapes(averaged, dict(model.named_parameters()))
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None
        state = {**state, **averaged}
    bad = non_finite_count(state)
    if bad:
        raise CheckpointError(f"{where}: {bad} model weights are not finite (the run diverged); use an earlier checkpoint")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0] if first else ""
        raise CheckpointError(f"{where}: its weights do not fit its model config ({detail})") from None
    return model
