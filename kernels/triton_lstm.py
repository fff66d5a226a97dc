"""A fused Triton kernel for the LSTM cell's pointwise update, forward and backward.

The maths is nn.LSTMCell's (kernels/reference.py, lstm_cell), from the two pre-activation halves of the
gates, each [B, 4H] in nn.LSTMCell's order (input, forget, cell, output), biases included:
    a = input_gates + hidden_gates;  i, f, o = sigmoid(a_i, a_f, a_o);  g = tanh(a_g)
    c' = f c + i g;  h = o tanh(c')
and with dh, dc' the gradients of h and c' (either may be absent, i.e. zero), k = tanh(c'):
    dc   = dc' + dh o (1 - k^2)            (the gradient reaching c')
    da_i = dc g i (1 - i);   da_f = dc c f (1 - f);   da_g = dc i (1 - g^2);   da_o = dh k o (1 - o)
    d input_gates = d hidden_gates = da;   d c = dc f

The forward saves the summed pre-activations a [B, 4H] in the gates' dtype, and the backward reads them,
c and c' and takes the activations again. (CUDA's fused cell, the one nn.LSTMCell uses, saves the
activated gates instead: in bf16 a gate near 1 then rounds to 1, or to 1 - 2^-8, and its derivative
i (1 - i) to 0 or double; from a rounded a the derivative is right to bf16's relative precision. Under
bf16 autocast a small DRAW's loss and gradients were 2.8x further from fp32 than the reference's that
way, 1.8x with a: tests/test_triton_attention.py, test_the_model_under_bf16_autocast.) What this kernel
adds to that cell: its inputs may be column slices of wider tensors (DRAW's stacked projections), and the
backward writes da where its caller asks, into one or two places: where DRAW's recurrent maps keep their output
gradients (kernels.gradient_destination, draw/recurrent_linear.py), so that no concatenation copies it
there afterwards.

Bytes (s per element, B x H): forward s * 15 B H (both halves and c in; h, c' and the gates out),
backward s * 8 B H + s * 4 B H per place da is written (+ s B H for dc).

The input half may come as a Projection, add + x W^T (kernels.Projection: DRAW's encoder input W_r r_t +
the part from h_dec, Eq. 5), formed here (PROJECTED): the forward adds sum_j x[b, j] W[g, j] to each gate's
pre-activation, K = x's width FMAs per gate element, and the backward forms x's gradient dx = da W from the
gate gradients in registers, which needs the whole of a row's 4H gates in one program (hidden units up to
_TILE; projection_fusable). Both one column of x at a time.

Program layout: program (p, q) owns rows [p BLOCK_B, (p + 1) BLOCK_B) and hidden units
[q BLOCK_H, (q + 1) BLOCK_H), the four gate columns of each. Computation in fp32 (fp64 when any input
is fp64); every output is stored in its tensor's dtype.
"""

import torch
import triton
import triton.language as tl

from draw.kernels.triton_attention import (_backward, _cast_for_store, _checked_place, _compute_dtypes, _device_guard,
                                          _gradient_output, _gradient_places)

__all__ = ["lstm_cell", "lstm_cell_backward", "lstm_cell_forward"]

# [BLOCK_B, BLOCK_H] per program over 4 warps: each thread holds 4 elements of each gate's tile (the
# latent kernel's tile size).
_TILE = 512
_NUM_WARPS = 4
# A Projection's x formed in the kernels up to this many columns (mnist-paper's glimpses: 8; mnist-quick's: 128),
# one column at a time: K rank-one updates of the gate tiles forward, K row sums backward.
_PROJECTION_MAX_INPUTS = 128


@triton.jit
def _load_gate(ptr, offsets, k, hidden, mask, COMPUTE_DTYPE: tl.constexpr):
    """Gate k's [BLOCK_B, BLOCK_H] tile of a [B, 4H] tensor (offsets: the tile's offsets of gate 0)."""
    return tl.load(ptr + offsets + k * hidden, mask=mask, other=0.0).to(COMPUTE_DTYPE)


@triton.jit
def _summed_gate(input_ptr, hidden_gates_ptr, at_input, at_hidden, k, hidden, mask, COMPUTE_DTYPE: tl.constexpr):
    """Gate k's pre-activation a_k: its two halves' [BLOCK_B, BLOCK_H] tiles added."""
    return (_load_gate(input_ptr, at_input, k, hidden, mask, COMPUTE_DTYPE)
            + _load_gate(hidden_gates_ptr, at_hidden, k, hidden, mask, COMPUTE_DTYPE))


@triton.jit
def _store_gates(ptr, offsets, hidden, mask, i, f, g, o):
    """The four gates' tiles into a [B, 4H] tensor (offsets: the tile's offsets of gate 0)."""
    tl.store(ptr + offsets, _cast_for_store(i, ptr), mask=mask)
    tl.store(ptr + offsets + hidden, _cast_for_store(f, ptr), mask=mask)
    tl.store(ptr + offsets + 2 * hidden, _cast_for_store(g, ptr), mask=mask)
    tl.store(ptr + offsets + 3 * hidden, _cast_for_store(o, ptr), mask=mask)


@triton.jit
def _tanh(x):
    """tanh(x) to the compute dtype's precision at every x (2 sigmoid(2x) - 1 loses it all near 0: 0 for
    x = 1e-13 in fp32): the [7/6] Pade approximant where |x| <= 0.5 (relative error below 5e-16), and
    (1 - e) / (1 + e) with e = exp(-2 |x|) <= 1 / e beyond, where 1 - e cancels nothing."""
    a = tl.abs(x)
    a2 = a * a
    near = a * (135135 + a2 * (17325 + a2 * (378 + a2))) / (135135 + a2 * (62370 + a2 * (3150 + 28 * a2)))
    e = tl.exp(-2 * a)
    t = tl.where(a <= 0.5, near, (1 - e) / (1 + e))
    return tl.where(x < 0, -t, t)


@triton.jit
def _projection_column(weight_ptr, cols, j, hidden, stride_wg, COMPUTE_DTYPE: tl.constexpr):
    """Column j of W [4H, K] for the four gates and the hidden units cols [1, BLOCK_H]: W[k H + h, j], four
    [1, BLOCK_H] tiles, zero past H."""
    column = weight_ptr + cols * stride_wg + j
    mask = cols < hidden
    return (tl.load(column, mask=mask, other=0.0).to(COMPUTE_DTYPE),
            tl.load(column + hidden * stride_wg, mask=mask, other=0.0).to(COMPUTE_DTYPE),
            tl.load(column + 2 * hidden * stride_wg, mask=mask, other=0.0).to(COMPUTE_DTYPE),
            tl.load(column + 3 * hidden * stride_wg, mask=mask, other=0.0).to(COMPUTE_DTYPE))


@triton.jit
def _projected_gates(x_ptr, weight_ptr, rows, cols, batch, hidden, inputs, stride_xb, stride_wg,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """x W^T's four gate tiles [BLOCK_B, BLOCK_H] (the Projection's product, Eq. 5's W_r r_t): sum_j x[b, j]
    W[k H + h, j], one column j of x at a time (rank-one updates: no tile wider than the gates')."""
    p_i = tl.zeros([BLOCK_B, BLOCK_H], dtype=COMPUTE_DTYPE)
    p_f = tl.zeros([BLOCK_B, BLOCK_H], dtype=COMPUTE_DTYPE)
    p_g = tl.zeros([BLOCK_B, BLOCK_H], dtype=COMPUTE_DTYPE)
    p_o = tl.zeros([BLOCK_B, BLOCK_H], dtype=COMPUTE_DTYPE)
    for j in range(0, inputs):
        x = tl.load(x_ptr + rows * stride_xb + j, mask=rows < batch, other=0.0).to(COMPUTE_DTYPE)  # [BLOCK_B, 1]
        w_i, w_f, w_g, w_o = _projection_column(weight_ptr, cols, j, hidden, stride_wg, COMPUTE_DTYPE)
        p_i += x * w_i
        p_f += x * w_f
        p_g += x * w_g
        p_o += x * w_o
    return p_i, p_f, p_g, p_o


@triton.jit
def _projection_backward(da_i, da_f, da_g, da_o, weight_ptr, grad_x_ptr, rows, cols, batch, hidden, inputs,
                         stride_wg, COMPUTE_DTYPE: tl.constexpr):
    """x's gradient through the Projection, dx[b, j] = sum_k sum_h da_k[b, h] W[k H + h, j], one column j at
    a time, stored contiguous [B, K] in grad_x's dtype; the program holds every hidden unit of its rows."""
    for j in range(0, inputs):
        w_i, w_f, w_g, w_o = _projection_column(weight_ptr, cols, j, hidden, stride_wg, COMPUTE_DTYPE)
        grad_x = tl.sum(da_i * w_i + da_f * w_f + da_g * w_g + da_o * w_o, axis=1, keep_dims=True)  # [BLOCK_B, 1]
        tl.store(grad_x_ptr + rows * inputs + j, _cast_for_store(grad_x, grad_x_ptr), mask=rows < batch)


@triton.jit
def _lstm_forward_kernel(
    input_ptr, hidden_gates_ptr, c_ptr, h_ptr, c_new_ptr, gates_ptr,  # gates: the summed pre-activations
    x_ptr, weight_ptr,
    batch, hidden, inputs, stride_ib, stride_gb, stride_cb, stride_xb, stride_wg,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    PROJECTED: tl.constexpr,
):
    # The inputs' rows are strided (stride_*b), their columns contiguous; c may be a state broadcast
    # over the batch (stride_cb 0). h, c' [B, H] and the pre-activations a [B, 4H] are contiguous.
    # PROJECTED: the input half is add + x W^T (input_ptr: add; x [B, inputs] rows strided by stride_xb,
    # W [4H, inputs] rows by stride_wg), its product formed here.
    rows = (tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B))[:, None]
    cols = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :]
    mask = (rows < batch) & (cols < hidden)
    at_input, at_hidden = rows * stride_ib + cols, rows * stride_gb + cols
    a_i = _summed_gate(input_ptr, hidden_gates_ptr, at_input, at_hidden, 0, hidden, mask, COMPUTE_DTYPE)
    a_f = _summed_gate(input_ptr, hidden_gates_ptr, at_input, at_hidden, 1, hidden, mask, COMPUTE_DTYPE)
    a_g = _summed_gate(input_ptr, hidden_gates_ptr, at_input, at_hidden, 2, hidden, mask, COMPUTE_DTYPE)
    a_o = _summed_gate(input_ptr, hidden_gates_ptr, at_input, at_hidden, 3, hidden, mask, COMPUTE_DTYPE)
    if PROJECTED:  # (5): + W_r r_t
        p_i, p_f, p_g, p_o = _projected_gates(x_ptr, weight_ptr, rows, cols, batch, hidden, inputs, stride_xb,
                                              stride_wg, BLOCK_B, BLOCK_H, COMPUTE_DTYPE)
        a_i, a_f, a_g, a_o = a_i + p_i, a_f + p_f, a_g + p_g, a_o + p_o
    c = tl.load(c_ptr + rows * stride_cb + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    c_new = tl.sigmoid(a_f) * c + tl.sigmoid(a_i) * _tanh(a_g)
    state = rows * hidden + cols
    tl.store(h_ptr + state, _cast_for_store(tl.sigmoid(a_o) * _tanh(c_new), h_ptr), mask=mask)
    tl.store(c_new_ptr + state, _cast_for_store(c_new, c_new_ptr), mask=mask)
    _store_gates(gates_ptr, rows * 4 * hidden + cols, hidden, mask, a_i, a_f, a_g, a_o)


@triton.jit
def _lstm_backward_kernel(
    grad_h_ptr, grad_c_new_ptr, gates_ptr, c_ptr, c_new_ptr, grad_gates_ptr, grad_gates_2_ptr, grad_c_ptr,
    weight_ptr, grad_x_ptr,
    batch, hidden, inputs, stride_hb, stride_nb, stride_cb, stride_db, stride_eb, stride_wg,
    HAS_GRAD_H: tl.constexpr, HAS_GRAD_C_NEW: tl.constexpr, STORE_SECOND: tl.constexpr, STORE_GRAD_C: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    PROJECTED: tl.constexpr,
):
    # da is written into grad_gates (rows strided by stride_db) and, with STORE_SECOND, grad_gates_2
    # (stride_eb); dc (STORE_GRAD_C) is contiguous [B, H]. A missing gradient of h or c' is zero and its
    # pointer never read. a (gates_ptr) and c' are the forward's (contiguous); c as the forward read it.
    rows = (tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B))[:, None]
    cols = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :]
    mask = (rows < batch) & (cols < hidden)
    at_gates = rows * 4 * hidden + cols
    i = tl.sigmoid(_load_gate(gates_ptr, at_gates, 0, hidden, mask, COMPUTE_DTYPE))
    f = tl.sigmoid(_load_gate(gates_ptr, at_gates, 1, hidden, mask, COMPUTE_DTYPE))
    g = _tanh(_load_gate(gates_ptr, at_gates, 2, hidden, mask, COMPUTE_DTYPE))
    o = tl.sigmoid(_load_gate(gates_ptr, at_gates, 3, hidden, mask, COMPUTE_DTYPE))
    state = rows * hidden + cols
    k = _tanh(tl.load(c_new_ptr + state, mask=mask, other=0.0).to(COMPUTE_DTYPE))
    if HAS_GRAD_H:
        grad_h = tl.load(grad_h_ptr + rows * stride_hb + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    else:
        grad_h = tl.zeros([BLOCK_B, BLOCK_H], dtype=COMPUTE_DTYPE)
    grad_c = grad_h * o * (1 - k * k)  # the gradient reaching c' through h
    if HAS_GRAD_C_NEW:
        grad_c += tl.load(grad_c_new_ptr + rows * stride_nb + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    c = tl.load(c_ptr + rows * stride_cb + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    da_i = grad_c * g * i * (1 - i)
    da_f = grad_c * c * f * (1 - f)
    da_g = grad_c * i * (1 - g * g)
    da_o = grad_h * k * o * (1 - o)
    _store_gates(grad_gates_ptr, rows * stride_db + cols, hidden, mask, da_i, da_f, da_g, da_o)
    if STORE_SECOND:
        _store_gates(grad_gates_2_ptr, rows * stride_eb + cols, hidden, mask, da_i, da_f, da_g, da_o)
    if STORE_GRAD_C:
        tl.store(grad_c_ptr + state, _cast_for_store(grad_c * f, grad_c_ptr), mask=mask)
    if PROJECTED:  # x's gradient through the input half's product, dx = da W (the program holds all 4H gates)
        _projection_backward(da_i, da_f, da_g, da_o, weight_ptr, grad_x_ptr, rows, cols, batch, hidden, inputs,
                             stride_wg, COMPUTE_DTYPE)


def _blocks(batch: int, hidden: int) -> tuple[tuple[int, int], dict]:
    """The grid and the launch settings for B rows of H hidden units."""
    block_h = min(triton.next_power_of_2(max(hidden, 1)), _TILE)
    block_b = max(_TILE // block_h, 1)
    grid = (triton.cdiv(batch, block_b), triton.cdiv(hidden, block_h))
    return grid, {"BLOCK_B": block_b, "BLOCK_H": block_h, "num_warps": _NUM_WARPS}


def _columns(t: torch.Tensor | None) -> torch.Tensor | None:
    """t with contiguous columns (the kernels stride rows only): t itself if it has them (a column slice
    of a wider tensor does), else a contiguous copy."""
    return t if t is None or t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def projection_fusable(projection, hidden: int) -> bool:
    """Whether the kernels form a kernels.Projection as the input half of a cell of `hidden` units: every
    hidden unit in one program (the backward's dx sums over all 4H gates of a row), x at most
    _PROJECTION_MAX_INPUTS wide."""
    return hidden <= _TILE and projection.x.shape[1] <= _PROJECTION_MAX_INPUTS


def _projection_args(projection, like: torch.Tensor) -> tuple[list, dict]:
    """The kernels' (x or dx's place, W) pointers, x's width and W's row stride, and the PROJECTED
    constexprs, for projection = (x or dx, W) or None (then any valid pointer: never read)."""
    x, weight = (like, like) if projection is None else (projection[0], _columns(projection[1]))
    inputs = 0 if projection is None else x.shape[1]
    return [x, weight, inputs, weight.stride(0)], {"PROJECTED": projection is not None}


def lstm_cell_forward(input_gates: torch.Tensor, hidden_gates: torch.Tensor, c: torch.Tensor, projection=None):
    """Launch the forward kernel. input_gates, hidden_gates [B, 4H]; c [B, H] (any strides; rows strided
    or broadcast cost no copy). projection = (x [B, K], W [4H, K]): the input half is input_gates + x W^T,
    its product formed in the kernel (projection_fusable). Returns h, c' [B, H] and the summed
    pre-activations a [B, 4H], all contiguous in input_gates' dtype."""
    batch, hidden = c.shape
    h = torch.empty((batch, hidden), device=c.device, dtype=input_gates.dtype)
    c_new = torch.empty_like(h)
    gates = torch.empty((batch, 4 * hidden), device=c.device, dtype=input_gates.dtype)
    if h.numel() == 0:
        return h, c_new, gates
    _, compute = _compute_dtypes(input_gates, hidden_gates, c, *(projection or ()))
    input_gates, hidden_gates, c = _columns(input_gates), _columns(hidden_gates), _columns(c)
    projection = None if projection is None else (_columns(projection[0]), projection[1])
    (x, weight, inputs, stride_wg), projected = _projection_args(projection, c)
    grid, blocks = _blocks(batch, hidden)
    with _device_guard(c):
        _lstm_forward_kernel[grid](
            input_gates, hidden_gates, c, h, c_new, gates, x, weight, batch, hidden, inputs,
            input_gates.stride(0), hidden_gates.stride(0), c.stride(0), x.stride(0), stride_wg,
            COMPUTE_DTYPE=compute, **projected, **blocks)
    return h, c_new, gates


def lstm_cell_backward(grad_h, grad_c_new, gates, c, c_new, c_needs_grad: bool, out=None, out_2=None, projection=None):
    """Launch the backward kernel. grad_h, grad_c_new [B, H] may be None (zero); gates, c_new from the
    forward, c as it was given. da [B, 4H] is written into `out` (a new tensor in gates' dtype when None)
    and into `out_2` too when given (each gates' shape and dtype, contiguous columns, any row stride).
    projection = (x [B, K], W [4H, K]) of the forward: also dx = da W, formed in the kernel.
    Returns (da, the second place or None, dc [B, H] in c's dtype or None, dx [B, K] in x's dtype or None)."""
    batch, hidden = c_new.shape
    da = _gradient_output(out, gates)
    out_2 = None if out_2 is None else _checked_place(out_2, gates)
    grad_c = torch.empty((batch, hidden), device=c.device, dtype=c.dtype) if c_needs_grad else None
    grad_x = None if projection is None else torch.empty(projection[0].shape, device=c.device, dtype=projection[0].dtype)
    if c_new.numel() == 0:
        return da, out_2, grad_c, None if grad_x is None else grad_x.zero_()  # no gate: dx = da W = 0
    _, compute = _compute_dtypes(gates, c, c_new, *(() if projection is None else projection))  # as the forward's
    grad_h, grad_c_new, c = _columns(grad_h), _columns(grad_c_new), _columns(c)
    (_, weight, inputs, stride_wg), projected = _projection_args(
        None if projection is None else (grad_x, projection[1]), gates)
    grid, blocks = _blocks(batch, hidden)
    with _device_guard(gates):
        _lstm_backward_kernel[grid](
            gates if grad_h is None else grad_h, gates if grad_c_new is None else grad_c_new,  # never read when None
            gates, c, c_new, da, da if out_2 is None else out_2, da if grad_c is None else grad_c,
            weight, gates if grad_x is None else grad_x,
            batch, hidden, inputs,
            0 if grad_h is None else grad_h.stride(0), 0 if grad_c_new is None else grad_c_new.stride(0),
            c.stride(0), da.stride(0), 0 if out_2 is None else out_2.stride(0), stride_wg,
            HAS_GRAD_H=grad_h is not None, HAS_GRAD_C_NEW=grad_c_new is not None, STORE_SECOND=out_2 is not None,
            STORE_GRAD_C=c_needs_grad, COMPUTE_DTYPE=compute, **projected, **blocks)
    return da, out_2, grad_c, grad_x


class _LSTMCellFunction(torch.autograd.Function):
    """The cell; with a Projection (kernels.Projection) its input half is the projection's add, and x the
    input whose product it forms: x's gradient from the kernel, add's the input half's, and W's handed to
    its owner (Projection.record)."""

    @staticmethod
    def forward(ctx, input_gates, hidden_gates, c, destinations, projection=None, x=None, token=None):
        weight = None if projection is None else projection.weight
        h, c_new, gates = lstm_cell_forward(input_gates, hidden_gates, c, None if projection is None else (x, weight))
        ctx.save_for_backward(gates, c, c_new, *(() if projection is None else (x, weight)))
        # of the projection, its owner's record alone: the Projection holds add and unfused(), which close over
        # the map's output, and ctx's attributes live as long as the graph (x and W are saved above)
        ctx.destinations, ctx.projected = destinations, projection is not None
        ctx.record = None if projection is None else projection.record
        ctx.set_materialize_grads(False)
        return h, c_new

    @staticmethod
    def backward(ctx, grad_h, grad_c_new):
        if grad_h is None and grad_c_new is None:
            return (None,) * 7
        saved = ctx.saved_tensors  # unpacked once (saved-tensor hooks, non-reentrant checkpointing, allow no more)
        gates, c, c_new = saved[:3]
        needs_input, needs_hidden, needs_c = ctx.needs_input_grad[:3]
        projected = ctx.projected
        x, weight = saved[3:] if projected else (None, None)
        needs_x = projected and ctx.needs_input_grad[5]
        # where each half's gradient is to go (kernels.gradient_destination), asked only for a half that
        # needs one (a projection's always: its owner takes it for W's gradient): the same da is written
        # into each place given, else into one new tensor
        places = _gradient_places(ctx.destinations, (needs_input or projected, needs_hidden))
        given = [p for p in places if p is not None]
        da, _, grad_c, grad_x = _backward(lstm_cell_backward, grad_h, grad_c_new, gates, c, c_new, needs_c,
                                          given[0] if given else None, given[1] if len(given) > 1 else None,
                                          (x, weight) if needs_x else None)
        grads = [p if p is not None else da for p in places]
        if projected:
            ctx.record(x, grads[0])  # the product's output gradient: the input half's
        return (grads[0] if needs_input else None, grads[1] if needs_hidden else None,
                grad_c if needs_c else None, None, None, grad_x if needs_x else None, None)


def lstm_cell(input_gates: torch.Tensor, hidden_gates: torch.Tensor, c: torch.Tensor, destinations=(None, None),
              projection=None):
    """Fused LSTM cell (see the module docstring). input_gates, hidden_gates [B, 4H]; c [B, H], in one
    dtype. destinations: for each half, None or a callable giving, once, the tensor
    its gradient is to be written into (kernels.gradient_destination). projection: None, or a
    kernels.Projection whose add is input_gates (projection_fusable): the input half is then add + x W^T,
    formed in the kernels. Returns h, c' [B, H] in input_gates' dtype."""
    if projection is None:
        return _LSTMCellFunction.apply(input_gates, hidden_gates, c, destinations)
    return _LSTMCellFunction.apply(input_gates, hidden_gates, c, destinations, projection, projection.x, projection.token)
