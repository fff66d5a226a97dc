"""Where a kernel's row loop issues its global loads, and where it first reads what each one loaded, as
fractions of the loop's machine code: sm_90, compiled as the launchers launch it (bench/kernel_report.py), no
GPU. A load whose value is first read near the end of the loop stays in flight through the trip's arithmetic
(LOAD_AHEAD=1 in kernels/triton_attention.py); one read soon after it is issued holds the trip up.

    python bench/sass_loads.py --kernels "read fwd,read bwd" --sizes svhn
    DRAW_TRITON_LAUNCH=LOAD_AHEAD=1 python bench/sass_loads.py --kernels "read fwd,read bwd" --sizes svhn

The row loop is the longest backward branch's body. A load is an LDG; its first reader is the first later
instruction in the loop with the load's destination register among its sources (none: it is read on the next
trip, counted as 1.00).
"""

import argparse
import re
import subprocess
import sys
import tempfile
import pathlib

import kernel_report as kr
from triton.compiler import ASTSource

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)")
_LOAD = re.compile(r"\bLDG(?:\.\w+)*\s+(R\d+)")


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, text) of every machine instruction in cuobjdump -sass output."""
    return [(int(address, 16), text.strip()) for address, text in _INSTRUCTION.findall(sass)]


def row_loop(code: list[tuple[int, str]]) -> tuple[int, int]:
    """(first, last) address of the longest loop: a branch back to an earlier address, and that address."""
    loops = [(int(m.group(1), 16), address) for address, text in code
             if (m := _BRANCH.search(text)) and int(m.group(1), 16) < address]
    if not loops:
        raise ValueError("no loop in this kernel's machine code")
    return max(loops, key=lambda loop: loop[1] - loop[0])


def _sources(text: str) -> str:
    """An instruction's source operands (after the destination; a store's are all sources), predicate dropped."""
    if text.startswith("@"):
        text = text.split(None, 1)[1]
    opcode, _, operands = text.partition(" ")
    return operands if opcode.startswith("ST") else operands.partition(",")[2]


def loads_in_loop(sass: str) -> dict:
    """The row loop's length and, per global load in it, where it is issued and first read (fractions of the
    loop) and the opcode that reads it."""
    code = instructions(sass)
    first, last = row_loop(code)
    body = [(address, text) for address, text in code if first <= address <= last]
    span = max(last - first, 1)
    loads = []
    for index, (address, text) in enumerate(body):
        match = _LOAD.search(text)
        if not match:
            continue
        register = re.compile(rf"\b{match.group(1)}\b")
        reader = next(((a, t) for a, t in body[index + 1:] if register.search(_sources(t))), None)
        loads.append({"issued": (address - first) / span, "first_read": (reader[0] - first) / span if reader else 1.0,
                      "reader": reader[1].lstrip("@!PT0123456789 ").split()[0] if reader else "next trip"})
    return {"loop_instructions": len(body), "loads": loads}


def grids(variant: str, size: kr.Size) -> tuple[int, int | None]:
    """(n, write n) that `variant` is compiled at: the size's largest grid (a write-read's last pair)."""
    if variant.startswith("write-read"):
        write_n, n = size.write_read_ns[-1]
        return n, write_n
    return (size.write_ns if variant.startswith("write") else size.read_ns)[-1], None


def compiled_sass(variant: str, size: kr.Size, dtype_name: str) -> str:
    """cuobjdump -sass of `variant` as the launcher launches it at `size` (kernel_report's compile)."""
    kernel, args, kwargs = kr.record_launch(variant, size, *grids(variant, size)[:1], kr.DTYPES[dtype_name],
                                            grids(variant, size)[1])
    signature, constexprs, attrs, num_warps = kr.specialise(kernel, args, kwargs)
    compiled, _log = kr.compile_with_ptxas_log(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                                               num_warps, kwargs.get("num_stages"), kwargs.get("maxnreg"))
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "kernel.cubin"
        path.write_bytes(compiled.asm["cubin"])
        return subprocess.run([kr._tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="read fwd,read bwd", help="comma-separated, as bench/kernel_report.py names them")
    p.add_argument("--sizes", default="svhn", help="comma-separated subset of " + ",".join(kr.SIZES))
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = p.parse_args(argv)
    for size_name in args.sizes.split(","):
        size = kr.SIZES[size_name]
        for variant in args.kernels.split(","):
            found = loads_in_loop(compiled_sass(variant, size, args.dtype))
            loads = found["loads"]
            print(f"{variant} {size.channels}x{size.height}x{size.width} n {grids(variant, size)[0]} {args.dtype}: "
                  f"{found['loop_instructions']} instructions a trip, {len(loads)} global loads")
            for load in loads:
                print(f"  issued at {load['issued']:.2f}, first read at {load['first_read']:.2f} ({load['reader']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
