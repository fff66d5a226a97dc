"""Test helpers shared across test files."""

import collections
import importlib
import json
import os
import pathlib
import subprocess
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

BENCH_DIR = pathlib.Path(__file__).resolve().parent.parent / "bench"


def import_bench(name: str):
    """The module bench/<name>.py (bench/ is not a package: its scripts import each other as top-level)."""
    sys.path.insert(0, str(BENCH_DIR))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH_DIR))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, name: str = "tensor"):
    """Fail unless |actual - expected| <= atol + rtol * |expected| elementwise (compared in float64).

    Also fails when either tensor holds NaN or Inf, or when shapes differ. The message reports the
    largest absolute error and the relative error max|actual - expected| / max|expected|.
    """
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    for label, t in (("actual", a), ("expected", e)):
        bad = ~torch.isfinite(t)
        if bad.any():
            raise AssertionError(f"{name}: {label} has {int(bad.sum())} NaN/Inf values of {t.numel()}")
    if a.numel() == 0:
        return
    err = (a - e).abs()
    scale = e.abs().max().item()
    max_abs = err.max().item()
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    excess = err - (atol + rtol * e.abs())
    if (excess > 0).any():
        worst = int(excess.flatten().argmax())
        raise AssertionError(
            f"{name}: max abs error {max_abs:.3e}, relative error {rel:.3e} (max|expected| {scale:.3e}); "
            f"{int((excess > 0).sum())} of {a.numel()} elements exceed atol={atol:g} + rtol={rtol:g}*|expected|, "
            f"worst at flat index {worst}: {a.flatten()[worst].item():.6e} vs {e.flatten()[worst].item():.6e}"
        )


def verify_rows_or_die(case, device):
    """draw verify's check of one case, except that a glimpse case ends its worker process at once, as a
    crash inside a kernel would (a module-level function, so a spawned worker can unpickle it)."""
    import os

    from draw import verify

    if case.op == "glimpse":
        os._exit(3)
    return verify.checked_rows(case, device)


def gradient_places(*shapes, dtype=torch.float64, device="cpu"):
    """For each shape [B, n], a NaN-filled buffer [B, n + 2] and a gradient destination handing out its
    middle columns [B, n] once (kernels.mark_gradient_destination's `place`): (buffers, places)."""
    buffers = [torch.full((shape[0], shape[1] + 2), float("nan"), dtype=dtype, device=device) for shape in shapes]
    handed = []

    def place(buffer):
        def take(shape):
            if any(b is buffer for b in handed):
                return None
            handed.append(buffer)
            return buffer[:, 1:-1].view(shape)
        return take

    return buffers, [place(b) for b in buffers]


def assert_written_in_place(grad: torch.Tensor, buffer: torch.Tensor, name: str = "gradient"):
    """grad is the middle columns of buffer (gradient_places) and the columns beside them were not written."""
    assert grad.data_ptr() == buffer[:, 1:].data_ptr(), f"{name} not written in its place"
    assert torch.isnan(buffer[:, 0]).all() and torch.isnan(buffer[:, -1]).all(), f"{name} written beside its place"


class OpCounter(TorchDispatchMode):
    """Counts the operations dispatched inside it, by name (`calls`)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


_PTXAS_SCRIPT = """
import json
import importlib
from unittest import mock
import torch
import kernel_report as kr
from triton.compiler import ASTSource
m = importlib.import_module({module!r})

def launch_of(call):
    calls = []
    patches = [mock.patch.object(m, name, kr._Recorder(getattr(m, name), calls)) for name in {kernels!r}]
    for p in patches:
        p.start()
    try:
        call()
    finally:
        for p in patches:
            p.stop()
    return calls[0]

{cases}

rows = []
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for name, call in calls(dtype).items():
        kernel, args, kwargs = launch_of(call)
        signature, constexprs, attrs, warps = kr.specialise(kernel, args, kwargs)
        _, log = kr.compile_with_ptxas_log(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs), warps)
        rows.append({{"kernel": name, "dtype": str(dtype), **kr.ptxas_usage(log)}})
print(json.dumps(rows))
"""


def ptxas_usage_on_sm90(module: str, kernels: tuple, cases: str) -> list[dict]:
    """Compile the Triton kernels `kernels` of `module` for sm_90 as its launchers launch them, with the
    ptxas triton ships (no GPU needed), in a fresh process without Triton's interpreter: one row per case
    and dtype (fp32, bf16, fp64) with the registers and spills ptxas reports. `cases` is Python source
    defining calls(dtype) -> {name: a call of a launcher on meta tensors}, with the module as `m`."""
    root = BENCH_DIR.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), str(BENCH_DIR), env.get("PYTHONPATH")]))
    script = _PTXAS_SCRIPT.format(module=module, kernels=tuple(kernels), cases=cases)
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
