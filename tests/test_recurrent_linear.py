"""RecurrentLinear: a map shared by every step of a recurrence, its weight gradient one GEMM over the steps."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from helpers import OpCounter
from torch.utils._python_dispatch import TorchDispatchMode

from draw import kernels
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


SPLIT = [H, H, 2]  # a stacked map's parts, as DRAW's from_dec and from_enc


def split_recurrence(h0, weight, bias, batches, linear):
    """h_t = tanh(a) * sigmoid(b) + c.sum() with (a, b, c) the parts of W h_{t-1} + b: c reaches the loss
    only at even steps, and the last step's parts not at all; rows of h_0 taken `batches[t]` at a time
    (a step with fewer rows than the last)."""
    stacked = linear(weight, bias)
    h, total = h0, 0
    for t, rows in enumerate(batches):
        a, b, c = stacked(h[:rows], split=SPLIT)
        if t + 1 < len(batches):
            h = torch.tanh(a) * torch.sigmoid(b) + (c.sum(1, keepdim=True) if t % 2 == 0 else 0)
            total = total + h.sum() * (t + 1)
    return total


def split_plain(weight, bias):
    return lambda x, split: F.linear(x, weight, bias).split(split, dim=1)


def split_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H), (sum(SPLIT), H), (sum(SPLIT),)]  # h0, W, b
    return [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


@pytest.mark.parametrize("batches", [[B] * T, [B, B, B - 1, B - 1, 1], [0] * T])
def test_split_steps_give_autograds_values_and_gradients(batches):
    """Steps whose output is split (some parts, and a whole step, reaching no loss; fewer rows in later
    steps; no rows at all) give the values and every gradient of F.linear and split, and pass gradcheck."""
    h0, w, b = split_tensors()
    ours, theirs = (split_recurrence(h0, w, b, batches, linear) for linear in (RecurrentLinear, split_plain))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    for a, c in zip(torch.autograd.grad(ours, (h0, w, b)), torch.autograd.grad(theirs, (h0, w, b))):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: split_recurrence(*t, batches, RecurrentLinear), (h0, w, b))


def test_a_double_backward_through_split_steps_is_autograds():
    """create_graph=True through split steps (their gradient then a recorded cat, not one into the buffer):
    the gradient of a function of the first gradients is autograd's."""
    h0, w, b = split_tensors()
    results = []
    for linear in (RecurrentLinear, split_plain):
        first = torch.autograd.grad(split_recurrence(h0, w, b, [B] * T, linear), (h0, w, b), create_graph=True)
        results.append(torch.autograd.grad(sum((g ** 2).sum() for g in first), (h0, w, b)))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_the_bias_has_the_gradient_of_the_steps_that_added_it():
    """A map with a bias called both ways, x W^T + b and x W^T + a (b unused): b's gradient sums the first
    kind of steps' output gradients alone, and is None when every step was given `a`."""
    h0, w, b, x, u = tensors()

    def mixed(linear, every_step_adds=False):
        stacked = linear(w, b)
        h, total = h0, 0
        for t in range(T):
            given = every_step_adds or t % 2 == 1
            h = torch.tanh(stacked(h, add=x[t] @ u.t()) if given else stacked(h))
            total = total + h * (t + 1)
        return total.sum()

    for every_step_adds in (False, True):
        ours = torch.autograd.grad(mixed(RecurrentLinear, every_step_adds), (h0, w, b, x, u), allow_unused=True)
        theirs = torch.autograd.grad(mixed(plain, every_step_adds), (h0, w, b, x, u), allow_unused=True)
        for a, c in zip(ours, theirs):
            assert (a is None) == (c is None)
            if a is not None:
                torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
        assert (ours[2] is None) == every_step_adds


def test_a_pass_that_never_reaches_the_collector_leaves_nothing_behind():
    """autograd.grad of other inputs (retain_graph: a penalty on the input's gradient) runs the steps' backward
    but not the weight gradients' collector: its G buffer and (X, G) entries go when that pass ends, and a
    later pass that does reach the collector still gives autograd's weight gradients."""
    h0, w, b = split_tensors()
    stacked = RecurrentLinear(w, b)
    h, total = h0, 0
    for t in range(T):
        parts = stacked(h, split=SPLIT)
        h = torch.tanh(parts[0]) * torch.sigmoid(parts[1]) + parts[2].sum(1, keepdim=True)
        total = total + h.sum() * (t + 1)
    state = stacked._state
    for _ in range(3):
        torch.autograd.grad(total, h0, retain_graph=True)
        assert state.steps == [] and state.buffers == {} and state.taken == {} and state.watched == set()
    ours = torch.autograd.grad(total, (w, b))
    h, theirs_total = h0, 0
    for t in range(T):
        a, g, c = F.linear(h, w, b).split(SPLIT, dim=1)
        h = torch.tanh(a) * torch.sigmoid(g) + c.sum(1, keepdim=True)
        theirs_total = theirs_total + h.sum() * (t + 1)
    for x, y in zip(ours, torch.autograd.grad(theirs_total, (w, b))):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_split_steps_write_their_gradients_once():
    """A split step's backward puts its parts' gradients side by side straight into the pass's buffer, so the
    weight gradient reads G where it lies: T + 1 cats in all (one per step, one of the inputs), where a split
    after the map costs T + 2 (one per step, then G and the inputs again)."""

    class Cats(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.cats = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.cats += func.overloadpacket.__name__ == "cat"
            return func(*args, **(kwargs or {}))

    def cats(split_inside: bool):
        h0, w, b = split_tensors()
        stacked = RecurrentLinear(w, b)
        h, total = h0, 0
        for t in range(T):
            a, c, _ = stacked(h, split=SPLIT) if split_inside else stacked(h).split(SPLIT, dim=1)
            h = torch.tanh(a) * torch.sigmoid(c)
            total = total + h.sum()
        with Cats() as counter:
            total.backward()
        return counter.cats

    assert cats(split_inside=True) == T + 1
    assert cats(split_inside=False) == T + 2


def test_split_steps_over_repeated_and_partial_backward_passes():
    """With retain_graph, each pass has its own buffer: a second pass gives the same gradients again, and
    a pass that asked only for h_0's gradient adds nothing to the next."""
    h0, w, b = split_tensors()
    out = split_recurrence(h0, w, b, [B] * T, RecurrentLinear)
    expected = torch.autograd.grad(split_recurrence(h0, w, b, [B] * T, split_plain), (w, b))
    first = torch.autograd.grad(out, (w, b), retain_graph=True)
    torch.autograd.grad(out, (h0,), retain_graph=True)
    again = torch.autograd.grad(out, (w, b))
    for a, c, e in zip(first, again, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c, e, rtol=1e-12, atol=1e-12)


def assert_padded_gradients(grads, expected):
    """(dh0, dW, db) of a map with padding rows against (dh0, dW, db) of the map without them: equal, and
    zero for the padding."""
    torch.testing.assert_close(grads[0], expected[0], rtol=1e-12, atol=1e-12)
    for grad, e in zip(grads[1:], expected[1:]):
        torch.testing.assert_close(grad[:sum(SPLIT)], e, rtol=1e-12, atol=1e-12)
        assert not grad[sum(SPLIT):].any()


class _Doubled(torch.autograd.Function):
    """2 t, whose backward writes its gradient into t's gradient destination when it has one, as the fused
    kernels do (kernels.gradient_destination), else returns a new tensor."""

    @staticmethod
    def forward(ctx, t, take):
        ctx.take = take
        return 2 * t

    @staticmethod
    def backward(ctx, grad):
        place = ctx.take() if ctx.take is not None else None
        if place is None:
            return 2 * grad, None
        torch.mul(grad, 2, out=place)
        return place, None


def doubled(t):
    return _Doubled.apply(t, kernels.gradient_destination(t))


def test_a_split_map_wider_than_its_parts_leaves_the_padding_out():
    """Columns past the parts (padding to an aligned width) are no output and get a zero gradient: the
    values and gradients of F.linear on the parts' rows alone, zero for the padding rows of W and b."""
    h0, w, b = split_tensors()
    wide_w = torch.cat([w, torch.randn(3, H, dtype=torch.float64)]).detach().requires_grad_()
    wide_b = torch.cat([b, torch.randn(3, dtype=torch.float64)]).detach().requires_grad_()
    ours = split_recurrence(h0, wide_w, wide_b, [B] * T, RecurrentLinear)
    theirs = split_recurrence(h0, w, b, [B] * T, split_plain)
    torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=0)  # a wider product may round otherwise
    grads = torch.autograd.grad(ours, (h0, wide_w, wide_b))
    expected = torch.autograd.grad(theirs, (h0, w, b))
    assert_padded_gradients(grads, expected)
    with pytest.raises(ValueError, match="more than the map's"):
        RecurrentLinear(w, b)(h0, split=[*SPLIT, 1])


def test_a_maps_g_found_back_to_back_in_another_buffer_is_not_copied():
    """A map whose steps' output gradients were written in place, back to back, into another buffer's rows
    (DRAW's maps from r and z: their G are the gate gradients in the h_dec map's buffer) forms its weight
    gradient from them where they lie, with no cat of G; out of order, or apart, they are stacked by a cat.
    The gradients are autograd's either way."""
    w = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(B, 3, dtype=torch.float64) for _ in range(T)]
    buffer = torch.randn(T * B + 1, 6 + 4, dtype=torch.float64)  # another map's: wider, a row more

    def weight_grad(rows):
        linear = RecurrentLinear(w)
        ys = [linear(x) for x in xs]
        grads = [buffer[r: r + B, 2:8] for r in rows]  # as its consumers would have written them
        with OpCounter() as ops:
            (grad,) = torch.autograd.grad(ys, w, grads)
        return grad, ops.calls["cat"], grads

    for rows, cats in (([t * B for t in range(T)], 1), ([t * B + (t > 0) for t in range(T)], 2)):  # back to back, apart
        grad, counted, grads = weight_grad(rows)
        assert counted == cats  # the inputs X always; G only when not back to back
        torch.testing.assert_close(grad, sum(g.t() @ x for g, x in zip(grads, xs)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("in_place", [(True, True, True), (True, False, True), (False, False, False)],
                         ids=["all", "some", "none"])
def test_parts_whose_consumers_write_their_gradients_in_place(in_place):
    """Each part is marked with its place in the pass's buffer (kernels.gradient_destination); a consumer
    that writes there leaves the split step nothing to copy: with every part written in place the backward
    pass runs no cat and no copy but the collector's cat of the inputs, with some, a copy per other part,
    with none, one cat per step. The gradients are autograd's in every case, the padding's zero."""
    h0, w, b = split_tensors()
    wide_w = torch.cat([w, torch.zeros(2, H, dtype=torch.float64)]).detach().requires_grad_()
    wide_b = torch.cat([b, torch.zeros(2, dtype=torch.float64)]).detach().requires_grad_()

    def run(linear, weight, bias):
        stacked = linear(weight, bias)
        h, total = h0, 0
        for _ in range(T):
            parts = stacked(h, split=SPLIT)
            a, c, d = (doubled(p) if chosen else 2 * p for p, chosen in zip(parts, in_place))
            h = torch.tanh(a) * torch.sigmoid(c) + d.sum(1, keepdim=True)
            total = total + h.sum()
        return total

    ours, theirs = run(RecurrentLinear, wide_w, wide_b), run(split_plain, w, b)
    with OpCounter() as ops:
        grads = torch.autograd.grad(ours, (h0, wide_w, wide_b))
    expected = torch.autograd.grad(theirs, (h0, w, b))
    assert_padded_gradients(grads, expected)
    pending = in_place.count(False)
    assert ops.calls["cat"] == 1 + (T if pending == len(SPLIT) else 0)  # the inputs X; per step, when none in place
    assert ops.calls["copy_"] == (T * pending if 0 < pending < len(SPLIT) else 0)


def test_a_place_is_handed_out_once_per_pass():
    """A part read by two consumers that both ask for its place: the first gets it, the second a new
    tensor, and autograd's sum of the two reaches the weight gradient right."""
    h0, w, b = split_tensors()

    def run(linear, twice):
        stacked = linear(w, b)
        h, total = h0, 0
        for _ in range(T):
            a, c, d = stacked(h, split=SPLIT)
            first = doubled(a) if twice else 2 * a
            h = torch.tanh(first) * torch.sigmoid(c) + torch.tanh(doubled(a) if twice else 2 * a)[:, :1] + d.sum(1, keepdim=True)
            total = total + h.sum()
        return total

    ours, theirs = run(RecurrentLinear, True), run(split_plain, False)
    for a, e in zip(torch.autograd.grad(ours, (h0, w, b)), torch.autograd.grad(theirs, (h0, w, b))):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_a_double_backward_through_steps_whose_g_lies_back_to_back_is_autograds():
    """Step gradients that are views lying back to back in one base (the backward of torch.stack hands out
    such views): in a double backward (create_graph) G is a recorded cat of them, not a strided view that
    autograd would see as the first step's alone."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    xs = torch.randn(T, B, 4, generator=g, dtype=torch.float64)
    scale = torch.randn(T, B, 5, generator=g, dtype=torch.float64)
    results = []
    for batched in (True, False):
        leaves = [t.clone().requires_grad_() for t in (w, b, xs)]
        linear = RecurrentLinear(leaves[0], leaves[1]) if batched else plain(leaves[0], leaves[1])
        ys = [linear(leaves[2][t]) for t in range(T)]
        (grad_w,) = torch.autograd.grad((torch.stack(ys) ** 2 * scale).sum(), leaves[0], create_graph=True)
        results.append(torch.autograd.grad((grad_w ** 2).sum(), leaves))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_steps_split_into_fewer_columns_than_the_first_keep_a_zero_padding():
    """Steps of one map with splits of different widths, every part written in place: the step that makes
    the pass's buffer (the last) zeroes its padding; an earlier step with fewer columns zeroes the rest of
    its own rows, so nothing uninitialised reaches W's or b's gradient (torch.empty filled with NaN here)."""
    h0, w, b = split_tensors()
    wide_w = torch.cat([w, torch.randn(2, H, dtype=torch.float64)]).detach().requires_grad_()
    wide_b = torch.cat([b, torch.randn(2, dtype=torch.float64)]).detach().requires_grad_()
    splits = [SPLIT[:2]] * (T - 1) + [SPLIT]  # sum 2H, then 2H + 2: the last step's backward makes the buffer

    def run(linear, weight, bias):
        stacked = linear(weight, bias)
        h, total = h0, 0
        for split in splits:
            a, c, *rest = (doubled(p) if linear is RecurrentLinear else 2 * p for p in stacked(h, split=split))
            h = torch.tanh(a) * torch.sigmoid(c) + sum(r.sum(1, keepdim=True) for r in rest)
            total = total + h.sum()
        return total

    deterministic, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        grads = torch.autograd.grad(run(RecurrentLinear, wide_w, wide_b), (h0, wide_w, wide_b))
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    def narrower_plain(weight, bias):  # F.linear's parts, the columns past the split left out
        return lambda x, split: F.linear(x, weight, bias).split([*split, weight.shape[0] - sum(split)], dim=1)[:len(split)]

    expected = torch.autograd.grad(run(narrower_plain, w, b), (h0, w, b))
    assert_padded_gradients(grads, expected)
