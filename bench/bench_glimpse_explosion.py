"""The cluttered-8 gradient explosion, reproduced, then replayed under each attention-gradient clip.

At lr 1e-3 (seed 0, the 80-epoch cosine schedule) `cluttered-8`'s gradient explodes through its glimpse
loop at step 2,457 on our CPU, and the run never recovers (README, Results). This script trains that run
to --start (2,400, about 5 minutes on one CPU thread), then replays the next --steps steps from the same
state, the same batches and the same learning rates under each --clips value (0: the exact gradient;
c: draw train --attention-grad-clip c), recording every step's gradient norm and training error:

    python bench/bench_glimpse_explosion.py --out bench/results/glimpse-explosion-cpu

The episode depends on float rounding: it reproduces bitwise with one thread on one machine; with
other threads or another CPU it may come at another step or not at all (then pick --start from the
first run's records). Writes OUT.json (per-step records), OUT.md and OUT.png (gradient norm and
training error per step, one line per clip), and prints a table last.
"""

import argparse
import shutil
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import common
import torch

from draw.config import get_preset
from draw.train import lr_at, save_run_checkpoint, start_run

COLUMNS = [("clip", "clip"), ("max_grad_norm", "max grad norm"), ("median_grad_norm", "median grad norm"),
           ("error_last_100", "training error, last 100 steps"), ("error_end_of_start", "at --start")]


def build(run_dir: Path, *, resume: bool, config=None):
    preset = get_preset("cluttered-8")
    return start_run(run_dir, model_config=preset.model, train_config=config, resume=resume, overrides={},
                     device=torch.device("cpu"), backend="reference", step_mode="eager", compile_mode="default",
                     data_dir=None, progress=False, tensorboard=None)


def train_steps(run, first: int, count: int) -> list[dict]:
    """Steps first+1 .. first+count of `run`: each one's statistics."""
    names = ("loss", "error", "grad_norm", "clipped")
    records = []
    for step in range(first, first + count):
        stats = run.step(run.sampler.batch(step), lr_at(run.config, step, run.total_steps))
        records.append({"step": step + 1, **dict(zip(names, stats.tolist()))})
        if (step + 1) % 100 == 0:
            common.log(f"step {step + 1}: error {statistics.mean(r['error'] for r in records[-100:]):.3f}, "
                       f"max grad norm {max(r['grad_norm'] for r in records[-100:]):.1f}")
    return records


def plot(curves: dict, path: str) -> None:
    """Per replay: the gradient norm before clipping (log scale) and the training error, 25-step means."""
    fig, (norm_ax, error_ax) = common.panels(2, 3.6)
    window = 25
    for clip, records in curves.items():
        steps = [r["step"] for r in records]
        norm_ax.plot(steps, [r["grad_norm"] for r in records], lw=0.8, label=f"clip {clip}")
        means = [statistics.mean(r["error"] for r in records[i : i + window]) for i in range(0, len(records) - window + 1)]
        error_ax.plot(steps[window - 1 :], [100 * m for m in means], lw=1.2, label=f"clip {clip}")
    norm_ax.set(yscale="log", xlabel="step", ylabel="gradient norm before clipping")
    error_ax.set(xlabel="step", ylabel="training error, %, 25-step mean", ylim=(0, 100))
    common.save_panels(fig, [norm_ax, error_ax], path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=float, default=80.0, help="the schedule's length (the learning rate follows it)")
    parser.add_argument("--start", type=int, default=2400, help="steps trained with the exact gradient before the replays")
    parser.add_argument("--steps", type=int, default=400, help="steps of each replay")
    parser.add_argument("--clips", default="0,1,3,10,30", help="attention gradient clips to replay (0: none)")
    parser.add_argument("--out", default="bench/results/glimpse-explosion-cpu", help="OUT.json and OUT.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clips = [float(c) for c in common.split_list(args.clips)]
    config = replace(get_preset("cluttered-8").train, lr=args.lr, epochs=args.epochs, seed=0, checkpoint_every=10**9,
                     attention_grad_clip=None)  # the exact gradient up to --start
    rows, curves = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        start = Path(tmp) / "start"
        run = build(start, resume=False, config=config)
        common.log(f"training cluttered-8 at lr {args.lr} to step {args.start} of {run.total_steps}")
        error_at_start = statistics.mean(r["error"] for r in train_steps(run, 0, args.start)[-100:])
        save_run_checkpoint(run, args.start)
        for clip in clips:
            replay = Path(tmp) / f"clip{clip}"
            shutil.copytree(start, replay)
            run = build(replay, resume=True)
            run.model.attention_grad_clip = clip or None  # what --attention-grad-clip sets
            common.log(f"replaying steps {args.start + 1}-{args.start + args.steps} with clip {clip or 'none'}")
            records = train_steps(run, args.start, args.steps)
            norms = [r["grad_norm"] for r in records]
            rows.append({"clip": clip or "none", "max_grad_norm": max(norms), "median_grad_norm": statistics.median(norms),
                         "error_last_100": statistics.mean(r["error"] for r in records[-100:]),
                         "error_end_of_start": error_at_start})
            curves[str(clip or "none")] = records
    meta = common.metadata(torch.device("cpu"), threads=1, lr=args.lr, epochs=args.epochs, start=args.start, steps=args.steps)
    common.write_json(args.out + ".json", meta, rows, curves=curves)
    common.write_markdown(args.out + ".md", "cluttered-8: the glimpse-loop explosion under each attention-gradient clip",
                          meta, [("replays", common.markdown_table(rows, COLUMNS))])
    plot(curves, args.out + ".png")
    print(common.text_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
