"""The test-set variational bound (Table 2's nats per image) and the importance-weighted bound."""

import math

import torch
from tqdm.auto import tqdm

from draw.data import to_float
from draw.distributed import SINGLE, World
from draw.model import DRAW, importance_weighted_bound


def image_noise(first: int, count: int, draws: int, T: int, z_size: int, seed: int) -> torch.Tensor:
    """The latent noise of images first..first+count-1: [T, count * draws, z_size] (an image's draws adjacent).

    Image i's noise comes from its own generator, seeded by (seed, i), so an image meets the same
    noise whatever the batch it is evaluated in: the bound does not depend on --batch-size.
    """
    per_image = []
    for i in range(first, first + count):
        generator = torch.Generator().manual_seed((seed * 1_000_003 + i) % 2**63)
        per_image.append(torch.randn(draws, T, z_size, generator=generator))  # [K, T, z]
    if not per_image:
        return torch.zeros(T, 0, z_size)
    return torch.cat(per_image).transpose(0, 1)  # [count*K, T, z] -> [T, count*K, z]


@torch.no_grad()
def evaluate_bound(
    model: DRAW,
    images: torch.Tensor,
    *,
    batch_size: int = 500,
    importance_samples: int = 1,
    seed: int = 0,
    device=None,
    progress: bool = False,
    world: World = SINGLE,
) -> dict:
    """Mean negative bound on log p(x) over `images` [N, C, H, W] (float in [0, 1], or uint8), in nats per image.

    With importance_samples K = 1 this is the variational bound L = L_x + L_z of Eq. 12 (beta = 1
    whatever the model was trained with); with K > 1 it is the tighter importance-weighted bound
    -log (1/K) sum_k p(x, z_k) / q(z_k | x). The sampling noise is tied to each image (`image_noise`),
    so the figure is reproducible and independent of batch_size; torch's random state is untouched.
    Under torchrun (`world` of several ranks) each rank evaluates its contiguous part of the images and
    the sums are added across ranks: the same figure as one process, up to float rounding.
    """
    if importance_samples < 1:
        raise ValueError(f"importance_samples must be >= 1, got {importance_samples}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    cfg = model.config
    was_training = model.training
    model.eval()
    per_batch = max(1, batch_size // importance_samples)  # images per forward pass
    totals = {"bound": 0.0, "l_x": 0.0, "l_z": 0.0}
    squares = 0.0
    mine = world.part(len(images))
    dtype = next(model.parameters()).dtype  # the images in the model's dtype (fp64 for a float64 model)
    for start in tqdm(range(mine.start, mine.stop, per_batch), desc="eval", leave=False, disable=not progress):
        x = to_float(images[start : min(start + per_batch, mine.stop)].to(device, non_blocking=True)).to(dtype)
        noise = image_noise(start, len(x), importance_samples, cfg.T, cfg.z_size, seed).to(device)
        if importance_samples == 1:
            out = model(x, noise=noise)
            bound = out.l_x + out.l_z
            totals["l_x"] += out.l_x.sum().item()
            totals["l_z"] += out.l_z.sum().item()
        else:
            bound = importance_weighted_bound(model, x, importance_samples, noise)
        totals["bound"] += bound.sum().item()
        squares += (bound.double() ** 2).sum().item()
    model.train(was_training)
    totals["bound"], totals["l_x"], totals["l_z"], squares = world.sum([totals["bound"], totals["l_x"], totals["l_z"], squares])
    n = len(images)
    mean = totals["bound"] / n
    pixels = images.shape[1] * images.shape[2] * images.shape[3]
    result = {
        "nats": mean,
        "bits_per_dim": mean / (pixels * math.log(2)),
        "stderr": math.sqrt(max(squares / n - mean**2, 0.0) / n),
        "images": n,
        "importance_samples": importance_samples,
    }
    if importance_samples == 1:
        result["l_x"] = totals["l_x"] / n
        result["l_z"] = totals["l_z"] / n
    return result


@torch.no_grad()
def evaluate_classifier(
    model,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 500,
    device=None,
    progress: bool = False,
    world: World = SINGLE,
) -> dict:
    """Test error and mean cross-entropy of the glimpse classifier (draw/classifier.py) over `images`
    [N, C, H, W] (float in [0, 1], or uint8) with `labels` [N]. The classifier draws no noise, so the
    figures are exact and independent of batching; under torchrun each rank scores its part."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    errors = loss = 0.0
    mine = world.part(len(images))
    dtype = next(model.parameters()).dtype  # the images in the model's dtype (fp64 for a float64 model)
    for start in tqdm(range(mine.start, mine.stop, batch_size), desc="eval", leave=False, disable=not progress):
        stop = min(start + batch_size, mine.stop)
        x = to_float(images[start:stop].to(device, non_blocking=True)).to(dtype)
        out = model(x, labels[start:stop].to(device))
        errors += out.error.sum().item()
        loss += out.loss.item() * len(x)
    model.train(was_training)
    errors, loss = world.sum([errors, loss])
    n = len(images)
    return {"error": errors / n, "loss": loss / n, "images": n}
