"""Benchmark a whole DRAW training step: images/s and peak memory per preset, batch size, mode and dtype.

A step is what draw/train.py does: forward (the loss, Eqs. 9-12), backward, gradient clipping to the
preset's max norm, Adam step. The data are random binary images of the preset's shape (no download).

Modes (attention backend and how draw.step.TrainStep runs the step; the step is the one `draw train` runs):
    reference           backend "reference", eager
    reference-compiled  backend "reference", torch.compile (--compile-mode)
    triton              backend "triton", eager (CUDA only)
    triton-compiled     backend "triton", torch.compile (CUDA only)
    triton-graph        backend "triton", the whole step as one CUDA graph (CUDA only)
--compile-mode defaults to "reduce-overhead" on CUDA: inductor plus CUDA graphs, because a T = 64 step
recurrence of small kernels is launch-bound at the batch sizes DRAW trains with; on CPU "default".

    python bench/bench_train.py                                    # CPU: 3 MNIST presets at their CPU batch (CPU_PLAN)
    python bench/bench_train.py --json train.json --plot train.png # CUDA: the default plan below
"""

import argparse
import resource
import sys
import time

import torch

import common
from draw import DRAW, PRESETS
from draw.step import TrainStep, resolve_step_mode

MODES = {  # mode: (attention backend, TrainStep mode)
    "reference": ("reference", "eager"),
    "reference-compiled": ("reference", "compile"),
    "triton": ("triton", "eager"),
    "triton-compiled": ("triton", "compile"),
    "triton-graph": ("triton", "cuda-graph"),
}
CUDA_ONLY_MODES = ("triton", "triton-compiled", "triton-graph")
AMPS = ("fp32", "bf16")
CPU_PLAN = {"mnist-quick": (128,), "mnist-paper": (64,), "mnist-noattn": (64,)}
CUDA_PLAN = {"mnist-paper": (256, 1024, 4096), "svhn-paper": (256, 1024), "cifar-paper": (256, 1024)}
FALLBACK_BATCHES = {"cpu": (64,), "cuda": (256, 1024)}  # a preset named in --presets but not in the plan


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: torch.cuda.max_memory_allocated since the case began. CPU: the process's max resident set
    (resource.getrusage ru_maxrss), which only grows, so it covers every case run so far in the process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / common.MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def skip_reason(mode: str, amp: str, device: torch.device, triton_reason: str | None) -> str | None:
    if device.type != "cuda" and mode in CUDA_ONLY_MODES:
        return f"mode {mode} needs CUDA"
    if device.type != "cuda" and amp != "fp32":
        return f"--amp {amp} is benchmarked on CUDA only"
    if mode.startswith("triton") and triton_reason:
        return f"mode {mode}: {triton_reason}"
    return None


def run_case(preset_name: str, batch: int, mode: str, amp: str, device: torch.device, args) -> dict:
    """Build the model and its TrainStep, run the warm-up steps (compiling or capturing), time the next steps."""
    preset = PRESETS[preset_name]
    backend, step_mode = MODES[mode]
    compile_mode = args.compile_mode if device.type == "cuda" else "default"

    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = DRAW(preset.model, backend=backend).to(device)
    train_step = TrainStep(model, lr=preset.train.lr, grad_clip=preset.train.grad_clip, amp="bf16" if amp == "bf16" else "none",
                           tf32=device.type == "cuda" and not args.no_tf32, mode=step_mode, compile_mode=compile_mode)
    if step_mode == "compile":
        torch.compiler.reset()
    cfg = preset.model
    shape = (batch, cfg.channels, cfg.height, cfg.width)
    batches = [torch.randint(0, 2, shape, device=device).float() for _ in range(2)]  # random binary images

    def step(i: int) -> torch.Tensor:
        return train_step(batches[i % 2], preset.train.lr)[0]

    warmup_steps, warmup_s = common.warm_up_step(step, lambda: train_step.settled, device, steps=args.warmup,
                                                 seconds=args.warmup_s)

    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    common.synchronize(device)
    elapsed = time.perf_counter() - t0

    result = {
        "preset": preset_name,
        "batch": batch,
        "mode": mode,
        "dtype": amp,
        "images_per_s": batch * args.steps / elapsed,
        "ms_per_step": 1e3 * elapsed / args.steps,
        "peak_mib": peak_memory_mib(device),
        "warmup_s": warmup_s,
        "final_loss": float(loss.float()),
        "steps": args.steps,
        "warmup_steps": warmup_steps,
        "compile_mode": compile_mode if step_mode == "compile" else None,
        # the step that ran: a capture or compile that failed falls back to "eager" (the mode's name then misleads)
        "step_mode": train_step.mode,
    }
    if train_step.mode != resolve_step_mode(step_mode, device):
        common.log(f"{preset_name} batch {batch} {mode} {amp}: the {step_mode} step fell back to {train_step.mode}; "
                   "its figures are the eager step's")
    del model, train_step, batches
    if step_mode == "compile":
        torch.compiler.reset()
    common.free_memory(device)
    return result


def add_speedups(rows: list[dict]) -> None:
    """speed-up: this row's images/s over the eager reference in fp32 at the same preset and batch."""
    baseline = {(r["preset"], r["batch"]): r["images_per_s"] for r in rows if r["mode"] == "reference" and r["dtype"] == "fp32"}
    for r in rows:
        base = baseline.get((r["preset"], r["batch"]))
        r["vs_reference"] = r["images_per_s"] / base if base else None


COLUMNS = (
    ("preset", "preset"),
    ("batch", "batch"),
    ("mode", "mode"),
    ("step_mode", "step that ran"),
    ("dtype", "dtype"),
    ("images_per_s", "images/s"),
    ("ms_per_step", "ms/step"),
    ("peak_mib", "peak MiB"),
    ("vs_reference", "x reference"),
    ("warmup_s", "warm-up s"),
    ("final_loss", "loss"),
)


def plot(rows: list[dict], path: str) -> None:
    """Speed-up over the fp32 eager reference against batch size, one panel per preset."""
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = common.panels(len(presets), 4)
    for ax, preset in zip(axes, presets):
        panel = [r for r in rows if r["preset"] == preset and r["vs_reference"] is not None]
        for mode in MODES:
            for amp in AMPS:
                line = sorted((r["batch"], r["vs_reference"]) for r in panel if r["mode"] == mode and r["dtype"] == amp)
                if line:
                    ax.plot(*zip(*line), "o-", label=f"{mode} {amp}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("speed-up over reference eager fp32")
        ax.set_title(preset)
    common.save_panels(fig, axes, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", type=common.split_list, default=None,
                   help=f"comma-separated names from draw.config.PRESETS; default on CPU {','.join(CPU_PLAN)}, "
                   f"on CUDA {','.join(CUDA_PLAN)} (missing presets are skipped with a message)")
    p.add_argument("--batch-sizes", type=lambda s: [int(b) for b in common.split_list(s)], default=None,
                   help="comma-separated batch sizes for every preset; default per preset: CPU mnist-quick 128, others 64, "
                   "CUDA mnist-paper 256,1024,4096 and the colour presets 256,1024")
    p.add_argument("--modes", type=common.split_list, default=None,
                   help=f"comma-separated from {','.join(MODES)}; default reference on CPU, "
                   "reference,triton,triton-graph,triton-compiled on CUDA")
    p.add_argument("--amp", type=common.split_list, default=None,
                   help="comma-separated dtypes: fp32 (TF32 matmuls on CUDA) and/or bf16 (autocast, CUDA only); "
                   "default fp32 on CPU, fp32,bf16 on CUDA")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode of the compiled modes on CUDA (CPU always uses default)")
    p.add_argument("--no-tf32", action="store_true", help="CUDA: keep fp32 matmuls in full fp32 (no TF32)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (they include compiling); default 2 CPU, 5 CUDA")
    p.add_argument("--warmup-s", type=float, default=None,
                   help="keep warming up until the compiled or captured step has run this many seconds; default 0 CPU, 3 CUDA (an H100 "
                   "idles at 345 MHz: 20 steps timed after 3 from idle ran mnist-paper at batch 1024 at 2/3 of its speed)")
    p.add_argument("--steps", type=int, default=None, help="timed steps; default 5 CPU, 50 CUDA")
    common.add_run_arguments(p, seed_help="seed of the model's initial weights and the random images",
                             plot_help="write a PNG of the speed-up over batch size to PATH")
    args = p.parse_args(argv)
    if args.batch_sizes is not None and (not args.batch_sizes or min(args.batch_sizes) < 1):
        p.error("--batch-sizes: each must be >= 1")
    if (args.steps is not None and args.steps < 1) or (args.warmup is not None and args.warmup < 0):
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.warmup_s is not None and args.warmup_s < 0:
        p.error("--warmup-s must be >= 0")
    for flag, values, allowed in (("--modes", args.modes or [], MODES), ("--amp", args.amp or [], AMPS)):
        common.check_choices(p, flag, values, allowed)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    common.set_cpu_threads(args.threads, device)
    cuda = device.type == "cuda"
    plan = CUDA_PLAN if cuda else CPU_PLAN
    presets = args.presets or list(plan)
    modes = args.modes or (["reference", "triton", "triton-graph", "triton-compiled"] if cuda else ["reference"])
    amps = args.amp or (["fp32", "bf16"] if cuda else ["fp32"])
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.warmup_s = args.warmup_s if args.warmup_s is not None else (3.0 if cuda else 0.0)
    args.steps = args.steps if args.steps is not None else (50 if cuda else 5)
    triton_reason = common.triton_skip_reason(device) if any(m.startswith("triton") for m in modes) else None

    memory = "torch.cuda.max_memory_allocated per case" if cuda else "process max RSS (getrusage ru_maxrss), cumulative over the run"
    meta = common.metadata(
        device,
        tf32=bool(cuda and not args.no_tf32),
        compile_mode=args.compile_mode if cuda else "default",
        warmup_steps=args.warmup,
        warmup_s=args.warmup_s,
        timed_steps=args.steps,
        peak_memory=memory,
    )

    rows, skipped = [], []

    def skip(preset, batch, mode, amp, reason):
        common.log(f"SKIPPED {preset} {batch or ''} {mode or ''} {amp or ''}: {reason}".replace("  ", " "))
        skipped.append({"preset": preset, "batch": batch, "mode": mode, "dtype": amp, "reason": reason})

    def measure():
        for preset in presets:
            if preset not in PRESETS:
                skip(preset, None, None, None, f"not in draw.config.PRESETS ({', '.join(sorted(PRESETS))})")
                continue
            for batch in args.batch_sizes or plan.get(preset, FALLBACK_BATCHES[device.type]):
                for mode in modes:
                    for amp in amps:
                        reason = skip_reason(mode, amp, device, triton_reason)
                        if reason:
                            skip(preset, batch, mode, amp, reason)
                            continue
                        try:
                            row = run_case(preset, batch, mode, amp, device, args)
                        except Exception as error:  # one failing case must not end the run
                            row = None
                            reason = "out of memory" if common.is_out_of_memory(error) else f"{type(error).__name__}: {error}"
                        if row is None:  # out of the except block: its traceback no longer holds the case's tensors
                            torch.compiler.reset()
                            common.free_memory(device)
                            skip(preset, batch, mode, amp, reason.splitlines()[0][:300])
                            continue
                        rows.append(row)
                        add_speedups(rows)
                        if args.json:  # after every case: a run stopped by a time limit keeps what it measured
                            common.write_json(args.json, {**meta, "partial": True}, rows, skipped=skipped)
                        common.log(
                            f"{preset} batch {batch} {mode} {amp}: {row['images_per_s']:,.0f} images/s, "
                            f"{row['ms_per_step']:.1f} ms/step, peak {row['peak_mib']:,.0f} MiB"
                        )

    interrupted = common.measured_until_interrupted(measure, meta, rows)  # the tables below: what was measured
    add_speedups(rows)

    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']}")
    print(f"peak memory: {memory}")
    if rows:
        print(common.text_table(rows, COLUMNS))
    if skipped:
        print(f"\nskipped {len(skipped)} case(s):\n" + "\n".join(sorted({f"  {s['reason']}" for s in skipped})))

    if args.json:
        common.write_json(args.json, meta, rows, skipped=skipped)
    if args.markdown:
        notes = [f"Peak memory: {memory}."] + [f"Skipped: {r}" for r in sorted({s["reason"] for s in skipped})]
        common.write_markdown(args.markdown, "DRAW training-step benchmark", meta, [("Training step", common.markdown_table(rows, COLUMNS))], notes)
    if args.plot:
        if rows:
            plot(rows, args.plot)
        else:
            common.log("--plot: no results to plot")
    return common.EXIT_INTERRUPTED if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
