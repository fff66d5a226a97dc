"""Tune the fused attention kernels' launch settings on this device: block sizes, warps and pipeline
stages, each candidate checked against the reference before it is timed.

A target is one op (read, write, write-read), one size (bench_attention.py's sizes) and one kernel:
"fwd", the forward kernel timed alone, or "bwd", the backward kernel timed as forward + backward with
the forward kept at the launchers' settings. From the launchers' own settings the search changes one
setting at a time (BLOCK_H, BLOCK_W, num_warps, num_stages, the register cap maxnreg, LOAD_AHEAD; LAUNCH_SETTINGS
in kernels/triton_attention.py), moves to the fastest neighbour while that gains more than --min-gain, and
stops after --rounds rounds or --target-budget seconds. Each candidate first runs against the reference
backend on the same inputs. A candidate whose forward or any gradient is further off than --tolerance
(relative to the largest element) is recorded as wrong and never chosen, so the search also checks
the compiler at block shapes the launchers do not use.

Writes --json (every candidate) and --markdown (per target: the launchers' settings and time, the best
found, and the speed-up), both rewritten after every target, so a stopped run keeps what it measured.
A result applies to any run through DRAW_TRITON_LAUNCH (draw train, bench_attention.py):
DRAW_TRITON_LAUNCH="bwd.BLOCK_H=32,bwd.num_warps=4" sets the backward kernels' rows and warps.

    PYTHONPATH=. python bench/tune_attention.py --sizes 16384x3x54x54 --ops read --json t.json   # GPU
    python bench/tune_attention.py --quick          # CPU: Triton's interpreter, tiny inputs; checks, no timing
    ncu --clock-control none -k regex:attention python bench/tune_attention.py --sizes 16384x3x54x54 \\
        --ops read --kernels fwd --settings BLOCK_H=32 --once    # one launch per setting, for a profiler
"""

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from unittest import mock

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # without a GPU the kernels run in Triton's interpreter alone
import triton  # noqa: E402

import bench_attention as ba  # noqa: E402
import common  # noqa: E402
from draw.kernels import triton_attention as ta  # noqa: E402

KERNELS = ("fwd", "bwd")
SEARCHED = ("BLOCK_H", "BLOCK_W", "num_warps", "num_stages", "maxnreg", "LOAD_AHEAD")
# register caps tried (none by default): the 3x54x54 read kernels hold 96-255 registers, 2-4 programs per SM;
# compiled for sm_90, a cap of 80 or 96 gives 5-6 at a few bytes of spills (bench/kernel_report.py --maxnreg)
MAXNREG = [64, 80, 96, 128]
QUICK_SIZE = ba.Size("quick", 3, 2, 19, 37, 5, 3)  # odd shape; read N 5 ("dot"), write N 3 ("sum")
DEFAULT_SIZES = "1024x1x28x28,16384x3x54x54"  # mnist-paper's training batch; SVHN crops, bandwidth-bound


@dataclass(frozen=True)
class Target:
    op: str
    size: ba.Size
    kernel: str  # "fwd" or "bwd"
    contraction: str  # DRAW_TRITON_CONTRACTION: "auto", "sum" or "dot"

    @property
    def name(self) -> str:
        return f"{self.op} {self.kernel} {self.size.name} N {self.size.n(self.op)} ({self.contraction})"

    def environment(self, settings: dict | None) -> dict:
        """The variables that launch this target's kernel with `settings` (None: the launchers' own)."""
        launch = "" if settings is None else ",".join(f"{self.kernel}.{k}={v}" for k, v in settings.items())
        return {"DRAW_TRITON_CONTRACTION": self.contraction, "DRAW_TRITON_LAUNCH": launch, "DRAW_TRITON_NUM_WARPS": ""}

    def launcher_config(self, device: torch.device) -> dict:
        """The launchers' settings for this target's kernel on `device` (the contraction as the target sets it)."""
        s, backward, programs = self.size, self.kernel == "bwd", self.size.batch * self.size.channels
        with mock.patch.dict(os.environ, self.environment(None)):
            if self.op == "write":
                return ta._launch_config(s.write_n, s.height, s.width, backward, torch.float32, device, programs)
            return ta._read_config(s.read_n, s.height, s.width, backward, torch.float32,
                                   s.write_n if self.op == "write-read" else None, device, programs)


def start_settings(config: dict) -> dict:
    """The searched settings of a launch config (maxnreg only where it was set: no cap otherwise)."""
    return {key: config[key] for key in SEARCHED if key in config}


def search_space(config: dict, height: int, width: int, timed: bool = True) -> dict:
    """Values tried per setting: rows and columns from 16 (tl.dot; 4 rows for "sum") to the padded image,
    at least an eighth of its width; LOAD_AHEAD 0 and 1 (other code: checked untimed too); warps 1-8, stages
    1-4 and the register caps MAXNREG only when timed (the code's results do not depend on them, and Triton's
    interpreter ignores them)."""
    low = max(ta.min_block(config), 4)
    rows = max(triton.next_power_of_2(height), low)
    cols = max(triton.next_power_of_2(width), low)
    return {"BLOCK_H": [v for v in ta.LAUNCH_SETTINGS["BLOCK_H"] if low <= v <= rows],
            "BLOCK_W": [v for v in ta.LAUNCH_SETTINGS["BLOCK_W"] if max(low, cols // 8) <= v <= cols],
            "num_warps": [1, 2, 4, 8] if timed else [config["num_warps"]],
            "num_stages": [1, 2, 3, 4] if timed else [config["num_stages"]],
            "maxnreg": MAXNREG if timed else [],
            "LOAD_AHEAD": [0, 1]}


def neighbours(current: dict, space: dict, max_area: int, height: int) -> list[dict]:
    """current with one setting changed, blocks no larger than max_area elements (register use grows with it),
    each as the launchers would run it on images `height` rows tall: LOAD_AHEAD 0 where the rows are one block
    (ta.no_load_ahead_in_one_trip), so that no candidate is the same launch as another or as current."""
    found = []
    for key in SEARCHED:
        for value in space[key]:
            candidate = ta.no_load_ahead_in_one_trip({**current, key: value}, height)
            if candidate != current and candidate not in found and candidate["BLOCK_H"] * candidate["BLOCK_W"] <= max_area:
                found.append(candidate)
    return found


def settings_text(settings: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in settings.items())


def parse_settings(text: str, parser: argparse.ArgumentParser) -> dict:
    """"BLOCK_H=32,num_warps=4" -> {"BLOCK_H": 32, "num_warps": 4}, checked as DRAW_TRITON_LAUNCH checks it
    (no fwd. / bwd.: --kernels says which kernels)."""
    try:
        settings = ta.parse_launch_settings(text, source="--settings")
    except ValueError as error:
        parser.error(str(error))
    if any(direction for direction, _, _ in settings):
        parser.error(f"--settings {text!r}: no fwd. or bwd. here (--kernels chooses the kernels)")
    return {name: value for _, name, value in settings}


# ---------------------------------------------------------------------------------------------
# One candidate: checked against the reference, then timed
# ---------------------------------------------------------------------------------------------


def outputs(provider: str, case: dict) -> list[torch.Tensor]:
    """The forward's output and, for a case with gradients, every gradient."""
    forward = ba.forward_fn(provider, case)
    if not case["grad_names"]:
        with torch.no_grad():
            return [ba.flat(forward())]
    out = forward()
    inputs = [case["tensors"][name] for name in case["grad_names"]]
    return [ba.flat(out).detach(), *torch.autograd.grad(out, inputs, case["grad_out"])]


def timer_for(target: Target, device: torch.device) -> str:
    """How a candidate is timed: as bench_attention.py times the target's size, the device's time alone where it
    can ("cudagraph" at the small, launch and middle sizes, "do_bench" at the bandwidth sizes)."""
    return ba.timers_for(target.size, device, True)[-1]


def evaluate(target: Target, settings: dict | None, cases: list[dict], reference: list, args, device, copy_gbps) -> dict:
    """One row: the candidate's largest relative error against the reference on cases[0], then (when within
    --tolerance) its median time (on every input set of `cases`, ba.rotated_cases); status "ok", "wrong" (no
    time) or "failed" (compile or launch error)."""
    case = cases[0]
    row = {"op": target.op, "size": target.size.name, "n": target.size.n(target.op), "kernel": target.kernel,
           "contraction": target.contraction, "settings": "launchers'" if settings is None else settings_text(settings),
           "status": "failed", "ms": None, "gbps": None, "pct_copy": None, "rel_err": None}
    started = time.perf_counter()
    with mock.patch.dict(os.environ, target.environment(settings)):
        try:
            got = outputs("triton", case)
            row["rel_err"] = max(ba.relative_error(g, r) for g, r in zip(got, reference))
            del got
            if row["rel_err"] > args.tolerance:
                row["status"] = "wrong"
            elif args.once:
                row["status"] = "ok"
            else:
                nbytes = ba.BYTES[target.op](target.size, "fwd" if target.kernel == "fwd" else "fwd+bwd")
                timed = ba.timed_row(ba.provider_ops("triton"), cases, timer_for(target, device), nbytes, copy_gbps,
                                     args, device)
                row.update(status="ok", ms=timed["ms"], gbps=timed["gbps"], pct_copy=timed["pct_copy"])
        except Exception as error:  # a setting the compiler or the GPU refuses is a result, not the end
            reason = "out of memory" if common.is_out_of_memory(error) else f"{type(error).__name__}: {error}"
            row["reason"] = reason.splitlines()[0][:300]
    row["seconds"] = round(time.perf_counter() - started, 2)
    try:
        common.free_memory(device)
    except Exception as error:  # a sticky CUDA error (e.g. an illegal address): this process can launch no more
        row.update(status="failed", ms=None, gbps=None, pct_copy=None,
                   reason=f"the device was lost: {type(error).__name__}: {error}".splitlines()[0][:300])
        row["device_lost"] = True
    shown = f"{row['ms']:.4f} ms" if row["ms"] is not None else row.get("reason", row["status"])
    common.log(f"{target.name} [{row['settings']}]: {row['status']}, rel err {row['rel_err']}, {shown}")
    return row


def tune(target: Target, args, device, copy_gbps, rows: list) -> dict:
    """Tries the target's candidates (each row appended to rows); returns the target's summary."""
    mode = "fwd" if target.kernel == "fwd" else "fwd+bwd"
    case = ba.make_inputs(target.op, target.size, mode, device, seed=args.seed)
    reference = outputs("eager", case)
    timed = not args.once and device.type == "cuda"
    cases = ba.rotated_cases(case, target.op, target.size, mode, device, args.seed, [timer_for(target, device)]) if timed else [case]
    config = target.launcher_config(device)
    current = start_settings(config)
    own = []  # this target's rows (appended to rows too)

    def attempt(settings: dict | None, round_: int) -> dict:
        row = evaluate(target, settings, cases, reference, args, device, copy_gbps)
        row.update(round=round_, launchers=settings is None)
        if settings is None:
            row["resolved"] = settings_text(current)
        own.append(row)
        rows.append(row)  # as it is tried: a target the device is lost in keeps its rows too
        if row.get("device_lost"):
            raise DeviceLost(f"{target.name} [{row['settings']}]: {row['reason']}")
        return row

    launchers = best = attempt(None, 0)
    if args.settings:  # exactly the settings asked for
        for settings in args.settings:
            best = faster(best, attempt(settings, 1), 0.0)
    else:  # the search; untimed (--once, or on a CPU) it checks every neighbour of the launchers' settings once
        space = search_space(config, target.size.height, target.size.width, timed=not args.once)
        max_area = args.max_area_factor * config["BLOCK_H"] * config["BLOCK_W"]
        deadline = time.perf_counter() + args.target_budget
        tried = {settings_text(current)}
        for round_ in range(1, args.rounds + 1):
            round_best, round_settings = None, None
            for candidate in neighbours(current, space, max_area, target.size.height):
                if time.perf_counter() > deadline:
                    break
                if settings_text(candidate) in tried:
                    continue
                tried.add(settings_text(candidate))
                row = attempt(candidate, round_)
                if faster(round_best, row, 0.0) is row:
                    round_best, round_settings = row, candidate
            if args.once or round_best is None or faster(best, round_best, args.min_gain) is not round_best:
                break  # no neighbour is enough faster: a local optimum
            best, current = round_best, round_settings
            if time.perf_counter() > deadline:
                break
    del case, reference
    common.free_memory(device)
    speedup = launchers["ms"] / best["ms"] if launchers["ms"] and best["ms"] else None
    return {"target": target.name, "op": target.op, "size": target.size.name, "kernel": target.kernel,
            "contraction": target.contraction, "launchers_settings": settings_text(start_settings(config)),
            "launchers_ms": launchers["ms"], "best_settings": best["settings"], "best_ms": best["ms"],
            "best_pct_copy": best["pct_copy"], "speedup": speedup, "tried": len(own),
            "wrong": sum(r["status"] == "wrong" for r in own), "failed": sum(r["status"] == "failed" for r in own)}


class DeviceLost(RuntimeError):
    """A candidate left the CUDA context unusable: nothing more can run in this process."""


def faster(a: dict | None, b: dict, min_gain: float) -> dict:
    """b if it is right and faster than a by more than the fraction min_gain, else a."""
    if b["status"] != "ok" or b["ms"] is None:
        return a
    if a is None or a["ms"] is None or b["ms"] < a["ms"] * (1 - min_gain):
        return b
    return a


def launch_lines(summaries: list[dict]) -> list[str]:
    """One DRAW_TRITON_LAUNCH value per op, size and contraction that sets the best settings found for its
    kernels (fwd. and bwd. entries); none where the launchers' own were best."""
    grouped = {}
    for t in summaries:
        if t["best_settings"] != "launchers'":
            entries = [f"{t['kernel']}.{entry}" for entry in t["best_settings"].split(",")]
            grouped.setdefault((t["op"], t["size"], t["contraction"]), []).extend(entries)
    return [f"{op} {size} ({contraction}): DRAW_TRITON_LAUNCH={','.join(entries)}"
            + ("" if contraction == "auto" else f" DRAW_TRITON_CONTRACTION={contraction}")
            for (op, size, contraction), entries in grouped.items()]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


SUMMARY_COLUMNS = (("target", "target"), ("launchers_settings", "launchers' settings"), ("launchers_ms", "ms"),
                   ("best_settings", "best settings"), ("best_ms", "best ms"), ("best_pct_copy", "best % copy"),
                   ("speedup", "speed-up"), ("tried", "tried"), ("wrong", "wrong"), ("failed", "failed"))
ROW_COLUMNS = (("op", "op"), ("kernel", "kernel"), ("size", "size"), ("contraction", "contraction"),
               ("settings", "settings"), ("status", "status"), ("rel_err", "rel err"), ("ms", "median ms"),
               ("pct_copy", "% copy"), ("seconds", "s"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="bench_attention.py's groups or sizes (16384x3x54x54); default: "
                   f"{DEFAULT_SIZES} on CUDA, small on CPU; with --quick a tiny odd shape")
    p.add_argument("--ops", type=common.split_list, default=list(ba.OPS), help="read,write,write-read")
    p.add_argument("--kernels", type=common.split_list, default=list(KERNELS), help="fwd,bwd")
    p.add_argument("--contractions", type=common.split_list, default=["auto"],
                   help="DRAW_TRITON_CONTRACTION values to search under, each from its own launcher settings: auto,sum,dot")
    p.add_argument("--settings", action="append", default=None, metavar="SPEC",
                   help="time exactly these settings (repeatable; 'BLOCK_H=32,num_warps=4') instead of searching")
    p.add_argument("--once", action="store_true", help="check each setting once, no timing (for a profiler); "
                   "without --settings: every neighbour of the launchers' settings. Always so on a CPU")
    p.add_argument("--quick", action="store_true", help="one round on a tiny odd shape (for the CPU: checks the script)")
    p.add_argument("--resume", action="store_true",
                   help="keep the targets already in --json and search only the others (a run split in parts)")
    p.add_argument("--rounds", type=int, default=3, help="at most this many moves from the launchers' settings")
    p.add_argument("--min-gain", type=float, default=0.02, help="move only to a neighbour faster by more than this fraction")
    p.add_argument("--target-budget", type=float, default=120.0, help="seconds of searching per target")
    p.add_argument("--max-area-factor", type=int, default=4,
                   help="candidate blocks hold at most this many times the launchers' BLOCK_H x BLOCK_W")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest relative error against the reference (fp32 kernels are ~1e-6 off; TF32 ~1e-3)")
    p.add_argument("--rep-ms", type=int, default=100, help="CUDA: do_bench's milliseconds of timed calls per candidate")
    p.add_argument("--reps", type=int, default=5, help="CPU: at most this many timed calls per candidate")
    p.add_argument("--budget", type=float, default=1.0, help="CPU: seconds of timed calls per candidate")
    common.add_run_arguments(p, seed_help="seed of the random inputs", plot_help=None)
    args = p.parse_args(argv)
    for flag, values, allowed in (("--ops", args.ops, ba.OPS), ("--kernels", args.kernels, KERNELS),
                                  ("--contractions", args.contractions, ta.CONTRACTIONS)):
        common.check_choices(p, flag, values, allowed)
    args.settings = [parse_settings(text, p) for text in args.settings] if args.settings else None
    if args.resume and not args.json:
        p.error("--resume needs --json (the file that holds the targets searched so far)")
    if args.quick:
        args.rounds = 1
    return args


def earlier_results(path: str) -> tuple[list[dict], list[dict]]:
    """(rows, summaries) of an earlier run's --json, for --resume; none when it has not been written yet."""
    if not os.path.isfile(path):
        return [], []
    with open(path) as f:
        earlier = json.load(f)
    return earlier["results"], earlier["summary"]


def write_results(args, meta: dict, rows: list, summaries: list, partial: bool = False) -> None:
    """--json and --markdown as they stand (after each target, or when the device was lost)."""
    meta = {**meta, "partial": True} if partial else meta
    if args.json:
        common.write_json(args.json, meta, rows, summary=summaries)
    if args.markdown:
        common.write_markdown(args.markdown, "Attention launch settings", meta,
                              [("Per target", common.markdown_table(summaries, SUMMARY_COLUMNS)),
                               ("Every candidate", common.markdown_table(rows, ROW_COLUMNS))],
                              notes=[f"`{line}`" for line in launch_lines(summaries)])


def is_timed(device: torch.device) -> bool:
    """Times mean something on a GPU only: on a CPU the kernels run in Triton's interpreter."""
    return device.type == "cuda"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    common.set_cpu_threads(args.threads, device)
    args.once = args.once or not is_timed(device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        common.log("on CPU the kernels run in Triton's interpreter alone: set TRITON_INTERPRET=1")
        return 2
    reason = common.triton_skip_reason(device) if device.type == "cuda" else None
    if reason:
        common.log(f"nothing to tune: {reason}")
        return 1
    if args.quick:
        sizes = [QUICK_SIZE] if args.sizes is None else ba.select_sizes(args.sizes, device)
    else:
        sizes = ba.select_sizes(args.sizes or (DEFAULT_SIZES if device.type == "cuda" else "small"), device)
    copy_gbps = common.copy_bandwidth_gbps(device, (1024 if device.type == "cuda" else 64) * common.MIB)
    meta = common.metadata(device, copy_bandwidth_gbps=round(copy_gbps, 2), dtype="float32",
                           tolerance=args.tolerance, min_gain=args.min_gain)
    rows, summaries = [], []
    if args.resume:
        rows, summaries = earlier_results(args.json)
    for size, op, kernel, contraction in itertools.product(sizes, args.ops, args.kernels, args.contractions):
        target = Target(op, size, kernel, contraction)
        if any(t["target"] == target.name for t in summaries):
            common.log(f"{target.name}: in {args.json} already (--resume)")
            continue
        # in Triton's interpreter too, start from the row blocks a GPU launches, not the interpreter's larger ones
        lost = None
        with mock.patch.object(ta, "_INTERPRETER_TILE", 0):
            try:
                summaries.append(tune(target, args, device, copy_gbps, rows))
            except DeviceLost as error:
                lost = error
            except KeyboardInterrupt:  # Ctrl-C, or the suite's SIGINT at the part's time limit
                write_results(args, meta, rows, summaries, partial=True)
                common.log(f"interrupted in {target.name}: the candidates tried so far are in {args.json or 'the log'}; "
                           "--resume searches this target again")
                return common.EXIT_INTERRUPTED
        write_results(args, meta, rows, summaries, partial=lost is not None)
        if lost is not None:
            common.log(f"stopped: {lost}; the rows so far are in {args.json or 'the log'}, and this target (with the "
                       "candidate that lost the device) stays to tune again: run again with --resume")
            return 3
    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']}")
    print(common.text_table(summaries, SUMMARY_COLUMNS))
    for line in launch_lines(summaries):
        print(line)
    wrong = [r for r in rows if r["status"] == "wrong"]
    if wrong:
        print(f"\n{len(wrong)} candidate(s) gave wrong results:\n" + common.text_table(wrong, ROW_COLUMNS))
    return 1 if wrong else 0  # any setting DRAW_TRITON_LAUNCH accepts must give right results


if __name__ == "__main__":
    sys.exit(main())
