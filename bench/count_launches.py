"""The kernels one DRAW training step launches on a GPU, counted on a CPU.

Replayed as one CUDA graph, a training step is GPU-bound and its kernels are small: at batch 100 most
of its time is the fixed cost of each kernel, so the number of kernels sets the speed (bench/RESULTS.md,
"Where a CUDA-graph step's time goes"). This script counts them without a GPU: it runs one step of the
model with the fused attention ("triton" backend) on CPU tensors and counts every operation the step
dispatches that would launch a kernel on CUDA:
    - each Triton kernel launch (kernels/triton_*.py, the LSTM cell's included) counts once; here the
      kernels are stand-ins that launch nothing (no interpreter runs), while their launchers' own
      operations (allocating, summing per-channel partials, casting) run and are counted;
    - views (view, split, t, expand, ...) and empty allocations launch nothing and are not counted;
    - Adam runs as the CUDA-graph step runs it (draw.step.adam: fused; --adam foreach: torch's foreach
      form, capturable with a tensor learning rate, as that step ran it before); the forward draws its own
      latent noise.
Not seen: kernels that cuBLAS adds inside one product (split-K reductions, often after a product with a
long inner dimension, such as a weight gradient). Counts are per phase and per time step T.

    python bench/count_launches.py --preset mnist-paper --batch 8 --json bench/results/launches-cpu.json
"""

import argparse
import collections
import contextlib
import sys
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import common
from draw import DRAW, kernels
from draw.config import PRESETS
from draw.kernels import triton_attention as ta
from draw.kernels import triton_latent as tlat
from draw.kernels import triton_lstm as tlstm
from draw.step import adam

NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "split", "split_with_sizes", "chunk",
             "unbind", "slice", "select", "as_strided", "unsqueeze", "squeeze", "alias", "detach", "unflatten",
             "flatten", "reshape", "_reshape_alias", "empty", "empty_like", "empty_strided", "new_empty", "lift_fresh",
             "_local_scalar_dense", "set_", "is_same_size", "_record_function_enter_new", "_record_function_exit"}


class Launches(TorchDispatchMode):
    """Counts the operations dispatched at the top level; inside `one_kernel(name)` only that name, once."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside and name not in NO_KERNEL:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def one_kernel(self, name: str):
        if not self.inside:
            self.counts[name] += 1
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1


COUNTER: Launches | None = None


class StandInKernel:
    """A @triton.jit kernel's stand-in: `kernel[grid](*args, **meta)` counts one launch and does nothing."""

    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, grid):
        def launch(*args, **meta):
            if COUNTER is not None:
                COUNTER.counts[self.name] += 1
        return launch


TRITON_KERNELS = {ta: ("_attention_read_forward_kernel", "_attention_read_backward_kernel",
                       "_attention_write_forward_kernel", "_attention_write_backward_kernel"),
                  tlat: ("_latent_forward_kernel", "_latent_backward_kernel"),
                  tlstm: ("_lstm_forward_kernel", "_lstm_backward_kernel")}


def patches():
    """Every Triton kernel a stand-in that launches nothing; the devices' checks pass on the CPU (the kernels',
    and capturable Adam's)."""
    stand_ins = [mock.patch.object(module, name, StandInKernel(name.strip("_").removesuffix("_kernel")))
                 for module, names in TRITON_KERNELS.items() for name in names]
    capturable_on_cpu = mock.patch("torch.optim.adam._get_capturable_supported_devices",
                                   lambda supports_xla=True: ["cpu"])
    return [*stand_ins, mock.patch.object(kernels, "_triton_interpreter", lambda: True), capturable_on_cpu]


def graph_step_adam(params, form: str) -> torch.optim.Adam:
    """Adam as the CUDA-graph step makes it: "fused" (draw.step.adam), or "foreach": torch's foreach form,
    capturable, with a tensor learning rate (on a CPU only under patches(), which lift its device check)."""
    if form == "fused":
        return adam(params, 1e-3, fused=True)
    return torch.optim.Adam(params, lr=torch.tensor(1e-3), capturable=True, foreach=True)


def count_step(preset: str, batch: int, amp: str = "fp32", adam_form: str = "fused") -> dict[str, collections.Counter]:
    """Per phase (forward, backward, optimizer), the launches of one training step after a first one;
    amp "bf16": the forward under bf16 autocast without its cache, as a CUDA graph captures it; adam_form:
    see graph_step_adam."""
    global COUNTER
    config = PRESETS[preset].model
    torch.manual_seed(0)
    model = DRAW(config, backend="triton")
    optimizer = graph_step_adam(model.parameters(), adam_form)
    x = torch.bernoulli(torch.full((batch, config.channels, config.height, config.width), 0.3))
    phases = {}

    def phase(name, fn):
        global COUNTER
        with Launches() as COUNTER:
            result = fn()
        phases[name], COUNTER = COUNTER.counts, None
        return result

    with contextlib.ExitStack() as stack:
        for patch in patches():
            stack.enter_context(patch)
        for counted in (False, True):  # the first step allocates Adam's state
            optimizer.zero_grad(set_to_none=True)
            run = phase if counted else (lambda name, fn: fn())
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False, enabled=amp == "bf16"):
                out = run("forward", lambda: model(x))  # the latent noise drawn inside, counted
            run("backward", lambda: out.loss.backward())
            run("optimizer", lambda: (torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0), optimizer.step()))
    return phases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mnist-paper", choices=sorted(PRESETS), help="a DRAW preset")
    parser.add_argument("--batch", type=int, default=8, help="batch size (counts do not depend on it)")
    parser.add_argument("--amp", default="fp32", choices=("fp32", "bf16"), help="bf16: the forward under bf16 autocast")
    parser.add_argument("--adam", default="fused", choices=("fused", "foreach"),
                        help="Adam's form: fused (the training step's on CUDA) or foreach (capturable, as before)")
    parser.add_argument("--top", type=int, default=12, help="how many operations to list per phase")
    parser.add_argument("--json", metavar="PATH", help="write the counts as JSON here")
    args = parser.parse_args(argv)
    if not hasattr(PRESETS[args.preset].model, "T"):
        parser.error(f"--preset {args.preset} is not a DRAW preset")
    T = PRESETS[args.preset].model.T
    phases = count_step(args.preset, args.batch, args.amp, args.adam)
    rows = [{"phase": name, "launches": sum(c.values()), "per time step": round(sum(c.values()) / T, 1),
             "most frequent": ", ".join(f"{op} {n}" for op, n in c.most_common(args.top))} for name, c in phases.items()]
    total = sum(row["launches"] for row in rows)
    rows.append({"phase": "step", "launches": total, "per time step": round(total / T, 1), "most frequent": ""})
    print(f"{args.preset}, T = {T}, {args.amp}: kernels one training step launches on CUDA (counted on CPU)")
    print(common.text_table(rows, [("phase", "phase"), ("launches", "launches"), ("per time step", "per time step"),
                                   ("most frequent", "most frequent")]))
    if args.json:
        meta = common.metadata(torch.device("cpu"), command=" ".join(["python", *sys.argv]), preset=args.preset, batch=args.batch,
                                amp=args.amp, adam=args.adam)
        common.write_json(args.json, meta, rows, counts={name: dict(c) for name, c in phases.items()})


if __name__ == "__main__":
    main()
