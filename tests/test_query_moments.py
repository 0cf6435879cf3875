"""Expected attention's query statistics: the future frame and the running moments."""

from __future__ import annotations

import pytest
import torch

from vllm_plugins.eviction.query_moments import FUTURE_POSITIONS, FutureFrame, QueryMoments, RopeTable

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


def by_matrices(before_rope: torch.Tensor, futures: range, angles: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """kvpress's construction: the mean of RoPE's rotation matrices over ``futures``
    applied to each query before RoPE; float64."""
    mean = torch.stack([rope_matrix(angles[f], interleaved=interleaved) for f in futures]).mean(0)
    return before_rope @ mean.T


def rotate(before_rope: torch.Tensor, positions: torch.Tensor, angles: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """(heads, t, D): each query as RoPE caches it at its position."""
    return torch.stack([before_rope[:, t] @ rope_matrix(angles[p], interleaved=interleaved).T
                        for t, p in enumerate(positions)], dim=1).float()


@pytest.mark.parametrize("interleaved, planes", [(False, D // 2), (True, D // 2), (False, D // 4), (True, D // 4)])
def test_the_future_frame_is_the_mean_future_rotation_of_the_query_before_rope(interleaved, planes):
    """Un-rotating each cached query to its vector before RoPE, then applying the mean of
    RoPE's rotation matrices over the next 512 positions, for both of vLLM's layouts and
    partial rotary embeddings."""
    angles = rope_angles(2000, planes)
    rope = RopeTable.from_angles(angles, interleaved)
    num_prompt, positions = 300, torch.tensor([4, 17, 150, 299])
    before_rope = torch.randn(3, len(positions), D, dtype=torch.float64)
    rotated = rotate(before_rope, positions, angles, interleaved)
    got = FutureFrame(rope, positions, num_prompt)(rotated)
    assert got.dtype == torch.float32 and got.shape == before_rope.shape
    # the worker hands it a transposed view of its capture buffer: read as it lies, same values, contiguous out
    token_major = rotated.transpose(0, 1).contiguous().transpose(0, 1)
    from_view = FutureFrame(rope, positions, num_prompt)(token_major)
    assert not token_major.is_contiguous() and from_view.is_contiguous() and torch.equal(from_view, got)
    assert torch.allclose(got.double(), by_matrices(before_rope, range(num_prompt, num_prompt + FUTURE_POSITIONS), angles, interleaved), atol=1e-5)
    if 2 * planes < D:
        assert torch.allclose(got[..., 2 * planes :].double(), before_rope[..., 2 * planes :], atol=1e-6)


def test_the_future_positions_stop_at_the_end_of_the_rope_table():
    """A prompt near or at the table's end averages over what the table holds (its last
    position alone at the end): never an error inside the worker."""
    angles = rope_angles(310)
    rope = RopeTable.from_angles(angles)
    positions = torch.tensor([5, 6])
    before_rope = torch.randn(1, 2, D, dtype=torch.float64)
    rotated = rotate(before_rope, positions, angles)
    near_end = FutureFrame(rope, positions, 300)(rotated)
    assert torch.allclose(near_end.double(), by_matrices(before_rope, range(300, 310), angles), atol=1e-5)
    at_end = FutureFrame(rope, positions, 310)(rotated)
    assert torch.allclose(at_end.double(), by_matrices(before_rope, range(309, 310), angles), atol=1e-5)
    with pytest.raises(ValueError, match="planes"):
        FutureFrame(rope, positions, 300)(torch.randn(1, 2, D - 2))


def test_a_table_of_scaled_cosines_and_sines_is_the_table_of_their_angles():
    """vLLM's and transformers' tables may carry a common scale (YaRN's): it drops out."""
    angles = rope_angles(64)
    scaled = RopeTable.from_cos_sin(1.3 * angles.cos(), 1.3 * angles.sin(), interleaved=True)
    plain = RopeTable.from_angles(angles, interleaved=True)
    assert scaled.interleaved and torch.allclose(scaled.cos, plain.cos, atol=1e-6) and torch.allclose(scaled.sin, plain.sin, atol=1e-6)


def test_moments_merged_chunk_by_chunk_are_those_of_all_the_vectors_at_once():
    vectors = torch.randn(3, 50, D) * 3 + 10  # a mean far from zero: the merge must not cancel
    moments = QueryMoments.empty(3, D)
    for lo, hi in ((0, 1), (1, 17), (17, 17), (17, 50)):
        moments.add(vectors[:, lo:hi])
    assert moments.count.tolist() == [50] * 3
    assert torch.allclose(moments.mean, vectors.mean(dim=1), atol=1e-5)
    for head in range(3):
        assert torch.allclose(moments.covariance[head], torch.cov(vectors[head].T, correction=0), atol=1e-4)
    assert torch.equal(QueryMoments.empty(2, D).covariance, torch.zeros(2, D, D))


def test_heads_merged_in_groups_are_those_merged_at_once():
    """The worker folds a chunk a few layers at a time: each group of heads keeps its
    own count, and the result equals one merge of every head."""
    vectors = torch.randn(5, 9, D)
    grouped, at_once = QueryMoments.empty(5, D), QueryMoments.empty(5, D)
    at_once.add(vectors[:, :4])
    at_once.add(vectors[:, 4:])
    for chunk in (slice(0, 4), slice(4, 9)):
        grouped.add(vectors[:2, chunk], slice(0, 2))
        grouped.add(vectors[2:, chunk], slice(2, 5))
    assert grouped.count.tolist() == [9] * 5
    assert torch.allclose(grouped.mean, at_once.mean) and torch.allclose(grouped.covariance, at_once.covariance, atol=1e-6)
    grouped.add(vectors[:1, :3], slice(0, 1))
    assert grouped.count.tolist() == [12, 9, 9, 9, 9]
    assert torch.allclose(grouped.covariance[0], torch.cov(torch.cat([vectors[0], vectors[0, :3]]).T, correction=0), atol=1e-5)
