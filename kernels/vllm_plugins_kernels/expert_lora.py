"""MiLoRA's chosen LoRA experts, applied to a batch whose requests chose different experts.

For one linear module, each token either has an expert (a slot of the stacked weights) or
none (slot -1). With x_t the module input and p_t the token's router probability times
the expert's alpha / r (MiLoRA Sec. 3.2: an active expert adds p_e (alpha / r) B_e A_e x):

    out[index[t], start : start + out_features] += p_t * B[slot_t] (A[slot_t] x_t)

as two launches, shrink (x -> rank) and expand (rank -> out), as Punica's and vLLM's LoRA
kernels do. Tokens with slot -1 are left alone.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def expert_lora_torch(out, x, index, slots, scales, lora_a, lora_b, start: int) -> None:
    chosen = slots >= 0
    index, slots, scales = index[chosen], slots[chosen], scales[chosen]
    shrunk = torch.einsum("ti,tri->tr", x[index], lora_a[slots])
    delta = torch.einsum("tr,tor->to", shrunk, lora_b[slots]) * scales[:, None]
    out[index, start : start + lora_b.shape[1]] += delta.to(out.dtype)


@triton.jit
def _shrink_kernel(
    x_ptr, x_stride, index_ptr, slots_ptr, a_ptr, a_slot_stride, a_rank_stride, shrunk_ptr,
    in_features, rank,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per (token, slice of the input features): a partial A x, added up in
    float32 across the slices."""
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot >= 0:
        token = tl.load(index_ptr + t).to(tl.int64)
        r = tl.arange(0, BLOCK_R)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = k < in_features
        x = tl.load(x_ptr + token * x_stride + k, mask=k_mask, other=0.0).to(tl.float32)
        a = tl.load(
            a_ptr + slot * a_slot_stride + r[:, None] * a_rank_stride + k[None, :],
            mask=(r[:, None] < rank) & k_mask[None, :], other=0.0,
        ).to(tl.float32)
        tl.atomic_add(shrunk_ptr + t * BLOCK_R + r, tl.sum(a * x[None, :], axis=1), mask=r < rank)


@triton.jit
def _expand_kernel(
    out_ptr, out_stride, index_ptr, slots_ptr, scales_ptr, b_ptr, b_slot_stride, b_out_stride, shrunk_ptr,
    out_features, rank, start,
    BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot >= 0:
        token = tl.load(index_ptr + t).to(tl.int64)
        r = tl.arange(0, BLOCK_R)
        o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        o_mask = o < out_features
        shrunk = tl.load(shrunk_ptr + t * BLOCK_R + r)
        b = tl.load(
            b_ptr + slot * b_slot_stride + o[:, None] * b_out_stride + r[None, :],
            mask=o_mask[:, None] & (r[None, :] < rank), other=0.0,
        ).to(tl.float32)
        delta = tl.sum(b * shrunk[None, :], axis=1) * tl.load(scales_ptr + t).to(tl.float32)
        out_ptrs = out_ptr + token * out_stride + start + o
        acc = tl.load(out_ptrs, mask=o_mask).to(tl.float32) + delta
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


SHRINK_BLOCK = 512
EXPAND_BLOCK = 256


def expert_lora_triton(out, x, index, slots, scales, lora_a, lora_b, start: int) -> None:
    if out.stride(1) != 1 or x.stride(1) != 1 or lora_a.stride(2) != 1 or lora_b.stride(2) != 1:
        raise ValueError("out, x and the expert weights need a contiguous last dimension")
    if any(v.stride(0) != 1 for v in (index, slots, scales) if v.numel() > 1):
        raise ValueError("index, slots and scales need to be contiguous")
    tokens = index.numel()
    if tokens == 0:
        return
    _, rank, in_features = lora_a.shape
    out_features = lora_b.shape[1]
    block_r = max(2, triton.next_power_of_2(rank))
    shrunk = torch.zeros(tokens, block_r, dtype=torch.float32, device=x.device)
    _shrink_kernel[(tokens, triton.cdiv(in_features, SHRINK_BLOCK))](
        x, x.stride(0), index, slots, lora_a, lora_a.stride(0), lora_a.stride(1), shrunk,
        in_features, rank,
        BLOCK_R=block_r, BLOCK_K=SHRINK_BLOCK,
    )
    _expand_kernel[(tokens, triton.cdiv(out_features, EXPAND_BLOCK))](
        out, out.stride(0), index, slots, scales, lora_b, lora_b.stride(0), lora_b.stride(1), shrunk,
        out_features, rank, start,
        BLOCK_R=block_r, BLOCK_O=EXPAND_BLOCK,
    )


def expert_lora_(out, x, index, slots, scales, lora_a, lora_b, start: int) -> None:
    """Add each token's expert delta to ``out`` in place.

    out: (tokens, columns); x: (tokens, in_features); index, slots, scales: (A,) the
    adapted tokens, their expert's slot (-1: none) and p_t; lora_a: (slots, rank,
    in_features); lora_b: (slots, out_features, rank); start: the module's first column
    of ``out``.
    """
    impl = expert_lora_triton if out.is_cuda else expert_lora_torch
    impl(out, x, index, slots, scales, lora_a, lora_b, start)
