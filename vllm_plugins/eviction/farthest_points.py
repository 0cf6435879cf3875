"""Greedy farthest-point (k-center) selection under cosine similarity: the loop behind SCA.

A token's vector comes in pieces (its KV heads' keys), and the similarity of two tokens is
the mean over pieces of the pieces' cosine similarities: the dot product of the pieces,
each normalised and scaled by 1/sqrt(pieces), laid side by side. After the seeds, each
step chooses the token whose similarity to its nearest chosen token is the lowest; equal
similarities go to the earlier token. Each step depends on the one before, so the loop
cannot be batched; this module makes its steps cheap.

Lazy evaluation (Minoux's accelerated greedy, 1978): a vector's similarity to its nearest
chosen vector only grows as vectors are chosen, so a similarity computed against the first
``upto`` chosen vectors is a lower bound of the current one. Candidates wait in a heap
ordered by these bounds. The top candidate is brought up to date against the vectors
chosen since its ``upto``; if it is still on top, no other candidate can be farther, and it
is chosen. The rule is the eager loop's (which updates every candidate at every step), so
the choices are the same up to rounding in the dot products; on the demo model's prompt
keys the lazy loop computes about half of the eager loop's dot products at keep ratios 0.1
and 0.2, two thirds at 0.5. Memory is O(n * d) per row (the joined unit vectors, the
chosen ones, the bounds), never n x n. The loop is compiled with numba (a dependency of
vLLM): its steps are too small for numpy's or torch's per-call overhead. Rows (SCA's
layers) are independent: they are spread over torch's threads
(:func:`~vllm_plugins_kernels.eviction_cpu.run_in_parts`), the loop releasing the GIL.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from vllm_plugins_kernels.eviction_cpu import run_in_parts

_BELOW_ANY_SIMILARITY = np.float32(-2.0)  # a candidate's bound before any vector is chosen
_TINY = np.float32(1e-12)  # a zero piece stays zero rather than dividing by zero
_VECTORISED_SUMS = {"reassoc", "contract"}  # dot products may be reordered; infinities and NaNs keep their meaning


def farthest_points(pieces: np.ndarray, seeds: list[int], num_kept: int) -> np.ndarray:
    """(rows, num_kept) ascending token indices: per row of ``pieces`` (rows, num_pieces,
    n, d), the ``seeds`` and the tokens the greedy rule adds to them, ``num_kept`` in all."""
    pieces = np.ascontiguousarray(pieces, dtype=np.float32)
    rows, num_pieces, _, d = pieces.shape
    loop, seeds = _compiled_loop(num_pieces * d), np.asarray(seeds, dtype=np.int64)
    kept = np.empty((rows, num_kept), np.int64)
    run_in_parts(lambda first, stop: loop(pieces, seeds, num_kept, kept, first, stop), rows)
    return kept


@functools.cache
def _compiled_loop(width: int):
    """The loop over (n, ``width``) joined vectors, compiled for that width. A width known
    when compiling lets the compiler unroll the dot products and hold the candidate in
    registers: the loop is about 15% faster at width 64 than with the width read at run
    time. Numba caches each width's code on disk like any other."""

    @numba.njit(cache=True, fastmath=_VECTORISED_SUMS)
    def nearest_similarity(vector, chosen, start, stop, similarity):
        """max(similarity, the largest dot product of ``vector`` with chosen[start:stop]),
        four chosen vectors at a time."""
        c = start
        while c + 4 <= stop:
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for i in range(width):
                x = vector[i]
                s0 += x * chosen[c, i]
                s1 += x * chosen[c + 1, i]
                s2 += x * chosen[c + 2, i]
                s3 += x * chosen[c + 3, i]
            similarity = max(similarity, max(max(s0, s1), max(s2, s3)))
            c += 4
        for c in range(c, stop):
            s = np.float32(0.0)
            for i in range(width):
                s += vector[i] * chosen[c, i]
            similarity = max(similarity, s)
        return similarity

    @numba.njit(cache=True)
    def choose(vectors, seeds, num_kept):
        """Ascending indices of the ``seeds`` and of the vectors the lazy greedy loop adds
        to them, ``num_kept`` in all."""
        n = vectors.shape[0]
        chosen = np.empty((num_kept, width), np.float32)  # the chosen vectors, in the order chosen
        is_chosen = np.zeros(n, np.bool_)
        for count, seed in enumerate(seeds):
            chosen[count] = vectors[seed]
            is_chosen[seed] = True
        count = len(seeds)
        # the candidates' heap: index, and similarity to the nearest of chosen[:upto[index]]
        index = np.flatnonzero(~is_chosen)
        bound = np.empty(len(index), np.float32)
        for i in range(len(index)):
            bound[i] = nearest_similarity(vectors[index[i]], chosen, 0, count, _BELOW_ANY_SIMILARITY)
        upto = np.full(n, count, np.int64)
        size = len(index)
        for i in range(size // 2 - 1, -1, -1):
            _sift_down(index, bound, size, i)
        while count < num_kept:
            top = index[0]
            if upto[top] == count:
                is_chosen[top] = True
                chosen[count] = vectors[top]
                count += 1
                size -= 1
                index[0], bound[0] = index[size], bound[size]
            else:
                bound[0] = nearest_similarity(vectors[top], chosen, upto[top], count, bound[0])
                upto[top] = count
            _sift_down(index, bound, size, 0)
        return np.flatnonzero(is_chosen)

    @numba.njit(cache=True, nogil=True)
    def choose_rows(pieces, seeds, num_kept, kept, first, stop):
        """Rows [first, stop) of ``kept``, chosen from the same rows of ``pieces``."""
        for row in range(first, stop):
            kept[row] = choose(_joined_unit_pieces(pieces[row]), seeds, num_kept)

    return choose_rows


@numba.njit(cache=True, fastmath=_VECTORISED_SUMS)
def _joined_unit_pieces(pieces):
    """(n, num_pieces * d): per token, its pieces normalised, scaled by 1/sqrt(num_pieces)
    and laid side by side, so that dot products are means of the pieces' cosines."""
    num_pieces, n, d = pieces.shape
    joined = np.empty((n, num_pieces * d), np.float32)
    scale = np.float32(1.0 / np.sqrt(num_pieces))
    for p in range(num_pieces):
        for t in range(n):
            piece = pieces[p, t]
            squares = np.float32(0.0)
            for i in range(d):
                squares += piece[i] * piece[i]
            factor = scale / max(np.sqrt(squares), _TINY)
            for i in range(d):
                joined[t, p * d + i] = piece[i] * factor
    return joined


@numba.njit(cache=True, inline="always")
def _before(index, bound, a, b):
    """Whether heap entry ``a`` comes before ``b``: a lower similarity, or an equal one and
    an earlier vector."""
    return bound[a] < bound[b] or (bound[a] == bound[b] and index[a] < index[b])


@numba.njit(cache=True)
def _sift_down(index, bound, size, i):
    """Move heap entry ``i`` down to its place."""
    while True:
        child = 2 * i + 1
        if child >= size:
            return
        if child + 1 < size and _before(index, bound, child + 1, child):
            child += 1
        if not _before(index, bound, child, i):
            return
        index[i], index[child] = index[child], index[i]
        bound[i], bound[child] = bound[child], bound[i]
        i = child
