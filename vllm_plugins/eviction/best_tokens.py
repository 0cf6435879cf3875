"""Per row, the protected tokens and the best-scored others: the selection behind
:func:`~vllm_plugins.eviction.policies.base.keep_best`, compiled for CPU tensors.

The rule is ``keep_best``'s, on the same unique integer keys: a token's float32 score
mapped to an order-preserving integer, times 2**32, plus a tie-breaker that favours
earlier tokens; a protected token's key is above every score's. With unique keys the
``num_kept`` best are exactly those at or above the ``num_kept``-th largest key, found by
one partition per row; scanning the row then lists them in ascending order. On the CPU
worker this is one call where the torch formulation takes about fifteen small operations,
each costing more in dispatch than in arithmetic, while the whole batch waits.
"""

from __future__ import annotations

import numba
import numpy as np

from vllm_plugins.eviction.policies.base import NEGATIVE_BITS, PROTECTED, TIE_RANGE


def best_tokens(scores: np.ndarray, protected: np.ndarray, num_kept: int) -> np.ndarray:
    """(rows, num_kept) ascending token indices. ``scores``: (rows, n) float32 without NaN;
    ``protected``: token indices, most important first, at most ``num_kept``;
    0 <= num_kept <= n (:func:`~vllm_plugins.eviction.policies.base.keep_best` checks)."""
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    if num_kept == 0:
        return np.empty((scores.shape[0], 0), np.int64)
    # the keys' constants are arguments, not globals: numba's on-disk cache would keep
    # globals of another module as they were when it compiled
    return _best_tokens(scores, protected.astype(np.int64), num_kept, NEGATIVE_BITS, TIE_RANGE, PROTECTED)


@numba.njit(cache=True)
def _best_tokens(scores, protected, num_kept, negative_bits, tie_range, protected_key):
    rows, n = scores.shape
    bits = (scores + np.float32(0.0)).view(np.int32)  # + 0.0: -0.0 ties with 0.0
    keys = np.empty(n, np.int64)
    kept = np.empty((rows, num_kept), np.int64)
    for r in range(rows):
        for j in range(n):
            b = np.int64(bits[r, j])
            keys[j] = (negative_bits - b if b < 0 else b) * tie_range + (n - 1 - j)
        for rank in range(len(protected)):
            keys[protected[rank]] = protected_key - rank
        threshold = np.partition(keys, n - num_kept)[n - num_kept]
        count = 0
        for j in range(n):
            if keys[j] >= threshold:
                kept[r, count] = j
                count += 1
    return kept
