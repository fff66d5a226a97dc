"""The two typed configurations of a run and the named presets.

`DRAWConfig` fixes a model's architecture (it rebuilds the model from a checkpoint); `TrainConfig`
fixes a run's arithmetic and schedule (saved in the checkpoint, so that --resume continues the same
run). A `Preset` pairs the two; overrides are `dataclasses.replace` on a preset's configs.

This module imports neither torch nor numpy, so `draw --help` stays fast.
"""

import math
from dataclasses import asdict, dataclass, field, fields

# The dataset names `--dataset` accepts; draw/data.py has a loader for each.
DATASETS = ("mnist", "synthetic", "mnist-cluttered", "mnist-two-digit", "svhn", "svhn-cropped", "cifar10")
LR_SCHEDULES = ("constant", "cosine")
AMP_MODES = ("none", "bf16")
# The held-out split a run's periodic evaluations score ("test", or "valid" to choose settings without looking at
# the test set); their records and the summary name their figures after it: test_bound, valid_bound, ...
EVAL_SPLITS = ("test", "valid")


def record_split(record: dict) -> str | None:
    """The held-out split a metrics record scored (its keys' prefix: test_bound -> "test"); None for a training
    record."""
    return next((split for split in EVAL_SPLITS if any(key.startswith(f"{split}_") for key in record)), None)

MAX_SEED = 2**32 - 1


def _check_int(owner: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


def _check_positive_float(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{owner}.{name} must be a finite number > 0, got {value!r}")


def check_decay(value, what: str = "the weight average's decay") -> float:
    """A moving average's decay (TrainConfig.ema, draw/average.py): a number strictly between 0 and 1, else
    ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{what} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def _from_dict(cls, d: dict, *, ignore=()):
    """cls(**d), refusing keys cls does not have (the message names them) and dropping `ignore`d ones."""
    d = {k: v for k, v in d.items() if k not in ignore}
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)} (written by another version?)")
    return cls(**d)


@dataclass(frozen=True)
class DRAWConfig:
    """Everything that fixes a DRAW model's architecture (saved in every checkpoint)."""

    height: int = 28  # H, the paper's B
    width: int = 28  # W, the paper's A
    channels: int = 1  # C
    T: int = 64  # glimpses (time steps)
    enc_size: int = 256  # encoder LSTM units
    dec_size: int = 256  # decoder LSTM units
    z_size: int = 100  # latent units per step
    read_attn: bool = True  # Eq. 27 (else Eq. 17: the whole image and error image)
    write_attn: bool = True  # Eq. 29 (else Eq. 18: a linear layer to C*H*W)
    read_n: int = 2  # N, read grid size
    write_n: int = 5  # N^, write grid size
    beta: float = 1.0  # KL weight: L = L_x + beta * L_z (1 = the paper's bound)

    def __post_init__(self):
        for name in ("height", "width", "channels", "T", "enc_size", "dec_size", "z_size", "read_n", "write_n"):
            _check_int("DRAWConfig", name, getattr(self, name), 1)
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"DRAWConfig.beta must be a finite number >= 0, got {self.beta!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DRAWConfig":
        # "backend" was part of the architecture in version-1 checkpoints; it is a runtime choice now.
        return _from_dict(cls, d, ignore=("backend",))


@dataclass(frozen=True)
class ClassifierConfig:
    """The differentiable RAM of Sec. 4.1 (draw/classifier.py): an LSTM classifying from T glimpses."""

    height: int = 100
    width: int = 100
    channels: int = 1
    glimpses: int = 8  # T
    lstm_size: int = 256
    read_n: int = 12  # N: each glimpse is N x N
    classes: int = 10

    def __post_init__(self):
        for name in ("height", "width", "channels", "glimpses", "lstm_size", "read_n"):
            _check_int("ClassifierConfig", name, getattr(self, name), 1)
        _check_int("ClassifierConfig", "classes", self.classes, 2)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        return _from_dict(cls, d)


MODEL_KINDS = {"draw": DRAWConfig, "classifier": ClassifierConfig}


def model_kind(config) -> str:
    """"draw" or "classifier": the name a checkpoint stores beside the config."""
    return next(kind for kind, cls in MODEL_KINDS.items() if isinstance(config, cls))


@dataclass(frozen=True)
class TrainConfig:
    """How a run trains: its arithmetic (dataset, batch, lr, seed, ...) and its schedule (length, intervals).

    `steps` None means `epochs` passes over the training set. Saved in the checkpoint; a resume may
    change only the SCHEDULE fields (the others would change what the run computes). `accumulate` is one
    of them: it splits each step's batch into micro-batches (to fit memory) and changes nothing but the
    float rounding, as the number of GPUs does, since the step's noise is drawn for the whole batch.
    """

    dataset: str = "mnist"
    batch_size: int = 100  # the global batch: all ranks and micro-batches of one optimizer step
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine": from lr down to lr / 10 over the run
    warmup_steps: int = 0  # linear learning-rate warm-up from lr / warmup_steps
    grad_clip: float | None = 10.0  # max global gradient norm; None: no clip (the norm is still recorded)
    # the classifier: clip each image's gradient of the loss with respect to each glimpse's 5 attention
    # parameters (Eq. 21) to [-c, c] in the backward pass (draw/classifier.py); None: no clip
    attention_grad_clip: float | None = None
    seed: int = 0
    fixed_binarization: bool = False  # False: a fresh Bernoulli draw of every training batch
    fresh_clutter: bool = False  # mnist-cluttered: new clutter around the training digits in every batch
    amp: str = "none"  # "none" or "bf16" autocast
    tf32: bool = False  # CUDA: TF32 tensor-core matmuls for the LSTMs and linear layers
    steps: int | None = None
    epochs: float = 10.0
    eval_every: int = 1000  # steps between evaluations of the held-out bound (or error)
    eval_split: str = "test"  # the split those evaluations score: one of EVAL_SPLITS
    log_every: int = 50  # steps between training-loss records
    checkpoint_every: int = 500
    accumulate: int = 1  # micro-batches per step (gradient accumulation); batch_size must divide by it
    # decay d of a moving average of the weights, updated after every step (draw/average.py): the model that
    # runs evaluate, sample and figure from; None: none (the trained weights themselves)
    ema: float | None = None

    SCHEDULE = ("steps", "epochs", "eval_every", "eval_split", "log_every", "checkpoint_every", "accumulate")

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"TrainConfig.dataset must be one of {DATASETS}, got {self.dataset!r}")
        _check_int("TrainConfig", "batch_size", self.batch_size, 1)
        _check_positive_float("TrainConfig", "lr", self.lr)
        if self.grad_clip is not None:
            _check_positive_float("TrainConfig", "grad_clip", self.grad_clip)
        if self.attention_grad_clip is not None:
            _check_positive_float("TrainConfig", "attention_grad_clip", self.attention_grad_clip)
        _check_positive_float("TrainConfig", "epochs", self.epochs)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"TrainConfig.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"TrainConfig.amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.eval_split not in EVAL_SPLITS:
            raise ValueError(f"TrainConfig.eval_split must be one of {EVAL_SPLITS}, got {self.eval_split!r}")
        _check_int("TrainConfig", "warmup_steps", self.warmup_steps, 0)
        if self.fresh_clutter and self.dataset != "mnist-cluttered":
            raise ValueError(f"fresh_clutter (--fresh-clutter) draws mnist-cluttered images, not {self.dataset!r} "
                             "(--no-fresh-clutter turns it off)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"TrainConfig.seed must be an int from 0 to {MAX_SEED}, got {self.seed!r}")
        if self.steps is not None:
            _check_int("TrainConfig", "steps", self.steps, 1)
        for name in ("eval_every", "log_every", "checkpoint_every", "accumulate"):
            _check_int("TrainConfig", name, getattr(self, name), 1)
        if self.ema is not None:
            check_decay(self.ema, "TrainConfig.ema")

    def total_steps(self, steps_per_epoch: int) -> int:
        """The run's length in optimizer steps: `steps`, else `epochs` passes of steps_per_epoch."""
        return self.steps if self.steps is not None else max(1, round(self.epochs * steps_per_epoch))

    def arithmetic_changes(self, other: "TrainConfig") -> list[str]:
        """Names of the fields outside SCHEDULE in which `other` differs from this config."""
        return [f.name for f in fields(self) if f.name not in self.SCHEDULE and getattr(self, f.name) != getattr(other, f.name)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return _from_dict(cls, d)


@dataclass(frozen=True)
class Preset:
    model: DRAWConfig | ClassifierConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    description: str = ""
    step_mode: str = "auto"  # how `draw train` runs the step unless --step says (draw/step.py STEP_MODES)


PRESETS = {
    "mnist-quick": Preset(
        DRAWConfig(T=16, enc_size=128, dec_size=128, z_size=32, read_n=8, write_n=10),
        TrainConfig(batch_size=128, lr=1.2e-2, epochs=12, eval_every=500, lr_schedule="cosine"),
        "small attentive DRAW (read 8x8, write 10x10) for a ~15 minute run on a 2-core CPU",
        step_mode="compile",  # 1.5x the eager step on a CPU after a ~2 minute compile; eager if it cannot compile
    ),
    "mnist-paper": Preset(
        DRAWConfig(T=64, enc_size=256, dec_size=256, z_size=100, read_n=2, write_n=5),
        TrainConfig(batch_size=100, lr=1e-3, epochs=100, eval_every=2000),
        "the paper's Table 3 MNIST model (read 2x2, write 5x5): 80.97 nats in the paper",
    ),
    "mnist-noattn": Preset(
        DRAWConfig(T=64, enc_size=256, dec_size=256, z_size=100, read_attn=False, write_attn=False),
        TrainConfig(batch_size=100, lr=1e-3, epochs=100, eval_every=2000),
        "the paper's MNIST model without attention: 87.40 nats in the paper",
    ),
    # Two-digit MNIST (Sec. 4.3): the paper gives no sizes. Twice MNIST's glimpses for two digits
    # (T 32 of mnist-quick's 16), the paper's MNIST LSTMs and z (256, 100), and 6x6 read and write
    # grids, chosen when mnist-quick read and wrote 5x5 (a grid a little wider for a digit that can
    # be anywhere in a 60x60 image).
    "mnist-two-digit": Preset(
        DRAWConfig(height=60, width=60, T=32, enc_size=256, dec_size=256, z_size=100, read_n=6, write_n=6),
        TrainConfig(batch_size=100, lr=1e-3, epochs=50, eval_every=2000, dataset="mnist-two-digit"),
        "two MNIST digits at random places in 60x60 (Sec. 4.3): the network draws one, then the other",
    ),
    # The colour models of Table 3, on their real data (draw/data_svhn.py, draw/data_cifar.py say
    # where to put the files); `--dataset synthetic` trains them on procedural shapes instead.
    "svhn-paper": Preset(
        DRAWConfig(height=54, width=54, channels=3, T=32, enc_size=800, dec_size=800, z_size=100, read_n=12, write_n=12),
        TrainConfig(batch_size=100, lr=1e-3, epochs=100, eval_every=2000, dataset="svhn"),
        "the paper's SVHN model (3x54x54 crops of 64x64 house numbers, T 32, LSTM 800, read and write 12x12)",
    ),
    "cifar-paper": Preset(
        DRAWConfig(height=32, width=32, channels=3, T=64, enc_size=400, dec_size=400, z_size=200, read_n=5, write_n=5),
        TrainConfig(batch_size=100, lr=1e-3, epochs=100, eval_every=2000, dataset="cifar10"),
        "the paper's CIFAR-10 model (3x32x32, T 64, LSTM 400, z 200, read and write 5x5)",
    ),
    # Cluttered MNIST classification (Sec. 4.1, Table 1): the differentiable RAM, one LSTM of 256 units
    # reading a 12x12 glimpse per step (the paper gives no training details: Adam, as everywhere). New
    # clutter in every batch: with the 50k stored images the model over-fits (1.7 % training error,
    # 6.66 % test error after 40 epochs); with fresh clutter the two stay together (5.8 % and 6.00 %).
    # Both clip each image's attention gradient at 10 (attention_grad_clip): without it the gradient can
    # explode through the loop of glimpses (h -> where to look -> glimpse -> h) and throw the windows off
    # the image, where no gradient brings them back (README, Results; bench/bench_glimpse_explosion.py).
    # cluttered-8 at lr 1e-3 with the clip: 3.41 % after 120 epochs (its default; the paper: 3.36 %),
    # 4.04 % after 60 and 4.38 % after 40; without the clip, 6.00 % after 40 (when it did not collapse);
    # at lr 5e-4, 4.62 % with the clip and 5.36 % without. cluttered-4 (lr 1e-3) with the clip: 3.92 %
    # after 160 epochs (its default; the paper: 4.18 %), 4.97 % after 80 and 5.90 % after 40 (6.31 % without).
    "cluttered-8": Preset(
        ClassifierConfig(height=100, width=100, glimpses=8, lstm_size=256, read_n=12),
        TrainConfig(dataset="mnist-cluttered", batch_size=100, lr=1e-3, lr_schedule="cosine", epochs=120, eval_every=2500,
                    fresh_clutter=True, attention_grad_clip=10.0),
        "cluttered MNIST classifier, 8 glimpses of 12x12 (3.36 % test error in the paper)",
    ),
    "cluttered-4": Preset(
        ClassifierConfig(height=100, width=100, glimpses=4, lstm_size=256, read_n=12),
        TrainConfig(dataset="mnist-cluttered", batch_size=100, lr=1e-3, lr_schedule="cosine", epochs=160, eval_every=2500,
                    fresh_clutter=True, attention_grad_clip=10.0),
        "cluttered MNIST classifier, 4 glimpses of 12x12 (4.18 % test error in the paper)",
    ),
}
DEFAULT_PRESET = "mnist-quick"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
