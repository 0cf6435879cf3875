"""Expected attention's query statistics: the future frame and the running moments."""

from __future__ import annotations

import pytest
import torch

from vllm_plugins.eviction.query_moments import FUTURE_POSITIONS, QueryMoments, future_frame

D = 8


def rope_matrix(angles: torch.Tensor) -> torch.Tensor:
    """(d, d): RoPE's rotation with these (d / 2,) plane angles, planes (i, i + d/2)."""
    half = angles.shape[0]
    matrix = torch.zeros(2 * half, 2 * half, dtype=torch.float64)
    for i, angle in enumerate(angles.double()):
        c, s = torch.cos(angle), torch.sin(angle)
        matrix[i, i], matrix[i, i + half], matrix[i + half, i], matrix[i + half, i + half] = c, -s, s, c
    return matrix


def rope_table(positions: int) -> torch.Tensor:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    return torch.arange(positions).float()[:, None] * inv_freq


def test_the_future_frame_is_the_mean_future_rotation_of_the_query_before_rope():
    """kvpress's construction, with matrices: un-rotate each cached query to its vector
    before RoPE, then apply the mean of RoPE's rotation matrices over the next 512
    positions."""
    angles = rope_table(2000)
    num_prompt = 300
    positions = torch.tensor([4, 17, 150, 299])
    before_rope = torch.randn(3, len(positions), D, dtype=torch.float64)
    rotated = torch.stack([before_rope[:, t] @ rope_matrix(angles[p]).T for t, p in enumerate(positions)], dim=1)
    future = torch.stack([rope_matrix(angles[f]) for f in range(num_prompt, num_prompt + FUTURE_POSITIONS)]).mean(0)
    expected = before_rope @ future.T
    got = future_frame(rotated.float(), positions, angles, num_prompt)
    assert got.dtype == torch.float32 and got.shape == rotated.shape
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_the_future_positions_stop_at_the_end_of_the_rope_table():
    angles = rope_table(310)
    queries = torch.randn(1, 2, D)
    positions = torch.tensor([5, 6])
    cut = future_frame(queries, positions, angles, 300)  # positions 300..309 only
    assert torch.allclose(cut, future_frame(queries, positions, angles[:310], 300))
    with pytest.raises(ValueError, match="before the prompt's end"):
        future_frame(queries, positions, angles[:300], 300)
    with pytest.raises(ValueError, match="planes"):
        future_frame(torch.randn(1, 2, D + 2), positions, angles, 300)


def test_moments_merged_chunk_by_chunk_are_those_of_all_the_vectors_at_once():
    vectors = torch.randn(3, 50, D) * 3 + 10  # a mean far from zero: the merge must not cancel
    moments = QueryMoments.empty(3, D)
    for lo, hi in ((0, 1), (1, 17), (17, 17), (17, 50)):
        moments.add(vectors[:, lo:hi])
    assert moments.count == 50
    assert torch.allclose(moments.mean, vectors.mean(dim=1), atol=1e-5)
    for head in range(3):
        assert torch.allclose(moments.covariance[head], torch.cov(vectors[head].T, correction=0), atol=1e-4)
    assert torch.equal(QueryMoments.empty(2, D).covariance, torch.zeros(2, D, D))
