"""`python bench/suite.py --quick` runs on a CPU machine from end to end, so the GPU record never rots."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from helpers import import_bench

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_suite_runs_every_part(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "suite.py"), "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert [r["part"] for r in suite["results"]] == ["verify", "attention", "train"]
    assert all(r["status"] == "ok" for r in suite["results"])
    verify = json.loads((tmp_path / "verify.json").read_text())
    assert verify["passed"] and len(verify["rows"]) > 100
    assert any(line.startswith("train mnist-quick batch 16") for line in suite["headline"])
    (row,) = json.loads((tmp_path / "train.json").read_text())["results"]
    assert row["step_mode"] == "eager" and row["warmup_steps"] == 1 and row["steps"] == 2
    assert (tmp_path / "suite.md").read_text().startswith("# Benchmark suite")
    assert result.stdout.strip().splitlines()[-1].startswith("train ")  # the summary comes last


def test_the_recipe_benchmark_names_the_default_it_measured():
    """bench/bench_recipe.py's "default" variant is today's mnist-quick, so its table cannot go stale."""
    bench_recipe = import_bench("bench_recipe")
    from draw.config import PRESETS

    preset = PRESETS["mnist-quick"]
    (default,) = [name for name in bench_recipe.VARIANTS if name.startswith("default:")]
    model, train = bench_recipe.configs(default, epochs=preset.train.epochs)
    assert model == preset.model
    assert train.to_dict() == {**preset.train.to_dict(), "eval_every": bench_recipe.IMAGES_PER_EVAL // train.batch_size}
    assert len({bench_recipe.slug(name) for name in bench_recipe.VARIANTS}) == len(bench_recipe.VARIANTS)


def test_the_host_overhead_benchmark_times_both_autograd_paths(tmp_path):
    """bench/bench_host_overhead.py: a row for every op, mode and autograd path, with the launches stubbed
    (no kernel runs, even in Triton's interpreter), and the per-step totals of read and write, and of the
    fused write-read."""
    bench_host_overhead = import_bench("bench_host_overhead")
    out = tmp_path / "host.json"
    assert bench_host_overhead.main(["--calls", "2", "--reps", "1", "--batch", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["results"]
    assert {(r["op"], r["mode"], r["path"]) for r in rows} == {
        (op, mode, path) for op in ("read", "glimpse", "write", "write-read", "write+read") for mode in ("fwd", "fwd+bwd")
        for path in ("function", "custom-op")}
    assert all(r["us_per_call"] > 0 for r in rows)

    def expected(ops):
        return {path: 64 * sum(r["us_per_call"] for r in rows if r["path"] == path and r["mode"] == "fwd+bwd"
                               and r["op"] in ops) / 1e3 for path in ("function", "custom-op")}

    assert result["per_step_ms"] == pytest.approx(expected(("read", "write")))
    assert result["write_read_per_step_ms"] == pytest.approx(expected(("write-read",)))


def test_table_cells_keep_their_precision_without_trailing_zeros():
    """bench/common.py: 4 decimals below 1 (small times keep their digits), but 0.07 prints as 0.07."""
    common = import_bench("common")
    cells = [common.format_cell(v) for v in (0.07, 0.0123, 0.5, 0.12345, 0.0, 1.5, 1234.5, None, "dot")]
    assert cells == ["0.07", "0.0123", "0.50", "0.1235", "0", "1.50", "1,234", "-", "dot"]


def test_the_suite_summary_compares_two_warps_with_the_launched_warps(tmp_path):
    """bench/suite.py's headline: the attention-2warps part against the launched kernels, case by case."""
    suite = import_bench("suite")
    case = {"op": "read", "mode": "fwd", "size": "1024x1x28x28", "timer": "cudagraph"}
    (tmp_path / "attention.json").write_text(json.dumps({"results": [
        {**case, "provider": "triton", "ms": 0.03, "gbps": 100.0, "pct_copy": 5.0, "vs_compiled": 3.0},
        {**case, "provider": "triton-sum", "ms": 0.06}]}))
    (tmp_path / "attention-2warps.json").write_text(json.dumps({"results": [{**case, "provider": "triton", "ms": 0.02}]}))
    lines = suite.headline(tmp_path)
    assert "attention read fwd 1024x1x28x28: 2 warps 1.50x the launched warps (cudagraph)" in lines
    assert any("2.00x triton-sum" in line for line in lines)
    assert "attention-2warps" in [name for name, *_ in suite.parts(False, tmp_path)]


def test_the_suite_summary_compares_loading_ahead_with_the_launched_kernels(tmp_path):
    """bench/suite.py's headline: each triton-ahead row (the attention-ahead part's, or attention's) against the
    launched kernels timed beside it in the same run (bench_attention.py's vs_triton), case by case."""
    suite, bench_attention = import_bench("suite"), import_bench("bench_attention")
    case = {"op": "read", "mode": "fwd", "size": "16384x3x54x54", "timer": "do_bench"}
    rows = [{**case, "provider": "triton", "ms": 2.8}, {**case, "provider": "triton-ahead", "ms": 1.4},
            {**case, "provider": "compiled", "ms": 2.9}]
    bench_attention.add_speedups(rows)
    assert [r["vs_triton"] for r in rows] == [None, 2.0, None]  # only the variants of the fused kernels
    (tmp_path / "attention-ahead.json").write_text(json.dumps({"results": rows}))
    lines = suite.headline(tmp_path)
    assert "attention read fwd 16384x3x54x54: loading one block ahead 1.4000 ms, 2.00x the launched kernels (do_bench)" \
        in lines
    names = [name for name, *_ in suite.parts(False, tmp_path)]
    assert names.index("attention-2warps") < names.index("attention-ahead") < names.index("attention-large")


def test_triton_ahead_adds_load_ahead_to_the_runs_launch_settings(monkeypatch):
    """bench_attention.py's triton-ahead provider sets LOAD_AHEAD=1 for its own calls, after any DRAW_TRITON_LAUNCH the
    run set (which the launchers accept), and triton-sum its contraction; the others change nothing."""
    bench_attention = import_bench("bench_attention")
    from draw.kernels import triton_attention

    monkeypatch.delenv("DRAW_TRITON_LAUNCH", raising=False)
    assert bench_attention.provider_environment("triton-ahead") == {"DRAW_TRITON_LAUNCH": "LOAD_AHEAD=1"}
    monkeypatch.setenv("DRAW_TRITON_LAUNCH", "bwd.num_warps=4 ")
    launch = bench_attention.provider_environment("triton-ahead")["DRAW_TRITON_LAUNCH"]
    assert launch == "bwd.num_warps=4,LOAD_AHEAD=1"
    assert triton_attention.parse_launch_settings(launch) == [("bwd", "num_warps", 4), ("", "LOAD_AHEAD", 1)]
    assert bench_attention.provider_environment("triton-sum") == {"DRAW_TRITON_CONTRACTION": "sum"}
    assert bench_attention.provider_environment("triton") == bench_attention.provider_environment("compiled") == {}


@pytest.mark.parametrize("part, row, line", [
    # attention-large times no triton-sum: its lines compare with what it timed, and no figure is NaN
    ("attention-large", {"size": "16384x3x54x54", "timer": "do_bench", "ms": 2.0, "gbps": 600.0, "pct_copy": 20.0,
                         "vs_compiled": 1.5},
     "attention read fwd 16384x3x54x54: triton 600 GB/s (20% of copy), 1.50x compiled (do_bench)"),
    # a "wall" row (the host's launches included) holds no GB/s: the headline gives its time a call
    ("attention", {"size": "1024x1x28x28", "timer": "wall", "ms": 0.03, "gbps": None, "pct_copy": None, "vs_compiled": 2.0},
     "attention read fwd 1024x1x28x28: triton 0.0300 ms a call, 2.00x compiled (wall)"),
])
def test_the_suite_summary_gives_each_attention_row_what_its_part_timed(tmp_path, part, row, line):
    """bench/suite.py's headline line of a triton attention row: its bandwidth where its timer measured the
    device, its time a call otherwise, and the providers its part timed alone."""
    suite = import_bench("suite")
    case = {"op": "read", "mode": "fwd", "size": row["size"], "timer": row["timer"]}
    (tmp_path / f"{part}.json").write_text(json.dumps({"results": [
        {**case, "provider": "triton", **row}, {**case, "provider": "compiled", "ms": 3.0}]}))
    [shown] = [shown for shown in suite.headline(tmp_path) if shown.startswith("attention ")]
    assert shown == line


def test_the_attention_timers_time_the_device_alone_where_they_can(monkeypatch):
    """On CUDA: launch-bound sizes by wall time (launches included) and CUDA-graph replays; the middle size by
    do_bench and replays; the bandwidth sizes by do_bench. A CUDA-graph replay rotates through enough input sets
    to hold 4x the L2 cache (at most 256), and its time is one call's."""
    bench_attention = import_bench("bench_attention")
    common = sys.modules["common"]
    cuda = torch.device("cuda")
    timers = {s.group: bench_attention.timers_for(s, cuda, True) for s in bench_attention.SIZES}
    assert timers == {"small": ["wall", "cudagraph"], "launch": ["wall", "cudagraph"],
                      "middle": ["do_bench", "cudagraph"], "bandwidth": ["do_bench"]}
    assert bench_attention.timers_for(bench_attention.SIZES[0], torch.device("cpu"), True) == ["perf_counter"]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(L2_cache_size=50 << 20))
    assert [common.rotation(n, cuda) for n in (1 << 20, 3 << 20, 300 << 20, 1)] == [200, 67, 1, 256]

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    import triton.testing

    replays = [40.0] * 5 + [8.0, 8.0, 9.0, 7.0, 8.0]  # ms per replay of the 4 calls: the GPU's clocks came up late
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, return_mode: fn() or replays)
    fns = [lambda i=i: calls.append(i) for i in range(4)]
    assert common.cuda_graph_median_ms(fns) == 2.0 and calls == [0, 1, 2, 3] * 4  # 3 warm-up rounds, 1 timed


def test_the_sm_clock_comes_from_nvml_else_from_nvidia_smi(monkeypatch):
    """bench rows record the SM clock: NVML through torch where pynvml is installed, else nvidia-smi asked by the
    GPU's UUID (then its index); None on a CPU or where neither answers."""
    common = import_bench("common")
    cuda = torch.device("cuda")
    assert common.sm_clock_mhz(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "clock_rate", lambda device: 1755)
    assert common.sm_clock_mhz(cuda) == 1755

    def no_nvml(device):
        raise ModuleNotFoundError("nvidia-ml-py does not seem to be installed")

    asked = []

    def nvidia_smi(command, **kwargs):
        asked.append(command[-1])
        if command[-1] != "0":
            raise subprocess.CalledProcessError(6, command)  # "No devices were found" for an identifier it refuses
        return types.SimpleNamespace(stdout="1980\n")

    monkeypatch.setattr(torch.cuda, "clock_rate", no_nvml)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(uuid="5f1c-aa"))
    monkeypatch.setattr(common.subprocess, "run", nvidia_smi)
    assert common.sm_clock_mhz(cuda) == 1980 and asked == ["GPU-5f1c-aa", "0"]

    def missing(command, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(common.subprocess, "run", missing)
    assert common.sm_clock_mhz(cuda) is None


def test_wall_time_is_the_time_a_call_of_calls_back_to_back(monkeypatch):
    """bench/common.py's wall timer: rounds of calls between synchronisations, the median round over its calls."""
    common = import_bench("common")
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    costs = iter([0.0] * 3 + [0.002] * 40 + [0.010] * 10)  # 3 warm-up calls, then 4 rounds of 10 and one slow round

    def call():
        clock[0] += next(costs)

    assert common.wall_median_ms(call, torch.device("cpu"), calls=10, rounds=5) == pytest.approx(2.0)


def test_a_training_step_warms_up_once_it_is_compiled_or_captured(monkeypatch):
    """bench/common.py's warm_up_step: the steps until the step settles, then --warmup steps in all and
    --warmup-s seconds counted from when it settled (not from the start: compiling is no warm-up)."""
    common = import_bench("common")
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    ran = []

    def step(i):
        ran.append(i)
        clock[0] += 100.0 if i == 0 else 1.0  # the first call compiles for 100 s

    assert common.warm_up_step(step, lambda: len(ran) >= 1, torch.device("cpu"), steps=2, seconds=3.0) == (4, 103.0)
    ran.clear()
    clock[0] = 0.0
    assert common.warm_up_step(step, lambda: len(ran) >= 2, torch.device("cpu"), steps=5, seconds=0.0) == (5, 104.0)


def test_the_attention_benchmarks_partial_results_carry_their_speed_ups(tmp_path, monkeypatch):
    """Each JSON written along the way (a part stopped at its limit keeps the last) has the speed-ups of the
    rows timed so far, as the final one has."""
    bench_attention = import_bench("bench_attention")
    common = sys.modules["common"]
    written = []
    monkeypatch.setattr(common, "write_json", lambda path, meta, rows, **extra: written.append(
        (meta.get("partial", False), [dict(r) for r in rows])))

    def timed(op, mode, size, providers, device, args, copy_gbps, triton_reason, rows, skipped):
        case = {"op": op, "mode": mode, "size": size.name, "timer": "wall"}
        rows += [{**case, "provider": "eager", "ms": 4.0}, {**case, "provider": "compiled", "ms": 2.0}]

    monkeypatch.setattr(bench_attention, "run_case", timed)
    bench_attention.main(["--device", "cpu", "--sizes", "64x1x28x28", "--ops", "read,write", "--modes", "fwd",
                          "--providers", "eager,compiled", "--copy-mib", "1", "--json", str(tmp_path / "a.json")])
    assert [partial for partial, _ in written] == [True, True, False]
    for _, rows in written:
        assert all(r["vs_eager"] == (2.0 if r["provider"] == "compiled" else 1.0) for r in rows)


def test_the_attention_benchmark_keeps_the_rows_of_a_case_that_ends_the_run(tmp_path, monkeypatch):
    """A case that loses the device (its error surfaces after some rows were timed) ends the run with those
    rows written."""
    bench_attention = import_bench("bench_attention")

    def lost_after_one_row(op, mode, size, providers, device, args, copy_gbps, triton_reason, rows, skipped):
        rows.append({"op": op, "mode": mode, "size": size.name, "timer": "wall", "provider": "eager", "ms": 4.0})
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench_attention, "run_case", lost_after_one_row)
    out = tmp_path / "a.json"
    with pytest.raises(RuntimeError, match="illegal memory access"):
        bench_attention.main(["--device", "cpu", "--sizes", "64x1x28x28", "--ops", "read", "--modes", "fwd",
                              "--providers", "eager", "--copy-mib", "1", "--json", str(out)])
    [row] = json.loads(out.read_text())["results"]
    assert row["ms"] == 4.0 and row["vs_eager"] == 1.0


def test_an_interrupted_attention_benchmark_writes_its_tables_from_the_rows_it_has(tmp_path, monkeypatch):
    """Ctrl-C, or the suite's SIGINT at a part's time limit: the markdown and the JSON (marked partial) hold the
    cases timed so far, and the exit status is 130."""
    bench_attention = import_bench("bench_attention")
    cases = []

    def interrupted_at_the_second_case(op, mode, size, providers, device, args, copy_gbps, triton_reason, rows, skipped):
        cases.append(op)
        if len(cases) == 2:
            raise KeyboardInterrupt
        rows.append({"op": op, "mode": mode, "size": size.name, "timer": "wall", "provider": "eager", "ms": 4.0})

    monkeypatch.setattr(bench_attention, "run_case", interrupted_at_the_second_case)
    out, markdown = tmp_path / "a.json", tmp_path / "a.md"
    assert bench_attention.main(["--device", "cpu", "--sizes", "64x1x28x28", "--ops", "read,write", "--modes", "fwd",
                                 "--providers", "eager", "--copy-mib", "1", "--json", str(out),
                                 "--markdown", str(markdown)]) == 130
    written = json.loads(out.read_text())
    assert written["metadata"]["partial"] is True and [r["op"] for r in written["results"]] == ["read"]
    assert "## read fwd" in markdown.read_text() and "write fwd" not in markdown.read_text()


def test_an_interrupted_training_benchmark_writes_its_tables_from_the_cases_it_has(tmp_path, monkeypatch):
    """bench_train.py stopped by Ctrl-C or the suite's SIGINT: the markdown and the JSON (partial) hold the cases
    timed so far; exit status 130."""
    bench_train = import_bench("bench_train")
    timed = []

    def interrupted_at_the_second_case(preset, batch, mode, amp, device, args):
        timed.append(batch)
        if len(timed) == 2:
            raise KeyboardInterrupt
        return {"preset": preset, "batch": batch, "mode": mode, "step_mode": "eager", "dtype": amp, "images_per_s": 500.0,
                "ms_per_step": 2.0 * batch, "peak_mib": 10.0}

    monkeypatch.setattr(bench_train, "run_case", interrupted_at_the_second_case)
    out, markdown = tmp_path / "t.json", tmp_path / "t.md"
    assert bench_train.main(["--device", "cpu", "--presets", "mnist-quick", "--batch-sizes", "8,16", "--modes", "reference",
                             "--json", str(out), "--markdown", str(markdown)]) == 130
    written = json.loads(out.read_text())
    assert written["metadata"]["partial"] is True and [r["batch"] for r in written["results"]] == [8]
    assert "| mnist-quick | 8 |" in markdown.read_text() and "| 16 |" not in markdown.read_text()


def test_the_convergence_benchmark_keeps_the_first_run_when_the_second_is_stopped(tmp_path, monkeypatch):
    bench_convergence = import_bench("bench_convergence")
    monkeypatch.setattr(bench_convergence, "load_dataset", lambda *a, **k: types.SimpleNamespace(train=[0] * 1000))
    finished = []

    def first_then_stopped(out, preset_name, batch, *args, **kwargs):
        if finished:
            raise KeyboardInterrupt
        finished.append({"batch": batch, "test_bound_nats": 91.0})
        return finished[-1]

    monkeypatch.setattr(bench_convergence, "run", first_then_stopped)
    out = tmp_path / "convergence.json"
    with pytest.raises(KeyboardInterrupt):
        bench_convergence.main(["--device", "cpu", "--out", str(tmp_path / "runs"), "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["metadata"]["partial"] is True and result["results"] == finished


def test_the_convergence_benchmark_compares_on_the_validation_split(tmp_path, monkeypatch, capsys):
    """The comparison chooses a recipe: both runs evaluate on the validation split unless --eval-split says test."""
    bench_convergence = import_bench("bench_convergence")
    monkeypatch.setattr(bench_convergence, "load_dataset", lambda *a, **k: types.SimpleNamespace(train=[0] * 1000))
    monkeypatch.setattr(bench_convergence.figures, "save_loss_comparison", lambda *a, **k: "plot.png")
    splits = []

    def trained(out, *, train_config, **kwargs):
        out.mkdir(parents=True)
        (out / "metrics.jsonl").write_text("")
        splits.append(train_config.eval_split)
        return {"epochs": 1.0, f"{train_config.eval_split}_bound_nats": 90.0, "train_config": train_config.to_dict()}

    monkeypatch.setattr(bench_convergence, "train", trained)
    assert bench_convergence.main(["--device", "cpu", "--out", str(tmp_path / "a")]) == 0
    assert bench_convergence.main(["--device", "cpu", "--out", str(tmp_path / "b"), "--eval-split", "test"]) == 0
    assert splits == ["valid", "valid", "test", "test"]
    assert "valid bound 90.00 nats after 1.00 epochs" in capsys.readouterr().out


def test_the_suite_runs_correctness_side_by_side_and_timing_alone(tmp_path):
    """bench/suite.py on CUDA: verify and the CUDA tests share a stage; every timing part has one to itself."""
    suite = import_bench("suite")
    stages = [[name for name, *_ in stage] for stage in suite.stages(False, tmp_path)]
    assert stages[0] == ["verify", "cuda-tests"]
    assert all(len(stage) == 1 for stage in stages[1:])
    assert [name for stage in stages for name in stage] == [name for name, *_ in suite.parts(False, tmp_path)]
    assert set(suite.OPT_IN) <= {name for stage in stages for name in stage}


def test_the_cuda_tests_part_names_test_files_and_functions_that_exist(tmp_path):
    """Every path (and path::function) the GPU suite's cuda-tests part hands pytest is there, so a renamed test
    is noticed here and not on a GPU, where pytest would only say it found nothing."""
    suite = import_bench("suite")
    command = next(cmd for name, cmd, *_ in suite.parts(False, tmp_path) if name == "cuda-tests")
    targets = [arg for arg in command if "tests" in pathlib.Path(arg.split("::")[0]).parts and not arg.startswith("--")]
    assert len(targets) >= 7
    for target in targets:
        path, _, function = target.partition("::")
        assert pathlib.Path(path).is_file(), path
        if function:
            assert f"def {function}(" in pathlib.Path(path).read_text(), target


def test_the_gpu_suites_benchmark_commands_parse(tmp_path):
    """Every bench/ script the GPU suite runs accepts the flags the suite gives it (the GPU parts never run
    in CI: a renamed flag would otherwise first show on a GPU)."""
    suite = import_bench("suite")
    checked = 0
    for name, command, _limit, _env in suite.parts(False, tmp_path):
        script = pathlib.Path(command[1])
        if script.parent == suite.BENCH:
            module = import_bench(script.stem)
            module.parse_args(command[2:])
            checked += 1
    assert checked >= 6
    sizes = import_bench("bench_attention").select_sizes(suite.LARGE_SIZES, torch.device("cpu"))
    assert [s.name for s in sizes] == ["4096x3x32x32", "16384x3x54x54", "16384x1x100x100"]


def test_the_suite_summary_compares_the_unfused_projection_with_the_fused(tmp_path):
    """bench/suite.py's headline: the train-unfused part (DRAW_TRITON_PROJECTION=unfused) against train."""
    suite = import_bench("suite")
    case = {"preset": "mnist-paper", "batch": 100, "mode": "triton-graph", "dtype": "bf16"}
    (tmp_path / "train.json").write_text(json.dumps({"results": [{**case, "images_per_s": 16000.0}]}))
    (tmp_path / "train-unfused.json").write_text(json.dumps({"results": [{**case, "images_per_s": 12800.0}]}))
    assert ("train mnist-paper batch 100 triton-graph bf16: projection unfused 12,800 images/s; fused 1.25x that"
            in suite.headline(tmp_path))
    part = next(p for p in suite.parts(False, tmp_path) if p[0] == "train-unfused")
    assert part[3] == {"DRAW_TRITON_PROJECTION": "unfused"}


def test_the_opt_in_parts_run_only_when_named(tmp_path, monkeypatch):
    """The opt-in parts (tune, convergence) stay out of a plain run and of --skip's, run when --only names
    them, and their results reach the summary."""
    suite = import_bench("suite")
    ran = []
    monkeypatch.setattr(suite, "run_stage", lambda stage, out, deadline=None: [ran.extend(p[0] for p in stage)] and [])
    suite.main(["--out", str(tmp_path), "--skip", "cuda-tests"])
    assert not set(suite.OPT_IN) & set(ran) and "verify" in ran and "cuda-tests" not in ran
    ran.clear()
    suite.main(["--out", str(tmp_path), "--only", "tune,train,convergence,tune-100"])
    assert ran == ["train", "convergence", "tune-100", "tune"]
    (tmp_path / "tune-100.json").write_text(json.dumps({"summary": [
        {"target": "write-read bwd 100x1x28x28 N 2 (auto)", "best_settings": "num_warps=8", "speedup": 1.2,
         "launchers_settings": "num_warps=4", "tried": 9, "wrong": 0}]}))
    assert "tune write-read bwd 100x1x28x28 N 2 (auto): num_warps=8 (1.20x the launchers' num_warps=4; 9 tried, 0 wrong)" \
        in suite.headline(tmp_path)
    (tmp_path / "tune.json").write_text(json.dumps({"summary": [
        {"target": "read fwd 16384x3x54x54 N 12 (auto)", "best_settings": "BLOCK_H=32", "speedup": 1.5,
         "launchers_settings": "BLOCK_H=16", "tried": 14, "wrong": 0}]}))
    assert "tune read fwd 16384x3x54x54 N 12 (auto): BLOCK_H=32 (1.50x the launchers' BLOCK_H=16; 14 tried, 0 wrong)" \
        in suite.headline(tmp_path)
    (tmp_path / "convergence.json").write_text(json.dumps({"results": [
        {"train_config": {"batch_size": 1024, "amp": "bf16", "eval_split": "valid"}, "step_mode": "cuda-graph",
         "valid_bound_nats": 91.234, "epochs": 20.0, "wall_s": 31.4},
        {"train_config": {"batch_size": 100, "amp": "none"}, "step_mode": "cuda-graph", "test_bound_nats": 90.5,
         "epochs": 20.0, "wall_s": 60.0}]}))  # a record from before eval_split: the test split
    assert "convergence batch 1024 (cuda-graph, bf16): valid bound 91.23 nats after 20.0 epochs in 31 s" \
        in suite.headline(tmp_path)
    assert "convergence batch 100 (cuda-graph, none): test bound 90.50 nats after 20.0 epochs in 60 s" \
        in suite.headline(tmp_path)


def test_a_part_stopped_at_its_limit_gets_sigint_and_time_to_write_what_it_has(tmp_path, monkeypatch):
    """A part past its limit is sent SIGINT first (pytest then writes its XML, the benchmarks their tables) and
    SIGKILL after STOP_GRACE_S; one that ignores SIGINT is killed all the same. The suite runs here with SIGINT
    ignored, as in a background job: its parts start with SIGINT at its default all the same."""
    suite = import_bench("suite")
    monkeypatch.setattr(suite, "STOP_GRACE_S", 2)
    kept = tmp_path / "kept.txt"
    writes_on_sigint = [sys.executable, "-c", "import pathlib, time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
                        f"    pathlib.Path({str(kept)!r}).write_text('what it had')"]
    ignores_sigint = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"]
    start = time.perf_counter()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        results = suite.run_stage([("polite", writes_on_sigint, 3, {}), ("deaf", ignores_sigint, 3, {})], tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert [r["status"] for r in results] == ["timed out after 3 s", "timed out after 3 s"]
    assert kept.read_text() == "what it had" and time.perf_counter() - start < 15


def test_a_budget_stops_parts_when_it_is_spent_and_starts_no_stage_after(tmp_path, monkeypatch):
    """--budget: a part stops at its own limit or at the budget's end, whichever comes first (a command killed
    at a fixed time then leaves no part running), and a stage with less than MIN_PART_S left is recorded as
    skipped, not started."""
    suite = import_bench("suite")
    sleep = lambda s: [sys.executable, "-c", f"import time; time.sleep({s})"]
    start = time.perf_counter()
    results = suite.run_stage([("slow", sleep(30), 100, {}), ("quick", sleep(0), 100, {})], tmp_path, deadline=start + 2)
    assert [r["status"] for r in results] == ["timed out after 2 s", "ok"] and time.perf_counter() - start < 10
    monkeypatch.setattr(suite, "stages", lambda quick, out: [[("first", sleep(0), 100, {})], [("second", sleep(0), 100, {})]])
    monkeypatch.setattr(suite, "MIN_PART_S", 5)
    monkeypatch.setattr(suite, "headline", lambda out: [])
    seen = []
    real = suite.run_stage
    monkeypatch.setattr(suite, "run_stage", lambda stage, out, deadline=None: seen.append(deadline) or time.sleep(3)
                        or real(stage, out, deadline))
    assert suite.main(["--out", str(tmp_path / "s"), "--budget", "7"]) == 0
    recorded = {r["part"]: r["status"] for r in json.loads((tmp_path / "s" / "suite.json").read_text())["results"]}
    assert recorded == {"first": "ok", "second": "skipped (budget 7 s spent)"} and len(seen) == 1


def test_a_part_is_not_started_with_less_of_the_budget_than_it_needs_to_write_its_figures(tmp_path, monkeypatch):
    """--budget: a part that writes nothing before a long first step (compiling the training step) is skipped
    with less than its own minimum left, where a short part after it still runs."""
    suite = import_bench("suite")
    noop = [sys.executable, "-c", "pass"]
    monkeypatch.setattr(suite, "stages", lambda quick, out: [[("first", noop, 100, {})], [("train-compiled", noop, 100, {})],
                                                            [("third", noop, 100, {})]])
    monkeypatch.setattr(suite, "headline", lambda out: [])
    assert suite.minimum_s([("train-compiled", noop, 100, {})]) == 150 > suite.MIN_PART_S
    assert suite.main(["--out", str(tmp_path / "s"), "--budget", "100"]) == 0
    recorded = {r["part"]: r["status"] for r in json.loads((tmp_path / "s" / "suite.json").read_text())["results"]}
    assert recorded == {"first": "ok", "train-compiled": "skipped (budget 100 s spent)", "third": "ok"}


def test_the_summary_says_when_a_training_step_fell_back(tmp_path):
    """A bench_train row whose step ran in another mode than its own (a capture or compile that failed) says so."""
    suite = import_bench("suite")
    case = {"preset": "mnist-paper", "batch": 1024, "dtype": "fp32", "images_per_s": 9000.0}
    (tmp_path / "train.json").write_text(json.dumps({"results": [
        {**case, "mode": "triton-graph", "step_mode": "eager"}, {**case, "batch": 100, "mode": "triton-graph", "step_mode": "cuda-graph"}]}))
    lines = suite.headline(tmp_path)
    assert "train mnist-paper batch 1024 triton-graph fp32: 9,000 images/s (ran as the eager step)" in lines
    assert "train mnist-paper batch 100 triton-graph fp32: 9,000 images/s" in lines


def test_a_part_run_again_sets_its_earlier_outputs_aside(tmp_path):
    """Before a part starts, the files and folders its command names in DIR move to NAME.previous[.EXT]
    (older ones replaced): a part that now fails or times out is never summarised from an earlier run."""
    suite = import_bench("suite")
    (tmp_path / "train.json").write_text("new")
    (tmp_path / "train.previous.json").write_text("older")
    (tmp_path / "convergence").mkdir()
    (tmp_path / "convergence" / "run").write_text("x")
    (tmp_path / "other.json").write_text("kept")
    command = ["python", str(suite.BENCH / "bench_train.py"), "--json", str(tmp_path / "train.json"),
               "--markdown", str(tmp_path / "train.md"), "--out", str(tmp_path / "convergence"),
               f"--junitxml={tmp_path / 'cuda-tests.xml'}"]
    moved = suite.set_aside(command, tmp_path)
    assert sorted(p.name for p in moved) == ["convergence.previous", "train.previous.json"]
    assert (tmp_path / "train.previous.json").read_text() == "new" and not (tmp_path / "train.json").exists()
    assert (tmp_path / "convergence.previous" / "run").exists() and not (tmp_path / "convergence").exists()
    assert (tmp_path / "other.json").read_text() == "kept" and (suite.BENCH / "bench_train.py").exists()
    (tmp_path / "cuda-tests.xml").write_text("<x/>")
    assert [p.name for p in suite.set_aside(command, tmp_path)] == ["cuda-tests.previous.xml"]


def test_the_suite_merges_a_second_half_into_the_same_directory(tmp_path):
    """--only runs some parts; their results replace those parts' earlier ones, the rest are kept, in order."""
    suite = import_bench("suite")
    first = [{"part": "verify", "status": "ok"}, {"part": "train", "status": "timed out after 120 s"}]
    second = [{"part": "train", "status": "ok"}, {"part": "attention", "status": "ok"}]
    merged = suite.merge(first, second, ["verify", "attention", "train"])
    assert merged == [{"part": "verify", "status": "ok"}, {"part": "attention", "status": "ok"},
                      {"part": "train", "status": "ok"}]


def test_the_suite_accepts_its_own_part_names_and_refuses_others(tmp_path):
    """--only and --skip take the suite's part names; any other name is refused before anything runs."""
    suite = import_bench("suite")
    order = [name for name, *_ in suite.parts(False, tmp_path)]
    assert suite.unknown_parts(["verify", "cuda-tests"], [], order) == []
    assert suite.unknown_parts(None, ["train-compiled"], order) == []
    assert suite.unknown_parts(["verify", "nope"], ["train", "zzz"], order) == ["nope", "zzz"]
    with pytest.raises(SystemExit):
        suite.main(["--out", str(tmp_path), "--only", "verfy"])
    assert not (tmp_path / "suite.json").exists()


def test_the_suite_stops_a_part_and_its_children_at_the_time_limit(tmp_path):
    """A part past its limit is killed with its whole process group (pytest's workers too) and marked."""
    suite = import_bench("suite")
    sleeper = [sys.executable, "-c", "import subprocess, sys, time; "
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('started'); time.sleep(60)"]
    quick = [sys.executable, "-c", "print('done')"]
    start = time.perf_counter()
    results = suite.run_stage([("slow", sleeper, 2, {}), ("fast", quick, 30, {})], tmp_path)
    assert time.perf_counter() - start < 30
    assert [(r["part"], r["status"]) for r in results] == [("slow", "timed out after 2 s"), ("fast", "ok")]
    assert results[1]["last_line"] == "done" and (tmp_path / "slow.log").read_text().startswith("started")


def test_a_signal_stops_the_suite_its_parts_and_keeps_the_record(tmp_path, monkeypatch):
    """SIGTERM to the suite (an outer `timeout`): the running part and its children are killed (they run in
    sessions of their own, which the signal does not reach), the finished stages and the stopped part are
    recorded in DIR/suite.json, and the suite exits 143 with its own handlers put back. A SIGINT inherited
    as ignored (a background job) stays ignored while it runs."""
    import threading

    suite = import_bench("suite")
    child_pid = tmp_path / "child.pid"
    sleeper = [sys.executable, "-c", "import subprocess, sys, time; "
               "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
               f"open({str(child_pid)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)"]
    quick = [sys.executable, "-c", "print('done')"]
    monkeypatch.setattr(suite, "stages", lambda quick_, out: [[("first", quick, 30, {})], [("slow", sleeper, 60, {})],
                                                              [("never", quick, 30, {})]])
    monkeypatch.setattr(suite, "parts", lambda quick_, out: [("first",), ("slow",), ("never",)])
    before = signal.getsignal(signal.SIGTERM)
    sigint_while_running = []

    def terminate_once_started():
        deadline = time.time() + 30
        while not child_pid.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        sigint_while_running.append(signal.getsignal(signal.SIGINT))
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_once_started, daemon=True).start()
    start = time.perf_counter()
    sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert suite.main(["--out", str(tmp_path)]) == 128 + signal.SIGTERM
        assert sigint_while_running == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert time.perf_counter() - start < 30
    assert signal.getsignal(signal.SIGTERM) is before
    recorded = {r["part"]: r["status"] for r in json.loads((tmp_path / "suite.json").read_text())["results"]}
    assert recorded["first"] == "ok" and recorded["slow"].startswith("stopped by SIGTERM") and "never" not in recorded
    pid = int(child_pid.read_text())

    def running(pid):  # a zombie (killed, not yet reaped by whoever adopted it) no longer runs
        try:
            return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
        except OSError:  # no /proc: whether the pid exists at all
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            return True

    for _ in range(100):  # the grandchild was killed with its process group
        if not running(pid):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the part's child {pid} outlived the suite")


def test_the_suite_summary_counts_the_cuda_tests(tmp_path):
    suite = import_bench("suite")
    (tmp_path / "cuda-tests.xml").write_text(
        '<testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" tests="20"></testsuite></testsuites>')
    assert "cuda-tests: 14 passed, 3 failed, 3 skipped" in suite.headline(tmp_path)


def test_the_step_profile_lists_the_busiest_ops(tmp_path):
    """bench/profile_step.py on CPU: wall and op time per step, the busiest ops first, and its JSON."""
    profile_step = import_bench("profile_step")
    out = tmp_path / "profile.json"
    profile_step.main(["--device", "cpu", "--preset", "mnist-quick", "--batch", "4", "--modes", "reference",
                       "--warmup", "1", "--steps", "1", "--top", "4", "--json", str(out)])
    (result,) = json.loads(out.read_text())["results"]
    assert result["mode"] == "reference" and result["step_mode"] == "eager" and result["wall_ms_per_step"] > 0
    kernels = result["kernels"]
    assert len(kernels) == 4 and all(k["calls"] > 0 for k in kernels)
    assert [k["ms"] for k in kernels] == sorted((k["ms"] for k in kernels), reverse=True)
    assert 0 < sum(k["ms_per_step"] for k in kernels) <= result["device_ms_per_step"]


def test_a_profile_that_recorded_no_kernel_is_an_error_not_zero(tmp_path, monkeypatch):
    profile_step = import_bench("profile_step")
    monkeypatch.setattr(profile_step, "kernel_table", lambda prof, device_type, top: (0.0, []))
    with pytest.raises(RuntimeError, match="the profiler recorded no cpu kernel in 1 reference steps"):
        profile_step.main(["--device", "cpu", "--preset", "mnist-quick", "--batch", "2", "--modes", "reference",
                           "--warmup", "1", "--steps", "1", "--json", str(tmp_path / "p.json")])
    assert not (tmp_path / "p.json").exists()


def test_the_sum_block_probe_changes_one_launch_setting_at_a_time(tmp_path):
    """bench/probe_sum_blocks.py: each variant's line shows the block shape it launched and every quantity's
    error; in the interpreter every variant is right (the GPU is where they differed)."""
    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        pytest.skip("needs CUDA, or TRITON_INTERPRET=1 set before triton is imported")
    probe = import_bench("probe_sum_blocks")
    out = tmp_path / "probe.txt"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert probe.main(["--device", device, "--variants", "launched,rows/2,block_n4", "--cases", "1", "--out", str(out)]) == 0
    launched, halved, block_n4 = out.read_text().splitlines()
    rows = [int(line.split(" backward H")[1].split()[0]) for line in (launched, halved)]
    assert rows[1] == rows[0] // 2 and " N4 " in block_n4 and " N2 " in launched
    assert all("dx=" in line and "dparams=" in line and "!" not in line for line in (launched, halved, block_n4))
    with pytest.raises(SystemExit):
        probe.main(["--variants", "bogus"])



def test_the_launch_count_sees_each_fused_kernel_and_one_weight_gradient_per_map(tmp_path):
    """bench/count_launches.py: one attention launch per time step and way (the first read alone, then
    each write with the next step's read, and the last write alone), the LSTM cells once per step and way,
    no add for the canvas's gradient and no cat of the stacked maps' gradients; in backward one product per step and map for the input's
    gradient and one per map for its weight (RecurrentLinear), not one per step."""
    count_launches = import_bench("count_launches")
    from draw.config import PRESETS

    T = PRESETS["mnist-quick"].model.T
    out = tmp_path / "launches.json"
    count_launches.main(["--preset", "mnist-quick", "--batch", "3", "--json", str(out)])
    counts = json.loads(out.read_text())["counts"]
    forward, backward = counts["forward"], counts["backward"]
    assert forward["attention_read_forward"] == backward["attention_read_backward"] == T
    assert forward["attention_write_forward"] == backward["attention_write_backward"] == 1
    assert backward.get("add", 0) < T  # the canvas's two gradients are summed inside the read backward kernel
    assert forward["lstm_forward"] == backward["lstm_backward"] == 2 * T
    # each consumer writes its gradient where the maps keep them: no cat per step, and none of G; the four
    # collectors' of their inputs alone
    assert backward.get("cat", 0) == 4
    # the maps from h_dec and h_enc run T + 1 times (once on the initial states), the one from z T times; the
    # one from r is formed in the read kernels, its input's gradient too (kernels.Projection)
    assert forward["addmm"] == 2 * (T + 1) + T and forward["attention_read_forward"] == T
    assert backward["mm"] == 2 * (T + 1) + T + 4
    assert counts["optimizer"]["_fused_adam_"] == 1  # Adam as the step runs it on CUDA: one kernel
    foreach = count_launches.count_step("mnist-quick", 3, adam_form="foreach")["optimizer"]  # as it ran before
    assert "_fused_adam_" not in foreach and sum(foreach.values()) > sum(counts["optimizer"].values()) + 10
    # under bf16 autocast the glimpses come out of the kernels in bf16: no cast per step either way
    count_launches.main(["--preset", "mnist-quick", "--batch", "3", "--amp", "bf16", "--json", str(out)])
    bf16 = json.loads(out.read_text())["counts"]
    assert bf16["forward"].get("_to_copy", 0) < T and bf16["backward"].get("_to_copy", 0) < T


def test_the_tuner_checks_every_neighbour_on_cpu(tmp_path):
    """bench/tune_attention.py --quick: every op and kernel, the launchers' settings and each single change
    of rows, columns or LOAD_AHEAD, checked against the reference in Triton's interpreter (untimed on a CPU)."""
    tune = import_bench("tune_attention")
    out = tmp_path / "tune.json"
    interpreter_tile = tune.ta._INTERPRETER_TILE
    assert tune.main(["--quick", "--device", "cpu", "--json", str(out), "--markdown", str(tmp_path / "tune.md")]) == 0
    assert tune.ta._INTERPRETER_TILE == interpreter_tile  # the GPU's row blocks for the search only
    result = json.loads(out.read_text())
    summary, rows = result["summary"], result["results"]
    assert [(s["op"], s["kernel"]) for s in summary] == [(op, k) for op in ("read", "write", "write-read")
                                                         for k in ("fwd", "bwd")]
    assert all(s["tried"] >= 3 and s["wrong"] == s["failed"] == 0 for s in summary)
    assert sum(s["tried"] for s in summary) == len(rows)
    assert all(r["status"] == "ok" and r["rel_err"] <= 1e-4 and r["ms"] is None for r in rows)
    assert sum(r["launchers"] for r in rows) == len(summary)
    # every kernel tried once with LOAD_AHEAD alone the other way from its launchers' (who load ahead in all but the
    # write forward); a block of every row also turns it off (one trip)
    def settings(text):
        return dict(entry.split("=") for entry in text.split(","))

    launched = {(s["op"], s["kernel"]): settings(s["launchers_settings"]) for s in summary}
    assert [own["LOAD_AHEAD"] for own in launched.values()] == ["1", "1", "0", "1", "1", "1"]
    changes = [{key for key, value in settings(r["settings"]).items() if launched[r["op"], r["kernel"]][key] != value}
               for r in rows if r["settings"] != "launchers'"]
    assert changes.count({"LOAD_AHEAD"}) == len(summary)
    assert (tmp_path / "tune.md").read_text().startswith("# Attention launch settings")


def test_the_tuners_candidates_load_ahead_only_where_a_loop_has_a_next_block():
    """bench/tune_attention.py's neighbours: LOAD_AHEAD=1 only with fewer rows a block than the image has (the
    launchers run a one-block loop with 0), and never a candidate that is the same launch as another or as the
    current settings."""
    tune = import_bench("tune_attention")
    current = {"BLOCK_H": 16, "BLOCK_W": 32, "num_warps": 4, "num_stages": 1, "LOAD_AHEAD": 0}
    space = {"BLOCK_H": [16, 32], "BLOCK_W": [32], "num_warps": [4], "num_stages": [1], "maxnreg": [], "LOAD_AHEAD": [0, 1]}
    assert tune.neighbours(current, space, 4096, height=28) == [{**current, "BLOCK_H": 32}, {**current, "LOAD_AHEAD": 1}]
    assert tune.neighbours({**current, "BLOCK_H": 32}, space, 4096, height=28) == [current]  # 32 rows hold all 28
    assert tune.neighbours({**current, "BLOCK_H": 32}, space, 4096, height=54) == [
        current, {**current, "BLOCK_H": 32, "LOAD_AHEAD": 1}]


def test_the_tuner_resumes_a_run_split_in_parts(tmp_path, capsys):
    """--resume keeps the targets already in --json and searches only the others."""
    tune = import_bench("tune_attention")
    out = tmp_path / "tune.json"
    argv = ["--quick", "--device", "cpu", "--ops", "write", "--json", str(out)]
    assert tune.main(argv + ["--kernels", "fwd"]) == 0
    first = json.loads(out.read_text())
    assert tune.main(argv + ["--resume"]) == 0  # fwd is there: only bwd is searched
    second = json.loads(out.read_text())
    assert [t["target"] for t in second["summary"]] == [first["summary"][0]["target"],
                                                        first["summary"][0]["target"].replace(" fwd ", " bwd ")]
    assert second["results"][:len(first["results"])] == first["results"]
    assert "in " + str(out) + " already (--resume)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tune.parse_args(["--resume"])


def test_a_candidate_that_loses_the_device_stops_the_tuner_with_every_row_kept(tmp_path, monkeypatch):
    """A sticky CUDA error (an illegal address) surfaces at the next synchronisation, after the candidate:
    the tuner records that candidate as failed, writes every row tried so far (partial, the target without a
    summary, so --resume tunes it again) and exits 3."""
    tune = import_bench("tune_attention")
    common = sys.modules["common"]
    calls = []

    def free_memory(device):
        calls.append(device)
        if len(calls) == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    monkeypatch.setattr(common, "free_memory", free_memory)
    out = tmp_path / "tune.json"
    assert tune.main(["--quick", "--device", "cpu", "--ops", "write", "--kernels", "fwd", "--json", str(out)]) == 3
    result = json.loads(out.read_text())
    assert result["metadata"]["partial"] is True and result["summary"] == []
    rows = result["results"]
    assert len(rows) >= 2 and [r["status"] for r in rows] == ["ok"] * (len(rows) - 1) + ["failed"]
    assert rows[-1]["device_lost"] and rows[-1]["reason"] == (
        "the device was lost: RuntimeError: CUDA error: an illegal memory access was encountered")


def test_an_interrupted_tuner_writes_the_candidates_it_tried(tmp_path, monkeypatch):
    """Ctrl-C, or the suite's SIGINT at the part's time limit, in the middle of a target: the candidates tried so far
    are written (partial, the target without a summary, so --resume searches it again) and the exit status is 130."""
    tune = import_bench("tune_attention")
    evaluate, tried = tune.evaluate, []

    def interrupted_at_the_third(*args, **kwargs):
        tried.append(1)
        if len(tried) == 3:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(tune, "evaluate", interrupted_at_the_third)
    out = tmp_path / "tune.json"
    assert tune.main(["--quick", "--device", "cpu", "--ops", "write", "--kernels", "fwd", "--json", str(out)]) == 130
    result = json.loads(out.read_text())
    assert result["metadata"]["partial"] is True and result["summary"] == []
    assert len(result["results"]) == 2 and all(r["status"] == "ok" for r in result["results"])


def test_the_tuner_reports_wrong_results(tmp_path):
    """A candidate further from the reference than --tolerance is "wrong", never timed, and fails the run."""
    tune = import_bench("tune_attention")
    out = tmp_path / "tune.json"
    argv = ["--quick", "--device", "cpu", "--ops", "write", "--kernels", "fwd", "--tolerance", "1e-12", "--json", str(out)]
    assert tune.main(argv) == 1
    rows = json.loads(out.read_text())["results"]
    assert rows and all(r["status"] == "wrong" and r["ms"] is None and r["rel_err"] > 1e-12 for r in rows)


def test_the_tuner_descends_to_the_fastest_settings(monkeypatch):
    """The search moves to the fastest neighbour while it gains more than --min-gain, never to a wrong or
    failed candidate, and stops at a local optimum (times from a stand-in for the GPU)."""
    tune = import_bench("tune_attention")
    best = {"BLOCK_H": 32, "BLOCK_W": 32, "num_warps": 4, "num_stages": 2, "LOAD_AHEAD": 1, "maxnreg": 96}
    # a neighbour of the best (64 rows hold all 54: no loading ahead): would time fastest, but gives wrong results
    faulty = {**best, "BLOCK_H": 64, "LOAD_AHEAD": 0}

    def fake_evaluate(target, settings, case, reference, args, device, copy_gbps):
        current = settings or tune.start_settings(target.launcher_config(device))
        # each step away from `best` (a power of two in a block or the warps, one pipeline stage, another
        # register cap or none, loading ahead or not) costs 10 %
        steps = abs(current["num_stages"] - best["num_stages"]) + (current.get("maxnreg") != best["maxnreg"]) + (
            current["LOAD_AHEAD"] != best["LOAD_AHEAD"]) + sum(
            abs(current[k].bit_length() - best[k].bit_length()) for k in ("BLOCK_H", "BLOCK_W", "num_warps"))
        wrong = current == faulty
        return {"op": target.op, "size": target.size.name, "kernel": target.kernel, "contraction": target.contraction,
                "settings": "launchers'" if settings is None else tune.settings_text(settings),
                "status": "wrong" if wrong else "ok", "ms": 0.5 if wrong else 1 + 0.1 * steps,
                "pct_copy": None, "rel_err": 0.0}

    monkeypatch.setattr(tune, "evaluate", fake_evaluate)
    monkeypatch.setattr(tune, "outputs", lambda provider, case: [])
    monkeypatch.setenv("DRAW_TRITON_CONTRACTION", "auto")
    args = tune.parse_args(["--device", "cpu", "--rounds", "10"])
    size = tune.ba.Size("test", 2, 1, 54, 54, 12, 12)  # launchers at 3x54x54 fwd: BLOCK_H 16, 64 columns, 4 warps
    target = tune.Target("read", size, "fwd", "auto")
    start = tune.start_settings(target.launcher_config(torch.device("cpu")))
    assert "maxnreg" not in start  # no cap unless asked for
    rows = []
    summary = tune.tune(target, args, torch.device("cpu"), 1.0, rows)
    assert summary["best_settings"] == tune.settings_text(best)
    assert summary["best_ms"] == 1.0 and summary["speedup"] == pytest.approx(summary["launchers_ms"])
    assert [r["status"] for r in rows if r["settings"] == tune.settings_text(faulty)] == ["wrong"]
    assert len({r["settings"] for r in rows}) == len(rows)  # no candidate twice

    args = tune.parse_args(["--device", "cpu", "--rounds", "1"])
    one = tune.tune(target, args, torch.device("cpu"), 1.0, [])
    assert one["best_settings"] != tune.settings_text(best) and one["best_ms"] < one["launchers_ms"]
    backward = {**summary, "kernel": "bwd", "best_settings": "num_warps=2"}
    unchanged = {**summary, "size": "1x1x28x28", "best_settings": "launchers'"}
    assert tune.launch_lines([summary, backward, unchanged]) == [
        "read 2x1x54x54 (auto): DRAW_TRITON_LAUNCH=fwd.BLOCK_H=32,fwd.BLOCK_W=32,fwd.num_warps=4,fwd.num_stages=2,"
        "fwd.LOAD_AHEAD=1,fwd.maxnreg=96,bwd.num_warps=2"]
