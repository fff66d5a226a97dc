"""Benchmark DRAW's attention read and write (Eqs. 27 and 29): GB/s per provider, as in the Triton tutorials.

Ops: read, write, and write-read (kernels.write_read: a write, then a read of the new canvas, as DRAW
makes them from one step to the next; the read's grid is the size's read N, the write's its write N).
Providers, all measured in one run on the same inputs:
    eager     kernels.read / kernels.write / kernels.write_read with backend="reference" (batched PyTorch)
    compiled  torch.compile(dynamic=False) of a function calling the reference backend
    triton    backend="triton", the fused kernels; CUDA only (skipped with a message otherwise)
    triton-sum  the same kernels forced to contract by broadcast-and-sum (DRAW_TRITON_CONTRACTION=sum),
              where "triton" takes tl.dot from N >= 5 (kernels/triton_attention.py): the two forms side by side
    triton-ahead  the same kernels with each row loop loading one block ahead (DRAW_TRITON_LAUNCH=LOAD_AHEAD=1,
              after any launch settings the run set), against "triton" in its "x triton" column; only when
              --providers names it
    triton-pair  write-read only: the fused write and the fused read as two ops (two launches each way and
              autograd's add of the canvas's two gradients), what write_read replaces
Modes: "fwd" (forward alone) and "fwd+bwd" (forward, then torch.autograd.grad with a fixed random grad_out).

GB/s = the fewest bytes the op must move (read_bytes / write_bytes below) / the median time; the run also
measures the device's copy bandwidth (dst.copy_(src)) and reports GB/s as a percentage of it.

    python bench/bench_attention.py                          # CPU: the small sizes, eager and compiled
    python bench/bench_attention.py --sizes launch,middle,bandwidth --json out.json --plot out.png  # GPU
"""

import argparse
import os
import sys
from dataclasses import dataclass
from unittest import mock

import torch

import common
from draw import kernels

OPS = ("read", "write", "write-read")
MODES = ("fwd", "fwd+bwd")
PROVIDERS = ("eager", "compiled", "triton", "triton-sum", "triton-ahead", "triton-pair")
TRITON_PROVIDERS = ("triton", "triton-sum", "triton-ahead", "triton-pair")
DEFAULT_PROVIDERS = [p for p in PROVIDERS if p != "triton-ahead"]  # triton-ahead only when asked for: at 28x28
# the forward loops run one trip, where it launches the same kernels as triton
VARIANTS = ("triton-sum", "triton-ahead")  # the fused kernels launched otherwise: their rows say "x triton"
ONLY_FOR = {"triton-pair": "write-read"}  # providers that run one op alone
REL_ERR_WARN = 1e-3  # a provider whose forward differs from eager by more than this (relative) is flagged


@dataclass(frozen=True)
class Size:
    group: str  # "small" (CPU default), "launch", "middle" or "bandwidth"
    batch: int
    channels: int
    height: int
    width: int
    read_n: int
    write_n: int

    @property
    def name(self) -> str:
        return f"{self.batch}x{self.channels}x{self.height}x{self.width}"

    def n(self, op: str) -> int:
        """The op's grid (write-read: the read's; its write takes write_n)."""
        return self.write_n if op == "write" else self.read_n


SIZES = (
    # small: the CPU default, to check the script (MNIST and CIFAR shapes at small batches)
    Size("small", 64, 1, 28, 28, 2, 5),
    Size("small", 256, 1, 28, 28, 2, 5),
    Size("small", 64, 3, 32, 32, 5, 5),
    Size("small", 256, 3, 32, 32, 5, 5),
    # launch-bound: the MNIST model (read 2x2, write 5x5) at training batch sizes (100: the paper's)
    Size("launch", 100, 1, 28, 28, 2, 5),
    Size("launch", 256, 1, 28, 28, 2, 5),
    Size("launch", 1024, 1, 28, 28, 2, 5),
    # middle: CIFAR-10 (5x5) at a large batch
    Size("middle", 4096, 3, 32, 32, 5, 5),
    # bandwidth-bound: SVHN crops and cluttered MNIST (12x12) at very large batches
    Size("bandwidth", 16384, 3, 54, 54, 12, 12),
    Size("bandwidth", 65536, 3, 54, 54, 12, 12),
    Size("bandwidth", 16384, 1, 100, 100, 12, 12),
    Size("bandwidth", 65536, 1, 100, 100, 12, 12),
)
GROUPS = ("small", "launch", "middle", "bandwidth")
# On CUDA, the timers: "wall" times calls back to back (the host's launches included: what a training loop
# sees) where a call is shorter than its launch; "do_bench" (triton's, which flushes the L2 cache before each
# call) where it is long enough that the launch hides under the flush; "cudagraph" replays a CUDA graph of
# calls on rotating input sets (`common.rotation`): the device's time alone, read from memory, not the cache.
WALL_GROUPS = ("small", "launch")
CUDAGRAPH_GROUPS = ("small", "launch", "middle")


# ---------------------------------------------------------------------------------------------
# Bytes: what each op must move at the least
# ---------------------------------------------------------------------------------------------


def read_bytes(size: Size, mode: str, element_size: int = 4) -> int:
    """Fewest bytes the read moves: each input read once, each output written once.

    With I = B*C*H*W image elements and G = B*2*C*N*N glimpse elements:
        fwd     in:  x (I), canvas (I), params (5B)              out: glimpses (G)
        bwd     in:  x (I), canvas (I), params (5B), grad_out (G) out: grad_canvas (I), grad_params (5B)
        fwd+bwd = fwd + bwd = 5I + 2G + 15B elements.
    No grad_x: x is the data in DRAW and never requires grad, so the benchmark does not ask for it.
    The backward recomputes the filterbanks from params instead of reading saved activations, so
    only the inputs count; a kernel that saves and re-reads more is charged for it by a lower GB/s.
    """
    b, c, h, w, n = size.batch, size.channels, size.height, size.width, size.read_n
    image, glimpse, params = b * c * h * w, b * 2 * c * n * n, b * 5
    fwd = 2 * image + params + glimpse
    bwd = 2 * image + params + glimpse + image + params
    return element_size * (fwd if mode == "fwd" else fwd + bwd)


def write_bytes(size: Size, mode: str, element_size: int = 4) -> int:
    """Fewest bytes the write moves: each input read once, each output written once.

    With I = B*C*H*W canvas elements and P = B*C*N*N patch elements:
        fwd     in:  canvas (I), patch (P), params (5B)             out: new canvas (I)
        bwd     in:  grad_out (I), patch (P), params (5B)           out: grad_patch (P), grad_params (5B)
        fwd+bwd = fwd + bwd = 3I + 3P + 15B elements.
    grad_canvas is not counted: the write adds to the canvas, so grad_canvas IS grad_out (autograd
    passes the same tensor on, no copy). A backward that copies it pays 2I more bytes, uncounted, and
    shows as lower GB/s. The canvas itself is not needed by the backward.
    """
    b, c, h, w, n = size.batch, size.channels, size.height, size.width, size.write_n
    canvas, patch, params = b * c * h * w, b * c * n * n, b * 5
    fwd = canvas + patch + params + canvas
    bwd = canvas + patch + params + patch + params
    return element_size * (fwd if mode == "fwd" else fwd + bwd)


def write_read_bytes(size: Size, mode: str, element_size: int = 4) -> int:
    """Fewest bytes the write, then read, moves as one op: each input read once, each output written once.

    With I = B*C*H*W image elements, P = B*C*N^*N^ patch and G = B*2*C*N*N glimpse elements:
        fwd  in:  canvas (I), x (I), patch (P), both params (10B)       out: new canvas (I), glimpses (G)
        bwd  in:  grad of the new canvas (I), grad_glimpses (G), x (I), the new canvas (I), patch (P),
                  both params (10B)                    out: grad_canvas (I), grad_patch (P), grad params (10B)
        fwd+bwd = 7I + 3P + 2G + 30B elements (the pair of ops as DRAW ran them: 12I, counting the add).
    """
    b, c, h, w = size.batch, size.channels, size.height, size.width
    image, patch, params = b * c * h * w, b * c * size.write_n ** 2, b * 5
    glimpse = b * 2 * c * size.read_n ** 2
    fwd = 3 * image + patch + glimpse + 2 * params
    bwd = 4 * image + glimpse + 2 * patch + 4 * params
    return element_size * (fwd if mode == "fwd" else fwd + bwd)


BYTES = {"read": read_bytes, "write": write_bytes, "write-read": write_read_bytes}


# ---------------------------------------------------------------------------------------------
# Cases: inputs and the function each provider runs
# ---------------------------------------------------------------------------------------------


def make_inputs(op: str, size: Size, mode: str, device: torch.device, seed: int = 0) -> dict:
    """Inputs of one case: tensors, the grid size, which tensors need grads, and a fixed grad_out.

    x is binary like the data, canvas and patch standard normal, params 0.5 * N(0, 1) (windows near
    the centre, of moderate width); fwd+bwd asks for the gradients DRAW trains with (not x's).
    """
    gen = torch.Generator(device=device).manual_seed(seed)  # made on the device: no idle GPU while the host makes them
    b, c, h, w, n = size.batch, size.channels, size.height, size.width, size.n(op)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    params = 0.5 * randn(b, 5)
    canvas = randn(b, c, h, w)
    if op == "read":
        x = torch.randint(0, 2, (b, c, h, w), generator=gen, device=device).float()
        tensors = {"x": x, "canvas": canvas, "params": params}
        grad_names = ("canvas", "params")
        out_shape = (b, 2, c, n, n)
    elif op == "write-read":
        x = torch.randint(0, 2, (b, c, h, w), generator=gen, device=device).float()
        tensors = {"patch": randn(b, c, size.write_n, size.write_n), "write_params": params, "canvas": canvas,
                   "x": x, "read_params": 0.5 * randn(b, 5)}
        grad_names = ("patch", "write_params", "canvas", "read_params")
        out_shape = ((b, c, h, w), (b, 2, c, n, n))  # (new canvas, glimpses)
    else:
        tensors = {"patch": randn(b, c, n, n), "params": params, "canvas": canvas}
        grad_names = ("patch", "params", "canvas")
        out_shape = (b, c, h, w)
    if mode == "fwd":
        grad_names = ()
    for name in grad_names:
        tensors[name].requires_grad_(True)
    grad_out = None
    if grad_names:  # one per output
        grad_out = tuple(randn(*shape) for shape in out_shape) if op == "write-read" else randn(*out_shape)
    return {"op": op, "n": n, "tensors": tensors, "grad_names": grad_names, "grad_out": grad_out}


def _read_reference(x, canvas, params, n):
    return kernels.read(x, canvas, params, n, backend="reference")


def _write_reference(patch, params, canvas):
    return kernels.write(patch, params, canvas, backend="reference")


def _write_read_reference(patch, write_params, canvas, x, read_params, n):
    return kernels.write_read(patch, write_params, canvas, x, read_params, n, backend="reference")


def flat(out) -> torch.Tensor:
    """An op's output as one tensor, for one relative error (never timed): write-read's two outputs (new
    canvas, glimpses) as one [B, C*H*W + 2*C*N*N]; the others' as they are."""
    if isinstance(out, torch.Tensor):
        return out
    return torch.cat([part.flatten(1) for part in out], dim=1)


def forward_fn(provider: str, case: dict):
    """A zero-argument callable running the forward of `case` with `provider`."""
    return bind(provider_ops(provider), case)


def provider_ops(provider: str) -> tuple:
    """(read, write, write_read) as `provider` runs them; "compiled" compiles afresh (once for every case bound
    to these ops: they share its shapes)."""
    if provider == "compiled":
        torch.compiler.reset()  # a fresh, shape-specialised compile per case (no recompile limit hit)
        read_op = torch.compile(_read_reference, dynamic=False)
        write_op = torch.compile(_write_reference, dynamic=False)
        write_read_op = torch.compile(_write_read_reference, dynamic=False)
    else:
        backend = "reference" if provider == "eager" else "triton"

        def read_op(x, canvas, params, n):
            return kernels.read(x, canvas, params, n, backend=backend)

        def write_op(patch, params, canvas):
            return kernels.write(patch, params, canvas, backend=backend)

        def write_read_op(patch, write_params, canvas, x, read_params, n):
            if provider == "triton-pair":  # the two fused ops, as DRAW ran them before write_read
                new_canvas = write_op(patch, write_params, canvas)
                return new_canvas, read_op(x, new_canvas, read_params, n)
            return kernels.write_read(patch, write_params, canvas, x, read_params, n, backend=backend)

    return read_op, write_op, write_read_op


def bind(ops: tuple, case: dict):
    """A zero-argument callable running the forward of `case` with provider_ops' `ops`."""
    read_op, write_op, write_read_op = ops
    t = case["tensors"]
    if case["op"] == "read":
        return lambda: read_op(t["x"], t["canvas"], t["params"], case["n"])
    if case["op"] == "write-read":
        names = ("patch", "write_params", "canvas", "x", "read_params")
        return lambda: write_read_op(*(t[name] for name in names), case["n"])  # (new canvas, glimpses)
    return lambda: write_op(t["patch"], t["params"], t["canvas"])


def benchmark_fn(forward, case: dict):
    """forward alone, or forward + torch.autograd.grad of its outputs, each with its grad_out (no .grad
    accumulation between calls)."""
    if not case["grad_names"]:
        return forward
    inputs = [case["tensors"][name] for name in case["grad_names"]]
    grad_out = case["grad_out"]
    return lambda: torch.autograd.grad(forward(), inputs, grad_out)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|; inf on NaN or shape mismatch."""
    if out.shape != ref.shape:
        return float("inf")
    err = (out.detach().double() - ref.detach().double()).abs().max()
    if torch.isnan(err):
        return float("inf")
    return float(err / ref.detach().double().abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def select_sizes(spec: str | None, device: torch.device) -> list[Size]:
    """Group names and/or size names ("launch,65536x3x54x54"); default small on CPU, the rest on CUDA."""
    if spec is None:
        spec = "launch,middle,bandwidth" if device.type == "cuda" else "small"
    chosen = []
    for item in common.split_list(spec):
        matches = [s for s in SIZES if item in (s.group, s.name, f"{s.group}:{s.name}")]
        if not matches:
            names = sorted({s.name for s in SIZES})
            raise SystemExit(f"--sizes: unknown {item!r}; groups {list(GROUPS)}, sizes {names}")
        chosen += [s for s in matches if s.name not in {c.name for c in chosen}]  # a shape runs once
    return chosen


def timers_for(size: Size, device: torch.device, cudagraph: bool) -> list[str]:
    if device.type != "cuda":
        return ["perf_counter"]
    timers = ["wall" if size.group in WALL_GROUPS else "do_bench"]
    return timers + ["cudagraph"] if cudagraph and size.group in CUDAGRAPH_GROUPS else timers


def time_ms(fns: list, timer: str, args, device: torch.device) -> float:
    """fns: the case's call on each of its rotated input sets (rotated_cases); only "cudagraph" uses more than the first."""
    if timer == "cudagraph":
        return common.cuda_graph_median_ms(fns)
    if timer == "do_bench":
        return common.cuda_median_ms(fns[0], rep_ms=args.rep_ms)
    if timer == "wall":
        return common.wall_median_ms(fns[0], device)
    return common.cpu_median_ms(fns[0], reps=args.reps, budget_s=args.budget)


def rotated_cases(case: dict, op: str, size: Size, mode: str, device: torch.device, seed: int, timers: list[str]) -> list[dict]:
    """case, and for a CUDA-graph timing the further input sets it rotates through (seeds seed + 1, ...)."""
    if "cudagraph" not in timers:
        return [case]
    count = common.rotation(BYTES[op](size, mode), device)
    return [case] + [make_inputs(op, size, mode, device, seed=seed + i) for i in range(1, count)]


def timed_row(ops: tuple, cases: list[dict], timer: str, nbytes: int, copy_gbps: float, args, device) -> dict:
    """The median ms of provider_ops' `ops` on the cases, as `timer` times it; GB/s and % of the copy bandwidth
    where the time is the device's ("wall" rows hold the host's launches too: no bandwidth)."""
    common.warm_up_gpu(device)  # the GPU idled while the host compiled or made inputs
    ms = time_ms([benchmark_fn(bind(ops, c), c) for c in cases], timer, args, device)
    gbps = None if timer == "wall" else nbytes / (ms * 1e-3) / 1e9
    return {"timer": timer, "ms": ms, "bytes": nbytes, "gbps": gbps,
            "pct_copy": None if gbps is None else 100 * gbps / copy_gbps,
            "rotated_inputs": len(cases) if timer == "cudagraph" else 1, "sm_mhz": common.sm_clock_mhz(device)}


def run_case(op, mode, size, providers, device, args, copy_gbps, triton_reason, rows, skipped):
    case = make_inputs(op, size, mode, device, seed=args.seed)
    nbytes = BYTES[op](size, mode)
    timers = timers_for(size, device, not args.no_cudagraph)
    cases = rotated_cases(case, op, size, mode, device, args.seed, timers)
    with torch.no_grad():
        reference_out = forward_fn("eager", case)()
    for provider in providers:
        if ONLY_FOR.get(provider, op) != op:
            continue
        where = f"{op} {mode} {size.group} {size.name} {provider}"
        if provider in TRITON_PROVIDERS and triton_reason:
            skipped.append({"op": op, "mode": mode, "size": size.name, "provider": provider, "reason": triton_reason})
            continue
        with mock.patch.dict(os.environ, provider_environment(provider)):
            try:
                ops = provider_ops(provider)
                forward = bind(ops, case)
                rel_err = relative_error(flat(forward()), flat(reference_out))
                if rel_err > REL_ERR_WARN:
                    common.log(f"WARNING {where}: forward differs from eager by {rel_err:.2e} (relative)")
                for timer in timers:
                    row = timed_row(ops, cases if timer == "cudagraph" else [case], timer, nbytes, copy_gbps, args, device)
                    rows.append({"op": op, "mode": mode, "group": size.group, "size": size.name, "n": size.n(op),
                                 "provider": provider, **row, "rel_err": rel_err})
                    shown = "" if row["gbps"] is None else f", {row['gbps']:.2f} GB/s"
                    common.log(f"{where} [{timer}]: {row['ms']:.4f} ms{shown}")
            except Exception as error:  # one failing provider or size must not end the run
                reason = "out of memory" if common.is_out_of_memory(error) else f"{type(error).__name__}: {error}"
                reason = reason.splitlines()[0][:300]
                common.log(f"SKIPPED {where}: {reason}")
                skipped.append({"op": op, "mode": mode, "size": size.name, "provider": provider, "reason": reason})
        common.free_memory(device)
    del case, cases, reference_out
    common.free_memory(device)


def provider_environment(provider: str) -> dict:
    """The variables set for a provider's calls alone (the launchers read them at every launch): triton-sum's
    contraction, triton-ahead's LOAD_AHEAD=1 after whatever DRAW_TRITON_LAUNCH the run set."""
    if provider == "triton-sum":
        return {"DRAW_TRITON_CONTRACTION": "sum"}
    if provider == "triton-ahead":
        launch = os.environ.get("DRAW_TRITON_LAUNCH", "").strip()
        return {"DRAW_TRITON_LAUNCH": ",".join(filter(None, (launch, "LOAD_AHEAD=1")))}
    return {}


def add_speedups(rows: list[dict]) -> None:
    """vs_eager / vs_compiled / vs_pair (write-read: the two fused ops apart): that provider's time over
    this row's, same op, mode, size and timer; vs_triton on the VARIANTS' rows: the launched kernels' time
    over theirs (above 1: the variant is faster)."""
    by_key = {(r["op"], r["mode"], r["size"], r["timer"], r["provider"]): r["ms"] for r in rows}
    for r in rows:
        for baseline in ("eager", "compiled", "pair", "triton"):
            if baseline == "triton" and r["provider"] not in VARIANTS:
                r["vs_triton"] = None
                continue
            ms = by_key.get((r["op"], r["mode"], r["size"], r["timer"], "triton-pair" if baseline == "pair" else baseline))
            r[f"vs_{baseline}"] = ms / r["ms"] if ms else None


COLUMNS = (
    ("op", "op"),
    ("mode", "mode"),
    ("group", "group"),
    ("size", "size (BxCxHxW)"),
    ("n", "N"),
    ("provider", "provider"),
    ("timer", "timer"),
    ("ms", "median ms"),
    ("gbps", "GB/s"),
    ("pct_copy", "% copy"),
    ("vs_eager", "x eager"),
    ("vs_compiled", "x compiled"),
    ("vs_pair", "x pair"),
    ("vs_triton", "x triton"),
)


def plot(rows: list[dict], copy_gbps: float, path: str) -> None:
    """GB/s over size, one line per provider (and timer), one panel per op and mode."""
    panels = [(op, mode) for op in OPS for mode in MODES if any(r["op"] == op and r["mode"] == mode for r in rows)]
    fig, axes = common.panels(len(panels), 4.5)
    for ax, (op, mode) in zip(axes, panels):
        panel = [r for r in rows if r["op"] == op and r["mode"] == mode]
        sizes = sorted({r["size"] for r in panel}, key=lambda s: next(r["bytes"] for r in panel if r["size"] == s))
        for provider in PROVIDERS:
            if ONLY_FOR.get(provider, op) != op:
                continue
            for timer in ("perf_counter", "do_bench", "cudagraph"):  # ("wall" rows hold no bandwidth)
                line = {r["size"]: r["gbps"] for r in panel if r["provider"] == provider and r["timer"] == timer}
                if line:
                    xs = [i for i, s in enumerate(sizes) if s in line]
                    label = provider if timer != "cudagraph" else f"{provider} (CUDA graph)"
                    ax.plot(xs, [line[sizes[i]] for i in xs], "o-" if timer != "cudagraph" else "s--", label=label)
        ax.axhline(copy_gbps, color="grey", linestyle=":", label=f"copy {copy_gbps:.0f} GB/s")
        ax.set_xticks(range(len(sizes)), sizes, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{op} {mode}")
        ax.set_ylabel("GB/s (fewest bytes / median time)")
    common.save_panels(fig, axes, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="comma-separated groups (small, launch, middle, bandwidth) or sizes "
                   "like 1024x1x28x28; default: small on CPU, launch,middle,bandwidth on CUDA")
    p.add_argument("--ops", type=common.split_list, default=list(OPS), help="comma-separated ops: read,write,write-read")
    p.add_argument("--modes", type=common.split_list, default=list(MODES), help="comma-separated modes: fwd,fwd+bwd")
    p.add_argument("--providers", type=common.split_list, default=DEFAULT_PROVIDERS,
                   help="comma-separated providers: eager,compiled,triton,triton-sum,triton-ahead,triton-pair (default: all but "
                   "triton-ahead; the triton ones: CUDA only, "
                   "skipped otherwise)")
    p.add_argument("--copy-mib", type=int, default=None,
                   help="size of the copy-bandwidth buffer in MiB; default 1024 on CUDA, 64 on CPU")
    p.add_argument("--no-cudagraph", action="store_true",
                   help="on CUDA, skip the CUDA-graph timing (rotating input sets) of the small, launch-bound and middle sizes")
    p.add_argument("--rep-ms", type=int, default=200,
                   help="CUDA: do_bench's rep, the milliseconds of timed calls per case (slow cases still get >= 1)")
    p.add_argument("--reps", type=int, default=20, help="CPU: at most this many timed calls per case, after 3 warm-up calls")
    p.add_argument("--budget", type=float, default=2.0, help="CPU: stop timing a case after this many seconds (>= 3 calls)")
    common.add_run_arguments(p, seed_help="seed of the random inputs", plot_help="write a PNG of GB/s over size per provider to PATH")
    args = p.parse_args(argv)
    for flag, values, allowed in (("--ops", args.ops, OPS), ("--modes", args.modes, MODES), ("--providers", args.providers, PROVIDERS)):
        common.check_choices(p, flag, values, allowed)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    common.set_cpu_threads(args.threads, device)
    sizes = select_sizes(args.sizes, device)
    copy_mib = args.copy_mib or (1024 if device.type == "cuda" else 64)

    copy_gbps = common.copy_bandwidth_gbps(device, copy_mib * common.MIB)
    common.log(f"copy bandwidth ({copy_mib} MiB dst.copy_(src), 2x bytes): {copy_gbps:.1f} GB/s")
    triton_reason = common.triton_skip_reason(device) if set(TRITON_PROVIDERS) & set(args.providers) else None
    if triton_reason:
        common.log(f"triton provider skipped: {triton_reason}")

    meta = common.metadata(device, copy_bandwidth_gbps=round(copy_gbps, 2), copy_buffer_mib=copy_mib, dtype="float32")
    rows, skipped = [], []

    def measure():
        for size in sizes:
            for op in args.ops:
                for mode in args.modes:
                    try:  # a case that loses the device (a sticky CUDA error) ends the run, its rows kept
                        run_case(op, mode, size, args.providers, device, args, copy_gbps, triton_reason, rows, skipped)
                    finally:
                        add_speedups(rows)
                        if args.json:  # after every case: a run stopped by a time limit keeps what it measured
                            common.write_json(args.json, {**meta, "partial": True}, rows, skipped=skipped)

    interrupted = common.measured_until_interrupted(measure, meta, rows)  # the tables below: what was measured

    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']}")
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s ({copy_mib} MiB buffer)")
    for op in args.ops:
        for mode in args.modes:
            block = [r for r in rows if r["op"] == op and r["mode"] == mode]
            if block:
                print(f"\n{op} {mode}\n" + common.text_table(block, COLUMNS))
    if skipped:
        reasons = sorted({s["provider"] + ": " + s["reason"] for s in skipped})
        print(f"\nskipped {len(skipped)} case(s):\n" + "\n".join(f"  {r}" for r in reasons))

    if args.json:
        common.write_json(args.json, meta, rows, skipped=skipped)
    if args.markdown:
        tables = [
            (f"{op} {mode}", common.markdown_table([r for r in rows if r["op"] == op and r["mode"] == mode], COLUMNS))
            for op in args.ops
            for mode in args.modes
            if any(r["op"] == op and r["mode"] == mode for r in rows)
        ]
        notes = [f"Copy bandwidth: {copy_gbps:.1f} GB/s ({copy_mib} MiB `dst.copy_(src)`, 2x bytes)."]
        notes += [f"Skipped {s['provider']}: {s['reason']}" for s in {s["provider"] + s["reason"]: s for s in skipped}.values()]
        common.write_markdown(args.markdown, "Attention read/write benchmark", meta, tables, notes)
    if args.plot:
        if rows:
            plot(rows, copy_gbps, args.plot)
        else:
            common.log("--plot: no results to plot")
    return common.EXIT_INTERRUPTED if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
