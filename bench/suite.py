"""The whole GPU record in one command: verify the kernels, run the CUDA tests, benchmark attention and
the training step, and write everything (JSON, markdown, logs) into one directory, a summary last.

    python bench/suite.py --out results/h100            # a CUDA machine: the full record
    python bench/suite.py --budget 560 --out results/h100 --only verify,cuda-tests,attention,attention-2warps,attention-ahead  # in parts,
    python bench/suite.py --budget 560 --out results/h100 --only attention-large,train,train-unfused,profile-100,profile-1024
    python bench/suite.py --budget 560 --out results/h100 --only train-eager,train-compiled,tune-100  # into one DIR
    python bench/suite.py --quick --out /tmp/suite      # any machine: tiny sizes, the interpreter for the kernels

Each part runs as its own process (so one failure or crash does not stop the others), with a time
limit, and its output is kept in DIR/PART.log. A part at its limit gets SIGINT and STOP_GRACE_S (10 s) to write
what it has (the benchmarks their tables, pytest its XML), then SIGKILL. The correctness parts (verify, cuda-tests) run side by
side, since they time nothing and mostly compile; every timing part runs alone. The parts:
    verify      `draw verify --quick`: the fused kernels against the reference, forward and every gradient
                (its cases in up to 8 worker processes)
    cuda-tests  tests/test_triton_attention.py, tests/test_latent_sample.py, tests/test_lstm_cell.py and
                tests/test_projection.py compiled on the GPU,
                tests/test_model.py (the model's fused CUDA LSTM cell), the CUDA-graph step's captured
                gradient all-reduce (tests/test_distributed.py) and the CUDA-graph step against the eager one
                (tests/test_train.py), 8 workers where pytest-xdist is installed
                (skipped by --quick and on CPU)
    attention   bench_attention.py at the launch-bound sizes (28x28 at batch 100, 256, 1024; eager, compiled, and the fused kernels as
                launched and forced to broadcast-and-sum: triton, triton-sum; write-read also as the
                two fused ops apart: triton-pair)
    attention-2warps  the fused kernels at the launch-bound sizes with 2 warps per program
                (DRAW_TRITON_NUM_WARPS=2), against the launched warps in the summary
    attention-ahead  the fused kernels at the bandwidth-bound sizes (16,384 images) as launched and loading one row
                block ahead (triton, triton-ahead: DRAW_TRITON_LAUNCH=LOAD_AHEAD=1), against each other in the summary
    attention-large  bench_attention.py at the middle and bandwidth-bound sizes, 16,384 images (compiled, triton,
                triton-pair)
    train       bench_train.py: mnist-paper at batch 100, 1024, 4096 as one CUDA graph, fp32 and bf16
    train-unfused  the same at batch 100 and 1024 with the encoder's input formed by two matrix products instead
                of in its LSTM cell (DRAW_TRITON_PROJECTION=unfused), against `train` in the summary
    profile-100, profile-1024  profile_step.py: where the step's GPU time goes at batch 100 and 1024, the eager
                fused step first, then the CUDA graph (the profiler's CUDA tracing set up before any capture)
    train-eager the eager reference and eager triton at batch 1024 (a few steps: each takes 0.2-0.6 s)
    train-compiled  the compiled step at batch 1024 (about 2 minutes of compiling)
    convergence (only when --only names it) bench_convergence.py: mnist-paper at its batch of 100 and at
                1024 (bf16, 300 warm-up steps), 20 epochs each, as draw train runs them (MNIST must be on
                the machine: DRAW_DATA_DIR)
    tune-100    (only when --only names it) tune_attention.py: the write-read kernels' launch settings
                searched at 100x1x28x28 (mnist-paper's batch), 60 s a target
    tune        (only when --only names it) tune_attention.py: the read and write-read kernels' launch
                settings searched at 1024x1x28x28 and 16384x3x54x54, every candidate checked against the
                reference, 60 s a target
Run with --out DIR again (say with --only), a part's results replace that part's earlier ones in
DIR/suite.json, and the summary covers every part recorded there. DIR/suite.json is rewritten after
every stage; SIGTERM or SIGINT stops the running parts (their process groups), records them and exits
128 + the signal number.
Exit code: non-zero when a part failed (the summary says which); a part --budget left out is not a failure.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from xml.etree import ElementTree

import common
from bench_train import MODES as TRAIN_MODES

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

Part = tuple[str, list[str], int, dict]  # name, command, time limit in s, extra environment


def stages(quick: bool, out: pathlib.Path) -> list[list[Part]]:
    """The parts in order, grouped in stages: the parts of one stage run side by side."""
    py = sys.executable
    if quick:
        interpreter = {"TRITON_INTERPRET": "1"}
        return [
            [("verify", [py, "-m", "draw", "verify", "--device", "cpu", "--json", str(out / "verify.json")], 240,
              interpreter)],
            [("attention", [py, str(BENCH / "bench_attention.py"), "--device", "cpu", "--sizes", "64x1x28x28",
                            "--providers", "eager", "--reps", "3", "--budget", "0.5", "--copy-mib", "8",
                            "--json", str(out / "attention.json"), "--markdown", str(out / "attention.md")], 180, {})],
            [("train", [py, str(BENCH / "bench_train.py"), "--device", "cpu", "--presets", "mnist-quick",
                        "--batch-sizes", "16", "--modes", "reference", "--warmup", "1", "--steps", "2",
                        "--json", str(out / "train.json"), "--markdown", str(out / "train.md")], 180, {})],
        ]
    workers = ["-n", "8"] if importlib.util.find_spec("xdist") else []
    attention = [py, str(BENCH / "bench_attention.py")]
    train = [py, str(BENCH / "bench_train.py"), "--presets", "mnist-paper"]
    # limits from one H100 (bench/RESULTS.md, 2026-11-22 to -24): the full verify sweep passed 200 s, the
    # quick one (188 cases, 8 workers) 53 s, the CUDA tests 176-202 s with 8 workers, compiling the step 118 s;
    # attention-large with triton-sum too passed 240 s (its bandwidth-size rows take 50-90 ms a call);
    # attention, timed by wall time and by CUDA-graph replays, 274 s (attention-2warps times one provider of its five)
    return [
        [("verify", [py, "-m", "draw", "verify", "--quick", "--json", str(out / "verify.json")], 300, {}),
         ("cuda-tests", [py, "-m", "pytest", "-q", "-rfs", *workers, str(ROOT / "tests" / "test_triton_attention.py"),
                         str(ROOT / "tests" / "test_latent_sample.py"), str(ROOT / "tests" / "test_lstm_cell.py"),
                         str(ROOT / "tests" / "test_projection.py"),
                         str(ROOT / "tests" / "test_model.py"),
                         str(ROOT / "tests" / "test_distributed.py") + "::test_the_gradient_all_reduce_is_captured_in_the_cuda_graph",
                         str(ROOT / "tests" / "test_train.py")
                         + "::test_the_cuda_graph_step_gives_the_eager_steps_losses_weights_and_average",
                         str(ROOT / "tests" / "test_train.py") + "::test_the_fixed_binarization_is_the_same_on_any_device",
                         f"--junitxml={out / 'cuda-tests.xml'}"], 360, {})],
        [("attention", attention + ["--sizes", "launch", "--rep-ms", "50", "--json", str(out / "attention.json"),
                                    "--markdown", str(out / "attention.md"), "--plot", str(out / "attention.png")],
          420, {})],
        [("attention-2warps", attention + ["--sizes", "launch", "--providers", "triton", "--rep-ms", "50",
                                           "--json", str(out / "attention-2warps.json")], 120,
          {"DRAW_TRITON_NUM_WARPS": "2"})],
        [("attention-ahead", attention + ["--sizes", AHEAD_SIZES, "--providers", "triton,triton-ahead", "--rep-ms", "100",
                                          "--json", str(out / "attention-ahead.json"),
                                          "--markdown", str(out / "attention-ahead.md")], 240, {})],
        [("attention-large", attention + ["--sizes", LARGE_SIZES, "--providers", "compiled,triton,triton-pair",
                                          "--rep-ms", "100", "--json", str(out / "attention-large.json"),
                                          "--markdown", str(out / "attention-large.md")], 300, {})],
        [("train", train + ["--batch-sizes", "100,1024,4096", "--modes", "triton-graph", "--amp", "fp32,bf16",
                            "--warmup", "5", "--steps", "50", "--json", str(out / "train.json"),
                            "--markdown", str(out / "train.md")], 180, {})],
        [("train-unfused", train + ["--batch-sizes", "100,1024", "--modes", "triton-graph", "--amp", "fp32,bf16",
                                    "--warmup", "5", "--steps", "50", "--json", str(out / "train-unfused.json")], 90,
          {"DRAW_TRITON_PROJECTION": "unfused"})],
        *[[(f"profile-{batch}", [py, str(BENCH / "profile_step.py"), "--batch", str(batch), "--modes", "triton,triton-graph",
                                  "--top", "25", "--json", str(out / f"profile-{batch}.json")], 90, {})]
          for batch in (100, 1024)],
        [("train-eager", train + ["--batch-sizes", "1024", "--modes", "reference,triton", "--amp", "fp32",
                                  "--warmup", "2", "--steps", "5", "--json", str(out / "train-eager.json")], 90, {})],
        [("train-compiled", train + ["--batch-sizes", "1024", "--modes", "triton-compiled", "--amp", "fp32",
                                     "--warmup", "3", "--steps", "50", "--json", str(out / "train-compiled.json")],
          240, {})],
        # opt-in (OPT_IN): mnist-paper at its batch of 100 against 1024 (bf16, warm-up), 20 epochs each; needs
        # MNIST on the machine (DRAW_DATA_DIR where it has no network)
        [("convergence", [py, str(BENCH / "bench_convergence.py"), "--preset", "mnist-paper", "--fast-batch", "1024",
                          "--epochs", "20", "--amp", "bf16", "--warmup-steps", "300", "--out", str(out / "convergence"),
                          "--json", str(out / "convergence.json")], 420, {})],
        # opt-in (OPT_IN): the write-read kernels' launch settings at the paper's batch of 100, where a step
        # waits on each kernel's slowest program rather than on the GPU's throughput; 60 s per target
        [("tune-100", [py, str(BENCH / "tune_attention.py"), "--sizes", "100x1x28x28", "--ops", "write-read",
                       "--target-budget", "60", "--json", str(out / "tune-100.json"),
                       "--markdown", str(out / "tune-100.md")], 200, {})],
        # opt-in (OPT_IN): the launch-settings search at mnist-paper's batch and the SVHN size, 60 s per target
        [("tune", [py, str(BENCH / "tune_attention.py"), "--sizes", "1024x1x28x28,16384x3x54x54",
                   "--ops", "read,write-read", "--target-budget", "60", "--json", str(out / "tune.json"),
                   "--markdown", str(out / "tune.md")], 570, {})],
    ]


OPT_IN = ("convergence", "tune-100", "tune")  # parts that run only when --only names them
# attention-large's sizes: the middle one and the bandwidth-bound ones at 16,384 images (at 65,536 the same
# kernels ran 3.9-4.1x as long on an H100, bench/RESULTS.md: the same GB/s for four times the suite's time)
LARGE_SIZES = "middle,16384x3x54x54,16384x1x100x100"
AHEAD_SIZES = "16384x3x54x54,16384x1x100x100"  # row loops of 4 and 7 trips forward, where loading ahead can pay


def parts(quick: bool, out: pathlib.Path) -> list[Part]:
    """Every part, in order."""
    return [part for stage in stages(quick, out) for part in stage]


class SuiteStopped(Exception):
    """SIGTERM or SIGINT reached the suite (an outer `timeout`, Ctrl-C): the parts still running are
    stopped with their process groups, and `results` holds every part of the stage, finished or not."""

    def __init__(self, signum: int, results: list[dict] | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.results = signum, results or []


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _stop_on_signal(signum, frame):
    for sig in STOP_SIGNALS:  # the first signal stops the suite; more would cut its cleanup
        signal.signal(sig, signal.SIG_IGN)
    raise SuiteStopped(signum)


def set_aside(command: list[str], out: pathlib.Path) -> list[pathlib.Path]:
    """Move an earlier run's outputs of a part (the files and folders its command names directly inside DIR)
    to NAME.previous[.EXT], replacing older ones, so that a part that fails or times out now is never summarised
    from them, and a part that needs an empty folder (convergence) gets one. Returns the paths moved."""
    moved = []
    for arg in command:
        path = pathlib.Path(arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg)
        if path.parent != out or not path.exists():
            continue
        aside = path.with_name(f"{path.stem}.previous{path.suffix}")
        if aside.is_dir():
            shutil.rmtree(aside)
        else:
            aside.unlink(missing_ok=True)
        path.rename(aside)
        moved.append(aside)
    return moved


def run_stage(stage: list[Part], out: pathlib.Path, deadline: float | None = None) -> list[dict]:
    """Start the stage's parts together; each is stopped (its whole process group) at its time limit, or at
    `deadline` (a time.perf_counter(): --budget) when that comes first. A SuiteStopped raised while they run
    (main's signal handler) stops them all and carries their results."""
    running, stopped = [], None
    try:
        for name, command, limit_s, env in stage:
            if deadline is not None:
                limit_s = max(min(limit_s, round(deadline - time.perf_counter())), 0)
            for aside in set_aside(command, out):
                common.log(f"[suite] {name}: an earlier run's output moved to {aside.name}")
            common.log(f"[suite] {name}: {' '.join(command)}")
            log_path = out / f"{name}.log"
            log = open(log_path, "w")
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                       preexec_fn=_stoppable_by_sigint,
                                       env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **env})
            running.append((name, limit_s, process, log, log_path, time.perf_counter()))
    except SuiteStopped as reason:  # the parts started so far are stopped below
        stopped = reason
    results = []
    try:
        for name, limit_s, process, log, log_path, start in running:
            try:
                if stopped is not None:
                    raise stopped
                code = process.wait(timeout=max(limit_s - (time.perf_counter() - start), 0))
                status = "ok" if code == 0 else f"failed (exit {code})"
            except (subprocess.TimeoutExpired, SuiteStopped) as reason:
                _kill(process)
                seconds = time.perf_counter() - start
                if isinstance(reason, SuiteStopped):
                    stopped = reason
                    status = f"stopped by {signal.Signals(reason.signum).name} after {seconds:.0f} s"
                else:
                    status = f"timed out after {limit_s} s"
            log.close()
            seconds = time.perf_counter() - start
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            common.log(f"[suite] {name}: {status} in {seconds:.0f} s")
            results.append({"part": name, "status": status, "seconds": round(seconds, 1), "last_line": tail[0][:200],
                            "log": log_path.name})
    finally:  # a signal between two parts' waits: no part outlives the stage
        for _, _, process, *_ in running:
            if process.poll() is None:
                _kill(process)
    if stopped is not None:
        raise SuiteStopped(stopped.signum, results)
    return results


STOP_GRACE_S = 10  # a part stopped at its limit has this long after SIGINT to write what it has, before SIGKILL


def _stoppable_by_sigint() -> None:
    """Run in each part's process before its command: SIGINT at its default action, which a Python part turns into
    KeyboardInterrupt. A suite started as a background job (`cmd &`, nohup) has SIGINT ignored, and its parts
    would inherit that and never hear _kill's SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kill(process: subprocess.Popen) -> None:
    """Stop a part and its workers (its process group): SIGINT first, so that it writes what it has measured
    (pytest its junit XML with the tests that ran, the benchmarks their tables), then SIGKILL after STOP_GRACE_S
    for whatever is left of the group. A stopped part can so end up to STOP_GRACE_S past its limit or --budget."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def merge(previous: list[dict], new: list[dict], order: list[str]) -> list[dict]:
    """The parts recorded in DIR: this run's results replace earlier ones of the same part; in suite order."""
    by_part = {r["part"]: r for r in previous} | {r["part"]: r for r in new}
    return [by_part[name] for name in order if name in by_part]


def _rows(path: pathlib.Path) -> list[dict]:
    return json.loads(path.read_text()).get("results", []) if path.is_file() else []


def headline(out: pathlib.Path) -> list[str]:
    """The figures a reader looks for first, from the parts' JSON files."""
    lines = []
    verify = out / "verify.json"
    if verify.is_file():
        result = json.loads(verify.read_text())
        rows = result.get("rows", [])
        failed = sum(1 for r in rows if not r.get("passed"))
        cases, checked = result.get("cases"), result.get("cases_checked")
        stopped = f" (stopped after {checked} of {cases} cases)" if cases is not None and checked != cases else ""
        lines.append(f"verify: {len(rows) - failed}/{len(rows)} checks pass{stopped}")
    junit = out / "cuda-tests.xml"
    if junit.is_file():
        suite = ElementTree.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        lines.append(f"cuda-tests: {passed} passed, {counts['failures'] + counts['errors']} failed, "
                     f"{counts['skipped']} skipped")
    attention = _rows(out / "attention.json") + _rows(out / "attention-large.json")
    sum_ms = {(r["op"], r["mode"], r["size"], r["timer"]): r["ms"] for r in attention if r.get("provider") == "triton-sum"}
    for r in attention:
        if r.get("provider") == "triton":
            sum_of = sum_ms.get((r["op"], r["mode"], r["size"], r["timer"]))  # parts that timed triton-sum
            vs_sum = f", {sum_of / r['ms']:.2f}x triton-sum" if sum_of else ""
            vs_pair = f", {r['vs_pair']:.2f}x triton-pair" if r.get("vs_pair") else ""  # write-read: fused against apart
            speed = (f"{r['ms']:.4f} ms a call" if r.get("gbps") is None  # "wall": the host's launches included
                     else f"{r['gbps']:.0f} GB/s ({r.get('pct_copy') or float('nan'):.0f}% of copy)")
            lines.append(f"attention {r['op']} {r['mode']} {r['size']}: triton {speed}, "
                         f"{r.get('vs_compiled') or float('nan'):.2f}x compiled{vs_sum}{vs_pair} ({r['timer']})")
    launched_ms = {(r["op"], r["mode"], r["size"], r["timer"]): r["ms"] for r in attention if r.get("provider") == "triton"}
    for r in _rows(out / "attention-2warps.json"):
        if r.get("provider") == "triton" and r.get("ms"):
            vs = launched_ms.get((r["op"], r["mode"], r["size"], r["timer"]), float("nan")) / r["ms"]
            lines.append(f"attention {r['op']} {r['mode']} {r['size']}: 2 warps {vs:.2f}x the launched warps ({r['timer']})")
    for r in _rows(out / "attention-ahead.json"):
        if r.get("provider") == "triton-ahead" and r.get("vs_triton"):
            lines.append(f"attention {r['op']} {r['mode']} {r['size']}: loading one block ahead {r['ms']:.4f} ms, "
                         f"{r['vs_triton']:.2f}x the launched kernels ({r['timer']})")
    tunes = [out / "tune-100.json", out / "tune.json"]
    for t in [t for tune in tunes if tune.is_file() for t in json.loads(tune.read_text()).get("summary", [])]:
        speedup = f"{t['speedup']:.2f}x" if t.get("speedup") else "untimed"
        lines.append(f"tune {t['target']}: {t['best_settings']} ({speedup} the launchers' {t['launchers_settings']}; "
                     f"{t['tried']} tried, {t['wrong']} wrong)")
    train = _rows(out / "train.json")
    for r in train + _rows(out / "train-eager.json") + _rows(out / "train-compiled.json"):
        asked = TRAIN_MODES.get(r["mode"], (None, None))[1]  # the TrainStep mode the row asked for: else it fell back
        ran = f" (ran as the {r['step_mode']} step)" if r.get("step_mode") and r["step_mode"] != asked else ""
        lines.append(f"train {r['preset']} batch {r['batch']} {r['mode']} {r['dtype']}: {r['images_per_s']:,.0f} images/s{ran}")
    fused = {(r["preset"], r["batch"], r["mode"], r["dtype"]): r["images_per_s"] for r in train}
    for r in _rows(out / "train-unfused.json"):
        vs = fused.get((r["preset"], r["batch"], r["mode"], r["dtype"]), float("nan")) / r["images_per_s"]
        lines.append(f"train {r['preset']} batch {r['batch']} {r['mode']} {r['dtype']}: projection unfused "
                     f"{r['images_per_s']:,.0f} images/s; fused {vs:.2f}x that")
    for r in _rows(out / "convergence.json"):
        config = r["train_config"]
        split = config.get("eval_split", "test")  # the held-out split its evaluations scored
        lines.append(f"convergence batch {config['batch_size']} ({r['step_mode']}, {config['amp']}): {split} bound "
                     f"{r[f'{split}_bound_nats']:.2f} nats after {r['epochs']:.1f} epochs in {r['wall_s']:.0f} s")
    return lines


MIN_PART_S = 30  # under --budget, a stage is not started with less time than this left,
# nor one of these parts with less than its own: each writes its figures only after a first long step (compiling
# the step, warming up and profiling, a first epoch, the first candidates)
PART_MIN_S = {"train-compiled": 150, "profile-100": 45, "profile-1024": 45, "convergence": 200, "tune-100": 90,
              "tune": 120}


def minimum_s(stage: list[Part]) -> float:
    """The least time left under --budget with which `stage` is started."""
    return max(PART_MIN_S.get(name, MIN_PART_S) for name, *_ in stage)


def unknown_parts(only: list[str] | None, skip: list[str], order: list[str]) -> list[str]:
    """The names in --only and --skip that are not parts of the suite, sorted."""
    return sorted((set(only or []) | set(skip)) - set(order))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=pathlib.Path, required=True, help="directory for every part's JSON, markdown and log")
    p.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (the kernels in Triton's interpreter): checks the suite runs")
    p.add_argument("--only", type=common.split_list, default=None, help="comma-separated parts to run (default: all)")
    p.add_argument("--skip", type=common.split_list, default=[], help="comma-separated parts to leave out")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="the suite's own time limit: each part stops at its limit or when the budget is spent, and a "
                        f"stage is not started with less than {MIN_PART_S} s left ({', '.join(f'{k} {v} s' for k, v in PART_MIN_S.items())}; "
                        "recorded as skipped); for a command "
                        "that is killed at a fixed time, so that no part outlives it")
    args = p.parse_args(argv)
    args.out = args.out.resolve()  # the parts run in the repository root
    args.out.mkdir(parents=True, exist_ok=True)
    order = [name for name, *_ in parts(args.quick, args.out)]
    unknown = unknown_parts(args.only, args.skip, order)
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}: the parts are {', '.join(order)}")

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    started = time.perf_counter()
    deadline = None if args.budget is None else started + args.budget
    results, stopped = [], None
    # a signal inherited as ignored (SIGINT in a background job) stays ignored, as in draw train
    handlers = {sig: signal.signal(sig, _stop_on_signal) for sig in STOP_SIGNALS
                if signal.getsignal(sig) is not signal.SIG_IGN}
    previous_path = args.out / "suite.json"
    previous = json.loads(previous_path.read_text()).get("results", []) if previous_path.is_file() else []
    try:
        for stage in stages(args.quick, args.out):
            chosen = [part for part in stage if part[0] not in args.skip
                      and (part[0] in args.only if args.only is not None else part[0] not in OPT_IN)]
            if chosen and deadline is not None and deadline - time.perf_counter() < minimum_s(chosen):
                common.log(f"[suite] {', '.join(p[0] for p in chosen)}: skipped, less than {minimum_s(chosen):.0f} s "
                           f"of the budget of {args.budget:.0f} s left")
                results += [{"part": name, "status": f"skipped (budget {args.budget:.0f} s spent)", "seconds": 0.0,
                             "last_line": "", "log": ""} for name, *_ in chosen]
            elif chosen:
                try:
                    results += run_stage(chosen, args.out, deadline)
                finally:  # recorded after every stage: a run cut short keeps what it measured
                    record(args, device, started, merge(previous, results, order))
    except SuiteStopped as stop:
        results += stop.results
        stopped = stop.signum
        common.log(f"[suite] stopped by {signal.Signals(stop.signum).name}: the running parts were stopped")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    recorded = merge(previous, results, order)
    meta, summary = record(args, device, started, recorded)
    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']} | {meta['wall_s']} s")
    print(common.text_table(recorded, [("part", "part"), ("status", "status"), ("seconds", "s")]))
    for line in summary:
        print(line)
    if stopped is not None:
        return 128 + stopped
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in results) else 1


def record(args, device, started: float, recorded: list[dict]):
    """Write DIR/suite.json and DIR/suite.md for the parts recorded so far; returns (metadata, headline)."""
    meta = common.metadata(device, command=" ".join([sys.executable, *sys.argv]), quick=args.quick,
                           wall_s=round(time.perf_counter() - started, 1))
    summary = headline(args.out)
    common.write_json(str(args.out / "suite.json"), meta, recorded, headline=summary)
    table = common.markdown_table(recorded, [("part", "part"), ("status", "status"), ("seconds", "s"), ("last_line", "last line")])
    common.write_markdown(str(args.out / "suite.md"), "Benchmark suite", meta, [("Parts", table)], summary)
    return meta, summary


if __name__ == "__main__":
    sys.exit(main())
