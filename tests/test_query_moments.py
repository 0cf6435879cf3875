"""Expected attention's query statistics: the future frame and the running moments."""

from __future__ import annotations

import pytest
import torch

from vllm_plugins.eviction.query_moments import FUTURE_POSITIONS, QueryMoments, RopeTable, future_frame

D = 8


def rope_matrix(angles: torch.Tensor, d: int = D, interleaved: bool = False) -> torch.Tensor:
    """(d, d): RoPE's rotation with these (planes,) angles, plane i on dimensions (i, i +
    planes), or (2i, 2i + 1) interleaved; the dimensions after 2 x planes unrotated."""
    planes = angles.shape[0]
    matrix = torch.eye(d, dtype=torch.float64)
    for i, angle in enumerate(angles.double()):
        x, y = (2 * i, 2 * i + 1) if interleaved else (i, i + planes)
        c, s = torch.cos(angle), torch.sin(angle)
        matrix[x, x], matrix[x, y], matrix[y, x], matrix[y, y] = c, -s, s, c
    return matrix


def rope_angles(positions: int, planes: int = D // 2) -> torch.Tensor:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 2 * planes, 2).float() / (2 * planes))
    return torch.arange(positions).float()[:, None] * inv_freq


@pytest.mark.parametrize("interleaved, planes", [(False, D // 2), (True, D // 2), (False, D // 4), (True, D // 4)])
def test_the_future_frame_is_the_mean_future_rotation_of_the_query_before_rope(interleaved, planes):
    """kvpress's construction, with matrices: un-rotate each cached query to its vector
    before RoPE, then apply the mean of RoPE's rotation matrices over the next 512
    positions; for both of vLLM's layouts, and partial rotary embeddings."""
    rope = RopeTable(rope_angles(2000, planes), interleaved)
    num_prompt = 300
    positions = torch.tensor([4, 17, 150, 299])
    before_rope = torch.randn(3, len(positions), D, dtype=torch.float64)
    rotation = [rope_matrix(rope.angles[p], interleaved=interleaved) for p in positions]
    rotated = torch.stack([before_rope[:, t] @ rotation[t].T for t in range(len(positions))], dim=1)
    future = torch.stack([rope_matrix(rope.angles[f], interleaved=interleaved)
                          for f in range(num_prompt, num_prompt + FUTURE_POSITIONS)]).mean(0)
    expected = before_rope @ future.T
    got = future_frame(rotated.float(), positions, rope, num_prompt)
    assert got.dtype == torch.float32 and got.shape == rotated.shape
    assert torch.allclose(got.double(), expected, atol=1e-5)
    if 2 * planes < D:
        assert torch.allclose(got[..., 2 * planes :].double(), before_rope[..., 2 * planes :], atol=1e-6)


def test_the_future_positions_stop_at_the_end_of_the_rope_table():
    """A prompt near or at the table's end averages over what the table holds (its last
    position alone at the end): never an error inside the worker."""
    angles = rope_angles(310)
    queries = torch.randn(1, 2, D)
    positions = torch.tensor([5, 6])
    cut = future_frame(queries, positions, RopeTable(angles), 300)  # positions 300..309 only
    expected_cut = RopeTable(angles[:310])
    assert torch.allclose(cut, future_frame(queries, positions, expected_cut, 300))
    at_end = future_frame(queries, positions, RopeTable(angles), 310)
    assert torch.allclose(at_end, future_frame(queries, positions, RopeTable(angles), 309))
    assert torch.allclose(at_end, future_frame(queries, positions, RopeTable(angles[:310]), 309))
    with pytest.raises(ValueError, match="planes"):
        future_frame(torch.randn(1, 2, D - 2), positions, RopeTable(angles), 300)


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


def test_moments_of_several_layers_join_head_by_head():
    parts = [QueryMoments.empty(2, D), QueryMoments.empty(3, D)]
    vectors = [torch.randn(2, 7, D), torch.randn(3, 7, D)]
    for part, v in zip(parts, vectors):
        part.add(v)
    joined = QueryMoments.concat(parts)
    alone = QueryMoments.empty(5, D)
    alone.add(torch.cat(vectors))
    assert joined.count == 7 and torch.allclose(joined.mean, alone.mean) and torch.allclose(joined.covariance, alone.covariance, atol=1e-6)
    parts[0].add(torch.randn(2, 1, D))
    with pytest.raises(ValueError, match="cannot be joined"):
        QueryMoments.concat(parts)
