"""Training: start or resume a run, the loop, and the finish; exactly resumable, nothing lost on a crash.

`train()` holds the run directory's lock (draw/rundir.py) for the whole run and does three things:
    start_run   a new run (configs given) or a resumed one (configs read from the checkpoint);
    run_loop    steps (draw/step.py), a training record every log_every steps, an evaluation on the held-out
                split (eval_split: test or valid) every eval_every, a checkpoint every checkpoint_every; stops
                on a step boundary on the first SIGINT, SIGTERM or SIGHUP, after saving a checkpoint;
    finish_run  summary.json and the figures.
With --ema the run keeps a moving average of the weights (draw/average.py) beside the trained ones: the
evaluations score both (the average's as test_bound / test_error, or valid_..., the trained weights' with
"_trained"), and the figures and `draw eval` / `draw sample` use the average.
A checkpoint is written only when every weight is finite, so a diverging run keeps its last good one.
Under torchrun every rank runs these with its `World` (draw/distributed.py): rank 0 alone holds the lock,
reads and writes the run directory and logs; a stop is agreed by all ranks, an error in one ends all.
"""

import contextlib
import json
import logging
import math
import pathlib
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from draw import figures
from draw.atomic import atomic_write_text
from draw.checkpoint import (CheckpointError, build_model, check_training_state, config_from_checkpoint, finite_weights,
                             load_checkpoint, model_from_checkpoint, save_checkpoint)
from draw.config import EVAL_SPLITS, ClassifierConfig, DRAWConfig, TrainConfig, model_kind, record_split
from draw.data import Dataset, load_dataset, random_crop, to_float
from draw.distributed import SINGLE, World, check_global_batch, failing_together
from draw.evaluate import evaluate_bound, evaluate_classifier
from draw.kernels import check_backend
from draw.model import DRAW
from draw.rundir import CHECKPOINT, METRICS, SUMMARY, TRAINING_RECORD_KEY, MetricsLog, NoMetrics, RunLock
from draw.step import TrainStep, resolve_step_mode, step_statistics

log = logging.getLogger("draw")


class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite; the last good checkpoint is kept."""


TIME_LIMIT = 256  # the stop code of a run's time limit: above every signal number, so it wins agree_on_stop


def stop_reason(code: int) -> str:
    """"SIGTERM" for a signal's stop code, "time limit" for TIME_LIMIT."""
    return "time limit" if code == TIME_LIMIT else signal.Signals(code).name


class TrainingStopped(KeyboardInterrupt):
    """The run stopped after saving a checkpoint, on a signal or at its time limit; `signum` is the
    signal's number, or TIME_LIMIT."""

    def __init__(self, signum: int):
        super().__init__(stop_reason(signum))
        self.signum = signum


def scaled_lr(base_lr: float, base_batch: int, batch: int) -> float:
    """Square-root learning-rate scaling for a batch size other than the preset's: lr * sqrt(B / B0)."""
    return base_lr * math.sqrt(batch / base_batch)


def lr_at(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of step `step` (0-based): a pure function of the step, so resumes match.

    A linear warm-up over the first warmup_steps, then constant or a cosine decay to lr / 10.
    """
    lr = config.lr
    if config.lr_schedule == "cosine":
        progress = min(step / total_steps, 1.0)
        lr = config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    if step < config.warmup_steps:
        lr *= (step + 1) / config.warmup_steps
    return lr


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, n_train // batch_size)


FRESH_STREAM = 7  # keeps the fresh-clutter generators' seeds apart from any other (seed, ...) seed


class BatchSampler:
    """Training batches, a pure function of (step, generator state): identical after a resume, and the
    same global batches on every rank of a data-parallel run, whatever its world size.

    Each epoch visits the training set in a permutation seeded by (seed, epoch). Grey-level data
    (`data.binarize`) is binarized afresh in every batch (a Bernoulli draw of the grey levels) with a
    generator whose state is checkpointed, or once for the whole set with fixed_binarization; colour
    data is used as it is. Data with a `train_crop` (svhn) gives each image a random crop. With
    fresh_clutter the chosen indices are training digits that `data.fresh_train` composes into new
    images, with a generator seeded by (seed, step).
    """

    def __init__(self, data: Dataset, config: TrainConfig, device: torch.device, *, with_labels: bool = False):
        self.config = config
        self.labels = None
        if with_labels:
            self.labels = data.split_labels("train").to(device)  # [N]
        self.device = device
        self.fresh = data.fresh_train if config.fresh_clutter else None
        if config.fresh_clutter and self.fresh is None:
            raise ValueError(f"--fresh-clutter needs data that can be drawn anew (mnist-cluttered), not {data.name}")
        self.crop = data.train_crop
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed)
        # [N, C, H, W], float32 or uint8 (kept compact); with fresh clutter only its length is used,
        # so it stays where it is rather than taking device memory
        train = data.train
        if data.binarize and config.fixed_binarization and not data.train_is_binary:
            # drawn on the CPU whatever the device: the same fixed set wherever the run starts or resumes
            train = torch.bernoulli(to_float(train), generator=torch.Generator().manual_seed(config.seed + 1))
        if self.fresh is None:
            train = train.to(device)
        self.resample = data.binarize and not (config.fixed_binarization or data.train_is_binary)
        self.train = train
        self.per_epoch = steps_per_epoch(len(train), config.batch_size)
        self._epoch, self._perm = -1, None

    def batch(self, step: int) -> torch.Tensor:
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            perm_gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.train), generator=perm_gen).to(self.device)
            self._epoch = epoch
        b = self.config.batch_size
        chosen = self._perm[index * b : (index + 1) * b]
        if self.fresh is not None:
            images, labels = self.fresh(chosen.cpu().numpy(), (self.config.seed, FRESH_STREAM, step))
            x = to_float(images.to(self.device))  # [B, C, H, W]
            return x if self.labels is None else (x, labels.to(self.device))
        x = to_float(self.train[chosen])  # [B, C, H, W]
        if self.crop is not None:
            x = random_crop(x, self.crop, self.generator)
        if self.resample:
            x = torch.bernoulli(x, generator=self.generator)
        return x if self.labels is None else (x, self.labels[chosen])


class StopRequest:
    """Defers SIGINT, SIGTERM and SIGHUP to the end of the current step, so the run stops on a step
    boundary with a checkpoint: the first signal sets `signum`; a second SIGINT (Ctrl-C twice)
    interrupts at once. A repeated SIGTERM or SIGHUP is the same request again: `timeout` sends its
    signal to the command and then to the command's whole process group, so a run it stops receives
    it twice (and `timeout -k` follows up with SIGKILL if it must).

    A signal the process inherited as ignored (a job started with nohup, or in the background) stays
    ignored; the previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.getsignal(sig)
                if previous is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything a run's loop and finish need; made by start_run."""

    out_dir: pathlib.Path
    model: DRAW
    step: TrainStep
    config: TrainConfig
    data: Dataset
    sampler: BatchSampler
    metrics: MetricsLog | NoMetrics
    device: torch.device
    start_step: int
    total_steps: int
    sums: torch.Tensor  # [k] running sums of the model's STATISTICS since the last training record
    count: int = 0
    last_eval: dict | None = None
    progress: bool = False
    tensorboard: object = None
    good_checkpoint_step: int | None = None
    world: World = SINGLE
    deadline: float | None = None  # time.monotonic() after which the run stops at a step boundary
    average_model: nn.Module | None = None  # with --ema: a copy of the model that holds the average (evaluation_model)
    checkpoint_config: TrainConfig | None = None  # a resumed run's config as its checkpoint holds it
    data_identity: dict | None = None  # Dataset.identity(), kept in each checkpoint

    @property
    def checkpoint_path(self) -> pathlib.Path:
        return self.out_dir / CHECKPOINT


def _rng_state(device: torch.device, sampler: BatchSampler) -> dict:
    state = {"device": device.type, "torch": torch.get_rng_state(), "data": sampler.generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng_state(state: dict, device: torch.device, sampler: BatchSampler, where: str) -> None:
    torch.set_rng_state(state["torch"].cpu())  # RNG states are CPU byte tensors, wherever loaded
    saved_on = state.get("device", "cpu" if "cuda" not in state else "cuda")
    if saved_on != device.type:
        log.warning(f"{where} was saved on {saved_on} and resumes on {device.type}: the batches' binarization "
                    "noise and the latent noise differ from an uninterrupted run (the run is not bitwise exact)")
        return
    sampler.generator.set_state(state["data"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _resumed_configs(payload: dict, model_config: DRAWConfig | ClassifierConfig | None,
                     overrides: dict) -> tuple[TrainConfig, TrainConfig]:
    """(the checkpoint's TrainConfig, it with the schedule overrides applied); refuse arithmetic changes."""
    where = payload["path"]
    try:
        saved = TrainConfig.from_dict(payload["train_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: its training config is not usable: {e}") from None
    if model_config is not None and model_config != config_from_checkpoint(payload):
        raise ValueError(f"--resume continues the model in {where}; a different --preset would change its architecture")
    requested = replace(saved, **overrides)
    changed = saved.arithmetic_changes(requested)
    if changed:
        what = ", ".join(f"{name} {getattr(saved, name)!r} -> {getattr(requested, name)!r}" for name in changed)
        raise ValueError(f"--resume keeps the run's arithmetic; these would change it: {what} "
                         f"(only {', '.join(TrainConfig.SCHEDULE)} may change on resume)")
    for name in TrainConfig.SCHEDULE:
        if getattr(requested, name) != getattr(saved, name):
            log.info(f"resume: {name} {getattr(saved, name)!r} -> {getattr(requested, name)!r}")
    return saved, requested


def _resumed_step_mode(saved: str | None, device: torch.device, world: World) -> str:
    """The step mode a resume runs when none is asked for: the one that ran the run (the same float rounding),
    or "auto" where that one cannot run (a CUDA graph's run resumed on a CPU), said in one line."""
    if saved is None:
        return "auto"
    try:
        resolve_step_mode(saved, device, under_ddp=world.size > 1)
    except ValueError as e:
        log.info(f"resume: the run's {saved} step cannot run here ({e}); the step is \"auto\" (--step chooses)")
        return "auto"
    return saved


def _check_resumed_data(payload: dict, dataset: str, here: dict) -> None:
    """Refuse a resume on other data than the run trained on (checkpoints from before the data were kept are
    taken as they are, and those from before the validation split's digest was kept are checked without it)."""
    saved = payload.get("data")
    if saved is None:
        return
    other = [split for split in EVAL_SPLITS if saved.get(f"{split}_sha256", here[f"{split}_sha256"]) != here[f"{split}_sha256"]]
    if saved["sizes"] == here["sizes"] and not other:
        return
    what = ("train/valid/test sizes " + "/".join(map(str, saved["sizes"])) + " against " + "/".join(map(str, here["sizes"]))
            if saved["sizes"] != here["sizes"] else f"another {' and '.join(other)} split")
    raise ValueError(f"{payload['path']} was trained on other {dataset} data than is here ({what}); it was "
                     f"{saved['source']!r}, here it is {here['source']!r}: resume with the data it was trained on "
                     "(--data-dir)")


def _check_resumed_length(path, saved: TrainConfig, config: TrainConfig, start_step: int, total_steps: int,
                          per_epoch: int) -> None:
    """Refuse a resumed run that would end before its checkpoint's step; say how a new length moves a cosine
    schedule's learning rate (lr_at follows step / total_steps)."""
    if total_steps < start_step:
        raise ValueError(f"{path} is at step {start_step}; --steps / --epochs would end the run at step "
                         f"{total_steps}, before it (give at least {start_step} steps)")
    saved_total = saved.total_steps(per_epoch)
    if config.lr_schedule == "cosine" and saved_total != total_steps and start_step < total_steps:
        log.info(f"resume: the cosine schedule now ends at step {total_steps} instead of {saved_total}; the lr at step "
                 f"{start_step} goes from {lr_at(config, start_step, saved_total):.3g} to "
                 f"{lr_at(config, start_step, total_steps):.3g}")


def start_run(out_dir, *, model_config: DRAWConfig | ClassifierConfig | None, train_config: TrainConfig | None, resume: bool,
              overrides: dict, device: torch.device, backend: str, step_mode: str | None, compile_mode: str,
              data_dir, progress: bool, tensorboard, world: World = SINGLE) -> Run:
    """Build a run: new (model_config and train_config given) or resumed from out_dir's checkpoint.

    Everything that can be refused is refused before anything is written. Rank 0 alone reads the
    checkpoint (and hands it to the other ranks) and writes the run directory.
    """
    out_dir = pathlib.Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT
    if resume:
        payload = world.from_main(lambda: load_checkpoint(ckpt_path, map_location="cpu"))
        check_training_state(payload)
        saved_config, config = _resumed_configs(payload, model_config, overrides)
        model = model_from_checkpoint(payload, weights="trained")  # the average, if any, goes back into the step
        start_step = payload["step"]
        step_mode = step_mode or _resumed_step_mode(payload.get("step_mode"), device, world)
    else:
        if world.is_main and ckpt_path.exists():
            raise FileExistsError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
        if model_config is None or train_config is None:
            raise ValueError("a new run needs a model config and a train config")
        config = replace(train_config, **overrides)
        torch.manual_seed(config.seed)
        model = build_model(model_config)
        start_step = 0
        step_mode = step_mode or "auto"
    check_global_batch(config.batch_size, world.size, config.accumulate, resumed=resume)
    if world.size > 1 or config.accumulate > 1:
        log.info(f"each step: {world.size} rank(s) x {config.accumulate} micro-batch(es) of "
                 f"{config.batch_size // (world.size * config.accumulate)} images = the batch of {config.batch_size}")
    check_backend(backend, device)  # refuse an unusable backend before anything is written
    model.backend = backend
    if config.attention_grad_clip is not None:
        if isinstance(model, DRAW):
            raise ValueError("attention_grad_clip (--attention-grad-clip) clips the glimpse classifier's attention "
                             "gradient (the cluttered presets); DRAW does not take it")
        model.attention_grad_clip = config.attention_grad_clip
    model.to(device)
    summary_writer = _summary_writer_class() if tensorboard is not None and world.is_main else None

    cfg = model.config
    data = world.first_on_each_node(lambda: load_dataset(config.dataset, data_dir, shape=(cfg.channels, cfg.height, cfg.width),
                                                         progress=progress))  # download bars as the run's own
    log.info(f"data: {data.source}")
    if config.fixed_binarization and not data.binarize:
        raise ValueError(f"--fixed-binarization binarizes grey-level training images; {config.dataset} is used as it is "
                         "(not binarized)")
    data_identity = data.identity()
    if resume:
        _check_resumed_data(payload, config.dataset, data_identity)
    if config.batch_size > len(data.train):
        raise ValueError(f"--batch-size {config.batch_size} is larger than the training set ({len(data.train)} images of {config.dataset})")
    sampler = BatchSampler(data, config, device, with_labels=not isinstance(model, DRAW))
    total_steps = config.total_steps(sampler.per_epoch)
    if resume:
        _check_resumed_length(payload["path"], saved_config, config, start_step, total_steps, sampler.per_epoch)
    step = TrainStep(model, lr=config.lr, grad_clip=config.grad_clip, amp=config.amp, tf32=config.tf32, mode=step_mode,
                     compile_mode=compile_mode, device=device, accumulate=config.accumulate, world=world,
                     average=config.ema)
    if step.gradient_sync is not None:
        how = ("by DistributedDataParallel in the backward pass" if step.gradient_sync == "ddp"
               else "by one all-reduce after the backward pass")
        log.info(f"{step.mode} step: the gradients averaged across the {world.size} ranks {how}")
    sums, count = torch.zeros(len(step_statistics(model)), device=device), 0
    if resume:
        try:
            step.load_optimizer_state(payload["optimizer"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CheckpointError(f"{payload['path']}: its optimizer state does not fit the model "
                                  f"({str(e) or type(e).__name__})") from None  # one line: cli._error_line
        if step.average is not None:
            if "average" not in payload:
                raise CheckpointError(f"{payload['path']} was trained with --ema {config.ema} but holds no weight average")
            try:
                step.average.load_state_dict(payload["average"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{payload['path']}: its weight average does not load: {e}") from None
        _restore_rng_state(payload["rng"], device, sampler, payload["path"])
        running = payload.get("running")
        if running is not None:  # a checkpoint of an older version holds the model's statistics only
            saved = running["sums"].to(device=device, dtype=torch.float32)
            sums[: len(saved)], count = saved, int(running["count"])
        log.info(f"resuming {out_dir} at step {start_step} of {total_steps}")
        saved_world_size = payload.get("world_size", 1)
        if saved_world_size != world.size:
            log.info(f"resuming at world size {world.size} a run checkpointed at world size {saved_world_size}: the same "
                     "global batches, so the losses agree up to float rounding")
    metrics = NoMetrics()
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(out_dir / METRICS, start_step if resume else None, unlogged=count > 0)
        if resume and start_step < total_steps:  # the summary of the run's shorter end is no longer its end:
            (out_dir / SUMMARY).unlink(missing_ok=True)  # finish_run writes the new one (a stopped run has none)
    # on resume, TensorBoard's events past the checkpoint (written before a crash) are dropped, as metrics.jsonl's are
    writer = (summary_writer(log_dir=str(tensorboard), purge_step=start_step + 1 if resume else None)
              if summary_writer is not None else None)
    return Run(out_dir, model, step, config, data, sampler, metrics, device, start_step, total_steps, sums, count,
               progress=progress, tensorboard=writer, good_checkpoint_step=start_step if resume else None, world=world,
               checkpoint_config=saved_config if resume else None, data_identity=data_identity)

def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or the project's [tensorboard] extra)") from None
    return SummaryWriter


def save_run_checkpoint(run: Run, step: int) -> None:
    """Checkpoint the run at `step` (rank 0 writes it; every rank holds the same weights and checks them);
    a non-finite weight stops the run with the last good checkpoint kept."""
    try:
        if not run.world.is_main:
            finite_weights(run.checkpoint_path, run.model)
        else:
            run.metrics.sync()
            save_checkpoint(run.checkpoint_path, run.model, optimizer=run.step.optimizer_state(), step=step,
                            rng=_rng_state(run.device, run.sampler), train_config=run.config.to_dict(),
                            running={"sums": run.sums.detach().cpu(), "count": run.count}, world_size=run.world.size,
                            step_mode=run.step.mode, data=run.data_identity,
                            **({"average": run.step.average.state_dict()} if run.step.average is not None else {}))
    except CheckpointError as e:
        raise TrainingDiverged(_diverged_message(run, step, str(e))) from None
    run.good_checkpoint_step = step


def _diverged_message(run: Run, step: int, what: str) -> str:
    if run.good_checkpoint_step is None:
        kept = "no checkpoint was written before it"
    else:
        kept = f"the last good checkpoint (step {run.good_checkpoint_step}) is kept at {run.checkpoint_path}"
    return f"training diverged at step {step} ({what}); {kept}; try a lower --lr"


def evaluation_model(run: Run) -> nn.Module:
    """The model that evaluations and figures score: the trained one, or with --ema a copy of it holding the
    moving average of the weights as of the last step (made once, refreshed at each call)."""
    average = run.step.average
    if average is None:
        return run.model
    if run.average_model is None:
        with torch.random.fork_rng(devices=[]):  # its initial weights must not draw from the CPU generator the
            run.average_model = build_model(run.model.config).to(run.device)  # latent noise comes from
        run.average_model.backend = run.model.backend
    return average.copy_into(run.average_model)


def _scores(run: Run, model: nn.Module) -> dict:
    """The scores of `model` on the held-out split S = run.config.eval_split ("test" or "valid"): DRAW's bound in
    nats (S_bound, its stderr S_bound_stderr, S_l_x, S_l_z), the classifier's error and cross-entropy (S_error,
    S_loss)."""
    split = run.config.eval_split
    images = getattr(run.data, split)  # [N, C, H, W]
    if isinstance(model, DRAW):
        result = evaluate_bound(model, images, device=run.device, seed=run.config.seed, world=run.world)
        scores = {"bound": result["nats"], "bound_stderr": result["stderr"], "l_x": result["l_x"], "l_z": result["l_z"]}
    else:
        result = evaluate_classifier(model, images, run.data.split_labels(split), device=run.device, world=run.world)
        scores = {"error": result["error"], "loss": result["loss"]}
    return {f"{split}_{name}": value for name, value in scores.items()}


def _evaluate(run: Run, step: int) -> dict:
    """Score the model on the held-out split and write the evaluation record ({"step", "test_...": ...}, or
    "valid_..."), which is returned (see _scores). With --ema the scores are the weight average's, and the
    trained weights' follow under the same names with "_trained" (test_bound_trained, ...), on the same latent
    noise."""
    record = {"step": step, **_scores(run, evaluation_model(run))}
    if run.step.average is not None:
        record.update({f"{key}_trained": value for key, value in _scores(run, run.model).items()})
    for key, value in record.items():
        if not math.isfinite(value):
            raise TrainingDiverged(_diverged_message(run, step, f"the {key.replace('_', ' ')} became {value}"))
    run.metrics.write(record)
    if run.tensorboard is not None:
        for key, value in record.items():
            if key != "step":
                split, name = key.split("_", 1)
                run.tensorboard.add_scalar(f"{split}/{name}", value, step)
    return record


def _headline(record: dict) -> str:
    """An evaluation record in words: "test bound 89.48 nats (L_x ..., L_z ...)", "valid error 3.24 % (...)"."""
    split = record_split(record)
    scores = {key[len(split) + 1:]: value for key, value in record.items() if key.startswith(f"{split}_")}
    if "bound" in scores:
        line = f"{split} bound {scores['bound']:.2f} nats (L_x {scores['l_x']:.2f}, L_z {scores['l_z']:.2f})"
        if "bound_trained" in scores:
            line += f"; the trained weights {scores['bound_trained']:.2f}"
        return line
    line = f"{split} error {100 * scores['error']:.2f} % (cross-entropy {scores['loss']:.4f} nats)"
    if "error_trained" in scores:
        line += f"; the trained weights {100 * scores['error_trained']:.2f} %"
    return line


STAT_LABELS = {"loss": "loss", "l_x": "L_x", "l_z": "L_z", "error": "error", "grad_norm": "grad norm", "clipped": "clipped"}
STAT_FORMATS = {"error": ".4f", "clipped": ".0%"}  # how the log line shows each statistic; the rest ".2f"


def _wait_for_device(device: torch.device) -> None:
    """Wait for the kernels queued on `device`: a CUDA step returns to the host before its kernels have run,
    so a clock read without this would count the queue in the next interval (or in an evaluation)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _log_interval(run: Run, step: int, since: float, timed_steps: int) -> tuple[dict, float]:
    """Write the training record of the interval ending at `step`, whose last `timed_steps` steps this process
    ran from time.perf_counter() `since` until now, once the device has run them (a resumed interval began
    before this process). Returns the progress bar's postfix and the time the interval ended."""
    _wait_for_device(run.device)
    ended = time.perf_counter()
    seconds = ended - since
    values = dict(zip(step_statistics(run.model), (run.sums / run.count).tolist()))  # one device sync per interval
    for name, value in values.items():
        if not math.isfinite(value):
            raise TrainingDiverged(_diverged_message(run, step, f"the training {STAT_LABELS[name]} became {value}"))
    rate = timed_steps * run.config.batch_size / seconds if timed_steps else None  # None: no step of it ran here
    record = {"step": step, "epoch": round(step / run.sampler.per_epoch, 4), **values,
              "lr": lr_at(run.config, step - 1, run.total_steps), TRAINING_RECORD_KEY: rate}
    run.metrics.write(record)
    if run.tensorboard is not None:
        for key in (*values, "lr", TRAINING_RECORD_KEY):
            if record[key] is not None:
                run.tensorboard.add_scalar(f"train/{key}", record[key], step)
    shown = {STAT_LABELS[k]: format(v, STAT_FORMATS.get(k, ".2f")) for k, v in values.items()}
    speed = "-" if rate is None else f"{rate:.0f}"
    if not run.progress:
        log.info(f"step {step}/{run.total_steps}  " + "  ".join(f"{k} {v}" for k, v in shown.items()) + f"  {speed} images/s")
    run.sums.zero_()
    run.count = 0
    return {**shown, "img_s": speed}, ended


def run_loop(run: Run) -> int | None:
    """Train from run.start_step to run.total_steps. Returns None when done, or the stop code (a
    signal's number, or TIME_LIMIT once run.deadline has passed) of what stopped it after a checkpoint."""
    from tqdm.auto import tqdm

    cfg = run.config
    step = run.start_step
    bar = tqdm(total=run.total_steps, initial=step, desc="train", unit="step", disable=not run.progress, dynamic_ncols=True)
    tick, timed = time.perf_counter(), 0  # the steps this process has run since tick
    if step == run.total_steps and (run.count or run.checkpoint_config not in (None, run.config)):
        # resumed to end where a stopped run's checkpoint is (--steps): the record of its last, unfinished
        # interval, and its new length, which a later --resume keeps
        if run.count:
            _log_interval(run, step, time.perf_counter(), 0)
        save_run_checkpoint(run, step)
    try:
        with StopRequest() as stop:
            while step < run.total_steps:
                stats = run.step(run.sampler.batch(step), lr_at(cfg, step, run.total_steps))
                step += 1
                run.sums += stats
                run.count += 1
                timed += 1
                bar.update(1)
                if step % cfg.log_every == 0 or step == run.total_steps:
                    postfix, tick = _log_interval(run, step, tick, timed)
                    bar.set_postfix(**postfix, refresh=False)
                    timed = 0
                if step % cfg.eval_every == 0 or step == run.total_steps:
                    _wait_for_device(run.device)  # the steps still queued are training time
                    evaluating = time.perf_counter()
                    run.last_eval = _evaluate(run, step)
                    (bar.write if run.progress else log.info)(f"step {step}: {_headline(run.last_eval)}")
                    tick += time.perf_counter() - evaluating  # evaluation time is not training time
                timed_out = run.deadline is not None and time.monotonic() >= run.deadline
                # every rank stops after the same step
                stopping = run.world.agree_on_stop(stop.signum or (TIME_LIMIT if timed_out else None))
                if step % cfg.checkpoint_every == 0 or step == run.total_steps or stopping is not None:
                    save_run_checkpoint(run, step)
                if stopping is not None and step < run.total_steps:
                    log.info(f"stopped at step {step} ({stop_reason(stopping)}): saved {run.checkpoint_path}; continue with --resume")
                    return stopping
    finally:
        bar.close()
    return None


def finish_run(run: Run, *, make_figures: bool = True) -> dict:
    """Write summary.json (and the figures) of a finished run and return the summary."""
    split = run.config.eval_split
    if run.last_eval is None:  # a resumed run that was already finished: its last evaluation (of this split) stands
        evals = run.world.from_main(lambda: [r for r in run.metrics.records()
                                             if record_split(r) == split and r["step"] == run.total_steps])
        if evals:
            log.info(f"{run.out_dir} is already trained to step {run.total_steps}")
        run.last_eval = evals[-1] if evals else _evaluate(run, run.total_steps)  # else: ended here, at its checkpoint
    record = {k: v for k, v in run.last_eval.items() if k != "step"}
    for key in (f"{split}_bound", f"{split}_bound_trained"):
        if key in record:
            record[f"{key}_nats"] = record.pop(key)
    summary = {
        "steps": run.total_steps,
        "epochs": run.total_steps / run.sampler.per_epoch,
        "dataset": run.config.dataset,
        "data_source": run.data.source,  # where the data came from (the loader's line)
        **record,
        "model_kind": model_kind(run.model.config),
        "model_config": run.model.config.to_dict(),
        "train_config": run.config.to_dict(),
        "device": str(run.device),
        "step_mode": run.step.mode,
        "world_size": run.world.size,
        "weights": "trained" if run.step.average is None else "average",  # whose scores test_... (valid_...) are
    }
    if not run.world.is_main:
        return summary
    atomic_write_text(run.out_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    log.info(f"after {run.total_steps} steps: {_headline(run.last_eval)}")
    if make_figures:
        model = evaluation_model(run)
        if isinstance(model, DRAW):
            written = figures.write_model_figures(model, run.out_dir, seed=run.config.seed,
                                                  reconstruct=run.data.images("test", slice(0, figures.SEQUENCE_IMAGES)),
                                                  training_images=run.data.train, metrics=run.out_dir / METRICS)
        else:
            written = [figures.save_glimpse_figure(model, run.data.images("test", slice(0, figures.GLIMPSE_IMAGES)),
                                                   run.data.split_labels("test")[: figures.GLIMPSE_IMAGES], run.out_dir / "glimpses.png"),
                       figures.save_error_curve(run.out_dir / METRICS, run.out_dir / "error_curve.png")]
        log.info("wrote " + ", ".join(str(p) for p in written))
    return summary


def train(out_dir, *, model_config: DRAWConfig | ClassifierConfig | None = None, train_config: TrainConfig | None = None,
          resume: bool = False, overrides: dict | None = None, device=None, backend: str = "auto",
          step_mode: str | None = None, compile_mode: str = "default", data_dir=None, progress: bool | None = None,
          tensorboard=None, make_figures: bool = True, world: World = SINGLE, deadline: float | None = None,
          announce: str | None = None) -> dict:
    """Train DRAW into `out_dir` and return the run summary.

    A new run needs `model_config` and `train_config`; `resume=True` reads both from out_dir's
    checkpoint and continues exactly where it stopped. `step_mode` None: "auto" for a new run, the mode
    that ran it for a resumed one (draw/step.py). `overrides` are TrainConfig fields to change
    (on resume only the schedule's). `progress` None shows a bar when stderr is a terminal, and
    otherwise logs one line per logging interval. `world`: this rank's place in a torchrun launch
    (draw/distributed.py); every rank calls train() alike. `deadline`: a time.monotonic() after which
    the run checkpoints and stops at the end of its step. `announce`: a line rank 0 prints on stdout once the
    run is set up (after every refusal: a busy directory, an existing run, bad settings).

    Raises TrainingStopped after a signal or at the deadline (the checkpoint saved), TrainingDiverged
    on a non-finite loss.
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if progress is None:
        progress = sys.stderr.isatty()
    out_dir = pathlib.Path(out_dir)
    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # the directories the lock will make, deepest first
    with failing_together(world), (RunLock(out_dir) if world.is_main else contextlib.nullcontext()) as lock:
        try:
            run = start_run(out_dir, model_config=model_config, train_config=train_config, resume=resume,
                            overrides=overrides or {}, device=device, backend=backend, step_mode=step_mode,
                            compile_mode=compile_mode, data_dir=data_dir, progress=progress and world.is_main,
                            tensorboard=tensorboard, world=world)
            run.deadline = deadline
            if announce is not None and world.is_main:
                print(announce, flush=True)
        except BaseException:
            if lock is not None and lock.created:  # a refused run leaves nothing behind: its lock file,
                lock.path.unlink(missing_ok=True)
            if created and lock is not None:  # and the directories it made, parents included
                with contextlib.suppress(OSError):
                    for directory in created:
                        directory.rmdir()  # stops at one something else has written into meanwhile
            raise
        try:
            signum = run_loop(run)
            summary = finish_run(run, make_figures=make_figures) if signum is None else None
        finally:
            if run.tensorboard is not None:
                run.tensorboard.close()
    if signum is not None:  # a stop all ranks agreed on: no rank waits for another
        raise TrainingStopped(signum)
    return summary
