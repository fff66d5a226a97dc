"""The LSTM cell, kernels.lstm_cell: the reference against nn.LSTMCell, then the fused Triton kernel
(kernels/triton_lstm.py) against the reference, forward and every gradient, and its gradient
destinations (the places DRAW's recurrent maps ask their consumers to write gradients into)."""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_close, assert_written_in_place, gradient_places, ptxas_usage_on_sm90

from draw import kernels

ON_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if ON_CUDA else "cpu"
requires_kernels = pytest.mark.skipif(
    not (ON_CUDA or INTERPRETED), reason="needs CUDA, or TRITON_INTERPRET=1 set before triton is imported")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not ON_CUDA, reason="needs a CUDA device"))])
def test_reference_is_nn_lstm_cell(device):
    """The reference from the two gate halves (column slices of wider projections, as DRAW passes them; on
    CUDA PyTorch's fused kernel) gives nn.LSTMCell's h, c and gradients, in float64."""
    torch.manual_seed(0)
    cell = nn.LSTMCell(5, 7).double().to(device)
    x, h, c = (torch.randn(3, n, dtype=torch.float64, device=device, requires_grad=True) for n in (5, 7, 7))
    input_gates = F.linear(x, torch.cat([cell.weight_ih, torch.ones(2, 5, dtype=torch.float64, device=device)]),
                           torch.cat([cell.bias_ih, torch.zeros(2, dtype=torch.float64, device=device)]))[:, :28]
    hidden_gates = F.linear(h, cell.weight_hh, cell.bias_hh)
    ours = kernels.lstm_cell(input_gates, hidden_gates, c, backend="reference")
    theirs = cell(x, (h, c))
    upstream = [torch.randn_like(t) for t in theirs]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, (x, h, c, *cell.parameters()), upstream),
                    torch.autograd.grad(theirs, (x, h, c, *cell.parameters()), upstream)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reference_computes_half_precision_in_fp32_and_rounds_once(dtype):
    """fp16 and bf16 gates are read, computed in fp32 and h, c' rounded once to their dtype (the rule of
    docs/conventions.md, which CUDA's fused cell and the kernels follow): not computed in 16 bits."""
    g = torch.Generator().manual_seed(0)
    input_gates, hidden_gates = (2 * torch.randn(64, 4 * 32, generator=g) for _ in range(2))
    c = torch.randn(64, 32, generator=g)
    half = [t.to(dtype) for t in (input_gates, hidden_gates, c)]
    h, c_new = kernels.lstm_cell(*half, backend="reference")
    i, f, gate, o = (half[0].float() + half[1].float()).chunk(4, dim=1)
    expected_c = torch.sigmoid(f) * half[2].float() + torch.sigmoid(i) * torch.tanh(gate)
    expected_h = torch.sigmoid(o) * torch.tanh(expected_c)
    assert h.dtype == c_new.dtype == dtype
    assert torch.equal(c_new, expected_c.to(dtype)) and torch.equal(h, expected_h.to(dtype))


def test_reference_traces_on_cuda_under_torch_compile(monkeypatch):
    """What torch.compile sees on CUDA: lstm_cell on fake CUDA tensors (no GPU needed) while compiling.
    PyTorch's fused CUDA cell's tracing check fails on the absent biases (torch.compile of the training
    step fell back to eager on an H100); under compile lstm_cell takes the pointwise update, with the
    shapes and dtype of the fused kernel's outputs, whatever the backend asked for."""
    import torch._dynamo.trace_rules
    from torch._subclasses.fake_tensor import FakeTensorMode

    # dynamo maps torch's functions to their tracing rules once per process, on first use (fake tensors
    # use it too): made while is_compiling is patched, the map would hold the stand-in, and a later
    # torch.compile would refuse to trace the real is_compiling. So make it now.
    torch._dynamo.trace_rules.get_torch_obj_rule_map()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with FakeTensorMode():
        gates = [torch.empty(3, 28, device="cuda") for _ in range(2)]
        for backend in ("auto", "reference"):
            h, c = kernels.lstm_cell(*gates, torch.empty(3, 7, device="cuda", dtype=torch.float64), backend=backend)
            assert h.shape == c.shape == (3, 7) and h.dtype == c.dtype == torch.float32 and h.is_cuda


def test_bad_inputs_are_refused():
    gates, c = torch.zeros(3, 28), torch.zeros(3, 7)
    with pytest.raises(ValueError, match=r"\[B, 4H\] = \[3, 28\]"):
        kernels.lstm_cell(gates, gates[:, :24], c)
    with pytest.raises(ValueError, match=r"\[B, H\]"):
        kernels.lstm_cell(gates, gates, c[0])
    with pytest.raises(TypeError, match="one dtype"):
        kernels.lstm_cell(gates, gates.double(), c)
    with pytest.raises(TypeError, match="floating-point"):
        kernels.lstm_cell(gates, gates, c.long())


def cell_inputs(batch, hidden, dtype, *, seed=0, strided=False, broadcast_c=False, device=DEVICE):
    """input_gates, hidden_gates [B, 4H] and c [B, H], leaves requiring grad (c a broadcast state when
    broadcast_c, as DRAW's first step passes it); strided: both halves column slices of wider tensors,
    as DRAW's stacked projections give them."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(2, batch, 4 * hidden + (5 if strided else 0), generator=g, dtype=torch.float64)
    leaves = [wide[k].to(device, dtype).requires_grad_() for k in range(2)]
    halves = [t[:, 3:3 + 4 * hidden] if strided else t for t in leaves]
    state = torch.randn(1 if broadcast_c else batch, hidden, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    c = state.expand(batch, hidden) if broadcast_c else state
    return leaves, halves, state, c


def compare(batch, hidden, dtype, *, strided=False, broadcast_c=False, outputs=("h", "c"), rtol=None, atol=None):
    """Triton against the float64 reference: h, c' and the gradients of both halves and c under random
    upstream gradients of the outputs named in `outputs` (the others unused)."""
    leaves, halves, state, c = cell_inputs(batch, hidden, dtype, seed=batch * 1000 + hidden, strided=strided,
                                           broadcast_c=broadcast_c)
    reference = [t.detach().cpu().double().requires_grad_() for t in (*leaves, state)]
    ref_halves = [t[:, 3:3 + 4 * hidden] if strided else t for t in reference[:2]]
    ref_c = reference[2].expand(batch, hidden) if broadcast_c else reference[2]
    fused = kernels.lstm_cell(*halves, c, backend="triton")
    expected = kernels.lstm_cell(*ref_halves, ref_c, backend="reference")
    assert all(t.dtype == dtype and t.is_contiguous() and t.shape == (batch, hidden) for t in fused)
    rtol = rtol if rtol is not None else {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
    atol = atol if atol is not None else rtol
    for name, a, e in zip(("h", "c'"), fused, expected):
        assert_close(a, e, rtol, atol, name)
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(batch, hidden, generator=g, dtype=torch.float64) for _ in range(2)]
    chosen = [i for i, name in enumerate(("h", "c")) if name in outputs]
    grads = torch.autograd.grad([fused[i] for i in chosen], [*leaves, state], [upstream[i].to(DEVICE, dtype) for i in chosen])
    grads_expected = torch.autograd.grad([expected[i] for i in chosen], reference, [upstream[i] for i in chosen])
    for name, a, e in zip(("d input_gates", "d hidden_gates", "d c"), grads, grads_expected):
        assert a.dtype == dtype
        assert_close(a, e, rtol, atol * max(1.0, e.abs().max().item()), name)


@requires_kernels
@pytest.mark.parametrize("batch,hidden", [(1, 1), (7, 3), (37, 100), (5, 600)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_kernel_forward_and_every_gradient(batch, hidden, dtype):
    """Odd batches, H = 1 up to past one tile of columns (512: the second column of programs)."""
    compare(batch, hidden, dtype)


@requires_kernels
def test_kernel_on_column_slices_and_a_broadcast_state():
    """Both halves as slices of wider tensors and c an expanded state, as DRAW's first step passes them."""
    compare(9, 10, torch.float64, strided=True, broadcast_c=True)
    compare(9, 10, torch.float32, strided=True, broadcast_c=True)


@requires_kernels
@pytest.mark.parametrize("outputs", [("h",), ("c",)], ids=["h-only", "c-only"])
def test_kernel_with_one_output_unused(outputs):
    compare(6, 9, torch.float64, outputs=outputs)


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_kernel_half_precision(dtype):
    """Computed in fp32, stored in the inputs' dtype: within that dtype's rounding of the reference."""
    compare(11, 20, dtype, rtol=2e-2, atol=2e-2)


@requires_kernels
def test_kernel_writes_the_gate_gradient_into_its_destinations():
    """With each half marked (kernels.mark_gradient_destination), the backward writes the one gate
    gradient into both places and returns them as the halves' gradients; a place is handed out once per
    backward pass, so a second use of a marked half gets a new tensor and autograd's sum stays right."""
    batch, hidden = 5, 6
    leaves, halves, state, c = cell_inputs(batch, hidden, torch.float64)
    places, takes = gradient_places((batch, 4 * hidden), (batch, 4 * hidden), device=DEVICE)
    input_gates, hidden_gates = (kernels.mark_gradient_destination(t.clone(), take) for t, take in zip(halves, takes))
    h, c_new = kernels.lstm_cell(input_gates, hidden_gates, c, backend="triton")
    grads = torch.autograd.grad((h * 2 + c_new).sum(), (input_gates, hidden_gates), retain_graph=True)
    for grad, buffer in zip(grads, places):
        assert_written_in_place(grad, buffer, "d gates")
    expected = kernels.lstm_cell(*halves, c, backend="reference")
    grad_expected = torch.autograd.grad((expected[0] * 2 + expected[1]).sum(), halves[0], retain_graph=True)[0]
    for grad in grads:
        assert_close(grad, grad_expected, 1e-12, 1e-12, "d gates")

    # a second cell reading the same marked halves, in a new pass: one cell takes the places, the other
    # writes new tensors
    places, takes = gradient_places((batch, 4 * hidden), (batch, 4 * hidden), device=DEVICE)
    for t, take in zip((input_gates, hidden_gates), takes):
        kernels.mark_gradient_destination(t, take)
    second = kernels.lstm_cell(input_gates, hidden_gates, c, backend="triton")
    total = torch.autograd.grad((h * 2 + c_new).sum() + second[0].sum(), input_gates)[0]
    one = torch.autograd.grad(expected[0].sum(), halves[0])[0]
    assert_close(total, grad_expected + one, 1e-12, 1e-12, "d input_gates of two uses")


@requires_kernels
def test_kernel_double_backward_is_refused():
    _, halves, state, c = cell_inputs(3, 4, torch.float64)
    h, _ = kernels.lstm_cell(*halves, c, backend="triton")
    (grad,) = torch.autograd.grad(h.sum(), state, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


@requires_kernels
@pytest.mark.parametrize("second_consumer", ["hidden half", "input half"])
@pytest.mark.parametrize("input_half", ["map", "deferred", "linear"])
def test_a_place_with_a_second_consumer_is_never_overwritten(second_consumer, input_half):
    """A stacked map's parts feed an LSTM cell, and one of them also the loss: autograd then sums that part's
    gradient into a new tensor, which its owner must not copy over the place the cell wrote (and still hands
    on: one half's place as the other half's gradient, or as a Projection's G). Every weight's gradient is the
    reference backend's (float64), whichever half has the second consumer and however the input half is made."""
    from draw.recurrent_linear import RecurrentLinear

    g = torch.Generator().manual_seed(0)
    batch, hidden, inputs, width = 3, 2, 4, 5
    w_dec, b_dec, w_in = (torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
                          for shape in ((8 * hidden, width), (8 * hidden,), (4 * hidden, inputs)))
    h_dec, x = (torch.randn(batch, n, generator=g, dtype=torch.float64).to(DEVICE) for n in (width, inputs))
    c = torch.randn(batch, hidden, generator=g, dtype=torch.float64).to(DEVICE)
    weights = torch.sin(torch.arange(batch * hidden, dtype=torch.float64, device=DEVICE)).view(batch, hidden)

    def gradients(backend):
        dec, from_x = RecurrentLinear(w_dec, b_dec), RecurrentLinear(w_in)
        added, hidden_gates = dec(h_dec, split=[4 * hidden, 4 * hidden])
        input_gates = {"map": lambda: from_x(x, add=added), "deferred": lambda: from_x.deferred(x, added),
                       "linear": lambda: added + x @ w_in.t()}[input_half]()
        h, c_new = kernels.lstm_cell(input_gates, hidden_gates, c, backend=backend)
        again = hidden_gates if second_consumer == "hidden half" else added
        loss = (h * weights).sum() + c_new.sum() + (again ** 2).sum()
        return torch.autograd.grad(loss, (w_dec, b_dec, w_in))

    for fused, reference in zip(gradients("triton"), gradients("reference")):
        torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-12)


@requires_kernels
def test_a_double_backward_through_the_fused_model_is_refused_not_wrong():
    """create_graph=True through DRAW on the fused kernels: the gradients that would go into their places are
    written apart instead (a place is written outside autograd), so the second backward meets the kernels'
    refusal, not a silently wrong or missing second-order gradient."""
    from draw import DRAW, DRAWConfig

    torch.manual_seed(0)
    config = DRAWConfig(height=6, width=5, channels=1, T=2, enc_size=3, dec_size=3, z_size=2, read_n=2, write_n=2)
    model = DRAW(config, backend="triton").double().to(DEVICE)
    x = torch.rand(2, 1, 6, 5, dtype=torch.float64).to(DEVICE)
    out = model(x, noise=torch.randn(config.T, 2, config.z_size, dtype=torch.float64).to(DEVICE))
    params = list(model.parameters())
    first = torch.autograd.grad(out.loss, params, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(sum((g ** 2).sum() for g in first), params, allow_unused=True)


LAUNCHES_FOR_SM90 = """
def calls(dtype):
    meta = dict(device="meta", dtype=dtype)
    stacked = torch.empty(1024, 2088, **meta)  # mnist-paper's h_dec map: both gate sets first
    input_gates, hidden_gates, c = torch.empty(1024, 1024, **meta), stacked[:, 1024:2048], torch.empty(1024, 256, **meta)
    h, c_new, gates = (torch.empty(1024, n, **meta) for n in (256, 256, 1024))
    glimpses, read_weight = torch.empty(1024, 8, **meta), torch.empty(1024, 264, **meta)[:, :8]
    return {"fwd": lambda: m.lstm_cell_forward(input_gates, hidden_gates, c),
            "bwd": lambda: m.lstm_cell_backward(h, c_new, gates, c, c_new, True),
            "bwd into two places": lambda: m.lstm_cell_backward(h, c_new, gates, c, c_new, True, stacked[:, :1024],
                                                                stacked[:, 1024:2048]),
            "bwd h only": lambda: m.lstm_cell_backward(h, None, gates, c, c_new, False),
            # the encoder's input half projected (kernels.Projection): its 8 glimpse values, W_r's columns of W_ih
            "fwd projected": lambda: m.lstm_cell_forward(input_gates, hidden_gates, c, (glimpses, read_weight)),
            "bwd projected": lambda: m.lstm_cell_backward(h, c_new, gates, c, c_new, True, stacked[:, :1024],
                                                          stacked[:, 1024:2048], (glimpses, read_weight))}
"""


@pytest.mark.slow
@pytest.mark.skipif(ON_CUDA, reason="with CUDA the kernels are compiled and run by the tests above")
def test_kernels_compile_for_sm90_without_spills():
    """Both kernels as the launchers launch them at mnist-paper's size (fp32, bf16, fp64; the gradient into
    one place and into two, and without c's; the encoder's, its input half projected), compiled for sm_90
    with the ptxas triton ships: no spills, and the registers of an elementwise kernel (at most 80 of
    65,536 per SM: 6 programs of 4 warps)."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton without its NVIDIA backend")
    rows = ptxas_usage_on_sm90("draw.kernels.triton_lstm", ("_lstm_forward_kernel", "_lstm_backward_kernel"),
                               LAUNCHES_FOR_SM90)
    assert len(rows) == 18
    for row in rows:
        assert row["spill_stores"] == row["spill_loads"] == 0, row
        assert row["registers"] <= (160 if row["dtype"] == "torch.float64" else 80), row
