"""Training runs end to end on small synthetic data: the step, resume, Ctrl-C, the command line."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from draw import DRAW, DRAWConfig, TrainConfig
from draw.checkpoint import load_checkpoint
from draw.cli import main
from draw.rundir import read_metrics
from draw.step import TrainStep, resolve_step_mode, step_statistics
from draw.train import lr_at, train

SMALL = DRAWConfig(height=28, width=28, channels=1, T=4, enc_size=24, dec_size=24, z_size=6, read_n=2, write_n=3)
QUIET = dict(progress=False, make_figures=False)


def train_config(**changes) -> TrainConfig:
    base = dict(dataset="synthetic", batch_size=16, lr=2e-3, steps=12, eval_every=6, log_every=1, checkpoint_every=6, seed=3)
    return TrainConfig(**{**base, **changes})


def losses(run_dir):
    """(step, loss, gradient norm, fraction of steps clipped) of every training record."""
    return [(r["step"], r["loss"], r["grad_norm"], r["clipped"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_train_step_is_the_plain_adam_step():
    """TrainStep (eager) = forward, backward, clipping and Adam written out by hand."""
    x = torch.bernoulli(torch.full((8, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    a = DRAW(SMALL)
    b = DRAW(SMALL)
    b.load_state_dict(a.state_dict())
    step = TrainStep(a, lr=1e-2, grad_clip=1.0)
    optimizer = torch.optim.Adam(b.parameters(), lr=1e-2)
    for i in range(3):
        torch.manual_seed(i)
        stats = step(x, lr=1e-2 / (i + 1))
        torch.manual_seed(i)
        out = b(x)
        optimizer.zero_grad()
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 / (i + 1)
        optimizer.step()
        assert step_statistics(a) == ("loss", "l_x", "l_z", "grad_norm", "clipped")
        assert stats.shape == (5,) and torch.equal(stats[0], out.loss.detach())
        torch.testing.assert_close(stats[1:3], torch.stack([out.l_x.mean(), out.l_z.mean()]).detach())
        assert torch.equal(stats[3], grad_norm) and stats[4] == float(grad_norm > 1.0)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_a_micro_batchs_outputs_are_let_go_before_the_next_one_runs():
    """With --accumulate, micro-batch i's outputs (and what its graph keeps) are freed before micro-batch
    i + 1's forward pass, so the step's peak memory is one micro-batch's."""
    import weakref

    x = torch.bernoulli(torch.full((8, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    step = TrainStep(DRAW(SMALL), lr=1e-2, grad_clip=1.0, accumulate=2)
    forward, losses_seen, alive_at_forward = step.forward, [], []

    def watched(*args, **kwargs):
        alive_at_forward.append([ref() is not None for ref in losses_seen])
        out = forward(*args, **kwargs)
        losses_seen.append(weakref.ref(out.loss))
        return out

    step.forward = watched
    step(x, lr=1e-2)
    assert alive_at_forward == [[], [False]]


def test_a_step_is_settled_once_it_runs_as_every_later_step_will(monkeypatch):
    """TrainStep.settled, what benchmarks warm up to: eager at once; compiled after its first (compiling) call,
    or at once when the compiler failed and the step fell back to eager."""
    assert TrainStep(DRAW(SMALL), lr=1e-3, grad_clip=None).settled
    compiled = TrainStep(DRAW(SMALL), lr=1e-3, grad_clip=None, mode="compile")
    assert not compiled.settled
    monkeypatch.setattr(compiled, "forward", lambda x: (_ for _ in ()).throw(RuntimeError("no compiler")))
    compiled(torch.zeros(2, 1, 28, 28), lr=1e-3)  # the compile fails: eager from here on
    assert compiled.mode == "eager" and compiled.settled


@pytest.mark.parametrize("fixed", [False, True])
def test_training_batches_of_grey_levels_are_binarized_afresh_each_epoch(fixed):
    """Grey-level training images come as Bernoulli draws: in {0, 1}, 0 where the grey level is 0, with the
    grey levels' mean, and a new draw of the same images every epoch (--fixed-binarization: one draw, kept)."""
    from draw.data import load_dataset
    from draw.train import BatchSampler

    data = load_dataset("synthetic", shape=(1, 28, 28))
    grey = data.train
    sampler = BatchSampler(data, train_config(batch_size=len(grey), fixed_binarization=fixed), torch.device("cpu"))
    draws = []
    for epoch in (0, 1):  # one step an epoch: every image, in that epoch's order
        x = sampler.batch(epoch)
        draws.append(x[torch.argsort(sampler._perm)])  # back in the data set's order
    for x in draws:
        assert set(x.unique().tolist()) <= {0.0, 1.0} and not x[grey == 0].any()
        assert x.mean().item() == pytest.approx(grey.mean().item(), abs=0.01)
    assert torch.equal(draws[0], draws[1]) == fixed
    if fixed:  # one draw by the CPU generator, seeded seed + 1, whatever the device (test_..._on_any_device)
        assert torch.equal(sampler.train, torch.bernoulli(grey, generator=torch.Generator().manual_seed(3 + 1)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_fixed_binarization_is_the_same_on_any_device():
    """--fixed-binarization's one draw is the CPU generator's on a GPU too: a run checkpointed on one device and
    resumed on another goes on training on the same fixed set."""
    from draw.data import load_dataset
    from draw.train import BatchSampler

    data = load_dataset("synthetic", shape=(1, 28, 28))
    config = train_config(fixed_binarization=True)
    on_cpu = BatchSampler(data, config, torch.device("cpu")).train
    assert torch.equal(BatchSampler(data, config, torch.device("cuda")).train.cpu(), on_cpu)


def test_step_modes_resolve_and_refuse():
    assert resolve_step_mode("auto", torch.device("cpu")) == "eager"
    assert resolve_step_mode("auto", torch.device("cuda")) == "cuda-graph"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_step_mode("cuda-graph", torch.device("cpu"))
    with pytest.raises(ValueError, match="step mode must be one of"):
        resolve_step_mode("fast", torch.device("cpu"))


def test_optimizer_state_loads_into_any_mode():
    """The checkpointed Adam state has a float lr and capturable off, whatever the mode that wrote it."""
    model = DRAW(SMALL)
    step = TrainStep(model, lr=1e-3, grad_clip=1.0)
    step(torch.zeros(2, 1, 28, 28), lr=5e-4)
    state = step.optimizer_state()
    assert all(isinstance(g["lr"], float) and g["capturable"] is False for g in state["param_groups"])
    other = TrainStep(DRAW(SMALL), lr=1e-3, grad_clip=1.0)
    other.load_optimizer_state(state)
    assert other.optimizer.param_groups[0]["lr"] == 5e-4


def test_the_fused_adam_gives_the_same_steps_and_its_state_loads_either_way():
    """TrainStep's fused Adam (its choice on CUDA) updates as torch's default Adam does, to float rounding, and
    its checkpointed state resumes a step of either form (a GPU run resumed on a CPU, and back) alike."""
    x = torch.bernoulli(torch.full((8, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    models = [DRAW(SMALL) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    steps = [TrainStep(model, lr=1e-2, grad_clip=1.0, fused=fused) for model, fused in zip(models, (True, False))]
    assert steps[0].optimizer.param_groups[0]["fused"] and not steps[1].optimizer.param_groups[0]["fused"]

    def run(indices):
        for i in indices:
            stats = []
            for step in steps:
                torch.manual_seed(i)
                stats.append(step(x, lr=1e-2 / (i + 1)))
            torch.testing.assert_close(stats[0], stats[1], rtol=1e-5, atol=1e-5)
        for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)

    run(range(3))
    state = [step.optimizer_state() for step in steps]
    assert all(g["fused"] is None for s in state for g in s["param_groups"])
    for step, other in zip(steps, reversed(state)):  # each takes the other's state, and keeps its own form
        step.load_optimizer_state(other)
    assert steps[0].optimizer.param_groups[0]["fused"] and not steps[1].optimizer.param_groups[0]["fused"]
    run(range(3, 5))


def test_without_a_clip_the_step_is_plain_adam_and_still_records_the_norm():
    """grad_clip None (--grad-clip 0): Adam on the gradient as it is; the norm recorded, the step never 'clipped'."""
    x = torch.bernoulli(torch.full((8, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    a, b = DRAW(SMALL), DRAW(SMALL)
    b.load_state_dict(a.state_dict())
    step = TrainStep(a, lr=1e-2, grad_clip=None)
    optimizer = torch.optim.Adam(b.parameters(), lr=1e-2)
    for i in range(2):
        torch.manual_seed(i)
        stats = step(x, lr=1e-2)
        torch.manual_seed(i)
        optimizer.zero_grad()
        b(x).loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in b.parameters()]))
        optimizer.step()
        assert norm > 1.0 and stats[4] == 0.0  # a clip of 1 would have acted
        torch.testing.assert_close(stats[3], norm)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_the_grad_clip_flag_sets_the_runs_clip(tmp_path, capsys):
    """--grad-clip NORM is the run's clip, 0 none; a resume keeps the run's and refuses another."""
    for flag, clip in (("2.5", 2.5), ("0", None)):
        run = tmp_path / f"clip-{flag}"
        assert main(["train", "--dataset", "synthetic", "--steps", "2", "--batch-size", "8", "--out", str(run),
                     "--no-progress", "--step", "eager", "--grad-clip", flag]) == 0
        assert TrainConfig.from_dict(load_checkpoint(run)["train_config"]).grad_clip == clip
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--steps", "3", "--grad-clip", "1", "--no-progress"]) == 2
    assert "grad_clip None -> 1.0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="grad_clip must be a finite number > 0"):
        TrainConfig(grad_clip=-1.0)


def test_the_evaluations_score_the_split_asked_for(tmp_path, capsys, caplog):
    """--eval-split valid: every evaluation record, the summary and the last log line score the validation
    split (valid_bound, ...; no test figure), as `draw eval --split valid` scores it; a resume may switch to test."""
    run = tmp_path / "run"
    caplog.set_level("INFO", logger="draw")
    assert main(["train", "--dataset", "synthetic", "--steps", "2", "--batch-size", "8", "--eval-every", "1", "--out",
                 str(run), "--no-progress", "--step", "eager", "--eval-split", "valid"]) == 0
    evaluations = [r for r in read_metrics(run / "metrics.jsonl") if "loss" not in r]
    assert [r["step"] for r in evaluations] == [1, 2]
    assert all(set(r) == {"step", "valid_bound", "valid_bound_stderr", "valid_l_x", "valid_l_z"} for r in evaluations)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["valid_bound_nats"] == evaluations[-1]["valid_bound"] and summary["train_config"]["eval_split"] == "valid"
    assert not any(key.startswith("test_") for key in summary)
    assert f"after 2 steps: valid bound {summary['valid_bound_nats']:.2f} nats" in caplog.text
    capsys.readouterr()
    nats = {}
    for split in ("valid", "test"):
        assert main(["eval", str(run), "--split", split]) == 0
        nats[split] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["nats"]
    assert nats["valid"] == pytest.approx(summary["valid_bound_nats"], rel=1e-5)
    assert nats["test"] != pytest.approx(nats["valid"], rel=1e-3)  # another split: another figure
    assert main(["train", "--resume", "--out", str(run), "--steps", "3", "--eval-split", "test", "--no-progress"]) == 0
    last = read_metrics(run / "metrics.jsonl")[-1]
    assert last["step"] == 3 and set(last) == {"step", "test_bound", "test_bound_stderr", "test_l_x", "test_l_z"}
    assert json.loads((run / "summary.json").read_text())["test_bound_nats"] == last["test_bound"]
    with pytest.raises(ValueError, match="eval_split must be one of"):
        TrainConfig(eval_split="train")


def test_failed_compile_falls_back_to_eager_with_one_line(monkeypatch, caplog):
    model = DRAW(SMALL)
    step = TrainStep(model, lr=1e-3, grad_clip=1.0, mode="compile")

    def broken(*args, **kwargs):
        raise RuntimeError("no C compiler\nsecond line")

    step.forward = broken
    torch.manual_seed(1)
    stats = step(torch.zeros(2, 1, 28, 28), lr=1e-3)
    assert step.mode == "eager" and torch.isfinite(stats).all()
    assert "torch.compile failed (RuntimeError: no C compiler); training eagerly" in caplog.text


def test_compiled_step_gives_the_eager_losses():
    """--step compile computes the same losses as the eager step (up to float rounding)."""
    pytest.importorskip("torch._inductor")
    x = torch.bernoulli(torch.full((4, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    config = replace(SMALL, T=2)
    results = {}
    for mode in ("eager", "compile"):
        torch.manual_seed(0)
        step = TrainStep(DRAW(config), lr=1e-2, grad_clip=10.0, mode=mode)
        results[mode] = torch.stack([step(x, lr=1e-2) for _ in range(3)])
    if step.mode != "compile":
        pytest.skip("torch.compile is not usable on this machine")
    torch.testing.assert_close(results["compile"], results["eager"], rtol=1e-4, atol=1e-3)


def test_lr_schedule_warmup_and_cosine():
    config = train_config(lr=1.0, lr_schedule="cosine", warmup_steps=4)
    assert [lr_at(config, s, 100) for s in range(4)] == pytest.approx([0.25 * c * (s + 1) for s, c in
                                                                       enumerate(0.1 + 0.45 * (1 + math.cos(math.pi * s / 100)) for s in range(4))])
    assert lr_at(config, 100, 100) == pytest.approx(0.1)
    assert lr_at(train_config(lr=0.5), 7, 10) == 0.5


def test_resume_continues_with_identical_losses(tmp_path):
    full = tmp_path / "full"
    train(full, model_config=SMALL, train_config=train_config(), **QUIET)
    split = tmp_path / "split"
    train(split, model_config=SMALL, train_config=train_config(steps=6), **QUIET)
    with pytest.raises(FileExistsError, match="--resume"):
        train(split, model_config=SMALL, train_config=train_config(), **QUIET)  # never overwrite a run
    summary = train(split, resume=True, overrides={"steps": 12}, **QUIET)
    assert summary["steps"] == 12
    assert losses(split) == losses(full) and len(losses(full)) == 12
    a, b = load_checkpoint(full), load_checkpoint(split)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    bounds = [r["test_bound"] for r in read_metrics(full / "metrics.jsonl") if "test_bound" in r]
    assert len(bounds) == 2 and all(math.isfinite(v) for v in bounds)


@pytest.fixture
def interactive_sigint():
    """SIGINT and SIGHUP handled as in an interactive terminal, also when the suite runs as a background
    job or under nohup (which inherit SIGINT or SIGHUP ignored, a disposition the training loop respects)."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def interrupt_at(monkeypatch, at_step: int, signum: int, times: int = 1):
    from draw import train as train_module

    batch = train_module.BatchSampler.batch

    def interrupted_batch(self, step):  # the signal arrives in the middle of step at_step + 1
        if step == at_step:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return batch(self, step)

    monkeypatch.setattr(train_module.BatchSampler, "batch", interrupted_batch)
    return lambda: monkeypatch.setattr(train_module.BatchSampler, "batch", batch)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["INT", "TERM", "HUP"])
def test_a_signal_stops_on_a_step_boundary_and_resumes_exactly(tmp_path, monkeypatch, signum, interactive_sigint):
    from draw.train import TrainingStopped

    full = tmp_path / "full"
    train(full, model_config=SMALL, train_config=train_config(checkpoint_every=100), **QUIET)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    restore = interrupt_at(monkeypatch, 4, signum)
    stopped = tmp_path / "stopped"
    with pytest.raises(TrainingStopped) as info:
        train(stopped, model_config=SMALL, train_config=train_config(checkpoint_every=100), **QUIET)
    assert info.value.signum == signum
    assert load_checkpoint(stopped)["step"] == 5  # the step in flight finished, then the run saved
    restore()
    train(stopped, resume=True, **QUIET)
    assert losses(stopped) == losses(full)
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers that were there come back


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_a_repeated_termination_signal_still_stops_with_a_checkpoint(tmp_path, monkeypatch, signum, interactive_sigint):
    """`timeout` signals the command and then its process group: the same request twice, which must
    not cut the checkpoint short."""
    from draw.train import TrainingStopped

    interrupt_at(monkeypatch, 4, signum, times=2)
    with pytest.raises(TrainingStopped) as info:
        train(tmp_path, model_config=SMALL, train_config=train_config(checkpoint_every=100), **QUIET)
    assert info.value.signum == signum and load_checkpoint(tmp_path)["step"] == 5


def test_ctrl_c_twice_interrupts_at_once(tmp_path, monkeypatch, interactive_sigint):
    """The second SIGINT is a person who will not wait: no checkpoint of the step in flight."""
    interrupt_at(monkeypatch, 4, signal.SIGINT, times=2)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, model_config=SMALL, train_config=train_config(checkpoint_every=100), **QUIET)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_time_limit_stops_with_a_checkpoint_and_resumes_exactly(tmp_path):
    """A deadline already past stops the run after its first step, checkpointed; --resume finishes it as if
    it had never stopped."""
    from draw.train import TIME_LIMIT, TrainingStopped

    full = tmp_path / "full"
    train(full, model_config=SMALL, train_config=train_config(checkpoint_every=100), **QUIET)
    stopped = tmp_path / "stopped"
    with pytest.raises(TrainingStopped) as info:
        train(stopped, model_config=SMALL, train_config=train_config(checkpoint_every=100), deadline=time.monotonic(),
              **QUIET)
    assert info.value.signum == TIME_LIMIT and str(info.value) == "time limit"
    assert load_checkpoint(stopped)["step"] == 1
    train(stopped, resume=True, **QUIET)
    assert losses(stopped) == losses(full)


def test_the_time_limit_flag_exits_75_and_resume_goes_on(tmp_path, capsys):
    out = str(tmp_path / "run")
    flags = ["train", "--dataset", "synthetic", "--batch-size", "8", "--no-progress", "--step", "eager", "--out", out]
    assert main(flags + ["--steps", "6", "--time-limit", "1e-6"]) == 75
    assert load_checkpoint(out)["step"] == 1
    assert main(flags + ["--resume", "--time-limit", "60"]) == 0
    assert load_checkpoint(out)["step"] == 6


def full_and_stopped_between_two_records(tmp_path, monkeypatch):
    """A 10-step run logging every 4 steps, and the same run stopped by a SIGINT after step 6."""
    from draw.train import TrainingStopped

    config = train_config(steps=10, log_every=4, eval_every=100, checkpoint_every=100)
    full = tmp_path / "full"
    train(full, model_config=SMALL, train_config=config, **QUIET)
    restore = interrupt_at(monkeypatch, 5, signal.SIGINT)
    stopped = tmp_path / "stopped"
    with pytest.raises(TrainingStopped):
        train(stopped, model_config=SMALL, train_config=config, **QUIET)
    restore()
    assert load_checkpoint(stopped)["step"] == 6
    return full, stopped


def test_a_stop_between_two_records_logs_the_same_losses(tmp_path, monkeypatch, interactive_sigint):
    """The running loss sums travel in the checkpoint: a stop between two training records changes
    none of the logged losses (seen with the default interval: the sums restarted at zero)."""
    full, stopped = full_and_stopped_between_two_records(tmp_path, monkeypatch)
    train(stopped, resume=True, **QUIET)
    assert [record[0] for record in losses(full)] == [4, 8, 10]
    assert losses(stopped) == losses(full)


def test_a_stopped_run_resumed_to_end_at_its_checkpoint_writes_its_last_record_and_length(tmp_path, monkeypatch,
                                                                                           interactive_sigint, caplog):
    """--resume --steps 6 on a run stopped at step 6 (between two training records): the interval's record is
    written (the steps it ran in the first process: no images/s), and the checkpoint keeps the new length, so
    that a later plain --resume adds nothing (and only that one says the run was already trained)."""
    _, stopped = full_and_stopped_between_two_records(tmp_path, monkeypatch)
    with caplog.at_level("INFO", logger="draw"):
        summary = train(stopped, resume=True, overrides={"steps": 6}, **QUIET)
    assert "already trained" not in caplog.text
    assert summary["steps"] == 6
    records = [r for r in read_metrics(stopped / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [4, 6] and records[-1]["images_per_s"] is None
    payload = load_checkpoint(stopped)
    assert payload["step"] == 6 and payload["train_config"]["steps"] == 6 and payload["running"]["count"] == 0
    with caplog.at_level("INFO", logger="draw"):
        assert train(stopped, resume=True, **QUIET)["steps"] == 6
    assert f"{stopped} is already trained to step 6" in caplog.text


def test_a_run_stopped_on_a_record_and_resumed_to_end_there_keeps_that_length(tmp_path, monkeypatch, interactive_sigint):
    """The same on a logging boundary (no unfinished interval): the checkpoint still takes the new length."""
    from draw.train import TrainingStopped

    run = tmp_path / "run"
    restore = interrupt_at(monkeypatch, 3, signal.SIGINT)
    with pytest.raises(TrainingStopped):
        train(run, model_config=SMALL, train_config=train_config(steps=10, log_every=4, eval_every=100), **QUIET)
    restore()
    assert load_checkpoint(run)["step"] == 4 and load_checkpoint(run)["running"]["count"] == 0
    assert train(run, resume=True, overrides={"steps": 4}, **QUIET)["steps"] == 4
    assert load_checkpoint(run)["train_config"]["steps"] == 4
    assert train(run, resume=True, **QUIET)["steps"] == 4
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [4]


def test_training_records_hold_the_gradient_norm_before_clipping(tmp_path):
    """grad_norm is the interval's mean global gradient norm before the clip; clipped the fraction of
    its steps that the clip scaled down: a clip no gradient reaches clips none, a tiny one clips all."""
    records = {}
    for clip in (1e9, 1e-6):
        run = tmp_path / f"clip{clip:g}"
        train(run, model_config=SMALL, train_config=train_config(steps=4, log_every=1, grad_clip=clip), **QUIET)
        records[clip] = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert all(r["grad_norm"] > 0 and r["clipped"] == 0.0 for r in records[1e9])
    assert all(r["grad_norm"] > 0 and r["clipped"] == 1.0 for r in records[1e-6])
    # the first step's gradient is the same whatever the clip (the same weights): its norm before the clip
    # is the same too, and far above the tiny clip's 1e-6
    first = records[1e9][0]["grad_norm"], records[1e-6][0]["grad_norm"]
    assert first[0] == pytest.approx(first[1], rel=1e-6) and first[1] > 1e-3


def test_a_checkpoint_without_gradient_sums_resumes(tmp_path, monkeypatch, interactive_sigint):
    """A checkpoint written before the gradient statistics existed holds the model's running sums only:
    it resumes with the same losses, and the gradient's sums start from zero."""
    full, stopped = full_and_stopped_between_two_records(tmp_path, monkeypatch)
    payload = torch.load(stopped / "checkpoint.pt", weights_only=False)
    payload["running"]["sums"] = payload["running"]["sums"][:3]  # loss, L_x, L_z
    torch.save(payload, stopped / "checkpoint.pt")
    train(stopped, resume=True, **QUIET)
    assert [r[:2] for r in losses(stopped)] == [r[:2] for r in losses(full)]
    assert losses(stopped)[1][2] < losses(full)[1][2]  # the interval of the stop: 2 of 4 gradient norms known


def test_an_ignored_sigint_stays_ignored(tmp_path):
    """A run started with SIGINT ignored (nohup, a background job) is not stopped by a Ctrl-C."""
    script = (
        "import os, signal, sys\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "from draw import train as t\n"
        "batch = t.BatchSampler.batch\n"
        "def b(self, step):\n"
        "    if step == 2: os.kill(os.getpid(), signal.SIGINT)\n"
        "    return batch(self, step)\n"
        "t.BatchSampler.batch = b\n"
        f"sys.exit(__import__('draw.cli').cli.main(['train', '--dataset', 'synthetic', '--steps', '5', '--batch-size', '8', '--step', 'eager',"
        f" '--out', {str(tmp_path / 'run')!r}, '--no-progress']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(tmp_path / "run")["step"] == 5


def test_cli_end_to_end_on_synthetic_data(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--steps", "4", "--batch-size", "16", "--out", str(run), "--no-progress",
                 "--step", "eager"]) == 0
    for name in ["checkpoint.pt", "metrics.jsonl", "summary.json", "samples.png", "generation.gif", "generation.png",
                 "reconstruction.gif", "loss_curve.png", "samples_neighbours.png"]:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    capsys.readouterr()
    assert main(["eval", str(run / "checkpoint.pt"), "--importance-samples", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["dataset"] == "synthetic" and result["importance_samples"] == 3 and result["step"] == 4
    assert math.isfinite(result["nats"])
    assert result["bits_per_dim"] == pytest.approx(result["nats"] / (28 * 28 * math.log(2)))
    assert main(["sample", str(run), "--n", "5", "--out", str(tmp_path / "s"), "--neighbours"]) == 0
    for name in ("samples.png", "generation.gif", "samples_neighbours.png"):
        assert (tmp_path / "s" / name).is_file(), name
    before = (run / "checkpoint.pt").read_bytes()
    assert main(["train", "--dataset", "synthetic", "--steps", "2", "--out", str(run), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == before  # a second train is refused, the run untouched


def test_off_a_terminal_training_logs_plain_lines(tmp_path):
    """Without a terminal: one plain line per logging interval, no carriage-return redraws."""
    result = subprocess.run(
        [sys.executable, "-m", "draw", "train", "--dataset", "synthetic", "--steps", "6", "--batch-size", "8", "--step", "eager",
         "--log-every", "3", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("step ") and "images/s" in line]
    assert [line.split()[1] for line in lines] == ["3/6", "6/6"]
    assert all("loss" in line and "L_x" in line and "L_z" in line and "grad norm" in line and "clipped" in line for line in lines)


def test_tensorboard_logging(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tmp_path / "run", model_config=SMALL, train_config=train_config(steps=4, eval_every=4), tensorboard=tmp_path / "tb", **QUIET)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/loss", "train/l_x", "train/l_z", "train/grad_norm", "train/clipped", "test/bound"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_a_resumed_run_purges_tensorboard_events_past_its_checkpoint(tmp_path, monkeypatch):
    """Events a crashed process wrote after its last checkpoint are dropped on resume (SummaryWriter's
    purge_step), as metrics.jsonl's lines past it are."""
    from draw import train as train_module

    opened = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            opened.append(purge_step)

        def add_scalar(self, *args):
            pass

        def close(self):
            pass

    monkeypatch.setattr(train_module, "_summary_writer_class", lambda: Writer)
    out = tmp_path / "run"
    train(out, model_config=SMALL, train_config=train_config(steps=2), tensorboard=tmp_path / "tb", **QUIET)
    train(out, resume=True, overrides={"steps": 3}, tensorboard=tmp_path / "tb", **QUIET)
    assert opened == [None, 3]


def test_cli_refuses_triton_on_cpu_before_writing(tmp_path, capsys, monkeypatch):
    from draw import kernels

    monkeypatch.setattr(kernels, "_triton_interpreter", lambda: False)
    out = tmp_path / "run"
    assert main(["train", "--backend", "triton", "--dataset", "synthetic", "--steps", "1", "--out", str(out)]) == 2
    assert "needs CUDA tensors" in capsys.readouterr().err
    assert not out.exists()


def test_a_version_1_checkpoint_trained_with_triton_evaluates_and_resumes_on_cpu(tmp_path, capsys):
    """Version 1 stored backend="triton" in the model config and the run settings under "settings":
    the backend is a runtime choice now, so such a checkpoint evaluates and resumes on a plain CPU."""
    run = tmp_path / "run"
    train(run, model_config=SMALL, train_config=train_config(steps=2), **QUIET)
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    payload["version"] = 1
    payload["model_config"]["backend"] = "triton"
    settings = payload.pop("train_config")
    settings["total_steps"] = settings.pop("steps")
    payload["settings"] = {**settings, "compile": False}
    torch.save(payload, run / "checkpoint.pt")
    assert main(["eval", str(run), "--backend", "reference"]) == 0
    assert main(["train", "--resume", "--out", str(run), "--steps", "3", "--backend", "reference", "--no-progress"]) == 0
    assert load_checkpoint(run)["step"] == 3


def test_the_step_mode_is_the_presets_and_a_resume_keeps_the_one_that_ran(tmp_path, monkeypatch):
    """mnist-quick asks for the compiled step; --step overrides; --resume keeps the checkpoint's mode."""
    from draw import train as train_module

    asked = []

    class Recording(TrainStep):
        def __init__(self, *args, mode, **kwargs):
            asked.append(mode)
            super().__init__(*args, mode="eager", **kwargs)  # record the choice, run eagerly (no compile here)

    monkeypatch.setattr(train_module, "TrainStep", Recording)
    run = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", "--batch-size", "8", "--no-progress", "--out", str(run)]
    assert main(args + ["--steps", "2"]) == 0
    assert main(args + ["--steps", "3", "--resume"]) == 0
    assert main(args + ["--steps", "4", "--resume", "--step", "auto"]) == 0
    assert asked == ["compile", "eager", "auto"]
    assert load_checkpoint(run)["step_mode"] == "eager"


def test_cli_version_presets_and_python_m(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("draw ")
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) >= 5 and lines[0].startswith("mnist-quick (default): 1x28x28") and "data mnist" in lines[0]
    result = subprocess.run([sys.executable, "-m", "draw", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "train" in result.stdout


def test_help_does_not_import_torch():
    code = "import sys\nfrom draw.cli import build_parser\nbuild_parser()\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_threads_are_set_before_torch_is_imported(tmp_path):
    code = ("import os, sys\nfrom draw.cli import _set_threads\n_set_threads(1)\nimport torch\n"
            "print(os.environ['OMP_NUM_THREADS'], torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.stdout.split() == ["1", "1"], result.stderr


@pytest.mark.parametrize("argv, message", [
    (["train", "--device", "gpu"], "must be cpu, cuda or cuda:N"),
    (["train", "--lr", "inf"], "must be a finite number > 0"),
    (["train", "--grad-clip", "-1"], "must be a finite number"),
    (["train", "--epochs", "inf"], "must be a finite number > 0"),
    (["train", "--seed", "1e20"], "must be a whole number"),
    (["train", "--seed", str(2**40)], "must be from 0 to"),
    (["train", "--warmup-steps", "-2"], "argument --warmup-steps: must be >= 0, got -2"),
    (["train", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["train", "--ema", "1"], "argument --ema: must be a number strictly between 0 and 1, got 1"),
    (["train", "--ema", "0"], "argument --ema: must be a number strictly between 0 and 1, got 0"),
    (["train", "--ema", "nan"], "argument --ema: must be a number strictly between 0 and 1, got nan"),
])
def test_cli_refuses_bad_numbers_before_anything(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --- the moving average of the weights (--ema) -------------------------------------------------------


def test_the_weight_average_is_the_debiased_moving_average_of_every_steps_weights():
    """After n steps the average is sum_k (1 - d) d^(n-k) p_k / (1 - d^n) over the weights p_k after each step
    (float64 from snapshots): the weights themselves after one step, never pulled towards its zero start."""
    x = torch.bernoulli(torch.full((8, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = DRAW(SMALL)
    decay = 0.8
    step = TrainStep(model, lr=1e-2, grad_clip=1.0, average=decay)
    snapshots = []
    for i in range(4):
        torch.manual_seed(i)
        step(x, lr=1e-2)
        snapshots.append({name: p.detach().double().clone() for name, p in model.named_parameters()})
        n = i + 1
        average = step.average.weights()
        assert step.average.updates == n
        for name in snapshots[0]:
            expected = sum((1 - decay) * decay ** (n - k) * s[name] for k, s in enumerate(snapshots, 1)) / (1 - decay**n)
            torch.testing.assert_close(average[name].double(), expected, rtol=1e-5, atol=1e-7)
        if n == 1:
            for name, p in model.named_parameters():
                torch.testing.assert_close(average[name], p.detach(), rtol=1e-6, atol=0)
    moved = max(float((average[name] - p.detach()).abs().max()) for name, p in model.named_parameters())
    assert moved > 1e-4  # the average is not the last weights


def test_without_ema_the_step_keeps_no_average():
    step = TrainStep(DRAW(SMALL), lr=1e-3, grad_clip=None)
    assert step.average is None
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        TrainStep(DRAW(SMALL), lr=1e-3, grad_clip=None, average=1.0)
    with pytest.raises(ValueError, match="TrainConfig.ema must be a number strictly between 0 and 1"):
        train_config(ema=0.0)


def test_an_ema_run_evaluates_both_weights_and_resumes_its_average_exactly(tmp_path, capsys):
    """--ema: every evaluation scores the average (test_bound) and the trained weights (test_bound_trained), on
    the same noise; the checkpoint holds the average's sum and count, which a resumed run continues bit for bit;
    `draw eval` scores the average unless --weights trained; a resume may not change the decay."""
    config = train_config(ema=0.7, eval_every=4)  # the resumed part evaluates before it trains on (step 8)
    full = tmp_path / "full"
    summary = train(full, model_config=SMALL, train_config=config, **QUIET)
    split = tmp_path / "split"
    train(split, model_config=SMALL, train_config=replace(config, steps=6), **QUIET)
    with pytest.raises(ValueError, match="ema 0.7 -> 0.9"):
        train(split, resume=True, overrides={"steps": 12, "ema": 0.9}, **QUIET)
    train(split, resume=True, overrides={"steps": 12}, **QUIET)
    assert losses(split) == losses(full)
    a, b = load_checkpoint(full), load_checkpoint(split)
    assert a["average"]["updates"] == b["average"]["updates"] == 12 and a["average"]["decay"] == 0.7
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
        assert torch.equal(a["average"]["sums"][name], b["average"]["sums"][name]), name
    records = [r for r in read_metrics(full / "metrics.jsonl") if "test_bound" in r]
    assert [r["step"] for r in records] == [4, 8, 12]
    split_records = [r for r in read_metrics(split / "metrics.jsonl") if "test_bound" in r]
    assert [r["step"] for r in split_records] == [4, 6, 8, 12]  # 6: the end of its first part
    assert records == [r for r in split_records if r["step"] != 6]
    last = records[-1]
    assert last["test_bound"] != last["test_bound_trained"]
    assert summary["weights"] == "average" and summary["test_bound_nats"] == last["test_bound"]
    assert summary["test_bound_trained_nats"] == last["test_bound_trained"]
    for weights, key in (("average", "test_bound"), ("trained", "test_bound_trained")):
        capsys.readouterr()
        assert main(["eval", str(full), "--weights", weights, "--batch-size", "64", "--seed", "3"]) == 0  # the run's noise
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["weights"] == weights
        assert result["nats"] == pytest.approx(last[key], rel=1e-5), weights


def test_ema_changes_nothing_the_run_trains(tmp_path):
    """The average is a bystander: a run with --ema has the losses and trained weights of the same run without
    it, bit for bit, evaluations between steps included (the averaged copy's construction draws no noise)."""
    plain, averaged = tmp_path / "plain", tmp_path / "averaged"
    train(plain, model_config=SMALL, train_config=train_config(eval_every=4), **QUIET)
    train(averaged, model_config=SMALL, train_config=train_config(eval_every=4, ema=0.9), **QUIET)
    assert losses(averaged) == losses(plain)
    a, b = load_checkpoint(averaged), load_checkpoint(plain)
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in b["model"])
    bounds = [r["test_bound"] for r in read_metrics(plain / "metrics.jsonl") if "test_bound" in r]
    assert bounds == [r["test_bound_trained"] for r in read_metrics(averaged / "metrics.jsonl") if "test_bound" in r]


@pytest.mark.parametrize("damage", ["a parameter missing", "a wrong shape", "no count"])
def test_a_damaged_weight_average_is_refused_in_one_line(tmp_path, damage):
    from draw.checkpoint import CheckpointError, model_from_checkpoint

    run = tmp_path / "run"
    train(run, model_config=SMALL, train_config=train_config(steps=2, eval_every=2, ema=0.9), **QUIET)
    payload = load_checkpoint(run)
    model_from_checkpoint(payload)  # whole, it loads
    sums = payload["average"]["sums"]
    name = next(iter(sums))
    if damage == "a parameter missing":
        del sums[name]
    elif damage == "a wrong shape":
        sums[name] = torch.zeros(*sums[name].shape, 2)
    else:
        del payload["average"]["updates"]
    with pytest.raises(CheckpointError, match="weight average"):
        model_from_checkpoint(payload)
    model_from_checkpoint(payload, weights="trained")  # the trained weights are still there


def test_eval_of_a_run_without_ema_uses_its_trained_weights(tmp_path, capsys):
    run = tmp_path / "run"
    summary = train(run, model_config=SMALL, train_config=train_config(steps=3, eval_every=3), **QUIET)
    assert summary["weights"] == "trained" and "test_bound_trained_nats" not in summary
    assert "average" not in load_checkpoint(run)
    capsys.readouterr()
    assert main(["eval", str(run), "--batch-size", "64"]) == 0  # by default with the run's seed (3), as its own
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["weights"] == "trained" and result["nats"] == pytest.approx(summary["test_bound_nats"], rel=1e-5)
    assert main(["eval", str(run), "--batch-size", "64", "--seed", "4"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["nats"] != result["nats"]


def test_eval_calls_bits_per_dim_by_their_name_only_for_binary_pixels(tmp_path, capsys, monkeypatch):
    """Binary test images: "bits/dim". Grey levels as Bernoulli targets (colour data): the same number, named as a
    cross-entropy per pixel value, not 8-bit bits/dim; the JSON says which (binary_pixels)."""
    from draw import data

    run = tmp_path / "run"
    train(run, model_config=SMALL, train_config=train_config(steps=1, eval_every=1), **QUIET)
    capsys.readouterr()
    lines = {}
    for binary in (True, False):
        loaded = data.load_dataset("synthetic")
        monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: replace(loaded, binarize=binary))
        assert main(["eval", str(run), "--batch-size", "64"]) == 0
        human, last = capsys.readouterr().out.strip().splitlines()[-2:]
        lines[binary] = (human, json.loads(last))
    (binary_line, binary_json), (grey_line, grey_json) = lines[True], lines[False]
    assert f"{binary_json['bits_per_dim']:.4f} bits/dim (variational bound" in binary_line and binary_json["binary_pixels"] is True
    assert f"{grey_json['bits_per_dim']:.4f} bits per pixel value (Bernoulli cross-entropy of grey levels, not 8-bit bits/dim)" in grey_line
    assert grey_json["binary_pixels"] is False and "bits/dim (variational" not in grey_line


def test_a_refused_run_removes_the_directories_it_made(tmp_path, capsys):
    """--out a/b/run where a does not exist, refused after the lock was taken (a batch larger than the data
    set): nothing is left, a/ and a/b/ included; a parent that was there stays."""
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "a" / "b" / "run", tmp_path / "kept" / "run"):
        assert main(["train", "--dataset", "synthetic", "--batch-size", "100000", "--steps", "1", "--out", str(out)]) == 2
        assert "is larger than the training set" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_eval_and_sample_take_the_runs_dataset_and_seed_unless_given():
    """--dataset / --seed as given, else the checkpoint's run's; a checkpoint with no run (save_checkpoint of a
    model alone): MNIST for DRAW, cluttered MNIST for the classifier, seed 0."""
    from types import SimpleNamespace

    from draw.classifier import DRAM
    from draw.cli import _run_setting
    from draw.config import ClassifierConfig

    draw_model, classifier = DRAW(SMALL), DRAM(ClassifierConfig(glimpses=2, lstm_size=8, read_n=3))
    bare, run = {}, {"train_config": {"dataset": "synthetic", "seed": 7}}
    unset, given = SimpleNamespace(dataset=None, seed=None), SimpleNamespace(dataset="mnist-two-digit", seed=2)
    assert [_run_setting(unset, bare, m, "dataset") for m in (draw_model, classifier)] == ["mnist", "mnist-cluttered"]
    assert _run_setting(unset, bare, draw_model, "seed") == 0
    assert (_run_setting(unset, run, classifier, "dataset"), _run_setting(unset, run, classifier, "seed")) == ("synthetic", 7)
    assert (_run_setting(given, run, draw_model, "dataset"), _run_setting(given, run, draw_model, "seed")) == ("mnist-two-digit", 2)


def test_samples_do_not_depend_on_how_many_are_drawn(tmp_path):
    """Sample i's prior noise comes from its own generator (seed, i): the 16 samples of the animations are the
    same with --n 16 and --n 40, and a different seed draws others."""
    from draw.figures import write_model_figures

    torch.manual_seed(0)
    model = DRAW(SMALL)
    for name, n, seed in (("a", 16, 5), ("b", 40, 5), ("c", 16, 6)):
        write_model_figures(model, tmp_path / name, n_samples=n, seed=seed)
    gif = {name: (tmp_path / name / "generation.gif").read_bytes() for name in "abc"}
    assert gif["a"] == gif["b"] and gif["a"] != gif["c"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_graph_step_gives_the_eager_steps_losses_weights_and_average():
    """The whole step captured as one CUDA graph (3 eager warm-up steps, the capture, replays) against the
    eager step on the same batches and latent noise: losses, weights and the moving average of the weights
    agree up to float rounding (the graph's Adam is capturable, the eager one is not: the same update)."""
    device = torch.device("cuda")
    batches = [torch.bernoulli(torch.full((16, 1, 28, 28), 0.3, device=device),
                               generator=torch.Generator(device=device).manual_seed(i)) for i in range(7)]
    results = {}
    for mode in ("eager", "cuda-graph"):
        torch.manual_seed(0)
        model = DRAW(SMALL).to(device)
        step = TrainStep(model, lr=1e-2, grad_clip=10.0, mode=mode, device=device, average=0.8, fused=True)
        torch.cuda.manual_seed(1)
        step_losses = [float(step(x, 1e-2 / (i + 1))[0]) for i, x in enumerate(batches)]
        assert (step._graph is not None) == (mode == "cuda-graph")
        results[mode] = step_losses, [p.detach().clone() for p in model.parameters()], step.average.weights()
    eager, graphed = results["eager"], results["cuda-graph"]
    assert graphed[0] == pytest.approx(eager[0], rel=1e-5)
    for a, b in zip(graphed[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for name in eager[2]:
        torch.testing.assert_close(graphed[2][name], eager[2][name], rtol=1e-4, atol=1e-5)
