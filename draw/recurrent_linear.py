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
gradients side by side, straight into its rows of one buffer for the whole pass, and G needs no second
copy (at mnist-paper's batch 1024 in fp32, the stacked maps' G is 0.9 GB). Better still, each part is
marked with its place in that buffer (kernels.mark_gradient_destination): the fused kernels that consume
the parts (triton backend) write their gradients there, and a step whose parts all arrive in place copies
nothing; parts that arrive elsewhere are copied in (all of them in one cat when none arrived in place).
Columns past the parts (padding to an aligned width) are never read, and their gradient is zero.

Under torch.compile, without grad, or when neither weight nor bias needs a gradient, it is plain
`F.linear` / `torch.addmm`.
"""

import torch
import torch.nn.functional as F

from draw import kernels


class _Pass:
    """What one RecurrentLinear keeps between its steps' backward calls and the collector's: per step
    (graph task, first row, X_t, G_t, whether the step added the bias), appended by each step's backward
    (`record`), and per graph task the buffer of the split steps' G rows (rows: every step's rows, in the
    order of the forward calls), a zero, and the places handed out in it. A pass's entries go when its
    backward ends (`_forget_at_the_end`) or at the collector, whether or not it reached the collector:
    autograd.grad of other inputs with retain_graph (a penalty on x's gradient) would otherwise keep its G,
    0.9 GB a pass at mnist-paper's batch of 1024, until a later pass reached the collector."""

    def __init__(self, width: int):
        self.steps, self.buffers, self.taken, self.rows, self.width = [], {}, {}, 0, width
        self.watched = set()  # the graph tasks whose end will drop their entries

    def _forget_at_the_end(self, task: int) -> None:
        """Drop `task`'s entries when its backward pass ends (autograd's end-of-pass callback)."""
        if task not in self.watched:
            self.watched.add(task)
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self.forget(task))

    def forget(self, task: int) -> None:
        """Drop `task`'s entries: at the collector (its pass is done with them), else when its pass ends."""
        self.steps = [step for step in self.steps if step[0] != task]
        self.buffers.pop(task, None)
        self.taken.pop(task, None)
        self.watched.discard(task)

    def record(self, row: int, x: torch.Tensor, grad: torch.Tensor, uses_bias: bool) -> None:
        """A step's (X_t, G_t), for the collector of this backward pass."""
        task = torch._C._current_graph_task_id()
        self._forget_at_the_end(task)
        self.steps.append((task, row, x, grad, uses_bias))

    def buffer(self, dtype: torch.dtype, device: torch.device, used: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This backward pass's G buffer [rows, width], a zero in dtype on device, and the first column zeroed
        in every row: made on first use, with the columns past that step's `used` ones (padding) zeroed then,
        once per pass (a step that uses fewer zeroes the rest of its own rows)."""
        task = torch._C._current_graph_task_id()
        if task not in self.buffers:
            self._forget_at_the_end(task)
            buffer = torch.empty(self.rows, self.width, dtype=dtype, device=device)
            if used < self.width:
                buffer[:, used:].zero_()
            self.buffers[task] = buffer, torch.zeros((), dtype=dtype, device=device), used
        return self.buffers[task]

    def place(self, row: int, col: int, size: int, used: int, dtype: torch.dtype, device: torch.device):
        """The gradient destination of a step's part (kernels.mark_gradient_destination): its columns
        [col, col + size) of the rows from `row`, in this pass's buffer, handed out once per pass."""
        def take(shape: torch.Size) -> torch.Tensor | None:
            taken = self.taken.setdefault(torch._C._current_graph_task_id(), set())
            if (row, col) in taken:
                return None
            taken.add((row, col))
            buffer = self.buffer(dtype, device, used)[0]
            return buffer[row: row + shape[0], col: col + size].view(shape)
        return take

    def was_taken(self, row: int, col: int) -> bool:
        """Whether the place at (row, col) was handed out in this backward pass."""
        return (row, col) in self.taken.get(torch._C._current_graph_task_id(), ())


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
        steps = sorted(((row, x, g, biased) for task, row, x, g, biased in state.steps if task == this_pass),
                       key=lambda s: s[0])
        state.forget(this_pass)
        if not steps:  # no step's output reached the loss
            return None, None, None
        parts = [g for _, _, g, _ in steps]
        grads = _back_to_back(parts)  # G where it lies: this map's buffer, or rows of another map's
        grads = torch.cat(parts) if grads is None else grads  # G [rows, out]
        inputs = torch.cat([x.to(grads.dtype) for _, x, _, _ in steps])  # X [rows, in]
        grad_weight = grads.t() @ inputs  # [out, in]
        grad_bias = None  # [out]: the sum of the G of the steps that added b (not those given `add`)
        biased = [g for _, _, g, uses_bias in steps if uses_bias]
        if ctx.has_bias and biased:
            grad_bias = grads.sum(0) if len(biased) == len(steps) else torch.stack([g.sum(0) for g in biased]).sum(0)
        return None, grad_weight, grad_bias


def _back_to_back(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The parts [B_i, out] stacked [sum B_i, out] as one view, when they lie back to back in one buffer (rows
    one stride apart, in order, the same columns); else None. A split map's G, in its own buffer, lies so;
    so do the G of a map whose steps' gradients were written in place into another map's buffer (DRAW's
    maps from r and z: their outputs' gradients are the gate gradients in the h_dec map's buffer)."""
    first = parts[0]
    base, stride, offset = first._base, first.stride(), first.storage_offset()
    if base is None or first.dim() != 2 or torch.is_grad_enabled():  # a double backward (create_graph):
        return None  # autograd would see the view as first's alone, the other parts' graphs lost; cat them
    for part in parts:
        if part._base is not base or part.stride() != stride or part.shape[1] != first.shape[1] \
                or part.storage_offset() != offset:
            return None
        offset += part.shape[0] * stride[0]
    return first.as_strided((sum(part.shape[0] for part in parts), first.shape[1]), stride)


def _in_place(grad: torch.Tensor | None, place: torch.Tensor) -> bool:
    """True if grad is the tensor at `place` (its consumer wrote it there)."""
    return grad is not None and grad.data_ptr() == place.data_ptr() and grad.stride() == place.stride()


class _Step(torch.autograd.Function):
    """y = addend + x W^T, addend a tensor [B, out] (its gradient passes through) or the bias [out];
    with `split` sizes, y's parts along its first sum(split) columns (one output each)."""

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
        if split is None:
            return y
        return y.split([*split, y.shape[1] - sum(split)], dim=1)[:len(split)]

    @staticmethod
    def backward(ctx, *grads):
        if all(g is None for g in grads):
            return (None,) * 7
        x, weight = ctx.saved_tensors
        if ctx.split is None:
            grad = grads[0]
        else:  # the parts' gradients side by side, in this step's rows of the pass's buffer (unused parts: 0)
            like = next(g for g in grads if g is not None)
            used = sum(ctx.split)
            buffer, zero, zeroed_from = ctx.state.buffer(like.dtype, like.device, used)
            grad = buffer[ctx.row: ctx.row + like.shape[0]]
            places = grad[:, :used].split(ctx.split, dim=1)
            starts = [sum(ctx.split[:k]) for k in range(len(ctx.split))]
            pending = [(g, place) for g, place in zip(grads, places) if not _in_place(g, place)]
            # a place its consumer took but whose gradient arrived elsewhere (summed with another consumer's)
            # may be held by that consumer's backward as its own result (the LSTM cell hands one half's place
            # as the other's gradient; a Projection records it as G): never overwritten, G goes elsewhere
            overwrites_taken = any(not _in_place(g, place) and ctx.state.was_taken(ctx.row, start)
                                   for g, place, start in zip(grads, places, starts))
            if len(pending) == len(places) or overwrites_taken:  # one cat, the padding's zeros included
                parts = [g if g is not None else zero.expand(like.shape[0], size) for g, size in zip(grads, ctx.split)]
                if used < grad.shape[1]:
                    parts.append(zero.expand(like.shape[0], grad.shape[1] - used))
                # into a new tensor where a taken place would be overwritten, or in a double backward
                # (create_graph: autograd records no cat(out=)); else into this step's rows of the buffer
                if overwrites_taken or torch.is_grad_enabled():
                    grad = torch.cat(parts, dim=1)
                else:
                    torch.cat(parts, dim=1, out=grad)
            else:
                for g, place in pending:
                    place.zero_() if g is None else place.copy_(g)
                if used < zeroed_from:  # a split of fewer columns than the step that made the buffer: padding
                    grad[:, used:zeroed_from].zero_()
        ctx.state.record(ctx.row, x, grad, ctx.addend_is_bias)
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
            self._state = _Pass(weight.shape[0])
            self._token = _WeightGradients.apply(self._state, weight, bias)

    def __call__(self, x: torch.Tensor, *, add: torch.Tensor | None = None, split: list[int] | None = None):
        """x [B, in] -> [B, out]: x W^T + b, or x W^T + add; with `split`, its parts [B, size] along the
        first sum(split) columns (a tuple; the columns past them are left out: padding). Batched, each
        part is marked with its gradient's place (kernels.mark_gradient_destination), and x W^T + add
        as add is."""
        if split is not None and sum(split) > self.weight.shape[0]:
            raise ValueError(f"split {list(split)} covers {sum(split)} columns, more than the map's {self.weight.shape[0]}")
        if not self.batched:
            y = F.linear(x, self.weight, self.bias) if add is None else torch.addmm(add, x, self.weight.t())
            return y if split is None else y.split([*split, y.shape[1] - sum(split)], dim=1)[:len(split)]
        addend = self.bias if add is None else add
        row = self._state.rows
        y = _Step.apply(x, self.weight, addend, self._token, self._state, add is None,
                        None if split is None else list(split))
        if split is None:
            return y if add is None else kernels.share_gradient_destination(y, add)
        used, col = sum(split), 0
        for part, size in zip(y, split):
            kernels.mark_gradient_destination(part, self._state.place(row, col, size, used, part.dtype, part.device))
            col += size
        return y

    def deferred(self, x: torch.Tensor, add: torch.Tensor) -> kernels.Projection:
        """x W^T + add, left for its consumer to form (kernels.Projection: the fused LSTM cell forms it in its
        kernel). Batched, the consumer's backward hands this map (x, G) as a step's backward does, so W's
        gradient is still one GEMM over all the steps; wherever it is not formed there, it is this map's
        own call, self(x, add=add)."""
        def unfused() -> torch.Tensor:
            return self(x, add=add)

        if not self.batched or self.bias is not None:
            return kernels.Projection(x, self.weight, add, None, None, unfused)
        state, row = self._state, self._state.rows
        state.rows += x.shape[0]  # this step's rows, in the order of the forward calls (an unused one is harmless)

        def record(x: torch.Tensor, grad: torch.Tensor) -> None:
            state.record(row, x, grad, False)  # no bias (a map with one is never deferred)

        return kernels.Projection(x, self.weight, add, self._token, record, unfused)
