"""The DRAW model, its training loop, checkpoints and command line, on small synthetic data."""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from draw import DRAW, DRAWConfig, importance_weighted_bound, kernels
from draw.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from draw.config import PRESETS
from draw.data import load_dataset
from draw.model import STACK_ALIGN

SMALL = DRAWConfig(height=12, width=10, channels=1, T=4, enc_size=24, dec_size=24, z_size=6, read_n=2, write_n=3)


def binary_images(batch, config=SMALL, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((batch, config.channels, config.height, config.width), 0.3), generator=g)


@pytest.mark.parametrize(
    "changes",
    [{}, {"read_attn": False, "write_attn": False}, {"read_attn": False}, {"write_attn": False},
     {"channels": 3, "read_n": 1, "write_n": 4}],
    ids=["attention", "no-attention", "write-only", "read-only", "colour-N1"],
)
def test_forward_shapes_and_finite_loss(changes):
    config = DRAWConfig(**{**SMALL.__dict__, **changes})
    model = DRAW(config)
    x = binary_images(5, config)
    out = model(x, return_sequence=True)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert out.l_x.shape == out.l_z.shape == out.log_weight.shape == (5,)
    assert (out.l_z > -1e-5).all()  # a KL divergence
    assert out.canvases.shape == (config.T, 5, config.channels, config.height, config.width)
    assert (out.write_params is None) == (not config.write_attn)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    gen = model.generate(7)
    assert gen.canvases.shape == (config.T, 7, config.channels, config.height, config.width)
    if config.write_attn:
        assert gen.write_params.shape == (config.T, 7, 5)


def test_loss_is_the_papers_bound():
    """L_x is the Bernoulli negative log-likelihood of x under sigmoid(c_T), and loss = mean(L_x + beta L_z)."""
    torch.manual_seed(0)
    model = DRAW(SMALL)
    x = binary_images(4)
    torch.manual_seed(1)
    out = model(x, return_sequence=True)
    p = torch.sigmoid(out.canvases[-1])
    nll = -(x * torch.log(p) + (1 - x) * torch.log1p(-p)).sum((1, 2, 3))
    torch.testing.assert_close(out.l_x, nll, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.loss, (out.l_x + out.l_z).mean())
    model_beta = DRAW(DRAWConfig(**{**SMALL.__dict__, "beta": 0.5}))
    model_beta.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    out_beta = model_beta(x)
    torch.testing.assert_close(out_beta.loss, (out.l_x + 0.5 * out.l_z).mean())


def paper_recurrence(model: DRAW, x: torch.Tensor, noise: torch.Tensor):
    """Eqs. 3-8 written out with each layer called on its own (nn.LSTMCell, nn.Linear): the oracle of
    DRAW.forward, which stacks the layers that share an input. Returns the final canvas, the write
    parameters of every step (or None) and the (mu, log sigma, z) of every step."""
    cfg = model.config
    batch = x.shape[0]
    canvas = model.canvas0.expand(batch, -1, -1, -1)
    h_enc, c_enc = model.h_enc0.expand(batch, -1), model.c_enc0.expand(batch, -1)
    h_dec, c_dec = model.h_dec0.expand(batch, -1), model.c_dec0.expand(batch, -1)
    steps, write_params = [], []
    for t in range(cfg.T):
        if cfg.read_attn:
            r = kernels.read(x, canvas, model.to_read_params(h_dec), cfg.read_n, backend="reference").flatten(1)  # (27)
        else:
            r = torch.cat([x.flatten(1), (x - torch.sigmoid(canvas)).flatten(1)], dim=1)  # (3, 17)
        h_enc, c_enc = model.encoder(torch.cat([r, h_dec], dim=1), (h_enc, c_enc))  # (5)
        mu, log_sigma = model.to_latent(h_enc).chunk(2, dim=1)  # (1, 2)
        z = mu + torch.exp(log_sigma) * noise[t]  # (6)
        h_dec, c_dec = model.decoder(z, (h_dec, c_dec))  # (7)
        patch = model.to_write(h_dec)
        if cfg.write_attn:
            params = model.to_write_params(h_dec)
            patch = patch.view(batch, cfg.channels, cfg.write_n, cfg.write_n)
            canvas = kernels.write(patch, params, canvas, backend="reference")  # (29)
            write_params.append(params)
        else:
            canvas = canvas + patch.view_as(canvas)  # (18)
        steps.append((mu, log_sigma, z))
    return canvas, (torch.stack(write_params) if write_params else None), steps


@pytest.mark.parametrize(
    "changes", [{}, {"read_attn": False, "write_attn": False}, {"read_attn": False}, {"channels": 3, "read_n": 1, "write_n": 4}],
    ids=["attention", "no-attention", "write-only", "colour-N1"])
def test_the_stacked_layers_are_the_papers_recurrence(changes):
    """DRAW.forward multiplies h_dec and h_enc once per step by the stacked layers that read them; in
    float64 it gives the canvases, write parameters and every gradient of the layer-by-layer recurrence."""
    config = DRAWConfig(**{**SMALL.__dict__, **changes})
    torch.manual_seed(0)
    model = DRAW(config, backend="reference").double()
    with torch.no_grad():
        for param in model.parameters():  # away from the initial zeros, so that every path carries a gradient
            param.add_(0.1 * torch.randn_like(param))
    x = binary_images(3, config).double()
    noise = torch.randn(config.T, 3, config.z_size, dtype=torch.float64)
    out = model(x, noise=noise, return_sequence=True)
    canvas, write_params, _ = paper_recurrence(model, x, noise)
    torch.testing.assert_close(out.canvases[-1], canvas, rtol=1e-12, atol=1e-12)
    if config.write_attn:
        torch.testing.assert_close(out.write_params, write_params, rtol=1e-12, atol=1e-12)
    fused = torch.autograd.grad(out.canvases[-1].sum(), list(model.parameters()), allow_unused=True)
    plain = torch.autograd.grad(canvas.sum(), list(model.parameters()), allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), fused, plain):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("preset", [name for name, p in PRESETS.items() if isinstance(p.model, DRAWConfig)])
def test_the_stacked_maps_give_aligned_rows_and_gates(preset, monkeypatch):
    """Each stacked map is a multiple of STACK_ALIGN columns wide and starts with its LSTM gates, so the
    GEMMs that write P_t and Q_t, add the encoder's gates from h_dec and multiply their gradients see
    16-byte aligned rows (mnist-paper's h_dec map was 2,083 columns wide: cuBLAS's unaligned kernels);
    the padding rows are zero. Checked on the gate slices each LSTM cell receives."""
    config = dataclasses.replace(PRESETS[preset].model, T=2)
    model = DRAW(config, backend="reference")
    proj = model.projections()
    assert proj.dec_sizes[:2] == [4 * config.enc_size, 4 * config.dec_size]  # the gates first
    assert proj.enc_sizes[:3] == [4 * config.enc_size, config.z_size, config.z_size]
    assert len(proj.dec_sizes) == 5 - (not config.read_attn) - (not config.write_attn)
    for weight, bias, sizes in ((proj.dec_weight, proj.dec_bias, proj.dec_sizes), (proj.enc_weight, proj.enc_bias, proj.enc_sizes)):
        assert weight.shape[0] == bias.shape[0] == sum(sizes) + (-sum(sizes) % STACK_ALIGN)  # padded only to the multiple
        assert not weight[sum(sizes):].any() and not bias[sum(sizes):].any()

    hidden_gates = []
    cell = kernels.lstm_cell
    monkeypatch.setattr(kernels, "lstm_cell", lambda i, h, c, backend: hidden_gates.append(h) or cell(i, h, c, backend=backend))
    model(binary_images(2, config))
    assert len(hidden_gates) == 2 * config.T
    for gates in hidden_gates:  # slices of P_t and Q_t
        assert gates.stride(0) % STACK_ALIGN == 0 and gates.storage_offset() % STACK_ALIGN == 0, (gates.stride(), gates.storage_offset())


def test_generation_is_the_papers_recurrence():
    """generate() (Eqs. 13-16) with the stacked layers: the canvases of the decoder and write layers
    called one by one on the same z draws, in float64."""
    torch.manual_seed(0)
    model = DRAW(SMALL).double()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    gen = model.generate(5, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    canvas = model.canvas0.expand(5, -1, -1, -1)
    h_dec, c_dec = model.h_dec0.expand(5, -1), model.c_dec0.expand(5, -1)
    with torch.no_grad():
        for t in range(SMALL.T):
            h_dec, c_dec = model.decoder(torch.randn(5, SMALL.z_size, generator=g, dtype=torch.float64), (h_dec, c_dec))  # (13, 14)
            patch = model.to_write(h_dec).view(5, 1, SMALL.write_n, SMALL.write_n)
            canvas = kernels.write(patch, model.to_write_params(h_dec), canvas, backend="reference")  # (15)
            torch.testing.assert_close(gen.canvases[t], canvas, rtol=1e-12, atol=1e-12)


def graph_and_eager(step, inputs, new_inputs):
    """step(*inputs) captured as one CUDA graph (after a warm-up on a side stream), replayed on new_inputs
    copied into the static ones; returns (replayed outputs, step(*new_inputs) run eagerly)."""
    static = [t.clone() for t in inputs]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile the kernels and fill the allocator outside capture
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(*static)
    for s, t in zip(static, new_inputs):
        s.copy_(t)
    graph.replay()
    torch.cuda.synchronize()
    return static_out, step(*new_inputs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_forward_and_backward_replay_as_a_cuda_graph():
    """DRAW's forward and backward (on CUDA: the fused attention and latent kernels, the fused LSTM cell,
    RecurrentLinear's weight gradients formed after the last step) captured as one CUDA graph and
    replayed on new images and noise give the eager loss and every gradient."""
    device = "cuda"
    torch.manual_seed(0)
    model = DRAW(SMALL).to(device)
    params = list(model.parameters())

    def step(x, noise):
        out = model(x, noise=noise)
        return (out.loss, *torch.autograd.grad(out.loss, params))

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return [binary_images(8, seed=seed).to(device), torch.randn(SMALL.T, 8, SMALL.z_size, generator=g).to(device)]

    replayed, eager = graph_and_eager(step, inputs(0), inputs(1))
    assert len(replayed) == 1 + len(params)
    for name, a, b in zip(["loss", *(n for n, _ in model.named_parameters())], replayed, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_autocast_casts_each_weight_once_per_forward():
    """Under bf16 autocast without its cache (as while a CUDA graph is captured), the stacked weights are
    cast once per forward, not at every step: each weight-shaped cast happens once."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].dim() == 2 and args[0].shape[0] != 3:
                self.shapes[tuple(args[0].shape)] += 1  # not an activation: those are [3, ...]
            return func(*args, **(kwargs or {}))

    model = DRAW(SMALL)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), Casts() as casts:
        out = model(binary_images(3))
    assert out.loss.isfinite()
    assert casts.shapes and max(casts.shapes.values()) == 1, casts.shapes


def test_latent_loss_and_log_weight_are_the_per_step_gaussian_terms():
    """L_z = sum_t KL(N(mu_t, sigma_t) || N(0, I)) (Eq. 11) and log_weight = -L_x + sum_t [log N(z_t; 0, I)
    - log N(z_t; mu_t, sigma_t)], checked against torch.distributions on the mu_t, sigma_t and z_t of each
    step of the layer-by-layer recurrence, in float64."""
    torch.manual_seed(0)
    model = DRAW(SMALL).double()
    x = binary_images(3).double()
    noise = torch.randn(SMALL.T, 3, SMALL.z_size, dtype=torch.float64)
    out = model(x, noise=noise)
    _, _, steps = paper_recurrence(model, x, noise)
    normal = torch.distributions.Normal
    kl, log_ratio = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for mu, log_sigma, z in steps:
        q, prior = normal(mu, log_sigma.exp()), normal(torch.zeros_like(mu), torch.ones_like(mu))
        kl += torch.distributions.kl_divergence(q, prior).sum(1)
        log_ratio += (prior.log_prob(z) - q.log_prob(z)).sum(1)
    assert len(steps) == SMALL.T
    assert out.loss.dtype == out.l_x.dtype == out.l_z.dtype == out.log_weight.dtype == torch.float64
    torch.testing.assert_close(out.l_z, kl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.log_weight, -out.l_x + log_ratio, rtol=1e-12, atol=1e-12)


def test_the_loss_of_a_float64_model_passes_gradcheck():
    """A float64 model computes its loss in float64 (not in fp32, as bf16 and fp32 models do), so finite
    differences of the whole loss check its gradient (fixed noise, reference backend)."""
    config = DRAWConfig(height=6, width=7, channels=1, T=2, enc_size=4, dec_size=4, z_size=2, read_n=2, write_n=2)
    torch.manual_seed(0)
    model = DRAW(config, backend="reference").double()
    x = torch.bernoulli(torch.full((2, 1, 6, 7), 0.4, dtype=torch.float64))
    noise = torch.randn(config.T, 2, config.z_size, dtype=torch.float64)
    params = dict(model.named_parameters())
    for name in ("canvas0", "encoder.weight_ih", "decoder.weight_hh", "to_read_params.weight", "to_write.weight"):

        def loss(value, name=name):
            return torch.func.functional_call(model, {name: value}, (x,), {"noise": noise}).loss

        assert torch.autograd.gradcheck(loss, (params[name].detach().clone().requires_grad_(),)), name


def test_initial_canvas_and_states_are_learned():
    model = DRAW(SMALL)
    names = {name for name, _ in model.named_parameters()}
    assert {"canvas0", "h_enc0", "c_enc0", "h_dec0", "c_dec0"} <= names
    out = model(binary_images(3))
    out.loss.backward()
    assert model.canvas0.grad.abs().sum() > 0 and model.h_dec0.grad.abs().sum() > 0


def test_importance_weighted_bound_is_tighter_on_the_same_samples():
    """-log mean_k w_k <= mean_k -log w_k (Jensen), and K = 1 is the variational bound L_x + L_z."""
    torch.manual_seed(0)
    model = DRAW(SMALL)
    x = binary_images(6)
    k = 16
    torch.manual_seed(1)
    iw = importance_weighted_bound(model, x, k)
    torch.manual_seed(1)
    log_weight = model(x.repeat_interleave(k, dim=0)).log_weight.view(6, k)  # the same samples
    assert iw.shape == (6,)
    torch.testing.assert_close(iw, -(torch.logsumexp(log_weight, 1) - math.log(k)))
    assert (iw <= -log_weight.mean(1) + 1e-4).all()
    torch.manual_seed(2)
    k1 = importance_weighted_bound(model, x, 1)
    torch.manual_seed(2)
    out = model(x)
    # E_q[-log w] = L_x + KL; for one sample they differ only by the KL's Monte Carlo noise
    torch.testing.assert_close(k1, -out.log_weight)
    assert abs((k1 - (out.l_x + out.l_z)).mean().item()) < 0.5 * out.l_z.mean().item() + 5.0


def test_loss_falls_on_synthetic_data():
    torch.manual_seed(0)
    config = DRAWConfig(**{**SMALL.__dict__, "height": 16, "width": 16})
    data = load_dataset("synthetic", shape=(1, 16, 16))
    model = DRAW(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        x = torch.bernoulli(data.train[(step * 32) % 480 :][:32])
        loss = model(x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_bad_input_shape_is_refused():
    with pytest.raises(ValueError, match=r"x must be \[B, 1, 12, 10\]"):
        DRAW(SMALL)(torch.zeros(2, 1, 10, 12))
    with pytest.raises(ValueError, match="T must be an int >= 1"):
        DRAWConfig(T=0)
    with pytest.raises(ValueError, match=r"unknown DRAWConfig fields \['T_max'\]"):
        DRAWConfig.from_dict({**SMALL.to_dict(), "T_max": 3})


def test_backend_is_not_part_of_the_architecture():
    """Version-1 checkpoints stored the backend in the model config: it is dropped, and set at run time."""
    assert DRAWConfig.from_dict({**SMALL.to_dict(), "backend": "triton"}) == SMALL
    model = DRAW(SMALL, backend="reference")
    assert model.backend == "reference" and "backend" not in model.config.to_dict()


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DRAW(SMALL)
    path = save_checkpoint(tmp_path / "c.pt", model, step=7)
    payload = load_checkpoint(path)
    rebuilt = model_from_checkpoint(payload)
    assert rebuilt.config == SMALL and payload["step"] == 7
    for (name, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), name
    x = binary_images(3)
    torch.manual_seed(5)
    a = model(x).loss
    torch.manual_seed(5)
    assert torch.equal(a, rebuilt(x).loss)


def test_bad_checkpoints_are_refused(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", DRAW(SMALL), step=1)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="not a DRAW checkpoint"):
        load_checkpoint(foreign)
    other = load_checkpoint(good)
    other["model_config"] = {**other["model_config"], "enc_size": 48}  # a checkpoint of another model
    with pytest.raises(CheckpointError, match="weights do not fit its model config"):
        model_from_checkpoint(other)


def test_a_float64_model_evaluates_in_float64():
    """evaluate_bound and evaluate_classifier give their images the model's dtype: a float64 model evaluates (its
    bound agrees with the float32 model's to float32's rounding), as it trains."""
    from draw.classifier import DRAM
    from draw.config import ClassifierConfig
    from draw.evaluate import evaluate_bound, evaluate_classifier

    torch.manual_seed(0)
    model = DRAW(DRAWConfig(height=12, width=10, T=3, enc_size=8, dec_size=8, z_size=3, read_n=2, write_n=3))
    images = (torch.rand(6, 1, 12, 10) > 0.5).to(torch.uint8) * 255
    single = evaluate_bound(model, images, batch_size=4)
    model.double()
    assert evaluate_bound(model, images, batch_size=4)["nats"] == pytest.approx(single["nats"], rel=1e-5)
    assert math.isfinite(evaluate_bound(model, images, batch_size=4, importance_samples=2)["nats"])
    classifier = DRAM(ClassifierConfig(height=12, width=10, glimpses=2, lstm_size=8, read_n=3, classes=3)).double()
    result = evaluate_classifier(classifier, images, torch.tensor([0, 1, 2, 0, 1, 2]), batch_size=4)
    assert 0 <= result["error"] <= 1 and math.isfinite(result["loss"])
