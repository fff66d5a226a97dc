"""RecurrentLinear: a map shared by every step of a recurrence, its weight gradient one GEMM over the steps."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from draw.recurrent_linear import RecurrentLinear

T, B, H = 5, 3, 4


def recurrence(h0, weight, bias, inputs, read_weight, linear):
    """h_t = tanh(W h_{t-1} + b + U x_t) through `linear(weight, bias)` and `linear(read_weight, None)`,
    the two forms DRAW uses (x W^T + b, and x U^T + a with a given); returns sum_t h_t * t."""
    hidden, read = linear(weight, bias), linear(read_weight, None)
    h, total = h0, 0
    for t in range(T):
        h = torch.tanh(read(inputs[t], add=hidden(h)))
        total = total + h * (t + 1)
    return total


def plain(weight, bias):
    return lambda x, add=None: F.linear(x, weight, bias) if add is None else torch.addmm(add, x, weight.t())


def tensors(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H), (H, H), (H,), (T, B, 2), (H, 2)]  # h0, W, b, x_1..x_T, U
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def test_values_and_every_gradient_equal_the_layer_by_layer_recurrence():
    h0, w, b, x, u = tensors()
    ours = recurrence(h0, w, b, x, u, RecurrentLinear)
    theirs = recurrence(h0, w, b, x, u, plain)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    upstream = torch.randn_like(ours)
    for a, c in zip(torch.autograd.grad(ours, (h0, w, b, x, u), upstream),
                    torch.autograd.grad(theirs, (h0, w, b, x, u), upstream)):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    assert torch.autograd.gradcheck(lambda *t: recurrence(*t, RecurrentLinear), tuple(tensors()))


def test_the_weight_gradient_is_one_gemm_and_no_accumulation():
    """Over T steps of the two maps, backward runs T + T products for the inputs' gradients and one per
    weight, and adds no weight-shaped gradients together (autograd alone: 2T of each product, 2T - 2 adds)."""

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in ("add", "add_") and isinstance(out, torch.Tensor) and out.shape in ((H, H), (H, 2)):
                name = "weight-shaped add"
            self.calls[name] += 1
            return out

    def count(linear):
        total = recurrence(*tensors(), linear).sum()
        with Ops() as ops:
            total.backward()
        return ops.calls

    ours, theirs = count(RecurrentLinear), count(plain)
    assert ours["mm"] == 2 * T + 2, ours
    assert ours["weight-shaped add"] == 0, ours
    assert theirs["mm"] == 4 * T and theirs["weight-shaped add"] > 0, theirs


def test_outputs_that_reach_no_loss():
    """A step whose output is unused, and a map none of whose outputs is used, give the same gradients
    as autograd (the unused map's weight gets none)."""
    h0, w, b, x, u = tensors()
    for linear in (RecurrentLinear, plain):
        used, unused = linear(w, b), linear(u, None)
        h = h0
        for t in range(T):
            h = torch.tanh(used(h))
            unused(x[t])  # never reaches the loss
        grads = torch.autograd.grad(h.sum(), (h0, w, b, u), allow_unused=True)
        if linear is plain:
            torch.testing.assert_close(grads[:3], ours[:3], rtol=1e-12, atol=1e-12)
            assert grads[3] is None and ours[3] is None
        ours = grads


def test_plain_where_nothing_is_recorded():
    w, b = torch.randn(3, 2, requires_grad=True), torch.randn(3, requires_grad=True)
    with torch.no_grad():
        assert not RecurrentLinear(w, b).batched
    assert not RecurrentLinear(w.detach(), b.detach()).batched
    assert RecurrentLinear(w, b).batched and RecurrentLinear(w.detach(), b).batched
    x = torch.randn(4, 2)
    torch.testing.assert_close(RecurrentLinear(w.detach())(x), x @ w.detach().t())


def test_bf16_autocast_matches_autograd():
    """Under bf16 autocast (fp32 weights and a fp32 first input, as DRAW's learned initial state) the
    gradients agree with autograd's to bf16 precision, in fp32 as the parameters are."""
    h0, w, b, x, u = tensors(torch.float32, seed=1)
    results = []
    for linear in (RecurrentLinear, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = recurrence(h0, w, b, x, u, linear)
        results.append((out, torch.autograd.grad(out.float().sum(), (h0, w, b, x, u))))
    (a, grads_a), (c, grads_c) = results
    assert a.dtype == c.dtype == torch.bfloat16
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    for ga, gc in zip(grads_a, grads_c):
        assert ga.dtype == gc.dtype == torch.float32
        torch.testing.assert_close(ga, gc, rtol=2e-2, atol=2e-2 * gc.abs().max().item())


def test_repeated_and_partial_backward_passes():
    """With retain_graph, a second backward gives the same gradients again, and a pass that asked only for
    the inputs' gradients adds nothing to the next pass's weight gradient."""
    h0, w, b, x, u = tensors()
    out = recurrence(h0, w, b, x, u, RecurrentLinear).sum()
    expected = torch.autograd.grad(recurrence(h0, w, b, x, u, plain).sum(), (w, b, u))
    first = torch.autograd.grad(out, (w, b, u), retain_graph=True)
    torch.autograd.grad(out, (h0, x), retain_graph=True)  # the maps' weights not asked for
    again = torch.autograd.grad(out, (w, b, u))
    for a, c, e in zip(first, again, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c, e, rtol=1e-12, atol=1e-12)
