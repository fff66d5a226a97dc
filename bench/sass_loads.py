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
import sys

import kernel_report as kr

_LOAD = re.compile(r"\bLDG(?:\.\w+)*\s+(R\d+)")


def row_loop(listing: list[tuple[int, str]]) -> tuple[int, int]:
    """(first, last) address of the longest loop of a kernel_report.sass_listing."""
    loops = kr.sass_loops(listing)
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
    listing = kr.sass_listing(sass)
    first, last = row_loop(listing)
    body = [(address, text) for address, text in listing if first <= address <= last]
    span = max(last - first, 1)
    loads = []
    for index, (address, text) in enumerate(body):
        match = _LOAD.search(text)
        if not match:
            continue
        register = re.compile(rf"\b{match.group(1)}\b")
        reader = next(((a, t) for a, t in body[index + 1:] if register.search(_sources(t))), None)
        loads.append({"issued": (address - first) / span, "first_read": (reader[0] - first) / span if reader else 1.0,
                      "reader": kr._opcode(reader[1]) if reader else "next trip"})
    return {"loop_instructions": len(body), "loads": loads}


def grids(variant: str, size: kr.Size) -> tuple[int, int | None]:
    """(n, write n) that `variant` is compiled at: the size's largest grid (a write-read's last pair)."""
    if variant.startswith("write-read"):
        write_n, n = size.write_read_ns[-1]
        return n, write_n
    return (size.write_ns if variant.startswith("write") else size.read_ns)[-1], None


def compiled_sass(variant: str, size: kr.Size, dtype_name: str) -> str:
    """cuobjdump -sass of `variant` as the launcher launches it at `size` (kernel_report's compile)."""
    n, write_n = grids(variant, size)
    compiled, _log, _kwargs, _forced = kr.compile_launch(variant, size, n, dtype_name, write_n=write_n)
    return kr.sass_of(compiled.asm["cubin"])


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
