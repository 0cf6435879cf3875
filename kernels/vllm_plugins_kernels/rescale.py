"""PARA's per-request rescaling of a fused projection output, in one pass.

PARA (Sec. 3.2) rescales Q' = l_q * Q, V' = l_v * V and U' = l_u * U with vectors computed
once per request. In vLLM, Q and V are two column ranges of the fused qkv output and U one
range of the fused gate/up output, so one call covers a whole site: up to two column
segments of ``out``, each multiplied by that token's request's slice of ``scales``.

A token whose row is -1 is left alone, so a caller may pass every token of a step with
fixed shapes (what a captured CUDA graph needs) and mark the others -1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

Segments = tuple[tuple[int, int], ...]
"""(first column, width) of each rescaled range of ``out``; ``scales`` holds them in order."""


def rescale_columns_torch(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, scales: torch.Tensor, segments: Segments) -> None:
    """out[index[t], segment] *= scales[rows[t], the segment's part], in place, where rows[t] >= 0."""
    acted = rows >= 0
    index, rows = index[acted], rows[acted]
    offset = 0
    for start, width in segments:
        out[index, start : start + width] *= scales[rows, offset : offset + width]
        offset += width


@triton.jit
def _rescale_kernel(
    out_ptr, out_stride, index_ptr, rows_ptr, scales_ptr, scales_stride,
    width, width_a, start_a, start_b,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    token = tl.load(index_ptr + t).to(tl.int64)
    row = tl.load(rows_ptr + t).to(tl.int64)
    if row >= 0:
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = c < width
        column = tl.where(c < width_a, start_a + c, start_b + c - width_a)
        out_ptrs = out_ptr + token * out_stride + column
        scale = tl.load(scales_ptr + row * scales_stride + c, mask=mask)
        value = tl.load(out_ptrs, mask=mask)
        tl.store(out_ptrs, (value.to(tl.float32) * scale.to(tl.float32)).to(value.dtype), mask=mask)


def rescale_columns_triton(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, scales: torch.Tensor, segments: Segments) -> None:
    if not 1 <= len(segments) <= 2:
        raise ValueError(f"one or two column segments, not {len(segments)}")
    if out.stride(1) != 1 or scales.stride(1) != 1:
        raise ValueError("out and scales need contiguous rows")
    (start_a, width_a), (start_b, _) = segments[0], segments[-1]
    width = sum(w for _, w in segments)
    if scales.shape[1] != width:
        raise ValueError(f"scales has {scales.shape[1]} columns for segments of {width}")
    if index.numel() == 0:
        return
    block = 1024
    grid = (index.numel(), triton.cdiv(width, block))
    _rescale_kernel[grid](
        out, out.stride(0), index, rows, scales, scales.stride(0),
        width, width_a, start_a, start_b,
        BLOCK=block, num_warps=4,
    )


def rescale_columns_(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, scales: torch.Tensor, segments: Segments) -> None:
    """Rescale ``segments`` of rows ``index`` of ``out`` by ``scales[rows]`` in place.

    out: (tokens, columns); index, rows: (A,) the adapted tokens and their request's row
    of scales: (requests, sum of segment widths); a row of -1 leaves its token alone.
    """
    impl = rescale_columns_triton if out.is_cuda else rescale_columns_torch
    impl(out, index, rows, scales, segments)
