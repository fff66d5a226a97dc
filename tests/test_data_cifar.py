"""CIFAR-10 (draw/data_cifar.py) on tiny batches written in the python release's exact format."""

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from draw import data, data_cifar

PER_BATCH = 6


def batch_bytes(seed: int, n: int = PER_BATCH) -> bytes:
    """One pickled batch as in cifar-10-python.tar.gz: a dict with bytes keys, data uint8 [n, 3072]."""
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": f"batch {seed}".encode(),
        b"labels": rng.integers(0, 10, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"image_{seed}_{k}.png".encode() for k in range(n)],
    }
    return pickle.dumps(batch, protocol=2)


@pytest.fixture
def batches(monkeypatch) -> dict[str, bytes]:
    """Fake batches whose md5s are now the expected ones; 3 of the 30 training images held out."""
    blobs = {name: batch_bytes(seed) for seed, name in enumerate(data_cifar.CIFAR_MD5)}
    monkeypatch.setattr(data_cifar, "CIFAR_MD5", {name: hashlib.md5(b).hexdigest() for name, b in blobs.items()})
    monkeypatch.setattr(data_cifar, "CIFAR_VALID", 3)
    return blobs


def write_archive(path, blobs: dict[str, bytes]) -> None:
    members = {f"cifar-10-batches-py/{name}": blob for name, blob in blobs.items()}
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": [b"airplane"] * 10})
    members["cifar-10-batches-py/readme.html"] = b"<html></html>"
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def check_dataset(d: data.Dataset, blobs: dict[str, bytes]) -> None:
    assert d.name == "cifar10" and d.shape == (3, 32, 32) and not d.binarize and not d.train_is_binary
    assert [len(t) for t in (d.train, d.valid, d.test)] == [27, 3, PER_BATCH]
    assert all(t.dtype == torch.uint8 for t in (d.train, d.valid, d.test))
    test = pickle.loads(blobs["test_batch"], encoding="bytes")
    first = torch.from_numpy(test[b"data"][0])
    assert torch.equal(d.test[0, 0].flatten(), first[:1024]), "red plane first, rows top to bottom"
    assert torch.equal(d.test[0, 2, 31], first[3072 - 32 :]), "blue plane last"
    assert d.labels["test"].tolist() == test[b"labels"] and d.labels["test"].dtype == torch.int64
    training = [pickle.loads(blobs[f"data_batch_{k}"], encoding="bytes") for k in range(1, 6)]
    every = np.concatenate([b[b"data"] for b in training]).reshape(-1, 3, 32, 32)
    ours = torch.cat([d.train, d.valid]).numpy()
    assert sorted(map(bytes, every)) == sorted(map(bytes, ours)), "train + valid = the five batches"
    labels_of = {bytes(x): y for b in training for x, y in zip(b[b"data"], b[b"labels"], strict=True)}
    assert [labels_of[bytes(x.reshape(-1))] for x in d.valid.numpy()] == d.labels["valid"].tolist()


def test_archive(tmp_path, batches):
    write_archive(tmp_path / "cifar-10-python.tar.gz", batches)
    d = data.load_dataset("cifar10", tmp_path, shape=(3, 32, 32))
    check_dataset(d, batches)
    assert "archive" in d.source and "md5 verified" in d.source
    again = data.load_dataset("cifar10", tmp_path)
    assert torch.equal(d.valid, again.valid), "the held-out split is fixed"


def test_extracted_folder(tmp_path, batches):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, blob in batches.items():
        (folder / name).write_bytes(blob)
    d = data.load_dataset("cifar10", tmp_path)
    check_dataset(d, batches)
    assert f"folder {folder}" in d.source
    (folder / "data_batch_3").unlink()
    with pytest.raises(data.DataUnavailableError, match="data_batch_3 is missing"):
        data.load_dataset("cifar10", tmp_path)


def test_missing_files_name_the_archive_and_the_data_dir(tmp_path):
    with pytest.raises(data.DataUnavailableError) as caught:
        data.load_dataset("cifar10", tmp_path)
    message = str(caught.value)
    assert "cifar-10-python.tar.gz" in message and str(tmp_path) in message and "--data-dir" in message


def test_bad_files_are_refused(tmp_path, batches, monkeypatch):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_archive(archive, {**batches, "data_batch_2": batch_bytes(99)})  # not the expected bytes
    with pytest.raises(data.DataUnavailableError, match=r"cifar-10-batches-py/data_batch_2: md5 mismatch"):
        data.load_dataset("cifar10", tmp_path)

    write_archive(archive, {name: b for name, b in batches.items() if name != "test_batch"})
    with pytest.raises(data.DataUnavailableError, match="lacks cifar-10-batches-py/test_batch"):
        data.load_dataset("cifar10", tmp_path)

    archive.write_bytes(b"\x1f\x8b not a gzip")
    with pytest.raises(data.DataUnavailableError, match="cifar-10-python.tar.gz is unreadable"):
        data.load_dataset("cifar10", tmp_path)

    wrong = pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})  # verified, but malformed
    monkeypatch.setitem(data_cifar.CIFAR_MD5, "test_batch", hashlib.md5(wrong).hexdigest())
    write_archive(archive, {**batches, "test_batch": wrong})
    with pytest.raises(data.DataUnavailableError, match=r"test_batch in the archive .*uint8 \[N, 3072\]"):
        data.load_dataset("cifar10", tmp_path)
