"""Dataset's float and crop helpers, and the sha256-verified array cache of draw/data.py."""

import json
import os
import time

import numpy as np
import pytest
import torch

from draw import data


def uint8_dataset(crop=None) -> data.Dataset:
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (6, 3, 10, 12), generator=g, dtype=torch.uint8)
    valid = torch.randint(0, 256, (4, 3, 8, 8), generator=g, dtype=torch.uint8)
    return data.Dataset("toy", train, valid, valid.clone(), "toy", False, binarize=False, train_crop=crop)


# --------------------------------------------------------------------------- floats and crops


def test_to_float_and_dataset_images():
    d = uint8_dataset()
    x = d.images("train", torch.tensor([4, 1]))
    assert x.dtype == torch.float32 and x.shape == (2, 3, 10, 12)
    assert torch.equal(x, d.train[[4, 1]].float() / 255)
    assert d.images("valid").shape == (4, 3, 8, 8) and d.images("test", slice(0, 1)).shape == (1, 3, 8, 8)
    assert data.to_float(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [0.0, 1.0]
    grey = torch.rand(3, dtype=torch.float64)
    assert torch.equal(data.to_float(grey), grey.float())
    with pytest.raises(TypeError, match="int64"):
        data.to_float(torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="split"):
        d.images("training")


def test_shape_is_the_crop_the_model_sees():
    assert uint8_dataset().shape == (3, 10, 12)
    assert uint8_dataset(crop=8).shape == (3, 8, 8)


def test_random_crop_cuts_each_image_at_its_own_place():
    batch = torch.arange(64 * 2 * 9 * 11, dtype=torch.int32).view(64, 2, 9, 11)  # every value distinct
    crops = data.random_crop(batch, 5, torch.Generator().manual_seed(3))
    assert crops.shape == (64, 2, 5, 5) and crops.dtype == torch.int32
    offsets = set()
    for image, crop in zip(batch, crops, strict=True):
        top, left = divmod(int((image[0] == crop[0, 0, 0]).flatten().nonzero()), 11)
        assert torch.equal(crop, image[:, top : top + 5, left : left + 5])
        offsets.add((top, left))
    assert len(offsets) > 10, "offsets differ from image to image"
    assert {top for top, _ in offsets} <= set(range(5)) and {left for _, left in offsets} <= set(range(7))
    again = data.random_crop(batch, 5, torch.Generator().manual_seed(3))
    assert torch.equal(crops, again)
    whole = data.random_crop(batch.to(torch.uint8), 9, None)  # H = size: only offset 0 along H
    assert whole.shape == (64, 2, 9, 9) and whole.dtype == torch.uint8
    with pytest.raises(ValueError, match="crop size"):
        data.random_crop(batch, 10)


def test_centre_crop():
    images = np.arange(2 * 64 * 64).reshape(2, 1, 64, 64)
    crop = data.centre_crop(images, 54)
    assert crop.shape == (2, 1, 54, 54) and crop[0, 0, 0, 0] == images[0, 0, 5, 5]
    assert torch.equal(data.centre_crop(torch.ones(3, 7, 7), 3), torch.ones(3, 3, 3))


# ----------------------------------------------------------------------------- array caches


def sample_arrays() -> dict:
    return {"images": np.arange(60, dtype=np.uint8).reshape(3, 4, 5), "labels": np.array([1, 2, 3], np.int64)}


def test_array_cache_round_trip_and_checks(tmp_path):
    path, params = tmp_path / "c.npz", {"seed": 1, "sizes": [3, 1]}
    assert data.read_array_cache(path, params) == (None, "not found")
    data.write_array_cache(path, sample_arrays(), params)
    arrays, problem = data.read_array_cache(path, params)
    assert problem == "" and all(np.array_equal(arrays[k], v) for k, v in sample_arrays().items())
    assert data.read_array_cache(path, {"seed": 2, "sizes": [3, 1]})[1] == "made with other parameters (stale)"
    assert not list(tmp_path.glob(".*.part"))

    with np.load(path) as npz:
        members = {key: npz[key].copy() for key in npz.files}
    members["images"][1, 2, 3] ^= 1  # one bit
    np.savez(path, **members)
    assert data.read_array_cache(path, params)[1] == "sha256 mismatch in 'images' (damaged)"

    members["images"][1, 2, 3] ^= 1
    meta = json.loads(str(members[data.CACHE_META_KEY]))
    del meta["sha256"]["labels"]
    members[data.CACHE_META_KEY] = np.array(json.dumps(meta))
    np.savez(path, **members)
    assert "its digest lists" in data.read_array_cache(path, params)[1]

    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert data.read_array_cache(path, params)[1].startswith("unreadable")


def test_cached_arrays_builds_once_and_rebuilds_a_bad_cache(tmp_path):
    path, params, builds = tmp_path / "c.npz", {"v": 1}, []

    def build():
        builds.append(1)
        return sample_arrays()

    arrays, note = data.cached_arrays(path, params, build)
    assert note == f"now cached at {path}" and len(builds) == 1
    arrays, note = data.cached_arrays(path, params, build)
    assert note == f"cached at {path} (sha256 verified)" and len(builds) == 1
    with pytest.warns(UserWarning, match="labels look wrong"):
        arrays, note = data.cached_arrays(path, params, build, check=lambda a: "labels look wrong")
    assert len(builds) == 2 and "labels look wrong, rebuilt" in note  # check failure: rebuilt
    path.write_bytes(b"junk")
    with pytest.warns(UserWarning, match=f"cache {path}: unreadable"):
        arrays, note = data.cached_arrays(path, params, build)
    assert len(builds) == 3 and np.array_equal(arrays["labels"], [1, 2, 3])
    with pytest.raises(ValueError, match="reserved"):
        data.write_array_cache(path, {data.CACHE_META_KEY: np.zeros(1)}, params)


def test_a_cache_write_cut_short_leaves_no_temporary_file_behind_the_next_build(tmp_path):
    """A killed cache write (SIGTERM skips the writer's cleanup) leaves a hidden temporary file as large as the
    cache: the next build removes it once nothing has touched it for an hour (a shared data directory may hold
    another machine's write in progress, whose pid means nothing here); other files stay."""
    path = tmp_path / "c.npz"
    dead = 999999  # no such process
    old, recent, other = (tmp_path / name for name in (f".c.npz.{dead}.0a1b2c3d.tmp", f".c.npz.{dead}.1a1b2c3d.tmp",
                                                        f".d.npz.{dead}.0a1b2c3d.tmp"))
    for temp in (old, recent, other):
        temp.write_bytes(b"partial")
    hours_ago = time.time() - 2 * data.STALE_CACHE_WRITE_S
    for temp in (old, other):
        os.utime(temp, (hours_ago, hours_ago))
    with pytest.warns(UserWarning, match=f"removed {old}, left by an interrupted write of the cache"):
        data.cached_arrays(path, {"v": 1}, sample_arrays)
    assert not old.exists() and recent.exists() and other.exists() and path.is_file()
