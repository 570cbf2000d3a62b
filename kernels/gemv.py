"""y = x @ W.T (+ bias) for 1 to 16 rows of x: the decode and verify steps' linear layers.

With few rows a linear layer only streams its weight matrix, and cuBLAS leaves much of the memory
bandwidth unused on the smaller matrices (benchmarks/RESULTS.md, kernel tables). One Triton kernel
covers those shapes, for bf16/fp16 weights and for FP8 (e4m3) weights with one float32 scale per
output channel, converted in registers (weight-only FP8: the step reads half the bytes, and no
activation quantization kernel runs). One row multiplies and adds in registers; 2 to 16 rows use
tensor-core dots. `linear` sends plain bf16 weights with 2 to 16 rows to cuBLAS, which matched the
kernel there, and FP8 weights with more than 16 rows to `kernels.fp8`. `gated_linear` computes the
MLP's silu(gate) * up in the kernel's epilogue, saving the SiLU and multiply kernels of every layer.
Both take an RMSNorm to run in front (its weight folded into the matrix: the kernel accumulates the
row's sum of squares while it streams x) and `linear` a residual to add in the epilogue.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.rmsnorm import add_rmsnorm

MAX_ROWS = 16


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     scale: torch.Tensor | None = None, rms_eps: float | None = None,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
    if rms_eps is not None:
        x = add_rmsnorm(x, None, None, rms_eps)[0]
    if scale is None:
        y = F.linear(x, weight, bias)
    else:
        y = x.float() @ (weight.float() * scale[:, None]).t()
        y = (y if bias is None else y + bias.float()).to(x.dtype)
    return y if residual is None else y + residual


@triton.jit
def _dot_rows(x_rows, w_rows, row_ok, n_ok, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
def _rms_scale(sum_squares, K, eps, RMS: tl.constexpr):
    """Each row's rsqrt(mean(x²) + eps) from _dot_rows' sums of squares (unused without RMS)."""
    if RMS:
        sum_squares = tl.math.rsqrt(sum_squares / K + eps)
    return sum_squares


@triton.jit
def _scaled(y, rstd, S, B, n, n_ok, RMS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
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
    y, sum_squares = _dot_rows(x_rows, w_rows, row_ok, n_ok, K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, RMS)
    rstd = _rms_scale(sum_squares, K, eps, RMS)
    y = _scaled(y, rstd, S, B, n, n_ok, RMS, HAS_SCALE, HAS_BIAS)
    if GATED:  # rounded like F.silu(gate) * up on half-precision tensors
        up, _ = _dot_rows(x_rows, w_rows + N * stride_w, row_ok, n_ok, K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
                          False)
        up = _scaled(up, rstd, S + N, B + N, n, n_ok, RMS, HAS_SCALE, HAS_BIAS).to(Y.dtype.element_ty).to(tl.float32)
        gate = y.to(Y.dtype.element_ty).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate))).to(Y.dtype.element_ty).to(tl.float32) * up
    mask = row_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:  # rounded like the model's `residual + linear(x)` on half-precision tensors
        y = y.to(Y.dtype.element_ty).to(tl.float32)
        y += tl.load(R + rows[:, None] * stride_r + n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + n[None, :], y.to(Y.dtype.element_ty), mask=mask)


def small_m_config(M: int, N: int, K: int, weight_bytes: int, gated: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for M rows against an [N, K] weight: the best
    of sweeps on the H200 over the 1B, 8B and trained-pair shapes (benchmarks/RESULTS.md, runs S3-2 and S4-3)."""
    if M == 1:  # many small programs, each streaming whole rows
        if weight_bytes == 2 and K >= 8192:  # long rows (the MLP's down projection): one weight row per program
            return 1, 1, min(2048 if K >= 12288 else 1024, triton.next_power_of_2(K)), 4, 1
        if weight_bytes == 2 and gated and K <= 2048:
            return 1, 4, min(512, triton.next_power_of_2(K)), 4, 1
        return 1, 2 if weight_bytes == 2 else 4, min(1024, triton.next_power_of_2(K)), 4, 1
    wide = N >= 8192
    block_n = (64 if weight_bytes == 2 else 32) if wide else 32 if N >= 3072 else 16
    block_k = (128 if weight_bytes == 2 else 256) if wide else 512
    return 16, block_n, max(16, min(block_k, triton.next_power_of_2(K))), 4, 3 if wide else 4


def small_m_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                          scale: torch.Tensor | None = None, gated: bool = False, rms_eps: float | None = None,
                          residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] holding 1 to 16 rows; weight [N, K] with contiguous rows, FP8 when `scale` [N] float32 is given.
    gated: weight (and bias, scale) is [gate; up] and the result silu(x @ gate.T) * (x @ up.T), [..., N / 2].
    rms_eps: x goes through an RMSNorm (weight 1: fold it into `weight`) first. residual [..., N]: added to the result."""
    N, K = weight.shape[0], x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    n_out = N // 2 if gated else N
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"small-M linear: x {tuple(x.shape)} must hold 1 to {MAX_ROWS} rows")
    if weight.shape[1] != K or weight.stride(1) != 1:
        raise ValueError(f"small-M linear: weight {tuple(weight.shape)} must be [N, {K}] with contiguous rows")
    if scale is not None and (weight.dtype != torch.float8_e4m3fn or scale.shape != (N,) or scale.dtype != torch.float32):
        raise ValueError(f"small-M linear: an FP8 weight needs float8_e4m3fn and a float32 scale [{N}], got "
                         f"{weight.dtype} and {scale.dtype} {tuple(scale.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"small-M linear: bias {tuple(bias.shape)} must be [{N}]")
    if gated and N % 2:
        raise ValueError(f"small-M linear: a gated weight stacks gate and up rows, got {N} rows")
    if residual is not None and residual.shape != (*x.shape[:-1], n_out):
        raise ValueError(f"small-M linear: residual {tuple(residual.shape)} must be {(*x.shape[:-1], n_out)}")
    x2 = x2.contiguous()
    y = torch.empty(M, n_out, device=x.device, dtype=x.dtype)
    block_m, block_n, block_k, warps, stages = small_m_config(M, N, K, weight.element_size(), gated)
    if gated and block_m > 1:  # each program reads gate and up rows: as many weight bytes as an ungated one
        block_n = max(16, block_n // 2)
    launch_rows_linear(x2, weight, bias, scale, y, (block_m, block_n, block_k, warps, stages), gated, rms_eps,
                       None if residual is None else residual.reshape(M, n_out).contiguous())
    return y.view(*x.shape[:-1], n_out)


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


def _small_m_kernel_takes(x: torch.Tensor, weight: torch.Tensor, max_rows: int) -> bool:
    rows = x.numel() // max(x.shape[-1], 1)
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.stride(1) == 1 and 1 <= rows <= max_rows


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: torch.Tensor | None = None, rms_eps: float | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """residual + F.linear(rms_normalize(x), ...) (an FP8 weight when `scale` is given; the norm only with rms_eps,
    its weight folded into `weight`). On CUDA the small-M kernel computes it all for one row, and for up to 16 rows
    with FP8 weights or a norm or residual to fuse (plain bf16 with 2 to 16 rows: cuBLAS, as fast there)."""
    fused_io = rms_eps is not None or residual is not None
    if _small_m_kernel_takes(x, weight, MAX_ROWS if scale is not None or fused_io else 1):
        return small_m_linear_triton(x, weight, bias, scale, rms_eps=rms_eps, residual=residual)
    if rms_eps is not None:
        x = add_rmsnorm(x, None, None, rms_eps)[0]
    if scale is not None:
        from kernels.fp8 import fp8_linear
        y = fp8_linear(x, weight, scale, bias)
    else:
        y = F.linear(x, weight, bias)
    return y if residual is None else y + residual


def gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, rms_eps: float | None = None) -> torch.Tensor:
    """silu(gate) * up of a fused [gate; up] projection (the MLP's input half; rms_eps as in `linear`) in one kernel
    on CUDA, for one row and for up to 16 rows of bf16/fp16 weights: the gate and up products never leave registers.
    (FP8 weights with several rows ran slower gated than as linear + SiLU + multiply on the H200: RESULTS.md, S3-7.)"""
    if _small_m_kernel_takes(x, weight, 1 if scale is not None else MAX_ROWS):
        return small_m_linear_triton(x, weight, bias, scale, gated=True, rms_eps=rms_eps)
    gate, up = linear(x, weight, bias, scale, rms_eps=rms_eps).chunk(2, dim=-1)
    return F.silu(gate) * up
