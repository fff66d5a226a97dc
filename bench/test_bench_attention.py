"""pytest-benchmark cases for the attention read and write: benchmarks, not assertions of speed.

    python -m pytest bench/ --benchmark-only          # reference on CPU; reference and triton on CUDA
    python -m pytest bench/ --benchmark-only --benchmark-json bench.json

The small size (64 MNIST images, read 2x2, write 5x5) keeps a CPU run to seconds. The project's
tests live in tests/ (pyproject's testpaths), so these do not run in CI unless bench/ is named.
bench_attention.py holds the inputs, the byte counts and the GB/s figure reported in extra_info.
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

import bench_attention  # noqa: E402  (bench/ is on sys.path: bench/conftest.py)
import common  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZE = bench_attention.Size("small", 64, 1, 28, 28, 2, 5)
PROVIDERS = {"reference": "eager", "triton": "triton"}


@pytest.fixture(scope="module", autouse=True)
def cpu_threads():
    """One torch thread on CPU, as the scripts default to (steady timings on a shared machine)."""
    before = torch.get_num_threads()
    common.set_cpu_threads(None, DEVICE)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def triton_reason():
    return common.triton_skip_reason(DEVICE)


@pytest.mark.parametrize("mode", bench_attention.MODES)
@pytest.mark.parametrize("op", bench_attention.OPS)
@pytest.mark.parametrize("backend", list(PROVIDERS))
def test_attention(benchmark, backend, op, mode, triton_reason):
    if backend == "triton" and triton_reason:
        pytest.skip(f"triton: {triton_reason}")
    case = bench_attention.make_inputs(op, SIZE, mode, DEVICE)
    fn = bench_attention.benchmark_fn(bench_attention.forward_fn(PROVIDERS[backend], case), case)

    def run():
        fn()
        common.synchronize(DEVICE)  # CUDA launches are asynchronous: time the work, not the launch

    benchmark.group = f"{op} {mode} {SIZE.name} {DEVICE.type}"
    benchmark.extra_info["bytes"] = bench_attention.BYTES[op](SIZE, mode)
    benchmark.pedantic(run, warmup_rounds=3, rounds=20, iterations=1)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info["gbps"] = benchmark.extra_info["bytes"] / median_s / 1e9
