"""A fused Triton kernel for DRAW's latent step: the reparameterised sample and its per-image terms.

The maths (kernels/reference.py, latent_sample), for one time step's mu, log sigma and standard-normal
draw eps, each [B, Z], with sigma = exp(log sigma):
    z         = mu + sigma * eps                                  (6)
    kl        = sum_j 0.5 (mu^2 + sigma^2) - log sigma - 0.5      (11): KL(N(mu, sigma^2) || N(0, I))
    log_ratio = sum_j 0.5 (eps^2 - z^2) + log sigma               log N(z; 0, I) - log N(z; mu, sigma^2)
                                                                  (the log-normalisers cancel)
and with gz, gk, gr the gradients of z, kl and log_ratio, a = gz - gr z:
    dmu         = a + gk mu
    dlog sigma  = a sigma eps + gk (sigma^2 - 1) + gr
    deps        = a sigma + gr eps

What is fused: autograd runs five kernels for the sample and its gradient at every step (exp, mul,
add; two muls back) and two adds where the gradients of the latent loss join mu's and log sigma's, plus
a dozen for the terms over all steps; here one launch forward (z and both terms) and one backward.

Bytes (s per element, B x Z): forward s * 4 B Z + 8 B (mu, log sigma, eps in; z out; the two terms),
backward s * 6 B Z (+ s B Z for deps) + 8 B.

Program layout: program p owns rows [p BLOCK_B, (p + 1) BLOCK_B) and loops over the Z columns in
blocks of BLOCK_Z. Computation in fp32 (fp64 when any input is fp64); z and the gradients are stored in
their tensors' dtypes, the terms in the compute dtype.
"""

import torch
import triton
import triton.language as tl

from draw.kernels.triton_attention import (_backward, _cast_for_store, _compute_dtypes, _device_guard, _gradient_output,
                                          _gradient_places)

__all__ = ["latent_sample", "latent_sample_backward", "latent_sample_forward"]

# Elements of one [BLOCK_B, BLOCK_Z] tile, over 4 warps: 4 per thread, which keeps the compiled kernels at
# 32-40 registers in fp32 and bf16, 48-80 in fp64, no spills (sm_90, triton 3.6 and 3.9, ptxas -v) and gives a batch of
# 1,024 with Z = 100 256 programs; 2,048 took 210-255 registers and 64 programs.
_TILE = 512
_NUM_WARPS = 4


@triton.jit
def _load_block(mu_ptr, log_sigma_ptr, eps_ptr, rows, row_mask, start, size,
                stride_mb, stride_mz, stride_lb, stride_lz, stride_eb, stride_ez,
                BLOCK_Z: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """Columns [start, start + BLOCK_Z) of the program's rows: (cols, mask, mu, log sigma, eps), the three
    [BLOCK_B, BLOCK_Z] in the compute dtype, 0 where masked (rows past B, columns past Z)."""
    cols = start + tl.arange(0, BLOCK_Z)
    mask = row_mask[:, None] & (cols < size)[None, :]
    mu = tl.load(mu_ptr + rows[:, None] * stride_mb + cols[None, :] * stride_mz, mask=mask, other=0.0)
    log_sigma = tl.load(log_sigma_ptr + rows[:, None] * stride_lb + cols[None, :] * stride_lz, mask=mask, other=0.0)
    eps = tl.load(eps_ptr + rows[:, None] * stride_eb + cols[None, :] * stride_ez, mask=mask, other=0.0)
    return cols, mask, mu.to(COMPUTE_DTYPE), log_sigma.to(COMPUTE_DTYPE), eps.to(COMPUTE_DTYPE)


@triton.jit
def _latent_forward_kernel(
    mu_ptr, log_sigma_ptr, eps_ptr, z_ptr, terms_ptr,
    batch, size,
    stride_mb, stride_mz, stride_lb, stride_lz, stride_eb, stride_ez,
    BLOCK_B: tl.constexpr, BLOCK_Z: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):
    # Program p owns rows [p BLOCK_B, (p + 1) BLOCK_B): z [B, Z] and terms [B, 2] (kl, log_ratio), both
    # contiguous; the masks drop the rows past B and the columns past Z of the last blocks.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < batch
    kl = tl.zeros([BLOCK_B], dtype=COMPUTE_DTYPE)
    log_ratio = tl.zeros([BLOCK_B], dtype=COMPUTE_DTYPE)
    for start in range(0, size, BLOCK_Z):
        cols, mask, mu, log_sigma, eps = _load_block(mu_ptr, log_sigma_ptr, eps_ptr, rows, row_mask, start, size,
                                                     stride_mb, stride_mz, stride_lb, stride_lz, stride_eb, stride_ez,
                                                     BLOCK_Z, COMPUTE_DTYPE)
        sigma = tl.exp(log_sigma)
        z = mu + sigma * eps  # (6)
        tl.store(z_ptr + rows[:, None] * size + cols[None, :], _cast_for_store(z, z_ptr), mask=mask)
        kl += tl.sum(tl.where(mask, 0.5 * (mu * mu + sigma * sigma) - log_sigma - 0.5, 0.0), axis=1)  # (11)
        log_ratio += tl.sum(tl.where(mask, 0.5 * (eps * eps - z * z) + log_sigma, 0.0), axis=1)
    tl.store(terms_ptr + rows * 2, kl, mask=row_mask)
    tl.store(terms_ptr + rows * 2 + 1, log_ratio, mask=row_mask)


@triton.jit
def _latent_backward_kernel(
    mu_ptr, log_sigma_ptr, eps_ptr, grad_z_ptr, grad_terms_ptr, grad_mu_ptr, grad_log_sigma_ptr, grad_eps_ptr,
    batch, size,
    stride_mb, stride_mz, stride_lb, stride_lz, stride_eb, stride_ez, stride_gzb, stride_gzz, stride_gtb, stride_gtk,
    stride_dmb, stride_dlb,
    HAS_GRAD_Z: tl.constexpr, HAS_GRAD_TERMS: tl.constexpr, STORE_GRAD_EPS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_Z: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):
    # Program p owns rows [p BLOCK_B, (p + 1) BLOCK_B) of dmu, dlog sigma (rows strided by stride_dmb,
    # stride_dlb: their places may be column slices) and (STORE_GRAD_EPS) deps [B, Z]. A missing gradient (HAS_GRAD_Z, HAS_GRAD_TERMS false: that output reached no
    # loss) is zero, and its pointer is never read.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < batch
    if HAS_GRAD_TERMS:
        grad_kl = tl.load(grad_terms_ptr + rows * stride_gtb, mask=row_mask, other=0.0).to(COMPUTE_DTYPE)[:, None]
        grad_ratio = tl.load(grad_terms_ptr + rows * stride_gtb + stride_gtk, mask=row_mask, other=0.0).to(COMPUTE_DTYPE)[:, None]
    else:
        grad_kl = tl.zeros([BLOCK_B, 1], dtype=COMPUTE_DTYPE)
        grad_ratio = tl.zeros([BLOCK_B, 1], dtype=COMPUTE_DTYPE)
    for start in range(0, size, BLOCK_Z):
        cols, mask, mu, log_sigma, eps = _load_block(mu_ptr, log_sigma_ptr, eps_ptr, rows, row_mask, start, size,
                                                     stride_mb, stride_mz, stride_lb, stride_lz, stride_eb, stride_ez,
                                                     BLOCK_Z, COMPUTE_DTYPE)
        if HAS_GRAD_Z:
            grad_z = tl.load(grad_z_ptr + rows[:, None] * stride_gzb + cols[None, :] * stride_gzz,
                             mask=mask, other=0.0).to(COMPUTE_DTYPE)
        else:
            grad_z = tl.zeros([BLOCK_B, BLOCK_Z], dtype=COMPUTE_DTYPE)
        sigma = tl.exp(log_sigma)
        # in autograd's order, and the terms' share only where they have a gradient: sigma^2 may overflow
        # where sigma does not (and z with it), and 0 * inf would make a finite gradient NaN
        a = grad_z  # the gradient reaching z, from z itself and (below) from log_ratio's -z^2 / 2
        grad_mu = grad_z
        grad_sigma = grad_z * eps
        grad_log_sigma = grad_sigma * sigma
        if HAS_GRAD_TERMS:
            z = mu + sigma * eps
            a = grad_z - grad_ratio * z
            grad_mu = a + grad_kl * mu
            grad_sigma = a * eps + grad_kl * sigma  # KL's sigma^2 / 2
            grad_log_sigma = grad_sigma * sigma - grad_kl + grad_ratio
        tl.store(grad_mu_ptr + rows[:, None] * stride_dmb + cols[None, :], _cast_for_store(grad_mu, grad_mu_ptr), mask=mask)
        tl.store(grad_log_sigma_ptr + rows[:, None] * stride_dlb + cols[None, :],
                 _cast_for_store(grad_log_sigma, grad_log_sigma_ptr), mask=mask)
        if STORE_GRAD_EPS:
            grad_eps = a * sigma + grad_ratio * eps
            tl.store(grad_eps_ptr + rows[:, None] * size + cols[None, :], _cast_for_store(grad_eps, grad_eps_ptr), mask=mask)


def _blocks(size: int) -> dict:
    block_z = min(triton.next_power_of_2(max(size, 1)), _TILE)
    return {"BLOCK_B": max(_TILE // block_z, 1), "BLOCK_Z": block_z, "num_warps": _NUM_WARPS}


def latent_sample_forward(mu: torch.Tensor, log_sigma: torch.Tensor, eps: torch.Tensor):
    """Launch the forward kernel. mu, log_sigma, eps [B, Z] -> z [B, Z] (mu's dtype), terms [B, 2]
    (kl, log_ratio; in the compute dtype: fp64 when any input is, else fp32, as the reference's)."""
    batch, size = mu.shape
    compute_torch, compute = _compute_dtypes(mu, log_sigma, eps)
    z = torch.empty((batch, size), device=mu.device, dtype=mu.dtype)
    terms = torch.empty((batch, 2), device=mu.device, dtype=compute_torch)
    if batch == 0:
        return z, terms
    blocks = _blocks(size)
    with _device_guard(mu):
        _latent_forward_kernel[(triton.cdiv(batch, blocks["BLOCK_B"]),)](
            mu, log_sigma, eps, z, terms, batch, size,
            *mu.stride(), *log_sigma.stride(), *eps.stride(), COMPUTE_DTYPE=compute, **blocks)
    return z, terms


def latent_sample_backward(grad_z, grad_terms, mu, log_sigma, eps, eps_needs_grad: bool, out_mu=None, out_log_sigma=None):
    """Launch the backward kernel. grad_z [B, Z] and grad_terms [B, 2] may be None (zero). dmu and
    dlog_sigma are written into out_mu and out_log_sigma when given (their places: [B, Z] with contiguous
    columns, any row stride), else into new tensors. Returns (dmu, dlog_sigma, deps or None), each in its
    input's dtype."""
    batch, size = mu.shape
    _, compute = _compute_dtypes(mu, log_sigma, eps)
    grad_mu, grad_log_sigma = _gradient_output(out_mu, mu), _gradient_output(out_log_sigma, log_sigma)
    grad_eps = torch.empty((batch, size), device=mu.device, dtype=eps.dtype) if eps_needs_grad else None
    if batch == 0:
        return grad_mu, grad_log_sigma, grad_eps
    blocks = _blocks(size)
    with _device_guard(mu):
        _latent_backward_kernel[(triton.cdiv(batch, blocks["BLOCK_B"]),)](
            mu, log_sigma, eps,
            mu if grad_z is None else grad_z, mu if grad_terms is None else grad_terms,  # never read when None
            grad_mu, grad_log_sigma, grad_mu if grad_eps is None else grad_eps,
            batch, size, *mu.stride(), *log_sigma.stride(), *eps.stride(),
            *(mu.stride() if grad_z is None else grad_z.stride()), *((0, 0) if grad_terms is None else grad_terms.stride()),
            grad_mu.stride(0), grad_log_sigma.stride(0),
            HAS_GRAD_Z=grad_z is not None, HAS_GRAD_TERMS=grad_terms is not None, STORE_GRAD_EPS=eps_needs_grad,
            COMPUTE_DTYPE=compute, **blocks)
    return grad_mu, grad_log_sigma, grad_eps


class _LatentSampleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, log_sigma, eps, destinations):
        ctx.save_for_backward(mu, log_sigma, eps)
        ctx.destinations = destinations
        ctx.set_materialize_grads(False)
        return latent_sample_forward(mu, log_sigma, eps)

    @staticmethod
    def backward(ctx, grad_z, grad_terms):
        if grad_z is None and grad_terms is None:
            return None, None, None, None
        mu, log_sigma, eps = ctx.saved_tensors
        places = _gradient_places(ctx.destinations, ctx.needs_input_grad[:2])  # mu's and log sigma's
        return (*_backward(latent_sample_backward, grad_z, grad_terms, mu, log_sigma, eps, ctx.needs_input_grad[2],
                           *places), None)


def latent_sample(mu: torch.Tensor, log_sigma: torch.Tensor, eps: torch.Tensor, destinations=(None, None)):
    """Fused latent step, Eqs. 6 and 11 (see the module docstring).

    Args:
        mu, log_sigma, eps: [B, Z] (any strides).
        destinations: for mu and log sigma, None or a callable giving, once, the tensor its gradient is
            to be written into (kernels.gradient_destination).
    Returns:
        z [B, Z] in mu's dtype; terms [B, 2]: (KL, log_ratio) per image, fp32 (fp64 for fp64 inputs).
    """
    return _LatentSampleFunction.apply(mu, log_sigma, eps, destinations)
