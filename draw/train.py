"""Training: Adam, gradient clipping, periodic test-bound evaluation, atomic and exactly resumable runs.

A run directory holds:
    checkpoint.pt   model, optimizer, step, RNG states, config and run settings (written atomically)
    metrics.jsonl   one JSON record per logging interval ({"step", "loss", "l_x", "l_z", ...})
                    and per evaluation ({"step", "test_bound", ...})
    summary.json    the final test bound and run facts
    figures         samples.png, generation.gif, generation.png, reconstruction.gif, loss_curve.png
"""

import contextlib
import json
import math
import pathlib
import signal
import threading
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from draw import kernels
from draw import figures
from draw.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from draw.config import DRAWConfig
from draw.data import Dataset, load_dataset
from draw.evaluate import evaluate_bound
from draw.model import DRAW

LR_SCHEDULES = ("constant", "cosine")
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


@dataclass
class RunSettings:
    """How a run trains (saved in the checkpoint so that --resume continues the same run)."""

    dataset: str = "mnist"
    batch_size: int = 100
    lr: float = 1e-3
    total_steps: int | None = None  # None: `epochs` passes over the training set
    epochs: float = 1.0
    grad_clip: float = 10.0
    lr_schedule: str = "constant"  # or "cosine": from lr down to lr / 10 over the run
    eval_every: int = 1000
    log_every: int = 50
    checkpoint_every: int = 500
    seed: int = 0
    fixed_binarization: bool = False  # False: a fresh Bernoulli draw of the training set every epoch
    compile: bool = False
    amp: str = "none"  # "none" or "bf16"

    def __post_init__(self):
        for name in ("batch_size", "total_steps", "eval_every", "log_every", "checkpoint_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"amp must be 'none' or 'bf16', got {self.amp!r}")


def scaled_lr(base_lr: float, base_batch: int, batch: int) -> float:
    """Square-root learning-rate scaling for a batch size other than the preset's: lr * sqrt(B / B0)."""
    return base_lr * math.sqrt(batch / base_batch)


def lr_at(settings: RunSettings, step: int) -> float:
    """The learning rate of step `step` (0-based): a pure function of the step, so resumes match."""
    if settings.lr_schedule == "constant":
        return settings.lr
    progress = min(step / settings.total_steps, 1.0)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, n_train // batch_size)


class BatchSampler:
    """Training batches, a pure function of (step, generator state): identical after a resume.

    Each epoch visits the training set in a permutation seeded by (seed, epoch); by default every
    batch is binarized afresh (a Bernoulli draw of the grey levels) with a generator whose state is
    checkpointed. With fixed_binarization the whole set is binarized once, with the run's seed.
    """

    def __init__(self, data: Dataset, settings: RunSettings, device: torch.device):
        self.settings = settings
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(settings.seed)
        train = data.train.to(device)
        if settings.fixed_binarization and not data.train_is_binary:
            fixed = torch.Generator(device=device)
            fixed.manual_seed(settings.seed + 1)
            train = torch.bernoulli(train, generator=fixed)
        self.resample = not (settings.fixed_binarization or data.train_is_binary)
        self.train = train  # [N, C, H, W]
        self.per_epoch = steps_per_epoch(len(train), settings.batch_size)
        self._epoch, self._perm = -1, None

    def batch(self, step: int) -> torch.Tensor:
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            perm_gen = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.train), generator=perm_gen).to(self.device)
            self._epoch = epoch
        b = self.settings.batch_size
        x = self.train[self._perm[index * b : (index + 1) * b]]  # [B, C, H, W]
        return torch.bernoulli(x, generator=self.generator) if self.resample else x


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())  # RNG states are CPU byte tensors, wherever loaded
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


class MetricsLog:
    """Append-only JSONL metrics; on resume, records past the checkpoint's step are dropped."""

    def __init__(self, path: pathlib.Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= resume_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
        elif resume_step is None:
            path.write_text("")

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class StopRequest:
    """Defers Ctrl-C (SIGINT) to the end of the current step, so the run stops on a step boundary.

    The first Ctrl-C sets `requested`; the loop then checkpoints and stops, and a resume continues
    exactly as if it had never stopped. A second Ctrl-C interrupts at once.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _autocast(settings: RunSettings, device: torch.device):
    if settings.amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(
    out_dir,
    *,
    model_config: DRAWConfig | None = None,
    settings: RunSettings | None = None,
    device: str | torch.device | None = None,
    resume: bool = False,
    data_dir=None,
    total_steps: int | None = None,
    progress: bool = True,
    make_figures: bool = True,
    log=print,
) -> dict:
    """Train DRAW into `out_dir` and return the run summary.

    A new run needs `model_config` and `settings`; `resume=True` reads both from out_dir's
    checkpoint and continues exactly where it stopped (`total_steps` may extend the run).
    """
    out_dir = pathlib.Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")

    if resume:
        payload = load_checkpoint(ckpt_path, map_location=device)
        if "settings" not in payload:
            raise CheckpointError(f"{ckpt_path} holds no training state to resume")
        settings = RunSettings(**payload["settings"])
        if total_steps is not None:
            settings.total_steps = total_steps
        model = model_from_checkpoint(payload).to(device)
        start_step = payload["step"]
    else:
        if ckpt_path.exists():
            raise FileExistsError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
        if model_config is None or settings is None:
            raise ValueError("a new run needs model_config and settings")
        torch.manual_seed(settings.seed)
        model = DRAW(model_config).to(device)
        start_step = 0

    kernels.resolve_backend(model.config.backend, device)  # fail before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_dataset(settings.dataset, data_dir, shape=(model.config.channels, model.config.height, model.config.width))
    log(f"data: {data.source}")
    sampler = BatchSampler(data, settings, device)
    if settings.total_steps is None:
        settings.total_steps = max(1, round(settings.epochs * sampler.per_epoch))
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    if resume:
        optimizer.load_state_dict(payload["optimizer"])
        sampler.generator.set_state(payload["rng"]["data"].cpu())
        _set_rng_state(payload["rng"], device)
        log(f"resuming {out_dir} at step {start_step} of {settings.total_steps}")
    metrics = MetricsLog(out_dir / METRICS, start_step if resume else None)
    step_fn = torch.compile(model) if settings.compile else model

    def checkpoint(step: int) -> None:
        rng = {**_rng_state(device), "data": sampler.generator.get_state()}
        save_checkpoint(ckpt_path, model, optimizer=optimizer.state_dict(), step=step, rng=rng, settings=asdict(settings))

    def evaluate(step: int) -> dict:
        result = evaluate_bound(model, data.test, device=device, seed=settings.seed)
        metrics.write({"step": step, "test_bound": result["nats"], "test_l_x": result["l_x"], "test_l_z": result["l_z"]})
        return result

    last_eval = None
    sums, count, tick = torch.zeros(3, device=device), 0, time.perf_counter()
    bar = tqdm(total=settings.total_steps, initial=start_step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    step = start_step
    with StopRequest() as stop:
        while step < settings.total_steps:
            x = sampler.batch(step)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(settings, step)
            with _autocast(settings, device):
                out = step_fn(x)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            step += 1
            sums += torch.stack([out.loss.detach(), out.l_x.detach().mean(), out.l_z.detach().mean()]).float()
            count += 1
            bar.update(1)

            if step % settings.log_every == 0 or step == settings.total_steps:
                loss, l_x, l_z = (sums / count).tolist()  # one device sync per interval
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {step}; the last good checkpoint is {ckpt_path}")
                now = time.perf_counter()
                rate = count * settings.batch_size / (now - tick)
                epoch = step / sampler.per_epoch
                metrics.write({"step": step, "epoch": round(epoch, 4), "loss": loss, "l_x": l_x, "l_z": l_z,
                               "lr": optimizer.param_groups[0]["lr"], "images_per_s": rate})
                bar.set_postfix(loss=f"{loss:.2f}", L_x=f"{l_x:.2f}", L_z=f"{l_z:.2f}", img_s=f"{rate:.0f}", refresh=False)
                sums.zero_()
                count, tick = 0, time.perf_counter()
            if step % settings.eval_every == 0 or step == settings.total_steps:
                last_eval = evaluate(step)
                bar.write(f"step {step}: test bound {last_eval['nats']:.2f} nats")
                tick = time.perf_counter()  # evaluation time is not training time
            if step % settings.checkpoint_every == 0 or step == settings.total_steps or stop.requested:
                checkpoint(step)
            if stop.requested and step < settings.total_steps:
                bar.close()
                log(f"stopped at step {step}: saved {ckpt_path}; continue with --resume")
                raise KeyboardInterrupt
    bar.close()

    if last_eval is None:  # resumed a finished run
        last_eval = evaluate(step)
    summary = {
        "steps": step,
        "epochs": step / sampler.per_epoch,
        "dataset": settings.dataset,
        "test_bound_nats": last_eval["nats"],
        "test_bound_stderr": last_eval["stderr"],
        "test_l_x": last_eval["l_x"],
        "test_l_z": last_eval["l_z"],
        "model_config": model.config.to_dict(),
        "settings": asdict(settings),
        "device": str(device),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"test bound after {step} steps: {last_eval['nats']:.2f} nats (L_x {last_eval['l_x']:.2f}, L_z {last_eval['l_z']:.2f})")
    if make_figures:
        written = write_run_figures(model, data, out_dir, seed=settings.seed)
        log("wrote " + ", ".join(str(p) for p in written))
    return summary


@torch.no_grad()
def write_run_figures(model: DRAW, data: Dataset, out_dir, *, seed: int = 0, n_samples: int = 64) -> list:
    """Samples grid, generation GIF and strip, reconstruction GIF and the loss curve of a run."""
    out_dir = pathlib.Path(out_dir)
    model.eval()
    device = next(model.parameters()).device
    cfg = model.config
    generator = torch.Generator(device=device).manual_seed(seed)
    gen = model.generate(n_samples, generator=generator)
    written = [figures.save_grid(torch.sigmoid(gen.canvases[-1]).cpu(), out_dir / "samples.png")]
    sequence = (gen.canvases[:, :16].cpu(), None if gen.write_params is None else gen.write_params[:, :16].cpu())
    written.append(figures.save_sequence_gif(sequence[0], out_dir / "generation.gif", sequence[1], cfg.write_n))
    written.append(figures.save_sequence_strip(sequence[0], out_dir / "generation.png", sequence[1], cfg.write_n))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model(data.test[:16].to(device), return_sequence=True)
    params = None if out.write_params is None else out.write_params.cpu()
    written.append(figures.save_sequence_gif(out.canvases.cpu(), out_dir / "reconstruction.gif", params, cfg.write_n))
    metrics_path = out_dir / METRICS
    if metrics_path.exists() and metrics_path.stat().st_size:
        written.append(figures.save_loss_curve(metrics_path, out_dir / "loss_curve.png"))
    model.train()
    return written
