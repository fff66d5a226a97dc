"""DRAW's selective attention (Gregor et al. 2015, Eqs. 19-29): filterbank, read, glimpse and write; and
its latent step (Eqs. 6, 11): latent_sample.

read is the generator's (x and the error image, Eq. 27); glimpse reads x alone, as the cluttered-MNIST
classifier of Sec. 4.1 does; write adds a patch to the canvas (Eq. 29); write_read writes and then reads
the new canvas, as DRAW does from one step to the next, in one launch each way on the GPU; latent_sample
draws z_t and the per-image Gaussian terms of the loss, one launch each way on the GPU; lstm_cell is
nn.LSTMCell's update from its two gate halves, one launch each way on the GPU, whose input half may come
as a Projection (add + x W^T, DRAW's encoder input) that its kernels form themselves.

Two backends share one API and one set of conventions (docs/conventions.md):
    "reference"  batched PyTorch (kernels/reference.py), any device, the definition of correctness;
    "triton"     fused Triton kernels (kernels/triton_attention.py, triton_latent.py, triton_lstm.py), CUDA tensors,
                 or CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set before triton is
                 imported);
    "auto"       Triton for CUDA tensors when Triton imports, else the reference.
"""

import importlib.util
import logging
import os
from typing import Callable, NamedTuple

import torch

from draw.kernels import reference

BACKENDS = ("auto", "reference", "triton")

__all__ = ["BACKENDS", "Projection", "filterbank", "glimpse", "gradient_destination", "latent_sample", "lstm_cell",
           "check_backend", "mark_gradient_destination", "read", "share_gradient_destination", "write",
           "write_read", "resolve_backend", "triton_available"]


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the `triton` package can be imported."""
    return _TRITON_INSTALLED


def _triton_interpreter() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's interpreter, read as Triton reads it (1, true or on)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ("reference" or "triton") that `backend` selects for tensors on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the `triton` package, which is not installed")
        if device.type != "cuda" and not _triton_interpreter():
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got tensors on {device}; on CPU use "
                "backend='reference', or set TRITON_INTERPRET=1 before importing triton to run "
                "the kernels in Triton's interpreter"
            )
    return backend


def check_backend(backend: str, device: torch.device) -> str:
    """resolve_backend, for a command about to run: an unusable backend is refused, and fused kernels that
    would take Triton's interpreter on a GPU (TRITON_INTERPRET set in the environment, which runs them on the
    host, copying every tensor to and fro) are said in a warning, not left to run slowly without a word."""
    resolved = resolve_backend(backend, device)
    if device.type == "cuda" and resolved == "triton" and _triton_interpreter():
        logging.getLogger("draw").warning(
            "TRITON_INTERPRET is set: the fused kernels run in Triton's interpreter on the host, many times slower "
            "than compiled for the GPU; unset it to compile them")
    return resolved


# ---------------------------------------------------------------------------------------------
# Input checks: every backend sees inputs that already passed these.
# ---------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    if t.dim() != rank:
        raise ValueError(f"{name} must be {layout} (rank {rank}), got shape {list(t.shape)}")


def _check_grid_size(name: str, n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be an int >= 1, got {n!r}")


def _check_params(params, batch: int) -> None:
    _check_tensor("params", params, 2, "[B, 5]")
    if params.shape != (batch, 5):
        raise ValueError(f"params must be [B, 5] = [{batch}, 5], got {list(params.shape)}")


def _check_same_device(**tensors) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        found = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all inputs must be on one device, got {found}")
    return next(iter(devices.values()))


# ---------------------------------------------------------------------------------------------
# Gradient destinations: where a tensor's gradient is to be written
# ---------------------------------------------------------------------------------------------
# DRAW's recurrent maps keep each step's output gradient in one buffer per backward pass
# (draw/recurrent_linear.py). A map's output parts are marked with where their gradients belong there;
# the fused kernels' backward (triton backend) write each input's gradient straight into that place and
# return it, so that the map finds it in place and copies nothing. A place is handed out once per
# backward pass: a second consumer of the same tensor gets none and writes a new tensor, which autograd
# then adds, as it would without marks. The reference backend ignores the marks.

_DESTINATION = "_draw_gradient_destination"


def mark_gradient_destination(t: torch.Tensor, place) -> torch.Tensor:
    """Mark t (and return it): place(shape) gives, once per backward pass, the tensor of that shape (t's
    numel, t's dtype, on t's device) into which t's gradient is to be written, or None after the first."""
    setattr(t, _DESTINATION, place)
    return t


def gradient_destination(t: torch.Tensor):
    """None if t is not marked, else a callable giving (in the backward pass) the tensor of t's shape into
    which its gradient is to be written, or None if another consumer took it first."""
    place = getattr(t, _DESTINATION, None)
    if place is None:
        return None
    shape = t.shape
    return lambda: place(shape)


def share_gradient_destination(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """t, marked as source is (if it is): for a view of source, or for a tensor whose gradient is
    source's, such as x W^T + source."""
    place = getattr(source, _DESTINATION, None)
    return t if place is None else mark_gradient_destination(t, place)


# ---------------------------------------------------------------------------------------------
# Projections: a linear map's output left for its consumer to form
# ---------------------------------------------------------------------------------------------


class Projection(NamedTuple):
    """add + x W^T, not formed yet: its consumer forms it (lstm_cell's input_gates). DRAW's encoder input
    W_r r_t + (the part from h_dec_{t-1}) (Eq. 5), with x the glimpses r_t [B, 2*C*N*N]. The triton
    backend forms it in the LSTM cell's kernel, K FMAs per gate (lstm_cell; where the cell's hidden
    units fit one program and K <= 128; not under torch.compile), and in the backward pass forms x's
    gradient dL/da W there too: no matrix product either way. W's gradient is left to its owner: the
    backward hands it x and the output's gradient (`record`). Anywhere else `unfused()` forms it. Made by
    draw.recurrent_linear.RecurrentLinear.deferred."""

    x: torch.Tensor  # [B, K], columns contiguous
    weight: torch.Tensor  # W [G, K], columns contiguous
    add: torch.Tensor  # [B, G]; its gradient is the output's
    token: torch.Tensor | None  # an input of the fused op: its owner's backward runs after the op's
    record: Callable[[torch.Tensor, torch.Tensor], None] | None  # (x, dL/doutput [B, G]); None: fused only without grad
    unfused: Callable[[], torch.Tensor]  # add + x W^T, by autograd's ops


PROJECTION_MODES = ("fused", "unfused")


def projection_mode() -> str:
    """DRAW_TRITON_PROJECTION: "fused" (the default: the triton backend forms a Projection in the kernel that
    consumes it wherever it can) or "unfused" (never: formed before it, for measuring the difference)."""
    mode = os.environ.get("DRAW_TRITON_PROJECTION", "fused") or "fused"
    if mode not in PROJECTION_MODES:
        raise ValueError(f"DRAW_TRITON_PROJECTION={mode!r}: expected one of {', '.join(PROJECTION_MODES)}")
    return mode


def _check_projection(name: str, projection: Projection, batch: int, outputs: int, context: str = "") -> None:
    """projection's x [B, K], weight [outputs, K] and add [B, outputs], floating point, on one device, in one
    dtype outside autocast (under it, x may be wider than W: a non-attentive read's fp32 glimpses). context:
    what B and outputs come from, for the message."""
    _check_tensor(f"{name}.x", projection.x, 2, "[B, K]")
    _check_tensor(f"{name}.weight", projection.weight, 2, "[G, K]")
    _check_tensor(f"{name}.add", projection.add, 2, "[B, G]")
    x, weight, add = projection.x, projection.weight, projection.add
    if x.shape[0] != batch or weight.shape != (outputs, x.shape[1]) or add.shape != (batch, outputs):
        raise ValueError(f"{name} must be x [B, K], weight [G, K], add [B, G] with B = {batch}, G = {outputs}{context}; "
                         f"got {list(x.shape)}, {list(weight.shape)} and {list(add.shape)}")
    device = _check_same_device(x=x, weight=weight, add=add)
    if not x.dtype == weight.dtype == add.dtype and not torch.is_autocast_enabled(device.type):
        raise TypeError(f"{name} must have one dtype outside autocast: x {x.dtype}, weight {weight.dtype}, add {add.dtype}")


def _fused_projection(projection) -> bool:
    """Whether a kernel may form this Projection itself: not under torch.compile, not with
    DRAW_TRITON_PROJECTION=unfused, and not without a `record` where a gradient may be asked for (W's would
    be lost). The kernel's own limits are its launcher's."""
    if not isinstance(projection, Projection) or torch.compiler.is_compiling():
        return False
    if projection.record is None and torch.is_grad_enabled():
        return False
    return projection_mode() == "fused"


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def filterbank(params: torch.Tensor, n: int, height: int, width: int):
    """Filterbanks and intensity of Eqs. 19-26 (always the reference maths: it is the spec).

    Args:
        params: [B, 5] raw (gx~, gy~, log sigma^2, log delta~, log gamma).
        n: grid size N >= 1.
        height, width: image size H, W >= 1.
    Returns:
        fx [B, n, W], fy [B, n, H], gamma [B].
    """
    _check_tensor("params", params, 2, "[B, 5]")
    if params.shape[1] != 5:
        raise ValueError(f"params must be [B, 5], got {list(params.shape)}")
    _check_grid_size("n", n)
    _check_grid_size("height", height)
    _check_grid_size("width", width)
    return reference.filterbank(params, n, height, width)


def _check_read_inputs(x, params, n, dtype) -> None:
    _check_tensor("x", x, 4, "[B, C, H, W]")
    _check_params(params, x.shape[0])
    _check_grid_size("n", n)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")


def read(x: torch.Tensor, canvas: torch.Tensor, params: torch.Tensor, n: int, *, backend: str = "auto",
         dtype: torch.dtype | None = None):
    """Attention read, Eqs. 3 and 27: gamma * [F_Y x F_X^T, F_Y x_hat F_X^T], x_hat = x - sigmoid(canvas).

    Args:
        x: [B, C, H, W] images.
        canvas: [B, C, H, W] canvas logits.
        params: [B, 5] raw read parameters.
        n: read grid size N >= 1.
        backend: "auto", "reference" or "triton".
        dtype: the glimpses' dtype (default x's): under autocast, the dtype the next layer computes in,
            so that the kernels round once on store instead of a cast after them.
    Returns:
        [B, 2, C, n, n] glimpses of x (index 0) and of the error image (index 1), in `dtype`.
    """
    _check_tensor("x", x, 4, "[B, C, H, W]")
    _check_tensor("canvas", canvas, 4, "[B, C, H, W]")
    if canvas.shape != x.shape:
        raise ValueError(f"canvas must have x's shape {list(x.shape)}, got {list(canvas.shape)}")
    _check_read_inputs(x, params, n, dtype)
    device = _check_same_device(x=x, canvas=canvas, params=params)
    if resolve_backend(backend, device) == "triton":
        from draw.kernels import triton_attention

        return triton_attention.read(x, canvas, params, n, dtype)
    return reference.read(x, canvas, params, n, dtype)


def glimpse(x: torch.Tensor, params: torch.Tensor, n: int, *, backend: str = "auto",
            dtype: torch.dtype | None = None):
    """Attention glimpse of x alone, Eq. 27's first half: gamma * F_Y x F_X^T (no canvas, no error image).

    The read of the cluttered-MNIST classifier ("differentiable RAM", Sec. 4.1). It equals
    read(x, canvas, params, n)[:, 0] for any canvas, without reading a canvas.

    Args:
        x: [B, C, H, W] images.
        params: [B, 5] raw attention parameters.
        n: grid size N >= 1.
        backend: "auto", "reference" or "triton".
        dtype: the glimpses' dtype (default x's; see read).
    Returns:
        [B, C, n, n] glimpses, in `dtype`.
    """
    _check_read_inputs(x, params, n, dtype)
    device = _check_same_device(x=x, params=params)
    if resolve_backend(backend, device) == "triton":
        from draw.kernels import triton_attention

        return triton_attention.glimpse(x, params, n, dtype)
    return reference.glimpse(x, params, n, dtype)


def write(patch: torch.Tensor, params: torch.Tensor, canvas: torch.Tensor, *, backend: str = "auto"):
    """Attention write added to the canvas, Eqs. 8 and 29: canvas + (1 / gamma) F_Y^T w F_X.

    Args:
        patch: [B, C, n, n] write patch.
        params: [B, 5] raw write parameters.
        canvas: [B, C, H, W] canvas logits.
        backend: "auto", "reference" or "triton".
    Returns:
        [B, C, H, W] the new canvas, in the canvas's dtype.
    """
    _check_write_inputs(patch, params, canvas)
    device = _check_same_device(patch=patch, params=params, canvas=canvas)
    if resolve_backend(backend, device) == "triton":
        from draw.kernels import triton_attention

        return triton_attention.write(patch, params, canvas, (gradient_destination(patch), gradient_destination(params)))
    return reference.write(patch, params, canvas)


def _check_write_inputs(patch, params, canvas) -> None:
    _check_tensor("patch", patch, 4, "[B, C, n, n]")
    _check_tensor("canvas", canvas, 4, "[B, C, H, W]")
    batch, channels = canvas.shape[:2]
    if patch.shape[0] != batch or patch.shape[1] != channels or patch.shape[2] != patch.shape[3]:
        raise ValueError(
            f"patch must be [B, C, n, n] = [{batch}, {channels}, n, n] to match the canvas "
            f"{list(canvas.shape)}, got {list(patch.shape)}"
        )
    _check_grid_size("write grid size n (patch.shape[-1])", patch.shape[-1])
    _check_params(params, batch)


def write_read(patch: torch.Tensor, write_params: torch.Tensor, canvas: torch.Tensor, x: torch.Tensor,
               read_params: torch.Tensor, n: int, *, backend: str = "auto", dtype: torch.dtype | None = None):
    """write, then read the new canvas (Eqs. 8 and 29, then 3 and 27): one step's write and the next
    step's read, which DRAW makes back to back. The same as

        c_t = write(patch, write_params, canvas); r = read(x, c_t, read_params, n)

    but on the GPU one launch forward and one backward instead of two each, the canvas streamed once,
    and its two gradients (from later steps, and through this read's error image) summed in registers.

    Args:
        patch: [B, C, n^, n^] write patch; write_params: [B, 5] raw write parameters.
        canvas: [B, C, H, W] canvas logits c_{t-1}.
        x: [B, C, H, W] images; read_params: [B, 5] raw read parameters; n: read grid size N >= 1.
        backend: "auto", "reference" or "triton".
        dtype: the glimpses' dtype (default x's; see read).
    Returns:
        (c_t [B, C, H, W] in the canvas's dtype, [B, 2, C, n, n] glimpses in `dtype`).
    """
    _check_write_inputs(patch, write_params, canvas)
    _check_tensor("x", x, 4, "[B, C, H, W]")
    if x.shape != canvas.shape:
        raise ValueError(f"x must have the canvas's shape {list(canvas.shape)}, got {list(x.shape)}")
    _check_read_inputs(x, read_params, n, dtype)
    device = _check_same_device(patch=patch, write_params=write_params, canvas=canvas, x=x, read_params=read_params)
    if resolve_backend(backend, device) == "triton":
        from draw.kernels import triton_attention

        destinations = tuple(gradient_destination(t) for t in (patch, write_params, read_params))
        return triton_attention.write_read(patch, write_params, canvas, x, read_params, n, dtype, destinations)
    return reference.write_read(patch, write_params, canvas, x, read_params, n, dtype)


def latent_sample(mu: torch.Tensor, log_sigma: torch.Tensor, eps: torch.Tensor, *, backend: str = "auto"):
    """One step's reparameterised sample z = mu + exp(log_sigma) * eps (Eq. 6) and, per image, the KL
    term of the latent loss (Eq. 11) and log N(z; 0, I) - log N(z; mu, sigma^2).

    Args:
        mu, log_sigma, eps: [B, Z] (any strides), on one device.
        backend: "auto", "reference" or "triton" (under torch.compile always the reference, which the
            compiler fuses itself). The triton backend writes mu's and log sigma's gradients into their
            gradient destinations, if they have them (see gradient_destination).
    Returns:
        z [B, Z] in mu's dtype; terms [B, 2] (KL, log ratio) in fp32, or fp64 for fp64 inputs.
    """
    for name, t in (("mu", mu), ("log_sigma", log_sigma), ("eps", eps)):
        _check_tensor(name, t, 2, "[B, Z]")
    if not mu.shape == log_sigma.shape == eps.shape:
        raise ValueError(f"mu, log_sigma and eps must have one shape [B, Z], got {list(mu.shape)}, "
                         f"{list(log_sigma.shape)} and {list(eps.shape)}")
    device = _check_same_device(mu=mu, log_sigma=log_sigma, eps=eps)
    if resolve_backend(backend, device) == "triton" and not torch.compiler.is_compiling():
        from draw.kernels import triton_latent

        return triton_latent.latent_sample(mu, log_sigma, eps, (gradient_destination(mu), gradient_destination(log_sigma)))
    return reference.latent_sample(mu, log_sigma, eps)


def lstm_cell(input_gates, hidden_gates: torch.Tensor, c: torch.Tensor, *, backend: str = "auto"):
    """nn.LSTMCell's update from its two pre-activation halves (biases included): gates [B, 4H] in
    nn.LSTMCell's order (input, forget, cell, output); c [B, H], cast to the gates' dtype as nn.LSTMCell
    does under autocast. The triton backend reads column slices of wider tensors and broadcast rows as
    they are.

    Args:
        input_gates: [B, 4H], or a Projection add + x W^T (DRAW's encoder input, Eq. 5) that the triton
            backend forms in the cell's kernel where it can (see Projection), else before the cell.
        hidden_gates: [B, 4H], input_gates' dtype (add's for a Projection), on one device.
        c: [B, H] the cell state.
        backend: "auto", "reference" or "triton" (under torch.compile always the reference, which the
            compiler fuses itself). The triton backend writes each half's gradient into its gradient
            destination, if it has one (see gradient_destination; a Projection's is add's).
    Returns:
        h, c' [B, H] in the gates' dtype.
    """
    _check_tensor("hidden_gates", hidden_gates, 2, "[B, 4H]")
    _check_tensor("c", c, 2, "[B, H]")
    gates_shape = (c.shape[0], 4 * c.shape[1])
    projection = input_gates if isinstance(input_gates, Projection) else None
    if projection is not None:
        _check_projection("input_gates", projection, *gates_shape, f" for c {list(c.shape)}")
        input_gates = projection.add
    _check_tensor("input_gates", input_gates, 2, "[B, 4H]")
    if not input_gates.shape == hidden_gates.shape == gates_shape:
        raise ValueError(f"input_gates and hidden_gates must be [B, 4H] = [{c.shape[0]}, {4 * c.shape[1]}] for c "
                         f"{list(c.shape)}, got {list(input_gates.shape)} and {list(hidden_gates.shape)}")
    if hidden_gates.dtype != input_gates.dtype:
        raise TypeError(f"input_gates and hidden_gates must have one dtype, got {input_gates.dtype} and {hidden_gates.dtype}")
    device = _check_same_device(input_gates=input_gates, hidden_gates=hidden_gates, c=c)
    c = c.to(input_gates.dtype)
    if resolve_backend(backend, device) == "triton" and not torch.compiler.is_compiling():
        from draw.kernels import triton_lstm

        destinations = (gradient_destination(input_gates), gradient_destination(hidden_gates))
        if _fused_projection(projection) and triton_lstm.projection_fusable(projection, c.shape[1]):
            return triton_lstm.lstm_cell(input_gates, hidden_gates, c, destinations, projection)
        if projection is not None:
            input_gates = projection.unfused()
            destinations = (gradient_destination(input_gates), destinations[1])
        return triton_lstm.lstm_cell(input_gates, hidden_gates, c, destinations)
    if projection is not None:
        input_gates = projection.unfused()
    return reference.lstm_cell(input_gates, hidden_gates, c)
