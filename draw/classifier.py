"""The differentiable RAM of Sec. 4.1: an LSTM that classifies an image from T attention glimpses.

A pure module: no I/O. At each step t = 1..T the LSTM reads an N x N glimpse of the image x alone
(Eq. 27's first half: gamma F_Y x F_X^T, no canvas and no error image) whose attention parameters come
from its previous hidden state (Eq. 21); after the last glimpse a linear layer and a softmax classify.
"""

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from draw import kernels
from draw.config import ClassifierConfig
from draw.model import attention_params


class ClassifierOutput(NamedTuple):
    loss: torch.Tensor  # scalar: mean cross-entropy over the batch, nats
    error: torch.Tensor  # [B] 1.0 where the predicted class is wrong, else 0.0
    logits: torch.Tensor  # [B, classes]
    read_params: torch.Tensor | None  # [T, B, 5] raw read parameters of each glimpse, when asked for


class ClipPerImageGradient(torch.autograd.Function):
    """Identity forward; backward clips each image's gradient elementwise to [-limit, limit].

    The input's gradient is that of a batch-mean loss, 1/B of each image's own: clipping B times it to
    [-limit, limit] is clipping it to [-limit/B, limit/B], which leaves every unclipped value exact.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, limit: float) -> torch.Tensor:  # x [B, ...]
        ctx.limit = limit
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        limit = ctx.limit / grad.shape[0]
        return grad.clamp(-limit, limit), None


class DRAM(nn.Module):
    """The glimpse classifier of `config`; `backend` runs the attention (a runtime choice, as in DRAW)."""

    STATISTICS = ("loss", "error")  # what a training step reports, batch means
    # each image's gradient w.r.t. each glimpse's 5 attention parameters clipped to [-c, c] in the backward
    # pass (ClipPerImageGradient; TrainConfig.attention_grad_clip, the cluttered presets' 10); None: the exact gradient
    attention_grad_clip: float | None = None

    def __init__(self, config: ClassifierConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.backend = backend
        c, n = config.channels, config.read_n
        self.lstm = nn.LSTMCell(c * n * n, config.lstm_size)
        self.to_read_params = attention_params(config.lstm_size, n, config.height, config.width, write=False)  # (21)
        self.to_logits = nn.Linear(config.lstm_size, config.classes)
        self.h0 = nn.Parameter(torch.zeros(config.lstm_size))  # learned initial state, as in DRAW
        self.c0 = nn.Parameter(torch.zeros(config.lstm_size))

    def forward(self, x: torch.Tensor, labels: torch.Tensor, *, return_glimpses: bool = False) -> ClassifierOutput:
        """Classify x and score against labels.

        Args:
            x: [B, C, H, W] images in [0, 1].
            labels: [B] int64 classes in 0..classes-1.
            return_glimpses: also return the T read parameters (for figures).
        """
        cfg = self.config
        expected = (cfg.channels, cfg.height, cfg.width)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must be [B, {', '.join(map(str, expected))}], got {list(x.shape)}")
        if labels.shape != x.shape[:1]:
            raise ValueError(f"labels must be [B] = [{x.shape[0]}], got {list(labels.shape)}")
        batch = x.shape[0]
        h = self.h0.to(x.dtype).expand(batch, -1)
        c = self.c0.to(x.dtype).expand(batch, -1)
        params_seq = []
        # under autocast, glimpses in the dtype the LSTM computes in: the kernels round once on store,
        # where autocast would cast each glimpse again at every step
        device = x.device.type
        glimpse_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        for _ in range(cfg.glimpses):
            params = self.to_read_params(h)  # [B, 5] from the previous hidden state  (21)
            if self.attention_grad_clip is not None and params.requires_grad:
                params = ClipPerImageGradient.apply(params, self.attention_grad_clip)
            glimpse = kernels.glimpse(x, params, cfg.read_n, backend=self.backend, dtype=glimpse_dtype)  # [B, C, N, N]  (27)
            h, c = self.lstm(glimpse.flatten(1), (h, c))
            if return_glimpses:
                params_seq.append(params)
        logits = self.to_logits(h).to(torch.promote_types(h.dtype, torch.float32))  # [B, classes], fp32 or wider
        loss = F.cross_entropy(logits, labels)
        error = (logits.argmax(1) != labels).float()
        return ClassifierOutput(loss, error, logits, torch.stack(params_seq) if return_glimpses else None)

    @staticmethod
    def statistics(out: ClassifierOutput) -> torch.Tensor:
        """[2] (loss, error rate) of a batch, detached."""
        return torch.stack([out.loss.detach(), out.error.mean()])
