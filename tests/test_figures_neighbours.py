"""save_samples_with_neighbours in draw/figures.py: layout and that each neighbour sits beside its sample."""

import numpy as np
import pytest
import torch
from PIL import Image

from draw import figures


def test_each_neighbour_sits_right_of_its_sample(tmp_path):
    g = torch.Generator().manual_seed(0)
    samples = torch.rand(5, 3, 4, 6, generator=g)
    neighbours = torch.rand(5, 3, 4, 6, generator=g)
    padding, scale, pairs = 2, 3, 2
    grid = np.asarray(figures.samples_with_neighbours_grid(samples, neighbours, pairs, padding=padding, scale=scale))
    rows, cols, cell_h, cell_w = 3, 2 * pairs, 4 * scale, 6 * scale
    assert grid.shape == (rows * (cell_h + padding) + padding, cols * (cell_w + padding) + padding, 3)

    def cell(row: int, col: int) -> np.ndarray:
        top, left = padding + row * (cell_h + padding), padding + col * (cell_w + padding)
        return grid[top : top + cell_h, left : left + cell_w]

    def pixels(image: torch.Tensor) -> np.ndarray:  # [C, H, W] -> [H*s, W*s, 3] uint8
        x = np.rint(image.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
        return x.repeat(scale, 0).repeat(scale, 1)

    for k in range(5):
        row, pair = divmod(k, pairs)
        assert np.array_equal(cell(row, 2 * pair), pixels(samples[k])), f"sample {k}"
        assert np.array_equal(cell(row, 2 * pair + 1), pixels(neighbours[k])), f"neighbour {k}"

    path = figures.save_samples_with_neighbours(samples[:, :1], neighbours[:, :1], tmp_path / "f" / "nn.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (2 * 3 * (6 * 2 + 2) + 2, 2 * (4 * 2 + 2) + 2)  # ceil(sqrt(5)) = 3 pairs a row
    assert not list((tmp_path / "f").glob(".*"))


def test_shapes_must_match():
    with pytest.raises(ValueError, match="one shape"):
        figures.samples_with_neighbours_grid(torch.rand(4, 1, 5, 5), torch.rand(3, 1, 5, 5))
    with pytest.raises(ValueError, match="pairs_per_row"):
        figures.samples_with_neighbours_grid(torch.rand(4, 1, 5, 5), torch.rand(4, 1, 5, 5), pairs_per_row=0)
