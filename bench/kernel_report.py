"""Compile every fused attention kernel for sm_90 (no GPU needed) and report registers, spills and sizes.

For each kernel (read and glimpse forward, their backward with and without dx, write forward and
backward), each image size and each dtype, the launcher in kernels/triton_attention.py is called on
meta tensors to record exactly the launch it would make (block sizes, warps, strides), the arguments
are specialised as Triton's JIT does on a GPU (pointers 16-byte aligned, integers equal to 1 folded,
multiples of 16 marked), and triton.compile lowers the kernel to PTX and sm_90 machine code with the
ptxas that triton ships. Reported per kernel:
    registers       per thread (ptxas -v; 255 is the hardware limit, more goes to local memory)
    spill bytes     bytes of spill stores / spill loads per thread (ptxas -v): 0 means no spills
    stack           stack frame bytes per thread (ptxas -v)
    shared B        shared memory per program (tl.dot stages its operands there)
    programs / SM, warps / SM   how many programs (and their warps) one sm_90 multiprocessor holds at once
                    by those registers and that shared memory (occupancy(): CUDA's calculator's rules).
                    A program that waits on memory is hidden only by the others resident beside it
    SASS instrs     machine instructions in the cubin (cuobjdump -sass), of which LDL/STL (local memory)
    FFMA, SHFL, BAR, MMA   of those: fp32 FMAs, warp shuffles (cross-lane reductions), barriers and
                    tensor-core MMAs
    warp instrs / pixel    the dynamic instruction count of one program, estimated as the straight
                    code plus each loop body run ceil(H / BLOCK_H) times (the row blocks; a loop around
                    it, COL_TILES times: the column tiles), times the warps, over the H x W pixels the
                    program covers: what an issue-bound kernel's time follows
    LDL/STL / pixel the same estimate for the local-memory (spill) instructions alone: 0 where nothing
                    spills, or where the spill code runs outside the loops
    PTX instrs      instructions in the PTX (statements ending in ';', no directives or labels)
Every kernel is compiled in both contractions ("sum" and "dot", see kernels/triton_attention.py)
unless --contractions says otherwise; the launchers' own choice ("auto") is one of the two. --num-warps
compiles each kernel with the given warp counts instead of the launch's own (the rows say "warps_forced");
--maxnreg with each of the given register caps (also DRAW_TRITON_LAUNCH=maxnreg=R), to weigh the spills a
cap costs against the programs per SM it gains.
The metadata are device-independent: triton and torch versions, ptxas version, commit, date.

    python bench/kernel_report.py                           # the default sizes, fp32 and bf16
    python bench/kernel_report.py --sizes mnist --n 5 --dtypes fp32,bf16,fp64 --no-write   # as the tests
    python bench/kernel_report.py --sizes mnist --dtypes fp32 --num-warps 1,2,4,8          # other warp counts
    python bench/kernel_report.py --sizes svhn --dtypes fp32 --contractions auto --maxnreg none,64,96  # caps
"""

import argparse
import contextlib
import datetime
import io
import itertools
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import common  # (bench/ is on sys.path when this script runs)
from draw import kernels
from draw.kernels import triton_attention as ta

RESULTS_DIR = common.BENCH_DIR / "results"
ARCH = 90  # H100 / H200
# One sm_90 multiprocessor, as CUDA's occupancy calculator counts it (occupancy()): registers, allocated per
# warp in units of 256; shared memory (228 KiB) and the 1 KiB reserved per program; warps and programs at most.
_SM_REGISTERS, _REGISTER_UNIT, _SM_SHARED, _SHARED_RESERVED, _SM_WARPS, _SM_PROGRAMS = 65536, 256, 233472, 1024, 64, 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


@dataclass(frozen=True)
class Size:
    name: str
    channels: int
    height: int
    width: int
    read_ns: tuple  # grid sizes for read and glimpse
    write_ns: tuple
    write_read_ns: tuple  # (write n, read n) pairs for the fused write-then-read


SIZES = {
    "mnist": Size("mnist", 1, 28, 28, (2, 5, 12), (2, 5, 12), ((5, 2),)),  # 2x2 read, 5x5 write, 12x12 glimpse
    "svhn": Size("svhn", 3, 54, 54, (12,), (12,), ((12, 12),)),
    "cluttered": Size("cluttered", 1, 100, 100, (12,), (12,), ((12, 12),)),
    "large": Size("large", 1, 256, 256, (16,), (16,), ((16, 16),)),
}

# (kernel label, launcher call on meta tensors): each records the launches of one variant
VARIANTS = ("read fwd", "read bwd", "read bwd +dx", "glimpse fwd", "glimpse bwd", "glimpse bwd +dx",
            "write fwd", "write bwd", "write-read fwd", "write-read bwd")


class _Recorder:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **kwargs) records the call, runs nothing."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, kwargs))


def record_launch(variant: str, size: Size, n: int, dtype: torch.dtype, write_n: int | None = None):
    """The (kernel, args, kwargs) that the launcher for `variant` makes for one batch item of `size`
    (write-read: a write_n write, then an n read)."""
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(1, size.channels, size.height, size.width, **meta)
    params = torch.empty(1, 5, **meta)
    patch = torch.empty(1, size.channels, write_n or n, write_n or n, **meta)
    calls = []
    kernels = ("_attention_read_forward_kernel", "_attention_read_backward_kernel",
               "_attention_write_forward_kernel", "_attention_write_backward_kernel")
    patches = [mock.patch.object(ta, name, _Recorder(getattr(ta, name), calls)) for name in kernels]
    for p in patches:
        p.start()
    try:
        op, direction = variant.split()[:2]
        canvas = x if op == "read" else None
        if op == "write-read":
            if direction == "fwd":
                ta.attention_write_read_forward(patch, params, x, x, params, n)
            else:
                grad_out = torch.empty(ta._read_shape(x, True, n), **meta)
                ta.attention_write_read_backward(x, grad_out, patch, params, x, x, params, n, False, True)
        elif direction == "fwd":
            if op == "write":
                ta.attention_write_forward(patch, params, x)
            else:
                ta.attention_read_forward(x, canvas, params, n)
        elif op == "write":
            ta.attention_write_backward(torch.empty_like(x), patch, params)
        else:
            grad_out = torch.empty(ta._read_shape(x, canvas is not None, n), **meta)
            ta.attention_read_backward(grad_out, x, canvas, params, n, variant.endswith("+dx"), canvas is not None)
    finally:
        for p in patches:
            p.stop()
    (call,) = calls
    return call


def specialise(kernel, args, kwargs):
    """signature, constexprs and attrs for ASTSource, as Triton's JIT specialises a launch on a GPU."""
    kwargs = dict(kwargs)
    num_warps = kwargs.pop("num_warps")
    for option in ("num_stages", "maxnreg"):  # launch options, as num_warps (DRAW_TRITON_LAUNCH may set them)
        kwargs.pop(option, None)
    signature, constexprs, attrs = {}, dict(kwargs), {}
    for index, (name, value) in enumerate(zip(kernel.arg_names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif value == 1:
            constexprs[name] = 1  # Triton folds integer arguments equal to 1
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
    return signature, constexprs, attrs, num_warps


def _tool(name: str) -> str:
    """The NVIDIA tool that triton ships (and uses): name is "cuobjdump" or "ptxas"."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(ARCH).path if name == "ptxas" else getattr(triton.knobs.nvidia, name).path


def compile_with_ptxas_log(source: ASTSource, num_warps: int, num_stages: int | None = None,
                           maxnreg: int | None = None):
    """triton.compile for sm_ARCH, and the log of triton's own ptxas -v run (always compiled afresh);
    maxnreg caps the registers per thread (ptxas spills the rest)."""
    options = {"num_warps": num_warps, "num_stages": num_stages, "maxnreg": maxnreg}
    options = {key: value for key, value in options.items() if value is not None}
    knobs = triton.knobs
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", ARCH, 32), options=options)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    return compiled, log.getvalue()


def ptxas_usage(log: str) -> dict:
    """Registers, spill stores / loads and stack frame (bytes per thread) from a ptxas -v log."""

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        if not found and pattern.startswith("Used"):
            raise RuntimeError(f"no register count in the ptxas log: {log[-500:]!r}")
        return int(found.group(1)) if found else 0

    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "stack": number(r"(\d+) bytes stack frame")}


# SASS opcodes counted on their own: fp32 FMAs, warp shuffles (the cross-lane reductions of the
# broadcast-and-sum contractions), barriers, and tensor-core MMAs (HMMA: mma.sync, HGMMA: wgmma)
OPCODE_COLUMNS = {"FFMA": "sass_ffma", "SHFL": "sass_shfl", "BAR": "sass_bar", "MMA": "sass_mma"}


def _opcode(instruction: str) -> str:
    """'@!P0 FFMA.FTZ R1, ...' -> 'FFMA'; HMMA and HGMMA count as 'MMA'."""
    opcode = re.sub(r"^@!?U?P\w+\s+", "", instruction).split(None, 1)[0].split(".")[0]
    return "MMA" if opcode in ("HMMA", "HGMMA", "DMMA") else opcode


def sass_of(cubin: bytes) -> str:
    """The cubin's machine code as cuobjdump -sass lists it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout


def sass_counts(cubin: bytes, loop_trips: int, outer_trips: int = 1) -> dict:
    """count_sass on the cubin's machine code (cuobjdump -sass)."""
    return count_sass(sass_of(cubin), loop_trips, outer_trips)


def sass_listing(sass: str) -> list[tuple[int, str]]:
    """(address, text) of every machine instruction in a cuobjdump -sass listing."""
    return [(int(address, 16), text.strip()) for address, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]


def sass_loops(listing: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """The loops of a sass_listing: (a backward branch's target, the branch's address)."""
    loops = []
    for address, text in listing:
        target = re.search(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    return loops


def count_sass(sass: str, loop_trips: int, outer_trips: int = 1) -> dict:
    """Machine instructions in a SASS listing: all, those that touch local memory (LDL / STL: spills),
    the OPCODE_COLUMNS, and the dynamic count per program estimated as every instruction times the trips
    of each loop around it. A loop is a backward branch's target to the branch; one with no loop inside
    runs loop_trips times (the row blocks), one with a loop inside outer_trips times (the column tiles)."""
    listing = sass_listing(sass)
    instructions = [text for _, text in listing]
    local = [i for i in instructions if re.search(r"\b(LDL|STL)\b", i)]
    counts = {"sass_instructions": len(instructions), "sass_local": len(local)}
    opcodes = [_opcode(i) for i in instructions]
    for opcode, column in OPCODE_COLUMNS.items():
        counts[column] = sum(op == opcode for op in opcodes)
    loops = sass_loops(listing)  # (first address, branch address)
    trips = [outer_trips if any(a <= b0 and b1 <= b and (b0, b1) != (a, b) for b0, b1 in loops) else loop_trips
             for a, b in loops]
    dynamic = dynamic_local = 0
    for address, text in listing:
        runs = 1
        for (a, b), t in zip(loops, trips):
            if a <= address <= b:
                runs *= t
        dynamic += runs
        dynamic_local += runs if re.search(r"\b(LDL|STL)\b", text) else 0
    counts["sass_dynamic"] = dynamic
    counts["sass_dynamic_local"] = dynamic_local
    return counts


def ptx_instructions(ptx: str) -> int:
    body = ptx[ptx.index(".entry"):]
    lines = (line.split("//")[0].strip() for line in body.splitlines())
    return sum(1 for line in lines if line.endswith(";") and not line.startswith("."))


def contraction_label(kwargs: dict) -> str:
    """The launch's contraction; a write-read whose two ops contract differently: "read/write"."""
    read, write = kwargs["CONTRACT"], kwargs.get("CONTRACT_W", kwargs["CONTRACT"])
    return read if not kwargs.get("HAS_WRITE") or read == write else f"{read}/{write}"


def occupancy(registers: int, num_warps: int, shared: int) -> dict:
    """Programs and warps one sm_90 multiprocessor holds at once, from the registers per thread and the
    shared memory per program (the limits: _SM_REGISTERS and the rest)."""
    warp_registers = -(-registers * 32 // _REGISTER_UNIT) * _REGISTER_UNIT
    by_registers = (_SM_REGISTERS // warp_registers) // num_warps
    by_shared = _SM_SHARED // (shared + _SHARED_RESERVED)
    programs = min(by_registers, by_shared, _SM_WARPS // num_warps, _SM_PROGRAMS)
    return {"programs_per_sm": programs, "warps_per_sm": programs * num_warps}



def compile_launch(variant: str, size: Size, n: int, dtype_name: str, num_warps: int | None = None,
                   write_n: int | None = None, maxnreg: int | None = None):
    """Compile `variant` for sm_ARCH as its launcher launches it for one batch item of `size` (record_launch);
    num_warps and maxnreg, when given, replace the launch's. Returns (the compiled kernel, ptxas's log, the
    launch's keyword arguments, whether the warps were replaced)."""
    kernel, args, kwargs = record_launch(variant, size, n, DTYPES[dtype_name], write_n)
    signature, constexprs, attrs, launched_warps = specialise(kernel, args, kwargs)
    compiled, log = compile_with_ptxas_log(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                                           num_warps or launched_warps, kwargs.get("num_stages"),
                                           maxnreg or kwargs.get("maxnreg"))
    return compiled, log, kwargs, num_warps is not None


def report_one(variant: str, size: Size, n: int, dtype_name: str, num_warps: int | None = None,
               write_n: int | None = None, maxnreg: int | None = None) -> dict:
    """One kernel as the launcher launches it; num_warps and maxnreg, when given, replace the launch's
    warps and register cap; write_n: the write's grid of a write-read (n is the read's)."""
    compiled, log, kwargs, forced = compile_launch(variant, size, n, dtype_name, num_warps, write_n, maxnreg)
    num_warps, maxnreg = compiled.metadata.num_warps, maxnreg or kwargs.get("maxnreg")
    row = {"kernel": variant if write_n is None else f"{variant} (write n {write_n})",
           "size": f"{size.channels}x{size.height}x{size.width}", "n": n, "dtype": dtype_name,
           "contract": contraction_label(kwargs), "num_warps": num_warps, "warps_forced": forced,
           "maxnreg": maxnreg or "-", "block": f"{kwargs['BLOCK_N']}x{kwargs['BLOCK_H']}x{kwargs['BLOCK_W']}"}
    row.update(ptxas_usage(log))
    row["shared"] = compiled.metadata.shared
    row.update(occupancy(row["registers"], num_warps, row["shared"]))
    row.update(sass_counts(compiled.asm["cubin"], loop_trips=-(-size.height // kwargs["BLOCK_H"]),
                           outer_trips=kwargs["COL_TILES"]))
    # every warp of the program runs every instruction; one program covers one channel's H x W pixels
    row["warp_instrs_per_pixel"] = round(num_warps * row["sass_dynamic"] / (size.height * size.width), 2)
    row["local_per_pixel"] = round(num_warps * row["sass_dynamic_local"] / (size.height * size.width), 2)
    row["ptx_instructions"] = ptx_instructions(compiled.asm["ptx"])
    # tl.dot ops after Triton's own rewrites: a "sum" kernel should have none (triton 3.6 turned
    # sum(a[:, :, None] * b[None, :, :], 1) into a TF32 tl.dot; see _mm in kernels/triton_attention.py)
    row["ttgir_dots"] = len(re.findall(r"\btt\.dot\b|warp_group_dot", compiled.asm["ttgir"]))
    return row


COLUMNS = [("kernel", "kernel"), ("size", "C x H x W"), ("n", "n"), ("dtype", "dtype"), ("contract", "contract"),
           ("block", "block N x H x W"), ("num_warps", "warps"), ("maxnreg", "maxnreg"), ("registers", "registers"),
           ("spill_stores", "spill st B"), ("spill_loads", "spill ld B"), ("stack", "stack B"), ("shared", "shared B"),
           ("programs_per_sm", "programs / SM"), ("warps_per_sm", "warps / SM"),
           ("sass_instructions", "SASS instrs"), ("sass_local", "LDL/STL"), ("sass_ffma", "FFMA"),
           ("sass_shfl", "SHFL"), ("sass_bar", "BAR"), ("sass_mma", "MMA"),
           ("warp_instrs_per_pixel", "warp instrs / pixel"), ("local_per_pixel", "LDL/STL / pixel"),
           ("ptx_instructions", "PTX instrs"), ("ttgir_dots", "tt.dot")]


def compare_contractions(rows: list[dict]) -> list[dict]:
    """"sum" against "dot" for each kernel, size, n and dtype compiled both ways, with the launchers'
    default choice ("auto")."""
    pairs = {}
    for row in rows:
        forced = row["num_warps"] if row.get("warps_forced") else None  # with --num-warps: pairs at equal warps
        key = (row["kernel"], row["size"], row["n"], row["dtype"], forced, row.get("maxnreg"))
        pairs.setdefault(key, {})[row["contract"]] = row
    compared = []
    for (kernel, size, n, dtype, _forced, _maxnreg), pair in pairs.items():
        if not {"sum", "dot"} <= set(pair):
            continue
        with mock.patch.dict(os.environ, {"DRAW_TRITON_CONTRACTION": "auto"}):
            auto = ta.contraction(DTYPES[dtype], n, int(size.split("x")[-1]))
        total, dot = pair["sum"], pair["dot"]
        compared.append({"kernel": kernel, "size": size, "n": n, "dtype": dtype,
                         "warps": f"{total['num_warps']} / {dot['num_warps']}",
                         "sum_per_pixel": total["warp_instrs_per_pixel"], "dot_per_pixel": dot["warp_instrs_per_pixel"],
                         "sum_over_dot": round(total["warp_instrs_per_pixel"] / dot["warp_instrs_per_pixel"], 2),
                         "sum_spill": total["spill_stores"], "dot_spill": dot["spill_stores"], "auto": auto})
    return compared


COMPARE_COLUMNS = [("kernel", "kernel"), ("size", "C x H x W"), ("n", "n"), ("dtype", "dtype"), ("warps", "warps sum / dot"),
                   ("sum_per_pixel", "sum: warp instrs / pixel"), ("dot_per_pixel", "dot: warp instrs / pixel"),
                   ("sum_over_dot", "sum / dot"), ("sum_spill", "sum: spill st B"), ("dot_spill", "dot: spill st B"),
                   ("auto", "launched (auto)")]


def grids(variant: str, size: Size, n: int | None) -> list[tuple]:
    """(write n or None, n) of each compile of `variant` at `size`: its own grid sizes, or n for all."""
    if variant.startswith("write-read"):
        return [(n, n)] if n else list(size.write_read_ns)
    return [(None, n) for n in ([n] if n else size.write_ns if variant.startswith("write") else size.read_ns)]


def ptxas_version() -> str:
    out = subprocess.run([_tool("ptxas"), "--version"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"release (\S+),", out)
    return found.group(1).rstrip(",") if found else "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=common.split_list, default=list(SIZES),
                        help=f"comma-separated subset of {','.join(SIZES)} (default: all: 28x28 n 2, 5, 12; "
                        "3x54x54 n 12; 1x100x100 n 12; 256x256 n 16)")
    parser.add_argument("--dtypes", type=common.split_list, default=["fp32", "bf16"],
                        help=f"comma-separated subset of {','.join(DTYPES)} (default fp32,bf16)")
    parser.add_argument("--kernels", type=common.split_list, default=list(VARIANTS),
                        help=f"comma-separated subset of: {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--json", default=str(RESULTS_DIR / "kernel-report-sm90.json"), metavar="PATH",
                        help="where to write the rows and metadata (default bench/results/kernel-report-sm90.json)")
    parser.add_argument("--markdown", default=str(RESULTS_DIR / "kernel-report-sm90.md"), metavar="PATH",
                        help="where to write the markdown table (default bench/results/kernel-report-sm90.md)")
    parser.add_argument("--n", type=int, default=None, metavar="N",
                        help="compile every kernel at grid size N instead of each size's own (a quick check)")
    parser.add_argument("--contractions", type=common.split_list, default=["sum", "dot"],
                        help=f"comma-separated subset of {','.join(ta.CONTRACTIONS)} (default sum,dot: both "
                        "forms of every kernel; fp64 always compiles 'sum', once)")
    parser.add_argument("--num-warps", type=common.split_list, default=None, metavar="W,...",
                        help="compile every kernel with each of these warp counts instead of the launch's own "
                        "(e.g. 1,2,4,8: what fewer or more warps per program would issue)")
    parser.add_argument("--maxnreg", type=common.split_list, default=None, metavar="R,...",
                        help="compile every kernel with each of these register caps per thread (ptxas's .maxnreg; "
                        "'none' for the launch's own, e.g. none,64,96: the spills a cap costs against the programs "
                        "per SM it gains)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    common.check_choices(parser, "--sizes", args.sizes, SIZES)
    common.check_choices(parser, "--dtypes", args.dtypes, DTYPES)
    common.check_choices(parser, "--kernels", args.kernels, VARIANTS)
    common.check_choices(parser, "--contractions", args.contractions, ta.CONTRACTIONS)
    if args.num_warps:
        if not all(w.isdigit() and int(w) in (1, 2, 4, 8, 16) for w in args.num_warps):
            parser.error(f"--num-warps: powers of two from 1 to 16, got {','.join(args.num_warps)}")
        args.num_warps = [int(w) for w in args.num_warps]
    if args.maxnreg:
        allowed = ta.LAUNCH_SETTINGS["maxnreg"]
        if not all(r == "none" or r.isdigit() and int(r) in allowed for r in args.maxnreg):
            parser.error(f"--maxnreg: each none or one of {', '.join(map(str, allowed))}, got {','.join(args.maxnreg)}")
        args.maxnreg = [None if r == "none" else int(r) for r in args.maxnreg]
    if kernels._triton_interpreter():
        parser.error("compiles for the GPU: unset TRITON_INTERPRET (the interpreter compiles nothing)")

    rows = []
    for dtype_name in args.dtypes:
        # the launchers read the contraction from the environment; fp64 has only "sum"
        contractions = ["sum"] if dtype_name == "fp64" else args.contractions
        for contract in contractions:
            with mock.patch.dict(os.environ, {"DRAW_TRITON_CONTRACTION": contract}):
                for size in (SIZES[name] for name in args.sizes):
                    for variant in args.kernels:
                        for write_n, n in grids(variant, size, args.n):
                            for warps, cap in itertools.product(args.num_warps or [None], args.maxnreg or [None]):
                                common.log(f"compiling {variant} {size.name} n={n} {dtype_name} {contract}"
                                           + (f" {warps} warps" if warps else "") + (f" maxnreg {cap}" if cap else ""))
                                rows.append(report_one(variant, size, n, dtype_name, warps, write_n, cap))
    meta = {
        "target": f"sm_{ARCH} (compiled, not run: no GPU needed)", "triton": triton.__version__,
        "torch": torch.__version__, "ptxas": ptxas_version(), "commit": common.git_commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        # launch settings replacing the launchers' own (kernels/triton_attention.py), "auto" unless set
        "triton_launch": os.environ.get("DRAW_TRITON_LAUNCH") or "auto",
    }
    print(common.text_table(rows, COLUMNS))
    compared = compare_contractions(rows)
    if compared:
        print("\n" + common.text_table(compared, COMPARE_COLUMNS))
    spilling = [row for row in rows if row["spill_stores"] or row["spill_loads"]]
    rewritten = [row for row in rows if row["contract"] == "sum" and row["ttgir_dots"]]
    summary = [f"{len(spilling)} of {len(rows)} kernels spill: "
               + (", ".join(f"{r['kernel']} {r['size']} n={r['n']} {r['dtype']} {r['contract']} ({r['spill_stores']} B)"
                            for r in spilling) or "none"),
               f"{len(rewritten)} of {sum(r['contract'] == 'sum' for r in rows)} sum kernels hold a tt.dot: "
               + (", ".join(f"{r['kernel']} {r['size']} n={r['n']} {r['dtype']}" for r in rewritten) or "none")]
    print("\n".join(summary))
    if not args.no_write:
        common.write_json(args.json, meta, rows)
        notes = ["Registers and spill bytes are per thread, from ptxas -v on the PTX that triton.compile "
                 "produced for each launch the launchers make (block sizes as on a GPU); SASS counts from "
                 "cuobjdump. Nothing here was run.", *summary]
        sections = [("Kernels", common.markdown_table(rows, COLUMNS))]
        if compared:
            sections.insert(0, ("The two contractions", common.markdown_table(compared, COMPARE_COLUMNS)))
        common.write_markdown(args.markdown, f"Fused attention kernels compiled for sm_{ARCH}", meta, sections, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
