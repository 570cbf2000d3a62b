"""A one-row decode step's attention input in one kernel: RMSNorm (weight folded into the matrix), the fused q/k/v
projection, RoPE on q and k, and the KV-cache write.

Each program computes whole rotary pairs: rows head * D + j and head * D + j + D/2 of the q/k part of the matrix
(the halves that `rotate_half` mixes), or a block of v rows. The projection is rounded to the activations' dtype
before the rotation, as `linear` followed by `rope_kv_write` rounds it, so both paths give the same values.
"""

import torch
import triton
import triton.language as tl

from kernels.gemv import linear_reference
from kernels.rope import rope_kv_write_reference
from kernels.rows_linear import dot_rows, rms_scale, scaled

BLOCK_PAIRS = 2  # rotary pairs per program (4 weight rows); value programs take as many rows
BLOCK_V = 4


@triton.jit
def _dot_one_row(x_row, W, rows, ok, K, stride_w, SQUARES: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """([1, BLOCK] float32 products of the weight rows `rows` with the x row, its sum of squares [1] with SQUARES)."""
    return dot_rows(x_row, W + rows[:, None].to(tl.int64) * stride_w, tl.arange(0, 1) < 1, ok, K, 1, BLOCK, BLOCK_K,
                     "ieee", SQUARES)


@triton.jit
def _rotary_pairs(x_row, W, Bias, Cos, Sin, QOut, KCache, pid, pos, slot, write, K, stride_w, stride_cos, skc_n, skc_h,
                  skc_s, eps, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr,
                  RMS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    HALF: tl.constexpr = D // 2
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    head, j = p // HALF, p % HALF
    row_a = head * D + j
    ok = head < HQ + HKV
    a, sum_squares = _dot_one_row(x_row, W, row_a, ok, K, stride_w, RMS, BLOCK_P, BLOCK_K)
    b, _ = _dot_one_row(x_row, W, row_a + HALF, ok, K, stride_w, False, BLOCK_P, BLOCK_K)
    rstd = rms_scale(sum_squares, K, eps, RMS)
    ty = QOut.dtype.element_ty  # the projection is rounded before the rotation, as linear -> rope_kv_write does
    a = scaled(a, rstd, Bias, Bias, row_a, ok, RMS, False, HAS_BIAS).to(ty).to(tl.float32)
    b = scaled(b, rstd, Bias, Bias, row_a + HALF, ok, RMS, False, HAS_BIAS).to(ty).to(tl.float32)
    rot = tl.maximum(pos, 0)[None, :]  # a position the cache cannot hold is not rotated (nor written)
    c = tl.load(Cos + rot * stride_cos + j[None, :], mask=write, other=1.0).to(tl.float32)
    s = tl.load(Sin + rot * stride_cos + j[None, :], mask=write, other=0.0).to(tl.float32)
    rotated_a, rotated_b = a * c - b * s, b * c + a * s
    is_q = (head < HQ)[None, :]
    tl.store(QOut + row_a[None, :], rotated_a.to(ty), mask=is_q)
    tl.store(QOut + row_a[None, :] + HALF, rotated_b.to(ty), mask=is_q)
    k_ptr = KCache + slot * skc_n + (head - HQ)[None, :].to(tl.int64) * skc_h + pos[None, :] * skc_s + j[None, :]
    k_mask = (head >= HQ)[None, :] & ok[None, :] & write
    tl.store(k_ptr, rotated_a.to(KCache.dtype.element_ty), mask=k_mask)
    tl.store(k_ptr + HALF, rotated_b.to(KCache.dtype.element_ty), mask=k_mask)


@triton.jit
def _value_rows(x_row, W, Bias, VCache, block, pos, slot, write, K, stride_w, svc_n, svc_h, svc_s, eps,
                HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    r = block * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = r < HKV * D
    row = (HQ + HKV) * D + r
    v, sum_squares = _dot_one_row(x_row, W, row, ok, K, stride_w, RMS, BLOCK_V, BLOCK_K)
    v = scaled(v, rms_scale(sum_squares, K, eps, RMS), Bias, Bias, row, ok, RMS, False, HAS_BIAS)
    v_ptr = VCache + slot * svc_n + (r // D)[None, :].to(tl.int64) * svc_h + pos[None, :] * svc_s + (r % D)[None, :]
    tl.store(v_ptr, v.to(VCache.dtype.element_ty), mask=ok[None, :] & write)


@triton.jit
def _qkv_rope_kernel(X, W, Bias, Cos, Sin, Pos, Slots, QOut, KCache, VCache,
                     K, stride_w, stride_cos, skc_n, skc_h, skc_s, svc_n, svc_h, svc_s, S_max, eps,
                     HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    pos = tl.load(Pos + tl.zeros([1], tl.int32))  # [1]: masks combine with it like any other vector
    slot = tl.load(Slots).to(tl.int64)
    write = ((pos >= 0) & (pos < S_max))[None, :]  # a negative position is padding: nothing written
    x_row = X + tl.zeros([1, 1], tl.int64)
    pair_programs = (HQ + HKV) * (D // 2) // BLOCK_P
    if pid < pair_programs:
        _rotary_pairs(x_row, W, Bias, Cos, Sin, QOut, KCache, pid, pos, slot, write, K, stride_w, stride_cos, skc_n,
                      skc_h, skc_s, eps, HQ, HKV, D, HAS_BIAS, RMS, BLOCK_P, BLOCK_K)
    else:
        _value_rows(x_row, W, Bias, VCache, pid - pair_programs, pos, slot, write, K, stride_w, svc_n, svc_h, svc_s,
                    eps, HQ, HKV, D, HAS_BIAS, RMS, BLOCK_V, BLOCK_K)


def _check(x, weight, bias, n_heads, n_kv_heads, cos, positions, slots, k_cache):
    D = k_cache.shape[-1]
    if x.numel() != x.shape[-1] or positions.numel() != 1 or slots.numel() != 1:
        raise ValueError(f"qkv_rope: one row only, got x {tuple(x.shape)}, positions {tuple(positions.shape)}")
    if weight.shape != ((n_heads + 2 * n_kv_heads) * D, x.shape[-1]) or weight.stride(1) != 1:
        raise ValueError(f"qkv_rope: weight {tuple(weight.shape)} must be [(q + k + v heads) * {D}, {x.shape[-1]}] "
                         "with contiguous rows")
    if D % 2 or k_cache.shape[1] != n_kv_heads:
        raise ValueError(f"qkv_rope: cache {tuple(k_cache.shape)} "
                         f"must be [n_slots, {n_kv_heads}, S_max, even head dim]")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"qkv_rope: bias {tuple(bias.shape)} must be [{weight.shape[0]}]")
    if cos.dim() != 2 or cos.shape[1] < D // 2 or cos.stride(1) != 1:
        raise ValueError(f"qkv_rope: cos/sin {tuple(cos.shape)} must be [S, >= {D // 2}] with contiguous rows")


def qkv_rope_write_reference(x, weight, bias, rms_eps, n_heads, n_kv_heads, cos, sin, positions, slots, k_cache,
                             v_cache) -> torch.Tensor:
    _check(x, weight, bias, n_heads, n_kv_heads, cos, positions, slots, k_cache)
    D = k_cache.shape[-1]
    qkv = linear_reference(x.reshape(1, 1, -1), weight, bias, rms_eps=rms_eps)
    q, k, v = qkv.split([n_heads * D, n_kv_heads * D, n_kv_heads * D], dim=-1)
    return rope_kv_write_reference(q.view(1, 1, n_heads, D), k.view(1, 1, n_kv_heads, D), v.view(1, 1, n_kv_heads, D),
                                   cos, sin, positions.view(1, 1), slots.view(1), k_cache, v_cache)


def qkv_rope_write_triton(x, weight, bias, rms_eps, n_heads, n_kv_heads, cos, sin, positions, slots, k_cache,
                          v_cache) -> torch.Tensor:
    _check(x, weight, bias, n_heads, n_kv_heads, cos, positions, slots, k_cache)
    D, K = k_cache.shape[-1], x.shape[-1]
    if cos.stride() != sin.stride() or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("qkv_rope: cos and sin, and the two caches, must have the same strides (contiguous rows)")
    x = x.reshape(1, K).contiguous()
    q = torch.empty(1, 1, n_heads, D, device=x.device, dtype=x.dtype)
    block_p = BLOCK_PAIRS if (D // 2) % BLOCK_PAIRS == 0 else 1
    grid = (n_heads + n_kv_heads) * (D // 2) // block_p + triton.cdiv(n_kv_heads * D, BLOCK_V)
    _qkv_rope_kernel[(grid,)](
        x, weight, bias if bias is not None else x, cos, sin, positions, slots, q, k_cache, v_cache,
        K, weight.stride(0), cos.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3], k_cache.shape[2],
        0.0 if rms_eps is None else rms_eps, HQ=n_heads, HKV=n_kv_heads, D=D, HAS_BIAS=bias is not None,
        RMS=rms_eps is not None, BLOCK_P=block_p, BLOCK_V=BLOCK_V, BLOCK_K=min(1024, triton.next_power_of_2(K)),
        num_warps=4, num_stages=1,
    )
    return q


def qkv_rope_write(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rms_eps: float | None,
                   n_heads: int, n_kv_heads: int, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """One token (x [1, 1, dim]) at positions [1, 1] of slots [1]: returns rope(q) [1, 1, n_heads, D] and writes
    rope(k) and v into the caches [n_slots, n_kv_heads, S_max, D]. weight [(n_heads + 2 n_kv_heads) D, dim]: q, k, v
    stacked (bf16/fp16); rms_eps: x goes through an RMSNorm first (its weight folded into `weight`); cos, sin
    [S, >= D/2] float32 rotary tables."""
    impl = qkv_rope_write_triton if x.is_cuda else qkv_rope_write_reference
    return impl(x, weight, bias, rms_eps, n_heads, n_kv_heads, cos, sin, positions, slots, k_cache, v_cache)
