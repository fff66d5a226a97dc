"""A linear map's output formed by its consumer (kernels.Projection): the LSTM cell whose input half is
add + x W^T, as DRAW's encoder takes W_r r_t + (the part from h_dec), formed in the fused cell's kernels;
forward and every gradient against the reference, what the backward hands W's owner, and W's gradient
through draw.recurrent_linear.RecurrentLinear.deferred.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py); comparisons are in float64.
"""

import os

import pytest
import torch
from helpers import assert_close, assert_written_in_place, gradient_places

from draw import kernels
from draw.recurrent_linear import RecurrentLinear

ON_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if ON_CUDA else "cpu"
f64 = torch.float64
pytestmark = pytest.mark.skipif(
    not (ON_CUDA or INTERPRETED), reason="needs CUDA, or TRITON_INTERPRET=1 set before triton is imported")


def projected_cell_inputs(batch, hidden, inputs, *, dtype=f64, seed=0):
    """Leaves x [B, K], add [B, 4H] (a column slice of a wider tensor, as DRAW's stacked map gives it),
    hidden_gates [B, 4H] and c [B, H], and W [4H, K] with strided rows (W_ih's glimpse columns)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, inputs, generator=g, dtype=f64)
    wide_add = torch.randn(batch, 4 * hidden + 5, generator=g, dtype=f64)
    hidden_gates = torch.randn(batch, 4 * hidden, generator=g, dtype=f64)
    c = torch.randn(batch, hidden, generator=g, dtype=f64)
    weight = (torch.randn(4 * hidden, inputs + 3, generator=g, dtype=f64) / inputs ** 0.5)[:, :inputs]
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (x, wide_add, hidden_gates, c)]
    return leaves, weight.to(DEVICE, dtype)


def run_cell(leaves, weight, backend, records=None):
    """h, c' of the cell with its input half add + x W^T given as a Projection (add: columns 3.. of the
    wide leaf); records collects what the backward hands W's owner."""
    x, wide_add, hidden_gates, c = leaves
    add = wide_add[:, 3:3 + hidden_gates.shape[1]]
    record = None if records is None else (lambda x, grad: records.append((x, grad)))
    projection = kernels.Projection(x, weight, add, None, record, lambda: add + x @ weight.t())
    return kernels.lstm_cell(projection, hidden_gates, c, backend=backend)


def compare(batch, hidden, inputs, *, fused=True, dtype=f64, rtol=1e-12):
    """The triton backend against the float64 reference: h, c', the gradients of x, add, the hidden half
    and c; and, formed in the kernels, the (x, dL/d(input half)) handed to W's owner."""
    leaves, weight = projected_cell_inputs(batch, hidden, inputs, dtype=dtype, seed=batch * 100 + hidden + inputs)
    reference = [t.detach().cpu().double().requires_grad_() for t in leaves]
    records = []
    out = run_cell(leaves, weight, "triton", records)
    expected = run_cell(reference, weight.cpu().double(), "reference")
    for name, a, e in zip(("h", "c'"), out, expected):
        assert a.dtype == dtype
        assert_close(a, e, rtol, rtol, name)
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(batch, hidden, generator=g, dtype=f64) for _ in range(2)]
    grads = torch.autograd.grad(out, leaves, [u.to(DEVICE, dtype) for u in upstream])
    expected_grads = torch.autograd.grad(expected, reference, upstream)
    for name, a, e in zip(("d x", "d add", "d hidden_gates", "d c"), grads, expected_grads):
        assert a.dtype == dtype
        assert_close(a, e, rtol, rtol * max(1.0, e.abs().max().item()), name)
    if not fused:
        assert not records  # formed before the cell: autograd differentiated it, W's gradient included
        return
    (x, grad), = records
    assert x is leaves[0]
    assert_close(grad, expected_grads[1][:, 3:3 + 4 * hidden], rtol, rtol, "the input half's gradient handed over")


@pytest.mark.parametrize("batch, hidden, inputs", [
    (1, 1, 1),
    (3, 5, 8),  # mnist-paper's encoder takes 8 glimpse values
    (7, 37, 13),  # an odd width of x, past mnist-paper's 8
    (2, 130, 128),  # the widest x formed in the kernels
    (3, 512, 3),  # the most hidden units one program holds
])
def test_the_cell_forms_its_projected_input_as_the_reference(batch, hidden, inputs):
    compare(batch, hidden, inputs)


def test_the_projected_cell_in_fp32_and_bf16():
    compare(9, 20, 8, dtype=torch.float32, rtol=1e-5)
    compare(9, 20, 8, dtype=torch.bfloat16, rtol=3e-2)


@pytest.mark.parametrize("hidden, inputs", [(600, 8), (10, 129)])
def test_cells_the_kernels_cannot_hold_form_it_before_them(hidden, inputs):
    """More hidden units than one program holds, or x wider than 128: formed before the cell, by autograd's
    ops; the same values and gradients, and nothing handed to W's owner."""
    compare(2, hidden, inputs, fused=False)


def test_draw_triton_projection_unfused_forms_it_before_the_cell(monkeypatch):
    """DRAW_TRITON_PROJECTION=unfused (for measuring) keeps the kernels from forming it; a bad value is
    refused by name."""
    monkeypatch.setenv("DRAW_TRITON_PROJECTION", "unfused")
    compare(3, 5, 8, fused=False)
    monkeypatch.setenv("DRAW_TRITON_PROJECTION", "sometimes")
    leaves, weight = projected_cell_inputs(3, 5, 8)
    with pytest.raises(ValueError, match="DRAW_TRITON_PROJECTION='sometimes'"):
        run_cell(leaves, weight, "triton", [])


def test_without_grad_it_is_formed_in_the_kernel_with_no_one_to_hand_the_gradient():
    """Evaluation (torch.no_grad, where RecurrentLinear gives no record) still forms it in the kernel; with
    grad and no record it is formed before the cell."""
    leaves, weight = projected_cell_inputs(4, 6, 8)
    x, wide_add, hidden_gates, c = leaves
    add = wide_add[:, 3:27]
    formed_before = []

    def unfused():
        formed_before.append(True)
        return add + x @ weight.t()

    projection = kernels.Projection(x, weight, add, None, None, unfused)
    with torch.no_grad():
        h, _ = kernels.lstm_cell(projection, hidden_gates, c, backend="triton")
    assert not formed_before
    assert_close(h, kernels.lstm_cell(add + x @ weight.t(), hidden_gates, c, backend="reference")[0], 1e-12, 1e-12, "h")
    kernels.lstm_cell(projection, hidden_gates, c, backend="triton")
    assert formed_before == [True]


def test_the_input_halfs_gradient_is_written_into_adds_place():
    """add marked with a gradient destination (kernels.mark_gradient_destination): the cell writes the input
    half's gradient there, returns it as add's, and hands that same tensor to W's owner."""
    leaves, weight = projected_cell_inputs(5, 6, 8)
    x, wide_add, hidden_gates, c = leaves
    places, takes = gradient_places((5, 24), device=DEVICE)
    add = kernels.mark_gradient_destination(wide_add[:, 3:27], takes[0])
    records = []
    projection = kernels.Projection(x, weight, add, None, lambda x, grad: records.append(grad), lambda: None)
    h, c_new = kernels.lstm_cell(projection, hidden_gates, c, backend="triton")
    (grad,) = torch.autograd.grad((h * 2 + c_new).sum(), add)
    assert_written_in_place(grad, places[0], "d add")
    assert records[0] is grad


def test_w_gets_its_gradient_from_the_map_that_owns_it():
    """A RecurrentLinear's deferred products (its T uses) formed in the fused cell: the map's weight
    gradient, one GEMM over the steps from what each backward handed it, is autograd's; so are x's and add's."""
    steps, batch, hidden, inputs = 3, 4, 5, 8
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4 * hidden, inputs, generator=g, dtype=f64).to(DEVICE).requires_grad_()
    xs = [torch.randn(batch, inputs, generator=g, dtype=f64).to(DEVICE).requires_grad_() for _ in range(steps)]
    adds = [torch.randn(batch, 4 * hidden, generator=g, dtype=f64).to(DEVICE).requires_grad_() for _ in range(steps)]
    hidden_gates = torch.randn(batch, 4 * hidden, generator=g, dtype=f64).to(DEVICE)

    def loss(backend):
        linear = RecurrentLinear(weight)
        h, c = torch.zeros(batch, hidden, dtype=f64, device=DEVICE), torch.zeros(batch, hidden, dtype=f64, device=DEVICE)
        total = 0
        for x, add in zip(xs, adds):
            projection = linear.deferred(x, add)
            assert projection.record is not None
            h, c = kernels.lstm_cell(projection, hidden_gates + h.repeat(1, 4), c, backend=backend)
            total = total + (h ** 2).sum()
        return total

    fused = torch.autograd.grad(loss("triton"), [weight, *xs, *adds])
    expected = torch.autograd.grad(loss("reference"), [weight, *xs, *adds])
    for name, a, e in zip(["d W", *(f"d x{t}" for t in range(steps)), *(f"d add{t}" for t in range(steps))], fused, expected):
        assert_close(a, e, 1e-12, 1e-12, name)
    with torch.no_grad():
        assert RecurrentLinear(weight).deferred(xs[0], adds[0]).record is None  # nothing to hand over


def test_a_projection_of_the_wrong_shape_is_refused():
    leaves, weight = projected_cell_inputs(3, 5, 8)
    x, wide_add, hidden_gates, c = leaves
    projection = kernels.Projection(x, weight[:, :7], wide_add[:, 3:23], None, None, lambda: None)
    with pytest.raises(ValueError, match=r"input_gates must be x \[B, K\], weight \[G, K\], add \[B, G\] with B = 3, "
                                         r"G = 20 for c \[3, 5\]; got"):
        kernels.lstm_cell(projection, hidden_gates, c, backend="triton")
    right = kernels.Projection(x, weight, wide_add[:, 3:23], None, None, lambda: None)
    with pytest.raises(ValueError, match=r"G = 24 for c \[3, 6\]"):  # c is the one that does not fit: it is named
        kernels.lstm_cell(right, torch.zeros(3, 24, dtype=f64), torch.zeros(3, 6, dtype=f64), backend="triton")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_projection_of_mixed_dtypes_is_refused_outside_autocast(backend):
    """x, W and add in one dtype, on either backend and either side of the kernels' limits (the fused cell
    would otherwise compute in one dtype and the unfused product fail in another); autocast may mix them."""
    leaves, weight = projected_cell_inputs(3, 5, 8)
    x, wide_add, hidden_gates, c = leaves
    add = wide_add[:, 3:23]
    projection = kernels.Projection(x.float(), weight, add, None, None, lambda: add + x.float() @ weight.t())
    with pytest.raises(TypeError, match="input_gates must have one dtype outside autocast: x torch.float32, weight "
                                        "torch.float64, add torch.float64"):
        kernels.lstm_cell(projection, hidden_gates, c, backend=backend)
    x32, add32, hidden32, c32 = (t.detach().float() for t in (x, add, hidden_gates, c))
    mixed = kernels.Projection(x32, weight.bfloat16(), add32.bfloat16(), None, None,
                               lambda: add32.bfloat16() + x32.bfloat16() @ weight.bfloat16().t())
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        h, _ = kernels.lstm_cell(mixed, hidden32.bfloat16(), c32, backend=backend)
    expected, _ = kernels.lstm_cell(add32 + x32 @ weight.float().t(), hidden32, c32, backend="reference")
    assert h.dtype == torch.bfloat16 and float((h.float() - expected).abs().max()) < 0.05


def test_the_backward_unpacks_its_saved_tensors_once():
    """Non-reentrant activation checkpointing lets a saved tensor be unpacked once per backward: the fused
    cell with a projection runs under it, with the reference's gradients."""
    from torch.utils.checkpoint import checkpoint

    leaves, weight = projected_cell_inputs(3, 5, 8)
    reference = [t.detach().clone().requires_grad_() for t in leaves]

    def loss(*leaves, backend):
        h, c_new = run_cell(list(leaves), weight, backend, records=[])
        return (h * h).sum() + c_new.sum()

    checkpoint(lambda *l: loss(*l, backend="triton"), *leaves, use_reentrant=False).backward()
    loss(*reference, backend="reference").backward()
    for name, a, e in zip(("x", "add", "hidden_gates", "c"), leaves, reference):
        assert_close(a.grad, e.grad, 1e-12, 1e-12, name)


def test_after_the_backward_the_cell_keeps_no_reference_to_the_projections_output():
    """What the backward needs is saved (x, W); the Projection itself, whose add is a step's [B, 4H] output
    of the stacked map and whose unfused() closes over it, is not kept on the graph: a caller holding h
    (as a step holds a micro-batch's outputs through the next one's pass) holds no add."""
    import gc
    import weakref

    leaves, weight = projected_cell_inputs(3, 4, 5)
    x, wide_add, hidden_gates, c = leaves
    add = wide_add[:, 3:3 + hidden_gates.shape[1]].clone()  # a tensor of its own, as a map's output is
    records = []
    projection = kernels.Projection(x, weight, add, None, lambda x, grad: records.append(1), lambda: add + x @ weight.t())
    h, c_new = kernels.lstm_cell(projection, hidden_gates, c, backend="triton")
    (h.sum() + c_new.sum()).backward()
    assert records == [1]
    gone = weakref.ref(add)
    del add, projection
    gc.collect()
    assert gone() is None, "the cell's graph still holds the projection's output"
    assert h.grad_fn is not None  # the graph is alive: only what it keeps is checked
