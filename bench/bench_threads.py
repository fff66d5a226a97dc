"""Which CPU threading holds up on a busy machine? Training speed quiet and beside one busy process.

For each threading setting, a fresh process (OpenMP reads its variables once, at start-up) times
`draw train`'s step (draw.step.TrainStep, mnist-quick at batch 64 on random binary images), first on a
quiet machine, then while another process of equal priority keeps one core busy. The ratio
busy / quiet says how well a setting holds up; `draw train`'s default (draw/cli.py DEFAULT_CPU_THREADS)
was chosen from this table. Run it on an otherwise idle machine.

    python bench/bench_threads.py --json bench/results/threads-cpu.json --markdown bench/results/threads-cpu.md
"""

import argparse
import json
import os
import subprocess
import sys
import time

import common

SETTINGS = {  # name: environment of the timed process
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "2 threads": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"},
    "2 threads, passive wait": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
}

WORKER = """
import json, sys, time, torch
from draw import DRAW, PRESETS
from draw.step import TrainStep
preset = PRESETS["mnist-quick"]
torch.manual_seed(0)
model = DRAW(preset.model)
step = TrainStep(model, lr=preset.train.lr, grad_clip=preset.train.grad_clip)
x = torch.randint(0, 2, (64, 1, 28, 28)).float()
for _ in range({warmup}):
    step(x, preset.train.lr)
start = time.perf_counter()
for _ in range({steps}):
    step(x, preset.train.lr)
print(json.dumps({{"images_per_s": 64 * {steps} / (time.perf_counter() - start), "threads": torch.get_num_threads()}}))
"""


def time_setting(env: dict, warmup: int, steps: int) -> dict:
    code = WORKER.format(warmup=warmup, steps=steps)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, **env})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="timed steps per measurement (default 60)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--json", default=None, metavar="PATH", help="write results and metadata as JSON to PATH")
    p.add_argument("--markdown", default=None, metavar="PATH", help="write a markdown table to PATH")
    args = p.parse_args(argv)

    import torch

    rows = []
    for name, env in SETTINGS.items():
        quiet = time_setting(env, args.warmup, args.steps)
        busy_process = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # one busy core, equal priority
        try:
            time.sleep(0.5)
            busy = time_setting(env, args.warmup, args.steps)
        finally:
            busy_process.kill()
            busy_process.wait()
        rows.append({"setting": name, "threads": quiet["threads"], "quiet_images_per_s": quiet["images_per_s"],
                     "busy_images_per_s": busy["images_per_s"], "busy_over_quiet": busy["images_per_s"] / quiet["images_per_s"]})
        common.log(f"{name}: quiet {quiet['images_per_s']:.0f}, busy {busy['images_per_s']:.0f} images/s")
    columns = [("setting", "setting"), ("quiet_images_per_s", "quiet images/s"), ("busy_images_per_s", "busy images/s"),
               ("busy_over_quiet", "busy / quiet")]
    meta = common.metadata(torch.device("cpu"), preset="mnist-quick", batch=64, timed_steps=args.steps,
                           busy="one `while True: pass` process")
    print(common.text_table(rows, columns))
    if args.json:
        common.write_json(args.json, meta, rows)
    if args.markdown:
        common.write_markdown(args.markdown, "CPU threading quiet and busy", meta, [("Training step", common.markdown_table(rows, columns))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
