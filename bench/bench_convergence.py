"""Does the fast large-batch path still converge like the default? Train both, plot their loss curves.

Two runs of one preset on the same data: the baseline (the preset's batch size and learning rate, fp32,
run as `draw train` runs it on this device unless --baseline-backend / --baseline-step say otherwise: on
a CPU reference attention and the eager step, on CUDA the fused kernels and one CUDA graph per step) and
the fast one (a large batch with the square-root learning-rate rule of `draw train`, plus any of
--backend, --step, --amp bf16, --warmup-steps). Both train for the same number of epochs and are
plotted against epochs (images seen) and against wall-clock seconds. Their evaluations score the
validation split (--eval-split, default valid): a recipe chosen by this comparison is not chosen on the test set.

    python bench/bench_convergence.py                                   # CPU: mnist-quick, its batch vs 512, 1 epoch
    python bench/bench_convergence.py --preset mnist-paper --fast-batch 1024 --epochs 20 \\
        --amp bf16 --warmup-steps 200                                   # GPU: the fast path
    torchrun --standalone --nproc_per_node=4 bench/bench_convergence.py --preset mnist-paper \\
        --fast-batch 8192 --epochs 20 --backend triton --step compile --amp bf16 --warmup-steps 500   # 4 GPUs, DDP

Under torchrun both runs train data-parallel across the ranks (docs/distributed.md), so both batches
must divide by the number of ranks (mnist-paper's 100: 2 or 4 GPUs); rank 0 writes the runs, the plots
and the JSON.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import common

from draw import figures
from draw.cli import BACKENDS, STEP_MODES
from draw.config import EVAL_SPLITS, get_preset
from draw.data import load_dataset
from draw.distributed import process_group_from_environment
from draw.rundir import read_metrics
from draw.train import scaled_lr, train


def run(out: Path, preset_name: str, batch: int, epochs: float, device, *, backend: str, step_mode: str, amp: str,
        warmup_steps: int, eval_every: int, eval_split: str, seed: int, world) -> dict:
    preset = get_preset(preset_name)
    config = dataclasses.replace(
        preset.train,
        batch_size=batch,
        lr=scaled_lr(preset.train.lr, preset.train.batch_size, batch),
        warmup_steps=warmup_steps,
        epochs=epochs,
        steps=None,
        eval_every=eval_every,
        eval_split=eval_split,
        log_every=max(1, 3200 // batch),
        checkpoint_every=10**9,
        seed=seed,
        amp=amp,
    )
    start = time.perf_counter()
    summary = train(out, model_config=preset.model, train_config=config, device=device, backend=backend,
                    step_mode=step_mode, progress=True, make_figures=False, world=world)
    summary["wall_s"] = time.perf_counter() - start
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mnist-quick", help="preset to train (default mnist-quick)")
    parser.add_argument("--fast-batch", type=int, default=512, help="batch size of the fast run (default 512)")
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs each run trains for (default 1)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="fast run's attention backend (default auto: draw train's)")
    parser.add_argument("--step", default="auto", choices=STEP_MODES, help="fast run: how the step runs (default auto: draw train's)")
    parser.add_argument("--baseline-backend", default="auto", choices=BACKENDS, help="baseline's attention backend (default auto)")
    parser.add_argument("--baseline-step", default="auto", choices=STEP_MODES, help="baseline: how the step runs (default auto)")
    parser.add_argument("--warmup-steps", type=int, default=0, help="fast run: linear learning-rate warm-up steps")
    parser.add_argument("--amp", default="none", choices=("none", "bf16"), help="fast run: bf16 autocast")
    parser.add_argument("--evals", type=int, default=4, help="held-out bound evaluations per run (default 4)")
    parser.add_argument("--eval-split", default="valid", choices=EVAL_SPLITS,
                        help="the split they score (default valid: the comparison chooses a recipe)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of both runs")
    parser.add_argument("--out", type=Path, default=Path("runs/convergence"), help="directory of both runs and the plots")
    parser.add_argument("--json", help="write both summaries and metadata as JSON to this path")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    common.set_cpu_threads(args.threads, device)
    with process_group_from_environment(device) as (world, device):  # under torchrun: one rank of each run
        return compare(args, device, world)


def compare(args, device, world) -> int:
    preset = get_preset(args.preset)
    if world.from_main(lambda: args.out.exists() and any(args.out.iterdir())):
        raise SystemExit(f"{args.out} is not empty: choose another --out")
    runs = {
        f"batch {preset.train.batch_size}, {args.baseline_backend}, {args.baseline_step}, fp32":
            (preset.train.batch_size, args.baseline_backend, args.baseline_step, "none", 0),
        f"batch {args.fast_batch}, {args.backend}, {args.step}, {'bf16' if args.amp == 'bf16' else 'fp32'}"
        f"{f', warm-up {args.warmup_steps}' if args.warmup_steps else ''}": (args.fast_batch, args.backend, args.step, args.amp, args.warmup_steps),
    }
    cfg = preset.model
    n_train = len(load_dataset(preset.train.dataset, shape=(cfg.channels, cfg.height, cfg.width)).train)
    summaries, dirs, meta = {}, {}, common.metadata(device)
    for i, (label, (batch, backend, step_mode, amp, warmup)) in enumerate(runs.items()):
        steps = max(1, int(args.epochs * n_train // batch))
        dirs[label] = args.out / f"run{i}-batch{batch}"
        if world.is_main:
            common.log(f"{label}: {args.epochs} epochs")
        summaries[label] = run(dirs[label], args.preset, batch, args.epochs, device, backend=backend, step_mode=step_mode,
                               amp=amp, warmup_steps=warmup, eval_every=max(1, steps // args.evals), eval_split=args.eval_split, seed=args.seed, world=world)
        if args.json and world.is_main and len(summaries) < len(runs):  # a run stopped in the next keeps this one's
            common.write_json(args.json, {**meta, "partial": True}, list(summaries.values()))
    if not world.is_main:
        return 0
    metrics = {label: d / "metrics.jsonl" for label, d in dirs.items()}
    by_epoch = figures.save_loss_comparison(metrics, args.out / "convergence_epochs.png", x="epoch",
                                            title=f"{args.preset}: training loss by epoch")
    with_time = {}
    for label, path in metrics.items():  # the same records with wall-clock seconds as x
        records = read_metrics(path)
        elapsed, seconds = 0.0, []
        for r in records:
            if r.get("images_per_s"):  # None: an interval none of whose steps ran in this process
                elapsed += summaries[label]["train_config"]["log_every"] * summaries[label]["train_config"]["batch_size"] / r["images_per_s"]
            seconds.append({**r, "seconds": elapsed})
        with_time[label] = seconds
    by_time = figures.save_loss_comparison(with_time, args.out / "convergence_seconds.png", x="seconds",
                                           title=f"{args.preset}: training loss by training time")
    for label, s in summaries.items():
        print(f"{label}: {args.eval_split} bound {s[f'{args.eval_split}_bound_nats']:.2f} nats after {s['epochs']:.2f} "
              f"epochs, {s['wall_s']:.0f} s")
    print(f"wrote {by_epoch} and {by_time}")
    if args.json:
        common.write_json(args.json, meta, list(summaries.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
