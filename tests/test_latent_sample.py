"""The latent step, kernels.latent_sample (Eqs. 6, 11): the reference against the Gaussian maths of
torch.distributions, then the fused Triton kernel (kernels/triton_latent.py) against the reference,
forward and every gradient, as tests/test_triton_attention.py does for the attention."""

import os

import pytest
import torch
from helpers import assert_close, assert_written_in_place, gradient_places, ptxas_usage_on_sm90
from torch.distributions import Normal, kl_divergence

from draw import kernels

ON_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if ON_CUDA else "cpu"
requires_kernels = pytest.mark.skipif(
    not (ON_CUDA or INTERPRETED), reason="needs CUDA, or TRITON_INTERPRET=1 set before triton is imported")


def latent_inputs(batch, size, dtype=torch.float64, seed=0, device="cpu", strided=False):
    """mu, log sigma, eps [B, Z], leaves requiring grad; strided: mu and log sigma as column slices of
    one wider tensor, as DRAW passes them (its h_enc projection)."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        wide = torch.randn(batch, 2 * size + 3, generator=g, dtype=torch.float64)
        mu, log_sigma = wide[:, :size], 0.5 * wide[:, size:2 * size]
    else:
        mu, log_sigma = torch.randn(batch, size, generator=g, dtype=torch.float64), 0.5 * torch.randn(batch, size, generator=g, dtype=torch.float64)
    eps = torch.randn(batch, size, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (mu, log_sigma, eps)]


def test_reference_is_the_gaussian_maths():
    """z = mu + sigma eps; terms = (KL(N(mu, sigma^2) || N(0, I)), log N(z; 0, I) - log N(z; mu, sigma^2)),
    summed over Z, from torch.distributions."""
    mu, log_sigma, eps = latent_inputs(5, 7)
    z, terms = kernels.latent_sample(mu, log_sigma, eps, backend="reference")
    q, prior = Normal(mu, torch.exp(log_sigma)), Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert_close(z, mu + torch.exp(log_sigma) * eps, 1e-14, 1e-14, "z")
    assert_close(terms[:, 0], kl_divergence(q, prior).sum(1), 1e-12, 1e-12, "kl")
    assert_close(terms[:, 1], (prior.log_prob(z) - q.log_prob(z)).sum(1), 1e-12, 1e-12, "log ratio")


def test_reference_gradcheck():
    assert torch.autograd.gradcheck(lambda *t: kernels.latent_sample(*t, backend="reference"), tuple(latent_inputs(3, 4)))


def test_bad_inputs_are_refused():
    mu, log_sigma, eps = (t.detach() for t in latent_inputs(3, 4))
    with pytest.raises(ValueError, match="one shape"):
        kernels.latent_sample(mu, log_sigma, eps[:, :3])
    with pytest.raises(ValueError, match=r"\[B, Z\]"):
        kernels.latent_sample(mu[0], log_sigma[0], eps[0])
    with pytest.raises(TypeError, match="floating-point"):
        kernels.latent_sample(mu, log_sigma, eps.long())


def compare(batch, size, dtype, *, strided=False, outputs=("z", "terms"), eps_grad=True, rtol=None, atol=None):
    """Triton against the float64 reference: z, the terms and the gradients of mu, log sigma (and eps)
    under random upstream gradients of the outputs named in `outputs` (the others unused)."""
    leaves = latent_inputs(batch, size, dtype, seed=batch * 1000 + size, device=DEVICE, strided=strided)
    if not eps_grad:
        leaves[2] = leaves[2].detach()
    reference_leaves = [t.detach().to("cpu", torch.float64).requires_grad_(t.requires_grad) for t in leaves]
    fused = kernels.latent_sample(*leaves, backend="triton")
    expected = kernels.latent_sample(*reference_leaves, backend="reference")
    assert fused[0].dtype == dtype and fused[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert fused[0].is_contiguous() and fused[1].shape == (batch, 2)
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(e.shape, generator=g, dtype=torch.float64) for e in expected]
    rtol = rtol if rtol is not None else {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
    atol = atol if atol is not None else rtol
    for name, a, e in zip(("z", "terms"), fused, expected):
        assert_close(a, e, rtol, atol * max(1.0, e.abs().max().item()), name)
    chosen = [i for i, name in enumerate(("z", "terms")) if name in outputs]
    wrt = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad([fused[i] for i in chosen], wrt, [upstream[i].to(DEVICE, fused[i].dtype) for i in chosen])
    wrt_expected = [t for t in reference_leaves if t.requires_grad]
    grads_expected = torch.autograd.grad([expected[i] for i in chosen], wrt_expected, [upstream[i] for i in chosen])
    for name, a, e in zip(("d mu", "d log sigma", "d eps"), grads, grads_expected):
        assert a.dtype == dtype
        assert_close(a, e, rtol, atol * max(1.0, e.abs().max().item()), name)


@requires_kernels
@pytest.mark.parametrize("batch,size", [(1, 1), (7, 3), (37, 100), (5, 130), (3, 2500)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_kernel_forward_and_every_gradient(batch, size, dtype):
    """Odd batches, Z = 1 up to past one tile of columns (2,048: the column loop)."""
    compare(batch, size, dtype)


@requires_kernels
@pytest.mark.parametrize("outputs", [("z",), ("terms",)], ids=["z-only", "terms-only"])
def test_kernel_with_one_output_unused(outputs):
    compare(6, 9, torch.float64, outputs=outputs)


@requires_kernels
@pytest.mark.parametrize("terms_weight", [None, 0.0], ids=["terms-unused", "terms-times-zero"])
def test_kernel_gradients_stay_finite_where_sigma_squared_overflows(terms_weight):
    """log sigma = 50 in fp32: sigma = 5e21 is finite, sigma^2 and so the KL are not. With the terms unused
    (or weighted by 0, as beta = 0 does) the reference's gradients are finite, and so are the kernel's."""
    def gradients(backend):
        mu = torch.zeros(3, 5, device=DEVICE, requires_grad=True)
        log_sigma = torch.full((3, 5), 50.0, device=DEVICE, requires_grad=True)
        eps = torch.linspace(-1e-3, 1e-3, 15, device=DEVICE).view(3, 5)
        z, terms = kernels.latent_sample(mu, log_sigma, eps, backend=backend)
        loss = z.square().sum() * 1e-40 + (0 if terms_weight is None else terms_weight * terms[:, 1].sum())
        return torch.autograd.grad(loss, (mu, log_sigma))

    expected = gradients("reference")
    assert all(torch.isfinite(g).all() for g in expected) and expected[1].abs().max() > 1e-3
    for name, a, e in zip(("d mu", "d log sigma"), gradients("triton"), expected):
        assert_close(a, e, 1e-5, 1e-5 * e.abs().max().item(), name)


@requires_kernels
def test_kernel_on_column_slices_without_eps_gradient():
    """mu and log sigma as slices of a wider tensor (DRAW's case), eps a constant draw."""
    compare(9, 10, torch.float64, strided=True, eps_grad=False)
    compare(9, 10, torch.float32, strided=True, eps_grad=False)


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_kernel_half_precision(dtype):
    """Computed in fp32, stored in the inputs' dtype: within that dtype's rounding of the reference."""
    compare(11, 20, dtype, rtol=2e-2, atol=2e-2)


@requires_kernels
def test_kernel_writes_mu_and_log_sigma_gradients_into_their_destinations():
    """mu and log sigma marked (kernels.mark_gradient_destination): their gradients are written into those
    places and returned as they are, with the reference's values; unmarked, new tensors."""
    leaves = latent_inputs(7, 5, device=DEVICE)
    places, takes = gradient_places((7, 5), (7, 5), device=DEVICE)
    mu, log_sigma = (kernels.mark_gradient_destination(t.clone(), take) for t, take in zip(leaves[:2], takes))
    z, terms = kernels.latent_sample(mu, log_sigma, leaves[2], backend="triton")
    grads = torch.autograd.grad(z.sum() + terms.sum(), (mu, log_sigma))
    expected = kernels.latent_sample(*leaves, backend="reference")
    grads_expected = torch.autograd.grad(expected[0].sum() + expected[1].sum(), leaves[:2])
    for grad, buffer, e, name in zip(grads, places, grads_expected, ("d mu", "d log sigma")):
        assert_written_in_place(grad, buffer, name)
        assert_close(grad, e, 1e-12, 1e-12, name)


@requires_kernels
def test_kernel_double_backward_is_refused():
    leaves = latent_inputs(3, 4, device=DEVICE)
    z, terms = kernels.latent_sample(*leaves, backend="triton")
    (grad,) = torch.autograd.grad(terms.sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


LAUNCHES_FOR_SM90 = """
def calls(dtype):
    meta = dict(device="meta", dtype=dtype)
    wide = torch.empty(1024, 1224, **meta)  # mnist-paper's h_enc projection: the gates, mu, log sigma
    mu, log_sigma, eps = wide[:, 1024:1124], wide[:, 1124:1224], torch.empty(1024, 100, **meta)
    grad_z, grad_terms = torch.empty(1024, 100, **meta), torch.empty(1024, 2, device="meta")
    return {"fwd": lambda: m.latent_sample_forward(mu, log_sigma, eps),
            "bwd": lambda: m.latent_sample_backward(grad_z, grad_terms, mu, log_sigma, eps, False),
            "bwd+eps": lambda: m.latent_sample_backward(grad_z, grad_terms, mu, log_sigma, eps, True),
            "bwd z only": lambda: m.latent_sample_backward(grad_z, None, mu, log_sigma, eps, False)}
"""


@pytest.mark.slow
@pytest.mark.skipif(ON_CUDA, reason="with CUDA the kernels are compiled and run by the tests above")
def test_kernels_compile_for_sm90_without_spills():
    """Both kernels as the launchers launch them (fp32, bf16, fp64; with and without deps and the terms'
    gradient), compiled for sm_90 with the ptxas triton ships: no spills, and few registers for an
    elementwise kernel (tens, not the hundreds a 2,048-element tile took)."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton without its NVIDIA backend")
    rows = ptxas_usage_on_sm90("draw.kernels.triton_latent", ("_latent_forward_kernel", "_latent_backward_kernel"),
                               LAUNCHES_FOR_SM90)
    assert len(rows) == 12
    for row in rows:
        assert row["spill_stores"] == row["spill_loads"] == 0, row
        assert row["registers"] <= (96 if row["dtype"] == "torch.float64" else 64), row


@requires_kernels
@pytest.mark.parametrize("mu_dtype, other_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                                   (torch.bfloat16, torch.float64)])
def test_mixed_dtypes_give_the_references_dtypes(mu_dtype, other_dtype):
    """z in mu's dtype and the terms in the compute dtype (fp64 when any input is, else fp32), on both backends
    (torch.compile takes the reference, so a compiled run and an eager one keep one dtype), with the same values:
    both compute in that dtype."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 5, generator=g).to(DEVICE, mu_dtype)
    log_sigma, eps = ((0.3 * torch.randn(3, 5, generator=g, dtype=other_dtype)).to(DEVICE) for _ in range(2))
    outputs = {backend: kernels.latent_sample(mu, log_sigma, eps, backend=backend) for backend in ("reference", "triton")}
    (z_ref, terms_ref), (z, terms) = outputs["reference"], outputs["triton"]
    assert z.dtype == z_ref.dtype == mu_dtype
    assert terms.dtype == terms_ref.dtype == torch.float64
    torch.testing.assert_close(terms, terms_ref, rtol=1e-12, atol=1e-12)
