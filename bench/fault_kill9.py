"""Kill -9 a training run again and again, many times while it writes a checkpoint, then finish it with
--resume: is every checkpoint and metrics record whole, and is the finished run bitwise the run that was
never killed?

A reference run trains uninterrupted. The faulty run is started, killed with SIGKILL at a random moment
(half of the kills aimed at a checkpoint write: the moment a temporary `.checkpoint.pt.*.tmp` appears),
resumed, killed again, ... until it finishes. After every kill the checkpoint must load (CRC-checked)
and metrics.jsonl must read back. At the end the per-step losses and every weight must equal the
reference's exactly.

    python bench/fault_kill9.py --kills 40 --json bench/results/kill9-cpu.json --markdown bench/results/kill9-cpu.md
"""

import argparse
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

import common

from draw.checkpoint import load_checkpoint
from draw.rundir import read_metrics

def command(out: pathlib.Path, resume: bool, steps: int) -> list[str]:
    return [sys.executable, "-m", "draw", "train", "--dataset", "synthetic", "--steps", str(steps), "--batch-size", "16",
            "--checkpoint-every", "2", "--log-every", "1", "--eval-every", str(steps), "--out", str(out),
            "--no-progress", "--threads", "1", "--step", "eager"] + (["--resume"] if resume else [])


def kill_once(out: pathlib.Path, rng: random.Random, aim_at_write: bool, timeout_s: float, steps: int) -> tuple[bool, bool]:
    """Start (or resume) the run and SIGKILL it. Returns (killed, during_a_checkpoint_write)."""
    resume = (out / "checkpoint.pt").exists()
    proc = subprocess.Popen(command(out, resume, steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + (timeout_s if aim_at_write else rng.uniform(1.0, 6.0))
    writing = False
    while proc.poll() is None and time.monotonic() < deadline:
        if aim_at_write and any(out.glob(".checkpoint.pt.*.tmp")):
            writing = True
            break
        time.sleep(0.0005 if aim_at_write else 0.05)
    if proc.poll() is not None:
        return False, False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True, writing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=40, help="SIGKILLs to deliver (default 40)")
    p.add_argument("--steps", type=int, default=400, help="length of the run in steps (default 400)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--markdown", default=None, metavar="PATH")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        reference, faulty = tmp / "reference", tmp / "faulty"
        subprocess.run(command(reference, False, args.steps), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kills = during_writes = damaged = 0
        while kills < args.kills:
            killed, writing = kill_once(faulty, rng, aim_at_write=kills % 2 == 0, timeout_s=20.0, steps=args.steps)
            if not killed:
                break  # the run finished before the kill
            kills += 1
            during_writes += writing
            try:
                if (faulty / "checkpoint.pt").exists():
                    load_checkpoint(faulty)
                if (faulty / "metrics.jsonl").exists():
                    read_metrics(faulty / "metrics.jsonl")
            except Exception as e:  # a damaged file: the thing this benchmark hunts
                damaged += 1
                common.log(f"kill {kills}: {type(e).__name__}: {e}")
        finish = subprocess.run(command(faulty, (faulty / "checkpoint.pt").exists(), args.steps), capture_output=True, text=True)
        losses = {d: [(r["step"], r["loss"]) for r in read_metrics(d / "metrics.jsonl") if "loss" in r] for d in (reference, faulty)}
        a, b = load_checkpoint(reference), load_checkpoint(faulty)
        weights_equal = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        row = {"kills": kills, "during_checkpoint_writes": during_writes, "damaged_files": damaged,
               "finished": finish.returncode == 0 and b["step"] == args.steps, "losses_equal": losses[reference] == losses[faulty],
               "weights_bitwise_equal": weights_equal, "steps": args.steps}
    columns = [(k, k.replace("_", " ")) for k in row]
    print(common.text_table([row], columns))
    meta = common.metadata(torch.device("cpu"), command=" ".join([sys.executable, *sys.argv]), seed=args.seed)
    if args.json:
        common.write_json(args.json, meta, [row])
    if args.markdown:
        common.write_markdown(args.markdown, "kill -9 during training", meta, [("Result", common.markdown_table([row], columns))])
    ok = row["finished"] and row["losses_equal"] and row["weights_bitwise_equal"] and not damaged
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
