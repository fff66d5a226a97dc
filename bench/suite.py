"""The whole GPU record in one command: verify the kernels, run the CUDA tests, benchmark attention and
the training step, and write everything (JSON, markdown, logs) into one directory, a summary last.

    python bench/suite.py --out results/h100            # a CUDA machine: the full record, < 9 minutes on one H100
    python bench/suite.py --quick --out /tmp/suite      # any machine: tiny sizes, the interpreter for the kernels

Each part runs as its own process (so one failure or crash does not stop the others), with a time
limit, and its output is kept in DIR/PART.log. The parts:
    verify      `draw verify`: the fused kernels against the reference, forward and every gradient
    cuda-tests  tests/test_triton_attention.py compiled on the GPU (skipped by --quick and on CPU)
    attention   bench_attention.py at the launch-bound, middle and bandwidth-bound sizes (eager, compiled,
                and the fused kernels as launched and forced to broadcast-and-sum: triton, triton-sum)
    attention-2warps  the fused kernels at the launch-bound and middle sizes with 2 warps per program
                (DRAW_TRITON_NUM_WARPS=2), against the launched warps in the summary
    train       bench_train.py: mnist-paper at batch 100, 1024, 4096; eager reference, eager triton,
                CUDA graph (fp32 and bf16), and compiled (batch 1024)
Exit code: non-zero when a part failed (the summary says which).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import common

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def parts(quick: bool, out: pathlib.Path) -> list[tuple[str, list[str], int, dict]]:
    """(name, command, time limit in s, extra environment) of every part, in order."""
    py = sys.executable
    interpreter = {"TRITON_INTERPRET": "1"} if quick else {}
    if quick:
        return [
            ("verify", [py, "-m", "draw", "verify", "--device", "cpu", "--json", str(out / "verify.json")], 240, interpreter),
            ("attention", [py, str(BENCH / "bench_attention.py"), "--device", "cpu", "--sizes", "64x1x28x28",
                           "--providers", "eager", "--reps", "3", "--budget", "0.5", "--copy-mib", "8",
                           "--json", str(out / "attention.json"), "--markdown", str(out / "attention.md")], 180, {}),
            ("train", [py, str(BENCH / "bench_train.py"), "--device", "cpu", "--presets", "mnist-quick", "--batch-sizes", "16",
                       "--modes", "reference", "--warmup", "1", "--steps", "2",
                       "--json", str(out / "train.json"), "--markdown", str(out / "train.md")], 180, {}),
        ]
    train = [py, str(BENCH / "bench_train.py"), "--presets", "mnist-paper", "--warmup", "5", "--steps", "20"]
    return [
        ("verify", [py, "-m", "draw", "verify", "--json", str(out / "verify.json")], 90, {}),
        ("cuda-tests", [py, "-m", "pytest", "-q", "-rs", str(ROOT / "tests" / "test_triton_attention.py"),
                        f"--junitxml={out / 'cuda-tests.xml'}"], 150, {}),
        ("attention", [py, str(BENCH / "bench_attention.py"), "--sizes", "launch,middle,bandwidth", "--rep-ms", "100",
                       "--json", str(out / "attention.json"), "--markdown", str(out / "attention.md"),
                       "--plot", str(out / "attention.png")], 150, {}),
        ("attention-2warps", [py, str(BENCH / "bench_attention.py"), "--sizes", "launch,middle", "--providers", "triton",
                              "--rep-ms", "50", "--json", str(out / "attention-2warps.json")], 60,
         {"DRAW_TRITON_NUM_WARPS": "2"}),
        ("train", train + ["--batch-sizes", "100,1024,4096", "--modes", "reference,triton,triton-graph", "--amp", "fp32,bf16",
                           "--json", str(out / "train.json"), "--markdown", str(out / "train.md")], 150, {}),
        ("train-compiled", train + ["--batch-sizes", "1024", "--modes", "triton-compiled", "--amp", "fp32",
                                    "--json", str(out / "train-compiled.json")], 120, {}),
    ]


def run_part(name: str, command: list[str], limit_s: int, env: dict, out: pathlib.Path) -> dict:
    common.log(f"[suite] {name}: {' '.join(command)}")
    start = time.perf_counter()
    log_path = out / f"{name}.log"
    with open(log_path, "w") as log:
        try:
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=limit_s, cwd=ROOT,
                                    env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **env})
            status = "ok" if result.returncode == 0 else f"failed (exit {result.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit_s} s"
    seconds = time.perf_counter() - start
    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    common.log(f"[suite] {name}: {status} in {seconds:.0f} s")
    return {"part": name, "status": status, "seconds": round(seconds, 1), "last_line": tail[0][:200], "log": log_path.name}


def _rows(path: pathlib.Path) -> list[dict]:
    return json.loads(path.read_text()).get("results", []) if path.is_file() else []


def headline(out: pathlib.Path) -> list[str]:
    """The figures a reader looks for first, from the parts' JSON files."""
    lines = []
    verify = out / "verify.json"
    if verify.is_file():
        rows = json.loads(verify.read_text()).get("rows", [])
        failed = sum(1 for r in rows if not r.get("passed"))
        lines.append(f"verify: {len(rows) - failed}/{len(rows)} checks pass")
    attention = _rows(out / "attention.json")
    sum_ms = {(r["op"], r["mode"], r["size"], r["timer"]): r["ms"] for r in attention if r.get("provider") == "triton-sum"}
    for r in attention:
        if r.get("provider") == "triton":
            vs_sum = sum_ms.get((r["op"], r["mode"], r["size"], r["timer"]), float("nan")) / r["ms"]
            lines.append(f"attention {r['op']} {r['mode']} {r['size']}: triton {r.get('gbps', float('nan')):.0f} GB/s "
                         f"({r.get('pct_copy', float('nan')):.0f}% of copy), {r.get('vs_compiled') or float('nan'):.2f}x compiled, "
                         f"{vs_sum:.2f}x triton-sum ({r['timer']})")
    launched_ms = {(r["op"], r["mode"], r["size"], r["timer"]): r["ms"] for r in attention if r.get("provider") == "triton"}
    for r in _rows(out / "attention-2warps.json"):
        if r.get("provider") == "triton" and r.get("ms"):
            vs = launched_ms.get((r["op"], r["mode"], r["size"], r["timer"]), float("nan")) / r["ms"]
            lines.append(f"attention {r['op']} {r['mode']} {r['size']}: 2 warps {vs:.2f}x the launched warps ({r['timer']})")
    for r in _rows(out / "train.json") + _rows(out / "train-compiled.json"):
        lines.append(f"train {r['preset']} batch {r['batch']} {r['mode']} {r['dtype']}: {r['images_per_s']:,.0f} images/s")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=pathlib.Path, required=True, help="directory for every part's JSON, markdown and log")
    p.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (the kernels in Triton's interpreter): checks the suite runs")
    p.add_argument("--skip", type=common.split_list, default=[], help="comma-separated parts to leave out")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    started = time.perf_counter()
    results = [run_part(name, cmd, limit, env, args.out) for name, cmd, limit, env in parts(args.quick, args.out)
               if name not in args.skip]
    meta = common.metadata(device, command=" ".join([sys.executable, *sys.argv]), quick=args.quick,
                           wall_s=round(time.perf_counter() - started, 1))
    summary = headline(args.out)
    common.write_json(str(args.out / "suite.json"), meta, results, headline=summary)
    table = common.markdown_table(results, [("part", "part"), ("status", "status"), ("seconds", "s"), ("last_line", "last line")])
    common.write_markdown(str(args.out / "suite.md"), "Benchmark suite", meta, [("Parts", table)], summary)
    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']} | {meta['wall_s']} s")
    print(common.text_table(results, [("part", "part"), ("status", "status"), ("seconds", "s")]))
    for line in summary:
        print(line)
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
