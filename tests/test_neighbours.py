"""Nearest training images (draw/neighbours.py) against a brute-force float64 search."""

import pytest
import torch

from draw.neighbours import as_float64, nearest_neighbours


def brute_force(queries: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every distance in float64, one query at a time; ties to the smallest index."""
    flat = as_float64(pool).flatten(1)
    distances = torch.stack([(flat - q).square().sum(1) for q in as_float64(queries).flatten(1)])  # [Q, N]
    best = distances.argmin(1)
    return best, distances.gather(1, best[:, None])[:, 0].sqrt()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("chunk_size", [7, 64, 10_000])
def test_matches_brute_force(dtype, chunk_size):
    g = torch.Generator().manual_seed(0)
    pool = torch.rand(301, 1, 9, 7, generator=g)
    pool = (pool * 255).round().to(torch.uint8) if dtype == torch.uint8 else pool
    queries = torch.rand(23, 1, 9, 7, generator=g)
    queries[:5] = as_float64(pool[[3, 150, 300, 0, 77]]).float() + 0.01 * torch.randn(5, 1, 9, 7, generator=g)
    index, distance = nearest_neighbours(queries, pool, chunk_size=chunk_size, candidates=4)
    expected_index, expected_distance = brute_force(queries, pool)
    assert index.dtype == torch.int64 and index.shape == (23,) and distance.dtype == torch.float64
    assert torch.equal(index, expected_index)
    assert torch.allclose(distance, expected_distance, rtol=0, atol=1e-12)
    assert index[:5].tolist() == [3, 150, 300, 0, 77]


def test_exact_copies_and_ties_go_to_the_smallest_index():
    pool = torch.rand(50, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    pool[40] = pool[12]  # a duplicate: the first one wins
    index, distance = nearest_neighbours(pool[[12, 5, 49]], pool, chunk_size=16, candidates=2)
    assert index.tolist() == [12, 5, 49] and distance.tolist() == [0.0, 0.0, 0.0]


def test_near_ties_are_resolved_exactly():
    """Distances that differ by less than float32 resolves: the float64 re-ranking picks the right one."""
    pool = torch.full((3, 1, 1, 1000), 0.5, dtype=torch.float64)
    pool[0, 0, 0, 0] += 1e-5  # image 0 is 1e-5 farther from the query than images 1 and 2...
    pool[2, 0, 0, 1] -= 1e-9  # ...and image 2 a hair nearer than image 1
    query = torch.full((1, 1, 1, 1000), 0.5, dtype=torch.float64)
    query[0, 0, 0, 1] -= 1e-9
    assert nearest_neighbours(query, pool, candidates=3)[0].tolist() == [2]


def test_bad_arguments():
    with pytest.raises(ValueError, match="differ in shape"):
        nearest_neighbours(torch.rand(2, 1, 4, 4), torch.rand(5, 1, 4, 5))
    with pytest.raises(ValueError, match="non-empty"):
        nearest_neighbours(torch.rand(2, 4), torch.rand(0, 4))
