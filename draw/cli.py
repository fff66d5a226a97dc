"""The `draw` command: train, eval, sample, verify, presets. Thin argparse over the library.

Nothing heavy is imported until a command runs: `draw --help` does not import torch. CPU threading is
chosen before torch is imported (OpenMP reads its variables once, at start-up).
"""

import argparse
import json
import logging
import math
import os
import pathlib
import re
import sys
import time

from draw import __version__
from draw.config import DATASETS, DEFAULT_PRESET, EVAL_SPLITS, LR_SCHEDULES, PRESETS, TrainConfig, get_preset
from draw.device import is_device_name, pick_device
from draw.rundir import CHECKPOINT

BACKENDS = ("auto", "reference", "triton")  # draw.kernels.BACKENDS, named here so --help needs no torch
STEP_MODES = ("auto", "eager", "compile", "cuda-graph")  # draw.step.STEP_MODES
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# CPU threads when --threads is not given: one thread per process holds up when the cores are shared
# (bench/bench_threads.py measures quiet against busy; bench/RESULTS.md has the figures).
DEFAULT_CPU_THREADS = 1
EXIT_TIME_LIMIT = 75  # `draw train --time-limit` stopped the run before its end (EX_TEMPFAIL: run it again)

log = logging.getLogger("draw")


def _whole_number(text: str, *, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, least=1)


def _nonnegative_int(text: str) -> int:
    return _whole_number(text, least=0)


def _finite_float(text: str, *, zero_allowed: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and (value > 0 or zero_allowed and value == 0)):
        raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if zero_allowed else '>'} 0, got {text}")
    return value


def _decay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < value < 1:  # NaN too
        raise argparse.ArgumentTypeError(f"must be a number strictly between 0 and 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    return _finite_float(text, zero_allowed=False)


def _nonnegative_float(text: str) -> float:
    return _finite_float(text, zero_allowed=True)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {2**32 - 1}, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be from 0 to {2**32 - 1}, got {value}")
    return value


def _device_name(text: str) -> str:
    if is_device_name(text):
        return text
    raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")


def _preset_line(name: str) -> str:
    p = PRESETS[name]
    m, t = p.model, p.train
    length = f"{t.steps} steps" if t.steps else f"{t.epochs:g} epochs"
    clutter = " (fresh clutter every batch)" if t.fresh_clutter else ""
    clip = f", gradient clip {t.grad_clip:g}" if t.grad_clip is not None else ", no gradient clip"
    clip += f", attention gradient clip {t.attention_grad_clip:g}" if t.attention_grad_clip is not None else ""
    training = f"data {t.dataset}{clutter}, batch {t.batch_size}, lr {t.lr:g} {t.lr_schedule}{clip}, {length}"
    if not hasattr(m, "T"):  # the glimpse classifier
        return (f"{name}: classifier, {m.channels}x{m.height}x{m.width}, {m.glimpses} glimpses of {m.read_n}x{m.read_n}, "
                f"LSTM {m.lstm_size}; {training}. {p.description}")
    read = f"read {m.read_n}x{m.read_n}" if m.read_attn else "read whole image"
    write = f"write {m.write_n}x{m.write_n}" if m.write_attn else "write whole image"
    default = " (default)" if name == DEFAULT_PRESET else ""
    return (f"{name}{default}: {m.channels}x{m.height}x{m.width}, T {m.T}, LSTM {m.enc_size}, z {m.z_size}, {read}, "
            f"{write}; {training}. {p.description}")


def _common(p: argparse.ArgumentParser, *, backend_help: str) -> None:
    p.add_argument("--device", type=_device_name, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help=backend_help)
    p.add_argument("--threads", type=_positive_int,
                   help=f"CPU threads for torch (default {DEFAULT_CPU_THREADS}, or $OMP_NUM_THREADS when set)")


def _weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", choices=("average", "trained"), default="average",
                   help="average: the moving average of the weights, for a run trained with --ema (else its trained "
                        "weights); trained: the trained weights (default average)")


class OneLineErrors(argparse.ArgumentParser):
    """argparse, whose usage errors are one line that points to --help (not the whole usage first); exit 2."""

    commands: dict[str, argparse.ArgumentParser] = {}  # a command's own parser, for its unknown flags

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # said by the command's parser, so that the line points to that command's --help
            self.commands.get(getattr(parsed, "command", None), self).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="draw", description="DRAW (Gregor et al. 2015): train, evaluate, sample, verify.")
    parser.add_argument("--version", action="version", version=f"draw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices

    t = sub.add_parser("train", help="train a model into a run directory",
                       description="Train DRAW. Flags left out take the preset's values (`draw presets` lists them).")
    t.add_argument("--preset", choices=sorted(PRESETS), help=f"model and training defaults (default {DEFAULT_PRESET})")
    t.add_argument("--dataset", choices=DATASETS, help="training data (default: the preset's, listed by `draw presets`)")
    length = t.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, help="optimizer steps to train for")
    length.add_argument("--epochs", type=_positive_float, help="passes over the training set (default: the preset's)")
    t.add_argument("--batch-size", type=_positive_int,
                   help="images per step: the global batch, shared by all torchrun ranks and --accumulate micro-batches "
                        "(must divide by both; default: the preset's)")
    t.add_argument("--accumulate", type=_positive_int,
                   help="micro-batches per step (gradient accumulation, for a batch larger than fits in memory); "
                        "the same update up to float rounding (default 1)")
    t.add_argument("--lr", type=_positive_float,
                   help="Adam learning rate (default: the preset's, scaled by sqrt(batch / preset batch) when --batch-size differs)")
    t.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="constant, or cosine decay to lr/10 (default: the preset's)")
    t.add_argument("--warmup-steps", type=_nonnegative_int, help="linear learning-rate warm-up over this many steps (default 0)")
    t.add_argument("--amp", choices=("none", "bf16"), help="bf16 autocast (default none)")
    t.add_argument("--tf32", action="store_true", default=None, help="CUDA: TF32 matmuls for the LSTMs and linear layers")
    t.add_argument("--seed", type=_seed, help="random seed (default 0)")
    t.add_argument("--fixed-binarization", action="store_true", default=None, help="binarize the training set once instead of every batch")
    t.add_argument("--fresh-clutter", action=argparse.BooleanOptionalAction, default=None,
                   help="mnist-cluttered: new positions and distractors around the training digits in every batch, "
                        "instead of the 50k stored images (default: the preset's)")
    t.add_argument("--grad-clip", type=_nonnegative_float, metavar="NORM",
                   help="scale the gradient down to this global norm where it is larger, before Adam; 0 for no clip "
                        "(the norm is logged either way; default: the preset's, 10)")
    t.add_argument("--attention-grad-clip", type=_nonnegative_float, metavar="C",
                   help="classifier presets: clip each image's gradient with respect to each glimpse's attention "
                        "parameters to [-C, C] in the backward pass; 0 for the exact gradient (default: the preset's)")
    t.add_argument("--ema", type=_decay, metavar="DECAY",
                   help="keep a moving average of the weights, a <- DECAY a + (1 - DECAY) w after every step (e.g. 0.999: "
                        "about the last 1,000 steps), and evaluate, sample and draw figures with it; the evaluations "
                        "score the trained weights too (default: none)")
    t.add_argument("--eval-every", type=_positive_int,
                   help="steps between evaluations of the held-out bound (classifiers: error) (default: the preset's)")
    t.add_argument("--eval-split", choices=EVAL_SPLITS,
                   help="the split those evaluations score: test, or valid to choose settings without looking at the "
                        "test set (`draw eval --split test` scores it once at the end; default test)")
    t.add_argument("--log-every", type=_positive_int, help="steps between training-loss records (default 50)")
    t.add_argument("--checkpoint-every", type=_positive_int, help="steps between checkpoints (default 500)")
    t.add_argument("--out", type=pathlib.Path, help="run directory (default: runs/PRESET, or runs/PRESET-DATASET for other datasets)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly where it stopped; only --steps, --epochs, --eval-every, --eval-split, "
                        "--log-every, --checkpoint-every and --accumulate (and how it runs: --device, --backend, --step, "
                        "--threads, --time-limit, the number of torchrun ranks) may change")
    t.add_argument("--time-limit", type=_positive_float, metavar="MINUTES",
                   help="stop at the first step boundary after this many minutes from the command's start, with a "
                        f"checkpoint, and exit {EXIT_TIME_LIMIT}; --resume goes on (for jobs with a wall-time limit)")
    _common(t, backend_help="attention backend (default auto: the Triton kernels on CUDA, the reference elsewhere)")
    t.add_argument("--step", choices=STEP_MODES, dest="step_mode",
                   help="how the training step runs: eager, compile (torch.compile; eager if it fails), cuda-graph (the "
                        "whole step as one CUDA graph; under torchrun with its gradient all-reduce inside the graph); auto: "
                        "cuda-graph on CUDA (eager under torchrun), "
                        "eager on CPU. Default: the preset's (mnist-quick: compile), or for --resume the mode that ran the run")
    t.add_argument("--compile", action="store_const", const="compile", dest="step_mode", help="same as --step compile")
    t.add_argument("--compile-mode", choices=COMPILE_MODES, default="default", help="torch.compile mode with --step compile")
    t.add_argument("--data-dir", type=pathlib.Path, help="dataset cache (default $DRAW_DATA_DIR or ~/.cache/draw)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar: one log line per logging interval instead")
    t.add_argument("--tensorboard", type=pathlib.Path, metavar="DIR", help="also log to TensorBoard in DIR (needs the tensorboard package)")
    t.add_argument("--dist-timeout", type=_positive_float, default=600.0, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others in a collective before the run fails (default 600)")

    e = sub.add_parser("eval", help="test-set bound of a checkpoint, in nats per image (a classifier: its test error)")
    e.add_argument("checkpoint", type=pathlib.Path, help="checkpoint file, or a run directory")
    e.add_argument("--dataset", choices=DATASETS, help="default: the dataset the checkpoint was trained on")
    e.add_argument("--importance-samples", type=_positive_int, default=1, help="K > 1: the importance-weighted bound with K samples")
    e.add_argument("--split", choices=EVAL_SPLITS, default="test", help="which held-out split (default test)")
    e.add_argument("--batch-size", type=_positive_int, default=500,
                   help="samples per forward pass (default 500; the result does not depend on it)")
    e.add_argument("--seed", type=_seed, help="seed of the sampling noise (default: the run's, as its own evaluations used)")
    e.add_argument("--data-dir", type=pathlib.Path, help="dataset cache (default $DRAW_DATA_DIR or ~/.cache/draw)")
    _weights(e)
    _common(e, backend_help="attention backend (default auto)")

    s = sub.add_parser("sample", help="draw samples from a checkpoint: a grid PNG and the sequence GIF and strip "
                       "(a classifier: its glimpses over --n test images)")
    s.add_argument("checkpoint", type=pathlib.Path, help="checkpoint file, or a run directory")
    s.add_argument("--n", type=_positive_int, default=64, help="number of samples in samples.png (default 64; the animations show 16)")
    s.add_argument("--out", type=pathlib.Path, help="output directory (default: samples/ beside the checkpoint)")
    s.add_argument("--seed", type=_seed, help="random seed (default: the run's, as its own figures used)")
    s.add_argument("--dataset", choices=DATASETS, help="for --neighbours and classifiers (default: the dataset the checkpoint "
                   "was trained on)")
    s.add_argument("--neighbours", action="store_true",
                   help="also write samples_neighbours.png: samples beside their nearest training image (loads the training set)")
    s.add_argument("--data-dir", type=pathlib.Path, help="dataset cache, for --neighbours and classifiers (default $DRAW_DATA_DIR or ~/.cache/draw)")
    _weights(s)
    _common(s, backend_help="attention backend (default auto)")

    sub.add_parser("verify", add_help=False, help="check the fused Triton kernels against the reference on this machine "
                       "(`draw verify --help` lists its flags)")
    sub.add_parser("presets", help="list the presets, one per line, with their data and training defaults")
    return parser


def _set_threads(threads: int | None) -> None:
    """Choose torch's CPU threads before torch is imported (and tell torch, if it already is)."""
    if threads is None and "OMP_NUM_THREADS" in os.environ:
        return  # the user's choice
    count = threads or DEFAULT_CPU_THREADS
    os.environ["OMP_NUM_THREADS"] = str(count)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(count)


TRAIN_FLAGS = {  # TrainConfig field: argparse dest, for the flags that set one
    "dataset": "dataset", "batch_size": "batch_size", "lr": "lr", "lr_schedule": "lr_schedule",
    "warmup_steps": "warmup_steps", "amp": "amp", "tf32": "tf32", "seed": "seed", "fixed_binarization": "fixed_binarization",
    "fresh_clutter": "fresh_clutter",
    "steps": "steps", "epochs": "epochs", "eval_every": "eval_every", "eval_split": "eval_split", "log_every": "log_every",
    "checkpoint_every": "checkpoint_every", "accumulate": "accumulate", "attention_grad_clip": "attention_grad_clip",
    "grad_clip": "grad_clip", "ema": "ema",
}


def cmd_train(args) -> int:
    deadline = args.started + 60 * args.time_limit if args.time_limit else None
    from draw.distributed import process_group_from_environment
    from draw.train import scaled_lr, train

    given = {field: getattr(args, dest) for field, dest in TRAIN_FLAGS.items() if getattr(args, dest) is not None}
    for clip in ("grad_clip", "attention_grad_clip"):
        if given.get(clip) == 0:
            given[clip] = None  # 0: no clip
    preset_name = args.preset or DEFAULT_PRESET
    preset = get_preset(preset_name)
    dataset = given.get("dataset", preset.train.dataset)
    out = args.out or pathlib.Path("runs") / (preset_name if dataset == preset.train.dataset else f"{preset_name}-{dataset}")
    args.run_dir = out  # for the hint after an out-of-memory error
    runtime = dict(backend=args.backend, step_mode=args.step_mode or (None if args.resume else preset.step_mode),
                   compile_mode=args.compile_mode, data_dir=args.data_dir, progress=False if args.no_progress else None,
                   tensorboard=args.tensorboard, deadline=deadline)
    if args.resume and "epochs" in given and "steps" not in given:
        given["steps"] = None  # a run started with --steps continues for --epochs passes: steps would win
    if not args.resume:
        if "batch_size" in given and "lr" not in given:
            given["lr"] = scaled_lr(preset.train.lr, preset.train.batch_size, given["batch_size"])
        if "steps" in given:
            given["epochs"] = preset.train.epochs  # --steps and --epochs exclude each other; steps wins
        config = TrainConfig.from_dict({**preset.train.to_dict(), **given})
    # under torchrun: one rank of a data-parallel run (draw/distributed.py); else a plain process
    with process_group_from_environment(pick_device(args.device), args.dist_timeout) as (world, device):
        if args.resume:
            model_config = preset.model if args.preset else None
            train(out, resume=True, model_config=model_config, overrides=given, device=device, world=world, **runtime)
            return 0
        train(out, model_config=preset.model, train_config=config, device=device, world=world, **runtime,
              announce=f"training {preset_name} on {dataset} into {out} (batch {config.batch_size}, lr {config.lr:.3g})")
    return 0


def _load_model(args):
    from draw.checkpoint import load_checkpoint, model_from_checkpoint, uses_average
    from draw.kernels import check_backend

    device = pick_device(args.device)
    payload = load_checkpoint(args.checkpoint, map_location=device)
    check_backend(args.backend, device)
    model = model_from_checkpoint(payload, weights=args.weights).to(device).eval()
    model.backend = args.backend
    payload["weights"] = "average" if uses_average(payload, args.weights) else "trained"
    log.info(f"{payload['path']}: the {'moving average of the weights' if payload['weights'] == 'average' else 'trained weights'}")
    return payload, model, device


def _run_setting(args, payload: dict, model, name: str):
    """--dataset or --seed as given, else the checkpoint's run's own (a bare checkpoint: MNIST, or cluttered
    MNIST for a classifier; seed 0)."""
    given = getattr(args, name)
    if given is not None:
        return given
    saved = payload.get("train_config") or {}
    if name == "dataset":
        return saved.get("dataset", "mnist" if hasattr(model, "generate") else "mnist-cluttered")
    return saved.get("seed", 0)


def cmd_eval(args) -> int:
    from draw.data import load_dataset
    from draw.evaluate import evaluate_bound, evaluate_classifier

    payload, model, device = _load_model(args)
    if not hasattr(model, "generate") and args.importance_samples > 1:
        raise ValueError(f"{payload['path']} holds a glimpse classifier: it has a test error, no importance-weighted bound "
                         "(--importance-samples)")
    dataset = _run_setting(args, payload, model, "dataset")
    cfg = model.config
    data = load_dataset(dataset, args.data_dir, shape=(cfg.channels, cfg.height, cfg.width))
    log.info(f"data: {data.source}")
    images = data.test if args.split == "test" else data.valid
    if not hasattr(model, "generate"):  # the glimpse classifier: test error
        result = evaluate_classifier(model, images, data.split_labels(args.split), batch_size=args.batch_size, device=device,
                                     progress=sys.stderr.isatty())
        print(f"{dataset} {args.split}: error {100 * result['error']:.2f} % ({result['images']} images, "
              f"cross-entropy {result['loss']:.4f} nats, step {payload.get('step', '?')})")
        print(json.dumps({"checkpoint": payload["path"], "weights": payload["weights"], "dataset": dataset,
                          "data_source": data.source, "split": args.split, "step": payload.get("step"), "error_percent": 100 * result["error"], **result}, allow_nan=False))
        return 0
    result = evaluate_bound(model, images, batch_size=args.batch_size, importance_samples=args.importance_samples,
                            seed=_run_setting(args, payload, model, "seed"), device=device, progress=sys.stderr.isatty())
    if not math.isfinite(result["nats"]):
        raise ValueError(f"the bound of {payload['path']} is not finite ({result['nats']})")
    kind = "variational bound" if args.importance_samples == 1 else f"importance-weighted bound (K={args.importance_samples})"
    # bits/dim compares across papers for binary pixels; grey levels as Bernoulli targets (colour data) give a
    # cross-entropy per pixel value, not the bits/dim of a discrete 8-bit likelihood
    per_dim = "bits/dim" if data.binarize else "bits per pixel value (Bernoulli cross-entropy of grey levels, not 8-bit bits/dim)"
    print(f"{dataset} {args.split}: -log p(x) <= {result['nats']:.2f} +- {result['stderr']:.2f} nats, "
          f"{result['bits_per_dim']:.4f} {per_dim} ({kind}, "
          f"{result['images']} images, step {payload.get('step', '?')})")
    print(json.dumps({"checkpoint": payload["path"], "weights": payload["weights"], "dataset": dataset,
                      "data_source": data.source, "split": args.split, "step": payload.get("step"),
                      "binary_pixels": data.binarize, **result}, allow_nan=False))
    return 0


def cmd_sample(args) -> int:
    from draw.atomic import remove_stale_temporaries
    from draw.figures import write_model_figures

    payload, model, device = _load_model(args)
    out = args.out or pathlib.Path(payload["path"]).parent / "samples"
    if out.is_dir():
        for temp in remove_stale_temporaries(out):
            log.warning(f"removed {temp}, left by an interrupted write")
    if not hasattr(model, "generate"):  # the glimpse classifier: where it looks, on test images
        from draw.data import load_dataset
        from draw.figures import save_glimpse_figure

        if args.neighbours:
            raise ValueError(f"{payload['path']} holds a glimpse classifier: it draws no samples to set beside training "
                             "images (--neighbours)")
        cfg = model.config
        data = load_dataset(_run_setting(args, payload, model, "dataset"), args.data_dir,
                            shape=(cfg.channels, cfg.height, cfg.width))
        count = min(args.n, len(data.test))
        print(f"wrote {save_glimpse_figure(model, data.images('test', slice(0, count)), data.split_labels('test')[:count], out / 'glimpses.png')}")
        return 0
    training_images = None
    if args.neighbours:
        from draw.data import load_dataset

        cfg = model.config
        dataset = _run_setting(args, payload, model, "dataset")
        training_images = load_dataset(dataset, args.data_dir, shape=(cfg.channels, cfg.height, cfg.width)).train
    written = write_model_figures(model, out, n_samples=args.n, seed=_run_setting(args, payload, model, "seed"),
                                  training_images=training_images)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_presets(args) -> int:
    for name in PRESETS:
        print(_preset_line(name))
    return 0


def _error_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    text = " ".join(str(e).split())  # one line, whatever the exception held
    return text or type(e).__name__


def main(argv=None) -> int:
    started = time.monotonic()  # the command's start, for --time-limit (before torch is imported)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["verify"]:  # its own parser (draw/verify.py); it imports torch, and on CPU chooses
        from draw import verify  # Triton's interpreter before triton is imported

        return verify.main(argv[1:])
    args = build_parser().parse_args(argv)
    args.started = started
    if args.command in ("train", "eval", "sample"):
        _set_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("draw").setLevel(logging.INFO)

    commands = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "presets": cmd_presets}
    code = _run(commands[args.command], args)
    if _is_torchrun_rank(args):
        from draw.distributed import leave_rank

        leave_rank(code)  # does not return
    return code


def _is_torchrun_rank(args) -> bool:
    """`draw train` as one rank of several that torchrun started."""
    return args.command == "train" and "RANK" in os.environ and os.environ.get("WORLD_SIZE", "1") != "1"


def _out_of_memory_line(e: BaseException) -> str:
    """The allocator's first sentences (what it tried to allocate, what was free), without its memory report."""
    text = _error_line(e)
    return re.split(r"\s+(?=Including non-PyTorch|Of the allocated|If reserved)", text, maxsplit=1)[0].rstrip(". ")


def _memory_hint(args) -> str:
    """What to change so that the command fits in the device's memory."""
    if args.command == "eval":
        return "a smaller --batch-size fits (the result does not depend on it)"
    if args.command == "sample":
        return "a smaller --n fits"
    run_dir = getattr(args, "run_dir", None)
    if run_dir is not None and (run_dir / CHECKPOINT).exists():
        return (f"its last checkpoint is kept: `draw train --resume --out {run_dir} --accumulate K` goes on with each "
                "step's batch in K micro-batches (the same update)")
    return "--accumulate K takes each step's batch in K micro-batches (the same update); --amp bf16 needs less memory"


def _run(command, args) -> int:
    """The command's exit code: 0, or a known failure turned into one line and its code."""
    import torch
    from torch.distributed import DistError  # a rendezvous that failed, a rank that never came

    from draw.checkpoint import CheckpointError
    from draw.data import DataUnavailableError
    from draw.distributed import AnotherRankFailed
    from draw.rundir import MetricsError, RunDirectoryBusy
    from draw.train import TIME_LIMIT, TrainingDiverged, TrainingStopped

    error = f"draw {args.command}: error: " + (f"rank {os.environ['RANK']}: " if _is_torchrun_rank(args) else "")
    try:
        return command(args)
    except (CheckpointError, DataUnavailableError, MetricsError, RunDirectoryBusy, TrainingDiverged, AnotherRankFailed,
            DistError, FileExistsError, ValueError, OSError) as e:
        print(error + _error_line(e), file=sys.stderr)  # which torchrun rank says it, under torchrun
        return 2
    except torch.OutOfMemoryError as e:
        print(f"{error}{_out_of_memory_line(e)}; {_memory_hint(args)}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        return EXIT_TIME_LIMIT if e.signum == TIME_LIMIT else 128 + e.signum
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
