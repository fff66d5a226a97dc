"""Data-parallel training across processes, GPUs and nodes: `torchrun ... -m draw train` (DDP).

torchrun starts one process (a rank) per GPU and describes it in the environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT); `process_group_from_environment` joins the ranks into a process
group (NCCL on CUDA, gloo on CPU) and gives each its own GPU, cuda:LOCAL_RANK. A `World` says where this
process stands among the ranks; `SINGLE` is a plain one-process run, for which every method here is a no-op.

What the ranks share, and how (draw/step.py and draw/train.py call these):
    batches     every rank draws the whole global batch, its binarization and crops (the same generator
                states everywhere) and trains on its own contiguous part, `World.part`; the latent noise
                is drawn the same way (TrainStep). Any world size sees the same images and the same noise.
    gradients   DistributedDataParallel averages them across ranks (`data_parallel`); the CUDA-graph step
                instead averages them with one all-reduce after the backward pass, inside the graph
                (`average_gradients`, the parameters first made rank 0's by `broadcast_parameters`).
    the run     rank 0 alone reads and writes the run directory (lock, checkpoint, metrics, figures) and
                logs; `from_main` hands what it read to the others.
    stopping    a signal is acted on when every rank agrees, at a step boundary (`agree_on_stop`).
    errors      a rank that raises leaves a note in the rendezvous store and tears the process group
                down, so that the others leave their collectives at once and name it
                (`failing_together`); a rank that hangs is given up after the process group's timeout.
"""

import contextlib
import datetime
import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

log = logging.getLogger("draw")

DEFAULT_TIMEOUT_S = 600.0
# how long the other ranks of a node wait for its local rank 0 to make a dataset (first_on_each_node): a build
# or download may take many minutes (SVHN's, a pip download), beyond any collective's --dist-timeout
DATA_WAIT_S = 4 * 3600.0
FAILURE_KEY = "draw/failure"  # the rendezvous-store key of the first failing rank's note
SEEN_KEY = "draw/failure-seen/"  # + a rank: that rank has read the note
# how long the failing rank waits, after tearing the group down, for the others to read its note: the store
# may live in its process (a launch without torchrun's agent store), and would go when it exits
NOTE_LINGER_S = 10.0


class AnotherRankFailed(RuntimeError):
    """This rank stopped because another rank of the run failed (its note says which, and why)."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one data-parallel run."""

    rank: int = 0  # RANK: 0 .. size-1 across all nodes
    size: int = 1  # WORLD_SIZE
    local_rank: int = 0  # LOCAL_RANK: the rank on this node, which is also its GPU
    collective_device: str = "cpu"  # where the tensors of the process group's collectives live (cuda for NCCL)
    control_group: object = field(default=None, compare=False, repr=False)  # gloo group for host-side agreement

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def part(self, n: int) -> slice:
        """This rank's contiguous part of n items (a global batch, a test set): equal when size divides n."""
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    # --- agreement among ranks (each one a no-op on a single process) --------------------------------

    def agree_on_stop(self, signum: int | None) -> int | None:
        """Whether every rank stops now: the largest signal number any rank received, or None. Called by
        every rank at every step boundary, so that all of them checkpoint and stop after the same step."""
        if self.size == 1:
            return signum
        flag = torch.tensor([signum or 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control_group)
        return int(flag) or None

    def average(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a small tensor on the training device (a step's loss statistics)."""
        if self.size == 1:
            return values
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values / self.size

    def sum(self, values: list[float]) -> list[float]:
        """Floats added across ranks, in float64 (an evaluation's sums)."""
        if self.size == 1:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.collective_device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.tolist()

    def from_main(self, make):
        """make() run on rank 0 alone and its result handed to every rank (it must pickle): rank 0 reads
        the run directory, which the other nodes need not see."""
        if self.size == 1:
            return make()
        box = [make() if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]

    def first_on_each_node(self, make):
        """make() run by local rank 0 of each node first (so that it alone downloads a missing dataset into
        the node's cache), then by the other ranks; returns this rank's result."""
        if self.size == 1:
            return make()
        # one key per node and call (every rank calls this alike): set in the rendezvous store when made
        node = os.environ.get("GROUP_RANK", str(self.rank - self.local_rank))
        key = f"draw/data-ready/{node}/{next(_DATA_CALLS)}"
        if self.local_rank == 0:
            result = make()
            _store().set(key, "1")
            return result
        _wait_for_key(key, DATA_WAIT_S)  # not a collective: --dist-timeout does not bound it
        return make()


SINGLE = World()
_DATA_CALLS = itertools.count()


def _wait_for_key(key: str, seconds: float) -> None:
    """Wait until `key` is in the rendezvous store, up to `seconds`; a failure note left meanwhile ends the
    wait (AnotherRankFailed), as a failed rank ends every collective (failing_together)."""
    store, deadline = _store(), time.monotonic() + seconds
    while not store.check([key]):
        note = _failure_note()
        if note is not None:
            raise AnotherRankFailed(f"stopped because {note}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {seconds:.0f} s for this node's local rank 0 to make the dataset")
        time.sleep(0.2)


def check_global_batch(batch_size: int, world_size: int, accumulate: int, *, resumed: bool = False) -> None:
    """Refuse a global batch that the ranks and micro-batches cannot share equally: suggest the nearest batch
    sizes, or for a resumed run (whose batch is fixed) the --accumulate values that fit."""
    parts = world_size * accumulate
    if batch_size % parts:
        if resumed:
            fits = [n for n in range(1, min(batch_size // world_size, 64) + 1) if batch_size % (world_size * n) == 0]
            hint = "the run's batch is fixed; --accumulate " + ", ".join(map(str, fits)) + " fit" if fits else \
                "the run's batch is fixed, and no --accumulate fits this world size"
        else:
            below, above = batch_size // parts * parts, (batch_size // parts + 1) * parts
            hint = "try " + (f"{below} or {above}" if below else f"{above}")
        raise ValueError(f"--batch-size {batch_size} is the global batch: it must divide by the world size {world_size} "
                         f"x --accumulate {accumulate} = {parts} ({hint})")


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Every rank's parameters and buffers made rank 0's, as DistributedDataParallel does when it wraps a
    model (for the steps that average gradients without it, `average_gradients`)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def average_gradients(parameters: list[torch.Tensor]) -> None:
    """The parameters' gradients averaged over the ranks, in place: one all-reduce of one flat buffer after
    the backward pass, where DistributedDataParallel runs bucketed all-reduces from hooks during it. As plain
    tensor operations, with no host sync, it can be captured in a CUDA graph (NCCL collectives can be)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])  # [sum of numel]
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(dist.get_world_size())
    torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])


def data_parallel(model: torch.nn.Module, world: World, device: torch.device):
    """`model` in DistributedDataParallel for a world of several ranks (its gradients averaged across
    them in the backward pass), else None."""
    if world.size == 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# ---------------------------------------------------------------------------------------------
# Joining and leaving the process group
# ---------------------------------------------------------------------------------------------


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun (or a scheduler) set it; 1 when this process was started on its own."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be a whole number, got {text!r}") from None


def _environment_int(name: str) -> int:
    if name not in os.environ:
        raise ValueError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {name} is not set: start the ranks with torchrun")
    return int(os.environ[name])


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of a rank: cuda:LOCAL_RANK when training on CUDA (one GPU per rank), else the CPU."""
    if device.type != "cuda":
        return device
    if device.index not in (None, local_rank):
        raise ValueError(f"--device {device}: under torchrun each rank trains on cuda:LOCAL_RANK; pass --device cuda")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                         "start at most that many processes per node (--nproc_per_node)")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group_from_environment(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Join the process group that torchrun's environment describes; yields (world, this rank's device).

    NCCL on CUDA, gloo on CPU, both with `timeout_s` on every collective (a rank that hangs is given up
    after it). Without torchrun (WORLD_SIZE unset or 1) yields (SINGLE, device) and touches nothing.
    Ranks other than 0 log warnings and errors only. The group is destroyed on the way out.
    """
    size = launched_world_size()
    if size == 1:
        yield SINGLE, device
        return
    rank, local_rank = _environment_int("RANK"), _environment_int("LOCAL_RANK")
    device = rank_device(device, local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
        control = dist.new_group(backend="gloo", timeout=timeout)  # host-side flags need no GPU sync
    else:
        dist.init_process_group("gloo", timeout=timeout)
        control = None  # the default group is gloo already
    world = World(rank, size, local_rank, "cuda" if device.type == "cuda" else "cpu", control)
    level = log.level
    if not world.is_main:
        log.setLevel(logging.WARNING)
    try:
        yield world, device
    finally:
        log.setLevel(level)
        if dist.is_initialized():
            dist.destroy_process_group()


def leave_rank(code: int) -> None:
    """End this torchrun rank now with exit status `code`, its output flushed, skipping the interpreter's
    teardown (after the process group is destroyed: the run's files are written and closed by then).

    Why: DistributedDataParallel keeps its process group alive past destroy_process_group (torch 2.13:
    constructing DDP is enough), so gloo's worker threads outlive it. Such a thread drops the last
    collective's work, and with it tensors that Python owns, a moment after the collective returns; when
    that moment falls in the interpreter's finalization, taking the GIL ends the thread and the process
    aborts ("terminate called without an active exception", SIGABRT), turning a finished run's 0 or a
    stopped run's 143 into -6. We saw it in about 2 % of two-rank CPU runs, always at finalization.
    """
    for output in (*logging.getLogger().handlers, sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed stream: nothing left to write
            output.flush()
    os._exit(code)


# ---------------------------------------------------------------------------------------------
# Failing together
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def failing_together(world: World):
    """An exception in this rank ends the run on every rank, with no rank left waiting in a collective.

    The first rank to fail writes a note (its rank and error) in the rendezvous store, then tears the
    process group down: the others' collectives fail at once, and each of them raises AnotherRankFailed
    quoting the note. A collective that fails with no note (a rank killed, or hung past the timeout)
    raises AnotherRankFailed too. A stop that the ranks agreed on does not pass through here (train()
    raises it after).
    """
    if world.size == 1:
        yield
        return
    try:
        yield
    except BaseException as error:
        note = _failure_note()
        own = note is None and not _is_communication_failure(error)
        store = _store()  # held past the teardown: the others read the note from it
        if own:
            _leave_failure_note(world, error)
        _tear_down()
        if own:
            _wait_until_the_note_is_read(store, world)
        if note is not None:
            raise AnotherRankFailed(f"stopped because {note}") from error
        if not own:
            raise AnotherRankFailed(f"stopped because the process group failed (another rank died, hung past "
                                    f"--dist-timeout or left): {_first_line(error)}") from error
        raise


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def _is_communication_failure(error: BaseException) -> bool:
    """An error of a collective itself (gloo and NCCL raise RuntimeError or torch.distributed.DistError)."""
    text = str(error)
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(word in text for word in ("gloo", "NCCL", "Connection closed", "Connection reset")))


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


def _failure_note() -> str | None:
    """The note of the rank that failed first, if one did and the store still answers (read: this rank says
    it has seen it, so that the failing rank need not wait for it)."""
    store = _store()
    try:
        if store is None or not store.check([FAILURE_KEY]):
            return None
        note = store.get(FAILURE_KEY).decode()
        store.set(SEEN_KEY + os.environ.get("RANK", "?"), "1")
        return note
    except Exception:  # the store's host is gone too
        return None


def _wait_until_the_note_is_read(store, world: World) -> None:
    """Until every other rank has read this rank's failure note, or NOTE_LINGER_S have passed (a rank that
    died never reads it)."""
    others = [SEEN_KEY + str(rank) for rank in range(world.size) if rank != world.rank]
    deadline = time.monotonic() + NOTE_LINGER_S
    try:
        while store is not None and not store.check(others) and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:  # the store's host is gone: nobody can read it any more
        pass


def _leave_failure_note(world: World, error: BaseException) -> None:
    if isinstance(error, KeyboardInterrupt):
        what = "was interrupted"
    else:
        line = _first_line(error)
        what = f"failed: {type(error).__name__}: {line}" if line else f"failed: {type(error).__name__}"
    store = _store()
    try:
        if store is not None:
            store.set(FAILURE_KEY, f"rank {world.rank} {what}")
    except Exception:
        pass  # the note is a courtesy; tearing the group down is what frees the others


def _tear_down() -> None:
    """Abort the process group: the collectives the other ranks wait in fail instead of hanging."""
    if not dist.is_initialized():
        return
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
