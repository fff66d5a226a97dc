"""The attention reference against docs/conventions.md's mathematics (Eqs. 19-29), in float64."""

import math

import pytest
import torch

from draw import kernels
from draw.kernels import reference

f64 = torch.float64


def random_params(batch, scale=0.5, generator=None):
    return scale * torch.randn(batch, 5, dtype=f64, generator=generator)


def test_filterbank_rows_sum_to_one():
    g = torch.Generator().manual_seed(0)
    # centres near the middle, sigma^2 in [1, e], delta~ in [e^-2, e^-1]: every filter sees the image
    # (filters that see nothing are the degenerate tests' business)
    low = torch.tensor([-0.3, -0.3, 0.0, -2.0, -1.0], dtype=f64)
    high = torch.tensor([0.3, 0.3, 1.0, -1.0, 1.0], dtype=f64)
    params = low + (high - low) * torch.rand(16, 5, dtype=f64, generator=g)
    fx, fy, gamma = kernels.filterbank(params, 5, 13, 29)
    assert fx.shape == (16, 5, 29) and fy.shape == (16, 5, 13) and gamma.shape == (16,)
    torch.testing.assert_close(fx.sum(-1), torch.ones(16, 5, dtype=f64))
    torch.testing.assert_close(fy.sum(-1), torch.ones(16, 5, dtype=f64))
    torch.testing.assert_close(gamma, params[:, 4].exp())


@pytest.mark.parametrize("n", [1, 2, 5, 6])
@pytest.mark.parametrize("height, width", [(28, 28), (13, 29)])
def test_grid_is_centred_at_zero_offsets(n, height, width):
    """gx~ = gy~ = 0 puts the grid's centre of mass on ((W+1)/2, (H+1)/2) in 1-based pixels."""
    params = torch.tensor([[0.0, 0.0, math.log(2.0), 0.0, 0.0]], dtype=f64)
    gx, gy, delta, _, _ = reference.attention_grid(params, n, height, width)
    assert gx.item() == pytest.approx((width + 1) / 2) and gy.item() == pytest.approx((height + 1) / 2)
    fx, fy, _ = kernels.filterbank(params, n, height, width)
    pixels_x = torch.arange(1, width + 1, dtype=f64)
    pixels_y = torch.arange(1, height + 1, dtype=f64)
    # each filter's mean position is its mu (the image is wide enough for the tails to be symmetric
    # about the centre), and the grid is symmetric about the image centre
    mean_x = (fx[0] * pixels_x).sum(-1)
    mean_y = (fy[0] * pixels_y).sum(-1)
    torch.testing.assert_close(mean_x.mean(), torch.tensor((width + 1) / 2, dtype=f64))
    torch.testing.assert_close(mean_y.mean(), torch.tensor((height + 1) / 2, dtype=f64))
    torch.testing.assert_close(mean_x, (width + 1) - mean_x.flip(0))


def test_unit_delta_spans_the_image():
    """log delta~ = 0: delta = (max(W, H) - 1) / (N - 1), so mu_1 = 1 and mu_N = W (Eqs. 19, 24)."""
    n, size = 5, 28
    _, _, delta, _, _ = reference.attention_grid(torch.zeros(1, 5, dtype=f64), n, size, size)
    assert delta.item() == pytest.approx((size - 1) / (n - 1))
    gx = (size + 1) / 2
    mus = [gx + (i - n / 2 - 0.5) * delta.item() for i in range(1, n + 1)]
    assert mus[0] == pytest.approx(1.0) and mus[-1] == pytest.approx(size)


def test_gaussian_exponent_value_at_a_known_point():
    """F_X[i, a] is exp(-(a - mu_i)^2 / (2 sigma^2)) / Z: check one entry against hand arithmetic."""
    width, height, n = 10, 10, 3
    sigma2 = 1.7
    gx_tilde = 0.2
    params = torch.tensor([[gx_tilde, 0.0, math.log(sigma2), math.log(0.5), 0.0]], dtype=f64)
    fx, _, _ = kernels.filterbank(params, n, height, width)
    gx = (width + 1) / 2 * (gx_tilde + 1)
    delta = (width - 1) / (n - 1) * 0.5
    mu_1 = gx + (1 - n / 2 - 0.5) * delta
    unnormalised = [math.exp(-((a - mu_1) ** 2) / (2 * sigma2)) for a in range(1, width + 1)]
    a = 4  # 1-based pixel
    expected = unnormalised[a - 1] / sum(unnormalised)
    assert fx[0, 0, a - 1].item() == pytest.approx(expected, rel=1e-12)
    # the wrong exponent some ports use, -(a - mu)^2 / (2 sigma), gives another number
    wrong = [math.exp(-((a - mu_1) ** 2) / (2 * math.sqrt(sigma2))) for a in range(1, width + 1)]
    assert fx[0, 0, a - 1].item() != pytest.approx(wrong[a - 1] / sum(wrong), rel=1e-3)


def test_single_point_grid_sits_on_the_centre():
    """N = 1: the grid is the single point (gx, gy), whatever delta is."""
    params = torch.tensor([[0.3, -0.4, 0.0, 2.0, 0.0]], dtype=f64)
    gx, gy, _, _, _ = reference.attention_grid(params, 1, 20, 30)
    fx, fy, _ = kernels.filterbank(params, 1, 20, 30)
    assert fx[0, 0].argmax().item() + 1 == round(gx.item())
    assert fy[0, 0].argmax().item() + 1 == round(gy.item())


def test_read_matches_explicit_matrix_products():
    g = torch.Generator().manual_seed(1)
    B, C, H, W, n = 3, 2, 9, 11, 4
    x = torch.rand(B, C, H, W, dtype=f64, generator=g)
    canvas = torch.randn(B, C, H, W, dtype=f64, generator=g)
    params = random_params(B, generator=g)
    out = kernels.read(x, canvas, params, n, backend="reference")
    fx, fy, gamma = kernels.filterbank(params, n, H, W)
    for b in range(B):
        for c in range(C):
            x_hat = x[b, c] - torch.sigmoid(canvas[b, c])
            torch.testing.assert_close(out[b, 0, c], gamma[b] * fy[b] @ x[b, c] @ fx[b].T)
            torch.testing.assert_close(out[b, 1, c], gamma[b] * fy[b] @ x_hat @ fx[b].T)


def test_glimpse_matches_explicit_matrix_products():
    """glimpse = gamma * F_Y x F_X^T per channel (Eq. 27's first half), on an odd shape with C = 3, N = 16."""
    g = torch.Generator().manual_seed(11)
    B, C, H, W, n = 2, 3, 13, 7, 16
    x = torch.rand(B, C, H, W, dtype=f64, generator=g)
    params = random_params(B, generator=g)
    out = kernels.glimpse(x, params, n, backend="reference")
    assert out.shape == (B, C, n, n) and out.dtype == f64
    fx, fy, gamma = kernels.filterbank(params, n, H, W)
    for b in range(B):
        for c in range(C):
            torch.testing.assert_close(out[b, c], gamma[b] * fy[b] @ x[b, c] @ fx[b].T)


@pytest.mark.parametrize("n", [1, 2, 7, 16])
def test_glimpse_is_reads_first_glimpse_for_any_canvas(n):
    g = torch.Generator().manual_seed(12)
    x = torch.rand(2, 3, 9, 11, dtype=f64, generator=g)
    params = random_params(2, generator=g)
    out = kernels.glimpse(x, params, n, backend="reference")
    for canvas in (torch.randn(2, 3, 9, 11, dtype=f64, generator=g), torch.zeros_like(x), torch.full_like(x, 1e4)):
        torch.testing.assert_close(out, kernels.read(x, canvas, params, n, backend="reference")[:, 0],
                                   rtol=1e-14, atol=1e-15)


def test_write_is_the_adjoint_of_read():
    """<F_Y x F_X^T, w> = <x, F_Y^T w F_X>: write's filter is read's transpose (with gamma = 1)."""
    g = torch.Generator().manual_seed(2)
    B, C, H, W, n = 4, 3, 12, 17, 5
    params = random_params(B, generator=g)
    params[:, 4] = 0.0  # gamma = 1
    x = torch.randn(B, C, H, W, dtype=f64, generator=g)
    w = torch.randn(B, C, n, n, dtype=f64, generator=g)
    # read of x with a canvas so negative that sigmoid is 0: the first glimpse is F_Y x F_X^T
    read_x = kernels.read(x, torch.full_like(x, -1e4), params, n, backend="reference")[:, 0]
    written = kernels.write(w, params, torch.zeros_like(x), backend="reference")
    lhs = (read_x * w).sum((1, 2, 3))
    rhs = (x * written).sum((1, 2, 3))
    torch.testing.assert_close(lhs, rhs)


def test_write_divides_by_gamma():
    g = torch.Generator().manual_seed(3)
    params = random_params(2, generator=g)
    w = torch.randn(2, 1, 3, 3, dtype=f64, generator=g)
    canvas = torch.randn(2, 1, 8, 8, dtype=f64, generator=g)
    base = kernels.write(w, params, canvas, backend="reference") - canvas
    params[:, 4] += math.log(4.0)
    torch.testing.assert_close(kernels.write(w, params, canvas, backend="reference") - canvas, base / 4)


@pytest.mark.parametrize("B, C, H, W, n", [(2, 1, 6, 6, 2), (2, 3, 5, 7, 1), (1, 2, 7, 4, 3)])
def test_gradcheck_read(B, C, H, W, n):
    g = torch.Generator().manual_seed(4)
    x = torch.rand(B, C, H, W, dtype=f64, generator=g, requires_grad=True)
    canvas = torch.randn(B, C, H, W, dtype=f64, generator=g, requires_grad=True)
    params = random_params(B, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: kernels.read(*a, n, backend="reference"), (x, canvas, params))


@pytest.mark.parametrize("B, C, H, W, n", [(2, 1, 6, 6, 2), (2, 3, 5, 7, 1), (1, 3, 7, 4, 5)])
def test_gradcheck_glimpse(B, C, H, W, n):
    g = torch.Generator().manual_seed(9)
    x = torch.rand(B, C, H, W, dtype=f64, generator=g, requires_grad=True)
    params = random_params(B, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: kernels.glimpse(*a, n, backend="reference"), (x, params))


@pytest.mark.parametrize("B, C, H, W, n", [(2, 1, 6, 6, 2), (2, 3, 5, 7, 1), (1, 2, 7, 4, 3)])
def test_gradcheck_write(B, C, H, W, n):
    g = torch.Generator().manual_seed(5)
    patch = torch.randn(B, C, n, n, dtype=f64, generator=g, requires_grad=True)
    canvas = torch.randn(B, C, H, W, dtype=f64, generator=g, requires_grad=True)
    params = random_params(B, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: kernels.write(*a, backend="reference"), (patch, params, canvas))


DEGENERATE = {  # raw parameter columns set for every image: {column: value}
    "tiny sigma^2": {2: -30.0},
    "very tiny sigma^2": {2: -60.0},
    # 1 / (2 sigma^2) past fp32's range (and fp64's): a filter is then a pixel wide, never NaN
    "sigma^2 past the range": {2: -800.0},
    "sigma^2 past fp32's range, centred on a pixel": {0: 0.0, 2: -89.0},  # gx = 7 on 13 columns: (a - mu)^2 = 0
    "centre far outside": {0: 50.0},
    "centre astronomically far": {0: 1e19},  # (a - mu)^2 past fp32's range
    "huge gamma": {4: 15.0},
    "tiny gamma": {4: -15.0},
    "huge delta": {3: 8.0},
    "astronomical delta": {3: 45.0},
}


@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("case", DEGENERATE)
def test_degenerate_parameters_stay_finite(case, dtype):
    g = torch.Generator().manual_seed(6)
    B, C, H, W = 3, 2, 10, 13
    x = torch.rand(B, C, H, W, generator=g).to(dtype).requires_grad_()
    canvas = torch.randn(B, C, H, W, generator=g).to(dtype).requires_grad_()
    params = (0.3 * torch.randn(B, 5, generator=g)).to(dtype)
    for index, value in DEGENERATE[case].items():
        params[:, index] = value
    params.requires_grad_()
    patch = torch.randn(B, C, 4, 4, generator=g).to(dtype).requires_grad_()
    r = kernels.read(x, canvas, params, 3, backend="reference")
    w = kernels.write(patch, params, canvas, backend="reference")
    glimpse = kernels.glimpse(x, params, 5, backend="reference")
    assert torch.isfinite(r).all() and torch.isfinite(w).all() and torch.isfinite(glimpse).all()
    (r.sum() + w.sum() + glimpse.sum()).backward()
    for name, t in dict(x=x, canvas=canvas, params=params, patch=patch).items():
        assert torch.isfinite(t.grad).all(), f"{case}: non-finite gradient of {name}"
    if case.startswith("centre"):
        assert r.abs().max() < 1e-6  # the filters see nothing, and say so with zeros, not NaN
        assert glimpse.abs().max() < 1e-6
    if case == "sigma^2 past fp32's range, centred on a pixel":  # F_X a one-hot on column 7 (gx~ = 0 on 13)
        fx, _fy, _gamma = kernels.filterbank(params.detach(), 3, H, W)
        assert torch.equal(fx[:, 1], torch.nn.functional.one_hot(torch.tensor(6), W).to(dtype).expand(B, W))


def test_colour_channels_share_filterbanks():
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 1, 8, 9, dtype=f64, generator=g)
    canvas = torch.randn(2, 1, 8, 9, dtype=f64, generator=g)
    params = random_params(2, generator=g)
    single = kernels.read(x, canvas, params, 3, backend="reference")
    colour = kernels.read(x.expand(2, 3, 8, 9), canvas.expand(2, 3, 8, 9), params, 3, backend="reference")
    assert colour.shape == (2, 2, 3, 3, 3)
    for c in range(3):
        torch.testing.assert_close(colour[:, :, c], single[:, :, 0])


def test_half_precision_inputs_compute_in_fp32():
    g = torch.Generator().manual_seed(8)
    x = torch.rand(2, 1, 8, 8, generator=g)
    canvas = torch.randn(2, 1, 8, 8, generator=g)
    params = 0.3 * torch.randn(2, 5, generator=g)
    out = kernels.read(x.bfloat16(), canvas.bfloat16(), params.bfloat16(), 3, backend="reference")
    assert out.dtype == torch.bfloat16
    expected = kernels.read(x.bfloat16().float(), canvas.bfloat16().float(), params.bfloat16().float(), 3, backend="reference")
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


# --- bad input ------------------------------------------------------------------------------

X = torch.rand(2, 1, 8, 8)
P = torch.zeros(2, 5)
W5 = torch.zeros(2, 1, 5, 5)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: kernels.read(X, X, P, 2, backend="fast"), ValueError, "backend must be one of"),
        (lambda: kernels.read(X[0], X[0], P, 2), ValueError, r"x must be \[B, C, H, W\]"),
        (lambda: kernels.read(X, X[:, :, :4], P, 2), ValueError, "canvas must have x's shape"),
        (lambda: kernels.read(X, X, P[:, :4], 2), ValueError, r"params must be \[B, 5\]"),
        (lambda: kernels.read(X, X, P[:1], 2), ValueError, r"params must be \[B, 5\] = \[2, 5\]"),
        (lambda: kernels.read(X, X, P, 0), ValueError, "n must be an int >= 1"),
        (lambda: kernels.read(X, X, P, 2.0), ValueError, "n must be an int >= 1"),
        (lambda: kernels.read(X.long(), X, P, 2), TypeError, "x must have a floating-point dtype"),
        (lambda: kernels.read(X.numpy(), X, P, 2), TypeError, "x must be a torch.Tensor"),
        (lambda: kernels.read(X, X, P.to("meta"), 2), ValueError, "one device"),
        (lambda: kernels.glimpse(X, P, 2, backend="fast"), ValueError, "backend must be one of"),
        (lambda: kernels.glimpse(X[0], P, 2), ValueError, r"x must be \[B, C, H, W\]"),
        (lambda: kernels.glimpse(X, P[:, :4], 2), ValueError, r"params must be \[B, 5\]"),
        (lambda: kernels.glimpse(X, P[:1], 2), ValueError, r"params must be \[B, 5\] = \[2, 5\]"),
        (lambda: kernels.glimpse(X, P, 0), ValueError, "n must be an int >= 1"),
        (lambda: kernels.glimpse(X.long(), P, 2), TypeError, "x must have a floating-point dtype"),
        (lambda: kernels.glimpse(X, X, 2), ValueError, "params must be"),
        (lambda: kernels.glimpse(X, P.to("meta"), 2), ValueError, "one device"),
        (lambda: kernels.write(W5, P, X[:, :, :, :, None]), ValueError, "canvas must be"),
        (lambda: kernels.write(W5[:, :, :4], P, X), ValueError, r"patch must be \[B, C, n, n\]"),
        (lambda: kernels.write(W5.int(), P, X), TypeError, "patch must have a floating-point dtype"),
        (lambda: kernels.write(torch.zeros(2, 1, 0, 0), P, X), ValueError, "write grid size"),
        (lambda: kernels.filterbank(P, 0, 8, 8), ValueError, "n must be an int >= 1"),
    ],
)
def test_bad_input_is_refused_clearly(call, error, match):
    with pytest.raises(error, match=match):
        call()
