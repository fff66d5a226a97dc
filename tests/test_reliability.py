"""Nothing lost, nothing wrong without a word: divergence, a second process, a full disk, damaged files,
resume flags, and errors in one line. Faults are injected in-process or with small files."""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
import types
import zipfile

import pytest
import torch

from draw import DRAW, DRAWConfig, TrainConfig
from draw.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from draw.cli import main
from draw.evaluate import evaluate_bound
from draw.rundir import MetricsError, RunLock, read_metrics
from draw.train import train

SMALL = DRAWConfig(height=28, width=28, channels=1, T=3, enc_size=16, dec_size=16, z_size=4, read_n=2, write_n=3)
QUIET = dict(progress=False, make_figures=False)
TRAIN = ["train", "--dataset", "synthetic", "--batch-size", "8", "--no-progress", "--step", "eager"]


def small_config(**changes) -> TrainConfig:
    base = dict(dataset="synthetic", batch_size=8, lr=2e-3, steps=6, eval_every=100, log_every=2, checkpoint_every=3, seed=1)
    return TrainConfig(**{**base, **changes})


def run_dir(tmp_path, **changes):
    out = tmp_path / "run"
    train(out, model_config=SMALL, train_config=small_config(**changes), **QUIET)
    return out


# --- 1. divergence -------------------------------------------------------------------------------


def test_a_diverging_run_keeps_its_last_good_checkpoint_and_stops_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(TRAIN + ["--steps", "60", "--lr", "1e9", "--checkpoint-every", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    [line] = [line for line in err.splitlines() if "error" in line]
    assert "diverged" in line and "--lr" in line
    payload = load_checkpoint(out)  # the last good one (a checkpoint every step): every weight finite
    assert payload["step"] >= 1 and all(torch.isfinite(t).all() for t in payload["model"].values())
    assert f"the last good checkpoint (step {payload['step']}) is kept" in line


def test_a_test_bound_that_is_not_finite_stops_the_run_at_that_evaluation(tmp_path, capsys):
    """Divergence found by an evaluation between two logging intervals stops the run there, in one line,
    and no non-finite figure is written to metrics.jsonl (NaN is not JSON)."""
    out = tmp_path / "run"
    code = main(TRAIN + ["--steps", "5", "--lr", "1e30", "--log-every", "100", "--eval-every", "1",
                         "--checkpoint-every", "100", "--out", str(out)])
    assert code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert "training diverged at step 1 (the test bound became nan)" in line
    assert "NaN" not in (out / "metrics.jsonl").read_text() and "Infinity" not in (out / "metrics.jsonl").read_text()


def test_non_finite_weights_are_never_saved_nor_loaded(tmp_path, capsys):
    model = DRAW(SMALL)
    with torch.no_grad():
        model.to_latent.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="1 model weights are not finite"):
        save_checkpoint(tmp_path / "c.pt", model, step=1)
    assert not (tmp_path / "c.pt").exists()
    payload = {"format": "draw-checkpoint", "version": 2, "model_config": SMALL.to_dict(), "model": model.state_dict(), "step": 1}
    torch.save(payload, tmp_path / "nan.pt")
    for command in (["eval", str(tmp_path / "nan.pt")], ["sample", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "s")]):
        assert main(command) == 2
        assert "not finite" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# --- 2. a second process -------------------------------------------------------------------------


def test_a_second_process_is_refused_while_a_run_holds_the_directory(tmp_path, capsys):
    out = run_dir(tmp_path)
    before = (out / "checkpoint.pt").read_bytes()
    with RunLock(out):  # as if another process were training there
        assert main(TRAIN + ["--resume", "--steps", "9", "--out", str(out)]) == 2
        assert f"in use by another draw process (pid {os.getpid()})" in capsys.readouterr().err
        assert main(TRAIN + ["--steps", "3", "--out", str(tmp_path / "run")]) == 2
        assert "training" not in capsys.readouterr().out  # a refused run does not say it is training
    assert main(TRAIN + ["--steps", "3", "--out", str(out)]) == 2  # nor one refused for the run already there
    assert "training" not in capsys.readouterr().out
    assert (out / "checkpoint.pt").read_bytes() == before
    assert main(TRAIN + ["--resume", "--steps", "9", "--out", str(out)]) == 0  # released: the lock of a gone holder is no obstacle


def test_the_lock_of_a_dead_process_is_not_in_the_way(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("999999\n")  # left by a killed run: no process holds the flock
    train(out, model_config=SMALL, train_config=small_config(steps=2), **QUIET)
    assert load_checkpoint(out)["step"] == 2


# --- 3. a full disk --------------------------------------------------------------------------------


def test_a_cut_last_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    out = run_dir(tmp_path, steps=4)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 12')  # the disk filled in the middle of a record
    train(out, resume=True, overrides={"steps": 6}, **QUIET)
    assert "dropped an unreadable last line" in caplog.text and "metrics.jsonl" in caplog.text
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [2, 4, 6]


def test_a_bad_metrics_line_in_the_middle_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(MetricsError, match=r"metrics.jsonl, line 2"):
        read_metrics(path)


def test_a_full_disk_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from draw import checkpoint

    def full(path, write, durable=True):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint, "atomic_write", full)
    assert main(TRAIN + ["--steps", "2", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("draw train: error: No space left on device: ") and "checkpoint.pt" in err[-1]


def test_a_disk_that_fills_while_a_checkpoint_is_written_is_one_line_and_exit_2(tmp_path):
    """A real write failure (a file-size limit, as a full disk fails a write): one line naming the checkpoint,
    exit 2, and no temporary file left (torch's own writer would have turned the OSError into a RuntimeError)."""
    import resource

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))  # metrics fit, the checkpoint does not

    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "draw", *TRAIN, "--steps", "2", "--out", str(out)], preexec_fn=limited,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"draw train: error: File too large: {out / 'checkpoint.pt'}"
    assert sorted(p.name for p in out.iterdir()) == [".lock", "metrics.jsonl"]


@pytest.mark.parametrize("durable", [True, False])
def test_a_durable_write_flushes_the_file_and_then_its_directory(tmp_path, monkeypatch, durable):
    """durable: the file's content before the rename, then the directory that now names it (the rename)."""
    import stat

    from draw import atomic

    flushed = []
    fsync = os.fsync

    def recording(fd):
        flushed.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", recording)
    path = atomic.atomic_write_text(tmp_path / "summary.json", "{}", durable=durable)
    assert path.read_text() == "{}" and flushed == (["file", "directory"] if durable else [])


def test_the_metrics_reach_the_disk_before_the_checkpoint_that_counts_them(tmp_path, monkeypatch):
    """metrics.jsonl is flushed to disk before each checkpoint is written: after a power cut a checkpoint never
    survives without the records up to its step."""
    from draw import atomic, rundir

    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        fsync(fd)

    def recording_replace(source, target):
        events.append(("rename", os.path.basename(target)))
        replace(source, target)

    monkeypatch.setattr(rundir.os, "fsync", recording_fsync)
    monkeypatch.setattr(atomic.os, "replace", recording_replace)
    run_dir(tmp_path, steps=4, log_every=1, checkpoint_every=2)
    checkpoints = [i for i, event in enumerate(events) if event == ("rename", "checkpoint.pt")]
    assert len(checkpoints) == 2
    for previous, at in zip([-1, *checkpoints], checkpoints):  # a sync since the last checkpoint, before this one
        assert ("fsync", "metrics.jsonl") in events[previous + 1:at]


# --- 4. SIGTERM exits after a checkpoint ----------------------------------------------------------


def test_sigterm_exits_143_after_a_checkpoint(tmp_path, monkeypatch):
    from draw import train as train_module

    batch = train_module.BatchSampler.batch

    def terminated(self, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch(self, step)

    monkeypatch.setattr(train_module.BatchSampler, "batch", terminated)
    assert main(TRAIN + ["--steps", "50", "--checkpoint-every", "100", "--out", str(tmp_path / "run")]) == 143
    assert load_checkpoint(tmp_path / "run")["step"] == 2


def test_timeouts_double_sigterm_still_stops_with_a_checkpoint(tmp_path):
    """What `timeout -s TERM` does at its limit: SIGTERM to the command, then to its process group. The
    run gets the signal twice (here the second 50 ms after the first, in the middle of a step of
    batch 128) and must still finish its step, save and exit 143."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "draw", *TRAIN, "--batch-size", "128", "--steps", "100000", "--log-every", "1",
               "--eval-every", "100000", "--checkpoint-every", "100000", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                           start_new_session=True)
    try:
        lines = []
        for line in run.stdout:  # wait until it is training
            lines.append(line)
            if line.startswith("step 2/"):
                break
        run.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        os.killpg(run.pid, signal.SIGTERM)
        rest, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    output = "".join(lines) + rest
    # 143 = exit(128 + SIGTERM); when the step and the checkpoint take under 50 ms, the second signal can
    # come after the run has saved and restored the default handlers, and end the process itself: the
    # same outcome (a shell or `timeout` reports both as 143), the checkpoint already written
    assert run.returncode in (143, -signal.SIGTERM), output[-2000:]
    step = load_checkpoint(out)["step"]
    assert step >= 2 and f"stopped at step {step} (SIGTERM)" in output


# --- 5. damaged checkpoints ------------------------------------------------------------------------


def flip_a_bit_in_a_weight_record(path):
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        offset = record.header_offset
    data = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(data[offset + 26 : offset + 28], "little"), int.from_bytes(data[offset + 28 : offset + 30], "little")
    start = offset + 30 + name_len + extra_len
    data[start + record.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_weight_is_refused(tmp_path, capsys):
    out = run_dir(tmp_path, steps=2)
    flip_a_bit_in_a_weight_record(out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
        load_checkpoint(out)
    assert main(["eval", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged" in err[0]


# --- 7. resume flags -------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, refused", [
    (["--batch-size", "16"], "batch_size 8 -> 16"),
    (["--lr", "0.5"], "lr"),
    (["--seed", "7"], "seed 1 -> 7"),
    (["--amp", "bf16"], "amp"),
    (["--preset", "mnist-paper"], "architecture"),
])
def test_resume_refuses_flags_that_change_the_arithmetic(tmp_path, capsys, flags, refused):
    out = run_dir(tmp_path, steps=2)
    before = (out / "checkpoint.pt").read_bytes()
    assert main(TRAIN + ["--resume", "--out", str(out)] + flags) == 2
    assert refused in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resume_honours_schedule_flags(tmp_path, caplog):
    out = run_dir(tmp_path, steps=2)
    assert main(TRAIN + ["--resume", "--out", str(out), "--steps", "4", "--checkpoint-every", "1", "--eval-every", "4"]) == 0
    assert "resume: steps 2 -> 4" in caplog.text
    payload = load_checkpoint(out)
    assert payload["step"] == 4 and payload["train_config"]["checkpoint_every"] == 1
    assert main(TRAIN + ["--resume", "--out", str(out), "--batch-size", "8"]) == 0  # the same value is no change


def test_resume_refuses_a_length_that_ends_before_the_checkpoint(tmp_path, capsys):
    out = run_dir(tmp_path, steps=4)
    before = (out / "checkpoint.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    assert main(TRAIN + ["--resume", "--out", str(out), "--steps", "3"]) == 2
    assert "is at step 4; --steps / --epochs would end the run at step 3" in capsys.readouterr().err
    assert ((out / "checkpoint.pt").read_bytes(), (out / "metrics.jsonl").read_text()) == before


def test_resume_with_epochs_continues_a_run_started_with_steps(tmp_path, caplog):
    """--epochs on resume replaces the --steps the run was started with (which would otherwise win)."""
    out = run_dir(tmp_path, steps=2)
    assert main(TRAIN + ["--resume", "--out", str(out), "--epochs", "0.05"]) == 0  # 512 / 8 = 64 steps an epoch
    assert "resume: steps 2 -> None" in caplog.text and "resume: epochs" in caplog.text
    assert load_checkpoint(out)["step"] == 3  # round(0.05 * 64)


def test_a_cosine_run_resumed_longer_says_how_its_learning_rate_moves(tmp_path, caplog):
    out = run_dir(tmp_path, steps=2, lr_schedule="cosine")
    train(out, resume=True, overrides={"steps": 4}, **QUIET)
    assert "the cosine schedule now ends at step 4 instead of 2; the lr at step 2 goes from 0.0002 to 0.0011" in caplog.text


def test_a_cuda_graph_run_resumes_on_a_cpu_with_the_automatic_step(tmp_path, caplog):
    """A run whose checkpoint says its step was a CUDA graph (the default on CUDA) resumes where none can run."""
    out = run_dir(tmp_path, steps=2)
    rewrite(out / "checkpoint.pt", lambda p: p.update(step_mode="cuda-graph"))
    train(out, resume=True, overrides={"steps": 3}, **QUIET)
    assert "the run's cuda-graph step cannot run here" in caplog.text
    payload = load_checkpoint(out)
    assert payload["step"] == 3 and payload["step_mode"] == "eager"


def test_images_per_second_counts_training_time_alone(tmp_path, monkeypatch):
    """The rate of each logged interval: the steps this process ran in it over their time, evaluation left out
    (on a clock that gives every step 1 s and every evaluation 100 s), before and after a resume. As on a
    GPU, a step returns after a quarter of its second, the rest queued until the host waits for the device."""
    from draw import train as train_module

    clock = types.SimpleNamespace(now=0.0, queued=0.0, monotonic=time.monotonic)
    clock.perf_counter = lambda: clock.now
    monkeypatch.setattr(train_module, "time", clock)
    step, evaluate = train_module.TrainStep.__call__, train_module._evaluate

    def timed_step(self, *args, **kwargs):
        clock.now += 0.25
        clock.queued += 0.75
        return step(self, *args, **kwargs)

    def wait_for_device(device):
        clock.now += clock.queued
        clock.queued = 0.0

    monkeypatch.setattr(train_module, "_wait_for_device", wait_for_device)

    def timed_evaluate(*args, **kwargs):
        wait_for_device(None)  # an evaluation's kernels queue behind the steps'
        clock.now += 100.0
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module.TrainStep, "__call__", timed_step)
    monkeypatch.setattr(train_module, "_evaluate", timed_evaluate)
    out = run_dir(tmp_path, steps=5, log_every=2, eval_every=3, checkpoint_every=5)
    train(out, resume=True, overrides={"steps": 8, "log_every": 4}, **QUIET)  # resumed in an interval (step 5 of 8)
    rates = [r["images_per_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "images_per_s" in r]
    assert rates == [8.0] * 4  # at steps 2, 4, 5, then 8 (steps 6-8 in this process); batch 8


def test_a_resume_to_its_checkpoint_that_fails_before_saving_writes_its_record_once(tmp_path, monkeypatch):
    """A run stopped inside a logging interval (its checkpoint holds the interval as not yet logged), resumed
    to end there: the interval's record is written, then the checkpoint. When that save fails, the next
    resume writes the record again, and the first is dropped: one record per step."""
    from draw import checkpoint
    from draw.train import TrainingStopped

    out = tmp_path / "run"
    with pytest.raises(TrainingStopped):  # at the end of step 1, a deadline already past
        train(out, model_config=SMALL, train_config=small_config(steps=6, log_every=4), deadline=time.monotonic(),
              **QUIET)
    assert load_checkpoint(out)["step"] == 1 and load_checkpoint(out)["running"]["count"] == 1
    save = checkpoint.atomic_write

    def full(path, write, durable=True):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint, "atomic_write", full)
    with pytest.raises(OSError, match="No space left"):
        train(out, resume=True, overrides={"steps": 1}, **QUIET)
    monkeypatch.setattr(checkpoint, "atomic_write", save)
    train(out, resume=True, overrides={"steps": 1}, **QUIET)
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == [1]


def test_resuming_a_finished_run_adds_no_evaluation(tmp_path):
    out = run_dir(tmp_path, steps=2, eval_every=2)
    records = (out / "metrics.jsonl").read_text()
    summary = train(out, resume=True, **QUIET)
    assert (out / "metrics.jsonl").read_text() == records
    assert summary["steps"] == 2 and summary["test_bound_nats"] == json.loads(records.splitlines()[-1])["test_bound"]


def test_a_finished_run_extended_and_stopped_early_keeps_no_summary_of_its_old_end(tmp_path):
    from draw.train import TrainingStopped

    out = run_dir(tmp_path, steps=2, eval_every=2)
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    with pytest.raises(TrainingStopped):  # extended to 4 steps, stopped after step 3
        train(out, resume=True, overrides={"steps": 4}, deadline=time.monotonic(), **QUIET)
    assert load_checkpoint(out)["step"] == 3 and not (out / "summary.json").exists()
    summary = train(out, resume=True, overrides={"steps": 4}, **QUIET)
    assert json.loads((out / "summary.json").read_text())["steps"] == summary["steps"] == 4


# --- 8. a batch larger than the data ---------------------------------------------------------------


def test_a_batch_larger_than_the_training_set_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--batch-size", "100000", "--steps", "1", "--out", str(out)]) == 2
    assert "larger than the training set (512 images" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()  # a directory that was there before stays, as empty as it was: no lock file left in it
    assert main(["train", "--dataset", "synthetic", "--batch-size", "100000", "--steps", "1", "--out", str(out)]) == 2
    assert main(["train", "--resume", "--out", str(out)]) == 2  # nothing to resume
    assert out.is_dir() and list(out.iterdir()) == []


# --- 10. the bound does not depend on the batch layout ---------------------------------------------


def test_the_bound_does_not_depend_on_the_batch_size():
    torch.manual_seed(0)
    model = DRAW(SMALL)
    x = torch.bernoulli(torch.full((13, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    for k in (1, 3):
        a = evaluate_bound(model, x, batch_size=12 * k, importance_samples=k)
        b = evaluate_bound(model, x, batch_size=2 * k, importance_samples=k)
        assert a["nats"] == pytest.approx(b["nats"], rel=1e-6)
    assert evaluate_bound(model, x[5:6])["nats"] != evaluate_bound(model, x[6:7])["nats"]


def test_the_bound_is_its_definition_on_each_images_own_noise():
    """K = 1: the mean of L_x + L_z (Eq. 12) with each image's noise (evaluate.image_noise), and L_x, L_z
    apart; K > 1: the mean importance-weighted bound of model.importance_weighted_bound on the same noise."""
    from draw import importance_weighted_bound
    from draw.evaluate import image_noise

    torch.manual_seed(0)
    model = DRAW(SMALL)
    x = torch.bernoulli(torch.full((5, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, noise=image_noise(0, 5, 1, SMALL.T, SMALL.z_size, seed=3))
        result = evaluate_bound(model, x, seed=3)
        assert result["nats"] == pytest.approx((out.l_x + out.l_z).mean().item(), rel=1e-6)
        assert (result["l_x"], result["l_z"]) == (pytest.approx(out.l_x.mean().item(), rel=1e-6),
                                                  pytest.approx(out.l_z.mean().item(), rel=1e-6))
        assert result["bits_per_dim"] == pytest.approx(result["nats"] / (28 * 28 * math.log(2)))
        iwae = importance_weighted_bound(model, x, 4, image_noise(0, 5, 4, SMALL.T, SMALL.z_size, seed=3))
        assert evaluate_bound(model, x, seed=3, importance_samples=4)["nats"] == pytest.approx(iwae.mean().item(), rel=1e-6)
        assert iwae.mean().item() < result["nats"]  # tighter than the variational bound (here, on these draws)


# --- 12. checkpoints from elsewhere ----------------------------------------------------------------


def rewrite(path, change):
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


@pytest.mark.parametrize("change, message", [
    (lambda p: p.pop("optimizer"), "no training state to resume (missing: optimizer)"),
    (lambda p: p.pop("rng"), "missing: rng"),
    (lambda p: p["train_config"].update(future_flag=1), "unknown TrainConfig fields ['future_flag']"),
    (lambda p: p["model_config"].update(T_max=1), "model config is not usable"),
    # files that pass their CRC-32 checks but were written by something else
    (lambda p: p.update(step="2"), "malformed: its 'step' is not an integer >= 0"),
    (lambda p: p["optimizer"].pop("param_groups"), "malformed: its 'optimizer' is not an optimizer's state"),
    (lambda p: p["optimizer"]["param_groups"][0].update(params=[0]), "its optimizer state does not fit the model"),
    (lambda p: p["rng"].update(torch=torch.zeros(3)), "malformed: its 'rng' is not random number generator states"),
    (lambda p: p.update(running={"sums": 3, "count": 1}), "malformed: its 'running' is not running loss sums"),
    (lambda p: p.update(train_config=[1]), "malformed: its 'train_config' is not a dict"),
])
def test_a_checkpoint_that_cannot_resume_is_refused_in_one_line(tmp_path, capsys, change, message):
    out = run_dir(tmp_path, steps=2)
    rewrite(out / "checkpoint.pt", change)
    assert main(TRAIN + ["--resume", "--out", str(out), "--steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("draw train: error:")


@pytest.mark.parametrize("change, what", [
    (lambda d: setattr(d, "test", 1 - d.test), "(another test split)"),
    (lambda d: setattr(d, "valid", 1 - d.valid), "(another valid split)"),
    (lambda d: setattr(d, "train", d.train[:-8]), "(train/valid/test sizes 512/128/128 against 504/128/128)"),
])
def test_a_resume_on_other_data_than_the_run_trained_on_is_refused_in_one_line(tmp_path, capsys, monkeypatch, change, what):
    """Another data directory, or optional files added or removed there (the .amat MNIST files, SVHN's extra
    set), would go on training on other data without a word: the checkpoint keeps the data's identity."""
    import draw.train as train_module

    out = run_dir(tmp_path, steps=2)
    summary = json.loads((out / "summary.json").read_text())
    assert load_checkpoint(out)["data"]["sizes"] == [512, 128, 128] and summary["data_source"].startswith("synthetic")
    real = train_module.load_dataset

    def other_data(*args, **kwargs):
        data = real(*args, **kwargs)
        change(data)
        return data

    monkeypatch.setattr(train_module, "load_dataset", other_data)
    assert main(TRAIN + ["--resume", "--out", str(out), "--steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"was trained on other synthetic data than is here {what}" in err and err.startswith("draw train: error:")
    assert load_checkpoint(out)["step"] == 2


def test_a_checkpoint_without_the_validation_digest_resumes_with_its_test_digest_checked(tmp_path, capsys):
    """Checkpoints written before the validation split's digest was kept resume as they did; their test digest
    is still checked."""
    out = run_dir(tmp_path, steps=2)
    assert set(load_checkpoint(out)["data"]) == {"sizes", "test_sha256", "valid_sha256", "source"}
    rewrite(out / "checkpoint.pt", lambda p: p["data"].pop("valid_sha256"))
    assert main(TRAIN + ["--resume", "--out", str(out), "--steps", "3"]) == 0
    assert load_checkpoint(out)["step"] == 3
    rewrite(out / "checkpoint.pt", lambda p: p["data"].update(test_sha256="0" * 64) or p["data"].pop("valid_sha256"))
    assert main(TRAIN + ["--resume", "--out", str(out), "--steps", "4"]) == 2
    assert "(another test split)" in capsys.readouterr().err


def test_a_run_saved_on_another_device_resumes_inexactly_with_a_warning(tmp_path, caplog):
    out = run_dir(tmp_path, steps=2)
    rewrite(out / "checkpoint.pt", lambda p: p["rng"].update(device="cuda", data=torch.zeros(16, dtype=torch.uint8)))
    train(out, resume=True, overrides={"steps": 3}, **QUIET)
    assert "saved on cuda and resumes on cpu" in caplog.text
    assert load_checkpoint(out)["step"] == 3


# --- 14. many samples ------------------------------------------------------------------------------


def test_sample_generates_in_chunks_and_bounds_the_animation(tmp_path, monkeypatch):
    from PIL import Image

    from draw import figures

    out = run_dir(tmp_path, steps=2)
    monkeypatch.setattr(figures, "GENERATE_CHUNK", 7)
    sizes = []
    generate = DRAW.generate

    def counting(self, n, **kwargs):
        sizes.append(n)
        return generate(self, n, **kwargs)

    monkeypatch.setattr(DRAW, "generate", counting)
    assert main(["sample", str(out), "--n", "30", "--out", str(tmp_path / "s")]) == 0
    assert sizes == [7, 7, 7, 7, 2]
    with Image.open(tmp_path / "s" / "generation.gif") as gif, Image.open(tmp_path / "s" / "samples.png") as grid:
        assert gif.size[0] < grid.size[0]  # the animation shows 16 samples, the grid all 30


# --- 16. small things ------------------------------------------------------------------------------


def test_temporaries_of_killed_writers_are_removed_and_outputs_follow_the_umask(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".checkpoint.pt.999999.0a1b2c3d.tmp"
    stale.write_bytes(b"partial")
    not_ours = [out / name for name in (".notes.tmp", ".checkpoint.pt.k2j3h4.tmp", ".x.12.0a1b2c3.tmp")]
    for other in not_ours:  # a user's hidden file, and names temp_path never gives
        other.write_bytes(b"mine")
    others = [out / f".{name}.999999.0a1b2c3d.tmp" for name in ("summary.json", "generation.gif", "metrics.jsonl")]
    for temp in others:
        temp.write_bytes(b"partial")
    live = out / f".samples.png.{os.getpid()}.0a1b2c3d.tmp"  # a writer still at work (this process) keeps its file
    live.write_bytes(b"partial")
    previous = os.umask(0o022)
    try:
        train(out, model_config=SMALL, train_config=small_config(steps=2), **QUIET)
    finally:
        os.umask(previous)
    assert not stale.exists() and not any(temp.exists() for temp in others)
    assert live.exists() and all(other.read_bytes() == b"mine" for other in not_ours)
    assert (out / "checkpoint.pt").stat().st_mode & 0o777 == 0o644
    assert (out / "metrics.jsonl").stat().st_mode & 0o777 == 0o644


def test_errors_are_one_line(tmp_path, capsys):
    out = run_dir(tmp_path, steps=2)
    rewrite(out / "checkpoint.pt", lambda p: p["model"].update({"to_latent.weight": torch.zeros(3, 3)}))
    assert main(["eval", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights do not fit its model config" in err[0]
    rewrite(out / "checkpoint.pt", lambda p: p.update(model=list(p["model"].values())))
    assert main(["eval", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "malformed: its 'model' is not a dict of named tensors" in err[0]
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert main(["eval", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("draw eval: error:") and len(err[0]) > len("draw eval: error: ") + 20


@pytest.mark.parametrize("argv, line", [
    (["train", "--batch-size", "-3"], "draw train: error: argument --batch-size: must be >= 1, got -3 (see draw train --help)"),
    (["evaluate"], "draw: error: argument command: invalid choice: 'evaluate' (choose from 'train', 'eval', 'sample', "
                   "'verify', 'presets') (see draw --help)"),
    (["train", "--bach-size", "3"], "draw train: error: unrecognized arguments: --bach-size 3 (see draw train --help)"),
    (["eval", "runs/x", "--steps", "3"], "draw eval: error: unrecognized arguments: --steps 3 (see draw eval --help)"),
    (["verify", "--dtypes", "fp99"], "draw verify: error: argument --dtypes: unknown dtypes ['fp99']; choose from "
                                     "['fp32', 'bf16', 'fp16'] (see draw verify --help)"),
])
def test_a_bad_flag_is_one_line_that_points_to_help(argv, line, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [line]


def test_a_weights_only_checkpoint_cannot_resume(tmp_path):
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", DRAW(SMALL), step=3)
    with pytest.raises(CheckpointError, match="no training state to resume"):
        train(tmp_path / "run", resume=True, **QUIET)
    model_from_checkpoint(load_checkpoint(tmp_path / "run"))  # still a fine model to evaluate


# --- 17. out of memory -----------------------------------------------------------------------------

OUT_OF_MEMORY = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
                 "1.06 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. Of the "
                 "allocated memory 77.50 GiB is allocated by PyTorch, and 120.00 MiB is reserved by PyTorch but "
                 "unallocated. If reserved but unallocated memory is large try setting "
                 "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")


def test_running_out_of_memory_is_one_line_that_says_how_to_fit_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    from draw.step import TrainStep

    out = tmp_path / "run"
    step = TrainStep.__call__
    calls = []

    def fails_at_the_fifth_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise torch.OutOfMemoryError(OUT_OF_MEMORY)
        return step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(TrainStep, "__call__", fails_at_the_fifth_step)
        assert main(TRAIN + ["--steps", "6", "--checkpoint-every", "3", "--out", str(out)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line == ("draw train: error: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                    "79.19 GiB of which 1.06 GiB is free; its last checkpoint is kept: "
                    f"`draw train --resume --out {out} --accumulate K` goes on with each step's batch in K micro-batches "
                    "(the same update)")
    assert load_checkpoint(out)["step"] == 3
    assert main(["train", "--resume", "--out", str(out), "--accumulate", "2", "--no-progress"]) == 0  # as it says
    assert load_checkpoint(out)["step"] == 6

    with monkeypatch.context() as patch:  # before any checkpoint: the flags to add
        patch.setattr(TrainStep, "__call__", lambda self, *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError(OUT_OF_MEMORY)))
        assert main(TRAIN + ["--steps", "2", "--out", str(tmp_path / "new")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "is free; --accumulate K takes each step's batch in K micro-batches (the same update); --amp bf16 needs less memory")
    assert not (tmp_path / "new" / "checkpoint.pt").exists()

    from draw import evaluate

    monkeypatch.setattr(evaluate, "evaluate_bound", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError(OUT_OF_MEMORY)))
    assert main(["eval", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "is free; a smaller --batch-size fits (the result does not depend on it)")
