"""Shared helpers for the benchmarks in bench/: timing, copy bandwidth, metadata, tables, output files.

Nothing here runs at import. The scripts import it as `common` (bench/ is on sys.path when a script in
it runs as `python bench/<name>.py`, and bench/conftest.py adds it for pytest).
"""

import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from draw import device as draw_device
from draw import provenance
from draw.atomic import atomic_write_text

BENCH_DIR = Path(__file__).resolve().parent
GIB = 1 << 30
MIB = 1 << 20


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; otherwise the named device (must be usable): draw.device's
    reading of the flag, a bad one ending the script with its one-line message."""
    try:
        return draw_device.pick_device(name)
    except ValueError as error:
        raise SystemExit(str(error)) from None


def cpu_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's total)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_cpu_threads(threads: int | None, device: torch.device) -> None:
    """torch.set_num_threads: `threads` when given, else 1 for CPU runs (CUDA runs keep torch's default).

    Why 1 by default: on a shared 2-core machine, torch's OpenMP threads spin-wait for each other, and
    one descheduled thread stalls every parallel op (bench/RESULTS.md has what we saw). Pass
    --threads 2 (or more) on a quiet machine.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    elif device.type == "cpu":
        torch.set_num_threads(1)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({cpu_cores()} cores, {torch.get_num_threads()} torch threads): {model}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Return cached blocks between cases so one case's leftovers do not crowd the next."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def triton_skip_reason(device: torch.device) -> str | None:
    """None when backend="triton" runs a tiny read and write on `device`; else why it cannot be benchmarked.

    Goes through the public API only (kernels.read / kernels.write), so kernels/triton_attention.py is
    imported lazily, by kernels, and a missing or broken module shows up here as a message.
    """
    if device.type != "cuda":
        return (
            "needs CUDA (on CPU the Triton kernels only run in Triton's interpreter, TRITON_INTERPRET=1, "
            "far too slow to benchmark)"
        )
    from draw import kernels

    if not kernels.triton_available():
        return "the triton package is not installed"
    try:
        x = torch.rand(2, 1, 8, 8, device=device).round()
        canvas = torch.randn(2, 1, 8, 8, device=device)
        params = torch.zeros(2, 5, device=device)
        kernels.read(x, canvas, params, 2, backend="triton")
        kernels.write(torch.randn(2, 1, 3, 3, device=device), params, canvas, backend="triton")
        torch.cuda.synchronize(device)
    except Exception as error:  # ImportError while the module is being written, a compile error, ...
        first_line = (str(error).splitlines() or [""])[0][:300]
        return f"backend='triton' failed on a tiny input: {type(error).__name__}: {first_line}"
    return None


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def cpu_median_ms(fn: Callable[[], object], *, warmup: int = 3, reps: int = 20, budget_s: float = 2.0) -> float:
    """Median wall time of fn() in ms: `warmup` untimed calls, then up to `reps` timed calls.

    Stops early once `budget_s` seconds of timed calls have passed, after at least 3 of them.
    """
    for _ in range(warmup):
        fn()
    times = []
    started = time.perf_counter()
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 3 and time.perf_counter() - started > budget_s:
            break
    return statistics.median(times)


EXIT_INTERRUPTED = 130  # a benchmark stopped by SIGINT, its tables written from what it measured


def measured_until_interrupted(measure: Callable[[], object], meta: dict, rows: Sequence[dict]) -> bool:
    """Run measure(). A KeyboardInterrupt (Ctrl-C, or bench/suite.py's SIGINT at a part's time limit) ends the
    measuring, not the script: `meta` is marked partial and the script goes on to write its tables from `rows` as
    they stand, then exits EXIT_INTERRUPTED. Returns whether it was interrupted."""
    try:
        measure()
    except KeyboardInterrupt:
        meta["partial"] = True
        log(f"interrupted: writing the {len(rows)} rows measured so far")
        return True
    return False


def warm_up_step(step: Callable[[int], object], settled: Callable[[], bool], device: torch.device, *, steps: int,
                 seconds: float) -> tuple[int, float]:
    """Run a training step untimed until it has compiled or been captured (`settled()`: the GPU idles while the
    host compiles), then for at least `steps` steps in all and `seconds` of the settled step itself (a GPU's
    clocks ramp up from idle). step(i) runs the i-th step. Returns (steps run, seconds taken)."""
    started = time.perf_counter()
    count = 0
    while not settled():
        step(count)
        synchronize(device)
        count += 1
    ready = time.perf_counter()
    while count < steps or time.perf_counter() - ready < seconds:
        step(count)
        synchronize(device)
        count += 1
    return count, time.perf_counter() - started


def cuda_median_ms(fn: Callable[[], object], rep_ms: int = 100) -> float:
    """Median time of fn() in ms from triton.testing.do_bench (which flushes L2 between calls);
    it runs fn for about `rep_ms` ms (and at least once)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, rep=rep_ms, return_mode="median"))


def cuda_graph_median_ms(fns: Sequence[Callable[[], object]]) -> float:
    """Median time of one call in ms, replayed from a CUDA graph that makes each call of `fns` once: launch
    overhead removed. The calls do the same work on distinct inputs (see `rotation`), so that the inputs of a
    small case are not all held in the L2 cache from one replay to the next, and the time is the memory's,
    not the cache's.

    do_bench_cudagraph times 10 replays of a graph of about 20 ms each, right after capturing it (host work, the
    GPU idle: its clocks fall). The median is taken over the last half of them, after ~100 ms of replays."""
    import triton.testing

    def every_call():
        for fn in fns:
            fn()

    for _ in range(3):  # compile / autotune outside the capture
        every_call()
    torch.cuda.synchronize()
    replays = triton.testing.do_bench_cudagraph(every_call, return_mode="all")  # ms per every_call, in order
    return statistics.median(replays[len(replays) // 2:]) / len(fns)


ROTATION_L2_MULTIPLE = 4  # the inputs rotated through a CUDA graph hold at least 4x the L2 cache
ROTATION_MAX = 256


def rotation(nbytes: int, device: torch.device) -> int:
    """How many input sets of `nbytes` a CUDA-graph timing rotates through: enough to hold ROTATION_L2_MULTIPLE
    times the device's L2 cache (H100: 50 MiB), at most ROTATION_MAX."""
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * MIB)
    return max(1, min(ROTATION_MAX, -(-ROTATION_L2_MULTIPLE * l2 // max(nbytes, 1))))


def wall_median_ms(fn: Callable[[], object], device: torch.device, *, calls: int = 50, rounds: int = 10) -> float:
    """Median over `rounds` of the wall time per call of `calls` calls of fn() back to back, synchronized
    before and after each round: what a loop of such calls takes, the host's launches and Python included
    (no cache is flushed; on a GPU the longer of the host's time and the device's)."""
    for _ in range(3):
        fn()
    synchronize(device)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - started) * 1e3 / calls)
    return statistics.median(times)


def sm_clock_mhz(device: torch.device) -> int | None:
    """The GPU's SM clock now, in MHz: NVML through torch (needs pynvml), else nvidia-smi; None on a CPU or
    where neither answers (the figure is optional)."""
    if device.type != "cuda":
        return None
    with contextlib.suppress(Exception):  # no pynvml, an NVML error
        return int(torch.cuda.clock_rate(device))
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    for which in ([f"GPU-{uuid}"] if uuid is not None else []) + [str(device.index or 0)]:  # its UUID, else its index
        with contextlib.suppress(Exception):  # no nvidia-smi, a timeout, an answer that is not a number
            answer = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits", "-i", which],
                                    capture_output=True, text=True, timeout=10, check=True)
            return int(answer.stdout.split()[0])
    return None


def warm_up_gpu(device: torch.device, seconds: float = 0.1) -> None:
    """Keep the GPU busy with matrix products for `seconds` (its clocks fall while the host compiles or makes
    inputs, and take a while to come back up)."""
    if device.type != "cuda":
        return
    a = torch.randn(2048, 2048, device=device)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(10):
            a @ a
        synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, *, cpu_reps: int = 20, cpu_budget_s: float = 2.0) -> float:
    """do_bench's median on CUDA; a perf_counter median after warm-up on CPU."""
    if device.type == "cuda":
        return cuda_median_ms(fn, rep_ms=200)
    return cpu_median_ms(fn, reps=cpu_reps, budget_s=cpu_budget_s)


def copy_bandwidth_gbps(device: torch.device, nbytes: int) -> float:
    """The device's measured copy bandwidth in GB/s (1e9 B/s): dst.copy_(src) moves 2 * nbytes."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, cpu_reps=10)
    del src, dst
    free_memory(device)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------


def git_commit() -> str:
    """Short commit hash of the checkout holding bench/, or "unknown" (not a repo, no commit, no git)."""
    return provenance.git_commit(BENCH_DIR)


def git_dirty() -> bool | None:
    """Whether the checkout's tracked files differ from its commit (the figures then measure uncommitted
    code), or None where git cannot tell."""
    return provenance.git_dirty(BENCH_DIR)


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # not installed, or broken
        return "not installed"


def metadata(device: torch.device, **extra) -> dict:
    """Device, versions, commit, date and the exact command line of this run."""
    meta = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "commit": git_commit(),
        "dirty": git_dirty(),  # uncommitted changes to tracked files: the commit alone does not name the code
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        # how the fused kernels contract (kernels/triton_attention.py): "auto" unless the run set it
        "triton_contraction": os.environ.get("DRAW_TRITON_CONTRACTION", "auto"),
        # the warps of every launch (DRAW_TRITON_NUM_WARPS), "auto" (the launchers' own) unless the run set it
        "triton_num_warps": os.environ.get("DRAW_TRITON_NUM_WARPS") or "auto",
        # launch settings replacing the launchers' own (DRAW_TRITON_LAUNCH), "auto" unless the run set them
        "triton_launch": os.environ.get("DRAW_TRITON_LAUNCH") or "auto",
        # where DRAW's encoder input is formed (DRAW_TRITON_PROJECTION): "fused" (in the LSTM cell) unless set
        "triton_projection": os.environ.get("DRAW_TRITON_PROJECTION") or "fused",
        # whether fp32 matrix products may round their inputs to TF32 (a run's steps set it per step: bench_train)
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    meta.update(extra)
    return meta


# ---------------------------------------------------------------------------------------------
# Tables and files
# ---------------------------------------------------------------------------------------------


def format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        text = f"{value:.4f}"  # 4 decimals below 1, less the zeros past the second (0.07, not 0.0700)
        return text[:-2] + text[-2:].rstrip("0") if text.endswith("0") else text
    return str(value)


def text_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A fixed-width table; `columns` is (key, header) pairs. Numbers right-aligned, text left."""
    cells = [[format_cell(row.get(key)) for key, _ in columns] for row in rows]
    headers = [header for _, header in columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row.get(key), (int, float)) or row.get(key) is None for row in rows) for key, _ in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in cells])


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    numeric = [all(isinstance(row.get(key), (int, float)) or row.get(key) is None for row in rows) for key, _ in columns]
    lines = [
        "| " + " | ".join(header for _, header in columns) + " |",
        "|" + "|".join("---:" if num else "---" for num in numeric) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def write_json(path: str, meta: dict, rows: Sequence[dict], **extra) -> None:
    """{"metadata", **extra, "results"} as JSON, written atomically (a stopped run leaves the last whole file)."""
    payload = {"metadata": meta, **extra, "results": list(rows)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n", durable=False)
    print(f"wrote {path}")


def write_markdown(path: str, title: str, meta: dict, tables: Sequence[tuple[str, str]], notes: Sequence[str] = ()) -> None:
    """A markdown report: title, metadata bullets, notes, then (heading, markdown table) sections."""
    lines = [f"# {title}", ""]
    lines += [f"- {key}: `{value}`" for key, value in meta.items()]
    for note in notes:
        lines += ["", note]
    lines += [""]
    for heading, table in tables:
        lines += [f"## {heading}", "", table, ""]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines), durable=False)
    print(f"wrote {path}")


def panels(count: int, height: float):
    """A row of `count` matplotlib axes (Agg backend, no display): (figure, [axes])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=(5 * count, height), squeeze=False)
    return fig, list(axes[0])


def save_panels(fig, axes, path: str) -> None:
    """Grid and legend on every panel, then write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def add_run_arguments(parser, *, seed_help: str, plot_help: str | None) -> None:
    """The flags every benchmark script shares: device, threads, seed and the output files (no --plot
    where plot_help is None)."""
    parser.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(THREADS); default 1 on CPU (steady on a shared machine; "
                        "use all cores on a quiet one), torch's default on CUDA")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--json", default=None, metavar="PATH", help="write results and metadata as JSON to PATH")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="write results and metadata as a markdown table to PATH")
    if plot_help is not None:
        parser.add_argument("--plot", default=None, metavar="PATH", help=plot_help)


def check_choices(parser, flag: str, values, allowed) -> None:
    """parser.error naming the unknown entries of a comma-separated flag and the allowed ones."""
    unknown = [v for v in values if v not in allowed]
    if unknown:
        parser.error(f"{flag}: unknown {unknown}; choose from {list(allowed)}")


def split_list(text: str) -> list[str]:
    """"a,b, c" -> ["a", "b", "c"] (argparse type for comma-separated lists)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def log(message: str) -> None:
    """Progress and skip messages go to stderr so that stdout holds only the tables."""
    print(message, file=sys.stderr, flush=True)
