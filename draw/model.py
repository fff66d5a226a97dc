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


class DRAWOutput(NamedTuple):
    loss: torch.Tensor  # scalar: mean over the batch of L_x + beta * L_z
    l_x: torch.Tensor  # [B] reconstruction loss -log D(x | c_T), nats  (9)
    l_z: torch.Tensor  # [B] latent loss, sum over t of KL(Q(Z_t | h_enc_t) || N(0, I)), nats  (10, 11)
    log_weight: torch.Tensor  # [B] log p(x, z) - log q(z | x) for the sampled z (importance weight)
    canvases: torch.Tensor | None  # [T, B, C, H, W] canvas logits c_1..c_T, when asked for
    write_params: torch.Tensor | None  # [T, B, 5] raw write parameters, when asked for


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

    # --- read and write ---------------------------------------------------------------------

    def read(self, x, canvas, h_dec):
        """r_t, Eq. 4: [B, 2*C*N*N] with attention (27), else [B, 2*C*H*W] (17)."""
        cfg = self.config
        if cfg.read_attn:
            params = self.to_read_params(h_dec)  # [B, 5]
            glimpse = kernels.read(x, canvas, params, cfg.read_n, backend=self.backend)  # [B, 2, C, N, N]
            return glimpse.flatten(1)
        x_hat = x - torch.sigmoid(canvas)  # (3)
        return torch.cat([x.flatten(1), x_hat.flatten(1)], dim=1)

    def write(self, canvas, h_dec):
        """c_t = c_{t-1} + write(h_dec_t), Eq. 8. Returns (c_t [B, C, H, W], raw write params [B, 5] or None)."""
        cfg = self.config
        patch = self.to_write(h_dec)
        if cfg.write_attn:
            params = self.to_write_params(h_dec)  # [B, 5]
            patch = patch.view(-1, cfg.channels, cfg.write_n, cfg.write_n)  # [B, C, N^, N^]
            return kernels.write(patch, params, canvas, backend=self.backend), params
        return canvas + patch.view_as(canvas), None

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
                draws from torch's generator); evaluation passes noise tied to each image.
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
        latents = []  # (mu_t, log sigma_t, eps_t, z_t), each [B, z]
        canvases, write_params = [], []
        for t in range(cfg.T):
            r = self.read(x, canvas, h_dec)  # (3, 4)
            h_enc, c_enc = self.encoder(torch.cat([r, h_dec], dim=1), (h_enc, c_enc))  # (5)
            mu, log_sigma = self.to_latent(h_enc).chunk(2, dim=1)  # [B, z] each  (1, 2)
            eps = torch.randn_like(mu) if noise is None else noise[t].to(mu.dtype)
            z = mu + torch.exp(log_sigma) * eps  # reparameterised sample of Q(Z_t | h_enc_t)  (6)
            h_dec, c_dec = self.decoder(z, (h_dec, c_dec))  # (7)
            canvas, params = self.write(canvas, h_dec)  # (8)
            latents.append((mu, log_sigma, eps, z))
            if return_sequence:
                canvases.append(canvas)
                write_params.append(params)
        # all T steps at once (a handful of kernels instead of a dozen per step), in fp32 or wider: [T, B, z]
        wide = torch.promote_types(mu.dtype, torch.float32)
        mu, log_sigma, eps, z = (torch.stack(parts).to(wide) for parts in zip(*latents))
        # KL(N(mu, sigma) || N(0, 1)) = 0.5 (mu^2 + sigma^2 - log sigma^2) - 1/2, per unit, summed over t  (11)
        l_z = (0.5 * (mu**2 + torch.exp(2 * log_sigma)) - log_sigma - 0.5).sum((0, 2)).float()
        # sum_t log N(z_t; 0, I) - log N(z_t; mu_t, sigma_t)
        log_ratio = (0.5 * (eps**2 - z**2) + log_sigma).sum((0, 2)).float()
        l_x = F.binary_cross_entropy_with_logits(canvas.float(), x.float(), reduction="none").sum((1, 2, 3))  # (9)
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
    def generate(self, n: int, *, generator: torch.Generator | None = None) -> Generation:
        """Draw n images from the prior, Eqs. 13-16 (the encoder is not used).

        Returns the canvas logits at every step; sigmoid(canvases[-1]) is the Bernoulli mean of x~.
        """
        cfg = self.config
        device = self.canvas0.device
        canvas, _, (h_dec, c_dec) = self._initial_state(n, self.canvas0.dtype)
        canvases, write_params = [], []
        for _ in range(cfg.T):
            z = torch.randn(n, cfg.z_size, device=device, generator=generator)  # (13)
            h_dec, c_dec = self.decoder(z, (h_dec, c_dec))  # (14)
            canvas, params = self.write(canvas, h_dec)  # (15)
            canvases.append(canvas)
            write_params.append(params)
        return Generation(torch.stack(canvases), torch.stack(write_params) if cfg.write_attn else None)


def importance_weighted_bound(model: DRAW, x: torch.Tensor, k: int, noise: torch.Tensor | None = None) -> torch.Tensor:
    """-log (1/K) sum_k p(x, z_k) / q(z_k | x), per image, in nats: [B]. K = 1 gives the usual bound.

    noise: [T, B*K, z_size] or None, as in DRAW.forward (the K draws of an image adjacent).
    """
    batch = x.shape[0]
    repeated = x.repeat_interleave(k, dim=0)  # [B*K, C, H, W], the K copies of an image adjacent
    log_weight = model(repeated, noise=noise).log_weight.view(batch, k)  # [B, K]
    return -(torch.logsumexp(log_weight, dim=1) - math.log(k))
