"""How the default recipe (mnist-quick) was chosen: short runs of its variants, test bound by epoch.

Each variant is the mnist-quick model and run with some fields changed (grid sizes, batch, learning
rate), trained for --epochs (default 5) with the compiled step, one thread each, in its own process
and torch compile cache (so each pays a cold compile, as the quick start does). --parallel 2 (the
default) runs two at once, one per core of a 2-core machine: one-thread runs hold ~94 % of their
speed beside another (bench/results/threads-cpu.md), so the images/s are a little low but comparable.
A variant whose directory already holds a finished run of the same configs is read, not re-run.

    python bench/bench_recipe.py --out runs/recipe --json bench/results/recipe-cpu.json --markdown bench/results/recipe-cpu.md
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import common

# name: (DRAWConfig changes, TrainConfig changes) to mnist-quick; the cosine schedule and T 16, LSTM 128
# and z 32 are common to all.
VARIANTS = {
    "former default: read 5, write 5, batch 64, lr 3e-3": ({"read_n": 5, "write_n": 5}, {"batch_size": 64, "lr": 3e-3}),
    "read 5, write 5, batch 64, lr 6e-3": ({"read_n": 5, "write_n": 5}, {"batch_size": 64, "lr": 6e-3}),
    "read 5, write 5, batch 128, lr 8e-3": ({"read_n": 5, "write_n": 5}, {"batch_size": 128, "lr": 8e-3}),
    "read 5, write 5, batch 256, lr 1e-2, warm-up 100": ({"read_n": 5, "write_n": 5},
                                                        {"batch_size": 256, "lr": 1e-2, "warmup_steps": 100}),
    "read 5, write 5, batch 128, lr 1.2e-2": ({"read_n": 5, "write_n": 5}, {"batch_size": 128, "lr": 1.2e-2}),
    "read 5, write 10, batch 128, lr 8e-3": ({"read_n": 5, "write_n": 10}, {"batch_size": 128, "lr": 8e-3}),
    "read 5, write 10, batch 128, lr 1.2e-2": ({"read_n": 5, "write_n": 10}, {"batch_size": 128, "lr": 1.2e-2}),
    "default: read 8, write 10, batch 128, lr 1.2e-2": ({"read_n": 8, "write_n": 10}, {"batch_size": 128, "lr": 1.2e-2}),
}
IMAGES_PER_EVAL = 32_000  # the test bound is taken every this many training images
WALL_FILE = "bench_wall.json"  # the run's wall time, compile and evaluations included, written by this script


def configs(name: str, epochs: float):
    from draw.config import PRESETS

    model_changes, train_changes = VARIANTS[name]
    preset = PRESETS["mnist-quick"]
    train = replace(preset.train, epochs=epochs, **train_changes)
    return replace(preset.model, **model_changes), replace(train, eval_every=max(1, IMAGES_PER_EVAL // train.batch_size))


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name.split(": ")[-1])


def finished(run_dir: pathlib.Path, name: str, epochs: float) -> bool:
    summary = run_dir / "summary.json"
    if not summary.exists():
        return False
    from draw.config import DRAWConfig, TrainConfig

    model, train = configs(name, epochs)
    done = json.loads(summary.read_text())
    return DRAWConfig.from_dict(done["model_config"]) == model and TrainConfig.from_dict(done["train_config"]) == train


def train_one(name: str, epochs: float, run_dir: pathlib.Path) -> None:
    """Runs in the worker process (one thread, its own compile cache)."""
    import torch

    from draw.train import train

    torch.set_num_threads(1)
    model, config = configs(name, epochs)
    train(run_dir, model_config=model, train_config=config, device="cpu", step_mode="compile", progress=False,
          make_figures=False)


def result(name: str, run_dir: pathlib.Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    wall = run_dir / WALL_FILE
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if r.get("images_per_s")][1:]  # the first interval holds the compile
    per_epoch = summary["steps"] / summary["epochs"]
    return {
        "variant": name,
        "test_bound": summary["test_bound_nats"],
        "stderr": summary["test_bound_stderr"],
        "curve": [{"epoch": round(r["step"] / per_epoch, 3), "test_bound": r["test_bound"]} for r in records if "test_bound" in r],
        "images_per_s": statistics.median(rates) if rates else None,
        "wall_s": json.loads(wall.read_text())["wall_s"] if wall.exists() else None,
        "model_config": summary["model_config"],
        "train_config": summary["train_config"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/recipe"), help="one run directory per variant here")
    p.add_argument("--epochs", type=float, default=5.0, help="epochs of each run (default 5)")
    p.add_argument("--variants", default=None, help="comma-separated indices into the variant list (default: all)")
    p.add_argument("--parallel", type=int, default=2, help="runs at once, one thread each (default 2)")
    p.add_argument("--json", default=None, metavar="PATH", help="write results and metadata as JSON to PATH")
    p.add_argument("--markdown", default=None, metavar="PATH", help="write a markdown table to PATH")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the worker: train this variant into --out
    args = p.parse_args(argv)
    if args.one is not None:
        train_one(args.one, args.epochs, args.out)
        return 0

    names = list(VARIANTS)
    if args.variants:
        names = [names[int(i)] for i in args.variants.split(",")]
    queue = [n for n in names if not finished(args.out / slug(n), n, args.epochs)]
    reused = [n for n in names if n not in queue]
    running = {}
    while queue or running:
        while queue and len(running) < args.parallel:
            name = queue.pop(0)
            run_dir = args.out / slug(name)
            env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(run_dir.with_suffix(".inductor"))}
            cmd = [sys.executable, __file__, "--one", name, "--epochs", str(args.epochs), "--out", str(run_dir)]
            common.log(f"training {name} into {run_dir}")
            running[name] = (subprocess.Popen(cmd, env=env), time.perf_counter())
        time.sleep(1)
        for name, (proc, start) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                if proc.returncode != 0:
                    raise SystemExit(f"{name}: the run failed (exit {proc.returncode})")
                wall = {"wall_s": time.perf_counter() - start}
                (args.out / slug(name) / WALL_FILE).write_text(json.dumps(wall))
    rows = [result(n, args.out / slug(n)) for n in names]

    import torch

    torch.set_num_threads(1)  # as each run had (the metadata's device line says the threads)
    columns = [("variant", "variant"), ("test_bound", "test bound (nats)"), ("stderr", "+-"),
               ("images_per_s", "images/s"), ("wall_s", "wall s")]
    shown = [{**r, "test_bound": f"{r['test_bound']:.2f}", "stderr": f"{r['stderr']:.2f}"} for r in rows]
    print(common.text_table(shown, columns))
    meta = common.metadata(torch.device("cpu"), epochs=args.epochs, parallel=args.parallel, threads_per_run=1,
                           step="compile", images_per_eval=IMAGES_PER_EVAL,
                           read_from_earlier_runs=reused)
    if args.json:
        common.write_json(args.json, meta, rows)
    if args.markdown:
        common.write_markdown(args.markdown, f"mnist-quick variants, {args.epochs:g} epochs each", meta,
                              [("Test bound after the run", common.markdown_table(shown, columns))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
