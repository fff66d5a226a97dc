"""Which launch settings the compiled "sum" contraction gets right: draw verify's check, one setting changed at a time.

On an H100 (triton 3.6) the "sum" backward kernels gave dx 4x off at some block shapes, and forced
"sum" at N 12-16 lost precision (bench/RESULTS.md, 2026-11-22; that run's table is
bench/results/h100-2026-11-22/sum-contraction-blocks.txt): Triton had rewritten one of _mm's products into
a TF32 tl.dot, which _mm now prevents. This probe reruns such cases with the launch changed one way at a
time (warps, BLOCK_N, BLOCK_H, the contraction) and prints each quantity's relative error to float64;
"!" marks a failed check.

    python bench/probe_sum_blocks.py                       # CUDA: every case and setting
    TRITON_INTERPRET=1 python bench/probe_sum_blocks.py --device cpu --variants launched,rows/2 --cases 1
"""

import argparse
import os
import sys
import time
from unittest import mock

import torch

from draw import verify
from draw.kernels import triton_attention as ta

CASES = (  # on the H100 before the fix: dx wrong in the first two, outputs in the next two; the last two right
    verify.Case("read", 2, 3, 13, 9, 1, "fp32"),
    verify.Case("read", 3, 1, 9, 16, 2, "fp32"),
    verify.Case("read", 2, 1, 21, 9, 16, "fp32"),
    verify.Case("write", 2, 1, 21, 9, 12, "fp32"),
    verify.Case("read", 2, 1, 28, 28, 2, "fp32"),
    verify.Case("write", 2, 3, 13, 9, 1, "fp32"),
)
VARIANTS = ("launched", "warps1", "warps2", "warps8", "block_n4", "rows*2", "rows/2", "dot")


def launch_changes(variant: str) -> tuple[dict, object]:
    """(environment, replacement for ta._sum_launch_config or None) of one variant."""
    env = {"DRAW_TRITON_CONTRACTION": "dot" if variant == "dot" else "sum"}
    if variant.startswith("warps"):
        env["DRAW_TRITON_NUM_WARPS"] = variant.removeprefix("warps")
    edits = {"block_n4": lambda c: {"BLOCK_N": max(c["BLOCK_N"], 4)},
             "rows*2": lambda c: {"BLOCK_H": c["BLOCK_H"] * 2},
             "rows/2": lambda c: {"BLOCK_H": max(c["BLOCK_H"] // 2, 1)}}
    if variant not in edits:
        return env, None
    launched = ta._sum_launch_config

    def changed(*args):
        config = launched(*args)
        return {**config, **edits[variant](config)}

    return env, changed


def probe(case: verify.Case, variant: str, device: torch.device) -> str:
    env, config = launch_changes(variant)
    with mock.patch.dict(os.environ, env), mock.patch.object(ta, "_sum_launch_config", config or ta._sum_launch_config):
        start = time.perf_counter()
        rows = verify.check_case(case, device)
        launch = ta._launch_config(case.n, case.height, case.width, True, torch.float32)
    errors = " ".join(f"{r['quantity'].replace('grad ', 'd')}={r['relative_error']:.1e}{'' if r['passed'] else '!'}"
                      for r in rows)
    return (f"{case.name:24s} {variant:9s} backward H{launch['BLOCK_H']} W{launch['BLOCK_W']} N{launch['BLOCK_N']} "
            f"w{launch['num_warps']}  {errors}  ({time.perf_counter() - start:.1f} s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {','.join(VARIANTS)}")
    p.add_argument("--cases", type=int, default=len(CASES), help="the first K cases")
    p.add_argument("--out", default=None, help="also write the lines to this text file")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    lines = [probe(case, variant, torch.device(args.device)) for case in CASES[:args.cases] for variant in variants]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
