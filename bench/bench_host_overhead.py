"""Host time per fused attention call, with the GPU work left out: what eager training on a GPU waits for.

Eager DRAW training on a GPU is host-bound: every one of the T steps calls its attention, forward and
backward, through kernels.read / kernels.write / kernels.write_read (validation), autograd and a kernel
launch. This benchmark times that host path on the CPU with the launchers of kernels/triton_attention.py
replaced by stand-ins that allocate the outputs and launch nothing, for both autograd paths:
    function   torch.autograd.Function, what eager code runs
    custom-op  the torch.library custom ops, what torch.compile traces (forced here in eager)
Not included: Triton's own launch (argument binding, the driver call), which needs a GPU.
Times are medians over blocks of --calls calls, in microseconds per call; "fwd+bwd" is the forward
with grad, out.sum() and torch.autograd.grad. "write-read" is one kernels.write_read call (DRAW's step),
"write+read" the same maths as a write and then a read (what it replaces); both sum their two outputs
in either mode. The per-step lines multiply read and write fwd+bwd, and write-read fwd+bwd, by T.

    python bench/bench_host_overhead.py --json bench/results/host-overhead-cpu.json --markdown bench/results/host-overhead-cpu.md
"""

import argparse
import sys
from unittest import mock

import torch

import common
from draw import kernels
from draw.config import PRESETS
from draw.kernels import triton_attention as ta

PATHS = ("function", "custom-op")
OPS = ("read", "glimpse", "write", "write-read", "write+read")
MODES = ("fwd", "fwd+bwd")


def stand_ins(path: str):
    """Patches: launchers that launch nothing (the custom ops' fake implementations, which allocate the
    outputs), CPU tensors accepted, and the autograd path chosen."""
    def read_fake(x, canvas, params, n, dtype=None):  # the glimpses in x's dtype: none is asked for here
        return ta._read_fake(x, canvas, params, n)

    def write_read_fake(patch, write_params, canvas, x, read_params, n, dtype=None):
        return ta._write_read_fake(patch, write_params, canvas, x, read_params, n)

    def without_places(fake):  # the eager backward names where its gradients go; a fake allocates them
        return lambda *args, places=None: fake(*args)

    return [mock.patch.object(ta, "attention_read_forward", read_fake),
            mock.patch.object(ta, "attention_write_read_forward", write_read_fake),
            mock.patch.object(ta, "attention_write_read_backward", without_places(ta._write_read_backward_fake)),
            mock.patch.object(ta, "attention_read_backward", ta._read_backward_fake),
            mock.patch.object(ta, "attention_write_forward", ta._write_fake),
            mock.patch.object(ta, "attention_write_backward", without_places(ta._write_backward_fake)),
            mock.patch.object(kernels, "_triton_interpreter", lambda: True),  # the device check passes on CPU
            mock.patch.object(ta, "_use_custom_ops", lambda: path == "custom-op")]


def calls(op: str, mode: str, tensors: dict, read_n: int):
    """A zero-argument callable making one call of `op` in `mode`, as DRAW's training step does."""
    x, canvas, params, patch = (tensors[k] for k in ("x", "canvas", "params", "patch"))
    if op == "read":
        def forward():
            return kernels.read(x, canvas, params, read_n, backend="triton")
        leaves = [canvas, params]
    elif op == "glimpse":
        def forward():
            return kernels.glimpse(x, params, read_n, backend="triton")
        leaves = [params]
    elif op == "write-read":
        def forward():
            new_canvas, glimpses = kernels.write_read(patch, params, canvas, x, params, read_n, backend="triton")
            return new_canvas.sum() + glimpses.sum()
        leaves = [patch, params, canvas]
    elif op == "write+read":
        def forward():
            new_canvas = kernels.write(patch, params, canvas, backend="triton")
            return new_canvas.sum() + kernels.read(x, new_canvas, params, read_n, backend="triton").sum()
        leaves = [patch, params, canvas]
    else:
        def forward():
            return kernels.write(patch, params, canvas, backend="triton")
        leaves = [patch, params, canvas]
    if mode == "fwd":
        return forward
    return lambda: torch.autograd.grad(forward().sum(), leaves)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mnist-paper", help="the model whose sizes and T are used (default mnist-paper)")
    parser.add_argument("--batch", type=int, default=100, help="batch size of the stand-in tensors (default 100)")
    parser.add_argument("--calls", type=int, default=200, help="calls per timed block (default 200)")
    parser.add_argument("--reps", type=int, default=20, help="timed blocks (default 20)")
    parser.add_argument("--json", metavar="PATH", help="write the rows and metadata here")
    parser.add_argument("--markdown", metavar="PATH", help="write a markdown report here")
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        parser.error(f"--preset: unknown {args.preset!r}; one of {', '.join(PRESETS)}")
    model = PRESETS[args.preset].model
    torch.set_num_threads(1)
    shape = (args.batch, model.channels, model.height, model.width)
    tensors = {"x": torch.rand(shape), "canvas": torch.randn(shape, requires_grad=True),
               "params": torch.randn(args.batch, 5, requires_grad=True),
               "patch": torch.randn(args.batch, model.channels, model.write_n, model.write_n, requires_grad=True)}
    rows = []
    for path in PATHS:
        patches = stand_ins(path)
        for patch in patches:
            patch.start()
        try:
            for op in OPS:
                for mode in MODES:
                    fn = calls(op, mode, tensors, model.read_n)

                    def block(fn=fn):
                        for _ in range(args.calls):
                            fn()

                    us = 1e3 * common.cpu_median_ms(block, warmup=1, reps=args.reps, budget_s=30.0) / args.calls
                    rows.append({"op": op, "mode": mode, "path": path, "us_per_call": round(us, 2)})
                    common.log(f"{op} {mode} {path}: {us:.1f} us per call")
        finally:
            for patch in patches:
                patch.stop()
    def per_step_ms(ops):
        return {path: model.T * sum(r["us_per_call"] for r in rows if r["path"] == path and r["mode"] == "fwd+bwd"
                                    and r["op"] in ops) / 1e3 for path in PATHS}

    per_step, fused_step = per_step_ms(("read", "write")), per_step_ms(("write-read",))
    summary = "\n".join(
        f"{args.preset} (T = {model.T}): attention host time per training step, {what}: "
        + ", ".join(f"{path} {ms:.2f} ms" for path, ms in step.items())
        for what, step in (("read and write fwd+bwd", per_step), ("write-read fwd+bwd", fused_step)))
    columns = [("op", "op"), ("mode", "mode"), ("path", "autograd path"), ("us_per_call", "us per call")]
    print(common.text_table(rows, columns))
    print(summary)
    meta = common.metadata(torch.device("cpu"), preset=args.preset, batch=args.batch, threads=1)
    if args.json:
        common.write_json(args.json, meta, rows, per_step_ms=per_step, write_read_per_step_ms=fused_step)
    if args.markdown:
        common.write_markdown(args.markdown, "Host time per fused attention call (launches stubbed out)", meta,
                              [("Calls", common.markdown_table(rows, columns))], [summary])
    return 0


if __name__ == "__main__":
    sys.exit(main())
