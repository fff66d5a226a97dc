"""Images composed of MNIST digits: cluttered translated MNIST (100x100) and two-digit MNIST (60x60).

Cluttered MNIST (the paper's Sec. 4.1) follows the conventions of DeepMind's mnist-cluttered
generator: a black 100x100 image receives 8 distractors, each a random 8x8 crop of a random
digit placed at a random position; the distractors are added and the image clipped at 1; then
the digit to classify is added at a uniformly random position (wholly inside the image) and the
image clipped at 1 again. Here the digits of an image come from the same MNIST split as its
split (train digits for train, and so on), the distractors are always other digits than the one
to classify, and the digits to classify run through random permutations of the split, so 50k
training images use each training digit once.

Two-digit MNIST (Sec. 4.3): two different digits of the split, each placed at a uniformly random
position wholly inside a black 60x60 image; overlaps are added and clipped at 1.

Both are drawn with numpy Generators seeded by (seed, split), vectorised over images (a few
thousand at a time), stored as uint8 and cached in the data directory with data.cached_arrays.
Measured once on one core of a shared 2-core CPU: the 70k cluttered images take about 5 s, the
80k two-digit images about 3 s (plus reading mnist.pkl.gz and writing the cache).
"""

import pathlib
from dataclasses import dataclass

import numpy as np
import torch

from draw import data

CLUTTERED_SEED = 1
CLUTTERED_SIZE = 100
CLUTTERED_DISTRACTORS = 8
CLUTTERED_PATCH = 8
CLUTTERED_SIZES = (50_000, 10_000, 10_000)  # train, valid, test: MNIST's own split sizes

TWO_DIGIT_SEED = 2
TWO_DIGIT_SIZE = 60
# 60k training images from the 50k MNIST training digits: 2 digits an image, so each digit appears
# in ~2.4 images, each time at other places and with another partner; 10k valid and 10k test from
# the valid and test digits, so no digit seen in training is scored, and the bound is as precise
# as MNIST's (10k images).
TWO_DIGIT_SIZES = (60_000, 10_000, 10_000)

CHUNK = 2048  # images composed at once: [CHUNK, 100, 100] float32 is 82 MB
SPLIT_INDEX = {split: k for k, split in enumerate(data.SPLITS)}


@dataclass
class Layout:
    """Where everything of n composed images goes (0-based pixel offsets of top-left corners).

    digit: [n, D] int64 index of each digit into the source digits (D = 1 cluttered, 2 two-digit).
    digit_at: [n, D, 2] int64 (top, left) of each digit in the image.
    distractor: [n, K] int64 index of the digit each distractor is cut from (K = 0 two-digit).
    crop_at: [n, K, 2] int64 (top, left) of the crop within that digit.
    distractor_at: [n, K, 2] int64 (top, left) of the crop in the image.
    """

    digit: np.ndarray
    digit_at: np.ndarray
    distractor: np.ndarray
    crop_at: np.ndarray
    distractor_at: np.ndarray


def cluttered_layout(
    n_digits: int,
    n_images: int,
    rng: np.random.Generator,
    size: int = CLUTTERED_SIZE,
    distractors: int = CLUTTERED_DISTRACTORS,
    patch: int = CLUTTERED_PATCH,
    digit_side: int = 28,
    digit: np.ndarray | None = None,
) -> Layout:
    """Draw the layout of n_images cluttered images from n_digits >= 2 source digits.

    The digits to classify run through random permutations of the source digits, unless `digit`
    ([n_images] int64 indices) names them.
    """
    if n_digits < 2:
        raise ValueError(f"cluttered MNIST needs at least 2 source digits, got {n_digits}")
    if digit is None:
        epochs = -(-n_images // n_digits)
        digit = np.concatenate([rng.permutation(n_digits) for _ in range(epochs)])[:n_images]
    digit = np.asarray(digit, np.int64).reshape(n_images, 1)  # [n, 1]
    digit_at = rng.integers(0, size - digit_side + 1, (n_images, 1, 2))
    other = digit + rng.integers(1, n_digits, (n_images, distractors))  # never the digit itself
    crop_at = rng.integers(0, digit_side - patch + 1, (n_images, distractors, 2))
    distractor_at = rng.integers(0, size - patch + 1, (n_images, distractors, 2))
    return Layout(digit, digit_at, other % n_digits, crop_at, distractor_at)


def two_digit_layout(n_digits: int, n_images: int, rng: np.random.Generator, size: int = TWO_DIGIT_SIZE) -> Layout:
    """Draw the layout of n_images two-digit images: two different digits of n_digits >= 2."""
    if n_digits < 2:
        raise ValueError(f"two-digit MNIST needs at least 2 source digits, got {n_digits}")
    first = rng.integers(0, n_digits, n_images)
    second = (first + rng.integers(1, n_digits, n_images)) % n_digits
    digit_at = rng.integers(0, size - 28 + 1, (n_images, 2, 2))
    no_distractors, nowhere = np.zeros((n_images, 0), np.int64), np.zeros((n_images, 0, 2), np.int64)
    return Layout(np.stack([first, second], 1), digit_at, no_distractors, nowhere, nowhere)


def compose(digits: np.ndarray, layout: Layout, size: int, patch: int = CLUTTERED_PATCH) -> np.ndarray:
    """Render a layout: distractors added and clipped at 1, then the digits added and clipped at 1.

    Args:
        digits: [N, 28, 28] float32 source digits in [0, 1].
        layout: from cluttered_layout or two_digit_layout, indices into digits.
        size: side of the square images.
        patch: side of a distractor crop.
    Returns:
        [n, 1, size, size] uint8, round(255 * intensity).
    """
    n = len(layout.digit)
    out = np.empty((n, 1, size, size), np.uint8)
    for start in range(0, n, CHUNK):
        part = slice(start, min(start + CHUNK, n))
        canvas = np.zeros((part.stop - part.start, size, size), np.float32)
        for k in range(layout.distractor.shape[1]):
            crops = _windows(digits, layout.distractor[part, k], layout.crop_at[part, k], patch)  # [b, patch, patch]
            _add_at(canvas, crops, layout.distractor_at[part, k])
        np.minimum(canvas, 1.0, out=canvas)
        for k in range(layout.digit.shape[1]):
            whole = digits[layout.digit[part, k]]  # [b, 28, 28]
            _add_at(canvas, whole, layout.digit_at[part, k])
        np.minimum(canvas, 1.0, out=canvas)
        out[part, 0] = np.rint(canvas * 255.0)
    return out


def _windows(images: np.ndarray, which: np.ndarray, at: np.ndarray, side: int) -> np.ndarray:
    """[b, side, side]: images[which[i]][at[i, 0]:+side, at[i, 1]:+side] for each i."""
    offsets = np.arange(side)
    rows = at[:, 0, None, None] + offsets[None, :, None]  # [b, side, 1]
    cols = at[:, 1, None, None] + offsets[None, None, :]  # [b, 1, side]
    return images[which[:, None, None], rows, cols]


def _add_at(canvas: np.ndarray, patches: np.ndarray, at: np.ndarray) -> None:
    """canvas[i, at[i, 0]:+h, at[i, 1]:+w] += patches[i] for each i (one patch per image: no collisions)."""
    b, h, w = patches.shape
    rows = at[:, 0, None, None] + np.arange(h)[None, :, None]  # [b, h, 1]
    cols = at[:, 1, None, None] + np.arange(w)[None, None, :]  # [b, 1, w]
    canvas[np.arange(b)[:, None, None], rows, cols] += patches


def cluttered_mnist(
    digits: np.ndarray, labels: np.ndarray, n_images: int, seed: int = CLUTTERED_SEED, split: str = "train"
) -> tuple[np.ndarray, np.ndarray, Layout]:
    """n_images cluttered translated MNIST images from one split's digits.

    Args:
        digits: [N, 28, 28] float32 in [0, 1], N >= 2.
        labels: [N] int64 classes of digits.
        n_images: how many images.
        seed, split: the numpy Generator is seeded with (seed, index of split).
    Returns:
        (images [n_images, 1, 100, 100] uint8, labels [n_images] int64 of the digit to classify,
        the Layout). Same arguments, same bytes.
    """
    rng = np.random.default_rng([seed, SPLIT_INDEX[split]])
    layout = cluttered_layout(len(digits), n_images, rng)
    return compose(digits, layout, CLUTTERED_SIZE), labels[layout.digit[:, 0]].astype(np.int64), layout


def two_digit_mnist(
    digits: np.ndarray, labels: np.ndarray, n_images: int, seed: int = TWO_DIGIT_SEED, split: str = "train"
) -> tuple[np.ndarray, np.ndarray, Layout]:
    """n_images two-digit MNIST images from one split's digits; valid and test binarized once.

    Args:
        digits: [N, 28, 28] float32 in [0, 1], N >= 2.
        labels: [N] int64 classes of digits.
        n_images: how many images.
        seed, split: the numpy Generator is seeded with (seed, index of split).
    Returns:
        (images [n_images, 1, 60, 60] uint8: grey levels for train, {0, 255} for valid and test
        (one Bernoulli draw of the grey levels, from the same Generator); labels [n_images, 2]
        int64 of the two digits; the Layout). Same arguments, same bytes.
    """
    rng = np.random.default_rng([seed, SPLIT_INDEX[split]])
    layout = two_digit_layout(len(digits), n_images, rng)
    images = compose(digits, layout, TWO_DIGIT_SIZE)
    if split != "train":
        for start in range(0, n_images, CHUNK):
            grey = images[start : start + CHUNK]
            noise = rng.random(grey.shape, dtype=np.float32)
            grey[...] = np.where(noise * 255.0 < grey, 255, 0)  # Bernoulli(grey / 255), in place
    return images, labels[layout.digit].astype(np.int64), layout


class FreshClutter:
    """New cluttered training images for every batch (TrainConfig.fresh_clutter): each call places the
    chosen training digits at new random positions among new distractors, with the generator seeded
    by `seed`, so a batch is a pure function of (run seed, step) and a resume redraws it exactly.

    Indices are MNIST's 50k training digits (as many as the stored training images), so an epoch
    still shows every training digit once. The digits are read from mnist.pkl.gz on first use.
    """

    def __init__(self, data_dir: pathlib.Path, progress: bool = True):
        self.data_dir, self.progress = data_dir, progress
        self._digits = self._labels = None

    def __call__(self, chosen: np.ndarray, seed: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [b, 1, 100, 100] uint8, labels [b] int64) of the training digits `chosen` [b]."""
        if self._digits is None:
            mnist, _ = data.mnist_grey_levels(self.data_dir, self.progress)
            self._digits, self._labels = mnist["train"]
        rng = np.random.default_rng(seed)
        layout = cluttered_layout(len(self._digits), len(chosen), rng, digit=chosen)
        images = compose(self._digits, layout, CLUTTERED_SIZE)
        return torch.from_numpy(images), torch.from_numpy(self._labels[layout.digit[:, 0]].astype(np.int64))


def load_cluttered(
    data_dir: pathlib.Path, *, progress: bool = True, sizes: tuple[int, int, int] | None = None
) -> data.Dataset:
    """The mnist-cluttered Dataset, generated from MNIST once and cached in data_dir.

    Args:
        data_dir: where mnist.pkl.gz is found and the cache is written.
        progress: show download progress bars (for mnist.pkl.gz).
        sizes: (train, valid, test) image counts; default CLUTTERED_SIZES.
    Returns:
        Dataset with uint8 [N, 1, 100, 100] intensities, binarize False (inputs of the classifier,
        used as they are) and labels {split: [N] int64}.
    """
    sizes = tuple(sizes or CLUTTERED_SIZES)
    params = {
        "generator": "mnist-cluttered v2",  # v2: MNIST read as v / 255 (data._read_mnist_pkl)
        "seed": CLUTTERED_SEED,
        "sizes": list(sizes),
        "size": CLUTTERED_SIZE,
        "distractors": CLUTTERED_DISTRACTORS,
        "patch": CLUTTERED_PATCH,
        "mnist_pickle_sha256": data.MNIST_PICKLE_SHA256,
    }
    path = data_dir / f"mnist_cluttered_{CLUTTERED_SIZE}x{CLUTTERED_SIZE}_seed{CLUTTERED_SEED}.npz"
    arrays, how = _cached_composite(
        path, params, sizes, data_dir, progress, lambda x, y, n, split: cluttered_mnist(x, y, n, CLUTTERED_SEED, split)
    )
    source = (
        f"mnist-cluttered: {'/'.join(map(str, sizes))} images 100x100, digit at a random place plus "
        f"{CLUTTERED_DISTRACTORS} random {CLUTTERED_PATCH}x{CLUTTERED_PATCH} crops of other digits of its split, "
        f"seed {CLUTTERED_SEED} ({how})"
    )
    dataset = _dataset("mnist-cluttered", arrays, source, binarize=False)
    dataset.fresh_train = FreshClutter(data_dir, progress)
    return dataset


def load_two_digit(
    data_dir: pathlib.Path, *, progress: bool = True, sizes: tuple[int, int, int] | None = None
) -> data.Dataset:
    """The mnist-two-digit Dataset, generated from MNIST once and cached in data_dir.

    Args:
        data_dir: where mnist.pkl.gz is found and the cache is written.
        progress: show download progress bars (for mnist.pkl.gz).
        sizes: (train, valid, test) image counts; default TWO_DIGIT_SIZES.
    Returns:
        Dataset with uint8 [N, 1, 60, 60]: train grey levels (binarize True: the training loop
        binarizes each batch), valid/test one fixed binary draw; labels {split: [N, 2] int64}.
    """
    sizes = tuple(sizes or TWO_DIGIT_SIZES)
    params = {
        "generator": "mnist-two-digit v2",  # v2: MNIST read as v / 255
        "seed": TWO_DIGIT_SEED,
        "sizes": list(sizes),
        "size": TWO_DIGIT_SIZE,
        "mnist_pickle_sha256": data.MNIST_PICKLE_SHA256,
    }
    path = data_dir / f"mnist_two_digit_{TWO_DIGIT_SIZE}x{TWO_DIGIT_SIZE}_seed{TWO_DIGIT_SEED}.npz"
    arrays, how = _cached_composite(
        path, params, sizes, data_dir, progress, lambda x, y, n, split: two_digit_mnist(x, y, n, TWO_DIGIT_SEED, split)
    )
    source = (
        f"mnist-two-digit: {'/'.join(map(str, sizes))} images 60x60 of two digits at random places, "
        f"train grey levels, valid/test binarized once, seed {TWO_DIGIT_SEED} ({how})"
    )
    return _dataset("mnist-two-digit", arrays, source, binarize=True)


def _cached_composite(path, params: dict, sizes, data_dir, progress: bool, generate) -> tuple[dict[str, np.ndarray], str]:
    """Every split made by generate(digits, labels, n, split) from MNIST's split, or read from the verified
    cache at path (written on the first call); returns (arrays, a note saying whence)."""
    origin = []

    def build() -> dict[str, np.ndarray]:
        mnist, where = data.mnist_grey_levels(data_dir, progress)
        origin.append(where)
        arrays = {}
        for split, n in zip(data.SPLITS, sizes, strict=True):
            arrays[split], arrays[f"{split}_labels"], _ = generate(*mnist[split], n, split)
        return arrays

    arrays, note = data.cached_arrays(path, params, build)
    return arrays, (f"generated from {origin[0]}; " if origin else "") + note


def _dataset(name: str, arrays: dict[str, np.ndarray], source: str, binarize: bool) -> data.Dataset:
    images = [torch.from_numpy(arrays[split]) for split in data.SPLITS]
    labels = {split: torch.from_numpy(arrays[f"{split}_labels"]) for split in data.SPLITS}
    return data.Dataset(name, *images, source=source, train_is_binary=False, binarize=binarize, labels=labels)
