"""A linear map applied at every step of a recurrence, whose weight gradient is one matrix product.

DRAW multiplies its hidden states by the same matrices at each of T steps. Autograd differentiates
each use apart: per step and per matrix one small weight-gradient GEMM (on a GPU, often with a split-K
reduction after it), a bias reduction, and an add into the gradient accumulated so far; per training
step of `mnist-paper` (T = 64) that is thousands of small kernels. But the weight gradient of a map
used at every step is one product over all of them,

    dL/dW = sum_t G_t^T X_t = G^T X,    dL/db = sum_t sum_rows G_t,

with X = [X_0; ...; X_T] the stacked inputs [(T+1) B, in] and G the gradients of the outputs
[(T+1) B, out]. `RecurrentLinear` computes it so: each step's backward computes only the input's
gradient G_t W and keeps (X_t, G_t); after the last of them (the first step's), one GEMM and one
reduction give dW and db. The maths is the same; only float rounding differs (the sum runs inside
one GEMM instead of across T adds, so it is if anything more exact in bf16).

A step whose output is split into parts (`split=`, DRAW's stacked layers) writes its G_t, the parts'
gradients side by side, straight into its rows of one buffer for the whole pass: the cat that the split's
backward needs anyway puts them there, and G needs no second copy (at mnist-paper's batch 1024 in fp32,
the stacked maps' G is 0.9 GB, which a cat would read and write again).

Under torch.compile, without grad, or when neither weight nor bias needs a gradient, it is plain
`F.linear` / `torch.addmm`.
"""

import torch
import torch.nn.functional as F


class _Pass:
    """What one RecurrentLinear keeps between its steps' backward calls and the collector's: per step
    (graph task, first row, X_t, G_t), appended by each step's backward, and per graph task the buffer of
    the split steps' G rows (rows: every step's rows, in the order of the forward calls) and a zero."""

    def __init__(self):
        self.steps, self.buffers, self.rows = [], {}, 0

    def buffer(self, like: torch.Tensor, width: int) -> torch.Tensor:
        """This backward pass's G buffer [rows, width] in like's dtype and device, made on first use, and
        beside it a zero, which the steps expand as the gradient of a part no loss reached (one fill per
        pass, not one per step)."""
        task = torch._C._current_graph_task_id()
        if task not in self.buffers:
            self.buffers[task] = like.new_empty(self.rows, width), like.new_zeros(())
        return self.buffers[task]


class _WeightGradients(torch.autograd.Function):
    """The collector: its output (an empty token) is an input of every step, so autograd runs its backward
    after all of theirs; it returns the weight and bias gradients of all the steps at once."""

    @staticmethod
    def forward(ctx, state: _Pass, weight, bias):
        ctx.state = state
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        return weight.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        # this backward pass's steps; a pass that did not reach this node (autograd.grad of other
        # inputs, with retain_graph) left its own, which must not count here
        state, this_pass = ctx.state, torch._C._current_graph_task_id()
        steps = sorted(((row, x, g) for task, row, x, g in state.steps if task == this_pass), key=lambda s: s[0])
        buffer, _ = state.buffers.get(this_pass, (None, None))
        state.steps.clear()
        state.buffers.clear()
        if not steps:  # no step's output reached the loss
            return None, None, None
        if buffer is not None and all(g._base is buffer for _, _, g in steps) \
                and sum(g.shape[0] for _, _, g in steps) == buffer.shape[0]:
            grads = buffer  # every step wrote its rows there: G as it stands
        else:
            grads = torch.cat([g for _, _, g in steps])  # G [rows, out]
        inputs = torch.cat([x.to(grads.dtype) for _, x, _ in steps])  # X [rows, in]
        grad_weight = grads.t() @ inputs  # [out, in]
        grad_bias = grads.sum(0) if ctx.has_bias else None  # [out]
        return None, grad_weight, grad_bias


class _Step(torch.autograd.Function):
    """y = addend + x W^T, addend a tensor [B, out] (its gradient passes through) or the bias [out];
    with `split` sizes, y's parts along its columns (one output each)."""

    @staticmethod
    def forward(ctx, x, weight, addend, token, state: _Pass, addend_is_bias: bool, split):
        ctx.state, ctx.row, ctx.split = state, state.rows, split
        state.rows += x.shape[0]
        ctx.addend_is_bias = addend_is_bias
        ctx.set_materialize_grads(False)
        if torch.is_autocast_enabled(x.device.type):  # keep the operand the product multiplies
            x = x.to(torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(x, weight)
        y = x @ weight.t() if addend is None else torch.addmm(addend, x, weight.t())
        return y if split is None else y.split(split, dim=1)

    @staticmethod
    def backward(ctx, *grads):
        if all(g is None for g in grads):
            return (None,) * 7
        x, weight = ctx.saved_tensors
        if ctx.split is None:
            grad = grads[0]
        else:  # the parts' gradients side by side, in this step's rows of the pass's buffer (unused parts: 0)
            like = next(g for g in grads if g is not None)
            buffer, zero = ctx.state.buffer(like, sum(ctx.split))
            parts = [g if g is not None else zero.expand(like.shape[0], size) for g, size in zip(grads, ctx.split)]
            rows = buffer[ctx.row: ctx.row + like.shape[0]]
            grad = torch.cat(parts, dim=1, out=rows)
        ctx.state.steps.append((torch._C._current_graph_task_id(), ctx.row, x, grad))
        grad_x = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_addend = grad if ctx.needs_input_grad[2] and not ctx.addend_is_bias else None
        return grad_x, None, grad_addend, None, None, None, None


class RecurrentLinear:
    """x W^T + b, with W [out, in] and b [out] (or None) shared by every step of a recurrence; their
    gradients come as one GEMM over all the steps (see the module docstring).

    Make one per forward pass, after any cast of W and b, and call it at every step:

        dec = RecurrentLinear(weight, bias)
        for t in range(T):
            p = dec(h)                       # h W^T + b
            q = dec(h, add=a)                # h W^T + a, a [B, out] (b unused)
            u, v = dec(h, split=[3, 5])      # (h W^T + b).split([3, 5], dim=1), out = 8
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        needs_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
        self.batched = needs_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if self.batched:
            self._state = _Pass()
            self._token = _WeightGradients.apply(self._state, weight, bias)

    def __call__(self, x: torch.Tensor, *, add: torch.Tensor | None = None, split: list[int] | None = None):
        """x [B, in] -> [B, out]: x W^T + b, or x W^T + add; with `split`, its parts [B, size] along the
        columns (a tuple)."""
        if not self.batched:
            y = F.linear(x, self.weight, self.bias) if add is None else torch.addmm(add, x, self.weight.t())
            return y if split is None else y.split(split, dim=1)
        addend = self.bias if add is None else add
        return _Step.apply(x, self.weight, addend, self._token, self._state, add is None,
                           None if split is None else list(split))
