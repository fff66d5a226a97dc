"""DRAW: a recurrent variational auto-encoder that draws with selective attention (Gregor et al. 2015).

A pure module: no I/O. The recurrence is Eqs. 3-8, the loss Eqs. 9-12, generation Eqs. 13-16; read and
write are either attentive (Eqs. 27, 29, through `kernels`) or whole-image (Eqs. 17, 18).
"""

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from draw import kernels
from draw.config import DRAWConfig
from draw.recurrent_linear import RecurrentLinear


STACK_ALIGN = 8  # columns: 16 bytes in bf16, 32 in fp32


def _stack(layers: list[tuple[torch.Tensor, torch.Tensor, list[int]]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Layers [(weight [out_k, in], bias [out_k], the parts' sizes along out_k)] stacked into one (weight,
    bias), with zero rows after the last part up to a multiple of STACK_ALIGN, and the parts' sizes (the
    padding is no part: RecurrentLinear's split leaves the columns past the parts unread)."""
    weights, biases = [w for w, _, _ in layers], [b for _, b, _ in layers]
    sizes = [size for _, _, parts in layers for size in parts]
    pad = -sum(sizes) % STACK_ALIGN
    if pad:
        weights.append(weights[0].new_zeros(pad, weights[0].shape[1]))
        biases.append(biases[0].new_zeros(pad))
    return torch.cat(weights), torch.cat(biases), sizes


class DRAWOutput(NamedTuple):
    loss: torch.Tensor  # scalar: mean over the batch of L_x + beta * L_z
    l_x: torch.Tensor  # [B] reconstruction loss -log D(x | c_T), nats  (9)
    l_z: torch.Tensor  # [B] latent loss, sum over t of KL(Q(Z_t | h_enc_t) || N(0, I)), nats  (10, 11)
    log_weight: torch.Tensor  # [B] log p(x, z) - log q(z | x) for the sampled z (importance weight)
    canvases: torch.Tensor | None  # [T, B, C, H, W] canvas logits c_1..c_T, when asked for
    write_params: torch.Tensor | None  # [T, B, 5] raw write parameters, when asked for


class Projections(NamedTuple):
    """The linear layers of a step, grouped by input: every layer that reads h_dec, and every one that
    reads h_enc, stacked into one map each, so that a step multiplies each hidden state once
    (DRAW.projections); under autocast, already in its dtype.

    Each map's output starts with its LSTM gates and is padded with zero rows to a multiple of
    STACK_ALIGN columns: the gate parts (which the next matrix products read) start on aligned columns
    and every row of the output, and of its gradient, starts 16-byte aligned (cuBLAS takes slower,
    unaligned kernels for a leading dimension of 2,083 floats, mnist-paper's unpadded h_dec map)."""

    dec_weight: torch.Tensor  # [sum(dec_sizes) + padding, dec_size]
    dec_bias: torch.Tensor  # [sum(dec_sizes) + padding]
    dec_sizes: list[int]  # encoder gates, decoder gates, write patch (w_t), write params, read params
    enc_weight: torch.Tensor  # [sum(enc_sizes) + padding, enc_size]
    enc_bias: torch.Tensor
    enc_sizes: list[int]  # encoder hidden gates, mu, log sigma
    read_weight: torch.Tensor  # [4 enc_size, read size] the encoder's input weights on r_t  (5)
    z_weight: torch.Tensor  # [4 dec_size, z_size] the decoder's input weights on z_t  (7)
    z_bias: torch.Tensor

    def maps(self) -> tuple[RecurrentLinear, RecurrentLinear, RecurrentLinear, RecurrentLinear]:
        """The step's four maps, from h_dec, h_enc, r and z (the same at every step, so each weight's
        gradient is one GEMM over all steps: draw/recurrent_linear.py). Make them once per forward."""
        return (RecurrentLinear(self.dec_weight, self.dec_bias), RecurrentLinear(self.enc_weight, self.enc_bias),
                RecurrentLinear(self.read_weight), RecurrentLinear(self.z_weight, self.z_bias))


class Generation(NamedTuple):
    canvases: torch.Tensor  # [T, n, C, H, W] canvas logits c~_1..c~_T
    write_params: torch.Tensor | None  # [T, n, 5] raw write parameters (None without write attention)


def attention_params(in_features: int, n: int, height: int, width: int, *, write: bool) -> nn.Linear:
    """The linear layer of Eq. 21, initialised so that the first glimpses see the image and the first
    writes can change it. Only the starting point differs from a default nn.Linear; the maths is Eq. 21.

    With a zero bias, log delta~ = 0 stretches the grid over the whole image (Eq. 24) and sigma = 1
    pixel: a 2x2 read grid would sit on the four corner pixels, blank in MNIST, and no gradient would
    tell the encoder where to look. So the bias starts the grid centred over the middle (N-1)/N of the
    image with filters half as wide as the grid spacing, sigma = max(H, W) / (2N). A write's filters
    are normalised (Eq. 25), so a patch value reaches a pixel scaled by about 1 / (2 pi sigma^2); the
    write's gamma starts at that value, giving the first writes unit gain (Eq. 29 divides by gamma),
    where gamma = 1 would leave the decoder too weak a hand on the canvas to be worth encoding into z.
    """
    layer = nn.Linear(in_features, 5)
    sigma = max(height, width) / (2 * n)
    log_gamma = -math.log(2 * math.pi * sigma**2) if write else 0.0
    log_delta = math.log((n - 1) / n) if n > 1 else 0.0
    with torch.no_grad():
        layer.weight.mul_(0.1)
        layer.bias.copy_(torch.tensor([0.0, 0.0, 2 * math.log(sigma), log_delta, log_gamma]))
    return layer


class DRAW(nn.Module):
    """DRAW of `config`; `backend` ("auto", "reference" or "triton") runs the attention and is a
    runtime choice, not part of the architecture: set `model.backend` to change it."""

    STATISTICS = ("loss", "l_x", "l_z")  # what a training step reports, batch means

    def __init__(self, config: DRAWConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.backend = backend
        c, h, w = config.channels, config.height, config.width
        read_size = 2 * c * (config.read_n**2 if config.read_attn else h * w)
        write_size = c * (config.write_n**2 if config.write_attn else h * w)

        self.encoder = nn.LSTMCell(read_size + config.dec_size, config.enc_size)  # (5)
        self.to_latent = nn.Linear(config.enc_size, 2 * config.z_size)  # mu and log sigma  (1, 2)
        self.decoder = nn.LSTMCell(config.z_size, config.dec_size)  # (7)
        self.to_write = nn.Linear(config.dec_size, write_size)  # w_t  (28) or W(h_dec)  (18)
        self.to_read_params = attention_params(config.dec_size, config.read_n, h, w, write=False) if config.read_attn else None  # (21)
        self.to_write_params = attention_params(config.dec_size, config.write_n, h, w, write=True) if config.write_attn else None

        # learned initial canvas and LSTM states, broadcast over the batch
        self.canvas0 = nn.Parameter(torch.zeros(c, h, w))
        self.h_enc0 = nn.Parameter(torch.zeros(config.enc_size))
        self.c_enc0 = nn.Parameter(torch.zeros(config.enc_size))
        self.h_dec0 = nn.Parameter(torch.zeros(config.dec_size))
        self.c_dec0 = nn.Parameter(torch.zeros(config.dec_size))

    # --- the linear layers, stacked by input --------------------------------------------------

    def projections(self) -> Projections:
        """The layers that read h_dec (to_write, to_write_params, to_read_params, the encoder's input
        weights on h_dec, the decoder's hidden weights) and those that read h_enc (to_latent, the
        encoder's hidden weights), each set stacked into one matrix. The same maths as calling each
        layer: the step computes P_t = W_dec h_dec_t + b_dec and Q_t = W_enc h_enc_t + b_enc once, and
        each layer reads its rows, in this step (w_t, the write parameters, mu and log sigma) or the
        next (the read parameters, the LSTM gates). One GEMM where there were five, and two.

        Under autocast every matrix is cast here, once per forward: autocast caches its casts of
        parameters only, and not at all while a CUDA graph is captured, so each step would cast again."""
        read_size = self.encoder.weight_ih.shape[1] - self.config.dec_size
        dec_layers = [(self.encoder.weight_ih[:, read_size:], self.encoder.bias_ih),  # (5): [r, h_dec]
                      (self.decoder.weight_hh, self.decoder.bias_hh),  # (7)
                      (self.to_write.weight, self.to_write.bias)]
        dec_layers += [(layer.weight, layer.bias) for layer in (self.to_write_params, self.to_read_params) if layer is not None]
        z = self.config.z_size
        enc_layers = [(self.encoder.weight_hh, self.encoder.bias_hh, [4 * self.config.enc_size]),
                      (self.to_latent.weight, self.to_latent.bias, [z, z])]  # mu, log sigma: one split, one cat in backward
        proj = Projections(*_stack([(w, b, [w.shape[0]]) for w, b in dec_layers]), *_stack(enc_layers),
                           self.encoder.weight_ih[:, :read_size], self.decoder.weight_ih, self.decoder.bias_ih)
        device = self.canvas0.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            proj = proj._replace(**{name: t.to(dtype) for name, t in proj._asdict().items() if isinstance(t, torch.Tensor)})
        return proj

    def _split_dec(self, proj: Projections, from_dec: RecurrentLinear, h_dec: torch.Tensor):
        """P_t = W_dec h_dec_t + b_dec [B, sum(dec_sizes) + padding] split into (w_t, write params or None, read
        params or None, encoder input gates from h_dec, decoder hidden gates); one backward for all of
        them (their gradients side by side, in the map's rows: draw/recurrent_linear.py)."""
        enc_from_dec, dec_hidden, patch, *parts = from_dec(h_dec, split=proj.dec_sizes)
        parts = iter(parts)  # (write params, read params), each where its attention is on; torch 2.11's compiler
        # made the starred target a tuple (no pop)
        write_params = next(parts) if self.config.write_attn else None
        read_params = next(parts) if self.config.read_attn else None
        return patch, write_params, read_params, enc_from_dec, dec_hidden

    def _split_enc(self, proj: Projections, from_enc: RecurrentLinear, h_enc: torch.Tensor):
        """Q_t = W_enc h_enc_t + b_enc split into (mu, log sigma, encoder hidden gates)."""
        enc_hidden, mu, log_sigma = from_enc(h_enc, split=proj.enc_sizes)
        return mu, log_sigma, enc_hidden

    # --- read and write ---------------------------------------------------------------------

    def read(self, x, canvas, params, dtype=None):
        """r_t, Eq. 4: [B, 2*C*N*N] with attention (27; params [B, 5] from h_dec_{t-1}, Eq. 21; glimpses in
        `dtype`, default x's), else [B, 2*C*H*W] (17; params None)."""
        cfg = self.config
        if cfg.read_attn:
            glimpse = kernels.read(x, canvas, params, cfg.read_n, backend=self.backend, dtype=dtype)  # [B, 2, C, N, N]
            return glimpse.flatten(1)
        x_hat = x - torch.sigmoid(canvas)  # (3)
        return torch.cat([x.flatten(1), x_hat.flatten(1)], dim=1)

    def write(self, canvas, patch, params):
        """c_t = c_{t-1} + write(h_dec_t), Eq. 8: patch = w_t [B, C*N^*N^] (28) or [B, C*H*W] (18), params
        [B, 5] (21) or None. Returns c_t [B, C, H, W]."""
        cfg = self.config
        if cfg.write_attn:
            patch = kernels.share_gradient_destination(patch.view(-1, cfg.channels, cfg.write_n, cfg.write_n), patch)  # [B, C, N^, N^]
            return kernels.write(patch, params, canvas, backend=self.backend)
        return canvas + patch.view_as(canvas)

    def write_and_read(self, x, canvas, patch, params, read_params, *, read_next: bool, dtype=None):
        """c_t = write(h_dec_t) (Eq. 8) and, when read_next, the next step's r_{t+1} = read(x, c_t) (3, 4)
        in `dtype` (see read), else None. With attentive read and write, one op (kernels.write_read: one
        launch each way on the GPU, the canvas streamed once and its two gradients summed in the kernel)."""
        cfg = self.config
        if not read_next:
            return self.write(canvas, patch, params), None
        if cfg.read_attn and cfg.write_attn:
            patch = kernels.share_gradient_destination(patch.view(-1, cfg.channels, cfg.write_n, cfg.write_n), patch)  # [B, C, N^, N^]
            canvas, glimpse = kernels.write_read(patch, params, canvas, x, read_params, cfg.read_n, backend=self.backend,
                                                 dtype=dtype)
            return canvas, glimpse.flatten(1)  # [B, 2*C*N*N]
        canvas = self.write(canvas, patch, params)
        return canvas, self.read(x, canvas, read_params, dtype)

    def _initial_state(self, batch: int, dtype: torch.dtype):
        def expand(p, *shape):
            return p.to(dtype).expand(batch, *shape)

        cfg = self.config
        canvas = self.canvas0.expand(batch, -1, -1, -1)  # [B, C, H, W]
        enc = (expand(self.h_enc0, cfg.enc_size), expand(self.c_enc0, cfg.enc_size))
        dec = (expand(self.h_dec0, cfg.dec_size), expand(self.c_dec0, cfg.dec_size))
        return canvas, enc, dec

    # --- inference: the variational bound ---------------------------------------------------

    def forward(self, x: torch.Tensor, *, noise: torch.Tensor | None = None, return_sequence: bool = False) -> DRAWOutput:
        """Encode and reconstruct x, returning the loss of Eqs. 9-12.

        Args:
            x: [B, C, H, W] binary (or grey-level) images in [0, 1].
            noise: [T, B, z_size] the standard-normal draws of the reparameterised z_t (default: fresh
                draws from torch's generator, all T in one); evaluation passes noise tied to each image.
            return_sequence: also return the T canvases and write parameters (for figures).
        """
        cfg = self.config
        expected = (cfg.channels, cfg.height, cfg.width)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must be [B, {', '.join(map(str, expected))}], got {list(x.shape)}")
        batch = x.shape[0]
        if noise is not None and tuple(noise.shape) != (cfg.T, batch, cfg.z_size):
            raise ValueError(f"noise must be [T, B, z_size] = [{cfg.T}, {batch}, {cfg.z_size}], got {list(noise.shape)}")
        canvas, (h_enc, c_enc), (h_dec, c_dec) = self._initial_state(batch, x.dtype)
        proj = self.projections()
        from_dec, from_enc, from_read, from_z = proj.maps()
        if noise is None:  # all T steps' draws at once (one kernel), in fp32 or wider as TrainStep draws them
            noise = torch.randn(cfg.T, batch, cfg.z_size, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        noise = noise.to(proj.enc_weight.dtype)  # in the latents' dtype (autocast's, under autocast), cast once
        _, _, read_params, enc_from_dec, dec_hidden = self._split_dec(proj, from_dec, h_dec)  # from h_dec_0
        enc_hidden = self._split_enc(proj, from_enc, h_enc)[2]  # from h_enc_0
        latent_terms = []  # per step [B, 2]: KL(Q(Z_t | h_enc_t) || N(0, I)) and log N(z_t; 0, I) - log Q(z_t)
        canvases, write_params = [], []
        # glimpses in the dtype the encoder's input weights compute in (autocast's, under autocast): the
        # kernels round once on store, where the map would cast r at every step
        glimpse_dtype = proj.read_weight.dtype
        r = self.read(x, canvas, read_params, glimpse_dtype)  # r_1 from c_0 and h_dec_0  (3, 4)
        for t in range(cfg.T):
            # W_ih [r, h_dec_{t-1}] + b_ih (5), formed by the fused LSTM cell where it can (kernels.Projection)
            enc_input = from_read.deferred(r, add=enc_from_dec)
            h_enc, c_enc = kernels.lstm_cell(enc_input, enc_hidden, c_enc, backend=self.backend)  # (5)
            mu, log_sigma, enc_hidden = self._split_enc(proj, from_enc, h_enc)  # [B, z], [B, z]  (1, 2)
            z, terms = kernels.latent_sample(mu, log_sigma, noise[t], backend=self.backend)  # z_t ~ Q(Z_t | h_enc_t)  (6, 11)
            h_dec, c_dec = kernels.lstm_cell(from_z(z), dec_hidden, c_dec, backend=self.backend)  # (7)
            patch, params, read_params, enc_from_dec, dec_hidden = self._split_dec(proj, from_dec, h_dec)
            canvas, r = self.write_and_read(x, canvas, patch, params, read_params, read_next=t + 1 < cfg.T,
                                            dtype=glimpse_dtype)  # (8); (3, 4)
            latent_terms.append(terms)
            if return_sequence:
                canvases.append(canvas)
                write_params.append(params)
        # L_z = sum_t KL_t  (10, 11); sum_t log N(z_t; 0, I) - log N(z_t; mu_t, sigma_t): [B] each, fp32 or wider
        loss_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for a float64 model
        l_z, log_ratio = torch.stack(latent_terms).sum(0).to(loss_dtype).unbind(1)
        l_x = F.binary_cross_entropy_with_logits(canvas.to(loss_dtype), x.to(loss_dtype), reduction="none").sum((1, 2, 3))  # (9)
        loss = (l_x + cfg.beta * l_z).mean()  # (12)
        log_weight = -l_x + log_ratio  # log p(x | z) + log p(z) - log q(z | x)
        return DRAWOutput(
            loss,
            l_x,
            l_z,
            log_weight,
            torch.stack(canvases) if return_sequence else None,
            torch.stack(write_params) if return_sequence and cfg.write_attn else None,
        )

    @staticmethod
    def statistics(out: DRAWOutput) -> torch.Tensor:
        """[3] (loss, mean L_x, mean L_z) of a batch, detached."""
        return torch.stack([out.loss.detach(), out.l_x.detach().mean(), out.l_z.detach().mean()])

    # --- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, n: int, *, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> Generation:
        """Draw n images from the prior, Eqs. 13-16 (the encoder is not used).

        noise: [T, n, z_size] the standard-normal z_t of every sample (default: drawn from `generator`, or
        torch's; draw.evaluate.image_noise gives each sample its own, whatever n).
        Returns the canvas logits at every step; sigmoid(canvases[-1]) is the Bernoulli mean of x~.
        """
        cfg = self.config
        device = self.canvas0.device
        if noise is not None and tuple(noise.shape) != (cfg.T, n, cfg.z_size):
            raise ValueError(f"noise must be [T, n, z_size] = [{cfg.T}, {n}, {cfg.z_size}], got {list(noise.shape)}")
        canvas, _, (h_dec, c_dec) = self._initial_state(n, self.canvas0.dtype)
        proj = self.projections()
        from_dec, _, _, from_z = proj.maps()
        dec_hidden = self._split_dec(proj, from_dec, h_dec)[4]
        canvases, write_params = [], []
        for t in range(cfg.T):
            if noise is None:
                z = torch.randn(n, cfg.z_size, device=device, dtype=self.canvas0.dtype, generator=generator)  # (13)
            else:
                z = noise[t].to(device, self.canvas0.dtype)  # (13)
            h_dec, c_dec = kernels.lstm_cell(from_z(z), dec_hidden, c_dec, backend=self.backend)  # (14)
            patch, params, _, _, dec_hidden = self._split_dec(proj, from_dec, h_dec)
            canvas = self.write(canvas, patch, params)  # (15)
            canvases.append(canvas)
            write_params.append(params)
        return Generation(torch.stack(canvases), torch.stack(write_params) if cfg.write_attn else None)


def importance_weighted_bound(model: DRAW, x: torch.Tensor, k: int, noise: torch.Tensor | None = None) -> torch.Tensor:
    """-log (1/K) sum_k p(x, z_k) / q(z_k | x), per image, in nats: [B]. K = 1 gives a one-sample estimate of
    the usual bound (its latent term log q - log p at the drawn z, not the exact KL of Eq. 11: equal in
    expectation; evaluate_bound takes L_x + L_z itself for K = 1).

    noise: [T, B*K, z_size] or None, as in DRAW.forward (the K draws of an image adjacent).
    """
    batch = x.shape[0]
    repeated = x.repeat_interleave(k, dim=0)  # [B*K, C, H, W], the K copies of an image adjacent
    log_weight = model(repeated, noise=noise).log_weight.view(batch, k)  # [B, K]
    return -(torch.logsumexp(log_weight, dim=1) - math.log(k))
