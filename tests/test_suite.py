"""`python bench/suite.py --quick` runs on a CPU machine from end to end, so the GPU record never rots."""

import json
import pathlib
import subprocess
import sys

import pytest
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
    (no kernel runs, even in Triton's interpreter), and the per-step total of read and write."""
    bench_host_overhead = import_bench("bench_host_overhead")
    out = tmp_path / "host.json"
    assert bench_host_overhead.main(["--calls", "2", "--reps", "1", "--batch", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["results"]
    assert {(r["op"], r["mode"], r["path"]) for r in rows} == {
        (op, mode, path) for op in ("read", "glimpse", "write") for mode in ("fwd", "fwd+bwd") for path in ("function", "custom-op")}
    assert all(r["us_per_call"] > 0 for r in rows)
    expected = {path: 64 * sum(r["us_per_call"] for r in rows if r["path"] == path and r["mode"] == "fwd+bwd"
                               and r["op"] != "glimpse") / 1e3 for path in ("function", "custom-op")}
    assert result["per_step_ms"] == pytest.approx(expected)


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
