"""`draw verify` (draw/verify.py): passes on this machine, fails when a kernel is wrong, refuses clearly.

On CPU its sweep runs in Triton's interpreter (tests/conftest.py has set TRITON_INTERPRET=1 before triton
was imported, so run() works in-process here); two tests start fresh processes to check that the command
also works when nothing has chosen the interpreter yet, and when triton was imported without it.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from helpers import import_bench

from draw import verify

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]
ON_CUDA = torch.cuda.is_available()
SMALL = "glimpse 2x3x13x9 n=1 fp32"  # one small case, for the runs that need not sweep


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    verify.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_quick_sweep_passes_and_json_holds_every_row(tmp_path, capsys):
    path = tmp_path / "verify.json"
    assert verify.run(parse("--device", "cpu", "--quick", "--json", str(path))) == 0
    printed = capsys.readouterr().out
    payload = json.loads(path.read_text())
    cases = verify.build_sweep("quick", ["fp32"], cuda=False)
    assert payload["passed"] is True and payload["metadata"]["triton_interpreter"] is True
    rows = payload["rows"]
    # each output and the gradient of every input, for every case: read 4, glimpse 3, write 4, write-read 7,
    # latent 5, lstm 5 rows
    outputs = {op: verify.OP_OUTPUTS.get(op, ("output",)) for op in verify.OP_INPUTS}
    assert len(rows) == sum(len(outputs[case.op]) + len(verify.OP_INPUTS[case.op]) for case in cases)
    firsts = [row["case"] for row in rows if row["quantity"] in ("output", "z", "canvas", "h")]  # each case's first row
    assert firsts == [case.name for case in cases]
    quantities = {(row["op"], row["quantity"]) for row in rows}
    for op, names in verify.OP_INPUTS.items():
        assert {(op, out) for out in outputs[op]} | {(op, f"grad {name}") for name in names} <= quantities
    attention = [row for row in rows if row["op"] not in verify.ROW_OPS]
    assert {row["n"] for row in attention} == set(range(1, 17)) and {row["channels"] for row in attention} == {1, 3}
    assert {row["degenerate"] for row in rows} >= (set(verify.DEGENERATE_PARAMS) | set(verify.DEGENERATE_LOG_SIGMA)
                                                   | set(verify.DEGENERATE_GATES))
    for row in rows:  # fp32: 1e-5, or 8x the fp32 reference's own error (at most 1) where that is larger
        from_baseline = min(verify.BASELINE_FACTOR * row["baseline_relative_error"], verify.BASELINE_TOLERANCE_CAP)
        assert row["passed"] and row["tolerance"] == max(1e-5, from_baseline)
    assert printed.count(" ok") == len(rows) and "all passed" in printed


@pytest.mark.parametrize("wrong, passes", [(lambda t: torch.zeros_like(t), True), (lambda t: -t, False),
                                           (lambda t: -7 * t, False)])
def test_a_baseline_that_is_entirely_off_does_not_excuse_any_error(monkeypatch, wrong, passes):
    """Where the fp32 reference is itself entirely off (an LSTM gate at sigmoid(30) == 1 in fp32: its
    gradient comes out zero), the tolerance it lends is capped at 1: the kernel may be as off (zero), not
    more (a sign flip, an amplified value)."""
    case = next(c for c in verify.build_sweep("quick", ["fp32"], cuda=False) if c.op == "lstm")

    def forward_backward(case, inputs, dtype, backend, upstream):
        exact = [torch.full((3, 4), 1e-12, dtype=torch.float64)] * (len(verify._output_shapes(case)) + len(verify.OP_INPUTS[case.op]))
        if dtype == torch.float64:
            return exact
        return [torch.zeros_like(t) for t in exact] if backend == "reference" else [wrong(t) for t in exact]

    monkeypatch.setattr(verify, "_forward_backward", forward_backward)
    rows = verify.check_case(case, torch.device("cpu"))
    assert all(row["tolerance"] == verify.BASELINE_TOLERANCE_CAP for row in rows)
    assert all(row["passed"] == passes for row in rows)


@pytest.mark.parametrize("where", ["forward", "gradient", "latent", "lstm", "write-read"])
def test_a_wrong_kernel_fails(where, monkeypatch, tmp_path, capsys):
    from draw.kernels import triton_attention, triton_latent, triton_lstm

    only = SMALL
    if where == "latent":
        backward = triton_latent.latent_sample_backward

        def wrong_latent_backward(*args, **kwargs):
            grad_mu, grad_log_sigma, grad_eps = backward(*args, **kwargs)
            return grad_mu, grad_log_sigma * (1 + 1e-4), grad_eps

        monkeypatch.setattr(triton_latent, "latent_sample_backward", wrong_latent_backward)
        only = "latent 37x100 fp32"
    elif where == "lstm":
        lstm_backward = triton_lstm.lstm_cell_backward

        def wrong_cell_gradient(*args):
            grad_gates, second, grad_c, grad_x = lstm_backward(*args)
            return grad_gates, second, grad_c * (1 + 1e-4), grad_x

        monkeypatch.setattr(triton_lstm, "lstm_cell_backward", wrong_cell_gradient)
        only = "lstm 37x100 fp32"
    elif where == "write-read":
        write_read_backward = triton_attention.attention_write_read_backward

        def wrong_canvas_gradient(*args, **kwargs):
            grads = list(write_read_backward(*args, **kwargs))
            grads[2] = grads[2] * (1 + 1e-4)  # the canvas's: the sum of its two gradients
            return tuple(grads)

        monkeypatch.setattr(triton_attention, "attention_write_read_backward", wrong_canvas_gradient)
        only = "write-read 2x1x13x13"
    elif where == "forward":
        glimpse = triton_attention.glimpse

        def wrong_glimpse(x, params, n, dtype=None):
            out = glimpse(x, params, n, dtype)
            return out + 1e-4 * out.detach()  # the output 1e-4 off, its gradients untouched

        monkeypatch.setattr(triton_attention, "glimpse", wrong_glimpse)
    else:
        backward = triton_attention.attention_read_backward

        def wrong_backward(*args):
            grad_x, grad_canvas, grad_params = backward(*args)
            return grad_x, grad_canvas, grad_params * (1 + 1e-4)

        monkeypatch.setattr(triton_attention, "attention_read_backward", wrong_backward)
    path = tmp_path / "verify.json"
    assert verify.run(parse("--device", "cpu", "--only", only, "--json", str(path))) == 1
    rows = json.loads(path.read_text())["rows"]
    failed = {row["quantity"] for row in rows if not row["passed"]}
    assert failed == {"forward": {"output"}, "gradient": {"grad params"}, "latent": {"grad log_sigma"},
                      "lstm": {"grad c"}, "write-read": {"grad canvas"}}[where]
    assert "FAIL" in capsys.readouterr().err


def test_an_interrupted_sweep_keeps_the_checks_it_made(tmp_path, monkeypatch, capsys):
    """The JSON is written after every case: a sweep stopped part-way (Ctrl-C, a time limit) leaves the rows of
    the cases it checked, marked as not passed, with the command and the state of the checkout."""
    checked = verify.checked_cases

    def two_then_interrupted(cases, device, jobs):
        for number, result in enumerate(checked(cases, device, jobs)):
            if number == 2:
                raise KeyboardInterrupt
            yield result

    monkeypatch.setattr(verify, "checked_cases", two_then_interrupted)
    path = tmp_path / "verify.json"
    assert verify.run(parse("--device", "cpu", "--only", "glimpse", "--json", str(path))) == 130
    payload = json.loads(path.read_text())
    assert payload["cases_checked"] == 2 and payload["cases"] > 2 and payload["passed"] is False
    assert len({row["case"] for row in payload["rows"]}) == 2 and all(row["passed"] for row in payload["rows"])
    assert payload["metadata"]["command"].startswith(sys.executable) and payload["metadata"]["dirty"] in (True, False, None)
    assert "interrupted after 2 of" in capsys.readouterr().err
    suite = import_bench("suite")
    [line] = [line for line in suite.headline(tmp_path) if line.startswith("verify")]
    assert line.endswith(f"checks pass (stopped after 2 of {payload['cases']} cases)")


def test_nan_fails():
    assert verify.relative_error(torch.tensor([1.0, float("nan")]), torch.ones(2))[1] != 0
    assert not verify.passes(*verify.relative_error(torch.tensor([1.0, float("nan")]), torch.ones(2)), 1e-5)
    assert not verify.passes(*verify.relative_error(torch.ones(2), torch.tensor([1.0, float("inf")])), 1e-5)
    assert verify.passes(*verify.relative_error(torch.zeros(3), torch.zeros(3)), 1e-5)
    assert not verify.passes(*verify.relative_error(torch.full((3,), 1e-3), torch.zeros(3)), 1e-5)


@pytest.mark.parametrize(
    "triton_version, numpy_version, works",
    [("3.6.0", "2.4.6", False), ("3.6.0", "2.4.0", False), ("3.5.1", "2.4.1", False), ("3.6.0", "2.3.5", True),
     ("3.7.0", "2.4.6", True), ("3.9.0", "2.4.6", True), ("3.6.0+git1a2b", "2.4.0rc1", False)],
)
def test_interpreter_version_support(triton_version, numpy_version, works):
    problem = verify.interpreter_problem(triton_version, numpy_version)
    assert (problem is None) == works
    if problem:
        assert "\n" not in problem and "triton >= 3.7" in problem and "numpy < 2.4" in problem


def test_unsupported_interpreter_is_one_line_not_a_traceback(monkeypatch, capsys):
    monkeypatch.setattr(verify, "_version", {"triton": "3.6.0", "numpy": "2.4.6"}.get)
    assert verify.run(parse("--device", "cpu")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Triton 3.6.0's interpreter fails with numpy 2.4.6" in err


@pytest.mark.skipif(ON_CUDA, reason="checks the message on a machine without CUDA")
def test_cuda_asked_for_without_cuda(capsys):
    assert verify.run(parse("--device", "cuda")) == 2
    assert "no CUDA device" in capsys.readouterr().err


def fresh_python(code: str) -> subprocess.CompletedProcess:
    """Run code in a new interpreter with this checkout first on the path and TRITON_INTERPRET unset."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.skipif(ON_CUDA, reason="the interpreter path is the CPU machine's")
@pytest.mark.parametrize("import_triton_first", [False, True])
def test_fresh_process_on_cpu(import_triton_first):
    """As `draw verify` starts: nothing has imported triton (run() sets TRITON_INTERPRET=1 itself), or
    something imported it without the interpreter (run() re-runs itself in a new process)."""
    code = (("import triton\n" if import_triton_first else "")
            + f"from draw import verify\nraise SystemExit(verify.main(['--device', 'cpu', '--only', {SMALL!r}]))")
    result = fresh_python(code)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "all passed: 3 checks in 1 cases" in result.stdout
    assert ("re-running in a fresh process" in result.stderr) == import_triton_first


def test_worker_processes_give_the_same_table(tmp_path, capsys):
    """--jobs 2 checks the cases in two worker processes: the same rows, to the bit, in the cases' order."""
    tables = []
    for jobs in ("1", "2"):
        path = tmp_path / f"verify-{jobs}.json"
        assert verify.run(parse("--device", "cpu", "--only", "n=3 fp32", "--jobs", jobs, "--json", str(path))) == 0
        tables.append(json.loads(path.read_text())["rows"])
    assert "2 worker processes" in capsys.readouterr().out
    assert len(tables[0]) >= 20 and tables[0] == tables[1]
    with pytest.raises(SystemExit):
        parse("--jobs", "0")


def test_a_worker_that_dies_fails_its_cases_and_nothing_hangs():
    """A worker process that dies (here: exits at the first glimpse case) fails every case not finished
    by then, with a row that says so; the other cases keep their rows and the run returns."""
    from helpers import verify_rows_or_die

    cases = [case for case in verify.build_sweep("quick", ["fp32"], cuda=False) if case.op in ("read", "glimpse")][:40]
    first_glimpse = next(i for i, case in enumerate(cases) if case.op == "glimpse")
    results = list(verify.checked_cases(cases, torch.device("cpu"), jobs=2, check=verify_rows_or_die))
    assert [case for case, _ in results] == cases
    died = [i for i, (_, rows) in enumerate(results) if "worker process died" in rows[0].get("error", "")]
    assert first_glimpse in died
    for i, (case, rows) in enumerate(results):
        if i in died:
            assert rows == [dict(rows[0], passed=False)] and rows[0]["quantity"] == "error"
        else:
            assert case.op == "read" and all(row["passed"] for row in rows)


@pytest.mark.skipif(ON_CUDA, reason="the interpreter path is the CPU machine's")
def test_ctrl_c_stops_the_workers_and_says_how_far_it_got(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) during a run with worker processes:
    exit 130 with one line saying how far it got, no traceback, and no worker left running."""
    import signal
    import time

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = tmp_path / "out.log"
    with open(out, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "draw", "verify", "--jobs", "2"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 120
        while " ok" not in out.read_text() and time.monotonic() < deadline:  # the workers are checking cases
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "draw verify: interrupted after" in stderr and "Traceback" not in stderr

    def running_in_group(pgid: int) -> list[int]:  # zombies waiting to be reaped do not count
        found = []
        for entry in pathlib.Path("/proc").iterdir():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":  # state, ppid, pgrp, ...
                found.append(int(entry.name))
        return found

    deadline = time.monotonic() + 10
    while running_in_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_in_group(proc.pid) == []


def test_the_documented_case_counts_are_the_sweeps():
    """The module docstring's and the README's case counts are those build_sweep makes (CUDA: every dtype;
    CPU: fp32), so they cannot go stale when cases are added."""
    import pathlib
    import re

    def count(sweep, cuda):
        return len(verify.build_sweep(sweep, list(verify.DTYPES) if cuda else ["fp32"], cuda))

    doc = " ".join(verify.__doc__.split())
    assert f"The default: {count('quick', True)} cases on CUDA" in doc
    assert f"({count('quick', False)} on CPU)" in doc
    assert f"256x256 images: {count('full', True)} cases on CUDA" in doc
    readme = " ".join((pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert re.search(rf"\({count('quick', False)} cases, 2-core EPYC\)", readme)
    assert f"the default sweep has {count('quick', True)} cases" in readme
    assert f"(now {count('full', True)} cases" in readme


def test_the_pixel_centre_cases_put_every_filter_centre_on_a_pixel_exactly():
    """A one-pixel filter (sigma^2 at its floor) flips between a pixel and none with the last bit of its centre,
    so the cases "on pixel centres" need grids whose centres are exact in any arithmetic: a whole spacing
    (max(H, W) - 1) / (N - 1) for the read's grid and the write's. (Written with N 14 over 13x13, the end
    centres were 1 and 13 only up to rounding, and an H100 failed all six checks of that case.)"""
    cases = [case for case in verify.build_sweep("full", list(verify.DTYPES), cuda=True)
             if "pixel_centres" in case.degenerate]
    assert {case.op for case in cases} == set(verify.ATTENTION_OPS)
    for case in cases:
        for n in {case.n, case.write_n or case.n}:
            assert n > 1 and (max(case.height, case.width) - 1) % (n - 1) == 0, (case.name, n)
