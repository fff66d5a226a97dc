"""The `draw` command: train, eval and sample. Thin argparse over draw.train, draw.evaluate and draw.figures."""

import argparse
import dataclasses
import json
import pathlib
import sys

from draw.config import DEFAULT_PRESET, PRESETS, get_preset
from draw.data import DATASETS
from draw.train import LR_SCHEDULES
from draw.kernels import BACKENDS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draw", description="DRAW (Gregor et al. 2015): train, evaluate and sample.")
    sub = parser.add_subparsers(dest="command", required=True)

    presets = "; ".join(f"{name}: {p.description}" for name, p in PRESETS.items())
    t = sub.add_parser("train", help="train a model into a run directory", description="Train DRAW. Presets: " + presets)
    t.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help=f"model and training defaults (default {DEFAULT_PRESET})")
    t.add_argument("--dataset", choices=DATASETS, help="training data (default: the preset's, mnist)")
    length = t.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, help="optimizer steps to train for")
    length.add_argument("--epochs", type=_positive_float, help="passes over the training set (default: the preset's)")
    t.add_argument("--batch-size", type=_positive_int, help="images per step (default: the preset's)")
    t.add_argument("--lr", type=_positive_float, help="Adam learning rate (default: the preset's, scaled by sqrt(batch / preset batch) when --batch-size differs)")
    t.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="constant, or cosine decay to lr/10 (default: the preset's)")
    t.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    t.add_argument("--out", type=pathlib.Path, help="run directory (default: runs/PRESET, or runs/PRESET-DATASET for other datasets)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    t.add_argument("--backend", choices=BACKENDS, help="attention backend (default: the preset's, auto)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--amp", choices=("none", "bf16"), default="none", help="bf16 autocast (CUDA)")
    t.add_argument("--eval-every", type=_positive_int, help="steps between test-bound evaluations (default: the preset's)")
    t.add_argument("--checkpoint-every", type=_positive_int, default=500, help="steps between checkpoints (default 500)")
    t.add_argument("--fixed-binarization", action="store_true", help="binarize the training set once instead of every batch")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--data-dir", type=pathlib.Path, help="dataset cache (default $DRAW_DATA_DIR or ~/.cache/draw)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="test-set bound of a checkpoint, in nats per image")
    e.add_argument("checkpoint", type=pathlib.Path, help="checkpoint file, or a run directory")
    e.add_argument("--dataset", choices=DATASETS, help="default: the dataset the checkpoint was trained on")
    e.add_argument("--importance-samples", type=_positive_int, default=1, help="K > 1: the importance-weighted bound with K samples")
    e.add_argument("--split", choices=("test", "valid"), default="test", help="which held-out split (default test)")
    e.add_argument("--batch-size", type=_positive_int, default=500, help="forward passes of this many samples (default 500)")
    e.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    e.add_argument("--backend", choices=BACKENDS, help="attention backend (default: the checkpoint's)")
    e.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default 0)")
    e.add_argument("--data-dir", type=pathlib.Path, help="dataset cache (default $DRAW_DATA_DIR or ~/.cache/draw)")

    s = sub.add_parser("sample", help="draw samples from a checkpoint: a grid PNG and the sequence GIF")
    s.add_argument("checkpoint", type=pathlib.Path, help="checkpoint file, or a run directory")
    s.add_argument("--n", type=_positive_int, default=64, help="number of samples (default 64)")
    s.add_argument("--out", type=pathlib.Path, help="output directory (default: samples/ beside the checkpoint)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    s.add_argument("--backend", choices=BACKENDS, help="attention backend (default: the checkpoint's)")
    return parser


def _device(name):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def cmd_train(args) -> int:
    from draw.train import RunSettings, scaled_lr, train

    preset = get_preset(args.preset)
    dataset = args.dataset or preset.train.dataset
    out = args.out or pathlib.Path("runs") / (args.preset if dataset == "mnist" else f"{args.preset}-{dataset}")
    if args.resume:
        train(out, resume=True, device=_device(args.device), data_dir=args.data_dir,
              total_steps=args.steps, progress=not args.no_progress)
        return 0
    model_config = preset.model
    if args.backend:
        model_config = dataclasses.replace(model_config, backend=args.backend)
    batch = args.batch_size or preset.train.batch_size
    lr = args.lr or scaled_lr(preset.train.lr, preset.train.batch_size, batch)
    settings = RunSettings(
        dataset=dataset,
        batch_size=batch,
        lr=lr,
        total_steps=args.steps,
        epochs=args.epochs or preset.train.epochs,
        grad_clip=preset.train.grad_clip,
        lr_schedule=args.lr_schedule or preset.train.lr_schedule,
        eval_every=args.eval_every or preset.train.eval_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        fixed_binarization=args.fixed_binarization,
        compile=args.compile,
        amp=args.amp,
    )
    print(f"training {args.preset} on {dataset} into {out} (batch {batch}, lr {lr:.3g})")
    train(out, model_config=model_config, settings=settings, device=_device(args.device), data_dir=args.data_dir,
          progress=not args.no_progress)
    return 0


def _load_model(args):
    from draw.checkpoint import load_checkpoint, model_from_checkpoint

    device = _device(args.device)
    payload = load_checkpoint(args.checkpoint, map_location=device)
    overrides = {"backend": args.backend} if args.backend else {}
    model = model_from_checkpoint(payload, **overrides).to(device).eval()
    return payload, model, device


def cmd_eval(args) -> int:
    from draw.data import load_dataset
    from draw.evaluate import evaluate_bound

    payload, model, device = _load_model(args)
    dataset = args.dataset or payload.get("settings", {}).get("dataset", "mnist")
    cfg = model.config
    data = load_dataset(dataset, args.data_dir, shape=(cfg.channels, cfg.height, cfg.width))
    print(f"data: {data.source}", file=sys.stderr)
    images = data.test if args.split == "test" else data.valid
    result = evaluate_bound(model, images, batch_size=args.batch_size, importance_samples=args.importance_samples,
                            seed=args.seed, device=device, progress=True)
    kind = "variational bound" if args.importance_samples == 1 else f"importance-weighted bound (K={args.importance_samples})"
    print(f"{dataset} {args.split}: -log p(x) <= {result['nats']:.2f} +- {result['stderr']:.2f} nats ({kind}, "
          f"{result['images']} images, step {payload.get('step', '?')})")
    print(json.dumps({"checkpoint": payload["path"], "dataset": dataset, "split": args.split, "step": payload.get("step"), **result}))
    return 0


def cmd_sample(args) -> int:
    import torch

    from draw import figures

    payload, model, device = _load_model(args)
    out = args.out or pathlib.Path(payload["path"]).parent / "samples"
    generator = torch.Generator(device=device).manual_seed(args.seed)
    gen = model.generate(args.n, generator=generator)
    write_params = None if gen.write_params is None else gen.write_params.cpu()
    grid = figures.save_grid(torch.sigmoid(gen.canvases[-1]).cpu(), out / "samples.png")
    gif = figures.save_sequence_gif(gen.canvases.cpu(), out / "generation.gif", write_params, model.config.write_n)
    print(f"wrote {grid} and {gif}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from draw.checkpoint import CheckpointError
    from draw.data import DataUnavailableError

    try:
        return {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample}[args.command](args)
    except (CheckpointError, DataUnavailableError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"draw {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
