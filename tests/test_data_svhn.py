"""SVHN (draw/data_svhn.py) on tiny files in the real formats: MATLAB v5 .mat files for the cropped
digits; for the multi-digit release, tar.gz archives of PNGs and a MATLAB v7.3 (HDF5) digitStruct.mat
laid out as MATLAB writes it (object references into #refs#, a 512-byte MAT-file header)."""

import hashlib
import io
import tarfile

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from draw import data, data_svhn

# ------------------------------------------------------------------------------ svhn-cropped


def write_cropped_mat(path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """X uint8 [32, 32, 3, n] and y uint8 [n, 1] in 1..10, saved as MATLAB v5 (as the release)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    y[0] = 10
    scipy.io.savemat(path, {"X": x, "y": y}, format="5")
    return x, y


@pytest.fixture
def cropped_files(tmp_path, monkeypatch):
    written = {part: write_cropped_mat(tmp_path / name, n, seed) for (part, name), n, seed in zip(
        data_svhn.SVHN_CROPPED_FILES.items(), (12, 5, 7), range(3), strict=True)}
    md5 = {name: hashlib.md5((tmp_path / name).read_bytes()).hexdigest() for name in data_svhn.SVHN_CROPPED_FILES.values()}
    monkeypatch.setattr(data_svhn, "SVHN_CROPPED_MD5", md5)
    monkeypatch.setattr(data_svhn, "SVHN_CROPPED_VALID", 4)
    return written


def test_cropped_digits(tmp_path, cropped_files):
    d = data.load_dataset("svhn-cropped", tmp_path, shape=(3, 32, 32))
    assert d.shape == (3, 32, 32) and not d.binarize and d.train_crop is None
    assert [len(t) for t in (d.train, d.valid, d.test)] == [12 + 7 - 4, 4, 5], "extra joins train"
    x, y = cropped_files["test"]
    assert d.test.dtype == torch.uint8 and torch.equal(d.test[3, 1], torch.from_numpy(x[:, :, 1, 3]))
    assert d.labels["test"].tolist() == (y[:, 0] % 10).tolist() and d.labels["test"][0] == 0, "10 is the digit 0"
    pool = np.concatenate([cropped_files["train"][0], cropped_files["extra"][0]], axis=3).transpose(3, 2, 0, 1)
    ours = torch.cat([d.train, d.valid]).numpy()
    assert sorted(map(bytes, pool)) == sorted(map(bytes, ours))
    train_images = {bytes(im) for im in cropped_files["train"][0].transpose(3, 2, 0, 1)}
    assert all(bytes(im) in train_images for im in d.valid.numpy()), "valid comes from train_32x32.mat"
    assert "md5 verified" in d.source and "extra_32x32.mat" in d.source

    (tmp_path / "extra_32x32.mat").unlink()  # optional
    assert len(data.load_dataset("svhn-cropped", tmp_path).train) == 12 - 4


def test_cropped_bad_or_missing_files(tmp_path, cropped_files, monkeypatch):
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB 5.0 damaged")
    with pytest.raises(data.DataUnavailableError, match=r"test_32x32\.mat: md5 mismatch"):
        data.load_dataset("svhn-cropped", tmp_path)
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(data.DataUnavailableError, match=rf"test_32x32\.mat not found in {tmp_path}.*--data-dir"):
        data.load_dataset("svhn-cropped", tmp_path)

    path = tmp_path / "test_32x32.mat"
    scipy.io.savemat(path, {"X": np.zeros((28, 28, 1, 2), np.uint8), "y": np.ones((2, 1), np.uint8)})
    monkeypatch.setitem(data_svhn.SVHN_CROPPED_MD5, "test_32x32.mat", hashlib.md5(path.read_bytes()).hexdigest())
    with pytest.raises(data.DataUnavailableError, match=r"test_32x32\.mat: expected X uint8 \[32, 32, 3, N\]"):
        data.load_dataset("svhn-cropped", tmp_path)

    with h5py.File(path, "w") as f:  # a v7.3 file where v5 is expected
        f["X"] = np.zeros((2, 3, 32, 32), np.uint8)
    monkeypatch.setitem(data_svhn.SVHN_CROPPED_MD5, "test_32x32.mat", hashlib.md5(path.read_bytes()).hexdigest())
    with pytest.raises(data.DataUnavailableError, match=r"test_32x32\.mat: not a MATLAB v5 file"):
        data.load_dataset("svhn-cropped", tmp_path)


# ----------------------------------------------------------------------- svhn (multi-digit)

MAT_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Dec  5 12:00:00 2011 HDF5 schema 1.00 ."


def write_digit_struct(path, entries: list[tuple[str, list[list[float]]]]) -> None:
    """digitStruct.mat as MATLAB v7.3 writes a struct array: digitStruct/name and digitStruct/bbox
    hold [N, 1] object references into #refs#; a bbox field holds its value inline for one digit,
    else [K, 1] references to [1, 1] values."""
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        names, boxes = [], []
        for i, (name, digits) in enumerate(entries):
            chars = refs.create_dataset(f"name{i}", data=np.array([[ord(c)] for c in name], np.uint16))
            chars.attrs["MATLAB_class"] = np.bytes_("char")
            names.append(chars.ref)
            box = refs.create_group(f"bbox{i}")
            box.attrs["MATLAB_class"] = np.bytes_("struct")
            for field in ("height", "label", "left", "top", "width"):  # MATLAB's order: alphabetical
                values = [digit[data_svhn.BOX_FIELDS.index(field)] for digit in digits]
                if len(values) == 1:
                    box.create_dataset(field, data=np.array([[values[0]]], np.float64))
                else:
                    value_refs = [refs.create_dataset(f"v{i}_{field}_{k}", data=[[v]]).ref for k, v in enumerate(values)]
                    box.create_dataset(field, data=np.array(value_refs, dtype=h5py.ref_dtype)[:, None])
            boxes.append(box.ref)
        group = f.create_group("digitStruct")
        group.create_dataset("name", data=np.array(names, dtype=h5py.ref_dtype)[:, None])
        group.create_dataset("bbox", data=np.array(boxes, dtype=h5py.ref_dtype)[:, None])
    with open(path, "r+b") as f:
        f.write(MAT_HEADER.ljust(116, b" ") + bytes(8) + b"\x00\x02IM")


def picture(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# (left, top, width, height, label) per digit; sizes (width, height) per picture
ARCHIVE_CONTENTS = {
    "train": [
        ((50, 30), [[10, 5, 8, 16, 1]]),
        ((60, 40), [[5, 8, 9, 20, 10], [15, 9, 9, 20, 3]]),
        ((80, 30), [[2 + 10 * k, 4, 8, 18, 1 + k] for k in range(6)]),  # 6 digits: dropped
        ((40, 40), [[-3, -2, 20, 30, 7], [12, 6, 10, 30, 7], [25, 8, 14, 28, 2]]),  # past the edges
        ((33, 47), [[3, 4, 5, 6, 5]]),
    ],
    "extra": [((45, 28), [[8, 4, 10, 15, 4]]), ((52, 36), [[12, 6, 9, 20, 9], [22, 7, 9, 21, 10]])],
    "test": [((48, 32), [[9, 5, 8, 17, 6]]), ((39, 41), [[4, 10, 8, 14, 2], [13, 10, 8, 14, 8]])],
}


def write_archive(folder, part: str, contents, *, skip_png: int | None = None, struct: bytes | None = None) -> None:
    """<part>.tar.gz with <part>/1.png ... and, last (as the reader must cope with), digitStruct.mat."""
    entries = [(f"{k}.png", digits) for k, (_, digits) in enumerate(contents, start=1)]
    struct_path = folder / f"{part}_digitStruct.mat"
    write_digit_struct(struct_path, entries)
    members = {f"{part}/{k}.png": picture(*size, seed=k + 100 * len(part)) for k, (size, _) in enumerate(contents, 1)}
    if skip_png is not None:
        del members[f"{part}/{skip_png}.png"]
    members[f"{part}/see_bboxes.m"] = b"% a MATLAB script"
    members[f"{part}/digitStruct.mat"] = struct_path.read_bytes() if struct is None else struct
    struct_path.unlink()
    with tarfile.open(folder / f"{part}.tar.gz", "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


@pytest.fixture
def archives(tmp_path, monkeypatch):
    monkeypatch.setattr(data_svhn, "SVHN_VALID", 2)
    for part, contents in ARCHIVE_CONTENTS.items():
        write_archive(tmp_path, part, contents)
    return tmp_path


def expected_images(part: str) -> tuple[list[np.ndarray], list[list[int]]]:
    """Crops computed here with PIL directly, and labels padded with -1, of the kept pictures."""
    images, labels = [], []
    for k, (size, digits) in enumerate(ARCHIVE_CONTENTS[part], start=1):
        if len(digits) > 5:
            continue
        png = Image.open(io.BytesIO(picture(*size, seed=k + 100 * len(part))))
        box = data_svhn.crop_box(np.array(digits, float), *size)
        images.append(np.asarray(png.crop(box).resize((64, 64), Image.BILINEAR)).transpose(2, 0, 1))
        labels.append([d[4] % 10 for d in digits] + [-1] * (5 - len(digits)))
    return images, labels


def test_read_digit_struct(tmp_path):
    entries = [(f"{k}.png", digits) for k, (_, digits) in enumerate(ARCHIVE_CONTENTS["train"], start=1)]
    write_digit_struct(tmp_path / "digitStruct.mat", entries)
    assert (tmp_path / "digitStruct.mat").read_bytes().startswith(b"MATLAB 7.3 MAT-file")
    read = data_svhn.read_digit_struct(tmp_path / "digitStruct.mat")
    assert [name for name, _ in read] == [name for name, _ in entries]
    for (_, boxes), (_, digits) in zip(read, entries, strict=True):
        assert boxes.dtype == np.float64 and np.array_equal(boxes, np.array(digits, float))
    assert data_svhn.read_digit_struct((tmp_path / "digitStruct.mat").read_bytes())[1][0] == "2.png"


def test_crop_box():
    # union (10, 5)-(18, 21), centre (14, 13), enlarged to 10.4 x 20.8
    assert data_svhn.crop_box(np.array([[10, 5, 8, 16]], float), 50, 30) == (8, 2, 20, 24)
    assert data_svhn.crop_box(np.array([[10, 5, 8, 16]], float), 50, 22) == (8, 2, 20, 22), "kept inside"
    assert data_svhn.crop_box(np.array([[-3, -2, 20, 30], [25, 8, 14, 28]], float), 40, 40) == (0, 0, 40, 40)
    assert data_svhn.crop_box(np.array([[60, 60, 0, 0]], float), 40, 40) == (39, 39, 40, 40), "at least 1x1"


def test_multi_digit_svhn(archives):
    d = data.load_dataset("svhn", archives, shape=(3, 54, 54), progress=False)
    assert d.name == "svhn" and d.shape == (3, 54, 54) and d.train_crop == 54 and not d.binarize
    assert d.train.shape == (4 + 2 - 2, 3, 64, 64) and d.valid.shape == (2, 3, 54, 54) and d.test.shape == (2, 3, 54, 54)
    assert all(t.dtype == torch.uint8 for t in (d.train, d.valid, d.test))

    test, test_labels = expected_images("test")
    for ours, theirs in zip(d.test.numpy(), test, strict=True):
        assert np.array_equal(ours, data.centre_crop(theirs, 54)), "test: centre 54x54 of the 64x64 crop"
    assert d.labels["test"].tolist() == test_labels

    pool, pool_labels = (a + b for a, b in zip(expected_images("train"), expected_images("extra"), strict=True))
    assert len(pool) == 6, "the picture of 6 digits is dropped"
    found = [next(k for k, im in enumerate(pool) if np.array_equal(im, ours)) for ours in d.train.numpy()]
    held = [next(k for k, im in enumerate(pool) if np.array_equal(data.centre_crop(im, 54), ours)) for ours in d.valid.numpy()]
    assert sorted(found + held) == list(range(6)), "train + valid = train and extra pictures, each once"
    assert d.labels["train"].tolist() == [pool_labels[k] for k in found]
    assert d.labels["valid"].tolist() == [pool_labels[k] for k in held]
    assert d.labels["train"].dtype == torch.int64 and d.labels["train"].shape == (4, 5)
    assert "svhn: 4/2/2 house numbers" in d.source and "now cached" in d.source

    crops = data.random_crop(d.train, d.train_crop, torch.Generator().manual_seed(0))
    assert crops.shape == (4, 3, 54, 54) and d.images("valid").shape == (2, 3, 54, 54)


def test_multi_digit_cache_is_read_and_verified(archives, monkeypatch):
    first = data_svhn.load_svhn(archives, progress=False)
    monkeypatch.setattr(data_svhn, "_decode_archive", lambda *a, **k: pytest.fail("decoded again"))
    second = data_svhn.load_svhn(archives, progress=False)
    assert "sha256 verified" in second.source
    assert all(torch.equal(getattr(first, s), getattr(second, s)) for s in data.SPLITS)


def test_multi_digit_without_extra(archives):
    (archives / "extra.tar.gz").unlink()
    d = data_svhn.load_svhn(archives, progress=False)
    assert len(d.train) + len(d.valid) == 4 and "without extra.tar.gz" in d.source


def test_multi_digit_missing_and_bad_archives(archives):
    (archives / "test.tar.gz").rename(archives / "elsewhere.tar.gz")
    with pytest.raises(data.DataUnavailableError, match=rf"test\.tar\.gz not found in {archives}.*--data-dir"):
        data_svhn.load_svhn(archives, progress=False)
    (archives / "elsewhere.tar.gz").rename(archives / "test.tar.gz")

    write_archive(archives, "extra", ARCHIVE_CONTENTS["extra"], skip_png=2)
    with pytest.raises(data.DataUnavailableError, match=r"extra\.tar\.gz lacks 1 images .*extra/2\.png"):
        data_svhn.load_svhn(archives, progress=False)

    write_archive(archives, "extra", ARCHIVE_CONTENTS["extra"], struct=b"not HDF5")
    with pytest.raises(data.DataUnavailableError, match=r"extra\.tar\.gz:extra/digitStruct\.mat: not an SVHN digitStruct"):
        data_svhn.load_svhn(archives, progress=False)

    with tarfile.open(archives / "extra.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("extra/1.png")
        blob = b"\x89PNG broken"
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(data.DataUnavailableError, match=r"extra\.tar\.gz holds no extra/digitStruct\.mat"):
        data_svhn.load_svhn(archives, progress=False)

    write_archive(archives, "extra", ARCHIVE_CONTENTS["extra"])
    with tarfile.open(archives / "extra.tar.gz", "r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    members["extra/1.png"] = members["extra/1.png"][:40]  # truncated picture
    with tarfile.open(archives / "extra.tar.gz", "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(data.DataUnavailableError, match=r"extra\.tar\.gz:extra/1\.png: unreadable image"):
        data_svhn.load_svhn(archives, progress=False)
    assert not list(archives.glob("*.npz")), "nothing cached from bad archives"
