"""SVHN (the paper's Sec. 4.4): the multi-digit release preprocessed as Goodfellow et al. (2013),
and the 32x32 cropped digits. Both are read from the data directory (http://ufldl.stanford.edu/housenumbers/).

`svhn`, the paper's setting, from `train.tar.gz`, `extra.tar.gz` (optional, but the paper used it)
and `test.tar.gz`. Each archive holds `<split>/1.png, 2.png, ...` and `<split>/digitStruct.mat`, a
MATLAB v7.3 (HDF5) file: `digitStruct/name` [N, 1] object references to uint16 character arrays,
`digitStruct/bbox` [N, 1] references to groups with fields left, top, width, height and label,
each [K, 1]: the value itself when K = 1, else references to one [1, 1] value per digit. Every
image's digits are enclosed in their union bounding box, which is enlarged by 30 % about its
centre (and kept within the image), cut out and resized to 64x64 (bilinear). Images of more than
5 digits are dropped (as Goodfellow et al.; one image in train), which leaves the paper's
231,053 + 4,701 = 235,754 images of train and extra: SVHN_VALID (4,701) of them, drawn with a
fixed seed, are the validation set. Training uses random 54x54 crops of the 64x64 images
(Dataset.train_crop = 54, data.random_crop); valid and test (13,068 images) are stored as their
centre 54x54 crops. The result is cached (uint8, sha256 verified) in the data directory: the
first load decodes every PNG (several minutes for train and extra).

`svhn-cropped` from `train_32x32.mat`, `test_32x32.mat` and, if present, `extra_32x32.mat`
(MATLAB v5: X uint8 [32, 32, 3, N], y [N, 1] in 1..10, 10 meaning the digit 0), each checked
against its published md5; SVHN_CROPPED_VALID (5,000) training images drawn with a fixed seed are
the validation set. Read directly (seconds), not cached.

Colour intensities in [0, 1] are the Bernoulli targets as they are (binarize False).
"""

import hashlib
import importlib
import io
import math
import pathlib
import tarfile

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from draw import data

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_ARCHIVES = {"train": "train.tar.gz", "extra": "extra.tar.gz", "test": "test.tar.gz"}
SVHN_OPTIONAL = ("extra",)
SVHN_SIZE = 64
SVHN_CROP = 54
SVHN_EXPAND = 0.3
SVHN_MAX_DIGITS = 5
SVHN_VALID = 4_701
SVHN_SPLIT_SEED = 2013
BOX_FIELDS = ("left", "top", "width", "height", "label")

SVHN_CROPPED_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}
SVHN_CROPPED_MD5 = {  # published md5s (also the ones torchvision checks)
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
    "extra_32x32.mat": "a93ce644f1a588dc4d68dda5feec44a7",
}
SVHN_CROPPED_VALID = 5_000
SVHN_CROPPED_SEED = 32


# ---------------------------------------------------------------------------------------------
# svhn-cropped


def load_svhn_cropped(data_dir: pathlib.Path) -> data.Dataset:
    """The svhn-cropped Dataset from data_dir.

    Returns:
        Dataset with uint8 [N, 3, 32, 32] splits, binarize False, labels {split: [N] int64 in 0..9}.
    Raises:
        DataUnavailableError: a needed file is missing, fails its md5 or is malformed (named).
    """
    parts = {}
    for part, name in SVHN_CROPPED_FILES.items():
        path = data_dir / name
        if part == "extra" and not path.is_file():
            continue
        parts[part] = _read_cropped_mat(path)
    train_x = np.concatenate([parts["train"][0]] + ([parts["extra"][0]] if "extra" in parts else []))
    train_y = np.concatenate([parts["train"][1]] + ([parts["extra"][1]] if "extra" in parts else []))
    held_out = _held_out(len(parts["train"][0]), len(train_x), SVHN_CROPPED_VALID, SVHN_CROPPED_SEED, "train_32x32.mat")
    splits = {
        "train": (train_x[~held_out], train_y[~held_out]),
        "valid": (train_x[held_out], train_y[held_out]),
        "test": parts["test"],
    }
    images = [torch.from_numpy(splits[split][0]) for split in data.SPLITS]
    labels = {split: torch.from_numpy(splits[split][1]) for split in data.SPLITS}
    used = ", ".join(SVHN_CROPPED_FILES[part] for part in parts)
    source = (
        f"svhn-cropped: {'/'.join(str(len(t)) for t in images)} images 32x32x3 from {used} in {data_dir} "
        f"(md5 verified); valid is {SVHN_CROPPED_VALID} images of train_32x32.mat held out with seed "
        f"{SVHN_CROPPED_SEED}; intensities used as they are"
    )
    return data.Dataset("svhn-cropped", *images, source=source, train_is_binary=False, binarize=False, labels=labels)


def _read_cropped_mat(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 3, 32, 32] uint8, labels [N] int64 in 0..9) of one verified .mat file."""
    if not path.is_file():
        raise data.DataUnavailableError(
            f"{path.name} not found in {path.parent}: download {SVHN_URL}{path.name} and put it into "
            f"{path.parent}, {data.DATA_DIR_HINT}."
        )
    scipy_io = _optional("scipy.io")
    got = _md5(path)
    if got != SVHN_CROPPED_MD5[path.name]:
        raise data.DataUnavailableError(
            f"{path}: md5 mismatch (got {got}, expected {SVHN_CROPPED_MD5[path.name]}); not used. "
            f"Download {SVHN_URL}{path.name} again."
        )
    try:
        mat = scipy_io.loadmat(path, variable_names=["X", "y"])
        x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    except Exception as error:  # whatever a malformed .mat raises
        problem = f"{type(error).__name__}: {error}"
        raise data.DataUnavailableError(f"{path}: not a MATLAB v5 file with X and y ({problem})") from error
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y) or len(y) == 0:
        raise data.DataUnavailableError(
            f"{path}: expected X uint8 [32, 32, 3, N] and y [N, 1], got X {x.dtype} {list(x.shape)} and {len(y)} labels"
        )
    if y.min() < 1 or y.max() > 10:
        raise data.DataUnavailableError(f"{path}: labels outside 1..10")
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # [H, W, C, N] -> [N, C, H, W]
    return images, y.astype(np.int64) % 10  # 10 is the digit 0


def _optional(module: str):
    """Import an optional dependency of the SVHN loaders, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise data.DataUnavailableError(
            f"reading SVHN needs {module.split('.')[0]}: pip install 'draw-triton[data]' (or scipy h5py)"
        ) from error


def _md5(path: pathlib.Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _held_out(n_first: int, n_total: int, count: int, seed: int, name: str) -> np.ndarray:
    """[n_total] bool: count of the first n_first images, drawn with seed."""
    if count >= n_first:
        raise data.DataUnavailableError(f"{name}: {n_first} images, too few to hold out {count} for validation")
    held_out = np.zeros(n_total, bool)
    held_out[np.random.default_rng(seed).choice(n_first, count, replace=False)] = True
    return held_out


# ---------------------------------------------------------------------------------------------
# svhn: the multi-digit release


def load_svhn(data_dir: pathlib.Path, *, progress: bool = True) -> data.Dataset:
    """The svhn Dataset (64x64 train, 54x54 centre-cropped valid/test), preprocessed once and cached.

    Returns:
        Dataset with uint8 train [N, 3, 64, 64], valid and test [N, 3, 54, 54], train_crop 54,
        binarize False and labels {split: [N, 5] int64 digits, -1 after the last digit}.
    Raises:
        DataUnavailableError: train.tar.gz or test.tar.gz missing, or an archive malformed (named).
    """
    archives = {
        part: data_dir / name
        for part, name in SVHN_ARCHIVES.items()
        if part not in SVHN_OPTIONAL or (data_dir / name).is_file()
    }
    for path in archives.values():
        if not path.is_file():
            raise data.DataUnavailableError(
                f"{path.name} not found in {data_dir}: download {SVHN_URL}{path.name} (SVHN format 1, full numbers) "
                f"and put it into {data_dir}, {data.DATA_DIR_HINT}."
            )
    params = {
        "preprocessing": "Goodfellow et al. 2013 v1",
        "archives": {path.name: path.stat().st_size for path in archives.values()},
        "size": SVHN_SIZE,
        "crop": SVHN_CROP,
        "expand": SVHN_EXPAND,
        "max_digits": SVHN_MAX_DIGITS,
        "valid": SVHN_VALID,
        "seed": SVHN_SPLIT_SEED,
    }
    cache = data_dir / f"svhn_{SVHN_SIZE}x{SVHN_SIZE}.npz"
    arrays, note = data.cached_arrays(cache, params, lambda: _build_svhn(archives, progress))
    images = [torch.from_numpy(arrays[split]) for split in data.SPLITS]
    labels = {split: torch.from_numpy(arrays[f"{split}_labels"]) for split in data.SPLITS}
    used = ", ".join(path.name for path in archives.values())
    without = "" if "extra" in archives else " (without extra.tar.gz, which the paper used)"
    source = (
        f"svhn: {'/'.join(str(len(t)) for t in images)} house numbers from {used} in {data_dir}{without}, "
        f"union box +{SVHN_EXPAND:.0%} resized to {SVHN_SIZE}x{SVHN_SIZE}; train on random {SVHN_CROP}x{SVHN_CROP} "
        f"crops, valid/test centre crops; valid is {SVHN_VALID} of train+extra (seed {SVHN_SPLIT_SEED}) ({note})"
    )
    return data.Dataset(
        "svhn", *images, source=source, train_is_binary=False, binarize=False, train_crop=SVHN_CROP, labels=labels
    )


def _build_svhn(archives: dict[str, pathlib.Path], progress: bool) -> dict[str, np.ndarray]:
    """Preprocess every archive; split train+extra into train and valid; centre-crop valid and test."""
    structs = {part: _kept(_digit_struct_of(path, part), path) for part, path in archives.items()}
    pool_parts = [part for part in archives if part != "test"]
    n_pool = sum(len(structs[part]) for part in pool_parts)
    pool = np.empty((n_pool, 3, SVHN_SIZE, SVHN_SIZE), np.uint8)  # [N, C, H, W], filled archive by archive
    pool_labels = np.empty((n_pool, SVHN_MAX_DIGITS), np.int64)
    start = 0
    for part in pool_parts:
        end = start + len(structs[part])
        _decode_archive(archives[part], part, structs[part], pool[start:end], pool_labels[start:end], progress)
        start = end
    test = np.empty((len(structs["test"]), 3, SVHN_SIZE, SVHN_SIZE), np.uint8)
    test_labels = np.empty((len(test), SVHN_MAX_DIGITS), np.int64)
    _decode_archive(archives["test"], "test", structs["test"], test, test_labels, progress)

    held_out = _held_out(n_pool, n_pool, SVHN_VALID, SVHN_SPLIT_SEED, "train.tar.gz + extra.tar.gz")
    valid = np.ascontiguousarray(data.centre_crop(pool[held_out], SVHN_CROP))
    kept = np.flatnonzero(~held_out)
    for at in range(0, len(kept), 4096):  # compact in place: kept[i] >= i, so no source is overwritten early
        sources = kept[at : at + 4096]
        pool[at : at + len(sources)] = pool[sources]
    return {
        "train": pool[: len(kept)],
        "train_labels": pool_labels[kept],
        "valid": valid,
        "valid_labels": pool_labels[held_out],
        "test": np.ascontiguousarray(data.centre_crop(test, SVHN_CROP)),
        "test_labels": test_labels,
    }


def _kept(struct: list[tuple[str, np.ndarray]], path: pathlib.Path) -> list[tuple[str, np.ndarray]]:
    kept = [(name, boxes) for name, boxes in struct if 1 <= len(boxes) <= SVHN_MAX_DIGITS]
    if not kept:
        raise data.DataUnavailableError(f"{path}: its digitStruct.mat lists no image of 1 to {SVHN_MAX_DIGITS} digits")
    return kept


def _digit_struct_of(archive: pathlib.Path, part: str) -> list[tuple[str, np.ndarray]]:
    """First pass over the archive: read <part>/digitStruct.mat."""
    member_name = f"{part}/digitStruct.mat"
    try:
        with tarfile.open(archive, "r|*") as tar:  # streamed: a .tar.gz is read front to back only
            for member in tar:
                if member.isfile() and member.name.removeprefix("./") == member_name:
                    blob = tar.extractfile(member).read()
                    break
            else:
                raise data.DataUnavailableError(
                    f"{archive} holds no {member_name}; download {SVHN_URL}{archive.name} again."
                )
    except (OSError, EOFError, tarfile.TarError) as error:
        raise data.DataUnavailableError(f"{archive} is unreadable ({type(error).__name__}: {error})") from error
    return read_digit_struct(blob, f"{archive}:{member_name}")


def read_digit_struct(mat: bytes | str | pathlib.Path, name: str = "digitStruct.mat") -> list[tuple[str, np.ndarray]]:
    """Read an SVHN digitStruct.mat (MATLAB v7.3, HDF5).

    Args:
        mat: the file's bytes, or its path.
        name: how to name it in error messages.
    Returns:
        [(image file name, boxes [K, 5] float64: left, top, width, height, label per digit)], in file order.
    Raises:
        DataUnavailableError: not HDF5, or not the digitStruct layout.
    """
    h5py = _optional("h5py")
    source = io.BytesIO(mat) if isinstance(mat, bytes) else mat
    try:
        with h5py.File(source, "r") as f:
            names, boxes = f["digitStruct/name"][()].ravel(), f["digitStruct/bbox"][()].ravel()
            if len(names) != len(boxes):
                raise ValueError(f"{len(names)} names but {len(boxes)} bboxes")
            entries = []
            for name_ref, box_ref in zip(names, boxes, strict=True):
                file_name = "".join(map(chr, f[name_ref][()].ravel()))
                box = f[box_ref]
                columns = [_field_values(f, box[field]) for field in BOX_FIELDS]
                if len({len(column) for column in columns}) != 1:
                    raise ValueError(f"{file_name}: bbox fields of different lengths")
                entries.append((file_name, np.stack(columns, axis=1)))  # [K, 5]
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise data.DataUnavailableError(
            f"{name}: not an SVHN digitStruct (MATLAB v7.3) file ({type(error).__name__}: {error})"
        ) from error
    return entries


def _field_values(f, field) -> np.ndarray:
    """[K] float64 values of one bbox field: stored inline when K = 1, else as references."""
    h5py = _optional("h5py")
    values = field[()].ravel()
    if h5py.check_dtype(ref=field.dtype) is not None:
        return np.array([f[ref][()].item() for ref in values], np.float64)
    return values.astype(np.float64)


def crop_box(boxes: np.ndarray, width: int, height: int, expand: float = SVHN_EXPAND) -> tuple[int, int, int, int]:
    """The union of the digits' boxes, enlarged by expand about its centre, within the image.

    Args:
        boxes: [K, >=4] left, top, width, height of each digit (pixels, 0-based left/top).
        width, height: the image's size.
        expand: 0.3 enlarges the union's width and height by 30 %.
    Returns:
        (left, top, right, bottom) integer pixel box for PIL's crop, at least 1x1.
    """
    left, top = boxes[:, 0].min(), boxes[:, 1].min()
    right, bottom = (boxes[:, 0] + boxes[:, 2]).max(), (boxes[:, 1] + boxes[:, 3]).max()
    cx, cy = (left + right) / 2, (top + bottom) / 2
    half_w, half_h = (right - left) * (1 + expand) / 2, (bottom - top) * (1 + expand) / 2
    x0 = min(max(math.floor(cx - half_w), 0), width - 1)
    y0 = min(max(math.floor(cy - half_h), 0), height - 1)
    x1 = max(min(math.ceil(cx + half_w), width), x0 + 1)
    y1 = max(min(math.ceil(cy + half_h), height), y0 + 1)
    return x0, y0, x1, y1


def preprocess_image(png: Image.Image, boxes: np.ndarray) -> np.ndarray:
    """One house-number picture -> [3, 64, 64] uint8: the enlarged union box, resized (bilinear)."""
    image = png.convert("RGB")
    cut = image.crop(crop_box(boxes, *image.size)).resize((SVHN_SIZE, SVHN_SIZE), Image.BILINEAR)
    return np.asarray(cut, np.uint8).transpose(2, 0, 1)  # [H, W, C] -> [C, H, W]


def _decode_archive(
    archive: pathlib.Path,
    part: str,
    struct: list[tuple[str, np.ndarray]],
    images: np.ndarray,
    labels: np.ndarray,
    progress: bool,
) -> None:
    """Second pass: fill images [N, 3, 64, 64] and labels [N, 5] in struct's order from the PNGs."""
    where = {f"{part}/{name}": k for k, (name, _) in enumerate(struct)}
    done = np.zeros(len(struct), bool)
    try:
        bar = tqdm(total=len(struct), desc=archive.name, disable=not progress)
        with tarfile.open(archive, "r|*") as tar, bar:
            for member in tar:
                k = where.get(member.name.removeprefix("./"))
                if k is None or not member.isfile():
                    continue
                try:
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as png:
                        images[k] = preprocess_image(png, struct[k][1])
                except (OSError, ValueError) as error:
                    raise data.DataUnavailableError(f"{archive}:{member.name}: unreadable image ({error})") from error
                digits = struct[k][1][:, 4].astype(np.int64) % 10  # 10 is the digit 0
                labels[k] = -1
                labels[k, : len(digits)] = digits
                done[k] = True
                bar.update()
    except (OSError, EOFError, tarfile.TarError) as error:
        raise data.DataUnavailableError(f"{archive} is unreadable ({type(error).__name__}: {error})") from error
    if not done.all():
        missing = ", ".join(f"{part}/{struct[k][0]}" for k in np.flatnonzero(~done)[:3])
        raise data.DataUnavailableError(
            f"{archive} lacks {(~done).sum()} images its digitStruct.mat lists ({missing}, ...); "
            f"download {SVHN_URL}{archive.name} again."
        )
