"""The row-streaming linear kernel that `kernels.gemv` (bf16/fp16 and FP8 weights, 1 to 16 rows) and `kernels.fp8`
(its weight-only fallback for more rows) both launch: y = x @ W.T with optional per-channel FP8 scales, bias, a
gated [gate; up] epilogue, an RMSNorm in front (its weight folded into W) and a residual add.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def dot_rows(x_rows, w_rows, row_ok, n_ok, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              DOT_PRECISION: tl.constexpr, SQUARES: tl.constexpr):
    """[BLOCK_M, BLOCK_N] float32 products of the x rows with the weight rows, and with SQUARES each x row's sum
    of squares [BLOCK_M] (the programs stream their whole x rows anyway: an RMSNorm in front costs no extra reads)."""
    if BLOCK_M == 1:  # one row: partial products stay per lane, one reduction at the end
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        squares = tl.zeros([1, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & (k < K)[None, :], other=0.0).to(tl.float32)
            w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
            acc += w.to(tl.float32) * x
            if SQUARES:
                squares += x * x
        return tl.sum(acc, axis=1)[None, :], tl.sum(squares, axis=1)
    y = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # a few rows: tensor-core dots
    sum_squares = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
        y = tl.dot(x, tl.trans(w.to(x.dtype)), y, input_precision=DOT_PRECISION)
        if SQUARES:
            xf = x.to(tl.float32)
            sum_squares += tl.sum(xf * xf, axis=1)
    return y, sum_squares


@triton.jit
def rms_scale(sum_squares, K, eps, RMS: tl.constexpr):
    """Each row's rsqrt(mean(x²) + eps) from dot_rows' sums of squares (unused without RMS)."""
    if RMS:
        sum_squares = tl.math.rsqrt(sum_squares / K + eps)
    return sum_squares


@triton.jit
def scaled(y, rstd, S, B, n, n_ok, RMS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    if RMS:
        y = y * rstd[:, None]
    if HAS_SCALE:
        y = y * tl.load(S + n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _rows_linear_kernel(X, W, S, B, R, Y, M, N, K, stride_x, stride_w, stride_r, stride_y, eps, HAS_SCALE: tl.constexpr,
                        HAS_BIAS: tl.constexpr, GATED: tl.constexpr, RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """Y = X @ W.T (+ R), or with GATED (W = [gate; up], 2N rows) Y = silu(X @ gate.T) * (X @ up.T). With RMS each X
    row is scaled by rsqrt(mean(x²) + eps) first: an RMSNorm whose weight is folded into W."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n_ok, row_ok = n < N, rows < M
    x_rows = X + rows[:, None] * stride_x
    w_rows = W + n[:, None].to(tl.int64) * stride_w
    y, sum_squares = dot_rows(x_rows, w_rows, row_ok, n_ok, K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, RMS)
    rstd = rms_scale(sum_squares, K, eps, RMS)
    y = scaled(y, rstd, S, B, n, n_ok, RMS, HAS_SCALE, HAS_BIAS)
    if GATED:  # rounded like F.silu(gate) * up on half-precision tensors
        up, _ = dot_rows(x_rows, w_rows + N * stride_w, row_ok, n_ok, K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
                          False)
        up = scaled(up, rstd, S + N, B + N, n, n_ok, RMS, HAS_SCALE, HAS_BIAS).to(Y.dtype.element_ty).to(tl.float32)
        gate = y.to(Y.dtype.element_ty).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate))).to(Y.dtype.element_ty).to(tl.float32) * up
    mask = row_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:  # rounded like the model's `residual + linear(x)` on half-precision tensors
        y = y.to(Y.dtype.element_ty).to(tl.float32)
        y += tl.load(R + rows[:, None] * stride_r + n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + n[None, :], y.to(Y.dtype.element_ty), mask=mask)


def launch_rows_linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None,
                       y: torch.Tensor, config: tuple[int, int, int, int, int], gated: bool = False,
                       rms_eps: float | None = None, residual: torch.Tensor | None = None) -> None:
    """The kernel over all of y [M, N'] (x2 [M, K], y and residual with contiguous rows), tiled (BLOCK_M, BLOCK_N)
    with config = (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); checked by the callers."""
    block_m, block_n, block_k, warps, stages = config
    (M, n_out), K = y.shape, x2.shape[1]
    _rows_linear_kernel[(triton.cdiv(n_out, block_n), triton.cdiv(M, block_m))](
        x2, weight, scale if scale is not None else x2, bias if bias is not None else x2,
        residual if residual is not None else y, y, M, n_out, K, x2.stride(0), weight.stride(0),
        residual.stride(0) if residual is not None else 0, y.stride(0), 0.0 if rms_eps is None else rms_eps,
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, GATED=gated, RMS=rms_eps is not None,
        HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages,
    )
