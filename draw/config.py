"""Typed configuration for DRAW: the model's shape, its training defaults, and named presets."""

from dataclasses import asdict, dataclass, field, fields

from draw.kernels import BACKENDS


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
    backend: str = "auto"  # attention backend: "auto", "reference" or "triton"

    def __post_init__(self):
        for name in ("height", "width", "channels", "T", "enc_size", "dec_size", "z_size", "read_n", "write_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DRAWConfig.{name} must be an int >= 1, got {value!r}")
        if not self.beta >= 0:
            raise ValueError(f"DRAWConfig.beta must be >= 0, got {self.beta!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"DRAWConfig.backend must be one of {BACKENDS}, got {self.backend!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DRAWConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DRAWConfig fields: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class TrainConfig:
    """Training defaults of a preset; every one can be overridden on the command line."""

    batch_size: int = 100
    lr: float = 1e-3
    epochs: float = 10.0  # used when no step count is given
    grad_clip: float = 10.0  # max global gradient norm
    lr_schedule: str = "constant"  # or "cosine": down to lr / 10 by the last step
    eval_every: int = 1000  # steps between test-bound evaluations
    dataset: str = "mnist"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    model: DRAWConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    description: str = ""


PRESETS = {
    "mnist-quick": Preset(
        DRAWConfig(T=16, enc_size=128, dec_size=128, z_size=32, read_n=5, write_n=5),
        TrainConfig(batch_size=64, lr=3e-3, epochs=12, eval_every=1000, lr_schedule="cosine"),
        "small attentive DRAW (read and write 5x5) for a ~15 minute run on a 2-core CPU",
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
    # Colour models of Table 3, for throughput benchmarks: no SVHN or CIFAR-10 loader ships yet, so they
    # train on the synthetic set of their image shape.
    "svhn-paper": Preset(
        DRAWConfig(height=54, width=54, channels=3, T=32, enc_size=800, dec_size=800, z_size=100, read_n=12, write_n=12),
        TrainConfig(batch_size=100, lr=1e-3, epochs=100, eval_every=2000, dataset="synthetic"),
        "the paper's SVHN model (3x54x54 crops, T 32, LSTM 800, read and write 12x12)",
    ),
    "cifar-paper": Preset(
        DRAWConfig(height=32, width=32, channels=3, T=64, enc_size=400, dec_size=400, z_size=200, read_n=5, write_n=5),
        TrainConfig(batch_size=100, lr=1e-3, epochs=100, eval_every=2000, dataset="synthetic"),
        "the paper's CIFAR-10 model (3x32x32, T 64, LSTM 400, z 200, read and write 5x5)",
    ),
}
DEFAULT_PRESET = "mnist-quick"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
