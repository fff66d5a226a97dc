"""DRAW's selective attention, latent step and LSTM cell in plain, batched PyTorch: the executable spec.

Gregor et al. 2015, Eqs. 19-29, with the conventions of docs/conventions.md: 1-based pixel coordinates
a = 1..W, b = 1..H, a 1-based grid index i = 1..N, Z = max(row sum, 1e-8), and N = 1 allowed.

Every function here is differentiable by autograd, runs on any device and dtype, and has no Python
loop over the batch, the grid or the pixels. The fused Triton kernels are tested against it.

Bytes moved (fp32, B images of C x H x W, grid N), counting what the maths must touch:
    read : x and canvas in (2 * B*C*H*W * 4), params in (B*5*4), glimpses out (B*2*C*N*N * 4)
    glimpse: x in (B*C*H*W * 4), params in (B*5*4), glimpses out (B*C*N*N * 4)
    write: canvas in and out (2 * B*C*H*W * 4), patch in (B*C*N*N * 4), params in (B*5*4)
This reference moves more: it materialises F_X [B, N, W], F_Y [B, N, H], sigmoid(canvas) and x_hat.
"""

import torch

ROW_SUM_FLOOR = 1e-8  # Z = max(row sum, 1e-8): an all-underflow row becomes ~0, never NaN
OFFSET_LIMIT = 1e18  # |a - mu| is taken at most this (its square stays inside fp32); the filter there is 0
# log sigma^2 is taken at least this, per compute dtype: sigma^2 stays a normal number (fp32's least is
# e^-87.3, fp64's e^-708.4) and 1 / (2 sigma^2) finite. Below it a filter is one pixel wide (or 0) either way;
# without it 1 / (2 sigma^2) = inf, and a pixel on a centre gives 0 * inf = NaN. The kernels take the same.
LOG_SIGMA2_FLOOR = {torch.float32: -87.0, torch.float64: -708.0}


def attention_grid(params: torch.Tensor, n: int, height: int, width: int):
    """Decode raw attention parameters into the grid's centre, stride, variance and intensity.

    Args:
        params: [B, 5] raw (gx~, gy~, log sigma^2, log delta~, log gamma), Eq. 21.
        n: grid size N (>= 1).
        height, width: image size H, W.
    Returns:
        gx [B], gy [B] (1-based pixel coordinates), delta [B], sigma2 [B], gamma [B].
    """
    gx_, gy_, log_sigma2, log_delta_, log_gamma = params.unbind(-1)
    gx = (width + 1) / 2 * (gx_ + 1)  # (22)
    gy = (height + 1) / 2 * (gy_ + 1)  # (23)
    delta = (max(width, height) - 1) / max(n - 1, 1) * torch.exp(log_delta_)  # (24), N = 1: divisor 1
    return gx, gy, delta, torch.exp(log_sigma2), torch.exp(log_gamma)


def _gaussian_rows(centre, delta, inv_two_sigma2, n: int, size: int):
    """Normalised Gaussian filterbank rows [B, n, size], Eqs. 19-20 and 25-26.

    The exponent -(a - mu)^2 / (2 sigma^2) is formed as -(a - mu)^2 * (exp(-log sigma^2) / 2): with a
    division, the gradient would square sigma^2, which underflows (and turns 0 * inf into NaN) for
    sigma^2 below ~1e-19 in fp32.
    """
    grid = torch.arange(1, n + 1, device=centre.device, dtype=centre.dtype)  # i = 1..N
    mu = centre[:, None] + (grid - n / 2 - 0.5) * delta[:, None]  # [B, n]  (19), (20)
    pixels = torch.arange(1, size + 1, device=centre.device, dtype=centre.dtype)  # a = 1..size
    # beyond 1e18 pixels from a centre, (a - mu)^2 would overflow fp32 (and its gradient meet -inf * 0 = NaN);
    # the filter there is 0 either way, and so is its gradient
    offset = (pixels - mu[:, :, None]).clamp(-OFFSET_LIMIT, OFFSET_LIMIT)  # [B, n, size]
    rows = torch.exp(-(offset ** 2) * inv_two_sigma2[:, None, None])  # [B, n, size]
    return rows / rows.sum(-1, keepdim=True).clamp_min(ROW_SUM_FLOOR)  # (25), (26)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype an op's arithmetic runs in, given its inputs: fp64 when any of them is fp64, else fp32 (fp16 and
    bf16 inputs are computed in fp32). The kernels follow the same rule."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def filterbank(params: torch.Tensor, n: int, height: int, width: int, dtype: torch.dtype | None = None):
    """The filterbank matrices and intensity of Eqs. 19-26.

    Args:
        params: [B, 5] raw attention parameters.
        n: grid size N.
        height, width: image size H, W.
        dtype: the arithmetic's dtype (default compute_dtype(params): the op's, when it has other inputs).
    Returns:
        fx [B, n, W], fy [B, n, H], gamma [B], in that dtype.
    """
    compute = dtype or compute_dtype(params)
    params = params.to(compute)
    gx, gy, delta, _, gamma = attention_grid(params, n, height, width)
    # 1 / (2 sigma^2) with log sigma^2 at least LOG_SIGMA2_FLOOR (its gradient 0 below; capping exp's result
    # instead would leave 0 * inf there)
    inv_two_sigma2 = 0.5 * torch.exp(-params[:, 2].clamp_min(LOG_SIGMA2_FLOOR[compute]))
    fx = _gaussian_rows(gx, delta, inv_two_sigma2, n, width)
    fy = _gaussian_rows(gy, delta, inv_two_sigma2, n, height)
    return fx, fy, gamma


def _filter_images(images: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor, gamma: torch.Tensor):
    """gamma * F_Y img F_X^T (Eq. 27) of every image img in images [B, ..., H, W] -> [B, ..., n, n]."""
    extra = (1,) * (images.dim() - 3)  # the dims between the batch and the pixels
    fx = fx.view(fx.shape[0], *extra, *fx.shape[1:])  # [B, 1.., n, W]
    fy = fy.view(fy.shape[0], *extra, *fy.shape[1:])  # [B, 1.., n, H]
    rows = images @ fx.transpose(-1, -2)  # [B, ..., H, n]: img F_X^T
    return gamma.view(-1, *extra, 1, 1) * (fy @ rows)  # [B, ..., n, n]: gamma F_Y img F_X^T  (27)


def read(x: torch.Tensor, canvas: torch.Tensor, params: torch.Tensor, n: int,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Attention read, Eqs. 3 and 27: gamma * [F_Y x F_X^T, F_Y x_hat F_X^T], x_hat = x - sigmoid(canvas).

    Args:
        x: [B, C, H, W] images.
        canvas: [B, C, H, W] canvas logits c_{t-1}.
        params: [B, 5] raw read parameters.
        n: read grid size N.
        dtype: the glimpses' dtype (default x's).
    Returns:
        [B, 2, C, n, n] glimpses (index 0: of x, index 1: of the error image), in `dtype`.
    """
    height, width = x.shape[-2:]
    fx, fy, gamma = filterbank(params, n, height, width, compute_dtype(x, canvas, params))
    compute = fx.dtype
    x_hat = x.to(compute) - torch.sigmoid(canvas.to(compute))  # (3)
    images = torch.stack([x.to(compute), x_hat], dim=1)  # [B, 2, C, H, W]
    return _filter_images(images, fx, fy, gamma).to(dtype or x.dtype)


def glimpse(x: torch.Tensor, params: torch.Tensor, n: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Glimpse of x alone, Eq. 27's first half: gamma * F_Y x F_X^T (no canvas, no error image).

    Args:
        x: [B, C, H, W] images.
        params: [B, 5] raw attention parameters.
        n: grid size N.
        dtype: the glimpses' dtype (default x's).
    Returns:
        [B, C, n, n] glimpses, in `dtype`: read(x, canvas, params, n)[:, 0] for any canvas.
    """
    fx, fy, gamma = filterbank(params, n, *x.shape[-2:], compute_dtype(x, params))
    return _filter_images(x.to(fx.dtype), fx, fy, gamma).to(dtype or x.dtype)


def write(patch: torch.Tensor, params: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """Attention write added to the canvas, Eqs. 8 and 29: canvas + (1 / gamma) F_Y^T w F_X.

    Args:
        patch: [B, C, n, n] the write patch w_t.
        params: [B, 5] raw write parameters.
        canvas: [B, C, H, W] canvas logits c_{t-1}.
    Returns:
        [B, C, H, W] the new canvas c_t, in the canvas's dtype.
    """
    n = patch.shape[-1]
    height, width = canvas.shape[-2:]
    fx, fy, _ = filterbank(params, n, height, width, compute_dtype(patch, params, canvas))
    written = fy[:, None].transpose(-1, -2) @ patch.to(fx.dtype) @ fx[:, None]  # [B, C, H, W]: F_Y^T w F_X  (29)
    # 1 / gamma as exp(-log gamma): a division's gradient would square gamma, (written / gamma) / gamma, which
    # underflows to 0 where the exact gradient, -written / gamma, does not (log gamma ~ 300 in fp64)
    inverse_gamma = torch.exp(-params[:, 4].to(fx.dtype))
    return (canvas.to(fx.dtype) + written * inverse_gamma[:, None, None, None]).to(canvas.dtype)


def write_read(patch: torch.Tensor, write_params: torch.Tensor, canvas: torch.Tensor, x: torch.Tensor,
               read_params: torch.Tensor, n: int,
               dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """write, then read the new canvas: (c_t, read(x, c_t, read_params, n, dtype)), c_t = write(patch,
    write_params, canvas) (Eqs. 8, 29, then 3, 27). The definition of the fused op of the same name."""
    new_canvas = write(patch, write_params, canvas)
    return new_canvas, read(x, new_canvas, read_params, n, dtype)


def latent_sample(mu: torch.Tensor, log_sigma: torch.Tensor, eps: torch.Tensor):
    """One step's reparameterised sample and its per-image Gaussian terms (Eqs. 6, 11).

    Args:
        mu, log_sigma: [B, Z] the mean and log standard deviation of Q(Z_t | h_enc_t)  (1, 2).
        eps: [B, Z] a standard-normal draw.
    Returns:
        z [B, Z] = mu + exp(log_sigma) * eps, in mu's dtype  (6);
        terms [B, 2], in compute_dtype(mu, log_sigma, eps): KL(N(mu, sigma^2) || N(0, I)) summed over Z  (11), and
        log N(z; 0, I) - log N(z; mu, sigma^2) = sum_j 0.5 (eps^2 - z^2) + log sigma.
    """
    out_dtype, wide = mu.dtype, compute_dtype(mu, log_sigma, eps)  # fp32 or fp64; z rounded once
    mu, log_sigma, eps = mu.to(wide), log_sigma.to(wide), eps.to(wide)
    sigma = torch.exp(log_sigma)
    z = mu + sigma * eps  # (6)
    kl = 0.5 * (mu.square() + sigma.square() - 1) - log_sigma  # (11), per unit
    log_ratio = 0.5 * (eps.square() - z.square()) + log_sigma
    return z.to(out_dtype), torch.stack([kl, log_ratio], dim=1).sum(2)


def lstm_cell(input_gates: torch.Tensor, hidden_gates: torch.Tensor, c: torch.Tensor):
    """nn.LSTMCell's update from its two pre-activation halves (biases included): gates [B, 4H] in
    nn.LSTMCell's order (input, forget, cell, output), c [B, H] in their dtype. Returns (h, c'), each [B, H]
    in the gates' dtype, computed in compute_dtype (fp16 and bf16 in fp32, as CUDA's fused cell computes them).

    On CUDA one fused kernel forward and one backward (the one nn.LSTMCell uses there), except under
    torch.compile: that kernel's shape check for tracing (torch 2.11's meta function) fails on the
    absent biases, and the compiler fuses the pointwise update below into one kernel anyway.
    """
    if input_gates.is_cuda and not torch.compiler.is_compiling():
        h, c, _ = torch.ops.aten._thnn_fused_lstm_cell(input_gates, hidden_gates, c)
        return h, c
    out_dtype, wide = input_gates.dtype, compute_dtype(input_gates, hidden_gates, c)  # fp16/bf16 computed in fp32
    i, f, g, o = (input_gates.to(wide) + hidden_gates.to(wide)).chunk(4, dim=1)
    c = torch.sigmoid(f) * c.to(wide) + torch.sigmoid(i) * torch.tanh(g)
    return (torch.sigmoid(o) * torch.tanh(c)).to(out_dtype), c.to(out_dtype)
