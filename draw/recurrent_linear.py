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

Under torch.compile, without grad, or when neither weight nor bias needs a gradient, it is plain
`F.linear` / `torch.addmm`.
"""

import torch
import torch.nn.functional as F


class _WeightGradients(torch.autograd.Function):
    """The collector: its output (an empty token) is an input of every step, so autograd runs its backward
    after all of theirs; it returns the weight and bias gradients of all the steps at once."""

    @staticmethod
    def forward(ctx, steps: list, weight, bias):
        ctx.steps = steps  # (backward pass, X_t, G_t), appended by each step's backward
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        return weight.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        # this backward pass's steps; a pass that did not reach this node (autograd.grad of other
        # inputs, with retain_graph) left its own, which must not count here
        this_pass = torch._C._current_graph_task_id()
        steps = [(x, g) for task, x, g in ctx.steps if task == this_pass]
        ctx.steps.clear()
        if not steps:  # no step's output reached the loss
            return None, None, None
        grads = torch.cat([g for _, g in steps])  # G [rows, out]
        inputs = torch.cat([x.to(grads.dtype) for x, _ in steps])  # X [rows, in]
        grad_weight = grads.t() @ inputs  # [out, in]
        grad_bias = grads.sum(0) if ctx.has_bias else None  # [out]
        return None, grad_weight, grad_bias


class _Step(torch.autograd.Function):
    """y = addend + x W^T, addend a tensor [B, out] (its gradient passes through) or the bias [out]."""

    @staticmethod
    def forward(ctx, x, weight, addend, token, steps: list, addend_is_bias: bool):
        ctx.steps = steps
        ctx.addend_is_bias = addend_is_bias
        ctx.set_materialize_grads(False)
        if torch.is_autocast_enabled(x.device.type):  # keep the operand the product multiplies
            x = x.to(torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(x, weight)
        return x @ weight.t() if addend is None else torch.addmm(addend, x, weight.t())

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return (None,) * 6
        x, weight = ctx.saved_tensors
        ctx.steps.append((torch._C._current_graph_task_id(), x, grad))
        grad_x = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_addend = grad if ctx.needs_input_grad[2] and not ctx.addend_is_bias else None
        return grad_x, None, grad_addend, None, None, None


class RecurrentLinear:
    """x W^T + b, with W [out, in] and b [out] (or None) shared by every step of a recurrence; their
    gradients come as one GEMM over all the steps (see the module docstring).

    Make one per forward pass, after any cast of W and b, and call it at every step:

        dec = RecurrentLinear(weight, bias)
        for t in range(T):
            p = dec(h)                       # h W^T + b
            q = dec(h, add=a)                # h W^T + a, a [B, out] (b unused)
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        needs_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
        self.batched = needs_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if self.batched:
            self._steps = []
            self._token = _WeightGradients.apply(self._steps, weight, bias)

    def __call__(self, x: torch.Tensor, *, add: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, in] -> [B, out]: x W^T + b, or x W^T + add."""
        if not self.batched:
            return F.linear(x, self.weight, self.bias) if add is None else torch.addmm(add, x, self.weight.t())
        addend = self.bias if add is None else add
        return _Step.apply(x, self.weight, addend, self._token, self._steps, add is None)
