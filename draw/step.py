"""The training step: forward, backward, gradient clipping and Adam, used by `draw train` and bench/ alike.

`TrainStep` runs the step in one of three modes, all computing the same update:
    "eager"       plain PyTorch;
    "compile"     the model under torch.compile (forward and backward), the optimizer eager; a compile
                  that fails falls back to eager with one line;
    "cuda-graph"  (CUDA) the whole step, optimizer included, captured once as a CUDA graph and
                  replayed: static input buffer, Adam with `capturable=True` and a tensor learning
                  rate, no host syncs inside. The first WARMUP_STEPS steps run eagerly on a side
                  stream (allocating Adam's state), the next is captured, then every step is a replay;
                  a capture that fails falls back to eager with one line.
A step takes the global batch and returns the detached statistics `step_statistics(model)` names, on
the device, with no host sync: the batch's STATISTICS of the model (DRAW: loss, mean L_x, mean L_z; the
classifier: loss, error rate), then GRADIENT_STATISTICS (the global gradient norm before clipping, and
1.0 where the clip scaled the gradient down, else 0.0). With `accumulate` N it runs N micro-batches,
each backward on its micro-batch's mean loss (so that a per-image gradient clip, draw/classifier.py,
sees the same per-image gradients at any N), sums their gradients and divides by N before the one clip
and Adam step; under torchrun (a `World` of several ranks) each rank computes its part of the batch and
the gradients are averaged across ranks (GRADIENT_SYNCS; draw/distributed.py): by DistributedDataParallel
during the backward pass, or, in the CUDA-graph step, by one all-reduce after it, captured in the graph.
With `average` (a decay: `--ema`) the step then updates a moving average of the weights
(draw/average.py), in the graph too.
The latent noise of the global batch is drawn alike on every rank and sliced, as the images are, so that
neither the world size nor N changes what a step computes, only its float rounding.
"""

import contextlib
import logging
import math

import torch
import torch.nn as nn

from draw.average import WeightAverage
from draw.distributed import SINGLE, World, average_gradients, broadcast_parameters, check_global_batch, data_parallel
from draw.model import DRAW

STEP_MODES = ("auto", "eager", "compile", "cuda-graph")
# How several ranks average their gradients: "ddp" (DistributedDataParallel, all-reduces overlapped with
# the backward pass), "all-reduce" (one all-reduce after it: the CUDA-graph step's, since DDP's hooks run
# from the host), or "auto": all-reduce in the CUDA-graph step, DDP otherwise; nothing for one process.
GRADIENT_SYNCS = ("auto", "ddp", "all-reduce")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
WARMUP_STEPS = 3
GRADIENT_STATISTICS = ("grad_norm", "clipped")

log = logging.getLogger("draw")


def step_statistics(model: nn.Module) -> tuple[str, ...]:
    """The names of the statistics a TrainStep of `model` returns, in order."""
    return (*model.STATISTICS, *GRADIENT_STATISTICS)


def resolve_step_mode(mode: str, device: torch.device, *, under_ddp: bool = False) -> str:
    """The concrete mode of `mode` on `device`: "auto" is a CUDA graph on CUDA and eager elsewhere; under
    torchrun eager (a CUDA graph across GPUs has not been measured yet: `--step cuda-graph` asks for it)."""
    if mode not in STEP_MODES:
        raise ValueError(f"step mode must be one of {STEP_MODES}, got {mode!r}")
    if mode == "auto":
        return "cuda-graph" if device.type == "cuda" and not under_ddp else "eager"
    if mode == "cuda-graph" and device.type != "cuda":
        raise ValueError(f"--step cuda-graph needs a CUDA device, got {device}")
    return mode


def resolve_gradient_sync(sync: str, mode: str, world: World) -> str | None:
    """How this step averages gradients across ranks (GRADIENT_SYNCS), or None for one process."""
    if sync not in GRADIENT_SYNCS:
        raise ValueError(f"gradient sync must be one of {GRADIENT_SYNCS}, got {sync!r}")
    if mode == "cuda-graph" and sync == "ddp":  # DDP's all-reduces are launched from hooks on the host
        raise ValueError("the CUDA-graph step averages gradients with one all-reduce inside the graph, not DDP")
    if sync == "auto":
        return None if world.size == 1 else ("all-reduce" if mode == "cuda-graph" else "ddp")
    return sync


def adam(params, lr: float | torch.Tensor, *, fused: bool, capturable: bool = False) -> torch.optim.Adam:
    """Adam as the step runs it. fused: one kernel updates every parameter of a dtype (the step's choice on
    CUDA); else torch's default form (foreach on CUDA: about eight kernels, each over all parameters, and
    as many passes over Adam's state; one parameter at a time on the CPU). The same update either way,
    up to float rounding (tests/test_train.py)."""
    return torch.optim.Adam(params, lr=lr, capturable=capturable, fused=fused or None)


def autocast(amp: str, device: torch.device, *, cache_enabled: bool = True):
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
    return contextlib.nullcontext()


class TrainStep:
    """One optimizer step of `model` on a batch: see the module docstring for the modes.

    Owns the Adam optimizer, so that its form (a tensor learning rate, capturable state, fused or not)
    always matches the mode and device; `optimizer_state()` / `load_optimizer_state()` read and write it
    in a form that any mode can load. `fused` (default: on CUDA) takes the fused Adam (see `adam`).
    """

    def __init__(self, model: nn.Module, *, lr: float, grad_clip: float | None, amp: str = "none", tf32: bool = False,
                 mode: str = "eager", compile_mode: str = "default", device: torch.device | None = None,
                 accumulate: int = 1, world: World = SINGLE, gradient_sync: str = "auto", fused: bool | None = None,
                 average: float | None = None):
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.mode = resolve_step_mode(mode, self.device, under_ddp=world.size > 1)
        self.accumulate = accumulate
        self.world = world
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        self.grad_clip = math.inf if grad_clip is None else grad_clip  # None: no clip, the norm still measured
        self.amp = amp
        self.graphed = self.mode == "cuda-graph"
        if self.device.type == "cuda":  # process-wide switches: the step is the one place that sets them
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        lr_value = torch.tensor(lr, device=self.device) if self.graphed else lr
        self.fused = self.device.type == "cuda" if fused is None else fused
        self.optimizer = adam(model.parameters(), lr_value, fused=self.fused, capturable=self.graphed)
        self.average = WeightAverage(model, average) if average is not None else None  # every rank keeps one alike
        self.latent = isinstance(model, DRAW)  # DRAW draws latent noise; the classifier draws none
        # "all-reduce" with one process is a 1-rank all-reduce (a process group is needed): for tests
        self.gradient_sync = resolve_gradient_sync(gradient_sync, self.mode, world)
        self.ddp = data_parallel(model, world, self.device) if self.gradient_sync == "ddp" else None
        if self.gradient_sync == "all-reduce":
            broadcast_parameters(model)  # what DDP does when it wraps the model
        self.eager_forward = self.ddp or model
        # fallback_random: any noise the compiled model drew would come from torch's generator, as in the
        # eager step, so both compute the same losses (and a resume is exact in either mode)
        self.forward = self.eager_forward
        if self.mode == "compile":
            from torch._inductor import list_mode_options

            options = {**list_mode_options(compile_mode), "fallback_random": True}
            self.forward = torch.compile(self.eager_forward, options=options)
        self.steps_run = 0
        self._graph = None

    # --- learning rate and optimizer state ------------------------------------------------

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            if self.graphed:
                group["lr"].fill_(lr)  # in place: the captured graph reads this tensor
            else:
                group["lr"] = lr

    def optimizer_state(self) -> dict:
        """Adam's state dict with a float learning rate, capturable off and no fused choice: loadable by any
        mode, on any device."""
        state = self.optimizer.state_dict()
        for group in state["param_groups"]:
            group["lr"] = float(group["lr"])
            group["capturable"] = False
            group["fused"] = None
        return state

    def load_optimizer_state(self, state: dict) -> None:
        state = {**state, "param_groups": [dict(g) for g in state["param_groups"]]}
        for group in state["param_groups"]:  # this step's form (the loaded groups replace the optimizer's)
            group["capturable"] = self.graphed
            group["fused"] = self.fused or None
            group["lr"] = torch.tensor(float(group["lr"]), device=self.device) if self.graphed else float(group["lr"])
        self.optimizer.load_state_dict(state)

    # --- the step -----------------------------------------------------------------------------

    def latent_noise(self, batch: int, mine: slice) -> torch.Tensor:
        """This rank's part [T, b, z_size] of a global batch's latent noise, drawn from torch's generator
        for the whole batch in one draw (one kernel), as the model itself draws it."""
        cfg = self.model.config
        return torch.randn(cfg.T, batch, cfg.z_size, device=self.device)[:, mine]

    def _step(self, batch: tuple, *, capturing: bool = False) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        size = len(batch[0])
        mine = self.world.part(size)
        micro_batches = list(zip(*(t[mine].chunk(self.accumulate) for t in batch)))  # N tuples like batch
        noises = self.latent_noise(size, mine).chunk(self.accumulate, dim=1) if self.latent else [None] * self.accumulate
        stats = []
        for i, (micro, noise) in enumerate(zip(micro_batches, noises)):
            last = i == self.accumulate - 1  # DDP averages the gradients across ranks in the last backward only
            with contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync():
                with autocast(self.amp, self.device, cache_enabled=not capturing):
                    out = self.forward(*micro, **({} if noise is None else {"noise": noise}))
                out.loss.backward()  # the gradient of the micro-batch's mean loss: each image's own / its size
            stats.append(self.model.statistics(out))
            del out  # its graph (what the backward left of it) is not kept through the next micro-batch
        if self.accumulate > 1:  # the sum of N micro-batch means -> the batch mean
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.div_(self.accumulate)
        if self.gradient_sync == "all-reduce":
            average_gradients(list(self.model.parameters()))  # over the ranks, as DDP would have
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)  # before clipping
        self.optimizer.step()
        if self.average is not None:
            self.average.update()
        model_stats = self.world.average(torch.stack(stats).float().mean(0))  # [N, k] -> [k], over the global batch
        gradient = torch.stack([grad_norm, grad_norm > self.grad_clip]).float()  # one gradient on every rank
        return torch.cat([model_stats, gradient])

    @property
    def settled(self) -> bool:
        """Whether the next call runs as every later one will (what a benchmark times): the CUDA graph
        captured, the step compiled, or eager. A capture or compile that failed settles eagerly (see `mode`)."""
        if self.graphed:
            return self._graph is not None
        return self.mode != "compile" or self.steps_run >= 1

    def __call__(self, batch, lr: float) -> torch.Tensor:
        """One step on the global batch at learning rate lr: x [B, C, H, W] (DRAW) or (x, labels [B])
        (the classifier). Returns the step_statistics(model) of the whole batch, detached. Every rank passes
        the same batch and computes its part."""
        batch = batch if isinstance(batch, tuple) else (batch,)
        check_global_batch(len(batch[0]), self.world.size, self.accumulate)
        self.set_lr(lr)
        self.steps_run += 1
        stats = self._run(batch, lr)
        if self.average is not None:
            self.average.counted()  # every path of _run updated it once (a replay; a capture, then its replay)
        return stats

    def _run(self, batch: tuple, lr: float) -> torch.Tensor:
        if self.mode == "compile" and self.steps_run == 1:
            return self._first_compiled_step(batch)
        if not self.graphed:
            return self._step(batch)
        if self._graph is not None and batch[0].shape == self._static[0].shape:
            for static, t in zip(self._static, batch):
                static.copy_(t)
            self._graph.replay()
            return self._static_stats.clone()
        if self.steps_run <= WARMUP_STEPS or (self._graph is not None):
            return self._side_stream_step(batch)  # warm-up, or a batch of another shape (the last, short one)
        try:
            return self._capture_and_replay(batch)
        except (KeyboardInterrupt, torch.OutOfMemoryError):
            raise
        except Exception as e:  # the capture failed (nothing of the step ran): train eagerly instead
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            log.warning(f"CUDA graph capture failed ({type(e).__name__}: {first_line[:200]}); training eagerly "
                        "(the latent noise from here on differs from a graphed run's)")
            torch.cuda.synchronize(self.device)
            self.mode, self.graphed, self._graph = "eager", False, None
            self.set_lr(lr)  # a float learning rate again; Adam keeps its state on the device
            return self._step(batch)

    def _first_compiled_step(self, batch: tuple) -> torch.Tensor:
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        try:
            return self._step(batch)
        except (KeyboardInterrupt, torch.OutOfMemoryError):
            raise
        except Exception as e:  # a compiler or toolchain failure: train eagerly instead
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            log.warning(f"torch.compile failed ({type(e).__name__}: {first_line[:200]}); training eagerly")
            self.mode, self.forward = "eager", self.eager_forward
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, self.device)
            return self._step(batch)

    def _side_stream_step(self, batch: tuple) -> torch.Tensor:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            stats = self._step(batch)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return stats

    def _capture_and_replay(self, batch: tuple) -> torch.Tensor:
        self._static = tuple(t.clone() for t in batch)  # the input buffers the graph reads
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_stats = self._step(self._static, capturing=True)
        self._graph = graph
        graph.replay()
        return self._static_stats.clone()
