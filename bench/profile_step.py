"""Where a training step's time goes: torch.profiler over a few steps of draw.step.TrainStep.

Prints, per mode, the wall time per step, the device time per step (the sum of the GPU kernels' times)
and the kernels that take the most device time. Wall time far above device time means the step is
host-bound (launches, Python); device time near wall time means the kernels themselves set the pace.

    python bench/profile_step.py --batch 1024 --modes triton,triton-graph          # CUDA
    python bench/profile_step.py --device cpu --preset mnist-quick --batch 16 --modes reference --steps 1
"""

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import common
from bench_train import MODES
from draw import DRAW, PRESETS
from draw.step import TrainStep


def kernel_table(prof, device_type: str, top: int) -> tuple[float, list[dict]]:
    """(total self device time in ms, the `top` events by self device time) of a finished profile."""
    events = [e for e in prof.key_averages() if e.device_type.name == device_type.upper() or device_type == "cpu"]
    attr = "self_cpu_time_total" if device_type == "cpu" else "self_device_time_total"
    events = [e for e in events if getattr(e, attr) > 0]
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    total_ms = sum(getattr(e, attr) for e in events) / 1e3
    rows = [{"kernel": e.key[:90], "calls": e.count, "ms": getattr(e, attr) / 1e3} for e in events[:top]]
    return total_ms, rows


def profile_mode(preset_name: str, batch: int, mode: str, amp: str, device: torch.device, args) -> dict:
    preset = PRESETS[preset_name]
    backend, step_mode = MODES[mode]
    torch.manual_seed(0)
    model = DRAW(preset.model, backend=backend).to(device)
    step = TrainStep(model, lr=preset.train.lr, grad_clip=preset.train.grad_clip, amp=amp,
                     tf32=device.type == "cuda", mode=step_mode)
    cfg = preset.model
    images = torch.randint(0, 2, (batch, cfg.channels, cfg.height, cfg.width), device=device).float()
    # the CUDA graph captured, or the step compiled, then run for a while (the GPU's clocks ramp up) before profiling
    common.warm_up_step(lambda i: step(images, preset.train.lr), lambda: step.settled, device, steps=args.warmup,
                        seconds=args.warmup_s if args.warmup_s is not None else (2.0 if device.type == "cuda" else 0.0))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step(images, preset.train.lr)
        common.synchronize(device)
        wall_ms = 1e3 * (time.perf_counter() - start) / args.steps
    total_ms, rows = kernel_table(prof, device.type, args.top)
    if not rows:  # e.g. a CUDA graph replayed under a profiler that records none of its kernels: no figure, not 0
        raise RuntimeError(f"the profiler recorded no {device.type} kernel in {args.steps} {mode} steps; nothing to report")
    return {"mode": mode, "amp": amp, "batch": batch, "step_mode": step.mode, "wall_ms_per_step": wall_ms,
            "device_ms_per_step": total_ms / args.steps,
            "kernels": [{**r, "ms_per_step": r["ms"] / args.steps} for r in rows]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="mnist-paper", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--modes", type=common.split_list, default=["triton", "triton-graph"], help=f"of {sorted(MODES)}")
    p.add_argument("--amp", default="none", choices=("none", "bf16"))
    p.add_argument("--warmup", type=int, default=3, help="steps before profiling (compiles, captures)")
    p.add_argument("--warmup-s", type=float, default=None,
                   help="seconds of the compiled or captured step before profiling; default 2 on CUDA, 0 on CPU")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--top", type=int, default=15, help="kernels listed per mode")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        # the profiler's CUDA tracing started before any graph is captured: a graph captured first may replay
        # under a later profiler with none of its kernels recorded, or fail (torch's "CUDA graph profiling" notes)
        init_for_graphs = getattr(torch.profiler._utils, "_init_for_cuda_graphs", None)  # private: may go away
        if init_for_graphs is not None:
            init_for_graphs()
    meta = common.metadata(device, preset=args.preset)
    results = []
    for mode in args.modes:
        r = profile_mode(args.preset, args.batch, mode, args.amp, device, args)
        results.append(r)
        print(f"\n{args.preset} batch {args.batch} {mode} {args.amp}: wall {r['wall_ms_per_step']:.2f} ms/step, "
              f"device {r['device_ms_per_step']:.2f} ms/step")
        print(common.text_table(r["kernels"], [("kernel", "kernel"), ("calls", "calls"), ("ms_per_step", "ms/step")]))
        if args.json:  # after every mode: a run stopped by a time limit keeps what it profiled
            last = len(results) == len(args.modes)
            common.write_json(args.json, meta if last else {**meta, "partial": True}, results)


if __name__ == "__main__":
    sys.exit(main())
