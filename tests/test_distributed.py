"""Data-parallel training (draw/distributed.py): two gloo ranks on this machine against one process.

Each launch starts two processes with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, and
MASTER_ADDR 127.0.0.1 with a free port; gloo on the loopback interface), one thread each, running
`draw train` on a tiny preset and the synthetic data; one launch goes through torchrun itself. Every
launch is bounded in time (LAUNCH_TIMEOUT_S).

Tolerance. Every rank draws the whole global batch, its binarization and its latent noise, and trains
on its part, so two ranks see exactly the images and noise of one process: what differs is only the
order of float additions (two half-batch means averaged by DDP against one mean, per-rank partial sums
of the test bound). So losses and bounds agree to float32 rounding: rtol LOSS_RTOL = 1e-5, where we see
about 1e-7. The weights after 6 Adam steps of lr 2e-3 agree to WEIGHT_ATOL = 1e-5, where we see about
2e-7: the gradients' rounding differences (about 1e-7 relative) pass through Adam, whose normalised
update can magnify a relative difference where a gradient is near zero, hence the margin. A resume at
the same world size repeats the same operations, so it is exact (torch.equal).
"""

import io
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from draw import DRAW, DRAWConfig
from draw import config as draw_config
from draw.checkpoint import load_checkpoint
from draw.cli import main
from draw.distributed import World, check_global_batch
from draw.evaluate import evaluate_bound
from draw.rundir import read_metrics
from draw.step import TrainStep, resolve_gradient_sync, resolve_step_mode

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 120
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5
TINY = DRAWConfig(height=28, width=28, channels=1, T=4, enc_size=24, dec_size=24, z_size=6, read_n=2, write_n=3)
TINY_TRAIN = dict(dataset="synthetic", batch_size=16, lr=2e-3, seed=3)
TINY_PRESET = f"draw_config.Preset(draw_config.DRAWConfig(**{TINY.to_dict()!r}), draw_config.TrainConfig(**{TINY_TRAIN!r}))"

# A rank: the tiny preset, one thread, no figures, an optional fault on rank 1 at one step, then `draw train`.
WORKER = f"""
import os, signal, sys, time
import torch
torch.set_num_threads(1)
from draw import config as draw_config, train as train_module
draw_config.PRESETS["tiny"] = {TINY_PRESET}
train_module.figures.write_model_figures = lambda *args, **kwargs: []
fault, fault_step = os.environ.get("TEST_FAULT", ""), int(os.environ.get("TEST_FAULT_STEP", "-1"))
batch = train_module.BatchSampler.batch
def faulty_batch(self, step):  # the fault arrives as step fault_step + 1 begins
    if step == fault_step and os.environ["RANK"] == "1":
        if fault == "raise":
            raise RuntimeError("injected failure")
        if fault == "hang":
            time.sleep(60)
        if fault == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
    return batch(self, step)
train_module.BatchSampler.batch = faulty_batch
if fault.startswith(("slow-data", "no-data")) and os.environ["RANK"] == "0":  # its data takes fault_step s, or fails
    load = train_module.load_dataset
    def slow_load(*args, **kwargs):
        time.sleep(fault_step)
        if fault.startswith("no-data"):
            raise ValueError("injected data failure")
        return load(*args, **kwargs)
    train_module.load_dataset = slow_load
if fault == "no-data-slow-reader" and os.environ["RANK"] == "1":  # it looks for a failure note 2 s late
    from draw import distributed
    failure_note = distributed._failure_note
    def late_failure_note():
        time.sleep(2)
        return failure_note()
    distributed._failure_note = late_failure_note
if os.environ.get("TEST_GRADIENT_SYNC"):  # average the gradients as the CUDA-graph step does, here eagerly
    from draw import step as step_module
    init = step_module.TrainStep.__init__
    def sync_init(self, *args, **kwargs):
        init(self, *args, **{{**kwargs, "gradient_sync": os.environ["TEST_GRADIENT_SYNC"]}})
    step_module.TrainStep.__init__ = sync_init
from draw.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class Rank:
    returncode: int | None
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, args: list[str], world_size: int = 2, *, fault: str = "", fault_step: int = -1,
           wait_for: tuple[int, ...] | None = None, gradient_sync: str = "") -> list[Rank]:
    """Run `draw train args` as world_size gloo ranks; wait for the ranks in wait_for (default all) at most
    LAUNCH_TIMEOUT_S, then kill whatever still runs. A rank killed that way has returncode None."""
    port = free_port()
    logs, procs = [], []
    for rank in range(world_size):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "GLOO_SOCKET_IFNAME": "lo",
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TEST_FAULT": fault, "TEST_FAULT_STEP": str(fault_step),
               "TEST_GRADIENT_SYNC": gradient_sync}
        logs.append(open(tmp_path / f"rank{rank}-{port}.log", "w+"))
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, *args], env=env, cwd=ROOT,
                                      stdout=logs[-1], stderr=subprocess.STDOUT))
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    results = []
    try:
        for rank in wait_for if wait_for is not None else range(world_size):
            try:
                procs[rank].wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} still runs after {LAUNCH_TIMEOUT_S} s")
    finally:
        for proc, log in zip(procs, logs):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                returncode = None
            else:
                returncode = proc.returncode
            log.seek(0)
            results.append(Rank(returncode, log.read()))
            log.close()
    return results


def launch_with_torchrun(tmp_path: Path, args: list[str]) -> Rank:
    """Run `draw train args` under torchrun with two gloo ranks (static rendezvous on 127.0.0.1)."""
    port = free_port()
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={port}", "--no-python", sys.executable, "-c", WORKER, *args]
    try:
        result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun still runs after {LAUNCH_TIMEOUT_S} s")
    return Rank(result.returncode, result.stdout + result.stderr)


def train_args(out: Path, *extra: str, steps: int = 6) -> list[str]:
    return ["train", "--preset", "tiny", "--steps", str(steps), "--log-every", "1", "--eval-every", "3",
            "--checkpoint-every", "3", "--no-progress", "--dist-timeout", "60", "--out", str(out), *extra]


@pytest.fixture
def one_process(monkeypatch):
    """`draw train` in this process (world size 1) with the tiny preset and no figures; returns its exit code."""
    from draw import train as train_module

    monkeypatch.setitem(draw_config.PRESETS, "tiny", draw_config.Preset(TINY, draw_config.TrainConfig(**TINY_TRAIN)))
    monkeypatch.setattr(train_module.figures, "write_model_figures", lambda *args, **kwargs: [])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    torch.set_num_threads(1)
    return lambda args: main(args)


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def gradient_norms(run: Path) -> list[tuple[int, float]]:
    """Each logged interval's mean gradient norm, before clipping: the averaged gradient's, so a sum across
    ranks instead of a mean shows here (the clip and Adam's scale invariance hide it from losses and weights)."""
    return [(r["step"], r["grad_norm"]) for r in read_metrics(run / "metrics.jsonl") if "grad_norm" in r]


def bounds(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["test_bound"]) for r in read_metrics(run / "metrics.jsonl") if "test_bound" in r]


def assert_same_run(actual: Path, expected: Path, *, exact: bool) -> None:
    """Per-step losses, gradient norms, test bounds and final weights: identical, or equal to float rounding
    (module docstring)."""
    a_losses, e_losses = losses(actual), losses(expected)
    assert [s for s, _ in a_losses] == [s for s, _ in e_losses] and a_losses
    a_bounds, e_bounds = bounds(actual), bounds(expected)
    assert [s for s, _ in a_bounds] == [s for s, _ in e_bounds] and a_bounds
    a_norms, e_norms = gradient_norms(actual), gradient_norms(expected)
    assert [s for s, _ in a_norms] == [s for s, _ in e_norms] and a_norms
    a_payload, e_payload = load_checkpoint(actual), load_checkpoint(expected)
    a, e = a_payload["model"], e_payload["model"]
    assert ("average" in a_payload) == ("average" in e_payload)
    if "average" in e_payload:  # --ema: the moving average of the weights, as the weights
        assert a_payload["average"]["updates"] == e_payload["average"]["updates"]
        a = {**a, **{f"average {name}": t for name, t in a_payload["average"]["sums"].items()}}
        e = {**e, **{f"average {name}": t for name, t in e_payload["average"]["sums"].items()}}
    if exact:
        assert a_losses == e_losses and a_bounds == e_bounds and a_norms == e_norms
        assert all(torch.equal(a[name], e[name]) for name in e)
        return
    for (step, x), (_, y) in zip(a_losses + a_bounds + a_norms, e_losses + e_bounds + e_norms):
        assert x == pytest.approx(y, rel=LOSS_RTOL), f"step {step}: {x} != {y}"
    for name in e:
        torch.testing.assert_close(a[name], e[name], rtol=0, atol=WEIGHT_ATOL, msg=name)


# --- two ranks against one process ------------------------------------------------------------------


def test_two_ranks_with_accumulation_compute_what_one_process_computes(tmp_path, one_process):
    """torchrun, 2 ranks x 2 micro-batches of 4 (DDP with no_sync) = one process with the batch of 16:
    the same losses, sharded test bounds, weights and moving average of the weights (--ema); rank 0 alone logs."""
    assert one_process(train_args(tmp_path / "one", "--ema", "0.5")) == 0
    torchrun = launch_with_torchrun(tmp_path, train_args(tmp_path / "two", "--accumulate", "2", "--ema", "0.5"))
    assert torchrun.returncode == 0, torchrun.stderr
    assert_same_run(tmp_path / "two", tmp_path / "one", exact=False)
    assert torchrun.stderr.count("step 6/6") == 1 and torchrun.stderr.count("training tiny") == 1
    assert "each step: 2 rank(s) x 2 micro-batch(es) of 4 images = the batch of 16" in torchrun.stderr
    assert "eager step: the gradients averaged across the 2 ranks by DistributedDataParallel" in torchrun.stderr
    payload = load_checkpoint(tmp_path / "two")
    assert payload["world_size"] == 2 and payload["train_config"]["accumulate"] == 2


def test_accumulation_is_the_big_batch_step():
    """accumulate 2 at batch 16 takes the step of accumulate 1 at batch 16, up to float rounding."""
    x = torch.bernoulli(torch.full((16, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    results = {}
    for n in (1, 2):
        torch.manual_seed(0)
        model = DRAW(TINY)
        step = TrainStep(model, lr=1e-2, grad_clip=10.0, accumulate=n)
        results[n] = (torch.stack([step(x, lr=1e-2) for _ in range(3)]), model.state_dict())
    torch.testing.assert_close(results[2][0], results[1][0], rtol=LOSS_RTOL, atol=0)
    for name, weight in results[1][1].items():
        torch.testing.assert_close(results[2][1][name], weight, rtol=0, atol=WEIGHT_ATOL, msg=name)
    with pytest.raises(ValueError, match="must divide by the world size 1 x --accumulate 3 = 3"):
        TrainStep(DRAW(TINY), lr=1e-2, grad_clip=10.0, accumulate=3)(x, lr=1e-2)


# --- stop, resume and world sizes -------------------------------------------------------------------


def test_a_signal_to_one_rank_stops_both_and_a_resume_at_any_world_size_continues(tmp_path, one_process, caplog):
    """SIGTERM to rank 1 alone during step 3: both ranks agree, checkpoint step 3 and exit 143. Resumed
    at world size 2 the run is bitwise the uninterrupted one; resumed at world size 1 it agrees to float
    rounding, and says so. (A run of one process resumed at world size 2 is the same code path.)"""
    full = tmp_path / "full"
    ranks = launch(tmp_path, train_args(full))
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr + ranks[1].stderr
    assert "step 6/6" in ranks[0].stderr and "step " not in ranks[1].stderr  # rank 0 alone logs

    stopped = tmp_path / "stopped"
    ranks = launch(tmp_path, train_args(stopped), fault="sigterm", fault_step=2)
    assert [r.returncode for r in ranks] == [128 + signal.SIGTERM] * 2, ranks[0].stderr + ranks[1].stderr
    assert load_checkpoint(stopped)["step"] == 3 and "stopped at step 3 (SIGTERM)" in ranks[0].stderr
    shutil.copytree(stopped, tmp_path / "to-one")

    ranks = launch(tmp_path, train_args(stopped, "--resume"))
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr + ranks[1].stderr
    assert "world size" not in ranks[0].stderr
    assert_same_run(stopped, full, exact=True)

    assert one_process(train_args(tmp_path / "to-one", "--resume")) == 0
    assert "resuming at world size 1 a run checkpointed at world size 2" in caplog.text
    assert_same_run(tmp_path / "to-one", full, exact=False)


# --- leaving ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("outcome, code", [("finished", 0), ("stopped", 128 + signal.SIGTERM), ("failed", 2)])
def test_a_torchrun_rank_leaves_through_os_exit_with_its_exit_code_and_its_output_written(monkeypatch, outcome, code):
    """A rank of several ends with os._exit (draw.distributed.leave_rank says why) after its output is
    flushed, with the code main() gives; a process of its own (WORLD_SIZE 1 or unset) returns from main()."""
    from draw import cli, distributed
    from draw.train import TrainingStopped

    written = io.BytesIO()  # what reached the file behind stdout; the wrapper holds writes until a flush
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(written, encoding="utf-8", write_through=False))

    def train(args):
        sys.stdout.write("the run's last line")  # no newline: still buffered when the rank leaves
        if outcome == "stopped":
            raise TrainingStopped(signal.SIGTERM)
        if outcome == "failed":
            raise ValueError("a bad flag")
        return 0

    def leave(status):
        assert b"the run's last line" in written.getvalue()  # on its file before the process ends
        raise SystemExit(f"os._exit({status})")

    monkeypatch.setattr(cli, "cmd_train", train)
    monkeypatch.setattr(distributed.os, "_exit", leave)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match=rf"^os\._exit\({code}\)$"):
        main(["train"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["train"]) == code


# --- errors -----------------------------------------------------------------------------------------


def test_a_rank_that_raises_ends_every_rank_with_a_clear_error(tmp_path):
    rank0, rank1 = launch(tmp_path, train_args(tmp_path / "run"), fault="raise", fault_step=1)
    assert rank1.returncode not in (0, None) and "RuntimeError: injected failure" in rank1.stderr
    assert rank0.returncode == 2, rank0.stderr
    assert "draw train: error: rank 0: stopped because rank 1 failed: RuntimeError: injected failure" in rank0.stderr


def test_a_rank_that_hangs_is_given_up_after_the_timeout(tmp_path):
    """Rank 1 sleeps in step 2; rank 0 gives up after --dist-timeout (5 s, a margin over the ranks' start-up,
    which the same timeout bounds) with a clear error. (torchrun would then stop rank 1; here the test does.)"""
    args = train_args(tmp_path / "run")
    args[args.index("--dist-timeout") + 1] = "5"
    rank0, rank1 = launch(tmp_path, args, fault="hang", fault_step=1, wait_for=(0,))
    assert rank0.returncode == 2, rank0.stderr
    assert "draw train: error: rank 0: stopped because the process group failed" in rank0.stderr


def test_the_other_ranks_wait_for_a_dataset_longer_than_the_collectives_timeout(tmp_path):
    """Local rank 0 makes the data first (a download, a build), the others wait: longer than --dist-timeout
    (3 s here, the data 8 s), which bounds the collectives of training, not that wait."""
    args = train_args(tmp_path / "run", steps=2)
    args[args.index("--dist-timeout") + 1] = "3"
    ranks = launch(tmp_path, args, fault="slow-data", fault_step=8)
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr + ranks[1].stderr
    assert load_checkpoint(tmp_path / "run")["step"] == 2
    for fault in ("no-data", "no-data-slow-reader"):  # the wait ends too, with the failing rank's note, read in time
        # or late: the failing rank (which holds the store in a launch without torchrun's agent) waits for it
        rank0, rank1 = launch(tmp_path, train_args(tmp_path / fault), fault=fault, fault_step=1)
        assert rank0.returncode == 2 and "draw train: error: rank 0: injected data failure" in rank0.stderr
        assert rank1.returncode == 2 and "stopped because rank 0 failed: ValueError: injected data failure" in rank1.stderr


def test_a_global_batch_that_the_ranks_cannot_share_is_refused(tmp_path, one_process, capsys):
    with pytest.raises(ValueError, match=r"--batch-size 30 is the global batch: it must divide by the world size 4 x "
                                         r"--accumulate 2 = 8 \(try 24 or 32\)"):
        check_global_batch(30, 4, 2)
    check_global_batch(32, 4, 2)
    with pytest.raises(ValueError, match=r"= 6 \(the run's batch is fixed; --accumulate 1, 2, 4, 8 fit\)"):
        check_global_batch(16, 2, 3, resumed=True)  # a resume cannot change the batch: the micro-batches can
    assert one_process(["train", "--preset", "tiny", "--accumulate", "3", "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    assert "--batch-size 16 is the global batch: it must divide by the world size 1 x --accumulate 3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_graph_steps_all_reduce_computes_what_one_process_computes(tmp_path, one_process):
    """Two gloo ranks averaging their gradients with one all-reduce after the backward pass (what the
    CUDA-graph step captures; here eager, with 2 micro-batches each) against one process: the same losses,
    bounds and weights to float rounding."""
    assert one_process(train_args(tmp_path / "one")) == 0
    ranks = launch(tmp_path, train_args(tmp_path / "two", "--accumulate", "2"), gradient_sync="all-reduce")
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr + ranks[1].stderr
    assert "eager step: the gradients averaged across the 2 ranks by one all-reduce after the backward pass" \
        in ranks[0].stderr
    assert_same_run(tmp_path / "two", tmp_path / "one", exact=False)


def test_how_the_steps_average_gradients_across_ranks():
    """The CUDA-graph step averages with one all-reduce (DDP's hooks run from the host), the others with
    DDP; one process needs neither. "auto" steps eagerly under torchrun."""
    two, one = World(rank=0, size=2), World()
    assert resolve_gradient_sync("auto", "cuda-graph", two) == "all-reduce"
    assert resolve_gradient_sync("auto", "eager", two) == resolve_gradient_sync("auto", "compile", two) == "ddp"
    assert resolve_gradient_sync("auto", "cuda-graph", one) is None
    assert resolve_gradient_sync("all-reduce", "eager", two) == "all-reduce"
    with pytest.raises(ValueError, match="inside the graph, not DDP"):
        resolve_gradient_sync("ddp", "cuda-graph", two)
    with pytest.raises(ValueError, match="gradient sync must be one of"):
        resolve_gradient_sync("nccl", "eager", two)
    assert resolve_step_mode("cuda-graph", torch.device("cuda"), under_ddp=True) == "cuda-graph"
    assert resolve_step_mode("auto", torch.device("cuda"), under_ddp=True) == "eager"
    assert resolve_step_mode("auto", torch.device("cuda")) == "cuda-graph"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_gradient_all_reduce_is_captured_in_the_cuda_graph(tmp_path):
    """One NCCL rank: the CUDA-graph step with its gradient all-reduce inside the graph gives the losses
    and weights of the CUDA-graph step without it (a 1-rank all-reduce changes nothing but is captured)."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device())
    x = torch.bernoulli(torch.full((16, 1, 28, 28), 0.3, device=device),
                        generator=torch.Generator(device=device).manual_seed(0))
    results = {}
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=device)
    try:
        for sync in ("auto", "all-reduce"):
            torch.manual_seed(0)
            model = DRAW(TINY).to(device)
            step = TrainStep(model, lr=1e-2, grad_clip=10.0, mode="cuda-graph", device=device,
                             world=World(collective_device="cuda"), gradient_sync=sync)
            losses = [float(step(x, 1e-2)[0]) for _ in range(6)]  # 3 warm-up steps, a capture, replays
            assert step._graph is not None
            results[sync] = losses, [p.detach().clone() for p in model.parameters()]
    finally:
        dist.destroy_process_group()
    assert results["all-reduce"][0] == pytest.approx(results["auto"][0], rel=1e-6)
    for a, b in zip(results["all-reduce"][1], results["auto"][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --- sharded evaluation -----------------------------------------------------------------------------


class RankAlone(World):
    """A rank whose sums are not reduced: the per-rank parts of a sharded evaluation, in one process."""

    def sum(self, values):
        return values


@pytest.mark.parametrize("importance_samples", [1, 3])
def test_the_sharded_bound_adds_up_to_the_bound_of_one_process(importance_samples):
    """Three ranks' parts of 13 images (5, 4, 4 or so), each with the noise of its images' global
    positions, add up to the bound of the whole set in one process."""
    torch.manual_seed(0)
    model = DRAW(TINY)
    images = torch.bernoulli(torch.full((13, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    whole = evaluate_bound(model, images, batch_size=4 * importance_samples, importance_samples=importance_samples)
    parts = [evaluate_bound(model, images, batch_size=4 * importance_samples, importance_samples=importance_samples,
                            world=RankAlone(rank, 3)) for rank in range(3)]
    assert sum(p["nats"] for p in parts) == pytest.approx(whole["nats"], rel=1e-6)
    assert sorted(World(rank, 3).part(13) for rank in range(3)) == [slice(0, 4), slice(4, 8), slice(8, 13)]
    assert math.isfinite(whole["stderr"])
