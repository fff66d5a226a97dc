"""`draw verify`: check the fused Triton kernels against the float64 reference, on this machine.

Every case runs one op (read, glimpse, write, write-read, latent, lstm or lstm-projected) with backend="triton" on the
current device and
with backend="reference" on float64 copies of the same inputs, then compares the outputs and the
gradient of every input under one random upstream gradient:
    read    x, canvas, params        (Eqs. 3, 27)
    glimpse x, params                (Eq. 27's first half: x alone)
    write   patch, params, canvas    (Eqs. 8, 29)
    write-read  patch, write_params, canvas, x, read_params  (write, then read the new canvas: both
            outputs, the new canvas and the glimpses; a case's n is the read's, write_n the write's)
    latent  mu, log_sigma, eps       (Eqs. 6, 11: z and the per-image terms; a case's width is Z)
    lstm    input_gates, hidden_gates, c  (nn.LSTMCell's update, Eqs. 5, 7: h and c'; a case's width is H)
    lstm-projected  x, add, hidden_gates, c  (the cell with its input half add + x W^T formed in its kernels,
            kernels.Projection, as DRAW's encoder at Eq. 5: h and c'; a case's width is H, its n x's width K;
            W's gradient is its owner's, not the op's)

The error of a compared tensor is max|fused - reference| / max|reference| (0 when both are all zero),
and a check passes when it is finite and within the tolerance, or when the largest absolute error is
below ABS_FLOOR (values the reference holds below fp32's range, e.g. where the row-sum floor is active,
are 0 in fp32). NaN or Inf anywhere fails. The tolerance is the dtype's (fp32 1e-5, bf16 1e-2, fp16
2e-3), or, where the precision itself cannot reach that on the case's inputs, BASELINE_FACTOR times the
error of the reference run in the case's dtype (see TOLERANCES). The "contract" column is how the
kernels contract in that case ("sum" or "dot", chosen per launch; DRAW_TRITON_CONTRACTION overrides
it), so the sweep holds both forms to the reference.

Sweeps (cases the device cannot run are left out):
    quick  every grid size N = 1..16 for every attention op on small odd shapes (C = 1 and 3 in
           turn), the degenerate parameters, and the latent step and the LSTM cell (also with a
           projected input half) on odd B x Z and B x H, in fp32; on CUDA also the paper's sizes in every
           dtype and a 65536 batch. The default: 188 cases on CUDA, each compiling its own kernels (122
           on CPU).
    full   quick, plus N = 1..16 in every dtype with C = 1 and 3 each (and the latent step's and the
           LSTM cell's odd shapes), more paper-sized cases and 256x256 images: 602 cases on CUDA; with fewer cases
           (before the latent and write-read ones) it ran over 200 s on an H100 (bench/RESULTS.md),
           minutes on CPU.
Compiling is most of a case's time on CUDA, so there the cases run in up to 8 worker processes (--jobs),
their kernels compiling side by side; the table keeps the cases' order.

On CPU the kernels run in Triton's interpreter, which must be chosen (TRITON_INTERPRET=1) before triton
is imported: run() sets it when triton is not imported yet, and otherwise re-runs itself in a fresh
process with it set. Hook into a CLI with add_arguments(subparser) and run(args) -> exit code:
0 all passed, 1 a check failed, 2 nothing could be checked (no triton, no CUDA, unsupported versions).

    python -m draw.verify                 # CPU: the quick sweep in Triton's interpreter
    python -m draw.verify --full --json verify.json
"""

import argparse
import datetime
import importlib.metadata
import json
import math
import multiprocessing
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch

from draw import kernels
from draw.atomic import atomic_write_text
from draw.cli import OneLineErrors
from draw.device import pick_device
from draw.provenance import git_commit, git_dirty

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# max|error| / max|reference|. fp32: the kernels compute in fp32. bf16 / fp16: the kernels load the
# half inputs, compute in fp32 and round once on store, so the error is at most one unit in the last
# place of the largest value (half of it when rounding to nearest; Triton's interpreter truncates to
# bf16): 2^-7 = 7.8e-3 (bf16), 2^-10 = 9.8e-4 (fp16). (The reference runs on the same rounded inputs.)
TOLERANCES = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 2e-3}
# ... unless the reference itself, run in the case's dtype on the same inputs (the baseline), is so far
# off that BASELINE_FACTOR x its error is larger. fp32 cannot always reach 1e-5: a grid centre near
# pixel 50 is rounded by ~3e-6 px, and with sigma ~ 0.7 px the filter values move by ~1e-5 relative (a
# 100x100 image's parameter gradients: 1.2e-5 to 3e-5 for PyTorch in fp32 and for the kernels alike);
# parameter gradients that cancel lose more still. The kernels' moment sums (_row_moments) cancel a
# little more than autograd's order: up to 5.4x the baseline's error in the CPU full sweep, hence 8.
BASELINE_FACTOR = 8.0
# ... but never past 1 (the whole of the expected value): where the baseline is entirely off (an fp32
# gradient through sigmoid(30) == 1 comes out zero), a zero passes, a sign flip or an amplified value does not.
BASELINE_TOLERANCE_CAP = 1.0
ABS_FLOOR = 1e-30  # an absolute error below this passes whatever the relative error (see the docstring)

# Degenerate raw parameters (column: value) for every batch item: (gx~, gy~, log sigma^2, log delta~,
# log gamma). Checked in fp32 only (e^15 does not fit in fp16).
DEGENERATE_PARAMS = {
    "log_sigma2=-20": {2: -20.0},
    "log_sigma2=-30": {2: -30.0},
    "tiny_sigma_on_pixel_centres": {0: 0.0, 1: 0.0, 2: -20.0, 3: 0.0},  # 13x13, N = 3: mu = 1, 7, 13
    # 1 / (2 sigma^2) past every dtype's range: one-pixel filters (log sigma^2 floored: LOG_SIGMA2_FLOOR)
    "sigma_past_the_range_on_pixel_centres": {0: 0.0, 1: 0.0, 2: -800.0, 3: 0.0},
    "centre_off_image": {0: 50.0},  # every F_X row underflows: Z hits the floor, F_X = 0
    "floor_active_rows_not_zero": {0: 3.0, 2: 0.0, 3: -3.0},  # float64 row sums ~1e-47 < 1e-8
    # a centre past the offset limit (|a - mu| <= 1e18) with sigma^2 past 1e34: uniform rows (fp32: sigma^2 = inf)
    "centre_past_the_offset_limit_wide_sigma": {0: 1e20, 2: 80.0},
    "centre_past_the_offset_limit_infinite_sigma": {0: 1e20, 2: 100.0},
    "log_gamma=+15": {4: 15.0},
    "log_gamma=-15": {4: -15.0},
}
# The latent step's: log sigma for every element (sigma 2e-9 and 3e3).
DEGENERATE_LOG_SIGMA = {"log_sigma=-20": -20.0, "log_sigma=+8": 8.0}
# The LSTM cell's: every input gate's pre-activation, saturating each gate (sigmoid 1 - 1e-13 and 9e-14).
DEGENERATE_GATES = {"gates=+30": 30.0, "gates=-30": -30.0}

OP_INPUTS = {"read": ("x", "canvas", "params"), "glimpse": ("x", "params"), "write": ("patch", "params", "canvas"),
             "write-read": ("patch", "write_params", "canvas", "x", "read_params"), "latent": ("mu", "log_sigma", "eps"),
             "lstm": ("input_gates", "hidden_gates", "c"), "lstm-projected": ("x", "add", "hidden_gates", "c")}
ATTENTION_OPS = ("read", "glimpse", "write", "write-read")
ROW_OPS = ("latent", "lstm", "lstm-projected")  # B x width elementwise ops (no image, no grid)
OP_OUTPUTS = {"latent": ("z", "terms"), "write-read": ("canvas", "glimpses"), "lstm": ("h", "c'"),
              "lstm-projected": ("h", "c'")}  # the others: ("output",)

# Triton's interpreter converts one-element arrays with int(), which numpy 2.4 made an error (only
# 0-d arrays convert); triton 3.7 fixed it. Checked: triton 3.6.0 runs these kernels with numpy 2.3.5
# and fails with numpy 2.4.6; triton 3.7.0 and 3.9.0 run them with numpy 2.4.6.
INTERPRETER_NUMPY_FIXED_IN = (3, 7)
NUMPY_BREAKING_INTERPRETER = (2, 4)


@dataclass(frozen=True)
class Case:
    op: str  # "read", "glimpse", "write", "write-read", or "latent" / "lstm" / "lstm-projected" (B x Z or B x H:
    # batch, width; channels, height 1, n 0, or lstm-projected's K)
    batch: int
    channels: int
    height: int
    width: int
    n: int
    dtype: str  # a key of DTYPES
    degenerate: str = ""  # a key of DEGENERATE_PARAMS (DEGENERATE_LOG_SIGMA), or "" for ordinary random ones
    cuda_only: bool = False  # too large for Triton's interpreter
    write_n: int = 0  # write-read: the write's grid size (n is the read's)

    @property
    def name(self) -> str:
        if self.op in ROW_OPS:
            inputs = f"k={self.n}" if self.op == "lstm-projected" else ""
            return " ".join(filter(None, [self.op, f"{self.batch}x{self.width}", inputs, self.dtype, self.degenerate]))
        shape = f"{self.batch}x{self.channels}x{self.height}x{self.width}"
        grid = f"n={self.n}" if self.op != "write-read" else f"n={self.write_n}/{self.n}"
        return " ".join(filter(None, [self.op, shape, grid, self.dtype, self.degenerate]))


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------

ODD_SHAPES = ((2, 1, 7, 11), (2, 3, 13, 9), (1, 1, 21, 5), (3, 3, 9, 16), (2, 1, 1, 3), (1, 3, 17, 17))
# (B, C, H, W, read n, write n) of the paper's experiments: MNIST 28x28, CIFAR-10, SVHN crops, cluttered
# MNIST; the glimpse is checked at 12x12 on each (the classifier's read)
PAPER_SIZES = ((64, 1, 28, 28, 2, 5), (16, 3, 32, 32, 5, 5), (8, 3, 54, 54, 12, 12), (8, 1, 100, 100, 12, 12))
LARGE = ((4, 3, 256, 256, 16, 16),)
LARGE_BATCH = (65536, 1, 28, 28, 2, 5)
LATENT_SHAPES = ((1, 1), (7, 3), (37, 100), (5, 130), (3, 2500))  # (B, Z): odd, and past one tile of Z
LATENT_PAPER = ((256, 100),)  # mnist-paper's Z
LSTM_SHAPES = ((1, 1), (7, 3), (37, 100), (5, 600))  # (B, H): odd, and past one tile of H (512)
LSTM_PAPER = ((256, 256), (100, 800))  # mnist-paper's and svhn-paper's LSTMs
# (B, H, K) of the cell with a projected input half: odd, K past mnist-paper's 8, the widest formed in the
# kernels (K 128), and past one tile of H (600: formed before the cell); mnist-paper's encoder
PROJECTED_LSTM_SHAPES = ((1, 1, 1), (7, 3, 8), (37, 100, 13), (5, 130, 128), (3, 600, 8))
PROJECTED_LSTM_PAPER = ((256, 256, 8),)


def latent_case(batch: int, size: int, dtype: str, degenerate: str = "", cuda_only: bool = False) -> Case:
    return Case("latent", batch, 1, 1, size, 0, dtype, degenerate, cuda_only)


def lstm_case(batch: int, hidden: int, dtype: str, degenerate: str = "", cuda_only: bool = False, inputs: int = 0) -> Case:
    """The LSTM cell's case; with inputs K > 0 its input half a projection of a [B, K] input (lstm-projected)."""
    return Case("lstm-projected" if inputs else "lstm", batch, 1, 1, hidden, inputs, dtype, degenerate, cuda_only)


def attention_case(op: str, batch: int, channels: int, height: int, width: int, n: int, dtype: str,
                   degenerate: str = "", cuda_only: bool = False, write_n: int | None = None) -> Case:
    """An attention op's case; n is the read's grid (the write's for "write"). write-read writes with a
    write_n grid, by default one that differs from n: 17 - n (16 for n = 1, 1 for n = 16)."""
    if op != "write-read":
        return Case(op, batch, channels, height, width, n, dtype, degenerate, cuda_only)
    return Case(op, batch, channels, height, width, n, dtype, degenerate, cuda_only, write_n or 17 - n)


def build_sweep(sweep: str, dtypes, cuda: bool) -> list[Case]:
    """The cases of the quick or full sweep for `dtypes` (keys of DTYPES); CUDA-only cases when cuda."""
    cases = []
    for op in ATTENTION_OPS:  # every grid size, fp32, one odd shape per N (C = 1 and 3 in turn)
        cases += [attention_case(op, *ODD_SHAPES[n % len(ODD_SHAPES)], n, "fp32") for n in range(1, 17)]
    for op in ATTENTION_OPS:
        # write-read writes with N 3 too: its centres then fall on pixel centres exactly (with N 14 they are
        # 12/13 px apart, and one-pixel filters flip with the last bit of a centre: an H100 flipped them, FMA or not)
        cases += [attention_case(op, 2, 1, 13, 13, 3, "fp32", degenerate, write_n=3) for degenerate in DEGENERATE_PARAMS]
    cases += [latent_case(b, z, "fp32") for b, z in LATENT_SHAPES]
    cases += [latent_case(5, 9, "fp32", degenerate) for degenerate in DEGENERATE_LOG_SIGMA]
    cases += [latent_case(b, z, dtype, cuda_only=True) for dtype in dtypes for b, z in LATENT_PAPER]
    cases += [lstm_case(b, h, "fp32") for b, h in LSTM_SHAPES]
    cases += [lstm_case(5, 9, "fp32", degenerate) for degenerate in DEGENERATE_GATES]
    cases += [lstm_case(b, h, dtype, cuda_only=True) for dtype in dtypes for b, h in LSTM_PAPER]
    cases += [lstm_case(b, h, "fp32", inputs=k) for b, h, k in PROJECTED_LSTM_SHAPES]
    cases += [lstm_case(b, h, dtype, cuda_only=True, inputs=k) for dtype in dtypes for b, h, k in PROJECTED_LSTM_PAPER]
    sizes = PAPER_SIZES if sweep == "quick" else PAPER_SIZES + LARGE
    for dtype in dtypes:
        for b, c, h, w, read_n, write_n in sizes:
            for op in ATTENTION_OPS:
                n = write_n if op == "write" else (12 if op == "glimpse" else read_n)
                cases.append(attention_case(op, b, c, h, w, n, dtype, cuda_only=True, write_n=write_n))
    if sweep == "full":
        for dtype in dtypes:  # every grid size in every dtype, each with C = 1 and C = 3
            cases += [latent_case(b, z, dtype) for b, z in LATENT_SHAPES]
            cases += [lstm_case(b, h, dtype) for b, h in LSTM_SHAPES]
            for op in ATTENTION_OPS:
                for n in range(1, 17):
                    for channels in (1, 3):
                        b, _, h, w = ODD_SHAPES[(n + channels) % len(ODD_SHAPES)]
                        cases.append(attention_case(op, b, channels, h, w, n, dtype))
    for op in ATTENTION_OPS:
        b, c, h, w, read_n, write_n = LARGE_BATCH
        cases.append(attention_case(op, b, c, h, w, write_n if op == "write" else read_n, "fp32", cuda_only=True,
                                    write_n=write_n))
    cases.append(latent_case(LARGE_BATCH[0], LATENT_PAPER[0][1], "fp32", cuda_only=True))
    cases.append(lstm_case(LARGE_BATCH[0], LSTM_PAPER[0][1], "fp32", cuda_only=True))
    cases = [case for case in cases if (case.dtype in dtypes) and (cuda or not case.cuda_only)]
    return list(dict.fromkeys(cases))  # drop repeats, keep the order


# ---------------------------------------------------------------------------------------------
# One case: fused vs reference, forward and every gradient
# ---------------------------------------------------------------------------------------------


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max|actual - expected|, that / max|expected|) in float64; (nan, nan) when either holds NaN or Inf.

    The relative error is 0 when both are all zero and inf when only `expected` is.
    """
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape or not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return math.nan, math.nan
    if a.numel() == 0:
        return 0.0, 0.0
    max_abs = (a - e).abs().max().item()
    scale = e.abs().max().item()
    return max_abs, (max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf))


def passes(max_abs: float, rel: float, tolerance: float) -> bool:
    """Finite, and within tolerance (relative) or below ABS_FLOOR (absolute). NaN never passes."""
    return math.isfinite(max_abs) and (rel <= tolerance or max_abs <= ABS_FLOOR)


def make_inputs(case: Case, device: torch.device) -> dict:
    """x in [0, 1], canvas logits, raw params (degenerate columns set), a patch: in the case's dtype.
    The latent step: mu, log sigma (or a degenerate value) and eps [B, Z]. The LSTM cell: both gate
    halves [B, 4H] (the input half all one degenerate value) and c [B, H]."""
    g = torch.Generator(device=device).manual_seed(case.n * 1000 + case.channels)
    b, c, h, w, n = case.batch, case.channels, case.height, case.width, case.n
    f64 = torch.float64
    if case.op == "latent":
        inputs = {name: torch.randn(b, w, generator=g, device=device, dtype=f64) for name in OP_INPUTS["latent"]}
        inputs["log_sigma"] = 0.5 * inputs["log_sigma"]
        if case.degenerate:
            inputs["log_sigma"].fill_(DEGENERATE_LOG_SIGMA[case.degenerate])
        return {name: t.to(DTYPES[case.dtype]) for name, t in inputs.items()}
    if case.op == "lstm":
        inputs = {name: torch.randn(b, 4 * w, generator=g, device=device, dtype=f64) for name in OP_INPUTS["lstm"][:2]}
        inputs["c"] = torch.randn(b, w, generator=g, device=device, dtype=f64)
        if case.degenerate:
            inputs["input_gates"].fill_(DEGENERATE_GATES[case.degenerate])
        return {name: t.to(DTYPES[case.dtype]) for name, t in inputs.items()}
    if case.op == "lstm-projected":  # W [4H, K] (not a leaf: its gradient is its owner's)
        inputs = {"x": torch.randn(b, n, generator=g, device=device, dtype=f64),
                  "add": torch.randn(b, 4 * w, generator=g, device=device, dtype=f64),
                  "hidden_gates": torch.randn(b, 4 * w, generator=g, device=device, dtype=f64),
                  "c": torch.randn(b, w, generator=g, device=device, dtype=f64),
                  "weight": torch.randn(4 * w, n, generator=g, device=device, dtype=f64) / n ** 0.5}
        return {name: t.to(DTYPES[case.dtype]) for name, t in inputs.items()}
    patch_n = case.write_n or n
    inputs = {
        "x": torch.rand(b, c, h, w, generator=g, device=device, dtype=f64),
        "canvas": 2 * torch.randn(b, c, h, w, generator=g, device=device, dtype=f64),
        "params": 0.5 * torch.randn(b, 5, generator=g, device=device, dtype=f64),
        "patch": torch.randn(b, c, patch_n, patch_n, generator=g, device=device, dtype=f64),
    }
    if case.op == "write-read":  # the write's params as above, the read's drawn after them
        inputs["write_params"] = inputs.pop("params")
        inputs["read_params"] = 0.5 * torch.randn(b, 5, generator=g, device=device, dtype=f64)
    for params in (inputs[name] for name in ("params", "write_params", "read_params") if name in inputs):
        for column, value in DEGENERATE_PARAMS.get(case.degenerate, {}).items():  # in every set the op has
            params[:, column] = value
    return {name: t.to(DTYPES[case.dtype]) for name, t in inputs.items()}


def apply_op(op: str, inputs: dict, n: int, backend: str) -> tuple[torch.Tensor, ...]:
    """The op's outputs (OP_OUTPUTS): one tensor, or two (write-read, the latent step, the LSTM cell)."""
    if op == "latent":
        return kernels.latent_sample(inputs["mu"], inputs["log_sigma"], inputs["eps"], backend=backend)
    if op == "lstm":
        return kernels.lstm_cell(inputs["input_gates"], inputs["hidden_gates"], inputs["c"], backend=backend)
    if op == "lstm-projected":
        x, weight, add = inputs["x"], inputs["weight"], inputs["add"]
        projection = kernels.Projection(x, weight, add, None, lambda x, grad: None, lambda: add + x @ weight.t())
        return kernels.lstm_cell(projection, inputs["hidden_gates"], inputs["c"], backend=backend)
    if op == "write-read":
        return kernels.write_read(*(inputs[name] for name in OP_INPUTS[op]), n, backend=backend)
    return (_attention(op, inputs, n, backend),)


def _attention(op: str, inputs: dict, n: int, backend: str) -> torch.Tensor:
    if op == "read":
        return kernels.read(inputs["x"], inputs["canvas"], inputs["params"], n, backend=backend)
    if op == "glimpse":
        return kernels.glimpse(inputs["x"], inputs["params"], n, backend=backend)
    return kernels.write(inputs["patch"], inputs["params"], inputs["canvas"], backend=backend)


def _output_shapes(case: Case) -> list[tuple]:
    b, c, n = case.batch, case.channels, case.n
    if case.op == "latent":
        return [(b, case.width), (b, 2)]
    if case.op in ("lstm", "lstm-projected"):
        return [(b, case.width), (b, case.width)]
    if case.op == "write-read":
        return [(b, c, case.height, case.width), (b, 2, c, n, n)]
    return [{"read": (b, 2, c, n, n), "glimpse": (b, c, n, n), "write": (b, c, case.height, case.width)}[case.op]]


def _forward_backward(case: Case, inputs: dict, dtype: torch.dtype, backend: str, upstream: list[torch.Tensor]):
    """[each output, grad of each input] of the case's op on `inputs` converted to `dtype`."""
    leaves = {name: inputs[name].detach().to(dtype).requires_grad_() for name in OP_INPUTS[case.op]}
    constants = {name: t.to(dtype) for name, t in inputs.items() if name not in leaves}  # a projection's W
    outs = apply_op(case.op, {**constants, **leaves}, case.n, backend)
    upstream = [u.to(out.dtype) for u, out in zip(upstream, outs)]
    return [*outs, *torch.autograd.grad(outs, list(leaves.values()), upstream)]


def check_case(case: Case, device: torch.device) -> list[dict]:
    """One row per compared tensor: the output, then the gradient of each input.

    Three runs on the same inputs (already rounded to the case's dtype) and the same upstream gradient:
    the fused kernels in the case's dtype, the reference in float64 (the truth), and the reference in
    the case's dtype (the baseline: what plain PyTorch reaches in that precision). The tolerance is
    TOLERANCES[dtype], or BASELINE_FACTOR x the baseline's error (at most BASELINE_TOLERANCE_CAP) where that is larger.
    """
    dtype = DTYPES[case.dtype]
    inputs = make_inputs(case, device)
    g = torch.Generator(device=device).manual_seed(1)
    upstream = [torch.randn(shape, generator=g, device=device, dtype=torch.float64).to(dtype) for shape in _output_shapes(case)]
    fused = _forward_backward(case, inputs, dtype, "triton", upstream)
    expected = _forward_backward(case, inputs, torch.float64, "reference", upstream)
    baseline = _forward_backward(case, inputs, dtype, "reference", upstream)
    rows = []
    quantities = [*OP_OUTPUTS.get(case.op, ("output",)), *(f"grad {name}" for name in OP_INPUTS[case.op])]
    for quantity, actual, exp, base in zip(quantities, fused, expected, baseline):
        max_abs, rel = relative_error(actual, exp)
        baseline_rel = relative_error(base, exp)[1]
        from_baseline = min(BASELINE_FACTOR * baseline_rel, BASELINE_TOLERANCE_CAP) if math.isfinite(baseline_rel) else 0
        tolerance = max(TOLERANCES[case.dtype], from_baseline)
        rows.append(_row(case, quantity, max_abs, rel, tolerance, passes(max_abs, rel, tolerance), baseline_rel))
    return rows


def checked_rows(case: Case, device: torch.device) -> list[dict]:
    """check_case, with a kernel that fails to compile or launch turned into a failed row, not a crash."""
    try:
        return check_case(case, device)
    except Exception as error:
        return [_error_row(case, f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}")]


def _start_worker() -> None:
    torch.set_num_threads(1)  # the workers share the machine's cores


def checked_cases(cases: list[Case], device: torch.device, jobs: int = 1,
                  check: Callable[[Case, torch.device], list[dict]] = checked_rows) -> Iterator[tuple[Case, list[dict]]]:
    """(case, its rows) for every case, in order, each as soon as it and the cases before it are done.

    jobs > 1 checks the cases in that many worker processes (started afresh: CUDA cannot be forked), so
    the kernels of different cases compile side by side. A worker that dies (a crash in a kernel, say)
    fails every case not finished by then, with a row that says so.
    """
    if jobs <= 1:
        for case in cases:
            yield case, check(case, device)
        return
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(cases)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker)
    try:
        futures = [pool.submit(check, case, device) for case in cases]
        for case, future in zip(cases, futures):
            try:
                rows = future.result()
            except BrokenProcessPool as error:
                rows = [_error_row(case, f"a verify worker process died before this case finished ({error}); "
                                         "run with --jobs 1 to see which case kills it")]
            yield case, rows
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def default_jobs(device: torch.device) -> int:
    """Worker processes by default: on CUDA up to 8 (compiling is most of a case's time), on CPU one (the
    interpreter uses the cores already)."""
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 1


def _contraction(case: Case) -> str:
    """How the fused kernels contract in this case: "sum" or "dot" (kernels/triton_attention.py; every
    verified dtype computes in fp32). Imports triton, so only once the interpreter question is settled."""
    from draw.kernels import triton_attention

    if case.op in ROW_OPS:
        return "-"  # elementwise: no contraction
    try:
        read = triton_attention.contraction(torch.float32, case.n, case.width)
        write = triton_attention.contraction(torch.float32, case.write_n or case.n, case.width)
    except ValueError:  # a bad DRAW_TRITON_CONTRACTION: the case's own error row says so
        return "?"
    return read if read == write else f"{read}/{write}"  # write-read: each op its own


def _error_row(case: Case, message: str) -> dict:
    """The one failed row of a case that could not be checked, saying why."""
    return _row(case, "error", math.nan, math.nan, TOLERANCES[case.dtype], False, error=message)


def _row(case: Case, quantity: str, max_abs: float, rel: float, tolerance: float, passed: bool,
         baseline_rel: float = math.nan, error: str = ""):
    row = {"case": case.name, "contract": _contraction(case), "quantity": quantity, "max_abs_error": max_abs,
           "relative_error": rel, "baseline_relative_error": baseline_rel, "tolerance": tolerance, "passed": passed,
           **asdict(case)}
    if error:
        row["error"] = error
    return row


# ---------------------------------------------------------------------------------------------
# Where the kernels can run: CUDA, or Triton's interpreter on CPU (and which versions it needs)
# ---------------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """"3.6.0+git1234" -> (3, 6, 0): the leading numeric parts."""
    parts = []
    for part in version.split("+")[0].split("."):
        digits = re.match(r"\d+", part)
        if not digits:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def interpreter_problem(triton_version: str | None, numpy_version: str | None) -> str | None:
    """Why Triton's interpreter cannot run the kernels with these versions, in one line; None when it can."""
    if triton_version is None:
        return "the triton package is not installed, so there are no fused kernels to verify"
    if numpy_version is None:
        return "Triton's interpreter needs numpy, which is not installed"
    if (_release(triton_version) < INTERPRETER_NUMPY_FIXED_IN
            and _release(numpy_version) >= NUMPY_BREAKING_INTERPRETER):
        return (f"Triton {triton_version}'s interpreter fails with numpy {numpy_version}; on CPU use "
                f"triton >= 3.7, or numpy < 2.4 with this triton (pip install 'numpy<2.4')")
    return None


def _triton_interpreted() -> bool:
    return kernels._triton_interpreter()


def _rerun_with_interpreter(args) -> int:
    """Run this command again in a fresh Python process with TRITON_INTERPRET=1 set before triton loads."""
    package_root = str(pathlib.Path(__file__).resolve().parents[1])  # the folder holding draw/
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    argv = ["--device", "cpu", "--full" if args.sweep == "full" else "--quick"]
    argv += ["--dtypes", ",".join(args.dtypes)] if args.dtypes else []
    argv += ["--only", args.only] if args.only else []
    argv += ["--json", str(args.json)] if args.json else []
    argv += ["--jobs", str(args.jobs)] if getattr(args, "jobs", None) else []
    return subprocess.run([sys.executable, "-m", "draw.verify", *argv], env=env, check=False).returncode


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _dtype_list(text: str) -> list[str]:
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in DTYPES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown dtypes {unknown}; choose from {list(DTYPES)}")
    return names


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `draw verify`, added to `parser` (a subcommand's parser, or a fresh one)."""
    parser.add_argument("--device", default="auto",
                        help="auto (default: cuda when available, else cpu), cpu, cuda or cuda:N; on cpu the "
                        "kernels run in Triton's interpreter")
    sweep = parser.add_mutually_exclusive_group()
    sweep.add_argument("--quick", dest="sweep", action="store_const", const="quick",
                       help="N = 1..16 on small odd shapes, degenerate parameters, and on CUDA the paper's "
                       "image sizes and a 65536 batch (the default; about 10-30 s on cpu)")
    sweep.add_argument("--full", dest="sweep", action="store_const", const="full",
                       help="also N = 1..16 in every dtype with C = 1 and 3, and 256x256 images (over 200 s "
                       "on an H100, compiling ~400 kernel variants; minutes on cpu)")
    parser.add_argument("--dtypes", type=_dtype_list, default=None, metavar="LIST",
                        help="comma-separated subset of fp32,bf16,fp16 (default: fp32 on cpu, all three on cuda)")
    parser.add_argument("--only", default=None, metavar="TEXT",
                        help="run only the cases whose name contains TEXT, e.g. glimpse, 'n=12' or fp16")
    parser.add_argument("--json", type=pathlib.Path, default=None, metavar="PATH",
                        help="also write every row, the tolerances and the versions to PATH as JSON")
    parser.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                        help="check the cases in N worker processes, their kernels compiling side by side "
                        "(default: up to 8 on cuda, 1 on cpu); the table keeps the cases' order")
    parser.set_defaults(sweep=None)


def _format_row(row: dict, width: int) -> str:
    def number(value: float) -> str:
        return f"{value:9.2e}" if math.isfinite(value) else f"{value!s:>9}"

    if not row["passed"]:
        verdict = "FAIL"
    else:  # "ok (abs)": passed on the absolute floor, the reference's values being below fp32's range
        verdict = "ok" if row["relative_error"] <= row["tolerance"] else "ok (abs)"
    return (f"{row['case']:<{width}}  {row['contract']:<8}  {row['quantity']:<17}  {number(row['max_abs_error'])}  "
            f"{number(row['relative_error'])}  {number(row['baseline_relative_error'])}  {row['tolerance']:8.1e}  "
            f"{verdict}")


def _metadata(device: torch.device, sweep: str, dtypes) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device": str(device), "device_name": name, "triton_interpreter": device.type == "cpu",
        "sweep": sweep, "dtypes": list(dtypes), "tolerances": TOLERANCES, "baseline_factor": BASELINE_FACTOR,
        "abs_floor": ABS_FLOOR,
        "torch": torch.__version__, "triton": _version("triton"), "numpy": _version("numpy"),
        "python": platform.python_version(), "commit": git_commit(), "dirty": git_dirty(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
    }


def _json_safe(value):
    """NaN and Inf as the strings "nan", "inf" (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def run(args) -> int:
    """Run the sweep that args select (see add_arguments); print the table. Returns the exit code:
    0 every check passed, 1 some check failed, 2 nothing could be checked here (the reason is printed),
    130 interrupted (Ctrl-C)."""
    sweep, dtypes = getattr(args, "sweep", None), getattr(args, "dtypes", None)
    only, json_path = getattr(args, "only", None), getattr(args, "json", None)
    try:
        device = pick_device(getattr(args, "device", "auto"))
    except ValueError as error:
        print(f"draw verify: {error}", file=sys.stderr)
        return 2
    if device.type == "cpu":
        problem = interpreter_problem(_version("triton"), _version("numpy"))
        if problem:
            print(f"draw verify: {problem}", file=sys.stderr)
            return 2
        if not _triton_interpreted():
            if "triton" in sys.modules:  # too late to choose the interpreter in this process
                print("draw verify: triton was imported in this process without TRITON_INTERPRET=1, which "
                      "running on CPU needs; re-running in a fresh process with it set", file=sys.stderr)
                args = argparse.Namespace(**{**vars(args), "sweep": sweep or "quick"})
                return _rerun_with_interpreter(args)
            os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    else:
        if not kernels.triton_available():
            print("draw verify: the triton package is not installed, so there are no fused kernels to verify",
                  file=sys.stderr)
            return 2
        if _triton_interpreted():
            print("draw verify: TRITON_INTERPRET=1 is set; unset it to verify the compiled kernels on CUDA "
                  "(or pass --device cpu)", file=sys.stderr)
            return 2

    sweep = sweep or "quick"
    dtypes = dtypes or (list(DTYPES) if device.type == "cuda" else ["fp32"])
    jobs = getattr(args, "jobs", None) or default_jobs(device)
    cases = [case for case in build_sweep(sweep, dtypes, device.type == "cuda") if not only or only in case.name]
    if not cases:
        print(f"draw verify: no case matches --only {only!r}", file=sys.stderr)
        return 2
    where = "CUDA" if device.type == "cuda" else "CPU, Triton's interpreter"
    workers = f", {jobs} worker processes" if jobs > 1 else ""
    print(f"draw verify: {len(cases)} cases ({sweep} sweep, {','.join(dtypes)}) on {device} ({where}{workers})\n"
          f"  rel err = max|fused - float64 reference| / max|reference|; ref err = the same for the reference "
          f"run in the case's dtype;\n  tol = max({', '.join(f'{v:g} {k}' for k, v in TOLERANCES.items())}, "
          f"{BASELINE_FACTOR:g} x ref err); absolute errors <= {ABS_FLOOR:g} pass too", flush=True)
    if device.type == "cpu":
        print("  (on CPU the paper-sized images and the 65536 batch are left out: the interpreter is too slow)")
    width = max(len(case.name) for case in cases)
    print(f"{'case':<{width}}  {'contract':<8}  {'quantity':<17}  {'max abs':>9}  {'rel err':>9}  {'ref err':>9}  {'tol':>8}  pass",
          flush=True)
    started = time.perf_counter()
    rows, done = [], 0
    metadata = _metadata(device, sweep, dtypes) if json_path else None

    def write_json() -> None:  # after every case: a run stopped part-way keeps the checks it made
        failures = sum(not row["passed"] for row in rows)
        payload = {"metadata": metadata, "passed": done == len(cases) and not failures, "cases": len(cases),
                   "cases_checked": done, "seconds": round(time.perf_counter() - started, 1), "rows": rows}
        pathlib.Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json_path, json.dumps(_json_safe(payload), indent=2) + "\n", durable=False)

    try:
        for _case, case_rows in checked_cases(cases, device, jobs):
            for row in case_rows:
                print(_format_row(row, width) + (f"  {row['error']}" if "error" in row else ""), flush=True)
            rows += case_rows
            done += 1
            if json_path:
                write_json()
    except KeyboardInterrupt:
        print(f"draw verify: interrupted after {done} of {len(cases)} cases ({len(rows)} checks, "
              f"{sum(not row['passed'] for row in rows)} failed)", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - started
    failed = [row for row in rows if not row["passed"]]
    summary = f"{len(rows)} checks in {len(cases)} cases, {len(failed)} failed ({seconds:.0f} s)"
    if failed:
        print(f"draw verify: FAILED: {summary}:", file=sys.stderr)
        for row in failed:
            print("  " + _format_row(row, width) + (f"  {row['error']}" if "error" in row else ""), file=sys.stderr)
        return 1
    print(f"draw verify: all passed: {summary}")
    return 0


def main(argv=None) -> int:
    parser = OneLineErrors(prog="draw verify", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
