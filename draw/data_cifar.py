"""CIFAR-10 (the paper's Sec. 4.5), read from the python release in the data directory.

Either the extracted folder `cifar-10-batches-py/` or the archive `cifar-10-python.tar.gz`
(https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, md5 c58f30108f718f92721af3b95e74349a).
Each batch file is checked against its published md5 before it is unpickled, so only the known
files are ever unpickled. A batch is a pickled dict with b"data" uint8 [10000, 3072] (1024 red,
then 1024 green, then 1024 blue values, rows top to bottom) and b"labels" (10000 ints 0..9).

The paper gives no validation split: CIFAR_VALID (5,000) of the 50,000 training images, drawn with
a fixed seed, are held out as valid, the other 45,000 are train; test is the 10,000 test_batch.
Intensities in [0, 1] are the Bernoulli targets as they are (binarize False). Reading takes a
few seconds, so nothing is cached.
"""

import hashlib
import io
import pathlib
import pickle
import tarfile

import numpy as np
import torch

from draw import data

CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = {  # published md5 of each batch file (also the ones torchvision checks)
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{k}" for k in range(1, 6))
CIFAR_VALID = 5_000
CIFAR_SPLIT_SEED = 10


def load_cifar10(data_dir: pathlib.Path) -> data.Dataset:
    """The cifar10 Dataset from data_dir.

    Returns:
        Dataset with uint8 [N, 3, 32, 32] splits (45,000 / 5,000 / 10,000), binarize False, and
        labels {split: [N] int64 in 0..9}.
    Raises:
        DataUnavailableError: neither source is there, or a batch is missing, fails its md5 or is
            malformed; the message names the file and where to put the archive.
    """
    folder, archive = data_dir / CIFAR_FOLDER, data_dir / CIFAR_ARCHIVE
    if folder.is_dir():
        blobs, where = _read_folder(folder), f"folder {folder}"
    elif archive.is_file():
        blobs, where = _read_archive(archive), f"archive {archive}"
    else:
        raise data.DataUnavailableError(
            f"CIFAR-10 not found: neither {CIFAR_ARCHIVE} nor its folder {CIFAR_FOLDER}/ is in {data_dir}. "
            f"Download {CIFAR_URL} and put it into {data_dir}, {data.DATA_DIR_HINT}."
        )
    batches = {name: _parse_batch(name, blob, where) for name, blob in blobs.items()}
    train_x = np.concatenate([batches[name][0] for name in CIFAR_TRAIN_BATCHES])
    train_y = np.concatenate([batches[name][1] for name in CIFAR_TRAIN_BATCHES])
    held_out = np.zeros(len(train_x), bool)
    held_out[np.random.default_rng(CIFAR_SPLIT_SEED).choice(len(train_x), CIFAR_VALID, replace=False)] = True
    splits = {
        "train": (train_x[~held_out], train_y[~held_out]),
        "valid": (train_x[held_out], train_y[held_out]),
        "test": batches["test_batch"],
    }
    images = [torch.from_numpy(splits[split][0]) for split in data.SPLITS]
    labels = {split: torch.from_numpy(splits[split][1]) for split in data.SPLITS}
    sizes = "/".join(str(len(t)) for t in images)
    source = (
        f"cifar10: {sizes} images 32x32x3 from the {where} (md5 verified); valid is {CIFAR_VALID} "
        f"training images held out with seed {CIFAR_SPLIT_SEED}; intensities used as they are"
    )
    return data.Dataset("cifar10", *images, source=source, train_is_binary=False, binarize=False, labels=labels)


def _read_folder(folder: pathlib.Path) -> dict[str, bytes]:
    blobs = {}
    for name in CIFAR_MD5:
        path = folder / name
        if not path.is_file():
            raise data.DataUnavailableError(
                f"{path} is missing: the folder {CIFAR_FOLDER}/ must hold {', '.join(CIFAR_MD5)}; "
                f"extract {CIFAR_ARCHIVE} again, or remove the folder and put the archive into {folder.parent}."
            )
        blobs[name] = _verified(path.read_bytes(), name, str(path))
    return blobs


def _read_archive(archive: pathlib.Path) -> dict[str, bytes]:
    blobs = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and name in CIFAR_MD5 and member.name == f"{CIFAR_FOLDER}/{name}":
                    blobs[name] = _verified(tar.extractfile(member).read(), name, f"{archive}:{member.name}")
    except (OSError, EOFError, tarfile.TarError) as error:
        raise data.DataUnavailableError(
            f"{archive} is unreadable ({type(error).__name__}: {error}); "
            f"download {CIFAR_URL} again into {archive.parent}."
        ) from error
    if missing := [name for name in CIFAR_MD5 if name not in blobs]:
        raise data.DataUnavailableError(
            f"{archive} lacks {', '.join(f'{CIFAR_FOLDER}/{name}' for name in missing)}; "
            f"download {CIFAR_URL} again into {archive.parent}."
        )
    return blobs


def _verified(blob: bytes, name: str, where: str) -> bytes:
    got = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    if got != CIFAR_MD5[name]:
        raise data.DataUnavailableError(
            f"{where}: md5 mismatch (got {got}, expected {CIFAR_MD5[name]}); not used. "
            f"Download {CIFAR_URL} again."
        )
    return blob


def _parse_batch(name: str, blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 3, 32, 32] uint8, labels [N] int64) of one verified batch."""
    try:
        batch = pickle.load(io.BytesIO(blob), encoding="bytes")
        x = np.asarray(batch[b"data"])
        y = np.asarray(batch[b"labels"], np.int64)
    except Exception as error:  # whatever a malformed pickle raises
        problem = f"{type(error).__name__}: {error}"
        raise data.DataUnavailableError(f"{name} in the {where}: not a CIFAR batch ({problem})") from error
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or y.shape != (len(x),) or len(x) == 0:
        raise data.DataUnavailableError(
            f"{name} in the {where}: expected data uint8 [N, 3072] and N labels, "
            f"got data {x.dtype} {list(x.shape)} and {len(y)} labels"
        )
    if y.min() < 0 or y.max() > 9:
        raise data.DataUnavailableError(f"{name} in the {where}: labels outside 0..9")
    return x.reshape(-1, 3, 32, 32), y  # [N, 3072] -> [N, C, H, W]: channel-major, then rows
