"""y = x @ W.T (+ bias) for 1 to 16 rows of x: the decode and verify steps' linear layers.

With few rows a linear layer only streams its weight matrix, and cuBLAS leaves much of the memory
bandwidth unused on the smaller matrices (benchmarks/RESULTS.md, kernel tables). One Triton kernel
covers those shapes, for bf16/fp16 weights and for FP8 (e4m3) weights with one float32 scale per
output channel, converted in registers (weight-only FP8: the step reads half the bytes, and no
activation quantization kernel runs). One row multiplies and adds in registers; 2 to 16 rows use
tensor-core dots. `linear` sends bf16 weights with 2 to 16 rows to cuBLAS, which matched the kernel
there, and FP8 weights with more than 16 rows to `kernels.fp8`. `gated_linear` computes the MLP's
silu(gate) * up in the kernel's epilogue, saving the SiLU and multiply kernels of every layer.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_ROWS = 16


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     scale: torch.Tensor | None = None) -> torch.Tensor:
    if scale is None:
        return F.linear(x, weight, bias)
    y = x.float() @ (weight.float() * scale[:, None]).t()
    return (y if bias is None else y + bias.float()).to(x.dtype)


@triton.jit
def _dot_rows(x_rows, w_rows, row_ok, n_ok, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] float32 products of the x rows with the weight rows."""
    if BLOCK_M == 1:  # one row: partial products stay per lane, one reduction at the end
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
            w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)
        return tl.sum(acc, axis=1)[None, :]
    y = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # a few rows: tensor-core dots
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
        y = tl.dot(x, tl.trans(w.to(x.dtype)), y, input_precision=DOT_PRECISION)
    return y


@triton.jit
def _scaled(y, S, B, n, n_ok, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    if HAS_SCALE:
        y = y * tl.load(S + n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _rows_linear_kernel(X, W, S, B, Y, M, N, K, stride_x, stride_w, stride_y, HAS_SCALE: tl.constexpr,
                        HAS_BIAS: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Y = X @ W.T, or with GATED (W = [gate; up], 2N rows) Y = silu(X @ gate.T) * (X @ up.T)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n_ok, row_ok = n < N, rows < M
    x_rows = X + rows[:, None] * stride_x
    w_rows = W + n[:, None].to(tl.int64) * stride_w
    y = _dot_rows(x_rows, w_rows, row_ok, n_ok, K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    y = _scaled(y, S, B, n, n_ok, HAS_SCALE, HAS_BIAS)
    if GATED:  # rounded like F.silu(gate) * up on half-precision tensors
        up = _dot_rows(x_rows, w_rows + N * stride_w, row_ok, n_ok, K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        up = _scaled(up, S + N, B + N, n, n_ok, HAS_SCALE, HAS_BIAS).to(Y.dtype.element_ty).to(tl.float32)
        gate = y.to(Y.dtype.element_ty).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate))).to(Y.dtype.element_ty).to(tl.float32) * up
    tl.store(Y + rows[:, None] * stride_y + n[None, :], y.to(Y.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def small_m_config(M: int, N: int, K: int, weight_bytes: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for M rows against an [N, K] weight: the best
    of a sweep on the H200 over the 1B, 8B and trained-pair shapes (benchmarks/RESULTS.md, run S3-2)."""
    if M == 1:  # many small programs, each streaming whole rows
        return 1, 2 if weight_bytes == 2 else 4, min(1024, triton.next_power_of_2(K)), 4, 1
    wide = N >= 8192
    block_n = (64 if weight_bytes == 2 else 32) if wide else 32 if N >= 3072 else 16
    block_k = (128 if weight_bytes == 2 else 256) if wide else 512
    return 16, block_n, max(16, min(block_k, triton.next_power_of_2(K))), 4, 3 if wide else 4


def small_m_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                          scale: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    """x [..., K] holding 1 to 16 rows; weight [N, K] with contiguous rows, FP8 when `scale` [N] float32 is given.
    gated: weight (and bias, scale) is [gate; up] and the result silu(x @ gate.T) * (x @ up.T), [..., N / 2]."""
    N, K = weight.shape[0], x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
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
    x2 = x2.contiguous()
    n_out = N // 2 if gated else N
    y = torch.empty(M, n_out, device=x.device, dtype=x.dtype)
    block_m, block_n, block_k, warps, stages = small_m_config(M, N, K, weight.element_size())
    if gated and block_m > 1:  # each program reads gate and up rows: as many weight bytes as an ungated one
        block_n = max(16, block_n // 2)
    launch_rows_linear(x2, weight, bias, scale, y, (block_m, block_n, block_k, warps, stages), gated)
    return y.view(*x.shape[:-1], n_out)


def launch_rows_linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None,
                       y: torch.Tensor, config: tuple[int, int, int, int, int], gated: bool = False) -> None:
    """The kernel over all of y [M, N'] (x2 [M, K] and y with contiguous rows), tiled (BLOCK_M, BLOCK_N) with
    config = (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); checked by the callers."""
    block_m, block_n, block_k, warps, stages = config
    (M, n_out), K = y.shape, x2.shape[1]
    _rows_linear_kernel[(triton.cdiv(n_out, block_n), triton.cdiv(M, block_m))](
        x2, weight, scale if scale is not None else x2, bias if bias is not None else x2, y,
        M, n_out, K, x2.stride(0), weight.stride(0), y.stride(0), HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        GATED=gated, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages,
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear (an FP8 weight when `scale` is given) with the small-M kernel on CUDA for one row, and for
    up to 16 rows with FP8 weights."""
    rows = x.numel() // max(x.shape[-1], 1)
    if (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.stride(1) == 1
            and 1 <= rows <= (MAX_ROWS if scale is not None else 1)):
        return small_m_linear_triton(x, weight, bias, scale)
    if scale is not None:
        from kernels.fp8 import fp8_linear
        return fp8_linear(x, weight, scale, bias)
    return F.linear(x, weight, bias)


def gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up of a fused [gate; up] projection (the MLP's input half) in one kernel on CUDA, for one row
    and for up to 16 rows of bf16/fp16 weights: the gate and up products never leave registers. (FP8 weights with
    several rows ran slower gated than as linear + SiLU + multiply on the H200: RESULTS.md, S3-7.)"""
    rows = x.numel() // max(x.shape[-1], 1)
    if (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.stride(1) == 1
            and 1 <= rows <= (1 if scale is not None else MAX_ROWS)):
        return small_m_linear_triton(x, weight, bias, scale, gated=True)
    gate, up = linear(x, weight, bias, scale).chunk(2, dim=-1)
    return F.silu(gate) * up
