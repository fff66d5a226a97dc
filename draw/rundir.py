"""A run directory: its file names, the lock that keeps a second process out, and the metrics log.

    checkpoint.pt   model, optimizer, step, RNG states, configs (draw/checkpoint.py)
    metrics.jsonl   one JSON record per logging interval and per evaluation
    summary.json    the final test bound and the run's facts
    .lock           held (flock) by the process training in the directory, for its whole life
"""

import errno
import fcntl
import json
import logging
import os
import pathlib

from draw.atomic import atomic_write_text, remove_stale_temporaries

CHECKPOINT = "checkpoint.pt"
TRAINING_RECORD_KEY = "images_per_s"  # in every training record (its interval's rate), in no evaluation record
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LOCK = ".lock"

log = logging.getLogger("draw")


class RunDirectoryBusy(RuntimeError):
    """Another live process holds the run directory."""


class MetricsError(ValueError):
    """metrics.jsonl cannot be read back."""


class RunLock:
    """An exclusive flock on DIR/.lock for the life of a run.

    The kernel releases a flock when its process exits, however it exits (a kill -9 too), so a lock
    left by a dead process is never in the way; a live holder makes `acquire` refuse in one line.
    """

    def __init__(self, directory):
        self.path = pathlib.Path(directory) / LOCK
        self._fd = None
        self.created = False

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.created = not self.path.exists()  # a refused run removes a lock file it made (train())
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirectoryBusy(f"{self.path.parent} is in use by another draw process (pid {holder}); wait for it or choose another --out") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        for temp in remove_stale_temporaries(self.path.parent):  # the checkpoint's, the summary's, a figure's...
            log.warning(f"removed {temp}, left by an interrupted write")
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl. A last line that does not parse (a write cut short by a full
    disk or a kill) is dropped with a warning; a bad line before the last is an error naming the file."""
    path = pathlib.Path(path)
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with an integer 'step'")
        except ValueError as e:
            if number == len(lines):
                log.warning(f"{path}: dropped an unreadable last line ({e}), left by an interrupted write")
                break
            raise MetricsError(f"{path}, line {number}: not a metrics record ({e})") from None
        records.append(record)
    return records


class MetricsLog:
    """Append-only JSONL metrics. On resume, records past the checkpoint's step are dropped, and so is a
    training record at its step when the checkpoint holds that interval as not yet logged (`unlogged`: a
    process wrote the record, then failed before the checkpoint that would have counted it)."""

    def __init__(self, path, resume_step: int | None, unlogged: bool = False):
        self.path = pathlib.Path(path)
        if resume_step is None:
            atomic_write_text(self.path, "", durable=False)
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] < resume_step
                    or r["step"] == resume_step and not (unlogged and TRAINING_RECORD_KEY in r)]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def records(self) -> list[dict]:
        return read_metrics(self.path)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def sync(self) -> None:
        """Flush the records to disk (before a checkpoint that counts them: a power cut must not keep the
        checkpoint and lose the records up to its step, which a resume keeps)."""
        with self.path.open("rb") as f:
            os.fsync(f.fileno())


class NoMetrics:
    """The metrics log of a data-parallel rank other than 0: it writes nothing (rank 0 writes the records)."""

    def write(self, record: dict) -> None:
        pass

    def sync(self) -> None:
        pass
